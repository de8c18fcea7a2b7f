//! Carrying out a [`Plan`]: against the local cluster's object store (which the files config
//! source reads back) or the Kubernetes API (server-side apply, field manager
//! [`FIELD_MANAGER`], forced; status through the status subresource).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};
use weft_k8s::manifest::{Object, ObjectKey};
use weft_k8s::store::Store;

use super::Plan;
use crate::translate::{MANAGED_BY_MESH_CONTROLLER, MANAGED_LABEL};

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "weft-controller";

/// Why one write failed (the others still happen).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object store refused or failed.
    #[error("object store: {key}")]
    Store {
        /// The object.
        key: String,
        /// The cause.
        #[source]
        source: weft_k8s::store::Error,
    },
    /// The API server refused or failed.
    #[error("kubernetes api: {key}")]
    Kube {
        /// The object.
        key: String,
        /// The cause.
        #[source]
        source: Box<kube::Error>,
    },
    /// Weft does not know where this kind lives in the API.
    #[error("{key}: kind not handled by the writer")]
    UnknownKind {
        /// The object.
        key: String,
    },
}

/// Where provisioning writes.
#[derive(Clone)]
pub enum Writer {
    /// The local cluster's object store (which only writes what changed).
    Store(Store),
    /// The Kubernetes API.
    Kube {
        /// The client.
        client: kube::Client,
        /// The last body successfully applied per object (`<key>` or `<key>/status`): an
        /// identical apply is not sent again. Server-side apply of identical content is a no-op
        /// on the server, so this only saves requests.
        applied: Arc<Mutex<HashMap<String, Value>>>,
    },
}

impl Writer {
    /// A writer to the Kubernetes API through `client`.
    pub fn kube(client: kube::Client) -> Self {
        Writer::Kube {
            client,
            applied: Arc::default(),
        }
    }

    /// Forgets what was applied, so the next [`Writer::execute`] sends everything again: the
    /// periodic resync that re-creates an owned object someone deleted (the controller does not
    /// watch the Deployments and Services it provisions).
    pub fn forget_applied(&self) {
        if let Writer::Kube { applied, .. } = self {
            applied
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Writer::Store(store) => write!(f, "Writer::Store({})", store.dir().display()),
            Writer::Kube { .. } => f.write_str("Writer::Kube"),
        }
    }
}

fn key_of(object: &Value) -> ObjectKey {
    Object(object.clone()).key()
}

fn display(key: &ObjectKey) -> String {
    match &key.namespace {
        Some(ns) => format!("{} {ns}/{}", key.kind, key.name),
        None => format!("{} {}", key.kind, key.name),
    }
}

/// `(api group, version, plural)` of the kinds provisioning writes.
fn resource(key: &ObjectKey) -> Option<ApiResource> {
    let (version, plural) = match (key.group.as_str(), key.kind.as_str()) {
        ("", "ServiceAccount") => ("v1", "serviceaccounts"),
        ("", "Service") => ("v1", "services"),
        ("apps", "Deployment") => ("v1", "deployments"),
        ("gateway.networking.k8s.io", "GatewayClass") => ("v1", "gatewayclasses"),
        ("gateway.networking.k8s.io", "Gateway") => ("v1", "gateways"),
        ("gateway.networking.k8s.io", "HTTPRoute") => ("v1", "httproutes"),
        ("gateway.networking.k8s.io", "GRPCRoute") => ("v1", "grpcroutes"),
        _ => return None,
    };
    Some(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&key.group, version, &key.kind),
        plural,
    ))
}

