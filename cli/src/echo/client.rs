//! The echo clients: HTTP load with per-worker keep-alive connections, and TCP echo probes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, USER_AGENT};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::error_message;

/// The largest response body the HTTP client reads, in bytes (16 MiB).
const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// What [`client`] sends, how often and how.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The target, `http://host[:port]/path?query`; `host` may be an IP or a name (resolved with
    /// the system resolver at every connect).
    pub url: Uri,
    /// The request method.
    pub method: Method,
    /// Extra request headers. A `host` header overrides the URL's authority (also the HTTP/2
    /// `:authority`).
    pub headers: HeaderMap,
    /// The request body (sent with every request).
    pub body: Bytes,
    /// How many requests to send in total.
    pub count: u64,
    /// How many requests are in flight at once: one worker task (and one connection) each.
    pub concurrency: usize,
    /// Speak HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub http2: bool,
    /// The bound on each request, from connecting (when needed) to the last response byte.
    pub timeout: Duration,
    /// Requests per second over all workers (request `n` starts no earlier than `n / rate`
    /// seconds after the first); `None` sends each as soon as a worker is free.
    pub rate: Option<f64>,
}

impl ClientConfig {
    /// One `GET` of `url` over HTTP/1.1 with a 5 s timeout, no extra headers and no body.
    pub fn new(url: Uri) -> Self {
        Self {
            url,
            method: Method::GET,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            count: 1,
            concurrency: 1,
            http2: false,
            timeout: Duration::from_secs(5),
            rate: None,
        }
    }
}

