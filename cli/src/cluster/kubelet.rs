//! Weft's netns kubelet: the one piece of the local Kubernetes cluster we write (as
//! virtual-kubelet and kwok do), one per node, running in the node's network namespace and
//! talking to the real kube-apiserver as `system:node:<node>` (so the Node authorizer and the
//! NodeRestriction admission plugin apply to it as to any kubelet).
//!
//! It registers its `Node` (labels, `podCIDR`, addresses, capacity, `Ready`), renews its
//! `Lease` in `kube-node-lease` and posts node status every [`HEARTBEAT`]; it watches the Pods
//! bound to it (`spec.nodeName`, a kube-rs reflector) and runs each with [`super::pod`]: a pod
//! network namespace from the node's CNI chain (the first config of the node's
//! `etc/cni/net.d`, plugins from its `opt/cni/bin` first), each container's `command` + `args`
//! as a host program in it (an image maps to nothing: the command is a program found next to
//! `weft`, among the Kubernetes binaries or on `PATH`), its volumes ([`super::volume`]: ConfigMaps
//! and Secrets read from the API, projected ServiceAccount tokens from the TokenRequest API bound
//! to the pod), `/etc/resolv.conf` pointing at [`CLUSTER_DNS`], readiness probes, and the
//! `PodStatus` it reports through `pods/status`. It serves `kubectl logs` on port 10250
//! ([`super::kubelet_api`]). A pod being deleted gets SIGTERM, SIGKILL after
//! its grace period, then the kubelet's final delete (grace 0, UID precondition) — without it a
//! pod would stay `Terminating` and its namespace would never go away.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::api::message as api_message;
use ::kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::runtime::{WatchStreamExt, reflector, watcher};
use ::kube::{Client, ResourceExt};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, Pod, Secret, Service, ServiceAccountTokenProjection,
};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::layout::{self, Layout};
use super::manifest::Object;
use super::netns;
use super::pod::{self, Host, PodRuntime, pod_status};
use super::{kubelet_api, volume};

/// How often the kubelet renews its Lease and posts node status (the kubelet's default is 10 s).
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// The token's lifetime when its volume gives none, seconds (the API's minimum is 600).
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Grace period when a pod has none (`terminationGracePeriodSeconds` defaults to 30).
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Grace period for pods stopped because the kubelet itself stops, or force-deleted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Name of the file the kubelet creates in its node's directory once it serves.
pub const READY_FILE: &str = "kubelet.ready";
/// The cluster DNS Service's address (`kube-dns` in `kube-system`), in pods' `resolv.conf`.
pub const CLUSTER_DNS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);
/// The node's CNI configuration directory, under its root ([`Layout::node_root`]).
pub const CNI_CONF_DIR: &str = "etc/cni/net.d";
/// The node's CNI plugin directory, under its root, searched first.
pub const CNI_BIN_DIR: &str = "opt/cni/bin";

/// What one kubelet runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The cluster.
    pub layout: Layout,
    /// This node's number.
    pub node: u8,
    /// Directories searched for CNI plugins.
    pub plugin_dirs: Vec<PathBuf>,
    /// Directories searched for container programs before `PATH`.
    pub program_dirs: Vec<PathBuf>,
    /// The node's kubeconfig (user `system:node:<node>`).
    pub kubeconfig: PathBuf,
    /// Pod loop period; default 200 ms.
    pub tick: Duration,
}

