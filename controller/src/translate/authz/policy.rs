//! `AuthorizationPolicy` → `Authorization` (istio-ambient.md §3.6, istio-ztunnel.md §6.4).

use std::collections::BTreeMap;
use std::net::IpAddr;

use weft_k8s::crds::{self, AuthorizationPolicy, Condition, Operation, Source};
use weft_proto::istio::security::{
    Action, Address, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};

use super::{Problem, Settings, selector_labels};
use crate::translate::selector_matches;

/// Annotation marking a policy as dry-run (`"true"`): ztunnel evaluates it only for logging.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `when` keys ztunnel can evaluate (istiod's `l4WhenAttributes`); every other key is L7.
pub const L4_WHEN_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// AuthorizationPolicy → the Authorization ztunnel enforces, or `None` when it is not for
/// ztunnel: it has `targetRef`/`targetRefs` (waypoint-enforced) or its action is AUDIT/CUSTOM.
///
/// Shape (istiod's ambient conversion, istio-ztunnel.md §6.4):
/// * `name`/`namespace` from metadata; scope NAMESPACE without a selector (GLOBAL in the root
///   namespace), WORKLOAD_SELECTOR with a non-empty `matchLabels`; `dry_run` from the
///   [`DRY_RUN_ANNOTATION`] annotation being exactly `"true"`.
/// * Each `rules[]` entry becomes one `Rule` whose clauses are AND-ed, in this order: one clause
///   for `from` (one match per entry, OR-ed), one for `to` (likewise), one per `when` condition.
///   A rule with none of them has no clauses and matches every connection; `rules: []` gives no
///   rules, matching nothing.
/// * Strings (`principals`, `namespaces`, `source.principal`/`source.namespace` values): `*` →
///   presence, `*x` → suffix `x`, `x*` → prefix `x`, else exact.
/// * IPs (`ipBlocks`, `source.ip`, `destination.ip`): CIDR or bare IP (/32, /128); host bits
///   are masked off. Ports: decimal 1–65535. `serviceAccounts`: `namespace/name`.
/// * L7 attributes (`hosts`, `methods`, `paths`, `requestPrincipals`, `remoteIpBlocks`, their
///   `not*`, any `when` key outside [`L4_WHEN_KEYS`]): in an ALLOW policy the rule holding one
///   is dropped (so it never matches; a policy left with no rules still exists and allows
///   nothing); in a DENY policy only the L7 parts are dropped, so the rule matches more.
///
/// Where istiod would emit a match with no fields (a DENY entry made only of L7 attributes),
/// Weft drops the whole clause instead: at L4 that entry matches every connection, so the
/// clause does, which is istiod's intent ("for DENY they will always match") whatever the
/// enforcer does with an empty match.
///
/// # Errors
/// A [`Problem`] naming the field for input Istio's validation rejects or that cannot be
/// expressed: a malformed CIDR/IP, a port that is not a number in 1–65535, a `serviceAccounts`
/// entry not of the form `namespace/name`, an empty `source`/`operation`, a `when` condition
/// with an empty key or with neither `values` nor `notValues`. istiod silently skips bad values;
/// Weft reports them because skipping a negative value would widen a policy. Input is checked
/// even inside rules that are then dropped as L7.
pub fn authorization_policy(
    policy: &AuthorizationPolicy,
    settings: &Settings,
) -> Result<Option<Authorization>, Problem> {
    let Some(action) = ztunnel_action(policy) else {
        return Ok(None);
    };
    let object = object_name(policy);
    let mut rules = Vec::with_capacity(policy.spec.rules.len());
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        if let Some(rule) = convert_rule(rule, action, &object, &format!("spec.rules[{i}]"))? {
            rules.push(rule);
        }
    }
    Ok(Some(Authorization {
        rules,
        ..header(policy, action, settings)
    }))
}

/// The fail-closed stand-in for a policy [`authorization_policy`] rejected, for callers that
/// would rather publish something than drop the object (dropping an ALLOW policy can leave a
/// workload with no ALLOW policy, i.e. allow-all; dropping a DENY policy stops denying):
/// * ALLOW → the same policy with no rules: it allows nothing, and other ALLOW policies still
///   apply (the same outcome as istiod dropping every rule of an ALLOW policy);
/// * DENY → the same policy with one rule without clauses: it denies every connection.
///
/// Returns `None` for policies that are not for ztunnel (see [`authorization_policy`]).
pub fn fail_closed(policy: &AuthorizationPolicy, settings: &Settings) -> Option<Authorization> {
    let action = ztunnel_action(policy)?;
    let rules = match action {
        Action::Allow => Vec::new(),
        Action::Deny => vec![Rule {
            clauses: Vec::new(),
        }],
    };
    Some(Authorization {
        rules,
        ..header(policy, action, settings)
    })
}

