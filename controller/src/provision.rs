//! Waypoint provisioning (istio-ambient reference §1.2, §2.6): the controller owns GatewayClass
//! `istio-waypoint`, renders a ServiceAccount, Service and Deployment for every Gateway of that
//! class (owner-referenced to it), and reports Gateway, GatewayClass and route status.
//!
//! Pure: [`plan`] turns a snapshot (plus the route statuses translation computed) into the
//! objects to apply and the statuses to write; [`Writer`] carries a plan out against the local
//! cluster's object store or the Kubernetes API.
//!
//! Status conditions are computed without `lastTransitionTime`; [`stamp`] takes it from the
//! object's current status when the condition's status did not change (else now), so an
//! unchanged situation produces an identical status and nothing is written (no loop with the
//! config source that feeds the snapshot).

mod writer;

use std::collections::BTreeMap;

use gateway_api::gateways::Gateway;
use serde_json::{Value, json};
use weft_k8s::Snapshot;
use weft_k8s::manifest::ObjectKey;

use crate::translate::l7::{CONTROLLER_NAME, RouteStatus, condition};
use crate::translate::{
    DATAPLANE_MODE_LABEL, GATEWAY_NAME_LABEL, MANAGED_BY_MESH_CONTROLLER, MANAGED_LABEL,
    WAYPOINT_CLASS,
};

pub use writer::{Error, FIELD_MANAGER, Writer};

/// Gateway API group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Label naming a managed object's GatewayClass.
pub const GATEWAY_CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";
/// Container port of the waypoint's HBONE listener.
pub const HBONE_PORT: u16 = 15008;
/// Container port of the waypoint's metrics.
pub const METRICS_PORT: u16 = 15020;
/// Container port of the waypoint's status (readiness) endpoint.
pub const STATUS_PORT: u16 = 15021;

/// What provisioning needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The waypoint container's command (`--waypoint-command`, default `waypoint`).
    pub command: String,
    /// The waypoint container's image (`--waypoint-image`).
    pub image: String,
    /// Extra container environment, in order, after Weft's own (`--waypoint-env KEY=VALUE`).
    pub env: Vec<(String, String)>,
    /// Trust domain (the container's `TRUST_DOMAIN`).
    pub trust_domain: String,
    /// DNS suffix of service hostnames (`cluster.local`).
    pub domain_suffix: String,
    /// Rendering for a real Kubernetes cluster: adds the projected service-account token
    /// (audience `istio-ca`) and the `istio-ca-root-cert` ConfigMap volumes.
    pub kubernetes: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            command: "waypoint".into(),
            image: "ghcr.io/weft-mesh/waypoint:latest".into(),
            env: Vec::new(),
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            kubernetes: false,
        }
    }
}

/// The current time as Kubernetes writes `metav1.Time` (RFC 3339, seconds).
pub fn now() -> String {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// What to write for one snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Objects to create or update (server-side apply), whole manifests.
    pub apply: Vec<Value>,
    /// Objects to create only when missing (the GatewayClass: users may label it).
    pub create: Vec<Value>,
    /// `(object, full new status)` for objects whose status must change.
    pub statuses: Vec<(ObjectKey, Value)>,
    /// The waypoint Gateways that exist (`(namespace, name)`): managed objects owned by any
    /// other Gateway are garbage (the store backend deletes them).
    pub live: Vec<(String, String)>,
    /// Gateways skipped, one line each.
    pub problems: Vec<String>,
}

/// The GatewayClass the controller owns.
pub fn gateway_class() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GatewayClass",
        "metadata": {"name": WAYPOINT_CLASS},
        "spec": {
            "controllerName": CONTROLLER_NAME,
            "description": "The default Weft (Istio ambient) waypoint class",
        },
    })
}

/// Whether a listener is the waypoint's HBONE listener (port 15008, protocol HBONE).
fn is_hbone(listener: &Value) -> bool {
    listener["port"].as_u64() == Some(u64::from(HBONE_PORT)) && listener["protocol"] == "HBONE"
}

