//! `AuthorizationPolicy` and `PeerAuthentication` → the L4 `istio.security.Authorization`
//! resources ztunnel enforces, shaped as istiod's ambient index shapes them (istio/istio
//! `pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`; Weft reference
//! istio-ztunnel.md §6.4, istio-ambient.md §3.6–§3.7).
//!
//! Pure functions over data: no I/O, no logging. An object that cannot be translated is reported
//! as a [`Problem`] for the caller to log; the caller decides what to publish instead (see
//! [`fail_closed`]).
//!
//! Names Weft publishes (the `_` characters are illegal in Kubernetes object names, so they can
//! never collide with a user's policy):
//! * [`STATIC_STRICT_NAME`] `istio_converted_static_strict` in the root namespace — istiod's name;
//! * [`PEER_AUTHENTICATION_PREFIX`] `istio_converted_peer_authentication_<PA name>` in the
//!   PeerAuthentication's namespace (port-level mTLS exceptions);
//! * [`WAYPOINT_POLICY_PREFIX`] `istio_allow_waypoint_<waypoint ns>_<waypoint name>` in the
//!   waypoint's namespace — istiod's name.

mod peer;
mod policy;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use weft_k8s::crds::WorkloadSelector;
use weft_proto::istio::security::{
    Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match::MatchType,
};

pub use peer::{PEER_AUTHENTICATION_PREFIX, PeerAuthOutcome, peer_authentication};
pub use policy::{DRY_RUN_ANNOTATION, L4_WHEN_KEYS, authorization_policy, fail_closed, selects};

/// Name of the static DENY policy expressing PeerAuthentication `STRICT` (istiod's name).
pub const STATIC_STRICT_NAME: &str = "istio_converted_static_strict";

/// Prefix of the implicit per-waypoint ALLOW policy; the full name is
/// `istio_allow_waypoint_<waypoint namespace>_<waypoint name>` (istiod's name).
pub const WAYPOINT_POLICY_PREFIX: &str = "istio_allow_waypoint_";

/// Controller-wide settings the translation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Mesh root namespace: selector-less policies here are mesh-wide (GLOBAL scope, mesh-wide
    /// PeerAuthentication), and selector policies here apply in every namespace. Default
    /// `istio-system` (MeshConfig `rootNamespace`).
    pub root_namespace: String,
    /// Mesh trust domain. Default `cluster.local` (MeshConfig `trustDomain`). The conversions here
    /// pass user principals through unchanged, as istiod's ambient conversion does (no
    /// trust-domain alias rewriting); callers building SPIFFE IDs (waypoint identities) use it.
    pub trust_domain: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            root_namespace: "istio-system".into(),
            trust_domain: "cluster.local".into(),
        }
    }
}

/// Why an object could not be translated (the caller logs it and skips the object).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct Problem {
    /// The object, as `<Kind> <namespace>/<name>` (e.g. `AuthorizationPolicy ns/name`).
    pub object: String,
    /// Path of the offending field in Istio's camelCase spelling, e.g.
    /// `spec.rules[0].from[0].source.ipBlocks[1]`.
    pub field: String,
    /// What is wrong with it (lowercase, quoting the value).
    pub message: String,
}

/// The static DENY policy for STRICT mTLS: `<root namespace>/istio_converted_static_strict`,
/// scope WORKLOAD_SELECTOR (workloads whose effective PeerAuthentication mode is STRICT reference
/// it by key), one rule denying connections without a peer principal (`not_principals:
/// [presence]`, i.e. plaintext arriving on 15006). Same shape as istiod's static strict policy;
/// publish it whenever any PeerAuthentication exists.
pub fn static_strict(settings: &Settings) -> Authorization {
    Authorization {
        name: STATIC_STRICT_NAME.into(),
        namespace: settings.root_namespace.clone(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![single_match_rule(no_principal())],
        dry_run: false,
        extensions: Vec::new(),
    }
}

/// The implicit ALLOW policy letting a waypoint reach the workloads behind it (istiod's
/// `DefaultAllowFromWaypoint`): `<waypoint namespace>/istio_allow_waypoint_<waypoint
/// namespace>_<waypoint name>`, scope WORKLOAD_SELECTOR (referenced by each workload behind the
/// waypoint), one rule whose single match allows any of `waypoint_identities` as exact principals.
///
/// Each identity may be a SPIFFE ID (`spiffe://td/ns/x/sa/y`) or a principal (`td/ns/x/sa/y`);
/// the `spiffe://` prefix is stripped, as istiod does. With no identities the policy has no rules
/// (it allows nothing) rather than a rule with an empty match.
pub fn allow_from_waypoint(
    waypoint_namespace: &str,
    waypoint_name: &str,
    waypoint_identities: &[String],
    _settings: &Settings,
) -> Authorization {
    let principals: Vec<StringMatch> = waypoint_identities
        .iter()
        .map(|id| exact(id.strip_prefix("spiffe://").unwrap_or(id)))
        .collect();
    let rules = if principals.is_empty() {
        Vec::new()
    } else {
        vec![single_match_rule(Match {
            principals,
            ..Match::default()
        })]
    };
    Authorization {
        name: format!("{WAYPOINT_POLICY_PREFIX}{waypoint_namespace}_{waypoint_name}"),
        namespace: waypoint_namespace.into(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Allow as i32,
        rules,
        dry_run: false,
        extensions: Vec::new(),
    }
}

/// The labels of a selector, or `None` when there is no selector or it is empty (Istio treats
/// an empty selector like a missing one: namespace- or mesh-wide).
fn selector_labels(selector: Option<&WorkloadSelector>) -> Option<&BTreeMap<String, String>> {
    selector
        .map(|s| &s.match_labels)
        .filter(|labels| !labels.is_empty())
}

/// A match on connections without a peer principal (plaintext).
fn no_principal() -> Match {
    Match {
        not_principals: vec![StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        ..Match::default()
    }
}

/// A rule of one clause holding one match.
fn single_match_rule(m: Match) -> Rule {
    Rule {
        clauses: vec![Clause { matches: vec![m] }],
    }
}

fn exact(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    }
}
