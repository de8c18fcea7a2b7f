//! The CA service: `istio.v1.auth.IstioCertificateService/CreateCertificate` (istio-ztunnel
//! reference §3, istio-ambient reference §3.8).
//!
//! Callers authenticate with a bearer token. A normal caller gets a certificate for its own
//! service account. A trusted node proxy (by default `istio-system/ztunnel`) may ask for another
//! identity with the `ImpersonatedIdentity` metadata, but only for a service account that has a
//! pod scheduled on the caller's own node. Validity is capped by the signer.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_core::SpiffeId;
use weft_core::ca::{self, Signer};
use weft_k8s::Index;
use weft_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use weft_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

use crate::auth::{Authenticator, Caller, authenticate_metadata};

/// Metadata key naming the identity a node proxy requests on behalf of a pod.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// CA settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Trust domain of every identity signed.
    pub trust_domain: String,
    /// Callers (`namespace/service-account`) allowed to impersonate pods on their node; default
    /// `istio-system/ztunnel`.
    pub trusted_node_accounts: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            trust_domain: "cluster.local".into(),
            trusted_node_accounts: vec!["istio-system/ztunnel".into()],
        }
    }
}

/// The gRPC CA service.
pub struct CaService {
    signer: Arc<Signer>,
    auth: Arc<dyn Authenticator>,
    index: Arc<Index>,
    config: Config,
}

impl CaService {
    /// A CA signing with `signer`, authenticating with `auth`, and checking node placement in
    /// `index`.
    pub fn new(
        signer: Arc<Signer>,
        auth: Arc<dyn Authenticator>,
        index: Arc<Index>,
        config: Config,
    ) -> Self {
        CaService {
            signer,
            auth,
            index,
            config,
        }
    }

    /// Decides which identity `caller` gets, or why not (`PermissionDenied`/`InvalidArgument`).
    fn identity_for(
        &self,
        caller: &Caller,
        impersonated: Option<&str>,
    ) -> Result<SpiffeId, Status> {
        let Some(requested) = impersonated else {
            return SpiffeId::new(
                &self.config.trust_domain,
                &caller.namespace,
                &caller.service_account,
            )
            .map_err(|e| Status::permission_denied(format!("caller has no valid identity: {e}")));
        };
        let identity: SpiffeId = requested
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}")))?;
        if !self
            .config
            .trusted_node_accounts
            .contains(&caller.account())
        {
            return Err(Status::permission_denied(format!(
                "{} may not impersonate other identities (trusted node accounts: {:?})",
                caller.account(),
                self.config.trusted_node_accounts
            )));
        }
        if identity.trust_domain() != self.config.trust_domain {
            return Err(Status::permission_denied(format!(
                "{identity} is not in trust domain {}",
                self.config.trust_domain
            )));
        }
        let Some(node) = caller.node.as_deref() else {
            return Err(Status::permission_denied(format!(
                "{} has no node; impersonation is node-scoped",
                caller.account()
            )));
        };
        let on_node = self.index.read(|snap| {
            snap.pods.iter().any(|((ns, _), pod)| {
                let spec = pod.spec.as_ref();
                let sa = spec
                    .and_then(|s| s.service_account_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".into());
                let terminal = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(|p| p == "Succeeded" || p == "Failed");
                ns == identity.namespace()
                    && sa == identity.service_account()
                    && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                    && !terminal
            })
        });
        if !on_node {
            return Err(Status::permission_denied(format!(
                "no pod with service account {}/{} is scheduled on node {node}",
                identity.namespace(),
                identity.service_account()
            )));
        }
        Ok(identity)
    }
}

