//! Weft's ztunnel: the node L4 proxy (being built).
//!
//! Owns the ZDS client ([`zds`]) that receives enrolled pods' network namespaces from the node
//! agent, the mesh state fed by workload xDS ([`state`]), and the inbound HBONE decision for a
//! pod ([`inbound`]). Later: per-pod listeners, outbound and plaintext paths, telemetry, admin.

pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod state;
pub mod zds;
