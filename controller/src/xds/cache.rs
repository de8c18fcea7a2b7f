//! The versioned resource store the translation loop publishes into and the ADS streams read.
//!
//! Each type URL holds a complete set of named resources. [`Cache::set`] replaces a whole set;
//! every resource's version is a content hash of its encoded body, so versions are stable across
//! controller restarts and a reconnecting client's `initial_resource_versions` match. Every
//! change bumps one global generation and appends the changed (or removed) names to a per-type
//! changelog, so a stream that is current at generation `g` only looks at what changed since `g`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// One resource as the translation loop publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// The canonical resource name (workload `uid`, service `namespace/hostname`, authorization
    /// `namespace/name`; istio-ztunnel.md §2.6).
    pub name: String,
    /// Other keys an on-demand client may subscribe to for this resource, e.g. `network/ip`
    /// (`/10.244.1.5` on the default network) for each workload address or service VIP.
    pub aliases: Vec<String>,
    /// The resource itself, `type_url` set to the resource type.
    pub body: prost_types::Any,
}

/// A resource as stored: shared, with its content version.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    /// The canonical resource name.
    pub name: Arc<str>,
    /// [`version_of`] the body: 32 lowercase hex characters.
    pub version: Arc<str>,
    /// The aliases the resource was published with.
    pub aliases: Vec<String>,
    /// The resource itself.
    pub body: prost_types::Any,
}

/// What one [`Cache::set`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetOutcome {
    /// The cache generation after the call (unchanged when nothing changed).
    pub generation: u64,
    /// Resources added, or whose version or aliases changed.
    pub changed: usize,
    /// Resources that were present before and are not any more.
    pub removed: usize,
}

