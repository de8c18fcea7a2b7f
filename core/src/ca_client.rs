//! The CA client: obtains workload certificates from the controller's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` (istio-ztunnel reference §3) over
//! server-authenticated TLS with a bearer token, as a [`CaClient`] for the certificate manager.
//!
//! Each request carries a fresh P-256 key's CSR for the identity; in shared (node proxy) mode the
//! metadata `ImpersonatedIdentity` names it, and the returned leaf must carry exactly that
//! identity.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use weft_proto::istio::v1::auth::IstioCertificateRequest;
use weft_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

use crate::cert_manager::{CaClient, FetchError};
use crate::certs::WorkloadCertificate;
use crate::csr;
use crate::identity::SpiffeId;

/// Supplies the bearer token, re-read for every request (projected tokens rotate).
pub type TokenSource = Arc<dyn Fn() -> std::io::Result<String> + Send + Sync>;

/// Reads the token from a file on every request.
pub fn token_file(path: impl Into<std::path::PathBuf>) -> TokenSource {
    let path = path.into();
    Arc::new(move || std::fs::read_to_string(&path).map(|t| t.trim().to_owned()))
}

/// CA client settings.
#[derive(Clone)]
pub struct Config {
    /// `https://host:port` of the CA (the controller, port 15012).
    pub address: String,
    /// PEM roots that sign the CA's serving certificate.
    pub root_pem: String,
    /// Name verified in the CA's serving certificate.
    pub server_name: String,
    /// The bearer token.
    pub token: TokenSource,
    /// `clusterid` metadata; default `Kubernetes`.
    pub cluster_id: String,
    /// Requested validity (`validity_duration`); default 24 h.
    pub ttl: Duration,
    /// Whether to ask for other identities with `ImpersonatedIdentity` (node proxies).
    pub impersonate: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("server_name", &self.server_name)
            .field("cluster_id", &self.cluster_id)
            .field("ttl", &self.ttl)
            .field("impersonate", &self.impersonate)
            .finish_non_exhaustive()
    }
}

/// Errors building the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is not a valid URI.
    #[error("ca address {address:?} is not a valid uri")]
    Address {
        /// The CA address.
        address: String,
    },
    /// The TLS settings are invalid.
    #[error("ca client for {address}")]
    Transport {
        /// The CA address.
        address: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A gRPC client of the Istio CA protocol.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    config: Config,
}

impl Client {
    /// A client connecting lazily (on first use, and again after failures).
    ///
    /// # Errors
    /// [`Error::Transport`] for an invalid address or TLS configuration.
    pub fn new(config: Config) -> Result<Self, Error> {
        let transport = |source| Error::Transport {
            address: config.address.clone(),
            source,
        };
        let mut endpoint = Channel::from_shared(config.address.clone())
            .map_err(|_| Error::Address {
                address: config.address.clone(),
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        if config.address.starts_with("https://") {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&config.root_pem))
                .domain_name(config.server_name.clone());
            endpoint = endpoint.tls_config(tls).map_err(transport)?;
        }
        Ok(Client {
            channel: endpoint.connect_lazy(),
            config,
        })
    }

    /// Requests a certificate for `identity`.
    ///
    /// # Errors
    /// A [`FetchError`] naming what failed: the token, CSR generation, the RPC (with its gRPC
    /// status), or the returned chain (e.g. a leaf for another identity).
    pub async fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, FetchError> {
        use prost_types::{Struct, Value, value::Kind};
        let token = (self.config.token)().map_err(|e| format!("reading bearer token: {e}"))?;
        let generated = csr::generate(identity)?;
        let metadata = self.config.impersonate.then(|| Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: generated.csr_pem,
            validity_duration: i64::try_from(self.config.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        let headers = request.metadata_mut();
        headers.insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "bearer token is not a valid header value")?,
        );
        headers.insert(
            "clusterid",
            self.config
                .cluster_id
                .parse()
                .map_err(|_| "cluster id is not a valid header value")?,
        );
        let response = IstioCertificateServiceClient::new(self.channel.clone())
            .create_certificate(request)
            .await
            .map_err(|status| format!("CreateCertificate for {identity}: {status}"))?
            .into_inner();
        Ok(WorkloadCertificate::from_pem_chain(
            &response.cert_chain,
            &generated.key_pem,
            Some(identity),
        )?)
    }
}

impl CaClient for Client {
    fn fetch<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, FetchError>> {
        Box::pin(self.issue(identity))
    }
}
