//! Benchmark-only standalone mode (`waypoint bench-serve`, hidden): the waypoint's real HTTP
//! stack on plain TCP listeners, with a static configuration read from a file instead of xDS,
//! for `weft-bench engine` (the waypoint against Envoy as an HTTP router, same route table).
//!
//! What is the same as production: the state is fed through the xDS handlers
//! ([`WaypointState::handlers`]) with the same encoded `DeltaDiscoveryResponse`s the controller
//! sends; each accepted connection goes through [`crate::state::resolve`] and
//! [`crate::inbound::serve_stream`] (protocol detection, hyper HTTP/1.1 / HTTP/2) into the same
//! [`Proxy`] pipeline (`x-request-id`/`traceparent`, L7 authorization, routing, filters,
//! upstream pooling, retries/timeouts, metrics and the access-log event) and the same
//! [`Forwarder`]. What is replaced: HBONE in (each listener stands for CONNECTs to one fixed
//! target, `--peer` for the mTLS peer identity, the TCP peer address for `forwarded`) and HBONE
//! out (endpoints are declared without a tunnel, so the forwarder dials them over plain TCP, as
//! it does for such endpoints in production). No identity, CA or xDS client runs.
//!
//! Not for production: nothing here authenticates the peer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use futures::future::BoxFuture;
use hyper::StatusCode;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::net::TcpListener;
use tracing::{Instrument, info, info_span, warn};
use weft_core::certs::WorkloadCertificate;
use weft_core::hbone::{CertificateSource, Pool, PoolConfig, TcpConnector};
use weft_core::xds::Update;
use weft_core::{SpiffeId, drain};
use weft_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;

use crate::app::{Endpoint, serve_http};
use crate::metrics::{self, Metrics};
use crate::proxy::Proxy;
use crate::state::{Binding, WaypointState, resolve};
use crate::upstream::Forwarder;

/// One plain listener and the CONNECT target it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// The plain TCP address to listen on.
    pub addr: SocketAddr,
    /// The target every connection on it is for (a bound service's `VIP:port`).
    pub target: SocketAddr,
}

fn parse_listen(text: &str) -> Result<Listen, String> {
    let (addr, target) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not LISTEN_ADDR=TARGET_ADDR"))?;
    Ok(Listen {
        addr: addr
            .parse()
            .map_err(|e| format!("listen address {addr:?}: {e}"))?,
        target: target
            .parse()
            .map_err(|e| format!("target address {target:?}: {e}"))?,
    })
}

/// `waypoint bench-serve` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "waypoint bench-serve",
    about = "Benchmark-only: the waypoint's HTTP stack on plain TCP with a static configuration"
)]
pub struct Config {
    /// The resources: length-delimited `envoy.service.discovery.v3.DeltaDiscoveryResponse`
    /// messages (Address, then ServiceConfig, then Policy), applied in file order.
    #[arg(long)]
    pub resources: PathBuf,
    /// `LISTEN_ADDR=TARGET_ADDR`: plain TCP listener and the `VIP:port` its connections are
    /// for (repeatable).
    #[arg(long = "listen", value_parser = parse_listen, required = true)]
    pub listeners: Vec<Listen>,
    /// The identity standing in for the mTLS peer of every connection.
    #[arg(long, default_value = "spiffe://cluster.local/ns/bench/sa/client")]
    pub peer: SpiffeId,
    /// This waypoint's namespace.
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    /// This waypoint's service hostname (what bound services name as their waypoint).
    #[arg(long, default_value = "waypoint.bench.svc.cluster.local")]
    pub waypoint_hostname: String,
    /// This waypoint's identity (labels only: no certificate is used).
    #[arg(long, default_value = "spiffe://cluster.local/ns/bench/sa/waypoint")]
    pub identity: SpiffeId,
    /// Metrics endpoint (`/metrics`); off when absent.
    #[arg(long)]
    pub stats: Option<SocketAddr>,
    /// Runtime worker threads; at least 1.
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
}

/// Errors of the standalone mode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resources file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The resources file is not a sequence of length-delimited `DeltaDiscoveryResponse`s.
    #[error("decoding {path}")]
    Decode {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: prost::DecodeError,
    },
    /// A response names a type no handler takes.
    #[error("no handler for type {0}")]
    UnknownType(String),
    /// A handler rejected resources.
    #[error("rejected: {0}")]
    Rejected(String),
    /// A listener's target is not served by this waypoint.
    #[error("target {target}")]
    Target {
        /// The target.
        target: SocketAddr,
        /// Why.
        #[source]
        source: crate::state::Unbound,
    },
    /// A listener could not be bound.
    #[error("binding {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// HBONE out is never used here (endpoints have no tunnel); a certificate request is an error.
struct NoCertificates;

impl CertificateSource for NoCertificates {
    fn certificate<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCertificate>, Box<dyn std::error::Error + Send + Sync>>>
    {
        Box::pin(async move {
            Err(format!("standalone mode has no certificate for {identity} (no HBONE)").into())
        })
    }
}

