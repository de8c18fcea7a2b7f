//! The echo server: HTTP/1.1 + h2c on one port (gRPC `weft.echo.v1.Echo` too), TCP echo on
//! another, graceful shutdown.
//!
//! Every HTTP answer can be shaped by query parameters or the equivalent request headers (the
//! query parameter wins when both are given), so L7 tests can provoke what a waypoint reacts to:
//!
//! | query | header | effect |
//! |---|---|---|
//! | `status=<code>` | `x-echo-status` | answer with that status (200..=599); the body is still the JSON echo |
//! | `delay=<duration>` | `x-echo-delay` | wait that long (`200ms`, `1s`, `2m`) before answering |
//! | `fail_every=<n>` | `x-echo-fail-every` | count the request; every n-th counted request answers `503` |
//!
//! The `fail_every` counter is per server process and counts only requests that carry the
//! control (so health probes and other traffic do not shift it); each such answer carries the
//! count in `x-echo-count`. A bad control value is answered `400`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::error_message;
use super::grpc;

/// Query parameter / header answering with a chosen status.
pub const STATUS_PARAM: (&str, &str) = ("status", "x-echo-status");
/// Query parameter / header delaying the answer.
pub const DELAY_PARAM: (&str, &str) = ("delay", "x-echo-delay");
/// Query parameter / header failing every n-th request with 503.
pub const FAIL_EVERY_PARAM: (&str, &str) = ("fail_every", "x-echo-fail-every");
/// Response header carrying the `fail_every` counter.
pub const COUNT_HEADER: &str = "x-echo-count";

/// The response body type of the HTTP port (JSON echo or gRPC).
type Body = tonic::body::Body;

/// The default bound on a request body the server reads: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;

/// Who the server says it is in every answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodIdentity {
    /// The pod name (`POD_NAME`, else the hostname).
    pub pod: String,
    /// The pod's namespace (`POD_NAMESPACE`, else empty).
    pub namespace: String,
}

impl PodIdentity {
    /// From the downward-API values the cluster runner sets (`POD_NAME`, `POD_NAMESPACE`): an
    /// unset or empty `pod` falls back to this host's name, an unset `namespace` to `""`.
    pub fn resolve(pod: Option<String>, namespace: Option<String>) -> Self {
        Self {
            pod: pod.filter(|p| !p.is_empty()).unwrap_or_else(hostname),
            namespace: namespace.unwrap_or_default(),
        }
    }
}

/// The kernel's host name, else `$HOSTNAME`, else `"unknown"`.
fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .chain(std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// What [`bind`] listens on and how the server behaves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The HTTP (HTTP/1.1 and h2c) listen address; port 0 picks a free port.
    pub http: SocketAddr,
    /// The TCP echo listen address; port 0 picks a free port.
    pub tcp: SocketAddr,
    /// The name and namespace reported in every answer and greeting.
    pub identity: PodIdentity,
    /// The largest request body read, in bytes; a larger one is answered `413`.
    pub max_body_bytes: usize,
    /// How long in-flight requests and TCP connections may continue after shutdown starts before
    /// they are closed.
    pub drain_timeout: Duration,
}

impl ServeConfig {
    /// `0.0.0.0:8080` for HTTP, `0.0.0.0:9000` for TCP, a 16 MiB body bound and a 5 s drain.
    pub fn new(identity: PodIdentity) -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Self {
            http: SocketAddr::new(any, 8080),
            tcp: SocketAddr::new(any, 9000),
            identity,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound (or its bound address read).
    #[error("binding {what} listener on {addr}")]
    Bind {
        /// `"http"` or `"tcp"`.
        what: &'static str,
        /// The requested address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The JSON body the server answers with: what it saw of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// The serving pod's name.
    pub pod: String,
    /// The serving pod's namespace (may be empty).
    pub namespace: String,
    /// The request method.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// `"HTTP/1.1"`, `"HTTP/1.0"` or `"HTTP/2.0"`.
    pub proto: String,
    /// The `Host` header, or the HTTP/2 `:authority`.
    pub host: String,
    /// Request headers, lowercase names; repeated headers joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The peer address of the TCP connection the request came on.
    pub source: SocketAddr,
    /// The local address of that connection (the destination the client reached).
    pub local: SocketAddr,
    /// The request body's length in bytes.
    pub body_bytes: u64,
}

/// The bound listeners, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    http: TcpListener,
    tcp: TcpListener,
    http_addr: SocketAddr,
    tcp_addr: SocketAddr,
    config: ServeConfig,
}

/// Binds both listeners (so port 0 is resolved) without serving yet.
pub async fn bind(config: ServeConfig) -> Result<Server, ServeError> {
    let (http, http_addr) = listen("http", config.http).await?;
    let (tcp, tcp_addr) = listen("tcp", config.tcp).await?;
    Ok(Server {
        http,
        tcp,
        http_addr,
        tcp_addr,
        config,
    })
}

/// Binds and runs the server until `shutdown` resolves and the drain finishes.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    bind(config).await?.run(shutdown).await;
    Ok(())
}

