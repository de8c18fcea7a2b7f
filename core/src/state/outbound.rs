//! The outbound routing decision: where a connection captured from a pod goes (reference §7.1,
//! without multi-network / double-HBONE paths).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::gateway::{GatewayAddress, GatewayDestination};
use super::service::{HealthPolicy, LoadBalancingMode, RoutingScope, Service};
use super::store::Store;
use super::workload::{TunnelProtocol, Workload, split_service_key};
use crate::hbone;
use crate::identity::SpiffeId;

/// Ports ztunnel listens on inside a pod (outbound 15001, inbound plaintext 15006, HBONE 15008):
/// a loopback connection to one of them is a self-call and is dropped (reference §7.1 step 0).
pub const SELF_PORTS: [u16; 3] = [15001, 15006, hbone::PORT];

/// Where an outbound connection goes and how, as decided by [`Store::outbound`].
///
/// `Arc`s point into the store's entries (no copies); `expected_identities` lists the SPIFFE IDs
/// the HBONE peer may present (reference §13 fact 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// HBONE to a waypoint, which applies L7 policy and forwards.
    Waypoint {
        /// The waypoint pod's HBONE address (`ip:hbone_mtls_port`, after the waypoint service's
        /// port map).
        target: SocketAddr,
        /// The CONNECT authority: the original destination, unchanged.
        authority: SocketAddr,
        /// The waypoint workload's identity followed by the waypoint service's SANs.
        expected_identities: Vec<SpiffeId>,
        /// The chosen waypoint pod.
        waypoint: Arc<Workload>,
        /// The destination service, when the connection was addressed to a service VIP (`None`
        /// for a workload's own waypoint).
        service: Option<Arc<Service>>,
    },
    /// HBONE directly to the destination pod's ztunnel (or native HBONE server).
    Hbone {
        /// `podIP:15008`.
        target: SocketAddr,
        /// The CONNECT authority: `podIP:targetPort`.
        authority: SocketAddr,
        /// The pod's identity followed by the service's SANs (if service-addressed).
        expected_identities: Vec<SpiffeId>,
        /// The destination pod.
        destination: Arc<Workload>,
        /// The service the pod was chosen from, if service-addressed.
        service: Option<Arc<Service>>,
    },
    /// Plain TCP to a pod outside the mesh (`tunnel_protocol = NONE`).
    Tcp {
        /// `podIP:targetPort`.
        target: SocketAddr,
        /// The destination pod.
        destination: Arc<Workload>,
        /// The service the pod was chosen from, if service-addressed.
        service: Option<Arc<Service>>,
    },
    /// Plain TCP to the original destination: unknown to the mesh, or a service whose load
    /// balancing mode is `PASSTHROUGH`.
    Passthrough {
        /// The original destination.
        target: SocketAddr,
    },
    /// A service VIP with no endpoint that may be chosen (none healthy, none with an address,
    /// no port mapping for the destination port, none in the required locality, or all with
    /// capacity 0). The connection is refused.
    NoHealthyEndpoint {
        /// The service addressed.
        service: Arc<Service>,
    },
    /// The destination has a waypoint that resolves to no usable pod. The connection is refused.
    WaypointUnavailable {
        /// The waypoint that could not be resolved.
        waypoint: GatewayAddress,
    },
    /// A loopback connection to one of ztunnel's own ports ([`SELF_PORTS`]).
    Drop,
}

/// A resolved waypoint: the pod, its HBONE address, and the waypoint service it was chosen from.
struct WaypointPod<'a> {
    pod: &'a Arc<Workload>,
    target: SocketAddr,
    service: Option<&'a Arc<Service>>,
}

/// A uniform random number in `0..n` (0 when `n` is 0): the production random source for
/// [`Store::outbound`].
pub fn random_below(n: u64) -> u64 {
    if n == 0 { 0 } else { rand::random_range(0..n) }
}

/// Draws from the injected source, tolerating out-of-range answers.
fn draw(rng: &mut impl FnMut(u64) -> u64, total: u64) -> u64 {
    let r = rng(total);
    if r < total { r } else { r % total }
}

/// The workload IP to dial: the first of `destination`'s family, else its first IP.
fn pick_ip(workload: &Workload, want_v4: bool) -> Option<IpAddr> {
    workload
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == want_v4)
        .or_else(|| workload.ips.first())
        .copied()
}

