//! The node agent: decides which pods on its node join the mesh, captures them (in-pod rules),
//! hands them to ztunnel (ZDS) and records the outcome on the pod
//! (`ambient.istio.io/redirection: enabled | pending`).
//!
//! Pods arrive two ways: the CNI plugin's synchronous `ADD` for new pods (with the netns path
//! and IPs), and label changes on running pods seen through the config source (the netns comes
//! from the recorded CNI `ADD`; on Kubernetes, a pod with no record, e.g. one that started
//! before the agent was installed, is found through procfs ([`crate::netns`]) and its IPs are
//! taken from `status.podIPs`). Records survive agent restarts (a JSON file in the run dir), so
//! a restarted agent re-applies rules idempotently and re-sends its pods to ztunnel.
//!
//! Annotations go through an [`Annotator`]: the local cluster's object store (files source) or
//! a JSON merge patch of the pod (Kubernetes). Captured pods' IPs are kept in the node's probe
//! SNAT set ([`crate::probe`]) when that is enabled.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};
use weft_k8s::Index;
use weft_proto::istio::workload::zds::WorkloadInfo;

use crate::annotate::Annotator;
use crate::enroll::{self, Decision, PodFacts};
use crate::plugin::agent::{Command, Reply, Request};
use crate::redirect::{self, PodConfig};
use crate::{netns, probe, zds};

/// Agent settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node this agent serves.
    pub node: String,
    /// Unix socket the CNI plugin calls.
    pub plugin_socket: PathBuf,
    /// Where the agent keeps its pod records.
    pub run_dir: PathBuf,
    /// Namespaces never enrolled.
    pub excluded_namespaces: Vec<String>,
    /// Redirect DNS to ztunnel's DNS proxy.
    pub dns_capture: bool,
    /// How long a CNI `ADD` waits for the pod to appear in the config source.
    pub pod_wait: Duration,
    /// Procfs to find running pods' netns in when they have no CNI record (Kubernetes mode,
    /// usually `/proc`); `None` relies on CNI records only (the local cluster).
    pub proc_root: Option<PathBuf>,
}

/// What the agent remembers about a pod it has seen through CNI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The pod's netns path.
    pub netns: PathBuf,
    /// The pod's IPs.
    pub ips: Vec<IpAddr>,
    /// Whether the pod is captured, and whether ztunnel acknowledged it.
    pub state: Option<String>,
}

/// The agent.
pub struct Agent {
    config: Config,
    index: Arc<Index>,
    annotator: Annotator,
    zds: zds::Server,
    probe: Option<probe::Snat>,
    records: Mutex<BTreeMap<String, Record>>,
}

struct PodView {
    uid: String,
    service_account: String,
    decision: Decision,
}

impl Agent {
    /// An agent reading pods from `index`, annotating through `annotator`, handing pods to
    /// ztunnel through `zds` and keeping captured pod IPs in `probe` (when given); loads the
    /// records a previous run left.
    pub fn new(
        config: Config,
        index: Arc<Index>,
        annotator: Annotator,
        zds: zds::Server,
        probe: Option<probe::Snat>,
    ) -> Arc<Agent> {
        let records = std::fs::read(config.run_dir.join("pods.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Arc::new(Agent {
            config,
            index,
            annotator,
            zds,
            probe,
            records: Mutex::new(records),
        })
    }

    fn view(&self, namespace: &str, name: &str) -> Option<PodView> {
        self.index.read(|snap| {
            let pod = snap.pods.get(&(namespace.to_owned(), name.to_owned()))?;
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            let annotations = pod.metadata.annotations.clone().unwrap_or_default();
            let spec = pod.spec.clone().unwrap_or_default();
            let decision = enroll::decide(
                &PodFacts {
                    namespace,
                    labels: &labels,
                    annotations: &annotations,
                    host_network: spec.host_network == Some(true),
                },
                &snap.namespace_labels(namespace),
                &self.config.excluded_namespaces,
            );
            Some(PodView {
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                service_account: spec
                    .service_account_name
                    .unwrap_or_else(|| "default".into()),
                decision,
            })
        })
    }

