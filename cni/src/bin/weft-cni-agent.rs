//! `weft-cni-agent`: Weft's node agent. Reads pods from the local cluster's object store
//! (`--files`) or from Kubernetes (the default), and optionally installs the `weft-cni` plugin
//! on the node (installer mode).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgAction, Parser};
use serde_json::{Map, Value, json};
use tracing::info;
use weft_cni::agent::{Agent, Config};
use weft_cni::annotate::Annotator;
use weft_cni::{install, probe, zds};
use weft_k8s::{Index, files, store::Store};

/// The node agent: enrollment, in-pod rules, ZDS hand-off, host-side probe SNAT and, when
/// asked, installing the CNI plugin.
///
/// Config source: with `--files DIR`, the local cluster's object store (pods are captured from
/// CNI records only); without it, the Kubernetes API (in-cluster service account or
/// KUBECONFIG): all Namespaces and the Pods with `spec.nodeName=<node>`; running pods enrolled
/// later are found through procfs (`--proc-root`).
///
/// Installer mode (`--install-cni-bin-dir` with `--cni-conf-dir`): copies the plugin into the
/// bin dir, chains it into the first `.conflist`/`.conf` of the conf dir, and repairs both every
/// 2 s until exit.
#[derive(Debug, Parser)]
#[command(name = "weft-cni-agent", version)]
struct Args {
    /// The node this agent serves.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Directory of manifests (the local cluster's object store). Without it the agent reads
    /// Kubernetes.
    #[arg(long)]
    files: Option<PathBuf>,
    /// Procfs used to find running pods' network namespaces (Kubernetes mode only; mount the
    /// host's /proc here when the agent runs in a container with its own).
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
    /// Socket the CNI plugin calls.
    #[arg(long, default_value = "/var/run/weft-cni/cni-agent.sock")]
    plugin_socket: PathBuf,
    /// ZDS socket ztunnel connects to.
    #[arg(long, default_value = zds_default())]
    zds_socket: PathBuf,
    /// Where pod records are kept.
    #[arg(long, default_value = "/var/run/weft-cni")]
    run_dir: PathBuf,
    /// Namespaces never enrolled.
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    exclude_namespaces: Vec<String>,
    /// Redirect DNS to ztunnel's DNS proxy.
    #[arg(long, default_value_t = false)]
    dns_capture: bool,
    /// SNAT locally generated TCP (kubelet probes) to enrolled pods to 169.254.7.127 /
    /// fd16:9254:7127:1337:ffff:ffff:ffff:ffff in the agent's network namespace, which must be
    /// the node's (nftables table `inet weft-ambient-host`). Pods must be able to route replies
    /// to that address (a default route does; the local cluster's pods get a route to it).
    #[arg(long, action = ArgAction::Set, default_value_t = true)]
    probe_snat: bool,
    /// Installer mode: the CNI bin dir to copy the plugin into (e.g. /opt/cni/bin). Needs
    /// --cni-conf-dir.
    #[arg(long, requires = "cni_conf_dir")]
    install_cni_bin_dir: Option<PathBuf>,
    /// Installer mode: the CNI conf dir whose primary config gets our entry (e.g.
    /// /etc/cni/net.d). Needs --install-cni-bin-dir.
    #[arg(long, requires = "install_cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    /// Installer mode: the plugin binary to install [default: weft-cni beside this executable].
    #[arg(long)]
    plugin_binary: Option<PathBuf>,
    /// Installer mode: `log_file` written into the plugin's config entry (the plugin logs to
    /// stderr without it).
    #[arg(long)]
    plugin_log_file: Option<PathBuf>,
    /// Installer mode: `agent_timeout_ms` written into the plugin's config entry (milliseconds;
    /// the plugin's default, 5000, when unset).
    #[arg(long)]
    plugin_agent_timeout_ms: Option<u64>,
    /// Installer mode: take our entry out of the CNI config when the agent exits.
    #[arg(long, default_value_t = false)]
    uninstall_on_exit: bool,
}

const fn zds_default() -> &'static str {
    "/var/run/ztunnel/ztunnel.sock"
}

/// The installer's settings, when installer mode is on.
fn installer(args: &Args) -> anyhow::Result<Option<install::Config>> {
    let (Some(bin_dir), Some(conf_dir)) = (&args.install_cni_bin_dir, &args.cni_conf_dir) else {
        return Ok(None);
    };
    let plugin_binary = match &args.plugin_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating the agent's executable to find weft-cni beside it")?
            .with_file_name(install::PLUGIN_TYPE),
    };
    anyhow::ensure!(
        plugin_binary.is_file(),
        "plugin binary {} does not exist (set --plugin-binary)",
        plugin_binary.display()
    );
    let mut entry = Map::new();
    entry.insert("agent_socket".into(), json!(args.plugin_socket));
    entry.insert("exclude_namespaces".into(), json!(args.exclude_namespaces));
    if let Some(log) = &args.plugin_log_file {
        entry.insert("log_file".into(), json!(log));
    }
    if let Some(ms) = args.plugin_agent_timeout_ms {
        anyhow::ensure!(ms > 0, "--plugin-agent-timeout-ms must be > 0");
        entry.insert("agent_timeout_ms".into(), Value::from(ms));
    }
    Ok(Some(install::Config {
        bin_dir: bin_dir.clone(),
        conf_dir: conf_dir.clone(),
        plugin_binary,
        entry,
        poll: install::DEFAULT_POLL,
        uninstall_on_exit: args.uninstall_on_exit,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _logs = weft_core::logging::init();
    let args = Args::parse();
    info!(config = ?args, "starting");
    let installer = installer(&args)?;
    let probe_snat = args.probe_snat;
    let index = Index::new();
    let (annotator, proc_root) = match &args.files {
        Some(dir) => {
            let mut watcher = files::Watcher::new(dir);
            watcher.scan(&index);
            tokio::spawn(files::run(
                watcher,
                index.clone(),
                Duration::from_millis(200),
                std::future::pending(),
            ));
            (Annotator::Store(Store::new(dir)), None)
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to Kubernetes (no --files given)")?;
            weft_k8s::apiserver::spawn_node(client.clone(), index.clone(), &args.node);
            (Annotator::Kube(client), Some(args.proc_root.clone()))
        }
    };
    let (stop_installer, installer_stopped) = tokio::sync::oneshot::channel::<()>();
    let installer_task = installer.map(|config| {
        tokio::spawn(install::run(config, async {
            let _ = installer_stopped.await;
        }))
    });
    // No ztunnel is taken before every recorded pod is restored (its snapshot must be whole).
    let server = zds::Server::bind_closed(&args.zds_socket)?;
    let agent = Agent::new(
        Config {
            node: args.node,
            plugin_socket: args.plugin_socket,
            run_dir: args.run_dir,
            excluded_namespaces: args.exclude_namespaces,
            dns_capture: args.dns_capture,
            pod_wait: Duration::from_secs(3),
            proc_root,
        },
        index,
        annotator,
        server,
        probe_snat.then(probe::Snat::new),
    );
    agent.restore().await;
    agent.open_zds();
    tokio::spawn(agent.clone().run_reconciler());
    let serve = agent.serve_plugin();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let result = tokio::select! {
        result = serve => result.map_err(anyhow::Error::from),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
    };
    // The installer finishes its pass (and uninstalls when asked) before the agent exits.
    let _ = stop_installer.send(());
    if let Some(task) = installer_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    result
}
