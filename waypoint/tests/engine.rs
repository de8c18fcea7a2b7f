//! The waypoint with real `weft.l7.v1` resources (ServiceConfig routes, L7 Policy), applied
//! through the xDS handlers: these call into the engine (`waypoint/src/engine*`), so they only
//! pass once the engine is merged (before that the engine's `unimplemented!()` panics).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use prost::Message;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proto::type_url::{L7_POLICY_TYPE_URL, L7_SERVICE_TYPE_URL};
use weft_proto::weft::l7::v1 as pb;

const VIP: [u8; 4] = [10, 96, 0, 10];

fn prefix(p: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: Some(pb::string_match::Kind::PathPrefix(p.into())),
    })
}

fn backend(host: &str, port: u32) -> pb::Backend {
    pb::Backend {
        hostname: host.into(),
        port,
        weight: 1,
        filters: vec![],
    }
}

fn apply_l7(mesh: &Mesh, type_url: &str, name: &str, value: Vec<u8>) {
    let handlers = mesh.state.handlers();
    let handler = handlers.iter().find(|h| h.type_url() == type_url).unwrap();
    let rejected = handler.apply(vec![any(type_url, name, value)]);
    assert!(rejected.is_empty(), "{rejected:?}");
}

fn echo_config(routes: Vec<pb::Route>, protocol: pb::Protocol, lb: pb::LoadBalancer) -> Vec<u8> {
    pb::ServiceConfig {
        namespace: "app".into(),
        name: "echo".into(),
        hostname: "echo.app.svc.cluster.local".into(),
        ports: vec![pb::PortConfig {
            port: 80,
            protocol: protocol as i32,
            routes,
        }],
        load_balancer: lb as i32,
        outlier_detection: None,
    }
    .encode_to_vec()
}

