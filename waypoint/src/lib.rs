//! Weft's waypoint: the per-namespace L7 proxy.
//!
//! A waypoint terminates HBONE from ztunnels (the peer is the source workload's identity),
//! detects HTTP/1.1, HTTP/2 (incl. gRPC) or opaque TCP per stream, routes requests with Gateway
//! API semantics ([`engine`]), enforces L7 authorization, and forwards over HBONE with its own
//! identity to the chosen endpoint, with retries, timeouts, outlier detection and request
//! telemetry.

pub mod engine;
