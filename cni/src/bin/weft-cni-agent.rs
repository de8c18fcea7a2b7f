//! `weft-cni-agent`: Weft's node agent (files config source).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use weft_cni::agent::{Agent, Config};
use weft_cni::zds;
use weft_k8s::{Index, files, store::Store};

/// The node agent: enrollment, in-pod rules, ZDS hand-off.
#[derive(Debug, Parser)]
#[command(name = "weft-cni-agent", version)]
struct Args {
    /// The node this agent serves.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Directory of manifests (the local cluster's object store).
    #[arg(long)]
    files: PathBuf,
    /// Socket the CNI plugin calls.
    #[arg(long, default_value = "/var/run/weft/cni-agent.sock")]
    plugin_socket: PathBuf,
    /// ZDS socket ztunnel connects to.
    #[arg(long, default_value = zds_default())]
    zds_socket: PathBuf,
    /// Where pod records are kept.
    #[arg(long, default_value = "/var/run/weft")]
    run_dir: PathBuf,
    /// Namespaces never enrolled.
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    exclude_namespaces: Vec<String>,
    /// Redirect DNS to ztunnel's DNS proxy.
    #[arg(long, default_value_t = false)]
    dns_capture: bool,
}

const fn zds_default() -> &'static str {
    "/var/run/ztunnel/ztunnel.sock"
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let index = Index::new();
    let mut watcher = files::Watcher::new(&args.files);
    watcher.scan(&index);
    tokio::spawn(files::run(
        watcher,
        index.clone(),
        Duration::from_millis(200),
        std::future::pending(),
    ));
    let server = zds::Server::bind(&args.zds_socket)?;
    let agent = Agent::new(
        Config {
            node: args.node,
            plugin_socket: args.plugin_socket,
            run_dir: args.run_dir,
            excluded_namespaces: args.exclude_namespaces,
            dns_capture: args.dns_capture,
            pod_wait: Duration::from_secs(3),
        },
        index,
        Store::new(&args.files),
        server,
    );
    agent.restore().await;
    tokio::spawn(agent.clone().run_reconciler());
    let serve = agent.serve_plugin();
    tokio::select! {
        result = serve => result?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
