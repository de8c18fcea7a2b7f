//! HBONE end to end on loopback: real certificates from the CA signer, real TLS 1.3, real HTTP/2.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

mod support;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use support::{id, issue, signer, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_core::drain;
use weft_core::hbone::{
    Authority, ConnectRequest, Decision, Handler, Key, Pool, PoolConfig, PoolError, Refusal,
    Server, Settings, TcpConnector,
};
use weft_core::{SpiffeId, WorkloadCertificate};

const SERVER_ID: &str = "spiffe://cluster.local/ns/b/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/a/sa/client";

/// Connects accepted streams to the authority (a loopback upstream), refusing principals in
/// `deny` with 401, and records what it saw.
#[derive(Default)]
struct Forward {
    deny: Vec<SpiffeId>,
    seen: std::sync::Mutex<Vec<ConnectRequest>>,
    finished: AtomicUsize,
}

impl Handler for Forward {
    type Upstream = TcpStream;

    async fn decide(&self, request: &ConnectRequest) -> Decision<TcpStream> {
        self.seen.lock().unwrap().push(request.clone());
        if self.deny.contains(&request.peer_identity) {
            return Decision::Refuse(Refusal::Unauthorized);
        }
        let Authority::Addr(addr) = request.authority else {
            return Decision::Refuse(Refusal::BadRequest);
        };
        match TcpStream::connect(addr).await {
            Ok(upstream) => {
                let mut headers = HeaderMap::new();
                headers.insert("baggage", HeaderValue::from_static("k8s.namespace.name=b"));
                Decision::Accept { upstream, headers }
            }
            Err(_) => Decision::Refuse(Refusal::Unavailable),
        }
    }

