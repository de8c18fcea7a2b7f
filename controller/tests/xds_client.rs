//! Weft's delta xDS client (`weft_core::xds`) against the controller's real delta ADS server on
//! loopback: wildcard sync and readiness, deltas and removals, NACK with partial acceptance and
//! resend after reconnect, keeping state while the server is away, on-demand names, bearer
//! token and `clusterid` headers, TLS with a server-name override, and drain.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, ServerTlsConfig};
use weft_controller::auth::{BootstrapTokens, Caller};
use weft_controller::xds::{Cache, ConnectionInfo, Registry, Resource, Server};
use weft_core::xds::{self, Handler, Rejection, Termination, Update};
use weft_proto::istio::security::Authorization;
use weft_proto::istio::workload::{Address, Service, Workload, address};
use weft_proto::type_url::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

const TOKEN: &str = "test-token";
const CLUSTER_ID: &str = "cluster-7";
const NODE_ID: &str = "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local";
const STEP: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is observed.
const QUIET: Duration = Duration::from_millis(300);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {what}"))
}

/// Polls `check` every 10 ms until it holds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    within(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// === resources ===

fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

fn workload(name: &str, ip: [u8; 4], revision: &str) -> Resource {
    let msg = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid(name),
            name: name.to_owned(),
            namespace: "default".to_owned(),
            addresses: vec![ip.to_vec()],
            canonical_revision: revision.to_owned(),
            ..Default::default()
        })),
    };
    Resource {
        name: uid(name),
        aliases: vec![format!("/{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])],
        body: prost_types::Any {
            type_url: ADDRESS_TYPE_URL.to_owned(),
            value: msg.encode_to_vec(),
        },
    }
}

fn service(ns: &str, host: &str) -> Resource {
    let msg = Address {
        r#type: Some(address::Type::Service(Service {
            name: host.split('.').next().unwrap().to_owned(),
            namespace: ns.to_owned(),
            hostname: host.to_owned(),
            ..Default::default()
        })),
    };
    Resource {
        name: format!("{ns}/{host}"),
        aliases: vec![],
        body: prost_types::Any {
            type_url: ADDRESS_TYPE_URL.to_owned(),
            value: msg.encode_to_vec(),
        },
    }
}

fn policy(ns: &str, name: &str) -> Resource {
    let msg = Authorization {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        ..Default::default()
    };
    Resource {
        name: format!("{ns}/{name}"),
        aliases: vec![],
        body: prost_types::Any {
            type_url: AUTHORIZATION_TYPE_URL.to_owned(),
            value: msg.encode_to_vec(),
        },
    }
}

/// Three workloads and a service.
fn addresses() -> Vec<Resource> {
    vec![
        workload("a", [10, 244, 1, 5], "v1"),
        workload("b", [10, 244, 1, 6], "v1"),
        workload("c", [10, 244, 2, 7], "v1"),
        service("default", "echo.default.svc.cluster.local"),
    ]
}

fn policies() -> Vec<Resource> {
    vec![
        policy("default", "allow-echo"),
        policy("istio-system", "deny-all"),
    ]
}

// === handler ===

/// A handler that decodes its type and records what it holds and every batch it was given.
/// Workloads with revision `bad` are rejected.
struct Store {
    type_url: &'static str,
    state: Mutex<StoreState>,
}

#[derive(Default)]
struct StoreState {
    /// name → version.
    held: BTreeMap<String, String>,
    /// Per `apply` call: `+name` for an upsert, `-name` for a removal.
    batches: Vec<Vec<String>>,
}

impl Store {
    fn new(type_url: &'static str) -> Arc<Self> {
        Arc::new(Store {
            type_url,
            state: Mutex::default(),
        })
    }

    fn names(&self) -> Vec<String> {
        self.state.lock().unwrap().held.keys().cloned().collect()
    }

    fn held(&self) -> BTreeMap<String, String> {
        self.state.lock().unwrap().held.clone()
    }

    fn batches(&self) -> Vec<Vec<String>> {
        self.state.lock().unwrap().batches.clone()
    }

    fn batch_count(&self) -> usize {
        self.state.lock().unwrap().batches.len()
    }

