//! SPIFFE workload identities in Istio's form: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Follows the SPIFFE ID specification (§2: scheme `spiffe`, trust domain of lowercase letters,
//! digits, `.`, `-`, `_`; path segments of letters, digits, `.`, `-`, `_`, never empty, `.` or `..`;
//! at most 2048 bytes) narrowed to the five-segment Kubernetes form Istio and ztunnel accept
//! (exactly `ns/<namespace>/sa/<service-account>` after the trust domain).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The URI scheme prefix of every SPIFFE ID.
pub const SCHEME_PREFIX: &str = "spiffe://";

/// Longest SPIFFE ID accepted, in bytes (SPIFFE ID specification §2.3).
pub const MAX_LEN_BYTES: usize = 2048;

/// Longest trust domain accepted, in bytes (SPIFFE ID specification §2.1).
pub const MAX_TRUST_DOMAIN_LEN_BYTES: usize = 255;

/// A workload identity: trust domain, Kubernetes namespace and service account.
///
/// Cheap to clone (the parts are shared). Ordered and hashable so it can key maps and pools.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: Arc<str>,
    namespace: Arc<str>,
    service_account: Arc<str>,
}

/// Why a string is not a valid Istio-form SPIFFE ID. Each malformed form has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The input was empty.
    #[error("spiffe id is empty")]
    Empty,
    /// The input is longer than [`MAX_LEN_BYTES`].
    #[error("spiffe id is {len} bytes, longer than the {MAX_LEN_BYTES} allowed")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The input does not start with `spiffe://` (scheme is case-sensitive).
    #[error("spiffe id {0:?} does not start with \"spiffe://\"")]
    MissingScheme(String),
    /// Nothing between `spiffe://` and the path.
    #[error("spiffe id {0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    /// The trust domain holds a character outside `[a-z0-9._-]` (this also refuses ports,
    /// user info and upper case).
    #[error("spiffe id {id:?} has an invalid character {ch:?} in its trust domain")]
    InvalidTrustDomain {
        /// The whole input.
        id: String,
        /// The first offending character.
        ch: char,
    },
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN_BYTES`].
    #[error("spiffe id {0:?} has a trust domain longer than {MAX_TRUST_DOMAIN_LEN_BYTES} bytes")]
    TrustDomainTooLong(String),
    /// The path is not exactly four segments (`ns/<ns>/sa/<sa>`).
    #[error(
        "spiffe id {id:?} has {found} path segments, expected 4 (ns/<namespace>/sa/<service account>)"
    )]
    WrongSegmentCount {
        /// The whole input.
        id: String,
        /// How many `/`-separated path segments were found.
        found: usize,
    },
    /// The first path segment is not the literal `ns`.
    #[error("spiffe id {0:?}: first path segment must be \"ns\"")]
    ExpectedNs(String),
    /// The third path segment is not the literal `sa`.
    #[error("spiffe id {0:?}: third path segment must be \"sa\"")]
    ExpectedSa(String),
    /// The namespace segment is empty.
    #[error("spiffe id {0:?} has an empty namespace")]
    EmptyNamespace(String),
    /// The service account segment is empty.
    #[error("spiffe id {0:?} has an empty service account")]
    EmptyServiceAccount(String),
    /// A path segment is `.` or `..`.
    #[error("spiffe id {0:?} has a relative path segment (\".\" or \"..\")")]
    RelativeSegment(String),
    /// A path segment holds a character outside `[A-Za-z0-9._-]` (e.g. `%`, `?`, `#`, space).
    #[error("spiffe id {id:?} has an invalid character {ch:?} in its path")]
    InvalidPathCharacter {
        /// The whole input.
        id: String,
        /// The first offending character.
        ch: char,
    },
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Builds an identity from its parts, validating each as [`FromStr`] would.
    ///
    /// # Errors
    /// The same [`Error`]s as parsing `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, Error> {
        format!("{SCHEME_PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The identity without the `spiffe://` prefix, as Istio authorization `principals` compare it
    /// (e.g. `cluster.local/ns/a/sa/b`).
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME_PREFIX}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Err(Error::Empty);
        }
        if s.len() > MAX_LEN_BYTES {
            return Err(Error::TooLong { len: s.len() });
        }
        let rest = s
            .strip_prefix(SCHEME_PREFIX)
            .ok_or_else(|| Error::MissingScheme(s.to_owned()))?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if trust_domain.is_empty() {
            return Err(Error::EmptyTrustDomain(s.to_owned()));
        }
        if trust_domain.len() > MAX_TRUST_DOMAIN_LEN_BYTES {
            return Err(Error::TrustDomainTooLong(s.to_owned()));
        }
        if let Some(ch) = trust_domain.chars().find(|c| !is_trust_domain_char(*c)) {
            return Err(Error::InvalidTrustDomain {
                id: s.to_owned(),
                ch,
            });
        }
        let segments: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path.split('/').collect()
        };
        if segments.len() != 4 {
            return Err(Error::WrongSegmentCount {
                id: s.to_owned(),
                found: segments.len(),
            });
        }
        for segment in &segments {
            if *segment == "." || *segment == ".." {
                return Err(Error::RelativeSegment(s.to_owned()));
            }
            if let Some(ch) = segment.chars().find(|c| !is_path_char(*c)) {
                return Err(Error::InvalidPathCharacter {
                    id: s.to_owned(),
                    ch,
                });
            }
        }
        if segments[0] != "ns" {
            return Err(Error::ExpectedNs(s.to_owned()));
        }
        if segments[2] != "sa" {
            return Err(Error::ExpectedSa(s.to_owned()));
        }
        if segments[1].is_empty() {
            return Err(Error::EmptyNamespace(s.to_owned()));
        }
        if segments[3].is_empty() {
            return Err(Error::EmptyServiceAccount(s.to_owned()));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: segments[1].into(),
            service_account: segments[3].into(),
        })
    }
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_istio_form() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(
            SpiffeId::new("cluster.local", "default", "sleep").unwrap(),
            id
        );
    }

    #[test]
    fn rejects_each_malformed_form_with_its_own_error() {
        let long = format!("spiffe://td/ns/{}/sa/x", "a".repeat(MAX_LEN_BYTES));
        let long_td = format!("spiffe://{}/ns/a/sa/b", "t".repeat(256));
        type Check = fn(&Error) -> bool;
        let cases: Vec<(&str, Check)> = vec![
            ("", |e| matches!(e, Error::Empty)),
            (&long, |e| matches!(e, Error::TooLong { .. })),
            ("http://cluster.local/ns/a/sa/b", |e| {
                matches!(e, Error::MissingScheme(_))
            }),
            ("SPIFFE://cluster.local/ns/a/sa/b", |e| {
                matches!(e, Error::MissingScheme(_))
            }),
            ("spiffe:///ns/a/sa/b", |e| {
                matches!(e, Error::EmptyTrustDomain(_))
            }),
            ("spiffe://Cluster.local/ns/a/sa/b", |e| {
                matches!(e, Error::InvalidTrustDomain { ch: 'C', .. })
            }),
            ("spiffe://td:8443/ns/a/sa/b", |e| {
                matches!(e, Error::InvalidTrustDomain { ch: ':', .. })
            }),
            (&long_td, |e| matches!(e, Error::TrustDomainTooLong(_))),
            ("spiffe://td", |e| {
                matches!(e, Error::WrongSegmentCount { found: 0, .. })
            }),
            ("spiffe://td/ns/a/sa", |e| {
                matches!(e, Error::WrongSegmentCount { found: 3, .. })
            }),
            ("spiffe://td/ns/a/sa/b/", |e| {
                matches!(e, Error::WrongSegmentCount { found: 5, .. })
            }),
            ("spiffe://td/namespace/a/sa/b", |e| {
                matches!(e, Error::ExpectedNs(_))
            }),
            ("spiffe://td/ns/a/serviceaccount/b", |e| {
                matches!(e, Error::ExpectedSa(_))
            }),
            ("spiffe://td/ns//sa/b", |e| {
                matches!(e, Error::EmptyNamespace(_))
            }),
            ("spiffe://td/ns/a/sa/", |e| {
                matches!(e, Error::EmptyServiceAccount(_))
            }),
            ("spiffe://td/ns/../sa/b", |e| {
                matches!(e, Error::RelativeSegment(_))
            }),
            ("spiffe://td/ns/a/sa/b?x=1", |e| {
                matches!(e, Error::InvalidPathCharacter { ch: '?', .. })
            }),
            ("spiffe://td/ns/a b/sa/c", |e| {
                matches!(e, Error::InvalidPathCharacter { ch: ' ', .. })
            }),
        ];
        let mut kinds = std::collections::HashSet::new();
        for (input, check) in cases {
            let err = input.parse::<SpiffeId>().expect_err(input);
            assert!(check(&err), "{input:?} gave the wrong error: {err:?}");
            assert!(!err.to_string().is_empty());
            kinds.insert(std::mem::discriminant(&err));
        }
        assert!(kinds.len() >= 8, "only {} distinct errors", kinds.len());
    }
}
