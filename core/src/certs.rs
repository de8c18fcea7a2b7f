//! Workload certificates: PEM chain parsing in the CA response layout, leaf identity and validity,
//! and the key material a TLS config is built from.
//!
//! Chain layout (Istio CA `IstioCertificateResponse.cert_chain`): element 0 is the leaf, the middle
//! elements are intermediates, the **last element is the root bundle** (one or more concatenated
//! PEM certificates, all of which become trust anchors).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::SpiffeId;

/// Errors parsing certificate chains, keys and leaf certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The chain had no elements.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The chain has a leaf but no root bundle element.
    #[error("certificate chain has no root bundle (it needs at least a leaf and a root element)")]
    MissingRoots,
    /// A PEM block could not be decoded.
    #[error("invalid pem in {what}")]
    Pem {
        /// Which input, e.g. "chain element 1".
        what: String,
        /// The decoder's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM input held no certificate.
    #[error("no certificate found in {what}")]
    NoCertificate {
        /// Which input, e.g. "root bundle".
        what: String,
    },
    /// A DER certificate could not be parsed as X.509.
    #[error("invalid x.509 certificate in {what}: {reason}")]
    X509 {
        /// Which input.
        what: String,
        /// What the parser reported.
        reason: String,
    },
    /// The private key PEM held no usable key.
    #[error("invalid private key pem")]
    Key(#[source] rustls_pki_types::pem::Error),
    /// The leaf carries no URI SAN that parses as a SPIFFE ID.
    #[error("leaf certificate has no spiffe uri san")]
    NoSpiffeSan,
    /// The leaf's identity is not the one that was asked for.
    #[error("leaf certificate identity {found} is not the requested {expected}")]
    IdentityMismatch {
        /// The identity that was requested.
        expected: SpiffeId,
        /// The identity in the leaf.
        found: SpiffeId,
    },
    /// rustls refused a root certificate as a trust anchor.
    #[error("root certificate is not a usable trust anchor")]
    TrustAnchor(#[source] rustls::Error),
}

/// A workload's certificate: leaf + intermediates, private key, trust roots, identity and validity.
///
/// Built from a CA response with [`WorkloadCertificate::from_pem_chain`]. Holds lazily built
/// rustls server config so every HBONE listener of the workload shares one.
pub struct WorkloadCertificate {
    identity: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    root_certs: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    pub(crate) server_config: OnceLock<Arc<rustls::ServerConfig>>,
}

// === impl WorkloadCertificate ===

impl WorkloadCertificate {
    /// Builds a workload certificate from a CA response chain (leaf, intermediates…, root bundle)
    /// and the PEM private key the CSR was made with.
    ///
    /// # Errors
    /// [`Error::EmptyChain`]/[`Error::MissingRoots`] for a short chain, PEM/X.509 errors naming
    /// the chain element, [`Error::NoSpiffeSan`] when the leaf has no SPIFFE identity, and
    /// [`Error::IdentityMismatch`] when `expected` is given and differs from the leaf's identity.
    pub fn from_pem_chain(
        chain: &[String],
        key_pem: &str,
        expected: Option<&SpiffeId>,
    ) -> Result<Self, Error> {
        let Some((root_bundle, certs)) = chain.split_last() else {
            return Err(Error::EmptyChain);
        };
        if certs.is_empty() {
            return Err(Error::MissingRoots);
        }
        let mut leaf_and_intermediates = Vec::with_capacity(certs.len());
        for (i, pem) in certs.iter().enumerate() {
            let what = if i == 0 {
                "leaf certificate".to_owned()
            } else {
                format!("chain element {i}")
            };
            leaf_and_intermediates.extend(parse_pem_certificates(pem, &what)?);
        }
        let root_certs = parse_pem_certificates(root_bundle, "root bundle")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(Error::Key)?;
        Self::from_der(leaf_and_intermediates, key, root_certs, expected)
    }

    /// Builds a workload certificate from DER parts: `chain` is leaf first, then intermediates.
    ///
    /// # Errors
    /// As [`WorkloadCertificate::from_pem_chain`], plus [`Error::TrustAnchor`] for a root rustls
    /// cannot use.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        root_certs: Vec<CertificateDer<'static>>,
        expected: Option<&SpiffeId>,
    ) -> Result<Self, Error> {
        let leaf = chain.first().ok_or(Error::EmptyChain)?;
        if root_certs.is_empty() {
            return Err(Error::MissingRoots);
        }
        let info = LeafInfo::parse(leaf)?;
        let identity = info.identity.ok_or(Error::NoSpiffeSan)?;
        if let Some(expected) = expected
            && *expected != identity
        {
            return Err(Error::IdentityMismatch {
                expected: expected.clone(),
                found: identity,
            });
        }
        let mut roots = RootCertStore::empty();
        for root in &root_certs {
            roots.add(root.clone()).map_err(Error::TrustAnchor)?;
        }
        Ok(WorkloadCertificate {
            identity,
            chain,
            key,
            roots: Arc::new(roots),
            root_certs,
            not_before: info.not_before,
            not_after: info.not_after,
            server_config: OnceLock::new(),
        })
    }

    /// The identity in the leaf's first SPIFFE URI SAN.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Leaf followed by intermediates, as presented in a TLS handshake.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key (PKCS#8 or SEC1 DER).
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// Trust anchors from the chain's root bundle.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The root bundle certificates in DER.
    pub fn root_certs(&self) -> &[CertificateDer<'static>] {
        &self.root_certs
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the certificate should be renewed: half-way through its lifetime
    /// (`not_before + (not_after - not_before) / 2`), as ztunnel does.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }

    /// Whether `now` is past the end of the validity period.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.root_certs.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What Weft reads from a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    /// The first URI SAN that parses as a SPIFFE ID (non-URI SANs are ignored).
    pub identity: Option<SpiffeId>,
    /// Every URI SAN, parsed or not.
    pub uri_sans: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

// === impl LeafInfo ===

impl LeafInfo {
    /// Parses a DER certificate.
    ///
    /// # Errors
    /// [`Error::X509`] when the DER is not a certificate or its SAN extension is malformed.
    pub fn parse(der: &CertificateDer<'_>) -> Result<Self, Error> {
        let x509_err = |reason: String| Error::X509 {
            what: "leaf certificate".into(),
            reason,
        };
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| x509_err(e.to_string()))?;
        let mut uri_sans = Vec::new();
        if let Some(san) = cert
            .subject_alternative_name()
            .map_err(|e| x509_err(e.to_string()))?
        {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uri_sans.push((*uri).to_owned());
                }
            }
        }
        let identity = uri_sans.iter().find_map(|u| u.parse::<SpiffeId>().ok());
        Ok(LeafInfo {
            identity,
            uri_sans,
            not_before: asn1_to_system(cert.validity().not_before.timestamp()),
            not_after: asn1_to_system(cert.validity().not_after.timestamp()),
        })
    }
}

fn asn1_to_system(unix_seconds: i64) -> SystemTime {
    if unix_seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix_seconds.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs())
    }
}

/// Parses every `CERTIFICATE` block of a PEM string (other block types are skipped).
///
/// # Errors
/// [`Error::Pem`] for a malformed block, [`Error::NoCertificate`] when none is present; `what`
/// names the input in the message.
pub fn parse_pem_certificates(
    pem: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            what: what.to_owned(),
        });
    }
    for cert in &certs {
        X509Certificate::from_der(cert).map_err(|e| Error::X509 {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(certs)
}
