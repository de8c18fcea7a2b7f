//! `weft-echo` end to end on loopback: the in-process server against raw hyper/TCP clients and the
//! library clients, and the built binary as two processes.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use weft::echo::{
    self, ClientConfig, ClientError, Echo, Exchange, PodIdentity, ServeConfig, TcpConfig,
};

const TIMEOUT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An in-process server on loopback port 0; dropping `stop` (or sending on it) shuts it down.
struct Running {
    http: SocketAddr,
    tcp: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut ServeConfig)) -> Self {
        let mut config = ServeConfig::new(PodIdentity {
            pod: "echo-0".into(),
            namespace: "demo".into(),
        });
        config.http = (Ipv4Addr::LOCALHOST, 0).into();
        config.tcp = (Ipv4Addr::LOCALHOST, 0).into();
        tweak(&mut config);
        let server = within("binding", echo::bind(config))
            .await
            .expect("binding the echo server");
        let (http, tcp) = (server.http_addr(), server.tcp_addr());
        assert_ne!(http.port(), 0);
        assert_ne!(tcp.port(), 0);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Self {
            http,
            tcp,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.http)
            .parse()
            .expect("valid url")
    }

    async fn shutdown(mut self) {
        drop(self.stop.take());
        within("server shutdown", &mut self.task)
            .await
            .expect("server task");
    }
}

/// Runs the library client and returns its outcomes sorted by `seq`.
async fn run_client(config: ClientConfig) -> (echo::Summary, Vec<Exchange>) {
    let mut seen = Vec::new();
    let summary = within("client run", echo::client(config, |e| seen.push(e)))
        .await
        .expect("valid client config");
    seen.sort_by_key(|e| e.seq);
    (summary, seen)
}

fn echo_of(exchange: &Exchange) -> Echo {
    let reply = exchange.outcome.as_ref().expect("a response");
    serde_json::from_value(reply.body.clone()).expect("an echo body")
}

