//! How ztunnel and the waypoint reach the controller: the command-line flags they share
//! ([`Args`], flattened into each binary's `Config`) and [`Args::connect`], which starts the
//! delta xDS client and the certificate manager (CA client) from them. Flag and environment
//! names follow Istio's ztunnel (`XDS_ADDRESS`, `CA_ADDRESS`, `XDS_ROOT_CA`,
//! `ALT_XDS_HOSTNAME`, `CLUSTER_ID`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::{ca_client, cert_manager, drain, xds};

/// Errors starting the connection to the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The root certificates (`--root-cert`) could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The xDS client configuration is invalid.
    #[error("xds client")]
    Xds(#[from] xds::ConfigError),
    /// The CA client configuration is invalid.
    #[error("ca client")]
    Ca(#[from] ca_client::Error),
}

/// What a proxy tells the controller about itself, besides [`Args`].
#[derive(Debug, Clone)]
pub struct Proxy {
    /// The xDS `Node`: id and metadata (`NAME`, `NAMESPACE`, `INSTANCE_IPS`, …).
    pub node: xds::NodeInfo,
    /// Bearer token file (`AUTH_TOKEN`), re-read for every xDS connection attempt and CA
    /// request.
    pub token: PathBuf,
    /// Requested certificate validity (`SECRET_TTL`).
    pub secret_ttl: Duration,
    /// Whether the CA client asks for other identities (`ImpersonatedIdentity`): node
    /// proxies (ztunnel) only.
    pub impersonate: bool,
}

/// The started connection to the controller.
#[derive(Clone)]
pub struct Connection {
    /// The running delta xDS client's handle (readiness: first responses applied).
    pub xds: xds::Handle,
    /// Workload certificates from the CA, rotated before they expire.
    pub certificates: cert_manager::Manager,
}

/// The controller's addresses and how its serving certificate is verified; part of each
/// proxy's `Config` through `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Delta ADS address of the controller (`https://host:15012`).
    #[arg(long, env = "XDS_ADDRESS", default_value = "https://localhost:15012")]
    pub xds_address: String,
    /// CA address (default: the xDS address).
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// PEM roots verifying the controller.
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub root_cert: std::path::PathBuf,
    /// Name verified in the controller's serving certificate.
    #[arg(
        long,
        env = "ALT_XDS_HOSTNAME",
        default_value = "weft-controller.istio-system.svc"
    )]
    pub server_name: String,
    /// `clusterid` sent to the controller and the CA.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
}

impl Args {
    /// Reads `--root-cert`, starts the delta xDS client feeding `handlers` (a task that stops
    /// when `drain` starts) and creates the certificate manager; must run inside a tokio
    /// runtime.
    ///
    /// # Errors
    /// [`Error`]: the roots cannot be read, or the xDS or CA client settings are invalid.
    pub fn connect(
        &self,
        proxy: Proxy,
        handlers: Vec<Arc<dyn xds::Handler>>,
        drain: drain::Watch,
    ) -> Result<Connection, Error> {
        let root_pem = std::fs::read_to_string(&self.root_cert).map_err(|source| Error::Read {
            path: self.root_cert.display().to_string(),
            source,
        })?;
        let client = xds::Client::new(
            self.xds_config(&root_pem, &proxy.token, proxy.node),
            handlers,
        )?;
        let xds = client.handle();
        client.spawn(drain);
        let ca = ca_client::Client::new(self.ca_config(
            root_pem,
            &proxy.token,
            proxy.secret_ttl,
            proxy.impersonate,
        ))?;
        let certificates =
            cert_manager::Manager::new(Arc::new(ca), cert_manager::Config::default());
        Ok(Connection { xds, certificates })
    }

    /// The CA address: `--ca-address`, else `--xds-address`.
    pub fn ca_address(&self) -> String {
        self.ca_address
            .clone()
            .unwrap_or_else(|| self.xds_address.clone())
    }

    /// Delta xDS client settings: TLS verified by `root_pem` (the PEM text of `--root-cert`)
    /// against `--server-name`, the bearer token read from the file `token` on every
    /// connection attempt, `--cluster-id`, and `node`; the rest are [`xds::Config::new`]'s
    /// defaults.
    fn xds_config(&self, root_pem: &str, token: &Path, node: xds::NodeInfo) -> xds::Config {
        let mut config = xds::Config::new(self.xds_address.clone());
        config.tls = Some(xds::Tls {
            root_pem: root_pem.to_owned(),
            server_name: Some(self.server_name.clone()),
        });
        config.token = Some(Arc::new(xds::FileToken {
            path: token.to_path_buf(),
        }));
        config.cluster_id = self.cluster_id.clone();
        config.node = node;
        config
    }

    /// CA client settings: [`Args::ca_address`], TLS as for xDS, the bearer token read from
    /// the file `token` on every request, `--cluster-id`, the requested validity `ttl`, and
    /// whether to ask for other identities (`impersonate`: node proxies only).
    fn ca_config(
        &self,
        root_pem: String,
        token: &Path,
        ttl: Duration,
        impersonate: bool,
    ) -> ca_client::Config {
        ca_client::Config {
            address: self.ca_address(),
            root_pem,
            server_name: self.server_name.clone(),
            token: ca_client::token_file(token),
            cluster_id: self.cluster_id.clone(),
            ttl,
            impersonate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Config {
        #[command(flatten)]
        control_plane: Args,
    }

    #[test]
    fn defaults_and_client_settings() {
        let config = Config::try_parse_from(["proxy"]).unwrap().control_plane;
        assert_eq!(config.xds_address, "https://localhost:15012");
        assert_eq!(config.ca_address(), "https://localhost:15012");
        assert_eq!(
            config.root_cert,
            Path::new("./var/run/secrets/istio/root-cert.pem")
        );
        let node = xds::NodeInfo {
            id: "ztunnel~10.0.0.1~z.ns~ns.svc.cluster.local".into(),
            ..Default::default()
        };
        let xds = config.xds_config("roots", Path::new("/t"), node.clone());
        assert_eq!(xds.address, "https://localhost:15012");
        assert_eq!(xds.node, node);
        assert_eq!(xds.cluster_id, "Kubernetes");
        assert_eq!(
            xds.tls.unwrap().server_name.as_deref(),
            Some("weft-controller.istio-system.svc")
        );

        let config = Config::try_parse_from(["proxy", "--ca-address", "https://ca:15012"])
            .unwrap()
            .control_plane;
        let ca = config.ca_config(
            "roots".into(),
            Path::new("/t"),
            Duration::from_secs(60),
            true,
        );
        assert_eq!(ca.address, "https://ca:15012");
        assert_eq!(ca.ttl, Duration::from_secs(60));
        assert!(ca.impersonate);

        let config = Config::try_parse_from(["proxy", "--root-cert", "/nonexistent/roots.pem"])
            .unwrap()
            .control_plane;
        let proxy = Proxy {
            node,
            token: "/t".into(),
            secret_ttl: Duration::from_secs(60),
            impersonate: false,
        };
        let (_trigger, watch) = drain::channel();
        match config.connect(proxy, Vec::new(), watch) {
            Err(Error::Read { path, .. }) => assert_eq!(path, "/nonexistent/roots.pem"),
            Err(other) => panic!("want a read error, got {other}"),
            Ok(_) => panic!("connected without roots"),
        }
    }
}
