//! Waypoints end to end on the local cluster: provisioning from `weft waypoint apply`, traffic
//! through the waypoint, Gateway API routing, L7 authorization, retries/timeouts/outlier
//! detection and gRPC. Needs root (CI runs as root); elsewhere each test prints why it skips.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    READY, TestCluster, WEFT, cluster_ip, echo_json, http_get_in, ip_of, metric_sum, root_or_skip,
    wait_until,
};
use serde_json::Value;
use weft::cluster::{Cluster, ObjectKey};

/// How long a waypoint gets to be provisioned and programmed.
const PROGRAMMED: Duration = Duration::from_secs(60);

/// An echo Deployment `name` in `ns` (labels `app: <app>`, `version: <version>`), `replicas`.
fn echo_deployment(ns: &str, name: &str, app: &str, version: &str, replicas: u32) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {app}, version: {version}}}}}
  template:
    metadata: {{labels: {{app: {app}, version: {version}}}}}
    spec:
      containers:
      - name: echo
        image: weft/weft-echo
        command: [weft-echo, serve, --http-port, "8080", --tcp-port, "9000"]
        env:
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        - name: POD_NAMESPACE
          valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
        ports:
        - {{name: http, containerPort: 8080}}
        - {{name: tcp, containerPort: 9000}}
        readinessProbe: {{httpGet: {{path: /healthz, port: http}}}}
"#
    )
}

/// Service `name` in `ns` selecting `selector` (`key: value, …` flow-map body), HTTP 80 → 8080
/// and TCP 9000 → 9000.
fn echo_service(ns: &str, name: &str, selector: &str, annotations: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}, annotations: {{{annotations}}}}}
spec:
  selector: {{{selector}}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: tcp, port: 9000, targetPort: 9000}}
"#
    )
}

/// Namespaces `app` (ambient; echo v1 ×2 and v2 ×1 behind `echo`, `echo-v1`, `echo-v2`),
/// `b` (ambient; pods `client` and `robot` with service account `robot`) and `other` (ambient;
/// `plain`, never bound to a waypoint).
fn app_manifests() -> String {
    let mut text = String::from(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: b}
spec:
  containers:
  - {name: client, image: weft/sleep, command: [sleep, infinity]}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: robot, namespace: b}
---
apiVersion: v1
kind: Pod
metadata: {name: robot, namespace: b}
spec:
  serviceAccountName: robot
  containers:
  - {name: robot, image: weft/sleep, command: [sleep, infinity]}
"#,
    );
    for doc in [
        echo_deployment("app", "echo-v1", "echo", "v1", 2),
        echo_deployment("app", "echo-v2", "echo", "v2", 1),
        echo_service("app", "echo", "app: echo", ""),
        echo_service("app", "echo-v1", "app: echo, version: v1", ""),
        echo_service("app", "echo-v2", "app: echo, version: v2", ""),
        echo_deployment("other", "plain", "plain", "v1", 1),
        echo_service("other", "plain", "app: plain", ""),
    ] {
        text.push_str("---");
        text.push_str(&doc);
    }
    text
}

/// Brings up the apps and waits for every pod.
fn apps_up(cluster: &Cluster) {
    cluster.apply_yaml(&app_manifests()).unwrap();
    cluster.wait_ready("app", &[], 3, READY).unwrap();
    cluster.wait_ready("b", &[], 2, READY).unwrap();
    cluster.wait_ready("other", &[], 1, READY).unwrap();
}

