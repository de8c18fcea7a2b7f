//! Who is calling: bearer-token authentication shared by the xDS and CA services.
//!
//! Every gRPC request carries `authorization: Bearer <token>`. On Kubernetes the token is a
//! projected service-account JWT checked with the TokenReview API; in the local cluster it is a
//! per-node bootstrap token the controller generated ([`BootstrapTokens`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use rand::RngCore;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's namespace (of its service account).
    pub namespace: String,
    /// The caller's service account.
    pub service_account: String,
    /// The node the caller runs on, when known (node proxies always have one).
    pub node: Option<String>,
    /// The caller's pod name, when known.
    pub pod: Option<String>,
}

impl Caller {
    /// `namespace/service-account`, the form `CA_TRUSTED_NODE_ACCOUNTS` lists.
    pub fn account(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}

/// Why a caller was not authenticated (gRPC `Unauthenticated`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing bearer token")]
    Missing,
    /// Not of the form `Bearer <token>`.
    #[error("malformed authorization header: expected \"Bearer <token>\"")]
    Malformed,
    /// The token is not valid.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token could not be checked (e.g. the TokenReview call failed).
    #[error("token review failed: {0}")]
    Unavailable(String),
}

/// Checks bearer tokens.
pub trait Authenticator: Send + Sync + 'static {
    /// Authenticates `token` (without the `Bearer ` prefix).
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>>;
}

/// Extracts the token from gRPC metadata and authenticates it.
///
/// # Errors
/// [`AuthError`] for a missing, malformed or invalid token.
pub async fn authenticate_metadata(
    auth: &dyn Authenticator,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Caller, AuthError> {
    let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Malformed)?;
    auth.authenticate(token.trim()).await
}

impl From<AuthError> for tonic::Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Unavailable(_) => tonic::Status::unavailable(err.to_string()),
            _ => tonic::Status::unauthenticated(err.to_string()),
        }
    }
}

/// Static tokens for the local cluster: one per node, each naming the node proxy's identity on
/// that node (`istio-system/ztunnel` by default), kept as files `<dir>/<node>.token` (mode 0600)
/// so node components can read theirs.
#[derive(Debug, Clone, Default)]
pub struct BootstrapTokens {
    tokens: BTreeMap<String, Caller>,
}

impl BootstrapTokens {
    /// Loads `<dir>/<node>.token` for each node, creating missing ones with 32 random bytes
    /// (hex), all mapping to `account` (`namespace/sa`) on that node.
    ///
    /// # Errors
    /// I/O errors writing or reading the token files.
    pub fn load_or_create(
        dir: &Path,
        nodes: &[String],
        account: (&str, &str),
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        let mut tokens = BTreeMap::new();
        for node in nodes {
            let path = dir.join(format!("{node}.token"));
            let token = match std::fs::read_to_string(&path) {
                Ok(token) if !token.trim().is_empty() => token.trim().to_owned(),
                _ => {
                    let mut bytes = [0u8; 32];
                    rand::rng().fill_bytes(&mut bytes);
                    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    let tmp = dir.join(format!(".{node}.token.tmp"));
                    let mut file = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    std::io::Write::write_all(&mut file, token.as_bytes())?;
                    std::fs::rename(&tmp, &path)?;
                    token
                }
            };
            tokens.insert(
                token,
                Caller {
                    namespace: account.0.to_owned(),
                    service_account: account.1.to_owned(),
                    node: Some(node.clone()),
                    pod: None,
                },
            );
        }
        Ok(BootstrapTokens { tokens })
    }

