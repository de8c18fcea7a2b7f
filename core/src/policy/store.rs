//! Authorization policies by key, and which apply to a workload (reference §6.1).

use std::collections::{BTreeSet, HashMap};

use super::authorization::{Policy, Scope};
use crate::state::Workload;

/// The authorization policies received over xDS, keyed `namespace/name`, with a per-namespace
/// index for NAMESPACE-scoped policies and a set of GLOBAL ones.
///
/// Plain data: no locks, no I/O.
#[derive(Debug, Default)]
pub struct Store {
    by_key: HashMap<String, Policy>,
    /// namespace → keys of its NAMESPACE-scoped policies (sorted, so evaluation order is stable).
    by_namespace: HashMap<String, BTreeSet<String>>,
    /// Keys of GLOBAL-scoped policies.
    global: BTreeSet<String>,
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Store::default()
    }

    /// Inserts or replaces the policy with `policy.key()`. Returns `false` when an identical
    /// policy was already stored.
    pub fn upsert(&mut self, policy: Policy) -> bool {
        if self.by_key.get(policy.key()) == Some(&policy) {
            return false;
        }
        self.remove(policy.key());
        let key = policy.key().to_owned();
        match policy.scope {
            Scope::Global => {
                self.global.insert(key.clone());
            }
            Scope::Namespace => {
                self.by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .insert(key.clone());
            }
            Scope::WorkloadSelector => {}
        }
        self.by_key.insert(key, policy);
        true
    }

    /// Removes the policy with key `namespace/name`; `None` if unknown.
    pub fn remove(&mut self, key: &str) -> Option<Policy> {
        let old = self.by_key.remove(key)?;
        match old.scope {
            Scope::Global => {
                self.global.remove(key);
            }
            Scope::Namespace => {
                if let Some(keys) = self.by_namespace.get_mut(&old.namespace) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.by_namespace.remove(&old.namespace);
                    }
                }
            }
            Scope::WorkloadSelector => {}
        }
        Some(old)
    }

    /// The policy with key `namespace/name`.
    pub fn get(&self, key: &str) -> Option<&Policy> {
        self.by_key.get(key)
    }

    /// All policies, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.by_key.values()
    }

    /// How many policies are stored.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no policy is stored.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The policies that apply to connections to `workload` (reference §6.1): the
    /// NAMESPACE-scoped policies of its namespace, then the GLOBAL ones, then those its
    /// `authorization_policies` name (unknown keys skipped; callers may warn via
    /// [`Store::unknown_references`]). Dry-run policies are included; [`super::evaluate`]
    /// ignores them.
    pub fn applicable(&self, workload: &Workload) -> Vec<&Policy> {
        let namespaced = self.by_namespace.get(&workload.namespace);
        let keys = namespaced
            .into_iter()
            .flatten()
            .chain(&self.global)
            .map(String::as_str)
            .chain(workload.authorization_policies.iter().map(String::as_str));
        let mut out = Vec::with_capacity(
            namespaced.map_or(0, BTreeSet::len)
                + self.global.len()
                + workload.authorization_policies.len(),
        );
        for key in keys {
            if let Some(policy) = self.by_key.get(key)
                && !out.iter().any(|p: &&Policy| std::ptr::eq(*p, policy))
            {
                out.push(policy);
            }
        }
        out
    }

    /// The keys in `workload.authorization_policies` that name no stored policy.
    pub fn unknown_references<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a str> + 'a {
        workload
            .authorization_policies
            .iter()
            .map(String::as_str)
            .filter(|key| !self.by_key.contains_key(*key))
    }
}
