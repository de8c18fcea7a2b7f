//! The local cluster: a sealed, one-machine Kubernetes stand-in built from network namespaces,
//! Debian's CNI plugins and ordinary processes (design: `shared/design/local-cluster.md`).
//!
//! [`Cluster`] is the Rust API the CLI, the end-to-end suites and the benchmarks use: bring up N
//! nodes, apply manifests, wait for pods, exec in a pod, read logs, tear down. Pieces:
//! [`layout`] (names and addresses), [`network`] (the sealed namespaces), [`cni`] (the per-node
//! CNI chain), [`store`] (the object store), [`manifest`] (parsing and validation), [`runner`]
//! (kubelet + scheduler + controllers, one daemon per cluster) and [`proxy`] (service VIP rules).

pub mod api;
pub mod cni;
pub mod expansion;
pub mod helm;
pub mod kube;
pub mod kubelet;
pub mod kubelet_api;
pub mod layout;
pub mod netns;
pub mod network;
pub mod objects;
pub mod pod;
pub mod proxy;
pub mod runner;
pub mod token;
pub mod volume;

use std::os::unix::process::CommandExt;

use network::process_alive;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

pub use layout::Layout;
pub use manifest::{Object, ObjectKey};
pub use objects::Objects;
pub use store::{Outcome, Store};
pub use weft_k8s::{manifest, store};

/// The controller executable the control plane runs.
pub const CONTROLLER_PROGRAM: &str = "weft-controller";
/// The waypoint executable the controller names in the waypoint Deployments it renders.
pub const WAYPOINT_PROGRAM: &str = "waypoint";
/// The DNS name the control plane's serving certificate carries (node components and
/// waypoints verify it).
pub const CONTROL_PLANE_SERVER_NAME: &str = "weft-controller.istio-system.svc";
/// Port of the control plane's xDS + CA gRPC service.
pub const CONTROL_PLANE_PORT: u16 = 15012;
/// Port of the control plane's debug HTTP endpoint.
pub const CONTROL_PLANE_DEBUG_PORT: u16 = 15014;
/// The `app` label of the CNI node agent's DaemonSet pods.
pub const CNI_APP: &str = "weft-cni";
/// How long a component restart or scale (on a `--kubernetes` cluster) may take.
pub const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Port of ztunnel's admin endpoint (`/config_dump`), on its loopback.
pub const ZTUNNEL_ADMIN_PORT: u16 = 15000;
/// Port of ztunnel's metrics (`/metrics`, `/stats/prometheus`).
pub const ZTUNNEL_STATS_PORT: u16 = 15020;