/// Errors that stop the kubelet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig is unusable.
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        /// Its path.
        path: String,
        /// The cause.
        #[source]
        source: ::kube::config::KubeconfigError,
    },
    /// No client could be made from it.
    #[error("creating the API client")]
    Client(#[source] Box<::kube::Error>),
    /// The Node could not be registered.
    #[error("registering Node {node}")]
    Register {
        /// The node.
        node: String,
        /// The cause.
        #[source]
        source: Box<::kube::Error>,
    },
    /// The pod watch did not sync.
    #[error("the watch of Pods bound to {0} did not sync within 30 s")]
    NotSynced(String),
    /// The async runtime did not start.
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// The node side of [`pod::Host`]: services from the API watch, tokens from TokenRequest.
struct NodeHost {
    config: Config,
    client: Client,
    pods: reflector::Store<Pod>,
    services: reflector::Store<Service>,
    handle: tokio::runtime::Handle,
}

impl Host for NodeHost {
    fn layout(&self) -> &Layout {
        &self.config.layout
    }

    fn plugin_dirs(&self) -> &[PathBuf] {
        &self.config.plugin_dirs
    }

    fn program_dirs(&self) -> &[PathBuf] {
        &self.config.program_dirs
    }

    fn host_network_allowed(&self) -> bool {
        true
    }

    fn restarts_containers(&self) -> bool {
        true
    }

    fn volume_sources<'a>(
        &'a self,
        runtime: &'a PodRuntime,
        object: &'a Object,
    ) -> Option<Box<dyn volume::Sources + 'a>> {
        Some(Box::new(PodSources {
            host: self,
            runtime,
            object,
        }))
    }

    fn cluster_dns(&self) -> Option<std::net::Ipv4Addr> {
        Some(CLUSTER_DNS)
    }

    /// The first `*.conflist` or `*.conf` of the node's CNI configuration directory, in
    /// lexical order (the file a container runtime picks).
    fn conflist_path(&self, node: u8) -> PathBuf {
        let dir = self.config.layout.node_root(node).join(CNI_CONF_DIR);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf")
            })
            .collect();
        names.sort();
        names
            .into_iter()
            .next()
            .unwrap_or_else(|| dir.join("10-weft.conflist"))
    }

    fn cni_binds(&self, node: u8) -> Vec<netns::Bind> {
        let root = self.config.layout.node_root(node);
        let mut binds: Vec<netns::Bind> = self
            .pods
            .state()
            .iter()
            .flat_map(|p| volume::node_private_paths(p, &root))
            .collect();
        binds.sort_by(|a, b| a.target.cmp(&b.target));
        binds.dedup();
        binds
    }

    fn services(&self, namespace: &str) -> Result<Vec<Value>, String> {
        Ok(self
            .services
            .state()
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(namespace))
            .filter_map(|s| serde_json::to_value(&**s).ok())
            .collect())
    }

    /// Nothing: on the kubelet a pod's tokens are those its projected `serviceAccountToken`
    /// volumes ask for (written by [`volume::prepare`] through TokenRequest), as on Kubernetes.
    fn issue_token(
        &self,
        _runtime: &PodRuntime,
        _service_account: Option<&str>,
        _token_file: &Path,
    ) -> Result<Option<PathBuf>, String> {
        Ok(None)
    }
}

/// Where a pod's volumes come from on the kubelet: ConfigMaps and Secrets read from the API
/// (the Node authorizer lets a kubelet read those its pods use), tokens from TokenRequest.
struct PodSources<'a> {
    host: &'a NodeHost,
    runtime: &'a PodRuntime,
    object: &'a Object,
}

