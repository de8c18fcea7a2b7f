//! Delta ADS server driven by the generated tonic client over a loopback socket: wildcard and
//! on-demand subscriptions, deltas, ACK/NACK, reconnect with `initial_resource_versions`,
//! authentication and the debug endpoint.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use weft_controller::auth::{BootstrapTokens, Caller};
use weft_controller::xds::{Cache, Registry, Resource, Server, serve_debug};
use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use weft_proto::google::rpc::Status as RpcStatus;
use weft_proto::istio::workload::{Address, Service, Workload, address};
use weft_proto::type_url::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

const TOKEN: &str = "test-token";
const NODE_ID: &str = "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local";
const STEP: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is observed.
const QUIET: Duration = Duration::from_millis(300);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {what}"))
}

fn workload(uid: &str, ip: [u8; 4], revision: &str) -> Resource {
    let msg = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.to_owned(),
            name: uid.rsplit('/').next().unwrap().to_owned(),
            namespace: "default".to_owned(),
            addresses: vec![ip.to_vec()],
            canonical_revision: revision.to_owned(),
            ..Default::default()
        })),
    };
    Resource {
        name: uid.to_owned(),
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

fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

/// Three workloads and a service.
fn initial_set() -> Vec<Resource> {
    vec![
        workload(&uid("a"), [10, 244, 1, 5], "v1"),
        workload(&uid("b"), [10, 244, 1, 6], "v1"),
        workload(&uid("c"), [10, 244, 2, 7], "v1"),
        service("default", "echo.default.svc.cluster.local"),
    ]
}

struct Harness {
    cache: Arc<Cache>,
    registry: Arc<Registry>,
    server: Server,
    addr: SocketAddr,
}

async fn start() -> Harness {
    let cache = Cache::new();
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server.clone().service())
            .serve_with_incoming(incoming),
    );
    Harness {
        cache,
        registry,
        server,
        addr,
    }
}

/// A client stream: requests in, responses out.
struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