async fn listen(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ServeError> {
    let bind_error = |source| ServeError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

/// Per-server state every connection shares.
#[derive(Debug)]
struct Shared {
    identity: PodIdentity,
    max_body_bytes: usize,
    /// Requests that carried `fail_every`, since the process started.
    fail_every_count: AtomicU64,
    grpc: weft_proto::weft::echo::v1::echo_server::EchoServer<grpc::Service>,
}

// === impl Server ===

impl Server {
    /// The bound HTTP address (with the real port when port 0 was asked for).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound TCP echo address (with the real port when port 0 was asked for).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight HTTP requests
    /// finish (idle connections close at once) and TCP echo connections continue for up to
    /// [`ServeConfig::drain_timeout`], and closes whatever is left.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            http, tcp, config, ..
        } = self;
        let shared = Arc::new(Shared {
            grpc: grpc::server(config.identity.clone()),
            identity: config.identity,
            max_body_bytes: config.max_body_bytes,
            fail_every_count: AtomicU64::new(0),
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let builder = Arc::new(builder);
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = http.accept() => match accepted {
                    Ok((stream, source)) => {
                        conns.spawn(serve_http(
                            stream,
                            source,
                            shared.clone(),
                            builder.clone(),
                            drain_rx.clone(),
                        ));
                    }
                    Err(error) => accept_failed("http", &error).await,
                },
                accepted = tcp.accept() => match accepted {
                    Ok((stream, source)) => {
                        conns.spawn(serve_tcp(stream, source, shared.clone()));
                    }
                    Err(error) => accept_failed("tcp", &error).await,
                },
                Some(joined) = conns.join_next(), if !conns.is_empty() => reaped(joined),
            }
        }
        drop((http, tcp));
        let _ = drain_tx.send(true);
        let in_flight = conns.len();
        tracing::info!(in_flight, "shutting down");
        let drained = tokio::time::timeout(config.drain_timeout, async {
            while let Some(joined) = conns.join_next().await {
                reaped(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                remaining = conns.len(),
                "drain timeout passed, closing remaining connections"
            );
            conns.shutdown().await;
        }
    }
}

/// Logs an accept error and pauses briefly so a persistent one (e.g. out of file descriptors)
/// does not spin.
async fn accept_failed(what: &str, error: &io::Error) {
    tracing::warn!(listener = what, %error, "accepting connection");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn reaped(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        tracing::error!(%error, "connection task panicked");
    }
}

// === HTTP ===

async fn serve_http(
    stream: TcpStream,
    source: SocketAddr,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut drain: watch::Receiver<bool>,
) {
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(error) => {
            tracing::debug!(%source, %error, "reading local address");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            if grpc::is_grpc(request.headers()) {
                let mut grpc = shared.grpc.clone();
                return tonic::codegen::Service::call(&mut grpc, request).await;
            }
            Ok::<_, Infallible>(handle(request, source, local, &shared).await.map(Body::new))
        }
    });
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    let error = error_message(&*error);
                    tracing::debug!(%source, error, "http connection");
                }
                return;
            }
            _ = drain.wait_for(|draining| *draining), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn handle(
    request: Request<Incoming>,
    source: SocketAddr,
    local: SocketAddr,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |pq| pq.as_str().to_owned(),
    );
    let response = respond(request, source, local, shared).await;
    tracing::info!(%method, path, %source, status = response.status().as_u16(), "request");
    response
}

