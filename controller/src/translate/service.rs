//! Kubernetes `Service` → `istio.workload.Service` (istio-ambient reference §3.4).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use weft_k8s::Snapshot;
use weft_proto::istio::workload::{
    self as wl, AppProtocol, LoadBalancing, NetworkAddress, Port, address, load_balancing,
};

use super::waypoint::{Target, Waypoints};
use super::{AddressResource, Output, Settings};

/// What workload translation needs to know about a service.
#[derive(Debug, Clone)]
pub(crate) struct ServiceInfo {
    /// `namespace/hostname`, the key in `Workload.services`.
    pub(crate) key: String,
    /// Label selector (empty: endpoints come from EndpointSlices).
    pub(crate) selector: BTreeMap<String, String>,
    /// The Kubernetes ports.
    pub(crate) ports: Vec<ServicePort>,
    /// Whether the service's traffic goes through a waypoint.
    pub(crate) has_waypoint: Option<(String, String)>,
}

/// Services by namespace, and by `(namespace, name)` for EndpointSlice lookups.
#[derive(Debug, Default)]
pub(crate) struct Services {
    pub(crate) by_namespace: BTreeMap<String, Vec<Arc<ServiceInfo>>>,
    pub(crate) by_name: BTreeMap<(String, String), Arc<ServiceInfo>>,
}

/// `appProtocol` or the port-name prefix convention, as Istio reads them.
pub(crate) fn app_protocol(port: &ServicePort) -> AppProtocol {
    let hint = port
        .app_protocol
        .clone()
        .or_else(|| {
            port.name
                .as_ref()
                .map(|n| n.split('-').next().unwrap_or_default().to_owned())
        })
        .unwrap_or_default()
        .to_ascii_lowercase();
    match hint.as_str() {
        "http" | "http1" | "kubernetes.io/http" => AppProtocol::Http11,
        "http2" | "h2c" | "kubernetes.io/h2c" => AppProtocol::Http2,
        "grpc" | "grpc-web" => AppProtocol::Grpc,
        "tcp" => AppProtocol::Tcp,
        "tls" | "https" => AppProtocol::Tls,
        _ => AppProtocol::Unknown,
    }
}

fn target_port(port: &ServicePort) -> u32 {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match &port.target_port {
        None => u32::try_from(port.port).unwrap_or(0),
        Some(IntOrString::Int(n)) => u32::try_from(*n).unwrap_or(0),
        Some(IntOrString::String(s)) => s.parse().unwrap_or(0), // named: resolved per workload
    }
}

fn translate_one(
    svc: &Service,
    namespace: &str,
    name: &str,
    settings: &Settings,
    waypoints: &Waypoints,
    snapshot: &Snapshot,
    problems: &mut Vec<String>,
) -> Option<(AddressResource, ServiceInfo)> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let hostname = format!("{name}.{namespace}.svc.{}", settings.domain_suffix);
    let key = format!("{namespace}/{hostname}");
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    let namespace_labels = snapshot.namespace_labels(namespace);

    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.clone());
    }
    let mut addresses = Vec::new();
    let mut aliases = Vec::new();
    for ip in ips.iter().filter(|ip| !ip.is_empty() && *ip != "None") {
        match ip.parse::<IpAddr>() {
            Ok(ip) => {
                aliases.push(super::address_alias(&settings.network, &ip));
                addresses.push(NetworkAddress {
                    network: settings.network.clone(),
                    address: super::ip_bytes(&ip),
                    length: None,
                });
            }
            Err(_) => problems.push(format!(
                "Service {namespace}/{name}: field spec.clusterIPs: {ip:?} is not an IP address"
            )),
        }
    }
    let ports: Vec<Port> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| Port {
            service_port: u32::try_from(p.port).unwrap_or(0),
            target_port: target_port(p),
            app_protocol: app_protocol(p) as i32,
        })
        .collect();

    let waypoint = waypoints.bound(Target::Service, namespace, &labels, &namespace_labels);
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let distribution = spec.traffic_distribution.clone().or_else(|| {
        annotations
            .get("networking.istio.io/traffic-distribution")
            .cloned()
    });
    use load_balancing::{HealthPolicy, Mode, Scope};
    let mut lb = None;
    if spec.internal_traffic_policy.as_deref() == Some("Local") {
        lb = Some(LoadBalancing {
            routing_preference: vec![Scope::Node as i32],
            mode: Mode::Strict as i32,
            health_policy: 0,
        });
    } else if matches!(
        distribution.as_deref(),
        Some("PreferClose" | "PreferSameZone")
    ) {
        lb = Some(LoadBalancing {
            routing_preference: vec![
                Scope::Network as i32,
                Scope::Region as i32,
                Scope::Zone as i32,
                Scope::Subzone as i32,
            ],
            mode: Mode::Failover as i32,
            health_policy: 0,
        });
    }
    if spec.publish_not_ready_addresses == Some(true) {
        lb.get_or_insert_with(LoadBalancing::default).health_policy = HealthPolicy::AllowAll as i32;
    }

    let service = wl::Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        hostname,
        addresses,
        ports,
        waypoint: waypoint.map(|w| w.gateway_address()),
        load_balancing: lb,
        ..Default::default()
    };
    let info = ServiceInfo {
        key: key.clone(),
        selector: spec.selector.clone().unwrap_or_default(),
        ports: spec.ports.clone().unwrap_or_default(),
        has_waypoint: waypoint.map(|w| (w.namespace.clone(), w.name.clone())),
    };
    Some((
        AddressResource {
            name: key,
            aliases,
            address: wl::Address {
                r#type: Some(address::Type::Service(service)),
            },
        },
        info,
    ))
}

/// Translates every Service into `out`, returning what workload translation needs.
pub(crate) fn translate_all(
    snapshot: &Snapshot,
    settings: &Settings,
    waypoints: &Waypoints,
    out: &mut Output,
) -> Services {
    let mut services = Services::default();
    for ((namespace, name), svc) in &snapshot.services {
        if let Some((resource, info)) = translate_one(
            svc,
            namespace,
            name,
            settings,
            waypoints,
            snapshot,
            &mut out.problems,
        ) {
            let info = Arc::new(info);
            services
                .by_namespace
                .entry(namespace.clone())
                .or_default()
                .push(info.clone());
            services
                .by_name
                .insert((namespace.clone(), name.clone()), info);
            out.addresses.insert(resource.name.clone(), resource);
        }
    }
    services
}
