//! The Kubernetes annotator against kube's mock API service: the exact request (method, path,
//! content type, body) for setting and removing, a vanished pod, and a refusal.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;

const T: Duration = Duration::from_secs(10);

struct Seen {
    method: String,
    uri: String,
    content_type: String,
    body: Value,
}

/// Runs `set` against a mock API server answering with `status`; returns the one request made.
async fn one_request(value: Option<&str>, status: u16) -> (Seen, Result<(), Error>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let annotator = Annotator::Kube(kube::Client::new(service, "default"));
    let server = tokio::spawn(async move {
        let (request, send) = handle.next_request().await.expect("a request");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let seen = Seen {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            content_type: parts.headers[http::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned(),
            body: serde_json::from_slice(&bytes).unwrap(),
        };
        let reply = if status == 200 {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "web-1", "namespace": "shop", "annotations": {}}})
        } else {
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": status,
                   "reason": if status == 404 { "NotFound" } else { "Forbidden" },
                   "message": format!("pods \"web-1\" status {status}")})
        };
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        seen
    });
    let result = tokio::time::timeout(T, annotator.set("shop", "web-1", value))
        .await
        .expect("set answers");
    let seen = tokio::time::timeout(T, server)
        .await
        .expect("the server saw a request")
        .unwrap();
    (seen, result)
}

#[tokio::test]
async fn setting_is_a_merge_patch_on_the_pods_metadata() {
    let (seen, result) = one_request(Some("enabled"), 200).await;
    result.unwrap();
    assert_eq!(seen.method, "PATCH");
    assert_eq!(
        seen.uri,
        "/api/v1/namespaces/shop/pods/web-1?&fieldManager=weft-cni-agent"
    );
    assert_eq!(seen.content_type, "application/merge-patch+json");
    assert_eq!(
        seen.body,
        json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}})
    );
}

#[tokio::test]
async fn removing_sets_the_annotation_to_null() {
    let (seen, result) = one_request(None, 200).await;
    result.unwrap();
    assert_eq!(seen.method, "PATCH");
    assert_eq!(seen.content_type, "application/merge-patch+json");
    assert_eq!(
        seen.body,
        json!({"metadata": {"annotations": {"ambient.istio.io/redirection": null}}})
    );
}

#[tokio::test]
async fn a_deleted_pod_is_not_an_error_but_a_refusal_is() {
    let (_, result) = one_request(Some("pending"), 404).await;
    result.unwrap();
    let (_, result) = one_request(Some("pending"), 403).await;
    let err = result.unwrap_err();
    assert_eq!(err.to_string(), "patching pod shop/web-1");
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("Forbidden"),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_store_annotator_sets_and_removes() {
    let dir = std::env::temp_dir().join(format!("weft-annotate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::new(&dir);
    let pod = weft_k8s::manifest::Object(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "annotations": {"keep": "me"}}
    }));
    store.put(&pod).unwrap();
    let annotator = Annotator::Store(store.clone());
    let key = ObjectKey::new("", "Pod", Some("shop"), "web-1");
    annotator
        .set("shop", "web-1", Some("enabled"))
        .await
        .unwrap();
    let annotations = store.get(&key).unwrap().unwrap().0["metadata"]["annotations"].clone();
    assert_eq!(
        annotations,
        json!({"keep": "me", "ambient.istio.io/redirection": "enabled"})
    );
    annotator.set("shop", "web-1", None).await.unwrap();
    let annotations = store.get(&key).unwrap().unwrap().0["metadata"]["annotations"].clone();
    assert_eq!(annotations, json!({"keep": "me"}));
    annotator
        .set("shop", "gone", Some("enabled"))
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