    fn finished(&self, _upstream: TcpStream, _result: &io::Result<(u64, u64)>) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

struct Fixture {
    hbone_addr: SocketAddr,
    handler: Arc<Forward>,
    client_cert: Arc<WorkloadCertificate>,
    signer: Arc<weft_core::ca::Signer>,
    _drain: drain::Trigger,
}

async fn start(deny: Vec<SpiffeId>) -> Fixture {
    let signer = signer();
    let server_cert = issue(&signer, SERVER_ID);
    let client_cert = issue(&signer, CLIENT_ID);
    let handler = Arc::new(Forward {
        deny,
        ..Forward::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone_addr = listener.local_addr().unwrap();
    let (trigger, watch) = drain::channel();
    let server = Arc::new(Server::new(
        Settings::default(),
        server_cert,
        handler.clone(),
    ));
    tokio::spawn(server.serve(listener, watch));
    Fixture {
        hbone_addr,
        handler,
        client_cert,
        signer,
        _drain: trigger,
    }
}

fn pool_for(cert: Arc<WorkloadCertificate>, config: PoolConfig) -> Pool {
    Pool::new(config, Arc::new(TcpConnector), Arc::new(cert))
}

fn key(fx: &Fixture, src: &WorkloadCertificate, expected: &str) -> Key {
    Key::new(
        src.identity().clone(),
        vec![id(expected)],
        fx.hbone_addr,
        None,
    )
}

/// An upstream that hashes everything it receives until EOF, then writes the hex digest back
/// and closes.
async fn hashing_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = conn.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                let digest = format!("{:x}", hasher.finalize());
                conn.write_all(digest.as_bytes()).await.unwrap();
                conn.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// An upstream that echoes until EOF.
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_through_one_stream_arrives_intact() {
    let fx = start(vec![]).await;
    let upstream = hashing_upstream().await;
    let pool = pool_for(fx.client_cert.clone(), PoolConfig::default());
    let key = key(&fx, &fx.client_cert, SERVER_ID);
    let mut stream = within(
        "connect",
        pool.connect(&key, &upstream.to_string(), HeaderMap::new()),
    )
    .await
    .unwrap();
    assert_eq!(
        stream.response_headers().get("baggage").unwrap(),
        "k8s.namespace.name=b",
        "response headers reach the client"
    );

    // 1 GiB of non-repeating bytes (a counter stream), hashed as sent.
    const TOTAL: usize = 1 << 30;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut counter: u64 = 0;
    within("send 1 GiB", async {
        for _ in 0..TOTAL / chunk.len() {
            for word in chunk.chunks_exact_mut(8) {
                word.copy_from_slice(&counter.to_le_bytes());
                counter = counter
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
            }
            hasher.update(&chunk);
            stream.write_all(&chunk).await.unwrap();
        }
        // Half-close: the upstream sees EOF only through END_STREAM → FIN.
        stream.shutdown().await.unwrap();
    })
    .await;
    let mut digest = String::new();
    within("read digest", stream.read_to_string(&mut digest))
        .await
        .unwrap();
    assert_eq!(
        digest,
        format!("{:x}", hasher.finalize()),
        "bytes arrived intact"
    );

    let seen = fx.handler.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].peer_identity,
        id(CLIENT_ID),
        "server saw the client's identity"
    );
    assert_eq!(seen[0].authority, Authority::Addr(upstream));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fifty_concurrent_streams_open_three_connections() {
    let fx = start(vec![]).await;
    let upstream = echo_upstream().await;
    let pool = pool_for(fx.client_cert.clone(), PoolConfig::default());
    let key = key(&fx, &fx.client_cert, SERVER_ID);
    let mut tasks = Vec::new();
    for i in 0..250u32 {
        let pool = pool.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = pool
                .connect(&key, &upstream.to_string(), HeaderMap::new())
                .await
                .unwrap();
            stream.write_all(&i.to_be_bytes()).await.unwrap();
            let mut back = [0u8; 4];
            stream.read_exact(&mut back).await.unwrap();
            assert_eq!(u32::from_be_bytes(back), i);
            stream // held open until every stream is up
        }));
    }
    let mut streams = Vec::new();
    for task in tasks {
        streams.push(within("stream", task).await.unwrap());
    }
    assert_eq!(streams.len(), 250);
    assert_eq!(pool.connections(&key), 3, "100 + 100 + 50 streams");
    drop(streams);
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused_by_the_client() {
    let fx = start(vec![]).await;
    let upstream = echo_upstream().await;
    let pool = pool_for(fx.client_cert.clone(), PoolConfig::default());
    let key = key(
        &fx,
        &fx.client_cert,
        "spiffe://cluster.local/ns/b/sa/someone-else",
    );
    let err = within(
        "connect",
        pool.connect(&key, &upstream.to_string(), HeaderMap::new()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PoolError::Tls { .. }), "{err:?}");
    let chain = format!("{:?}", err);
    assert!(
        chain.contains("someone-else") && chain.contains(SERVER_ID),
        "{chain}"
    );
    assert!(
        fx.handler.seen.lock().unwrap().is_empty(),
        "nothing reached the server handler"
    );
    assert_eq!(pool.connections(&key), 0);
}

#[tokio::test]
async fn a_client_from_another_trust_domain_is_refused_by_the_server() {
    let fx = start(vec![]).await;
    let upstream = echo_upstream().await;
    // Same root (so the chain verifies), foreign trust domain.
    let foreign = issue(&fx.signer, "spiffe://other.domain/ns/a/sa/client");
    let pool = pool_for(foreign.clone(), PoolConfig::default());
    let key = key(&fx, &foreign, SERVER_ID);
    let result = within(
        "connect",
        pool.connect(&key, &upstream.to_string(), HeaderMap::new()),
    )
    .await;
    let err = result.expect_err("server must refuse a foreign trust domain");
    assert!(
        err.status().is_none(),
        "refused at the handshake, not by a status: {err:?}"
    );
    assert!(
        fx.handler.seen.lock().unwrap().is_empty(),
        "nothing reached the server handler"
    );

    // The same pool setup with an in-domain identity works, so the refusal was the trust domain.
    let pool = pool_for(fx.client_cert.clone(), PoolConfig::default());
    let key = self::key(&fx, &fx.client_cert, SERVER_ID);
    within(
        "connect",
        pool.connect(&key, &upstream.to_string(), HeaderMap::new()),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_401_decision_reaches_the_client_as_401() {
    let fx = start(vec![id(CLIENT_ID)]).await;
    let upstream = echo_upstream().await;
    let pool = pool_for(fx.client_cert.clone(), PoolConfig::default());
    let key = key(&fx, &fx.client_cert, SERVER_ID);
    let err = within(
        "connect",
        pool.connect(&key, &upstream.to_string(), HeaderMap::new()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "{err:?}");
    // An unreachable upstream is a 503 from this handler.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let fx = start(vec![]).await;
    let pool = pool_for(fx.client_cert.clone(), PoolConfig::default());
    let key = self::key(&fx, &fx.client_cert, SERVER_ID);
    let err = within(
        "connect",
        pool.connect(&key, &closed.to_string(), HeaderMap::new()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.status(),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "{err:?}"
    );
}

#[tokio::test]
async fn request_headers_and_hostname_authorities_reach_the_handler() {
    let fx = start(vec![]).await;
    let pool = pool_for(fx.client_cert.clone(), PoolConfig::default());
    let key = key(&fx, &fx.client_cert, SERVER_ID);
    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
    );
    let err = within(
        "connect",
        pool.connect(&key, "echo.a.svc.cluster.local:80", headers),
    )
    .await
    .unwrap_err();
    // This handler only forwards to addresses.
    assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
    let seen = fx.handler.seen.lock().unwrap();
    assert_eq!(
        seen[0].authority,
        Authority::Host {
            host: "echo.a.svc.cluster.local".into(),
            port: 80
        }
    );
    assert!(seen[0].headers.contains_key("traceparent"));
}

#[tokio::test]
async fn half_close_works_in_both_directions() {
    let fx = start(vec![]).await;
    let pool = pool_for(fx.client_cert.clone(), PoolConfig::default());
    let key = key(&fx, &fx.client_cert, SERVER_ID);

    // Server side closes first: it writes and half-closes, then keeps reading.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        conn.write_all(b"server done").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut stream = within(
        "connect",
        pool.connect(&key, &addr.to_string(), HeaderMap::new()),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    within("read to eof", stream.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"server done", "client saw the server's FIN as EOF");
    // Our write side is still open after the peer's half-close.
    stream.write_all(b"client still talking").await.unwrap();
    stream.shutdown().await.unwrap();
    let server_got = within("server", server).await.unwrap();
    assert_eq!(server_got, b"client still talking");

    // Client side closes first: the server still answers after seeing EOF.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        conn.write_all(&got).await.unwrap();
        conn.write_all(b" -- after eof").await.unwrap();
        conn.shutdown().await.unwrap();
    });
    let mut stream = within(
        "connect",
        pool.connect(&key, &addr.to_string(), HeaderMap::new()),
    )
    .await
    .unwrap();
    stream.write_all(b"hello").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    within("read reply", stream.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"hello -- after eof");
    within("server", server).await.unwrap();
    assert_eq!(
        pool.connections(&key),
        1,
        "both streams shared one connection"
    );
}

#[tokio::test]
async fn idle_connections_are_released() {
    let fx = start(vec![]).await;
    let upstream = echo_upstream().await;
    let pool = pool_for(
        fx.client_cert.clone(),
        PoolConfig {
            idle_timeout: Duration::from_millis(300),
            ..PoolConfig::default()
        },
    );
    let key = key(&fx, &fx.client_cert, SERVER_ID);
    let stream = within(
        "connect",
        pool.connect(&key, &upstream.to_string(), HeaderMap::new()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        pool.connections(&key),
        1,
        "a connection with a live stream is kept"
    );
    drop(stream);
    within("release", async {
        while pool.connections(&key) != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn non_connect_and_portless_requests_get_400() {
    use weft_core::tls;
    let fx = start(vec![]).await;
    let config = tls::client_config(&fx.client_cert, vec![id(SERVER_ID)]).unwrap();
    let tcp = TcpStream::connect(fx.hbone_addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls::pki_types::ServerName::try_from("0.0.0.0").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut send, conn) = within("h2", h2::client::handshake(tls)).await.unwrap();
    tokio::spawn(conn);
    let get = http::Request::builder()
        .method("GET")
        .uri("https://10.0.0.1:80/")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(get, true).unwrap();
    assert_eq!(
        within("get", resp).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let connect = http::Request::builder()
        .method("CONNECT")
        .uri("example.com")
        .body(())
        .unwrap();
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send.send_request(connect, false).unwrap();
    assert_eq!(
        within("portless", resp).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert!(
        fx.handler.seen.lock().unwrap().is_empty(),
        "rejected before the handler"
    );
}

/// A certificate source that can be swapped, as rotation does.
#[derive(Clone)]
struct Swappable(Arc<std::sync::Mutex<Arc<WorkloadCertificate>>>);

impl weft_core::hbone::ServerCertificate for Swappable {
    fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        Some(self.0.lock().unwrap().clone())
    }
}

#[tokio::test]
async fn a_rotated_server_certificate_is_used_by_new_connections() {
    let signer = signer();
    let first = issue(&signer, SERVER_ID);
    let rotated = issue(&signer, "spiffe://cluster.local/ns/b/sa/rotated");
    let source = Swappable(Arc::new(std::sync::Mutex::new(first)));
    let handler = Arc::new(Forward::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_trigger, watch) = drain::channel();
    tokio::spawn(
        Arc::new(Server::new(Settings::default(), source.clone(), handler)).serve(listener, watch),
    );
    let upstream = echo_upstream().await;
    let client_cert = issue(&signer, CLIENT_ID);
    let connect = |expected: &str| {
        let pool = pool_for(client_cert.clone(), PoolConfig::default());
        let key = Key::new(
            client_cert.identity().clone(),
            vec![id(expected)],
            addr,
            None,
        );
        async move {
            pool.connect(&key, &upstream.to_string(), HeaderMap::new())
                .await
        }
    };
    within("first cert", connect(SERVER_ID)).await.unwrap();
    *source.0.lock().unwrap() = rotated;
    within(
        "rotated cert",
        connect("spiffe://cluster.local/ns/b/sa/rotated"),
    )
    .await
    .unwrap();
    assert!(
        within("old identity", connect(SERVER_ID)).await.is_err(),
        "the old certificate is no longer presented"
    );
}

/// Serves each stream itself: answers every line with it upper-cased.
struct Upper;

impl Handler for Upper {
    type Upstream = TcpStream;

    async fn decide(&self, _request: &ConnectRequest) -> Decision<TcpStream> {
        Decision::Serve {
            headers: HeaderMap::new(),
            serve: Box::new(|mut stream| {
                Box::pin(async move {
                    let mut buf = vec![0u8; 1024];
                    loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        let upper = buf[..n].to_ascii_uppercase();
                        if stream.write_all(&upper).await.is_err() {
                            break;
                        }
                    }
                    let _ = stream.shutdown().await;
                })
            }),
        }
    }
}

#[tokio::test]
async fn a_handler_can_serve_the_stream_itself() {
    let signer = signer();
    let server_cert = issue(&signer, SERVER_ID);
    let client_cert = issue(&signer, CLIENT_ID);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_trigger, watch) = drain::channel();
    let server = Arc::new(Server::new(
        Settings::default(),
        server_cert,
        Arc::new(Upper),
    ));
    tokio::spawn(server.serve(listener, watch));
    let pool = pool_for(client_cert.clone(), PoolConfig::default());
    let key = Key::new(
        client_cert.identity().clone(),
        vec![id(SERVER_ID)],
        addr,
        None,
    );
    let mut stream = within(
        "connect",
        pool.connect(&key, "10.0.0.1:80", HeaderMap::new()),
    )
    .await
    .unwrap();
    stream.write_all(b"hello hbone").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut out = String::new();
    within("read", stream.read_to_string(&mut out))
        .await
        .unwrap();
    assert_eq!(out, "HELLO HBONE");
}
