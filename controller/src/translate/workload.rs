//! Kubernetes `Pod` → `istio.workload.Workload` (istio-ambient reference §3.3).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use weft_k8s::Snapshot;
use weft_k8s::crds::AuthorizationPolicy;
use weft_proto::istio::workload::{
    self as wl, Locality, NetworkMode, Port, PortList, TunnelProtocol, WorkloadStatus,
    WorkloadType, address,
};

use super::service::{ServiceInfo, Services, app_protocol};
use super::waypoint::{Target, Waypoints};
use super::{AddressResource, Output, REDIRECTION_ANNOTATION, Settings, authz};

/// The workload `uid`: `<cluster>//Pod/<namespace>/<name>`, as istiod builds it.
pub fn workload_uid(cluster_id: &str, namespace: &str, name: &str) -> String {
    format!("{cluster_id}//Pod/{namespace}/{name}")
}

/// Workload type and name from the pod's controller: a Deployment (directly, or through its
/// ReplicaSet `<deployment>-<pod-template-hash>`), a Job (or the CronJob behind it), else the
/// pod itself.
fn workload_type_and_name(pod: &Pod, name: &str) -> (WorkloadType, String) {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
        .or_else(|| pod.metadata.owner_references.as_ref()?.first());
    let Some(owner) = owner else {
        return (WorkloadType::Pod, name.to_owned());
    };
    match owner.kind.as_str() {
        "Deployment" => (WorkloadType::Deployment, owner.name.clone()),
        "ReplicaSet" => {
            let hash = labels
                .get("pod-template-hash")
                .map(String::as_str)
                .unwrap_or_default();
            let deployment = owner
                .name
                .strip_suffix(hash)
                .and_then(|n| n.strip_suffix('-'))
                .filter(|_| !hash.is_empty());
            match deployment {
                Some(deployment) => (WorkloadType::Deployment, deployment.to_owned()),
                None => (WorkloadType::Pod, owner.name.clone()),
            }
        }
        "Job" => {
            // CronJob-created jobs are named `<cronjob>-<schedule time>`.
            match owner.name.rsplit_once('-') {
                Some((cron, suffix))
                    if suffix.len() >= 8 && suffix.chars().all(|c| c.is_ascii_digit()) =>
                {
                    (WorkloadType::Cronjob, cron.to_owned())
                }
                _ => (WorkloadType::Job, owner.name.clone()),
            }
        }
        _ => (WorkloadType::Pod, owner.name.clone()),
    }
}

