//! The controller's one `Config`, parsed from flags and `WEFT_CONTROLLER_*` environment variables.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use weft_core::duration;

/// Where Kubernetes objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory of manifests watched live (the local cluster's object store).
    Files(PathBuf),
    /// The Kubernetes API (in-cluster config or `KUBECONFIG`).
    Kubernetes,
}

/// Parses a `KEY=VALUE` environment entry (the key must be non-empty).
///
/// # Errors
/// A message naming the bad entry.
pub fn parse_env_entry(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Everything the controller is configured with.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "weft-controller", version, about = "Weft's control plane")]
pub struct Config {
    /// Watch this directory of manifests instead of the Kubernetes API.
    #[arg(long, env = "WEFT_CONTROLLER_FILES")]
    pub files: Option<PathBuf>,
    /// gRPC (xDS + CA, TLS) listen address.
    #[arg(long, env = "WEFT_CONTROLLER_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Debug HTTP listen address (`/debug/connections`, `/debug/resources`, `/ready`).
    #[arg(
        long,
        env = "WEFT_CONTROLLER_DEBUG_LISTEN",
        default_value = "127.0.0.1:15014"
    )]
    pub debug_listen: SocketAddr,
    /// State directory: the CA root (`ca/`), bootstrap tokens (`tokens/`).
    #[arg(
        long,
        env = "WEFT_CONTROLLER_STATE_DIR",
        default_value = "/var/lib/weft-controller"
    )]
    pub state_dir: PathBuf,
    /// Trust domain of workload identities.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    pub trust_domain: String,
    /// Root namespace (mesh-wide policies).
    #[arg(
        long,
        env = "WEFT_CONTROLLER_ROOT_NAMESPACE",
        default_value = "istio-system"
    )]
    pub root_namespace: String,
    /// `cluster_id` of workloads.
    #[arg(long, env = "WEFT_CONTROLLER_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Network of addresses (empty: the default network).
    #[arg(long, env = "WEFT_CONTROLLER_NETWORK", default_value = "")]
    pub network: String,
    /// Quiet period after a change before translating and pushing (e.g. `100ms`).
    #[arg(long, env = "WEFT_CONTROLLER_DEBOUNCE", default_value = "100ms", value_parser = duration::parse)]
    pub debounce: Duration,
    /// Interval between scans of the files source (e.g. `200ms`).
    #[arg(long, env = "WEFT_CONTROLLER_FILES_POLL", default_value = "200ms", value_parser = duration::parse)]
    pub files_poll: Duration,
    /// How long open streams may run after shutdown starts before they are closed (e.g. `5s`).
    #[arg(long, env = "WEFT_CONTROLLER_DRAIN_DEADLINE", default_value = "5s", value_parser = duration::parse)]
    pub drain_deadline: Duration,
    /// Callers allowed to impersonate pods on their node (`namespace/service-account`).
    #[arg(
        long = "node-account",
        env = "WEFT_CONTROLLER_NODE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "istio-system/ztunnel"
    )]
    pub node_accounts: Vec<String>,
    /// Audience of projected service-account tokens (Kubernetes source).
    #[arg(
        long,
        env = "WEFT_CONTROLLER_TOKEN_AUDIENCE",
        default_value = "istio-ca"
    )]
    pub token_audience: String,
    /// DNS names in the serving certificate.
    #[arg(
        long = "serving-dns",
        env = "WEFT_CONTROLLER_SERVING_DNS",
        value_delimiter = ',',
        default_value = "weft-controller.istio-system.svc,localhost"
    )]
    pub serving_dns: Vec<String>,
    /// IP addresses in the serving certificate.
    #[arg(
        long = "serving-ip",
        env = "WEFT_CONTROLLER_SERVING_IPS",
        value_delimiter = ',',
        default_value = "127.0.0.1"
    )]
    pub serving_ips: Vec<IpAddr>,
    /// Longest workload certificate validity (e.g. `24h`).
    #[arg(long, env = "WEFT_CONTROLLER_MAX_CERT_TTL", default_value = "24h", value_parser = duration::parse)]
    pub max_cert_ttl: Duration,
    /// Command of the waypoint container in provisioned waypoint Deployments.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_WAYPOINT_COMMAND",
        default_value = "waypoint"
    )]
    pub waypoint_command: String,
    /// Image of the waypoint container in provisioned waypoint Deployments.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_WAYPOINT_IMAGE",
        default_value = "ghcr.io/weft-mesh/waypoint:latest"
    )]
    pub waypoint_image: String,
    /// Extra `KEY=VALUE` environment of the waypoint container, after Weft's own, in order
    /// (repeatable; in the environment variable, one entry per line).
    #[arg(
        long = "waypoint-env",
        env = "WEFT_CONTROLLER_WAYPOINT_ENV",
        value_delimiter = '\n',
        value_parser = parse_env_entry
    )]
    pub waypoint_env: Vec<(String, String)>,
}

impl Config {
    /// The configured source.
    pub fn source(&self) -> Source {
        match &self.files {
            Some(dir) => Source::Files(dir.clone()),
            None => Source::Kubernetes,
        }
    }

    /// Where bootstrap tokens live (files source).
    pub fn token_dir(&self) -> PathBuf {
        self.state_dir.join("tokens")
    }

    /// Where the local cluster runner registers pod tokens (files source):
    /// `<state dir>/tokens/pods/<hex sha256(token)>.json`.
    pub fn pod_token_dir(&self) -> PathBuf {
        self.token_dir().join("pods")
    }

    /// Where the CA root lives.
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations_and_defaults() {
        let config = Config::try_parse_from(["weft-controller", "--files", "/tmp/x"]).unwrap();
        assert_eq!(config.source(), Source::Files("/tmp/x".into()));
        assert_eq!(config.node_accounts, ["istio-system/ztunnel"]);
        assert_eq!(config.debounce, Duration::from_millis(100));
        let err =
            Config::try_parse_from(["weft-controller", "--debounce", "x", "--listen", "nope"])
                .unwrap_err();
        assert!(
            err.to_string().contains("nope") || err.to_string().contains("\"x\""),
            "{err}"
        );
    }

    #[test]
    fn waypoint_flags() {
        let config = Config::try_parse_from(["weft-controller"]).unwrap();
        assert_eq!(config.waypoint_command, "waypoint");
        assert_eq!(config.waypoint_image, "ghcr.io/weft-mesh/waypoint:latest");
        assert!(config.waypoint_env.is_empty());
        let config = Config::try_parse_from([
            "weft-controller",
            "--waypoint-command",
            "/bin/wp",
            "--waypoint-env",
            "XDS_ADDRESS=https://10.0.0.1:15012",
            "--waypoint-env",
            "AUTH_TOKEN=$(WEFT_SERVICE_ACCOUNT_TOKEN_FILE)",
            "--waypoint-env",
            "EMPTY=",
        ])
        .unwrap();
        assert_eq!(config.waypoint_command, "/bin/wp");
        assert_eq!(
            config.waypoint_env,
            [
                (
                    "XDS_ADDRESS".to_owned(),
                    "https://10.0.0.1:15012".to_owned()
                ),
                (
                    "AUTH_TOKEN".to_owned(),
                    "$(WEFT_SERVICE_ACCOUNT_TOKEN_FILE)".to_owned()
                ),
                ("EMPTY".to_owned(), String::new()),
            ]
        );
        let err =
            Config::try_parse_from(["weft-controller", "--waypoint-env", "NOVALUE"]).unwrap_err();
        assert!(err.to_string().contains("NOVALUE"), "{err}");
    }
}
