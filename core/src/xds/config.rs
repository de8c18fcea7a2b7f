//! How the client reaches the controller: address, TLS roots, bearer token, cluster id, node
//! identity, on-demand types and reconnect backoff (istio-ztunnel.md §2.1, §2.3, §2.4).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use weft_proto::envoy::config::core::v3::Node;

/// Connect timeout per attempt (TCP + TLS handshake), as ztunnel: 5 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PING interval on the xDS connection, as ztunnel: 30 s.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long an HTTP/2 PING may go unanswered before the connection is closed: 10 s.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive idle time on the xDS connection: 300 s.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(300);
/// Largest `DeltaDiscoveryResponse` the client decodes, in bytes (ztunnel: 200 MiB).
pub const MAX_RESPONSE_BYTES: usize = 200 * 1024 * 1024;

/// Client settings. Build with [`Config::new`] and adjust the public fields.
#[derive(Clone)]
pub struct Config {
    /// The xDS server: `https://host:port` (TLS, needs [`Config::tls`]) or `http://host:port`
    /// (plaintext; tests and loopback only). ztunnel's default is
    /// `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// Server-authenticated TLS settings; required for `https`, refused for `http`.
    pub tls: Option<Tls>,
    /// Source of the `authorization: Bearer <token>` header, read again for every connection
    /// attempt; `None` sends no `authorization` header.
    pub token: Option<Arc<dyn TokenSource>>,
    /// Sent as the `clusterid` header on every stream; default `Kubernetes`.
    pub cluster_id: String,
    /// The `Node` sent on each initial request.
    pub node: NodeInfo,
    /// Type URLs subscribed on demand ("subscribe to nothing", then one name at a time via
    /// [`Handle::demand`](super::Handle::demand)); every other registered type is a wildcard
    /// subscription. Default: none.
    pub on_demand_types: Vec<&'static str>,
    /// First reconnect delay after a failure, and the delay after a normal stream end;
    /// default 10 ms. Must be non-zero and at most [`Config::backoff_max`].
    pub backoff_initial: Duration,
    /// Cap of the doubling reconnect delay; default 15 s.
    pub backoff_max: Duration,
}

impl Config {
    /// Settings for `address` with ztunnel's defaults: no TLS, no token, cluster id
    /// `Kubernetes`, empty node, no on-demand types, backoff 10 ms doubling to 15 s.
    pub fn new(address: impl Into<String>) -> Self {
        Config {
            address: address.into(),
            tls: None,
            token: None,
            cluster_id: "Kubernetes".to_owned(),
            node: NodeInfo::default(),
            on_demand_types: Vec::new(),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(15),
        }
    }

    /// The tonic endpoint: address, TLS and the connection settings above.
    ///
    /// # Errors
    /// [`ConfigError`] for an unparsable address, a scheme other than `http`/`https`, TLS
    /// missing for `https` or present for `http`, or TLS settings tonic refuses.
    pub(crate) fn endpoint(&self) -> Result<Endpoint, ConfigError> {
        let endpoint =
            Endpoint::from_shared(self.address.clone()).map_err(|source| ConfigError::Address {
                address: self.address.clone(),
                source,
            })?;
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(TCP_KEEPALIVE));
        match (endpoint.uri().scheme_str(), &self.tls) {
            (Some("https"), Some(tls)) => {
                let mut config =
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.root_pem));
                if let Some(name) = &tls.server_name {
                    config = config.domain_name(name.clone());
                }
                endpoint
                    .tls_config(config)
                    .map_err(|source| ConfigError::Tls { source })
            }
            (Some("https"), None) => Err(ConfigError::MissingTls {
                address: self.address.clone(),
            }),
            (Some("http"), None) => Ok(endpoint),
            (Some("http"), Some(_)) => Err(ConfigError::UnexpectedTls {
                address: self.address.clone(),
            }),
            _ => Err(ConfigError::Scheme {
                address: self.address.clone(),
            }),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("cluster_id", &self.cluster_id)
            .field("node", &self.node)
            .field("on_demand_types", &self.on_demand_types)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// Server-authenticated TLS to the controller (no client certificate; istio-ztunnel.md §2.1).
#[derive(Clone, PartialEq, Eq)]
pub struct Tls {
    /// PEM bundle of the roots that verify the server (ztunnel: `XDS_ROOT_CA`, default
    /// `./var/run/secrets/istio/root-cert.pem`).
    pub root_pem: String,
    /// Name verified in the server certificate instead of the address's host
    /// (ztunnel: `ALT_XDS_HOSTNAME`); also sent as SNI.
    pub server_name: Option<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("root_pem_bytes", &self.root_pem.len())
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// The proxy's `envoy.config.core.v3.Node` (istio-ztunnel.md §2.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `Node.id`; for ztunnel `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` (istiod
    /// recognises the proxy type by the `ztunnel` prefix).
    pub id: String,
    /// `Node.metadata` as a Struct of strings (`NAME`, `NAMESPACE`, `INSTANCE_IPS`,
    /// `NODE_NAME`, ...).
    pub metadata: BTreeMap<String, String>,
}

impl NodeInfo {
    /// The wire `Node`: id and metadata; `cluster` and `build_version` left empty as ztunnel.
    pub(crate) fn to_proto(&self) -> Node {
        use prost_types::value::Kind;
        let fields = self
            .metadata
            .iter()
            .map(|(k, v)| {
                let value = prost_types::Value {
                    kind: Some(Kind::StringValue(v.clone())),
                };
                (k.clone(), value)
            })
            .collect();
        Node {
            id: self.id.clone(),
            metadata: Some(prost_types::Struct { fields }),
            ..Node::default()
        }
    }
}