    /// Adds a token for `caller` (tests, and extra local components).
    pub fn insert(&mut self, token: impl Into<String>, caller: Caller) {
        self.tokens.insert(token.into(), caller);
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>> {
        Box::pin(async move {
            self.tokens
                .get(token)
                .cloned()
                .ok_or_else(|| AuthError::Invalid("unknown bootstrap token".into()))
        })
    }
}

/// The local cluster's per-pod tokens: the cluster runner registers each pod's token as
/// `<dir>/<lowercase hex SHA-256 of the token>.json` holding
/// `{"namespace", "serviceAccount", "pod", "uid", "node"}` and removes the file when the pod
/// stops. A token authenticates as that pod's service account, on its node; it carries no
/// impersonation rights (the CA signs only the caller's own identity for it).
#[derive(Debug, Clone)]
pub struct PodTokens {
    dir: std::path::PathBuf,
}

/// What the runner writes for a pod token.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodTokenFile {
    namespace: String,
    service_account: String,
    pod: String,
    node: String,
    #[allow(dead_code)]
    #[serde(default)]
    uid: String,
}

impl PodTokens {
    /// Pod tokens registered under `dir` (`<controller state dir>/tokens/pods`).
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        PodTokens { dir: dir.into() }
    }

    /// The file a token is registered in: `<dir>/<hex sha256(token)>.json`.
    pub fn path_for(&self, token: &str) -> std::path::PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(token.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.json"))
    }

    fn lookup(&self, token: &str) -> Result<Caller, AuthError> {
        let path = self.path_for(token);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(AuthError::Invalid("unknown token".into()));
            }
            Err(err) => {
                return Err(AuthError::Unavailable(format!(
                    "reading {}: {err}",
                    path.display()
                )));
            }
        };
        let file: PodTokenFile = serde_json::from_slice(&text)
            .map_err(|e| AuthError::Invalid(format!("pod token file {}: {e}", path.display())))?;
        if file.namespace.is_empty() || file.service_account.is_empty() {
            return Err(AuthError::Invalid(format!(
                "pod token file {}: empty namespace or serviceAccount",
                path.display()
            )));
        }
        Ok(Caller {
            namespace: file.namespace,
            service_account: file.service_account,
            node: Some(file.node),
            pod: Some(file.pod),
        })
    }
}

impl Authenticator for PodTokens {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>> {
        Box::pin(async move { self.lookup(token) })
    }
}

/// The local cluster's authenticator: node bootstrap tokens first, then pod tokens.
#[derive(Debug, Clone)]
pub struct LocalTokens {
    /// Per-node tokens of the node proxies.
    pub nodes: BootstrapTokens,
    /// Per-pod tokens registered by the cluster runner.
    pub pods: PodTokens,
}

impl Authenticator for LocalTokens {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>> {
        Box::pin(async move {
            match self.nodes.authenticate(token).await {
                Ok(caller) => Ok(caller),
                Err(_) => self.pods.authenticate(token).await,
            }
        })
    }
}

/// Kubernetes authentication: the token is reviewed with the TokenReview API (audience
/// `istio-ca` by default); the caller's node comes from the bound token's node claim, else from
/// its pod in the index.
pub struct TokenReviewer {
    client: kube::Client,
    audiences: Vec<String>,
    index: std::sync::Arc<weft_k8s::Index>,
}

impl TokenReviewer {
    /// A reviewer using `client`, accepting tokens for `audiences`.
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        index: std::sync::Arc<weft_k8s::Index>,
    ) -> Self {
        TokenReviewer {
            client,
            audiences,
            index,
        }
    }
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

