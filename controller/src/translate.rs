//! Translation of Kubernetes objects into workload xDS resources (being written).

pub mod authz;
