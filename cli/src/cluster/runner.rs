//! The runner: kubelet, scheduler and the few controller-manager loops the local cluster needs.
//!
//! One daemon per cluster polls the object store and reconciles: a `default` ServiceAccount per
//! namespace; Deployment replicas as Pods (named `<deployment>-<pod-template-hash>-<suffix>`);
//! Pods scheduled round-robin onto nodes, given a network namespace through the node's CNI
//! chain and their containers' `command`+`args` started inside it; Pod status (`podIP`,
//! `hostIP`, `phase`, `Ready`, container states) from the processes and readiness probes;
//! EndpointSlices for Services with selectors; service VIP rules on every node. It restarts
//! nothing it was not asked to: a container that exits leaves its Pod not ready.
//!
//! Each started pod gets a service-account token ([`super::token`]): the file
//! `<pod dir>/token`, named to every container by `WEFT_SERVICE_ACCOUNT_TOKEN_FILE`, and a
//! registration the controller authenticates it by, removed when the pod stops or is deleted.
//! Container `env[].value`, `command` and `args` get Kubernetes `$(VAR)` expansion
//! ([`super::expansion`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod, Service};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::expansion::{expand, lookup};
use super::layout::{self, Layout};
use super::manifest::{Object, ObjectKey};
use super::store::{self, Store};
use super::token::{self, Token};
use super::{cni, netns, proxy};

/// Label carrying the hash of a Deployment's pod template.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label marking EndpointSlices the runner manages.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "weft-runner";

/// Runner settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The cluster.
    pub layout: Layout,
    /// Number of nodes.
    pub nodes: u8,
    /// Directories searched for CNI plugins.
    pub plugin_dirs: Vec<PathBuf>,
    /// Directories searched for container programs before `PATH` (e.g. where `weft-echo` is).
    pub program_dirs: Vec<PathBuf>,
    /// Loop period; default 200 ms.
    pub tick: Duration,
}

/// Errors that stop the runner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error("object store")]
    Store(#[from] store::Error),
}

struct ContainerRuntime {
    name: String,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    started_at: String,
    finished_at: Option<String>,
    probe: Option<Probe>,
    ready: bool,
    last_probe: Option<Instant>,
}

#[derive(Debug, Clone)]
enum Probe {
    Tcp(u16),
    Http { port: u16, path: String },
}

struct PodRuntime {
    key: ObjectKey,
    uid: String,
    node: u8,
    netns: String,
    ip: Option<Ipv4Addr>,
    cni_result: Option<Value>,
    containers: Vec<ContainerRuntime>,
    start_time: String,
    failure: Option<String>,
    /// The pod's network could not be set up (CNI `ADD` failed): like the kubelet, the runner
    /// keeps the pod `Pending` and retries sandbox creation at `retry_at`.
    sandbox: Option<SandboxRetry>,
    last_status: Value,
    /// The pod's service-account token registration (removed when the pod stops).
    token_registration: Option<PathBuf>,
}

struct SandboxRetry {
    error: String,
    attempts: u32,
    retry_at: Instant,
}

/// Delay before sandbox attempt `attempts + 1`: 0.5 s doubling to 4 s.
fn sandbox_backoff(attempts: u32) -> Duration {
    Duration::from_millis(500u64 << attempts.saturating_sub(1).min(3))
}

struct Runner {
    config: Config,
    store: Store,
    pods: BTreeMap<String, PodRuntime>,
    next_node: u8,
    applied_rules: Option<Vec<proxy::ServicePort>>,
}

/// Runs until `stop` is set, then stops every pod it started.
///
/// # Errors
/// [`Error`] when the store becomes unusable.
pub fn run(config: Config, stop: &AtomicBool) -> Result<(), Error> {
    let store = Store::new(config.layout.store_dir());
    let mut runner = Runner {
        config,
        store,
        pods: BTreeMap::new(),
        next_node: 1,
        applied_rules: None,
    };
    let mut last_revision = None;
    let mut last_full = Instant::now();
    let ready_file = runner.config.layout.state_dir().join("runner.ready");
    while !stop.load(Ordering::SeqCst) {
        let revision = runner.store.revision();
        if last_revision != Some(revision) || last_full.elapsed() > Duration::from_secs(5) {
            last_revision = Some(revision);
            last_full = Instant::now();
            if let Err(err) = runner.reconcile() {
                warn!(error = %err, "reconcile failed");
            }
            if !ready_file.exists() {
                let _ = std::fs::write(&ready_file, b"ready\n");
            }
        }
        runner.poll_pods();
        std::thread::sleep(runner.config.tick);
    }
    info!("runner stopping");
    let uids: Vec<String> = runner.pods.keys().cloned().collect();
    for uid in uids {
        if let Some(pod) = runner.pods.remove(&uid) {
            runner.stop_pod(pod);
        }
    }
    Ok(())
}

fn labels_match(labels: &Value, selector: &BTreeMap<String, String>) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels[k.as_str()].as_str() == Some(v.as_str()))
}

