//! Weft's CNI plugin and node agent (being built).
//!
//! Owns the in-pod redirection rules ([`redirect`]). Next: the chained plugin, the node agent
//! (enrollment, rule installation, the ZDS server), the installer.

pub mod plugin;
pub mod redirect;