/// Whether a selector-scoped policy applies to a pod: the policy is for ztunnel (see
/// [`authorization_policy`]), has a non-empty selector whose labels are all on the pod, and is
/// in the pod's namespace or in the root namespace (Istio: a root-namespace policy with a
/// selector applies to matching workloads in every namespace). Namespace and global policies
/// give `false`: ztunnel applies them by scope, they are not listed per workload.
pub fn selects(
    policy: &AuthorizationPolicy,
    pod_namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    settings: &Settings,
) -> bool {
    let Some(labels) = selector_labels(policy.spec.selector.as_ref()) else {
        return false;
    };
    let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
    ztunnel_action(policy).is_some()
        && (namespace == pod_namespace || namespace == settings.root_namespace)
        && selector_matches(labels, pod_labels)
}

/// The ztunnel action, or `None` when the policy is not for ztunnel.
fn ztunnel_action(policy: &AuthorizationPolicy) -> Option<Action> {
    if policy.spec.target_ref.is_some() || !policy.spec.target_refs.is_empty() {
        return None;
    }
    match policy.spec.action {
        crds::Action::Allow => Some(Action::Allow),
        crds::Action::Deny => Some(Action::Deny),
        crds::Action::Audit | crds::Action::Custom => None,
    }
}

/// Everything but the rules.
fn header(policy: &AuthorizationPolicy, action: Action, settings: &Settings) -> Authorization {
    let namespace = policy.metadata.namespace.clone().unwrap_or_default();
    let scope = if selector_labels(policy.spec.selector.as_ref()).is_some() {
        Scope::WorkloadSelector
    } else if namespace == settings.root_namespace {
        Scope::Global
    } else {
        Scope::Namespace
    };
    let dry_run = policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .is_some_and(|v| v == "true");
    Authorization {
        name: policy.metadata.name.clone().unwrap_or_default(),
        namespace,
        scope: scope as i32,
        action: action as i32,
        rules: Vec::new(),
        dry_run,
        extensions: Vec::new(),
    }
}

fn object_name(policy: &AuthorizationPolicy) -> String {
    format!(
        "AuthorizationPolicy {}/{}",
        policy.metadata.namespace.as_deref().unwrap_or_default(),
        policy.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The L4 part of one `from`/`to` entry or `when` condition.
struct Part {
    /// What ztunnel can check; empty when the entry is all L7 (or, for `when`, an L7 key).
    l4: Match,
    /// Whether L7 attributes were left out.
    l7: bool,
}

/// One `rules[]` entry, or `None` when an ALLOW rule is dropped for holding L7 attributes.
fn convert_rule(
    rule: &crds::Rule,
    action: Action,
    object: &str,
    path: &str,
) -> Result<Option<Rule>, Problem> {
    let from = rule
        .from
        .iter()
        .enumerate()
        .map(|(j, f)| source(&f.source, object, &format!("{path}.from[{j}].source")))
        .collect::<Result<Vec<_>, _>>()?;
    let to = rule
        .to
        .iter()
        .enumerate()
        .map(|(j, t)| operation(&t.operation, object, &format!("{path}.to[{j}].operation")))
        .collect::<Result<Vec<_>, _>>()?;
    let when = rule
        .when
        .iter()
        .enumerate()
        .map(|(j, c)| condition(c, object, &format!("{path}.when[{j}]")))
        .collect::<Result<Vec<_>, _>>()?;

    let l7 = from.iter().chain(&to).chain(&when).any(|p| p.l7);
    if l7 && action == Action::Allow {
        return Ok(None);
    }
    let mut clauses = Vec::new();
    clauses.extend(clause(from));
    clauses.extend(clause(to));
    for part in when {
        clauses.extend(clause(vec![part]));
    }
    Ok(Some(Rule { clauses }))
}

/// OR-ed entries as one clause, or `None` when some entry has nothing left to check at L4: it
/// matches every connection, so the clause would too.
fn clause(parts: Vec<Part>) -> Option<Clause> {
    if parts.is_empty() || parts.iter().any(|p| p.l4 == Match::default()) {
        return None;
    }
    Some(Clause {
        matches: parts.into_iter().map(|p| p.l4).collect(),
    })
}

fn source(s: &Source, object: &str, path: &str) -> Result<Part, Problem> {
    let l7 = [
        &s.request_principals,
        &s.not_request_principals,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
    ]
    .iter()
    .any(|v| !v.is_empty());
    let l4 = Match {
        principals: strings(&s.principals),
        not_principals: strings(&s.not_principals),
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        source_ips: addresses(&s.ip_blocks, object, &format!("{path}.ipBlocks"))?,
        not_source_ips: addresses(&s.not_ip_blocks, object, &format!("{path}.notIpBlocks"))?,
        service_accounts: service_accounts(
            &s.service_accounts,
            object,
            &format!("{path}.serviceAccounts"),
        )?,
        not_service_accounts: service_accounts(
            &s.not_service_accounts,
            object,
            &format!("{path}.notServiceAccounts"),
        )?,
        ..Match::default()
    };
    if !l7 && l4 == Match::default() {
        return Err(problem(object, path, "source must not be empty"));
    }
    Ok(Part { l4, l7 })
}

fn operation(o: &Operation, object: &str, path: &str) -> Result<Part, Problem> {
    let l7 = [
        &o.hosts,
        &o.not_hosts,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ]
    .iter()
    .any(|v| !v.is_empty());
    let l4 = Match {
        destination_ports: ports(&o.ports, object, &format!("{path}.ports"))?,
        not_destination_ports: ports(&o.not_ports, object, &format!("{path}.notPorts"))?,
        ..Match::default()
    };
    if !l7 && l4 == Match::default() {
        return Err(problem(object, path, "operation must not be empty"));
    }
    Ok(Part { l4, l7 })
}

fn condition(c: &Condition, object: &str, path: &str) -> Result<Part, Problem> {
    if c.key.is_empty() {
        return Err(problem(
            object,
            &format!("{path}.key"),
            "key must not be empty",
        ));
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(problem(
            object,
            path,
            &format!("condition on {:?} needs values or notValues", c.key),
        ));
    }
    let values = format!("{path}.values");
    let not_values = format!("{path}.notValues");
    let l4 = match c.key.as_str() {
        "source.ip" => Match {
            source_ips: addresses(&c.values, object, &values)?,
            not_source_ips: addresses(&c.not_values, object, &not_values)?,
            ..Match::default()
        },
        "source.namespace" => Match {
            namespaces: strings(&c.values),
            not_namespaces: strings(&c.not_values),
            ..Match::default()
        },
        "source.principal" => Match {
            principals: strings(&c.values),
            not_principals: strings(&c.not_values),
            ..Match::default()
        },
        "destination.ip" => Match {
            destination_ips: addresses(&c.values, object, &values)?,
            not_destination_ips: addresses(&c.not_values, object, &not_values)?,
            ..Match::default()
        },
        "destination.port" => Match {
            destination_ports: ports(&c.values, object, &values)?,
            not_destination_ports: ports(&c.not_values, object, &not_values)?,
            ..Match::default()
        },
        _ => {
            return Ok(Part {
                l4: Match::default(),
                l7: true,
            });
        }
    };
    Ok(Part { l4, l7: false })
}

fn problem(object: &str, field: &str, message: &str) -> Problem {
    Problem {
        object: object.into(),
        field: field.into(),
        message: message.into(),
    }
}

/// Istio's string forms: `*` presence, `*x` suffix, `x*` prefix, else exact.
fn strings(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| string_match(v)).collect()
}

fn string_match(v: &str) -> StringMatch {
    let match_type = if v == "*" {
        MatchType::Presence(())
    } else if let Some(suffix) = v.strip_prefix('*') {
        MatchType::Suffix(suffix.into())
    } else if let Some(prefix) = v.strip_suffix('*') {
        MatchType::Prefix(prefix.into())
    } else {
        MatchType::Exact(v.into())
    };
    StringMatch {
        match_type: Some(match_type),
    }
}

fn addresses(values: &[String], object: &str, field: &str) -> Result<Vec<Address>, Problem> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| cidr(v).map_err(|m| problem(object, &format!("{field}[{i}]"), &m)))
        .collect()
}

