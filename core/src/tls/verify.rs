use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::certs::LeafInfo;
use crate::identity::SpiffeId;

/// Why a peer certificate chained correctly but its SPIFFE identity was not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The server's identity is none of the expected ones.
    #[error("peer identities {presented:?} match none of the expected {expected:?}")]
    UnexpectedIdentity {
        /// Expected SPIFFE IDs.
        expected: Vec<String>,
        /// URI SANs the peer presented.
        presented: Vec<String>,
    },
    /// The client's identity is not in the server's trust domain.
    #[error("peer identities {presented:?} are not in trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The server's own trust domain.
        trust_domain: String,
        /// URI SANs the peer presented.
        presented: Vec<String>,
    },
}

fn reject(err: VerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(err))))
}

fn leaf_sans(end_entity: &CertificateDer<'_>) -> Result<Vec<String>, rustls::Error> {
    LeafInfo::parse(end_entity)
        .map(|info| info.uri_sans)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
}

/// Client-side verification of an HBONE server (ztunnel's `IdentityVerifier`): the chain must
/// reach the trust roots with the `serverAuth` usage, and some SPIFFE URI SAN must **equal** one
/// of the expected identities. DNS and IP SANs and the TLS server name are never checked.
#[derive(Debug)]
pub struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl IdentityVerifier {
    /// A verifier accepting any of `expected`, chained to `roots`.
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: Vec<SpiffeId>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        IdentityVerifier {
            roots,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let presented = leaf_sans(end_entity)?;
        let ok = presented
            .iter()
            .filter_map(|uri| uri.parse::<SpiffeId>().ok())
            .any(|id| self.expected.contains(&id));
        if ok {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(reject(VerifyError::UnexpectedIdentity {
                expected: self.expected.iter().map(ToString::to_string).collect(),
                presented,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server-side verification of an HBONE client (ztunnel's `TrustDomainVerifier`): the chain must
/// reach the trust roots with the `clientAuth` usage (webpki), a client certificate is mandatory,
/// and some SPIFFE URI SAN must be in the server's own trust domain. Authorization of the
/// identity happens later, in L4 policy.
#[derive(Debug)]
pub struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl TrustDomainVerifier {
    /// Wraps a webpki client verifier with the trust-domain check.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, trust_domain: String) -> Self {
        TrustDomainVerifier {
            inner,
            trust_domain,
        }
    }
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = leaf_sans(end_entity)?;
        let ok = presented
            .iter()
            .filter_map(|uri| uri.parse::<SpiffeId>().ok())
            .any(|id| id.trust_domain() == self.trust_domain);
        if ok {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(reject(VerifyError::ForeignTrustDomain {
                trust_domain: self.trust_domain.clone(),
                presented,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
