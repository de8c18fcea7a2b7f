//! Waypoint (L7) configuration: Services bound to a waypoint, the HTTPRoutes/GRPCRoutes attached
//! to them (GAMMA `parentRefs` to a Service, or to the waypoint Gateway itself) and the
//! `targetRefs` AuthorizationPolicies → `weft.l7.v1.ServiceConfig` / `weft.l7.v1.Policy`
//! (istio-ambient reference §2.2; Gateway API HTTPRoute/GRPCRoute semantics).
//!
//! Pure: routes are read as JSON (`serde_json::to_value` of the typed spec, Gateway API's own
//! camelCase spelling), so every field is addressed as users write it. A rule that cannot be
//! translated (bad regex, bad duration, unsupported filter) is dropped on its own and named in
//! the route's status; the route's other rules keep working.
//!
//! Invalid backends: Gateway API says requests that would have gone to a backendRef that cannot
//! be resolved (missing Service, unsupported kind) must get HTTP 500, in proportion to its
//! weight. Weft encodes such a backend as a `weft.l7.v1.Backend` with an **empty `hostname`** (weight and
//! port kept); the waypoint answers 500 whenever it picks one.

mod policy;
mod route;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use serde_json::{Value, json};
use weft_k8s::Snapshot;
use weft_proto::weft::l7::v1::{
    LoadBalancer, OutlierDetection, PortConfig, Protocol, Route, ServiceConfig,
};

use super::service::Services;
use super::waypoint::Waypoints;
use super::{Output, Settings};

pub use route::parse_duration;

/// `controllerName` Weft writes in route and Gateway status (Istio's mesh controller name).
pub const CONTROLLER_NAME: &str = "istio.io/mesh-controller";
/// Service annotation choosing the load balancer: `least-request` (default) or `round-robin`.
pub const LB_ANNOTATION: &str = "weft.dev/load-balancer";
/// Service annotation turning outlier detection on: consecutive failures that eject.
pub const OUTLIER_FAILURES_ANNOTATION: &str = "weft.dev/outlier-consecutive-failures";
/// Service annotation: first ejection time (Gateway API duration, default `30s`).
pub const OUTLIER_BASE_EJECTION_ANNOTATION: &str = "weft.dev/outlier-base-ejection";
/// Service annotation: most endpoints ejected at once, percent (default 50).
pub const OUTLIER_MAX_PERCENT_ANNOTATION: &str = "weft.dev/outlier-max-ejection-percent";

/// A route object's status as Weft computes it: `status` is the full `{parents: [...]}` object
/// for the parents this controller owns (conditions without `lastTransitionTime`; the writer
/// keeps or stamps it).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteStatus {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// The route's namespace.
    pub namespace: String,
    /// The route's name.
    pub name: String,
    /// `{"parents": [{parentRef, controllerName, conditions}]}`.
    pub status: Value,
}

/// A condition as Gateway API spells it (without `lastTransitionTime`).
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Value {
    let mut c = json!({
        "type": type_,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

/// `<name>.<namespace>.svc.<suffix>`.
pub(crate) fn service_hostname(namespace: &str, name: &str, settings: &Settings) -> String {
    format!("{name}.{namespace}.svc.{}", settings.domain_suffix)
}

/// The L7 protocol of a service port, from the same `appProtocol` / port-name-prefix reading
/// the workload translation uses (`http`, `http2`/`kubernetes.io/h2c`, `grpc`, `tcp`; TLS is
/// opaque to the waypoint, so TCP); anything else is unspecified (the waypoint detects).
pub fn port_protocol(port: &ServicePort) -> Protocol {
    use weft_proto::istio::workload::AppProtocol;
    match super::service::app_protocol(port) {
        AppProtocol::Http11 => Protocol::Http,
        AppProtocol::Http2 => Protocol::Http2,
        AppProtocol::Grpc => Protocol::Grpc,
        AppProtocol::Tcp | AppProtocol::Tls => Protocol::Tcp,
        AppProtocol::Unknown => Protocol::Unspecified,
    }
}

/// The skeleton of a bound service's config (no routes yet), reporting bad annotations.
fn service_config(
    svc: &Service,
    namespace: &str,
    name: &str,
    settings: &Settings,
    problems: &mut Vec<String>,
) -> ServiceConfig {
    let ports = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| {
            Some(PortConfig {
                port: u32::try_from(p.port).ok()?,
                protocol: port_protocol(p) as i32,
                routes: Vec::new(),
            })
        })
        .collect();
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let mut bad = |annotation: &str, value: &str, expected: &str| {
        problems.push(format!(
            "Service {namespace}/{name}: annotation {annotation}: {value:?} is not {expected}; using the default"
        ));
    };
    let load_balancer = match annotations.get(LB_ANNOTATION).map(String::as_str) {
        None | Some("least-request") => LoadBalancer::LeastRequest,
        Some("round-robin") => LoadBalancer::RoundRobin,
        Some(other) => {
            bad(LB_ANNOTATION, other, "least-request or round-robin");
            LoadBalancer::LeastRequest
        }
    };
    let outlier_detection = annotations.get(OUTLIER_FAILURES_ANNOTATION).and_then(|v| {
        let failures = match v.trim().parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => {
                bad(
                    OUTLIER_FAILURES_ANNOTATION,
                    v,
                    "a positive number (outlier detection stays off)",
                );
                return None;
            }
        };
        let base_ejection_ms = match annotations.get(OUTLIER_BASE_EJECTION_ANNOTATION) {
            None => 30_000,
            Some(v) => match parse_duration(v) {
                Ok(ms) if ms > 0 => ms,
                _ => {
                    bad(OUTLIER_BASE_EJECTION_ANNOTATION, v, "a duration like 30s");
                    30_000
                }
            },
        };
        let max_ejection_percent = match annotations.get(OUTLIER_MAX_PERCENT_ANNOTATION) {
            None => 50,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if n <= 100 => n,
                _ => {
                    bad(OUTLIER_MAX_PERCENT_ANNOTATION, v, "a percentage 0-100");
                    50
                }
            },
        };
        Some(OutlierDetection {
            consecutive_failures: failures,
            base_ejection_ms,
            max_ejection_percent,
        })
    });
    ServiceConfig {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        hostname: service_hostname(namespace, name, settings),
        ports,
        load_balancer: load_balancer as i32,
        outlier_detection,
    }
}

