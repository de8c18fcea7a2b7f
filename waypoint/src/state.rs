//! The waypoint's view of the mesh: workloads and services (`istio.workload.Address`), its
//! compiled services (`weft.l7.v1.ServiceConfig`) and L7 policies (`weft.l7.v1.Policy`), fed by
//! the delta xDS handlers here; and which CONNECT targets are bound to this waypoint.
//!
//! Writes happen per xDS response under one write lock; readers take a read lock for a
//! synchronous decision only (never across an await).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use prost::Message;
use weft_core::address;
use weft_core::state::{self, GatewayAddress, GatewayDestination, Service, Workload};
use weft_core::xds::{Handler, Rejection, Update};
use weft_proto::type_url::{L7_POLICY_TYPE_URL, L7_SERVICE_TYPE_URL};
use weft_proto::weft::l7::v1 as pb;

use crate::engine::{PolicySet, ServiceRoutes};

/// Who this waypoint is, for binding checks.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The waypoint's namespace.
    pub namespace: String,
    /// The waypoint service's hostname (`<name>.<ns>.svc.<suffix>`).
    pub hostname: String,
    /// The waypoint pod's own IPs.
    pub own_ips: Vec<IpAddr>,
}

impl Binding {
    /// Whether `gw` names this waypoint: by hostname, by the pod's IP or by a VIP of the
    /// waypoint's own service.
    pub fn names(&self, gw: &GatewayAddress, store: &state::Store) -> bool {
        match &gw.destination {
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => {
                hostname == &self.hostname && (namespace.is_empty() || namespace == &self.namespace)
            }
            GatewayDestination::Address { ip, .. } => {
                self.own_ips.contains(ip)
                    || store
                        .service_by_name(&self.namespace, &self.hostname)
                        .is_some_and(|s| s.vips.iter().any(|v| v.address == *ip))
            }
        }
    }
}

/// A compiled bound service with the resource it came from (for `/config_dump`).
#[derive(Debug)]
pub struct ServiceEntry {
    /// The resource.
    pub config: pb::ServiceConfig,
    /// The compiled routes.
    pub routes: Arc<ServiceRoutes>,
}

/// Everything the waypoint knows.
#[derive(Debug, Default)]
pub struct Inner {
    /// Workloads and services.
    pub workloads: state::Store,
    /// Compiled services by resource name.
    pub services: BTreeMap<String, ServiceEntry>,
    /// Resource name by service hostname.
    pub service_names: BTreeMap<String, String>,
    /// L7 authorization.
    pub policies: PolicySet,
    /// The same policies as opaque TCP sees them ([`for_tcp`]).
    pub tcp_policies: PolicySet,
    /// The policy resources in force, by name.
    pub policy_configs: BTreeMap<String, pb::Policy>,
}

impl Inner {
    /// The compiled routes of the service `hostname`, once its `ServiceConfig` arrived.
    pub fn routes(&self, hostname: &str) -> Option<&Arc<ServiceRoutes>> {
        let name = self.service_names.get(hostname)?;
        Some(&self.services.get(name)?.routes)
    }
}

/// What a CONNECT is for, once it is known to be bound to this waypoint.
#[derive(Debug, Clone)]
pub enum Target {
    /// `VIP:port` of a bound service.
    Service {
        /// The service.
        service: Arc<Service>,
        /// The service port.
        port: u16,
    },
    /// `podIP:port` of a bound workload.
    Workload {
        /// The workload.
        workload: Arc<Workload>,
        /// The target port.
        port: u16,
    },
}

impl Target {
    /// The service hostname, for service-addressed traffic.
    pub fn service_hostname(&self) -> Option<&str> {
        match self {
            Target::Service { service, .. } => Some(&service.hostname),
            Target::Workload { .. } => None,
        }
    }

    /// The destination port.
    pub fn port(&self) -> u16 {
        match self {
            Target::Service { port, .. } | Target::Workload { port, .. } => *port,
        }
    }
}

/// Why a CONNECT target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unbound {
    /// No service VIP or workload IP is known at this address.
    #[error("no service or workload at {0}")]
    Unknown(SocketAddr),
    /// The service exists but is bound to another waypoint (or none).
    #[error("service {0} is not bound to this waypoint")]
    ServiceNotBound(String),
    /// The service does not declare this port.
    #[error("service {service} has no port {port}")]
    NoSuchPort {
        /// The service hostname.
        service: String,
        /// The port.
        port: u16,
    },
    /// The workload exists but is bound to another waypoint (or none).
    #[error("workload {0} is not bound to this waypoint")]
    WorkloadNotBound(String),
    /// Host-name authorities are not served.
    #[error("authority {0} is not an ip:port")]
    NotAnAddress(String),
}