/// The waypoint's owned objects: ServiceAccount, Service and Deployment named after the
/// Gateway, each owner-referenced to it (`controller: true`, `blockOwnerDeletion: true`).
///
/// # Errors
/// A message when the Gateway has no `metadata.uid` (owner references need one).
pub fn render(gateway: &Gateway, settings: &Settings) -> Result<Vec<Value>, String> {
    let ns = gateway.metadata.namespace.as_deref().unwrap_or("default");
    let name = gateway.metadata.name.as_deref().unwrap_or_default();
    let uid = gateway
        .metadata
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| format!("Gateway {ns}/{name}: metadata.uid is missing; not provisioned"))?;
    let owner = json!([{
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": name,
        "uid": uid,
        "controller": true,
        "blockOwnerDeletion": true,
    }]);
    let labels = json!({
        GATEWAY_NAME_LABEL: name,
        GATEWAY_CLASS_LABEL: WAYPOINT_CLASS,
        MANAGED_LABEL: MANAGED_BY_MESH_CONTROLLER,
    });
    let meta = || {
        json!({
            "name": name,
            "namespace": ns,
            "labels": labels,
            "ownerReferences": owner,
        })
    };
    let service_account = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(),
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(),
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": [
                {"name": "status-port", "port": STATUS_PORT, "targetPort": STATUS_PORT, "protocol": "TCP", "appProtocol": "tcp"},
                {"name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT, "protocol": "TCP", "appProtocol": "hbone"},
            ],
        },
    });
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = vec![
        json!({"name": "POD_NAME"}),
        json!({"name": "POD_NAMESPACE"}),
        json!({"name": "INSTANCE_IP"}),
        json!({"name": "SERVICE_ACCOUNT"}),
    ];
    for (e, path) in env.iter_mut().zip([
        "metadata.name",
        "metadata.namespace",
        "status.podIP",
        "spec.serviceAccountName",
    ]) {
        e["valueFrom"] = field(path)["valueFrom"].clone();
    }
    env.push(json!({"name": "WAYPOINT_NAME", "value": name}));
    env.push(json!({"name": "TRUST_DOMAIN", "value": settings.trust_domain}));
    for (k, v) in &settings.env {
        env.push(json!({"name": k, "value": v}));
    }
    let mut container = json!({
        "name": "waypoint",
        "image": settings.image,
        "command": [settings.command],
        "env": env,
        "ports": [
            {"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": STATUS_PORT},
            "periodSeconds": 5,
        },
    });
    let mut pod_spec = json!({
        "serviceAccountName": name,
        "containers": [],
    });
    if settings.kubernetes {
        container["volumeMounts"] = json!([
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": true},
        ]);
        pod_spec["volumes"] = json!([
            {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
            {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
        ]);
    }
    pod_spec["containers"] = json!([container]);
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {
                    "labels": {
                        GATEWAY_NAME_LABEL: name,
                        DATAPLANE_MODE_LABEL: "none",
                        "service.istio.io/canonical-name": name,
                        MANAGED_LABEL: MANAGED_BY_MESH_CONTROLLER,
                        "sidecar.istio.io/inject": "false",
                    },
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": METRICS_PORT.to_string(),
                        "prometheus.io/path": "/stats/prometheus",
                    },
                },
                "spec": pod_spec,
            },
        },
    });
    Ok(vec![service_account, service, deployment])
}

/// Why a Gateway is not programmed yet, or `None` when it is: its Service has a cluster IP and
/// at least one of its pods is Ready.
fn pending(snapshot: &Snapshot, ns: &str, name: &str) -> Option<String> {
    let mut missing = Vec::new();
    let ip = snapshot
        .services
        .get(&(ns.to_owned(), name.to_owned()))
        .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
        .filter(|ip| !ip.is_empty() && ip != "None");
    if ip.is_none() {
        missing.push(format!("service {ns}/{name} has no cluster IP yet"));
    }
    let ready = snapshot.pods.iter().any(|((pns, _), pod)| {
        pns == ns
            && pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(GATEWAY_NAME_LABEL))
                .is_some_and(|g| g == name)
            && pod.metadata.deletion_timestamp.is_none()
            && pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    });
    if !ready {
        missing.push("no waypoint pod is ready".to_owned());
    }
    (!missing.is_empty()).then(|| missing.join("; "))
}

