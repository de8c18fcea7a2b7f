//! `weft-echo` for L7 tests, on loopback: the answer-shaping controls (`status`, `delay`,
//! `fail_every` as query parameters and `x-echo-*` headers) and the gRPC `weft.echo.v1.Echo`
//! service on the HTTP port.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use weft::echo::{self, ClientConfig, Exchange, GrpcConfig, GrpcMethod, PodIdentity, ServeConfig};

const TIMEOUT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An in-process server on loopback port 0, stopped on drop.
struct Running {
    http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    async fn start() -> Self {
        let mut config = ServeConfig::new(PodIdentity {
            pod: "echo-l7-0".into(),
            namespace: "l7".into(),
        });
        config.http = (Ipv4Addr::LOCALHOST, 0).into();
        config.tcp = (Ipv4Addr::LOCALHOST, 0).into();
        let server = within("binding", echo::bind(config))
            .await
            .expect("binding the echo server");
        let http = server.http_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Running {
            http,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.http)
            .parse()
            .expect("a valid url")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Sends `count` requests one after the other (one worker) and returns them in order.
async fn send(url: Uri, headers: &[(&str, &str)], count: u64) -> Vec<Exchange> {
    let mut config = ClientConfig::new(url);
    config.count = count;
    config.headers = headers
        .iter()
        .map(|(k, v)| {
            (
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            )
        })
        .collect::<HeaderMap>();
    let mut out = Vec::new();
    within(
        "client run",
        echo::client(config, |exchange| out.push(exchange)),
    )
    .await
    .expect("a valid client config");
    out.sort_by_key(|e| e.seq);
    out
}

fn status_of(exchange: &Exchange) -> u16 {
    exchange
        .outcome
        .as_ref()
        .unwrap_or_else(|e| panic!("request {} failed: {e}", exchange.seq))
        .status
        .as_u16()
}

#[tokio::test]
async fn status_control_answers_the_code_with_the_json_echo() {
    let server = Running::start().await;
    for (path, headers) in [
        ("/a?status=503", vec![]),
        ("/a", vec![("x-echo-status", "503")]),
        // The query parameter wins over the header.
        ("/a?status=503", vec![("x-echo-status", "200")]),
    ] {
        let replies = send(server.url(path), &headers, 1).await;
        let reply = replies[0].outcome.as_ref().expect("a response");
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path} {headers:?}"
        );
        assert_eq!(
            reply.field("pod"),
            Some(&"echo-l7-0".into()),
            "still the echo"
        );
        assert_eq!(reply.field("path"), Some(&path.into()));
    }
    let bad = send(server.url("/a?status=42"), &[], 1).await;
    assert_eq!(status_of(&bad[0]), 400);
}

#[tokio::test]
async fn delay_control_waits_before_answering() {
    let server = Running::start().await;
    for (path, headers) in [
        ("/slow?delay=300ms", vec![]),
        ("/slow", vec![("x-echo-delay", "300ms")]),
    ] {
        let started = Instant::now();
        let replies = send(server.url(path), &headers, 1).await;
        assert_eq!(status_of(&replies[0]), 200);
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{path} {headers:?} answered after {:?}",
            started.elapsed()
        );
    }
    let fast = Instant::now();
    send(server.url("/fast"), &[], 1).await;
    assert!(fast.elapsed() < Duration::from_millis(300));
    let bad = send(server.url("/slow?delay=soon"), &[], 1).await;
    assert_eq!(status_of(&bad[0]), 400);
}

#[tokio::test]
async fn fail_every_counts_per_process_across_query_and_header() {
    let server = Running::start().await;
    let by_query = send(server.url("/f?fail_every=3"), &[], 4).await;
    let statuses: Vec<u16> = by_query.iter().map(status_of).collect();
    assert_eq!(statuses, [200, 200, 503, 200]);
    // Requests without the control do not move the counter.
    send(server.url("/other"), &[], 5).await;
    // The same process-wide counter, now driven by the header: requests 5 and 6.
    let by_header = send(server.url("/f"), &[("x-echo-fail-every", "3")], 2).await;
    let statuses: Vec<u16> = by_header.iter().map(status_of).collect();
    assert_eq!(statuses, [200, 503]);
    let bad = send(server.url("/f?fail_every=0"), &[], 1).await;
    assert_eq!(status_of(&bad[0]), 400);
}