fn template_hash(template: &Value) -> String {
    let text = serde_json::to_string(template).unwrap_or_default();
    let hash = proxy::fnv1a(text.as_bytes());
    // Kubernetes-style: lowercase consonants and digits, 10 characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10)
        .map(|i| ALPHABET[((hash >> (i * 6)) % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn owner_uid(object: &Value, kind: &str) -> Option<String> {
    object["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == kind && r["controller"] == true)
        .and_then(|r| r["uid"].as_str().map(str::to_owned))
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

// === impl Runner ===

impl Runner {
    fn reconcile(&mut self) -> Result<(), Error> {
        self.service_accounts()?;
        self.deployments()?;
        self.pods()?;
        self.endpoint_slices()?;
        self.service_rules()?;
        Ok(())
    }

    fn service_accounts(&self) -> Result<(), Error> {
        for ns in self.store.list("", "Namespace")? {
            let key = ObjectKey::new("", "ServiceAccount", Some(ns.name()), "default");
            if self.store.get(&key)?.is_none() {
                let _lock = self.store.lock()?;
                self.store.put(&Object(json!({
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {
                        "name": "default",
                        "namespace": ns.name(),
                        "uid": store::new_uid(),
                        "creationTimestamp": store::timestamp(),
                    }
                })))?;
            }
        }
        Ok(())
    }

    fn deployments(&self) -> Result<(), Error> {
        let deployments = self.store.list("apps", "Deployment")?;
        let pods = self.store.list("", "Pod")?;
        let mut live_owners = BTreeSet::new();
        for object in &deployments {
            let Ok(deployment) = object.typed::<Deployment>() else {
                continue;
            };
            let Some(uid) = object.uid().map(str::to_owned) else {
                continue;
            };
            live_owners.insert(uid.clone());
            let Some(spec) = deployment.spec else {
                continue;
            };
            let template = object.0["spec"]["template"].clone();
            let hash = template_hash(&template);
            let ns = object.namespace().unwrap_or("default");
            let mut current: Vec<&Object> = Vec::new();
            for pod in pods
                .iter()
                .filter(|p| owner_uid(&p.0, "Deployment").as_deref() == Some(&uid))
            {
                if pod.0["metadata"]["labels"][POD_TEMPLATE_HASH] == hash.as_str() {
                    current.push(pod);
                } else {
                    self.delete_object(&pod.key())?;
                }
            }
            let desired = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
            current.sort_by_key(|p| {
                (
                    p.0["metadata"]["creationTimestamp"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    p.name().to_owned(),
                )
            });
            while current.len() > desired {
                if let Some(extra) = current.pop() {
                    self.delete_object(&extra.key())?;
                }
            }
            for _ in current.len()..desired {
                self.create_pod(object, &template, &hash, ns, &uid)?;
            }
            let ready = current.iter().filter(|p| is_ready(&p.0)).count();
            let status = json!({
                "observedGeneration": object.0["metadata"]["generation"],
                "replicas": current.len().max(desired.min(current.len())),
                "updatedReplicas": current.len(),
                "readyReplicas": ready,
                "availableReplicas": ready,
            });
            self.store.update_status(&object.key(), status)?;
        }
        // Garbage collection: pods whose Deployment is gone.
        for pod in &pods {
            if let Some(owner) = owner_uid(&pod.0, "Deployment")
                && !live_owners.contains(&owner)
            {
                self.delete_object(&pod.key())?;
            }
        }
        Ok(())
    }

    fn create_pod(
        &self,
        deployment: &Object,
        template: &Value,
        hash: &str,
        ns: &str,
        owner: &str,
    ) -> Result<(), Error> {
        let name = format!("{}-{hash}-{}", deployment.name(), random_suffix());
        let mut labels = template["metadata"]["labels"].clone();
        labels[POD_TEMPLATE_HASH] = json!(hash);
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "generateName": format!("{}-{hash}-", deployment.name()),
                "namespace": ns,
                "uid": store::new_uid(),
                "creationTimestamp": store::timestamp(),
                "labels": labels,
                "annotations": template["metadata"]["annotations"].clone(),
                "ownerReferences": [{
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": deployment.name(),
                    "uid": owner,
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
            "spec": template["spec"].clone(),
        });
        let mut pod = pod;
        if pod["metadata"]["annotations"].is_null() {
            pod["metadata"]
                .as_object_mut()
                .map(|m| m.remove("annotations"));
        }
        let _lock = self.store.lock()?;
        self.store.put(&Object(pod))?;
        info!(pod = %name, namespace = ns, "pod created for deployment");
        Ok(())
    }

    fn delete_object(&self, key: &ObjectKey) -> Result<(), Error> {
        let _lock = self.store.lock()?;
        self.store.remove(key)?;
        Ok(())
    }

    fn pods(&mut self) -> Result<(), Error> {
        let stored = self.store.list("", "Pod")?;
        let uids: BTreeSet<String> = stored
            .iter()
            .filter_map(|p| p.uid().map(str::to_owned))
            .collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !uids.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(pod) = self.pods.remove(&uid) {
                self.stop_pod(pod);
            }
        }
        for object in stored {
            let Some(uid) = object.uid().map(str::to_owned) else {
                continue;
            };
            if let Some(runtime) = self.pods.get(&uid) {
                let due = runtime
                    .sandbox
                    .as_ref()
                    .is_some_and(|r| r.retry_at <= Instant::now());
                if due {
                    let attempts = runtime.sandbox.as_ref().map_or(0, |r| r.attempts);
                    let mut runtime = self.start_pod(&object, &uid);
                    if let Some(retry) = runtime.sandbox.as_mut() {
                        retry.attempts = attempts + 1;
                        retry.retry_at = Instant::now() + sandbox_backoff(retry.attempts);
                    }
                    self.pods.insert(uid, runtime);
                }
                continue;
            }
            if !object.0["status"]["phase"].is_null() {
                // Started by an earlier runner of this cluster; nothing to attach to.
                continue;
            }
            let runtime = self.start_pod(&object, &uid);
            self.pods.insert(uid, runtime);
        }
        Ok(())
    }

    fn schedule(&mut self, object: &Object) -> Result<u8, String> {
        if let Some(name) = object.0["spec"]["nodeName"].as_str() {
            return layout::node_number(name)
                .filter(|n| (1..=self.config.nodes).contains(n))
                .ok_or_else(|| format!("spec.nodeName {name:?} is not a node of this cluster"));
        }
        let node = self.next_node;
        self.next_node = if node >= self.config.nodes {
            1
        } else {
            node + 1
        };
        // Bind: record the node in the stored spec, as the scheduler does.
        let key = object.key();
        if let Ok(_lock) = self.store.lock()
            && let Ok(Some(mut current)) = self.store.get(&key)
        {
            current.0["spec"]["nodeName"] = json!(layout::node_name(node));
            let _ = self.store.put(&current);
        }
        Ok(node)
    }

    fn start_pod(&mut self, object: &Object, uid: &str) -> PodRuntime {
        let key = object.key();
        let netns_name = self.config.layout.pod_netns(uid);
        let mut runtime = PodRuntime {
            key: key.clone(),
            uid: uid.to_owned(),
            node: 0,
            netns: netns_name.clone(),
            ip: None,
            cni_result: None,
            containers: Vec::new(),
            start_time: store::timestamp(),
            failure: None,
            sandbox: None,
            last_status: Value::Null,
            token_registration: None,
        };
        // Network set-up failures are retried (the pod stays Pending); the rest fail the pod.
        let mut sandbox_error = None;
        let result = (|| -> Result<(), String> {
            let pod: Pod = object.typed().map_err(|(f, m)| format!("{f}: {m}"))?;
            let spec = pod.spec.ok_or("pod has no spec")?;
            if spec.host_network == Some(true) {
                return Err("hostNetwork pods are not supported by the local cluster".into());
            }
            runtime.node = self.schedule(object)?;
            let pod_dir = self.config.layout.pod_dir(uid);
            std::fs::create_dir_all(&pod_dir)
                .map_err(|e| format!("creating {}: {e}", pod_dir.display()))?;
            let network = (|| -> Result<Value, String> {
                netns::add(&netns_name).map_err(|e| e.to_string())?;
                let list = cni::read_conflist(&self.conflist_path(runtime.node))
                    .map_err(|e| e.to_string())?;
                let result =
                    cni::add(&list, &self.invocation(&runtime)).map_err(|e| e.to_string())?;
                runtime.ip = Some(cni::pod_ip(&result).map_err(|e| e.to_string())?);
                Ok(result)
            })();
            let result = network.inspect_err(|message| sandbox_error = Some(message.clone()))?;
            let _ = std::fs::write(pod_dir.join("cni-result.json"), result.to_string());
            runtime.cni_result = Some(result);
            let token_file = pod_dir.join(token::TOKEN_FILE_NAME);
            runtime.token_registration = Some(self.issue_token(
                &runtime,
                spec.service_account_name.as_deref(),
                &token_file,
            )?);
            let env_base = self.base_env(object, &runtime, &token_file)?;
            for container in &spec.containers {
                let child = self.spawn(container, &runtime, &env_base, object, &pod_dir)?;
                runtime.containers.push(ContainerRuntime {
                    name: container.name.clone(),
                    child: Some(child),
                    exit: None,
                    started_at: store::timestamp(),
                    finished_at: None,
                    probe: probe_of(container),
                    ready: false,
                    last_probe: None,
                });
            }
            Ok(())
        })();
        match result {
            Ok(()) => info!(pod = %key, ip = ?runtime.ip, node = runtime.node, "pod started"),
            Err(message) => {
                if sandbox_error.is_some() {
                    warn!(pod = %key, error = %message, "creating the pod sandbox failed; retrying");
                    runtime.sandbox = Some(SandboxRetry {
                        error: message,
                        attempts: 1,
                        retry_at: Instant::now() + sandbox_backoff(1),
                    });
                } else {
                    warn!(pod = %key, error = %message, "pod failed to start");
                    runtime.failure = Some(message);
                }
                for container in &mut runtime.containers {
                    kill_group(container);
                }
                revoke_token(&mut runtime);
                self.teardown_network(&runtime);
            }
        }
        self.write_status(&mut runtime);
        runtime
    }

    fn conflist_path(&self, node: u8) -> PathBuf {
        self.config
            .layout
            .node_dir(node)
            .join("cni")
            .join("10-weft.conflist")
    }

    fn invocation(&self, runtime: &PodRuntime) -> cni::Invocation {
        cni::Invocation {
            node_netns: self.config.layout.node_netns(runtime.node),
            pod_netns_path: Path::new(netns::NETNS_DIR).join(&runtime.netns),
            container_id: runtime.uid.clone(),
            pod_namespace: runtime.key.namespace.clone().unwrap_or_default(),
            pod_name: runtime.key.name.clone(),
            pod_uid: runtime.uid.clone(),
            plugin_dirs: self.config.plugin_dirs.clone(),
        }
    }

    /// Issues the pod's service-account token: writes it to `token_file` (mode 0600) and
    /// registers it for the controller; returns the registration file.
    fn issue_token(
        &self,
        runtime: &PodRuntime,
        service_account: Option<&str>,
        token_file: &Path,
    ) -> Result<PathBuf, String> {
        let token = Token::generate();
        token.write(token_file).map_err(|e| e.to_string())?;
        let registration = token::Registration {
            namespace: runtime
                .key
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            service_account: service_account
                .filter(|sa| !sa.is_empty())
                .unwrap_or("default")
                .to_owned(),
            pod: runtime.key.name.clone(),
            uid: runtime.uid.clone(),
            node: layout::node_name(runtime.node),
        };
        token::register(
            &self.config.layout.controller_state_dir(),
            &token,
            &registration,
        )
        .map_err(|e| crate::echo::error_message(&e))
    }

    fn base_env(
        &self,
        object: &Object,
        runtime: &PodRuntime,
        token_file: &Path,
    ) -> Result<Vec<(String, String)>, String> {
        let mut path: Vec<PathBuf> = self.config.program_dirs.clone();
        path.extend(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        );
        let path = std::env::join_paths(path).map_err(|e| e.to_string())?;
        let mut env = vec![
            ("PATH".to_owned(), path.to_string_lossy().into_owned()),
            ("HOSTNAME".to_owned(), super::pod_hostname(object)),
            ("HOME".to_owned(), "/root".to_owned()),
            (
                token::TOKEN_FILE_ENV.to_owned(),
                token_file.display().to_string(),
            ),
        ];
        // Kubernetes-style service links for services in the pod's namespace.
        if object.0["spec"]["enableServiceLinks"] != false {
            let ns = runtime.key.namespace.as_deref().unwrap_or("default");
            for svc in self.store.list("", "Service").map_err(|e| e.to_string())? {
                if svc.namespace() != Some(ns) {
                    continue;
                }
                let Some(ip) = svc.0["spec"]["clusterIP"]
                    .as_str()
                    .filter(|ip| *ip != "None" && !ip.is_empty())
                else {
                    continue;
                };
                let prefix = svc.name().to_ascii_uppercase().replace('-', "_");
                let ports = svc.0["spec"]["ports"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                env.push((format!("{prefix}_SERVICE_HOST"), ip.to_owned()));
                if let Some(first) = ports.first() {
                    let port = first["port"].as_u64().unwrap_or(0);
                    let proto = first["protocol"]
                        .as_str()
                        .unwrap_or("TCP")
                        .to_ascii_lowercase();
                    env.push((format!("{prefix}_SERVICE_PORT"), port.to_string()));
                    env.push((format!("{prefix}_PORT"), format!("{proto}://{ip}:{port}")));
                }
                for port in &ports {
                    if let Some(name) = port["name"].as_str().filter(|n| !n.is_empty()) {
                        let name = name.to_ascii_uppercase().replace('-', "_");
                        env.push((
                            format!("{prefix}_SERVICE_PORT_{name}"),
                            port["port"].as_u64().unwrap_or(0).to_string(),
                        ));
                    }
                }
            }
        }
        Ok(env)
    }

    fn spawn(
        &self,
        container: &Container,
        runtime: &PodRuntime,
        env_base: &[(String, String)],
        object: &Object,
        pod_dir: &Path,
    ) -> Result<Child, String> {
        let Process { program, args, env } = container_process(container, env_base, |path| {
            field_value(path, object, runtime, &self.config.layout)
        })?;
        let program = self.resolve_program(&program).ok_or_else(|| {
            format!(
                "container {}: program {program:?} not found on the host",
                container.name
            )
        })?;
        let log_path = pod_dir.join(format!("{}.log", container.name));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = netns::pod_command_in(&runtime.netns, &super::pod_hostname(object), &program);
        cmd.args(&args)
            .env_clear()
            .envs(env)
            .current_dir(pod_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        cmd.spawn().map_err(|e| {
            format!(
                "container {}: starting {}: {e}",
                container.name,
                program.display()
            )
        })
    }

    fn resolve_program(&self, program: &str) -> Option<PathBuf> {
        if program.contains('/') {
            let path = PathBuf::from(program);
            return path.is_file().then_some(path);
        }
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        self.config
            .program_dirs
            .iter()
            .cloned()
            .chain(std::env::split_paths(&path_var))
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    }

    fn poll_pods(&mut self) {
        let node_netns: BTreeMap<u8, String> = (1..=self.config.nodes)
            .map(|n| (n, self.config.layout.node_netns(n)))
            .collect();
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            let Some(mut runtime) = self.pods.remove(&uid) else {
                continue;
            };
            if runtime.failure.is_none() {
                for container in &mut runtime.containers {
                    if container.exit.is_none()
                        && let Some(child) = container.child.as_mut()
                        && let Ok(Some(status)) = child.try_wait()
                    {
                        info!(pod = %runtime.key, container = %container.name, %status, "container exited");
                        container.exit = Some(status);
                        container.finished_at = Some(store::timestamp());
                        container.ready = false;
                    }
                    if container.exit.is_some() {
                        continue;
                    }
                    match (&container.probe, runtime.ip) {
                        (None, _) => container.ready = true,
                        (Some(probe), Some(ip)) => {
                            let due = container
                                .last_probe
                                .is_none_or(|t| t.elapsed() >= Duration::from_millis(500));
                            if due {
                                container.last_probe = Some(Instant::now());
                                let netns =
                                    node_netns.get(&runtime.node).cloned().unwrap_or_default();
                                container.ready = run_probe(&netns, ip, probe.clone());
                            }
                        }
                        (Some(_), None) => container.ready = false,
                    }
                }
                // A pod whose containers all exited has stopped: its token is no longer good.
                if !runtime.containers.is_empty()
                    && runtime.containers.iter().all(|c| c.exit.is_some())
                {
                    revoke_token(&mut runtime);
                }
            }
            self.write_status(&mut runtime);
            self.pods.insert(uid, runtime);
        }
    }

    fn write_status(&self, runtime: &mut PodRuntime) {
        let status = pod_status(runtime);
        if status != runtime.last_status {
            match self.store.update_status(&runtime.key, status.clone()) {
                Ok(_) => runtime.last_status = status,
                Err(err) => warn!(pod = %runtime.key, error = %err, "writing pod status failed"),
            }
        }
    }

    fn stop_pod(&self, mut runtime: PodRuntime) {
        for container in &mut runtime.containers {
            terminate(container);
        }
        // Anything else left in the pod's namespace (e.g. a process that changed its group).
        super::network::kill_all(&netns::pids(&runtime.netns));
        revoke_token(&mut runtime);
        self.teardown_network(&runtime);
        let _ = std::fs::remove_dir_all(self.config.layout.pod_dir(&runtime.uid));
        info!(pod = %runtime.key, "pod stopped");
    }

    fn teardown_network(&self, runtime: &PodRuntime) {
        if runtime.node != 0
            && netns::exists(&runtime.netns)
            && let Ok(list) = cni::read_conflist(&self.conflist_path(runtime.node))
            && let Err(err) = cni::del(
                &list,
                &self.invocation(runtime),
                runtime.cni_result.as_ref(),
            )
        {
            warn!(pod = %runtime.key, error = %err, "cni del failed");
        }
        if let Err(err) = netns::delete(&runtime.netns) {
            warn!(pod = %runtime.key, error = %err, "deleting pod netns failed");
        }
    }

    fn endpoint_slices(&self) -> Result<(), Error> {
        let services = self.store.list("", "Service")?;
        let pods = self.store.list("", "Pod")?;
        let existing: Vec<Object> = self
            .store
            .list("discovery.k8s.io", "EndpointSlice")?
            .into_iter()
            .filter(|s| s.0["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY)
            .collect();
        let mut desired_keys = BTreeSet::new();
        for svc_object in &services {
            let Ok(svc) = svc_object.typed::<Service>() else {
                continue;
            };
            let Some(spec) = svc.spec else { continue };
            let selector = spec.selector.clone().unwrap_or_default();
            if selector.is_empty() {
                continue;
            }
            let ns = svc_object.namespace().unwrap_or("default");
            let mut groups: BTreeMap<Vec<(String, u16, String)>, Vec<Value>> = BTreeMap::new();
            for pod in pods.iter().filter(|p| p.namespace() == Some(ns)) {
                if !labels_match(&pod.0["metadata"]["labels"], &selector) {
                    continue;
                }
                let Some(ip) = pod.0["status"]["podIP"].as_str() else {
                    continue;
                };
                if pod.0["status"]["phase"] != "Running" {
                    continue;
                }
                let Ok(typed_pod) = pod.typed::<Pod>() else {
                    continue;
                };
                let ports: Vec<(String, u16, String)> = spec
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| {
                        let target = resolve_target_port(p, &typed_pod)?;
                        Some((
                            p.name.clone().unwrap_or_default(),
                            target,
                            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        ))
                    })
                    .collect();
                let ready = is_ready(&pod.0);
                groups.entry(ports).or_default().push(json!({
                    "addresses": [ip],
                    "conditions": {"ready": ready, "serving": ready, "terminating": false},
                    "nodeName": pod.0["spec"]["nodeName"],
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": pod.name(), "uid": pod.uid()},
                }));
            }
            for (ports, mut endpoints) in groups {
                endpoints
                    .sort_by(|a, b| a["addresses"][0].as_str().cmp(&b["addresses"][0].as_str()));
                let port_key: String = ports.iter().map(|(n, p, _)| format!("{n}:{p},")).collect();
                let name = format!(
                    "{}-{}",
                    svc_object.name(),
                    &template_hash(&json!(port_key))[..5]
                );
                let key = ObjectKey::new("discovery.k8s.io", "EndpointSlice", Some(ns), &name);
                desired_keys.insert(key.clone());
                let ports_json: Vec<Value> = ports
                    .iter()
                    .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
                    .collect();
                let current = existing.iter().find(|s| s.key() == key);
                let unchanged = current.is_some_and(|c| {
                    c.0["endpoints"] == json!(endpoints) && c.0["ports"] == json!(ports_json)
                });
                if unchanged {
                    continue;
                }
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "uid": current.and_then(|c| c.uid()).map(str::to_owned).unwrap_or_else(store::new_uid),
                        "creationTimestamp": store::timestamp(),
                        "labels": {SERVICE_NAME_LABEL: svc_object.name(), MANAGED_BY_LABEL: MANAGED_BY},
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc_object.name(), "uid": svc_object.uid(), "controller": true}],
                    },
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": ports_json,
                });
                let _lock = self.store.lock()?;
                self.store.put(&Object(slice))?;
            }
        }
        for slice in existing {
            if !desired_keys.contains(&slice.key()) {
                self.delete_object(&slice.key())?;
            }
        }
        Ok(())
    }

    fn service_rules(&mut self) -> Result<(), Error> {
        let services = self.store.list("", "Service")?;
        let slices = self.store.list("discovery.k8s.io", "EndpointSlice")?;
        let mut ports = Vec::new();
        for svc in &services {
            let Some(vip) = svc.0["spec"]["clusterIP"]
                .as_str()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let ns = svc.namespace().unwrap_or("default");
            for port in svc.0["spec"]["ports"].as_array().into_iter().flatten() {
                let port_name = port["name"].as_str().unwrap_or_default();
                let protocol = port["protocol"]
                    .as_str()
                    .unwrap_or("TCP")
                    .to_ascii_lowercase();
                let mut endpoints = Vec::new();
                for slice in slices.iter().filter(|s| {
                    s.namespace() == Some(ns)
                        && s.0["metadata"]["labels"][SERVICE_NAME_LABEL] == svc.name()
                }) {
                    let Some(target) = slice.0["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|p| p["name"].as_str().unwrap_or_default() == port_name)
                        .and_then(|p| p["port"].as_u64())
                        .and_then(|p| u16::try_from(p).ok())
                    else {
                        continue;
                    };
                    for endpoint in slice.0["endpoints"].as_array().into_iter().flatten() {
                        if endpoint["conditions"]["ready"] != true {
                            continue;
                        }
                        if let Some(ip) = endpoint["addresses"][0]
                            .as_str()
                            .and_then(|a| a.parse().ok())
                        {
                            endpoints.push(SocketAddrV4::new(ip, target));
                        }
                    }
                }
                endpoints.sort();
                ports.push(proxy::ServicePort {
                    id: format!("{ns}/{}:{port_name}", svc.name()),
                    vip,
                    port: port["port"]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(0),
                    protocol,
                    endpoints,
                });
            }
        }
        if self.applied_rules.as_ref() == Some(&ports) {
            return Ok(());
        }
        let mut ok = true;
        for node in 1..=self.config.nodes {
            if let Err(err) = proxy::apply(&self.config.layout.node_netns(node), &ports) {
                warn!(node, error = %err, "applying service rules failed");
                ok = false;
            }
        }
        if ok {
            self.applied_rules = Some(ports);
        }
        Ok(())
    }
}

fn resolve_target_port(port: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn probe_of(container: &Container) -> Option<Probe> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let probe = container.readiness_probe.as_ref()?;
    let port_of = |port: &IntOrString| match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    };
    if let Some(tcp) = &probe.tcp_socket {
        return port_of(&tcp.port).map(Probe::Tcp);
    }
    if let Some(http) = &probe.http_get {
        return port_of(&http.port).map(|port| Probe::Http {
            port,
            path: http.path.clone().unwrap_or_else(|| "/".into()),
        });
    }
    None
}

/// Probes from the node's namespace, as the kubelet does.
fn run_probe(node_netns: &str, ip: Ipv4Addr, probe: Probe) -> bool {
    netns::within(node_netns, move || {
        use std::io::{Read, Write};
        let timeout = Duration::from_millis(500);
        match probe {
            Probe::Tcp(port) => TcpStream::connect_timeout(&SocketAddr::from((ip, port)), timeout).is_ok(),
            Probe::Http { port, path } => {
                let Ok(mut conn) = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), timeout) else {
                    return false;
                };
                let _ = conn.set_read_timeout(Some(timeout));
                let request = format!("GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\nUser-Agent: weft-runner-probe\r\n\r\n");
                if conn.write_all(request.as_bytes()).is_err() {
                    return false;
                }
                let mut head = [0u8; 12];
                conn.read_exact(&mut head).is_ok()
                    && std::str::from_utf8(&head[9..12])
                        .ok()
                        .and_then(|s| s.parse::<u16>().ok())
                        .is_some_and(|code| (200..400).contains(&code))
            }
        }
    })
    .unwrap_or(false)
}

fn field_value(
    path: &str,
    object: &Object,
    runtime: &PodRuntime,
    layout: &Layout,
) -> Option<String> {
    let meta = &object.0["metadata"];
    let bracketed = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_suffix("']")
            .map(str::to_owned)
    };
    Some(match path {
        "metadata.name" => runtime.key.name.clone(),
        "metadata.namespace" => runtime.key.namespace.clone().unwrap_or_default(),
        "metadata.uid" => runtime.uid.clone(),
        "spec.nodeName" => layout::node_name(runtime.node),
        "spec.serviceAccountName" => object.0["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        "status.podIP" => runtime.ip?.to_string(),
        "status.hostIP" => layout::node_ip(runtime.node).to_string(),
        _ => {
            let _ = layout;
            if let Some(label) = bracketed("metadata.labels['") {
                meta["labels"][label.as_str()]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            } else if let Some(annotation) = bracketed("metadata.annotations['") {
                meta["annotations"][annotation.as_str()]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            } else {
                return None;
            }
        }
    })
}

/// What a container runs: its program (before the `PATH` search), arguments and environment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Process {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// A container's process, as the kubelet builds it: `env_base` (the runner's variables and
/// service links), then the container's `env` in order — a `value` with `$(VAR)` references
/// expanded against what precedes it, a `fieldRef` resolved by `field` — and `command` + `args`
/// expanded against the whole environment.
fn container_process(
    container: &Container,
    env_base: &[(String, String)],
    field: impl Fn(&str) -> Option<String>,
) -> Result<Process, String> {
    let command = container.command.clone().unwrap_or_default();
    let (program, first_args) = command
        .split_first()
        .ok_or_else(|| format!("container {}: command is required", container.name))?;
    let mut env: Vec<(String, String)> = env_base.to_vec();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            // `$(VAR)` references earlier entries and the base environment.
            (Some(value), _) => expand(value, |name| lookup(&env, name)),
            (None, Some(from)) => match &from.field_ref {
                Some(f) => field(&f.field_path).ok_or_else(|| {
                    format!("env {}: unsupported fieldRef {}", var.name, f.field_path)
                })?,
                None => {
                    return Err(format!(
                        "env {}: only value and fieldRef are supported",
                        var.name
                    ));
                }
            },
            (None, None) => String::new(),
        };
        env.push((var.name.clone(), value));
    }
    let program = expand(program, |name| lookup(&env, name));
    let args: Vec<String> = first_args
        .iter()
        .chain(container.args.iter().flatten())
        .map(|arg| expand(arg, |name| lookup(&env, name)))
        .collect();
    Ok(Process { program, args, env })
}