/// A waypoint Gateway's status: `Accepted` (False, reason `ListenersNotValid`, when there is
/// no HBONE listener on 15008), `Programmed` (False, reason `Pending`, naming what is missing),
/// `addresses` (the Service hostname) and one status per listener (HBONE listeners count the
/// `attached_routes` accepted with the Gateway as parent).
pub fn gateway_status(
    gateway: &Gateway,
    snapshot: &Snapshot,
    settings: &Settings,
    attached_routes: usize,
) -> Value {
    let ns = gateway.metadata.namespace.as_deref().unwrap_or("default");
    let name = gateway.metadata.name.as_deref().unwrap_or_default();
    let generation = gateway.metadata.generation;
    let spec = serde_json::to_value(&gateway.spec).unwrap_or_default();
    let listeners: Vec<Value> = spec["listeners"].as_array().cloned().unwrap_or_default();
    let accepted = listeners.iter().any(is_hbone);
    let programmed = if accepted {
        pending(snapshot, ns, name)
    } else {
        Some("the Gateway is not accepted".to_owned())
    };
    let accepted_condition = if accepted {
        condition(
            "Accepted",
            true,
            "Accepted",
            "waypoint accepted",
            generation,
        )
    } else {
        condition(
            "Accepted",
            false,
            "ListenersNotValid",
            "a waypoint needs a listener with protocol HBONE on port 15008",
            generation,
        )
    };
    let programmed_condition = match &programmed {
        None => condition(
            "Programmed",
            true,
            "Programmed",
            "waypoint service and pods are ready",
            generation,
        ),
        Some(why) => condition("Programmed", false, "Pending", why, generation),
    };
    let listener_statuses: Vec<Value> = listeners
        .iter()
        .map(|l| {
            let ok = is_hbone(l);
            json!({
                "name": l["name"],
                "supportedKinds": [],
                "attachedRoutes": if ok { attached_routes } else { 0 },
                "conditions": [
                    if ok {
                        condition("Accepted", true, "Accepted", "listener accepted", generation)
                    } else {
                        condition("Accepted", false, "UnsupportedProtocol",
                            "waypoint listeners must be HBONE on port 15008", generation)
                    },
                    condition("Programmed", ok && programmed.is_none(),
                        if ok && programmed.is_none() { "Programmed" } else { "Pending" },
                        programmed.as_deref().unwrap_or("listener programmed"), generation),
                    condition("ResolvedRefs", true, "ResolvedRefs", "no references", generation),
                ],
            })
        })
        .collect();
    let mut status = json!({
        "conditions": [accepted_condition, programmed_condition],
        "listeners": listener_statuses,
    });
    if accepted {
        status["addresses"] = json!([{
            "type": "Hostname",
            "value": format!("{name}.{ns}.svc.{}", settings.domain_suffix),
        }]);
    }
    status
}

/// Adds `lastTransitionTime` to every condition of `new` (recursively, any `conditions` array):
/// kept from the condition of the same type in `old` at the same path when its `status` is
/// unchanged, else `now`.
pub fn stamp(new: &mut Value, old: &Value, now: &str) {
    match new {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key == "conditions"
                    && let Value::Array(conds) = value
                {
                    let old_conds = old[key.as_str()].as_array();
                    for c in conds {
                        let previous = old_conds.and_then(|os| {
                            os.iter()
                                .find(|o| o["type"] == c["type"] && o["status"] == c["status"])
                        });
                        c["lastTransitionTime"] = previous
                            .and_then(|p| p.get("lastTransitionTime").cloned())
                            .unwrap_or_else(|| json!(now));
                    }
                } else if key == "parents"
                    && let Value::Array(items) = value
                {
                    // Route parents: match the old entry by parentRef and controller.
                    for item in items {
                        let previous = old["parents"].as_array().and_then(|os| {
                            os.iter().find(|o| {
                                o["parentRef"] == item["parentRef"]
                                    && o["controllerName"] == item["controllerName"]
                            })
                        });
                        stamp(item, previous.unwrap_or(&Value::Null), now);
                    }
                } else if key == "listeners"
                    && let Value::Array(items) = value
                {
                    for item in items {
                        let previous = old["listeners"]
                            .as_array()
                            .and_then(|os| os.iter().find(|o| o["name"] == item["name"]));
                        stamp(item, previous.unwrap_or(&Value::Null), now);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                stamp(item, &Value::Null, now);
            }
        }
        _ => {}
    }
}

/// How many routes are accepted with waypoint Gateway `namespace/name` as a parent.
fn attached(routes: &[RouteStatus], namespace: &str, name: &str) -> usize {
    routes
        .iter()
        .filter(|r| {
            r.status["parents"].as_array().is_some_and(|parents| {
                parents.iter().any(|p| {
                    let parent = &p["parentRef"];
                    parent["kind"].as_str().unwrap_or("Gateway") == "Gateway"
                        && parent["name"] == name
                        && parent["namespace"].as_str().unwrap_or(&r.namespace) == namespace
                        && p["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Accepted" && c["status"] == "True")
                        })
                })
            })
        })
        .count()
}