/// Runs `weft waypoint ARGS… --cluster <cluster>` and returns (success, stdout, stderr).
fn weft_waypoint(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(WEFT)
        .arg("waypoint")
        .args(args)
        .args(["--cluster", cluster.layout().name()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `weft waypoint apply -n app --enroll-namespace --wait` and the waypoint pod once ready.
fn waypoint_up(cluster: &Cluster) -> weft::cluster::Object {
    let (ok, stdout, stderr) = weft_waypoint(
        cluster,
        &["apply", "-n", "app", "--enroll-namespace", "--wait"],
    );
    assert!(ok, "waypoint apply failed:\n{stdout}\n{stderr}");
    cluster
        .wait_ready(
            "app",
            &[("gateway.networking.k8s.io/gateway-name", "waypoint")],
            1,
            PROGRAMMED,
        )
        .unwrap()
        .remove(0)
}

/// The waypoint pod's `/metrics`.
fn waypoint_metrics(cluster: &Cluster, pod: &weft::cluster::Object) -> String {
    let ip = ip_of(pod);
    http_get_in(
        &cluster.layout().pod_netns(pod.uid().unwrap()),
        format!("{ip}:15020").parse().unwrap(),
        "/metrics",
    )
}

/// `count` HTTP requests from `ns/pod` to `url` (`extra` client flags), as JSON lines.
fn requests(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    url: &str,
    count: u32,
    extra: &[&str],
) -> Vec<Value> {
    let count = count.to_string();
    let mut args = vec!["client", url, "--count", &count, "--timeout-ms", "5000"];
    if !extra.contains(&"--concurrency") {
        args.extend(["--concurrency", "16"]);
    }
    args.extend_from_slice(extra);
    echo_json(cluster, ns, pod, &args)
}

fn statuses(lines: &[Value]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| l["status"].as_u64().unwrap_or(0))
        .collect()
}

fn all_ok(lines: &[Value], count: usize) -> bool {
    lines.len() == count && lines.iter().all(|l| l["status"] == 200)
}

/// The version label of the pod that answered (`echo-v1-…` → `v1`).
fn version_of(line: &Value) -> &str {
    let pod = line["pod"].as_str().unwrap_or("");
    if pod.starts_with("echo-v1") {
        "v1"
    } else if pod.starts_with("echo-v2") {
        "v2"
    } else {
        "?"
    }
}

const CLIENT_PRINCIPAL: &str = "spiffe://cluster.local/ns/b/sa/default";

#[test]
fn a_waypoint_applied_by_the_cli_carries_its_namespaces_traffic() {
    if !root_or_skip("a_waypoint_applied_by_the_cli_carries_its_namespaces_traffic") {
        return;
    }
    let cluster = TestCluster::up("t-wp", 2);
    apps_up(&cluster);
    let waypoint = waypoint_up(&cluster);

    // Status: Programmed, address = the Service hostname; owned objects exist.
    let gateway = cluster
        .objects()
        .unwrap()
        .get(&ObjectKey::new(
            "gateway.networking.k8s.io",
            "Gateway",
            Some("app"),
            "waypoint",
        ))
        .unwrap()
        .unwrap();
    let conditions = gateway.0["status"]["conditions"]
        .as_array()
        .unwrap()
        .clone();
    let condition = |kind: &str| {
        conditions
            .iter()
            .find(|c| c["type"] == kind)
            .map(|c| c["status"].clone())
    };
    assert_eq!(condition("Programmed"), Some("True".into()), "{gateway:?}");
    assert_eq!(condition("Accepted"), Some("True".into()), "{gateway:?}");
    assert_eq!(
        gateway.0["status"]["addresses"][0]["value"],
        "waypoint.app.svc.cluster.local"
    );
    for (group, kind) in [
        ("", "ServiceAccount"),
        ("", "Service"),
        ("apps", "Deployment"),
    ] {
        let object = cluster
            .objects()
            .unwrap()
            .get(&ObjectKey::new(group, kind, Some("app"), "waypoint"))
            .unwrap()
            .unwrap_or_else(|| panic!("{kind} app/waypoint provisioned"));
        assert_eq!(
            object.0["metadata"]["ownerReferences"][0]["kind"],
            "Gateway"
        );
    }
    let (ok, list, _) = weft_waypoint(&cluster, &["list", "-n", "app"]);
    assert!(
        ok && list.contains("waypoint") && list.contains("True"),
        "{list}"
    );

    // Requests to a service in `app` traverse the waypoint: it counts them with the client as
    // source principal and the service as destination.
    let vip = cluster_ip(&cluster, "app", "echo");
    let url = format!("http://{vip}/hello");
    let labels = [
        ("reporter", "waypoint"),
        ("source_principal", CLIENT_PRINCIPAL),
        ("destination_service", "echo.app.svc.cluster.local"),
        ("response_code", "200"),
    ];
    wait_until("requests through the waypoint", READY, || {
        let before = metric_sum(
            &waypoint_metrics(&cluster, &waypoint),
            "istio_requests_total",
            &labels,
        );
        let lines = requests(&cluster, "b", "client", &url, 20, &[]);
        let after = metric_sum(
            &waypoint_metrics(&cluster, &waypoint),
            "istio_requests_total",
            &labels,
        );
        all_ok(&lines, 20) && after - before >= 20.0
    });
    let metrics = waypoint_metrics(&cluster, &waypoint);
    assert!(
        metric_sum(
            &metrics,
            "istio_request_duration_milliseconds_count",
            &[
                ("reporter", "waypoint"),
                ("destination_service_name", "echo")
            ]
        ) >= 20.0,
        "{metrics}"
    );
    // The app sees the waypoint's traffic as HTTP with a request id and a trace context, from
    // the client's own IP: the destination ztunnel trusts the waypoint's `forwarded`.
    let line = &requests(&cluster, "b", "client", &url, 1, &[])[0];
    let headers = &line["body"]["headers"];
    assert!(headers["x-request-id"].is_string(), "{line}");
    let client_pod = cluster
        .objects()
        .unwrap()
        .get(&ObjectKey::new("", "Pod", Some("b"), "client"))
        .unwrap()
        .expect("client pod");
    let source: std::net::SocketAddr = line["body"]["source"].as_str().unwrap().parse().unwrap();
    assert_eq!(source.ip().to_string(), ip_of(&client_pod), "{line}");
    assert!(
        headers["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-")),
        "{line}"
    );

    // Opaque TCP to a bound service still works, counted as TCP by the waypoint.
    let tcp_target = format!("{vip}:9000");
    let tcp = echo_json(
        &cluster,
        "b",
        "client",
        &["tcp", &tcp_target, "--count", "3", "--timeout-ms", "3000"],
    );
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    assert!(tcp.iter().all(|l| l["echoed"] == "ping"), "{tcp:?}");
    let metrics = waypoint_metrics(&cluster, &waypoint);
    assert!(
        metric_sum(
            &metrics,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "waypoint"),
                ("destination_service", "echo.app.svc.cluster.local")
            ]
        ) >= 3.0,
        "{metrics}"
    );

    // Malformed HTTP/1.1 is answered 400 by the waypoint and never reaches the app.
    let client = cluster.pod("b", "client").unwrap();
    let app_requests = |path: &str| -> usize {
        let v1 = cluster
            .wait_ready("app", &[("version", "v1")], 2, READY)
            .unwrap();
        let v2 = cluster
            .wait_ready("app", &[("version", "v2")], 1, READY)
            .unwrap();
        v1.iter()
            .chain(&v2)
            .map(|pod| {
                let log = cluster.logs("app", pod.name(), None).unwrap_or_default();
                log.matches(&format!("\"{path}\"")).count()
            })
            .sum()
    };
    // The app logs each request's path (checked with a well-formed request first).
    requests(
        &cluster,
        "b",
        "client",
        &format!("http://{vip}/wellformed"),
        1,
        &[],
    );
    assert_eq!(app_requests("/wellformed"), 1);
    let addr: std::net::SocketAddr = format!("{vip}:80").parse().unwrap();
    let reply = weft::cluster::netns::within(
        &cluster.layout().pod_netns(client.uid().unwrap()),
        move || {
            use std::io::{Read, Write};
            let mut conn =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            conn.write_all(b"GET /malformed HTTP/1.1\r\nHost: echo\r\nno colon here\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            let _ = conn.read_to_string(&mut text);
            text
        },
    )
    .unwrap();
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    assert_eq!(app_requests("/malformed"), 0);

    // `weft proxy-status` lists the waypoint beside the ztunnels.
    let out = Command::new(WEFT)
        .args(["proxy-status", "--cluster", cluster.layout().name()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("waypoint") && text.contains("app/waypoint"),
        "{text}"
    );

    // `weft ztunnel-config services` shows which waypoint each service uses.
    let out = Command::new(WEFT)
        .args([
            "ztunnel-config",
            "services",
            "-o",
            "json",
            "--cluster",
            cluster.layout().name(),
        ])
        .output()
        .unwrap();
    let services: Value = serde_json::from_slice(&out.stdout).unwrap();
    let waypoint_of = |name: &str| {
        services
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["waypoint"].clone())
    };
    assert_eq!(
        waypoint_of("echo"),
        Some(Value::from("waypoint.app.svc.cluster.local:15008")),
        "{services}"
    );
    assert_eq!(waypoint_of("plain"), Some(Value::Null), "{services}");

    // A service no waypoint is bound to never touches it.
    let plain = format!("http://{}/", cluster_ip(&cluster, "other", "plain"));
    assert!(all_ok(
        &requests(&cluster, "b", "client", &plain, 10, &[]),
        10
    ));
    let metrics = waypoint_metrics(&cluster, &waypoint);
    assert!(!metrics.contains("plain.other.svc"), "{metrics}");

    // A pod behind the waypoint that allows nothing else still gets the waypoint's traffic
    // (the implicit allow-from-waypoint policy) but refuses direct HBONE from the client.
    cluster
        .apply_yaml(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-waypoint, namespace: app}\nspec:\n  selector: {matchLabels: {app: echo}}\n  action: ALLOW\n",
        )
        .unwrap();
    let pod_ip = ip_of(
        &cluster
            .wait_ready("app", &[("version", "v2")], 1, READY)
            .unwrap()[0],
    );
    let direct = format!("http://{pod_ip}:8080/");
    wait_until("direct HBONE to the pod refused", READY, || {
        requests(&cluster, "b", "client", &direct, 3, &[])
            .iter()
            .all(|l| l["status"] != 200)
    });
    assert!(all_ok(
        &requests(&cluster, "b", "client", &url, 10, &[]),
        10
    ));
    cluster
        .delete_yaml(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-waypoint, namespace: app}\n",
        )
        .unwrap();

    // A waypoint restart (its pod deleted, the Deployment starts another): traffic that does not
    // use it never notices, and bound traffic is served again by the new pod.
    cluster
        .objects()
        .unwrap()
        .delete(&[ObjectKey::new("", "Pod", Some("app"), waypoint.name())])
        .unwrap();
    assert!(all_ok(
        &requests(&cluster, "b", "client", &plain, 10, &[]),
        10
    ));
    let restarted = cluster
        .wait_ready(
            "app",
            &[("gateway.networking.k8s.io/gateway-name", "waypoint")],
            1,
            PROGRAMMED,
        )
        .unwrap()
        .remove(0);
    assert_ne!(restarted.uid(), waypoint.uid());
    wait_until("bound traffic through the new waypoint", READY, || {
        let lines = requests(&cluster, "b", "client", &url, 10, &[]);
        all_ok(&lines, 10)
            && metric_sum(
                &waypoint_metrics(&cluster, &restarted),
                "istio_requests_total",
                &labels,
            ) >= 10.0
    });

    // The Gateway deleted: its objects go, and bound traffic goes direct again.
    let (ok, stdout, stderr) = weft_waypoint(&cluster, &["delete", "-n", "app", "waypoint"]);
    assert!(ok, "{stdout}{stderr}");
    wait_until("waypoint objects removed", PROGRAMMED, || {
        cluster
            .objects()
            .unwrap()
            .get(&ObjectKey::new(
                "apps",
                "Deployment",
                Some("app"),
                "waypoint",
            ))
            .unwrap()
            .is_none()
            && cluster
                .pods(Some("app"))
                .unwrap()
                .iter()
                .all(|p| !p.name().starts_with("waypoint"))
    });
    wait_until("direct traffic after the waypoint is gone", READY, || {
        all_ok(&requests(&cluster, "b", "client", &url, 10, &[]), 10)
    });
}

