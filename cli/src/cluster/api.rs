//! [`KubeApi`]: the [`Objects`] of a `--kubernetes` cluster, read and written through its real
//! kube-apiserver with kube-rs (the admin kubeconfig `weft cluster kubeconfig` prints).
//!
//! Kinds are resolved by API discovery (`/api`, `/apis/<group>`; cached per group), so CRD kinds
//! work once their CRD is installed. Writes are server-side apply (field manager `weft`,
//! forced), which is what `kubectl apply --server-side` does; deletes use background
//! propagation, so the garbage collector removes dependents (a Deployment's ReplicaSets and
//! Pods, a waypoint Gateway's Deployment and Service).
//!
//! The interface is synchronous (the CLI, `weft demo` and the suites are): each call runs on the
//! handle's own single-threaded tokio runtime, on a helper thread when the caller is itself
//! inside a runtime.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::core::GroupVersionKind;
use ::kube::discovery::{ApiCapabilities, ApiResource, Scope, oneshot};
use ::kube::{Client, Config};
use serde_json::{Value, json};

use super::manifest::{Object, ObjectKey};
use super::objects::{Error, Objects};
use super::store::Outcome;

/// The field manager of Weft's server-side applies.
pub const FIELD_MANAGER: &str = "weft";

/// How long an apply of a namespaced object retries while the namespace's `default`
/// ServiceAccount does not exist yet (the controller-manager creates it right after the
/// namespace; admission refuses pods before that).
const SERVICE_ACCOUNT_WAIT: Duration = Duration::from_secs(15);

/// A connection to a cluster's API server.
pub struct KubeApi {
    runtime: tokio::runtime::Runtime,
    client: Client,
    kinds: Mutex<HashMap<(String, String), (ApiResource, bool)>>,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi").finish_non_exhaustive()
    }
}

/// An API error's own message (the `Status` message and code), else the error chain.
pub fn message(err: &::kube::Error) -> String {
    match err {
        ::kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => crate::echo::error_message(other),
    }
}

fn is_not_found(err: &::kube::Error) -> bool {
    matches!(err, ::kube::Error::Api(status) if status.code == 404)
}

impl KubeApi {
    /// Connects with the kubeconfig at `path` (nothing is requested yet).
    ///
    /// # Errors
    /// [`Error::Unreachable`] when the kubeconfig cannot be read or used.
    pub fn open(path: &Path) -> Result<KubeApi, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Unreachable(format!("starting a runtime: {e}")))?;
        let shown = path.display().to_string();
        let client = runtime.block_on(async {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| Error::Unreachable(format!("kubeconfig {shown}: {e}")))?;
            let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Unreachable(format!("kubeconfig {shown}: {e}")))?;
            Client::try_from(config)
                .map_err(|e| Error::Unreachable(format!("kubeconfig {shown}: {}", message(&e))))
        })?;
        Ok(KubeApi {
            runtime,
            client,
            kinds: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `future` to completion on this handle's runtime.
    fn block_on<T: Send>(&self, future: impl Future<Output = T> + Send) -> T {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside a runtime (an async caller): block a helper thread instead.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| self.runtime.block_on(future))
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        } else {
            self.runtime.block_on(future)
        }
    }

    /// The client (for callers with their own async code; run it on this handle's runtime with
    /// [`KubeApi::run`]).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `future` on this handle's runtime.
    pub fn run<T: Send>(&self, future: impl Future<Output = T> + Send) -> T {
        self.block_on(future)
    }

    /// The resource serving `group`/`kind` and whether it is namespaced, by discovery.
    async fn resource(&self, group: &str, kind: &str) -> Result<(ApiResource, bool), Error> {
        let cache_key = (group.to_owned(), kind.to_owned());
        if let Some(found) = self
            .kinds
            .lock()
            .ok()
            .and_then(|k| k.get(&cache_key).cloned())
        {
            return Ok(found);
        }
        let shown = if group.is_empty() {
            kind.to_owned()
        } else {
            format!("{kind}.{group}")
        };
        let api_group = oneshot::group(&self.client, group).await.map_err(|e| {
            if is_not_found(&e) {
                Error::UnknownKind(shown.clone())
            } else {
                Error::Unreachable(format!("discovering {shown}: {}", message(&e)))
            }
        })?;
        let (resource, caps): (ApiResource, ApiCapabilities) = api_group
            .recommended_kind(kind)
            .ok_or(Error::UnknownKind(shown))?;
        let found = (resource, caps.scope == Scope::Namespaced);
        if let Ok(mut kinds) = self.kinds.lock() {
            kinds.insert(cache_key, found.clone());
        }
        Ok(found)
    }

    /// The resource of an object, by its `apiVersion` (the version it was written in).
    async fn resource_of(&self, object: &Object) -> Result<(ApiResource, bool), Error> {
        let key = object.key();
        let (found, namespaced) = self.resource(&key.group, &key.kind).await?;
        let version = object
            .api_version()
            .rsplit_once('/')
            .map_or(object.api_version(), |(_, v)| v);
        if found.version == version {
            return Ok((found, namespaced));
        }
        let gvk = GroupVersionKind::gvk(&key.group, version, &key.kind);
        let (resource, caps) = ::kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .map_err(|e| Error::Api {
                what: key.to_string(),
                message: format!("apiVersion {}: {}", object.api_version(), message(&e)),
            })?;
        Ok((resource, caps.scope == Scope::Namespaced))
    }

    fn api(
        &self,
        resource: &ApiResource,
        namespaced: bool,
        namespace: Option<&str>,
    ) -> Api<DynamicObject> {
        match (namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, resource),
            _ => Api::all_with(self.client.clone(), resource),
        }
    }

    async fn get_async(&self, key: &ObjectKey) -> Result<Option<Object>, Error> {
        let (resource, namespaced) = self.resource(&key.group, &key.kind).await?;
        let api = self.api(&resource, namespaced, key.namespace.as_deref());
        let found = api.get_opt(&key.name).await.map_err(|e| Error::Api {
            what: key.to_string(),
            message: message(&e),
        })?;
        Ok(found.map(|o| to_object(o, &resource)))
    }

    async fn apply_one(&self, object: &Object) -> Result<(ObjectKey, Outcome), Error> {
        let key = object.key();
        let (resource, namespaced) = self.resource_of(object).await?;
        let namespace = if namespaced {
            Some(
                object.0["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned(),
            )
        } else {
            None
        };
        let api = self.api(&resource, namespaced, namespace.as_deref());
        let mut body = object.0.clone();
        if let (Some(ns), Some(meta)) = (&namespace, body["metadata"].as_object_mut()) {
            meta.insert("namespace".into(), json!(ns));
        }
        if let Some(map) = body.as_object_mut() {
            map.remove("status");
        }
        let before = api
            .get_opt(&key.name)
            .await
            .map_err(|e| Error::Api {
                what: key.to_string(),
                message: message(&e),
            })?
            .and_then(|o| o.metadata.resource_version);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let deadline = Instant::now() + SERVICE_ACCOUNT_WAIT;
        let after = loop {
            match api.patch(&key.name, &params, &Patch::Apply(&body)).await {
                Ok(applied) => break applied.metadata.resource_version,
                // Admission refuses pods until the namespace's ServiceAccount exists.
                Err(::kube::Error::Api(status))
                    if status.code == 403
                        && status.message.contains("service account")
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(Error::Api {
                        what: key.to_string(),
                        message: message(&e),
                    });
                }
            }
        };
        let outcome = match before {
            None => Outcome::Created,
            Some(v) if Some(&v) == after.as_ref() => Outcome::Unchanged,
            Some(_) => Outcome::Configured,
        };
        Ok((key, outcome))
    }

    async fn delete_one(&self, key: &ObjectKey) -> Result<bool, Error> {
        let (resource, namespaced) = self.resource(&key.group, &key.kind).await?;
        let api = self.api(&resource, namespaced, key.namespace.as_deref());
        let params = DeleteParams::background();
        match api.delete(&key.name, &params).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(Error::Api {
                what: key.to_string(),
                message: message(&e),
            }),
        }
    }
}