/// A route status merged into the route's current one: other controllers' parents are kept,
/// ours replaced.
fn merge_route_status(ours: &Value, current: &Value) -> Value {
    let mut parents: Vec<Value> = current["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] != CONTROLLER_NAME)
        .cloned()
        .collect();
    parents.extend(ours["parents"].as_array().into_iter().flatten().cloned());
    json!({ "parents": parents })
}

/// Computes what to write for `snapshot`: the GatewayClass (created when missing; its
/// `Accepted=True` status), every waypoint Gateway's owned objects and status, and the route
/// statuses (`routes`, from translation). Statuses equal to the current ones are left out.
pub fn plan(snapshot: &Snapshot, routes: &[RouteStatus], settings: &Settings, now: &str) -> Plan {
    let mut plan = Plan::default();
    let mut status = |key: ObjectKey, mut new: Value, current: Value| {
        stamp(&mut new, &current, now);
        if new != current {
            plan.statuses.push((key, new));
        }
    };
    match snapshot.gateway_classes.get(WAYPOINT_CLASS) {
        None => {
            plan.create.push(gateway_class());
        }
        Some(class) => {
            let ours = class.spec.controller_name == CONTROLLER_NAME;
            let current = class
                .status
                .as_ref()
                .and_then(|s| serde_json::to_value(s).ok())
                .unwrap_or(Value::Null);
            if ours {
                let new = json!({"conditions": [condition(
                    "Accepted", true, "Accepted", "handled by the Weft controller",
                    class.metadata.generation,
                )]});
                status(
                    ObjectKey::new(GATEWAY_GROUP, "GatewayClass", None, WAYPOINT_CLASS),
                    new,
                    current,
                );
            }
        }
    }
    let mut gateways = Vec::new();
    for ((ns, name), gateway) in &snapshot.gateways {
        if gateway.spec.gateway_class_name != WAYPOINT_CLASS {
            continue;
        }
        plan.live.push((ns.clone(), name.clone()));
        let new = gateway_status(gateway, snapshot, settings, attached(routes, ns, name));
        let accepted = new["conditions"][0]["status"] == "True";
        let current = gateway
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null);
        gateways.push((
            ObjectKey::new(GATEWAY_GROUP, "Gateway", Some(ns), name),
            new,
            current,
        ));
        if accepted {
            match render(gateway, settings) {
                Ok(objects) => plan.apply.extend(objects),
                Err(problem) => plan.problems.push(problem),
            }
        }
    }
    for (key, new, current) in gateways {
        status(key, new, current);
    }
    let current_routes: BTreeMap<(&str, &str, &str), Value> = snapshot
        .http_routes
        .iter()
        .map(|((ns, n), r)| {
            (
                ("HTTPRoute", ns.as_str(), n.as_str()),
                r.status
                    .as_ref()
                    .and_then(|s| serde_json::to_value(s).ok())
                    .unwrap_or(Value::Null),
            )
        })
        .chain(snapshot.grpc_routes.iter().map(|((ns, n), r)| {
            (
                ("GRPCRoute", ns.as_str(), n.as_str()),
                r.status
                    .as_ref()
                    .and_then(|s| serde_json::to_value(s).ok())
                    .unwrap_or(Value::Null),
            )
        }))
        .collect();
    // Our parents' status for every route we computed one for; a route that has entries of
    // ours but no longer any parent of ours gets them removed.
    let ours: BTreeMap<(&str, &str, &str), &Value> = routes
        .iter()
        .map(|r| {
            (
                (r.kind.as_str(), r.namespace.as_str(), r.name.as_str()),
                &r.status,
            )
        })
        .collect();
    let empty = json!({"parents": []});
    for ((kind, ns, name), current) in &current_routes {
        let has_ours = current["parents"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["controllerName"] == CONTROLLER_NAME));
        let new = match ours.get(&(*kind, *ns, *name)) {
            Some(status) => status,
            None if has_ours => &empty,
            None => continue,
        };
        let new = merge_route_status(new, current);
        status(
            ObjectKey::new(GATEWAY_GROUP, kind, Some(ns), name),
            new,
            current.clone(),
        );
    }
    plan
}

#[cfg(test)]
mod tests;