/// Whether a route `hostnames` entry (exact or `*.suffix`) covers a service: its full hostname
/// or the short forms `name`, `name.ns`, `name.ns.svc`.
fn hostname_matches(pattern: &str, namespace: &str, name: &str, full: &str) -> bool {
    let forms = [
        full.to_owned(),
        name.to_owned(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
    ];
    forms.iter().any(|h| match pattern.strip_prefix('*') {
        Some(suffix) => h.ends_with(suffix) && h.len() > suffix.len(),
        None => h == pattern,
    })
}

/// Bound services: (service ns, service name) → ((waypoint ns, waypoint name), config).
type Bound = BTreeMap<(String, String), ((String, String), ServiceConfig)>;

/// The services a parent attaches a route to, or why not (`(status reason, message)`).
type Attachment = Result<Vec<(String, String)>, (&'static str, String)>;

/// The bound services one parentRef of a route (in namespace `route_ns`) attaches it to, or
/// why it does not (`(status reason, message)`); `None` when the parent is not this
/// controller's (a Gateway that is not a waypoint, another kind).
fn attach(
    parent: &Value,
    route_ns: &str,
    parsed: &route::Parsed,
    snapshot: &Snapshot,
    waypoints: &Waypoints,
    bound: &Bound,
) -> Option<Attachment> {
    let parent_ns = parent["namespace"].as_str().unwrap_or(route_ns);
    let parent_name = parent["name"].as_str().unwrap_or_default();
    let group = parent["group"].as_str();
    let kind = parent["kind"].as_str();
    let key = (parent_ns.to_owned(), parent_name.to_owned());
    if group == Some("") && kind == Some("Service") {
        return Some(if parent_ns != route_ns {
            // A GAMMA consumer route (it should affect only clients in the route's namespace):
            // a destination-side waypoint cannot tell, and applying it to everyone would let one
            // namespace reroute another's service.
            Err((
                "UnsupportedValue",
                "consumer routes (route and Service in different namespaces) are not supported by waypoints".to_owned(),
            ))
        } else if !snapshot.services.contains_key(&key) {
            Err((
                "NoMatchingParent",
                format!("service {parent_ns}/{parent_name} not found"),
            ))
        } else if bound.contains_key(&key) {
            Ok(vec![key])
        } else {
            Err((
                "NoMatchingParent",
                "service is not bound to a waypoint".to_owned(),
            ))
        });
    }
    if !(group.is_none_or(|g| g == "gateway.networking.k8s.io")
        && kind.is_none_or(|k| k == "Gateway"))
    {
        return None;
    }
    let waypoint = waypoints.get(parent_ns, parent_name)?;
    if !waypoint.admits(route_ns, &snapshot.namespace_labels(route_ns)) {
        return Some(Err((
            "NotAllowedByListeners",
            format!(
                "waypoint {parent_ns}/{parent_name} does not admit routes from namespace {route_ns} (allowedRoutes)"
            ),
        )));
    }
    // Every service bound to the waypoint, narrowed by the route's hostnames.
    Some(Ok(bound
        .iter()
        .filter(|(_, ((wns, wname), config))| {
            wns == parent_ns
                && wname == parent_name
                && (parsed.hostnames.is_empty()
                    || parsed.hostnames.iter().any(|h| {
                        hostname_matches(h, &config.namespace, &config.name, &config.hostname)
                    }))
        })
        .map(|(k, _)| k.clone())
        .collect()))
}

/// One translated entry waiting to be placed: the route and its precedence key.
struct Placed {
    key: route::Precedence,
    route: Route,
}

/// Translates the L7 side of a snapshot into `out` (`l7_services`, `l7_policies`,
/// `route_statuses`, problems).
pub(crate) fn translate_all(
    snapshot: &Snapshot,
    settings: &Settings,
    waypoints: &Waypoints,
    services: &Services,
    out: &mut Output,
) {
    let mut bound = Bound::new();
    for (key, info) in &services.by_name {
        let Some(waypoint) = &info.has_waypoint else {
            continue;
        };
        let Some(svc) = snapshot.services.get(key) else {
            continue;
        };
        let config = service_config(svc, &key.0, &key.1, settings, &mut out.problems);
        bound.insert(key.clone(), (waypoint.clone(), config));
    }

    // Entries per (service, port).
    let mut placed: BTreeMap<(String, String, u32), Vec<Placed>> = BTreeMap::new();
    let routes = snapshot
        .http_routes
        .iter()
        .filter_map(|(k, r)| {
            Some((
                route::Kind::Http,
                k,
                &r.metadata,
                serde_json::to_value(&r.spec).ok()?,
            ))
        })
        .chain(snapshot.grpc_routes.iter().filter_map(|(k, r)| {
            Some((
                route::Kind::Grpc,
                k,
                &r.metadata,
                serde_json::to_value(&r.spec).ok()?,
            ))
        }));
    for (kind, (ns, name), meta, spec) in routes {
        let parsed = route::parse(kind, ns, name, meta, &spec, snapshot, settings);
        let generation = meta.generation;
        let mut parents = Vec::new();
        for parent in spec["parentRefs"].as_array().into_iter().flatten() {
            let Some(targets) = attach(parent, ns, &parsed, snapshot, waypoints, &bound) else {
                // Not a parent of ours (another controller's Gateway, another kind).
                continue;
            };
            // `port` of a Service parent is a service port; of a Gateway parent, a listener port
            // (every waypoint listener is 15008): it only restricts service ports for Services.
            let port = parent["port"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .filter(|_| parent["kind"] == "Service");
            let accepted = match &targets {
                Err((reason, message)) => condition("Accepted", false, reason, message, generation),
                Ok(_) => parsed.accepted_condition(generation),
            };
            let resolved = parsed.resolved_condition(generation);
            // The parentRef is echoed exactly as written (Gateway API matches it by value).
            parents.push(json!({
                "parentRef": parent,
                "controllerName": CONTROLLER_NAME,
                "conditions": [accepted, resolved],
            }));
            for target in targets.unwrap_or_default() {
                let Some((_, config)) = bound.get(&target) else {
                    continue;
                };
                for p in &config.ports {
                    if port.is_some_and(|want| want != p.port) || p.protocol == Protocol::Tcp as i32
                    {
                        continue;
                    }
                    let slot = placed
                        .entry((target.0.clone(), target.1.clone(), p.port))
                        .or_default();
                    for (key, route) in &parsed.entries {
                        // One route attached twice to the same port (two parentRefs) is one entry.
                        if slot.iter().any(|e| e.route.name == route.name) {
                            continue;
                        }
                        slot.push(Placed {
                            key: key.clone(),
                            route: route.clone(),
                        });
                    }
                }
            }
        }
        // Routes of other controllers' Gateways are not ours to report on.
        if !parents.is_empty() {
            out.problems.extend(parsed.problems.iter().cloned());
            out.route_statuses.push(RouteStatus {
                kind: kind.as_str().to_owned(),
                namespace: ns.clone(),
                name: name.clone(),
                status: json!({ "parents": parents }),
            });
        }
    }

    for ((ns, name), ((wns, wname), mut config)) in bound {
        for port in &mut config.ports {
            if let Some(mut entries) = placed.remove(&(ns.clone(), name.clone(), port.port)) {
                entries.sort_by(|a, b| a.key.cmp(&b.key));
                port.routes = entries.into_iter().map(|e| e.route).collect();
            }
        }
        out.l7_services
            .insert(format!("{wns}/{wname}/{ns}/{name}"), config);
    }

    policy::translate_all(snapshot, settings, waypoints, services, out);
}
