//! Weft's ztunnel: the node L4 proxy.
//!
//! Owns the ZDS client ([`zds`]) that receives enrolled pods' network namespaces from the node
//! agent, the mesh state fed by workload xDS ([`state`]), sockets inside pod network namespaces
//! ([`netns`], [`socket`]: `setns` on a dedicated thread, `SO_MARK`, transparent binds, original
//! destination), each pod's listeners ([`pod`]: 15001 outbound, 15006 plaintext inbound, 15008
//! HBONE inbound), the inbound HBONE decision ([`inbound`]), the outbound path ([`outbound`]),
//! live policy re-checks of established connections ([`conntrack`]), TCP telemetry
//! ([`metrics`]) and the wiring with admin, stats and readiness
//! endpoints ([`app`]).

pub mod app;
pub mod config;
pub mod conntrack;
pub mod inbound;
pub mod metrics;
pub mod netns;
pub mod outbound;
pub mod pod;
pub mod socket;
pub mod state;
pub mod zds;
