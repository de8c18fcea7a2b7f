//! ztunnel's one `Config`, from flags or the environment variables Istio's ztunnel reads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use weft_core::{control_plane, duration};

/// Everything ztunnel is configured with.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ztunnel", version, about = "Weft's node L4 proxy")]
pub struct Config {
    /// The controller: xDS and CA addresses, roots, server name, cluster id.
    #[command(flatten)]
    pub control_plane: control_plane::Args,
    /// Bearer token file, re-read for every request.
    #[arg(
        long,
        env = "AUTH_TOKEN",
        default_value = "./var/run/secrets/tokens/istio-token"
    )]
    pub token: PathBuf,
    /// The node this ztunnel serves.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// ztunnel's own IP (for the xDS node id).
    #[arg(long, env = "INSTANCE_IP", default_value = "1.1.1.1")]
    pub instance_ip: String,
    /// ztunnel's pod name.
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pub pod_name: String,
    /// ztunnel's pod namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    /// ZDS socket the node agent listens on.
    #[arg(long, env = "INPOD_UDS", default_value = crate::zds::DEFAULT_SOCKET)]
    pub zds_socket: PathBuf,
    /// Admin endpoint (`/config_dump`, `/quitquitquit`); localhost only.
    #[arg(long, env = "WEFT_ZTUNNEL_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Metrics endpoint (`/metrics`, `/stats/prometheus`).
    #[arg(long, env = "WEFT_ZTUNNEL_STATS", default_value = "0.0.0.0:15020")]
    pub stats: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, env = "WEFT_ZTUNNEL_READINESS", default_value = "0.0.0.0:15021")]
    pub readiness: SocketAddr,
    /// How long a pod may wait for its workload and certificate before its add is refused.
    #[arg(long, env = "WEFT_ZTUNNEL_POD_START_TIMEOUT", default_value = "5s", value_parser = duration::parse)]
    pub pod_start_timeout: Duration,
    /// Requested workload certificate validity.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = duration::parse)]
    pub secret_ttl: Duration,
    /// Runtime worker threads (data-plane concurrency); at least 1 (Istio ztunnel's
    /// `ZTUNNEL_WORKER_THREADS`). Default 1: in the loopback L4 benchmark one thread moved a GB
    /// for 1.1-1.4 CPU-seconds against 1.5-1.8 with two (no cross-thread wake-ups and work
    /// stealing between the copy task and the HBONE connection task); raise it for nodes with
    /// many busy connections.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
}

impl Config {
    /// The xDS node id ztunnel sends (`ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub fn node_id(&self) -> String {
        format!(
            "ztunnel~{}~{}.{}~{}.svc.cluster.local",
            self.instance_ip, self.pod_name, self.pod_namespace, self.pod_namespace
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_and_node_id() {
        let config = Config::try_parse_from([
            "ztunnel",
            "--node-name",
            "node-1",
            "--instance-ip",
            "10.240.0.11",
        ])
        .unwrap();
        assert_eq!(
            config.node_id(),
            "ztunnel~10.240.0.11~ztunnel.istio-system~istio-system.svc.cluster.local"
        );
        assert_eq!(config.secret_ttl, Duration::from_secs(86400));
        assert_eq!(config.worker_threads, 1);
        assert_eq!(
            config.zds_socket,
            PathBuf::from("/var/run/ztunnel/ztunnel.sock")
        );
        assert!(
            Config::try_parse_from(["ztunnel"]).is_err(),
            "node name is required"
        );
    }
}
