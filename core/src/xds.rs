//! Delta xDS client: how a node proxy receives workload discovery (WDS) from the controller.
//!
//! Speaks incremental ADS (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`) the way ztunnel does with istiod (istio-ztunnel.md §2): gRPC over
//! TLS with a bearer token and `clusterid` header, one initial request per type URL carrying
//! the `Node`, wildcard or on-demand subscriptions, `initial_resource_versions` on reconnect,
//! a per-response ACK/NACK with per-resource rejection, reconnect with backoff, and a readiness
//! gate after the first sync.
//!
//! The caller registers one [`Handler`] per type URL (for ztunnel `istio.workload.Address` and
//! `istio.security.Authorization`); the client passes serialized resources and never decodes
//! them, so protobuf types stop at the handler. Runs as one task ([`Client::spawn`]) stopped by
//! a [`drain::Watch`](crate::drain::Watch); callers keep a [`Handle`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! # use weft_core::xds::{Client, Config, Handler, Rejection, Update};
//! # struct Addresses;
//! # impl Handler for Addresses {
//! #     fn type_url(&self) -> &'static str { weft_proto::ADDRESS_TYPE_URL }
//! #     fn apply(&self, _: Vec<Update>) -> Vec<Rejection> { Vec::new() }
//! # }
//! # async fn example(root_pem: String, drain: weft_core::drain::Watch) -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = Config::new("https://istiod.istio-system.svc:15012");
//! config.tls = Some(weft_core::xds::Tls { root_pem, server_name: None });
//! config.token = Some(Arc::new(weft_core::xds::FileToken {
//!     path: "./var/run/secrets/tokens/istio-token".into(),
//! }));
//! let client = Client::new(config, vec![Arc::new(Addresses)])?;
//! let handle = client.handle();
//! client.spawn(drain);
//! handle.ready().await?;
//! # Ok(())
//! # }
//! ```

mod client;
mod config;
mod handler;
mod protocol;
mod stats;

pub use client::{Client, DemandError, Handle, Stopped};
pub use config::{
    CONNECT_TIMEOUT, Config, ConfigError, FileToken, HTTP2_KEEPALIVE_INTERVAL,
    HTTP2_KEEPALIVE_TIMEOUT, MAX_RESPONSE_BYTES, NodeInfo, TCP_KEEPALIVE, Tls, TokenError,
    TokenSource,
};
pub use handler::{Handler, Rejection, Update};
pub use stats::{Stats, Termination, TypeStats};