/// Errors from the clients: a bad target (returned before anything is sent) or a failed request
/// or connection (reported in its [`Exchange`] or [`TcpExchange`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://host[:port]/…`.
    #[error("invalid url {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A request could not be built from the URL and headers (e.g. a `host` header that is not
    /// a valid authority).
    #[error("building request")]
    Build(#[source] http::Error),
    /// Name resolution failed.
    #[error("resolving {target}")]
    Resolve {
        /// The `host:port` looked up.
        target: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Name resolution returned no address.
    #[error("resolving {target}: no addresses")]
    NoAddresses {
        /// The `host:port` looked up.
        target: String,
    },
    /// Connecting failed (to the last address tried).
    #[error("connecting to {addr}")]
    Connect {
        /// The address tried last.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The HTTP/1.1 or HTTP/2 handshake failed.
    #[error("http handshake with {addr}")]
    Handshake {
        /// The connected peer.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// Sending the request or receiving the response head failed.
    #[error("sending request")]
    Send(#[source] hyper::Error),
    /// Reading the response body failed or it exceeded 16 MiB.
    #[error("reading response body")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The request or connection did not finish within the timeout.
    #[error("timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    /// Reading or writing a TCP echo connection failed.
    #[error("tcp exchange with {addr}")]
    Io {
        /// The connected peer.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A response to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The response status.
    pub status: StatusCode,
    /// The response's HTTP version as the client saw it.
    pub version: Version,
    /// From starting the request (including connecting, when the worker had no open connection)
    /// to the last body byte.
    pub latency: Duration,
    /// The client's end of the connection used.
    pub local_addr: SocketAddr,
    /// The server's end of the connection used.
    pub peer_addr: SocketAddr,
    /// The body: the parsed JSON when it is a JSON object (the echo server's [`Echo`]), else the
    /// raw text (lossy UTF-8).
    ///
    /// [`Echo`]: super::Echo
    pub body: Value,
    /// The response headers: lowercase names, repeated headers joined with `", "`.
    pub headers: std::collections::BTreeMap<String, String>,
}

impl Reply {
    /// A field of the JSON body, if the body is an object that has it.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.body.as_object().and_then(|o| o.get(name))
    }
}

/// One request's outcome.
#[derive(Debug)]
pub struct Exchange {
    /// The request's number, from 0.
    pub seq: u64,
    /// The response, or why there is none.
    pub outcome: Result<Reply, ClientError>,
}

#[derive(Serialize)]
struct ReplyLine<'a> {
    seq: u64,
    status: u16,
    latency_ms: f64,
    pod: Option<&'a Value>,
    namespace: Option<&'a Value>,
    source: Option<&'a Value>,
    proto: Value,
    headers: &'a std::collections::BTreeMap<String, String>,
    body: &'a Value,
}

#[derive(Serialize)]
struct ErrorLine {
    seq: u64,
    error: String,
}

impl Exchange {
    /// The JSON line (without newline) `weft-echo client` prints: `{"seq", "status",
    /// "latency_ms", "pod", "namespace", "source", "proto", "headers", "body"}` — `latency_ms` rounded to
    /// microseconds; `pod`, `namespace`, `source` and `proto` are the server's view from its
    /// [`Echo`] body (`null` when absent; `proto` falls back to the client's) — or
    /// `{"seq", "error"}` with the error and its causes.
    ///
    /// [`Echo`]: super::Echo
    pub fn to_json(&self) -> String {
        let line = match &self.outcome {
            Ok(reply) => serde_json::to_string(&ReplyLine {
                seq: self.seq,
                status: reply.status.as_u16(),
                latency_ms: (reply.latency.as_secs_f64() * 1e6).round() / 1e3,
                pod: reply.field("pod"),
                namespace: reply.field("namespace"),
                source: reply.field("source"),
                proto: reply
                    .field("proto")
                    .cloned()
                    .unwrap_or_else(|| Value::String(format!("{:?}", reply.version))),
                headers: &reply.headers,
                body: &reply.body,
            }),
            Err(error) => serde_json::to_string(&ErrorLine {
                seq: self.seq,
                error: error_message(error),
            }),
        };
        line.unwrap_or_default()
    }
}

/// How a client run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Requests (or connections) attempted.
    pub total: u64,
    /// How many of them failed.
    pub failed: u64,
}

impl Summary {
    /// Whether every request got a response (whatever its status) or every connection finished.
    pub fn all_ok(&self) -> bool {
        self.failed == 0
    }
}

/// The validated target, shared by the workers.
#[derive(Debug)]
struct Target {
    /// What to resolve: `host:port`.
    resolve: String,
    /// The HTTP/1.1 request target / HTTP/2 `:path`.
    path: PathAndQuery,
    /// `Host` / `:authority`.
    authority: Authority,
    config: ClientConfig,
    /// When the first request was due.
    started: Instant,
}

/// Sends [`ClientConfig::count`] requests with [`ClientConfig::concurrency`] in flight and calls
/// `each` with every outcome as it completes (not in `seq` order). Each worker keeps one
/// connection open across its requests and reconnects only when it breaks.
///
/// Fails only if the URL or headers are invalid; failed requests are reported through `each`.
pub async fn client(
    config: ClientConfig,
    mut each: impl FnMut(Exchange),
) -> Result<Summary, ClientError> {
    let target = Arc::new(target(config)?);
    let workers = target.config.concurrency.clamp(
        1,
        usize::try_from(target.config.count)
            .unwrap_or(usize::MAX)
            .max(1),
    );
    let next = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..workers {
        tokio::spawn(worker(target.clone(), next.clone(), tx.clone()));
    }
    drop(tx);
    let mut summary = Summary::default();
    while let Some(exchange) = rx.recv().await {
        summary.total += 1;
        if exchange.outcome.is_err() {
            summary.failed += 1;
        }
        each(exchange);
    }
    Ok(summary)
}

fn target(config: ClientConfig) -> Result<Target, ClientError> {
    let invalid = |reason| ClientError::Url {
        url: config.url.to_string(),
        reason,
    };
    if config.url.scheme() != Some(&Scheme::HTTP) {
        return Err(invalid("only http:// urls are supported"));
    }
    let url_authority = config
        .url
        .authority()
        .ok_or_else(|| invalid("missing host"))?
        .clone();
    if url_authority.host().is_empty() {
        return Err(invalid("missing host"));
    }
    let resolve = format!(
        "{}:{}",
        url_authority.host(),
        url_authority.port_u16().unwrap_or(80)
    );
    let path = config
        .url
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let authority = match config.headers.get(HOST) {
        Some(host) => Authority::try_from(host.as_bytes())
            .map_err(|e| ClientError::Build(http::Error::from(e)))?,
        None => url_authority,
    };
    Ok(Target {
        resolve,
        path,
        authority,
        config,
        started: Instant::now(),
    })
}

impl Target {
    fn request(&self) -> Result<Request<Full<Bytes>>, ClientError> {
        let builder = Request::builder().method(self.config.method.clone());
        let mut request = if self.config.http2 {
            let uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(self.authority.clone())
                .path_and_query(self.path.clone())
                .build()
                .map_err(ClientError::Build)?;
            builder.uri(uri).version(Version::HTTP_2)
        } else {
            builder.uri(self.path.clone())
        }
        .body(Full::new(self.config.body.clone()))
        .map_err(ClientError::Build)?;
        let headers = request.headers_mut();
        for (name, value) in &self.config.headers {
            headers.append(name, value.clone());
        }
        if self.config.http2 {
            headers.remove(HOST);
        } else if !headers.contains_key(HOST) {
            let host = HeaderValue::from_str(self.authority.as_str())
                .map_err(|e| ClientError::Build(e.into()))?;
            headers.insert(HOST, host);
        }
        if !headers.contains_key(USER_AGENT) {
            headers.insert(USER_AGENT, HeaderValue::from_static("weft-echo"));
        }
        Ok(request)
    }
}

async fn worker(target: Arc<Target>, next: Arc<AtomicU64>, tx: mpsc::UnboundedSender<Exchange>) {
    let mut conn = None;
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= target.config.count {
            return;
        }
        if let Some(rate) = target.config.rate.filter(|r| *r > 0.0) {
            let due = target.started + Duration::from_secs_f64(seq as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let started = Instant::now();
        let outcome = match tokio::time::timeout(
            target.config.timeout,
            exchange(&target, &mut conn, started),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(ClientError::Timeout(target.config.timeout)),
        };
        if outcome.is_err() {
            conn = None;
        }
        if tx.send(Exchange { seq, outcome }).is_err() {
            return;
        }
    }
}

/// One connection a worker keeps.
#[derive(Debug)]
struct Conn {
    sender: Sender,
    local: SocketAddr,
    peer: SocketAddr,
}

#[derive(Debug)]
enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Self::Http1(s) => s.is_closed(),
            Self::Http2(s) => s.is_closed(),
        }
    }

    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Self::Http1(s) => s.ready().await,
            Self::Http2(s) => s.ready().await,
        }
    }

    async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<
        http::Response<hyper::body::Incoming>,
        hyper::client::conn::TrySendError<Request<Full<Bytes>>>,
    > {
        match self {
            Self::Http1(s) => s.try_send_request(request).await,
            Self::Http2(s) => s.try_send_request(request).await,
        }
    }
}

