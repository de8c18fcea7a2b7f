//! Translation of Kubernetes objects into Istio's workload xDS resources: pure functions from an
//! index [`Snapshot`] to the full set of `istio.workload.Address` and
//! `istio.security.Authorization` resources (istio-ambient reference §3.3–§3.7), plus the
//! waypoint resources `weft.l7.v1.ServiceConfig`/`Policy` and route status ([`l7`]).
//!
//! Each object is translated on its own: a malformed one is reported in [`Output::problems`] and
//! skipped, and everything else still translates.

pub mod authz;
mod incremental;
pub mod l7;
mod service;
mod waypoint;
mod workload;

use std::collections::BTreeMap;

use weft_k8s::Snapshot;
use weft_proto::istio::security::Authorization;
use weft_proto::istio::workload::Address;
use weft_proto::weft::l7::v1::{Policy, ServiceConfig};

pub use incremental::{Change, Translator};
pub use waypoint::{WAYPOINT_HBONE_PORT, Waypoint};
pub use workload::workload_uid;

/// Label enrolling a namespace or pod in the mesh (`ambient`, or `none` to opt a pod out).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Pod annotation the node agent sets once a pod's traffic is redirected (`enabled`).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Label binding a namespace, service or pod to a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Label naming the namespace of the waypoint in [`USE_WAYPOINT_LABEL`].
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Label on a waypoint Gateway (or its class) saying which traffic it accepts.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label on the objects the controller manages for a waypoint.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// Value of [`MANAGED_LABEL`] for waypoints.
pub const MANAGED_BY_MESH_CONTROLLER: &str = "istio.io-mesh-controller";
/// Label naming the Gateway a pod or service belongs to.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Controller-wide translation settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Root namespace and trust domain (shared with policy translation).
    pub authz: authz::Settings,
    /// `cluster_id` of every workload; default `Kubernetes`.
    pub cluster_id: String,
    /// Network of every address; default empty (the single default network).
    pub network: String,
    /// DNS suffix of service hostnames; default `cluster.local`.
    pub domain_suffix: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            authz: authz::Settings::default(),
            cluster_id: "Kubernetes".into(),
            network: String::new(),
            domain_suffix: "cluster.local".into(),
        }
    }
}

/// One `istio.workload.Address` resource with its xDS name and aliases.
#[derive(Debug, Clone, PartialEq)]
pub struct AddressResource {
    /// The resource name: workload `uid` or service `namespace/hostname`.
    pub name: String,
    /// Lookup aliases: `network/ip` for each address.
    pub aliases: Vec<String>,
    /// The resource.
    pub address: Address,
}

/// The full translation result.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Workloads and services by resource name.
    pub addresses: BTreeMap<String, AddressResource>,
    /// Authorizations by `namespace/name`.
    pub authorizations: BTreeMap<String, Authorization>,
    /// Waypoint service configs by resource name
    /// `<waypoint-ns>/<waypoint-name>/<service-ns>/<service-name>`.
    pub l7_services: BTreeMap<String, ServiceConfig>,
    /// Waypoint authorization policies by resource name
    /// `<waypoint-ns>/<waypoint-name>/<policy-ns>/<policy-name>`.
    pub l7_policies: BTreeMap<String, Policy>,
    /// Status of every HTTPRoute/GRPCRoute with a parent this controller owns.
    pub route_statuses: Vec<l7::RouteStatus>,
    /// Objects that could not be translated, one line each (object, field, reason).
    pub problems: Vec<String>,
}

/// Translates a snapshot.
pub fn translate(snapshot: &Snapshot, settings: &Settings) -> Output {
    translate_parts(snapshot, settings).0
}

/// What a full translation keeps for [`Translator`]'s incremental path: the workload context
/// (everything but the pods) and the problems split by where they come from.
struct Parts {
    ctx: workload::Context,
    /// Problems of policies and services (before the workloads').
    base_problems: Vec<String>,
    /// Problems of each pod that has some.
    pod_problems: BTreeMap<(String, String), Vec<String>>,
    /// Problems of the waypoint (L7) translation (after the workloads').
    l7_problems: Vec<String>,
}

impl Parts {
    /// `problems` in full-translation order: policies, services, pods, L7.
    fn problems(&self) -> Vec<String> {
        let mut problems = self.base_problems.clone();
        problems.extend(self.pod_problems.values().flatten().cloned());
        problems.extend(self.l7_problems.iter().cloned());
        problems
    }
}

fn translate_parts(snapshot: &Snapshot, settings: &Settings) -> (Output, Parts) {
    let mut out = Output::default();

    // Policies first: workloads reference them by key.
    let mut selector_policies = Vec::new();
    for policy in snapshot.authorization_policies.values() {
        match authz::authorization_policy(policy, &settings.authz) {
            Ok(Some(authorization)) => {
                let key = format!("{}/{}", authorization.namespace, authorization.name);
                if authorization.scope
                    == weft_proto::istio::security::Scope::WorkloadSelector as i32
                {
                    selector_policies.push((key.clone(), policy.clone()));
                }
                out.authorizations.insert(key, authorization);
            }
            Ok(None) => {}
            Err(problem) => {
                // Fail closed: a policy that cannot be read exactly is published in its most
                // restrictive form (ALLOW matching nothing, DENY matching everything) rather than
                // dropped, which could open traffic it was meant to stop.
                out.problems.push(problem.to_string());
                if let Some(closed) = authz::fail_closed(policy, &settings.authz) {
                    let key = format!("{}/{}", closed.namespace, closed.name);
                    if closed.scope == weft_proto::istio::security::Scope::WorkloadSelector as i32 {
                        selector_policies.push((key.clone(), policy.clone()));
                    }
                    out.authorizations.insert(key, closed);
                }
            }
        }
    }
    if !snapshot.peer_authentications.is_empty() {
        let strict = authz::static_strict(&settings.authz);
        out.authorizations
            .insert(format!("{}/{}", strict.namespace, strict.name), strict);
    }

    let waypoints = waypoint::Waypoints::new(snapshot, settings);
    let services = service::translate_all(snapshot, settings, &waypoints, &mut out);
    let ctx = workload::Context::new(snapshot, waypoints, services, selector_policies);
    let base_problems = std::mem::take(&mut out.problems);
    let mut pod_problems = BTreeMap::new();
    for ((namespace, name), pod) in &snapshot.pods {
        let mut result = workload::translate_pod(snapshot, settings, &ctx, namespace, name, pod);
        if !result.problems.is_empty() {
            pod_problems.insert(
                (namespace.clone(), name.clone()),
                std::mem::take(&mut result.problems),
            );
        }
        workload::merge(result, &mut out);
    }
    out.authorizations
        .extend(workload::waypoint_policies(settings, &ctx));
    l7::translate_all(snapshot, settings, &ctx.waypoints, &ctx.services, &mut out);
    let parts = Parts {
        ctx,
        base_problems,
        pod_problems,
        l7_problems: std::mem::take(&mut out.problems),
    };
    out.problems = parts.problems();
    (out, parts)
}

/// `network/ip`, the alias form of an address.
pub fn address_alias(network: &str, ip: &std::net::IpAddr) -> String {
    format!("{network}/{ip}")
}

/// Encodes an IP as `NetworkAddress.address`/`Workload.addresses` bytes (4 or 16).
pub fn ip_bytes(ip: &std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Whether every label of `selector` is in `labels` (an empty selector selects nothing).
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests;