/// HTTPRoute on Service `echo`: header → v2; `/v1` prefix → v1 with rewrite and header
/// modifiers; `/old` → redirect; anything else 80/20 v1/v2.
const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /rewritten}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: v1-prefix}]
        add: [{name: x-added, value: "yes"}]
        remove: [x-remove-me]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-response, value: from-waypoint}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        hostname: new.example
        path: {type: ReplaceFullPath, replaceFullPath: /new}
        statusCode: 302
  - matches: [{path: {type: RegularExpression, value: "/bad(["}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: no-such-service, port: 80}]
  - backendRefs:
    - {name: echo-v1, port: 80, weight: 80}
    - {name: echo-v2, port: 80, weight: 20}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo-grpc, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v1, port: 80}]
  rules:
  - matches: [{method: {service: weft.echo.v1.Echo, method: Reverse}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80}]
"#;

#[test]
fn routes_split_rewrite_redirect_and_route_grpc_at_the_waypoint() {
    if !root_or_skip("routes_split_rewrite_redirect_and_route_grpc_at_the_waypoint") {
        return;
    }
    let cluster = TestCluster::up("t-wp-routes", 2);
    apps_up(&cluster);
    let _waypoint = waypoint_up(&cluster);
    cluster.apply_yaml(ROUTES).unwrap();
    let vip = cluster_ip(&cluster, "app", "echo");

    // Header match → v2 only (also waits for the routes to arrive).
    let url = format!("http://{vip}/split");
    wait_until("header route to v2", READY, || {
        let lines = requests(&cluster, "b", "client", &url, 20, &["-H", "x-version: v2"]);
        all_ok(&lines, 20) && lines.iter().all(|l| version_of(l) == "v2")
    });

    // 80/20 by weight over 1,000 requests, within ±5 %.
    let lines = requests(&cluster, "b", "client", &url, 1000, &[]);
    assert!(all_ok(&lines, 1000), "{:?}", statuses(&lines));
    let v1 = lines.iter().filter(|l| version_of(l) == "v1").count();
    let v2 = lines.iter().filter(|l| version_of(l) == "v2").count();
    assert_eq!(v1 + v2, 1000);
    assert!((750..=850).contains(&v1), "v1 {v1} / v2 {v2}");

    // Prefix route: URL rewrite and request header modifiers seen by the app, response header
    // added on the way back.
    let lines = requests(
        &cluster,
        "b",
        "client",
        &format!("http://{vip}/v1/abc?q=1"),
        1,
        &["-H", "x-remove-me: please", "-H", "x-route: client"],
    );
    let line = &lines[0];
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(version_of(line), "v1", "{line}");
    let body = &line["body"];
    assert_eq!(body["path"], "/rewritten/abc?q=1", "{line}");
    assert_eq!(body["headers"]["x-route"], "v1-prefix", "{line}");
    assert_eq!(body["headers"]["x-added"], "yes", "{line}");
    assert!(body["headers"].get("x-remove-me").is_none(), "{line}");
    assert_eq!(line["headers"]["x-response"], "from-waypoint", "{line}");

    // Redirect.
    let line = &requests(
        &cluster,
        "b",
        "client",
        &format!("http://{vip}/old"),
        1,
        &[],
    )[0];
    assert_eq!(line["status"], 302, "{line}");
    assert_eq!(
        line["headers"]["location"], "http://new.example/new",
        "{line}"
    );

    // The rule with a bad regex is rejected in the route's status; the others keep working.
    let route = cluster
        .objects()
        .unwrap()
        .get(&ObjectKey::new(
            "gateway.networking.k8s.io",
            "HTTPRoute",
            Some("app"),
            "echo",
        ))
        .unwrap()
        .unwrap();
    let status = route.0["status"].to_string();
    assert!(
        status.contains("regex") || status.contains("RegularExpression"),
        "{status}"
    );

    // gRPC routed by method: Reverse → v2, Echo → v1.
    let grpc_target = format!("{}:80", cluster_ip(&cluster, "app", "echo-v1"));
    wait_until("gRPC routed by method", READY, || {
        let reverse = echo_json(
            &cluster,
            "b",
            "client",
            &[
                "grpc",
                "--target",
                &grpc_target,
                "--method",
                "Reverse",
                "--message",
                "abc",
                "--count",
                "5",
            ],
        );
        let echo = echo_json(
            &cluster,
            "b",
            "client",
            &[
                "grpc",
                "--target",
                &grpc_target,
                "--method",
                "Echo",
                "--message",
                "abc",
                "--count",
                "5",
            ],
        );
        reverse.len() == 5
            && echo.len() == 5
            && reverse
                .iter()
                .all(|l| l["message"] == "cba" && version_of(l) == "v2")
            && echo
                .iter()
                .all(|l| l["message"] == "abc" && version_of(l) == "v1")
    });
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
  - when: [{key: "request.headers[x-user]", values: [mallory]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: robot-only, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: echo-v2}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/b/sa/robot]}}]
