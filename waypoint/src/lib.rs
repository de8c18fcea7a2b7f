//! Weft's waypoint: the per-namespace L7 proxy.
//!
//! A waypoint terminates HBONE from ztunnels (the peer is the source workload's identity),
//! detects HTTP/1.1, HTTP/2 (incl. gRPC) or opaque TCP per stream, routes requests with Gateway
//! API semantics ([`engine`]), enforces L7 authorization, and forwards over HBONE with its own
//! identity to the chosen endpoint, with retries, timeouts, outlier detection and request
//! telemetry.
//!
//! Owns: the flags ([`config`]), the xDS-fed state and which targets are bound here
//! ([`state`]), the HBONE handler and protocol detection ([`inbound`]), the request pipeline
//! ([`proxy`]), forwarding with retries/timeouts ([`upstream`]) and endpoint choice / outlier
//! detection ([`lb`]), request bodies ([`body`]), the one error → status mapping ([`error`]),
//! trace headers ([`trace`]), telemetry ([`metrics`]) and the wiring with admin endpoints
//! ([`app`]), and a benchmark-only standalone mode on plain TCP ([`standalone`]). Does not own: route and policy evaluation ([`engine`], pure), HBONE, TLS, xDS or
//! certificates (`weft_core`).

pub mod app;
pub mod body;
pub mod config;
pub mod engine;
pub mod error;
pub mod inbound;
pub mod lb;
pub mod metrics;
pub mod proxy;
pub mod standalone;
pub mod state;
pub mod trace;
pub mod upstream;

pub use error::Error;