    async fn save(&self, records: &BTreeMap<String, Record>) {
        let _ = std::fs::create_dir_all(&self.config.run_dir);
        let path = self.config.run_dir.join("pods.json");
        if let Ok(text) = serde_json::to_vec_pretty(records) {
            let _ = weft_k8s::store::write_atomic(&path, &text);
        }
    }

    /// Sets (`Some`) or removes (`None`) the redirection annotation on a pod.
    async fn annotate(&self, namespace: &str, name: &str, value: Option<&str>) {
        if let Err(err) = self.annotator.set(namespace, name, value).await {
            warn!(pod = %name, namespace, error = %err, "annotating pod failed");
        }
    }

    /// Adds or removes a pod's IPs in the probe SNAT set (when enabled).
    fn probe_ips(&self, record: &Record, add: bool) {
        let Some(probe) = &self.probe else { return };
        let (adding, removing) = if add {
            (record.ips.as_slice(), &[][..])
        } else {
            (&[][..], record.ips.as_slice())
        };
        if let Err(err) = probe.update(adding, removing) {
            warn!(pod = %record.name, namespace = %record.namespace, error = %err, "updating the probe SNAT set failed");
        }
    }

    /// Captures a pod and hands it to ztunnel. Rule failures are errors (the pod is not
    /// captured); ztunnel being unreachable leaves the pod `pending` (rules stay: traffic fails
    /// closed) and is retried by [`Agent::reconcile`].
    async fn capture(
        &self,
        uid: &str,
        record: &mut Record,
        service_account: &str,
    ) -> Result<(), String> {
        let config = PodConfig {
            dns_capture: self.config.dns_capture,
            ipv6: record.ips.iter().any(IpAddr::is_ipv6),
            bypass_inbound: false,
        };
        redirect::apply(&record.netns, &config).map_err(|e| e.to_string())?;
        self.probe_ips(record, true);
        let fd = std::fs::File::open(&record.netns)
            .map_err(|e| format!("opening {}: {e}", record.netns.display()))?;
        let info = WorkloadInfo {
            name: record.name.clone(),
            namespace: record.namespace.clone(),
            service_account: service_account.to_owned(),
        };
        let state = match self.zds.add_pod(uid, info, fd.into()).await {
            Ok(()) => "enabled",
            Err(err) => {
                warn!(pod = %record.name, namespace = %record.namespace, error = %err, "ztunnel did not take the pod; pending");
                "pending"
            }
        };
        if record.state.as_deref() != Some(state) {
            self.annotate(&record.namespace, &record.name, Some(state))
                .await;
        }
        record.state = Some(state.to_owned());
        info!(pod = %record.name, namespace = %record.namespace, state, "pod captured");
        Ok(())
    }

    async fn release(&self, uid: &str, record: &mut Record, pod_exists: bool) {
        let config = PodConfig {
            dns_capture: self.config.dns_capture,
            ipv6: record.ips.iter().any(IpAddr::is_ipv6),
            bypass_inbound: false,
        };
        if let Err(err) = redirect::remove(&record.netns, &config) {
            debug!(error = %err, "removing rules failed (pod gone?)");
        }
        self.zds.del_pod(uid).await;
        self.probe_ips(record, false);
        if pod_exists {
            self.annotate(&record.namespace, &record.name, None).await;
        }
        record.state = None;
        info!(pod = %record.name, namespace = %record.namespace, "pod released");
    }

