//! What ztunnel knows about the mesh from workload xDS, and the outbound routing decision made
//! from it.
//!
//! Owns the domain types converted from `istio.workload.Address` resources ([`Workload`],
//! [`Service`], [`GatewayAddress`]; proto types stop at [`Resource::try_from`] and friends), the
//! indexed [`Store`] (workloads by uid and `(network, ip)`, services by `namespace/hostname` and
//! VIP, endpoints staged until their service arrives) and the pure outbound decision
//! ([`Store::outbound`] → [`Decision`]), following the istio-ztunnel reference §2.6 (state
//! semantics) and §7.1 (outbound routing) without multi-network (double HBONE) paths.
//!
//! Does not own: the xDS client, locking (callers wrap the [`Store`]), L4 authorization
//! ([`crate::policy`]), sockets or DNS.

mod cidr;
mod error;
mod gateway;
mod outbound;
mod resource;
mod service;
mod store;
mod workload;

pub use cidr::{Cidr, CidrError};
pub use error::{Error, Reason};
pub use gateway::{GatewayAddress, GatewayDestination};
pub use outbound::{Decision, SELF_PORTS, random_below, target_port};
pub use resource::Resource;
pub use service::{HealthPolicy, LoadBalancing, LoadBalancingMode, RoutingScope, Service, Vip};
pub use service::{Visibility, WeightedWaypoint};
pub use store::{Removed, Store};
pub use workload::WorkloadType;
pub use workload::{DEFAULT_CAPACITY, DEFAULT_CLUSTER_ID, DEFAULT_SERVICE_ACCOUNT};
pub use workload::{DEFAULT_TRUST_DOMAIN, Locality, Port, ServicePorts, TunnelProtocol, Workload};

#[cfg(test)]
mod tests;
