//! The waypoint's one `Config`, from flags or the environment variables the controller's
//! Deployment sets (names as Istio's proxy and Weft's ztunnel read them).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use weft_core::{control_plane, duration};

/// Everything the waypoint is configured with.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "waypoint", version, about = "Weft's waypoint (L7 proxy)")]
pub struct Config {
    /// The controller: xDS and CA addresses, roots, server name, cluster id.
    #[command(flatten)]
    pub control_plane: control_plane::Args,
    /// Bearer token file, re-read for every request.
    #[arg(
        long,
        env = "AUTH_TOKEN",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub token: PathBuf,
    /// This pod's name.
    #[arg(long, env = "POD_NAME", default_value = "waypoint")]
    pub pod_name: String,
    /// This pod's namespace (the waypoint's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub pod_namespace: String,
    /// This pod's IPs, comma-separated (xDS node id; a GatewayAddress naming one binds to this
    /// waypoint). Unparsable entries are ignored with a warning.
    #[arg(long, env = "INSTANCE_IP", default_value = "")]
    pub instance_ip: String,
    /// The service account the waypoint runs as (its identity).
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "waypoint")]
    pub service_account: String,
    /// The waypoint (Gateway) name; default: the service account.
    #[arg(long, env = "WAYPOINT_NAME")]
    pub waypoint_name: Option<String>,
    /// Trust domain of the waypoint's SPIFFE identity.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Cluster domain suffix of service hostnames.
    #[arg(long, env = "DOMAIN_SUFFIX", default_value = "cluster.local")]
    pub domain_suffix: String,
    /// HBONE listener.
    #[arg(long, env = "WEFT_WAYPOINT_HBONE", default_value = "0.0.0.0:15008")]
    pub hbone: SocketAddr,
    /// Admin endpoint (`/config_dump`, `/logging`, `/quitquitquit`); localhost only.
    #[arg(long, env = "WEFT_WAYPOINT_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Metrics endpoint (`/metrics`, `/stats/prometheus`).
    #[arg(long, env = "WEFT_WAYPOINT_STATS", default_value = "0.0.0.0:15020")]
    pub stats: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, env = "WEFT_WAYPOINT_READINESS", default_value = "0.0.0.0:15021")]
    pub readiness: SocketAddr,
    /// Requested certificate validity.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = duration::parse)]
    pub secret_ttl: Duration,
    /// Runtime worker threads (proxy concurrency); at least 1. Default 1: on the 2-core bench
    /// machine one thread used 0.16 cores at 1,000 req/s against 0.20 for two (fewer
    /// cross-thread wake-ups) and served 24k instead of 18k req/s per core; scale waypoints
    /// out with replicas, or raise this.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// How long in-flight requests may run after SIGTERM before connections are closed.
    #[arg(long, env = "TERMINATION_DRAIN_DURATION", default_value = "5s", value_parser = duration::parse)]
    pub drain_duration: Duration,
}

impl Config {
    /// The waypoint's name (`--waypoint-name`, else the service account).
    pub fn waypoint_name(&self) -> &str {
        self.waypoint_name
            .as_deref()
            .unwrap_or(&self.service_account)
    }

    /// The waypoint service's hostname: `<name>.<namespace>.svc.<domain suffix>`.
    pub fn waypoint_hostname(&self) -> String {
        format!(
            "{}.{}.svc.{}",
            self.waypoint_name(),
            self.pod_namespace,
            self.domain_suffix
        )
    }

    /// The pod's IPs from `--instance-ip` (entries that are not IPs are skipped).
    pub fn instance_ips(&self) -> Vec<IpAddr> {
        self.instance_ip
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .filter_map(|s| match s.parse() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    tracing::warn!(value = s, "ignoring INSTANCE_IP entry that is not an IP");
                    None
                }
            })
            .collect()
    }

    /// The xDS node id (`waypoint~<ip>~<pod>.<ns>~<ns>.svc.<suffix>`).
    pub fn node_id(&self) -> String {
        format!(
            "waypoint~{}~{}.{}~{}.svc.{}",
            self.instance_ip,
            self.pod_name,
            self.pod_namespace,
            self.pod_namespace,
            self.domain_suffix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_and_names() {
        let config = Config::try_parse_from([
            "waypoint",
            "--pod-namespace",
            "app",
            "--service-account",
            "wp",
            "--instance-ip",
            "10.0.0.9",
        ])
        .unwrap();
        assert_eq!(config.waypoint_name(), "wp");
        assert_eq!(config.waypoint_hostname(), "wp.app.svc.cluster.local");
        assert_eq!(config.hbone, "0.0.0.0:15008".parse().unwrap());
        assert_eq!(config.worker_threads, 1);
        assert_eq!(config.admin, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(
            config.token,
            PathBuf::from("/var/run/secrets/tokens/istio-token")
        );
        assert_eq!(
            config.node_id(),
            "waypoint~10.0.0.9~waypoint.app~app.svc.cluster.local"
        );
        let named = Config::try_parse_from(["waypoint", "--waypoint-name", "gw"]).unwrap();
        assert_eq!(named.waypoint_name(), "gw");
        assert_eq!(config.instance_ips(), vec![IpAddr::from([10, 0, 0, 9])]);
        assert!(named.instance_ips().is_empty());
        assert_eq!(config.drain_duration, Duration::from_secs(5));
        assert_eq!(config.control_plane.xds_address, "https://localhost:15012");
    }
}