async fn open(addr: SocketAddr, token: Option<&str>) -> Result<Client, tonic::Status> {
    let mut grpc = within(
        "connect",
        AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let response = within(
        "open delta stream",
        grpc.delta_aggregated_resources(request),
    )
    .await?;
    Ok(Client {
        tx,
        rx: response.into_inner(),
    })
}

fn node() -> Node {
    Node {
        id: NODE_ID.to_owned(),
        ..Default::default()
    }
}

fn initial(type_url: &str, subscribe: &[&str], unsubscribe: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node()),
        type_url: type_url.to_owned(),
        resource_names_subscribe: subscribe.iter().map(|s| (*s).to_owned()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

impl Client {
    async fn send(&self, request: DeltaDiscoveryRequest) {
        within("send request", self.tx.send(request)).await.unwrap();
    }

    async fn recv(&mut self, what: &str) -> DeltaDiscoveryResponse {
        within(what, self.rx.message())
            .await
            .unwrap_or_else(|status| panic!("{what}: stream failed: {status}"))
            .unwrap_or_else(|| panic!("{what}: stream ended"))
    }

    /// Asserts nothing arrives for [`QUIET`].
    async fn expect_quiet(&mut self, what: &str) {
        if let Ok(message) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("{what}: expected nothing, got {message:?}");
        }
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&self, response: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 0,
                message: message.to_owned(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    let mut names: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    names
}

/// Polls `check` against the registry until it holds.
async fn eventually(what: &str, registry: &Registry, check: impl Fn(&Registry) -> bool) {
    within(what, async {
        while !check(registry) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn wildcard_initial_deltas_and_removals() {
    let h = start().await;
    h.cache.set(ADDRESS_TYPE_URL, initial_set());
    h.cache.set(AUTHORIZATION_TYPE_URL, vec![]);
    let mut client = open(h.addr, Some(TOKEN)).await.unwrap();

    client.send(initial(ADDRESS_TYPE_URL, &[], &[])).await;
    let first = client.recv("initial address response").await;
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    assert_eq!(
        names(&first),
        [
            uid("a").as_str(),
            &uid("b"),
            &uid("c"),
            "default/echo.default.svc.cluster.local"
        ]
    );
    assert!(first.removed_resources.is_empty());
    assert!(!first.nonce.is_empty());
    for r in &first.resources {
        let body = r.resource.as_ref().unwrap();
        assert_eq!(body.type_url, ADDRESS_TYPE_URL);
        Address::decode(body.value.as_slice()).unwrap();
        assert_eq!(r.version.len(), 32, "content-hash version");
        assert!(r.aliases.is_empty(), "wildcard pushes carry no aliases");
    }
    client.ack(&first).await;

    // An empty published type is still answered (ztunnel's readiness waits for it).
    client.send(initial(AUTHORIZATION_TYPE_URL, &[], &[])).await;
    let authz = client.recv("initial authorization response").await;
    assert_eq!(authz.type_url, AUTHORIZATION_TYPE_URL);
    assert!(authz.resources.is_empty() && authz.removed_resources.is_empty());
    assert_ne!(authz.nonce, first.nonce, "nonces are unique");
    client.ack(&authz).await;
    client.expect_quiet("after ACKs").await;

    // Re-publishing identical content sends nothing.
    h.cache.set(ADDRESS_TYPE_URL, initial_set());
    client.expect_quiet("identical set").await;

    // One resource changed: only it arrives.
    let mut set = initial_set();
    set[1] = workload(&uid("b"), [10, 244, 1, 6], "v2");
    h.cache.set(ADDRESS_TYPE_URL, set.clone());
    let update = client.recv("delta for one changed resource").await;
    assert_eq!(names(&update), [uid("b").as_str()]);
    assert!(update.removed_resources.is_empty());
    assert_ne!(update.resources[0].version, first.resources[1].version);
    assert!(
        update.system_version_info.parse::<u64>().unwrap()
            > first.system_version_info.parse::<u64>().unwrap()
    );
    client.ack(&update).await;

    // One removed: only its name.
    set.remove(2);
    h.cache.set(ADDRESS_TYPE_URL, set);
    let removal = client.recv("delta for one removed resource").await;
    assert!(removal.resources.is_empty());
    assert_eq!(removal.removed_resources, [uid("c")]);
    client.ack(&removal).await;
    client.expect_quiet("after the removal ACK").await;

    eventually("client in sync", &h.registry, |r| {
        r.connections()
            .first()
            .is_some_and(|c| c.types.values().all(|t| t.in_sync))
    })
    .await;
    let info = &h.registry.connections()[0];
    assert_eq!(info.node_id, NODE_ID);
    assert_eq!(info.caller, "istio-system/ztunnel");
    let address = &info.types[ADDRESS_TYPE_URL];
    assert!(address.wildcard);
    assert_eq!(address.resources_sent, 4 + 1);
    assert_eq!(address.responses_sent, 3);
    assert_eq!(address.acked_resources, 3);
    assert_eq!(
        address.last_acked_nonce.as_deref(),
        Some(removal.nonce.as_str())
    );

    // The stream ends cleanly when the client goes away.
    drop(client);
    eventually("connection deregistered", &h.registry, Registry::is_empty).await;
}

#[tokio::test]
async fn changes_wait_for_the_outstanding_response() {
    let h = start().await;
    h.cache.set(ADDRESS_TYPE_URL, initial_set());
    let mut client = open(h.addr, Some(TOKEN)).await.unwrap();
    client.send(initial(ADDRESS_TYPE_URL, &[], &[])).await;
    let first = client.recv("initial response").await;

    // Two changes while the first response is not ACKed: nothing is sent yet...
    let mut set = initial_set();
    set[0] = workload(&uid("a"), [10, 244, 1, 5], "v2");
    h.cache.set(ADDRESS_TYPE_URL, set.clone());
    set[1] = workload(&uid("b"), [10, 244, 1, 6], "v2");
    h.cache.set(ADDRESS_TYPE_URL, set);
    client.expect_quiet("while a response is outstanding").await;
    eventually("awaiting ack shown", &h.registry, |r| {
        r.connections()
            .first()
            .is_some_and(|c| c.types[ADDRESS_TYPE_URL].awaiting_ack)
    })
    .await;

    // ...a stale nonce changes nothing...
    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.to_owned(),
            response_nonce: "not-a-nonce".to_owned(),
            ..Default::default()
        })
        .await;
    client.expect_quiet("after a stale nonce").await;

    // ...and after the ACK both changes arrive together.
    client.ack(&first).await;
    let update = client.recv("accumulated delta").await;
    assert_eq!(names(&update), [uid("a").as_str(), &uid("b")]);
}

#[tokio::test]
async fn nack_is_recorded_and_not_resent() {
    let h = start().await;
    h.cache.set(ADDRESS_TYPE_URL, initial_set());
    let mut client = open(h.addr, Some(TOKEN)).await.unwrap();
    client.send(initial(ADDRESS_TYPE_URL, &[], &[])).await;
    let first = client.recv("initial response").await;
    client.ack(&first).await;

    let mut set = initial_set();
    set[0] = workload(&uid("a"), [10, 244, 1, 5], "bad");
    h.cache.set(ADDRESS_TYPE_URL, set.clone());
    let bad = client.recv("delta to reject").await;
    assert_eq!(names(&bad), [uid("a").as_str()]);
    let reason = format!("{}: unsupported tunnel protocol", uid("a"));
    client.nack(&bad, &reason).await;
    client
        .expect_quiet("unchanged content is not resent after a NACK")
        .await;
    h.cache.set(ADDRESS_TYPE_URL, set.clone());
    client
        .expect_quiet("identical re-publish after a NACK")
        .await;

    eventually("nack recorded", &h.registry, |r| {
        r.connections()
            .first()
            .is_some_and(|c| c.types[ADDRESS_TYPE_URL].last_nack.is_some())
    })
    .await;
    let info = h.registry.connections()[0].types[ADDRESS_TYPE_URL].clone();
    let nack = info.last_nack.clone().unwrap();
    assert_eq!(nack.nonce, bad.nonce);
    assert_eq!(nack.message, reason);
    assert!(nack.at_unix_ms > 0);
    assert!(!info.in_sync, "a NACKed client is not in sync");
    assert_eq!(info.last_acked_nonce.as_deref(), Some(first.nonce.as_str()));

    // The resource changes again: sent, ACKed, back in sync.
    set[0] = workload(&uid("a"), [10, 244, 1, 5], "fixed");
    h.cache.set(ADDRESS_TYPE_URL, set);
    let fixed = client.recv("delta after the fix").await;
    assert_eq!(names(&fixed), [uid("a").as_str()]);
    client.ack(&fixed).await;
    eventually("back in sync after the ACK", &h.registry, |r| {
        r.connections()
            .first()
            .is_some_and(|c| c.types[ADDRESS_TYPE_URL].in_sync)
    })
    .await;
    let info = h.registry.connections()[0].types[ADDRESS_TYPE_URL].clone();
    assert_eq!(
        info.last_nack.unwrap().nonce,
        bad.nonce,
        "NACK kept as history"
    );
    assert_eq!(info.last_acked_nonce.as_deref(), Some(fixed.nonce.as_str()));
}

#[tokio::test]
async fn reconnect_with_initial_resource_versions() {
    let h = start().await;
    h.cache.set(ADDRESS_TYPE_URL, initial_set());
    let mut client = open(h.addr, Some(TOKEN)).await.unwrap();
    client.send(initial(ADDRESS_TYPE_URL, &[], &[])).await;
    let first = client.recv("initial response").await;
    client.ack(&first).await;
    let held: HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(client);
    eventually("first session gone", &h.registry, Registry::is_empty).await;

    // Meanwhile: `b` changed, `c` removed, `d` added.
    let mut set = initial_set();
    set[1] = workload(&uid("b"), [10, 244, 1, 6], "v2");
    set[2] = workload(&uid("d"), [10, 244, 3, 8], "v1");
    h.cache.set(ADDRESS_TYPE_URL, set);

    // A "restarted controller": a fresh server over a cache holding the same content yields the
    // same versions (content hashes).
    let h2 = start().await;
    h2.cache.set(ADDRESS_TYPE_URL, h.cache_resources());
    for h in [&h, &h2] {
        let mut client = open(h.addr, Some(TOKEN)).await.unwrap();
        let mut request = initial(ADDRESS_TYPE_URL, &[], &[]);
        request.initial_resource_versions = held.clone();
        client.send(request).await;
        let response = client.recv("response after reconnect").await;
        assert_eq!(names(&response), [uid("b").as_str(), &uid("d")]);
        assert_eq!(response.removed_resources, [uid("c")]);
        client.ack(&response).await;
        client.expect_quiet("after the reconnect ACK").await;
    }
}

impl Harness {
    /// The cache's current resources, re-published as the translation loop would.
    fn cache_resources(&self) -> Vec<Resource> {
        self.cache
            .list(ADDRESS_TYPE_URL)
            .iter()
            .map(|v| Resource {
                name: v.name.to_string(),
                aliases: v.aliases.clone(),
                body: v.body.clone(),
            })
            .collect()
    }
}

#[tokio::test]
async fn on_demand_alias_and_unknown_names() {
    let h = start().await;
    h.cache.set(ADDRESS_TYPE_URL, initial_set());
    let mut client = open(h.addr, Some(TOKEN)).await.unwrap();

    // ztunnel's on-demand mode: subscribe "*" and unsubscribe "*" = nothing.
    client.send(initial(ADDRESS_TYPE_URL, &["*"], &["*"])).await;
    let first = client.recv("initial on-demand response").await;
    assert!(first.resources.is_empty() && first.removed_resources.is_empty());
    client.ack(&first).await;
    client.expect_quiet("subscribed to nothing").await;

    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.to_owned(),
            resource_names_subscribe: vec!["/10.244.1.5".to_owned()],
            ..Default::default()
        })
        .await;
    let hit = client.recv("response to an alias subscription").await;
    assert_eq!(hit.resources.len(), 1);
    assert_eq!(hit.resources[0].name, uid("a"));
    assert_eq!(hit.resources[0].aliases, ["/10.244.1.5"]);
    let body =
        Address::decode(hit.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert!(matches!(body.r#type, Some(address::Type::Workload(w)) if w.uid == uid("a")));
    assert!(hit.removed_resources.is_empty());
    client.ack(&hit).await;

    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.to_owned(),
            resource_names_subscribe: vec!["/10.99.99.99".to_owned()],
            ..Default::default()
        })
        .await;
    let miss = client.recv("response to an unknown name").await;
    assert!(miss.resources.is_empty());
    assert_eq!(miss.removed_resources, ["/10.99.99.99"]);
    client.ack(&miss).await;

    // Only subscribed resources are pushed: `b` changing sends nothing, `a` changing does.
    let mut set = initial_set();
    set[1] = workload(&uid("b"), [10, 244, 1, 6], "v2");
    h.cache.set(ADDRESS_TYPE_URL, set.clone());
    client.expect_quiet("unsubscribed resource changed").await;
    set[0] = workload(&uid("a"), [10, 244, 1, 5], "v2");
    h.cache.set(ADDRESS_TYPE_URL, set.clone());
    let update = client.recv("subscribed resource changed").await;
    assert_eq!(names(&update), [uid("a").as_str()]);
    assert_eq!(update.resources[0].aliases, ["/10.244.1.5"]);
    client.ack(&update).await;

    // The unknown address appears later: pushed without asking again.
    set.push(workload(&uid("e"), [10, 99, 99, 99], "v1"));
    h.cache.set(ADDRESS_TYPE_URL, set);
    let late = client.recv("previously unknown name appears").await;
    assert_eq!(names(&late), [uid("e").as_str()]);
    assert_eq!(late.resources[0].aliases, ["/10.99.99.99"]);

    let info = h.registry.connections()[0].types[ADDRESS_TYPE_URL].clone();
    assert!(!info.wildcard);
    assert_eq!(info.names, ["/10.244.1.5", "/10.99.99.99"]);
}

#[tokio::test]
async fn shutdown_ends_streams_and_refuses_new_ones() {
    let h = start().await;
    h.cache.set(ADDRESS_TYPE_URL, initial_set());
    let mut client = open(h.addr, Some(TOKEN)).await.unwrap();
    client.send(initial(ADDRESS_TYPE_URL, &[], &[])).await;
    let first = client.recv("initial response").await;
    client.ack(&first).await;

    within("shutdown", h.server.shutdown(Duration::from_secs(2))).await;
    let end = within("stream end", client.rx.message()).await;
    assert!(matches!(end, Ok(None)), "stream ends cleanly: {end:?}");
    assert!(h.registry.is_empty());
    let status = open(h.addr, Some(TOKEN)).await.err().unwrap();
    assert_eq!(status.code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn missing_or_invalid_token_is_unauthenticated() {
    let h = start().await;
    h.cache.set(ADDRESS_TYPE_URL, initial_set());
    for token in [None, Some("wrong")] {
        let status = match open(h.addr, token).await {
            Err(status) => status,
            Ok(mut client) => {
                client.send(initial(ADDRESS_TYPE_URL, &[], &[])).await;
                within("stream error", client.rx.message())
                    .await
                    .expect_err("unauthenticated stream must fail")
            }
        };
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{token:?}: {status}"
        );
    }
    assert!(h.registry.is_empty());
}

#[tokio::test]
async fn state_of_the_world_is_unimplemented() {
    let h = start().await;
    let mut grpc = within(
        "connect",
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", h.addr)),
    )
    .await
    .unwrap();
    let (_tx, rx) = mpsc::channel(1);
    let result = within(
        "open SotW stream",
        grpc.stream_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await;
    let status = result.err().unwrap();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn debug_endpoint_lists_clients_and_resources() {
    let h = start().await;
    h.cache.set(ADDRESS_TYPE_URL, initial_set());
    let mut client = open(h.addr, Some(TOKEN)).await.unwrap();
    client.send(initial(ADDRESS_TYPE_URL, &[], &[])).await;
    let first = client.recv("initial response").await;
    client.ack(&first).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let debug_addr = listener.local_addr().unwrap();
    let debug = tokio::spawn(serve_debug(listener, h.registry.clone(), h.cache.clone()));

    eventually("client in sync", &h.registry, |r| {
        r.connections()
            .first()
            .is_some_and(|c| c.types.get(ADDRESS_TYPE_URL).is_some_and(|t| t.in_sync))
    })
    .await;
    let (status, body) = http_get(debug_addr, "/debug/connections").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json[0]["node_id"], NODE_ID);
    assert_eq!(json[0]["caller"], "istio-system/ztunnel");
    assert_eq!(json[0]["types"][ADDRESS_TYPE_URL]["in_sync"], true);
    assert_eq!(
        json[0]["types"][ADDRESS_TYPE_URL]["last_acked_nonce"],
        first.nonce.as_str()
    );

    let (status, body) = http_get(
        debug_addr,
        "/debug/resources?type=type.googleapis.com%2Fistio.workload.Address",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 4);
    assert_eq!(json[0]["name"], uid("a"));
    assert_eq!(json[0]["version"], first.resources[0].version.as_str());

    let (status, _) = http_get(debug_addr, "/elsewhere").await;
    assert_eq!(status, 404);
    debug.abort();
}

/// A minimal HTTP/1.1 GET over a fresh connection: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = within("debug connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    within("debug write", stream.write_all(request.as_bytes()))
        .await
        .unwrap();
    let mut response = Vec::new();
    within("debug read", stream.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

fn l7(type_url: &str, name: &str) -> Resource {
    Resource {
        name: name.to_owned(),
        aliases: vec![],
        body: prost_types::Any {
            type_url: type_url.to_owned(),
            value: name.as_bytes().to_vec(),
        },
    }
}

#[tokio::test]
async fn waypoint_streams_only_see_their_own_l7_resources() {
    use weft_proto::type_url::{L7_POLICY_TYPE_URL, L7_SERVICE_TYPE_URL};
    let cache = Cache::new();
    let registry = Registry::new();
    let mut tokens = BootstrapTokens::default();
    let caller = |ns: &str, sa: &str| Caller {
        namespace: ns.into(),
        service_account: sa.into(),
        node: Some("node-1".into()),
        pod: Some(format!("{sa}-pod")),
    };
    tokens.insert("wp-token", caller("a", "wp"));
    tokens.insert("ztunnel-token", caller("istio-system", "ztunnel"));
    let server = Server::new(cache.clone(), registry, Arc::new(tokens));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server.service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    cache.set(
        L7_SERVICE_TYPE_URL,
        vec![
            l7(L7_SERVICE_TYPE_URL, "a/wp/a/echo"),
            l7(L7_SERVICE_TYPE_URL, "a/wp/b/cross"),
            l7(L7_SERVICE_TYPE_URL, "a/wp2/a/echo"),
            l7(L7_SERVICE_TYPE_URL, "b/wp/b/x"),
        ],
    );
    cache.set(
        L7_POLICY_TYPE_URL,
        vec![
            l7(L7_POLICY_TYPE_URL, "a/wp/a/deny"),
            l7(L7_POLICY_TYPE_URL, "a/wpx/a/deny"),
        ],
    );
    cache.set(ADDRESS_TYPE_URL, initial_set());

    let mut wp = open(addr, Some("wp-token")).await.unwrap();
    wp.send(initial(L7_SERVICE_TYPE_URL, &[], &[])).await;
    let services = wp.recv("waypoint services").await;
    assert_eq!(names(&services), ["a/wp/a/echo", "a/wp/b/cross"]);
    wp.ack(&services).await;
    wp.send(initial(L7_POLICY_TYPE_URL, &[], &[])).await;
    let policies = wp.recv("waypoint policies").await;
    assert_eq!(names(&policies), ["a/wp/a/deny"], "a/wpx/ is not a/wp/");
    wp.ack(&policies).await;
    // Workload addresses are not scoped.
    wp.send(initial(ADDRESS_TYPE_URL, &[], &[])).await;
    let addresses = wp.recv("addresses").await;
    assert_eq!(addresses.resources.len(), 4);
    wp.ack(&addresses).await;

    // Another waypoint's config changes: nothing for this stream. Its own changes: pushed.
    cache.set(
        L7_SERVICE_TYPE_URL,
        vec![
            l7(L7_SERVICE_TYPE_URL, "a/wp/a/echo"),
            l7(L7_SERVICE_TYPE_URL, "a/wp2/a/echo-changed"),
            l7(L7_SERVICE_TYPE_URL, "b/wp/b/x"),
        ],
    );
    let update = wp.recv("own removal").await;
    assert!(update.resources.is_empty());
    assert_eq!(update.removed_resources, ["a/wp/b/cross"]);
    wp.ack(&update).await;
    wp.expect_quiet("other waypoints' changes").await;

    // Explicitly asking for another waypoint's resource: answered as removed.
    wp.send(DeltaDiscoveryRequest {
        type_url: L7_SERVICE_TYPE_URL.to_owned(),
        resource_names_subscribe: vec!["b/wp/b/x".into()],
        ..Default::default()
    })
    .await;
    let denied = wp.recv("out-of-scope name").await;
    assert!(denied.resources.is_empty(), "{denied:?}");
    assert_eq!(denied.removed_resources, ["b/wp/b/x"]);

    // A ztunnel stream gets no waypoint resources at all.
    let mut zt = open(addr, Some("ztunnel-token")).await.unwrap();
    zt.send(initial(L7_SERVICE_TYPE_URL, &[], &[])).await;
    let none = zt.recv("ztunnel l7").await;
    assert!(none.resources.is_empty() && none.removed_resources.is_empty());
}
