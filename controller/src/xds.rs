//! Delta ADS: the versioned resource [`Cache`] the translation loop publishes into, the
//! [`Server`] streaming it to node proxies over incremental xDS, and the [`Registry`] of
//! connected clients (with a debug HTTP endpoint, [`serve_debug`]).
//!
//! Serves what ztunnel expects (istio-ztunnel.md §2): `DeltaAggregatedResources` only,
//! wildcard and on-demand subscriptions (aliases `network/ip`), `initial_resource_versions` on
//! reconnect, per-response ACK/NACK. Does not translate anything (see `translate`) and does
//! not terminate TLS (the caller wires the listener).

mod cache;
mod debug;
mod registry;
mod server;
mod subscription;

pub use cache::{Cache, Resource, SetOutcome, Versioned, version_of};
pub use debug::serve_debug;
pub use registry::{ConnectionInfo, Nack, Registry, TypeInfo};
pub use server::{MAX_REQUEST_BYTES, Server};