impl volume::Sources for PodSources<'_> {
    fn data(
        &self,
        secret: bool,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        let client = self.host.client.clone();
        // Text entries, then binary ones (`data` of a Secret, `binaryData` of a ConfigMap).
        let merge = |text: Option<BTreeMap<String, String>>,
                     bytes: Option<BTreeMap<String, k8s_openapi::ByteString>>| {
            let mut data: BTreeMap<String, Vec<u8>> = text
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(bytes.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
            data
        };
        let result = if secret {
            let api: Api<Secret> = Api::namespaced(client, namespace);
            self.host
                .handle
                .block_on(api.get_opt(name))
                .map(|s| s.map(|s| merge(s.string_data, s.data)))
        } else {
            let api: Api<ConfigMap> = Api::namespaced(client, namespace);
            self.host
                .handle
                .block_on(api.get_opt(name))
                .map(|c| c.map(|c| merge(c.data, c.binary_data)))
        };
        let kind = if secret { "Secret" } else { "ConfigMap" };
        result.map_err(|e| format!("reading {kind} {namespace}/{name}: {}", api_message(&e)))
    }

    fn token(&self, audience: Option<&str>, expiration_seconds: i64) -> Result<String, String> {
        let namespace = self.runtime.key.namespace.as_deref().unwrap_or("default");
        let service_account = self.object.0["spec"]["serviceAccountName"]
            .as_str()
            .filter(|sa| !sa.is_empty())
            .unwrap_or("default");
        let source = ServiceAccountTokenProjection {
            audience: audience.map(str::to_owned),
            expiration_seconds: Some(expiration_seconds),
            path: String::new(),
        };
        self.host
            .handle
            .block_on(request_token(
                &self.host.client,
                namespace,
                service_account,
                &source,
                (&self.runtime.key.name, &self.runtime.uid),
            ))
            .map_err(|e| {
                format!(
                    "requesting a token for ServiceAccount {namespace}/{service_account}: {}",
                    api_message(&e)
                )
            })
    }

    fn field(&self, path: &str) -> Option<String> {
        pod::field_value(path, self.object, self.runtime, &self.host.config.layout)
    }

    fn node_root(&self) -> PathBuf {
        self.host.config.layout.node_root(self.host.config.node)
    }
}

/// `POST …/serviceaccounts/<sa>/token` (TokenRequest), bound to the pod.
async fn request_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    source: &ServiceAccountTokenProjection,
    (pod, uid): (&str, &str),
) -> Result<String, ::kube::Error> {
    // An empty audience means the API server's own.
    let audiences: Vec<&str> = source
        .audience
        .as_deref()
        .filter(|a| !a.is_empty())
        .into_iter()
        .collect();
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": audiences,
            "expirationSeconds": source.expiration_seconds.unwrap_or(TOKEN_EXPIRATION_SECONDS),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid},
        },
    });
    let request = http::Request::post(format!(
        "/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
    ))
    .header(http::header::CONTENT_TYPE, "application/json")
    .body(body.to_string().into_bytes())
    .map_err(|e| ::kube::Error::BuildRequest(::kube::core::request::Error::BuildRequest(e)))?;
    let response: Value = client.request(request).await?;
    Ok(response["status"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// The Node object the kubelet registers.
fn node_object(node: u8) -> Value {
    let name = layout::node_name(node);
    let cidr = format!("{}/24", layout::pod_cidr(node));
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": go_arch(),
        }},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    })
}

/// Go's name for this machine's architecture (what `kubernetes.io/arch` holds).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The node status the kubelet posts: Ready, addresses, capacity, version.
fn node_status(node: u8, ready_since: &str) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(1 << 20);
    let resources =
        json!({"cpu": cpus.to_string(), "memory": format!("{memory_kib}Ki"), "pods": "110"});
    json!({"status": {
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "weft netns kubelet is posting ready status",
            "lastHeartbeatTime": super::store::timestamp(),
            "lastTransitionTime": ready_since,
        }],
        "addresses": [
            {"type": "InternalIP", "address": layout::node_ip(node).to_string()},
            {"type": "Hostname", "address": layout::node_name(node)},
        ],
        "capacity": resources,
        "allocatable": resources,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "kubeletVersion": super::kube::KUBE_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": go_arch(),
            "containerRuntimeVersion": concat!("weft-netns://", env!("CARGO_PKG_VERSION")),
            "kernelVersion": nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
            "osImage": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    }})
}

/// Creates the Node (kept when it exists) and posts its first status.
async fn register(client: &Client, node: u8, ready_since: &str) -> Result<(), ::kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let object: Node =
        serde_json::from_value(node_object(node)).map_err(::kube::Error::SerdeError)?;
    match nodes.create(&PostParams::default(), &object).await {
        Ok(_) => info!(node = %layout::node_name(node), "node registered"),
        Err(::kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    heartbeat(client, node, ready_since).await
}

/// Posts node status and renews the node's Lease.
async fn heartbeat(client: &Client, node: u8, ready_since: &str) -> Result<(), ::kube::Error> {
    let name = layout::node_name(node);
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(node_status(node, ready_since)),
        )
        .await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let now = time::OffsetDateTime::now_utc();
    let renew = format!(
        "{}.{:06}Z",
        now.replace_nanosecond(0)
            .unwrap_or(now)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
            .trim_end_matches('Z'),
        now.microsecond()
    );
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": renew},
    });
    leases
        .patch(
            &name,
            &PatchParams::apply("weft-kubelet").force(),
            &Patch::Apply(lease),
        )
        .await?;
    Ok(())
}

