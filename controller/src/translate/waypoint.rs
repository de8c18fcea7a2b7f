//! Waypoints and what is bound to them (istio-ambient reference §1.3): a `Gateway` of class
//! `istio-waypoint` is a waypoint; namespaces, services and pods bind to one with
//! `istio.io/use-waypoint` (+ `istio.io/use-waypoint-namespace`), `none` opts out, and the
//! waypoint's `istio.io/waypoint-for` decides whether service or workload bindings count.

use std::collections::BTreeMap;

use weft_k8s::Snapshot;
use weft_proto::istio::workload::{GatewayAddress, NamespacedHostname, gateway_address};

use super::{
    MANAGED_BY_MESH_CONTROLLER, MANAGED_LABEL, Settings, USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_CLASS, WAYPOINT_FOR_LABEL,
};

/// The HBONE port of every waypoint.
pub const WAYPOINT_HBONE_PORT: u32 = 15008;

/// Which traffic a waypoint accepts (`istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficType {
    /// Service-addressed traffic (the default).
    Service,
    /// Workload-addressed traffic.
    Workload,
    /// Both.
    All,
    /// Neither.
    None,
}

/// Namespaces allowed to bind to a waypoint (`listeners[].allowedRoutes.namespaces`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    Same,
    All,
    Selector(BTreeMap<String, String>),
}

/// A usable waypoint.
#[derive(Debug, Clone)]
pub struct Waypoint {
    /// Namespace of the Gateway.
    pub namespace: String,
    /// Name of the Gateway (also of its ServiceAccount, Deployment and Service).
    pub name: String,
    /// The waypoint Service's hostname (Gateway `status.addresses`, else `<name>.<ns>.svc.<suffix>`).
    pub hostname: String,
    /// What it accepts.
    pub traffic: TrafficType,
    allowed: Allowed,
}

impl Waypoint {
    /// The `GatewayAddress` ztunnel is given: hostname form, HBONE port 15008.
    pub fn gateway_address(&self) -> GatewayAddress {
        GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: self.namespace.clone(),
                hostname: self.hostname.clone(),
            })),
            hbone_mtls_port: WAYPOINT_HBONE_PORT,
        }
    }

    /// The waypoint's identity without `spiffe://` (its ServiceAccount is named after it).
    pub fn principal(&self, trust_domain: &str) -> String {
        format!("{trust_domain}/ns/{}/sa/{}", self.namespace, self.name)
    }

    /// Whether `namespace` may bind to (or attach routes to) this waypoint (`allowedRoutes`).
    pub(crate) fn admits(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
    ) -> bool {
        match &self.allowed {
            Allowed::Same => namespace == self.namespace,
            Allowed::All => true,
            Allowed::Selector(selector) => super::selector_matches(selector, namespace_labels),
        }
    }
}

/// Every waypoint of a snapshot, by `(namespace, name)`.
#[derive(Debug, Default)]
pub(crate) struct Waypoints {
    by_key: BTreeMap<(String, String), Waypoint>,
}

/// What kind of target is being bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Service,
    Workload,
}

impl Waypoints {
    pub(crate) fn new(snapshot: &Snapshot, settings: &Settings) -> Self {
        let mut by_key = BTreeMap::new();
        for ((ns, name), gateway) in &snapshot.gateways {
            if gateway.spec.gateway_class_name != WAYPOINT_CLASS {
                continue;
            }
            let class_label = snapshot
                .gateway_classes
                .get(WAYPOINT_CLASS)
                .and_then(|c| c.metadata.labels.as_ref()?.get(WAYPOINT_FOR_LABEL).cloned());
            let label = gateway
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(WAYPOINT_FOR_LABEL).cloned())
                .or(class_label);
            let traffic = match label.as_deref() {
                Some("workload") => TrafficType::Workload,
                Some("all") => TrafficType::All,
                Some("none") => TrafficType::None,
                _ => TrafficType::Service,
            };
            let spec = serde_json::to_value(&gateway.spec).unwrap_or_default();
            let listener = spec["listeners"]
                .as_array()
                .and_then(|ls| {
                    ls.iter()
                        .find(|l| l["name"] == "mesh" || l["port"] == 15008)
                        .or(ls.first())
                        .cloned()
                })
                .unwrap_or_default();
            let namespaces = &listener["allowedRoutes"]["namespaces"];
            let allowed = match namespaces["from"].as_str() {
                Some("All") => Allowed::All,
                Some("Selector") => Allowed::Selector(
                    serde_json::from_value(namespaces["selector"]["matchLabels"].clone())
                        .unwrap_or_default(),
                ),
                _ => Allowed::Same,
            };
            let hostname = gateway
                .status
                .as_ref()
                .and_then(|s| serde_json::to_value(s).ok())
                .and_then(|s| {
                    s["addresses"]
                        .as_array()?
                        .iter()
                        .find(|a| a["type"] == "Hostname")
                        .and_then(|a| a["value"].as_str().map(str::to_owned))
                })
                .unwrap_or_else(|| format!("{name}.{ns}.svc.{}", settings.domain_suffix));
            by_key.insert(
                (ns.clone(), name.clone()),
                Waypoint {
                    namespace: ns.clone(),
                    name: name.clone(),
                    hostname,
                    traffic,
                    allowed,
                },
            );
        }
        Waypoints { by_key }
    }

    /// The waypoint bound to a service or pod, following the reference rules: the object's own
    /// label first (`none` opts out; a named waypoint that does not exist means no waypoint, with
    /// no fallback), else the namespace's label; then the waypoint must accept this kind of
    /// target and admit the target's namespace. Waypoint-managed objects never get one.
    pub(crate) fn bound(
        &self,
        target: Target,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Option<&Waypoint> {
        if labels.get(MANAGED_LABEL).map(String::as_str) == Some(MANAGED_BY_MESH_CONTROLLER) {
            return None;
        }
        let (name, waypoint_ns) = match labels.get(USE_WAYPOINT_LABEL) {
            Some(name) => (name, labels.get(USE_WAYPOINT_NAMESPACE_LABEL)),
            None => (
                namespace_labels.get(USE_WAYPOINT_LABEL)?,
                namespace_labels.get(USE_WAYPOINT_NAMESPACE_LABEL),
            ),
        };
        if name == "none" || name.is_empty() {
            return None;
        }
        let waypoint_ns = waypoint_ns.map_or(namespace, String::as_str);
        let waypoint = self.by_key.get(&(waypoint_ns.to_owned(), name.clone()))?;
        let accepts = matches!(
            (target, waypoint.traffic),
            (_, TrafficType::All)
                | (Target::Service, TrafficType::Service)
                | (Target::Workload, TrafficType::Workload)
        );
        (accepts && waypoint.admits(namespace, namespace_labels)).then_some(waypoint)
    }

    /// Every waypoint, by namespace then name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Waypoint> {
        self.by_key.values()
    }

    /// Looks a waypoint up by namespace and name.
    pub(crate) fn get(&self, namespace: &str, name: &str) -> Option<&Waypoint> {
        self.by_key.get(&(namespace.to_owned(), name.to_owned()))
    }
}
