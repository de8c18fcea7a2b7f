//! One stream's subscription to one type URL and the delta it is owed (pure: no I/O).
//!
//! Follows the incremental xDS protocol (envoy `xds_protocol` "Incremental xDS") as the node
//! proxy uses it (istio-ztunnel.md §2.3–§2.6):
//! * the first request of a type with an empty `resource_names_subscribe` is a wildcard
//!   subscription; `*` in a subscribe/unsubscribe list adds/removes the wildcard, applied
//!   subscribe first, so `["*"]` in both is "subscribe to nothing" (on-demand mode);
//! * other names are resource names or aliases (`network/ip`); a response carries the resource
//!   under its canonical name with the subscribed aliases in `aliases`, and a newly subscribed
//!   name that resolves to nothing is answered in `removed_resources`;
//! * `initial_resource_versions` seeds what the client holds, so nothing it has at the current
//!   version is resent and names that no longer exist are removed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use weft_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource};

use super::cache::{Cache, TypeState};

/// The wildcard resource name.
pub(crate) const WILDCARD: &str = "*";

/// What one stream subscribed to for one type, and what the client holds.
#[derive(Debug)]
pub(crate) struct Subscription {
    /// Subscribed to every resource of the type.
    pub(crate) wildcard: bool,
    /// Explicitly subscribed names or aliases.
    pub(crate) names: BTreeSet<String>,
    /// Canonical name → version the client holds: declared in `initial_resource_versions`, or
    /// sent. Recorded when sent, so a NACKed version is not resent until the resource changes.
    known: HashMap<Arc<str>, Arc<str>>,
    /// Subscribed keys that must be mentioned in the next response (newly subscribed).
    fresh: BTreeSet<String>,
    /// Subscribed keys last answered as removed because nothing matched them.
    missing: BTreeSet<String>,
    /// The cache generation the client's view was last brought up to; `None` = compare all.
    generation: Option<u64>,
    /// The first request of the type has not been answered yet.
    unanswered: bool,
    /// When set, only resources whose name starts with this prefix exist for this stream
    /// (waypoint-scoped types: `<namespace>/<service account>/`).
    scope: Option<String>,
}

/// A response owed to the client.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Delta {
    /// The cache generation the delta brings the client to.
    pub(crate) generation: u64,
    /// Added or changed resources, sorted by name.
    pub(crate) resources: Vec<Resource>,
    /// Removed names (resource names, or unresolvable subscribed keys).
    pub(crate) removed: Vec<String>,
}

impl Subscription {
    /// The subscription opened by the first request of a type.
    pub(crate) fn new(request: &DeltaDiscoveryRequest) -> Self {
        let mut sub = Subscription {
            wildcard: request.resource_names_subscribe.is_empty(),
            names: BTreeSet::new(),
            known: request
                .initial_resource_versions
                .iter()
                .map(|(name, version)| (Arc::from(name.as_str()), Arc::from(version.as_str())))
                .collect(),
            fresh: BTreeSet::new(),
            missing: BTreeSet::new(),
            generation: None,
            unanswered: true,
            scope: None,
        };
        sub.subscribe(&request.resource_names_subscribe);
        sub.unsubscribe(&request.resource_names_unsubscribe);
        if !sub.wildcard {
            // A reconnecting on-demand client does not repeat its subscriptions: what it holds
            // stays subscribed (as istiod's `deltaWatchedResources` does).
            sub.names
                .extend(request.initial_resource_versions.keys().cloned());
        }
        sub
    }

    /// Restricts the subscription to resources named `<prefix>…`: wildcard subscriptions see
    /// only those, and explicitly subscribed names outside the prefix are answered as removed.
    pub(crate) fn restrict_to(&mut self, prefix: String) {
        self.scope = Some(prefix);
    }

    fn in_scope(&self, name: &str) -> bool {
        self.scope.as_deref().is_none_or(|p| name.starts_with(p))
    }

    /// Applies a later request's subscribe and unsubscribe lists (in that order).
    ///
    /// Resources the client loses interest in are forgotten (the client drops them itself, so
    /// no removal is sent); `cache` resolves the unsubscribed names.
    pub(crate) fn update(
        &mut self,
        type_url: &str,
        subscribe: &[String],
        unsubscribe: &[String],
        cache: &Cache,
    ) {
        self.subscribe(subscribe);
        if unsubscribe.is_empty() {
            return;
        }
        self.unsubscribe(unsubscribe);
        let state = cache.read();
        let ts = state.get(type_url);
        let (wildcard, names) = (self.wildcard, &self.names);
        self.known.retain(|name, _| {
            ts.and_then(|ts| ts.resource(name))
                .is_some_and(|entry| wants(wildcard, names, &entry.name, &entry.aliases))
        });
    }

