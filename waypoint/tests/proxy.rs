//! The waypoint end to end on loopback without L7 resources (services route to themselves, no
//! policy): so nothing here calls into the engine. Real certificates, TLS, HTTP/2 CONNECT.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_core::hbone::headers::TraceParent;

const VIP: [u8; 4] = [10, 96, 0, 10];
const EP1: [u8; 4] = [127, 0, 0, 11];

async fn one_endpoint_mesh() -> (Mesh, App) {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", VIP, &[(80, 8080)], true)]);
    let app = mesh.http_endpoint("ep1", "echo", EP1, ok()).await;
    (mesh, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_is_detected_and_forwarded_over_hbone() {
    let (mesh, app) = one_endpoint_mesh().await;
    let mut client = mesh.h1("10.96.0.10:80").await;
    for _ in 0..3 {
        let (status, headers, _) = get(&mut client, "echo.app:80", "/hello").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-served-by"], "ep1");
        assert_eq!(headers["x-proto"], "HTTP/1.1");
    }
    assert_eq!(app.count.load(std::sync::atomic::Ordering::SeqCst), 3);
    // The second hop: the waypoint's own identity, the original client in `forwarded`, and
    // one pooled HTTP connection for the three requests.
    let connects = mesh.connects.lock().unwrap().clone();
    assert_eq!(
        connects,
        vec![(
            "for=\"127.0.0.2\"".to_owned(),
            "spiffe://cluster.local/ns/app/sa/wp".to_owned()
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_detected_and_forwarded_as_http2() {
    let (mesh, _app) = one_endpoint_mesh().await;
    let mut client = mesh.h2("10.96.0.10:80").await;
    let request = Request::post("http://echo.app/echo")
        .body(Full::new(Bytes::from_static(b"ping")))
        .unwrap();
    let response = tokio::time::timeout(T, client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-proto"], "HTTP/2.0");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_is_forwarded_at_l4() {
    let mesh = Mesh::new().await;
    let ip = IpAddr::from(EP1);
    let echo = tcp_echo(ip).await;
    mesh.endpoint_server(ip, "echo").await;
    mesh.apply(vec![
        service("db", [10, 96, 0, 20], &[(5432, 5432)], true),
        workload(
            "db1",
            "echo",
            ip,
            &[("db", 5432, u32::from(echo.port()))],
            false,
        ),
    ]);
    let mut stream = mesh.connect("10.96.0.20:5432").await.unwrap();
    stream.write_all(b"\x00\x01binary hello").await.unwrap();
    let mut buf = [0u8; 14];
    tokio::time::timeout(T, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"\x00\x01binary hello");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    // Counted as TCP once the stream closed.
    let ok = waypoint::app::wait_until(T, || {
        let text = mesh.metrics_text();
        text.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("destination_workload=\"db1\"")
                && l.contains("request_protocol=\"tcp\"")
                && l.ends_with(" 1")
        })
    })
    .await;
    assert!(ok, "{}", mesh.metrics_text());
    let text = mesh.metrics_text();
    let received = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
        .unwrap();
    assert!(received.ends_with(" 14"), "{received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http1_gets_400_and_never_reaches_the_upstream() {
    let (mesh, app) = one_endpoint_mesh().await;
    let mut stream = mesh.connect("10.96.0.10:80").await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: echo\r\nthis is not a header\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(T, stream.read_to_end(&mut response))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(app.count.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_authorities_are_refused_with_400() {
    let (mesh, _app) = one_endpoint_mesh().await;
    mesh.apply(vec![service(
        "other",
        [10, 96, 0, 11],
        &[(80, 8080)],
        false,
    )]);
    for authority in [
        "10.96.0.11:80",
        "10.96.0.10:81",
        "10.9.9.9:80",
        "echo.app:80",
    ] {
        let err = mesh.connect(authority).await.unwrap_err();
        assert_eq!(
            err.status(),
            Some(StatusCode::BAD_REQUEST),
            "{authority}: {err}"
        );
    }
    // A workload bound to the waypoint is served by pod address.
    mesh.apply(vec![workload(
        "ep1",
        "echo",
        IpAddr::from(EP1),
        &[("echo", 80, u32::from(_app.addr.port()))],
        true,
    )]);
    let authority = _app.addr.to_string();
    let mut client = mesh.h1(&authority).await;
    let (status, headers, _) = get(&mut client, &authority, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-served-by"], "ep1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_and_traceparent() {
    let (mesh, _app) = one_endpoint_mesh().await;
    let mut client = mesh.h1("10.96.0.10:80").await;
    let (_, headers, _) = get(&mut client, "echo.app", "/").await;
    let rid = headers["x-seen-request-id"].to_str().unwrap();
    assert_eq!(rid.len(), 36, "{rid}");
    let tp = TraceParent::parse(headers["x-seen-traceparent"].to_str().unwrap()).unwrap();
    assert_eq!(tp.flags, 1);

    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let request = Request::get("/")
        .header("host", "echo.app")
        .header("x-request-id", "my-id")
        .header("traceparent", parent)
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.ready().await.unwrap();
    let response = tokio::time::timeout(T, client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.headers()["x-seen-request-id"], "my-id");
    let seen =
        TraceParent::parse(response.headers()["x-seen-traceparent"].to_str().unwrap()).unwrap();
    assert_eq!(seen.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
    assert_ne!(seen.parent_id, 0xb7ad6b7169203331);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_counted_with_the_standard_labels() {
    let (mesh, _app) = one_endpoint_mesh().await;
    let mut client = mesh.h1("10.96.0.10:80").await;
    let (status, _, _) = get(&mut client, "echo.app", "/").await;
    assert_eq!(status, StatusCode::OK);
    let ok = waypoint::app::wait_until(T, || {
        mesh.metrics_text()
            .lines()
            .any(|l| l.starts_with("istio_requests_total{"))
    })
    .await;
    assert!(ok);
    let text = mesh.metrics_text();
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .unwrap();
    for want in [
        "reporter=\"waypoint\"",
        "source_workload=\"client\"",
        "source_workload_namespace=\"app\"",
        "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"",
        "destination_workload=\"ep1\"",
        "destination_workload_namespace=\"app\"",
        "destination_principal=\"spiffe://cluster.local/ns/app/sa/echo\"",
        "destination_service=\"echo.app.svc.cluster.local\"",
        "destination_service_name=\"echo\"",
        "destination_service_namespace=\"app\"",
        "request_protocol=\"http\"",
        "response_code=\"200\"",
        "response_flags=\"-\"",
        "grpc_response_status=\"unknown\"",
        "connection_security_policy=\"mutual_tls\"",
    ] {
        assert!(line.contains(want), "{want} missing in {line}");
    }
    assert!(line.ends_with(" 1"), "{line}");
    assert!(text.contains("istio_request_duration_milliseconds_count{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_map_to_503_with_flags() {
    let mesh = Mesh::new().await;
    // No endpoints at all → 503 UH.
    mesh.apply(vec![service("empty", [10, 96, 0, 30], &[(80, 8080)], true)]);
    let mut client = mesh.h1("10.96.0.30:80").await;
    let (status, _, body) = get(&mut client, "empty.app", "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "no healthy upstream");

    // An endpoint whose HBONE port refuses connections → 503 UF.
    mesh.apply(vec![
        service("down", [10, 96, 0, 31], &[(80, 8080)], true),
        workload(
            "down1",
            "echo",
            IpAddr::from([127, 0, 0, 31]),
            &[("down", 80, 8080)],
            false,
        ),
    ]);
    let mut client = mesh.h1("10.96.0.31:80").await;
    let (status, _, body) = get(&mut client, "down.app", "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("connection failure"), "{body}");

    let ok = waypoint::app::wait_until(T, || {
        let text = mesh.metrics_text();
        text.contains("response_flags=\"UH\"") && text.contains("response_flags=\"UF\"")
    })
    .await;
    assert!(ok, "{}", mesh.metrics_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_in_flight_requests_finish() {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("slow", [10, 96, 0, 40], &[(80, 8080)], true)]);
    let _app = mesh
        .http_endpoint(
            "slow1",
            "slow",
            [127, 0, 0, 41],
            std::sync::Arc::new(|_| (StatusCode::OK, Duration::from_millis(300))),
        )
        .await;
    let mut client = mesh.h1("10.96.0.40:80").await;
    let request = tokio::spawn(async move { get(&mut client, "slow.app", "/").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut mesh = mesh;
    let trigger = mesh.drain.take().unwrap();
    let outcome = tokio::spawn(trigger.drain(Duration::from_secs(5)));
    let (status, _, _) = tokio::time::timeout(T, request).await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK, "the in-flight request finished");
    drop(mesh);
    let _ = tokio::time::timeout(T, outcome).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_are_labelled_grpc_with_their_status() {
    let (mesh, _app) = one_endpoint_mesh().await;
    let mut client = mesh.h2("10.96.0.10:80").await;
    let request = Request::post("http://echo.app/weft.echo.v1.Echo/Echo")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let response = tokio::time::timeout(T, client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-proto"], "HTTP/2.0");
    let _ = response.into_body().collect().await.unwrap();
    let ok = waypoint::app::wait_until(T, || {
        mesh.metrics_text().lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains("grpc_response_status=\"0\"")
        })
    })
    .await;
    assert!(ok, "{}", mesh.metrics_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_get_local_replies_as_grpc_status() {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("empty", [10, 96, 0, 30], &[(80, 8080)], true)]);
    let mut client = mesh.h2("10.96.0.30:80").await;
    let request = Request::post("http://empty.app/weft.echo.v1.Echo/Echo")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(T, client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "14");
    assert_eq!(response.headers()["grpc-message"], "no healthy upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_without_a_tunnel_are_reached_with_plain_tcp() {
    let mesh = Mesh::new().await;
    let ip = IpAddr::from([127, 0, 0, 51]);
    let app = http_app(ip, "plain", ok()).await;
    mesh.apply(vec![
        service("plain", [10, 96, 0, 50], &[(80, 8080)], true),
        workload_with_tunnel(
            "plain1",
            "plain",
            ip,
            &[("plain", 80, u32::from(app.addr.port()))],
            false,
            weft_proto::istio::workload::TunnelProtocol::None,
        ),
    ]);
    let mut client = mesh.h1("10.96.0.50:80").await;
    let (status, headers, _) = get(&mut client, "plain.app", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-served-by"], "plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let (mesh, _app) = one_endpoint_mesh().await;
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for http2 in [false, true] {
        let request = Request::post("http://echo.app/upload")
            .header("host", "echo.app")
            .body(Full::new(Bytes::from(payload.clone())))
            .unwrap();
        let response = if http2 {
            let mut c = mesh.h2("10.96.0.10:80").await;
            tokio::time::timeout(T, c.send_request(request))
                .await
                .unwrap()
                .unwrap()
        } else {
            let mut c = mesh.h1("10.96.0.10:80").await;
            tokio::time::timeout(T, c.send_request(request))
                .await
                .unwrap()
                .unwrap()
        };
        assert_eq!(response.status(), StatusCode::OK);
        let body = tokio::time::timeout(T, response.into_body().collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        assert_eq!(body.len(), payload.len(), "http2={http2}");
        assert!(body[..] == payload[..], "http2={http2}");
    }
}

/// An app answering `upgrade: echo` requests with 101, then echoing bytes upper-cased.
async fn upgrade_app(ip: IpAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(upgraded) = on.await else { return };
                            let mut io = hyper_util::rt::TokioIo::new(upgraded);
                            let mut buf = [0u8; 64];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0
                                    || io.write_all(&buf[..n].to_ascii_uppercase()).await.is_err()
                                {
                                    break;
                                }
                            }
                        });
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header("connection", "upgrade")
                                .header("upgrade", "echo")
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(conn), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_upgrades_are_spliced() {
    let mesh = Mesh::new().await;
    let ip = IpAddr::from(EP1);
    let app = upgrade_app(ip).await;
    mesh.endpoint_server(ip, "echo").await;
    mesh.apply(vec![
        service("ws", VIP, &[(80, 8080)], true),
        workload(
            "ws1",
            "echo",
            ip,
            &[("ws", 80, u32::from(app.port()))],
            false,
        ),
    ]);
    let mut stream = mesh.connect("10.96.0.10:80").await.unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(T, stream.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    stream.write_all(b"hello upgraded").await.unwrap();
    let mut buf = [0u8; 14];
    tokio::time::timeout(T, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"HELLO UPGRADED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leading_empty_lines_do_not_turn_http_into_opaque_tcp() {
    let (mesh, app) = one_endpoint_mesh().await;
    let mut stream = mesh.connect("10.96.0.10:80").await.unwrap();
    stream
        .write_all(b"\r\nGET /x HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(T, stream.read_to_end(&mut response))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&response).to_lowercase();
    // Parsed by the waypoint (so policy applies): the waypoint's x-request-id reached the app.
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("x-seen-request-id"), "{text}");
    assert_eq!(app.count.load(std::sync::atomic::Ordering::SeqCst), 1);
}