fn ports(values: &[String], object: &str, field: &str) -> Result<Vec<u32>, Problem> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| port(v).map_err(|m| problem(object, &format!("{field}[{i}]"), &m)))
        .collect()
}

fn service_accounts(
    values: &[String],
    object: &str,
    field: &str,
) -> Result<Vec<ServiceAccountMatch>, Problem> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceAccountMatch {
                    namespace: ns.into(),
                    service_account: name.into(),
                })
            }
            _ => Err(problem(
                object,
                &format!("{field}[{i}]"),
                &format!("service account {v:?} is not of the form namespace/name"),
            )),
        })
        .collect()
}

/// `a.b.c.d`, `a.b.c.d/n`, `x::y`, `x::y/n` → address bytes (host bits cleared) and length.
fn cidr(v: &str) -> Result<Address, String> {
    let (ip, length) = match v.split_once('/') {
        Some((ip, length)) => (ip, Some(length)),
        None => (v, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("invalid IP address or CIDR {v:?}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let length = match length {
        None => max,
        Some(l) => match decimal(l) {
            Some(n) if n <= max => n,
            _ => return Err(format!("invalid prefix length in CIDR {v:?}")),
        },
    };
    let address = match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - length).unwrap_or(0);
            (u32::from(v4) & mask).to_be_bytes().to_vec()
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - length).unwrap_or(0);
            (u128::from(v6) & mask).to_be_bytes().to_vec()
        }
    };
    Ok(Address { address, length })
}

/// A port number 1–65535 written in decimal.
pub(super) fn port(v: &str) -> Result<u32, String> {
    match decimal(v) {
        Some(p @ 1..=65535) => Ok(p),
        _ => Err(format!("invalid port {v:?}: want a number in 1-65535")),
    }
}

/// Plain ASCII decimal digits (no sign, no spaces) that fit a `u32`.
fn decimal(v: &str) -> Option<u32> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}
