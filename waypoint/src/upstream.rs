//! Forwarding to a backend: endpoint choice ([`crate::lb`]), HTTP client connections over HBONE
//! (or plain TCP for endpoints without a tunnel) pooled per endpoint, retries with exponential
//! backoff on another endpoint, per-attempt and whole-request deadlines, and opaque TCP.
//!
//! The second HBONE hop follows istio-ambient reference §2.3: TCP to `endpointIP:15008`,
//! `:authority = endpointIP:targetPort`, mTLS with the waypoint's own identity, expecting the
//! endpoint workload's identity; the original client address travels in `forwarded`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};
use weft_core::SpiffeId;
use weft_core::copy::ReadReady;
use weft_core::hbone;
use weft_core::state::{TunnelProtocol, Workload, target_port};

use crate::body::{BoxBody, RequestBody};
use crate::engine::{BackendTarget, LoadBalancer, OutlierDetection, RetryPolicy};
use crate::error::Error;
use crate::lb::{Balancer, InFlight};
use crate::state::WaypointState;

/// A byte stream to an endpoint (an HBONE stream or TCP).
pub trait Io: AsyncRead + AsyncWrite + ReadReady + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + ReadReady + Send + Unpin + 'static> Io for T {}

/// Where a request goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A service and port: one of its endpoints.
    Service(BackendTarget),
    /// One workload on a port (workload-addressed traffic).
    Workload {
        /// The workload.
        workload: Arc<Workload>,
        /// The target port.
        port: u16,
    },
}

/// How to forward one request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The destination.
    pub destination: Destination,
    /// Whole-request deadline, including retries.
    pub request_timeout: Option<Duration>,
    /// Per-attempt deadline.
    pub attempt_timeout: Option<Duration>,
    /// Retries.
    pub retry: Option<RetryPolicy>,
    /// The destination's load balancer.
    pub load_balancer: LoadBalancer,
    /// The destination's outlier detection.
    pub outlier_detection: Option<OutlierDetection>,
    /// HTTP/2 upstream (HTTP/2 or gRPC downstream) instead of HTTP/1.1.
    pub http2: bool,
}

/// One endpoint of a destination.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `endpointIP:targetPort`.
    pub addr: SocketAddr,
    /// The workload.
    pub workload: Arc<Workload>,
}

impl Endpoint {
    /// The workload uid.
    pub fn uid(&self) -> &str {
        &self.workload.uid
    }
}

/// A forwarded request's answer and who gave it.
#[derive(Debug)]
pub struct Answer {
    /// The upstream response.
    pub response: Response<Incoming>,
    /// The endpoint that answered.
    pub endpoint: Endpoint,
    /// Attempts made.
    pub attempts: u32,
    /// Keeps the endpoint's outstanding count until the response is done.
    pub in_flight: InFlight,
}

/// A failure, with the last endpoint tried (for telemetry).
#[derive(Debug)]
pub struct Failure {
    /// What went wrong.
    pub error: Error,
    /// The last endpoint tried, if any.
    pub endpoint: Option<Endpoint>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure {
            error,
            endpoint: None,
        }
    }
}

/// Why a request could not be sent on a connection.
enum SendError {
    /// The connection was closed before the request was written: here it is back.
    Unsent(Request<BoxBody>),
    /// It failed after (part of) it was written, or the answer broke.
    Failed(Error),
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<BoxBody>),
    H2(hyper::client::conn::http2::SendRequest<BoxBody>),
}

/// Pooled HTTP connections are per endpoint, protocol and original client IP (the client IP
/// travels in the HBONE `forwarded` header of the tunnel).
type ClientKey = (SocketAddr, bool, IpAddr);

/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE_H1: usize = 32;

