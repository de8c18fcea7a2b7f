//! Incremental translation: when only pods changed since the last snapshot, re-translate just
//! those pods and report which address resources changed, so the translation loop encodes and
//! publishes only them.
//!
//! A pod's workload depends on the pod and on everything else in the snapshot (namespaces,
//! nodes, services, EndpointSlices, waypoints, policies), but nothing else depends on pods:
//! services, authorizations and the waypoint (L7) resources are translated without them. So
//! when every non-pod object is the same (`Arc::ptr_eq`: the index shares unchanged objects
//! between snapshots), the previous output with the changed pods re-translated is exactly what
//! a full translation gives. Anything else — or a changed pod whose PeerAuthentication-derived
//! Authorizations differ — falls back to the full translation. `tests::incremental_*` check the
//! equality over random change sequences.

use std::collections::BTreeMap;
use std::sync::Arc;

use weft_k8s::Snapshot;

use super::{Output, Parts, Settings, translate_parts, workload};

/// What changed since the previous [`Translator::translate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A full translation: any resource of any type may have changed.
    Full,
    /// Only pods changed: these Address resources (workload `uid`s) were re-translated
    /// (possibly to the same content) or removed; every other resource is as before.
    Addresses {
        /// Names present in the output whose content may have changed.
        upserted: Vec<String>,
        /// Names no longer in the output.
        removed: Vec<String>,
    },
}

/// Translates successive snapshots, re-translating only changed pods when nothing else changed.
///
/// Holds the previous snapshot and output (the output is what [`super::translate`] returns for
/// the current snapshot, always).
pub struct Translator {
    settings: Settings,
    state: Option<State>,
}

struct State {
    snapshot: Snapshot,
    out: Output,
    parts: Parts,
}

impl std::fmt::Debug for Translator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translator")
            .field("settings", &self.settings)
            .field(
                "revision",
                &self.state.as_ref().map(|s| s.snapshot.revision),
            )
            .finish_non_exhaustive()
    }
}

impl Translator {
    /// A translator with no previous snapshot (the first call translates fully).
    pub fn new(settings: Settings) -> Self {
        Translator {
            settings,
            state: None,
        }
    }

    /// The settings translations use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Translates `snapshot`: equal to [`super::translate`] of it, with what changed since the
    /// previous call.
    pub fn translate(&mut self, snapshot: Snapshot) -> (&Output, Change) {
        let change = match self.state.take() {
            Some(mut state) if same_except_pods(&state.snapshot, &snapshot) => {
                match pods_only(&mut state, &snapshot, &self.settings) {
                    Some(change) => {
                        state.snapshot = snapshot;
                        self.state = Some(state);
                        change
                    }
                    None => self.full(snapshot),
                }
            }
            _ => self.full(snapshot),
        };
        let out = &self.state.as_ref().expect("a state was just stored").out;
        (out, change)
    }

    fn full(&mut self, snapshot: Snapshot) -> Change {
        let (out, parts) = translate_parts(&snapshot, &self.settings);
        self.state = Some(State {
            snapshot,
            out,
            parts,
        });
        Change::Full
    }
}

