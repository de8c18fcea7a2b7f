//! A pod's life on a node, shared by the local cluster's runner (its YAML store) and the netns
//! kubelet (the real API): the sandbox (a network namespace set up by the node's CNI chain), the
//! containers (host programs run in it, with their environment, hostname and logs), readiness
//! probes from the node's namespace, the `PodStatus` the kubelet reports, and graceful stop.
//!
//! What differs between the two — where services and tokens come from — is the [`Host`].

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::expansion::{expand, lookup};
use super::layout::{self, Layout};
use super::manifest::{Object, ObjectKey};
use super::store;
use super::token;
use super::volume::{self, Volumes};
use super::{cni, netns};

/// What a node's pods get from the cluster they run in.
pub trait Host {
    /// The cluster's layout (namespaces, directories).
    fn layout(&self) -> &Layout;
    /// Directories searched for CNI plugins.
    fn plugin_dirs(&self) -> &[PathBuf];
    /// Directories searched for container programs before `PATH`.
    fn program_dirs(&self) -> &[PathBuf];
    /// The Services of `namespace` (as JSON objects), for the service-link variables.
    ///
    /// # Errors
    /// A message when they cannot be listed.
    fn services(&self, namespace: &str) -> Result<Vec<Value>, String>;
    /// Issues the pod's service-account token into `token_file`; returns a file to remove when
    /// the pod stops (the token's registration), if any.
    ///
    /// # Errors
    /// A message when no token could be issued (the pod then fails to start).
    fn issue_token(
        &self,
        runtime: &PodRuntime,
        service_account: Option<&str>,
        token_file: &Path,
    ) -> Result<Option<PathBuf>, String>;
    /// Whether exited containers are started again as `restartPolicy` says (the kubelet's
    /// behaviour); default no (the runner leaves them exited).
    fn restarts_containers(&self) -> bool {
        false
    }
    /// Whether `hostNetwork: true` pods may run (in the node's namespace); default no.
    fn host_network_allowed(&self) -> bool {
        false
    }
    /// Where the pod's volumes come from; `None` (the default) when the host mounts no
    /// volumes (the runner: its pods see the host's files as they are).
    fn volume_sources<'a>(
        &'a self,
        runtime: &'a PodRuntime,
        object: &'a Object,
    ) -> Option<Box<dyn volume::Sources + 'a>> {
        let _ = (runtime, object);
        None
    }
    /// The cluster DNS server pods with `dnsPolicy: ClusterFirst` get in their
    /// `/etc/resolv.conf`; `None` (the default) leaves the host's.
    fn cluster_dns(&self) -> Option<Ipv4Addr> {
        None
    }
    /// The CNI configuration list of node `node`.
    fn conflist_path(&self, node: u8) -> PathBuf {
        self.layout()
            .node_dir(node)
            .join("cni")
            .join("10-weft.conflist")
    }
    /// Paths of node `node`'s own file system the CNI plugins must see at their node paths.
    fn cni_binds(&self, node: u8) -> Vec<netns::Bind> {
        let _ = node;
        Vec::new()
    }
}

/// The pod's hostname: the node's for `hostNetwork` pods (as Kubernetes), else its own.
fn hostname(object: &Object, runtime: &PodRuntime) -> String {
    if runtime.host_network {
        layout::node_name(runtime.node)
    } else {
        super::pod_hostname(object)
    }
}

/// A container's process and what the kubelet knows of it.
pub struct ContainerRuntime {
    /// The container's name.
    pub name: String,
    /// Its process (the leader of its own process group).
    pub child: Option<Child>,
    /// How it exited, once it did.
    pub exit: Option<ExitStatus>,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 exit time.
    pub finished_at: Option<String>,
    /// Its readiness probe.
    pub probe: Option<Probe>,
    /// The last probe's verdict (true without a probe).
    pub ready: bool,
    /// When it was last probed.
    pub last_probe: Option<Instant>,
    /// Times it was started again after exiting.
    pub restart_count: u32,
    /// When it is to be started again (it exited and the restart policy says so).
    pub restart_at: Option<Instant>,
    /// Its spec, to start it again.
    pub spec: Container,
}

/// Delay before restart `restarts + 1` of a container: 1 s doubling to 30 s (the kubelet's
/// CrashLoopBackOff starts at 10 s and caps at 5 min; shorter here, for a local cluster).
pub fn restart_backoff(restarts: u32) -> Duration {
    Duration::from_secs((1u64 << restarts.min(5)).min(30))
}