/// Errors of cluster operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not running as root.
    #[error(
        "weft cluster needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces"
    )]
    NotRoot,
    /// Bad cluster name.
    #[error(transparent)]
    Name(#[from] layout::InvalidName),
    /// Bad node count.
    #[error("a cluster has 1 to {max} nodes, not {0}", max = layout::MAX_NODES)]
    Nodes(u8),
    /// `up` for a cluster that exists.
    #[error("cluster {0:?} already exists (run `weft cluster down --cluster {0}` first)")]
    AlreadyExists(String),
    /// The cluster is not up.
    #[error("cluster {0:?} not found")]
    NotFound(String),
    /// Building the network failed.
    #[error(transparent)]
    Network(#[from] network::Error),
    /// A command failed.
    #[error(transparent)]
    Command(#[from] netns::Error),
    /// The object store failed or refused an apply.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The cluster's objects (API server or store) could not be read or written.
    #[error(transparent)]
    Objects(#[from] objects::Error),
    /// A manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    /// Writing CNI configuration failed.
    #[error(transparent)]
    Cni(#[from] cni::Error),
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The runner daemon did not start.
    #[error("runner did not start: {0}")]
    Runner(String),
    /// Waiting timed out.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
    },
    /// No such pod.
    #[error("pod {0} not found")]
    PodNotFound(String),
    /// The Kubernetes control plane failed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// Installing Weft with Helm failed.
    #[error(transparent)]
    Helm(#[from] helm::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// How to bring a cluster up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Cluster name (part of every namespace name).
    pub name: String,
    /// Number of nodes; default 2.
    pub nodes: u8,
    /// State directory; default `/var/run/weft/clusters/<name>`.
    pub state_dir: Option<PathBuf>,
    /// The `weft` executable that runs the runner daemon; default: this executable.
    pub weft_exe: Option<PathBuf>,
    /// Directories searched for CNI plugins; default `/usr/lib/cni`.
    pub plugin_dirs: Vec<PathBuf>,
    /// Extra plugin configs chained after `bridge` in every node's config list.
    pub chained_plugins: Vec<serde_json::Value>,
    /// Start the control plane (`weft-controller`, found next to the `weft` executable or on
    /// `PATH`); default true. Without it the cluster is a plain Kubernetes stand-in.
    pub control_plane: bool,
    /// Run the mesh on every node: `weft-cni` chained in the CNI config, `weft-cni-agent` and
    /// `ztunnel` in each node netns; default true (needs `control_plane`).
    pub mesh: bool,
    /// Run the real Kubernetes control plane too (etcd, kube-apiserver, kube-controller-manager,
    /// kube-scheduler from `scripts/build-kube`) in the control-plane netns, with a host-side
    /// kubeconfig (`weft cluster kubeconfig`); default false while the e2e suites move to it.
    pub kubernetes: bool,
}

impl Options {
    /// Defaults for cluster `name`.
    pub fn new(name: &str) -> Self {
        Options {
            name: name.to_owned(),
            nodes: 2,
            state_dir: None,
            weft_exe: None,
            plugin_dirs: vec![PathBuf::from(layout::DEFAULT_CNI_BIN_DIR)],
            chained_plugins: Vec::new(),
            control_plane: true,
            mesh: true,
            kubernetes: false,
        }
    }
}

/// What `up` records in `cluster.json` for later commands and the runner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Description {
    /// Cluster name.
    pub name: String,
    /// Node count.
    pub nodes: u8,
    /// CNI plugin directories.
    pub plugin_dirs: Vec<PathBuf>,
    /// Directories searched for container programs before `PATH`.
    pub program_dirs: Vec<PathBuf>,
    /// Whether the control plane (`weft-controller`) runs in the control-plane namespace.
    #[serde(default)]
    pub control_plane: bool,
    /// Whether every node runs the mesh (CNI agent and ztunnel).
    #[serde(default)]
    pub mesh: bool,
    /// Whether the real Kubernetes control plane runs (see [`kube`]).
    #[serde(default)]
    pub kubernetes: bool,
}

/// A running local cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    layout: Layout,
    description: Description,
    store: Store,
    /// The API server connection of a `--kubernetes` cluster, opened on first use.
    api: std::sync::Arc<std::sync::OnceLock<api::KubeApi>>,
}

/// Whether this process may build clusters.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

// === impl Cluster ===

impl Cluster {
    /// Creates the network, the store and the runner daemon; waits until the runner is up.
    ///
    /// # Errors
    /// [`Error::NotRoot`], [`Error::AlreadyExists`], or whatever failed (everything made so far
    /// is removed again).
    pub fn up(options: &Options) -> Result<Cluster, Error> {
        if !is_root() {
            return Err(Error::NotRoot);
        }
        if !(1..=layout::MAX_NODES).contains(&options.nodes) {
            return Err(Error::Nodes(options.nodes));
        }
        let layout = Layout::new(&options.name, options.state_dir.as_deref())?;
        if layout.cluster_file().exists() || !network::namespaces(&layout).is_empty() {
            return Err(Error::AlreadyExists(options.name.clone()));
        }
        if options.kubernetes {
            // Fail before anything is made when Kubernetes is not installed.
            for name in kube::PROGRAMS
                .iter()
                .chain(&kube::NODE_PROGRAMS)
                .chain(&["kubectl"])
            {
                kube::program(name)?;
            }
        }
        let weft_exe = match &options.weft_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().map_err(io("finding the weft executable"))?,
        };
        if options.kubernetes && options.mesh && options.control_plane {
            // Fail before anything is made when the charts are not there.
            helm::charts_dir()?;
        }
        let mut plugin_dirs = options.plugin_dirs.clone();
        if options.mesh && options.control_plane && !options.kubernetes {
            plugin_dirs.extend(weft_exe.parent().map(Path::to_path_buf));
        }
        let description = Description {
            name: options.name.clone(),
            nodes: options.nodes,
            plugin_dirs,
            program_dirs: weft_exe
                .parent()
                .map(Path::to_path_buf)
                .into_iter()
                .collect(),
            // On Kubernetes the control plane and the mesh are pods Helm installs.
            control_plane: options.control_plane && !options.kubernetes,
            mesh: options.mesh && options.control_plane,
            kubernetes: options.kubernetes,
        };
        std::fs::create_dir_all(layout.state_dir())
            .map_err(io(format!("creating {}", layout.state_dir().display())))?;
        let text = serde_json::to_vec_pretty(&description).unwrap_or_default();
        store::write_atomic(&layout.cluster_file(), &text)?;
        let cluster = Cluster {
            store: Store::new(layout.store_dir()),
            layout,
            description,
            api: Default::default(),
        };
        if let Err(err) = cluster.build(options, &weft_exe) {
            let _ = Cluster::down(&options.name, options.state_dir.as_deref());
            return Err(err);
        }
        Ok(cluster)
    }

    fn build(&self, options: &Options, weft_exe: &Path) -> Result<(), Error> {
        let layout = &self.layout;
        network::create(layout, options.nodes)?;
        for node in 1..=options.nodes {
            let mut chained = options.chained_plugins.clone();
            if self.description.mesh && !options.kubernetes {
                chained.push(json!({
                    "type": "weft-cni",
                    "agent_socket": self.node_run_dir(node).join("cni-agent.sock"),
                    "exclude_namespaces": ["kube-system"],
                    "agent_timeout_ms": 8000,
                }));
            }
            let list = cni::conflist(layout, node, &chained);
            cni::write_conflist(
                &layout.node_dir(node).join("cni").join("10-weft.conflist"),
                &list,
            )?;
            if options.kubernetes {
                // The kubelet reads the node's CNI configuration directory.
                cni::write_conflist(
                    &layout
                        .node_root(node)
                        .join(kubelet::CNI_CONF_DIR)
                        .join("10-weft.conflist"),
                    &list,
                )?;
            }
        }
        let mut objects = vec![Object(json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}
        }))];
        for node in 1..=options.nodes {
            let name = layout::node_name(node);
            objects.push(Object(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
                "spec": {"podCIDR": format!("{}/24", layout::pod_cidr(node)), "podCIDRs": [format!("{}/24", layout::pod_cidr(node))]},
            })));
        }
        self.store.apply(&objects)?;
        for node in 1..=options.nodes {
            let key = ObjectKey::new("", "Node", None, &layout::node_name(node));
            let status = json!({
                "addresses": [
                    {"type": "InternalIP", "address": layout::node_ip(node).to_string()},
                    {"type": "Hostname", "address": layout::node_name(node)},
                ],
                "conditions": [{"type": "Ready", "status": "True"}],
            });
            self.store.update_status(&key, status)?;
        }

        if options.kubernetes {
            self.start_kubernetes(weft_exe)?;
            for node in 1..=options.nodes {
                self.start_kubelet(weft_exe, node)?;
                self.start_kube_proxy(node)?;
            }
            kube::apply_addons(layout)?;
        }
        if self.description.control_plane {
            self.start_control_plane()?;
        }
        if self.description.mesh && options.kubernetes {
            helm::install_weft(layout, &helm::charts_dir()?)?;
        } else if self.description.mesh {
            for node in 1..=options.nodes {
                self.start_node_components(node)?;
            }
        }

        let log = std::fs::File::create(layout.runner_log()).map_err(io("creating runner log"))?;
        let log_err = log.try_clone().map_err(io("creating runner log"))?;
        let child = Command::new(weft_exe)
            .args([
                "cluster",
                "runner",
                "--cluster",
                layout.name(),
                "--state-dir",
            ])
            .arg(layout.state_dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(io(format!(
                "starting {} cluster runner",
                weft_exe.display()
            )))?;
        std::fs::write(layout.runner_pid_file(), child.id().to_string())
            .map_err(io("writing runner pid"))?;
        let ready = layout.state_dir().join("runner.ready");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if Instant::now() > deadline || !process_alive(child.id() as i32) {
                let log = std::fs::read_to_string(layout.runner_log()).unwrap_or_default();
                return Err(Error::Runner(log_tail(&log)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts the real Kubernetes control plane and the host-side apiserver forwarder, and
    /// waits until `kubectl` works through it.
    fn start_kubernetes(&self, weft_exe: &Path) -> Result<(), Error> {
        let layout = &self.layout;
        let paths = kube::Paths::new(layout);
        kube::create_pki(&paths, self.description.nodes)?;
        kube::start(layout)?;
        let log = std::fs::File::create(paths.log("apiserver-proxy"))
            .map_err(io("creating the apiserver proxy log"))?;
        let log_err = log
            .try_clone()
            .map_err(io("creating the apiserver proxy log"))?;
        let child = Command::new(weft_exe)
            .args([
                "cluster",
                "apiserver-proxy",
                "--cluster",
                layout.name(),
                "--state-dir",
            ])
            .arg(layout.state_dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(io(format!(
                "starting {} cluster apiserver-proxy",
                weft_exe.display()
            )))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !paths.proxy_port_file().exists() {
            if Instant::now() > deadline || !process_alive(child.id() as i32) {
                let log = std::fs::read_to_string(paths.log("apiserver-proxy")).unwrap_or_default();
                return Err(Error::Runner(format!(
                    "the apiserver proxy did not start: {}",
                    log_tail(&log)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts node `node`'s netns kubelet ([`kubelet`]) in the node's namespace and waits until
    /// it has registered its Node and serves.
    fn start_kubelet(&self, weft_exe: &Path, node: u8) -> Result<(), Error> {
        let layout = &self.layout;
        let ready = layout.node_dir(node).join(kubelet::READY_FILE);
        let _ = std::fs::remove_file(&ready);
        let log = layout.node_dir(node).join("kubelet.log");
        std::fs::create_dir_all(layout.node_dir(node))
            .map_err(io(format!("creating {}", layout.node_dir(node).display())))?;
        let file =
            std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let file_err = file.try_clone().map_err(io("creating the kubelet log"))?;
        // In the node's network namespace but the host's mounts: the pod namespaces it makes
        // must be visible to the node agent, ztunnel and `weft cluster exec`.
        let mut cmd = netns::command_setns(&layout.node_netns(node), weft_exe)
            .map_err(io(format!("opening {}", layout.node_netns(node))))?;
        cmd.args([
            "cluster",
            "kubelet",
            "--cluster",
            layout.name(),
            "--state-dir",
        ])
        .arg(layout.state_dir())
        .args(["--node", &node.to_string()])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(file_err)
        .process_group(0);
        let pid = cmd
            .spawn()
            .map_err(io(format!(
                "starting {} cluster kubelet",
                weft_exe.display()
            )))?
            .id();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if Instant::now() > deadline || !process_alive(pid as i32) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(Error::Runner(format!(
                    "the kubelet of {} did not start: {}",
                    layout::node_name(node),
                    log_tail(&text)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts the real kube-proxy (iptables mode) in node `node`'s namespace: it programs the
    /// Service VIPs there from the API's Services and EndpointSlices.
    fn start_kube_proxy(&self, node: u8) -> Result<(), Error> {
        let layout = &self.layout;
        let program = kube::program("kube-proxy")?;
        let args = kube::kube_proxy_args(&kube::Paths::new(layout), node);
        let log = layout.node_dir(node).join("kube-proxy.log");
        let pid = self.spawn_in(&layout.node_netns(node), &program, &args, &log)?;
        std::thread::sleep(Duration::from_millis(200));
        if !process_alive(pid as i32) {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(Error::Runner(format!(
                "kube-proxy on {} exited: {}",
                layout::node_name(node),
                log_tail(&text)
            )));
        }
        Ok(())
    }

    /// The host-side admin kubeconfig of a cluster started with [`Options::kubernetes`].
    ///
    /// # Errors
    /// [`Error::Runner`] when the cluster runs no Kubernetes control plane.
    pub fn kubeconfig_path(&self) -> Result<PathBuf, Error> {
        let path = kube::Paths::new(&self.layout).kubeconfig("admin");
        if self.description.kubernetes && path.is_file() {
            Ok(path)
        } else {
            Err(Error::Runner(format!(
                "cluster {:?} runs no Kubernetes control plane (start it with `weft cluster up --kubernetes`)",
                self.layout.name()
            )))
        }
    }

    /// Stops the control plane (SIGTERM, SIGKILL after 10 s): a controller outage. Node
    /// components keep running on the configuration and certificates they hold.
    ///
    /// # Errors
    /// [`Error::Runner`] if no controller was started (no pid recorded).
    pub fn stop_control_plane(&self) -> Result<(), Error> {
        if self.description.kubernetes {
            return self.scale_controller(0);
        }
        let path = self.layout.state_dir().join("controller.pid");
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .ok_or_else(|| Error::Runner(format!("no controller pid in {}", path.display())))?;
        stop_process(pid);
        Ok(())
    }

    /// Starts the control plane (`weft-controller` in the control-plane namespace) and waits
    /// until it listens; after [`Cluster::stop_control_plane`] it comes back with the same CA
    /// root and node tokens (kept in its state directory).
    ///
    /// # Errors
    /// [`Error::Runner`] if the program is missing or does not start listening within 20 s.
    pub fn start_control_plane(&self) -> Result<(), Error> {
        if self.description.kubernetes {
            return self.scale_controller(1);
        }
        let layout = &self.layout;
        let program = self
            .description
            .program_dirs
            .iter()
            .map(|d| d.join(CONTROLLER_PROGRAM))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::Runner(format!(
                "{CONTROLLER_PROGRAM} not found in {:?} (build it with `cargo build -p weft-controller`)",
                self.description.program_dirs
            )))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(layout.state_dir().join("controller.log"))
            .map_err(io("creating controller log"))?;
        let log_err = log.try_clone().map_err(io("creating controller log"))?;
        let cp_ip = layout::control_plane_ip().to_string();
        let mut cmd = netns::command_in(&layout.control_plane_netns(), &program);
        cmd.arg("--files")
            .arg(layout.store_dir())
            .arg("--state-dir")
            .arg(self.controller_state_dir())
            .args(["--listen", &format!("0.0.0.0:{CONTROL_PLANE_PORT}")])
            .args([
                "--debug-listen",
                &format!("0.0.0.0:{CONTROL_PLANE_DEBUG_PORT}"),
            ])
            .args(["--serving-ip", &format!("{cp_ip},127.0.0.1")])
            .args([
                "--serving-dns",
                "weft-controller.istio-system.svc,localhost",
            ]);
        cmd.args(self.waypoint_args());
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
        std::fs::write(
            layout.state_dir().join("controller.pid"),
            child.id().to_string(),
        )
        .map_err(io("writing controller pid"))?;
        // Ready when it listens (probed from inside the control-plane namespace).
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = std::net::SocketAddr::from((layout::control_plane_ip(), CONTROL_PLANE_PORT));
        loop {
            let up = netns::within(&layout.control_plane_netns(), move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            if Instant::now() > deadline || !process_alive(child.id() as i32) {
                let log = std::fs::read_to_string(layout.state_dir().join("controller.log"))
                    .unwrap_or_default();
                return Err(Error::Runner(format!(
                    "{CONTROLLER_PROGRAM} did not start: {}",
                    log_tail(&log)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Scales the Helm-installed controller Deployment to `replicas` (0: an outage, as
    /// `kubectl scale --replicas=0`) and waits until exactly that many controller pods run and
    /// are Ready.
    fn scale_controller(&self, replicas: u32) -> Result<(), Error> {
        let key = ObjectKey::new(
            "apps",
            "Deployment",
            Some(helm::NAMESPACE),
            CONTROLLER_PROGRAM,
        );
        if !self
            .kube_api()?
            .merge_patch(&key, &json!({"spec": {"replicas": replicas}}))?
        {
            return Err(Error::NotFound(format!(
                "Deployment {}/{CONTROLLER_PROGRAM}",
                helm::NAMESPACE
            )));
        }
        self.wait_app_pods(
            helm::NAMESPACE,
            CONTROLLER_PROGRAM,
            None,
            replicas as usize,
            None,
        )
        .map(drop)
    }

    /// Waits (up to [`LIFECYCLE_TIMEOUT`]) until exactly `count` pods of `namespace` labelled
    /// `app=<app>` (on node `node` when given) exist, all Ready and none of them `not_uid`;
    /// returns them.
    fn wait_app_pods(
        &self,
        namespace: &str,
        app: &str,
        node: Option<u8>,
        count: usize,
        not_uid: Option<&str>,
    ) -> Result<Vec<Object>, Error> {
        let node_name = node.map(layout::node_name);
        let deadline = Instant::now() + LIFECYCLE_TIMEOUT;
        loop {
            let pods: Vec<Object> = self
                .pods(Some(namespace))?
                .into_iter()
                .filter(|p| {
                    p.0["metadata"]["labels"]["app"] == app
                        && node_name
                            .as_deref()
                            .is_none_or(|n| p.0["spec"]["nodeName"] == n)
                })
                .collect();
            let settled = pods.len() == count
                && pods.iter().all(|p| {
                    pod_ready(p)
                        && p.0["metadata"]["deletionTimestamp"].is_null()
                        && not_uid.is_none_or(|uid| p.uid() != Some(uid))
                });
            if settled {
                return Ok(pods);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "{count} Ready pod(s) app={app} in {namespace}{}",
                        node_name.map(|n| format!(" on {n}")).unwrap_or_default()
                    ),
                    timeout: LIFECYCLE_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Deletes the pod of DaemonSet app `app` on node `node` (graceful, as `kubectl delete
    /// pod`) and waits until the DaemonSet's replacement is Ready.
    fn replace_daemon_pod(&self, app: &str, node: u8) -> Result<(), Error> {
        let pod = self
            .running_pod(helm::NAMESPACE, app, Some(node))?
            .ok_or_else(|| Error::PodNotFound(format!("{app} on {}", layout::node_name(node))))?;
        let uid = pod.uid().unwrap_or_default().to_owned();
        self.objects()?.delete(&[pod.key()])?;
        self.wait_app_pods(helm::NAMESPACE, app, Some(node), 1, Some(&uid))
            .map(drop)
    }

    /// Restarts node `node`'s ztunnel: on a `--kubernetes` cluster its DaemonSet pod is deleted
    /// and replaced (returns once the new one is Ready); on a process cluster the process is
    /// stopped and started again.
    ///
    /// # Errors
    /// [`Error::PodNotFound`], [`Error::Timeout`] or [`Error::Runner`].
    pub fn restart_ztunnel(&self, node: u8) -> Result<(), Error> {
        if self.description.kubernetes {
            return self.replace_daemon_pod("ztunnel", node);
        }
        self.stop_ztunnel(node)?;
        self.start_ztunnel(node)
    }

    /// Restarts node `node`'s CNI node agent, as [`Cluster::restart_ztunnel`] does ztunnel.
    ///
    /// # Errors
    /// [`Error::PodNotFound`], [`Error::Timeout`] or [`Error::Runner`].
    pub fn restart_cni_agent(&self, node: u8) -> Result<(), Error> {
        if self.description.kubernetes {
            return self.replace_daemon_pod(CNI_APP, node);
        }
        self.stop_cni_agent(node)?;
        self.start_cni_agent(node)
    }

    /// The controller flags that shape the waypoint Deployments it renders: the program
    /// (`waypoint`, found by the runner next to `weft` like every container program) and the
    /// environment the waypoint needs to reach the control plane, in this order after the
    /// controller's own `POD_NAME`, `POD_NAMESPACE`, `INSTANCE_IP`, `SERVICE_ACCOUNT`,
    /// `WAYPOINT_NAME` and `TRUST_DOMAIN`: `XDS_ADDRESS`, `XDS_ROOT_CA`, `ALT_XDS_HOSTNAME` and
    /// `AUTH_TOKEN` (`$(WEFT_SERVICE_ACCOUNT_TOKEN_FILE)`, expanded by the runner to the pod's
    /// token file).
    pub fn waypoint_args(&self) -> Vec<String> {
        let mut args = vec!["--waypoint-command".to_owned(), WAYPOINT_PROGRAM.to_owned()];
        for env in [
            format!("XDS_ADDRESS=https://{}", self.control_plane_address()),
            format!("XDS_ROOT_CA={}", self.root_cert_path().display()),
            format!("ALT_XDS_HOSTNAME={CONTROL_PLANE_SERVER_NAME}"),
            format!("AUTH_TOKEN=$({})", token::TOKEN_FILE_ENV),
        ] {
            args.push("--waypoint-env".to_owned());
            args.push(env);
        }
        args
    }

    fn find_program(&self, name: &str) -> Result<PathBuf, Error> {
        self.description
            .program_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::Runner(format!(
                    "{name} not found in {:?}",
                    self.description.program_dirs
                ))
            })
    }

    /// Starts `program args…` inside `netns_name` as a detached process group, logging to
    /// `log`.
    fn spawn_in(
        &self,
        netns_name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<u32, Error> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("creating {}", log.display())))?;
        let file_err = file.try_clone().map_err(io("creating log"))?;
        let mut cmd = netns::command_in(netns_name, program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file_err)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
        Ok(child.id())
    }

    /// Per-node runtime directory: the agent's and ztunnel's sockets and records.
    pub fn node_run_dir(&self, node: u8) -> PathBuf {
        self.layout.node_dir(node).join("run")
    }

    /// ztunnel's metrics address on node `node` (`/metrics`, `/stats/prometheus`) of a process
    /// cluster, where ztunnel runs in the node's namespace.
    pub fn ztunnel_stats_address(&self, node: u8) -> std::net::SocketAddr {
        std::net::SocketAddr::from((layout::node_ip(node), ZTUNNEL_STATS_PORT))
    }

    /// The pod of Helm-installed ztunnel (DaemonSet `ztunnel` in `istio-system`, label
    /// `app=ztunnel`) running on node `node` of a `--kubernetes` cluster, if it is Running.
    ///
    /// # Errors
    /// [`Error::Objects`].
    pub fn ztunnel_pod(&self, node: u8) -> Result<Option<Object>, Error> {
        self.running_pod(helm::NAMESPACE, "ztunnel", Some(node))
    }

    /// A Running pod of `namespace` with label `app=<app>` (on node `node` when given).
    fn running_pod(
        &self,
        namespace: &str,
        app: &str,
        node: Option<u8>,
    ) -> Result<Option<Object>, Error> {
        let node_name = node.map(layout::node_name);
        Ok(self.pods(Some(namespace))?.into_iter().find(|p| {
            p.0["metadata"]["labels"]["app"] == app
                && node_name
                    .as_deref()
                    .is_none_or(|n| p.0["spec"]["nodeName"] == n)
                && p.0["metadata"]["deletionTimestamp"].is_null()
                && p.0["status"]["phase"] == "Running"
        }))
    }

    /// Where node `node`'s ztunnel serves its admin endpoint (`/config_dump` on 127.0.0.1:15000):
    /// the namespace to dial it from (the node's, or its DaemonSet pod's) and the address.
    ///
    /// # Errors
    /// [`Error::PodNotFound`] when no ztunnel pod runs on the node; [`Error::Objects`].
    pub fn ztunnel_admin(&self, node: u8) -> Result<(String, std::net::SocketAddr), Error> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], ZTUNNEL_ADMIN_PORT));
        if !self.description.kubernetes {
            return Ok((self.layout.node_netns(node), addr));
        }
        let pod = self
            .ztunnel_pod(node)?
            .ok_or_else(|| Error::PodNotFound(format!("ztunnel on {}", layout::node_name(node))))?;
        Ok((self.layout.pod_netns(pod.uid().unwrap_or_default()), addr))
    }

    /// Where the controller serves its debug endpoint (`/debug/connections`, port 15014): the
    /// control-plane namespace and its address there, or (a `--kubernetes` cluster) the
    /// controller pod's namespace and 127.0.0.1.
    ///
    /// # Errors
    /// [`Error::PodNotFound`] when no controller pod runs; [`Error::Objects`].
    pub fn controller_debug(&self) -> Result<(String, std::net::SocketAddr), Error> {
        if !self.description.kubernetes {
            return Ok((
                self.layout.control_plane_netns(),
                std::net::SocketAddr::new(
                    self.control_plane_address().ip(),
                    CONTROL_PLANE_DEBUG_PORT,
                ),
            ));
        }
        let pod = self
            .running_pod(helm::NAMESPACE, CONTROLLER_PROGRAM, None)?
            .ok_or_else(|| {
                Error::PodNotFound(format!("{CONTROLLER_PROGRAM} in {}", helm::NAMESPACE))
            })?;
        Ok((
            self.layout.pod_netns(pod.uid().unwrap_or_default()),
            std::net::SocketAddr::from(([127, 0, 0, 1], CONTROL_PLANE_DEBUG_PORT)),
        ))
    }

    /// Where node `node`'s ztunnel serves its metrics, and the namespace to dial it from: the
    /// node's namespace and ztunnel's own address there (a process cluster), or its pod's IP
    /// (a `--kubernetes` cluster, where ztunnel is a DaemonSet pod).
    ///
    /// # Errors
    /// [`Error::PodNotFound`] when no ztunnel pod runs on the node; [`Error::Objects`].
    pub fn ztunnel_metrics(&self, node: u8) -> Result<(String, std::net::SocketAddr), Error> {
        let netns_name = self.layout.node_netns(node);
        if !self.description.kubernetes {
            return Ok((netns_name, self.ztunnel_stats_address(node)));
        }
        let pod = self
            .ztunnel_pod(node)?
            .ok_or_else(|| Error::PodNotFound(format!("ztunnel on {}", layout::node_name(node))))?;
        let ip: std::net::IpAddr = pod.0["status"]["podIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| {
                Error::PodNotFound(format!(
                    "ztunnel on {} (no pod IP yet)",
                    layout::node_name(node)
                ))
            })?;
        Ok((
            netns_name,
            std::net::SocketAddr::new(ip, ZTUNNEL_STATS_PORT),
        ))
    }

    /// Starts node `node`'s mesh components in its netns: the CNI node agent (the chained
    /// `weft-cni` plugin calls it) and ztunnel (xDS and CA from the control plane, pods from the
    /// agent over ZDS). Waits until the agent listens, so pods never race it.
    fn start_node_components(&self, node: u8) -> Result<(), Error> {
        let run = self.node_run_dir(node);
        std::fs::create_dir_all(&run).map_err(io(format!("creating {}", run.display())))?;
        self.start_ztunnel(node)?;
        self.start_cni_agent(node)
    }

    /// Starts the CNI node agent on node `node` and waits until its plugin socket exists; it
    /// records its pid for [`Cluster::stop_cni_agent`]. A restarted agent rebuilds its state
    /// from its records and the pods' annotations and replays a snapshot to ztunnel.
    ///
    /// # Errors
    /// [`Error::Runner`] if the program is missing or does not listen within 20 s.
    pub fn start_cni_agent(&self, node: u8) -> Result<(), Error> {
        let layout = &self.layout;
        let run = self.node_run_dir(node);
        let agent_socket = run.join("cni-agent.sock");
        // A socket file left by a stopped agent must not pass for a listening one.
        let _ = std::fs::remove_file(&agent_socket);
        let agent = self.find_program("weft-cni-agent")?;
        let s = |p: &Path| p.display().to_string();
        let pid = self.spawn_in(
            &layout.node_netns(node),
            &agent,
            &[
                "--node".into(),
                layout::node_name(node),
                "--files".into(),
                s(&layout.store_dir()),
                "--plugin-socket".into(),
                s(&agent_socket),
                "--zds-socket".into(),
                s(&run.join("ztunnel.sock")),
                "--run-dir".into(),
                s(&run),
            ],
            &layout.node_dir(node).join("cni-agent.log"),
        )?;
        std::fs::write(layout.node_dir(node).join("cni-agent.pid"), pid.to_string())
            .map_err(io("writing cni-agent pid"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent_socket.exists() {
            if Instant::now() > deadline || !process_alive(pid as i32) {
                let log = std::fs::read_to_string(layout.node_dir(node).join("cni-agent.log"))
                    .unwrap_or_default();
                return Err(Error::Runner(format!(
                    "weft-cni-agent on {} did not start: {}",
                    layout::node_name(node),
                    log_tail(&log)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the CNI node agent on node `node` (SIGTERM; SIGKILL after 10 s). Pods it enrolled
    /// keep their rules; new ambient pods on the node fail CNI ADD until it is back.
    ///
    /// # Errors
    /// [`Error::Runner`] if no agent was started on that node.
    pub fn stop_cni_agent(&self, node: u8) -> Result<(), Error> {
        let path = self.layout.node_dir(node).join("cni-agent.pid");
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .ok_or_else(|| Error::Runner(format!("no cni-agent pid in {}", path.display())))?;
        stop_process(pid);
        Ok(())
    }

    /// Starts ztunnel on node `node` (xDS and CA from the control plane, pods from the node
    /// agent over ZDS); it records its pid for [`Cluster::stop_ztunnel`]. Returns once the
    /// process is spawned; the agent replays its pods to it when it connects.
    ///
    /// # Errors
    /// [`Error::Runner`] if the program is missing, [`Error::Io`] if it cannot be spawned.
    pub fn start_ztunnel(&self, node: u8) -> Result<(), Error> {
        let layout = &self.layout;
        let s = |p: &Path| p.display().to_string();
        let ztunnel = self.find_program("ztunnel")?;
        let pid = self.spawn_in(
            &layout.node_netns(node),
            &ztunnel,
            &[
                "--xds-address".into(),
                format!("https://{}", self.control_plane_address()),
                "--root-cert".into(),
                s(&self.root_cert_path()),
                "--server-name".into(),
                CONTROL_PLANE_SERVER_NAME.into(),
                "--token".into(),
                s(&self.node_token_path(node)),
                "--node-name".into(),
                layout::node_name(node),
                "--instance-ip".into(),
                layout::node_ip(node).to_string(),
                "--zds-socket".into(),
                s(&self.node_run_dir(node).join("ztunnel.sock")),
            ],
            &layout.node_dir(node).join("ztunnel.log"),
        )?;
        std::fs::write(layout.node_dir(node).join("ztunnel.pid"), pid.to_string())
            .map_err(io("writing ztunnel pid"))?;
        Ok(())
    }

    /// Stops ztunnel on node `node` (SIGTERM, which drains; SIGKILL after 10 s). Enrolled pods
    /// stay captured, so their traffic fails closed until ztunnel is back.
    ///
    /// # Errors
    /// [`Error::Runner`] if no ztunnel was started on that node.
    pub fn stop_ztunnel(&self, node: u8) -> Result<(), Error> {
        let pid = self
            .ztunnel_pid(node)
            .ok_or_else(|| Error::Runner(format!("no ztunnel pid recorded for node-{node}")))?;
        stop_process(pid);
        Ok(())
    }

    /// The process id of the ztunnel last started on node `node`, if one was.
    pub fn ztunnel_pid(&self, node: u8) -> Option<i32> {
        let path = self.layout.node_dir(node).join("ztunnel.pid");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    }

    /// The controller's state directory (CA root, bootstrap tokens).
    pub fn controller_state_dir(&self) -> PathBuf {
        self.layout.controller_state_dir()
    }

    /// The control plane's xDS + CA address, as node components dial it.
    pub fn control_plane_address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((layout::control_plane_ip(), CONTROL_PLANE_PORT))
    }

    /// The root bundle node components trust for the control plane and the mesh.
    pub fn root_cert_path(&self) -> PathBuf {
        self.controller_state_dir().join("ca").join("root-cert.pem")
    }

    /// Node `node`'s bootstrap token file.
    pub fn node_token_path(&self, node: u8) -> PathBuf {
        self.controller_state_dir()
            .join("tokens")
            .join(format!("{}.token", layout::node_name(node)))
    }

    /// Opens a cluster that is up.
    ///
    /// # Errors
    /// [`Error::NotFound`] when it has no `cluster.json`.
    pub fn open(name: &str, state_dir: Option<&Path>) -> Result<Cluster, Error> {
        let layout = Layout::new(name, state_dir)?;
        let text =
            std::fs::read(layout.cluster_file()).map_err(|_| Error::NotFound(name.to_owned()))?;
        let description: Description =
            serde_json::from_slice(&text).map_err(|_| Error::NotFound(name.to_owned()))?;
        Ok(Cluster {
            store: Store::new(layout.store_dir()),
            layout,
            description,
            api: Default::default(),
        })
    }

    /// Stops and removes everything cluster `name` made: the runner, every process in its
    /// namespaces, the namespaces (with their veths, bridges, routes and rules) and the state
    /// directory. Works after a crashed or killed `up`. Returns false when nothing was found.
    ///
    /// # Errors
    /// [`Error::NotRoot`], or the first teardown step that failed (the others still run).
    pub fn down(name: &str, state_dir: Option<&Path>) -> Result<bool, Error> {
        if !is_root() {
            return Err(Error::NotRoot);
        }
        let layout = Layout::new(name, state_dir)?;
        let mut found = false;
        for pid in runner_pids(&layout) {
            found = true;
            stop_process(pid);
        }
        let namespaces = network::namespaces(&layout);
        found |= !namespaces.is_empty();
        let result = network::destroy(&layout);
        if layout.state_dir().exists() {
            found = true;
            std::fs::remove_dir_all(layout.state_dir())
                .map_err(io(format!("removing {}", layout.state_dir().display())))?;
        }
        result?;
        Ok(found)
    }

    /// The cluster's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// What `up` recorded.
    pub fn description(&self) -> &Description {
        &self.description
    }

    /// The object store of a process cluster (a `--kubernetes` cluster keeps its objects in
    /// the API server: use [`Cluster::objects`]).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where this cluster's objects live: its API server (a `--kubernetes` cluster, connected
    /// on first use) or its object store.
    ///
    /// # Errors
    /// [`Error::Objects`] when the API server's kubeconfig cannot be used.
    pub fn objects(&self) -> Result<&dyn Objects, Error> {
        if !self.description.kubernetes {
            return Ok(&self.store);
        }
        self.kube_api().map(|api| api as &dyn Objects)
    }

    /// The API server connection of a `--kubernetes` cluster.
    ///
    /// # Errors
    /// [`Error::Runner`] for a cluster without Kubernetes; [`Error::Objects`] when its
    /// kubeconfig cannot be used.
    pub fn kube_api(&self) -> Result<&api::KubeApi, Error> {
        if let Some(api) = self.api.get() {
            return Ok(api);
        }
        let opened = api::KubeApi::open(&self.kubeconfig_path()?)?;
        let _ = self.api.set(opened);
        self.api
            .get()
            .ok_or_else(|| Error::Runner("the API server connection was not kept".into()))
    }

    /// Parses a manifest text: fully validated for the object store; identity only for the
    /// API server, which validates the rest itself.
    ///
    /// # Errors
    /// [`Error::Manifest`] naming the file, object and field.
    pub fn parse(&self, text: &str, file: &str) -> Result<Vec<Object>, Error> {
        Ok(if self.description.kubernetes {
            manifest::parse_documents(text, file)?
        } else {
            manifest::parse(text, file)?
        })
    }

    /// Reads and parses (as [`Cluster::parse`]) a manifest file or every `.yaml`, `.yml` and
    /// `.json` file of a directory, in name order.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Manifest`].
    pub fn read_path(&self, path: &Path) -> Result<Vec<Object>, Error> {
        if !self.description.kubernetes {
            return Ok(manifest::read_path(path)?);
        }
        let mut files = Vec::new();
        if path.is_dir() {
            let entries =
                std::fs::read_dir(path).map_err(io(format!("reading {}", path.display())))?;
            for entry in entries.flatten() {
                let file = entry.path();
                if file
                    .extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                {
                    files.push(file);
                }
            }
            files.sort();
        } else {
            files.push(path.to_path_buf());
        }
        let mut objects = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(io(format!("reading {}", file.display())))?;
            objects.extend(self.parse(&text, &file.display().to_string())?);
        }
        Ok(objects)
    }

    /// Applies objects (the store: all or nothing; the API server: in order, server-side
    /// apply).
    ///
    /// # Errors
    /// [`Error::Objects`] naming the object.
    pub fn apply(&self, objects: &[Object]) -> Result<Vec<(ObjectKey, Outcome)>, Error> {
        Ok(self.objects()?.apply(objects)?)
    }

    /// Parses and applies a manifest text.
    ///
    /// # Errors
    /// [`Error::Manifest`] (nothing is applied then) or [`Error::Objects`].
    pub fn apply_yaml(&self, text: &str) -> Result<Vec<(ObjectKey, Outcome)>, Error> {
        let objects = self.parse(text, "-")?;
        self.apply(&objects)
    }

    /// Reads and applies a file or directory of manifests.
    ///
    /// # Errors
    /// [`Error::Manifest`] (nothing is applied then) or [`Error::Objects`].
    pub fn apply_path(&self, path: &Path) -> Result<Vec<(ObjectKey, Outcome)>, Error> {
        let objects = self.read_path(path)?;
        self.apply(&objects)
    }

    /// Deletes the objects named in a manifest text.
    ///
    /// # Errors
    /// [`Error::Manifest`] or [`Error::Objects`].
    pub fn delete_yaml(&self, text: &str) -> Result<Vec<(ObjectKey, bool)>, Error> {
        let keys: Vec<ObjectKey> = self.parse(text, "-")?.iter().map(Object::key).collect();
        Ok(self.objects()?.delete(&keys)?)
    }

    /// Deletes the objects named in a file or directory of manifests.
    ///
    /// # Errors
    /// [`Error::Manifest`] or [`Error::Objects`].
    pub fn delete_path(&self, path: &Path) -> Result<Vec<(ObjectKey, bool)>, Error> {
        let keys: Vec<ObjectKey> = self.read_path(path)?.iter().map(Object::key).collect();
        Ok(self.objects()?.delete(&keys)?)
    }

    /// Sets (`Some`) or removes (`None`) a label on a namespace.
    ///
    /// # Errors
    /// [`Error::Objects`]; [`Error::NotFound`] for a missing namespace.
    pub fn label_namespace(
        &self,
        namespace: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), Error> {
        let object_key = ObjectKey::new("", "Namespace", None, namespace);
        if self.objects()?.set_label(&object_key, key, value)? {
            Ok(())
        } else {
            Err(Error::NotFound(format!("namespace {namespace}")))
        }
    }

    /// Pods in `namespace` (all namespaces for `None`).
    ///
    /// # Errors
    /// [`Error::Objects`].
    pub fn pods(&self, namespace: Option<&str>) -> Result<Vec<Object>, Error> {
        Ok(self
            .objects()?
            .list("", "Pod")?
            .into_iter()
            .filter(|p| namespace.is_none_or(|ns| p.namespace() == Some(ns)))
            .collect())
    }

    /// One pod.
    ///
    /// # Errors
    /// [`Error::PodNotFound`].
    pub fn pod(&self, namespace: &str, name: &str) -> Result<Object, Error> {
        self.objects()?
            .get(&ObjectKey::new("", "Pod", Some(namespace), name))?
            .ok_or_else(|| Error::PodNotFound(format!("{namespace}/{name}")))
    }

    /// The cluster IP of Service `namespace/name`.
    ///
    /// # Errors
    /// [`Error::NotFound`] when there is no such Service (or it has no cluster IP).
    pub fn service_ip(&self, namespace: &str, name: &str) -> Result<String, Error> {
        self.objects()?
            .get(&ObjectKey::new("", "Service", Some(namespace), name))?
            .and_then(|svc| svc.0["spec"]["clusterIP"].as_str().map(str::to_owned))
            .ok_or_else(|| Error::NotFound(format!("Service {namespace}/{name}")))
    }

    /// Waits until exactly `count` pods in `namespace` carrying every label of `selector` are
    /// Ready, and returns them.
    ///
    /// # Errors
    /// [`Error::Timeout`] listing what was seen last.
    pub fn wait_ready(
        &self,
        namespace: &str,
        selector: &[(&str, &str)],
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Object>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let pods: Vec<Object> = self
                .pods(Some(namespace))?
                .into_iter()
                .filter(|p| {
                    selector
                        .iter()
                        .all(|(k, v)| p.0["metadata"]["labels"][*k] == *v)
                })
                .collect();
            let ready: Vec<Object> = pods.iter().filter(|p| pod_ready(p)).cloned().collect();
            if ready.len() == count && pods.len() == count {
                return Ok(ready);
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = pods
                    .iter()
                    .map(|p| {
                        format!(
                            "{} {}",
                            p.name(),
                            p.0["status"]["phase"].as_str().unwrap_or("Pending")
                        )
                    })
                    .collect();
                return Err(Error::Timeout {
                    what: format!(
                        "{count} ready pods {selector:?} in {namespace} (seen: {seen:?})"
                    ),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command that runs `argv` inside a pod's network namespace.
    ///
    /// # Errors
    /// [`Error::PodNotFound`] when the pod does not exist or has no network namespace.
    pub fn exec_command(
        &self,
        namespace: &str,
        pod: &str,
        argv: &[&str],
    ) -> Result<Command, Error> {
        let object = self.pod(namespace, pod)?;
        let uid = object
            .uid()
            .ok_or_else(|| Error::PodNotFound(format!("{namespace}/{pod}")))?;
        let netns_name = self.layout.pod_netns(uid);
        if !netns::exists(&netns_name) {
            return Err(Error::PodNotFound(format!(
                "{namespace}/{pod} (not running)"
            )));
        }
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error::PodNotFound("no command given".into()))?;
        let program = self
            .description
            .program_dirs
            .iter()
            .map(|d| d.join(program))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from(program));
        let mut cmd = netns::pod_command_in(&netns_name, &pod_hostname(&object), program, &[])
            .map_err(io("preparing the exec"))?;
        cmd.args(args);
        Ok(cmd)
    }

    /// Runs `argv` inside a pod's network namespace and captures its output.
    ///
    /// # Errors
    /// [`Error::PodNotFound`] or [`Error::Io`] if it cannot be started.
    pub fn exec(&self, namespace: &str, pod: &str, argv: &[&str]) -> Result<Output, Error> {
        self.exec_command(namespace, pod, argv)?
            .stdin(Stdio::null())
            .output()
            .map_err(io(format!("exec in {namespace}/{pod}")))
    }

    /// Runs `weft-echo client URL` in a pod: `count` requests, each on its own connection (so a
    /// Service VIP spreads them), 3 s timeout each; one JSON line per request on stdout.
    ///
    /// # Errors
    /// As [`Cluster::exec`].
    pub fn echo_client(
        &self,
        namespace: &str,
        pod: &str,
        url: &str,
        count: u32,
    ) -> Result<Output, Error> {
        let count = count.to_string();
        self.exec(
            namespace,
            pod,
            &[
                "weft-echo",
                "client",
                url,
                "--count",
                &count,
                "--concurrency",
                &count,
                "--timeout-ms",
                "3000",
            ],
        )
    }

    /// Runs `weft-echo grpc` in a pod with `call`'s target, method, message, metadata, count
    /// and per-call timeout; one JSON line per call on stdout (`code`, `status`, `message`,
    /// `pod`, `method`, `metadata`, or `error`).
    ///
    /// # Errors
    /// As [`Cluster::exec`].
    pub fn echo_grpc(
        &self,
        namespace: &str,
        pod: &str,
        call: &crate::echo::GrpcConfig,
    ) -> Result<Output, Error> {
        let method = match call.method {
            crate::echo::GrpcMethod::Echo => "Echo",
            crate::echo::GrpcMethod::Reverse => "Reverse",
        };
        let count = call.count.to_string();
        let timeout = call.timeout.as_millis().to_string();
        let headers: Vec<String> = call
            .metadata
            .iter()
            .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        let mut argv = vec![
            "weft-echo",
            "grpc",
            "--target",
            &call.target,
            "--method",
            method,
            "--message",
            &call.message,
            "--count",
            &count,
            "--timeout-ms",
            &timeout,
        ];
        for header in &headers {
            argv.extend(["-H", header.as_str()]);
        }
        self.exec(namespace, pod, &argv)
    }

    /// A container's log (the first container when `container` is `None`).
    ///
    /// # Errors
    /// [`Error::PodNotFound`] or [`Error::Io`].
    pub fn logs(
        &self,
        namespace: &str,
        pod: &str,
        container: Option<&str>,
    ) -> Result<String, Error> {
        let object = self.pod(namespace, pod)?;
        let uid = object.uid().unwrap_or_default();
        let container = match container {
            Some(c) => c.to_owned(),
            None => object.0["spec"]["containers"][0]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        let path = self.layout.pod_dir(uid).join(format!("{container}.log"));
        std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))
    }
}

/// A pod's hostname, as the kubelet sets it: `spec.hostname` when given, else the pod's name,
/// cut to 63 bytes (a DNS label).
pub fn pod_hostname(pod: &Object) -> String {
    let name = pod.0["spec"]["hostname"]
        .as_str()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod.name());
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Whether a pod object has condition `Ready=True`.
pub fn pod_ready(pod: &Object) -> bool {
    pod.0["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// PIDs of the host-side daemons of this cluster (the runner, the apiserver proxy): from the pid file and from a scan of `/proc` (a
/// killed `up` may not have written the file).
fn runner_pids(layout: &Layout) -> Vec<i32> {
    let mut pids = Vec::new();
    let entries = std::fs::read_dir("/proc").map(|e| e.filter_map(Result::ok).collect::<Vec<_>>());
    for entry in entries.unwrap_or_default() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_runner = args
            .windows(2)
            .any(|w| w[0] == b"cluster" && (w[1] == b"runner" || w[1] == b"apiserver-proxy"))
            && args
                .windows(2)
                .any(|w| w[0] == b"--cluster" && w[1] == layout.name().as_bytes());
        if is_runner && process_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGTERM, wait up to 10 s (the runner stops its pods), then SIGKILL.
fn stop_process(pid: i32) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if process_alive(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Entry point of the `weft cluster apiserver-proxy` daemon: the host-side forwarder to the
/// cluster's kube-apiserver, until killed.
///
/// # Errors
/// [`Error::NotFound`], or [`Error::Kube`] when it cannot listen.
pub fn run_apiserver_proxy(name: &str, state_dir: Option<&Path>) -> Result<(), Error> {
    let cluster = Cluster::open(name, state_dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the apiserver proxy runtime"))?;
    Ok(runtime.block_on(kube::run_apiserver_proxy(&cluster.layout))?)
}

/// Entry point of the `weft cluster runner` daemon: runs the runner for an existing cluster until
/// SIGTERM/SIGINT.
///
/// # Errors
/// [`Error::NotFound`] or [`Error::Io`].
pub fn run_runner(name: &str, state_dir: Option<&Path>) -> Result<(), Error> {
    let cluster = Cluster::open(name, state_dir)?;
    let stop = stop_on_signal()?;
    let config = runner::Config {
        layout: cluster.layout.clone(),
        nodes: cluster.description.nodes,
        plugin_dirs: cluster.description.plugin_dirs.clone(),
        program_dirs: cluster.description.program_dirs.clone(),
        tick: Duration::from_millis(200),
    };
    runner::run(config, &stop).map_err(|e| Error::Runner(e.to_string()))
}

/// Entry point of the `weft cluster kubelet` daemon (started by `up --kubernetes` in node
/// `node`'s namespace): runs the node's kubelet until SIGTERM/SIGINT.
///
/// # Errors
/// [`Error::NotFound`], [`Error::Io`] or the kubelet's error.
pub fn run_kubelet(name: &str, state_dir: Option<&Path>, node: u8) -> Result<(), Error> {
    let cluster = Cluster::open(name, state_dir)?;
    if !(1..=cluster.description.nodes).contains(&node) {
        return Err(Error::Nodes(node));
    }
    let stop = stop_on_signal()?;
    let config = kubelet::Config {
        kubeconfig: kube::Paths::new(&cluster.layout)
            .kubeconfig(&kube::kubelet_kubeconfig_name(node)),
        layout: cluster.layout.clone(),
        node,
        // The node's own plugin directory (where a CNI DaemonSet installs), then the cluster's.
        plugin_dirs: std::iter::once(cluster.layout.node_root(node).join(kubelet::CNI_BIN_DIR))
            .chain(cluster.description.plugin_dirs.iter().cloned())
            .collect(),
        // Programs next to `weft`, then the Kubernetes programs (CoreDNS runs as a pod).
        program_dirs: cluster
            .description
            .program_dirs
            .iter()
            .cloned()
            .chain(std::iter::once(kube::bin_dir()))
            .collect(),
        tick: Duration::from_millis(200),
    };
    kubelet::run(config, &stop).map_err(|e| Error::Runner(crate::echo::error_message(&e)))
}

/// The last five lines of a daemon's log that are not backtrace frames, newest first,
/// for an error message.
fn log_tail(log: &str) -> String {
    log.lines()
        .rev()
        .filter(|l| {
            // Backtrace frames are `  N: symbol` and `      at file:line`.
            let t = l.trim_start();
            let frame = t.starts_with("at ")
                || t.split_once(": ")
                    .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()));
            let indented = t.len() < l.len();
            !(t.is_empty() || (frame && indented) || t == "Stack backtrace:")
        })
        .take(5)
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod log_tail_tests {
    #[test]
    fn the_log_tail_skips_backtrace_frames() {
        let log = "starting\nError: ca persistence\n\nCaused by:\n    namespaces \"istio-system\" not found\n  31: _start\n";
        assert_eq!(
            super::log_tail(log),
            "    namespaces \"istio-system\" not found | Caused by: | Error: ca persistence | starting"
        );
    }
}

/// A flag set once SIGTERM or SIGINT arrives (watched by a thread of its own).
fn stop_on_signal() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, Error> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting signal runtime"))?;
    std::thread::spawn(move || {
        signals.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            flag.store(true, Ordering::SeqCst);
        });
    });
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_renders_waypoints_that_reach_the_control_plane() {
        let layout = Layout::new("wp", Some(Path::new("/tmp/weft-wp-state"))).unwrap();
        let cluster = Cluster {
            store: Store::new(layout.store_dir()),
            api: Default::default(),
            description: Description {
                name: "wp".into(),
                nodes: 1,
                plugin_dirs: Vec::new(),
                program_dirs: Vec::new(),
                control_plane: true,
                mesh: true,
                kubernetes: false,
            },
            layout,
        };
        assert_eq!(
            cluster.waypoint_args(),
            [
                "--waypoint-command",
                "waypoint",
                "--waypoint-env",
                "XDS_ADDRESS=https://10.240.0.2:15012",
                "--waypoint-env",
                "XDS_ROOT_CA=/tmp/weft-wp-state/controller/ca/root-cert.pem",
                "--waypoint-env",
                "ALT_XDS_HOSTNAME=weft-controller.istio-system.svc",
                "--waypoint-env",
                "AUTH_TOKEN=$(WEFT_SERVICE_ACCOUNT_TOKEN_FILE)",
            ]
        );
    }
}