    /// Whether a response is owed regardless of cache changes.
    pub(crate) fn has_fresh(&self) -> bool {
        self.unanswered || !self.fresh.is_empty()
    }

    /// Whether the client's view is at `generation` with nothing owed.
    pub(crate) fn is_current(&self, generation: u64) -> bool {
        !self.has_fresh() && self.generation == Some(generation)
    }

    /// Number of resources the client holds, as far as the server knows.
    pub(crate) fn held(&self) -> usize {
        self.known.len()
    }

    fn subscribe(&mut self, names: &[String]) {
        for name in names {
            if name == WILDCARD {
                if !self.wildcard {
                    self.wildcard = true;
                    // Everything of the type is now wanted: compare all.
                    self.generation = None;
                }
            } else if self.names.insert(name.clone()) {
                self.fresh.insert(name.clone());
            }
        }
    }

    fn unsubscribe(&mut self, names: &[String]) {
        for name in names {
            if name == WILDCARD {
                self.wildcard = false;
            } else {
                self.names.remove(name);
                self.fresh.remove(name);
                self.missing.remove(name);
            }
        }
    }

    /// Computes the delta owed to the client for `type_url` and records it as sent.
    ///
    /// Returns `None` when nothing is owed, or when the type has not been published yet (the
    /// first response waits for the first [`Cache::set`] of the type, so a client is never told
    /// "empty" before the controller knows).
    pub(crate) fn poll(&mut self, type_url: &str, cache: &Cache) -> Option<Delta> {
        let state = cache.read();
        let generation = state.generation();
        let ts = state.get(type_url)?;
        if self.is_current(generation) {
            return None;
        }

        let changed = self.generation.and_then(|g| ts.changed_since(g));
        let mut candidates: BTreeSet<Arc<str>> = match changed {
            Some(changed) => changed,
            None => {
                let mut all: BTreeSet<Arc<str>> = self.known.keys().cloned().collect();
                if self.wildcard {
                    all.extend(ts.names().filter(|n| self.in_scope(n)).cloned());
                }
                for key in &self.names {
                    all.extend(ts.resolve(key));
                }
                all
            }
        };
        for key in &self.fresh {
            candidates.extend(ts.resolve(key));
        }
        // Out-of-scope names never reach the client (held ones, e.g. from
        // `initial_resource_versions`, are removed by `diff_one`).
        candidates.retain(|n| self.in_scope(n) || self.known.contains_key(n));

        let mut delta = Delta {
            generation,
            ..Delta::default()
        };
        for name in candidates {
            self.diff_one(ts, &name, &mut delta);
        }
        let fresh = std::mem::take(&mut self.fresh);
        for key in fresh {
            if !ts.resolve(&key).iter().any(|n| self.in_scope(n)) {
                if !delta.removed.contains(&key) {
                    delta.removed.push(key.clone());
                }
                self.missing.insert(key);
            }
        }

        self.generation = Some(generation);
        let owed = std::mem::take(&mut self.unanswered);
        if delta.resources.is_empty() && delta.removed.is_empty() && !owed {
            return None;
        }
        Some(delta)
    }

    fn diff_one(&mut self, ts: &TypeState, name: &Arc<str>, delta: &mut Delta) {
        let Some(entry) = ts.resource(name) else {
            if self.known.remove(name).is_some() {
                delta.removed.push(name.to_string());
            }
            return;
        };
        if !self.in_scope(&entry.name)
            || !wants(self.wildcard, &self.names, &entry.name, &entry.aliases)
        {
            if self.known.remove(name).is_some() {
                delta.removed.push(name.to_string());
            }
            return;
        }
        let hits: Vec<String> = entry
            .aliases
            .iter()
            .filter(|alias| self.names.contains(alias.as_str()))
            .cloned()
            .collect();
        // A newly subscribed key, or one last answered as missing, must be mentioned even if
        // the client already holds the resource (ztunnel waits for a response naming it).
        let mut force = false;
        for key in std::iter::once(&*entry.name).chain(hits.iter().map(String::as_str)) {
            force |= self.fresh.remove(key);
            force |= self.missing.remove(key);
        }
        if force || self.known.get(name) != Some(&entry.version) {
            self.known.insert(entry.name.clone(), entry.version.clone());
            delta.resources.push(Resource {
                version: entry.version.to_string(),
                resource: Some(entry.body.clone()),
                name: entry.name.to_string(),
                aliases: hits,
                ttl: None,
                cache_control: None,
            });
        }
    }
}