/// Forwards requests and TCP streams to endpoints. Cheap to share.
pub struct Forwarder {
    state: Arc<WaypointState>,
    pool: hbone::Pool,
    identity: SpiffeId,
    balancer: Balancer,
    clients: Mutex<HashMap<ClientKey, Vec<Sender>>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// A forwarder opening HBONE streams through `pool` as `identity`.
    pub fn new(state: Arc<WaypointState>, pool: hbone::Pool, identity: SpiffeId) -> Self {
        Forwarder {
            state,
            pool,
            identity,
            balancer: Balancer::default(),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The load balancer / outlier state (for `/config_dump`).
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// The endpoints of `destination`: a service's healthy endpoints with an IP and a target
    /// port, ordered by uid; `(balancer key, endpoints)`.
    ///
    /// # Errors
    /// [`Error::NoCluster`] for an unknown service.
    pub fn endpoints(&self, destination: &Destination) -> Result<(String, Vec<Endpoint>), Error> {
        let inner = self.state.read();
        match destination {
            Destination::Workload { workload, port } => {
                let ip = workload
                    .ips
                    .first()
                    .copied()
                    .ok_or_else(|| Error::NoHealthyUpstream(workload.uid.clone()))?;
                Ok((
                    format!("workload/{}", workload.uid),
                    vec![Endpoint {
                        addr: SocketAddr::new(ip, *port),
                        workload: workload.clone(),
                    }],
                ))
            }
            Destination::Service(target) => {
                let service = lookup_service(&inner.workloads, &target.hostname)
                    .ok_or_else(|| Error::NoCluster(target.hostname.to_string()))?;
                let endpoints = inner
                    .workloads
                    .endpoints(service.key())
                    .filter(|w| w.healthy)
                    .filter_map(|w| {
                        let ip = *w.ips.first()?;
                        let port = target_port(w, service, target.port)?;
                        Some(Endpoint {
                            addr: SocketAddr::new(ip, port),
                            workload: w.clone(),
                        })
                    })
                    .collect();
                Ok((service.key().to_owned(), endpoints))
            }
        }
    }

    fn destination_name(destination: &Destination) -> String {
        match destination {
            Destination::Service(t) => format!("{}:{}", t.hostname, t.port),
            Destination::Workload { workload, port } => format!("{}:{port}", workload.uid),
        }
    }

    /// Forwards `parts` + `body` per `plan`: retries (only a buffered body is re-sent) on
    /// another endpoint when possible, each attempt within `attempt_timeout`, everything
    /// within `request_timeout`.
    ///
    /// # Errors
    /// [`Failure`] carrying the classified [`Error`].
    pub async fn forward(
        &self,
        plan: &Plan,
        parts: &http::request::Parts,
        mut body: RequestBody,
        client: SocketAddr,
    ) -> Result<Answer, Failure> {
        let last_endpoint: Mutex<Option<Endpoint>> = Mutex::new(None);
        let attempts = async {
            let max_attempts = match &plan.retry {
                Some(r) if body.replayable() => r.attempts.max(1),
                _ => 1,
            };
            let mut tried: Vec<String> = Vec::new();
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let (key, endpoints) = self.endpoints(&plan.destination)?;
                let uids: Vec<&str> = endpoints.iter().map(Endpoint::uid).collect();
                let tried_uids: Vec<&str> = tried.iter().map(String::as_str).collect();
                let (index, in_flight) = self
                    .balancer
                    .pick(&key, plan.load_balancer, &uids, &tried_uids)
                    .ok_or_else(|| {
                        Error::NoHealthyUpstream(Self::destination_name(&plan.destination))
                    })?;
                let endpoint = endpoints[index].clone();
                tried.push(endpoint.uid().to_owned());
                if let Ok(mut last) = last_endpoint.lock() {
                    *last = Some(endpoint.clone());
                }
                let request = build_request(
                    parts,
                    body.attempt().unwrap_or_else(crate::body::empty),
                    plan.http2,
                );
                let sent = self.send(&endpoint, request, client, plan.http2);
                let result = match plan.attempt_timeout {
                    Some(t) => tokio::time::timeout(t, sent)
                        .await
                        .unwrap_or(Err(Error::Timeout)),
                    None => sent.await,
                };
                let failed = match &result {
                    Ok(response) => response.status().is_server_error(),
                    Err(e) => e.is_endpoint_failure(),
                };
                self.balancer.record(
                    &key,
                    endpoint.uid(),
                    failed,
                    plan.outlier_detection,
                    endpoints.len(),
                );
                let retry_on = match (&result, &plan.retry) {
                    (_, None) => false,
                    (Ok(response), Some(r)) => r.codes.contains(&response.status().as_u16()),
                    (Err(e), Some(_)) => e.retriable(),
                };
                if !retry_on || attempt >= max_attempts {
                    return match result {
                        Ok(response) => Ok(Answer {
                            response,
                            endpoint,
                            attempts: attempt,
                            in_flight,
                        }),
                        Err(e) => Err(e),
                    };
                }
                drop(result);
                drop(in_flight);
                let backoff = plan
                    .retry
                    .as_ref()
                    .map(|r| r.backoff * 2u32.saturating_pow(attempt - 1))
                    .unwrap_or_default();
                debug!(attempt, ?backoff, "retrying");
                tokio::time::sleep(backoff).await;
            }
        };
        let result = match plan.request_timeout {
            Some(t) => tokio::time::timeout_at(Instant::now() + t, attempts)
                .await
                .unwrap_or(Err(Error::Timeout)),
            None => attempts.await,
        };
        result.map_err(|error| Failure {
            error,
            endpoint: last_endpoint.lock().ok().and_then(|mut l| l.take()),
        })
    }

    /// Sends one request to `endpoint` over a pooled or new connection. A pooled connection
    /// that turns out closed before the request was written (the upstream's keep-alive ended)
    /// gets the request back and it goes on a new connection.
    async fn send(
        &self,
        endpoint: &Endpoint,
        request: Request<BoxBody>,
        client: SocketAddr,
        http2: bool,
    ) -> Result<Response<Incoming>, Error> {
        let key = (endpoint.addr, http2, client.ip());
        let mut request = request;
        if let Some(sender) = self.take_sender(&key) {
            match self.send_on(key, sender, request).await {
                Ok(response) => return Ok(response),
                Err(SendError::Unsent(again)) => {
                    debug!("pooled upstream connection closed; reconnecting");
                    request = again;
                }
                Err(SendError::Failed(e)) => return Err(e),
            }
        }
        let sender = self.handshake(endpoint, client, http2).await?;
        self.send_on(key, sender, request)
            .await
            .map_err(|e| match e {
                SendError::Unsent(_) => Error::UpstreamReset("connection closed".into()),
                SendError::Failed(e) => e,
            })
    }

    async fn send_on(
        &self,
        key: ClientKey,
        mut sender: Sender,
        request: Request<BoxBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let reset = |e: hyper::Error| SendError::Failed(Error::UpstreamReset(error_chain(&e)));
        let unsent =
            |mut e: hyper::client::conn::TrySendError<Request<BoxBody>>| match e.take_message() {
                Some(request) => SendError::Unsent(request),
                None => reset(e.into_error()),
            };
        match &mut sender {
            Sender::H1(s) => {
                if s.ready().await.is_err() {
                    return Err(SendError::Unsent(request));
                }
                let response = s.try_send_request(request).await.map_err(unsent)?;
                // A connection that switched protocols belongs to the upgraded stream.
                if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    self.put_sender(key, sender);
                }
                Ok(response)
            }
            Sender::H2(s) => {
                if s.ready().await.is_err() {
                    return Err(SendError::Unsent(request));
                }
                let future = s.try_send_request(request);
                self.put_sender(key, sender);
                future.await.map_err(unsent)
            }
        }
    }

