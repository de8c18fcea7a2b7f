//! The in-memory index of the Kubernetes objects Weft consumes, fed by any source and read as
//! consistent snapshots.
//!
//! Sources call [`Index::apply`], [`Index::delete`] and [`Index::replace`] (a full list for one
//! kind and one source, e.g. after a watch restart); every change bumps the revision and wakes
//! [`Index::changes`] subscribers. Readers take a [`Snapshot`] (cheap: values are shared).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
// The experimental-channel HTTPRoute (a superset of the standard one): keeps `rules[].retry`.
use gateway_api::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::watch;

use crate::crds::{AuthorizationPolicy, PeerAuthentication};
use crate::manifest::Object;

/// The kinds the index holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Namespace.
    Namespace,
    /// `v1` Node.
    Node,
    /// `v1` Pod.
    Pod,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `gateway.networking.k8s.io` Gateway.
    Gateway,
    /// `gateway.networking.k8s.io` GatewayClass.
    GatewayClass,
    /// `gateway.networking.k8s.io` HTTPRoute.
    HttpRoute,
    /// `gateway.networking.k8s.io` GRPCRoute.
    GrpcRoute,
    /// `security.istio.io/v1` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `security.istio.io/v1` PeerAuthentication.
    PeerAuthentication,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 11] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Gateway,
        Kind::GatewayClass,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
    ];

    /// The kind for an API group and kind name (any version).
    pub fn from_group_kind(group: &str, kind: &str) -> Option<Kind> {
        Some(match (group, kind) {
            ("", "Namespace") => Kind::Namespace,
            ("", "Node") => Kind::Node,
            ("", "Pod") => Kind::Pod,
            ("", "Service") => Kind::Service,
            ("discovery.k8s.io", "EndpointSlice") => Kind::EndpointSlice,
            ("gateway.networking.k8s.io", "Gateway") => Kind::Gateway,
            ("gateway.networking.k8s.io", "GatewayClass") => Kind::GatewayClass,
            ("gateway.networking.k8s.io", "HTTPRoute") => Kind::HttpRoute,
            ("gateway.networking.k8s.io", "GRPCRoute") => Kind::GrpcRoute,
            ("security.istio.io", "AuthorizationPolicy") => Kind::AuthorizationPolicy,
            ("security.istio.io", "PeerAuthentication") => Kind::PeerAuthentication,
            _ => return None,
        })
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node | Kind::GatewayClass)
    }
}

