//! Inbound HBONE for one pod (port 15008 inside its netns): the checks and status codes of the
//! istio-ztunnel reference §1.6, then L4 authorization (§6) and the connection to the app.
//!
//! | Check | Failure |
//! |---|---|
//! | method `CONNECT`, parsable `ip:port` authority | 400 (by the HBONE server) |
//! | the local workload is known | 503 |
//! | the authority IP is the pod's own IP | 400 |
//! | the target port is not one of ztunnel's own (15001/15006/15008) | 503 |
//! | L4 authorization | 401 |
//! | TCP connect to the app (source = the client's IP) | 503 |
//!
//! The 200 response carries the destination's `baggage`.
//!
//! Source IP toward the app: the HBONE peer's, except when the peer is a waypoint serving this
//! workload (its own or one of its services', [`weft_core::state::Store::is_waypoint_of`]) and
//! the CONNECT carries `forwarded: for=…` of the same address family: then the original
//! client's, so the app sees who called it and not the waypoint (Istio ztunnel's behaviour).
//! A `forwarded` header from anyone else is ignored. Authorization still judges the peer (the
//! waypoint enforces the client's policy).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::HeaderMap;
use tokio::net::TcpStream;
use tracing::{debug, info};
use weft_core::hbone::headers::{BAGGAGE, Baggage, FORWARDED, Forwarded};
use weft_core::hbone::{Authority, ConnectRequest, Decision, Handler, Refusal};
use weft_core::policy::{self, Verdict};
use weft_core::state::{SELF_PORTS, Workload, WorkloadType, target_port};

use crate::conntrack::{Revocable, Tracker};
use crate::metrics::{ConnectionInfo, Counted, Metrics, Reporter, TrafficLabels};
use crate::state::ProxyState;

/// How long the app connect may take.
pub const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the connection to the local app (in ztunnel: inside the pod netns, marked, with the
/// client's IP as source).
pub trait AppConnector: Send + Sync + 'static {
    /// Connects to `dst`, from `source` when the platform allows it.
    fn connect(&self, dst: SocketAddr, source: IpAddr) -> BoxFuture<'_, io::Result<TcpStream>>;
}

/// The inbound decision for one pod.
pub struct Inbound<C> {
    state: Arc<ProxyState>,
    workload_uid: Arc<str>,
    connector: C,
    metrics: Arc<Metrics>,
    tracker: Arc<Tracker>,
}

impl<C: AppConnector> Inbound<C> {
    /// Inbound for the pod whose WDS workload is `workload_uid`.
    pub fn new(state: Arc<ProxyState>, workload_uid: String, connector: C) -> Self {
        Inbound {
            state,
            workload_uid: workload_uid.into(),
            connector,
            metrics: Arc::new(Metrics::default()),
            tracker: Tracker::new(),
        }
    }

    /// Tracks accepted connections in `tracker` so policy changes can close them.
    pub fn with_tracker(mut self, tracker: Arc<Tracker>) -> Self {
        self.tracker = tracker;
        self
    }

    /// Records telemetry into `metrics` (shared by every pod of this ztunnel).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Destination-reported labels for a request.
    fn labels(&self, request: &ConnectRequest, response_flags: &'static str) -> TrafficLabels {
        let inner = self.state.read();
        let local = inner.workloads.workload(&self.workload_uid);
        let network = local.map(|w| w.network.as_str()).unwrap_or_default();
        let source = inner
            .workloads
            .workload_by_ip(network, request.peer_addr.ip());
        TrafficLabels::new(
            Reporter::Destination,
            &ConnectionInfo {
                source: source.map(AsRef::as_ref),
                source_principal: Some(request.peer_identity.to_string()),
                destination: local.map(AsRef::as_ref),
                destination_service: None,
                mutual_tls: true,
                response_flags,
            },
        )
    }