impl KubeApi {
    /// Merge-patches (RFC 7386) the object with `key`; `false` when there is no such object.
    ///
    /// # Errors
    /// [`Error`] when the API server refuses the patch.
    pub fn merge_patch(&self, key: &ObjectKey, patch: &Value) -> Result<bool, Error> {
        self.block_on(async {
            let (resource, namespaced) = self.resource(&key.group, &key.kind).await?;
            let api = self.api(&resource, namespaced, key.namespace.as_deref());
            match api
                .patch(&key.name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if is_not_found(&e) => Ok(false),
                Err(e) => Err(Error::Api {
                    what: key.to_string(),
                    message: message(&e),
                }),
            }
        })
    }
}

/// A dynamic object as an [`Object`], with the `apiVersion` and `kind` list items lack.
fn to_object(object: DynamicObject, resource: &ApiResource) -> Object {
    let mut value = serde_json::to_value(&object).unwrap_or(Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), json!(resource.api_version));
        map.insert("kind".into(), json!(resource.kind));
    }
    Object(value)
}

impl Objects for KubeApi {
    fn get(&self, key: &ObjectKey) -> Result<Option<Object>, Error> {
        self.block_on(self.get_async(key))
    }

    fn list(&self, group: &str, kind: &str) -> Result<Vec<Object>, Error> {
        self.block_on(async {
            let (resource, _) = self.resource(group, kind).await?;
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(|e| Error::Api {
                    what: format!("listing {}", resource.plural),
                    message: message(&e),
                })?;
            Ok(list
                .items
                .into_iter()
                .map(|o| to_object(o, &resource))
                .collect())
        })
    }

    fn apply(&self, objects: &[Object]) -> Result<Vec<(ObjectKey, Outcome)>, Error> {
        self.block_on(async {
            let mut outcomes = Vec::with_capacity(objects.len());
            for object in objects {
                outcomes.push(self.apply_one(object).await?);
            }
            Ok(outcomes)
        })
    }

    fn delete(&self, keys: &[ObjectKey]) -> Result<Vec<(ObjectKey, bool)>, Error> {
        self.block_on(async {
            let mut results = Vec::with_capacity(keys.len());
            for key in keys {
                results.push((key.clone(), self.delete_one(key).await?));
            }
            Ok(results)
        })
    }

    fn set_label(&self, key: &ObjectKey, label: &str, value: Option<&str>) -> Result<bool, Error> {
        self.merge_patch(key, &json!({"metadata": {"labels": {label: value}}}))
    }
}
