//! The Kubernetes config source: one kube-rs watcher per kind feeding the [`Index`]. A watcher's
//! initial list (and every relist after a desync) replaces that kind wholesale; later events
//! apply or delete single objects. Watch errors are retried with kube-runtime's default backoff.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tracing::{Instrument, info_span, warn};

use crate::index::{Index, Kind, Resource};

/// Watches one kind until the stream ends (it does not, unless the runtime shuts down).
async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    index: Arc<Index>,
    wrap: fn(Arc<K>) -> Resource,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut buffer: Vec<Resource> = Vec::new();
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => buffer.clear(),
            Ok(Event::InitApply(object)) => buffer.push(wrap(Arc::new(object))),
            Ok(Event::InitDone) => index.replace_listed(kind, std::mem::take(&mut buffer)),
            Ok(Event::Apply(object)) => index.apply(wrap(Arc::new(object))),
            Ok(Event::Delete(object)) => index.delete(&wrap(Arc::new(object)).key()),
            Err(err) => warn!(kind = ?kind, error = %err, "watch failed; retrying"),
        }
    }
}

fn start<K>(
    api: Api<K>,
    kind: Kind,
    index: Arc<Index>,
    wrap: fn(Arc<K>) -> Resource,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    start_with(api, watcher::Config::default(), kind, index, wrap)
}

fn start_with<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    index: Arc<Index>,
    wrap: fn(Arc<K>) -> Resource,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    tokio::spawn(
        watch_kind(api, config, kind, index, wrap)
            .instrument(info_span!("watch", k8s.kind = ?kind)),
    )
}

/// Starts a watcher for each of `kinds` on the current runtime; returns their join handles.
pub fn spawn(
    client: Client,
    index: Arc<Index>,
    kinds: &[Kind],
) -> Vec<tokio::task::JoinHandle<()>> {
    use gateway_api::{
        experimental::httproutes::HttpRoute, gatewayclasses::GatewayClass, gateways::Gateway,
        grpcroutes::GrpcRoute,
    };
    use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use crate::crds::{AuthorizationPolicy, PeerAuthentication};

    kinds
        .iter()
        .map(|&kind| {
            let (i, c) = (index.clone(), client.clone());
            match kind {
                Kind::Namespace => start(Api::<Namespace>::all(c), kind, i, Resource::Namespace),
                Kind::Node => start(Api::<Node>::all(c), kind, i, Resource::Node),
                Kind::Pod => start(Api::<Pod>::all(c), kind, i, Resource::Pod),
                Kind::Service => start(Api::<Service>::all(c), kind, i, Resource::Service),
                Kind::EndpointSlice => start(
                    Api::<EndpointSlice>::all(c),
                    kind,
                    i,
                    Resource::EndpointSlice,
                ),
                Kind::Gateway => start(Api::<Gateway>::all(c), kind, i, Resource::Gateway),
                Kind::GatewayClass => {
                    start(Api::<GatewayClass>::all(c), kind, i, Resource::GatewayClass)
                }
                Kind::HttpRoute => start(Api::<HttpRoute>::all(c), kind, i, Resource::HttpRoute),
                Kind::GrpcRoute => start(Api::<GrpcRoute>::all(c), kind, i, Resource::GrpcRoute),
                Kind::AuthorizationPolicy => start(
                    Api::<AuthorizationPolicy>::all(c),
                    kind,
                    i,
                    Resource::AuthorizationPolicy,
                ),
                Kind::PeerAuthentication => start(
                    Api::<PeerAuthentication>::all(c),
                    kind,
                    i,
                    Resource::PeerAuthentication,
                ),
            }
        })
        .collect()
}

/// Watchers for every kind the index holds.
pub fn spawn_all(client: Client, index: Arc<Index>) -> Vec<tokio::task::JoinHandle<()>> {
    spawn(client, index, &Kind::ALL)
}

/// Watchers for a node agent (istio-ambient reference §4.3): every Namespace (for their
/// enrollment labels) and only the Pods scheduled to `node`, through the field selector
/// `spec.nodeName=<node>` on both the list and the watch requests.
pub fn spawn_node(
    client: Client,
    index: Arc<Index>,
    node: &str,
) -> Vec<tokio::task::JoinHandle<()>> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let pods = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    vec![
        start(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespace,
            index.clone(),
            Resource::Namespace,
        ),
        start_with(
            Api::<Pod>::all(client),
            pods,
            Kind::Pod,
            index,
            Resource::Pod,
        ),
    ]
}