/// Runs the kubelet until `stop` is set, then stops every pod it started.
///
/// # Errors
/// [`Error`] when it cannot reach the API server or register its node.
pub fn run(config: Config, stop: &AtomicBool) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let node_name = layout::node_name(config.node);
    let client = runtime.block_on(async {
        let path = config.kubeconfig.display().to_string();
        let kubeconfig =
            Kubeconfig::read_from(&config.kubeconfig).map_err(|source| Error::Kubeconfig {
                path: path.clone(),
                source,
            })?;
        let kube_config =
            ::kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig { path, source })?;
        Client::try_from(kube_config).map_err(|e| Error::Client(Box::new(e)))
    })?;
    let ready_since = super::store::timestamp();
    runtime
        .block_on(register(&client, config.node, &ready_since))
        .map_err(|source| Error::Register {
            node: node_name.clone(),
            source: Box::new(source),
        })?;
    {
        let client = client.clone();
        let node = config.node;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                if let Err(err) = heartbeat(&client, node, &ready_since).await {
                    warn!(error = %api_message(&err), "node heartbeat failed");
                }
            }
        });
    }
    let pods = watch(
        &runtime,
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
    );
    let services = watch(
        &runtime,
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let synced = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let _ = pods.wait_until_ready().await;
            let _ = services.wait_until_ready().await;
        })
        .await
    });
    if synced.is_err() {
        return Err(Error::NotSynced(node_name));
    }
    {
        // The kubelet API (container logs) on the node's IP.
        let paths = super::kube::Paths::new(&config.layout);
        let (cert, key) = paths.kubelet_serving(config.node);
        let addr = std::net::SocketAddr::from((layout::node_ip(config.node), kubelet_api::PORT));
        match kubelet_api::tls_config(&cert, &key, &paths.ca_cert()) {
            Ok(tls) => {
                let (pods, layout) = (pods.clone(), config.layout.clone());
                runtime.spawn(async move {
                    if let Err(err) = kubelet_api::serve(addr, tls, pods, layout).await {
                        kubelet_api::report(&err);
                    }
                });
            }
            Err(err) => kubelet_api::report(&err),
        }
    }
    let tick = config.tick;
    let ready_file = config.layout.node_dir(config.node).join(READY_FILE);
    let host = Arc::new(NodeHost {
        config,
        client,
        pods: pods.clone(),
        services,
        handle: runtime.handle().clone(),
    });
    let mut kubelet = Kubelet {
        host,
        pods,
        running: BTreeMap::new(),
        stopping: BTreeMap::new(),
        last_delete: BTreeMap::new(),
    };
    let _ = std::fs::write(&ready_file, b"ready\n");
    info!(node = %node_name, "kubelet serving");
    while !stop.load(Ordering::SeqCst) {
        kubelet.sync();
        kubelet.poll();
        std::thread::sleep(tick);
    }
    info!("kubelet stopping");
    let _ = std::fs::remove_file(&ready_file);
    let running = std::mem::take(&mut kubelet.running);
    let threads: Vec<_> = running
        .into_values()
        .map(|rt| {
            let host = kubelet.host.clone();
            std::thread::spawn(move || pod::stop(&*host, rt, SHUTDOWN_GRACE))
        })
        .chain(std::mem::take(&mut kubelet.stopping).into_values())
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// A reflector over `api` kept by a task on `runtime`; the watcher retries with backoff (and
/// relists on 410 Gone).
fn watch<K>(
    runtime: &tokio::runtime::Runtime,
    api: Api<K>,
    config: watcher::Config,
) -> reflector::Store<K>
where
    K: ::kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config))
        .default_backoff()
        .applied_objects();
    runtime.spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(err) = event {
                warn!(error = %crate::echo::error_message(&err), "watch failed; retrying");
            }
        }
    });
    reader
}