"#;

#[test]
fn l7_policies_decide_at_the_waypoint() {
    if !root_or_skip("l7_policies_decide_at_the_waypoint") {
        return;
    }
    let cluster = TestCluster::up("t-wp-authz", 2);
    apps_up(&cluster);
    let _waypoint = waypoint_up(&cluster);
    let vip = cluster_ip(&cluster, "app", "echo");
    let v2 = cluster_ip(&cluster, "app", "echo-v2");
    wait_until("through the waypoint", READY, || {
        all_ok(
            &requests(&cluster, "b", "client", &format!("http://{v2}/"), 3, &[]),
            3,
        )
    });
    cluster.apply_yaml(POLICIES).unwrap();

    let status_of = |pod: &str, url: &str, extra: &[&str]| -> Vec<u64> {
        statuses(&requests(&cluster, "b", pod, url, 3, extra))
    };
    wait_until("GET /admin denied", READY, || {
        status_of("client", &format!("http://{vip}/admin"), &[]) == [403, 403, 403]
    });
    let denied = &requests(
        &cluster,
        "b",
        "client",
        &format!("http://{vip}/admin/users"),
        1,
        &[],
    )[0];
    assert_eq!(denied["status"], 403, "{denied}");
    assert_eq!(denied["body"], "RBAC: access denied", "{denied}");
    assert_eq!(
        status_of("client", &format!("http://{vip}/public"), &[]),
        [200, 200, 200]
    );
    assert_eq!(
        status_of(
            "client",
            &format!("http://{vip}/public"),
            &["-H", "x-user: mallory"]
        ),
        [403, 403, 403]
    );
    assert_eq!(
        status_of(
            "client",
            &format!("http://{vip}/public"),
            &["-H", "x-user: alice"]
        ),
        [200, 200, 200]
    );
    // echo-v2 admits only robot's principal.
    wait_until("echo-v2 admits only robot", READY, || {
        status_of("client", &format!("http://{v2}/"), &[]) == [403, 403, 403]
            && status_of("robot", &format!("http://{v2}/"), &[]) == [200, 200, 200]
    });
}