fn pod_status(runtime: &PodRuntime) -> Value {
    let condition =
        |kind: &str, ok: bool| json!({"type": kind, "status": if ok { "True" } else { "False" }});
    if let Some(retry) = &runtime.sandbox {
        // As the kubelet reports it: Pending, containers waiting in ContainerCreating, the CNI
        // error in the message (Kubernetes puts it in a FailedCreatePodSandBox event).
        return json!({
            "phase": "Pending",
            "reason": "FailedCreatePodSandBox",
            "message": format!("Failed to create pod sandbox (attempt {}): {}", retry.attempts, retry.error),
            "hostIP": layout::node_ip(runtime.node).to_string(),
            "startTime": runtime.start_time,
            "conditions": [condition("PodScheduled", runtime.node != 0), condition("Ready", false)],
        });
    }
    if let Some(message) = &runtime.failure {
        return json!({
            "phase": "Failed",
            "reason": "StartError",
            "message": message,
            "conditions": [condition("PodScheduled", runtime.node != 0), condition("Ready", false)],
        });
    }
    let running = runtime
        .containers
        .iter()
        .filter(|c| c.exit.is_none())
        .count();
    let all_ready = !runtime.containers.is_empty()
        && runtime
            .containers
            .iter()
            .all(|c| c.exit.is_none() && c.ready);
    let phase = if running > 0 {
        "Running"
    } else if runtime
        .containers
        .iter()
        .all(|c| c.exit.is_some_and(|s| s.success()))
    {
        "Succeeded"
    } else {
        "Failed"
    };
    let statuses: Vec<Value> = runtime
        .containers
        .iter()
        .map(|c| {
            let state = match (c.exit, &c.finished_at) {
                (Some(status), finished) => json!({"terminated": {
                    "exitCode": status.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)),
                    "reason": if status.success() { "Completed" } else { "Error" },
                    "startedAt": c.started_at,
                    "finishedAt": finished,
                }}),
                (None, _) => json!({"running": {"startedAt": c.started_at}}),
            };
            json!({"name": c.name, "ready": c.ready && c.exit.is_none(), "started": c.exit.is_none(), "restartCount": 0, "image": "", "imageID": "", "state": state})
        })
        .collect();
    let ip = runtime.ip.map(|ip| ip.to_string());
    json!({
        "phase": phase,
        "hostIP": layout::node_ip(runtime.node).to_string(),
        "hostIPs": [{"ip": layout::node_ip(runtime.node).to_string()}],
        "podIP": ip,
        "podIPs": ip.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
        "startTime": runtime.start_time,
        "conditions": [
            condition("PodScheduled", true),
            condition("Initialized", true),
            condition("ContainersReady", all_ready),
            condition("Ready", all_ready),
        ],
        "containerStatuses": statuses,
    })
}

