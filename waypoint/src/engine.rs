//! The L7 decision engine: compiled routes ([`ServiceRoutes`]) and L7 authorization
//! ([`PolicySet`]) from the controller's `weft.l7.v1` resources. Pure: no I/O, no clocks.
//!
//! Routing follows the Gateway API: the controller sends each port's route entries already in
//! precedence order, one match per entry; the engine takes the first whose match holds, picks a
//! backend by weight, and says how to change the request and the response (filters).
//! Authorization follows Istio's AuthorizationPolicy: DENY policies first, then, if any ALLOW
//! policy applies to the request's target, at least one of them must match.
//!
//! Layout: `service` compiles a `ServiceConfig` and routes, `matcher` holds HTTPRoute matches,
//! `filter` the HTTPRoute filters, `authz` the policies and `cidr` their IP blocks.
//!
//! Answers the runtime must give itself: [`Routing::NotFound`] is a 404; a
//! [`Routing::Respond`] is sent as is (a redirect, or a 500 for a route without a usable
//! backend); [`Denied`] is a 403.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use weft_proto::weft::l7::v1 as pb;

mod authz;
mod cidr;
mod filter;
mod matcher;
mod service;

/// A `weft.l7.v1` resource the engine cannot use; the message names the route or policy and
/// the field (e.g. `HTTPRoute/app/split/rule/0/match/1: path regex "(": …`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// How requests are spread over a backend's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalancer {
    /// Power of two random choices by outstanding requests.
    LeastRequest,
    /// Round robin.
    RoundRobin,
}

/// Passive outlier detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Consecutive 5xx / connect failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; the n-th lasts n times this.
    pub base_ejection: std::time::Duration,
    /// At most this share of a backend's endpoints is ejected at once (percent).
    pub max_ejection_percent: u32,
}

/// The application protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Detect per connection.
    Detect,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Opaque TCP, never parsed.
    Tcp,
}

/// A service and port a request is sent to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendTarget {
    /// The service hostname.
    pub hostname: Arc<str>,
    /// The service port.
    pub port: u16,
}

/// Retry policy of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first (≥ 1).
    pub attempts: u32,
    /// Response status codes that are retried (connect failures and resets always are).
    pub codes: Vec<u16>,
    /// Pause before the first retry, doubled for each further one.
    pub backoff: std::time::Duration,
}

/// One compiled service (a `ServiceConfig` resource).
#[derive(Debug)]
pub struct ServiceRoutes {
    hostname: Arc<str>,
    load_balancer: LoadBalancer,
    outlier_detection: Option<OutlierDetection>,
    /// Sorted by port number, no duplicates.
    ports: Vec<service::Port>,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Routing<'a> {
    /// No route matched (the port has routes, none of them holds): answer 404.
    NotFound,
    /// Answer without forwarding, with no body: a `RequestRedirect` (301/302 with `location`),
    /// or 500 when the route has no backend with a non-zero weight or the chosen backend is an
    /// invalid reference (Gateway API: such requests are answered 500).
    Respond(http::Response<()>),
    /// Forward to a backend.
    Forward(Forward<'a>),
}

/// A forwarding decision.
#[derive(Debug)]
pub struct Forward<'a> {
    /// The route's name (`<Kind>/<ns>/<name>/rule/<i>/match/<j>`), or `default` for a port
    /// without routes.
    pub route: &'a str,
    /// The chosen backend.
    pub backend: BackendTarget,
    /// Backends the request is mirrored to (already sampled by their percentage; route
    /// mirrors first, then the chosen backend's). Mirrors are fire-and-forget: their answers
    /// are dropped.
    pub mirrors: Vec<BackendTarget>,
    /// Whole-request deadline (including retries); `None` = none. Answered 504 when it
    /// expires.
    pub request_timeout: Option<std::time::Duration>,
    /// Per-attempt deadline; `None` = none.
    pub backend_request_timeout: Option<std::time::Duration>,
    /// Retry policy, if any.
    pub retry: Option<&'a RetryPolicy>,
    /// The route's filters, then the chosen backend's.
    filters: [&'a [filter::Filter]; 2],
}

impl ServiceRoutes {
    /// Compiles a `ServiceConfig`: every regex compiled, every field checked.
    ///
    /// Checks: ports ≤ 65535 and listed once; known enum values; regexes compile (RE2-like
    /// syntax of the `regex` crate, matched against the whole value); header names and values
    /// valid for `http`; paths start with `/`; redirect status 301 or 302 (0 = 302) and scheme
    /// `http`/`https`; `ReplacePrefixMatch` only on a route whose match is a `PathPrefix`;
    /// mirror percent ≤ 100; retry codes 100-599.
    ///
    /// # Errors
    /// [`ConfigError`] naming the route and field, e.g.
    /// `HTTPRoute/app/r/rule/0/match/1: path regex "(": …`; service-level fields are named as
    /// `ServiceConfig <ns>/<name>: …`.
    pub fn compile(config: &pb::ServiceConfig) -> Result<ServiceRoutes, ConfigError> {
        service::compile(config)
    }