fn impersonated(request: &IstioCertificateRequest) -> Option<String> {
    use prost_types::value::Kind;
    let field = request
        .metadata
        .as_ref()?
        .fields
        .get(IMPERSONATED_IDENTITY)?;
    match field.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = authenticate_metadata(self.auth.as_ref(), request.metadata()).await?;
        let request = request.into_inner();
        let impersonated = impersonated(&request);
        let identity = self.identity_for(&caller, impersonated.as_deref()).inspect_err(|status| {
            warn!(caller = %caller.account(), node = ?caller.node, reason = %status.message(), "certificate refused");
        })?;
        let ttl = Duration::from_secs(u64::try_from(request.validity_duration).unwrap_or(0));
        let chain = self
            .signer
            .sign(&request.csr, &identity, ttl)
            .map_err(|e| match e {
                ca::Error::Csr(_) => Status::invalid_argument(format!("csr: {e}")),
                ca::Error::NoSan { .. } | ca::Error::SanMismatch { .. } => {
                    Status::permission_denied(e.to_string())
                }
                other => Status::internal(other.to_string()),
            })?;
        info!(caller = %caller.account(), identity = %identity, "certificate signed");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// Name of the Secret holding the CA in the root namespace (Istio's self-signed CA secret).
pub const CA_SECRET: &str = "istio-ca-secret";
/// Name of the ConfigMap publishing the root bundle in each namespace.
pub const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Files mirrored between the state directory and the CA Secret.
const CA_FILES: [&str; 3] = [ca::CA_CERT_FILE, ca::CA_KEY_FILE, ca::ROOT_CERT_FILE];

/// Errors keeping the CA in Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The API server refused or failed a request.
    #[error("kubernetes api")]
    Kube(#[from] kube::Error),
    /// A state file could not be read or written.
    #[error("ca file {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Makes the CA survive restarts on Kubernetes: if Secret `istio-ca-secret` exists in
/// `namespace`, its files are written into `dir` (so [`Signer::load_or_create`] loads them);
/// otherwise, after `dir` holds a CA (created locally if needed), the Secret is created from it.
/// Use in this order: restore, [`Signer::load_or_create`], [`save_to_secret`].
///
/// # Errors
/// [`PersistError`] when the API or the files fail.
pub async fn restore_from_secret(
    client: &kube::Client,
    namespace: &str,
    dir: &std::path::Path,
) -> Result<bool, PersistError> {
    use k8s_openapi::api::core::v1::Secret;
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let Some(secret) = api.get_opt(CA_SECRET).await? else {
        return Ok(false);
    };
    let data = secret.data.unwrap_or_default();
    std::fs::create_dir_all(dir).map_err(|source| PersistError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    for file in CA_FILES {
        if let Some(bytes) = data.get(file) {
            let path = dir.join(file);
            std::fs::write(&path, &bytes.0).map_err(|source| PersistError::Io {
                path: path.display().to_string(),
                source,
            })?;
        }
    }
    info!(secret = CA_SECRET, namespace, "ca restored from secret");
    Ok(true)
}

/// Creates Secret `istio-ca-secret` in `namespace` from the CA files in `dir` (no-op if it
/// exists).
///
/// # Errors
/// [`PersistError`] when the API or the files fail.
pub async fn save_to_secret(
    client: &kube::Client,
    namespace: &str,
    dir: &std::path::Path,
) -> Result<(), PersistError> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    if api.get_opt(CA_SECRET).await?.is_some() {
        return Ok(());
    }
    let mut data = std::collections::BTreeMap::new();
    for file in CA_FILES {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|source| PersistError::Io {
            path: path.display().to_string(),
            source,
        })?;
        data.insert(file.to_owned(), ByteString(bytes));
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(data),
        ..Default::default()
    };
    api.create(&kube::api::PostParams::default(), &secret)
        .await?;
    info!(secret = CA_SECRET, namespace, "ca saved to secret");
    Ok(())
}

/// Publishes the root bundle as ConfigMap `istio-ca-root-cert` (key `root-cert.pem`) in
/// `namespace`, creating or replacing it.
///
/// # Errors
/// [`PersistError::Kube`].
pub async fn publish_root(
    client: &kube::Client,
    namespace: &str,
    root_pem: &str,
) -> Result<(), PersistError> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), namespace);
    let config_map = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(ROOT_CERT_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        data: Some([(ca::ROOT_CERT_FILE.to_owned(), root_pem.to_owned())].into()),
        ..Default::default()
    };
    let params = kube::api::PatchParams::apply("weft-controller").force();
    api.patch(
        ROOT_CERT_CONFIGMAP,
        &params,
        &kube::api::Patch::Apply(&config_map),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::auth::{Caller, PodTokens};

    fn service() -> CaService {
        let signer =
            Arc::new(Signer::generate_root("cluster.local", ca::Config::default()).unwrap());
        let index = Index::new();
        let objects = weft_k8s::manifest::parse_documents(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-1, namespace: b}\nspec: {nodeName: node-1, serviceAccountName: echo, containers: [{name: c, image: x}]}\n",
            "t",
        )
        .unwrap();
        index.batch(
            objects
                .iter()
                .filter_map(|o| weft_k8s::Resource::from_object(o).unwrap())
                .collect(),
            &[],
        );
        CaService::new(
            signer,
            Arc::new(PodTokens::new("/nonexistent")),
            index,
            Config::default(),
        )
    }

    #[test]
    fn pod_token_callers_get_their_own_identity_and_cannot_impersonate() {
        let ca = service();
        // What PodTokens yields for a waypoint pod.
        let waypoint = Caller {
            namespace: "a".into(),
            service_account: "wp".into(),
            node: Some("node-1".into()),
            pod: Some("wp-7d9f".into()),
        };
        assert_eq!(
            ca.identity_for(&waypoint, None).unwrap().to_string(),
            "spiffe://cluster.local/ns/a/sa/wp"
        );
        let refused = ca
            .identity_for(&waypoint, Some("spiffe://cluster.local/ns/b/sa/echo"))
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("may not impersonate"),
            "{refused:?}"
        );

        // Node accounts keep impersonation rights for pods on their node.
        let ztunnel = Caller {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            node: Some("node-1".into()),
            pod: None,
        };
        assert_eq!(
            ca.identity_for(&ztunnel, Some("spiffe://cluster.local/ns/b/sa/echo"))
                .unwrap()
                .to_string(),
            "spiffe://cluster.local/ns/b/sa/echo"
        );
        let elsewhere = Caller {
            node: Some("node-2".into()),
            ..ztunnel
        };
        assert!(
            ca.identity_for(&elsewhere, Some("spiffe://cluster.local/ns/b/sa/echo"))
                .is_err()
        );
    }
}