fn canonical(labels: &BTreeMap<String, String>, workload_name: &str) -> (String, String) {
    let name = [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| workload_name.to_owned());
    let revision = [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| "latest".to_owned());
    (name, revision)
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The service's ports for this pod: named target ports resolved against the pod's container
/// ports (a port whose name the pod does not define is dropped).
fn ports_for(service: &ServiceInfo, pod: &Pod) -> PortList {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let container_ports: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .collect();
    let ports = service
        .ports
        .iter()
        .filter_map(|p| {
            let target = match &p.target_port {
                None => p.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => match name.parse() {
                    Ok(n) => n,
                    Err(_) => {
                        container_ports
                            .iter()
                            .find(|cp| cp.name.as_deref() == Some(name.as_str()))?
                            .container_port
                    }
                },
            };
            Some(Port {
                service_port: u32::try_from(p.port).ok()?,
                target_port: u32::try_from(target).ok()?,
                app_protocol: app_protocol(p) as i32,
            })
        })
        .collect();
    PortList { ports }
}

/// What workload translation needs besides the pod: built once per translation from everything
/// but the pods, so a change to pods alone re-translates only those (see [`super::Translator`]).
pub(crate) struct Context {
    pub(crate) waypoints: Waypoints,
    pub(crate) services: Services,
    pub(crate) selector_policies: Vec<(String, Arc<AuthorizationPolicy>)>,
    /// Indices into `selector_policies` by the policy's namespace.
    selector_by_namespace: BTreeMap<String, Vec<usize>>,
    /// Selector-less services' ports by the pods their EndpointSlices target.
    by_slice: BTreeMap<(String, String), Vec<(String, PortList)>>,
    /// Services by resource name (`namespace/hostname`).
    by_key: BTreeMap<String, Arc<ServiceInfo>>,
}

/// One pod's translation.
#[derive(Debug, Default)]
pub(crate) struct PodResult {
    /// The workload, unless the pod is finished or has no IP.
    pub(crate) address: Option<AddressResource>,
    /// Per-workload Authorizations its PeerAuthentication implies (published once per key).
    pub(crate) extras: Vec<weft_proto::istio::security::Authorization>,
    /// Problems with this pod.
    pub(crate) problems: Vec<String>,
}

impl Context {
    /// The context of `snapshot` (everything but its pods).
    pub(crate) fn new(
        snapshot: &Snapshot,
        waypoints: Waypoints,
        services: Services,
        selector_policies: Vec<(String, Arc<AuthorizationPolicy>)>,
    ) -> Self {
        // Selector-less services reach pods through EndpointSlice targetRefs.
        let mut by_slice: BTreeMap<(String, String), Vec<(String, PortList)>> = BTreeMap::new();
        for ((ns, _), slice) in &snapshot.endpoint_slices {
            let labels = slice.metadata.labels.clone().unwrap_or_default();
            let Some(svc_name) = labels.get("kubernetes.io/service-name") else {
                continue;
            };
            let Some(service) = services.by_name.get(&(ns.clone(), svc_name.clone())) else {
                continue;
            };
            if !service.selector.is_empty() {
                continue;
            }
            let ports = PortList {
                ports: service
                    .ports
                    .iter()
                    .filter_map(|sp| {
                        let slice_port =
                            slice.ports.iter().flatten().find(|p| p.name == sp.name)?;
                        Some(Port {
                            service_port: u32::try_from(sp.port).ok()?,
                            target_port: u32::try_from(slice_port.port?).ok()?,
                            app_protocol: app_protocol(sp) as i32,
                        })
                    })
                    .collect(),
            };
            for endpoint in slice.endpoints.iter().flatten() {
                if let Some(target) = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|t| t.kind.as_deref() == Some("Pod"))
                {
                    let pod_ns = target.namespace.clone().unwrap_or_else(|| ns.clone());
                    let pod_name = target.name.clone().unwrap_or_default();
                    by_slice
                        .entry((pod_ns, pod_name))
                        .or_default()
                        .push((service.key.clone(), ports.clone()));
                }
            }
        }
        let by_key = services
            .by_name
            .values()
            .map(|info| (info.key.clone(), info.clone()))
            .collect();
        let mut selector_by_namespace: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, (_, policy)) in selector_policies.iter().enumerate() {
            let namespace = policy.metadata.namespace.clone().unwrap_or_default();
            selector_by_namespace.entry(namespace).or_default().push(i);
        }
        Context {
            waypoints,
            services,
            selector_policies,
            selector_by_namespace,
            by_slice,
            by_key,
        }
    }
}

/// Adds one pod's translation to `out`.
pub(crate) fn merge(result: PodResult, out: &mut Output) {
    out.problems.extend(result.problems);
    for extra in result.extras {
        out.authorizations
            .insert(format!("{}/{}", extra.namespace, extra.name), extra);
    }
    if let Some(address) = result.address {
        out.addresses.insert(address.name.clone(), address);
    }
}

/// Every waypoint's implicit ALLOW policy (workloads behind it reference it), by key.
pub(crate) fn waypoint_policies(
    settings: &Settings,
    ctx: &Context,
) -> BTreeMap<String, weft_proto::istio::security::Authorization> {
    ctx.waypoints
        .iter()
        .map(|w| {
            let allow = authz::allow_from_waypoint(
                &w.namespace,
                &w.name,
                &[w.principal(&settings.authz.trust_domain)],
                &settings.authz,
            );
            (format!("{}/{}", allow.namespace, allow.name), allow)
        })
        .collect()
}

