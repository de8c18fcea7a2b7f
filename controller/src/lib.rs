//! Weft's control plane: watches Kubernetes (or the local cluster's object store), translates
//! what it sees into Istio's workload xDS resources and Weft's waypoint (L7) resources, serves
//! them over delta ADS, signs workload certificates, and provisions waypoints.
//!
//! Owns: authentication of callers ([`auth`]), translation ([`translate`], pure), the xDS
//! resource cache and delta ADS server ([`xds`]), the CA service ([`ca`]), waypoint
//! provisioning and Gateway API status ([`provision`]). Does not own the data plane or the
//! Kubernetes object model (`weft-k8s`).

pub mod app;
pub mod auth;
pub mod ca;
pub mod config;
pub mod provision;
pub mod translate;
pub mod xds;