/// Re-translates the pods that differ between `state.snapshot` and `snapshot` into
/// `state.out`; `None` (state untouched) when the change needs a full translation.
fn pods_only(state: &mut State, snapshot: &Snapshot, settings: &Settings) -> Option<Change> {
    let changed = changed_pods(&state.snapshot.pods, &snapshot.pods);
    let ctx = &state.parts.ctx;
    let mut results = Vec::with_capacity(changed.len());
    for (namespace, name) in changed {
        let translate = |snap: &Snapshot| {
            snap.pods
                .get(&(namespace.clone(), name.clone()))
                .map(|pod| workload::translate_pod(snap, settings, ctx, &namespace, &name, pod))
        };
        let new = translate(snapshot);
        // Per-workload Authorizations (PeerAuthentication port-level policies) are published
        // once per key for the whole cluster: a pod changing its set needs a full translation.
        if !snapshot.peer_authentications.is_empty() {
            let extras = |r: &Option<workload::PodResult>| {
                r.as_ref().map(|r| r.extras.clone()).unwrap_or_default()
            };
            if extras(&translate(&state.snapshot)) != extras(&new) {
                return None;
            }
        }
        results.push((namespace, name, new));
    }

    let mut upserted = Vec::new();
    let mut removed = Vec::new();
    let mut problems_changed = false;
    for (namespace, name, result) in results {
        let uid = super::workload_uid(&settings.cluster_id, &namespace, &name);
        let key = (namespace, name);
        let (address, problems) = match result {
            Some(r) => (r.address, r.problems),
            None => (None, Vec::new()),
        };
        problems_changed |= state
            .parts
            .pod_problems
            .get(&key)
            .map_or(&[][..], Vec::as_slice)
            != problems.as_slice();
        if problems.is_empty() {
            state.parts.pod_problems.remove(&key);
        } else {
            state.parts.pod_problems.insert(key, problems);
        }
        match address {
            Some(address) => {
                state.out.addresses.insert(uid.clone(), address);
                upserted.push(uid);
            }
            None => {
                if state.out.addresses.remove(&uid).is_some() {
                    removed.push(uid);
                }
            }
        }
    }
    if problems_changed {
        state.out.problems = state.parts.problems();
    }
    Some(Change::Addresses { upserted, removed })
}

/// Pods added, replaced (a different object) or removed between `old` and `new`, by key.
fn changed_pods<V>(
    old: &BTreeMap<(String, String), Arc<V>>,
    new: &BTreeMap<(String, String), Arc<V>>,
) -> Vec<(String, String)> {
    let mut changed = Vec::new();
    let mut old_iter = old.iter().peekable();
    let mut new_iter = new.iter().peekable();
    loop {
        match (old_iter.peek(), new_iter.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                changed.push((*k).clone());
                old_iter.next();
            }
            (None, Some((k, _))) => {
                changed.push((*k).clone());
                new_iter.next();
            }
            (Some((ko, vo)), Some((kn, vn))) => match ko.cmp(kn) {
                std::cmp::Ordering::Less => {
                    changed.push((*ko).clone());
                    old_iter.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.push((*kn).clone());
                    new_iter.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(vo, vn) {
                        changed.push((*kn).clone());
                    }
                    old_iter.next();
                    new_iter.next();
                }
            },
        }
    }
    changed
}

/// Whether two maps hold the same keys with the same (shared) objects.
fn same<K: Eq, V>(a: &BTreeMap<K, Arc<V>>, b: &BTreeMap<K, Arc<V>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
}