struct Kubelet {
    host: Arc<NodeHost>,
    pods: reflector::Store<Pod>,
    /// Pods started, by UID.
    running: BTreeMap<String, PodRuntime>,
    /// Pods being stopped (SIGTERM, grace, SIGKILL, final delete), by UID.
    stopping: BTreeMap<String, std::thread::JoinHandle<()>>,
    /// When the final delete of a pod that never ran was last tried, by UID.
    last_delete: BTreeMap<String, Instant>,
}

impl Kubelet {
    /// Starts new pods, stops deleted ones.
    fn sync(&mut self) {
        self.stopping.retain(|_, t| !t.is_finished());
        let bound: BTreeMap<String, Arc<Pod>> = self
            .pods
            .state()
            .into_iter()
            .filter_map(|p| Some((p.uid()?, p)))
            .collect();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|uid| !bound.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            // Deleted with no grace (or the watch lost it): stop it now.
            if let Some(rt) = self.running.remove(&uid) {
                let host = self.host.clone();
                let thread = std::thread::spawn(move || pod::stop(&*host, rt, SHUTDOWN_GRACE));
                self.stopping.insert(uid, thread);
            }
        }
        self.last_delete.retain(|uid, _| bound.contains_key(uid));
        for (uid, pod) in bound {
            if pod.metadata.deletion_timestamp.is_some() {
                self.delete(&uid, &pod);
                continue;
            }
            if let Some(rt) = self.running.get(&uid) {
                let due = rt
                    .sandbox
                    .as_ref()
                    .is_some_and(|r| r.retry_at <= Instant::now());
                if due {
                    let attempts = rt.sandbox.as_ref().map_or(0, |r| r.attempts);
                    let mut rt = self.start(&uid, &pod);
                    if let Some(retry) = rt.sandbox.as_mut() {
                        retry.attempts = attempts + 1;
                        retry.retry_at = Instant::now() + pod::sandbox_backoff(retry.attempts);
                    }
                    self.running.insert(uid, rt);
                }
                continue;
            }
            if self.stopping.contains_key(&uid) {
                continue;
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue;
            }
            let rt = self.start(&uid, &pod);
            self.running.insert(uid, rt);
        }
    }

    fn start(&self, uid: &str, pod: &Pod) -> PodRuntime {
        let netns_name = self.host.layout().pod_netns(uid);
        if netns::exists(&netns_name) {
            // Left by an earlier kubelet of this node: start again from nothing.
            super::network::kill_all(&netns::pids(&netns_name));
            let _ = netns::delete(&netns_name);
        }
        let object = Object(serde_json::to_value(pod).unwrap_or_default());
        let mut rt = pod::start(&*self.host, &object, uid, Ok(self.host.config.node));
        let never = pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) == Some("Never");
        if !never && let Some(error) = rt.failure.take() {
            // As the kubelet does for restartPolicy Always/OnFailure: the pod stays Pending and
            // its containers are tried again with backoff (it does not fail, which would have
            // its ReplicaSet replace it in a loop).
            rt.sandbox = Some(pod::SandboxRetry {
                error,
                attempts: 1,
                retry_at: Instant::now() + pod::sandbox_backoff(1),
                sandbox: false,
            });
        }
        self.write_status(&mut rt, pod);
        rt
    }

    /// A pod being deleted: stop it within its grace period, then delete it for good.
    fn delete(&mut self, uid: &str, pod: &Pod) {
        if self.stopping.contains_key(uid) {
            return;
        }
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| pod.spec.as_ref()?.termination_grace_period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(DEFAULT_GRACE, Duration::from_secs);
        let api: Api<Pod> = Api::namespaced(
            self.host.client.clone(),
            &pod.namespace().unwrap_or_default(),
        );
        let name = pod.name_any();
        let final_delete = {
            let uid = uid.to_owned();
            let handle = self.host.handle.clone();
            move || {
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match handle.block_on(api.delete(&name, &params)) {
                    Ok(_) | Err(::kube::Error::Api(_)) => {}
                    Err(err) => {
                        warn!(pod = %name, error = %api_message(&err), "final delete failed");
                    }
                }
            }
        };
        match self.running.remove(uid) {
            Some(rt) => {
                let host = self.host.clone();
                info!(pod = %rt.key, grace_seconds = grace.as_secs(), "stopping pod being deleted");
                let thread = std::thread::spawn(move || {
                    pod::stop(&*host, rt, grace);
                    final_delete();
                });
                self.stopping.insert(uid.to_owned(), thread);
            }
            None => {
                // Never started here (or already stopped): nothing to wait for; retried every
                // 2 s while the API still has it.
                let due = self
                    .last_delete
                    .get(uid)
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(2));
                if due {
                    self.last_delete.insert(uid.to_owned(), Instant::now());
                    final_delete();
                }
            }
        }
    }

    /// Polls containers and probes, and reports what changed.
    fn poll(&mut self) {
        let uids: Vec<String> = self.running.keys().cloned().collect();
        for uid in uids {
            let Some(mut rt) = self.running.remove(&uid) else {
                continue;
            };
            pod::poll(&*self.host, &mut rt);
            if let Some(pod) = self
                .pods
                .state()
                .into_iter()
                .find(|p| p.uid().as_deref() == Some(&uid))
            {
                self.write_status(&mut rt, &pod);
            }
            self.running.insert(uid, rt);
        }
    }

    /// Posts the pod's status through `pods/status` when it changed.
    fn write_status(&self, rt: &mut PodRuntime, pod: &Pod) {
        let mut status = pod_status(rt);
        // The API wants each container's image in its status.
        if let (Some(statuses), Some(spec)) =
            (status["containerStatuses"].as_array_mut(), &pod.spec)
        {
            for s in statuses {
                let image = spec
                    .containers
                    .iter()
                    .find(|c| Some(c.name.as_str()) == s["name"].as_str())
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                s["image"] = json!(image);
            }
        }
        // A merge patch keeps what it does not name: clear a waiting pod's reason and message
        // once it runs.
        if let Some(fields) = status.as_object_mut() {
            for key in ["reason", "message"] {
                fields.entry(key).or_insert(Value::Null);
            }
        }
        if status == rt.last_status {
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.host.client.clone(),
            rt.key.namespace.as_deref().unwrap_or("default"),
        );
        let patch = Patch::Merge(json!({"status": status}));
        match self.host.handle.block_on(api.patch_status(
            &rt.key.name,
            &PatchParams::default(),
            &patch,
        )) {
            Ok(_) => rt.last_status = status,
            Err(err) => {
                warn!(pod = %rt.key, error = %api_message(&err), "posting pod status failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_registers_its_pod_cidr_and_labels() {
        let node: Node = serde_json::from_value(node_object(2)).expect("a valid Node");
        let spec = node.spec.expect("spec");
        assert_eq!(spec.pod_cidr.as_deref(), Some("10.244.2.0/24"));
        let labels = node.metadata.labels.expect("labels");
        assert_eq!(labels["kubernetes.io/hostname"], "node-2");
        assert_eq!(labels["kubernetes.io/os"], "linux");
    }

    #[test]
    fn node_status_is_ready_with_the_node_ip_and_capacity() {
        let status = node_status(1, "2026-12-07T00:00:00Z");
        let parsed: k8s_openapi::api::core::v1::NodeStatus =
            serde_json::from_value(status["status"].clone()).expect("a valid NodeStatus");
        let ready = parsed
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(ready.status, "True");
        let addresses = parsed.addresses.expect("addresses");
        assert!(
            addresses
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == "10.240.0.11"),
            "{addresses:?}"
        );
        assert!(
            parsed
                .allocatable
                .expect("allocatable")
                .contains_key("pods")
        );
    }
}