/// A readiness probe the local cluster runs.
#[derive(Debug, Clone)]
pub enum Probe {
    /// `tcpSocket`: the port accepts a connection.
    Tcp(u16),
    /// `httpGet`: `GET path` answers 200–399.
    Http {
        /// The port.
        port: u16,
        /// The path.
        path: String,
    },
}

/// A pod on a node.
pub struct PodRuntime {
    /// The pod.
    pub key: ObjectKey,
    /// Its UID (also its sandbox's container ID).
    pub uid: String,
    /// Its node's number (0 before it is placed).
    pub node: u8,
    /// Its network namespace.
    pub netns: String,
    /// Its IP, from the CNI result.
    pub ip: Option<Ipv4Addr>,
    /// The CNI `ADD` result (given to `DEL`).
    pub cni_result: Option<Value>,
    /// Its containers.
    pub containers: Vec<ContainerRuntime>,
    /// RFC 3339 start time.
    pub start_time: String,
    /// Why it failed to start.
    pub failure: Option<String>,
    /// The pod's network could not be set up (CNI `ADD` failed): like the kubelet, the node
    /// keeps the pod `Pending` and retries sandbox creation at `retry_at`.
    pub sandbox: Option<SandboxRetry>,
    /// The status last reported.
    pub last_status: Value,
    /// The pod's service-account token registration (removed when the pod stops).
    pub token_registration: Option<PathBuf>,
    /// `spec.restartPolicy` (`Always` when unset).
    pub restart_policy: String,
    /// The environment every container starts with (before its own `env`).
    pub env_base: Vec<(String, String)>,
    /// The pod as it was started (for restarts).
    pub object: Option<Object>,
    /// `hostNetwork: true`: the pod runs in its node's namespace ([`PodRuntime::netns`] is the
    /// node's) with the node's IP, and its network is never set up or torn down.
    pub host_network: bool,
    /// Its volumes on the host, when the host mounts volumes ([`Host::volume_sources`]).
    pub volumes: Option<Volumes>,
}

/// A sandbox to create again.
pub struct SandboxRetry {
    /// The last error.
    pub error: String,
    /// Attempts so far.
    pub attempts: u32,
    /// When to try again.
    pub retry_at: Instant,
    /// Whether the network failed (else the containers did not start).
    pub sandbox: bool,
}

/// Delay before sandbox attempt `attempts + 1`: 0.5 s doubling to 4 s.
pub fn sandbox_backoff(attempts: u32) -> Duration {
    Duration::from_millis(500u64 << attempts.saturating_sub(1).min(3))
}