async fn respond(
    request: Request<Incoming>,
    source: SocketAddr,
    local: SocketAddr,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let route = request.uri().path();
    if route == "/healthz" {
        return text(StatusCode::OK, "ok");
    }
    let controls = match Controls::of(request.uri().query(), request.headers()) {
        Ok(controls) => controls,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let mut status = StatusCode::OK;
    if let Some(code) = route.strip_prefix("/status/") {
        match segment(code)
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
        {
            Some(code) => status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
            None => return text(StatusCode::BAD_REQUEST, "status code must be 200..=599"),
        }
    }
    if let Some(ms) = route.strip_prefix("/delay/") {
        match segment(ms).parse::<u64>() {
            Ok(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Err(_) => return text(StatusCode::BAD_REQUEST, "delay must be milliseconds"),
        }
    }
    if let Some(code) = controls.status {
        status = code;
    }
    let mut count = None;
    if let Some(every) = controls.fail_every {
        let n = shared.fail_every_count.fetch_add(1, Ordering::SeqCst) + 1;
        count = Some(n);
        if n.is_multiple_of(every) {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    if let Some(delay) = controls.delay {
        tokio::time::sleep(delay).await;
    }

    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > shared.max_body_bytes as u64) {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let (parts, body) = request.into_parts();
    let body_bytes = match Limited::new(body, shared.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes().len() as u64,
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        }
        Err(_) => return text(StatusCode::BAD_REQUEST, "reading request body failed"),
    };

    let mut headers = BTreeMap::<String, String>::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| headers.get(HOST.as_str()).cloned())
        .unwrap_or_default();
    let echo = Echo {
        pod: shared.identity.pod.clone(),
        namespace: shared.identity.namespace.clone(),
        method: parts.method.as_str().to_owned(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        proto: format!("{:?}", parts.version),
        host,
        headers,
        source,
        local,
        body_bytes,
    };
    match serde_json::to_vec(&echo) {
        Ok(mut json) => {
            json.push(b'\n');
            let mut response = Response::new(Full::new(Bytes::from(json)));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(count) = count {
                response
                    .headers_mut()
                    .insert(COUNT_HEADER, HeaderValue::from(count));
            }
            response
        }
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding response failed",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_come_from_the_query_or_headers() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(Controls::of(None, &headers), Ok(Controls::default()));
        assert_eq!(
            Controls::of(Some("a=b&status=503&delay=200ms&fail_every=3"), &headers),
            Ok(Controls {
                status: Some(StatusCode::SERVICE_UNAVAILABLE),
                delay: Some(Duration::from_millis(200)),
                fail_every: Some(3),
            })
        );
        headers.insert("x-echo-status", HeaderValue::from_static("418"));
        headers.insert("x-echo-delay", HeaderValue::from_static("1s"));
        headers.insert("x-echo-fail-every", HeaderValue::from_static("2"));
        assert_eq!(
            Controls::of(Some("status=201"), &headers),
            Ok(Controls {
                status: Some(StatusCode::CREATED),
                delay: Some(Duration::from_secs(1)),
                fail_every: Some(2),
            }),
            "the query wins over the header"
        );
        for bad in [
            "status=99",
            "status=x",
            "delay=soon",
            "fail_every=0",
            "status",
        ] {
            assert!(
                Controls::of(Some(bad), &http::HeaderMap::new()).is_err(),
                "{bad}"
            );
        }
    }
}

/// The first path segment of `rest`.
fn segment(rest: &str) -> &str {
    rest.split('/').next().unwrap_or(rest)
}

/// The answer-shaping controls of one request (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Controls {
    status: Option<StatusCode>,
    delay: Option<Duration>,
    fail_every: Option<u64>,
}

impl Controls {
    /// From the query string and headers; the query parameter wins over the header.
    fn of(query: Option<&str>, headers: &http::HeaderMap) -> Result<Self, String> {
        let value = |(param, header): (&str, &str)| -> Option<String> {
            query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                .find(|(k, _)| *k == param)
                .map(|(_, v)| v.to_owned())
                .or_else(|| {
                    headers
                        .get(header)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                })
        };
        let mut controls = Controls::default();
        if let Some(code) = value(STATUS_PARAM) {
            controls.status = Some(
                code.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (200..=599).contains(c))
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| format!("status {code:?}: must be a code in 200..=599"))?,
            );
        }
        if let Some(delay) = value(DELAY_PARAM) {
            controls.delay =
                Some(weft_core::duration::parse(&delay).map_err(|e| format!("delay: {e}"))?);
        }
        if let Some(n) = value(FAIL_EVERY_PARAM) {
            controls.fail_every = Some(
                n.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("fail_every {n:?}: must be a whole number >= 1"))?,
            );
        }
        Ok(controls)
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

// === TCP echo ===

async fn serve_tcp(mut stream: TcpStream, source: SocketAddr, shared: Arc<Shared>) {
    match echo_tcp(&mut stream, source, &shared).await {
        Ok(echoed) => tracing::info!(%source, echoed, "tcp connection"),
        Err(error) => tracing::info!(%source, %error, "tcp connection failed"),
    }
}

/// Greets, echoes until the peer's EOF, then half-closes; returns the bytes echoed.
async fn echo_tcp(stream: &mut TcpStream, source: SocketAddr, shared: &Shared) -> io::Result<u64> {
    let _ = stream.set_nodelay(true);
    let greeting = format!("{} {source}\n", shared.identity.pod);
    stream.write_all(greeting.as_bytes()).await?;
    let (mut read, mut write) = stream.split();
    let echoed = tokio::io::copy(&mut read, &mut write).await?;
    write.shutdown().await?;
    Ok(echoed)
}
