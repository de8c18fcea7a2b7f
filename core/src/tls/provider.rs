use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The process-wide crypto provider for data-plane TLS, restricted to the two TLS 1.3 AES-GCM
/// suites (`TLS13_AES_256_GCM_SHA384`, `TLS13_AES_128_GCM_SHA256`; no ChaCha20), as ztunnel.
///
/// aws-lc-rs by default; BoringSSL's FIPS module with the `fips` feature.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(build())).clone()
}

#[cfg(not(feature = "fips"))]
fn build() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    provider
}

#[cfg(feature = "fips")]
fn build() -> CryptoProvider {
    let mut provider = boring_rustls_provider::provider();
    provider.cipher_suites.retain(|suite| {
        matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                | rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        )
    });
    provider
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_aes_gcm_tls13_suites_from_the_configured_backend() {
        let provider = provider();
        let suites: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        let mut sorted = suites.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        assert_eq!(
            sorted,
            vec![
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
            ]
        );
        // aws-lc-rs' key provider debug-prints as `AwsLcRs`; BoringSSL's does not.
        let backend = format!("{:?}", provider.key_provider);
        assert_eq!(
            backend.contains("AwsLc"),
            !cfg!(feature = "fips"),
            "key provider {backend} does not match the fips feature"
        );
    }
}
