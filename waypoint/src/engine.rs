//! The L7 decision engine: compiled routes ([`ServiceRoutes`]) and L7 authorization
//! ([`PolicySet`]) from the controller's `weft.l7.v1` resources. Pure: no I/O, no clocks.
//!
//! Routing follows the Gateway API: the controller sends each port's route entries already in
//! precedence order, one match per entry; the engine takes the first whose match holds, picks a
//! backend by weight, and says how to change the request and the response (filters).
//! Authorization follows Istio's AuthorizationPolicy: DENY policies first, then, if any ALLOW
//! policy applies to the request's target, at least one of them must match.

use std::net::IpAddr;
use std::sync::Arc;

use weft_proto::weft::l7::v1 as pb;

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
    _private: (),
}

/// What to do with a request.
#[derive(Debug)]
pub enum Routing<'a> {
    /// No route matched (the port has routes, none of them holds): answer 404.
    NotFound,
    /// Answer without forwarding (a `RequestRedirect`): a response with no body, e.g. 302 with
    /// `location`.
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
    /// Backends the request is mirrored to (already sampled by their percentage).
    pub mirrors: Vec<BackendTarget>,
    /// Whole-request deadline (including retries).
    pub request_timeout: Option<std::time::Duration>,
    /// Per-attempt deadline.
    pub backend_request_timeout: Option<std::time::Duration>,
    /// Retry policy, if any.
    pub retry: Option<&'a RetryPolicy>,
    #[allow(dead_code)]
    filters: (),
}

impl ServiceRoutes {
    /// Compiles a `ServiceConfig`: every regex compiled, every field checked.
    ///
    /// # Errors
    /// [`ConfigError`] naming the route and field.
    pub fn compile(config: &pb::ServiceConfig) -> Result<ServiceRoutes, ConfigError> {
        let _ = config;
        unimplemented!("engine: ServiceRoutes::compile")
    }

    /// The service hostname.
    pub fn hostname(&self) -> &str {
        unimplemented!("engine")
    }

    /// The service's load balancer.
    pub fn load_balancer(&self) -> LoadBalancer {
        unimplemented!("engine")
    }

    /// The service's outlier detection, if on.
    pub fn outlier_detection(&self) -> Option<OutlierDetection> {
        unimplemented!("engine")
    }

    /// The protocol of `port` (`Detect` for a port the config does not list).
    pub fn protocol(&self, port: u16) -> Protocol {
        let _ = port;
        unimplemented!("engine")
    }

    /// Routes a request that arrived for this service on `port`. `rng` draws the weighted
    /// backend and mirror sampling. A port without routes (or not listed) forwards to this
    /// service itself on `port` (route name `default`).
    pub fn route<'a>(
        &'a self,
        port: u16,
        request: &http::request::Parts,
        rng: &mut impl rand::Rng,
    ) -> Routing<'a> {
        let _ = (port, request, rng);
        unimplemented!("engine")
    }
}

impl Forward<'_> {
    /// Applies the route's and backend's request filters (`RequestHeaderModifier`,
    /// `URLRewrite`) to the request about to be forwarded.
    pub fn apply_request(&self, request: &mut http::request::Parts) {
        let _ = request;
        unimplemented!("engine")
    }

    /// Applies the route's and backend's `ResponseHeaderModifier` to the response.
    pub fn apply_response(&self, response: &mut http::response::Parts) {
        let _ = response;
        unimplemented!("engine")
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
    /// ALLOW policies apply and none matched.
    #[error("no ALLOW policy matched")]
    NotAllowed,
}

/// The L7 authorization policies of a waypoint, by resource name.
#[derive(Debug, Default)]
pub struct PolicySet {
    _private: (),
}

impl PolicySet {
    /// Adds or replaces the policy `name`.
    ///
    /// # Errors
    /// [`ConfigError`] for an unusable policy (e.g. a bad CIDR); the previous version stays.
    pub fn insert(&mut self, name: &str, policy: &pb::Policy) -> Result<(), ConfigError> {
        let _ = (name, policy);
        unimplemented!("engine")
    }

    /// Removes the policy `name`.
    pub fn remove(&mut self, name: &str) {
        let _ = name;
        unimplemented!("engine")
    }

    /// Decides a request: DENY policies first, then ALLOW.
    ///
    /// # Errors
    /// [`Denied`] when denied.
    pub fn check(&self, facts: &RequestFacts<'_>) -> Result<(), Denied> {
        let _ = facts;
        unimplemented!("engine")
    }
}
