//! A workload (pod, VM entry) as WDS describes it (`istio.workload.Workload`).

use std::net::IpAddr;

use weft_proto::istio::workload as proto;

use super::cidr::ip_from_bytes;
use super::error::{Error, Reason};
use super::gateway::{GatewayAddress, convert_optional};
use crate::identity::SpiffeId;

/// Trust domain used when a workload's `trust_domain` is empty (reference §2.6).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Service account used when a workload's `service_account` is empty (reference §2.6).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Cluster id used when a workload's `cluster_id` is empty (reference §2.6).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// Capacity (load-balancing weight) used when a workload's `capacity` is unset (reference §2.6).
pub const DEFAULT_CAPACITY: u32 = 1;

/// How traffic reaches a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelProtocol {
    /// Plain TCP to `podIP:targetPort` (not captured by a node proxy).
    None,
    /// HBONE to `podIP:15008` (captured: ztunnel or a native HBONE server).
    Hbone,
}

/// The kind of controller a workload belongs to (`WorkloadType`), used in telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadType {
    /// A Deployment's pod.
    Deployment,
    /// A CronJob's pod.
    CronJob,
    /// A bare pod.
    Pod,
    /// A Job's pod.
    Job,
}

/// Where a workload runs; compared scope by scope for locality-aware load balancing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// Region (`topology.kubernetes.io/region`).
    pub region: String,
    /// Zone (`topology.kubernetes.io/zone`).
    pub zone: String,
    /// Subzone (`topology.istio.io/subzone`).
    pub subzone: String,
}

/// A service port and the port it maps to on the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Port {
    /// The port clients connect to on the service VIP.
    pub service_port: u16,
    /// The port on the endpoint; 0 = a named port, resolved from the endpoint's own port map.
    pub target_port: u16,
}

/// A workload's services: `namespace/hostname` → port map, sorted by key.
///
/// A map with the lookups a `HashMap` offers, kept as one sorted vector: a workload is usually
/// the endpoint of one or two services, where a hash map's table costs ~200 bytes more per
/// workload (ztunnel holds one per workload in the cluster).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePorts(Vec<(String, Vec<Port>)>);

impl ServicePorts {
    /// The port map of `key`.
    pub fn get(&self, key: &str) -> Option<&Vec<Port>> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Whether the workload is an endpoint of `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The service keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    /// `(key, ports)` pairs, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Vec<Port>)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the workload backs no service.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, Vec<Port>)> for ServicePorts {
    /// Of duplicate keys the last one wins (as inserting into a map).
    fn from_iter<I: IntoIterator<Item = (String, Vec<Port>)>>(iter: I) -> Self {
        let mut entries: Vec<(String, Vec<Port>)> = iter.into_iter().collect();
        // Stable: equal keys keep their order, so keeping the last of each run is "last wins".
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, Vec<Port>)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match out.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => out.push(entry),
            }
        }
        out.shrink_to_fit();
        ServicePorts(out)
    }
}

/// A workload from WDS, validated and with defaults applied (reference §2.6, §2.7).
///
/// Built only by converting the wire form ([`TryFrom<proto::Workload>`]); the identity is derived
/// once at conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The resource name and primary key (`cluster/group/kind/namespace/name[/section]`).
    pub uid: String,
    /// The pod (or entry) name.
    pub name: String,
    /// The Kubernetes namespace.
    pub namespace: String,
    /// The workload's IPs; empty for hostname-only workloads.
    pub ips: Vec<IpAddr>,
    /// The network the IPs belong to (empty = the default network).
    pub network: String,
    /// HBONE or plain TCP.
    pub tunnel: TunnelProtocol,
    /// The node the workload runs on.
    pub node: String,
    /// `service.istio.io/canonical-name`.
    pub canonical_name: String,
    /// `service.istio.io/canonical-revision`.
    pub canonical_revision: String,
    /// The owning controller's name (e.g. the Deployment's).
    pub workload_name: String,
    /// The owning controller's kind.
    pub workload_type: WorkloadType,
    /// The workload's own waypoint, for traffic addressed to the workload directly.
    pub waypoint: Option<GatewayAddress>,
    /// Gateway for reaching this workload from another network.
    pub network_gateway: Option<GatewayAddress>,
    /// Services this workload is an endpoint of: key `namespace/hostname` → its port map.
    pub services: ServicePorts,
    /// `namespace/name` keys of workload-selector authorization policies that apply to it.
    pub authorization_policies: Vec<String>,
    /// `status = HEALTHY`. Unhealthy workloads are not chosen as endpoints unless the service's
    /// health policy is `ALLOW_ALL`.
    pub healthy: bool,
    /// The cluster the workload lives in (default `Kubernetes`).
    pub cluster_id: String,
    /// Load-balancing weight relative to other endpoints (default 1; 0 = never chosen).
    pub capacity: u32,
    /// Region/zone/subzone.
    pub locality: Locality,
    /// `network_mode = HOST_NETWORK`: the IPs are the node's and are not indexed.
    pub host_network: bool,
    /// DNS name for workloads without IPs (resolved on demand; not handled here).
    pub hostname: String,
    /// The workload itself terminates HBONE (no ztunnel needed).
    pub native_tunnel: bool,
    identity: SpiffeId,
}

impl Workload {
    /// The workload's SPIFFE identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`
    /// with the defaults `cluster.local` and `default` applied.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The port map for `service_key` (`namespace/hostname`) if this workload is its endpoint.
    pub fn service_ports(&self, service_key: &str) -> Option<&[Port]> {
        self.services.get(service_key).map(Vec::as_slice)
    }
}

/// `value` as a TCP port.
pub(crate) fn port(value: u32) -> Result<u16, Reason> {
    u16::try_from(value).map_err(|_| Reason::Port { value })
}