    /// The pure part: checks, authorization and the app address, or the refusal.
    fn check(
        &self,
        request: &ConnectRequest,
    ) -> Result<(SocketAddr, HeaderMap, policy::Connection, IpAddr), Refusal> {
        let inner = self.state.read();
        let Some(local) = inner.workloads.workload(&self.workload_uid) else {
            debug!(uid = %self.workload_uid, "refused: local workload unknown");
            return Err(Refusal::Unavailable);
        };
        let dst = match &request.authority {
            Authority::Addr(dst) => {
                if !local.ips.contains(&dst.ip()) {
                    debug!(dst.addr = %dst, "refused: authority is not this pod");
                    return Err(Refusal::BadRequest);
                }
                *dst
            }
            // `service-hostname:service-port`: the service as seen from this pod's namespace,
            // which this pod must back; the port maps to the target port like a VIP would.
            Authority::Host { host, port } => {
                let Some(service) = inner.workloads.service_by_hostname(host, &local.namespace)
                else {
                    debug!(dst.host = %host, "refused: no such service");
                    return Err(Refusal::Unavailable);
                };
                if local.service_ports(service.key()).is_none() {
                    debug!(dst.host = %host, "refused: this pod does not back the service");
                    return Err(Refusal::BadRequest);
                }
                let same_family = local
                    .ips
                    .iter()
                    .find(|ip| ip.is_ipv4() == request.peer_addr.is_ipv4())
                    .or_else(|| local.ips.first());
                let (Some(target), Some(ip)) = (target_port(local, service, *port), same_family)
                else {
                    debug!(dst.host = %host, dst.port = port, "refused: no target port");
                    return Err(Refusal::Unavailable);
                };
                SocketAddr::new(*ip, target)
            }
        };
        if SELF_PORTS.contains(&dst.port()) {
            return Err(Refusal::Unavailable);
        }
        let conn = policy::Connection {
            src_ip: request.peer_addr.ip(),
            dst_ip: dst.ip(),
            dst_port: dst.port(),
            src_identity: Some(request.peer_identity.clone()),
        };
        if let Verdict::Deny(reason) = policy::evaluate(inner.policies.applicable(local), &conn) {
            info!(
                src.identity = %request.peer_identity,
                dst.addr = %dst,
                reason = %reason,
                "connection denied"
            );
            return Err(Refusal::Unauthorized);
        }
        let mut headers = HeaderMap::new();
        if let Some(baggage) = baggage(local).to_header_value() {
            headers.insert(BAGGAGE, baggage);
        }
        let source = forwarded_client(request, dst)
            .filter(|_| {
                inner
                    .workloads
                    .is_waypoint_of(local, &request.peer_identity)
            })
            .unwrap_or(request.peer_addr.ip());
        Ok((dst, headers, conn, source))
    }
}

/// The `for=` address of the CONNECT's `forwarded` header, if it has one in `dst`'s family.
fn forwarded_client(request: &ConnectRequest, dst: SocketAddr) -> Option<IpAddr> {
    let value = request.headers.get(FORWARDED)?.to_str().ok()?;
    let ip = Forwarded::parse(value).for_addr?.ip();
    (ip.is_ipv4() == dst.is_ipv4()).then_some(ip)
}

/// The `baggage` describing a workload (reference §1.5).
pub fn baggage(workload: &Workload) -> Baggage {
    let kind = match workload.workload_type {
        WorkloadType::Deployment => "deployment",
        WorkloadType::CronJob => "cronjob",
        WorkloadType::Job => "job",
        WorkloadType::Pod => "pod",
    };
    let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    Baggage {
        cluster_name: some(&workload.cluster_id),
        namespace: some(&workload.namespace),
        workload: some(&workload.workload_name).map(|name| (kind.to_owned(), name)),
        service_name: some(&workload.canonical_name),
        service_version: some(&workload.canonical_revision),
        region: some(&workload.locality.region),
        zone: some(&workload.locality.zone),
    }
}

impl<C: AppConnector> Handler for Inbound<C> {
    type Upstream = Counted<Revocable<TcpStream>>;

    async fn decide(&self, request: &ConnectRequest) -> Decision<Self::Upstream> {
        let (dst, headers, conn, source) = match self.check(request) {
            Ok(ok) => ok,
            Err(refusal) => {
                if refusal == Refusal::Unauthorized {
                    self.metrics.open(&self.labels(request, "DENY")).close(0, 0);
                }
                return Decision::Refuse(refusal);
            }
        };
        match tokio::time::timeout(APP_CONNECT_TIMEOUT, self.connector.connect(dst, source)).await {
            Ok(Ok(upstream)) => {
                let counters = self.metrics.open(&self.labels(request, "-"));
                let (registration, revoked) = self.tracker.register(&self.workload_uid, conn);
                Decision::Accept {
                    upstream: Counted {
                        inner: Revocable::new(upstream, registration, revoked),
                        counters,
                    },
                    headers,
                }
            }
            Ok(Err(err)) => {
                debug!(dst.addr = %dst, error = %err, "app connect failed");
                Decision::Refuse(Refusal::Unavailable)
            }
            Err(_) => Decision::Refuse(Refusal::Unavailable),
        }
    }

    fn finished(&self, upstream: Self::Upstream, result: &io::Result<(u64, u64)>) {
        let (received, sent) = result.as_ref().map_or((0, 0), |r| *r);
        upstream.counters.close(received, sent);
    }
}