impl Writer {
    fn api(client: &kube::Client, key: &ObjectKey) -> Result<Api<DynamicObject>, Error> {
        let ar = resource(key).ok_or_else(|| Error::UnknownKind { key: display(key) })?;
        Ok(match &key.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        })
    }

    /// Carries out `plan`: creates what is missing, applies owned objects, writes statuses and
    /// (object store only) deletes managed objects whose Gateway is gone. Every write is tried;
    /// the failures are returned.
    pub async fn execute(&self, plan: &Plan) -> Vec<Error> {
        let mut errors = Vec::new();
        match self {
            Writer::Store(store) => {
                let store = store.clone();
                let plan = plan.clone();
                match tokio::task::spawn_blocking(move || store_execute(&store, &plan)).await {
                    Ok(errs) => errors.extend(errs),
                    Err(join) => tracing::warn!(error = %join, "object store writer panicked"),
                }
            }
            Writer::Kube { client, applied } => {
                let params = PatchParams::apply(FIELD_MANAGER).force();
                let unchanged = |id: &str, body: &Value| {
                    applied
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(id)
                        == Some(body)
                };
                let remember = |id: String, body: &Value| {
                    applied
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id, body.clone());
                };
                for object in plan.create.iter().chain(&plan.apply) {
                    let key = key_of(object);
                    let id = display(&key);
                    if unchanged(&id, object) {
                        continue;
                    }
                    let result = match Self::api(client, &key) {
                        Ok(api) => api
                            .patch(&key.name, &params, &Patch::Apply(object))
                            .await
                            .map(drop)
                            .map_err(|source| Error::Kube {
                                key: id.clone(),
                                source: Box::new(source),
                            }),
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => remember(id, object),
                        Err(e) => errors.push(e),
                    }
                }
                for (key, status) in &plan.statuses {
                    let Some(ar) = resource(key) else {
                        errors.push(Error::UnknownKind { key: display(key) });
                        continue;
                    };
                    let id = format!("{}/status", display(key));
                    let body = json!({
                        "apiVersion": ar.api_version,
                        "kind": key.kind,
                        "status": status,
                    });
                    if unchanged(&id, &body) {
                        continue;
                    }
                    let result = match Self::api(client, key) {
                        Ok(api) => api
                            .patch_status(&key.name, &params, &Patch::Apply(&body))
                            .await
                            .map(drop)
                            .map_err(|source| Error::Kube {
                                key: id.clone(),
                                source: Box::new(source),
                            }),
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => remember(id, &body),
                        Err(e) => errors.push(e),
                    }
                }
            }
        }
        errors
    }
}

/// The object store side of [`Writer::execute`] (blocking file I/O).
fn store_execute(store: &Store, plan: &Plan) -> Vec<Error> {
    let mut errors = Vec::new();
    let err = |key: &ObjectKey| {
        let key = display(key);
        move |source| Error::Store { key, source }
    };
    for object in &plan.create {
        let key = key_of(object);
        match store.get(&key) {
            Ok(Some(_)) => {}
            Ok(None) => errors.extend(store.apply(&[Object(object.clone())]).err().map(err(&key))),
            Err(e) => errors.push(err(&key)(e)),
        }
    }
    for object in &plan.apply {
        let key = key_of(object);
        // `apply` leaves an unchanged object untouched (no write, no revision bump).
        errors.extend(store.apply(&[Object(object.clone())]).err().map(err(&key)));
    }
    for (key, status) in &plan.statuses {
        // Writes only when the stored status differs.
        errors.extend(store.update_status(key, status.clone()).err().map(err(key)));
    }
    // Garbage: managed objects owned by a Gateway that no longer exists.
    let live: BTreeSet<(&str, &str)> = plan
        .live
        .iter()
        .map(|(ns, name)| (ns.as_str(), name.as_str()))
        .collect();
    for (group, kind) in [
        ("", "ServiceAccount"),
        ("", "Service"),
        ("apps", "Deployment"),
    ] {
        let objects = match store.list(group, kind) {
            Ok(objects) => objects,
            Err(e) => {
                errors.push(err(&ObjectKey::new(group, kind, None, "*"))(e));
                continue;
            }
        };
        for object in objects {
            let meta = &object.0["metadata"];
            if meta["labels"][MANAGED_LABEL] != MANAGED_BY_MESH_CONTROLLER {
                continue;
            }
            let namespace = meta["namespace"].as_str().unwrap_or("default");
            let owner = meta["ownerReferences"].as_array().and_then(|refs| {
                refs.iter()
                    .find(|r| r["kind"] == "Gateway" && r["controller"] == true)
            });
            let Some(owner_name) = owner.and_then(|o| o["name"].as_str()) else {
                continue;
            };
            if live.contains(&(namespace, owner_name)) {
                continue;
            }
            let key = object.key();
            tracing::info!(object = %display(&key), "deleting object of a removed waypoint");
            errors.extend(
                store
                    .delete(std::slice::from_ref(&key))
                    .err()
                    .map(err(&key)),
            );
        }
    }
    errors
}
