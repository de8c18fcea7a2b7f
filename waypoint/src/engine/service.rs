//! Compiling a `ServiceConfig` and routing a request through it (Gateway API HTTPRoute).

use std::sync::Arc;
use std::time::Duration;

use super::filter::Filter;
use super::matcher::RouteMatch;
use super::{
    BackendTarget, ConfigError, Forward, LoadBalancer, OutlierDetection, Protocol, RetryPolicy,
    Routing, ServiceRoutes, pb,
};

/// One service port and its route entries in precedence order.
#[derive(Debug)]
pub(super) struct Port {
    pub(super) port: u16,
    pub(super) protocol: Protocol,
    pub(super) routes: Vec<Route>,
}

/// One compiled route entry (one match of one rule).
#[derive(Debug)]
pub(super) struct Route {
    name: String,
    matcher: RouteMatch,
    filters: Vec<Filter>,
    backends: Vec<Backend>,
    /// Sum of the backends' weights.
    total_weight: u64,
    request_timeout: Option<Duration>,
    backend_request_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
}

#[derive(Debug)]
struct Backend {
    /// `None` for an invalid backend reference (empty hostname): answered 500.
    target: Option<BackendTarget>,
    weight: u32,
    filters: Vec<Filter>,
}

impl Route {
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    fn compile(r: &pb::Route) -> Result<Route, ConfigError> {
        let name = r.name.as_str();
        let err = |msg: String| ConfigError(format!("{name}: {msg}"));
        let matcher = match &r.r#match {
            Some(m) => RouteMatch::compile(name, m)?,
            None => RouteMatch::default(),
        };
        let prefix = matcher.path_prefix();
        let filters = r
            .filters
            .iter()
            .enumerate()
            .map(|(i, f)| Filter::compile(name, &format!("filter/{i}"), f, prefix))
            .collect::<Result<Vec<_>, _>>()?;
        let mut backends = Vec::with_capacity(r.backends.len());
        for (i, b) in r.backends.iter().enumerate() {
            let target = backend_target(b).map_err(|e| err(format!("backend/{i} {e}")))?;
            let filters = b
                .filters
                .iter()
                .enumerate()
                .map(|(j, f)| Filter::compile(name, &format!("backend/{i}/filter/{j}"), f, prefix))
                .collect::<Result<Vec<_>, _>>()?;
            backends.push(Backend {
                target,
                weight: b.weight,
                filters,
            });
        }
        let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
        let retry = match &r.retry {
            None => None,
            Some(retry) => {
                let codes = retry
                    .codes
                    .iter()
                    .map(|&c| match u16::try_from(c) {
                        Ok(c @ 100..=599) => Ok(c),
                        _ => Err(err(format!(
                            "retry codes {c}: not an HTTP status (100-599)"
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(RetryPolicy {
                    attempts: retry.attempts.max(1),
                    codes,
                    backoff: Duration::from_millis(retry.backoff_ms),
                })
            }
        };
        Ok(Route {
            name: r.name.clone(),
            matcher,
            filters,
            backends,
            total_weight,
            request_timeout: millis(r.request_timeout_ms),
            backend_request_timeout: millis(r.backend_request_timeout_ms),
            retry,
        })
    }

    /// Draws a backend by weight; `None` when no backend has a non-zero weight.
    fn pick(&self, rng: &mut impl rand::Rng) -> Option<&Backend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut draw = rng.random_range(0..self.total_weight);
        for b in &self.backends {
            let w = u64::from(b.weight);
            if draw < w {
                return Some(b);
            }
            draw -= w;
        }
        None
    }

    fn decide<'a>(
        &'a self,
        service: &'a ServiceRoutes,
        port: u16,
        request: &http::request::Parts,
        rng: &mut impl rand::Rng,
    ) -> Routing<'a> {
        if let Some(redirect) = self.filters.iter().find_map(Filter::as_redirect) {
            return Routing::Respond(redirect.respond(request, port, &service.hostname));
        }
        let Some(backend) = self.pick(rng) else {
            return Routing::Respond(internal_error());
        };
        let Some(target) = &backend.target else {
            return Routing::Respond(internal_error());
        };
        if let Some(redirect) = backend.filters.iter().find_map(Filter::as_redirect) {
            return Routing::Respond(redirect.respond(request, port, &service.hostname));
        }
        let mirrors = self
            .filters
            .iter()
            .chain(&backend.filters)
            .filter_map(Filter::as_mirror)
            .filter_map(|m| m.sample(rng).cloned())
            .collect();
        Routing::Forward(Forward {
            route: &self.name,
            backend: target.clone(),
            mirrors,
            request_timeout: self.request_timeout,
            backend_request_timeout: self.backend_request_timeout,
            retry: self.retry.as_ref(),
            filters: [&self.filters, &backend.filters],
        })
    }
}

/// The target of a backend reference; `None` for an invalid one (empty hostname).
pub(super) fn backend_target(b: &pb::Backend) -> Result<Option<BackendTarget>, String> {
    let port = u16::try_from(b.port).map_err(|_| format!("port {}: above 65535", b.port))?;
    if b.hostname.is_empty() {
        return Ok(None);
    }
    Ok(Some(BackendTarget {
        hostname: Arc::from(b.hostname.as_str()),
        port,
    }))
}

/// A 500 answer with no body (Gateway API: a route without usable backends).
pub(super) fn internal_error() -> http::Response<()> {
    let mut response = http::Response::new(());
    *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    response
}

fn millis(ms: u64) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms))
}

