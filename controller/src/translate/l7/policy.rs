//! `targetRefs` AuthorizationPolicies → `weft.l7.v1.Policy` for the waypoint they attach to.
//!
//! A policy targeting a waypoint Gateway applies to every request through it (`services: []`);
//! one targeting a Service applies to that service's hostname at the service's waypoint. AUDIT
//! and CUSTOM are not supported (reported, skipped). Fail closed like the L4 conversion: a field
//! Weft cannot express (`requestPrincipals`, `remoteIpBlocks`, an unknown `when` key) drops the
//! rule holding it in an ALLOW policy (it can never match) and is ignored in a DENY policy (the
//! rule matches more); a malformed value (port) makes an ALLOW policy match nothing and a DENY
//! policy match everything.

use std::collections::BTreeMap;

use weft_k8s::Snapshot;
use weft_k8s::crds::{self, AuthorizationPolicy};
use weft_proto::weft::l7::v1::{Action, Condition, Operation, Policy, Rule, Source};

use super::super::service::Services;
use super::super::waypoint::Waypoints;
use super::super::{Output, Settings};
use super::service_hostname;

/// `when` keys the waypoint evaluates.
fn supported_key(key: &str) -> bool {
    matches!(
        key,
        "source.ip"
            | "source.namespace"
            | "source.principal"
            | "destination.port"
            | "request.method"
    ) || (key.starts_with("request.headers[") && key.ends_with(']'))
}

fn ports(list: &[String], field: &str) -> Result<Vec<u32>, String> {
    list.iter()
        .map(|p| {
            p.parse::<u32>()
                .ok()
                .filter(|p| (1..=65535).contains(p))
                .ok_or_else(|| format!("{field}: {p:?} is not a port 1-65535"))
        })
        .collect()
}

/// Translates the rules; `Err` = a malformed value (the caller fails closed).
fn rules(
    policy: &AuthorizationPolicy,
    allow: bool,
    trust_domain: &str,
    object: &str,
    problems: &mut Vec<String>,
) -> Result<Vec<Rule>, String> {
    let mut out = Vec::new();
    'rules: for (i, rule) in policy.spec.rules.iter().enumerate() {
        let mut unsupported = Vec::new();
        let mut from = Vec::new();
        for (k, f) in rule.from.iter().enumerate() {
            let src = &f.source;
            let field = format!("spec.rules[{i}].from[{k}].source");
            if !src.request_principals.is_empty() || !src.not_request_principals.is_empty() {
                unsupported.push(format!("{field}.requestPrincipals"));
            }
            if !src.remote_ip_blocks.is_empty() || !src.not_remote_ip_blocks.is_empty() {
                unsupported.push(format!("{field}.remoteIpBlocks"));
            }
            let sa = |list: &[String]| -> Result<Vec<String>, String> {
                list.iter()
                    .map(|s| {
                        let (ns, name) = s.split_once('/').ok_or_else(|| {
                            format!("{field}.serviceAccounts: {s:?} is not namespace/name")
                        })?;
                        Ok(format!("{trust_domain}/ns/{ns}/sa/{name}"))
                    })
                    .collect()
            };
            let mut principals = src.principals.clone();
            principals.extend(sa(&src.service_accounts)?);
            let mut not_principals = src.not_principals.clone();
            not_principals.extend(sa(&src.not_service_accounts)?);
            from.push(Source {
                principals,
                not_principals,
                namespaces: src.namespaces.clone(),
                not_namespaces: src.not_namespaces.clone(),
                ip_blocks: src.ip_blocks.clone(),
                not_ip_blocks: src.not_ip_blocks.clone(),
            });
        }
        let mut to = Vec::new();
        for (k, t) in rule.to.iter().enumerate() {
            let op = &t.operation;
            let field = format!("spec.rules[{i}].to[{k}].operation");
            to.push(Operation {
                hosts: op.hosts.clone(),
                not_hosts: op.not_hosts.clone(),
                methods: op.methods.clone(),
                not_methods: op.not_methods.clone(),
                paths: op.paths.clone(),
                not_paths: op.not_paths.clone(),
                ports: ports(&op.ports, &format!("{field}.ports"))?,
                not_ports: ports(&op.not_ports, &format!("{field}.notPorts"))?,
            });
        }
        let mut when = Vec::new();
        for (k, c) in rule.when.iter().enumerate() {
            if !supported_key(&c.key) {
                unsupported.push(format!("spec.rules[{i}].when[{k}].key {:?}", c.key));
                continue;
            }
            when.push(Condition {
                key: c.key.clone(),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            });
        }
        if !unsupported.is_empty() {
            let outcome = if allow {
                "rule dropped (it can never match)"
            } else {
                "ignored (the DENY rule matches more)"
            };
            problems.push(format!(
                "{object}: {}: not supported at the waypoint; {outcome}",
                unsupported.join(", ")
            ));
            if allow {
                continue 'rules;
            }
        }
        out.push(Rule { from, to, when });
    }
    Ok(out)
}

