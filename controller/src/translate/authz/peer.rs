//! `PeerAuthentication` → the Authorizations a workload references (istio-ambient.md §3.7;
//! istiod's `convertedSelectorPeerAuthentications` and `convertPeerAuthentication`).

use std::collections::BTreeMap;

use weft_k8s::crds::{MtlsMode, PeerAuthentication};
use weft_proto::istio::security::{Action, Authorization, Match, Scope};

use super::{
    Problem, STATIC_STRICT_NAME, Settings, no_principal, policy::port, selector_labels,
    single_match_rule,
};
use crate::translate::selector_matches;

/// Prefix of the per-workload DENY policy carrying a workload PeerAuthentication's port-level
/// exceptions; the full name is `istio_converted_peer_authentication_<PeerAuthentication name>`,
/// in the PeerAuthentication's namespace. (istiod uses the same idea; the `istio_` prefix keeps
/// the name illegal as a Kubernetes name, like [`STATIC_STRICT_NAME`].)
pub const PEER_AUTHENTICATION_PREFIX: &str = "istio_converted_peer_authentication_";

/// PeerAuthentication outcome for one pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerAuthOutcome {
    /// Authorization keys (`namespace/name`) the workload must list in `authorization_policies`:
    /// `<root>/istio_converted_static_strict` when the effective mode is STRICT without port
    /// exceptions, or the key of the policy in [`extra`](Self::extra).
    pub policy_keys: Vec<String>,
    /// Per-workload Authorizations to publish (at most one: the port-level policy). The same
    /// PeerAuthentication yields the same policy for every pod it governs, so publishing it once
    /// per key is enough.
    pub extra: Vec<Authorization>,
    /// `portLevelMtls` keys that are not ports (1–65535); those entries were ignored.
    pub problems: Vec<Problem>,
}

/// PeerAuthentication outcome for one pod, from every PeerAuthentication in the cluster.
///
/// Precedence (Istio's documented PeerAuthentication semantics, as istiod resolves them for
/// ambient): a workload PA (non-empty selector, in the pod's namespace, labels all on the pod) >
/// the namespace-wide PA (no or empty selector, pod's namespace) > the mesh-wide PA (no selector,
/// root namespace). At each level the oldest `creationTimestamp` wins (missing timestamps count
/// as newest), then the lexically smallest name. `UNSET` (or no `mtls`) inherits from the next
/// level; the default is PERMISSIVE. DISABLE behaves as PERMISSIVE (HBONE is always mTLS).
///
/// Effective STRICT → the static strict key. Port-level modes are read only from the winning
/// workload PA (Istio ignores them elsewhere); `UNSET` ports inherit and are ignored:
/// * effective STRICT with PERMISSIVE/DISABLE ports → no static strict key; instead the DENY
///   policy `<PA ns>/istio_converted_peer_authentication_<PA name>` (scope WORKLOAD_SELECTOR) with
///   one match `{not_principals: [presence], not_destination_ports: [those ports]}`;
/// * effective PERMISSIVE/DISABLE with STRICT ports → that DENY policy with one match
///   `{not_principals: [presence], destination_ports: [those ports]}`.
///
/// Ports are listed in ascending order. Port keys that are not numbers 1–65535 are ignored and
/// reported in [`PeerAuthOutcome::problems`] (Istio's validation rejects them).
pub fn peer_authentication<'a>(
    pod_namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    policies: impl IntoIterator<Item = &'a PeerAuthentication>,
    settings: &Settings,
) -> PeerAuthOutcome {
    let mut workload = None;
    let mut namespace = None;
    let mut mesh = None;
    for pa in policies {
        let ns = pa.metadata.namespace.as_deref().unwrap_or_default();
        match selector_labels(pa.spec.selector.as_ref()) {
            Some(labels) => {
                if ns == pod_namespace && selector_matches(labels, pod_labels) {
                    keep_oldest(&mut workload, pa);
                }
            }
            None => {
                if ns == pod_namespace {
                    keep_oldest(&mut namespace, pa);
                }
                if ns == settings.root_namespace {
                    keep_oldest(&mut mesh, pa);
                }
            }
        }
    }
    let effective = [workload, namespace, mesh]
        .into_iter()
        .flatten()
        .map(mode)
        .find(|m| *m != MtlsMode::Unset)
        .unwrap_or(MtlsMode::Permissive);
    let strict = effective == MtlsMode::Strict;

    let mut out = PeerAuthOutcome::default();
    if let Some(pa) = workload {
        let ports = port_modes(pa, &mut out.problems);
        let exceptions: Vec<u32> = ports
            .iter()
            .filter(|(_, m)| match m {
                MtlsMode::Permissive | MtlsMode::Disable => strict,
                MtlsMode::Strict => !strict,
                MtlsMode::Unset => false,
            })
            .map(|(p, _)| *p)
            .collect();
        if !exceptions.is_empty() {
            let l4 = if strict {
                Match {
                    not_destination_ports: exceptions,
                    ..no_principal()
                }
            } else {
                Match {
                    destination_ports: exceptions,
                    ..no_principal()
                }
            };
            let policy = port_level_policy(pa, l4);
            out.policy_keys
                .push(format!("{}/{}", policy.namespace, policy.name));
            out.extra.push(policy);
            return out;
        }
    }
    if strict {
        out.policy_keys
            .push(format!("{}/{STATIC_STRICT_NAME}", settings.root_namespace));
    }
    out
}

fn mode(pa: &PeerAuthentication) -> MtlsMode {
    pa.spec.mtls.map(|m| m.mode).unwrap_or_default()
}

/// Keeps the older of `current` and `candidate` (creationTimestamp, missing = newest; then name).
fn keep_oldest<'a>(
    current: &mut Option<&'a PeerAuthentication>,
    candidate: &'a PeerAuthentication,
) {
    let age = |pa: &'a PeerAuthentication| {
        let created = pa.metadata.creation_timestamp.as_ref();
        (
            created.is_none(),
            created,
            pa.metadata.name.as_deref().unwrap_or_default(),
        )
    };
    if current.is_none_or(|c| age(candidate) < age(c)) {
        *current = Some(candidate);
    }
}

/// Valid `portLevelMtls` entries by port; bad keys are reported and skipped.
fn port_modes(pa: &PeerAuthentication, problems: &mut Vec<Problem>) -> BTreeMap<u32, MtlsMode> {
    let mut ports = BTreeMap::new();
    for (key, mtls) in &pa.spec.port_level_mtls {
        match port(key) {
            Ok(p) => {
                ports.insert(p, mtls.mode);
            }
            Err(message) => problems.push(Problem {
                object: format!(
                    "PeerAuthentication {}/{}",
                    pa.metadata.namespace.as_deref().unwrap_or_default(),
                    pa.metadata.name.as_deref().unwrap_or_default()
                ),
                field: format!("spec.portLevelMtls[{key}]"),
                message,
            }),
        }
    }
    ports
}

fn port_level_policy(pa: &PeerAuthentication, l4: Match) -> Authorization {
    Authorization {
        name: format!(
            "{PEER_AUTHENTICATION_PREFIX}{}",
            pa.metadata.name.as_deref().unwrap_or_default()
        ),
        namespace: pa.metadata.namespace.clone().unwrap_or_default(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![single_match_rule(l4)],
        dry_run: false,
        extensions: Vec::new(),
    }
}