/// Resolves `addr` (a CONNECT authority) to a bound target; `client_namespace` decides service
/// visibility. Pure: table-tested.
///
/// # Errors
/// [`Unbound`] saying why the target is not served here.
pub fn resolve(
    store: &state::Store,
    binding: &Binding,
    addr: SocketAddr,
    client_namespace: &str,
) -> Result<Target, Unbound> {
    if let Some(service) = store.service_by_vip("", addr.ip(), client_namespace) {
        if !service
            .waypoint
            .as_ref()
            .is_some_and(|gw| binding.names(gw, store))
        {
            return Err(Unbound::ServiceNotBound(service.hostname.clone()));
        }
        if service.port(addr.port()).is_none() {
            return Err(Unbound::NoSuchPort {
                service: service.hostname.clone(),
                port: addr.port(),
            });
        }
        return Ok(Target::Service {
            service: service.clone(),
            port: addr.port(),
        });
    }
    if let Some(workload) = store.workload_by_ip("", addr.ip()) {
        if !workload
            .waypoint
            .as_ref()
            .is_some_and(|gw| binding.names(gw, store))
        {
            return Err(Unbound::WorkloadNotBound(format!(
                "{}/{}",
                workload.namespace, workload.name
            )));
        }
        return Ok(Target::Workload {
            workload: workload.clone(),
            port: addr.port(),
        });
    }
    Err(Unbound::Unknown(addr))
}

/// The shared, lockable state.
#[derive(Debug, Default)]
pub struct WaypointState {
    inner: RwLock<Inner>,
}

impl WaypointState {
    /// Empty state.
    pub fn new() -> Arc<WaypointState> {
        Arc::new(WaypointState::default())
    }

    /// Reads the state (hold only for a synchronous decision).
    pub fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The xDS handlers feeding this state: Address, ServiceConfig, Policy (in that order).
    pub fn handlers(self: &Arc<Self>) -> Vec<Arc<dyn Handler>> {
        vec![
            Arc::new(AddressHandler::new(self.clone())),
            Arc::new(ServiceConfigHandler(self.clone())),
            Arc::new(PolicyHandler(self.clone())),
        ]
    }
}

impl address::Sink for WaypointState {
    fn write_store(&self, apply: impl FnOnce(&mut state::Store)) {
        apply(&mut self.write().workloads);
    }
}

/// Applies `istio.workload.Address` resources (the shared [`address::Handler`]); a bad one is
/// rejected on its own.
pub type AddressHandler = address::Handler<WaypointState>;

/// Applies `weft.l7.v1.ServiceConfig` resources: each is compiled by the engine; one that does
/// not compile is rejected and its previous version stays.
#[derive(Debug)]
pub struct ServiceConfigHandler(Arc<WaypointState>);

impl Handler for ServiceConfigHandler {
    fn type_url(&self) -> &'static str {
        L7_SERVICE_TYPE_URL
    }

    fn apply(&self, updates: Vec<Update>) -> Vec<Rejection> {
        let mut rejections = Vec::new();
        let mut compiled = Vec::new();
        for update in updates {
            match update {
                Update::Upsert { name, body, .. } => {
                    let entry = pb::ServiceConfig::decode(body.value.as_slice())
                        .map_err(|e| Rejection::new(&name, format!("decoding ServiceConfig: {e}")))
                        .and_then(|config| {
                            let routes = ServiceRoutes::compile(&config)
                                .map_err(|e| Rejection::new(&name, e))?;
                            Ok(ServiceEntry {
                                config,
                                routes: Arc::new(routes),
                            })
                        });
                    match entry {
                        Ok(entry) => compiled.push(Ok((name, entry))),
                        Err(rejection) => rejections.push(rejection),
                    }
                }
                Update::Remove { name } => compiled.push(Err(name)),
            }
        }
        let mut inner = self.0.write();
        for item in compiled {
            match item {
                Ok((name, entry)) => {
                    if let Some(old) = inner.services.get(&name) {
                        let old_host = old.config.hostname.clone();
                        inner.service_names.remove(&old_host);
                    }
                    inner
                        .service_names
                        .insert(entry.config.hostname.clone(), name.clone());
                    inner.services.insert(name, entry);
                }
                Err(name) => {
                    if let Some(old) = inner.services.remove(&name) {
                        inner.service_names.remove(&old.config.hostname);
                    }
                }
            }
        }
        rejections
    }
}