    fn take_sender(&self, key: &ClientKey) -> Option<Sender> {
        let mut clients = self.clients.lock().ok()?;
        let list = clients.get_mut(key)?;
        list.retain(|s| match s {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => !s.is_closed(),
        });
        let index = list.iter().position(|s| match s {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        })?;
        match &list[index] {
            // HTTP/2 connections multiplex: hand out a clone and keep it pooled.
            Sender::H2(s) => Some(Sender::H2(s.clone())),
            Sender::H1(_) => Some(list.swap_remove(index)),
        }
    }

    fn put_sender(&self, key: ClientKey, sender: Sender) {
        let Ok(mut clients) = self.clients.lock() else {
            return;
        };
        let list = clients.entry(key).or_default();
        match sender {
            Sender::H2(_) => {
                if list.is_empty() {
                    list.push(sender);
                }
            }
            Sender::H1(_) => {
                if list.len() < MAX_IDLE_H1 {
                    list.push(sender);
                }
            }
        }
    }

    /// Opens the byte stream to `endpoint`: HBONE when the workload has a tunnel, else TCP.
    ///
    /// # Errors
    /// [`Error::ConnectFailure`].
    pub async fn open(
        &self,
        endpoint: &Endpoint,
        client: SocketAddr,
    ) -> Result<Box<dyn Io>, Error> {
        let failure = |reason: String| Error::ConnectFailure {
            endpoint: endpoint.addr.to_string(),
            reason,
        };
        if endpoint.workload.tunnel == TunnelProtocol::Hbone || endpoint.workload.native_tunnel {
            let key = hbone::Key::new(
                self.identity.clone(),
                vec![endpoint.workload.identity().clone()],
                SocketAddr::new(endpoint.addr.ip(), hbone::PORT),
                None,
            );
            let mut headers = HeaderMap::new();
            if let Some(value) = forwarded_for(client) {
                headers.insert(hbone::headers::FORWARDED, value);
            }
            let stream = self
                .pool
                .connect(&key, &endpoint.addr.to_string(), headers)
                .await
                .map_err(|e| failure(error_chain(&e)))?;
            Ok(Box::new(stream))
        } else {
            let tcp = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(endpoint.addr),
            )
            .await
            .map_err(|_| failure("connect timed out".into()))?
            .map_err(|e| failure(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            Ok(Box::new(tcp))
        }
    }

    async fn handshake(
        &self,
        endpoint: &Endpoint,
        client: SocketAddr,
        http2: bool,
    ) -> Result<Sender, Error> {
        let io = TokioIo::new(self.open(endpoint, client).await?);
        let failure = |e: hyper::Error| Error::ConnectFailure {
            endpoint: endpoint.addr.to_string(),
            reason: error_chain(&e),
        };
        let span = debug_span!("upstream", dst.addr = %endpoint.addr);
        if http2 {
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(failure)?;
            tokio::spawn(
                async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "upstream http/2 connection ended");
                    }
                }
                .instrument(span),
            );
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await
                .map_err(failure)?;
            tokio::spawn(
                async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "upstream http/1 connection ended");
                    }
                }
                .instrument(span),
            );
            Ok(Sender::H1(sender))
        }
    }

    /// Chooses an endpoint for an opaque TCP stream to `destination` and opens it.
    ///
    /// # Errors
    /// [`Failure`] (no endpoint, connect failure).
    pub async fn connect_tcp(
        &self,
        destination: &Destination,
        load_balancer: LoadBalancer,
        client: SocketAddr,
    ) -> Result<(Endpoint, Box<dyn Io>, InFlight), Failure> {
        let (key, endpoints) = self.endpoints(destination)?;
        let uids: Vec<&str> = endpoints.iter().map(Endpoint::uid).collect();
        let (index, in_flight) = self
            .balancer
            .pick(&key, load_balancer, &uids, &[])
            .ok_or_else(|| Error::NoHealthyUpstream(Self::destination_name(destination)))?;
        let endpoint = endpoints[index].clone();
        match self.open(&endpoint, client).await {
            Ok(io) => Ok((endpoint, io, in_flight)),
            Err(error) => Err(Failure {
                error,
                endpoint: Some(endpoint),
            }),
        }
    }
}

