//! Why a WDS resource was rejected.

use super::cidr::CidrError;
use crate::identity;

/// A rejected `istio.workload` resource: which one, which field, and why. Rejection is per
/// resource (istio-ztunnel reference §2.5): the xDS layer NACKs it and applies the rest of the
/// response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: field {field}: {reason}")]
pub struct Error {
    /// `"workload"`, `"service"` or `"address"`.
    pub kind: &'static str,
    /// The resource's name as far as known: workload uid (or `namespace/name`), service
    /// `namespace/hostname`.
    pub name: String,
    /// The offending field, with indices or map keys, e.g. `addresses[1]`,
    /// `services["default/echo.default.svc.cluster.local"]`.
    pub field: String,
    /// What is wrong with it.
    #[source]
    pub reason: Reason,
}

/// What is wrong with a field of a WDS resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// A required string is empty.
    #[error("must not be empty")]
    Empty,
    /// An address is not 4 or 16 bytes, or its prefix length is too long.
    #[error(transparent)]
    Cidr(#[from] CidrError),
    /// A port number does not fit in 16 bits.
    #[error("{value} is not a port number (0-65535)")]
    Port {
        /// The value received.
        value: u32,
    },
    /// An enum field holds a value this version does not know.
    #[error("unknown enum value {value}")]
    UnknownEnum {
        /// The value received.
        value: i32,
    },
    /// `tunnel_protocol = LEGACY_ISTIO_MTLS`, which ztunnel does not implement (reference §2.6).
    #[error("tunnel protocol LEGACY_ISTIO_MTLS is not supported")]
    LegacyIstioMtls,
    /// A `oneof` that must be set is not (`Address.type`, `GatewayAddress.destination`).
    #[error("must be set")]
    Missing,
    /// A service reference is not `namespace/hostname` (exactly one `/`, both parts non-empty).
    #[error("{value:?} is not namespace/hostname")]
    ServiceKey {
        /// The key received.
        value: String,
    },
    /// Trust domain, namespace and service account do not form a valid SPIFFE ID.
    #[error("invalid identity")]
    Identity(#[source] identity::Error),
}

impl Error {
    pub(crate) fn new(
        kind: &'static str,
        name: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<Reason>,
    ) -> Self {
        Error {
            kind,
            name: name.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}