/// Starts a pod on `node` (or fails it with `node`'s error): sets up its sandbox and starts its
/// containers. A sandbox failure leaves it `Pending` to be retried ([`PodRuntime::sandbox`]);
/// any other failure fails it. The caller reports the status.
pub fn start(host: &dyn Host, object: &Object, uid: &str, node: Result<u8, String>) -> PodRuntime {
    let key = object.key();
    let netns_name = host.layout().pod_netns(uid);
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
        restart_policy: "Always".into(),
        env_base: Vec::new(),
        object: Some(object.clone()),
        host_network: false,
        volumes: None,
    };
    // Network set-up failures are retried (the pod stays Pending); the rest fail the pod.
    let mut sandbox_error = None;
    let result = (|| -> Result<(), String> {
        let pod: Pod = object.typed().map_err(|(f, m)| format!("{f}: {m}"))?;
        let spec = pod.spec.ok_or("pod has no spec")?;
        runtime.node = node?;
        let pod_dir = host.layout().pod_dir(uid);
        std::fs::create_dir_all(&pod_dir)
            .map_err(|e| format!("creating {}: {e}", pod_dir.display()))?;
        let network = (|| -> Result<Value, String> {
            if spec.host_network == Some(true) {
                if !host.host_network_allowed() {
                    return Err("hostNetwork pods are not supported by the file-store runner (use `weft cluster up --kubernetes`)".into());
                }
                runtime.host_network = true;
                runtime.netns = host.layout().node_netns(runtime.node);
                runtime.ip = Some(layout::node_ip(runtime.node));
                return Ok(Value::Null);
            }
            netns::add(&netns_name).map_err(|e| e.to_string())?;
            let list =
                cni::read_conflist(&host.conflist_path(runtime.node)).map_err(|e| e.to_string())?;
            let result = cni::add(&list, &invocation(host, &runtime)).map_err(|e| e.to_string())?;
            runtime.ip = Some(cni::pod_ip(&result).map_err(|e| e.to_string())?);
            Ok(result)
        })();
        let result = network.inspect_err(|message| sandbox_error = Some(message.clone()))?;
        if !runtime.host_network {
            let _ = std::fs::write(pod_dir.join("cni-result.json"), result.to_string());
            runtime.cni_result = Some(result);
            let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
            if let Some(dns) = host
                .cluster_dns()
                .filter(|_| policy.starts_with("ClusterFirst"))
            {
                let dir = etc_netns_dir(&runtime.netns);
                let namespace = runtime.key.namespace.as_deref().unwrap_or("default");
                std::fs::create_dir_all(&dir)
                    .and_then(|()| {
                        std::fs::write(dir.join("resolv.conf"), volume::resolv_conf(dns, namespace))
                    })
                    .map_err(|e| format!("writing {}/resolv.conf: {e}", dir.display()))?;
            }
        }
        let volumes = match host.volume_sources(&runtime, object) {
            Some(sources) => Some(volume::prepare(&pod_typed(object)?, &pod_dir, &*sources)?),
            None => None,
        };
        runtime.volumes = volumes;
        let token_file = pod_dir.join(token::TOKEN_FILE_NAME);
        runtime.token_registration =
            host.issue_token(&runtime, spec.service_account_name.as_deref(), &token_file)?;
        runtime.restart_policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        let env_base = base_env(host, object, &runtime, &token_file)?;
        runtime.env_base = env_base.clone();
        for container in &spec.containers {
            let child = spawn(host, container, &runtime, &env_base, object, &pod_dir)?;
            runtime.containers.push(ContainerRuntime {
                name: container.name.clone(),
                child: Some(child),
                exit: None,
                started_at: store::timestamp(),
                finished_at: None,
                probe: probe_of(container),
                ready: false,
                last_probe: None,
                restart_count: 0,
                restart_at: None,
                spec: container.clone(),
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
                    sandbox: true,
                });
            } else {
                warn!(pod = %key, error = %message, "pod failed to start");
                runtime.failure = Some(message);
            }
            for container in &mut runtime.containers {
                kill_group(container);
            }
            revoke_token(&mut runtime);
            teardown_network(host, &runtime);
        }
    }
    runtime
}