/// Where the bearer token comes from; called once per connection attempt, so a rotated token
/// (the projected service-account JWT, 12 h) is picked up on the next reconnect.
///
/// Implemented for closures `Fn() -> Result<String, TokenError>` and by [`FileToken`].
pub trait TokenSource: Send + Sync + 'static {
    /// The token, without the `Bearer ` prefix.
    ///
    /// # Errors
    /// [`TokenError`] when the token cannot be read; the attempt counts as a connection error
    /// and is retried with backoff.
    fn token(&self) -> Result<String, TokenError>;
}

impl<F> TokenSource for F
where
    F: Fn() -> Result<String, TokenError> + Send + Sync + 'static,
{
    fn token(&self) -> Result<String, TokenError> {
        self()
    }
}

/// A token read from a file on every call, surrounding whitespace trimmed (ztunnel:
/// `AUTH_TOKEN`, default `./var/run/secrets/tokens/istio-token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileToken {
    /// The token file.
    pub path: PathBuf,
}

impl TokenSource for FileToken {
    fn token(&self) -> Result<String, TokenError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| TokenError::Read {
            path: self.path.clone(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty {
                path: self.path.clone(),
            });
        }
        Ok(token.to_owned())
    }
}

/// Why the bearer token could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("reading token file {path}")]
    Read {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The token file holds only whitespace.
    #[error("token file {path} is empty")]
    Empty {
        /// The token file.
        path: PathBuf,
    },
}

/// Why a [`Config`] and handler set cannot make a client.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The address is not a URI tonic accepts.
    #[error("invalid xds address {address:?}")]
    Address {
        /// The configured address.
        address: String,
        /// tonic's parse error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The address has no scheme or one other than `https`/`http`.
    #[error("xds address {address:?} must start with https:// or http://")]
    Scheme {
        /// The configured address.
        address: String,
    },
    /// `https` without [`Config::tls`].
    #[error("xds address {address:?} uses https but no TLS roots are configured")]
    MissingTls {
        /// The configured address.
        address: String,
    },
    /// `http` with [`Config::tls`] set: refused rather than silently ignoring the roots.
    #[error("xds address {address:?} is plaintext http but TLS roots are configured")]
    UnexpectedTls {
        /// The configured address.
        address: String,
    },
    /// tonic refused the TLS settings.
    #[error("invalid xds TLS settings")]
    Tls {
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The cluster id cannot be sent as a header value.
    #[error("cluster id {cluster_id:?} is not a valid header value")]
    ClusterId {
        /// The configured cluster id.
        cluster_id: String,
    },
    /// `backoff_initial` is zero or above `backoff_max`.
    #[error("backoff initial delay {initial:?} must be non-zero and at most the maximum {max:?}")]
    Backoff {
        /// The configured initial delay.
        initial: Duration,
        /// The configured maximum delay.
        max: Duration,
    },
    /// No handler was given.
    #[error("no xds handlers registered")]
    NoHandlers,
    /// Two handlers claim the same type URL.
    #[error("two xds handlers for type url {type_url}")]
    DuplicateHandler {
        /// The type URL.
        type_url: &'static str,
    },
    /// An on-demand type URL has no handler.
    #[error("on-demand type url {type_url} has no handler")]
    OnDemandWithoutHandler {
        /// The type URL.
        type_url: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_schemes_and_tls() {
        let mut config = Config::new("http://127.0.0.1:15010");
        assert!(config.endpoint().is_ok());
        config.tls = Some(Tls {
            root_pem: String::new(),
            server_name: None,
        });
        assert!(matches!(
            config.endpoint(),
            Err(ConfigError::UnexpectedTls { .. })
        ));
        config.address = "https://istiod.istio-system.svc:15012".into();
        assert!(config.endpoint().is_ok());
        config.tls = None;
        assert!(matches!(
            config.endpoint(),
            Err(ConfigError::MissingTls { .. })
        ));
        config.address = "istiod:15012".into();
        assert!(config.endpoint().is_err(), "no scheme");
        config.address = "ftp://istiod:15012".into();
        assert!(matches!(config.endpoint(), Err(ConfigError::Scheme { .. })));
    }

    #[test]
    fn debug_hides_the_token() {
        let mut config = Config::new("http://127.0.0.1:1");
        config.token = Some(Arc::new(|| Ok("s3cret".to_owned())));
        let text = format!("{config:?}");
        assert!(
            !text.contains("s3cret") && text.contains("<hidden>"),
            "{text}"
        );
    }

    #[test]
    fn node_metadata_is_a_struct_of_strings() {
        let node = NodeInfo {
            id: "ztunnel~10.0.0.1~z.istio-system~istio-system.svc.cluster.local".into(),
            metadata: BTreeMap::from([("NAME".into(), "z".into())]),
        }
        .to_proto();
        let fields = node.metadata.unwrap().fields;
        assert_eq!(
            fields["NAME"].kind,
            Some(prost_types::value::Kind::StringValue("z".into()))
        );
        assert!(node.cluster.is_empty() && node.build_version.is_empty());
    }

    #[test]
    fn file_token_is_trimmed_and_reread() {
        let dir = std::env::temp_dir().join(format!("weft-xds-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = FileToken {
            path: dir.join("token"),
        };
        assert!(matches!(source.token(), Err(TokenError::Read { .. })));
        std::fs::write(&source.path, "  \n").unwrap();
        assert!(matches!(source.token(), Err(TokenError::Empty { .. })));
        std::fs::write(&source.path, "abc\n").unwrap();
        assert_eq!(source.token().unwrap(), "abc");
        std::fs::write(&source.path, "def").unwrap();
        assert_eq!(source.token().unwrap(), "def");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
