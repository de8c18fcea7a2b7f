//! Wiring: xDS → state; certificate manager → CA; ZDS → per-pod proxies; admin, metrics and
//! readiness endpoints; drain on shutdown.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use hyper::StatusCode;
use prometheus_client::registry::Registry;
use tracing::{Instrument, debug, info, info_span};
use weft_core::admin::Endpoint;
use weft_core::process::{self, Port};
use weft_core::{control_plane, drain, xds};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::netns::InpodNetns;
use crate::pod::{PodListeners, PodProxy, Shared};
use crate::state::ProxyState;
use crate::zds::{self, Pod};

/// Errors starting ztunnel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// ztunnel cannot enter network namespaces (needs CAP_SYS_ADMIN).
    #[error("entering network namespaces")]
    Netns(#[source] std::io::Error),
    /// The connection to the controller (xDS, CA) could not be started.
    #[error(transparent)]
    ControlPlane(#[from] control_plane::Error),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] process::BindError),
    /// The node agent broke the ZDS protocol.
    #[error(transparent)]
    Zds(#[from] zds::Error),
}

/// A pod handed over by the node agent: its netns, and its proxy once started.
struct Slot {
    /// `namespace/name`.
    name: String,
    netns: crate::netns::Id,
    proxy: Arc<std::sync::Mutex<Option<PodProxy>>>,
    /// Why the proxy has not started yet (last attempt).
    error: Arc<std::sync::Mutex<Option<String>>>,
    starter: tokio::task::JoinHandle<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.starter.abort();
    }
}

/// Pods handed over by the node agent. An add is acknowledged at once and the pod's proxy
/// starts as soon as its workload (which needs the pod's IP, known only after the CNI chain ran)
/// and certificate are available, retrying every second; removal drains it immediately.
struct PodManager {
    shared: Arc<Shared>,
    pods: Arc<std::sync::Mutex<HashMap<String, Slot>>>,
    snapshot_applied: Arc<AtomicBool>,
}

/// Pods whose proxies have not started yet (readiness waits for none): `namespace/name` and
/// the last start error.
fn pending_pods(pods: &std::sync::Mutex<HashMap<String, Slot>>) -> Vec<(String, Option<String>)> {
    pods.lock()
        .map(|p| {
            let mut pending: Vec<(String, Option<String>)> = p
                .values()
                .filter(|s| s.proxy.lock().map(|p| p.is_none()).unwrap_or(true))
                .map(|s| (s.name.clone(), s.error.lock().ok().and_then(|e| e.clone())))
                .collect();
            pending.sort();
            pending
        })
        .unwrap_or_default()
}

/// The readiness report: what is still pending, one line each (empty = ready).
fn pending_lines(
    xds_ready: bool,
    snapshot_applied: bool,
    pods: Vec<(String, Option<String>)>,
) -> Vec<String> {
    let mut lines = Vec::new();
    if !xds_ready {
        lines.push("xds: first Address and Authorization responses not yet applied".to_owned());
    }
    if !snapshot_applied {
        lines.push("zds: the node agent's snapshot not yet received".to_owned());
    }
    for (pod, error) in pods {
        lines.push(match error {
            Some(error) => format!("pod {pod}: proxy starting ({error})"),
            None => format!("pod {pod}: proxy starting"),
        });
    }
    lines
}

/// Per-pod state for `/config_dump`.
fn pod_states(pods: &std::sync::Mutex<HashMap<String, Slot>>) -> Vec<serde_json::Value> {
    let Ok(pods) = pods.lock() else {
        return Vec::new();
    };
    let mut out: Vec<serde_json::Value> = pods
        .iter()
        .map(|(uid, slot)| {
            let running = slot.proxy.lock().map(|p| p.is_some()).unwrap_or(false);
            serde_json::json!({
                "uid": uid,
                "name": slot.name,
                "netns": format!("{:?}", slot.netns),
                "state": if running { "running" } else { "starting" },
                "last_error": if running { None } else { slot.error.lock().ok().and_then(|e| e.clone()) },
            })
        })
        .collect();
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

impl zds::Manager for PodManager {
    fn add(&mut self, pod: Pod) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let netns = InpodNetns::new(pod.netns).map_err(|e| format!("pod netns: {e}"))?;
            let mut pods = self
                .pods
                .lock()
                .map_err(|_| "pod table poisoned".to_owned())?;
            if pods.get(&pod.uid).is_some_and(|p| p.netns == netns.id()) {
                return Ok(()); // same pod, same netns: nothing to do
            }
            let proxy = Arc::new(std::sync::Mutex::new(None));
            let slot_proxy = proxy.clone();
            let error = Arc::new(std::sync::Mutex::new(None));
            let slot_error = error.clone();
            let name = format!("{}/{}", pod.info.namespace, pod.info.name);
            let shared = self.shared.clone();
            let info = pod.info;
            let netns_id = netns.id();
            // Bound before the add is acknowledged: the pod's first connections wait in the
            // backlog rather than being refused.
            let mut listeners = PodListeners::bind(&netns).map_err(|e| error_chain(&e))?;
            let starter = tokio::spawn(async move {
                loop {
                    match PodProxy::start_with(
                        shared.clone(),
                        info.clone(),
                        netns.clone(),
                        listeners,
                    )
                    .await
                    {
                        Ok(started) => {
                            if let Ok(mut slot) = slot_proxy.lock() {
                                *slot = Some(started);
                            }
                            return;
                        }
                        Err((err, back)) => {
                            listeners = back;
                            let chain = error_chain(&err);
                            debug!(pod = %info.name, error = %chain, "pod proxy pending");
                            if let Ok(mut slot) = slot_error.lock() {
                                *slot = Some(chain);
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
            // A new netns replaces the old proxy (dropping the old slot drains it).
            pods.insert(
                pod.uid,
                Slot {
                    name,
                    netns: netns_id,
                    proxy,
                    error,
                    starter,
                },
            );
            Ok(())
        })
    }

    fn remove(&mut self, uid: &str) {
        if let Ok(mut pods) = self.pods.lock() {
            pods.remove(uid);
        }
    }

    fn reconcile(&mut self, keep: &BTreeSet<String>) {
        if let Ok(mut pods) = self.pods.lock() {
            pods.retain(|uid, _| keep.contains(uid));
        }
        self.snapshot_applied.store(true, Ordering::SeqCst);
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Runs ztunnel until `shutdown` resolves.
///
/// # Errors
/// [`Error`] when a component cannot start, or a fatal ZDS protocol error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    info!(config = ?config, "starting");
    crate::netns::init().map_err(Error::Netns)?;
    let (trigger, watch) = drain::channel();

    let state = ProxyState::new();
    let node = xds::NodeInfo {
        id: config.node_id(),
        metadata: [
            ("NAME".to_owned(), config.pod_name.clone()),
            ("NAMESPACE".to_owned(), config.pod_namespace.clone()),
            ("INSTANCE_IPS".to_owned(), config.instance_ip.clone()),
            ("NODE_NAME".to_owned(), config.node_name.clone()),
        ]
        .into(),
    };
    let proxy = control_plane::Proxy {
        node,
        token: config.token.clone(),
        secret_ttl: config.secret_ttl,
        impersonate: true,
    };
    let connection = config
        .control_plane
        .connect(proxy, state.handlers(), watch.clone())?;
    let (xds_handle, certificates) = (connection.xds, connection.certificates);
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let registry = Arc::new(registry);

    let snapshot_applied = Arc::new(AtomicBool::new(false));
    let pods = Arc::new(std::sync::Mutex::new(HashMap::new()));
    // What readiness still waits for, one line each; empty when ready.
    let pending = {
        let xds = xds_handle.clone();
        let snapshot = snapshot_applied.clone();
        let pods = pods.clone();
        move || {
            pending_lines(
                xds.is_ready(),
                snapshot.load(Ordering::SeqCst),
                pending_pods(&pods),
            )
        }
    };
    let tracker = crate::conntrack::Tracker::new();
    let outbound_connections = crate::conntrack::OutboundTable::new();
    let quit = Arc::new(tokio::sync::Notify::new());
    let admin: Endpoint = {
        let tracker = tracker.clone();
        let outbound_connections = outbound_connections.clone();
        let state = state.clone();
        let certificates = certificates.clone();
        let pods = pods.clone();
        let quit = quit.clone();
        Arc::new(move |method, path, query| match path {
            "/quitquitquit" => process::quit(method, &quit),
            "/logging" => weft_core::admin::logging_endpoint(method, query, "ztunnel"),
            "/config_dump" => {
                let inner = state.read();
                let workloads: Vec<serde_json::Value> = inner
                    .workloads
                    .workloads()
                    .map(|w| serde_json::json!({
                        "uid": w.uid, "name": w.name, "namespace": w.namespace,
                        "addresses": w.ips, "node": w.node, "identity": w.identity().to_string(),
                        "protocol": format!("{:?}", w.tunnel), "healthy": w.healthy,
                        "waypoint": w.waypoint.as_ref().map(ToString::to_string),
                    }))
                    .collect();
                let services: Vec<serde_json::Value> = inner
                    .workloads
                    .services()
                    .map(|s| {
                        let endpoints = inner.workloads.endpoints(s.key()).count();
                        serde_json::json!({
                            "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
                            "vips": s.vips.iter().map(|v| v.address.to_string()).collect::<Vec<_>>(),
                            "ports": s.ports.iter().map(|p| format!("{}→{}", p.service_port, p.target_port)).collect::<Vec<_>>(),
                            "endpoints": endpoints,
                            "waypoint": s.waypoint.as_ref().map(ToString::to_string),
                        })
                    })
                    .collect();
                let policies: Vec<serde_json::Value> = inner
                    .policies
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "name": p.name, "namespace": p.namespace,
                            "scope": format!("{:?}", p.scope), "action": format!("{:?}", p.action),
                            "rules": p.rules.len(), "dry_run": p.dry_run,
                        })
                    })
                    .collect();
                let certs: Vec<serde_json::Value> = certificates
                    .identities()
                    .into_iter()
                    .map(|id| {
                        let state = certificates.state(&id).unwrap_or_default();
                        let expires = state.certificate.as_ref().and_then(|c| {
                            c.not_after().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
                        });
                        serde_json::json!({
                            "identity": id.to_string(),
                            "state": if state.certificate.is_some() { "available" } else { "pending" },
                            "expires_unix": expires,
                            "last_error": state.last_error.as_deref(),
                        })
                    })
                    .collect();
                let mut connections: Vec<serde_json::Value> = tracker
                    .snapshot()
                    .into_iter()
                    .map(|(uid, c)| serde_json::json!({
                        "direction": "inbound",
                        "pod_uid": uid,
                        "source": c.src_ip.to_string(),
                        "source_identity": c.src_identity.map(|i| i.to_string()),
                        "destination": std::net::SocketAddr::new(c.dst_ip, c.dst_port).to_string(),
                    }))
                    .collect();
                connections.extend(outbound_connections.snapshot().into_iter().map(|c| {
                    serde_json::json!({
                        "direction": "outbound",
                        "pod_uid": &*c.workload_uid,
                        "source": c.source.to_string(),
                        "destination": c.destination.to_string(),
                        "upstream": c.upstream.to_string(),
                        "protocol": c.protocol,
                    })
                }));
                connections.sort_by_key(|c| c.to_string());
                let dump = serde_json::json!({
                    "workloads": workloads, "services": services, "policies": policies,
                    "certificates": certs, "pods": pod_states(&pods), "connections": connections,
                });
                (
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&dump).unwrap_or_default(),
                )
            }
            _ => process::not_found(),
        })
    };
    let readiness = Port {
        addr: config.readiness,
        endpoint: process::readiness(pending),
    };
    let stats = Port {
        addr: config.stats,
        endpoint: weft_core::metrics::endpoint(registry),
    };
    let admin = Port {
        addr: config.admin,
        endpoint: admin,
    };
    process::serve_ports(readiness, stats, admin, &watch).await?;

    tokio::spawn(
        tracker
            .clone()
            .watch(state.clone())
            .instrument(info_span!("policy_recheck")),
    );
    let shared = Arc::new(Shared {
        state,
        certificates,
        metrics,
        start_timeout: config.pod_start_timeout,
        tracker,
        outbound_connections,
    });
    let manager = PodManager {
        shared,
        pods,
        snapshot_applied,
    };
    // The ZDS client starts only after the first xDS sync (reference §4.3).
    let zds = async {
        if xds_handle.ready().await.is_err() {
            return Ok(());
        }
        info!("xds synced; connecting to the node agent");
        zds::run(config.zds_socket.clone(), Box::new(manager), watch.clone()).await
    };
    tokio::pin!(shutdown);
    let result = tokio::select! {
        result = zds.instrument(info_span!("zds")) => result.map_err(Error::from),
        () = &mut shutdown => Ok(()),
        () = quit.notified() => Ok(()),
    };
    process::drain(trigger, Duration::from_secs(5)).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_pending() {
        assert!(pending_lines(true, true, Vec::new()).is_empty());
        assert_eq!(
            pending_lines(
                false,
                false,
                vec![
                    ("a/p".into(), Some("no certificate yet".into())),
                    ("b/q".into(), None)
                ]
            ),
            vec![
                "xds: first Address and Authorization responses not yet applied",
                "zds: the node agent's snapshot not yet received",
                "pod a/p: proxy starting (no certificate yet)",
                "pod b/q: proxy starting",
            ]
        );
    }
}
