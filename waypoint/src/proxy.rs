//! One HTTP request through the waypoint: `x-request-id` and `traceparent`, L7 authorization
//! ([`PolicySet::check`](crate::engine::PolicySet::check)), routing
//! ([`ServiceRoutes::route`](crate::engine::ServiceRoutes::route)), request filters, mirrors,
//! forwarding ([`crate::upstream`]), response filters, then telemetry and one access-log event
//! (target `access`) when the response body ends.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info};
use weft_core::state::{Service, Workload};
use weft_core::{SpiffeId, drain};

use crate::body::{self, BoxBody, BoxError, REPLAY_LIMIT_BYTES, RequestBody};
use crate::engine::{BackendTarget, LoadBalancer, RequestFacts, Routing};
use crate::error::Error;
use crate::metrics::{Metrics, RequestKey};
use crate::state::{Target, WaypointState};
use crate::trace;
use crate::upstream::{
    Destination, Forwarder, Plan, restore_upgrade, strip_hop_by_hop, upgrade_protocol,
};

/// What a downstream HBONE stream carries requests for.
#[derive(Debug, Clone)]
pub struct Downstream {
    /// The bound target (`VIP:port` or `podIP:port`).
    pub target: Target,
    /// The peer's identity (the source workload's).
    pub peer: SpiffeId,
    /// `peer` as text (`spiffe://…`), made once per connection for telemetry.
    pub peer_text: Arc<str>,
    /// The original client address (`forwarded`, else the HBONE peer).
    pub client: SocketAddr,
    /// HTTP/2 downstream.
    pub http2: bool,
}

/// The request pipeline. Cheap to share.
#[derive(Debug)]
pub struct Proxy {
    state: Arc<WaypointState>,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    /// Held by background work (mirrors, upgraded streams) so a drain waits for it.
    drain: Option<drain::Watch>,
}

/// What telemetry needs when a request ends.
struct Finish {
    metrics: Arc<Metrics>,
    start: Instant,
    source: Option<Arc<Workload>>,
    principal: Arc<str>,
    destination: Option<Arc<Workload>>,
    service: Option<Arc<Service>>,
    protocol: &'static str,
    flags: &'static str,
    status: u16,
    grpc_status: Option<String>,
    request_bytes: Arc<AtomicU64>,
    method: String,
    path: String,
    authority: String,
    upstream: Option<SocketAddr>,
    route: String,
    /// Why the waypoint answered itself, if it did.
    details: Option<String>,
    request_id: String,
    traceparent: String,
    client: SocketAddr,
}

impl Finish {
    fn done(self, response_bytes: u64, grpc_status: Option<String>) {
        let grpc_status = grpc_status.or(self.grpc_status);
        let duration = self.start.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let key = RequestKey {
            source: self.source,
            source_principal: self.principal.clone(),
            destination: self.destination,
            service: self.service,
            protocol: self.protocol,
            flags: self.flags,
            status: self.status,
            grpc_status,
        };
        self.metrics.record_request(
            &key,
            duration.as_secs_f64() * 1000.0,
            request_bytes,
            response_bytes,
        );
        info!(
            target: "access",
            method = %self.method,
            path = %self.path,
            authority = %self.authority,
            status = self.status,
            flags = self.flags,
            duration_ms = duration.as_millis() as u64,
            bytes_received = request_bytes,
            bytes_sent = response_bytes,
            src.addr = %self.client,
            src.principal = %self.principal,
            upstream = %self.upstream.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
            route = %self.route,
            details = self.details.as_deref().unwrap_or("-"),
            request_id = %self.request_id,
            traceparent = %self.traceparent,
            protocol = self.protocol,
            "request complete"
        );
    }
}