/// Whether a subscription (`wildcard`, explicit `names`) covers a resource.
fn wants(wildcard: bool, names: &BTreeSet<String>, name: &str, aliases: &[String]) -> bool {
    wildcard || names.contains(name) || aliases.iter().any(|a| names.contains(a.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::cache::Resource as CacheResource;

    const T: &str = "type.googleapis.com/test.Thing";

    fn res(name: &str, body: &str, aliases: &[&str]) -> CacheResource {
        CacheResource {
            name: name.to_owned(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            body: prost_types::Any {
                type_url: T.to_owned(),
                value: body.as_bytes().to_vec(),
            },
        }
    }

    fn request(subscribe: &[&str], unsubscribe: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: T.to_owned(),
            resource_names_subscribe: subscribe.iter().map(|s| (*s).to_owned()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn sent(delta: &Delta) -> Vec<(&str, Vec<&str>)> {
        delta
            .resources
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.aliases.iter().map(String::as_str).collect(),
                )
            })
            .collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn wildcard_initial_then_deltas() {
        let cache = Cache::new();
        let mut sub = Subscription::new(&request(&[], &[]));
        assert!(sub.wildcard);
        assert_eq!(
            sub.poll(T, &cache),
            None,
            "waits until the type is published"
        );

        cache.set(T, vec![res("a", "1", &["/10.0.0.1"]), res("b", "2", &[])]);
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("a", vec![]), ("b", vec![])]);
        assert!(delta.removed.is_empty());
        assert_eq!(sub.poll(T, &cache), None, "nothing more owed");

        cache.set(T, vec![res("a", "1x", &["/10.0.0.1"]), res("c", "3", &[])]);
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("a", vec![]), ("c", vec![])]);
        assert_eq!(delta.removed, ["b"]);
        assert_eq!(sub.held(), 2);
    }

    #[test]
    fn empty_published_type_is_answered_once() {
        let cache = Cache::new();
        cache.set(T, vec![]);
        let mut sub = Subscription::new(&request(&[], &[]));
        let delta = sub.poll(T, &cache).unwrap();
        assert!(delta.resources.is_empty() && delta.removed.is_empty());
        assert_eq!(sub.poll(T, &cache), None);
    }

    #[test]
    fn initial_versions_skip_held_resources() {
        let cache = Cache::new();
        cache.set(T, vec![res("a", "1", &[]), res("b", "2", &[])]);
        let a = cache.get(T, "a").unwrap();
        let mut req = request(&[], &[]);
        req.initial_resource_versions
            .insert("a".into(), a.version.to_string());
        req.initial_resource_versions
            .insert("b".into(), "stale".into());
        req.initial_resource_versions
            .insert("gone".into(), "v".into());
        let mut sub = Subscription::new(&req);
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("b", vec![])]);
        assert_eq!(delta.removed, ["gone"]);
    }

    #[test]
    fn on_demand_aliases_and_misses() {
        let cache = Cache::new();
        cache.set(
            T,
            vec![res("uid-1", "1", &["/10.0.0.1"]), res("ns/svc", "2", &[])],
        );
        let mut sub = Subscription::new(&request(&["*"], &["*"]));
        assert!(!sub.wildcard && sub.names.is_empty());
        let delta = sub.poll(T, &cache).unwrap();
        assert!(delta.resources.is_empty(), "subscribed to nothing");
        assert_eq!(sub.poll(T, &cache), None);

        sub.update(T, &strings(&["/10.0.0.1", "/10.9.9.9"]), &[], &cache);
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("uid-1", vec!["/10.0.0.1"])]);
        assert_eq!(delta.removed, ["/10.9.9.9"]);
        assert_eq!(sub.poll(T, &cache), None);

        // Unrelated change: nothing owed. Related change: pushed with the alias.
        cache.set(
            T,
            vec![res("uid-1", "1b", &["/10.0.0.1"]), res("ns/svc", "2b", &[])],
        );
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("uid-1", vec!["/10.0.0.1"])]);

        // The missing key appears later: pushed.
        cache.set(
            T,
            vec![
                res("uid-1", "1b", &["/10.0.0.1"]),
                res("uid-9", "9", &["/10.9.9.9"]),
            ],
        );
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("uid-9", vec!["/10.9.9.9"])]);

        // Subscribing by resource name to something already held still answers.
        sub.update(T, &strings(&["uid-1"]), &[], &cache);
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("uid-1", vec!["/10.0.0.1"])]);

        // Unsubscribing forgets without a removal; the resource is then not pushed.
        sub.update(T, &[], &strings(&["/10.9.9.9"]), &cache);
        assert_eq!(sub.held(), 1);
        cache.set(
            T,
            vec![
                res("uid-1", "1b", &["/10.0.0.1"]),
                res("uid-9", "9b", &["/10.9.9.9"]),
            ],
        );
        assert_eq!(sub.poll(T, &cache), None);
    }

    #[test]
    fn on_demand_reconnect_keeps_held_resources_subscribed() {
        let cache = Cache::new();
        cache.set(
            T,
            vec![
                res("uid-1", "1", &["/10.0.0.1"]),
                res("uid-2", "2", &["/10.0.0.2"]),
            ],
        );
        let v1 = cache.get(T, "uid-1").unwrap().version.to_string();
        let mut req = request(&["*"], &["*"]);
        req.initial_resource_versions.insert("uid-1".into(), v1);
        req.initial_resource_versions
            .insert("uid-3".into(), "gone".into());
        let mut sub = Subscription::new(&req);
        assert!(!sub.wildcard);
        let delta = sub.poll(T, &cache).unwrap();
        assert!(delta.resources.is_empty(), "held at the current version");
        assert_eq!(delta.removed, ["uid-3"]);
        cache.set(
            T,
            vec![
                res("uid-1", "1b", &["/10.0.0.1"]),
                res("uid-2", "2b", &["/10.0.0.2"]),
            ],
        );
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(
            sent(&delta),
            [("uid-1", vec![])],
            "still subscribed, by name"
        );
    }

    #[test]
    fn scoped_subscription_sees_only_its_prefix() {
        let cache = Cache::new();
        cache.set(
            T,
            vec![
                res("a/wp/a/echo", "1", &[]),
                res("a/wp/a/other", "1", &[]),
                res("a/wp2/a/echo", "1", &[]),
                res("b/wp/b/x", "1", &[]),
            ],
        );
        let mut sub = Subscription::new(&request(&[], &[]));
        sub.restrict_to("a/wp/".into());
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(
            sent(&delta),
            [("a/wp/a/echo", vec![]), ("a/wp/a/other", vec![])]
        );

        // Changes outside the scope are never sent, inside they are.
        cache.set(
            T,
            vec![
                res("a/wp/a/echo", "2", &[]),
                res("a/wp2/a/echo", "2", &[]),
                res("b/wp/b/x", "2", &[]),
            ],
        );
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("a/wp/a/echo", vec![])]);
        assert_eq!(delta.removed, ["a/wp/a/other"]);

        // Explicit names outside the scope are answered as removed, even though they exist.
        sub.update(T, &strings(&["a/wp2/a/echo", "a/wp/a/echo"]), &[], &cache);
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("a/wp/a/echo", vec![])]);
        assert_eq!(delta.removed, ["a/wp2/a/echo"]);

        // A client claiming to hold an out-of-scope resource is told it is removed.
        let mut req = request(&[], &[]);
        req.initial_resource_versions
            .insert("b/wp/b/x".into(), "v".into());
        let mut sub = Subscription::new(&req);
        sub.restrict_to("a/wp/".into());
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("a/wp/a/echo", vec![])]);
        assert_eq!(delta.removed, ["b/wp/b/x"]);
    }

    #[test]
    fn full_diff_after_trimmed_log() {
        let cache = Cache::new();
        cache.set(T, vec![res("a", "0", &[]), res("b", "b", &[])]);
        let mut sub = Subscription::new(&request(&[], &[]));
        sub.poll(T, &cache).unwrap();
        for round in 1..=5000 {
            cache.set(
                T,
                vec![res("a", &round.to_string(), &[]), res("b", "b", &[])],
            );
        }
        cache.set(T, vec![res("a", "last", &[])]);
        let delta = sub.poll(T, &cache).unwrap();
        assert_eq!(sent(&delta), [("a", vec![])]);
        assert_eq!(delta.removed, ["b"]);
    }
}
