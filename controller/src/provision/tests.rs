//! Provisioning: rendering, status, planning, and both writer backends.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Value, json};
use weft_k8s::store::Store;
use weft_k8s::{Index, Resource, files, manifest};

use super::*;

fn snapshot(yaml: &str) -> Snapshot {
    let index = Index::new();
    let objects = manifest::parse_documents(yaml, "fixture.yaml").unwrap();
    index.batch(
        objects
            .iter()
            .filter_map(|o| Resource::from_object(o).unwrap())
            .collect(),
        &[],
    );
    index.snapshot()
}

const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: a, uid: gw-uid-1, generation: 2}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

fn gateway(snap: &Snapshot) -> &Gateway {
    &snap.gateways[&("a".to_owned(), "wp".to_owned())]
}

fn settings() -> Settings {
    Settings {
        env: vec![
            ("XDS_ADDRESS".into(), "https://10.0.0.1:15012".into()),
            (
                "AUTH_TOKEN".into(),
                "$(WEFT_SERVICE_ACCOUNT_TOKEN_FILE)".into(),
            ),
        ],
        trust_domain: "example.org".into(),
        ..Settings::default()
    }
}

fn cond<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} in {status}"))
}

#[test]
fn render_owned_objects() {
    let snap = snapshot(GATEWAY);
    let objects = render(gateway(&snap), &settings()).unwrap();
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ServiceAccount", "Service", "Deployment"]);
    for o in &objects {
        assert_eq!(o["metadata"]["name"], "wp");
        assert_eq!(o["metadata"]["namespace"], "a");
        assert_eq!(
            o["metadata"]["ownerReferences"],
            json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": "wp",
                    "uid": "gw-uid-1", "controller": true, "blockOwnerDeletion": true}])
        );
        assert_eq!(
            o["metadata"]["labels"]["gateway.istio.io/managed"],
            "istio.io-mesh-controller"
        );
        assert_eq!(
            o["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
            "wp"
        );
    }
    let svc = &objects[1];
    assert_eq!(
        svc["spec"]["selector"],
        json!({"gateway.networking.k8s.io/gateway-name": "wp"})
    );
    let ports: Vec<(Value, Value, Value)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].clone(),
                p["port"].clone(),
                p["appProtocol"].clone(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            (json!("status-port"), json!(15021), json!("tcp")),
            (json!("mesh"), json!(15008), json!("hbone"))
        ]
    );

    let deploy = &objects[2];
    assert_eq!(deploy["spec"]["replicas"], 1);
    let template = &deploy["spec"]["template"];
    assert_eq!(
        template["metadata"]["labels"],
        json!({
            "gateway.networking.k8s.io/gateway-name": "wp",
            "istio.io/dataplane-mode": "none",
            "service.istio.io/canonical-name": "wp",
            "gateway.istio.io/managed": "istio.io-mesh-controller",
            "sidecar.istio.io/inject": "false",
        })
    );
    assert_eq!(
        deploy["spec"]["selector"]["matchLabels"],
        json!({"gateway.networking.k8s.io/gateway-name": "wp"})
    );
    let spec = &template["spec"];
    assert_eq!(spec["serviceAccountName"], "wp");
    assert!(
        spec["volumes"].is_null(),
        "local cluster: no Kubernetes volumes"
    );
    let c = &spec["containers"][0];
    assert_eq!(c["name"], "waypoint");
    assert_eq!(c["command"], json!(["waypoint"]));
    assert_eq!(c["image"], "ghcr.io/weft-mesh/waypoint:latest");
    let env: Vec<String> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some(path) => format!("{}<-{path}", e["name"].as_str().unwrap()),
            None => format!(
                "{}={}",
                e["name"].as_str().unwrap(),
                e["value"].as_str().unwrap()
            ),
        })
        .collect();
    assert_eq!(
        env,
        [
            "POD_NAME<-metadata.name",
            "POD_NAMESPACE<-metadata.namespace",
            "INSTANCE_IP<-status.podIP",
            "SERVICE_ACCOUNT<-spec.serviceAccountName",
            "WAYPOINT_NAME=wp",
            "TRUST_DOMAIN=example.org",
            "XDS_ADDRESS=https://10.0.0.1:15012",
            "AUTH_TOKEN=$(WEFT_SERVICE_ACCOUNT_TOKEN_FILE)",
        ],
        "Weft's own env first, then --waypoint-env in order"
    );
    let ports: Vec<&Value> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["containerPort"])
        .collect();
    assert_eq!(ports, [&json!(15008), &json!(15020), &json!(15021)]);
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15021})
    );

    // Kubernetes: projected token (audience istio-ca) and the root cert ConfigMap.
    let kube = render(
        gateway(&snap),
        &Settings {
            kubernetes: true,
            command: "/usr/local/bin/waypoint".into(),
            image: "registry.example/wp:1".into(),
            ..settings()
        },
    )
    .unwrap();
    let spec = &kube[2]["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(c["command"], json!(["/usr/local/bin/waypoint"]));
    assert_eq!(c["image"], "registry.example/wp:1");
    let token = &spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "istio-ca");
    assert_eq!(token["path"], "istio-token");
    assert_eq!(
        spec["volumes"][1]["configMap"]["name"],
        "istio-ca-root-cert"
    );
    let mounts: Vec<&Value> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["mountPath"])
        .collect();
    assert_eq!(
        mounts,
        [
            &json!("/var/run/secrets/tokens"),
            &json!("/var/run/secrets/istio")
        ]
    );

    // What the local cluster's `apply` accepts (typed schemas, host command, selector).
    let text = objects
        .iter()
        .map(|o| serde_json::to_string(o).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n");
    manifest::parse(&text, "rendered").expect("rendered objects pass local cluster validation");

    let no_uid = snapshot(&GATEWAY.replace(", uid: gw-uid-1", ""));
    assert!(
        render(gateway(&no_uid), &settings())
            .unwrap_err()
            .contains("metadata.uid")
    );
}

