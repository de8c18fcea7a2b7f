//! Weft's CNI plugin and node agent (being built).
//!
//! Owns the node agent ([`agent`], binary `weft-cni-agent`), the enrollment decision ([`enroll`]), the chained CNI plugin ([`plugin`], binary `weft-cni`), the in-pod redirection rules
//! ([`redirect`]) and the ZDS server that hands pods to ztunnel ([`zds`]). Next: the Kubernetes
//! source and installer mode.

pub mod agent;
pub mod annotate;
pub mod enroll;
pub mod install;
pub mod netns;
pub mod plugin;
pub mod probe;
pub mod redirect;
pub mod zds;