    /// Answers one plugin request.
    pub async fn handle(&self, request: Request) -> Reply {
        let error = |message: String| Reply {
            enroll: false,
            error: Some(message),
            error_kind: None,
        };
        match request.command {
            Command::Status => Reply::ok(true),
            Command::Add => {
                let (Some(ns), Some(name), Some(netns)) =
                    (request.namespace, request.name, request.netns)
                else {
                    return error("ADD needs namespace, name and netns".into());
                };
                let deadline = tokio::time::Instant::now() + self.config.pod_wait;
                let view = loop {
                    if let Some(view) = self.view(&ns, &name) {
                        break view;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return error(format!("pod {ns}/{name} not found in the config source"));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let uid = request.uid.unwrap_or(view.uid);
                let mut records = self.records.lock().await;
                let mut record = Record {
                    namespace: ns,
                    name,
                    netns: PathBuf::from(netns),
                    ips: request.ips,
                    state: None,
                };
                let reply = if view.decision == Decision::Enroll {
                    match self.capture(&uid, &mut record, &view.service_account).await {
                        Ok(()) => Reply::ok(true),
                        Err(message) => error(message),
                    }
                } else {
                    Reply::ok(false)
                };
                records.insert(uid, record);
                self.save(&records).await;
                reply
            }
            Command::Del => {
                let Some(uid) = request.uid else {
                    return Reply::ok(false);
                };
                let mut records = self.records.lock().await;
                if let Some(record) = records.remove(&uid) {
                    if record.state.is_some() {
                        self.zds.del_pod(&uid).await;
                        self.probe_ips(&record, false);
                    }
                    self.save(&records).await;
                }
                Reply::ok(false)
            }
            Command::Check => {
                let records = self.records.lock().await;
                match request.uid.as_ref().and_then(|u| records.get(u)) {
                    Some(record) => Reply::ok(record.state.is_some()),
                    None => Reply {
                        enroll: false,
                        error: Some("unknown pod".into()),
                        error_kind: Some(crate::plugin::agent::ErrorKind::UnknownContainer),
                    },
                }
            }
        }
    }

    /// Brings every recorded pod in line with its current decision: captures newly enrolled
    /// pods (and retries pending ones), releases pods no longer enrolled, forgets deleted pods.
    pub async fn reconcile(&self) {
        let mut records = self.records.lock().await;
        let uids: Vec<String> = records.keys().cloned().collect();
        let mut changed = false;
        for uid in uids {
            let Some(mut record) = records.get(&uid).cloned() else {
                continue;
            };
            let view = self.view(&record.namespace, &record.name);
            let exists = view
                .as_ref()
                .is_some_and(|v| v.uid == uid || v.uid.is_empty());
            let wanted = exists
                && view
                    .as_ref()
                    .is_some_and(|v| v.decision == Decision::Enroll);
            if !exists {
                if record.state.is_some() {
                    self.zds.del_pod(&uid).await;
                    self.probe_ips(&record, false);
                }
                records.remove(&uid);
                changed = true;
                continue;
            }
            let mut netns_alive = Path::new(&record.netns).exists();
            if wanted
                && !netns_alive
                && let Some(found) = self.discover(&uid)
            {
                // Kubernetes: the process the path pointed at is gone; the pod lives on.
                record.netns = found;
                netns_alive = true;
            }
            match (wanted, record.state.as_deref()) {
                (true, Some("enabled")) => {}
                (true, _) if netns_alive => {
                    let sa = view.map(|v| v.service_account).unwrap_or_default();
                    if let Err(err) = self.capture(&uid, &mut record, &sa).await {
                        warn!(pod = %record.name, error = %err, "capture failed");
                    }
                }
                (false, Some(_)) => self.release(&uid, &mut record, true).await,
                _ => {}
            }
            if records.get(&uid) != Some(&record) {
                records.insert(uid, record);
                changed = true;
            }
        }
        changed |= self.capture_unrecorded(&mut records).await;
        if changed {
            self.save(&records).await;
        }
    }

    /// The netns of a running pod found through procfs, in Kubernetes mode.
    fn discover(&self, uid: &str) -> Option<PathBuf> {
        let proc_root = self.config.proc_root.as_ref()?;
        match netns::find(proc_root, uid) {
            Ok(found) => found,
            Err(err) => {
                warn!(pod.uid = uid, error = %err, "looking up the pod's netns failed");
                None
            }
        }
    }

    /// Kubernetes mode: captures pods of this node that should be enrolled but never passed
    /// through the plugin (enrolled after they started). Their netns comes from procfs and
    /// their IPs from `status.podIPs` (or `podIP`). Returns whether a record was added.
    async fn capture_unrecorded(&self, records: &mut BTreeMap<String, Record>) -> bool {
        if self.config.proc_root.is_none() {
            return false;
        }
        let candidates: Vec<(String, String, String, Vec<IpAddr>)> = self.index.read(|snap| {
            snap.pods
                .iter()
                .filter_map(|((namespace, name), pod)| {
                    let uid = pod.metadata.uid.clone()?;
                    let spec = pod.spec.as_ref()?;
                    if records.contains_key(&uid)
                        || spec.node_name.as_deref() != Some(self.config.node.as_str())
                    {
                        return None;
                    }
                    let status = pod.status.as_ref()?;
                    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                        return None;
                    }
                    let mut ips: Vec<IpAddr> = status
                        .pod_ips
                        .iter()
                        .flatten()
                        .filter_map(|p| p.ip.parse().ok())
                        .collect();
                    if ips.is_empty() {
                        ips.extend(
                            status
                                .pod_ip
                                .as_deref()
                                .and_then(|ip| ip.parse::<IpAddr>().ok()),
                        );
                    }
                    (!ips.is_empty()).then(|| (uid, namespace.clone(), name.clone(), ips))
                })
                .collect()
        });
        let mut added = false;
        for (uid, namespace, name, ips) in candidates {
            let Some(view) = self.view(&namespace, &name) else {
                continue;
            };
            if view.decision != Decision::Enroll {
                continue;
            }
            let Some(netns) = self.discover(&uid) else {
                debug!(pod = %name, namespace = %namespace, "no process of the pod yet; retrying later");
                continue;
            };
            let mut record = Record {
                namespace,
                name,
                netns,
                ips,
                state: None,
            };
            match self.capture(&uid, &mut record, &view.service_account).await {
                Ok(()) => {
                    records.insert(uid, record);
                    added = true;
                }
                Err(err) => {
                    warn!(pod = %record.name, namespace = %record.namespace, error = %err, "capture failed")
                }
            }
        }
        added
    }

    /// Lets ztunnels connect to the ZDS server (after [`Agent::restore`], so the first snapshot
    /// holds every restored pod).
    pub fn open_zds(&self) {
        self.zds.open();
    }

    /// After a restart: re-captures every pod recorded as captured (rules are re-applied
    /// idempotently and the pods go to ztunnel again).
    pub async fn restore(&self) {
        let mut records = self.records.lock().await;
        if let Some(probe) = &self.probe {
            // The probe table, created whole with the IPs of every pod still captured.
            let ips = records
                .values()
                .filter(|r| r.state.is_some() && Path::new(&r.netns).exists())
                .flat_map(|r| r.ips.iter().copied())
                .collect();
            if let Err(err) = probe.sync(&ips) {
                warn!(error = %err, "creating the probe SNAT table failed");
            }
        }
        for (uid, record) in records.iter_mut() {
            if record.state.is_some() && Path::new(&record.netns).exists() {
                let sa = self
                    .view(&record.namespace, &record.name)
                    .map(|v| v.service_account)
                    .unwrap_or_default();
                if let Err(err) = self.capture(uid, record, &sa).await {
                    warn!(pod = %record.name, error = %err, "restoring capture failed");
                }
            }
        }
        let snapshot = records.clone();
        drop(records);
        self.save(&snapshot).await;
    }

    /// Serves the plugin socket until the task is dropped.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub async fn serve_plugin(self: Arc<Self>) -> std::io::Result<()> {
        let path = self.config.plugin_socket.clone();
        let _ = std::fs::remove_file(&path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let listener = UnixListener::bind(&path)?;
        loop {
            let (stream, _) = listener.accept().await?;
            let agent = self.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(read).read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match serde_json::from_str::<Request>(&line) {
                    Ok(request) => agent.handle(request).await,
                    Err(err) => Reply {
                        enroll: false,
                        error: Some(format!("malformed request: {err}")),
                        error_kind: None,
                    },
                };
                let mut text = serde_json::to_string(&reply).unwrap_or_default();
                text.push('\n');
                let _ = write.write_all(text.as_bytes()).await;
            });
        }
    }

    /// Reconciles on every config change, whenever a ztunnel has taken a snapshot (so `pending`
    /// pods turn `enabled` as soon as a ztunnel holds them), and every 5 s (pending pods retry)
    /// until dropped.
    pub async fn run_reconciler(self: Arc<Self>) {
        let mut changes = self.index.changes();
        let mut snapshots = self.zds.snapshots();
        loop {
            self.reconcile().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = snapshots.changed() => {}
                }
            })
            .await;
        }
    }
}
