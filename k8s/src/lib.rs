//! Kubernetes objects as Weft's control plane and node agent see them.
//!
//! Owns manifest parsing and validation ([`manifest`]), Istio's `security.istio.io/v1` CRD
//! types ([`crds`]), and the config source: one in-memory [`Index`] of the kinds Weft consumes,
//! fed either by the Kubernetes API ([`apiserver`], kube-rs watchers) or by a directory of
//! manifests watched live ([`files`], the local cluster's object store). Consumers read
//! consistent [`Snapshot`]s and are woken on change.
//!
//! Also owns the local cluster's object store ([`store`]), which the runner and the node agent
//! both write. Does not own translation into xDS (the controller).

pub mod apiserver;
pub mod crds;
pub mod files;
pub mod index;
pub mod manifest;
pub mod store;

pub use index::{Index, Kind, Resource, ResourceKey, Snapshot};