async fn mesh_with_two_endpoints() -> (Mesh, App, App) {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", VIP, &[(80, 8080)], true)]);
    let a = mesh
        .http_endpoint("ep0", "echo", [127, 0, 0, 11], ok())
        .await;
    let b = mesh
        .http_endpoint("ep1", "echo", [127, 0, 0, 12], ok())
        .await;
    (mesh, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_policy_answers_403_rbac_access_denied() {
    let (mesh, a, b) = mesh_with_two_endpoints().await;
    let policy = pb::Policy {
        namespace: "app".into(),
        name: "no-admin".into(),
        action: pb::Action::Deny as i32,
        services: vec![],
        rules: vec![pb::Rule {
            from: vec![],
            to: vec![pb::Operation {
                paths: vec!["/admin*".into()],
                ..Default::default()
            }],
            when: vec![],
        }],
    };
    apply_l7(
        &mesh,
        L7_POLICY_TYPE_URL,
        "app/wp/app/no-admin",
        policy.encode_to_vec(),
    );
    let mut client = mesh.h1("10.96.0.10:80").await;
    let (status, _, body) = get(&mut client, "echo.app", "/admin/users").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "RBAC: access denied");
    assert_eq!(
        a.count.load(Ordering::SeqCst) + b.count.load(Ordering::SeqCst),
        0,
        "denied requests never reach an endpoint"
    );
    let (status, _, _) = get(&mut client, "echo.app", "/public").await;
    assert_eq!(status, StatusCode::OK);
    let text = mesh.metrics_text();
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"403\"")
            && l.contains("response_flags=\"RBAC\"")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_choose_the_backend_and_unmatched_requests_get_404() {
    let (mesh, _a, _b) = mesh_with_two_endpoints().await;
    let route = pb::Route {
        name: "HTTPRoute/app/echo/rule/0/match/0".into(),
        r#match: Some(pb::RouteMatch {
            path: prefix("/api"),
            ..Default::default()
        }),
        backends: vec![backend("echo.app.svc.cluster.local", 80)],
        ..Default::default()
    };
    apply_l7(
        &mesh,
        L7_SERVICE_TYPE_URL,
        "app/wp/app/echo",
        echo_config(
            vec![route],
            pb::Protocol::Http,
            pb::LoadBalancer::RoundRobin,
        ),
    );
    let mut client = mesh.h1("10.96.0.10:80").await;
    let mut served = Vec::new();
    for _ in 0..4 {
        let (status, headers, _) = get(&mut client, "echo.app", "/api/x").await;
        assert_eq!(status, StatusCode::OK);
        served.push(headers["x-served-by"].to_str().unwrap().to_owned());
    }
    served.sort();
    assert_eq!(
        served,
        ["ep0", "ep0", "ep1", "ep1"],
        "round robin from the config"
    );
    let (status, _, _) = get(&mut client, "echo.app", "/other").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_retries_and_timeouts_apply() {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", VIP, &[(80, 8080)], true)]);
    let _app = mesh
        .http_endpoint(
            "ep0",
            "echo",
            [127, 0, 0, 11],
            std::sync::Arc::new(|n| match n {
                n if n % 2 == 1 => (StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO),
                _ => (StatusCode::OK, Duration::ZERO),
            }),
        )
        .await;
    let route = pb::Route {
        name: "HTTPRoute/app/echo/rule/0/match/0".into(),
        backends: vec![backend("echo.app.svc.cluster.local", 80)],
        request_timeout_ms: 2000,
        retry: Some(pb::Retry {
            attempts: 2,
            codes: vec![503],
            backoff_ms: 1,
        }),
        ..Default::default()
    };
    apply_l7(
        &mesh,
        L7_SERVICE_TYPE_URL,
        "app/wp/app/echo",
        echo_config(
            vec![route],
            pb::Protocol::Http,
            pb::LoadBalancer::LeastRequest,
        ),
    );
    let mut client = mesh.h1("10.96.0.10:80").await;
    for _ in 0..4 {
        let (status, _, _) = get(&mut client, "echo.app", "/").await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_port_is_never_parsed() {
    let mesh = Mesh::new().await;
    let ip = std::net::IpAddr::from([127, 0, 0, 11]);
    let echo = tcp_echo(ip).await;
    mesh.endpoint_server(ip, "echo").await;
    mesh.apply(vec![
        service("echo", VIP, &[(80, 8080)], true),
        workload(
            "ep0",
            "echo",
            ip,
            &[("echo", 80, u32::from(echo.port()))],
            false,
        ),
    ]);
    apply_l7(
        &mesh,
        L7_SERVICE_TYPE_URL,
        "app/wp/app/echo",
        echo_config(vec![], pb::Protocol::Tcp, pb::LoadBalancer::LeastRequest),
    );
    // Looks like HTTP, but the port is TCP: echoed byte for byte.
    let mut stream = mesh.connect("10.96.0.10:80").await.unwrap();
    let request = b"GET / HTTP/1.1\r\nbroken header\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; request.len()];
    tokio::time::timeout(T, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, request);
}

fn filter(kind: pb::filter::Kind) -> pb::Filter {
    pb::Filter { kind: Some(kind) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_mirrors_apply_on_the_wire() {
    let mesh = Mesh::new().await;
    mesh.apply(vec![
        service("echo", VIP, &[(80, 8080)], true),
        service("shadow", [10, 96, 0, 11], &[(80, 8080)], false),
    ]);
    let _main = mesh
        .http_endpoint("ep0", "echo", [127, 0, 0, 11], ok())
        .await;
    let shadow = mesh
        .http_endpoint("shadow0", "shadow", [127, 0, 0, 12], ok())
        .await;
    let route = pb::Route {
        name: "HTTPRoute/app/echo/rule/0/match/0".into(),
        backends: vec![backend("echo.app.svc.cluster.local", 80)],
        filters: vec![
            filter(pb::filter::Kind::RequestHeaderModifier(
                pb::HeaderModifier {
                    set: vec![pb::Header {
                        name: "x-add-route".into(),
                        value: "yes".into(),
                    }],
                    ..Default::default()
                },
            )),
            filter(pb::filter::Kind::ResponseHeaderModifier(
                pb::HeaderModifier {
                    add: vec![pb::Header {
                        name: "x-from-waypoint".into(),
                        value: "1".into(),
                    }],
                    ..Default::default()
                },
            )),
            filter(pb::filter::Kind::RequestMirror(pb::RequestMirror {
                backend: Some(backend("shadow.app.svc.cluster.local", 80)),
                percent: 100,
            })),
        ],
        ..Default::default()
    };
    apply_l7(
        &mesh,
        L7_SERVICE_TYPE_URL,
        "app/wp/app/echo",
        echo_config(
            vec![route],
            pb::Protocol::Http,
            pb::LoadBalancer::LeastRequest,
        ),
    );
    let mut client = mesh.h1("10.96.0.10:80").await;
    let (status, headers, _) = get(&mut client, "echo.app", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-served-by"], "ep0");
    assert_eq!(
        headers["x-seen-x-add-route"], "yes",
        "request filter applied"
    );
    assert_eq!(headers["x-from-waypoint"], "1", "response filter applied");
    let mirrored = waypoint::app::wait_until(T, || shadow.count.load(Ordering::SeqCst) == 1).await;
    assert!(mirrored, "the mirror backend got a copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_is_subject_to_policy() {
    let mesh = Mesh::new().await;
    let ip = std::net::IpAddr::from([127, 0, 0, 11]);
    let echo = tcp_echo(ip).await;
    mesh.endpoint_server(ip, "echo").await;
    mesh.apply(vec![
        service("db", VIP, &[(5432, 5432)], true),
        workload(
            "db0",
            "echo",
            ip,
            &[("db", 5432, u32::from(echo.port()))],
            false,
        ),
    ]);
    // Only principal "other" is allowed: the client's TCP stream is closed unanswered.
    let policy = pb::Policy {
        namespace: "app".into(),
        name: "only-other".into(),
        action: pb::Action::Allow as i32,
        services: vec![],
        rules: vec![pb::Rule {
            from: vec![pb::Source {
                principals: vec!["cluster.local/ns/app/sa/other".into()],
                ..Default::default()
            }],
            to: vec![],
            when: vec![],
        }],
    };
    apply_l7(
        &mesh,
        L7_POLICY_TYPE_URL,
        "app/wp/app/only-other",
        policy.encode_to_vec(),
    );
    let mut stream = mesh.connect("10.96.0.10:5432").await.unwrap();
    stream.write_all(b"\x00hello").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, stream.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(out.is_empty(), "denied stream got {out:?}");
    assert!(mesh.metrics_text().contains("response_flags=\"RBAC\""));

    // Allowing the client lets it through.
    let mut policy = policy;
    policy.rules[0].from[0]
        .principals
        .push("cluster.local/ns/app/sa/client".into());
    apply_l7(
        &mesh,
        L7_POLICY_TYPE_URL,
        "app/wp/app/only-other",
        policy.encode_to_vec(),
    );
    let mut stream = mesh.connect("10.96.0.10:5432").await.unwrap();
    stream.write_all(b"\x00hello").await.unwrap();
    let mut buf = [0u8; 6];
    tokio::time::timeout(T, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"\x00hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504_upstream_request_timeout() {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", VIP, &[(80, 8080)], true)]);
    let _app = mesh
        .http_endpoint(
            "ep0",
            "echo",
            [127, 0, 0, 11],
            std::sync::Arc::new(|_| (StatusCode::OK, Duration::from_secs(5))),
        )
        .await;
    let route = pb::Route {
        name: "HTTPRoute/app/echo/rule/0/match/0".into(),
        backends: vec![backend("echo.app.svc.cluster.local", 80)],
        request_timeout_ms: 300,
        ..Default::default()
    };
    apply_l7(
        &mesh,
        L7_SERVICE_TYPE_URL,
        "app/wp/app/echo",
        echo_config(
            vec![route],
            pb::Protocol::Http,
            pb::LoadBalancer::LeastRequest,
        ),
    );
    let mut client = mesh.h1("10.96.0.10:80").await;
    let start = std::time::Instant::now();
    let (status, _, body) = get(&mut client, "echo.app", "/").await;
    let took = start.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "upstream request timeout");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    let ok = waypoint::app::wait_until(T, || {
        mesh.metrics_text().lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"504\"")
                && l.contains("response_flags=\"UT\"")
        })
    })
    .await;
    assert!(ok, "{}", mesh.metrics_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_on_http_attributes_closes_opaque_tcp() {
    let mesh = Mesh::new().await;
    let ip = std::net::IpAddr::from([127, 0, 0, 11]);
    let echo = tcp_echo(ip).await;
    mesh.endpoint_server(ip, "echo").await;
    mesh.apply(vec![
        service("db", VIP, &[(5432, 5432)], true),
        workload(
            "db0",
            "echo",
            ip,
            &[("db", 5432, u32::from(echo.port()))],
            false,
        ),
    ]);
    let policy = pb::Policy {
        namespace: "app".into(),
        name: "no-admin".into(),
        action: pb::Action::Deny as i32,
        services: vec![],
        rules: vec![pb::Rule {
            from: vec![],
            to: vec![pb::Operation {
                paths: vec!["/admin*".into()],
                ..Default::default()
            }],
            when: vec![],
        }],
    };
    apply_l7(
        &mesh,
        L7_POLICY_TYPE_URL,
        "app/wp/app/no-admin",
        policy.encode_to_vec(),
    );
    // Opaque TCP cannot be checked for paths: denied (Istio's fail-closed TCP translation).
    let mut stream = mesh.connect("10.96.0.10:5432").await.unwrap();
    stream.write_all(b"\x00GET /admin").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, stream.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(out.is_empty(), "denied stream got {out:?}");
}