#[tokio::test]
async fn http1_request_is_echoed_with_the_connection_source() {
    let server = Running::start().await;
    let stream = within("connect", TcpStream::connect(server.http))
        .await
        .unwrap();
    let client_addr = stream.local_addr().unwrap();
    let (mut sender, conn) = within(
        "handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);

    let request = Request::builder()
        .method(Method::POST)
        .uri("/some/path?x=1&y=2")
        .header("host", "echo.demo.svc:8080")
        .header("x-custom", "hello")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .body(Full::new(Bytes::from_static(b"twelve bytes")))
        .unwrap();
    let response = within("response", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get("content-type"),
        Some(&HeaderValue::from_static("application/json"))
    );
    let body = within("body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.pod, "echo-0");
    assert_eq!(echo.namespace, "demo");
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.path, "/some/path?x=1&y=2");
    assert_eq!(echo.proto, "HTTP/1.1");
    assert_eq!(echo.host, "echo.demo.svc:8080");
    assert_eq!(
        echo.headers.get("x-custom").map(String::as_str),
        Some("hello")
    );
    assert_eq!(
        echo.headers.get("x-multi").map(String::as_str),
        Some("a, b")
    );
    assert_eq!(echo.source, client_addr);
    assert_eq!(echo.local, server.http);
    assert_eq!(echo.body_bytes, 12);

    // Keep-alive: a second request on the same connection sees the same source.
    let request = Request::get("/again")
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = within("second response", sender.send_request(request))
        .await
        .unwrap();
    let body = within("second body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    let echo: Echo = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo.source, client_addr);
    drop(sender);
    server.shutdown().await;
}

#[tokio::test]
async fn h2c_request_reports_http2() {
    let server = Running::start().await;
    let mut config = ClientConfig::new(server.url("/h2?q"));
    config.http2 = true;
    config
        .headers
        .insert("x-custom", HeaderValue::from_static("h2"));
    let (summary, seen) = run_client(config).await;
    assert!(summary.all_ok(), "{seen:?}");
    assert_eq!(seen.len(), 1);
    let reply = seen[0].outcome.as_ref().unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.version, http::Version::HTTP_2);
    let echo = echo_of(&seen[0]);
    assert_eq!(echo.proto, "HTTP/2.0");
    assert_eq!(echo.path, "/h2?q");
    assert_eq!(echo.host, server.http.to_string());
    assert_eq!(echo.headers.get("x-custom").map(String::as_str), Some("h2"));
    assert_eq!(echo.source, reply.local_addr);

    let line: Value = serde_json::from_str(&seen[0].to_json()).unwrap();
    assert_eq!(line["seq"], 0);
    assert_eq!(line["status"], 200);
    assert_eq!(line["proto"], "HTTP/2.0");
    assert_eq!(line["pod"], "echo-0");
    assert_eq!(line["namespace"], "demo");
    assert_eq!(line["source"], reply.local_addr.to_string());
    assert!(line["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(line["body"]["path"], "/h2?q");
    server.shutdown().await;
}

#[tokio::test]
async fn http1_client_reports_http11_and_its_source() {
    let server = Running::start().await;
    let mut config = ClientConfig::new(server.url("/plain"));
    config.method = Method::PUT;
    config.body = Bytes::from_static(b"abc");
    let (summary, seen) = run_client(config).await;
    assert_eq!(
        summary,
        echo::Summary {
            total: 1,
            failed: 0
        }
    );
    let reply = seen[0].outcome.as_ref().unwrap();
    let echo = echo_of(&seen[0]);
    assert_eq!(echo.proto, "HTTP/1.1");
    assert_eq!(echo.method, "PUT");
    assert_eq!(echo.body_bytes, 3);
    assert_eq!(echo.source, reply.local_addr);
    assert_eq!(reply.peer_addr, server.http);
    server.shutdown().await;
}

#[tokio::test]
async fn status_delay_and_healthz_paths() {
    let server = Running::start().await;

    let (_, seen) = run_client(ClientConfig::new(server.url("/status/503"))).await;
    let reply = seen[0].outcome.as_ref().unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(echo_of(&seen[0]).path, "/status/503");

    let started = Instant::now();
    let (_, seen) = run_client(ClientConfig::new(server.url("/delay/200"))).await;
    let elapsed = started.elapsed();
    let reply = seen[0].outcome.as_ref().unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(
        reply.latency >= Duration::from_millis(200),
        "{:?}",
        reply.latency
    );

    let (_, seen) = run_client(ClientConfig::new(server.url("/healthz"))).await;
    let reply = seen[0].outcome.as_ref().unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Value::String("ok".into()));
    let line: Value = serde_json::from_str(&seen[0].to_json()).unwrap();
    assert_eq!(line["body"], "ok");
    assert_eq!(line["pod"], Value::Null);

    let (_, seen) = run_client(ClientConfig::new(server.url("/status/abc"))).await;
    assert_eq!(
        seen[0].outcome.as_ref().unwrap().status,
        StatusCode::BAD_REQUEST
    );
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_body_is_refused_with_413() {
    let server = Running::start_with(|c| c.max_body_bytes = 1024).await;
    let mut config = ClientConfig::new(server.url("/upload"));
    config.method = Method::POST;
    config.body = Bytes::from(vec![b'x'; 1025]);
    let (_, seen) = run_client(config.clone()).await;
    assert_eq!(
        seen[0].outcome.as_ref().unwrap().status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    config.body = Bytes::from(vec![b'x'; 1024]);
    let (_, seen) = run_client(config).await;
    assert_eq!(echo_of(&seen[0]).body_bytes, 1024);
    server.shutdown().await;
}

#[tokio::test]
async fn tcp_echo_greets_echoes_and_half_closes() {
    let server = Running::start().await;
    let stream = within("connect", TcpStream::connect(server.tcp))
        .await
        .unwrap();
    let client_addr = stream.local_addr().unwrap();
    let mut stream = BufReader::new(stream);
    let mut greeting = String::new();
    within("greeting", stream.read_line(&mut greeting))
        .await
        .unwrap();
    assert_eq!(greeting, format!("echo-0 {client_addr}\n"));

    // Several writes, then our half-close; everything comes back, then EOF.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in payload.chunks(50_000) {
        within("write", stream.get_mut().write_all(chunk))
            .await
            .unwrap();
    }
    within("half-close", stream.get_mut().shutdown())
        .await
        .unwrap();
    let mut echoed = Vec::new();
    within("echo until eof", stream.read_to_end(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echoed bytes differ");
    // EOF is sticky: the server half-closed too.
    let mut more = [0u8; 1];
    assert_eq!(within("eof", stream.read(&mut more)).await.unwrap(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn tcp_client_reports_greeting_and_echo() {
    let server = Running::start().await;
    let config = TcpConfig {
        addr: format!("localhost:{}", server.tcp.port()),
        send: Bytes::from_static(b"hello there"),
        count: 3,
        timeout: Duration::from_secs(5),
    };
    let mut seen = Vec::new();
    let summary = within("tcp client", echo::tcp(config, |e| seen.push(e))).await;
    assert_eq!(
        summary,
        echo::Summary {
            total: 3,
            failed: 0
        }
    );
    assert_eq!(seen.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1, 2]);
    for exchange in &seen {
        let reply = exchange.outcome.as_ref().unwrap();
        assert_eq!(reply.greeting, format!("echo-0 {}", reply.local_addr));
        assert_eq!(reply.echoed, "hello there");
        let line: Value = serde_json::from_str(&exchange.to_json()).unwrap();
        assert_eq!(line["greeting"], reply.greeting.as_str());
        assert_eq!(line["echoed"], "hello there");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn concurrent_client_sends_every_seq_once_over_kept_connections() {
    let server = Running::start().await;
    let mut config = ClientConfig::new(server.url("/load"));
    config.count = 20;
    config.concurrency = 4;
    let (summary, seen) = run_client(config).await;
    assert_eq!(
        summary,
        echo::Summary {
            total: 20,
            failed: 0
        }
    );
    assert_eq!(
        seen.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    let mut sources = BTreeSet::new();
    for exchange in &seen {
        let reply = exchange.outcome.as_ref().unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        sources.insert(echo_of(exchange).source);
    }
    // One keep-alive connection per worker.
    assert!(
        (1..=4).contains(&sources.len()),
        "{} connections",
        sources.len()
    );

    // The same over h2c.
    let mut config = ClientConfig::new(server.url("/load"));
    config.count = 20;
    config.concurrency = 4;
    config.http2 = true;
    let (summary, seen) = run_client(config).await;
    assert!(summary.all_ok());
    assert_eq!(seen.len(), 20);
    assert!(seen.iter().all(|e| echo_of(e).proto == "HTTP/2.0"));
    server.shutdown().await;
}

#[tokio::test]
async fn client_against_a_closed_port_reports_errors() {
    let closed = {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        listener.local_addr().unwrap()
    };
    let mut config = ClientConfig::new(format!("http://{closed}/x").parse().unwrap());
    config.count = 3;
    config.concurrency = 2;
    let (summary, seen) = run_client(config).await;
    assert_eq!(
        summary,
        echo::Summary {
            total: 3,
            failed: 3
        }
    );
    assert_eq!(seen.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1, 2]);
    for exchange in &seen {
        assert!(
            matches!(exchange.outcome, Err(ClientError::Connect { addr, .. }) if addr == closed),
            "{:?}",
            exchange.outcome
        );
        let line: Value = serde_json::from_str(&exchange.to_json()).unwrap();
        let error = line["error"].as_str().unwrap();
        assert!(
            error.starts_with(&format!("connecting to {closed}: ")),
            "{error}"
        );
        assert!(line.get("status").is_none());
    }

    let summary = within(
        "tcp client",
        echo::tcp(
            TcpConfig {
                addr: closed.to_string(),
                send: Bytes::new(),
                count: 2,
                timeout: Duration::from_secs(5),
            },
            |_| {},
        ),
    )
    .await;
    assert_eq!(
        summary,
        echo::Summary {
            total: 2,
            failed: 2
        }
    );
}

#[tokio::test]
async fn invalid_urls_are_refused_before_sending() {
    for url in ["https://127.0.0.1/", "/just/a/path"] {
        let config = ClientConfig::new(url.parse().unwrap());
        let result = within("client", echo::client(config, |_| {})).await;
        assert!(
            matches!(result, Err(ClientError::Url { .. })),
            "{url}: {result:?}"
        );
    }
}

#[tokio::test]
async fn client_timeout_is_reported_per_request() {
    let server = Running::start().await;
    let mut config = ClientConfig::new(server.url("/delay/2000"));
    config.timeout = Duration::from_millis(100);
    config.count = 2;
    let (summary, seen) = run_client(config).await;
    assert_eq!(summary.failed, 2);
    for exchange in &seen {
        assert!(
            matches!(exchange.outcome, Err(ClientError::Timeout(_))),
            "{:?}",
            exchange.outcome
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let server = Running::start().await;
    let in_flight = tokio::spawn(run_client(ClientConfig::new(server.url("/delay/600"))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.shutdown().await;
    let (summary, seen) = within("in-flight request", in_flight).await.unwrap();
    assert!(summary.all_ok(), "{seen:?}");
    assert_eq!(seen[0].outcome.as_ref().unwrap().status, StatusCode::OK);
}

/// Reads the `listening http=<addr> tcp=<addr>` startup line.
fn parse_startup(line: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let rest = line
        .trim_end()
        .strip_prefix("listening http=")
        .context("no `listening http=` prefix")?;
    let (http, tcp) = rest.split_once(" tcp=").context("no ` tcp=`")?;
    Ok((http.parse()?, tcp.parse()?))
}

#[tokio::test]
async fn binary_serves_and_clients_print_json_lines() -> anyhow::Result<()> {
    let bin = env!("CARGO_BIN_EXE_weft-echo");
    let mut server = Command::new(bin)
        .args([
            "serve",
            "--http-port",
            "0",
            "--tcp-port",
            "0",
            "--bind",
            "127.0.0.1",
        ])
        .env("POD_NAME", "bin-pod")
        .env("POD_NAMESPACE", "bin-ns")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawning weft-echo serve")?;
    let stdout = server.stdout.take().context("server stdout")?;
    let mut startup = String::new();
    within(
        "startup line",
        BufReader::new(stdout).read_line(&mut startup),
    )
    .await?;
    let (http, tcp) = parse_startup(&startup).with_context(|| format!("{startup:?}"))?;
    assert_ne!(http.port(), 0);
    assert_ne!(tcp.port(), 0);

    let output = within(
        "weft-echo client",
        Command::new(bin)
            .args(["client", &format!("http://{http}/x"), "--count", "3"])
            .args(["--header", "x-test: yes"])
            .kill_on_drop(true)
            .output(),
    )
    .await?;
    assert!(output.status.success(), "{output:?}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3);
    let seqs: BTreeSet<u64> = lines.iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert_eq!(seqs, BTreeSet::from([0, 1, 2]));
    for line in &lines {
        assert_eq!(line["status"], 200);
        assert_eq!(line["pod"], "bin-pod");
        assert_eq!(line["namespace"], "bin-ns");
        assert_eq!(line["proto"], "HTTP/1.1");
        assert_eq!(line["body"]["path"], "/x");
        assert_eq!(line["body"]["headers"]["x-test"], "yes");
        assert!(
            line["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("127.0.0.1:"))
        );
    }

    let output = within(
        "weft-echo tcp",
        Command::new(bin)
            .args(["tcp", &tcp.to_string(), "--send", "hi", "--count", "2"])
            .kill_on_drop(true)
            .output(),
    )
    .await?;
    assert!(output.status.success(), "{output:?}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    for (seq, line) in lines.iter().enumerate() {
        assert_eq!(line["seq"], seq);
        assert_eq!(line["echoed"], "hi");
        assert!(
            line["greeting"]
                .as_str()
                .is_some_and(|g| g.starts_with("bin-pod 127.0.0.1:"))
        );
    }

    // A failing run prints error lines and exits 1.
    let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await?
        .local_addr()?;
    let output = within(
        "weft-echo client (closed port)",
        Command::new(bin)
            .args(["client", &format!("http://{closed}/"), "--count", "2"])
            .kill_on_drop(true)
            .output(),
    )
    .await?;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["error"].is_string()));

    // SIGTERM: graceful exit 0.
    let pid = server.id().context("server pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = within("server exit", server.wait()).await?;
    assert!(status.success(), "{status:?}");
    Ok(())
}