/// Translates one pod (`namespace/name` in `snapshot`).
pub(crate) fn translate_pod(
    snapshot: &Snapshot,
    settings: &Settings,
    ctx: &Context,
    namespace: &String,
    name: &String,
    pod: &Pod,
) -> PodResult {
    let mut result = PodResult::default();
    let Some(status) = pod.status.as_ref() else {
        return result;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return result;
    }
    let mut ips: Vec<String> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip.clone());
    }
    let mut addresses = Vec::new();
    for ip in ips.iter().filter(|ip| !ip.is_empty()) {
        match ip.parse::<IpAddr>() {
            Ok(ip) => addresses.push(ip),
            Err(_) => result.problems.push(format!(
                "Pod {namespace}/{name}: field status.podIPs: {ip:?} is not an IP address"
            )),
        }
    }
    if addresses.is_empty() {
        return result;
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let namespace_labels = snapshot.namespace_labels(namespace);
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network == Some(true);
    let service_account = spec
        .service_account_name
        .clone()
        .or(spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let (workload_type, workload_name) = workload_type_and_name(pod, name);
    let (canonical_name, canonical_revision) = canonical(&labels, &workload_name);

    let mut workload_services: BTreeMap<String, PortList> = BTreeMap::new();
    // Every waypoint that sends traffic to this pod: its own binding, and the waypoints of
    // the services it backs (by selector or by EndpointSlice).
    let mut behind_waypoints = std::collections::BTreeSet::new();
    for service in ctx
        .services
        .by_namespace
        .get(namespace)
        .into_iter()
        .flatten()
    {
        if super::selector_matches(&service.selector, &labels) {
            workload_services.insert(service.key.clone(), ports_for(service, pod));
            behind_waypoints.extend(service.has_waypoint.clone());
        }
    }
    for (key, ports) in ctx
        .by_slice
        .get(&(namespace.clone(), name.clone()))
        .into_iter()
        .flatten()
    {
        workload_services.insert(key.clone(), ports.clone());
        if let Some(info) = ctx.by_key.get(key.as_str()) {
            behind_waypoints.extend(info.has_waypoint.clone());
        }
    }
    let waypoint = ctx
        .waypoints
        .bound(Target::Workload, namespace, &labels, &namespace_labels);
    if let Some(w) = waypoint {
        behind_waypoints.insert((w.namespace.clone(), w.name.clone()));
    }

    // Only policies in the pod's namespace or the root namespace can select it (`selects`
    // checks that too); the order does not matter, the list is sorted below.
    let root = settings.authz.root_namespace.as_str();
    let mut policies: Vec<String> = std::iter::once(namespace.as_str())
        .chain((root != namespace.as_str()).then_some(root))
        .filter_map(|ns| ctx.selector_by_namespace.get(ns))
        .flatten()
        .map(|&i| &ctx.selector_policies[i])
        .filter(|(_, p)| authz::selects(p, namespace, &labels, &settings.authz))
        .map(|(key, _)| key.clone())
        .collect();
    let peer = authz::peer_authentication(
        namespace,
        &labels,
        snapshot.peer_authentications.values().map(AsRef::as_ref),
        &settings.authz,
    );
    policies.extend(peer.policy_keys);
    result.extras = peer.extra;
    for (wns, wname) in &behind_waypoints {
        let Some(w) = ctx.waypoints.get(wns, wname) else {
            return result;
        };
        let allow = authz::allow_from_waypoint(
            wns,
            wname,
            &[w.principal(&settings.authz.trust_domain)],
            &settings.authz,
        );
        policies.push(format!("{}/{}", allow.namespace, allow.name));
    }
    policies.sort();
    policies.dedup();

    let node_labels = spec
        .node_name
        .as_ref()
        .and_then(|n| snapshot.nodes.get(n))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    let locality = match (
        node_labels.get("topology.kubernetes.io/region"),
        node_labels.get("topology.kubernetes.io/zone"),
    ) {
        (None, None) => None,
        (region, zone) => Some(Locality {
            region: region.cloned().unwrap_or_default(),
            zone: zone.cloned().unwrap_or_default(),
            subzone: node_labels
                .get("topology.istio.io/subzone")
                .cloned()
                .unwrap_or_default(),
        }),
    };

    let uid = workload_uid(&settings.cluster_id, namespace, name);
    let trust_domain = &settings.authz.trust_domain;
    let workload = wl::Workload {
        uid: uid.clone(),
        name: name.clone(),
        namespace: namespace.clone(),
        addresses: addresses.iter().map(super::ip_bytes).collect(),
        network: settings.network.clone(),
        tunnel_protocol: if annotations.get(REDIRECTION_ANNOTATION).map(String::as_str)
            == Some("enabled")
        {
            TunnelProtocol::Hbone as i32
        } else {
            TunnelProtocol::None as i32
        },
        trust_domain: if trust_domain == "cluster.local" {
            String::new()
        } else {
            trust_domain.clone()
        },
        service_account: if service_account == "default" {
            String::new()
        } else {
            service_account
        },
        waypoint: waypoint.map(|w| w.gateway_address()),
        node: spec.node_name.clone().unwrap_or_default(),
        canonical_name,
        canonical_revision,
        workload_type: workload_type as i32,
        workload_name,
        authorization_policies: policies,
        status: if is_ready(pod) {
            WorkloadStatus::Healthy as i32
        } else {
            WorkloadStatus::Unhealthy as i32
        },
        cluster_id: settings.cluster_id.clone(),
        services: workload_services.into_iter().collect(),
        locality,
        network_mode: if host_network {
            NetworkMode::HostNetwork as i32
        } else {
            NetworkMode::Standard as i32
        },
        ..Default::default()
    };
    let aliases = if host_network {
        Vec::new()
    } else {
        addresses
            .iter()
            .map(|ip| super::address_alias(&settings.network, ip))
            .collect()
    };
    result.address = Some(AddressResource {
        name: uid,
        aliases,
        address: wl::Address {
            r#type: Some(address::Type::Workload(workload)),
        },
    });
    result
}