/// Translates every `targetRef(s)` policy into `out.l7_policies`.
pub(super) fn translate_all(
    snapshot: &Snapshot,
    settings: &Settings,
    waypoints: &Waypoints,
    services: &Services,
    out: &mut Output,
) {
    for ((ns, name), policy) in &snapshot.authorization_policies {
        let targets: Vec<&crds::PolicyTargetReference> = policy
            .spec
            .target_ref
            .iter()
            .chain(policy.spec.target_refs.iter())
            .collect();
        if targets.is_empty() {
            continue;
        }
        let object = format!("AuthorizationPolicy {ns}/{name}");
        let action = match policy.spec.action {
            crds::Action::Allow => Action::Allow,
            crds::Action::Deny => Action::Deny,
            crds::Action::Audit | crds::Action::Custom => {
                out.problems.push(format!(
                    "{object}: spec.action: {:?} is not supported at the waypoint; policy skipped",
                    policy.spec.action
                ));
                continue;
            }
        };
        // Waypoint → hostnames (None = the whole waypoint).
        let mut attached: BTreeMap<(String, String), Option<Vec<String>>> = BTreeMap::new();
        for (k, target) in targets.iter().enumerate() {
            let tns = target.namespace.clone().unwrap_or_else(|| ns.clone());
            match (target.group.as_str(), target.kind.as_str()) {
                ("gateway.networking.k8s.io", "Gateway") => {
                    if waypoints.get(&tns, &target.name).is_some() {
                        attached.insert((tns, target.name.clone()), None);
                    }
                }
                ("", "Service") => {
                    let Some(waypoint) = services
                        .by_name
                        .get(&(tns.clone(), target.name.clone()))
                        .and_then(|s| s.has_waypoint.clone())
                    else {
                        out.problems.push(format!(
                            "{object}: spec.targetRefs[{k}]: service {tns}/{} is not bound to a waypoint; target ignored",
                            target.name
                        ));
                        continue;
                    };
                    let host = service_hostname(&tns, &target.name, settings);
                    let entry = attached.entry(waypoint).or_insert_with(|| Some(Vec::new()));
                    if let Some(hosts) = entry {
                        hosts.push(host);
                    }
                }
                (group, kind) => out.problems.push(format!(
                    "{object}: spec.targetRefs[{k}]: unsupported target kind {group:?}/{kind:?}; target ignored"
                )),
            }
        }
        if attached.is_empty() {
            continue;
        }
        let allow = action == Action::Allow;
        let rules = match rules(
            policy,
            allow,
            &settings.authz.trust_domain,
            &object,
            &mut out.problems,
        ) {
            Ok(rules) => rules,
            Err(message) => {
                out.problems
                    .push(format!("{object}: {message}; published fail-closed"));
                if allow {
                    Vec::new()
                } else {
                    vec![Rule::default()]
                }
            }
        };
        for ((wns, wname), hosts) in attached {
            let mut services = hosts.unwrap_or_default();
            services.sort();
            services.dedup();
            out.l7_policies.insert(
                format!("{wns}/{wname}/{ns}/{name}"),
                Policy {
                    namespace: ns.clone(),
                    name: name.clone(),
                    action: action as i32,
                    services,
                    rules: rules.clone(),
                },
            );
        }
    }
}