/// The response body: counts bytes, notes `grpc-status` trailers, and records telemetry when
/// it ends or is dropped.
struct Recorded {
    inner: BoxBody,
    bytes: u64,
    grpc_status: Option<String>,
    finish: Option<Finish>,
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                } else if let Some(status) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                {
                    self.grpc_status = Some(status.to_owned());
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Recorded {
    fn finish(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish.done(self.bytes, self.grpc_status.take());
        }
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.finish();
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The local reply for `error`: the status and a text body, or, for a gRPC request, a
/// trailers-only gRPC answer (HTTP 200, `grpc-status` mapped from the status as Envoy does,
/// `grpc-message` the text).
fn local_reply(error: &Error, grpc: bool) -> Response<BoxBody> {
    let text = error.body();
    if grpc {
        let mut response = Response::new(body::empty());
        let code = error.grpc_status();
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        if let Ok(message) = HeaderValue::from_str(text)
            && !text.is_empty()
        {
            headers.insert("grpc-message", message);
        }
        return response;
    }
    let mut response = Response::new(body::full(text));
    *response.status_mut() = error.status();
    if !text.is_empty() {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
    }
    response
}

impl Proxy {
    /// A pipeline over `state`, forwarding with `forwarder`, recording into `metrics`.
    pub fn new(
        state: Arc<WaypointState>,
        forwarder: Arc<Forwarder>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Proxy {
            state,
            forwarder,
            metrics,
            drain: None,
        }
    }

    /// Background work (mirrors, upgraded streams) holds `drain` so a drain waits for it (up to
    /// its deadline).
    #[must_use]
    pub fn with_drain(mut self, drain: drain::Watch) -> Self {
        self.drain = Some(drain);
        self
    }

    /// The forwarder (opaque TCP uses it directly).
    pub fn forwarder(&self) -> &Arc<Forwarder> {
        &self.forwarder
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The state.
    pub fn state(&self) -> &Arc<WaypointState> {
        &self.state
    }

    /// Authorizes an opaque TCP connection against the TCP view of the policies
    /// ([`crate::state::for_tcp`]: ALLOW rules needing HTTP attributes never match, DENY rules
    /// ignore them).
    ///
    /// # Errors
    /// [`Error::Denied`].
    pub fn authorize_connection(
        &self,
        target: &Target,
        peer: &SpiffeId,
        client: SocketAddr,
    ) -> Result<(), Error> {
        let inner = self.state.read();
        if inner.policies.is_empty() {
            return Ok(());
        }
        let principal = peer.principal();
        let headers = http::HeaderMap::new();
        let facts = RequestFacts {
            service: target.service_hostname(),
            source_principal: Some(&principal),
            source_namespace: Some(peer.namespace()),
            source_ip: client.ip(),
            host: "",
            method: "",
            path: "",
            port: target.port(),
            headers: &headers,
        };
        inner
            .tcp_policies
            .check(&facts)
            .map_err(|denied| Error::Denied(denied.to_string()))
    }

    /// Handles one request; never fails (errors become local replies).
    pub async fn handle(
        self: Arc<Self>,
        downstream: Arc<Downstream>,
        request: Request<Incoming>,
    ) -> Result<Response<BoxBody>, std::convert::Infallible> {
        let start = Instant::now();
        let mut request = request;
        // An HTTP/1.1 upgrade (e.g. WebSocket): once both sides switched, bytes are copied.
        let upgrade = (!downstream.http2 && upgrade_protocol(request.headers()).is_some())
            .then(|| hyper::upgrade::on(&mut request));
        let (mut parts, incoming) = request.into_parts();
        let (request_id, traceparent) = trace::stamp(&mut parts.headers);
        let protocol = if is_grpc(&parts.headers) {
            "grpc"
        } else {
            "http"
        };
        let authority = crate::engine::request_authority(&parts)
            .unwrap_or_default()
            .to_owned();
        let source = self
            .state
            .read()
            .workloads
            .workload_by_ip("", downstream.client.ip())
            .cloned();
        let service = match &downstream.target {
            Target::Service { service, .. } => Some(service.clone()),
            Target::Workload { .. } => None,
        };
        let mut finish = Finish {
            metrics: self.metrics.clone(),
            start,
            source,
            principal: downstream.peer_text.clone(),
            destination: None,
            service,
            protocol,
            flags: "-",
            status: 0,
            grpc_status: None,
            request_bytes: Arc::new(AtomicU64::new(0)),
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            authority: authority.clone(),
            upstream: None,
            route: "-".into(),
            details: None,
            request_id,
            traceparent,
            client: downstream.client,
        };
        let span = debug_span!("request", request.id = %finish.request_id);
        let result = self
            .decide_and_forward(
                &downstream,
                parts,
                incoming,
                upgrade,
                &authority,
                &mut finish,
            )
            .instrument(span)
            .await;
        let (mut response, body) = match result {
            Ok(response) => response.into_parts(),
            Err(error) => {
                debug!(error = %error, "local reply");
                finish.flags = error.response_flags();
                finish.details = Some(error.to_string());
                local_reply(&error, protocol == "grpc").into_parts()
            }
        };
        let switched = (response.status == StatusCode::SWITCHING_PROTOCOLS)
            .then(|| upgrade_protocol(&response.headers))
            .flatten();
        strip_hop_by_hop(&mut response.headers);
        if let Some(protocol) = switched {
            restore_upgrade(&mut response.headers, protocol);
        }
        finish.status = response.status.as_u16();
        finish.grpc_status = response
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Recorded {
            inner: body,
            bytes: 0,
            grpc_status: None,
            finish: Some(finish),
        };
        Ok(Response::from_parts(response, body.boxed_unsync()))
    }

    async fn decide_and_forward(
        &self,
        downstream: &Downstream,
        mut parts: http::request::Parts,
        incoming: Incoming,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
        authority: &str,
        finish: &mut Finish,
    ) -> Result<Response<BoxBody>, Error> {
        let port = downstream.target.port();
        // Authorization (with no policy at all everything is allowed: no ALLOW policy applies).
        let routes = {
            let inner = self.state.read();
            if !inner.policies.is_empty() {
                let principal = downstream.peer.principal();
                let facts = RequestFacts {
                    service: downstream.target.service_hostname(),
                    source_principal: Some(&principal),
                    source_namespace: Some(downstream.peer.namespace()),
                    source_ip: downstream.client.ip(),
                    host: authority,
                    method: parts.method.as_str(),
                    path: parts.uri.path(),
                    port,
                    headers: &parts.headers,
                };
                inner
                    .policies
                    .check(&facts)
                    .map_err(|denied| Error::Denied(denied.to_string()))?;
            }
            downstream
                .target
                .service_hostname()
                .and_then(|h| inner.routes(h).cloned())
        };

        // Routing.
        let (destination, forward) = match (&downstream.target, &routes) {
            (Target::Workload { workload, port }, _) => (
                Destination::Workload {
                    workload: workload.clone(),
                    port: *port,
                },
                None,
            ),
            (Target::Service { service, port }, None) => (
                Destination::Service(BackendTarget {
                    hostname: Arc::from(service.hostname.as_str()),
                    port: *port,
                }),
                None,
            ),
            (Target::Service { port, .. }, Some(routes)) => {
                let routing = routes.route(*port, &parts, &mut rand::rng());
                match routing {
                    Routing::NotFound => return Err(Error::NoRoute),
                    Routing::Respond(response) => {
                        finish.route = "-".into();
                        let (p, ()) = response.into_parts();
                        return Ok(Response::from_parts(p, body::empty()));
                    }
                    Routing::Forward(forward) => {
                        forward.apply_request(&mut parts);
                        (Destination::Service(forward.backend.clone()), Some(forward))
                    }
                }
            }
        };
        if let Some(forward) = &forward {
            finish.route = forward.route.to_owned();
        } else {
            finish.route = "default".into();
        }
        let (load_balancer, outlier_detection) = match &destination {
            Destination::Service(target) => {
                let inner = self.state.read();
                match inner.routes(&target.hostname) {
                    Some(r) => (r.load_balancer(), r.outlier_detection()),
                    None => (LoadBalancer::LeastRequest, None),
                }
            }
            Destination::Workload { .. } => (LoadBalancer::LeastRequest, None),
        };
        if let Destination::Service(target) = &destination {
            finish.service =
                crate::upstream::lookup_service(&self.state.read().workloads, &target.hostname)
                    .cloned();
        }
        let plan = Plan {
            destination,
            request_timeout: forward.as_ref().and_then(|f| f.request_timeout),
            attempt_timeout: forward.as_ref().and_then(|f| f.backend_request_timeout),
            retry: forward.as_ref().and_then(|f| f.retry.cloned()),
            load_balancer,
            outlier_detection,
            http2: downstream.http2,
        };
        let body = RequestBody::read(incoming, REPLAY_LIMIT_BYTES, finish.request_bytes.clone())
            .await
            .map_err(|e| Error::UpstreamReset(format!("reading the request body: {e}")))?;

        // Mirrors: fire and forget, only with a buffered body.
        if let (Some(forward), Some((data, trailers))) = (&forward, body.buffered()) {
            for mirror in &forward.mirrors {
                self.mirror(
                    &plan,
                    mirror.clone(),
                    &parts,
                    data.clone(),
                    trailers.cloned(),
                    downstream.client,
                );
            }
        }

        match self
            .forwarder
            .forward(&plan, &parts, body, downstream.client)
            .await
        {
            Ok(mut answer) => {
                finish.upstream = Some(answer.endpoint.addr);
                finish.destination = Some(answer.endpoint.workload.clone());
                if let Some(downstream_upgrade) = upgrade
                    && answer.response.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    let upstream_upgrade = hyper::upgrade::on(&mut answer.response);
                    let drain = self.drain.clone();
                    tokio::spawn(
                        async move {
                            splice_upgraded(downstream_upgrade, upstream_upgrade).await;
                            drop(drain);
                        }
                        .instrument(debug_span!("upgraded")),
                    );
                }
                let (mut response, incoming) = answer.response.into_parts();
                if let Some(forward) = &forward {
                    forward.apply_response(&mut response);
                }
                let in_flight = answer.in_flight;
                let body = incoming
                    .map_frame(move |frame| {
                        let _ = &in_flight;
                        frame
                    })
                    .map_err(|e| -> BoxError { Box::new(e) })
                    .boxed_unsync();
                Ok(Response::from_parts(response, body))
            }
            Err(failure) => {
                if let Some(endpoint) = failure.endpoint {
                    finish.upstream = Some(endpoint.addr);
                    finish.destination = Some(endpoint.workload);
                }
                Err(failure.error)
            }
        }
    }

    fn mirror(
        &self,
        plan: &Plan,
        target: BackendTarget,
        parts: &http::request::Parts,
        data: Bytes,
        trailers: Option<http::HeaderMap>,
        client: SocketAddr,
    ) {
        let forwarder = self.forwarder.clone();
        let plan = Plan {
            destination: Destination::Service(target),
            request_timeout: Some(
                plan.request_timeout
                    .unwrap_or(std::time::Duration::from_secs(30)),
            ),
            attempt_timeout: None,
            retry: None,
            load_balancer: LoadBalancer::LeastRequest,
            outlier_detection: None,
            http2: plan.http2,
        };
        let parts = parts.clone();
        let drain = self.drain.clone();
        tokio::spawn(
            async move {
                let _drain = drain;
                let body = RequestBody::Buffered { data, trailers };
                match forwarder.forward(&plan, &parts, body, client).await {
                    Ok(answer) => {
                        // Drain the response so the connection is reusable; ignore it.
                        let _ = answer.response.into_body().collect().await;
                    }
                    Err(failure) => debug!(error = %failure.error, "mirror failed"),
                }
            }
            .instrument(debug_span!("mirror")),
        );
    }
}

/// Copies bytes between the two sides of an upgraded (101) exchange until both end.
async fn splice_upgraded(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(e) => {
            debug!(error = %e, "protocol switch failed");
            return;
        }
    };
    let mut downstream = hyper_util::rt::TokioIo::new(downstream);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => debug!(sent, received, "upgraded stream ended"),
        Err(e) => debug!(error = %e, "upgraded stream failed"),
    }
}

/// Answers `status` with an empty body (used when no pipeline applies).
pub fn status_only(status: StatusCode) -> Response<BoxBody> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = status;
    response
}
