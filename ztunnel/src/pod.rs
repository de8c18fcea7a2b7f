//! The proxy set of one enrolled pod: listeners created inside the pod's network namespace —
//! 15008 (inbound HBONE), 15001 (outbound), 15006 (inbound plaintext) — served from the
//! data-plane runtime, with upstream sockets also created in the pod's netns (marked 0x539,
//! source-preserving towards the app). Dropping the proxy drains it immediately.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span};
use weft_core::SpiffeId;
use weft_core::cert_manager::Manager as Certificates;
use weft_core::drain;
use weft_core::hbone::{self, Pool, PoolConfig, Server, Settings};
use weft_core::policy::{self, Verdict};
use weft_proto::istio::workload::zds::WorkloadInfo;

use crate::conntrack::{OutboundTable, Revocable, Tracker};
use crate::inbound::{AppConnector, Inbound};
use crate::metrics::{ConnectionInfo, Metrics, Reporter, TrafficLabels};
use crate::netns::{Id, InpodNetns};
use crate::outbound::{Outbound, UpstreamConnector};
use crate::socket::{self, ConnectOptions, ListenerOptions};
use crate::state::ProxyState;

/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// What every pod proxy shares.
pub struct Shared {
    /// The mesh state.
    pub state: Arc<ProxyState>,
    /// Workload certificates (one per identity on this node).
    pub certificates: Certificates,
    /// TCP telemetry.
    pub metrics: Arc<Metrics>,
    /// How long to wait for a pod's workload and certificate before refusing the pod.
    pub start_timeout: Duration,
    /// Live inbound connections, re-authorized when policies change.
    pub tracker: Arc<Tracker>,
    /// Live outbound connections (admin endpoint).
    pub outbound_connections: Arc<OutboundTable>,
}

/// Why a pod's proxy could not start (sent to the node agent as the NACK text).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netns fd is unusable.
    #[error("pod netns")]
    Netns(#[source] io::Error),
    /// No workload for the pod arrived over xDS in time.
    #[error("no workload for pod {namespace}/{name} yet")]
    UnknownWorkload {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
    },
    /// No certificate for the pod's identity in time.
    #[error("no certificate for {0} yet")]
    NoCertificate(SpiffeId),
    /// A listener could not be created in the pod.
    #[error("listener {addr} in the pod")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A running pod proxy.
pub struct PodProxy {
    /// The pod's netns identity (an `AddWorkload` with the same uid and netns is a no-op).
    pub netns: Id,
    /// The pod's workload uid.
    pub workload_uid: String,
    _drain: drain::Trigger,
}

/// Connections from inside the pod: HBONE connections to peers and plain TCP upstreams.
#[derive(Clone)]
struct PodSockets {
    netns: InpodNetns,
}

impl hbone::Connector for PodSockets {
    fn connect(
        &self,
        dst: SocketAddr,
        _src_ip: Option<IpAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move { socket::connect(&self.netns, dst, &ConnectOptions::default()).await })
    }
}

impl UpstreamConnector for PodSockets {
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move { socket::connect(&self.netns, dst, &ConnectOptions::default()).await })
    }
}

impl AppConnector for PodSockets {
    fn connect(&self, dst: SocketAddr, source: IpAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let opts = ConnectOptions {
                source: Some(source),
                ..ConnectOptions::default()
            };
            socket::connect(&self.netns, dst, &opts).await
        })
    }
}

fn find_workload(state: &ProxyState, info: &WorkloadInfo) -> Option<(String, SpiffeId)> {
    let inner = state.read();
    inner
        .workloads
        .workloads()
        .find(|w| w.namespace == info.namespace && w.name == info.name)
        .map(|w| (w.uid.clone(), w.identity().clone()))
}

/// A pod's three listeners (15008 HBONE, 15001 outbound, 15006 inbound plaintext), bound in
/// its netns as soon as the node agent adds the pod — before ztunnel acknowledges the add, as
/// upstream ztunnel does: from then on the pod's captured connections wait in the listeners'
/// backlog instead of being refused, even while its workload and certificate are still coming.
#[derive(Debug)]
pub struct PodListeners {
    hbone: TcpListener,
    outbound: TcpListener,
    plaintext: TcpListener,
}