    fn check(&self, body: &prost_types::Any) -> Result<(), String> {
        if self.type_url == ADDRESS_TYPE_URL {
            let address = Address::decode(body.value.as_slice()).map_err(|e| e.to_string())?;
            if let Some(address::Type::Workload(w)) = address.r#type
                && w.canonical_revision == "bad"
            {
                return Err("unsupported revision bad".to_owned());
            }
        } else {
            Authorization::decode(body.value.as_slice()).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl Handler for Store {
    fn type_url(&self) -> &'static str {
        self.type_url
    }

    fn apply(&self, updates: Vec<Update>) -> Vec<Rejection> {
        let mut state = self.state.lock().unwrap();
        let mut batch = Vec::new();
        let mut rejections = Vec::new();
        for update in updates {
            match update {
                Update::Upsert {
                    name,
                    version,
                    body,
                } => {
                    batch.push(format!("+{name}"));
                    match self.check(&body) {
                        Ok(()) => {
                            state.held.insert(name, version);
                        }
                        Err(reason) => rejections.push(Rejection::new(name, reason)),
                    }
                }
                Update::Remove { name } => {
                    batch.push(format!("-{name}"));
                    state.held.remove(&name);
                }
            }
        }
        state.batches.push(batch);
        rejections
    }
}

// === server ===

/// `(authorization, clusterid)` of one ADS call as the server saw it.
type Headers = (Option<String>, Option<String>);

/// A controller ADS server on loopback.
struct Controller {
    cache: Arc<Cache>,
    registry: Arc<Registry>,
    server: Server,
    addr: SocketAddr,
    headers: Arc<Mutex<Vec<Headers>>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Starts a server over `cache` on `addr` (retrying the bind while a previous server's port
/// is being released), plaintext or with `tls = (chain PEM, key PEM)`.
async fn serve(cache: Arc<Cache>, addr: SocketAddr, tls: Option<(String, String)>) -> Controller {
    let registry = Registry::new();
    let mut tokens = BootstrapTokens::default();
    tokens.insert(
        TOKEN,
        Caller {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            node: Some("node-1".into()),
            pod: None,
        },
    );
    let server = Server::new(cache.clone(), registry.clone(), Arc::new(tokens));
    let listener = within("bind", async {
        loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    let addr = listener.local_addr().unwrap();
    let headers = Arc::new(Mutex::new(Vec::new()));
    let seen = headers.clone();
    let record = move |request: tonic::Request<()>| {
        let get = |key: &str| {
            request
                .metadata()
                .get(key)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        seen.lock()
            .unwrap()
            .push((get("authorization"), get("clusterid")));
        Ok(request)
    };
    let service = InterceptedService::new(server.clone().service(), record);
    let mut builder = tonic::transport::Server::builder();
    if let Some((chain, key)) = tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(chain, key)))
            .unwrap();
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let task = tokio::spawn(async move {
        builder
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Controller {
        cache,
        registry,
        server,
        addr,
        headers,
        stop: Some(stop),
        task,
    }
}

async fn start() -> Controller {
    let cache = Cache::new();
    serve(cache, "127.0.0.1:0".parse().unwrap(), None).await
}

impl Controller {
    /// Ends the ADS streams, stops accepting and waits for the server task (the port is free
    /// afterwards).
    async fn stop(mut self) {
        within("ads shutdown", self.server.shutdown(Duration::from_secs(2))).await;
        let _ = self.stop.take().unwrap().send(());
        within("server task ends", self.task).await.unwrap();
    }

    fn connection(&self) -> Option<ConnectionInfo> {
        self.registry.connections().into_iter().next()
    }

    fn headers(&self) -> Vec<Headers> {
        self.headers.lock().unwrap().clone()
    }
}

// === client ===

struct Proxy {
    handle: xds::Handle,
    addresses: Arc<Store>,
    policies: Arc<Store>,
    drain: weft_core::drain::Trigger,
    task: JoinHandle<()>,
}

fn config(addr: SocketAddr) -> xds::Config {
    let mut config = xds::Config::new(format!("http://{addr}"));
    config.token = Some(Arc::new(|| Ok(TOKEN.to_owned())));
    config.cluster_id = CLUSTER_ID.to_owned();
    config.node = xds::NodeInfo {
        id: NODE_ID.to_owned(),
        metadata: BTreeMap::from([
            ("NAME".to_owned(), "ztunnel-abc".to_owned()),
            ("NAMESPACE".to_owned(), "istio-system".to_owned()),
        ]),
    };
    // Keep reconnects quick while the test's server is away.
    config.backoff_max = Duration::from_millis(200);
    config
}

fn spawn(config: xds::Config) -> Proxy {
    let addresses = Store::new(ADDRESS_TYPE_URL);
    let policies = Store::new(AUTHORIZATION_TYPE_URL);
    let handlers: Vec<Arc<dyn Handler>> = vec![addresses.clone(), policies.clone()];
    let client = xds::Client::new(config, handlers).unwrap();
    let handle = client.handle();
    let (drain, watch) = weft_core::drain::channel();
    let task = client.spawn(watch);
    Proxy {
        handle,
        addresses,
        policies,
        drain,
        task,
    }
}

impl Proxy {
    async fn ready(&self) {
        within("client ready", self.handle.ready()).await.unwrap();
    }

    fn stats(&self, type_url: &str) -> &xds::TypeStats {
        self.handle.stats().for_type(type_url).unwrap()
    }

    async fn stop(self) {
        let outcome = within("drain", self.drain.drain(STEP)).await;
        assert_eq!(outcome, weft_core::drain::Outcome::Graceful);
        within("client task ends", self.task).await.unwrap();
    }
}

fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

// === tests ===

#[tokio::test]
async fn wildcard_sync_readiness_deltas_and_removals() {
    let server = start().await;
    server.cache.set(ADDRESS_TYPE_URL, addresses());
    let proxy = spawn(config(server.addr));

    // Addresses arrive; readiness waits for the authorization type too.
    eventually("addresses applied", || proxy.addresses.names().len() == 4).await;
    tokio::time::sleep(QUIET).await;
    assert!(
        !proxy.handle.is_ready(),
        "not ready before Authorization answered"
    );
    server.cache.set(AUTHORIZATION_TYPE_URL, policies());
    proxy.ready().await;
    assert_eq!(
        proxy.policies.names(),
        ["default/allow-echo", "istio-system/deny-all"]
    );
    let mut expected = strings(&[&uid("a"), &uid("b"), &uid("c")]);
    expected.push("default/echo.default.svc.cluster.local".to_owned());
    assert_eq!(proxy.addresses.names(), expected);
    assert_eq!(proxy.addresses.batches().len(), 1, "one batch per response");

    // The server sees the client in sync: node, metadata, caller, ACKs.
    eventually("client in sync on the server", || {
        server.connection().is_some_and(|c| {
            c.types.len() == 2 && c.types.values().all(|t| t.in_sync && t.wildcard)
        })
    })
    .await;
    let info = server.connection().unwrap();
    assert_eq!(info.node_id, NODE_ID);
    assert_eq!(info.node_metadata["NAME"], "ztunnel-abc");
    assert_eq!(info.caller, "istio-system/ztunnel");
    assert_eq!(info.types[ADDRESS_TYPE_URL].acked_resources, 4);
    assert!(info.types.values().all(|t| t.last_nack.is_none()));

    // One change: just that update.
    let mut set = addresses();
    set[1] = workload("b", [10, 244, 1, 6], "v2");
    server.cache.set(ADDRESS_TYPE_URL, set.clone());
    eventually("change delivered", || proxy.addresses.batch_count() == 2).await;
    assert_eq!(proxy.addresses.batches()[1], [format!("+{}", uid("b"))]);

    // One removal: a Remove.
    set.remove(2);
    server.cache.set(ADDRESS_TYPE_URL, set);
    eventually("removal delivered", || proxy.addresses.batch_count() == 3).await;
    assert_eq!(proxy.addresses.batches()[2], [format!("-{}", uid("c"))]);
    assert!(!proxy.addresses.names().contains(&uid("c")));
    tokio::time::sleep(QUIET).await;
    assert_eq!(proxy.addresses.batch_count(), 3, "nothing else arrives");
    assert_eq!(proxy.policies.batch_count(), 1);

    let stats = proxy.stats(ADDRESS_TYPE_URL);
    assert_eq!(count(&stats.responses), 3);
    assert_eq!(count(&stats.acks), 3);
    assert_eq!(count(&stats.nacks), 0);
    assert_eq!(count(&stats.resources_applied), 5);
    assert_eq!(count(&stats.resources_removed), 1);
    assert!(count(&stats.response_bytes) > 0);
    assert_eq!(count(&proxy.handle.stats().streams_opened), 1);

    // Drain: the client stops and its stream goes away.
    proxy.stop().await;
    eventually("stream deregistered after drain", || {
        server.registry.is_empty()
    })
    .await;
}

#[tokio::test]
async fn nack_applies_the_rest_and_rejected_resources_are_resent_after_reconnect() {
    let server = start().await;
    let mut set = addresses();
    set.push(workload("d", [10, 244, 3, 8], "bad"));
    server.cache.set(ADDRESS_TYPE_URL, set.clone());
    server.cache.set(AUTHORIZATION_TYPE_URL, policies());
    let proxy = spawn(config(server.addr));

    // NACKed but applied: ready, valid resources held, the bad one not.
    proxy.ready().await;
    assert_eq!(proxy.addresses.names().len(), 4);
    assert!(!proxy.addresses.names().contains(&uid("d")));
    let reason = format!("{}: unsupported revision bad", uid("d"));
    eventually("nack recorded by the server", || {
        server
            .connection()
            .is_some_and(|c| c.types[ADDRESS_TYPE_URL].last_nack.is_some())
    })
    .await;
    let info = server.connection().unwrap();
    let nack = info.types[ADDRESS_TYPE_URL].last_nack.clone().unwrap();
    assert_eq!(nack.message, reason);
    assert!(
        info.types[AUTHORIZATION_TYPE_URL].last_nack.is_none(),
        "the other type is ACKed"
    );
    assert_eq!(count(&proxy.stats(ADDRESS_TYPE_URL).nacks), 1);
    assert_eq!(count(&proxy.stats(ADDRESS_TYPE_URL).resources_rejected), 1);
    let held = proxy.addresses.held();

    // Reconnect (controller restart over the same content): the rejected resource was not in
    // `initial_resource_versions`, so it alone is resent (and rejected again).
    let batches = proxy.addresses.batch_count();
    let addr = server.addr;
    let cache = server.cache.clone();
    server.stop().await;
    let server = serve(cache, addr, None).await;
    eventually("rejected resource resent after reconnect", || {
        proxy.addresses.batch_count() > batches
    })
    .await;
    assert_eq!(
        proxy.addresses.batches()[batches..],
        [vec![format!("+{}", uid("d"))]]
    );
    assert_eq!(proxy.addresses.held(), held);
    eventually("nack recorded on the new stream", || {
        server.connection().is_some_and(|c| {
            c.types
                .get(ADDRESS_TYPE_URL)
                .is_some_and(|t| t.last_nack.as_ref().is_some_and(|n| n.message == reason))
        })
    })
    .await;

    // Fixed on the server: accepted and ACKed.
    set[4] = workload("d", [10, 244, 3, 8], "v1");
    server.cache.set(ADDRESS_TYPE_URL, set);
    eventually("fixed resource applied", || {
        proxy.addresses.names().contains(&uid("d"))
    })
    .await;
    eventually("in sync after the fix", || {
        server
            .connection()
            .is_some_and(|c| c.types[ADDRESS_TYPE_URL].in_sync)
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn state_is_kept_while_the_server_is_away_and_only_changes_arrive_after_restart() {
    let server = start().await;
    server.cache.set(ADDRESS_TYPE_URL, addresses());
    server.cache.set(AUTHORIZATION_TYPE_URL, policies());
    let proxy = spawn(config(server.addr));
    proxy.ready().await;
    let held = proxy.addresses.held();
    let policies_held = proxy.policies.held();
    let batches = (proxy.addresses.batch_count(), proxy.policies.batch_count());

    // The server goes away: the handlers keep everything, the client keeps retrying.
    let addr = server.addr;
    server.stop().await;
    let attempts = count(&proxy.handle.stats().connection_attempts);
    eventually("client retries while the server is away", || {
        count(&proxy.handle.stats().connection_attempts) >= attempts + 3
            && proxy
                .handle
                .stats()
                .terminations(Termination::ConnectionError)
                >= 2
    })
    .await;
    assert_eq!(proxy.addresses.held(), held);
    assert_eq!(proxy.policies.held(), policies_held);
    assert_eq!(
        (proxy.addresses.batch_count(), proxy.policies.batch_count()),
        batches,
        "nothing delivered while disconnected"
    );
    assert!(proxy.handle.is_ready(), "readiness survives the outage");
    assert!(proxy.handle.stats().terminations(Termination::Complete) >= 1);

    // A restarted controller whose content changed in one resource meanwhile (content-hash
    // versions): only that resource is delivered.
    let cache = Cache::new();
    let mut set = addresses();
    set[0] = workload("a", [10, 244, 1, 5], "v2");
    cache.set(ADDRESS_TYPE_URL, set);
    cache.set(AUTHORIZATION_TYPE_URL, policies());
    let server = serve(cache, addr, None).await;
    eventually("client reconnected and in sync", || {
        server
            .connection()
            .is_some_and(|c| c.types.len() == 2 && c.types.values().all(|t| t.in_sync))
    })
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        proxy.addresses.batches()[batches.0..],
        [vec![format!("+{}", uid("a"))]],
        "exactly the changed resource after reconnect"
    );
    assert_eq!(
        proxy.policies.batch_count(),
        batches.1,
        "policies unchanged"
    );
    let mut expected = held.clone();
    expected.remove(&uid("a"));
    let mut now = proxy.addresses.held();
    assert_ne!(now.remove(&uid("a")), held.get(&uid("a")).cloned());
    assert_eq!(now, expected);
    assert_eq!(count(&proxy.handle.stats().streams_opened), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn on_demand_addresses_by_alias_and_unknown_names() {
    let server = start().await;
    server.cache.set(ADDRESS_TYPE_URL, addresses());
    server.cache.set(AUTHORIZATION_TYPE_URL, policies());
    let mut config = config(server.addr);
    config.on_demand_types = vec![ADDRESS_TYPE_URL];
    let proxy = spawn(config);

    // Ready after Authorization alone; no addresses pushed.
    proxy.ready().await;
    eventually("subscribed to nothing", || {
        server.connection().is_some_and(|c| {
            c.types
                .get(ADDRESS_TYPE_URL)
                .is_some_and(|t| t.in_sync && !t.wildcard && t.names.is_empty())
        })
    })
    .await;
    assert!(proxy.addresses.names().is_empty());
    assert_eq!(
        proxy.policies.names().len(),
        2,
        "authorization stays wildcard"
    );

    // By alias: answered with the aliased workload.
    within(
        "demand by alias",
        proxy.handle.demand(ADDRESS_TYPE_URL, "/10.244.1.5", STEP),
    )
    .await
    .unwrap();
    assert_eq!(proxy.addresses.names(), [uid("a")]);

    // Unknown: answered in removed_resources, nothing delivered.
    let batches = proxy.addresses.batch_count();
    within(
        "demand of an unknown name",
        proxy.handle.demand(ADDRESS_TYPE_URL, "/10.99.99.99", STEP),
    )
    .await
    .unwrap();
    assert_eq!(proxy.addresses.batch_count(), batches);
    assert_eq!(proxy.addresses.names(), [uid("a")]);
    // Already answered: at once.
    within(
        "repeated demand",
        proxy
            .handle
            .demand(ADDRESS_TYPE_URL, "/10.99.99.99", Duration::from_millis(1)),
    )
    .await
    .unwrap();
    let err = proxy
        .handle
        .demand(AUTHORIZATION_TYPE_URL, "default/allow-echo", STEP)
        .await
        .unwrap_err();
    assert!(matches!(err, xds::DemandError::NotOnDemand { .. }), "{err}");

    // Across a restart: the names are subscribed again, and a demand made while disconnected
    // goes out with the initial request.
    let addr = server.addr;
    let cache = server.cache.clone();
    server.stop().await;
    eventually("client noticed the outage", || {
        proxy
            .handle
            .stats()
            .terminations(Termination::ConnectionError)
            >= 1
    })
    .await;
    let handle = proxy.handle.clone();
    let offline =
        tokio::spawn(async move { handle.demand(ADDRESS_TYPE_URL, "/10.244.1.6", STEP).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let server = serve(cache, addr, None).await;
    within("demand made while disconnected", offline)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(proxy.addresses.names(), [uid("a"), uid("b")]);
    eventually("names resubscribed on the new stream", || {
        server.connection().is_some_and(|c| {
            c.types.get(ADDRESS_TYPE_URL).is_some_and(|t| {
                ["/10.244.1.5", "/10.244.1.6", "/10.99.99.99"]
                    .iter()
                    .all(|n| t.names.iter().any(|m| m == n))
            })
        })
    })
    .await;

    // The unknown address appears later: pushed without asking again.
    let mut set = addresses();
    set.push(workload("e", [10, 99, 99, 99], "v1"));
    server.cache.set(ADDRESS_TYPE_URL, set);
    eventually("late arrival pushed", || {
        proxy.addresses.names().contains(&uid("e"))
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn bearer_token_and_cluster_id_reach_the_server() {
    let server = start().await;
    server.cache.set(ADDRESS_TYPE_URL, addresses());
    server.cache.set(AUTHORIZATION_TYPE_URL, policies());
    let token = Arc::new(Mutex::new("not-a-known-token".to_owned()));
    let mut config = config(server.addr);
    let source = token.clone();
    config.token = Some(Arc::new(move || Ok(source.lock().unwrap().clone())));
    let proxy = spawn(config);

    // Unauthenticated: refused, retried with backoff, never ready.
    eventually("client retries after Unauthenticated", || {
        proxy.handle.stats().terminations(Termination::Error) >= 3
    })
    .await;
    assert!(!proxy.handle.is_ready());
    assert!(server.registry.is_empty());
    assert_eq!(count(&proxy.handle.stats().streams_opened), 0);
    let seen = server.headers();
    assert!(seen.len() >= 3);
    assert!(seen.iter().all(|h| h
        == &(
            Some("Bearer not-a-known-token".to_owned()),
            Some(CLUSTER_ID.to_owned())
        )));

    // The token source now returns the right token: read on the next attempt.
    *token.lock().unwrap() = TOKEN.to_owned();
    proxy.ready().await;
    let info = server.connection().unwrap();
    assert_eq!(info.caller, "istio-system/ztunnel");
    assert_eq!(info.caller_node.as_deref(), Some("node-1"));
    assert_eq!(
        server.headers().last().unwrap(),
        &(Some(format!("Bearer {TOKEN}")), Some(CLUSTER_ID.to_owned()))
    );
    assert_eq!(proxy.policies.names().len(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn tls_with_server_name_override() {
    let signer = weft_core::ca::Signer::generate_root("cluster.local", Default::default()).unwrap();
    let serving = signer
        .issue_serving(
            &["istiod.istio-system.svc".to_owned()],
            &[],
            Duration::from_secs(3600),
        )
        .unwrap();
    let cache = Cache::new();
    cache.set(ADDRESS_TYPE_URL, addresses());
    cache.set(AUTHORIZATION_TYPE_URL, policies());
    let server = serve(cache, "127.0.0.1:0".parse().unwrap(), Some(serving)).await;

    let mut config = config(server.addr);
    config.address = format!("https://{}", server.addr);
    config.tls = Some(xds::Tls {
        root_pem: signer.root_bundle_pem().to_owned(),
        server_name: Some("istiod.istio-system.svc".to_owned()),
    });
    let proxy = spawn(config.clone());
    proxy.ready().await;
    assert_eq!(proxy.addresses.names().len(), 4);
    proxy.stop().await;

    // Without the override the certificate does not match 127.0.0.1: never connects.
    config.tls = Some(xds::Tls {
        root_pem: signer.root_bundle_pem().to_owned(),
        server_name: None,
    });
    let proxy = spawn(config);
    eventually("TLS failures are connection errors", || {
        proxy
            .handle
            .stats()
            .terminations(Termination::ConnectionError)
            >= 2
    })
    .await;
    assert!(!proxy.handle.is_ready());
    assert_eq!(count(&proxy.handle.stats().streams_opened), 0);
    proxy.stop().await;
}
