//! The Kubernetes source against kube's mock API service (tower-test): the watcher's list and
//! watch requests are answered by a scripted API server, and the index must follow.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::json;
use weft_k8s::{Index, Kind};

const T: Duration = Duration::from_secs(10);

fn namespace(name: &str, rv: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "resourceVersion": rv, "labels": labels}})
}

fn pod(name: &str, rv: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "a", "resourceVersion": rv, "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "c", "image": "x"}], "nodeName": "node-1"},
        "status": {"podIP": "10.244.1.5"}
    })
}

fn list(kind: &str, items: Vec<serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "10"}, "items": items})).unwrap()
}

fn events(events: &[(&str, serde_json::Value)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (kind, object) in events {
        body.extend(serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap());
        body.push(b'\n');
    }
    body
}

#[tokio::test]
async fn list_and_watch_reach_the_index() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let index = Index::new();
    let mut changes = index.changes();
    let _tasks = weft_k8s::apiserver::spawn(client, index.clone(), &[Kind::Namespace, Kind::Pod]);

    // The scripted API server: first a list per kind, then one watch response per kind
    // carrying events; later watch requests are left pending (an idle watch).
    let server = tokio::spawn(async move {
        let mut watched = Vec::new();
        let mut pending = Vec::new();
        loop {
            let Some((request, send)) = handle.next_request().await else {
                return;
            };
            let uri = request.uri().to_string();
            let is_watch = uri.contains("watch=true");
            let body = match (request.uri().path(), is_watch) {
                ("/api/v1/namespaces", false) => {
                    list("NamespaceList", vec![namespace("a", "5", json!({}))])
                }
                ("/api/v1/pods", false) => list("PodList", vec![pod("p1", "6")]),
                ("/api/v1/namespaces", true) if !watched.contains(&"ns") => {
                    watched.push("ns");
                    events(&[(
                        "MODIFIED",
                        namespace("a", "11", json!({"istio.io/dataplane-mode": "ambient"})),
                    )])
                }
                ("/api/v1/pods", true) if !watched.contains(&"pods") => {
                    watched.push("pods");
                    events(&[("ADDED", pod("p2", "12")), ("DELETED", pod("p1", "13"))])
                }
                _ => {
                    pending.push(send); // keep later watches open and idle
                    continue;
                }
            };
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(body))
                    .unwrap(),
            );
        }
    });

    tokio::time::timeout(T, async {
        loop {
            let snap = index.snapshot();
            let labelled = snap
                .namespace_labels("a")
                .get("istio.io/dataplane-mode")
                .map(String::as_str)
                == Some("ambient");
            let pods: Vec<String> = snap.pods.keys().map(|(_, n)| n.clone()).collect();
            if labelled && pods == ["p2"] {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("index did not follow the watch: {:?}", index.snapshot()));
    server.abort();
}

#[tokio::test]
async fn a_node_agent_lists_and_watches_only_its_nodes_pods() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let index = Index::new();
    let mut changes = index.changes();
    let _tasks = weft_k8s::apiserver::spawn_node(client, index.clone(), "node-1");

    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let server = tokio::spawn(async move {
        let mut pending = Vec::new();
        loop {
            let Some((request, send)) = handle.next_request().await else {
                return;
            };
            let uri = request.uri().to_string();
            let _ = seen_tx.send(uri.clone());
            let body = match (request.uri().path(), uri.contains("watch=true")) {
                ("/api/v1/namespaces", false) => {
                    list("NamespaceList", vec![namespace("a", "5", json!({}))])
                }
                ("/api/v1/pods", false) => list("PodList", vec![pod("p1", "6")]),
                _ => {
                    pending.push(send);
                    continue;
                }
            };
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(body))
                    .unwrap(),
            );
        }
    });

    tokio::time::timeout(T, async {
        while !index.snapshot().pods.keys().any(|(_, n)| n == "p1") {
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
        }
    })
    .await
    .expect("the pod list reaches the index");

    // Both pod requests (list, then watch) carry the node's field selector; namespaces do not.
    let mut uris = Vec::new();
    tokio::time::timeout(T, async {
        while uris
            .iter()
            .filter(|u: &&String| u.starts_with("/api/v1/pods"))
            .count()
            < 2
            || !uris
                .iter()
                .any(|u: &String| u.starts_with("/api/v1/namespaces"))
        {
            uris.push(seen_rx.recv().await.expect("server running"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("expected a list and a watch of pods, saw {uris:?}"));
    for uri in &uris {
        let selected = uri.contains("fieldSelector=spec.nodeName%3Dnode-1");
        assert_eq!(uri.starts_with("/api/v1/pods"), selected, "{uri}");
    }
    server.abort();
}