/// The identity of `workload` followed by `service`'s SANs, without duplicates.
fn expected_identities(workload: &Workload, service: Option<&Service>) -> Vec<SpiffeId> {
    let sans = service.map_or(&[][..], |s| &s.subject_alt_names[..]);
    let mut ids = Vec::with_capacity(1 + sans.len());
    ids.push(workload.identity().clone());
    for san in sans {
        if !ids.contains(san) {
            ids.push(san.clone());
        }
    }
    ids
}

/// The endpoint's target port for `service_port`: its own port map, else the service's
/// `target_port` (0 = named port, unresolvable without the endpoint's map).
pub fn target_port(workload: &Workload, service: &Service, service_port: u16) -> Option<u16> {
    if let Some(p) = workload
        .service_ports(service.key())
        .and_then(|ports| ports.iter().find(|p| p.service_port == service_port))
        && p.target_port != 0
    {
        return Some(p.target_port);
    }
    service
        .port(service_port)
        .map(|p| p.target_port)
        .filter(|&p| p != 0)
}

/// How many leading routing-preference scopes `endpoint` shares with `source`.
fn locality_rank(source: &Workload, endpoint: &Workload, scopes: &[RoutingScope]) -> usize {
    scopes
        .iter()
        .take_while(|scope| match scope {
            RoutingScope::Region => source.locality.region == endpoint.locality.region,
            RoutingScope::Zone => source.locality.zone == endpoint.locality.zone,
            RoutingScope::Subzone => source.locality.subzone == endpoint.locality.subzone,
            RoutingScope::Node => source.node == endpoint.node,
            RoutingScope::Cluster => source.cluster_id == endpoint.cluster_id,
            RoutingScope::Network => source.network == endpoint.network,
        })
        .count()
}

/// The waypoint a service-addressed connection uses: one of `weighted_waypoints` by weight
/// (when their total weight is non-zero), else `Service.waypoint`.
fn pick_waypoint<'a>(
    service: &'a Service,
    rng: &mut impl FnMut(u64) -> u64,
) -> Option<&'a GatewayAddress> {
    let total: u64 = service
        .weighted_waypoints
        .iter()
        .map(|w| u64::from(w.weight))
        .sum();
    if total > 0 {
        let mut r = draw(rng, total);
        for w in &service.weighted_waypoints {
            let weight = u64::from(w.weight);
            if r < weight {
                return Some(&w.waypoint);
            }
            r -= weight;
        }
    }
    service.waypoint.as_ref()
}

/// Connects directly to `workload` at `ip:port`: HBONE or plain TCP by its tunnel protocol
/// (reference §7.1 step 7).
fn direct(
    workload: &Arc<Workload>,
    ip: IpAddr,
    port: u16,
    service: Option<&Arc<Service>>,
) -> Decision {
    match workload.tunnel {
        TunnelProtocol::Hbone => Decision::Hbone {
            target: SocketAddr::new(ip, hbone::PORT),
            authority: SocketAddr::new(ip, port),
            expected_identities: expected_identities(workload, service.map(|s| &**s)),
            destination: Arc::clone(workload),
            service: service.cloned(),
        },
        TunnelProtocol::None => Decision::Tcp {
            target: SocketAddr::new(ip, port),
            destination: Arc::clone(workload),
            service: service.cloned(),
        },
    }
}