/// The service `hostname` names: looked up as a client in the hostname's own namespace
/// (`<name>.<namespace>.svc…`) sees it, else any service with that hostname.
pub fn lookup_service<'a>(
    store: &'a weft_core::state::Store,
    hostname: &str,
) -> Option<&'a Arc<weft_core::state::Service>> {
    let namespace = hostname.split('.').nth(1).unwrap_or_default();
    store
        .service_by_hostname(hostname, namespace)
        .or_else(|| store.services().find(|s| s.hostname == hostname))
}

/// Hop-by-hop headers never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// The protocol an HTTP/1.1 message switches to (`connection: upgrade` and `upgrade: <p>`,
/// RFC 9110 §7.8), e.g. `websocket`.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    if asks {
        headers.get(http::header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Puts `connection: upgrade` and `upgrade: <protocol>` back after [`strip_hop_by_hop`].
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    headers.insert(http::header::UPGRADE, protocol);
}

/// Removes hop-by-hop headers (and those named by `connection`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    let trailers_te = headers
        .get(http::header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers_te {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The `forwarded` value naming the original client's IP (RFC 7239 §6; IPv6 in brackets).
/// The port is left out: upstream connections are pooled per client IP, not per client
/// connection.
fn forwarded_for(client: SocketAddr) -> Option<HeaderValue> {
    let text = match client.ip() {
        IpAddr::V4(ip) => format!("for=\"{ip}\""),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    HeaderValue::from_str(&text).ok()
}

/// The upstream request for one attempt: origin-form URI and `host` for HTTP/1.1, absolute URI
/// for HTTP/2 (`:authority` from the request's authority or `host`).
fn build_request(parts: &http::request::Parts, body: BoxBody, http2: bool) -> Request<BoxBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.headers_mut() = parts.headers.clone();
    strip_hop_by_hop(request.headers_mut());
    if !http2 && let Some(protocol) = upgrade_protocol(&parts.headers) {
        restore_upgrade(request.headers_mut(), protocol);
    }
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if http2 {
        *request.version_mut() = Version::HTTP_2;
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.unwrap_or_else(|| "unknown".into()))
            .path_and_query(path)
            .build()
            .unwrap_or_default();
        *request.uri_mut() = uri;
        request.headers_mut().remove(http::header::HOST);
    } else {
        *request.version_mut() = Version::HTTP_11;
        *request.uri_mut() = path.parse().unwrap_or_default();
        if !request.headers().contains_key(http::header::HOST)
            && let Some(authority) = authority.and_then(|a| HeaderValue::from_str(&a).ok())
        {
            request.headers_mut().insert(http::header::HOST, authority);
        }
    }
    request
}

/// `err` and its causes, `: `-separated.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-custom"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers, gzip"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn forwarded_names_the_client() {
        let f = |a: &str| forwarded_for(a.parse().unwrap()).unwrap();
        assert_eq!(f("10.0.0.1:0"), "for=\"10.0.0.1\"");
        assert_eq!(f("10.0.0.1:4000"), "for=\"10.0.0.1\"");
        assert_eq!(f("[fd00::1]:0"), "for=\"[fd00::1]\"");
        let parsed = hbone::headers::Forwarded::parse(f("[fd00::1]:0").to_str().unwrap());
        assert_eq!(
            parsed.for_addr.unwrap().ip(),
            "fd00::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn upstream_requests_per_protocol() {
        let (parts, ()) = Request::builder()
            .uri("/a?b=1")
            .header("host", "echo.b:80")
            .header("connection", "keep-alive")
            .body(())
            .unwrap()
            .into_parts();
        let h1 = build_request(&parts, crate::body::empty(), false);
        assert_eq!(h1.uri(), "/a?b=1");
        assert_eq!(h1.headers()["host"], "echo.b:80");
        assert!(!h1.headers().contains_key("connection"));
        let h2 = build_request(&parts, crate::body::empty(), true);
        assert_eq!(h2.uri(), "http://echo.b:80/a?b=1");
        assert!(!h2.headers().contains_key("host"));
    }
}
