//! Weft's ztunnel: the node L4 proxy (being built).
//!
//! Owns the ZDS client ([`zds`]) that receives enrolled pods' network namespaces from the node
//! agent. Later: per-pod listeners, outbound/inbound/passthrough paths, telemetry, admin.

pub mod zds;