/// Identifies an object in the index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    /// Its kind.
    pub kind: Kind,
    /// Namespace (empty for cluster-scoped kinds).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{:?} {}", self.kind, self.name)
        } else {
            write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A typed object of one of the indexed kinds.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub enum Resource {
    Namespace(Arc<Namespace>),
    Node(Arc<Node>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Gateway(Arc<Gateway>),
    GatewayClass(Arc<GatewayClass>),
    HttpRoute(Arc<HttpRoute>),
    GrpcRoute(Arc<GrpcRoute>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    PeerAuthentication(Arc<PeerAuthentication>),
}

/// An object that could not be read as its kind.
#[derive(Debug, thiserror::Error)]
#[error("{key}: field {field}: {message}")]
pub struct Invalid {
    /// The object.
    pub key: ResourceKey,
    /// The field path.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

// === impl Resource ===

impl Resource {
    /// Converts a generic object into a typed one; `Ok(None)` for kinds the index does not hold.
    ///
    /// # Errors
    /// [`Invalid`] naming the field that does not fit the kind's schema.
    pub fn from_object(object: &Object) -> Result<Option<Resource>, Invalid> {
        let key = object.key();
        let Some(kind) = Kind::from_group_kind(&key.group, &key.kind) else {
            return Ok(None);
        };
        let invalid = |(field, message): (String, String)| Invalid {
            key: ResourceKey {
                kind,
                namespace: key.namespace.clone().unwrap_or_default(),
                name: key.name.clone(),
            },
            field,
            message,
        };
        macro_rules! typed {
            ($variant:ident) => {
                Resource::$variant(Arc::new(object.typed().map_err(invalid)?))
            };
        }
        Ok(Some(match kind {
            Kind::Namespace => typed!(Namespace),
            Kind::Node => typed!(Node),
            Kind::Pod => typed!(Pod),
            Kind::Service => typed!(Service),
            Kind::EndpointSlice => typed!(EndpointSlice),
            Kind::Gateway => typed!(Gateway),
            Kind::GatewayClass => typed!(GatewayClass),
            Kind::HttpRoute => typed!(HttpRoute),
            Kind::GrpcRoute => typed!(GrpcRoute),
            Kind::AuthorizationPolicy => typed!(AuthorizationPolicy),
            Kind::PeerAuthentication => typed!(PeerAuthentication),
        }))
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Resource::Namespace(o) => &o.metadata,
            Resource::Node(o) => &o.metadata,
            Resource::Pod(o) => &o.metadata,
            Resource::Service(o) => &o.metadata,
            Resource::EndpointSlice(o) => &o.metadata,
            Resource::Gateway(o) => &o.metadata,
            Resource::GatewayClass(o) => &o.metadata,
            Resource::HttpRoute(o) => &o.metadata,
            Resource::GrpcRoute(o) => &o.metadata,
            Resource::AuthorizationPolicy(o) => &o.metadata,
            Resource::PeerAuthentication(o) => &o.metadata,
        }
    }

    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Namespace(_) => Kind::Namespace,
            Resource::Node(_) => Kind::Node,
            Resource::Pod(_) => Kind::Pod,
            Resource::Service(_) => Kind::Service,
            Resource::EndpointSlice(_) => Kind::EndpointSlice,
            Resource::Gateway(_) => Kind::Gateway,
            Resource::GatewayClass(_) => Kind::GatewayClass,
            Resource::HttpRoute(_) => Kind::HttpRoute,
            Resource::GrpcRoute(_) => Kind::GrpcRoute,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Resource::PeerAuthentication(_) => Kind::PeerAuthentication,
        }
    }

    /// The object's key (namespace defaults to `default` for namespaced kinds).
    pub fn key(&self) -> ResourceKey {
        let kind = self.kind();
        let meta = self.metadata();
        ResourceKey {
            kind,
            namespace: if kind.namespaced() {
                meta.namespace.clone().unwrap_or_else(|| "default".into())
            } else {
                String::new()
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// Objects by `(namespace, name)`.
pub type ByName<T> = BTreeMap<(String, String), Arc<T>>;

/// A consistent view of the index.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every change.
    pub revision: u64,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// Pods.
    pub pods: ByName<Pod>,
    /// Services.
    pub services: ByName<Service>,
    /// EndpointSlices.
    pub endpoint_slices: ByName<EndpointSlice>,
    /// Gateways.
    pub gateways: ByName<Gateway>,
    /// GatewayClasses by name.
    pub gateway_classes: BTreeMap<String, Arc<GatewayClass>>,
    /// HTTPRoutes.
    pub http_routes: ByName<HttpRoute>,
    /// GRPCRoutes.
    pub grpc_routes: ByName<GrpcRoute>,
    /// AuthorizationPolicies.
    pub authorization_policies: ByName<AuthorizationPolicy>,
    /// PeerAuthentications.
    pub peer_authentications: ByName<PeerAuthentication>,
}

// === impl Snapshot ===

impl Snapshot {
    fn insert(&mut self, resource: Resource) {
        let key = resource.key();
        let nn = (key.namespace, key.name);
        match resource {
            Resource::Namespace(o) => drop(self.namespaces.insert(nn.1, o)),
            Resource::Node(o) => drop(self.nodes.insert(nn.1, o)),
            Resource::Pod(o) => drop(self.pods.insert(nn, o)),
            Resource::Service(o) => drop(self.services.insert(nn, o)),
            Resource::EndpointSlice(o) => drop(self.endpoint_slices.insert(nn, o)),
            Resource::Gateway(o) => drop(self.gateways.insert(nn, o)),
            Resource::GatewayClass(o) => drop(self.gateway_classes.insert(nn.1, o)),
            Resource::HttpRoute(o) => drop(self.http_routes.insert(nn, o)),
            Resource::GrpcRoute(o) => drop(self.grpc_routes.insert(nn, o)),
            Resource::AuthorizationPolicy(o) => drop(self.authorization_policies.insert(nn, o)),
            Resource::PeerAuthentication(o) => drop(self.peer_authentications.insert(nn, o)),
        }
    }

    fn remove(&mut self, key: &ResourceKey) -> bool {
        let nn = (key.namespace.clone(), key.name.clone());
        match key.kind {
            Kind::Namespace => self.namespaces.remove(&key.name).is_some(),
            Kind::Node => self.nodes.remove(&key.name).is_some(),
            Kind::Pod => self.pods.remove(&nn).is_some(),
            Kind::Service => self.services.remove(&nn).is_some(),
            Kind::EndpointSlice => self.endpoint_slices.remove(&nn).is_some(),
            Kind::Gateway => self.gateways.remove(&nn).is_some(),
            Kind::GatewayClass => self.gateway_classes.remove(&key.name).is_some(),
            Kind::HttpRoute => self.http_routes.remove(&nn).is_some(),
            Kind::GrpcRoute => self.grpc_routes.remove(&nn).is_some(),
            Kind::AuthorizationPolicy => self.authorization_policies.remove(&nn).is_some(),
            Kind::PeerAuthentication => self.peer_authentications.remove(&nn).is_some(),
        }
    }

    fn keys(&self, kind: Kind) -> Vec<ResourceKey> {
        fn nn<T>(kind: Kind, map: &ByName<T>) -> Vec<ResourceKey> {
            map.keys()
                .map(|(ns, name)| ResourceKey {
                    kind,
                    namespace: ns.clone(),
                    name: name.clone(),
                })
                .collect()
        }
        fn cluster<T>(kind: Kind, map: &BTreeMap<String, Arc<T>>) -> Vec<ResourceKey> {
            map.keys()
                .map(|name| ResourceKey {
                    kind,
                    namespace: String::new(),
                    name: name.clone(),
                })
                .collect()
        }
        match kind {
            Kind::Namespace => cluster(kind, &self.namespaces),
            Kind::Node => cluster(kind, &self.nodes),
            Kind::GatewayClass => cluster(kind, &self.gateway_classes),
            Kind::Pod => nn(kind, &self.pods),
            Kind::Service => nn(kind, &self.services),
            Kind::EndpointSlice => nn(kind, &self.endpoint_slices),
            Kind::Gateway => nn(kind, &self.gateways),
            Kind::HttpRoute => nn(kind, &self.http_routes),
            Kind::GrpcRoute => nn(kind, &self.grpc_routes),
            Kind::AuthorizationPolicy => nn(kind, &self.authorization_policies),
            Kind::PeerAuthentication => nn(kind, &self.peer_authentications),
        }
    }

    /// The labels of a namespace (empty if unknown).
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(namespace)
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_default()
    }
}

/// The shared index.
#[derive(Debug)]
pub struct Index {
    state: RwLock<Snapshot>,
    changes: watch::Sender<u64>,
    /// Kinds whose source has delivered a complete list at least once.
    synced: RwLock<std::collections::BTreeSet<Kind>>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            state: RwLock::new(Snapshot::default()),
            changes: watch::channel(0).0,
            synced: RwLock::new(std::collections::BTreeSet::new()),
        }
    }
}

// === impl Index ===

impl Index {
    /// An empty index.
    pub fn new() -> Arc<Index> {
        Arc::new(Index::default())
    }

    /// A consistent copy of the current state.
    pub fn snapshot(&self) -> Snapshot {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs `f` on the current state without copying it (keep `f` short: writers wait).
    pub fn read<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        f(&self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Wakes on every change; the value is the revision.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot) -> bool) {
        let revision = {
            let mut state = self
                .state
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !f(&mut state) {
                return;
            }
            state.revision += 1;
            state.revision
        };
        self.changes.send_replace(revision);
    }

    /// Adds or replaces an object.
    pub fn apply(&self, resource: Resource) {
        self.update(|s| {
            s.insert(resource);
            true
        });
    }

    /// Removes an object (no change if absent).
    pub fn delete(&self, key: &ResourceKey) {
        self.update(|s| s.remove(key));
    }

    /// Applies several additions and removals as one change.
    pub fn batch(&self, apply: Vec<Resource>, delete: &[ResourceKey]) {
        if apply.is_empty() && delete.is_empty() {
            return;
        }
        self.update(|s| {
            for key in delete {
                s.remove(key);
            }
            for resource in apply {
                s.insert(resource);
            }
            true
        });
    }

    /// [`Index::replace`] with a watcher's first complete list (`InitDone`): also records, in
    /// the same update, that `kind` is listed, so a snapshot taken after [`Index::unsynced`]
    /// stopped naming `kind` holds that list.
    pub fn replace_listed(&self, kind: Kind, items: Vec<Resource>) {
        self.replace_with(kind, items, true);
    }

    /// Those of `kinds` not listed completely yet (see [`Index::replace_listed`]).
    pub fn unsynced(&self, kinds: &[Kind]) -> Vec<Kind> {
        let synced = self
            .synced
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        kinds
            .iter()
            .copied()
            .filter(|k| !synced.contains(k))
            .collect()
    }

    /// Replaces every object of `kind` with `items` (a full relist from a source that owns the
    /// kind).
    pub fn replace(&self, kind: Kind, items: Vec<Resource>) {
        self.replace_with(kind, items, false);
    }

    fn replace_with(&self, kind: Kind, items: Vec<Resource>, listed: bool) {
        self.update(|s| {
            for key in s.keys(kind) {
                s.remove(&key);
            }
            for item in items.into_iter().filter(|i| i.kind() == kind) {
                s.insert(item);
            }
            if listed {
                self.synced
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(kind);
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse;

    fn resources(text: &str) -> Vec<Resource> {
        parse(text, "t")
            .unwrap()
            .iter()
            .filter_map(|o| Resource::from_object(o).unwrap())
            .collect()
    }

    #[test]
    fn apply_delete_replace_and_notify() {
        let index = Index::new();
        let mut changes = index.changes();
        let objs = resources(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {containers: [{name: c, command: [x]}]}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored, namespace: a}\n",
        );
        assert_eq!(objs.len(), 2, "ConfigMaps are not indexed");
        index.batch(objs, &[]);
        assert!(changes.has_changed().unwrap());
        let snap = index.snapshot();
        assert_eq!(snap.revision, 1);
        assert_eq!(
            snap.namespace_labels("a")["istio.io/dataplane-mode"],
            "ambient"
        );
        assert!(snap.pods.contains_key(&("a".into(), "p".into())));

        index.delete(&ResourceKey {
            kind: Kind::Pod,
            namespace: "a".into(),
            name: "p".into(),
        });
        assert!(index.snapshot().pods.is_empty());
        let before = index.snapshot().revision;
        index.delete(&ResourceKey {
            kind: Kind::Pod,
            namespace: "a".into(),
            name: "p".into(),
        });
        assert_eq!(
            index.snapshot().revision,
            before,
            "deleting nothing is no change"
        );

        index.replace(Kind::Namespace, vec![]);
        assert!(index.snapshot().namespaces.is_empty());
        changes.mark_changed();
    }

    #[test]
    fn invalid_objects_name_the_field() {
        let objects = parse(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: a}\nspec: {action: MAYBE}\n",
            "t",
        )
        .unwrap();
        let err = Resource::from_object(&objects[0]).unwrap_err();
        assert_eq!(err.field, "spec.action");
        assert!(
            err.to_string()
                .starts_with("AuthorizationPolicy a/p: field spec.action:"),
            "{err}"
        );
    }
}
