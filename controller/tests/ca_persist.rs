//! The CA kept in Kubernetes, against kube's mock API service: restored from Secret
//! `istio-ca-secret` when it exists, saved into it when it does not, and the root published as
//! ConfigMap `istio-ca-root-cert`.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use weft_controller::ca;
use weft_core::ca::{Config, Signer};

async fn body_json(request: Request<Body>) -> serde_json::Value {
    let bytes = http_body_util::BodyExt::collect(request.into_body())
        .await
        .unwrap()
        .to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-ca-persist-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test]
async fn a_new_ca_is_saved_and_an_existing_one_restored() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let dir = tmp("save");
    let signer = Signer::load_or_create(&dir, "cluster.local", Config::default()).unwrap();

    // Save: GET → 404, then POST the Secret.
    let saving = tokio::spawn({
        let client = client.clone();
        let dir = dir.clone();
        async move { ca::save_to_secret(&client, "istio-system", &dir).await }
    });
    let (request, send) = handle.next_request().await.unwrap();
    assert_eq!(request.method(), Method::GET);
    assert_eq!(
        request.uri().path(),
        "/api/v1/namespaces/istio-system/secrets/istio-ca-secret"
    );
    send.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#.to_vec()))
            .unwrap(),
    );
    let (request, send) = handle.next_request().await.unwrap();
    assert_eq!(request.method(), Method::POST);
    assert_eq!(
        request.uri().path(),
        "/api/v1/namespaces/istio-system/secrets"
    );
    let secret = body_json(request).await;
    assert_eq!(secret["metadata"]["name"], "istio-ca-secret");
    let data = secret["data"].as_object().unwrap();
    for key in ["ca-cert.pem", "ca-key.pem", "root-cert.pem"] {
        assert!(data.contains_key(key), "secret has {key}: {data:?}");
    }
    send.send_response(
        Response::builder()
            .status(201)
            .body(Body::from(serde_json::to_vec(&secret).unwrap()))
            .unwrap(),
    );
    tokio::time::timeout(Duration::from_secs(5), saving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Restore into an empty state dir from that Secret: the same root comes back.
    let restored_dir = tmp("restore");
    let restoring = tokio::spawn({
        let client = client.clone();
        let dir = restored_dir.clone();
        async move { ca::restore_from_secret(&client, "istio-system", &dir).await }
    });
    let (request, send) = handle.next_request().await.unwrap();
    assert_eq!(request.method(), Method::GET);
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&secret).unwrap()))
            .unwrap(),
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(5), restoring)
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    );
    let again = Signer::load_or_create(&restored_dir, "cluster.local", Config::default()).unwrap();
    assert_eq!(
        again.root_bundle_pem(),
        signer.root_bundle_pem(),
        "root survives via the secret"
    );

    // The root bundle is published with server-side apply.
    let publishing = tokio::spawn({
        let client = client.clone();
        let root = signer.root_bundle_pem().to_owned();
        async move { ca::publish_root(&client, "a", &root).await }
    });
    let (request, send) = handle.next_request().await.unwrap();
    assert_eq!(request.method(), Method::PATCH);
    assert_eq!(
        request.uri().path(),
        "/api/v1/namespaces/a/configmaps/istio-ca-root-cert"
    );
    let config_map = body_json(request).await;
    assert_eq!(
        config_map["data"]["root-cert.pem"],
        signer.root_bundle_pem()
    );
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&config_map).unwrap()))
            .unwrap(),
    );
    tokio::time::timeout(Duration::from_secs(5), publishing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(restored_dir).unwrap();
}
