//! The `istio.workload.Address` resource: a workload or a service.

use weft_proto::istio::workload as proto;

use super::error::{Error, Reason};
use super::service::Service;
use super::workload::Workload;

/// One WDS `Address` resource, converted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "built once per xDS resource and moved straight into the store; boxing only adds an allocation"
)]
pub enum Resource {
    /// A workload, named by its uid.
    Workload(Workload),
    /// A service, named `namespace/hostname`.
    Service(Service),
}

impl Resource {
    /// The xDS resource name: the workload uid or the service's `namespace/hostname`
    /// (reference §2.6).
    pub fn name(&self) -> &str {
        match self {
            Resource::Workload(w) => &w.uid,
            Resource::Service(s) => s.key(),
        }
    }
}

impl TryFrom<proto::Address> for Resource {
    type Error = Error;

    /// Converts whichever of workload or service the address holds.
    ///
    /// # Errors
    /// [`Reason::Missing`] on field `type` when neither is set; otherwise the workload's or
    /// service's own conversion error.
    fn try_from(a: proto::Address) -> Result<Self, Error> {
        match a.r#type {
            Some(proto::address::Type::Workload(w)) => {
                Workload::try_from(w).map(Resource::Workload)
            }
            Some(proto::address::Type::Service(s)) => Service::try_from(s).map(Resource::Service),
            None => Err(Error::new("address", "", "type", Reason::Missing)),
        }
    }
}
