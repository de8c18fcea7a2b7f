//! Key and certificate signing request generation for workload identities.
//!
//! As ztunnel does (Istio CA protocol): a fresh ECDSA P-256 key per request, a PKCS#10 CSR signed
//! with ECDSA-SHA256, an empty subject and a single URI SAN holding the SPIFFE ID.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, string::Ia5String};

use crate::identity::SpiffeId;

/// A CSR and the private key it was made with.
pub struct Request {
    /// PEM `CERTIFICATE REQUEST`.
    pub csr_pem: String,
    /// PEM PKCS#8 `PRIVATE KEY`; never leaves the process that generated it.
    pub key_pem: String,
}

/// Errors generating a key or CSR.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Key generation failed in the crypto library.
    #[error("generating ecdsa p-256 key")]
    Key(#[source] rcgen::Error),
    /// The identity could not be encoded as a URI SAN.
    #[error("encoding uri san {0}")]
    San(SpiffeId, #[source] rcgen::Error),
    /// Encoding or signing the CSR failed.
    #[error("signing certificate request for {0}")]
    Sign(SpiffeId, #[source] rcgen::Error),
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("csr_pem", &self.csr_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Generates a fresh P-256 key and a CSR for `identity`.
///
/// # Errors
/// [`Error`] when the crypto library fails; never for a valid [`SpiffeId`].
pub fn generate(identity: &SpiffeId) -> Result<Request, Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::Key)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri =
        Ia5String::try_from(identity.to_string()).map_err(|e| Error::San(identity.clone(), e))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Error::Sign(identity.clone(), e))?;
    let csr_pem = csr.pem().map_err(|e| Error::Sign(identity.clone(), e))?;
    Ok(Request {
        csr_pem,
        key_pem: key.serialize_pem(),
    })
}