/// Removes the pod's token registration, so the controller no longer accepts its token.
fn revoke_token(runtime: &mut PodRuntime) {
    if let Some(path) = runtime.token_registration.take()
        && let Err(err) = std::fs::remove_file(&path)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        warn!(pod = %runtime.key, path = %path.display(), error = %err, "removing token registration failed");
    }
}

fn kill_group(container: &mut ContainerRuntime) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let Some(child) = container.child.as_mut() {
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = child.wait();
    }
}

/// SIGTERM the container's process group, SIGKILL after 3 s.
fn terminate(container: &mut ContainerRuntime) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let Some(child) = container.child.as_mut() else {
        return;
    };
    if container.exit.is_none() {
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
        let _ = killpg(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(pid, Signal::SIGKILL);
    }
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_hash_is_stable_and_changes_with_the_template() {
        let a = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": []}});
        let b = json!({"metadata": {"labels": {"app": "y"}}, "spec": {"containers": []}});
        assert_eq!(template_hash(&a), template_hash(&a));
        assert_ne!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
    }

    /// The waypoint pod as the controller renders it (istio-ambient.md §2.6, with the env the
    /// local cluster's controller is launched with).
    fn waypoint_pod() -> Object {
        Object(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "waypoint-5d8f7c9b4-x2x7k",
                "namespace": "app",
                "uid": "0b7a2c4e-1111-4222-8333-944445555666",
                "labels": {
                    "istio.io/dataplane-mode": "none",
                    "gateway.networking.k8s.io/gateway-name": "waypoint",
                },
            },
            "spec": {
                "serviceAccountName": "waypoint",
                "containers": [{
                    "name": "waypoint",
                    "image": "weft/waypoint",
                    "command": ["waypoint"],
                    "ports": [{"name": "status-port", "containerPort": 15021}],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                        {"name": "WAYPOINT_NAME", "value": "waypoint"},
                        {"name": "TRUST_DOMAIN", "value": "cluster.local"},
                        {"name": "XDS_ADDRESS", "value": "https://10.240.0.2:15012"},
                        {"name": "XDS_ROOT_CA", "value": "/state/controller/ca/root-cert.pem"},
                        {"name": "ALT_XDS_HOSTNAME", "value": "weft-controller.istio-system.svc"},
                        {"name": "AUTH_TOKEN", "value": "$(WEFT_SERVICE_ACCOUNT_TOKEN_FILE)"},
                        {"name": "DOMAIN", "value": "$(POD_NAMESPACE).svc.cluster.local"},
                    ],
                    "args": ["--id", "$(POD_NAME).$(POD_NAMESPACE)", "$$(POD_NAME)"],
                    "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}},
                }],
            },
        }))
    }

    #[test]
    fn the_waypoint_pod_gets_its_environment_token_and_probe() {
        let object = waypoint_pod();
        let layout = Layout::new("t", Some(Path::new("/state"))).unwrap();
        let runtime = PodRuntime {
            key: object.key(),
            uid: object.uid().unwrap().to_owned(),
            node: 2,
            netns: layout.pod_netns(object.uid().unwrap()),
            ip: Some(Ipv4Addr::new(10, 244, 2, 7)),
            cni_result: None,
            containers: Vec::new(),
            start_time: String::new(),
            failure: None,
            sandbox: None,
            last_status: Value::Null,
            token_registration: None,
        };
        let pod: Pod = object.typed().unwrap();
        let container = &pod.spec.as_ref().unwrap().containers[0];
        let base = vec![
            ("PATH".to_owned(), "/bin".to_owned()),
            (
                token::TOKEN_FILE_ENV.to_owned(),
                "/state/pods/0b7a/token".to_owned(),
            ),
        ];
        let process = container_process(container, &base, |path| {
            field_value(path, &object, &runtime, &layout)
        })
        .unwrap();
        assert_eq!(process.program, "waypoint");
        assert_eq!(
            process.args,
            ["--id", "waypoint-5d8f7c9b4-x2x7k.app", "$(POD_NAME)"]
        );
        let env: BTreeMap<&str, &str> = process
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(env["POD_NAME"], "waypoint-5d8f7c9b4-x2x7k");
        assert_eq!(env["POD_NAMESPACE"], "app");
        assert_eq!(env["INSTANCE_IP"], "10.244.2.7");
        assert_eq!(env["SERVICE_ACCOUNT"], "waypoint");
        assert_eq!(env["AUTH_TOKEN"], "/state/pods/0b7a/token");
        assert_eq!(env["DOMAIN"], "app.svc.cluster.local");
        assert_eq!(env["XDS_ADDRESS"], "https://10.240.0.2:15012");
        assert!(matches!(
            probe_of(container),
            Some(Probe::Http { port: 15021, ref path }) if path == "/healthz/ready"
        ));
        // An unsupported downward-API field is named.
        let mut bad = container.clone();
        bad.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "X".into(),
            value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                    field_path: "status.podIPs".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        assert_eq!(
            container_process(&bad, &base, |_| None).unwrap_err(),
            "env X: unsupported fieldRef status.podIPs"
        );
    }

    #[test]
    fn gateway_owned_deployments_run_and_only_orphaned_pods_are_collected() {
        let dir = std::env::temp_dir().join(format!("weft-runner-{}", store::new_uid()));
        let layout = Layout::new("t", Some(&dir)).unwrap();
        let store = Store::new(layout.store_dir());
        store
            .apply(&[Object(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app"}}),
            )])
            .unwrap();
        let template = json!({
            "metadata": {"labels": {"gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"}},
            "spec": waypoint_pod().0["spec"].clone(),
        });
        store
            .apply(&[Object(json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": "waypoint",
                    "namespace": "app",
                    "ownerReferences": [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": "waypoint", "uid": "gone-or-not", "controller": true}],
                },
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
                    "template": template,
                },
            }))])
            .unwrap();
        let runner = Runner {
            config: Config {
                layout,
                nodes: 1,
                plugin_dirs: Vec::new(),
                // Where `weft` is: cargo builds `waypoint` into the same directory.
                program_dirs: vec![dir.join("bin")],
                tick: Duration::from_millis(200),
            },
            store: store.clone(),
            pods: BTreeMap::new(),
            next_node: 1,
            applied_rules: None,
        };
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/waypoint"), b"#!/bin/sh\n").unwrap();
        assert_eq!(
            runner.resolve_program("waypoint"),
            Some(dir.join("bin/waypoint")),
            "the waypoint program is found next to weft"
        );
        runner.deployments().unwrap();
        runner.deployments().unwrap();
        let deployment_key = ObjectKey::new("apps", "Deployment", Some("app"), "waypoint");
        assert!(
            store.get(&deployment_key).unwrap().is_some(),
            "a Deployment owned by a Gateway is never collected"
        );
        let pods = store.list("", "Pod").unwrap();
        assert_eq!(pods.len(), 1);
        assert!(pods[0].name().starts_with("waypoint-"));
        assert_eq!(
            pods[0].0["metadata"]["labels"]["istio.io/dataplane-mode"],
            "none"
        );
        assert_eq!(pods[0].0["spec"]["containers"][0]["command"][0], "waypoint");
        store.delete(&[deployment_key]).unwrap();
        runner.deployments().unwrap();
        assert!(
            store.list("", "Pod").unwrap().is_empty(),
            "pods of a deleted Deployment are collected"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn selectors_match_labels() {
        let labels = json!({"app": "echo", "version": "v1"});
        let mut selector = BTreeMap::new();
        assert!(
            !labels_match(&labels, &selector),
            "an empty selector selects nothing"
        );
        selector.insert("app".to_owned(), "echo".to_owned());
        assert!(labels_match(&labels, &selector));
        selector.insert("version".to_owned(), "v2".to_owned());
        assert!(!labels_match(&labels, &selector));
    }
}
