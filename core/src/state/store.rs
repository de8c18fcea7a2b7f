//! The indexed workload/service state (reference §2.6).

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use super::cidr::Cidr;
use super::resource::Resource;
use super::service::Service;
use super::workload::{Workload, split_service_key};

/// A workload keyed by its uid: sets of these are maps by uid that do not keep a second copy of
/// every uid (at 100,000 workloads, two copies cost ~15 MB).
#[derive(Debug, Clone)]
struct ByUid(Arc<Workload>);

impl Borrow<str> for ByUid {
    fn borrow(&self) -> &str {
        &self.0.uid
    }
}

impl PartialEq for ByUid {
    fn eq(&self, other: &Self) -> bool {
        self.0.uid == other.0.uid
    }
}

impl Eq for ByUid {}

impl Hash for ByUid {
    // Must hash like the `str` it borrows as.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.uid.as_str().hash(state);
    }
}

impl PartialOrd for ByUid {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByUid {
    // Must order like the `str` it borrows as.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.uid.as_str().cmp(other.0.uid.as_str())
    }
}

/// Workloads and services from WDS with the indices lookups and routing need.
///
/// Plain data: no locks, no I/O. Entries are shared as `Arc`s so decisions can hand them out
/// without cloning. Indices (reference §2.6):
/// * workloads by uid, and by `(network, ip)` for each IP unless the workload is host-network;
/// * services by `namespace/hostname` and by `(network, vip)`; CIDR VIPs (prefix shorter than
///   the family's width) are matched by longest prefix when no exact VIP matches;
/// * endpoints: for each `namespace/hostname`, the workloads naming it in their `services` map,
///   kept whether or not the service has arrived yet (staged), ordered by uid.
///
/// When two workloads claim the same `(network, ip)` the later upsert wins the index entry.
#[derive(Debug, Default)]
pub struct Store {
    /// Workloads by uid.
    workloads: HashSet<ByUid>,
    workloads_by_ip: HashMap<String, HashMap<IpAddr, Arc<Workload>>>,
    /// hostname → services with that hostname (one per namespace), first seen first.
    services_by_hostname: HashMap<String, Vec<Arc<Service>>>,
    /// network → exact VIP → services sharing it, first seen first.
    services_by_vip: HashMap<String, HashMap<IpAddr, Vec<Arc<Service>>>>,
    /// network → CIDR VIPs, first seen first.
    services_by_cidr: HashMap<String, Vec<(Cidr, Arc<Service>)>>,
    /// service key → endpoint workloads by uid.
    endpoints: HashMap<String, BTreeSet<ByUid>>,
}

/// What [`Store::remove`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// A workload, by uid.
    Workload(Arc<Workload>),
    /// A service, by `namespace/hostname`.
    Service(Arc<Service>),
}

/// Replaces the entry whose key equals `key` in place (keeping its first-seen position) or
/// appends `new`.
fn replace_or_push<T>(list: &mut Vec<T>, new: T, same: impl Fn(&T) -> bool) {
    match list.iter_mut().find(|e| same(e)) {
        Some(slot) => *slot = new,
        None => list.push(new),
    }
}

/// Ranks a visible candidate service for a client namespace: own namespace (2) over canonical
/// (1) over others (0) (reference §2.6).
fn preference(service: &Service, client_namespace: &str) -> u8 {
    if service.namespace == client_namespace {
        2
    } else if service.canonical {
        1
    } else {
        0
    }
}