impl PodListeners {
    /// Binds the three listeners inside `netns`.
    ///
    /// # Errors
    /// [`Error::Listen`] naming the address.
    pub fn bind(netns: &InpodNetns) -> Result<Self, Error> {
        let listen = |port: u16| {
            let addr = SocketAddr::from(([0, 0, 0, 0], port));
            socket::listener(netns, addr, &ListenerOptions::default())
                .map_err(|source| Error::Listen { addr, source })
        };
        Ok(PodListeners {
            hbone: listen(hbone::PORT)?,
            outbound: listen(OUTBOUND_PORT)?,
            plaintext: listen(INBOUND_PLAINTEXT_PORT)?,
        })
    }
}

impl PodProxy {
    /// Starts the proxies for a pod: listens on 15008, 15001 and 15006 inside its netns,
    /// waits (up to `start_timeout`) for its workload and certificate, then serves.
    ///
    /// # Errors
    /// [`Error`]; nothing keeps running then.
    pub async fn start(
        shared: Arc<Shared>,
        info: WorkloadInfo,
        netns: InpodNetns,
    ) -> Result<PodProxy, Error> {
        let listeners = PodListeners::bind(&netns)?;
        Self::start_with(shared, info, netns, listeners)
            .await
            .map_err(|(err, _)| err)
    }

    /// As [`PodProxy::start`] on listeners already bound; on failure the listeners are given
    /// back (to try again without ever closing them).
    ///
    /// # Errors
    /// [`Error`] with the listeners.
    pub async fn start_with(
        shared: Arc<Shared>,
        info: WorkloadInfo,
        netns: InpodNetns,
        listeners: PodListeners,
    ) -> Result<PodProxy, (Error, PodListeners)> {
        match Self::ready(&shared, &info).await {
            Ok((workload_uid, identity)) => Ok(Self::serve(
                shared,
                info,
                netns,
                listeners,
                workload_uid,
                identity,
            )),
            Err(err) => Err((err, listeners)),
        }
    }

    /// Waits (up to `start_timeout`) for the pod's workload and certificate.
    async fn ready(shared: &Shared, info: &WorkloadInfo) -> Result<(String, SpiffeId), Error> {
        let deadline = tokio::time::Instant::now() + shared.start_timeout;
        let (workload_uid, identity) = loop {
            if let Some(found) = find_workload(&shared.state, info) {
                break found;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::UnknownWorkload {
                    namespace: info.namespace.clone(),
                    name: info.name.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tokio::time::timeout_at(deadline, shared.certificates.fetch_certificate(&identity))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| Error::NoCertificate(identity.clone()))?;
        Ok((workload_uid, identity))
    }

    fn serve(
        shared: Arc<Shared>,
        info: WorkloadInfo,
        netns: InpodNetns,
        listeners: PodListeners,
        workload_uid: String,
        identity: SpiffeId,
    ) -> PodProxy {
        let PodListeners {
            hbone: hbone_listener,
            outbound: outbound_listener,
            plaintext: plaintext_listener,
        } = listeners;

        let (trigger, watch) = drain::channel();
        let sockets = PodSockets {
            netns: netns.clone(),
        };
        let span = info_span!("pod", k8s.namespace = %info.namespace, k8s.pod = %info.name);

        let inbound = Inbound::new(shared.state.clone(), workload_uid.clone(), sockets.clone())
            .with_metrics(shared.metrics.clone())
            .with_tracker(shared.tracker.clone());
        let server = Server::new(
            Settings::default(),
            (shared.certificates.clone(), identity.clone()),
            Arc::new(inbound),
        );
        tokio::spawn(
            Arc::new(server)
                .serve(hbone_listener, watch.clone())
                .instrument(span.clone()),
        );

        let pool = Pool::new(
            PoolConfig::default(),
            Arc::new(sockets.clone()),
            Arc::new(shared.certificates.clone()),
        );
        let outbound = Arc::new(
            Outbound::new(
                shared.state.clone(),
                workload_uid.clone(),
                pool,
                sockets.clone(),
            )
            .with_metrics(shared.metrics.clone())
            .with_connections(shared.outbound_connections.clone()),
        );
        tokio::spawn(
            serve_outbound(outbound_listener, outbound, watch.clone()).instrument(span.clone()),
        );
        tokio::spawn(
            serve_plaintext(
                plaintext_listener,
                shared.clone(),
                Arc::from(workload_uid.as_str()),
                sockets,
                watch,
            )
            .instrument(span),
        );
        info!(pod = %info.name, namespace = %info.namespace, identity = %identity, "pod proxy started");
        PodProxy {
            netns: netns.id(),
            workload_uid,
            _drain: trigger,
        }
    }
}

async fn serve_outbound(
    listener: TcpListener,
    outbound: Arc<Outbound<PodSockets>>,
    mut drain: drain::Watch,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    debug!(error = %err, "outbound accept failed");
                    continue;
                }
            },
            () = drain.signaled() => return,
        };
        let _ = socket::accepted(&stream);
        let outbound = outbound.clone();
        let watch = drain.clone();
        tokio::spawn(async move {
            let _watch = watch;
            let Ok(dst) = socket::original_dst(&stream) else {
                return;
            };
            if let Err(err) = outbound.proxy(stream, dst).await {
                debug!(dst.addr = %dst, error = %err, "outbound connection failed");
            }
        });
    }
}

