//! Weft's ztunnel: the node L4 proxy (being built).
//!
//! Owns the ZDS client ([`zds`]) that receives enrolled pods' network namespaces from the node
//! agent, the mesh state fed by workload xDS ([`state`]), sockets inside pod network namespaces
//! ([`netns`], [`socket`]: `setns` on a dedicated thread, `SO_MARK`, transparent binds, original
//! destination), the inbound HBONE decision ([`inbound`]) and the outbound path ([`outbound`])
//! for a pod, and TCP telemetry ([`metrics`]). Later: per-pod listener assembly, plaintext
//! inbound (done), admin (done); live policy re-check ([`conntrack`]); next: local-cluster end to end.

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