    /// The service hostname.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The service's load balancer (`LeastRequest` unless the config says `ROUND_ROBIN`).
    pub fn load_balancer(&self) -> LoadBalancer {
        self.load_balancer
    }

    /// The service's outlier detection, if on (absent or `consecutive_failures == 0` = off).
    pub fn outlier_detection(&self) -> Option<OutlierDetection> {
        self.outlier_detection
    }

    /// The protocol of `port` (`Detect` for a port the config does not list).
    pub fn protocol(&self, port: u16) -> Protocol {
        self.port(port).map_or(Protocol::Detect, |p| p.protocol)
    }

    /// The ports the config lists, ascending (for a config dump).
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.iter().map(|p| p.port)
    }

    /// The names of `port`'s route entries in precedence order (empty for a port without
    /// routes or not listed; for a config dump).
    pub fn route_names(&self, port: u16) -> impl Iterator<Item = &str> + '_ {
        self.port(port)
            .into_iter()
            .flat_map(|p| p.routes.iter().map(service::Route::name))
    }

    /// Routes a request that arrived for this service on `port`. `rng` draws the weighted
    /// backend and mirror sampling. A port without routes (or not listed) forwards to this
    /// service itself on `port` (route name `default`).
    ///
    /// Gateway API HTTPRoute semantics: the first entry whose match holds is taken (path on
    /// `request.uri.path()`, query on `request.uri.query()`, host from the URI authority or
    /// else the `Host` header). The answer is:
    /// * [`Routing::NotFound`] when the port has routes and none matches (answer 404);
    /// * [`Routing::Respond`] with a 301/302 and `location` for a `RequestRedirect`, or with a
    ///   **500** when the route has no backend with a non-zero weight or the chosen backend is
    ///   an invalid reference (empty hostname) — Gateway API: such requests get 500;
    /// * [`Routing::Forward`] otherwise; call [`Forward::apply_request`] before sending and
    ///   [`Forward::apply_response`] on the answer.
    pub fn route<'a>(
        &'a self,
        port: u16,
        request: &http::request::Parts,
        rng: &mut impl rand::Rng,
    ) -> Routing<'a> {
        service::route(self, port, request, rng)
    }

    fn port(&self, port: u16) -> Option<&service::Port> {
        self.ports
            .binary_search_by_key(&port, |p| p.port)
            .ok()
            .map(|i| &self.ports[i])
    }
}

impl Forward<'_> {
    /// Applies the route's and backend's request filters (`RequestHeaderModifier`,
    /// `URLRewrite`) to the request about to be forwarded, route filters first, each list in
    /// order.
    ///
    /// `URLRewrite` hostname replaces the `Host` header and, when the URI has one, the URI
    /// authority (the whole authority: the rewritten host carries no port); its path modifier
    /// keeps the query string.
    pub fn apply_request(&self, request: &mut http::request::Parts) {
        for f in self.filters.iter().flat_map(|l| l.iter()) {
            f.apply_request(request);
        }
    }

    /// Applies the route's and backend's `ResponseHeaderModifier` to the response, route
    /// filters first.
    pub fn apply_response(&self, response: &mut http::response::Parts) {
        for f in self.filters.iter().flat_map(|l| l.iter()) {
            f.apply_response(response);
        }
    }
}

/// What a request looks like to L7 authorization.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The target service's hostname; `None` for workload-addressed traffic.
    pub service: Option<&'a str>,
    /// The peer's SPIFFE ID without `spiffe://` (`None` if not mTLS).
    pub source_principal: Option<&'a str>,
    /// The peer's namespace (from its SPIFFE ID).
    pub source_namespace: Option<&'a str>,
    /// The original client IP.
    pub source_ip: IpAddr,
    /// `Host` / `:authority`, without port normalisation.
    pub host: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The request path (without query).
    pub path: &'a str,
    /// The destination (service or target) port.
    pub port: u16,
    /// The request headers.
    pub headers: &'a http::HeaderMap,
}

