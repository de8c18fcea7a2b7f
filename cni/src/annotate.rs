//! Recording a pod's capture state on the pod: the annotation `ambient.istio.io/redirection`
//! (`enabled` or `pending`; absent when the pod is not captured), which `istioctl`, ztunnel
//! tooling and the agent itself after a restart read (istio-ambient reference §4.4).
//!
//! Two writers, one per config source: the local cluster's object store ([`Annotator::Store`])
//! and the Kubernetes API ([`Annotator::Kube`]), where the pod's metadata gets a JSON merge
//! patch (RFC 7386): `{"metadata":{"annotations":{KEY: VALUE}}}` to set, `KEY: null` to remove.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::debug;
use weft_k8s::manifest::ObjectKey;
use weft_k8s::store::Store;

use crate::enroll::REDIRECTION_ANNOTATION;

/// The field manager named on the agent's patches.
pub const FIELD_MANAGER: &str = "weft-cni-agent";

/// Where annotations are written.
#[derive(Clone)]
pub enum Annotator {
    /// The local cluster's object store (files source).
    Store(Store),
    /// The Kubernetes API server.
    Kube(kube::Client),
}

impl std::fmt::Debug for Annotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Annotator::Store(store) => write!(f, "Store({})", store.dir().display()),
            Annotator::Kube(_) => f.write_str("Kube"),
        }
    }
}

/// Why an annotation could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object store failed.
    #[error("annotating pod {namespace}/{name} in the object store")]
    Store {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// The cause.
        #[source]
        source: weft_k8s::store::Error,
    },
    /// The API server refused or could not be reached.
    #[error("patching pod {namespace}/{name}")]
    Kube {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

/// The merge patch setting (`Some`) or removing (`None`) the redirection annotation.
pub fn merge_patch(value: Option<&str>) -> serde_json::Value {
    json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}})
}

impl Annotator {
    /// Sets (`Some`) or removes (`None`) the redirection annotation on pod `namespace/name`. A
    /// pod that no longer exists is not an error (there is nothing left to annotate).
    ///
    /// # Errors
    /// [`Error`] naming the pod when the store or the API server fails.
    pub async fn set(&self, namespace: &str, name: &str, value: Option<&str>) -> Result<(), Error> {
        match self {
            Annotator::Store(store) => {
                let failed = |source| Error::Store {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    source,
                };
                let key = ObjectKey::new("", "Pod", Some(namespace), name);
                let _lock = store.lock().map_err(failed)?;
                let Some(mut pod) = store.get(&key).map_err(failed)? else {
                    return Ok(());
                };
                let annotations = &mut pod.0["metadata"]["annotations"];
                match value {
                    Some(value) => annotations[REDIRECTION_ANNOTATION] = json!(value),
                    None => {
                        if let Some(map) = annotations.as_object_mut() {
                            map.remove(REDIRECTION_ANNOTATION);
                        }
                    }
                }
                store.put(&pod).map_err(failed)
            }
            Annotator::Kube(client) => {
                let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
                let params = PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                };
                match pods
                    .patch(name, &params, &Patch::Merge(merge_patch(value)))
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(status)) if status.code == 404 => {
                        debug!(pod = %name, namespace, "pod gone; not annotated");
                        Ok(())
                    }
                    Err(source) => Err(Error::Kube {
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                        source,
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