/// Whether everything but the pods is the same in both snapshots.
fn same_except_pods(a: &Snapshot, b: &Snapshot) -> bool {
    // Destructured so that a new kind in the snapshot does not compile until it is compared.
    let Snapshot {
        revision: _,
        namespaces,
        nodes,
        pods: _,
        services,
        endpoint_slices,
        gateways,
        gateway_classes,
        http_routes,
        grpc_routes,
        authorization_policies,
        peer_authentications,
    } = a;
    same(namespaces, &b.namespaces)
        && same(nodes, &b.nodes)
        && same(services, &b.services)
        && same(endpoint_slices, &b.endpoint_slices)
        && same(gateways, &b.gateways)
        && same(gateway_classes, &b.gateway_classes)
        && same(http_routes, &b.http_routes)
        && same(grpc_routes, &b.grpc_routes)
        && same(authorization_policies, &b.authorization_policies)
        && same(peer_authentications, &b.peer_authentications)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};
    use weft_k8s::{Index, Kind, Resource, ResourceKey};

    use super::*;
    use crate::translate::translate;
    use crate::xds::Cache;
    use weft_proto::type_url::{
        ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_POLICY_TYPE_URL, L7_SERVICE_TYPE_URL,
    };

    /// A small deterministic generator (xorshift64*), so failures replay.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn object<T: serde::de::DeserializeOwned>(value: Value) -> Arc<T> {
        Arc::new(serde_json::from_value(value).expect("test object parses"))
    }

    const NAMESPACES: [&str; 2] = ["a", "b"];
    const APPS: [&str; 3] = ["web", "db", "cache"];

    fn pod(rng: &mut Rng, namespace: &str, name: &str) -> Resource {
        let app = APPS[rng.below(APPS.len())];
        let ip = match rng.below(12) {
            0 => "not-an-ip".to_owned(),
            1 => String::new(),
            n => format!("10.244.{}.{}", n, rng.below(250) + 2),
        };
        let ready = if rng.below(3) == 0 { "False" } else { "True" };
        let phase = if rng.below(10) == 0 {
            "Succeeded"
        } else {
            "Running"
        };
        let mut annotations = json!({});
        if rng.below(2) == 0 {
            annotations = json!({ (super::super::REDIRECTION_ANNOTATION): "enabled" });
        }
        Resource::Pod(object(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name, "namespace": namespace,
                "labels": { "app": app, "tier": if rng.below(2) == 0 { "front" } else { "back" } },
                "annotations": annotations,
            },
            "spec": {
                "nodeName": format!("node-{}", rng.below(2)),
                "serviceAccountName": app,
                "containers": [{ "name": "c", "image": "x",
                    "ports": [{ "name": "http", "containerPort": 8000 + rng.below(3) }] }],
            },
            "status": {
                "phase": phase,
                "podIP": ip,
                "conditions": [{ "type": "Ready", "status": ready }],
            },
        })))
    }

    fn service(namespace: &str, app: &str, port: u16) -> Resource {
        Resource::Service(object(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": app, "namespace": namespace },
            "spec": {
                "clusterIP": format!("10.96.{}.{}", port % 200, namespace.len() + app.len()),
                "selector": { "app": app },
                "ports": [
                    { "name": "http", "port": port, "targetPort": "http" },
                    { "name": "tcp", "port": 9000, "targetPort": 9000 },
                ],
            },
        })))
    }

    fn base() -> Vec<Resource> {
        let mut objects = Vec::new();
        for ns in NAMESPACES {
            objects.push(Resource::Namespace(object(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": ns, "labels": { "istio.io/dataplane-mode": "ambient" } },
            }))));
            for app in &APPS[..2] {
                objects.push(service(ns, app, 80));
            }
        }
        for n in 0..2 {
            objects.push(Resource::Node(object(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": { "name": format!("node-{n}"),
                    "labels": { "topology.kubernetes.io/zone": format!("z{n}") } },
            }))));
        }
        objects.push(Resource::AuthorizationPolicy(object(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": { "name": "web-only", "namespace": "a" },
            "spec": { "selector": { "matchLabels": { "app": "web" } },
                "rules": [{ "from": [{ "source": { "namespaces": ["b"] } }] }] },
        }))));
        objects
    }

    /// A PeerAuthentication with port-level exceptions for `tier: front` pods of `a`, so
    /// workloads reference per-workload Authorizations.
    fn peer_authentication() -> Resource {
        Resource::PeerAuthentication(object(json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": { "name": "front", "namespace": "a" },
            "spec": { "selector": { "matchLabels": { "tier": "front" } },
                "mtls": { "mode": "STRICT" },
                "portLevelMtls": { "8000": { "mode": "PERMISSIVE" } } },
        })))
    }

    fn assert_same(incremental: &Output, full: &Output, step: usize) {
        assert_eq!(
            incremental.addresses, full.addresses,
            "step {step}: addresses"
        );
        assert_eq!(
            incremental.authorizations, full.authorizations,
            "step {step}: authorizations"
        );
        assert_eq!(incremental.l7_services, full.l7_services, "step {step}");
        assert_eq!(incremental.l7_policies, full.l7_policies, "step {step}");
        assert_eq!(
            incremental.route_statuses, full.route_statuses,
            "step {step}"
        );
        assert_eq!(incremental.problems, full.problems, "step {step}: problems");
    }

    /// What a client would be served: every type's (name, version, aliases), and every alias.
    fn served(cache: &Cache) -> Vec<(String, String, String, Vec<String>)> {
        let mut all = Vec::new();
        for type_url in [
            ADDRESS_TYPE_URL,
            AUTHORIZATION_TYPE_URL,
            L7_SERVICE_TYPE_URL,
            L7_POLICY_TYPE_URL,
        ] {
            for r in cache.list(type_url) {
                let resolved: Vec<String> = r
                    .aliases
                    .iter()
                    .map(|a| {
                        cache
                            .get(type_url, a)
                            .map_or(String::new(), |e| e.name.to_string())
                    })
                    .collect();
                all.push((
                    type_url.to_owned(),
                    r.name.to_string(),
                    r.version.to_string(),
                    resolved,
                ));
            }
        }
        all
    }

    fn run(seed: u64, steps: usize, with_peer_authentication: bool) -> (usize, usize) {
        let mut rng = Rng(seed);
        let index = Index::new();
        let mut objects = base();
        if with_peer_authentication {
            objects.push(peer_authentication());
        }
        for i in 0..12 {
            let ns = NAMESPACES[i % 2];
            objects.push(pod(&mut rng, ns, &format!("p{i}")));
        }
        index.batch(objects, &[]);
        let mut translator = Translator::new(Settings::default());
        let incremental_cache = Cache::new();
        let full_cache = Cache::new();
        let (mut fast, mut slow) = (0, 0);
        for step in 0..steps {
            // Mostly pod changes (the fast path), sometimes several at once, sometimes a
            // service (the full path).
            let changes = 1 + rng.below(3);
            for _ in 0..changes {
                let ns = NAMESPACES[rng.below(2)];
                let name = format!("p{}", rng.below(16));
                match rng.below(10) {
                    0..=5 => index.apply(pod(&mut rng, ns, &name)),
                    6 | 7 => index.delete(&ResourceKey {
                        kind: Kind::Pod,
                        namespace: ns.to_owned(),
                        name,
                    }),
                    8 => {
                        // An identical copy: a new object, same content.
                        let copy = index.read(|s| s.pods.get(&(ns.to_owned(), name)).cloned());
                        if let Some(p) = copy {
                            index.apply(Resource::Pod(Arc::new((*p).clone())));
                        }
                    }
                    _ => {
                        if rng.below(4) == 0 {
                            let port = 80 + rng.below(3) as u16;
                            index.apply(service(ns, APPS[rng.below(3)], port));
                        }
                    }
                }
            }
            let snapshot = index.snapshot();
            let full = translate(&snapshot, &Settings::default());
            let (out, change) = translator.translate(snapshot);
            assert_same(out, &full, step);
            if change == Change::Full {
                slow += 1;
            } else {
                fast += 1;
            }
            crate::app::publish_change(&incremental_cache, out, &change);
            crate::app::publish(&full_cache, &full);
            assert_eq!(
                served(&incremental_cache),
                served(&full_cache),
                "step {step}: cache contents"
            );
        }
        (fast, slow)
    }

    #[test]
    fn incremental_equals_full_over_random_changes() {
        for seed in 1..=20 {
            let (fast, slow) = run(seed * 7919, 60, false);
            assert!(fast > slow, "seed {seed}: {fast} incremental, {slow} full");
        }
    }

    #[test]
    fn incremental_equals_full_with_peer_authentication() {
        for seed in 1..=20 {
            let (fast, _) = run(seed * 104_729, 60, true);
            assert!(fast > 0, "seed {seed}: the fast path was never taken");
        }
    }

    #[test]
    fn pods_only_reports_just_the_changed_workload() {
        let mut rng = Rng(42);
        let index = Index::new();
        let mut objects = base();
        objects.push(pod(&mut rng, "a", "p1"));
        objects.push(pod(&mut rng, "a", "p2"));
        index.batch(objects, &[]);
        let mut translator = Translator::new(Settings::default());
        assert_eq!(translator.translate(index.snapshot()).1, Change::Full);
        assert_eq!(
            translator.translate(index.snapshot()).1,
            Change::Addresses {
                upserted: vec![],
                removed: vec![]
            },
            "nothing changed"
        );
        index.delete(&ResourceKey {
            kind: Kind::Pod,
            namespace: "a".into(),
            name: "p2".into(),
        });
        let had_p2 = translator
            .translate(index.snapshot())
            .0
            .addresses
            .contains_key("Kubernetes//Pod/a/p2");
        assert!(!had_p2);
        index.apply(service("a", "web", 81));
        assert_eq!(translator.translate(index.snapshot()).1, Change::Full);
    }
}