/// Sends one request on the worker's connection (opening one if it has none or it closed),
/// retrying once on a fresh connection if the kept one turns out dead before the request left.
async fn exchange(
    target: &Target,
    slot: &mut Option<Conn>,
    started: Instant,
) -> Result<Reply, ClientError> {
    let mut request = target.request()?;
    let mut fresh = false;
    let (response, conn) = loop {
        let mut conn = match slot.take() {
            Some(conn) if !conn.sender.is_closed() => conn,
            _ => {
                fresh = true;
                connect(target).await?
            }
        };
        if let Err(error) = conn.sender.ready().await {
            if fresh {
                return Err(ClientError::Send(error));
            }
            continue;
        }
        match conn.sender.send(request).await {
            Ok(response) => break (response, conn),
            Err(mut error) => match error.take_message() {
                Some(unsent) if !fresh => request = unsent,
                _ => return Err(ClientError::Send(error.into_error())),
            },
        }
    };
    let (head, body) = response.into_parts();
    let bytes = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(ClientError::Body)?
        .to_bytes();
    let latency = started.elapsed();
    let body = match serde_json::from_slice::<Value>(&bytes) {
        Ok(object @ Value::Object(_)) => object,
        _ => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
    };
    let mut headers = std::collections::BTreeMap::<String, String>::new();
    for (name, value) in &head.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let reply = Reply {
        status: head.status,
        version: head.version,
        latency,
        local_addr: conn.local,
        peer_addr: conn.peer,
        body,
        headers,
    };
    *slot = Some(conn);
    Ok(reply)
}

async fn connect(target: &Target) -> Result<Conn, ClientError> {
    let stream = connect_tcp(&target.resolve).await?;
    let (local, peer) = addrs(&stream)?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let handshake_error = |source| ClientError::Handshake { addr: peer, source };
    let sender = if target.config.http2 {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(handshake_error)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "h2 connection");
            }
        });
        Sender::Http2(sender)
    } else {
        let (sender, connection) = http1::handshake(io).await.map_err(handshake_error)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "http/1.1 connection");
            }
        });
        Sender::Http1(sender)
    };
    Ok(Conn {
        sender,
        local,
        peer,
    })
}