/// Applies `weft.l7.v1.Policy` resources into the engine's [`PolicySet`].
#[derive(Debug)]
pub struct PolicyHandler(Arc<WaypointState>);

impl Handler for PolicyHandler {
    fn type_url(&self) -> &'static str {
        L7_POLICY_TYPE_URL
    }

    fn apply(&self, updates: Vec<Update>) -> Vec<Rejection> {
        let mut rejections = Vec::new();
        let mut inner = self.0.write();
        for update in updates {
            match update {
                Update::Upsert { name, body, .. } => {
                    let policy = match pb::Policy::decode(body.value.as_slice()) {
                        Ok(policy) => policy,
                        Err(e) => {
                            rejections.push(Rejection::new(&name, format!("decoding Policy: {e}")));
                            continue;
                        }
                    };
                    let tcp = for_tcp(&policy);
                    match inner.policies.insert(&name, &policy) {
                        Ok(()) => {
                            if let Err(e) = inner.tcp_policies.insert(&name, &tcp) {
                                // Cannot happen (a subset of a valid policy); deny TCP then.
                                tracing::warn!(policy = %name, error = %e, "tcp view of policy");
                            }
                            inner.policy_configs.insert(name, policy);
                        }
                        Err(e) => rejections.push(Rejection::new(&name, e)),
                    }
                }
                Update::Remove { name } => {
                    if inner.policy_configs.remove(&name).is_some() {
                        inner.policies.remove(&name);
                        inner.tcp_policies.remove(&name);
                    }
                }
            }
        }
        rejections
    }
}

/// Whether a condition key reads HTTP attributes.
fn is_http_key(key: &str) -> bool {
    key.starts_with("request.")
}