/// `flaky` fails every other request; `slow` paths get a 200 ms timeout; `ejector` has one
/// good endpoint and one that refuses connections, with outlier detection.
const RESILIENCE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken, namespace: app}
spec:
  replicas: 1
  selector: {matchLabels: {app: ejector, version: broken}}
  template:
    metadata: {labels: {app: ejector, version: broken}}
    spec:
      containers:
      - {name: idle, image: weft/sleep, command: [sleep, infinity]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: resilience, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v2, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /retried}}]
    retry: {attempts: 2, codes: [503], backoff: 10ms}
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 200ms}
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo-v2, port: 80}]
"#;

#[test]
fn retries_timeouts_and_outlier_detection_at_the_waypoint() {
    if !root_or_skip("retries_timeouts_and_outlier_detection_at_the_waypoint") {
        return;
    }
    // HTTPRoute `retry` is Gateway API's experimental channel; the charts install the standard
    // channel's CRDs, so this suite still runs on the process cluster's store.
    let cluster = TestCluster::up_processes("t-wp-resilience", 2);
    apps_up(&cluster);
    let mut extra = echo_deployment("app", "good", "ejector", "good", 1);
    extra.push_str("---");
    extra.push_str(&echo_service(
        "app",
        "ejector",
        "app: ejector",
        "weft.dev/outlier-consecutive-failures: \"2\", weft.dev/outlier-base-ejection: 300s, weft.dev/outlier-max-ejection-percent: \"50\"",
    ));
    extra.push_str("---");
    extra.push_str(RESILIENCE);
    cluster.apply_yaml(&extra).unwrap();
    cluster
        .wait_ready("app", &[("app", "ejector")], 2, READY)
        .unwrap();
    let _waypoint = waypoint_up(&cluster);
    let v2 = cluster_ip(&cluster, "app", "echo-v2");
    wait_until("routes in place", READY, || {
        all_ok(
            &requests(
                &cluster,
                "b",
                "client",
                &format!("http://{v2}/slow"),
                2,
                &[],
            ),
            2,
        )
    });

    // Without retries, a backend failing every other request fails half of them…
    let plain = requests(
        &cluster,
        "b",
        "client",
        &format!("http://{v2}/plain?fail_every=2"),
        40,
        &["--concurrency", "1"],
    );
    let failed = plain.iter().filter(|l| l["status"] == 503).count();
    assert!(failed >= 10, "{:?}", statuses(&plain));
    // …and with the route's retries every one succeeds.
    let retried = requests(
        &cluster,
        "b",
        "client",
        &format!("http://{v2}/retried?fail_every=2"),
        40,
        &["--concurrency", "1"],
    );
    assert!(all_ok(&retried, 40), "{:?}", statuses(&retried));

    // A 200 ms request timeout against a 1 s backend: 504 after about 200 ms.
    let slow = requests(
        &cluster,
        "b",
        "client",
        &format!("http://{v2}/slow?delay=1s"),
        3,
        &[],
    );
    for line in &slow {
        assert_eq!(line["status"], 504, "{line}");
        let ms = line["latency_ms"].as_f64().unwrap();
        assert!((190.0..900.0).contains(&ms), "{line}");
    }

    // Outlier detection: the broken endpoint fails at most twice, then gets no traffic while
    // ejected (no retries here, so every request sent to it would fail).
    let ejector = format!("http://{}/", cluster_ip(&cluster, "app", "ejector"));
    let first = requests(
        &cluster,
        "b",
        "client",
        &ejector,
        20,
        &["--concurrency", "1"],
    );
    let failures = first.iter().filter(|l| l["status"] != 200).count();
    assert!((1..=2).contains(&failures), "{:?}", statuses(&first));
    let later = requests(
        &cluster,
        "b",
        "client",
        &ejector,
        100,
        &["--concurrency", "1"],
    );
    assert!(all_ok(&later, 100), "{:?}", statuses(&later));
    assert!(
        later
            .iter()
            .all(|l| l["pod"].as_str().unwrap_or("").starts_with("good"))
    );
}