impl Store {
    /// Decides where a connection from `source` to the original destination `dst` goes
    /// (reference §7.1 without multi-network paths):
    ///
    /// 0. loopback `dst` on a [`SELF_PORTS`] port → [`Decision::Drop`];
    /// 1. `dst.ip` is a workload on the source's network → its own waypoint if it has one and
    ///    the source is not that waypoint (authority = `dst`), else directly ([`Decision::Hbone`]
    ///    to `podIP:15008` with authority `dst`, or [`Decision::Tcp`] to `dst`);
    /// 2. `dst.ip` is a service VIP visible to the source's namespace → its waypoint (weighted or
    ///    single) if any, resolved to a waypoint pod at its HBONE port with authority `dst`
    ///    unchanged; else `PASSTHROUGH` mode → [`Decision::Passthrough`]; else an endpoint chosen
    ///    among those that may be (healthy unless `ALLOW_ALL`, with an IP, with a target port for
    ///    `dst.port` from the endpoint's port map or the service's `target_port`, in the best
    ///    locality rank for `STRICT`/`FAILOVER`), at random weighted by capacity; none →
    ///    [`Decision::NoHealthyEndpoint`];
    /// 3. anything else → [`Decision::Passthrough`] to `dst`.
    ///
    /// `rng(n)` must return a uniform number in `0..n` (`n ≥ 1`); production code passes
    /// [`random_below`], tests a scripted source. It is called at most twice.
    pub fn outbound(
        &self,
        source: &Workload,
        dst: SocketAddr,
        rng: &mut impl FnMut(u64) -> u64,
    ) -> Decision {
        if dst.ip().is_loopback() && SELF_PORTS.contains(&dst.port()) {
            return Decision::Drop;
        }
        if let Some(workload) = self.workload_by_ip(&source.network, dst.ip()) {
            if let Some(waypoint) = &workload.waypoint
                && !self.is_waypoint(source, waypoint)
            {
                return self.via_waypoint(source, waypoint, dst, None, rng);
            }
            return direct(workload, dst.ip(), dst.port(), None);
        }
        if let Some(service) = self.service_by_vip(&source.network, dst.ip(), &source.namespace) {
            if let Some(waypoint) = pick_waypoint(service, rng) {
                return self.via_waypoint(source, waypoint, dst, Some(service), rng);
            }
            if service.load_balancing.mode == LoadBalancingMode::Passthrough {
                return Decision::Passthrough { target: dst };
            }
            return match self.select_endpoint(source, service, dst.port(), None, rng) {
                Some((workload, port)) => match pick_ip(workload, dst.is_ipv4()) {
                    Some(ip) => direct(workload, ip, port, Some(service)),
                    None => Decision::NoHealthyEndpoint {
                        service: Arc::clone(service),
                    },
                },
                None => Decision::NoHealthyEndpoint {
                    service: Arc::clone(service),
                },
            };
        }
        Decision::Passthrough { target: dst }
    }