/// Converts a proto `Port` list, naming `field` on error.
pub(crate) fn ports(list: &[proto::Port], field: &str) -> Result<Vec<Port>, (String, Reason)> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(Port {
                service_port: port(p.service_port)
                    .map_err(|r| (format!("{field}[{i}].service_port"), r))?,
                target_port: port(p.target_port)
                    .map_err(|r| (format!("{field}[{i}].target_port"), r))?,
            })
        })
        .collect()
}

/// Splits a `namespace/hostname` key; both parts non-empty and no further `/`.
pub(crate) fn split_service_key(key: &str) -> Option<(&str, &str)> {
    let (namespace, hostname) = key.split_once('/')?;
    (!namespace.is_empty() && !hostname.is_empty() && !hostname.contains('/'))
        .then_some((namespace, hostname))
}

fn non_empty_or<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() { default } else { value }
}

impl TryFrom<proto::Workload> for Workload {
    type Error = Error;

    /// Validates and converts a WDS workload (reference §2.6, §2.7).
    ///
    /// # Errors
    /// [`Error`] naming the first bad field: empty `uid`; an address not 4 or 16 bytes;
    /// `tunnel_protocol` `LEGACY_ISTIO_MTLS` or unknown; unknown `status`, `workload_type` or
    /// `network_mode`; a port over 65535; a `services` key not `namespace/hostname`; a waypoint or
    /// network gateway without destination or with a bad address; an invalid identity.
    fn try_from(w: proto::Workload) -> Result<Self, Error> {
        let name_for_error = if w.uid.is_empty() {
            format!("{}/{}", w.namespace, w.name)
        } else {
            w.uid.clone()
        };
        let err =
            |field: String, reason: Reason| Error::new("workload", &name_for_error, field, reason);
        if w.uid.is_empty() {
            return Err(err("uid".into(), Reason::Empty));
        }
        let ips = w
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| ip_from_bytes(a).map_err(|e| err(format!("addresses[{i}]"), e.into())))
            .collect::<Result<Vec<_>, _>>()?;
        let tunnel = match proto::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(proto::TunnelProtocol::None) => TunnelProtocol::None,
            Ok(proto::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
            Ok(proto::TunnelProtocol::LegacyIstioMtls) => {
                return Err(err("tunnel_protocol".into(), Reason::LegacyIstioMtls));
            }
            Err(_) => {
                return Err(err(
                    "tunnel_protocol".into(),
                    Reason::UnknownEnum {
                        value: w.tunnel_protocol,
                    },
                ));
            }
        };
        let healthy = match proto::WorkloadStatus::try_from(w.status) {
            Ok(proto::WorkloadStatus::Healthy) => true,
            Ok(proto::WorkloadStatus::Unhealthy) => false,
            Err(_) => {
                return Err(err(
                    "status".into(),
                    Reason::UnknownEnum { value: w.status },
                ));
            }
        };
        let workload_type = match proto::WorkloadType::try_from(w.workload_type) {
            Ok(proto::WorkloadType::Deployment) => WorkloadType::Deployment,
            Ok(proto::WorkloadType::Cronjob) => WorkloadType::CronJob,
            Ok(proto::WorkloadType::Pod) => WorkloadType::Pod,
            Ok(proto::WorkloadType::Job) => WorkloadType::Job,
            Err(_) => {
                return Err(err(
                    "workload_type".into(),
                    Reason::UnknownEnum {
                        value: w.workload_type,
                    },
                ));
            }
        };
        let host_network = match proto::NetworkMode::try_from(w.network_mode) {
            Ok(proto::NetworkMode::Standard) => false,
            Ok(proto::NetworkMode::HostNetwork) => true,
            Err(_) => {
                return Err(err(
                    "network_mode".into(),
                    Reason::UnknownEnum {
                        value: w.network_mode,
                    },
                ));
            }
        };
        let waypoint = convert_optional(w.waypoint, "waypoint").map_err(|(f, r)| err(f, r))?;
        let network_gateway =
            convert_optional(w.network_gateway, "network_gateway").map_err(|(f, r)| err(f, r))?;
        let mut services = Vec::with_capacity(w.services.len());
        for (key, list) in w.services {
            let field = format!("services[{key:?}]");
            if split_service_key(&key).is_none() {
                return Err(err(field, Reason::ServiceKey { value: key }));
            }
            let list = ports(&list.ports, &format!("{field}.ports")).map_err(|(f, r)| err(f, r))?;
            services.push((key, list));
        }
        let services: ServicePorts = services.into_iter().collect();
        let trust_domain = non_empty_or(&w.trust_domain, DEFAULT_TRUST_DOMAIN);
        let service_account = non_empty_or(&w.service_account, DEFAULT_SERVICE_ACCOUNT);
        let identity = SpiffeId::new(trust_domain, &w.namespace, service_account).map_err(|e| {
            err(
                "trust_domain/namespace/service_account".into(),
                Reason::Identity(e),
            )
        })?;
        let locality = w
            .locality
            .map(|l| Locality {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
            })
            .unwrap_or_default();
        let cluster_id = if w.cluster_id.is_empty() {
            DEFAULT_CLUSTER_ID.to_owned()
        } else {
            w.cluster_id
        };
        Ok(Workload {
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            ips,
            network: w.network,
            tunnel,
            node: w.node,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_name: w.workload_name,
            workload_type,
            waypoint,
            network_gateway,
            services,
            authorization_policies: w.authorization_policies,
            healthy,
            cluster_id,
            capacity: w.capacity.unwrap_or(DEFAULT_CAPACITY),
            locality,
            host_network,
            hostname: w.hostname,
            native_tunnel: w.native_tunnel,
            identity,
        })
    }
}
