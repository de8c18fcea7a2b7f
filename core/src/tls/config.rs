use std::sync::Arc;

use rustls::client::Resumption;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, CommonState, ServerConfig};

use super::provider::provider;
use super::verify::{IdentityVerifier, TrustDomainVerifier};
use crate::certs::{LeafInfo, WorkloadCertificate};
use crate::identity::SpiffeId;

/// The only ALPN protocol HBONE offers and accepts.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// Errors building a TLS configuration from a workload certificate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rustls refused the certificate, key or protocol settings.
    #[error("building tls config for {identity}")]
    Rustls {
        /// The workload identity the config was for.
        identity: SpiffeId,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built from the trust roots.
    #[error("building client verifier for {identity}")]
    Verifier {
        /// The workload identity the config was for.
        identity: SpiffeId,
        /// The cause.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// The HBONE server config for a workload's 15008 listener: presents `cert`, requires a client
/// certificate chained to `cert`'s roots with a SPIFFE SAN in `cert`'s trust domain, TLS 1.3,
/// ALPN `h2`, no session tickets. Built once per certificate and cached.
///
/// # Errors
/// [`Error`] when rustls refuses the key material.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, Error> {
    if let Some(config) = cert.server_config.get() {
        return Ok(config.clone());
    }
    let identity = cert.identity().clone();
    let provider = provider();
    let webpki =
        WebPkiClientVerifier::builder_with_provider(cert.roots().clone(), provider.clone())
            .build()
            .map_err(|source| Error::Verifier {
                identity: identity.clone(),
                source,
            })?;
    let verifier = TrustDomainVerifier::new(webpki, identity.trust_domain().to_owned());
    let rustls_err = |source| Error::Rustls {
        identity: identity.clone(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain().to_vec(), cert.key().clone_key())
        .map_err(rustls_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let config = Arc::new(config);
    Ok(cert.server_config.get_or_init(|| config).clone())
}

/// The HBONE client config for connecting as `cert`'s identity to a peer that must present one
/// of `expected`: TLS 1.3, ALPN `h2`, no SNI, no session resumption, client certificate = `cert`.
///
/// # Errors
/// [`Error`] when rustls refuses the key material.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: Vec<SpiffeId>,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = IdentityVerifier::new(cert.roots().clone(), expected, provider.clone());
    let rustls_err = |source| Error::Rustls {
        identity: cert.identity().clone(),
        source,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.key().clone_key())
        .map_err(rustls_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The peer's identity on an established connection: the first URI SAN of its leaf that parses
/// as a SPIFFE ID. `None` when the peer sent no certificate or no such SAN.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    LeafInfo::parse(leaf).ok()?.identity
}