    /// Whether `source` is itself (one of the pods of) `waypoint`, so its traffic must not be
    /// sent back through it (reference §7.1 step 6).
    fn is_waypoint(&self, source: &Workload, waypoint: &GatewayAddress) -> bool {
        match &waypoint.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => source
                .services
                .keys()
                .any(|k| split_service_key(k) == Some((namespace.as_str(), hostname.as_str()))),
            GatewayDestination::Address { network, ip } => {
                (source.network == *network && source.ips.contains(ip))
                    || self
                        .service_by_vip(network, *ip, &source.namespace)
                        .is_some_and(|s| source.services.contains_key(s.key()))
            }
        }
    }

    /// Whether `peer` is the identity of a waypoint serving `local`: the workload's own
    /// waypoint or a waypoint of one of its services, resolved to the waypoint's pods. Inbound
    /// trusts the HBONE `forwarded` header (the original client address) only from these
    /// peers, as Istio's ztunnel does.
    pub fn is_waypoint_of(&self, local: &Workload, peer: &SpiffeId) -> bool {
        let services = local
            .services
            .keys()
            .filter_map(|key| self.service(key))
            .filter_map(|s| s.waypoint.as_ref());
        local.waypoint.iter().chain(services).any(|waypoint| {
            self.waypoint_identities(local, waypoint)
                .any(|id| id == peer)
        })
    }

    /// The identities of the pods behind `waypoint` (and its service's SANs).
    fn waypoint_identities<'a>(
        &'a self,
        local: &Workload,
        waypoint: &'a GatewayAddress,
    ) -> Box<dyn Iterator<Item = &'a SpiffeId> + 'a> {
        let service = match &waypoint.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => self.service_by_name(namespace, hostname),
            GatewayDestination::Address { network, ip } => {
                if let Some(pod) = self.workload_by_ip(network, *ip) {
                    return Box::new(std::iter::once(pod.identity()));
                }
                self.service_by_vip(network, *ip, &local.namespace)
            }
        };
        match service {
            Some(svc) => Box::new(
                self.endpoints(svc.key())
                    .map(|pod| pod.identity())
                    .chain(svc.subject_alt_names.iter()),
            ),
            None => Box::new(std::iter::empty()),
        }
    }

    /// HBONE to a pod of `waypoint` with authority `dst` (reference §7.1 step 2).
    fn via_waypoint(
        &self,
        source: &Workload,
        waypoint: &GatewayAddress,
        dst: SocketAddr,
        service: Option<&Arc<Service>>,
        rng: &mut impl FnMut(u64) -> u64,
    ) -> Decision {
        let port = waypoint.hbone_port;
        let resolved = match &waypoint.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => self
                .service_by_name(namespace, hostname)
                .and_then(|svc| self.waypoint_pod(source, svc, port, dst, rng)),
            GatewayDestination::Address { network, ip } => {
                match self.workload_by_ip(network, *ip) {
                    Some(pod) => Some(WaypointPod {
                        pod,
                        target: SocketAddr::new(*ip, port),
                        service: None,
                    }),
                    None => self
                        .service_by_vip(network, *ip, &source.namespace)
                        .and_then(|svc| self.waypoint_pod(source, svc, port, dst, rng)),
                }
            }
        };
        match resolved {
            Some(WaypointPod {
                pod,
                target,
                service: waypoint_service,
            }) => Decision::Waypoint {
                target,
                authority: dst,
                expected_identities: expected_identities(pod, waypoint_service.map(|s| &**s)),
                waypoint: Arc::clone(pod),
                service: service.cloned(),
            },
            None => Decision::WaypointUnavailable {
                waypoint: waypoint.clone(),
            },
        }
    }

    /// A pod of the waypoint service `svc` and its HBONE address: the service port
    /// `hbone_port` mapped through the port maps, or `hbone_port` itself if undeclared.
    fn waypoint_pod<'a>(
        &'a self,
        source: &Workload,
        svc: &'a Arc<Service>,
        hbone_port: u16,
        dst: SocketAddr,
        rng: &mut impl FnMut(u64) -> u64,
    ) -> Option<WaypointPod<'a>> {
        let (pod, port) = self.select_endpoint(source, svc, hbone_port, Some(hbone_port), rng)?;
        let ip = pick_ip(pod, dst.is_ipv4())?;
        Some(WaypointPod {
            pod,
            target: SocketAddr::new(ip, port),
            service: Some(svc),
        })
    }

    /// Chooses an endpoint of `service` for `service_port` and its target port (reference §7.1
    /// step 3): candidates are endpoints that are healthy (or any, with `ALLOW_ALL`), have an IP
    /// and a target port (endpoint port map, else service `target_port`, else `default_port`);
    /// `STRICT` keeps those matching every routing-preference scope, `FAILOVER` those matching
    /// the most leading scopes; then one is drawn weighted by capacity. Two passes, no
    /// allocation.
    fn select_endpoint<'a>(
        &'a self,
        source: &Workload,
        service: &Service,
        service_port: u16,
        default_port: Option<u16>,
        rng: &mut impl FnMut(u64) -> u64,
    ) -> Option<(&'a Arc<Workload>, u16)> {
        let lb = &service.load_balancing;
        let allow_all = lb.health_policy == HealthPolicy::AllowAll;
        let ranked = matches!(
            lb.mode,
            LoadBalancingMode::Strict | LoadBalancingMode::Failover
        );
        let scopes = &lb.routing_preference[..];
        let candidate = |workload: &Workload| -> Option<(u16, usize)> {
            if !(allow_all || workload.healthy) || workload.ips.is_empty() {
                return None;
            }
            let port = target_port(workload, service, service_port).or(default_port)?;
            let rank = if ranked {
                locality_rank(source, workload, scopes)
            } else {
                0
            };
            if lb.mode == LoadBalancingMode::Strict && rank < scopes.len() {
                return None;
            }
            Some((port, rank))
        };

        let mut best: Option<(usize, u64)> = None;
        for workload in self.endpoints(service.key()) {
            let Some((_, rank)) = candidate(workload) else {
                continue;
            };
            let weight = u64::from(workload.capacity);
            best = match best {
                Some((b, total)) if rank == b => Some((b, total + weight)),
                Some((b, total)) if rank < b => Some((b, total)),
                _ => Some((rank, weight)),
            };
        }
        let (best_rank, total) = best?;
        if total == 0 {
            return None;
        }
        let mut r = draw(rng, total);
        for workload in self.endpoints(service.key()) {
            let Some((port, rank)) = candidate(workload) else {
                continue;
            };
            if rank != best_rank {
                continue;
            }
            let weight = u64::from(workload.capacity);
            if r < weight {
                return Some((workload, port));
            }
            r -= weight;
        }
        None
    }
}