#[tokio::test]
async fn fail_every_answers_carry_the_count() {
    let server = Running::start().await;
    let client = raw_get(server.http, "/c?fail_every=2").await;
    assert_eq!(client, (StatusCode::OK, Some("1".to_owned())));
    let client = raw_get(server.http, "/c?fail_every=2").await;
    assert_eq!(
        client,
        (StatusCode::SERVICE_UNAVAILABLE, Some("2".to_owned()))
    );
}

/// One raw HTTP/1.1 GET: the status and the `x-echo-count` header.
async fn raw_get(addr: SocketAddr, path: &str) -> (StatusCode, Option<String>) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    let stream = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connecting");
    let (mut sender, conn) = within(
        "handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .expect("handshake");
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = within("request", sender.send_request(request))
        .await
        .expect("response");
    let count = response
        .headers()
        .get(echo::COUNT_HEADER)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let status = response.status();
    within("body", response.into_body().collect())
        .await
        .expect("body");
    (status, count)
}

async fn call(config: GrpcConfig) -> Vec<echo::GrpcExchange> {
    let mut out = Vec::new();
    within("grpc calls", echo::grpc(config, |e| out.push(e)))
        .await
        .expect("a valid target");
    out
}

#[tokio::test]
async fn grpc_echo_and_reverse_report_pod_method_and_metadata() {
    let server = Running::start().await;
    let mut config = GrpcConfig::new(server.http.to_string(), "hello, waypoint");
    config.count = 2;
    config
        .metadata
        .insert("x-user", HeaderValue::from_static("alice"));
    config
        .metadata
        .insert("x-trace", HeaderValue::from_static("t-1"));
    let echoed = call(config.clone()).await;
    assert_eq!(echoed.len(), 2);
    for exchange in &echoed {
        let response = exchange.outcome.as_ref().expect("an answer");
        assert_eq!(response.message, "hello, waypoint");
        assert_eq!(response.pod, "echo-l7-0");
        assert_eq!(response.namespace, "l7");
        assert_eq!(response.method, "/weft.echo.v1.Echo/Echo");
        assert_eq!(
            response.metadata.get("x-user").map(String::as_str),
            Some("alice")
        );
        assert_eq!(
            response.metadata.get("x-trace").map(String::as_str),
            Some("t-1")
        );
    }
    let line: serde_json::Value = serde_json::from_str(&echoed[1].to_json()).expect("json line");
    assert_eq!(line["seq"], 1);
    assert_eq!(line["code"], 0);
    assert_eq!(line["status"], "Ok");
    assert_eq!(line["method"], "/weft.echo.v1.Echo/Echo");
    assert_eq!(line["metadata"]["x-user"], "alice");

    config.method = GrpcMethod::Reverse;
    config.count = 1;
    let reversed = call(config).await;
    let response = reversed[0].outcome.as_ref().expect("an answer");
    assert_eq!(response.message, "tniopyaw ,olleh");
    assert_eq!(response.method, "/weft.echo.v1.Echo/Reverse");

    // Plain HTTP on the same port still gets the JSON echo.
    let replies = send(server.url("/plain"), &[], 1).await;
    assert_eq!(status_of(&replies[0]), 200);
}

#[tokio::test]
async fn grpc_failures_are_reported_per_call() {
    // A port nothing listens on: bind, read the port, close.
    let closed = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind")
        .local_addr()
        .expect("addr");
    let mut config = GrpcConfig::new(format!("http://{closed}"), "x");
    config.count = 2;
    config.timeout = Duration::from_secs(2);
    let failed = call(config).await;
    assert_eq!(failed.len(), 2);
    for exchange in &failed {
        let status = exchange.outcome.as_ref().expect_err("no server");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let line: serde_json::Value = serde_json::from_str(&exchange.to_json()).expect("json");
        assert_eq!(line["code"], 14);
        assert_eq!(line["status"], "Unavailable");
        assert!(
            line["error"]
                .as_str()
                .unwrap_or_default()
                .contains("onnect"),
            "{line}"
        );
    }
}