/// `/etc/netns/<netns>/`: `ip netns exec` puts its files over `/etc`'s.
fn etc_netns_dir(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

fn pod_typed(object: &Object) -> Result<Pod, String> {
    object.typed().map_err(|(f, m)| format!("{f}: {m}"))
}

fn invocation(host: &dyn Host, runtime: &PodRuntime) -> cni::Invocation {
    cni::Invocation {
        node_netns: host.layout().node_netns(runtime.node),
        pod_netns_path: Path::new(netns::NETNS_DIR).join(&runtime.netns),
        container_id: runtime.uid.clone(),
        pod_namespace: runtime.key.namespace.clone().unwrap_or_default(),
        pod_name: runtime.key.name.clone(),
        pod_uid: runtime.uid.clone(),
        plugin_dirs: host.plugin_dirs().to_vec(),
        binds: host.cni_binds(runtime.node),
    }
}

/// Issues the pod's service-account token: writes it to `token_file` (mode 0600) and
/// registers it for the controller; returns the registration file.
fn base_env(
    host: &dyn Host,
    object: &Object,
    runtime: &PodRuntime,
    token_file: &Path,
) -> Result<Vec<(String, String)>, String> {
    let mut path: Vec<PathBuf> = host.program_dirs().to_vec();
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
        ("HOSTNAME".to_owned(), hostname(object, runtime)),
        ("HOME".to_owned(), "/root".to_owned()),
    ];
    // The token the host issued, if it issued one (the runner; the kubelet's come from volumes).
    if token_file.is_file() {
        env.push((
            token::TOKEN_FILE_ENV.to_owned(),
            token_file.display().to_string(),
        ));
    }
    // The API server's Service (`kubernetes` in `default`), which every pod gets whatever its
    // `enableServiceLinks`: in-cluster clients find the API through it.
    if let Some(api) = host
        .services("default")?
        .into_iter()
        .find(|s| s["metadata"]["name"] == "kubernetes")
        && let Some(ip) = api["spec"]["clusterIP"].as_str()
    {
        let port = api["spec"]["ports"][0]["port"].as_u64().unwrap_or(443);
        env.push(("KUBERNETES_SERVICE_HOST".into(), ip.to_owned()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), port.to_string()));
        env.push(("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()));
        env.push(("KUBERNETES_PORT".into(), format!("tcp://{ip}:{port}")));
    }
    // Kubernetes-style service links for services in the pod's namespace.
    if object.0["spec"]["enableServiceLinks"] != false {
        let ns = runtime.key.namespace.as_deref().unwrap_or("default");
        for svc in host.services(ns)? {
            let Some(ip) = svc["spec"]["clusterIP"]
                .as_str()
                .filter(|ip| *ip != "None" && !ip.is_empty())
            else {
                continue;
            };
            let prefix = svc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_uppercase()
                .replace('-', "_");
            let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
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
    host: &dyn Host,
    container: &Container,
    runtime: &PodRuntime,
    env_base: &[(String, String)],
    object: &Object,
    pod_dir: &Path,
) -> Result<Child, String> {
    let Process { program, args, env } = container_process(container, env_base, |path| {
        field_value(path, object, runtime, host.layout())
    })?;
    let program = resolve_program(host, &program).ok_or_else(|| {
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
    let binds = match &runtime.volumes {
        Some(volumes) => volume::binds(container, volumes)?,
        None => Vec::new(),
    };
    // This machine is every node: a mount over the cluster's own state (where the pods' files
    // and logs are) would hide it from the container.
    let state = host.layout().state_dir();
    if let Some(bind) = binds.iter().find(|b| state.starts_with(&b.target)) {
        return Err(format!(
            "container {}: mountPath {} would hide the local cluster's state directory {} (use another path)",
            container.name,
            bind.target.display(),
            state.display()
        ));
    }
    let mut cmd =
        netns::pod_command_in(&runtime.netns, &hostname(object, runtime), &program, &binds)
            .map_err(|e| format!("container {}: preparing its mounts: {e}", container.name))?;
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

pub(super) fn resolve_program(host: &dyn Host, program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return path.is_file().then_some(path);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    host.program_dirs()
        .iter()
        .cloned()
        .chain(std::env::split_paths(&path_var))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn teardown_network(host: &dyn Host, runtime: &PodRuntime) {
    if runtime.host_network {
        return;
    }
    if runtime.node != 0
        && netns::exists(&runtime.netns)
        && let Ok(list) = cni::read_conflist(&host.conflist_path(runtime.node))
        && let Err(err) = cni::del(
            &list,
            &invocation(host, runtime),
            runtime.cni_result.as_ref(),
        )
    {
        warn!(pod = %runtime.key, error = %err, "cni del failed");
    }
    if let Err(err) = netns::delete(&runtime.netns) {
        warn!(pod = %runtime.key, error = %err, "deleting pod netns failed");
    }
    let _ = std::fs::remove_dir_all(etc_netns_dir(&runtime.netns));
}

/// Polls one pod: notes containers that exited (and starts them again after
/// [`restart_backoff`] when the host restarts containers and `restartPolicy` says so), runs due
/// readiness probes (every 500 ms, from the node's namespace) and revokes the token of a pod
/// whose containers all stopped.
pub fn poll(host: &dyn Host, runtime: &mut PodRuntime) {
    if runtime.failure.is_some() {
        return;
    }
    let node_netns = host.layout().node_netns(runtime.node);
    let mut containers = std::mem::take(&mut runtime.containers);
    for container in &mut containers {
        if container.exit.is_none()
            && let Some(child) = container.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            info!(pod = %runtime.key, container = %container.name, %status, "container exited");
            container.exit = Some(status);
            container.finished_at = Some(store::timestamp());
            container.ready = false;
        }
        if let Some(status) = container.exit {
            let restart = host.restarts_containers()
                && match runtime.restart_policy.as_str() {
                    "Never" => false,
                    "OnFailure" => !status.success(),
                    _ => true,
                };
            if restart {
                match container.restart_at {
                    None => {
                        container.restart_at =
                            Some(Instant::now() + restart_backoff(container.restart_count));
                    }
                    Some(at) if at <= Instant::now() => {
                        let pod_dir = host.layout().pod_dir(&runtime.uid);
                        let object = runtime.object.clone().unwrap_or(Object(Value::Null));
                        let spec = container.spec.clone();
                        match spawn(host, &spec, runtime, &runtime.env_base, &object, &pod_dir) {
                            Ok(child) => {
                                info!(pod = %runtime.key, container = %container.name, restarts = container.restart_count + 1, "container restarted");
                                container.child = Some(child);
                                container.exit = None;
                                container.started_at = store::timestamp();
                                container.finished_at = None;
                                container.restart_count += 1;
                                container.last_probe = None;
                            }
                            Err(err) => {
                                warn!(pod = %runtime.key, container = %container.name, error = %err, "restarting container failed");
                                container.restart_count += 1;
                            }
                        }
                        container.restart_at = None;
                    }
                    Some(_) => {}
                }
            }
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
                    container.ready = run_probe(&node_netns, ip, probe.clone());
                }
            }
            (Some(_), None) => container.ready = false,
        }
    }
    runtime.containers = containers;
    // A pod whose containers all exited has stopped: its token is no longer good.
    if !runtime.containers.is_empty()
        && runtime
            .containers
            .iter()
            .all(|c| c.exit.is_some() && c.restart_at.is_none())
    {
        revoke_token(runtime);
    }
}

/// Stops a pod: SIGTERM to every container's process group, SIGKILL after `grace`, then
/// whatever is left in its namespace; revokes its token and tears down its network.
pub fn stop(host: &dyn Host, mut runtime: PodRuntime, grace: Duration) {
    for container in &mut runtime.containers {
        terminate(container, grace);
    }
    // Anything else left in the pod's namespace (e.g. a process that changed its group); a
    // hostNetwork pod shares its node's, where everything else of the node runs.
    if !runtime.host_network {
        super::network::kill_all(&netns::pids(&runtime.netns));
    }
    revoke_token(&mut runtime);
    teardown_network(host, &runtime);
    let _ = std::fs::remove_dir_all(host.layout().pod_dir(&runtime.uid));
    info!(pod = %runtime.key, "pod stopped");
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

pub(super) fn field_value(
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

/// The `PodStatus` the kubelet reports for `runtime`.
pub fn pod_status(runtime: &PodRuntime) -> Value {
    let condition =
        |kind: &str, ok: bool| json!({"type": kind, "status": if ok { "True" } else { "False" }});
    if let Some(retry) = &runtime.sandbox {
        // As the kubelet reports it: Pending, containers waiting in ContainerCreating, the CNI
        // error in the message (Kubernetes puts it in a FailedCreatePodSandBox event).
        let (reason, what) = if retry.sandbox {
            ("FailedCreatePodSandBox", "create pod sandbox")
        } else {
            ("CreateContainerError", "start containers")
        };
        return json!({
            "phase": "Pending",
            "reason": reason,
            "message": format!("Failed to {what} (attempt {}): {}", retry.attempts, retry.error),
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
    // A container waiting to be restarted keeps its pod Running (as in CrashLoopBackOff).
    let running = runtime
        .containers
        .iter()
        .filter(|c| c.exit.is_none() || c.restart_at.is_some())
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
            let state = if c.restart_at.is_some() {
                json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting the exited container (restart {})", c.restart_count + 1)}})
            } else {
                state
            };
            json!({"name": c.name, "ready": c.ready && c.exit.is_none(), "started": c.exit.is_none(), "restartCount": c.restart_count, "image": "", "imageID": "", "state": state})
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

/// SIGTERM the container's process group, SIGKILL after `grace`.
fn terminate(container: &mut ContainerRuntime, grace: Duration) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let Some(child) = container.child.as_mut() else {
        return;
    };
    if container.exit.is_none() {
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
        let _ = killpg(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
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
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The waypoint pod as the controller renders it (istio-ambient.md §2.6, with the env the
    /// local cluster's controller is launched with).
    pub(in crate::cluster) fn waypoint_pod() -> Object {
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
            restart_policy: "Always".into(),
            env_base: Vec::new(),
            object: None,
            host_network: false,
            volumes: None,
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
}