/// A policy as opaque TCP traffic sees it, following Istio's TCP translation: HTTP-only fields
/// (operation hosts, methods, paths; `request.*` conditions) cannot be checked, so an ALLOW
/// rule using them never matches (dropped), and a DENY rule drops them and so matches more
/// (fail closed). Pure.
pub fn for_tcp(policy: &pb::Policy) -> pb::Policy {
    let http_operation = |o: &pb::Operation| {
        !(o.hosts.is_empty()
            && o.not_hosts.is_empty()
            && o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty())
    };
    let uses_http = |r: &pb::Rule| {
        r.to.iter().any(http_operation) || r.when.iter().any(|c| is_http_key(&c.key))
    };
    let mut tcp = policy.clone();
    if policy.action() == pb::Action::Allow {
        tcp.rules.retain(|r| !uses_http(r));
    } else {
        for rule in &mut tcp.rules {
            for op in &mut rule.to {
                op.hosts.clear();
                op.not_hosts.clear();
                op.methods.clear();
                op.not_methods.clear();
                op.paths.clear();
                op.not_paths.clear();
            }
            rule.when.retain(|c| !is_http_key(&c.key));
        }
    }
    tcp
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use weft_proto::istio::workload::Address;
    use weft_proto::istio::workload::{
        self as wpb, GatewayAddress as PbGateway, NamespacedHostname, NetworkAddress, address,
        gateway_address,
    };
    use weft_proto::type_url::ADDRESS_TYPE_URL;

    fn any(name: &str, value: Vec<u8>) -> Update {
        Update::Upsert {
            name: name.into(),
            version: "1".into(),
            body: prost_types::Any {
                type_url: ADDRESS_TYPE_URL.into(),
                value,
            },
        }
    }

    fn waypoint(host: &str) -> Option<PbGateway> {
        Some(PbGateway {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "app".into(),
                hostname: host.into(),
            })),
            hbone_mtls_port: 15008,
        })
    }

    fn service(name: &str, vip: [u8; 4], wp: &str) -> Update {
        let s = wpb::Service {
            name: name.into(),
            namespace: "app".into(),
            hostname: format!("{name}.app.svc.cluster.local"),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vip.to_vec(),
                length: None,
            }],
            ports: vec![wpb::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
            waypoint: waypoint(wp),
            ..Default::default()
        };
        any(
            &format!("app/{name}.app.svc.cluster.local"),
            Address {
                r#type: Some(address::Type::Service(s)),
            }
            .encode_to_vec(),
        )
    }

    fn workload(uid: &str, ip: [u8; 4], wp: &str) -> Update {
        let w = wpb::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "app".into(),
            addresses: vec![ip.to_vec()],
            waypoint: waypoint(wp),
            ..Default::default()
        };
        any(
            uid,
            Address {
                r#type: Some(address::Type::Workload(w)),
            }
            .encode_to_vec(),
        )
    }

    #[test]
    fn only_bound_targets_resolve() {
        let state = WaypointState::new();
        let handlers = state.handlers();
        let rejected = handlers[0].apply(vec![
            service("echo", [10, 96, 0, 1], "wp.app.svc.cluster.local"),
            service("other", [10, 96, 0, 2], "elsewhere.app.svc.cluster.local"),
            workload("p1", [10, 1, 0, 1], "wp.app.svc.cluster.local"),
            workload("p2", [10, 1, 0, 2], ""),
        ]);
        assert!(rejected.is_empty(), "{rejected:?}");
        let binding = Binding {
            namespace: "app".into(),
            hostname: "wp.app.svc.cluster.local".into(),
            own_ips: vec!["10.1.9.9".parse().unwrap()],
        };
        let inner = state.read();
        let r = |a: &str| resolve(&inner.workloads, &binding, a.parse().unwrap(), "app");
        assert!(matches!(
            r("10.96.0.1:80"),
            Ok(Target::Service { port: 80, .. })
        ));
        assert_eq!(
            r("10.96.0.1:81").unwrap_err(),
            Unbound::NoSuchPort {
                service: "echo.app.svc.cluster.local".into(),
                port: 81
            }
        );
        assert_eq!(
            r("10.96.0.2:80").unwrap_err(),
            Unbound::ServiceNotBound("other.app.svc.cluster.local".into())
        );
        assert!(matches!(
            r("10.1.0.1:8080"),
            Ok(Target::Workload { port: 8080, .. })
        ));
        assert_eq!(
            r("10.1.0.2:8080").unwrap_err(),
            Unbound::WorkloadNotBound("app/p2".into())
        );
        assert_eq!(
            r("10.7.7.7:80").unwrap_err(),
            Unbound::Unknown("10.7.7.7:80".parse().unwrap())
        );
    }

    #[test]
    fn tcp_sees_http_only_rules_fail_closed() {
        let op = |paths: &[&str], ports: &[u32]| pb::Operation {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            ports: ports.to_vec(),
            ..Default::default()
        };
        let rule = |to: Vec<pb::Operation>| pb::Rule {
            from: vec![],
            to,
            when: vec![pb::Condition {
                key: "request.headers[x]".into(),
                values: vec!["1".into()],
                not_values: vec![],
            }],
        };
        let allow = pb::Policy {
            action: pb::Action::Allow as i32,
            rules: vec![rule(vec![op(&["/a"], &[])]), pb::Rule::default()],
            ..Default::default()
        };
        let tcp = for_tcp(&allow);
        assert_eq!(
            tcp.rules,
            vec![pb::Rule::default()],
            "HTTP ALLOW rules never match"
        );
        let deny = pb::Policy {
            action: pb::Action::Deny as i32,
            rules: vec![rule(vec![op(&["/admin"], &[8080])])],
            ..Default::default()
        };
        let tcp = for_tcp(&deny);
        assert_eq!(tcp.rules.len(), 1);
        assert_eq!(
            tcp.rules[0].to,
            vec![op(&[], &[8080])],
            "DENY keeps the rest"
        );
        assert!(tcp.rules[0].when.is_empty());
    }

    #[test]
    fn a_gateway_address_naming_the_pod_binds() {
        let binding = Binding {
            namespace: "app".into(),
            hostname: "wp.app.svc.cluster.local".into(),
            own_ips: vec!["10.1.9.9".parse().unwrap()],
        };
        let store = state::Store::new();
        let by_ip = GatewayAddress {
            destination: GatewayDestination::Address {
                network: String::new(),
                ip: "10.1.9.9".parse().unwrap(),
            },
            hbone_port: 15008,
        };
        assert!(binding.names(&by_ip, &store));
        let other = GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "other".into(),
                hostname: "wp.app.svc.cluster.local".into(),
            },
            hbone_port: 15008,
        };
        assert!(!binding.names(&other, &store));
    }
}
