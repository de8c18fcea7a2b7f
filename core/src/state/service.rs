//! A service as WDS describes it (`istio.workload.Service`).

use std::net::IpAddr;

use weft_proto::istio::workload as proto;

use super::cidr::{Cidr, ip_from_bytes, max_prefix_len};
use super::error::{Error, Reason};
use super::gateway::{GatewayAddress, convert_optional};
use super::workload::{Port, ports};
use crate::identity::SpiffeId;

/// One service address: an exact VIP, or a CIDR range matched by longest prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Vip {
    /// The network the address belongs to (empty = the default network).
    pub network: String,
    /// The address.
    pub address: IpAddr,
    /// `NetworkAddress.length` when present (validated ≤ 32 / 128).
    pub prefix_len: Option<u8>,
}

impl Vip {
    /// The CIDR range when the prefix is present and shorter than the family's width
    /// (reference §2.6); `None` for an exact VIP.
    pub fn cidr(&self) -> Option<Cidr> {
        match self.prefix_len {
            Some(len) if len < max_prefix_len(self.address) => {
                Cidr::new(self.address, u32::from(len)).ok()
            }
            _ => None,
        }
    }
}

/// Who can see a service (`Service.visibility`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// Every namespace.
    Public,
    /// Only clients in the service's own namespace.
    Namespace,
}

/// Endpoint selection mode (`LoadBalancing.Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoadBalancingMode {
    /// No locality preference: any endpoint.
    Unspecified,
    /// Only endpoints matching every routing-preference scope of the client.
    Strict,
    /// Prefer endpoints matching the most leading routing-preference scopes.
    Failover,
    /// No endpoint selection: connect to the original destination as is.
    Passthrough,
}

/// Which endpoints may be chosen (`LoadBalancing.HealthPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthPolicy {
    /// Healthy endpoints only.
    OnlyHealthy,
    /// Every endpoint, healthy or not.
    AllowAll,
}

/// A locality scope compared between client and endpoint (`LoadBalancing.Scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoutingScope {
    /// Same region.
    Region,
    /// Same zone.
    Zone,
    /// Same subzone.
    Subzone,
    /// Same node.
    Node,
    /// Same cluster id.
    Cluster,
    /// Same network.
    Network,
}

/// How a service chooses among its endpoints (`Service.load_balancing`; defaults when absent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoadBalancing {
    /// Scopes in priority order, for [`LoadBalancingMode::Strict`] and `Failover`.
    pub routing_preference: Vec<RoutingScope>,
    /// Selection mode.
    pub mode: LoadBalancingMode,
    /// Whether unhealthy endpoints may be chosen.
    pub health_policy: HealthPolicy,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        LoadBalancing {
            routing_preference: Vec::new(),
            mode: LoadBalancingMode::Unspecified,
            health_policy: HealthPolicy::OnlyHealthy,
        }
    }
}

/// One of several waypoints sharing a service's traffic by weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WeightedWaypoint {
    /// The waypoint.
    pub waypoint: GatewayAddress,
    /// Relative weight (0 = never chosen).
    pub weight: u32,
}

/// A service from WDS, validated (reference §2.6, §2.7). Keyed by `namespace/hostname`.
///
/// Built only by converting the wire form ([`TryFrom<proto::Service>`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The Kubernetes Service (or ServiceEntry) name.
    pub name: String,
    /// The namespace.
    pub namespace: String,
    /// The FQDN, e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    /// Declared ports.
    pub ports: Vec<Port>,
    /// Identities endpoints of this service may present besides their own (only the
    /// `spiffe://<td>/ns/<ns>/sa/<sa>` form; other SANs cannot match an HBONE peer and are
    /// dropped).
    pub subject_alt_names: Vec<SpiffeId>,
    /// The service's waypoint.
    pub waypoint: Option<GatewayAddress>,
    /// Several waypoints chosen per connection by weight, before [`Service::waypoint`].
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    /// Endpoint selection.
    pub load_balancing: LoadBalancing,
    /// Preferred among services sharing a VIP or hostname (after the client's namespace).
    pub canonical: bool,
    /// Who can see the service.
    pub visibility: Visibility,
    /// The service's addresses (empty for headless services).
    pub vips: Vec<Vip>,
    key: String,
}

impl Service {
    /// The resource name and key: `namespace/hostname`, fixed at conversion (changing
    /// `namespace` or `hostname` afterwards does not change it).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether a client in `namespace` may see this service.
    pub fn visible_to(&self, namespace: &str) -> bool {
        match self.visibility {
            Visibility::Public => true,
            Visibility::Namespace => self.namespace == namespace,
        }
    }

    /// The declared port for `service_port`.
    pub fn port(&self, service_port: u16) -> Option<Port> {
        self.ports
            .iter()
            .copied()
            .find(|p| p.service_port == service_port)
    }
}

fn unknown(value: i32) -> Reason {
    Reason::UnknownEnum { value }
}