#[test]
fn gateway_status_transitions() {
    let pod = |ready: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: wp-1, namespace: a, labels: {{gateway.networking.k8s.io/gateway-name: wp}}}}\nspec: {{containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: 10.244.0.9, conditions: [{{type: Ready, status: \"{ready}\"}}]}}\n"
        )
    };
    let service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: wp, namespace: a}\nspec: {clusterIP: 10.96.0.50, ports: [{port: 15008}]}\n";

    // Nothing provisioned yet.
    let snap = snapshot(GATEWAY);
    let status = gateway_status(gateway(&snap), &snap, &settings(), 0);
    assert_eq!(cond(&status, "Accepted")["status"], "True");
    assert_eq!(cond(&status, "Accepted")["observedGeneration"], 2);
    let programmed = cond(&status, "Programmed");
    assert_eq!(programmed["status"], "False");
    assert_eq!(programmed["reason"], "Pending");
    let message = programmed["message"].as_str().unwrap();
    assert!(
        message.contains("service a/wp has no cluster IP"),
        "{message}"
    );
    assert!(message.contains("no waypoint pod is ready"), "{message}");
    assert_eq!(
        status["addresses"],
        json!([{"type": "Hostname", "value": "wp.a.svc.cluster.local"}])
    );
    assert_eq!(status["listeners"][0]["name"], "mesh");
    assert_eq!(status["listeners"][0]["attachedRoutes"], 0);

    // Service has an IP, the pod is not ready.
    let snap = snapshot(&format!("{GATEWAY}{service}{}", pod("False")));
    let status = gateway_status(gateway(&snap), &snap, &settings(), 0);
    assert_eq!(
        cond(&status, "Programmed")["message"],
        "no waypoint pod is ready"
    );

    // Both: programmed.
    let snap = snapshot(&format!("{GATEWAY}{service}{}", pod("True")));
    let status = gateway_status(gateway(&snap), &snap, &settings(), 0);
    assert_eq!(cond(&status, "Programmed")["status"], "True");
    assert_eq!(cond(&status, "Programmed")["reason"], "Programmed");
    assert_eq!(
        cond(&status["listeners"][0], "Programmed")["status"],
        "True"
    );

    // No HBONE listener: not accepted, no address, nothing rendered.
    let http = GATEWAY.replace(
        "[{name: mesh, port: 15008, protocol: HBONE}]",
        "[{name: web, port: 80, protocol: HTTP}]",
    );
    let snap = snapshot(&http);
    let status = gateway_status(gateway(&snap), &snap, &settings(), 0);
    let accepted = cond(&status, "Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "ListenersNotValid");
    assert!(accepted["message"].as_str().unwrap().contains("HBONE"));
    assert!(status["addresses"].is_null());
    assert_eq!(
        cond(&status["listeners"][0], "Accepted")["reason"],
        "UnsupportedProtocol"
    );
    let plan = plan(&snap, &[], &settings(), "2026-01-01T00:00:00Z");
    assert!(plan.apply.is_empty());
    assert_eq!(plan.statuses.len(), 1, "the Gateway's status only");
}

#[test]
fn plan_stamps_times_and_skips_unchanged_status() {
    let other_class = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: a, uid: u2}\nspec: {gatewayClassName: other, listeners: [{name: http, port: 80, protocol: HTTP}]}\n";
    let snap = snapshot(&format!("{GATEWAY}{other_class}"));
    let first = plan(&snap, &[], &settings(), "2026-01-01T00:00:00Z");
    assert_eq!(
        first.create,
        [gateway_class()],
        "class created when missing"
    );
    assert_eq!(
        first.create[0]["spec"]["controllerName"],
        "istio.io/mesh-controller"
    );
    assert_eq!(first.live, [("a".to_owned(), "wp".to_owned())]);
    assert_eq!(first.apply.len(), 3, "other classes are ignored");
    let (key, status) = &first.statuses[0];
    assert_eq!((key.kind.as_str(), key.name.as_str()), ("Gateway", "wp"));
    assert_eq!(
        cond(status, "Accepted")["lastTransitionTime"],
        "2026-01-01T00:00:00Z"
    );

    // The status written, later: unchanged → nothing to write.
    let with_status = format!(
        "{}\nstatus: {}\n{other_class}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: istio-waypoint, generation: 1}}\nspec: {{controllerName: istio.io/mesh-controller}}\n",
        GATEWAY.trim_end(),
        serde_json::to_string(status).unwrap()
    );
    let snap = snapshot(&with_status);
    let again = plan(&snap, &[], &settings(), "2026-01-02T00:00:00Z");
    assert!(again.create.is_empty());
    let keys: Vec<&str> = again
        .statuses
        .iter()
        .map(|(k, _)| k.kind.as_str())
        .collect();
    assert_eq!(keys, ["GatewayClass"], "the Gateway's status is current");
    assert_eq!(
        cond(&again.statuses[0].1, "Accepted")["status"],
        "True",
        "GatewayClass Accepted"
    );

    // A transition restamps only the changed condition.
    let service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: wp, namespace: a}\nspec: {clusterIP: 10.96.0.50}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: wp-1, namespace: a, labels: {gateway.networking.k8s.io/gateway-name: wp}}\nspec: {containers: [{name: c, image: x}]}\nstatus: {conditions: [{type: Ready, status: \"True\"}]}\n";
    let snap = snapshot(&format!("{with_status}{service}"));
    let later = plan(&snap, &[], &settings(), "2026-01-03T00:00:00Z");
    let (_, gw) = later
        .statuses
        .iter()
        .find(|(k, _)| k.kind == "Gateway")
        .unwrap();
    assert_eq!(
        cond(gw, "Accepted")["lastTransitionTime"],
        "2026-01-01T00:00:00Z"
    );
    assert_eq!(
        cond(gw, "Programmed")["lastTransitionTime"],
        "2026-01-03T00:00:00Z"
    );
}

#[test]
fn route_status_keeps_other_controllers_parents() {
    let yaml = format!(
        "{GATEWAY}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: a}}\nspec: {{parentRefs: [{{name: wp}}, {{name: ingress}}]}}\nstatus:\n  parents:\n  - parentRef: {{name: ingress}}\n    controllerName: example.com/other\n    conditions: [{{type: Accepted, status: \"True\", reason: Accepted, message: ok, lastTransitionTime: \"2025-01-01T00:00:00Z\"}}]\n"
    );
    let snap = snapshot(&yaml);
    let ours = RouteStatus {
        kind: "HTTPRoute".into(),
        namespace: "a".into(),
        name: "r".into(),
        status: json!({"parents": [{"parentRef": {"name": "wp"}, "controllerName": CONTROLLER_NAME,
            "conditions": [condition("Accepted", true, "Accepted", "route accepted", None)]}]}),
    };
    let plan = plan(
        &snap,
        std::slice::from_ref(&ours),
        &settings(),
        "2026-01-01T00:00:00Z",
    );
    let (key, status) = plan
        .statuses
        .iter()
        .find(|(k, _)| k.kind == "HTTPRoute")
        .unwrap();
    assert_eq!(key.namespace.as_deref(), Some("a"));
    let controllers: Vec<&Value> = status["parents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["controllerName"])
        .collect();
    assert_eq!(
        controllers,
        [&json!("example.com/other"), &json!(CONTROLLER_NAME)]
    );
    assert_eq!(
        status["parents"][1]["conditions"][0]["lastTransitionTime"],
        "2026-01-01T00:00:00Z"
    );

    let (_, gw) = plan
        .statuses
        .iter()
        .find(|(k, _)| k.kind == "Gateway")
        .unwrap();
    assert_eq!(
        gw["listeners"][0]["attachedRoutes"], 1,
        "the accepted route with the waypoint as parent"
    );

    // The route later loses its waypoint parent: our entry is removed, the other kept.
    let written = yaml.replace(
        "status:\n  parents:\n",
        &format!(
            "status:\n  parents:\n  - {}\n",
            serde_json::to_string(&status["parents"][1]).unwrap()
        ),
    );
    let snap = snapshot(&written);
    let cleanup = super::plan(&snap, &[], &settings(), "2026-01-02T00:00:00Z");
    let (_, status) = cleanup
        .statuses
        .iter()
        .find(|(k, _)| k.kind == "HTTPRoute")
        .expect("stale parent removed");
    let controllers: Vec<&Value> = status["parents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["controllerName"])
        .collect();
    assert_eq!(controllers, [&json!("example.com/other")]);
    // Nothing of ours and nothing computed: routes are left alone.
    let untouched = super::plan(&snapshot(&yaml), &[], &settings(), "2026-01-02T00:00:00Z");
    assert!(
        !untouched
            .statuses
            .iter()
            .any(|(k, _)| k.kind == "HTTPRoute")
    );
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-provision-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The store as the files source reads it.
fn read_back(dir: &std::path::Path) -> Snapshot {
    let index = Index::new();
    let mut watcher = files::Watcher::new(dir);
    watcher.scan(&index);
    assert!(watcher.problems.is_empty(), "{:?}", watcher.problems);
    index.snapshot()
}

#[tokio::test]
async fn store_writer_round_trip() {
    let dir = tmp("store");
    let store = Store::new(&dir);
    store
        .apply(&manifest::parse_documents(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: a}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
            "t",
        )
        .unwrap())
        .unwrap();
    let writer = Writer::Store(store.clone());
    let run = |snap: Snapshot| {
        let writer = writer.clone();
        async move {
            let plan = plan(&snap, &[], &settings(), &now());
            let errors = tokio::time::timeout(Duration::from_secs(10), writer.execute(&plan))
                .await
                .expect("store writer finishes");
            assert!(errors.is_empty(), "{errors:?}");
        }
    };

    run(read_back(&dir)).await;
    let snap = read_back(&dir);
    let class = &snap.gateway_classes["istio-waypoint"];
    assert_eq!(class.spec.controller_name, "istio.io/mesh-controller");
    let svc = &snap.services[&("a".to_owned(), "wp".to_owned())];
    assert!(
        svc.spec.as_ref().unwrap().cluster_ip.is_some(),
        "the store allocated a VIP"
    );
    let owner = &svc.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        Some(owner.uid.as_str()),
        gateway(&snap).metadata.uid.as_deref()
    );
    let stored_deploy = store
        .get(&ObjectKey::new("apps", "Deployment", Some("a"), "wp"))
        .unwrap()
        .expect("deployment stored");
    assert_eq!(
        stored_deploy.0["spec"]["template"]["spec"]["serviceAccountName"],
        "wp"
    );
    assert!(
        store
            .get(&ObjectKey::new("", "ServiceAccount", Some("a"), "wp"))
            .unwrap()
            .is_some()
    );
    let gw_status = store
        .get(&ObjectKey::new(GATEWAY_GROUP, "Gateway", Some("a"), "wp"))
        .unwrap()
        .unwrap()
        .0["status"]
        .clone();
    assert_eq!(cond(&gw_status, "Accepted")["status"], "True");
    assert_eq!(cond(&gw_status, "Programmed")["status"], "False");

    // Second pass (class status now written), third pass: nothing changes any more.
    run(read_back(&dir)).await;
    let revision = store.revision();
    run(read_back(&dir)).await;
    assert_eq!(store.revision(), revision, "steady state writes nothing");
    let class_status = &read_back(&dir).gateway_classes["istio-waypoint"];
    assert!(class_status.status.is_some());

    // The Gateway is deleted: its managed objects go too.
    store
        .delete(&[ObjectKey::new(GATEWAY_GROUP, "Gateway", Some("a"), "wp")])
        .unwrap();
    run(read_back(&dir)).await;
    for (group, kind) in [
        ("", "ServiceAccount"),
        ("", "Service"),
        ("apps", "Deployment"),
    ] {
        assert!(
            store
                .get(&ObjectKey::new(group, kind, Some("a"), "wp"))
                .unwrap()
                .is_none(),
            "{kind} removed"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn kube_writer_sends_server_side_apply() {
    use http::{Request, Response};
    use kube::client::Body;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let snap = snapshot(GATEWAY);
    let mut plan = plan(&snap, &[], &settings(), "2026-01-01T00:00:00Z");
    plan.create.clear();
    let writer = Writer::kube(client);
    let again = (writer.clone(), plan.clone());
    let task = tokio::spawn(async move { writer.execute(&plan).await });

    let mut seen = Vec::new();
    for _ in 0..4 {
        let (request, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
            .await
            .expect("a request within 10s")
            .expect("mock open");
        let method = request.method().to_string();
        let uri = request.uri().to_string();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = http_body_util::BodyExt::collect(request.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
        seen.push((method, uri, content_type, body));
    }
    let errors = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("writer finishes")
        .unwrap();
    assert!(errors.is_empty(), "{errors:?}");

    let paths: Vec<&str> = seen
        .iter()
        .map(|(_, uri, _, _)| uri.split('?').next().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/a/serviceaccounts/wp",
            "/api/v1/namespaces/a/services/wp",
            "/apis/apps/v1/namespaces/a/deployments/wp",
            "/apis/gateway.networking.k8s.io/v1/namespaces/a/gateways/wp/status",
        ]
    );
    for (method, uri, content_type, _) in &seen {
        assert_eq!(method, "PATCH");
        assert_eq!(content_type, "application/apply-patch+yaml");
        assert!(uri.contains("fieldManager=weft-controller"), "{uri}");
        assert!(uri.contains("force=true"), "{uri}");
    }
    assert_eq!(seen[2].3["kind"], "Deployment");
    assert_eq!(
        seen[2].3["metadata"]["ownerReferences"][0]["uid"],
        "gw-uid-1"
    );
    let status_body = &seen[3].3;
    assert_eq!(status_body["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(status_body["kind"], "Gateway");
    assert_eq!(
        cond(&status_body["status"], "Accepted")["lastTransitionTime"],
        "2026-01-01T00:00:00Z"
    );
    assert!(
        status_body.get("spec").is_none(),
        "status apply carries status only"
    );

    // The same plan again: nothing is sent (the mock would hang on a request otherwise).
    let (writer, plan) = again;
    let errors = tokio::time::timeout(Duration::from_secs(10), writer.execute(&plan))
        .await
        .expect("nothing to send");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), handle.next_request())
            .await
            .is_err(),
        "no request for an unchanged plan"
    );
}