/// The preferred service visible to `client_namespace` among `candidates` (first seen wins ties).
fn choose<'a>(
    candidates: impl IntoIterator<Item = &'a Arc<Service>>,
    client_namespace: &str,
) -> Option<&'a Arc<Service>> {
    let mut best: Option<(u8, &Arc<Service>)> = None;
    for service in candidates {
        if !service.visible_to(client_namespace) {
            continue;
        }
        let rank = preference(service, client_namespace);
        if rank == 2 {
            return Some(service);
        }
        if best.is_none_or(|(r, _)| rank > r) {
            best = Some((rank, service));
        }
    }
    best.map(|(_, s)| s)
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Store::default()
    }

    /// Inserts or replaces a converted `Address` resource. Returns whether the state changed.
    pub fn upsert(&mut self, resource: Resource) -> bool {
        match resource {
            Resource::Workload(w) => self.upsert_workload(w),
            Resource::Service(s) => self.upsert_service(s),
        }
    }

    /// Inserts or replaces the workload with `workload.uid`, re-indexing its IPs and endpoint
    /// memberships. Returns `false` when an identical workload was already stored.
    pub fn upsert_workload(&mut self, workload: Workload) -> bool {
        if let Some(old) = self.workloads.get(workload.uid.as_str()) {
            if *old.0 == workload {
                return false;
            }
            let old = Arc::clone(&old.0);
            self.unindex_workload(&old);
        }
        let workload = Arc::new(workload);
        if !workload.host_network {
            let by_ip = self
                .workloads_by_ip
                .entry(workload.network.clone())
                .or_default();
            for ip in &workload.ips {
                by_ip.insert(*ip, Arc::clone(&workload));
            }
        }
        for key in workload.services.keys() {
            self.endpoints
                .entry(key.clone())
                .or_default()
                .replace(ByUid(Arc::clone(&workload)));
        }
        self.workloads.replace(ByUid(workload));
        true
    }

    /// Removes the workload with `uid` and its index entries; `None` if unknown.
    pub fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let ByUid(old) = self.workloads.take(uid)?;
        self.unindex_workload(&old);
        Some(old)
    }

    fn unindex_workload(&mut self, old: &Workload) {
        if let Some(by_ip) = self.workloads_by_ip.get_mut(&old.network) {
            for ip in &old.ips {
                if by_ip.get(ip).is_some_and(|w| w.uid == old.uid) {
                    by_ip.remove(ip);
                }
            }
            if by_ip.is_empty() {
                self.workloads_by_ip.remove(&old.network);
            }
        }
        for key in old.services.keys() {
            if let Some(endpoints) = self.endpoints.get_mut(key) {
                endpoints.remove(old.uid.as_str());
                if endpoints.is_empty() {
                    self.endpoints.remove(key);
                }
            }
        }
    }

    /// Inserts or replaces the service with `service.key()`, re-indexing its VIPs; staged
    /// endpoints for the key become its endpoints. Returns `false` when an identical service was
    /// already stored.
    pub fn upsert_service(&mut self, service: Service) -> bool {
        let old = self.service(service.key()).cloned();
        if let Some(old) = &old {
            if **old == service {
                return false;
            }
            self.unindex_service_vips(old, Some(&service));
        }
        let service = Arc::new(service);
        let key = service.key().to_owned();
        replace_or_push(
            self.services_by_hostname
                .entry(service.hostname.clone())
                .or_default(),
            Arc::clone(&service),
            |s| s.key() == key,
        );
        for vip in &service.vips {
            match vip.cidr() {
                Some(cidr) => replace_or_push(
                    self.services_by_cidr
                        .entry(vip.network.clone())
                        .or_default(),
                    (cidr, Arc::clone(&service)),
                    |(c, s)| *c == cidr && s.key() == key,
                ),
                None => replace_or_push(
                    self.services_by_vip
                        .entry(vip.network.clone())
                        .or_default()
                        .entry(vip.address)
                        .or_default(),
                    Arc::clone(&service),
                    |s| s.key() == key,
                ),
            }
        }
        true
    }

    /// Removes the service with key `namespace/hostname` and its VIP entries; its endpoints stay
    /// staged (they belong to the workloads). `None` if unknown.
    pub fn remove_service(&mut self, key: &str) -> Option<Arc<Service>> {
        let old = self.service(key).cloned()?;
        self.unindex_service_vips(&old, None);
        if let Some(list) = self.services_by_hostname.get_mut(&old.hostname) {
            list.retain(|s| s.key() != key);
            if list.is_empty() {
                self.services_by_hostname.remove(&old.hostname);
            }
        }
        Some(old)
    }

    /// Drops `old`'s VIP index entries, except those `keep` (its replacement) still has.
    fn unindex_service_vips(&mut self, old: &Service, keep: Option<&Service>) {
        let key = old.key();
        for vip in &old.vips {
            if keep.is_some_and(|k| k.vips.contains(vip)) {
                continue;
            }
            match vip.cidr() {
                Some(cidr) => {
                    if let Some(list) = self.services_by_cidr.get_mut(&vip.network) {
                        list.retain(|(c, s)| !(*c == cidr && s.key() == key));
                        if list.is_empty() {
                            self.services_by_cidr.remove(&vip.network);
                        }
                    }
                }
                None => {
                    if let Some(by_ip) = self.services_by_vip.get_mut(&vip.network) {
                        if let Some(list) = by_ip.get_mut(&vip.address) {
                            list.retain(|s| s.key() != key);
                            if list.is_empty() {
                                by_ip.remove(&vip.address);
                            }
                        }
                        if by_ip.is_empty() {
                            self.services_by_vip.remove(&vip.network);
                        }
                    }
                }
            }
        }
    }

    /// Removes an xDS `removed_resources` name: tried as a workload uid first, then, if it has
    /// the `namespace/hostname` form, as a service (reference §2.5). `None` if neither matched.
    pub fn remove(&mut self, name: &str) -> Option<Removed> {
        if let Some(w) = self.remove_workload(name) {
            return Some(Removed::Workload(w));
        }
        split_service_key(name)?;
        self.remove_service(name).map(Removed::Service)
    }

    /// The workload with `uid`.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid).map(|w| &w.0)
    }

    /// The workload owning `ip` on `network` (host-network workloads are never found this way).
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(network)?.get(&ip)
    }

    /// All workloads, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter().map(|w| &w.0)
    }

    /// The service with key `namespace/hostname`, regardless of visibility.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        let (namespace, hostname) = split_service_key(key)?;
        self.service_by_name(namespace, hostname)
    }

    /// The service `hostname` in `namespace`, regardless of visibility.
    pub fn service_by_name(&self, namespace: &str, hostname: &str) -> Option<&Arc<Service>> {
        self.services_by_hostname
            .get(hostname)?
            .iter()
            .find(|s| s.namespace == namespace)
    }

    /// The service a client in `client_namespace` reaches at `hostname`: only services visible to
    /// it; its own namespace first, then a canonical one, then the first seen (reference §2.6).
    pub fn service_by_hostname(
        &self,
        hostname: &str,
        client_namespace: &str,
    ) -> Option<&Arc<Service>> {
        choose(self.services_by_hostname.get(hostname)?, client_namespace)
    }

    /// The service a client in `client_namespace` reaches at VIP `ip` on `network`: exact VIPs
    /// first, then the longest matching CIDR VIP; only services visible to the client; among
    /// equals its own namespace first, then a canonical one, then the first seen
    /// (reference §2.6).
    pub fn service_by_vip(
        &self,
        network: &str,
        ip: IpAddr,
        client_namespace: &str,
    ) -> Option<&Arc<Service>> {
        let exact = self
            .services_by_vip
            .get(network)
            .and_then(|by_ip| by_ip.get(&ip))
            .and_then(|list| choose(list, client_namespace));
        if exact.is_some() {
            return exact;
        }
        let mut best: Option<(u8, u8, &Arc<Service>)> = None;
        for (cidr, service) in self.services_by_cidr.get(network)? {
            if !cidr.contains(ip) || !service.visible_to(client_namespace) {
                continue;
            }
            let rank = (cidr.prefix_len(), preference(service, client_namespace));
            if best.is_none_or(|(len, pref, _)| rank > (len, pref)) {
                best = Some((rank.0, rank.1, service));
            }
        }
        best.map(|(_, _, s)| s)
    }

    /// All services, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services_by_hostname.values().flatten()
    }

    /// The endpoints of the service with key `namespace/hostname` (healthy or not), ordered by
    /// uid. Staged endpoints are returned even before the service itself arrives.
    pub fn endpoints(&self, service_key: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.endpoints
            .get(service_key)
            .into_iter()
            .flatten()
            .map(|w| &w.0)
    }
}