/// The content version of an encoded resource body: the first 128 bits of its SHA-256, as 32
/// lowercase hex characters. Depends only on the bytes, so it is stable across restarts.
pub fn version_of(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The changelog keeps at least this many names per type (and at least twice the number of
/// resources of that type) before it forgets its oldest entries.
const LOG_MIN_NAMES: usize = 4096;

/// The versioned resource store, shared (`Arc`) between the translation loop (writer) and every
/// ADS stream (readers).
///
/// Reads and writes take a short lock; writers wake readers through a generation watch.
#[derive(Debug)]
pub struct Cache {
    state: RwLock<State>,
    generation: watch::Sender<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    generation: u64,
    types: HashMap<String, TypeState>,
}

/// All resources of one type, the alias index and the changelog.
#[derive(Debug, Default)]
pub(crate) struct TypeState {
    resources: HashMap<Arc<str>, Arc<Versioned>>,
    /// alias → the names publishing it (usually one).
    aliases: HashMap<String, Vec<Arc<str>>>,
    /// (generation, names changed or removed at that generation), oldest first.
    log: VecDeque<(u64, Vec<Arc<str>>)>,
    /// Total names in `log`.
    log_names: usize,
    /// A reader at generation `g >= log_floor` finds every change after `g` in `log`.
    log_floor: u64,
}

impl Cache {
    /// An empty cache at generation 0 with no published types.
    pub fn new() -> Arc<Cache> {
        Arc::new(Cache {
            state: RwLock::new(State::default()),
            generation: watch::Sender::new(0),
        })
    }

    /// Replaces the whole set of `type_url` resources with `resources`.
    ///
    /// Versions are [`version_of`] each body's `value`; a resource whose body and aliases are
    /// unchanged keeps its entry and is not pushed again. Names that disappear become removals.
    /// When anything changed — or on the first `set` of a type, which marks the type as
    /// published so streams waiting for their first response of that type are answered, even
    /// with an empty set — the generation is bumped and every stream is woken. Of duplicate
    /// names the last one wins.
    pub fn set(&self, type_url: &str, resources: Vec<Resource>) -> SetOutcome {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let first = !state.types.contains_key(type_url);
        let next_generation = state.generation + 1;
        let ts = state.types.entry(type_url.to_owned()).or_default();

        let mut next: HashMap<Arc<str>, Arc<Versioned>> = HashMap::with_capacity(resources.len());
        let mut changed_names: Vec<Arc<str>> = Vec::new();
        for resource in resources {
            let version = version_of(&resource.body.value);
            let entry = match ts.resources.get(resource.name.as_str()) {
                Some(old) if *old.version == *version && old.aliases == resource.aliases => {
                    old.clone()
                }
                old => {
                    let name: Arc<str> = old
                        .map(|o| o.name.clone())
                        .unwrap_or_else(|| Arc::from(resource.name.as_str()));
                    changed_names.push(name.clone());
                    Arc::new(Versioned {
                        name,
                        version: version.into(),
                        aliases: resource.aliases,
                        body: resource.body,
                    })
                }
            };
            if next.insert(entry.name.clone(), entry).is_some() {
                tracing::warn!(xds.type = type_url, resource = %resource.name, "duplicate resource name, keeping the last");
            }
        }
        // A duplicate may have pushed a name twice; the log only needs it once.
        changed_names.sort_unstable();
        changed_names.dedup();
        let changed = changed_names.len();
        let mut removed = 0;
        for name in ts.resources.keys() {
            if !next.contains_key(name) {
                changed_names.push(name.clone());
                removed += 1;
            }
        }
        if changed_names.is_empty() && !first {
            return SetOutcome {
                generation: state.generation,
                changed: 0,
                removed: 0,
            };
        }

        let mut aliases: HashMap<String, Vec<Arc<str>>> = HashMap::new();
        for entry in next.values() {
            for alias in &entry.aliases {
                aliases
                    .entry(alias.clone())
                    .or_default()
                    .push(entry.name.clone());
            }
        }
        for names in aliases.values_mut() {
            names.sort_unstable();
        }
        ts.resources = next;
        ts.aliases = aliases;
        ts.record(next_generation, changed_names);
        state.generation = next_generation;
        drop(state);
        self.generation.send_replace(next_generation);
        SetOutcome {
            generation: next_generation,
            changed,
            removed,
        }
    }

    /// Changes some `type_url` resources and keeps the rest: what [`Cache::set`] of the whole
    /// set with `upserts` replacing (or adding) their names and `removals` left out would do,
    /// at a cost proportional to the change.
    ///
    /// An upsert whose body and aliases are unchanged is not a change; a removal of a name not
    /// present is ignored. Of duplicate upserted names the last one wins; a name both upserted
    /// and removed is removed. Like [`Cache::set`], the first call for a type publishes it.
    pub fn update(
        &self,
        type_url: &str,
        upserts: Vec<Resource>,
        removals: &[String],
    ) -> SetOutcome {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let first = !state.types.contains_key(type_url);
        let next_generation = state.generation + 1;
        let ts = state.types.entry(type_url.to_owned()).or_default();

        let mut changed_names: Vec<Arc<str>> = Vec::new();
        for resource in upserts {
            if removals.contains(&resource.name) {
                continue;
            }
            let version = version_of(&resource.body.value);
            let old = ts.resources.get(resource.name.as_str());
            if old.is_some_and(|o| *o.version == *version && o.aliases == resource.aliases) {
                continue;
            }
            let name: Arc<str> = old
                .map(|o| o.name.clone())
                .unwrap_or_else(|| Arc::from(resource.name.as_str()));
            let entry = Arc::new(Versioned {
                name: name.clone(),
                version: version.into(),
                aliases: resource.aliases,
                body: resource.body,
            });
            if let Some(old) = ts.resources.insert(name.clone(), entry.clone()) {
                ts.unindex_aliases(&old);
            }
            ts.index_aliases(&entry);
            changed_names.push(name);
        }
        changed_names.sort_unstable();
        changed_names.dedup();
        let changed = changed_names.len();
        let mut removed = 0;
        for name in removals {
            if let Some(old) = ts.resources.remove(name.as_str()) {
                ts.unindex_aliases(&old);
                changed_names.push(old.name.clone());
                removed += 1;
            }
        }
        if changed_names.is_empty() && !first {
            return SetOutcome {
                generation: state.generation,
                changed: 0,
                removed: 0,
            };
        }
        ts.record(next_generation, changed_names);
        state.generation = next_generation;
        drop(state);
        self.generation.send_replace(next_generation);
        SetOutcome {
            generation: next_generation,
            changed,
            removed,
        }
    }

    /// The resource of `type_url` named `name_or_alias`, or (if no resource has that name) the
    /// first resource, by name, publishing it as an alias.
    pub fn get(&self, type_url: &str, name_or_alias: &str) -> Option<Arc<Versioned>> {
        let state = self.read();
        let ts = state.types.get(type_url)?;
        ts.resolve(name_or_alias)
            .first()
            .and_then(|name| ts.resources.get(name))
            .cloned()
    }

    /// Number of `type_url` resources (0 for a type never published).
    pub fn len(&self, type_url: &str) -> usize {
        self.read()
            .types
            .get(type_url)
            .map_or(0, |ts| ts.resources.len())
    }

    /// Whether `type_url` has been published by [`Cache::set`] at least once.
    pub fn is_published(&self, type_url: &str) -> bool {
        self.read().types.contains_key(type_url)
    }

    /// The current generation: 0 initially, +1 per [`Cache::set`] that changed something.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// The published type URLs, sorted.
    pub fn types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.read().types.keys().cloned().collect();
        types.sort_unstable();
        types
    }

    /// Every `type_url` resource, sorted by name (empty for a type never published).
    pub fn list(&self, type_url: &str) -> Vec<Arc<Versioned>> {
        let state = self.read();
        let mut list: Vec<Arc<Versioned>> = state
            .types
            .get(type_url)
            .map(|ts| ts.resources.values().cloned().collect())
            .unwrap_or_default();
        list.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// A receiver of the generation, woken by every [`Cache::set`] that bumps it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn get(&self, type_url: &str) -> Option<&TypeState> {
        self.types.get(type_url)
    }
}

impl TypeState {
    /// Appends `names` to the changelog at `generation`, forgetting the oldest entries beyond
    /// what [`LOG_MIN_NAMES`] keeps.
    fn record(&mut self, generation: u64, names: Vec<Arc<str>>) {
        self.log_names += names.len();
        self.log.push_back((generation, names));
        let keep = LOG_MIN_NAMES.max(2 * self.resources.len());
        while self.log_names > keep && self.log.len() > 1 {
            if let Some((generation, names)) = self.log.pop_front() {
                self.log_names -= names.len();
                self.log_floor = generation;
            }
        }
    }

    /// Adds `entry`'s aliases to the alias index (names kept sorted, once each).
    fn index_aliases(&mut self, entry: &Versioned) {
        for alias in &entry.aliases {
            let names = self.aliases.entry(alias.clone()).or_default();
            if let Err(at) = names.binary_search(&entry.name) {
                names.insert(at, entry.name.clone());
            }
        }
    }

    /// Removes `entry`'s aliases from the alias index.
    fn unindex_aliases(&mut self, entry: &Versioned) {
        for alias in &entry.aliases {
            if let Some(names) = self.aliases.get_mut(alias.as_str()) {
                names.retain(|n| *n != entry.name);
                if names.is_empty() {
                    self.aliases.remove(alias.as_str());
                }
            }
        }
    }

    /// The names `key` designates: itself if it is a resource name, else the resources
    /// publishing it as an alias (sorted), else nothing.
    pub(crate) fn resolve(&self, key: &str) -> Vec<Arc<str>> {
        if let Some(entry) = self.resources.get(key) {
            return vec![entry.name.clone()];
        }
        self.aliases.get(key).cloned().unwrap_or_default()
    }

    pub(crate) fn resource(&self, name: &str) -> Option<&Arc<Versioned>> {
        self.resources.get(name)
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.resources.keys()
    }

    /// The names changed or removed after generation `since`, or `None` when the changelog no
    /// longer reaches back that far (the caller then compares everything).
    pub(crate) fn changed_since(&self, since: u64) -> Option<BTreeSet<Arc<str>>> {
        if since < self.log_floor {
            return None;
        }
        let mut names = BTreeSet::new();
        for (generation, changed) in self.log.iter().rev() {
            if *generation <= since {
                break;
            }
            names.extend(changed.iter().cloned());
        }
        Some(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "type.googleapis.com/test.Thing";

    fn res(name: &str, body: &[u8], aliases: &[&str]) -> Resource {
        Resource {
            name: name.to_owned(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            body: prost_types::Any {
                type_url: T.to_owned(),
                value: body.to_vec(),
            },
        }
    }

    fn names(set: Option<BTreeSet<Arc<str>>>) -> Vec<String> {
        set.unwrap().iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn versions_are_content_hashes() {
        assert_eq!(version_of(b"abc"), version_of(b"abc"));
        assert_ne!(version_of(b"abc"), version_of(b"abd"));
        assert_eq!(version_of(b"abc").len(), 32);
        // SHA-256("abc") starts with ba7816bf...
        assert!(version_of(b"abc").starts_with("ba7816bf"));
    }

    #[test]
    fn set_tracks_changes_and_removals() {
        let cache = Cache::new();
        assert!(!cache.is_published(T));
        let out = cache.set(T, vec![]);
        assert_eq!(out.generation, 1, "first publish bumps even when empty");
        assert!(cache.is_published(T));
        assert_eq!(cache.set(T, vec![]).generation, 1, "no change, no bump");

        let out = cache.set(T, vec![res("a", b"1", &["/10.0.0.1"]), res("b", b"2", &[])]);
        assert_eq!((out.generation, out.changed, out.removed), (2, 2, 0));
        let a1 = cache.get(T, "a").unwrap();
        assert_eq!(*a1.version, version_of(b"1"));
        assert_eq!(cache.get(T, "/10.0.0.1").unwrap().name, a1.name);
        assert!(cache.get(T, "nope").is_none());

        let out = cache.set(T, vec![res("a", b"1", &["/10.0.0.1"]), res("b", b"2", &[])]);
        assert_eq!(out.generation, 2, "identical set is not a change");
        assert!(Arc::ptr_eq(&a1, &cache.get(T, "a").unwrap()));

        let out = cache.set(T, vec![res("a", b"1", &["/10.0.0.2"]), res("c", b"3", &[])]);
        assert_eq!((out.generation, out.changed, out.removed), (3, 2, 1));
        assert!(cache.get(T, "/10.0.0.1").is_none());
        assert_eq!(&*cache.get(T, "/10.0.0.2").unwrap().name, "a");
        assert_eq!(cache.len(T), 2);
        assert_eq!(cache.len("other"), 0);

        let state = cache.read();
        let ts = state.get(T).unwrap();
        assert_eq!(names(ts.changed_since(2)), ["a", "b", "c"]);
        assert_eq!(names(ts.changed_since(1)), ["a", "b", "c"]);
        assert!(ts.changed_since(3).unwrap().is_empty());
    }

    #[test]
    fn changelog_is_trimmed_and_falls_back() {
        let cache = Cache::new();
        let mut last = 0;
        for round in 0..(LOG_MIN_NAMES + 10) {
            last = cache
                .set(T, vec![res("a", round.to_string().as_bytes(), &[])])
                .generation;
        }
        let state = cache.read();
        let ts = state.get(T).unwrap();
        assert!(ts.log_names <= LOG_MIN_NAMES);
        assert!(
            ts.changed_since(1).is_none(),
            "trimmed history asks for a full diff"
        );
        assert_eq!(names(ts.changed_since(last - 1)), ["a"]);
    }

    #[test]
    fn update_equals_set_of_the_whole_set() {
        let full = Cache::new();
        let partial = Cache::new();
        let initial = vec![
            res("a", b"1", &["/10.0.0.1"]),
            res("b", b"2", &["/10.0.0.2", "/shared"]),
            res("c", b"3", &["/shared"]),
        ];
        full.set(T, initial.clone());
        partial.set(T, initial);
        // Change a's body, move b's alias, remove c, add d sharing an alias; re-send an
        // unchanged resource, which is no change.
        let out = partial.update(
            T,
            vec![
                res("a", b"1x", &["/10.0.0.1"]),
                res("b", b"2", &["/10.0.0.3", "/shared"]),
                res("d", b"4", &["/shared"]),
                res("e", b"5", &[]),
            ],
            &["c".to_owned(), "e".to_owned(), "nope".to_owned()],
        );
        assert_eq!(
            (out.changed, out.removed),
            (3, 1),
            "e is upserted and removed"
        );
        let want = full.set(
            T,
            vec![
                res("a", b"1x", &["/10.0.0.1"]),
                res("b", b"2", &["/10.0.0.3", "/shared"]),
                res("d", b"4", &["/shared"]),
            ],
        );
        assert_eq!((want.changed, want.removed), (3, 1));
        assert_eq!(partial.list(T), full.list(T));
        for alias in ["/10.0.0.1", "/10.0.0.2", "/10.0.0.3", "/shared"] {
            assert_eq!(
                partial.get(T, alias).map(|e| e.name.clone()),
                full.get(T, alias).map(|e| e.name.clone()),
                "{alias}"
            );
            let (p, f) = (partial.read(), full.read());
            assert_eq!(
                p.get(T).unwrap().resolve(alias),
                f.get(T).unwrap().resolve(alias)
            );
        }
        let state = partial.read();
        assert_eq!(
            names(state.get(T).unwrap().changed_since(1)),
            ["a", "b", "c", "d"]
        );
        drop(state);
        let unchanged = partial.update(T, vec![res("a", b"1x", &["/10.0.0.1"])], &[]);
        assert_eq!(unchanged.generation, out.generation, "no change, no bump");
        assert_eq!(
            Cache::new().update(T, vec![], &[]).generation,
            1,
            "the first update publishes the type"
        );
    }

    #[tokio::test]
    async fn set_wakes_subscribers() {
        let cache = Cache::new();
        let mut rx = cache.subscribe();
        cache.set(T, vec![res("a", b"1", &[])]);
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.changed())
            .await
            .expect("woken within 1s")
            .unwrap();
        assert_eq!(*rx.borrow(), 1);
    }
}
