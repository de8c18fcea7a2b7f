//! The controller end to end on loopback: files source → translation → delta ADS and CA over
//! TLS with bootstrap tokens, driven by the generated tonic clients.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use weft_controller::config::Config;
use weft_core::{SpiffeId, WorkloadCertificate, csr};
use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use weft_proto::istio::v1::auth::IstioCertificateRequest;
use weft_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use weft_proto::istio::workload::{Address, address};
use weft_proto::type_url::ADDRESS_TYPE_URL;

const T: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
---
apiVersion: v1
kind: Namespace
metadata: {name: a}
"#;

fn pod(name: &str, node: &str, sa: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, labels: {{app: x}}, annotations: {{ambient.istio.io/redirection: enabled}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, image: x}}]}}\n\
         status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    )
}

struct Controller {
    listen: SocketAddr,
    state: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Controller {
    async fn start(dir: &Path) -> Self {
        let store = dir.join("store");
        let state = dir.join("state");
        std::fs::create_dir_all(&store).unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let debug: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = Config::try_parse_from([
            "weft-controller",
            "--files",
            store.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--listen",
            &listen.to_string(),
            "--debug-listen",
            &debug.to_string(),
            "--files-poll",
            "50ms",
            "--drain-deadline",
            "1s",
        ])
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            weft_controller::app::run(config, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        // Wait for the TLS port.
        within("controller listening", async {
            while tokio::net::TcpStream::connect(listen).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        Controller {
            listen,
            state,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = within("controller stops", self.task).await;
    }

    fn root(&self) -> String {
        std::fs::read_to_string(self.state.join("ca/root-cert.pem")).unwrap()
    }

    fn token(&self, node: &str) -> String {
        std::fs::read_to_string(self.state.join(format!("tokens/{node}.token"))).unwrap()
    }

    async fn channel(&self) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.root()))
            .domain_name("localhost");
        Channel::from_shared(format!("https://{}", self.listen))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn csr_request(identity: &SpiffeId, impersonate: bool) -> (IstioCertificateRequest, String) {
    use prost_types::{Struct, Value, value::Kind};
    let generated = csr::generate(identity).unwrap();
    let metadata = impersonate.then(|| Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            Value {
                kind: Some(Kind::StringValue(identity.to_string())),
            },
        )]
        .into(),
    });
    (
        IstioCertificateRequest {
            csr: generated.csr_pem,
            validity_duration: 3600,
            metadata,
        },
        generated.key_pem,
    )
}

/// Writes like the local cluster's store does (temp file + rename), so a scan never sees a
/// half-written file.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn tmp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-controller-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_signs_impersonated_identities_only_for_pods_on_the_callers_node() {
    let dir = tmp("ca");
    std::fs::create_dir_all(dir.join("store")).unwrap();
    std::fs::write(
        dir.join("store/objects.yaml"),
        format!(
            "{OBJECTS}---\n{}",
            pod("p1", "node-1", "echo", "10.244.1.5")
        ),
    )
    .unwrap();
    let controller = Controller::start(&dir).await;
    let mut ca = IstioCertificateServiceClient::new(controller.channel().await);
    let token = controller.token("node-1");
    let echo = SpiffeId::new("cluster.local", "a", "echo").unwrap();

    // Valid CSR for a pod on the caller's node: the chain carries exactly that identity.
    let (request, key) = csr_request(&echo, true);
    let response = within("sign", ca.create_certificate(with_token(request, &token)))
        .await
        .unwrap()
        .into_inner();
    let cert =
        WorkloadCertificate::from_pem_chain(&response.cert_chain, &key, Some(&echo)).unwrap();
    let leaf = weft_core::certs::LeafInfo::parse(&cert.chain()[0]).unwrap();
    assert_eq!(leaf.uri_sans, vec![echo.to_string()]);
    assert_eq!(
        response.cert_chain.last().unwrap().trim(),
        controller.root().trim(),
        "root bundle last"
    );

    // The same identity from node-2's token: no such pod on node-2.
    let (request, _) = csr_request(&echo, true);
    let status = within(
        "sign",
        ca.create_certificate(with_token(request, &controller.token("node-2"))),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("node-2") && status.message().contains("a/echo"),
        "{}",
        status.message()
    );

