//! Outbound for one pod (port 15001 inside its netns): the original destination is routed with
//! the core decision (istio-ztunnel reference §7.1) and the bytes carried over HBONE (to the
//! destination pod's ztunnel or a waypoint) or plain TCP (non-mesh destinations, passthrough).
//!
//! HBONE requests carry the source's `baggage`, `forwarded: for="<client>"` (with
//! `;host=<service>` when service-addressed) and a fresh `traceparent`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;
use http::HeaderMap;
use tokio::net::TcpStream;
use tracing::debug;
use weft_core::hbone::headers::{BAGGAGE, FORWARDED, Forwarded, TRACEPARENT, TraceParent};
use weft_core::hbone::{self, Key, Pool, PoolError};
use weft_core::state::{Decision, random_below};

use crate::conntrack::{OutboundEntry, OutboundTable};
use crate::inbound::baggage;
use crate::metrics::{ConnectionInfo, Metrics, OpenConnection, Reporter, TrafficLabels};
use crate::state::ProxyState;

/// Opens plain TCP connections from the pod (in ztunnel: inside the pod netns, marked).
pub trait UpstreamConnector: Send + Sync + 'static {
    /// Connects to `dst`.
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>>;
}

/// Why an outbound connection was not carried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source pod's workload is not (yet) known.
    #[error("source workload {0} unknown")]
    UnknownSource(String),
    /// A self-call to ztunnel's own ports.
    #[error("connection to ztunnel's own port {0} dropped")]
    SelfCall(SocketAddr),
    /// The service has no endpoint that may be chosen.
    #[error("service {0} has no healthy endpoint")]
    NoHealthyEndpoint(String),
    /// The destination's waypoint could not be resolved.
    #[error("waypoint for {0} unavailable")]
    WaypointUnavailable(SocketAddr),
    /// The HBONE stream could not be opened (connect, TLS, or a refusal status).
    #[error("hbone to {target}")]
    Hbone {
        /// The HBONE next hop.
        target: SocketAddr,
        /// The cause.
        #[source]
        source: PoolError,
    },
    /// Plain TCP to the destination failed.
    #[error("connecting to {target}")]
    Connect {
        /// The destination.
        target: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Copying failed mid-stream.
    #[error("copying")]
    Copy(#[source] io::Error),
}

/// An outbound connection's upstream (an HBONE stream with its peer's address, or TCP).
enum Upstream {
    Hbone(hbone::Stream, SocketAddr),
    Tcp(TcpStream),
}

/// The outbound path of one pod.
pub struct Outbound<C> {
    state: Arc<ProxyState>,
    workload_uid: String,
    connections: Option<(Arc<OutboundTable>, Arc<str>)>,
    pool: Pool,
    connector: C,
    hbone_port: u16,
    metrics: Arc<Metrics>,
}

impl<C: UpstreamConnector> Outbound<C> {
    /// Outbound for the pod whose workload is `workload_uid`, opening HBONE with `pool` (keyed by
    /// the pod's identity) and plain TCP with `connector`.
    pub fn new(state: Arc<ProxyState>, workload_uid: String, pool: Pool, connector: C) -> Self {
        Outbound {
            state,
            workload_uid,
            connections: None,
            pool,
            connector,
            hbone_port: hbone::PORT,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// Records telemetry into `metrics` (shared by every pod of this ztunnel).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Lists this pod's live connections in `table` (the admin endpoint's `connections`).
    pub fn with_connections(mut self, table: Arc<OutboundTable>) -> Self {
        let uid = Arc::from(self.workload_uid.as_str());
        self.connections = Some((table, uid));
        self
    }

    /// The port destination ztunnels accept HBONE on (15008; tests running several ztunnels on
    /// one address override it).
    pub fn with_hbone_port(mut self, port: u16) -> Self {
        self.hbone_port = port;
        self
    }

    /// Routes and carries one accepted connection whose original destination is `dst`, until
    /// both directions end. Returns bytes `(sent to the destination, received from it)`.
    ///
    /// # Errors
    /// [`Error`]; the downstream connection is closed (the app sees EOF, as with ztunnel).
    pub async fn proxy(
        &self,
        mut downstream: TcpStream,
        dst: SocketAddr,
    ) -> Result<(u64, u64), Error> {
        let client = downstream.peer_addr().map_err(Error::Copy)?;
        // Routing and connecting happen in boxed futures that are freed before the copy, and
        // the copy keeps only the counters: an idle proxied connection's task stays small.
        let (mut upstream, counters) = Box::pin(self.connect_upstream(client, dst)).await?;
        let _listed = self.connections.as_ref().map(|(table, uid)| {
            let (via, protocol) = match &upstream {
                Upstream::Hbone(_, via) => (*via, "hbone"),
                Upstream::Tcp(stream) => (stream.peer_addr().unwrap_or(dst), "tcp"),
            };
            table.register(OutboundEntry {
                workload_uid: uid.clone(),
                source: client,
                destination: dst,
                upstream: via,
                protocol,
            })
        });
        let result = match &mut upstream {
            Upstream::Hbone(stream, _) => hbone::copy_bidirectional(&mut downstream, stream).await,
            Upstream::Tcp(stream) => hbone::copy_bidirectional(&mut downstream, stream).await,
        };
        let (sent, received) = result.as_ref().map_or((0, 0), |r| *r);
        counters.close(sent, received);
        result.map_err(Error::Copy)
    }

    /// Decides the route for `dst` and opens the upstream connection; records failures.
    async fn connect_upstream(
        &self,
        client: SocketAddr,
        dst: SocketAddr,
    ) -> Result<(Upstream, OpenConnection), Error> {
        let (decision, identity, headers, source) = {
            let inner = self.state.read();
            let source = inner
                .workloads
                .workload(&self.workload_uid)
                .cloned()
                .ok_or_else(|| Error::UnknownSource(self.workload_uid.clone()))?;
            let mut rng = random_below;
            let decision = inner.workloads.outbound(&source, dst, &mut rng);
            let mut headers = HeaderMap::new();
            if let Some(value) = baggage(&source).to_header_value() {
                headers.insert(BAGGAGE, value);
            }
            (decision, source.identity().clone(), headers, source)
        };
        let (destination, service) = match &decision {
            Decision::Hbone {
                destination,
                service,
                ..
            }
            | Decision::Tcp {
                destination,
                service,
                ..
            } => (Some(destination.clone()), service.clone()),
            Decision::Waypoint {
                waypoint, service, ..
            } => (Some(waypoint.clone()), service.clone()),
            _ => (None, None),
        };
        let principal = identity.to_string();
        let labels = |mutual_tls: bool, flags: &'static str| {
            TrafficLabels::new(
                Reporter::Source,
                &ConnectionInfo {
                    source: Some(&source),
                    source_principal: Some(principal.clone()),
                    destination: destination.as_deref(),
                    destination_service: service
                        .as_ref()
                        .map(|s| (s.hostname.clone(), s.namespace.clone(), s.name.clone())),
                    mutual_tls,
                    response_flags: flags,
                },
            )
        };
        let mut headers = headers;
        headers.insert(TRACEPARENT, TraceParent::random().to_header_value());
        match decision {
            Decision::Hbone {
                target,
                authority,
                expected_identities,
                service,
                ..
            }
            | Decision::Waypoint {
                target,
                authority,
                expected_identities,
                service,
                ..
            } => {
                let target = SocketAddr::new(target.ip(), self.hbone_port);
                let host = service.as_ref().map(|s| s.hostname.clone());
                if let Some(value) = Forwarded::to_header_value(client, host.as_deref()) {
                    headers.insert(FORWARDED, value);
                }
                let source_ip: Option<IpAddr> = None;
                let key = Key::new(identity, expected_identities, target, source_ip);
                debug!(dst.addr = %dst, dst.hbone_addr = %target, "outbound hbone");
                let connected = self
                    .pool
                    .connect(&key, &authority.to_string(), headers)
                    .await;
                match connected {
                    Ok(upstream) => Ok((
                        Upstream::Hbone(upstream, target),
                        self.metrics.open(&labels(true, "-")),
                    )),
                    Err(source) => {
                        let flags = if source.status() == Some(http::StatusCode::UNAUTHORIZED) {
                            "DENY"
                        } else {
                            "CONNECT"
                        };
                        self.metrics.open(&labels(true, flags)).close(0, 0);
                        Err(Error::Hbone { target, source })
                    }
                }
            }
            Decision::Tcp { target, .. } | Decision::Passthrough { target } => {
                debug!(dst.addr = %dst, target = %target, "outbound tcp");
                let upstream = self
                    .connector
                    .connect(target)
                    .await
                    .map_err(|source| Error::Connect { target, source })?;
                Ok((
                    Upstream::Tcp(upstream),
                    self.metrics.open(&labels(false, "-")),
                ))
            }
            Decision::NoHealthyEndpoint { service } => {
                Err(Error::NoHealthyEndpoint(service.key().to_owned()))
            }
            Decision::WaypointUnavailable { .. } => Err(Error::WaypointUnavailable(dst)),
            Decision::Drop => Err(Error::SelfCall(dst)),
        }
    }
}
