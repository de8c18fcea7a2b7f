//! Weft's CNI plugin and node agent (being built).
//!
//! Owns the enrollment decision ([`enroll`]), the chained CNI plugin ([`plugin`], binary `weft-cni`), the in-pod redirection rules
//! ([`redirect`]) and the ZDS server that hands pods to ztunnel ([`zds`]). Next: the node agent
//! daemon (enrollment, the plugin's socket, annotations), the installer.

pub mod enroll;
pub mod plugin;
pub mod redirect;
pub mod zds;