pub(super) fn compile(config: &pb::ServiceConfig) -> Result<ServiceRoutes, ConfigError> {
    let service = format!("ServiceConfig {}/{}", config.namespace, config.name);
    let err = |msg: String| ConfigError(format!("{service}: {msg}"));
    if config.hostname.is_empty() {
        return Err(err("hostname: empty".into()));
    }
    let load_balancer = match pb::LoadBalancer::try_from(config.load_balancer) {
        Ok(pb::LoadBalancer::LeastRequest) => LoadBalancer::LeastRequest,
        Ok(pb::LoadBalancer::RoundRobin) => LoadBalancer::RoundRobin,
        Err(_) => {
            return Err(err(format!(
                "load_balancer {}: unknown value",
                config.load_balancer
            )));
        }
    };
    let outlier_detection = match &config.outlier_detection {
        Some(o) if o.consecutive_failures > 0 => {
            if o.max_ejection_percent > 100 {
                return Err(err(format!(
                    "outlier_detection max_ejection_percent {}: above 100",
                    o.max_ejection_percent
                )));
            }
            Some(OutlierDetection {
                consecutive_failures: o.consecutive_failures,
                base_ejection: Duration::from_millis(o.base_ejection_ms),
                max_ejection_percent: o.max_ejection_percent,
            })
        }
        _ => None,
    };
    let mut ports = Vec::with_capacity(config.ports.len());
    for p in &config.ports {
        let port =
            u16::try_from(p.port).map_err(|_| err(format!("port {}: above 65535", p.port)))?;
        let protocol = match pb::Protocol::try_from(p.protocol) {
            Ok(pb::Protocol::Unspecified) => Protocol::Detect,
            Ok(pb::Protocol::Http) => Protocol::Http1,
            Ok(pb::Protocol::Http2) => Protocol::Http2,
            Ok(pb::Protocol::Grpc) => Protocol::Grpc,
            Ok(pb::Protocol::Tcp) => Protocol::Tcp,
            Err(_) => {
                return Err(err(format!(
                    "port {port} protocol {}: unknown value",
                    p.protocol
                )));
            }
        };
        let routes = p
            .routes
            .iter()
            .map(Route::compile)
            .collect::<Result<Vec<_>, _>>()?;
        ports.push(Port {
            port,
            protocol,
            routes,
        });
    }
    ports.sort_by_key(|p| p.port);
    if let Some(w) = ports.windows(2).find(|w| w[0].port == w[1].port) {
        return Err(err(format!("port {}: listed twice", w[0].port)));
    }
    Ok(ServiceRoutes {
        hostname: Arc::from(config.hostname.as_str()),
        load_balancer,
        outlier_detection,
        ports,
    })
}

pub(super) fn route<'a>(
    service: &'a ServiceRoutes,
    port: u16,
    request: &http::request::Parts,
    rng: &mut impl rand::Rng,
) -> Routing<'a> {
    let routes = service.port(port).map_or(&[][..], |p| &p.routes[..]);
    if routes.is_empty() {
        return Routing::Forward(Forward {
            route: "default",
            backend: BackendTarget {
                hostname: service.hostname.clone(),
                port,
            },
            mirrors: Vec::new(),
            request_timeout: None,
            backend_request_timeout: None,
            retry: None,
            filters: [&[], &[]],
        });
    }
    match routes.iter().find(|r| r.matcher.matches(request)) {
        Some(r) => r.decide(service, port, request, rng),
        None => Routing::NotFound,
    }
}