/// Applies the resources file to `state` through the xDS handlers.
///
/// # Errors
/// [`Error::Read`], [`Error::Decode`], [`Error::UnknownType`], [`Error::Rejected`].
pub fn load(state: &Arc<WaypointState>, path: &std::path::Path) -> Result<usize, Error> {
    let display = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: display.clone(),
        source,
    })?;
    let handlers = state.handlers();
    let mut buf = bytes.as_slice();
    let mut applied = 0;
    while buf.has_remaining() {
        let response =
            DeltaDiscoveryResponse::decode_length_delimited(&mut buf).map_err(|source| {
                Error::Decode {
                    path: display.clone(),
                    source,
                }
            })?;
        let handler = handlers
            .iter()
            .find(|h| h.type_url() == response.type_url)
            .ok_or_else(|| Error::UnknownType(response.type_url.clone()))?;
        let updates: Vec<Update> = response
            .resources
            .into_iter()
            .map(|r| Update::Upsert {
                name: r.name,
                version: r.version,
                body: r.resource.unwrap_or_default(),
            })
            .collect();
        applied += updates.len();
        let rejected = handler.apply(updates);
        if !rejected.is_empty() {
            let text: Vec<String> = rejected.iter().map(ToString::to_string).collect();
            return Err(Error::Rejected(text.join("; ")));
        }
    }
    Ok(applied)
}

/// Runs until `shutdown` resolves, then drains (1 s).
///
/// # Errors
/// [`Error`] when the configuration cannot be loaded or a listener cannot be bound.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    info!(config = ?config, "starting standalone (benchmark) mode: plain TCP in and out, no HBONE");
    let (trigger, watch) = drain::channel();
    let state = WaypointState::new();
    let applied = load(&state, &config.resources)?;
    let binding = Binding {
        namespace: config.namespace.clone(),
        hostname: config.waypoint_hostname.clone(),
        own_ips: Vec::new(),
    };
    for listen in &config.listeners {
        let inner = state.read();
        resolve(
            &inner.workloads,
            &binding,
            listen.target,
            config.peer.namespace(),
        )
        .map_err(|source| Error::Target {
            target: listen.target,
            source,
        })?;
    }
    let metrics = Arc::new(Metrics::default());
    let pool = Pool::new(
        PoolConfig::default(),
        Arc::new(TcpConnector),
        Arc::new(NoCertificates),
    );
    let forwarder = Arc::new(Forwarder::new(state.clone(), pool, config.identity.clone()));
    let proxy =
        Arc::new(Proxy::new(state.clone(), forwarder, metrics.clone()).with_drain(watch.clone()));
    if let Some(addr) = config.stats {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let registry = Arc::new(registry);
        let stats: Endpoint = Arc::new(move |_, path, _| match path {
            "/metrics" | "/stats/prometheus" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics::encode(&registry),
            ),
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        });
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        tokio::spawn(serve_http(listener, stats, watch.clone()).instrument(info_span!("stats")));
    }
    for listen in &config.listeners {
        let listener = TcpListener::bind(listen.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: listen.addr,
                source,
            })?;
        info!(addr = %listen.addr, target = %listen.target, resources = applied, "serving plain tcp");
        tokio::spawn(
            accept(
                listener,
                *listen,
                proxy.clone(),
                binding.clone(),
                config.peer.clone(),
                watch.clone(),
            )
            .instrument(info_span!("plain", dst.addr = %listen.target)),
        );
    }
    drop(watch);
    shutdown.await;
    info!("draining");
    if trigger.drain(Duration::from_secs(1)).await == drain::Outcome::Forced {
        warn!("drain deadline passed; closing the rest");
    }
    Ok(())
}

/// Accepts connections on `listener`; each is a stream for `listen.target`, resolved per
/// connection as a CONNECT is.
async fn accept(
    listener: TcpListener,
    listen: Listen,
    proxy: Arc<Proxy>,
    binding: Binding,
    peer: SpiffeId,
    mut drain: drain::Watch,
) {
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = drain.signaled() => return,
        };
        let _ = stream.set_nodelay(true);
        let target = {
            let inner = proxy.state().read();
            resolve(&inner.workloads, &binding, listen.target, peer.namespace())
        };
        let target = match target {
            Ok(target) => target,
            Err(why) => {
                warn!(dst.addr = %listen.target, reason = %why, "connection refused: target not bound");
                continue;
            }
        };
        let span = info_span!("stream", dst.addr = %listen.target, src.addr = %client);
        tokio::spawn(
            crate::inbound::serve_stream(
                proxy.clone(),
                target,
                peer.clone(),
                client,
                drain.clone(),
                stream,
            )
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_flag() {
        assert_eq!(
            parse_listen("127.0.0.1:15080=10.96.0.10:80"),
            Ok(Listen {
                addr: "127.0.0.1:15080".parse().unwrap(),
                target: "10.96.0.10:80".parse().unwrap(),
            })
        );
        assert!(parse_listen("127.0.0.1:15080").is_err());
        assert!(parse_listen("x=10.96.0.10:80").is_err());
    }
}
