//! `weft`: the Weft command-line tool.
#![allow(clippy::print_stdout)] // a CLI's job is to print

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use weft::cluster::{self, Cluster, Object, Options, Outcome};
use weft::{inspect, waypoint};

/// Weft: an ambient service mesh.
#[derive(Parser, Debug)]
#[command(name = "weft", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The local cluster: a sealed one-machine Kubernetes stand-in (needs root).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// A ztunnel's view of the mesh on the local cluster, read from each node's admin endpoint.
    ZtunnelConfig {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// What to show.
        section: inspect::Section,
        /// Only this node (1, 2, …); default every node.
        #[arg(long)]
        node: Option<u8>,
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Every xDS client of the controller: per type, what it has ACKed and whether it is in sync.
    ProxyStatus {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Waypoints (Gateways of class istio-waypoint) on the local cluster, like `istioctl
    /// waypoint`.
    Waypoint {
        #[command(subcommand)]
        command: WaypointCommand,
    },
    /// The guided tour: a 2-node local cluster, L4 mesh adoption step by step (needs root).
    Demo {
        /// `down` removes the demo cluster.
        action: Option<DemoAction>,
        /// Cluster name.
        #[arg(long = "cluster", default_value = weft::demo::DEFAULT_NAME)]
        name: String,
        #[command(flatten)]
        old: OldClusterName,
        /// Read the demo manifests from this directory (default: the built-in copies of
        /// examples/demo).
        #[arg(long)]
        examples: Option<PathBuf>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum DemoAction {
    /// Remove the demo cluster and everything it made.
    Down,
}

/// Cluster selection, the same in every verb: `--cluster C` (or `$WEFT_CLUSTER`). `--name` is
/// always an object's name (a waypoint's), never the cluster's.
#[derive(clap::Args, Debug, Clone)]
struct Target {
    /// Cluster name.
    #[arg(
        long = "cluster",
        global = true,
        default_value = "weft",
        env = "WEFT_CLUSTER"
    )]
    cluster: String,
    /// State directory (default /var/run/weft/clusters/<cluster>).
    #[arg(long, global = true, env = "WEFT_CLUSTER_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

/// The old spelling `--name C` of verbs whose only object is the cluster: refused with the new
/// spelling, so a habit from an earlier release gets an answer instead of a wrong cluster.
#[derive(clap::Args, Debug, Clone)]
struct OldClusterName {
    #[arg(long = "name", hide = true, global = true)]
    old_name: Option<String>,
}

impl OldClusterName {
    fn refuse(&self) -> anyhow::Result<()> {
        match &self.old_name {
            Some(name) => bail!(
                "`--name` does not select the cluster any more: use `--cluster {name}` (every weft \
                 verb selects the cluster with --cluster or $WEFT_CLUSTER; --name is always an \
                 object's name, as in `weft waypoint apply --name`)"
            ),
            None => Ok(()),
        }
    }
}

#[derive(Subcommand, Debug)]
enum WaypointCommand {
    /// Print the waypoint Gateway YAML (writes nothing).
    Generate {
        /// Namespace of the waypoint.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Waypoint name.
        #[arg(long, default_value = waypoint::DEFAULT_NAME)]
        name: String,
        /// Which traffic it handles (label istio.io/waypoint-for; default service).
        #[arg(long = "for", value_enum)]
        traffic: Option<waypoint::For>,
    },
    /// Create (or with --overwrite replace) the waypoint Gateway in the cluster.
    Apply {
        #[command(flatten)]
        target: Target,
        /// Namespace of the waypoint.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Waypoint name (`none` is reserved).
        #[arg(long, default_value = waypoint::DEFAULT_NAME)]
        name: String,
        /// Which traffic it handles (label istio.io/waypoint-for; default service).
        #[arg(long = "for", value_enum)]
        traffic: Option<waypoint::For>,
        /// Also label the namespace istio.io/use-waypoint=<name>.
        #[arg(long)]
        enroll_namespace: bool,
        /// Replace an existing waypoint of that name.
        #[arg(long)]
        overwrite: bool,
        /// Wait until the controller reports the waypoint Programmed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (e.g. 60s, 2m).
        #[arg(long, default_value = "60s", value_parser = weft_core::duration::parse)]
        timeout: std::time::Duration,
    },
    /// List waypoints: namespace, name, traffic type, Programmed, address.
    List {
        #[command(flatten)]
        target: Target,
        /// Namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Show waypoints' status conditions (type, status, reason, message).
    Status {
        #[command(flatten)]
        target: Target,
        /// Namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Only this waypoint (default: every waypoint of the namespace).
        #[arg(long)]
        name: Option<String>,
        /// Output format: table, json or yaml.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Delete waypoints (and the objects the controller made for them).
    Delete {
        #[command(flatten)]
        target: Target,
        /// Namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Waypoint names.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        names: Vec<String>,
        /// Every waypoint of the namespace.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Create the cluster network and start the runner.
    Up {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// Directory holding the CNI plugins.
        #[arg(long, default_value = cluster::layout::DEFAULT_CNI_BIN_DIR)]
        cni_bin_dir: PathBuf,
        /// Run the real Kubernetes control plane (etcd, kube-apiserver,
        /// kube-controller-manager, kube-scheduler, kube-proxy and CoreDNS; built by
        /// scripts/install-deps) with a netns kubelet per node, and install Weft into it with
        /// `helm install` of the project's charts (WEFT_CHARTS_DIR overrides where they are).
        /// The default; the flag is kept for scripts that pass it.
        #[arg(long, conflicts_with = "processes")]
        kubernetes: bool,
        /// Instead of Kubernetes, the older process cluster: a YAML-file object store, Weft's
        /// runner and the mesh as plain processes (kept while the last suites move).
        #[arg(long)]
        processes: bool,
        /// Run no mesh: no controller, CNI agent or ztunnel (a plain cluster).
        #[arg(long)]
        no_mesh: bool,
    },
    /// Stop everything and remove every namespace, rule, process and file of the cluster.
    Down {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
    },
    /// Create or update objects from a file or directory of manifests.
    Apply {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// Manifest file or directory (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the objects named in a file or directory of manifests.
    Delete {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// Manifest file or directory (`-` for standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// List objects: pods, services, gateways, deployments, endpointslices, namespaces, nodes.
    Get {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// What to list.
        kind: String,
        /// Namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format: table, yaml or json.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
    /// Set (`KEY=VALUE`) or remove (`KEY-`) a label on a namespace.
    Label {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// Only `namespace` is supported.
        kind: String,
        /// Namespace name.
        object: String,
        /// `KEY=VALUE` or `KEY-`.
        label: String,
    },
    /// Run a command inside a pod's network namespace: `exec NS/POD -- CMD ARGS…`.
    Exec {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// `namespace/pod`.
        pod: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a pod container's log.
    Logs {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// `namespace/pod`.
        pod: String,
        /// Container (default: the first).
        #[arg(short = 'c', long)]
        container: Option<String>,
    },
    /// The cluster's runner daemon (started by `up`).
    #[command(hide = true)]
    Runner {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
    },
    /// Print the admin kubeconfig of a cluster started with `--kubernetes` (for kubectl and
    /// helm on this machine: its server is a forwarder on 127.0.0.1).
    Kubeconfig {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
        /// Print the kubeconfig file's path instead of its content.
        #[arg(long)]
        path: bool,
    },
    /// A node's netns kubelet (started by `up --kubernetes` in the node's namespace).
    #[command(hide = true)]
    Kubelet {
        #[command(flatten)]
        target: Target,
        /// The node's number (1 = node-1).
        #[arg(long)]
        node: u8,
        #[command(flatten)]
        old: OldClusterName,
    },
    /// The host-side forwarder to the cluster's kube-apiserver (started by `up --kubernetes`).
    #[command(hide = true)]
    ApiserverProxy {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        old: OldClusterName,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn open(target: &Target) -> anyhow::Result<Cluster> {
    Ok(Cluster::open(&target.cluster, target.state_dir.as_deref())?)
}

fn split_pod(pod: &str) -> anyhow::Result<(&str, &str)> {
    pod.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .with_context(|| format!("{pod:?} is not NAMESPACE/POD"))
}

fn read_manifests(cluster: &Cluster, file: &std::path::Path) -> anyhow::Result<Vec<Object>> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        Ok(cluster.parse(&text, "-")?)
    } else {
        Ok(cluster.read_path(file)?)
    }
}

/// The old `--name` cluster spelling, if this invocation used it.
fn old_cluster_name(command: &Command) -> Option<&OldClusterName> {
    match command {
        Command::ZtunnelConfig { old, .. }
        | Command::ProxyStatus { old, .. }
        | Command::Demo { old, .. } => Some(old),
        Command::Cluster { command } => Some(match command {
            ClusterCommand::Up { old, .. }
            | ClusterCommand::Down { old, .. }
            | ClusterCommand::Apply { old, .. }
            | ClusterCommand::Delete { old, .. }
            | ClusterCommand::Get { old, .. }
            | ClusterCommand::Label { old, .. }
            | ClusterCommand::Exec { old, .. }
            | ClusterCommand::Logs { old, .. }
            | ClusterCommand::Runner { old, .. }
            | ClusterCommand::Kubeconfig { old, .. }
            | ClusterCommand::Kubelet { old, .. }
            | ClusterCommand::ApiserverProxy { old, .. } => old,
        }),
        Command::Waypoint { .. } => None,
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(old) = old_cluster_name(&cli.command) {
        old.refuse()?;
    }
    // The demo checks root itself and says what to do; `waypoint generate` only prints.
    let needs_root = !matches!(
        cli.command,
        Command::Demo { action: None, .. }
            | Command::Waypoint {
                command: WaypointCommand::Generate { .. }
            }
    );
    if needs_root && !cluster::is_root() {
        bail!(cluster::Error::NotRoot);
    }
    let command = match cli.command {
        Command::Cluster { command } => command,
        Command::Waypoint { command } => return run_waypoint(command),
        Command::ZtunnelConfig {
            target,
            section,
            node,
            output,
            ..
        } => {
            let cluster = open(&target)?;
            let report = inspect::ztunnel_config(&cluster, section, node)?;
            print!("{}", report.render(&output).map_err(anyhow::Error::msg)?);
            return Ok(ExitCode::SUCCESS);
        }
        Command::ProxyStatus { target, output, .. } => {
            let cluster = open(&target)?;
            let report = inspect::proxy_status(&cluster)?;
            print!("{}", report.render(&output).map_err(anyhow::Error::msg)?);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Demo {
            action: Some(DemoAction::Down),
            name,
            ..
        } => {
            if weft::demo::down(&name)? {
                println!("demo cluster {name} removed");
            } else {
                println!("no demo cluster {name} to remove");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Demo {
            action: None,
            name,
            examples,
            ..
        } => {
            let mut config = weft::demo::Config::new(&name);
            config.examples = examples;
            weft::demo::run(&config, &mut std::io::stdout().lock())?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    match command {
        ClusterCommand::Up {
            target,
            nodes,
            cni_bin_dir,
            processes,
            no_mesh,
            ..
        } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter("warn")
                .init();
            let mut options = Options::new(&target.cluster);
            options.nodes = nodes;
            options.state_dir = target.state_dir;
            options.plugin_dirs = vec![cni_bin_dir];
            options.kubernetes = !processes;
            options.control_plane = !no_mesh;
            options.mesh = !no_mesh;
            let cluster = Cluster::up(&options)?;
            println!(
                "cluster {} is up: {} nodes, state in {}",
                target.cluster,
                nodes,
                cluster.layout().state_dir().display()
            );
        }
        ClusterCommand::Down { target, .. } => {
            if Cluster::down(&target.cluster, target.state_dir.as_deref())? {
                println!("cluster {} removed", target.cluster);
            } else {
                println!("cluster {} not found: nothing to remove", target.cluster);
            }
        }
        ClusterCommand::Apply { target, file, .. } => {
            let cluster = open(&target)?;
            for (key, outcome) in cluster.apply(&read_manifests(&cluster, &file)?)? {
                let verb = match outcome {
                    Outcome::Created => "created",
                    Outcome::Configured => "configured",
                    Outcome::Unchanged => "unchanged",
                };
                println!("{key} {verb}");
            }
        }
        ClusterCommand::Delete { target, file, .. } => {
            let cluster = open(&target)?;
            let keys: Vec<_> = read_manifests(&cluster, &file)?
                .iter()
                .map(Object::key)
                .collect();
            for (key, existed) in cluster.objects()?.delete(&keys)? {
                println!("{key} {}", if existed { "deleted" } else { "not found" });
            }
        }
        ClusterCommand::Get {
            target,
            kind,
            namespace,
            all_namespaces,
            output,
            ..
        } => {
            let cluster = open(&target)?;
            let ns = (!all_namespaces).then_some(namespace.as_str());
            print_objects(&cluster, &kind, ns, &output)?;
        }
        ClusterCommand::Label {
            target,
            kind,
            object,
            label,
            ..
        } => {
            if !matches!(kind.as_str(), "namespace" | "namespaces" | "ns") {
                bail!("only namespaces can be labelled, not {kind:?}");
            }
            let cluster = open(&target)?;
            if let Some(key) = label.strip_suffix('-') {
                cluster.label_namespace(&object, key, None)?;
                println!("namespace/{object} unlabeled");
            } else {
                let (key, value) = label
                    .split_once('=')
                    .with_context(|| format!("{label:?} is neither KEY=VALUE nor KEY-"))?;
                cluster.label_namespace(&object, key, Some(value))?;
                println!("namespace/{object} labeled");
            }
        }
        ClusterCommand::Exec {
            target,
            pod,
            command,
            ..
        } => {
            let cluster = open(&target)?;
            let (ns, name) = split_pod(&pod)?;
            let argv: Vec<&str> = command.iter().map(String::as_str).collect();
            let status = cluster.exec_command(ns, name, &argv)?.status()?;
            return Ok(ExitCode::from(
                u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
            ));
        }
        ClusterCommand::Logs {
            target,
            pod,
            container,
            ..
        } => {
            let cluster = open(&target)?;
            let (ns, name) = split_pod(&pod)?;
            print!("{}", cluster.logs(ns, name, container.as_deref())?);
        }
        ClusterCommand::Runner { target, .. } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter("info")
                .init();
            cluster::run_runner(&target.cluster, target.state_dir.as_deref())?;
        }
        ClusterCommand::Kubeconfig { target, path, .. } => {
            let kubeconfig = open(&target)?.kubeconfig_path()?;
            if path {
                println!("{}", kubeconfig.display());
            } else {
                let text = std::fs::read_to_string(&kubeconfig)
                    .with_context(|| format!("reading {}", kubeconfig.display()))?;
                print!("{text}");
            }
        }
        ClusterCommand::Kubelet { target, node, .. } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter("info")
                .init();
            cluster::run_kubelet(&target.cluster, target.state_dir.as_deref(), node)?;
        }
        ClusterCommand::ApiserverProxy { target, .. } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter("info")
                .init();
            cluster::run_apiserver_proxy(&target.cluster, target.state_dir.as_deref())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_waypoint(command: WaypointCommand) -> anyhow::Result<ExitCode> {
    match command {
        WaypointCommand::Generate {
            namespace,
            name,
            traffic,
        } => {
            if name == "none" {
                bail!(waypoint::Error::ReservedName);
            }
            print!("{}", waypoint::generate(&namespace, &name, traffic));
        }
        WaypointCommand::Apply {
            target,
            namespace,
            name,
            traffic,
            enroll_namespace,
            overwrite,
            wait,
            timeout,
        } => {
            let cluster = open(&target)?;
            let options = waypoint::ApplyOptions {
                namespace: namespace.clone(),
                name: name.clone(),
                traffic,
                enroll_namespace,
                overwrite,
            };
            let applied = waypoint::apply(cluster.objects()?, &options)?;
            if !applied.namespace_ambient {
                eprintln!(
                    "warning: namespace {namespace} is not labelled {}=ambient: its workloads are not in the mesh, so they do not use the waypoint",
                    waypoint::DATAPLANE_MODE_LABEL
                );
            }
            let verb = match applied.outcome {
                Outcome::Created => "applied",
                Outcome::Configured => "configured",
                Outcome::Unchanged => "unchanged",
            };
            println!("waypoint {namespace}/{name} {verb}");
            if applied.enrolled {
                println!(
                    "namespace {namespace} labelled with \"{}: {name}\"",
                    waypoint::USE_WAYPOINT_LABEL
                );
            }
            if wait {
                waypoint::wait_programmed(
                    cluster.objects()?,
                    &namespace,
                    &name,
                    timeout,
                    std::time::Duration::from_millis(200),
                )?;
                println!("waypoint {namespace}/{name} is programmed");
            }
        }
        WaypointCommand::List {
            target,
            namespace,
            all_namespaces,
            output,
        } => {
            let cluster = open(&target)?;
            let ns = (!all_namespaces).then_some(namespace.as_str());
            let gateways = waypoint::waypoints(cluster.objects()?, ns)?;
            if gateways.is_empty() && output == "table" {
                match ns {
                    Some(ns) => println!("no waypoints found in namespace {ns}"),
                    None => println!("no waypoints found"),
                }
            } else {
                let report = waypoint::list_report(&gateways);
                print!("{}", report.render(&output).map_err(anyhow::Error::msg)?);
            }
        }
        WaypointCommand::Status {
            target,
            namespace,
            name,
            output,
        } => {
            let cluster = open(&target)?;
            let mut gateways = waypoint::waypoints(cluster.objects()?, Some(&namespace))?;
            if let Some(name) = &name {
                gateways.retain(|g| g.name() == name);
                if gateways.is_empty() {
                    bail!(waypoint::Error::NotFound {
                        namespace,
                        name: name.clone()
                    });
                }
            }
            if gateways.is_empty() && output == "table" {
                println!("no waypoints found in namespace {namespace}");
            } else {
                let report = waypoint::status_report(&gateways);
                print!("{}", report.render(&output).map_err(anyhow::Error::msg)?);
            }
        }
        WaypointCommand::Delete {
            target,
            namespace,
            names,
            all,
        } => {
            let cluster = open(&target)?;
            let selection = if all {
                waypoint::Selection::All
            } else {
                waypoint::Selection::Names(names)
            };
            let mut missing = false;
            for (key, existed) in waypoint::delete(cluster.objects()?, &namespace, &selection)? {
                if existed {
                    println!("waypoint {namespace}/{} deleted", key.name);
                } else {
                    missing = true;
                    eprintln!("waypoint {namespace}/{} not found", key.name);
                }
            }
            if missing {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn kind_of(kind: &str) -> anyhow::Result<(&'static str, &'static str)> {
    Ok(match kind.to_ascii_lowercase().as_str() {
        "pods" | "pod" | "po" => ("", "Pod"),
        "services" | "service" | "svc" => ("", "Service"),
        "gateways" | "gateway" | "gtw" => ("gateway.networking.k8s.io", "Gateway"),
        "deployments" | "deployment" | "deploy" => ("apps", "Deployment"),
        "endpointslices" | "endpointslice" => ("discovery.k8s.io", "EndpointSlice"),
        "namespaces" | "namespace" | "ns" => ("", "Namespace"),
        "nodes" | "node" => ("", "Node"),
        "serviceaccounts" | "serviceaccount" | "sa" => ("", "ServiceAccount"),
        "authorizationpolicies" | "authorizationpolicy" => {
            ("security.istio.io", "AuthorizationPolicy")
        }
        "peerauthentications" | "peerauthentication" => ("security.istio.io", "PeerAuthentication"),
        "httproutes" | "httproute" => ("gateway.networking.k8s.io", "HTTPRoute"),
        other => bail!("unknown kind {other:?}"),
    })
}

fn print_objects(
    cluster: &Cluster,
    kind: &str,
    namespace: Option<&str>,
    output: &str,
) -> anyhow::Result<()> {
    let (group, kind_name) = kind_of(kind)?;
    let objects: Vec<Object> = cluster
        .objects()?
        .list(group, kind_name)?
        .into_iter()
        .filter(|o| namespace.is_none_or(|ns| o.namespace().is_none_or(|n| n == ns)))
        .collect();
    match output {
        "json" => {
            let items: Vec<&serde_json::Value> = objects.iter().map(|o| &o.0).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"kind": "List", "items": items}))?
            );
            return Ok(());
        }
        "yaml" => {
            for object in &objects {
                println!("---\n{}", serde_yaml::to_string(&object.0)?.trim_end());
            }
            return Ok(());
        }
        "table" => {}
        other => bail!("unknown output format {other:?} (table, yaml or json)"),
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("<none>").to_owned();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let header: Vec<&str> = match kind_name {
        "Pod" => vec!["NAMESPACE", "NAME", "READY", "STATUS", "IP", "NODE"],
        "Service" => vec!["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORTS"],
        "Gateway" => vec!["NAMESPACE", "NAME", "CLASS", "ADDRESS", "PROGRAMMED"],
        _ => vec!["NAMESPACE", "NAME"],
    };
    for o in &objects {
        let v = &o.0;
        let ns = o.namespace().unwrap_or("").to_owned();
        let name = o.name().to_owned();
        rows.push(match kind_name {
            "Pod" => {
                let statuses = v["status"]["containerStatuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let ready = statuses.iter().filter(|s| s["ready"] == true).count();
                let total = v["spec"]["containers"].as_array().map_or(0, Vec::len);
                vec![
                    ns,
                    name,
                    format!("{ready}/{total}"),
                    // As kubectl: the pod's reason when it has one, else its phase.
                    v["status"]["reason"]
                        .as_str()
                        .or_else(|| v["status"]["phase"].as_str())
                        .unwrap_or("Pending")
                        .to_owned(),
                    text(&v["status"]["podIP"]),
                    text(&v["spec"]["nodeName"]),
                ]
            }
            "Service" => {
                let ports: Vec<String> = v["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
                    .collect();
                vec![
                    ns,
                    name,
                    text(&v["spec"]["type"]),
                    text(&v["spec"]["clusterIP"]),
                    ports.join(","),
                ]
            }
            "Gateway" => {
                let programmed = v["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == "Programmed")
                    .map_or("Unknown".to_owned(), |c| text(&c["status"]));
                vec![
                    ns,
                    name,
                    text(&v["spec"]["gatewayClassName"]),
                    text(&v["status"]["addresses"][0]["value"]),
                    programmed,
                ]
            }
            _ => vec![ns, name],
        });
    }
    print!("{}", inspect::render_table(&header, &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn waypoint_commands_take_istioctl_flags_and_select_the_cluster_with_cluster() {
        let cli = Cli::try_parse_from([
            "weft",
            "waypoint",
            "apply",
            "-n",
            "app",
            "--name",
            "wp",
            "--for",
            "workload",
            "--enroll-namespace",
            "--wait",
            "--timeout",
            "2m",
            "--cluster",
            "e2e",
        ])
        .unwrap();
        let Command::Waypoint {
            command:
                WaypointCommand::Apply {
                    target,
                    namespace,
                    name,
                    traffic,
                    enroll_namespace,
                    overwrite,
                    wait,
                    timeout,
                },
        } = cli.command
        else {
            panic!("not waypoint apply");
        };
        assert_eq!(target.cluster, "e2e");
        assert_eq!((namespace.as_str(), name.as_str()), ("app", "wp"));
        assert_eq!(traffic, Some(waypoint::For::Workload));
        assert!(enroll_namespace && wait && !overwrite);
        assert_eq!(timeout, std::time::Duration::from_secs(120));
        assert!(Cli::try_parse_from(["weft", "waypoint", "delete"]).is_err());
        assert!(Cli::try_parse_from(["weft", "waypoint", "delete", "--all", "wp"]).is_err());
        assert!(Cli::try_parse_from(["weft", "waypoint", "delete", "-n", "app", "a", "b"]).is_ok());
        assert!(Cli::try_parse_from(["weft", "waypoint", "list", "-A"]).is_ok());
        assert!(
            Cli::try_parse_from(["weft", "waypoint", "status", "--name", "wp", "-o", "json"])
                .is_ok()
        );
    }

    #[test]
    fn every_verb_selects_the_cluster_with_cluster() {
        for argv in [
            &["weft", "cluster", "up", "--cluster", "c"][..],
            &["weft", "cluster", "get", "pods", "-A", "--cluster", "c"],
            &[
                "weft",
                "cluster",
                "exec",
                "--cluster",
                "c",
                "ns/p",
                "--",
                "true",
            ],
            &[
                "weft",
                "ztunnel-config",
                "workloads",
                "--cluster",
                "c",
                "-o",
                "json",
            ],
            &["weft", "proxy-status", "--cluster", "c", "-o", "yaml"],
            &["weft", "demo", "--cluster", "c"],
            &[
                "weft",
                "waypoint",
                "list",
                "-A",
                "--cluster",
                "c",
                "-o",
                "json",
            ],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let cluster = match &cli.command {
                Command::Cluster { command } => match command {
                    ClusterCommand::Up { target, .. }
                    | ClusterCommand::Get { target, .. }
                    | ClusterCommand::Exec { target, .. } => target.cluster.clone(),
                    other => panic!("{other:?}"),
                },
                Command::ZtunnelConfig { target, .. } | Command::ProxyStatus { target, .. } => {
                    target.cluster.clone()
                }
                Command::Demo { name, .. } => name.clone(),
                Command::Waypoint {
                    command: WaypointCommand::List { target, .. },
                } => target.cluster.clone(),
                other => panic!("{other:?}"),
            };
            assert_eq!(cluster, "c", "{argv:?}");
            assert!(old_cluster_name(&cli.command).is_none_or(|o| o.refuse().is_ok()));
        }
    }

    #[test]
    fn the_old_cluster_spelling_is_refused_with_the_new_one() {
        for argv in [
            &["weft", "cluster", "up", "--name", "c"][..],
            &["weft", "cluster", "get", "pods", "--name", "c"],
            &["weft", "ztunnel-config", "workloads", "--name", "c"],
            &["weft", "proxy-status", "--name", "c"],
            &["weft", "demo", "down", "--name", "c"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let err = old_cluster_name(&cli.command)
                .expect("a verb whose only object is the cluster")
                .refuse()
                .expect_err("the old spelling is refused");
            assert!(
                err.to_string().contains("use `--cluster c`"),
                "{argv:?}: {err}"
            );
        }
        // `weft waypoint … --name` names the waypoint, as before.
        let cli = Cli::try_parse_from(["weft", "waypoint", "apply", "--name", "wp"]).unwrap();
        assert!(old_cluster_name(&cli.command).is_none());
    }
}