fn load_balancing(lb: proto::LoadBalancing) -> Result<LoadBalancing, (String, Reason)> {
    use proto::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
    let routing_preference = lb
        .routing_preference
        .iter()
        .enumerate()
        .map(|(i, &scope)| match S::try_from(scope) {
            Ok(S::Region) => Ok(RoutingScope::Region),
            Ok(S::Zone) => Ok(RoutingScope::Zone),
            Ok(S::Subzone) => Ok(RoutingScope::Subzone),
            Ok(S::Node) => Ok(RoutingScope::Node),
            Ok(S::Cluster) => Ok(RoutingScope::Cluster),
            Ok(S::Network) => Ok(RoutingScope::Network),
            Ok(S::UnspecifiedScope) | Err(_) => Err((
                format!("load_balancing.routing_preference[{i}]"),
                unknown(scope),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mode = match M::try_from(lb.mode) {
        Ok(M::UnspecifiedMode) => LoadBalancingMode::Unspecified,
        Ok(M::Strict) => LoadBalancingMode::Strict,
        Ok(M::Failover) => LoadBalancingMode::Failover,
        Ok(M::Passthrough) => LoadBalancingMode::Passthrough,
        Err(_) => return Err(("load_balancing.mode".into(), unknown(lb.mode))),
    };
    let health_policy = match H::try_from(lb.health_policy) {
        Ok(H::OnlyHealthy) => HealthPolicy::OnlyHealthy,
        Ok(H::AllowAll) => HealthPolicy::AllowAll,
        Err(_) => {
            return Err((
                "load_balancing.health_policy".into(),
                unknown(lb.health_policy),
            ));
        }
    };
    Ok(LoadBalancing {
        routing_preference,
        mode,
        health_policy,
    })
}

impl TryFrom<proto::Service> for Service {
    type Error = Error;

    /// Validates and converts a WDS service (reference §2.6, §2.7). An unknown `visibility` is
    /// PUBLIC; SANs not in Istio's SPIFFE form are dropped.
    ///
    /// # Errors
    /// [`Error`] naming the first bad field: empty `namespace` or `hostname` (or a `/` in either:
    /// the key would be ambiguous); an address not 4 or 16 bytes or a prefix length over the
    /// family's width; a port over 65535; an unknown load-balancing enum value; a waypoint
    /// (plain or weighted) without destination or with a bad address.
    fn try_from(s: proto::Service) -> Result<Self, Error> {
        let key = format!("{}/{}", s.namespace, s.hostname);
        let err = |field: String, reason: Reason| Error::new("service", &key, field, reason);
        for (field, value) in [("namespace", &s.namespace), ("hostname", &s.hostname)] {
            if value.is_empty() {
                return Err(err(field.into(), Reason::Empty));
            }
            if value.contains('/') {
                return Err(err(field.into(), Reason::ServiceKey { value: key.clone() }));
            }
        }
        let mut vips = Vec::with_capacity(s.addresses.len());
        for (i, a) in s.addresses.into_iter().enumerate() {
            let address = ip_from_bytes(&a.address)
                .map_err(|e| err(format!("addresses[{i}].address"), e.into()))?;
            let prefix_len = match a.length {
                None => None,
                Some(len) => Some(
                    Cidr::new(address, len)
                        .map_err(|e| err(format!("addresses[{i}].length"), e.into()))?
                        .prefix_len(),
                ),
            };
            vips.push(Vip {
                network: a.network,
                address,
                prefix_len,
            });
        }
        let ports = ports(&s.ports, "ports").map_err(|(f, r)| err(f, r))?;
        let waypoint = convert_optional(s.waypoint, "waypoint").map_err(|(f, r)| err(f, r))?;
        let weighted_waypoints = s
            .weighted_waypoints
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let weight = w.weight;
                match convert_optional(w.destination, "destination") {
                    Ok(Some(waypoint)) => Ok(WeightedWaypoint { waypoint, weight }),
                    Ok(None) => Err(err(
                        format!("weighted_waypoints[{i}].destination"),
                        Reason::Missing,
                    )),
                    Err((f, r)) => Err(err(format!("weighted_waypoints[{i}].{f}"), r)),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let load_balancing = s
            .load_balancing
            .map(load_balancing)
            .transpose()
            .map_err(|(f, r)| err(f, r))?
            .unwrap_or_default();
        let visibility = match proto::service::Visibility::try_from(s.visibility) {
            Ok(proto::service::Visibility::Namespace) => Visibility::Namespace,
            Ok(proto::service::Visibility::Public) | Err(_) => Visibility::Public,
        };
        let subject_alt_names = s
            .subject_alt_names
            .iter()
            .filter_map(|san| san.parse().ok())
            .collect();
        Ok(Service {
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            ports,
            subject_alt_names,
            waypoint,
            weighted_waypoints,
            load_balancing,
            canonical: s.canonical,
            visibility,
            vips,
            key,
        })
    }
}