    // A service account with no pod at all.
    let other = SpiffeId::new("cluster.local", "a", "nobody").unwrap();
    let (request, _) = csr_request(&other, true);
    let status = within("sign", ca.create_certificate(with_token(request, &token)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    // Bad token → Unauthenticated; garbage CSR → InvalidArgument.
    let (request, _) = csr_request(&echo, true);
    let status = within(
        "sign",
        ca.create_certificate(with_token(request, "not-a-token")),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let (mut request, _) = csr_request(&echo, true);
    request.csr =
        "-----BEGIN CERTIFICATE REQUEST-----\nZm9v\n-----END CERTIFICATE REQUEST-----\n".into();
    let status = within("sign", ca.create_certificate(with_token(request, &token)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // The root survives a restart.
    let root = controller.root();
    controller.stop().await;
    let controller = Controller::start(&dir).await;
    assert_eq!(controller.root(), root);
    let mut ca = IstioCertificateServiceClient::new(controller.channel().await);
    let (request, key) = csr_request(&echo, true);
    let response = within(
        "sign after restart",
        ca.create_certificate(with_token(request, &controller.token("node-1"))),
    )
    .await
    .unwrap()
    .into_inner();
    WorkloadCertificate::from_pem_chain(&response.cert_chain, &key, Some(&echo)).unwrap();
    assert_eq!(response.cert_chain.last().unwrap(), &root);
    controller.stop().await;
}

fn workload_names(response: &DeltaDiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|r| {
            let address = Address::decode(r.resource.as_ref().unwrap().value.as_slice()).unwrap();
            match address.r#type.unwrap() {
                address::Type::Workload(w) => format!("workload {}", w.name),
                address::Type::Service(s) => format!("service {}", s.name),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edits_reach_xds_clients_as_deltas() {
    let dir = tmp("xds");
    std::fs::create_dir_all(dir.join("store/pods")).unwrap();
    std::fs::write(dir.join("store/objects.yaml"), OBJECTS).unwrap();
    std::fs::write(
        dir.join("store/pods/p1.yaml"),
        pod("p1", "node-1", "echo", "10.244.1.5"),
    )
    .unwrap();
    std::fs::write(
        dir.join("store/pods/p2.yaml"),
        pod("p2", "node-2", "echo", "10.244.2.5"),
    )
    .unwrap();
    let controller = Controller::start(&dir).await;
    let mut ads = AggregatedDiscoveryServiceClient::new(controller.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.240.0.11~ztunnel.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: ADDRESS_TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut responses = within(
        "stream",
        ads.delta_aggregated_resources(with_token(stream, &controller.token("node-1"))),
    )
    .await
    .unwrap()
    .into_inner();
    let first = within("snapshot", responses.next()).await.unwrap().unwrap();
    let mut names = workload_names(&first);
    names.sort();
    assert_eq!(names, ["workload p1", "workload p2"]);
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Edit one file: only that workload comes back, within a second.
    let started = std::time::Instant::now();
    write_atomic(
        &dir.join("store/pods/p2.yaml"),
        &pod("p2", "node-2", "other", "10.244.2.5"),
    );
    let delta = within("delta", responses.next()).await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "delta after {:?}",
        started.elapsed()
    );
    assert_eq!(workload_names(&delta), ["workload p2"]);
    assert!(delta.removed_resources.is_empty());
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        response_nonce: delta.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Delete a file: removed_resources names it.
    std::fs::remove_file(dir.join("store/pods/p1.yaml")).unwrap();
    let delta = within("removal", responses.next()).await.unwrap().unwrap();
    assert_eq!(delta.removed_resources, ["Kubernetes//Pod/a/p1"]);
    assert!(delta.resources.is_empty());

    // A malformed edit is skipped: the last good p2 stays, nothing is pushed.
    tx.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        response_nonce: delta.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    write_atomic(
        &dir.join("store/pods/p2.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p2, namespace: a}\nspec: {containers: 3}\n",
    );
    let nothing = tokio::time::timeout(Duration::from_millis(700), responses.next()).await;
    assert!(
        nothing.is_err(),
        "a malformed file must not change what is served: {nothing:?}"
    );
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_ca_client_and_certificate_manager_work_against_the_controller() {
    use std::sync::Arc;
    use weft_core::ca_client;
    use weft_core::cert_manager::{self, Manager};
    let dir = tmp("ca-client");
    std::fs::create_dir_all(dir.join("store")).unwrap();
    std::fs::write(
        dir.join("store/objects.yaml"),
        format!(
            "{OBJECTS}---\n{}",
            pod("p1", "node-1", "echo", "10.244.1.5")
        ),
    )
    .unwrap();
    let controller = Controller::start(&dir).await;
    let client = ca_client::Client::new(ca_client::Config {
        address: format!("https://{}", controller.listen),
        root_pem: controller.root(),
        server_name: "localhost".into(),
        token: ca_client::token_file(controller.state.join("tokens/node-1.token")),
        cluster_id: "Kubernetes".into(),
        ttl: Duration::from_secs(3600),
        impersonate: true,
    })
    .unwrap();
    let manager = Manager::new(Arc::new(client), cert_manager::Config::default());
    let echo = SpiffeId::new("cluster.local", "a", "echo").unwrap();
    let cert = within("certificate", manager.fetch_certificate(&echo))
        .await
        .unwrap();
    assert_eq!(cert.identity(), &echo);
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    assert!(lifetime <= Duration::from_secs(3600), "{lifetime:?}");

    // An identity with no pod on node-1: refused, and the manager reports the CA's reason.
    let nobody = SpiffeId::new("cluster.local", "a", "nobody").unwrap();
    manager.prefetch(&nobody);
    within("refusal recorded", async {
        loop {
            if let Some(error) = manager.state(&nobody).and_then(|s| s.last_error) {
                assert!(
                    error.contains("PermissionDenied") || error.contains("permission"),
                    "{error}"
                );
                assert!(error.contains("node-1"), "{error}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(manager.current(&nobody).is_none());
    controller.stop().await;
}

/// Polls the store until `check` holds.
async fn store_eventually(
    what: &str,
    store: &weft_k8s::store::Store,
    check: impl Fn(&weft_k8s::store::Store) -> bool,
) {
    within(what, async {
        while !check(store) {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_is_provisioned_and_served_its_own_config_with_a_pod_token() {
    use sha2::Digest;
    use weft_k8s::manifest::{ObjectKey, parse};
    use weft_k8s::store::Store;
    use weft_proto::type_url::L7_SERVICE_TYPE_URL;
    use weft_proto::weft::l7::v1::ServiceConfig;

    let dir = tmp("waypoint");
    let store = Store::new(dir.join("store"));
    store
        .apply(
            &parse(
                r#"
apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: a}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: a}
spec: {selector: {app: echo}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: a}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules: [{matches: [{path: {type: PathPrefix, value: /v2}}], backendRefs: [{name: echo, port: 80}]}]
"#,
                "fixture",
            )
            .unwrap(),
        )
        .unwrap();
    let controller = Controller::start(&dir).await;

    // Provisioned into the store, owner-referenced to the Gateway; status written back.
    let deployment = ObjectKey::new("apps", "Deployment", Some("a"), "wp");
    store_eventually("deployment rendered", &store, |s| {
        s.get(&deployment).unwrap().is_some()
    })
    .await;
    let gateway = ObjectKey::new("gateway.networking.k8s.io", "Gateway", Some("a"), "wp");
    let gateway_uid = store.get(&gateway).unwrap().unwrap().0["metadata"]["uid"].clone();
    let stored = store.get(&deployment).unwrap().unwrap();
    assert_eq!(
        stored.0["metadata"]["ownerReferences"][0]["uid"],
        gateway_uid
    );
    store_eventually("gateway status", &store, |s| {
        let status = &s.get(&gateway).unwrap().unwrap().0["status"];
        status["addresses"][0]["value"] == "wp.a.svc.cluster.local"
            && status["conditions"][1]["reason"] == "Pending"
    })
    .await;
    let route = ObjectKey::new("gateway.networking.k8s.io", "HTTPRoute", Some("a"), "echo");
    store_eventually("route status", &store, |s| {
        let status = &s.get(&route).unwrap().unwrap().0["status"];
        status["parents"][0]["controllerName"] == "istio.io/mesh-controller"
            && status["parents"][0]["conditions"][0]["status"] == "True"
    })
    .await;

    // The runner registers the waypoint pod's token.
    let token = "waypoint-pod-token";
    let digest: String = sha2::Sha256::digest(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::create_dir_all(controller.state.join("tokens/pods")).unwrap();
    std::fs::write(
        controller.state.join(format!("tokens/pods/{digest}.json")),
        r#"{"namespace":"a","serviceAccount":"wp","pod":"wp-1","uid":"u","node":"node-1"}"#,
    )
    .unwrap();

    // Its own certificate, no impersonation.
    let mut ca = IstioCertificateServiceClient::new(controller.channel().await);
    let wp = SpiffeId::new("cluster.local", "a", "wp").unwrap();
    let (request, key) = csr_request(&wp, false);
    let response = within("sign", ca.create_certificate(with_token(request, token)))
        .await
        .unwrap()
        .into_inner();
    WorkloadCertificate::from_pem_chain(&response.cert_chain, &key, Some(&wp)).unwrap();

    // Its own ServiceConfig over ADS.
    let mut ads = AggregatedDiscoveryServiceClient::new(controller.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "waypoint~10.244.0.9~wp-1.a~a.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: L7_SERVICE_TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = within(
        "stream",
        ads.delta_aggregated_resources(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            token,
        )),
    )
    .await
    .unwrap()
    .into_inner();
    let first = within("l7 services", responses.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 1, "{first:?}");
    assert_eq!(first.resources[0].name, "a/wp/a/echo");
    let config = ServiceConfig::decode(
        first.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!(config.hostname, "echo.a.svc.cluster.local");
    assert_eq!(
        config.ports[0].routes[0].name,
        "HTTPRoute/a/echo/rule/0/match/0"
    );

    // The Gateway goes away: its objects are deleted from the store.
    store.delete(&[gateway]).unwrap();
    store_eventually("owned objects deleted", &store, |s| {
        s.get(&deployment).unwrap().is_none()
            && s.get(&ObjectKey::new("", "Service", Some("a"), "wp"))
                .unwrap()
                .is_none()
    })
    .await;
    controller.stop().await;
}