/// The caller a successful TokenReview status describes.
///
/// # Errors
/// [`AuthError::Invalid`] when not authenticated or not a service account.
pub fn caller_from_review(
    status: &k8s_openapi::api::authentication::v1::TokenReviewStatus,
) -> Result<Caller, AuthError> {
    if status.authenticated != Some(true) {
        return Err(AuthError::Invalid(
            status
                .error
                .clone()
                .unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
        return Err(AuthError::Invalid(format!(
            "{username} is not a service account"
        )));
    };
    let (namespace, service_account) = rest
        .split_once(':')
        .ok_or_else(|| AuthError::Invalid(format!("malformed service account user {username}")))?;
    let extra = user.extra.unwrap_or_default();
    let claim = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    Ok(Caller {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        node: claim("authentication.kubernetes.io/node-name"),
        pod: claim("authentication.kubernetes.io/pod-name"),
    })
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        Box::pin(async move {
            let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: token.to_owned(),
                    audiences: Some(self.audiences.clone()),
                },
                ..Default::default()
            };
            let reviewed = api
                .create(&kube::api::PostParams::default(), &review)
                .await
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
            let mut caller = caller_from_review(&reviewed.status.unwrap_or_default())?;
            if caller.node.is_none()
                && let Some(pod) = &caller.pod
            {
                caller.node = self.index.read(|snap| {
                    snap.pods
                        .get(&(caller.namespace.clone(), pod.clone()))
                        .and_then(|p| p.spec.as_ref()?.node_name.clone())
                });
            }
            Ok(caller)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bootstrap_tokens_persist_and_authenticate() {
        let dir = std::env::temp_dir().join(format!("weft-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let nodes = vec!["node-1".to_owned(), "node-2".to_owned()];
        let tokens =
            BootstrapTokens::load_or_create(&dir, &nodes, ("istio-system", "ztunnel")).unwrap();
        let t1 = std::fs::read_to_string(dir.join("node-1.token")).unwrap();
        let caller = tokens.authenticate(&t1).await.unwrap();
        assert_eq!(caller.node.as_deref(), Some("node-1"));
        assert_eq!(caller.account(), "istio-system/ztunnel");
        let again =
            BootstrapTokens::load_or_create(&dir, &nodes, ("istio-system", "ztunnel")).unwrap();
        assert!(
            again.authenticate(&t1).await.is_ok(),
            "tokens survive a restart"
        );
        assert!(matches!(
            tokens.authenticate("nope").await,
            Err(AuthError::Invalid(_))
        ));

        let mut md = tonic::metadata::MetadataMap::new();
        assert!(matches!(
            authenticate_metadata(&tokens, &md).await,
            Err(AuthError::Missing)
        ));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(
            authenticate_metadata(&tokens, &md).await,
            Err(AuthError::Malformed)
        ));
        md.insert("authorization", format!("Bearer {t1}").parse().unwrap());
        assert!(authenticate_metadata(&tokens, &md).await.is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn pod_tokens_authenticate_from_registered_files() {
        let dir = std::env::temp_dir().join(format!("weft-pod-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pods")).unwrap();
        let pods = PodTokens::new(dir.join("pods"));
        let token = "pod-secret-token";
        // The runner's naming: lowercase hex SHA-256 of the token.
        let path = pods.path_for(token);
        assert_eq!(path.parent(), Some(dir.join("pods").as_path()));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(name.len(), 64 + 5);
        assert!(
            name[..64]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        use sha2::Digest;
        let hex: String = sha2::Sha256::digest(token)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(name, format!("{hex}.json"));

        assert!(matches!(
            pods.authenticate(token).await,
            Err(AuthError::Invalid(_))
        ));
        std::fs::write(
            &path,
            r#"{"namespace":"a","serviceAccount":"wp","pod":"wp-7d9f","uid":"u-1","node":"node-2"}"#,
        )
        .unwrap();
        let caller = pods.authenticate(token).await.unwrap();
        assert_eq!(
            caller,
            Caller {
                namespace: "a".into(),
                service_account: "wp".into(),
                node: Some("node-2".into()),
                pod: Some("wp-7d9f".into()),
            }
        );

        // Combined with node tokens: both kinds work, unknown tokens do not.
        let mut nodes = BootstrapTokens::default();
        nodes.insert(
            "node-token",
            Caller {
                namespace: "istio-system".into(),
                service_account: "ztunnel".into(),
                node: Some("node-1".into()),
                pod: None,
            },
        );
        let local = LocalTokens { nodes, pods };
        assert_eq!(
            local
                .authenticate("node-token")
                .await
                .unwrap()
                .service_account,
            "ztunnel"
        );
        assert_eq!(
            local.authenticate(token).await.unwrap().service_account,
            "wp"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(
            matches!(local.authenticate(token).await, Err(AuthError::Invalid(_))),
            "removed when the pod stops"
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(
            matches!(local.authenticate(token).await, Err(AuthError::Invalid(m)) if m.contains("pod token file"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
