//! Weft's CNI plugin and node agent.
//!
//! Owns the node agent ([`agent`], binary `weft-cni-agent`; files or Kubernetes source), the
//! enrollment decision ([`enroll`]), pod annotations ([`annotate`]), the chained CNI plugin
//! ([`plugin`], binary `weft-cni`) and its installer ([`install`]), the in-pod redirection rules
//! ([`redirect`]), the node's probe SNAT ([`probe`]), netns discovery through procfs
//! ([`netns`]) and the ZDS server that hands pods to ztunnel ([`zds`]). Does not own the
//! Kubernetes watchers or the object index (`weft-k8s`).

pub mod agent;
pub mod annotate;
pub mod enroll;
pub mod install;
pub mod netns;
pub mod plugin;
pub mod probe;
pub mod redirect;
pub mod zds;