/// Inbound plaintext (15006): same policy with no peer identity, so STRICT denies it.
async fn serve_plaintext(
    listener: TcpListener,
    shared: Arc<Shared>,
    workload_uid: Arc<str>,
    sockets: PodSockets,
    mut drain: drain::Watch,
) {
    loop {
        let (mut stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(_) => continue,
            },
            () = drain.signaled() => return,
        };
        let _ = socket::accepted(&stream);
        let shared = shared.clone();
        let sockets = sockets.clone();
        let uid = workload_uid.clone();
        let watch = drain.clone();
        tokio::spawn(async move {
            let _watch = watch;
            let Ok(dst) = socket::original_dst(&stream) else {
                return;
            };
            let (allowed, labels, conn) = {
                let inner = shared.state.read();
                let Some(local) = inner.workloads.workload(&uid) else {
                    return;
                };
                let conn = policy::Connection {
                    src_ip: peer.ip(),
                    dst_ip: dst.ip(),
                    dst_port: dst.port(),
                    src_identity: None,
                };
                let verdict = policy::evaluate(inner.policies.applicable(local), &conn);
                let source = inner.workloads.workload_by_ip(&local.network, peer.ip());
                let allowed = matches!(verdict, Verdict::Allow);
                let labels = TrafficLabels::new(
                    Reporter::Destination,
                    &ConnectionInfo {
                        source: source.map(AsRef::as_ref),
                        source_principal: None,
                        destination: Some(local),
                        destination_service: None,
                        mutual_tls: false,
                        response_flags: if allowed { "-" } else { "DENY" },
                    },
                );
                (allowed, labels, conn)
            };
            let counters = shared.metrics.open(&labels);
            drop(labels);
            if !allowed {
                debug!(src.addr = %peer, dst.addr = %dst, "plaintext connection denied");
                counters.close(0, 0);
                return;
            }
            let result = match Box::pin(AppConnector::connect(&sockets, dst, peer.ip())).await {
                Ok(app) => {
                    let (registration, revoked) = shared.tracker.register(&uid, conn);
                    let mut app = Revocable::new(app, registration, revoked);
                    hbone::copy_bidirectional(&mut stream, &mut app).await
                }
                Err(err) => Err(err),
            };
            let (received, sent) = result.as_ref().map_or((0, 0), |r| *r);
            counters.close(received, sent);
        });
    }
}