/// Why a request was denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// A DENY policy matched.
    #[error("denied by policy {0}")]
    Policy(String),
    /// ALLOW policies apply and none matched: `policies` are their `"<ns>/<name>"` ids, so
    /// the access log names what would have had to allow the request.
    #[error("no ALLOW policy matched (ALLOW policies: {})", policies.join(", "))]
    NotAllowed {
        /// The ALLOW policies that applied to the request, by resource name.
        policies: Vec<String>,
    },
}

/// The L7 authorization policies of a waypoint, by resource name.
#[derive(Debug, Default)]
pub struct PolicySet {
    policies: BTreeMap<String, authz::Policy>,
}

impl PolicySet {
    /// Adds or replaces the policy `name` (the resource name).
    ///
    /// # Errors
    /// [`ConfigError`] for an unusable policy (a bad CIDR or address, an unknown condition
    /// key, a port above 65535, a condition without values); the previous version stays.
    pub fn insert(&mut self, name: &str, policy: &pb::Policy) -> Result<(), ConfigError> {
        let compiled = authz::Policy::compile(name, policy)?;
        self.policies.insert(name.to_owned(), compiled);
        Ok(())
    }

    /// Removes the policy `name` (no-op when absent).
    pub fn remove(&mut self, name: &str) {
        self.policies.remove(name);
    }

    /// The number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are no policies (every request is allowed).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies' resource names, ascending (for a config dump).
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.policies.keys().map(String::as_str)
    }

    /// Decides a request with Istio AuthorizationPolicy semantics: DENY policies first, then
    /// ALLOW. A policy applies when its `services` is empty or holds `facts.service`
    /// (case-insensitive); workload-addressed requests only see policies without `services`.
    ///
    /// # Errors
    /// [`Denied::Policy`] (`"<ns>/<name>"` of the first matching DENY policy, by resource
    /// name) or [`Denied::NotAllowed`] (naming them) when ALLOW policies apply and none matches.
    pub fn check(&self, facts: &RequestFacts<'_>) -> Result<(), Denied> {
        authz::check(self.policies.values(), facts)
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets keep them) into host and port; a suffix
/// that is not a valid port stays part of the host.
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => {
                let port = authority[end + 1..]
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok());
                (&authority[..=end], port)
            }
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// The request's authority as routing sees it: the URI's (HTTP/2 `:authority`, HTTP/1.1
/// absolute-form) or else the `Host` header (RFC 9112 §3.2.2); `None` when neither is there
/// (or `Host` is not visible ASCII). Use it for [`RequestFacts::host`] so authorization and
/// routing agree.
pub fn request_authority(request: &http::request::Parts) -> Option<&str> {
    match request.uri.authority() {
        Some(a) => Some(a.as_str()),
        None => request
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::split_host_port;

    #[test]
    fn engine_types_can_be_shared_across_tasks() {
        fn shared<T: Send + Sync>() {}
        shared::<super::ServiceRoutes>();
        shared::<super::PolicySet>();
        shared::<super::Forward<'static>>();
    }

    #[test]
    fn request_authority_prefers_the_uri() {
        let parts = |uri: &str, host: Option<&str>| {
            let mut b = http::Request::builder().uri(uri);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            b.body(()).unwrap().into_parts().0
        };
        assert_eq!(
            super::request_authority(&parts("http://a:1/x", Some("b"))),
            Some("a:1")
        );
        assert_eq!(
            super::request_authority(&parts("/x", Some("b:2"))),
            Some("b:2")
        );
        assert_eq!(super::request_authority(&parts("/x", None)), None);
    }

    #[test]
    fn split_host_port_variants() {
        assert_eq!(split_host_port("a.example"), ("a.example", None));
        assert_eq!(split_host_port("a.example:8080"), ("a.example", Some(8080)));
        assert_eq!(split_host_port("[::1]:443"), ("[::1]", Some(443)));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("u@h:1"), ("h", Some(1)));
        assert_eq!(split_host_port("h:notaport"), ("h:notaport", None));
    }
}