/// Resolves `target` (`host:port`) with the system resolver and connects to the first address
/// that accepts.
async fn connect_tcp(target: &str) -> Result<TcpStream, ClientError> {
    let addrs = tokio::net::lookup_host(target)
        .await
        .map_err(|source| ClientError::Resolve {
            target: target.to_owned(),
            source,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(source) => last = Some(ClientError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::NoAddresses {
        target: target.to_owned(),
    }))
}

fn addrs(stream: &TcpStream) -> Result<(SocketAddr, SocketAddr), ClientError> {
    let peer = stream.peer_addr().map_err(|source| ClientError::Io {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let local = stream
        .local_addr()
        .map_err(|source| ClientError::Io { addr: peer, source })?;
    Ok((local, peer))
}

// === TCP ===

/// What [`tcp`] connects to and sends.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// `host:port` (or `ip:port`) of an echo port.
    pub addr: String,
    /// The bytes sent on each connection after the greeting.
    pub send: Bytes,
    /// How many connections to make, one after the other.
    pub count: u64,
    /// The bound on each connection, from connecting to the peer's EOF.
    pub timeout: Duration,
}

/// What one echo connection saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpReply {
    /// The greeting line (`<pod> <source ip:port>`), without its newline.
    pub greeting: String,
    /// Everything received after the greeting until EOF (lossy UTF-8).
    pub echoed: String,
    /// The client's end of the connection.
    pub local_addr: SocketAddr,
    /// The server's end of the connection.
    pub peer_addr: SocketAddr,
}

/// One echo connection's outcome.
#[derive(Debug)]
pub struct TcpExchange {
    /// The connection's number, from 0.
    pub seq: u64,
    /// What it saw, or why it failed.
    pub outcome: Result<TcpReply, ClientError>,
}

#[derive(Serialize)]
struct TcpLine<'a> {
    seq: u64,
    greeting: &'a str,
    echoed: &'a str,
}

impl TcpExchange {
    /// The JSON line (without newline) `weft-echo tcp` prints: `{"seq", "greeting", "echoed"}` or
    /// `{"seq", "error"}`.
    pub fn to_json(&self) -> String {
        let line = match &self.outcome {
            Ok(reply) => serde_json::to_string(&TcpLine {
                seq: self.seq,
                greeting: &reply.greeting,
                echoed: &reply.echoed,
            }),
            Err(error) => serde_json::to_string(&ErrorLine {
                seq: self.seq,
                error: error_message(error),
            }),
        };
        line.unwrap_or_default()
    }
}

/// Makes [`TcpConfig::count`] echo connections one after the other with [`tcp_once`] and calls
/// `each` with every outcome, in order.
pub async fn tcp(config: TcpConfig, mut each: impl FnMut(TcpExchange)) -> Summary {
    let mut summary = Summary::default();
    for seq in 0..config.count {
        let outcome = tcp_once(&config.addr, &config.send, config.timeout).await;
        summary.total += 1;
        if outcome.is_err() {
            summary.failed += 1;
        }
        each(TcpExchange { seq, outcome });
    }
    summary
}

/// Connects to the echo port at `addr` (`host:port`), reads the greeting line, sends `send`,
/// half-closes its write side and reads until EOF — all within `timeout`.
pub async fn tcp_once(addr: &str, send: &[u8], timeout: Duration) -> Result<TcpReply, ClientError> {
    tokio::time::timeout(timeout, async {
        let stream = connect_tcp(addr).await?;
        let (local_addr, peer_addr) = addrs(&stream)?;
        let io_error = |source| ClientError::Io {
            addr: peer_addr,
            source,
        };
        let mut stream = BufReader::new(stream);
        let mut greeting = Vec::new();
        stream
            .read_until(b'\n', &mut greeting)
            .await
            .map_err(io_error)?;
        if greeting.last() == Some(&b'\n') {
            greeting.pop();
        }
        stream.get_mut().write_all(send).await.map_err(io_error)?;
        stream.get_mut().shutdown().await.map_err(io_error)?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await.map_err(io_error)?;
        Ok(TcpReply {
            greeting: String::from_utf8_lossy(&greeting).into_owned(),
            echoed: String::from_utf8_lossy(&echoed).into_owned(),
            local_addr,
            peer_addr,
        })
    })
    .await
    .unwrap_or(Err(ClientError::Timeout(timeout)))
}
