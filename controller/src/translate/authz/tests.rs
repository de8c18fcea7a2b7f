//! Table-driven tests: each case gives Istio objects (as the JSON the API server serves) and the
//! exact proto output.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};
use weft_k8s::crds::{AuthorizationPolicy, PeerAuthentication};
use weft_proto::istio::security::{
    Action, Address, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};

use super::*;

// ---- input builders ----

fn ap_with(metadata: Value, spec: Value) -> AuthorizationPolicy {
    serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": spec,
    }))
    .expect("test AuthorizationPolicy parses")
}

/// AuthorizationPolicy `p` in `ns`.
fn ap(ns: &str, spec: Value) -> AuthorizationPolicy {
    ap_with(json!({"name": "p", "namespace": ns}), spec)
}

/// PeerAuthentication `ns/name`, created at `created` (RFC 3339) if given.
fn pa(ns: &str, name: &str, created: Option<&str>, spec: Value) -> PeerAuthentication {
    let mut metadata = json!({"name": name, "namespace": ns});
    if let Some(created) = created {
        metadata["creationTimestamp"] = json!(created);
    }
    serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": metadata,
        "spec": spec,
    }))
    .expect("test PeerAuthentication parses")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---- output builders ----

fn ex(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    }
}
fn pre(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Prefix(s.into())),
    }
}
fn suf(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Suffix(s.into())),
    }
}
fn any() -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Presence(())),
    }
}
fn ip(s: &str, length: u32) -> Address {
    let address = match s.parse::<IpAddr>().expect("test IP parses") {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    Address { address, length }
}
fn sa(namespace: &str, name: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: namespace.into(),
        service_account: name.into(),
    }
}
/// A rule from its clauses, each a list of OR-ed matches.
fn rule(clauses: Vec<Vec<Match>>) -> Rule {
    Rule {
        clauses: clauses
            .into_iter()
            .map(|matches| Clause { matches })
            .collect(),
    }
}
fn authz(ns: &str, scope: Scope, action: Action, rules: Vec<Rule>) -> Authorization {
    Authorization {
        name: "p".into(),
        namespace: ns.into(),
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run: false,
        extensions: Vec::new(),
    }
}
fn no_principal_match() -> Match {
    Match {
        not_principals: vec![any()],
        ..Match::default()
    }
}

// ---- AuthorizationPolicy ----

#[test]
fn authorization_policy_translates() {
    use Action::{Allow, Deny};
    use Scope::{Global, Namespace, WorkloadSelector};
    let principals = |v: Vec<StringMatch>| Match {
        principals: v,
        ..Match::default()
    };
    let cases: Vec<(&str, AuthorizationPolicy, Option<Authorization>)> = vec![
        (
            "namespace scope, ALLOW default, principal string forms",
            ap(
                "a",
                json!({"rules": [{"from": [{"source": {"principals": [
                "cluster.local/ns/b/sa/c", "cluster.local/ns/b/*", "*/sa/c", "*"]}}]}]}),
            ),
            Some(authz(
                "a",
                Namespace,
                Allow,
                vec![rule(vec![vec![principals(vec![
                    ex("cluster.local/ns/b/sa/c"),
                    pre("cluster.local/ns/b/"),
                    suf("/sa/c"),
                    any(),
                ])]])],
            )),
        ),
        (
            "global scope in the root namespace, DENY, namespace string forms",
            ap(
                "istio-system",
                json!({"action": "DENY", "rules": [{"from": [{"source": {
                "namespaces": ["b", "kube-*", "*-prod", "*"]}}]}]}),
            ),
            Some(authz(
                "istio-system",
                Global,
                Deny,
                vec![rule(vec![vec![Match {
                    namespaces: vec![ex("b"), pre("kube-"), suf("-prod"), any()],
                    ..Match::default()
                }]])],
            )),
        ),
        (
            "selector scope",
            ap(
                "a",
                json!({"selector": {"matchLabels": {"app": "x"}}, "action": "ALLOW",
                "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}),
            ),
            Some(authz(
                "a",
                WorkloadSelector,
                Allow,
                vec![rule(vec![vec![Match {
                    destination_ports: vec![8080],
                    ..Match::default()
                }]])],
            )),
        ),
        (
            "selector in the root namespace stays selector scope",
            ap(
                "istio-system",
                json!({"selector": {"matchLabels": {"app": "x"}}, "rules": [{}]}),
            ),
            Some(authz(
                "istio-system",
                WorkloadSelector,
                Allow,
                vec![rule(vec![])],
            )),
        ),
        (
            "empty matchLabels is namespace scope",
            ap("a", json!({"selector": {"matchLabels": {}}, "rules": [{}]})),
            Some(authz("a", Namespace, Allow, vec![rule(vec![])])),
        ),
        (
            "every L4 source and operation field, ipBlocks v4/v6/bare, host bits masked",
            ap(
                "a",
                json!({"rules": [{
                    "from": [{"source": {
                        "principals": ["td/ns/b/sa/c"],
                        "notPrincipals": ["td/ns/b/sa/d"],
                        "namespaces": ["b"],
                        "notNamespaces": ["c"],
                        "ipBlocks": ["10.1.0.0/16", "10.9.9.9", "fd00::/8", "fd00::1", "192.168.1.77/24"],
                        "notIpBlocks": ["10.1.2.0/24", "fd00::2/128"],
                        "serviceAccounts": ["b/c"],
                        "notServiceAccounts": ["b/d"],
                    }}],
                    "to": [{"operation": {"ports": ["80", "65535"], "notPorts": ["1"]}}],
                }]}),
            ),
            Some(authz(
                "a",
                Namespace,
                Allow,
                vec![rule(vec![
                    vec![Match {
                        principals: vec![ex("td/ns/b/sa/c")],
                        not_principals: vec![ex("td/ns/b/sa/d")],
                        namespaces: vec![ex("b")],
                        not_namespaces: vec![ex("c")],
                        source_ips: vec![
                            ip("10.1.0.0", 16),
                            ip("10.9.9.9", 32),
                            ip("fd00::", 8),
                            ip("fd00::1", 128),
                            ip("192.168.1.0", 24),
                        ],
                        not_source_ips: vec![ip("10.1.2.0", 24), ip("fd00::2", 128)],
                        service_accounts: vec![sa("b", "c")],
                        not_service_accounts: vec![sa("b", "d")],
                        ..Match::default()
                    }],
                    vec![Match {
                        destination_ports: vec![80, 65535],
                        not_destination_ports: vec![1],
                        ..Match::default()
                    }],
                ])],
            )),
        ),
        (
            "from entries OR-ed, to entries OR-ed; clauses from, to, then one per when",
            ap(
                "a",
                json!({"rules": [{
                    "from": [{"source": {"namespaces": ["b"]}}, {"source": {"principals": ["x"]}}],
                    "to": [{"operation": {"ports": ["80"]}}, {"operation": {"notPorts": ["81"]}}],
                    "when": [
                        {"key": "source.ip", "values": ["10.0.0.0/8"]},
                        {"key": "destination.port", "values": ["80"]},
                    ],
                }]}),
            ),
            Some(authz(
                "a",
                Namespace,
                Allow,
                vec![rule(vec![
                    vec![
                        Match {
                            namespaces: vec![ex("b")],
                            ..Match::default()
                        },
                        Match {
                            principals: vec![ex("x")],
                            ..Match::default()
                        },
                    ],
                    vec![
                        Match {
                            destination_ports: vec![80],
                            ..Match::default()
                        },
                        Match {
                            not_destination_ports: vec![81],
                            ..Match::default()
                        },
                    ],
                    vec![Match {
                        source_ips: vec![ip("10.0.0.0", 8)],
                        ..Match::default()
                    }],
                    vec![Match {
                        destination_ports: vec![80],
                        ..Match::default()
                    }],
                ])],
            )),
        ),
        (
            "every L4 when key, values and notValues",
            ap(
                "a",
                json!({"rules": [{"when": [
                    {"key": "source.ip", "values": ["10.0.0.1"], "notValues": ["10.0.0.2/31"]},
                    {"key": "source.namespace", "values": ["b*"], "notValues": ["bad"]},
                    {"key": "source.principal", "values": ["*"], "notValues": ["*/sa/x"]},
                    {"key": "destination.ip", "values": ["::1"], "notValues": ["10.0.0.0/8"]},
                    {"key": "destination.port", "values": ["443"], "notValues": ["8443"]},
                ]}]}),
            ),
            Some(authz(
                "a",
                Namespace,
                Allow,
                vec![rule(vec![
                    vec![Match {
                        source_ips: vec![ip("10.0.0.1", 32)],
                        not_source_ips: vec![ip("10.0.0.2", 31)],
                        ..Match::default()
                    }],
                    vec![Match {
                        namespaces: vec![pre("b")],
                        not_namespaces: vec![ex("bad")],
                        ..Match::default()
                    }],
                    vec![Match {
                        principals: vec![any()],
                        not_principals: vec![suf("/sa/x")],
                        ..Match::default()
                    }],
                    vec![Match {
                        destination_ips: vec![ip("::1", 128)],
                        not_destination_ips: vec![ip("10.0.0.0", 8)],
                        ..Match::default()
                    }],
                    vec![Match {
                        destination_ports: vec![443],
                        not_destination_ports: vec![8443],
                        ..Match::default()
                    }],
                ])],
            )),
        ),
        (
            "empty rule matches everything",
            ap("a", json!({"rules": [{}]})),
            Some(authz("a", Namespace, Allow, vec![rule(vec![])])),
        ),
        (
            "rules: [] matches nothing",
            ap("a", json!({"rules": []})),
            Some(authz("a", Namespace, Allow, vec![])),
        ),
        (
            "empty spec matches nothing (allow-nothing policy)",
            ap("a", json!({})),
            Some(authz("a", Namespace, Allow, vec![])),
        ),
        (
            "ALLOW: rules with L7 attributes dropped, L4 rules kept",
            ap(
                "a",
                json!({"rules": [
                    {"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]},
                    {"from": [{"source": {"principals": ["keep"]}}]},
                    {"when": [{"key": "request.headers[x-user]", "values": ["y"]}]},
                    {"from": [{"source": {"namespaces": ["b"], "requestPrincipals": ["*"]}}]},
                    {"from": [{"source": {"notRemoteIpBlocks": ["1.2.3.4"]}}]},
                    {"to": [{"operation": {"ports": ["81"]}}, {"operation": {"notPaths": ["/x"]}}]},
                    {"to": [{"operation": {"hosts": ["h"]}}]},
                ]}),
            ),
            Some(authz(
                "a",
                Namespace,
                Allow,
                vec![rule(vec![vec![Match {
                    principals: vec![ex("keep")],
                    ..Match::default()
                }]])],
            )),
        ),
        (
            "ALLOW: every rule L7 leaves a policy with no rules (denies)",
            ap(
                "a",
                json!({"rules": [
                    {"to": [{"operation": {"paths": ["/admin"]}}]},
                    {"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]},
                ]}),
            ),
            Some(authz("a", Namespace, Allow, vec![])),
        ),
        (
            "DENY: L7 parts dropped, L4 parts kept",
            ap(
                "a",
                json!({"action": "DENY", "rules": [{
                    "from": [{"source": {"principals": ["x"], "notRequestPrincipals": ["r"],
                                         "remoteIpBlocks": ["1.2.3.4"]}}],
                    "to": [{"operation": {"methods": ["GET"], "notHosts": ["h"], "ports": ["80"]}}],
                    "when": [
                        {"key": "request.auth.claims[iss]", "values": ["i"]},
                        {"key": "destination.port", "notValues": ["81"]},
                    ],
                }]}),
            ),
            Some(authz(
                "a",
                Namespace,
                Deny,
                vec![rule(vec![
                    vec![Match {
                        principals: vec![ex("x")],
                        ..Match::default()
                    }],
                    vec![Match {
                        destination_ports: vec![80],
                        ..Match::default()
                    }],
                    vec![Match {
                        not_destination_ports: vec![81],
                        ..Match::default()
                    }],
                ])],
            )),
        ),
        (
            "DENY: an all-L7 entry makes its clause match everything, so the clause goes",
            ap(
                "a",
                json!({"action": "DENY", "rules": [{
                    "from": [{"source": {"namespaces": ["b"]}}],
                    "to": [{"operation": {"methods": ["POST"]}}, {"operation": {"ports": ["80"]}}],
                    "when": [{"key": "request.headers[x]", "values": ["y"]}],
                }, {
                    "to": [{"operation": {"paths": ["/admin"]}}],
                }]}),
            ),
            Some(authz(
                "a",
                Namespace,
                Deny,
                vec![
                    rule(vec![vec![Match {
                        namespaces: vec![ex("b")],
                        ..Match::default()
                    }]]),
                    rule(vec![]),
                ],
            )),
        ),
        (
            "targetRef: for a waypoint",
            ap(
                "a",
                json!({"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io",
                "name": "w"}, "rules": [{}]}),
            ),
            None,
        ),
        (
            "targetRefs: for a waypoint",
            ap(
                "a",
                json!({"targetRefs": [{"kind": "Service", "group": "", "name": "s"}],
                "action": "DENY", "rules": [{}]}),
            ),
            None,
        ),
        (
            "AUDIT: not for ztunnel",
            ap("a", json!({"action": "AUDIT", "rules": [{}]})),
            None,
        ),
        (
            "CUSTOM: not for ztunnel",
            ap(
                "a",
                json!({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{}]}),
            ),
            None,
        ),
        (
            "dry-run annotation",
            ap_with(
                json!({"name": "p", "namespace": "a",
                    "annotations": {"istio.io/dry-run": "true"}}),
                json!({"action": "DENY", "rules": [{}]}),
            ),
            Some(Authorization {
                dry_run: true,
                ..authz("a", Namespace, Deny, vec![rule(vec![])])
            }),
        ),
        (
            "dry-run annotation other than \"true\" is ignored",
            ap_with(
                json!({"name": "p", "namespace": "a",
                    "annotations": {"istio.io/dry-run": "false"}}),
                json!({"action": "DENY", "rules": [{}]}),
            ),
            Some(authz("a", Namespace, Deny, vec![rule(vec![])])),
        ),
    ];
    for (name, policy, want) in cases {
        let got = authorization_policy(&policy, &Settings::default());
        assert_eq!(got, Ok(want), "case: {name}");
    }
}

#[test]
fn authorization_policy_honours_root_namespace_setting() {
    let settings = Settings {
        root_namespace: "mesh-root".into(),
        ..Settings::default()
    };
    let global = ap("mesh-root", json!({"rules": [{}]}));
    let not_global = ap("istio-system", json!({"rules": [{}]}));
    assert_eq!(
        authorization_policy(&global, &settings),
        Ok(Some(authz(
            "mesh-root",
            Scope::Global,
            Action::Allow,
            vec![rule(vec![])]
        )))
    );
    assert_eq!(
        authorization_policy(&not_global, &settings),
        Ok(Some(authz(
            "istio-system",
            Scope::Namespace,
            Action::Allow,
            vec![rule(vec![])]
        )))
    );
}

#[test]
fn authorization_policy_problems_name_the_field() {
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "prefix length too long",
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "10.0.0.0/33"]}}]}]}),
            "spec.rules[0].from[0].source.ipBlocks[1]",
            "invalid prefix length in CIDR \"10.0.0.0/33\"",
        ),
        (
            "v6 prefix length too long",
            json!({"rules": [{"from": [{"source": {"notIpBlocks": ["fd00::/129"]}}]}]}),
            "spec.rules[0].from[0].source.notIpBlocks[0]",
            "invalid prefix length in CIDR \"fd00::/129\"",
        ),
        (
            "empty prefix length",
            json!({"rules": [{}, {"from": [{"source": {"ipBlocks": ["10.0.0.0/"]}}]}]}),
            "spec.rules[1].from[0].source.ipBlocks[0]",
            "invalid prefix length in CIDR \"10.0.0.0/\"",
        ),
        (
            "not an IP",
            json!({"rules": [{"from": [{"source": {"principals": ["x"]}},
                                       {"source": {"notIpBlocks": ["example.com"]}}]}]}),
            "spec.rules[0].from[1].source.notIpBlocks[0]",
            "invalid IP address or CIDR \"example.com\"",
        ),
        (
            "port zero",
            json!({"rules": [{"to": [{"operation": {"ports": ["0"]}}]}]}),
            "spec.rules[0].to[0].operation.ports[0]",
            "invalid port \"0\": want a number in 1-65535",
        ),
        (
            "port too large",
            json!({"rules": [{"to": [{"operation": {"notPorts": ["80", "65536"]}}]}]}),
            "spec.rules[0].to[0].operation.notPorts[1]",
            "invalid port \"65536\": want a number in 1-65535",
        ),
        (
            "port name",
            json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
            "spec.rules[0].to[0].operation.ports[0]",
            "invalid port \"http\": want a number in 1-65535",
        ),
        (
            "signed port",
            json!({"rules": [{"to": [{"operation": {"ports": ["+80"]}}]}]}),
            "spec.rules[0].to[0].operation.ports[0]",
            "invalid port \"+80\": want a number in 1-65535",
        ),
        (
            "when destination.port",
            json!({"rules": [{"when": [{"key": "destination.port", "values": ["80", "x"]}]}]}),
            "spec.rules[0].when[0].values[1]",
            "invalid port \"x\": want a number in 1-65535",
        ),
        (
            "when source.ip notValues",
            json!({"rules": [{"when": [{"key": "source.ip", "notValues": ["1.2.3"]}]}]}),
            "spec.rules[0].when[0].notValues[0]",
            "invalid IP address or CIDR \"1.2.3\"",
        ),
        (
            "when destination.ip",
            json!({"rules": [{"when": [{"key": "destination.ip", "values": ["1.2.3.4/x"]}]}]}),
            "spec.rules[0].when[0].values[0]",
            "invalid prefix length in CIDR \"1.2.3.4/x\"",
        ),
        (
            "service account without namespace",
            json!({"rules": [{"from": [{"source": {"serviceAccounts": ["sleep"]}}]}]}),
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "service account \"sleep\" is not of the form namespace/name",
        ),
        (
            "service account with two slashes",
            json!({"rules": [{"from": [{"source": {"notServiceAccounts": ["a/b/c"]}}]}]}),
            "spec.rules[0].from[0].source.notServiceAccounts[0]",
            "service account \"a/b/c\" is not of the form namespace/name",
        ),
        (
            "service account with empty namespace",
            json!({"rules": [{"from": [{"source": {"serviceAccounts": ["/b"]}}]}]}),
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "service account \"/b\" is not of the form namespace/name",
        ),
        (
            "empty source",
            json!({"rules": [{"from": [{"source": {}}]}]}),
            "spec.rules[0].from[0].source",
            "source must not be empty",
        ),
        (
            "empty operation",
            json!({"rules": [{"to": [{"operation": {}}]}]}),
            "spec.rules[0].to[0].operation",
            "operation must not be empty",
        ),
        (
            "condition without values",
            json!({"rules": [{"when": [{"key": "source.ip"}]}]}),
            "spec.rules[0].when[0]",
            "condition on \"source.ip\" needs values or notValues",
        ),
        (
            "condition without key",
            json!({"rules": [{"when": [{"key": "", "values": ["x"]}]}]}),
            "spec.rules[0].when[0].key",
            "key must not be empty",
        ),
        (
            "bad value inside a rule dropped as L7 is still reported",
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/40"]}}],
                               "to": [{"operation": {"methods": ["GET"]}}]}]}),
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "invalid prefix length in CIDR \"10.0.0.0/40\"",
        ),
    ];
    for (name, spec, field, message) in cases {
        let got = authorization_policy(&ap("a", spec), &Settings::default());
        let want = Problem {
            object: "AuthorizationPolicy a/p".into(),
            field: field.into(),
            message: message.into(),
        };
        assert_eq!(got, Err(want), "case: {name}");
    }
}

#[test]
fn problem_displays_object_field_and_message() {
    let problem = Problem {
        object: "AuthorizationPolicy a/p".into(),
        field: "spec.rules[0].to[0].operation.ports[0]".into(),
        message: "invalid port \"0\": want a number in 1-65535".into(),
    };
    assert_eq!(
        problem.to_string(),
        "AuthorizationPolicy a/p: spec.rules[0].to[0].operation.ports[0]: \
         invalid port \"0\": want a number in 1-65535"
    );
}

#[test]
fn fail_closed_stand_ins() {
    let settings = Settings::default();
    let bad = json!({"ipBlocks": ["nope"]});
    let allow = ap("a", json!({"rules": [{"from": [{"source": bad}]}]}));
    let deny = ap(
        "a",
        json!({"action": "DENY", "selector": {"matchLabels": {"app": "x"}},
            "rules": [{"from": [{"source": bad}]}]}),
    );
    let audit = ap(
        "a",
        json!({"action": "AUDIT", "rules": [{"from": [{"source": bad}]}]}),
    );
    assert_eq!(
        fail_closed(&allow, &settings),
        Some(authz("a", Scope::Namespace, Action::Allow, vec![]))
    );
    assert_eq!(
        fail_closed(&deny, &settings),
        Some(authz(
            "a",
            Scope::WorkloadSelector,
            Action::Deny,
            vec![rule(vec![])]
        ))
    );
    assert_eq!(fail_closed(&audit, &settings), None);
}

#[test]
fn selects_pods() {
    let app_x = json!({"selector": {"matchLabels": {"app": "x"}}, "rules": [{}]});
    let pod_x = labels(&[("app", "x"), ("version", "v1")]);
    let pod_y = labels(&[("app", "y")]);
    /// (case, policy, pod namespace, pod labels, selected?)
    type Case<'a> = (
        &'a str,
        AuthorizationPolicy,
        &'a str,
        &'a BTreeMap<String, String>,
        bool,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "same namespace, labels match",
            ap("a", app_x.clone()),
            "a",
            &pod_x,
            true,
        ),
        (
            "other namespace",
            ap("b", app_x.clone()),
            "a",
            &pod_x,
            false,
        ),
        (
            "root namespace applies everywhere",
            ap("istio-system", app_x.clone()),
            "a",
            &pod_x,
            true,
        ),
        (
            "labels do not match",
            ap("a", app_x.clone()),
            "a",
            &pod_y,
            false,
        ),
        (
            "selector needs every label",
            ap(
                "a",
                json!({"selector": {"matchLabels": {"app": "x", "version": "v2"}}}),
            ),
            "a",
            &pod_x,
            false,
        ),
        (
            "namespace-scoped policy is not listed",
            ap("a", json!({"rules": [{}]})),
            "a",
            &pod_x,
            false,
        ),
        (
            "empty selector is namespace-scoped",
            ap("a", json!({"selector": {"matchLabels": {}}})),
            "a",
            &pod_x,
            false,
        ),
        (
            "global policy is not listed",
            ap("istio-system", json!({"rules": [{}]})),
            "a",
            &pod_x,
            false,
        ),
        (
            "targetRef'd policy is for a waypoint",
            ap(
                "a",
                json!({"selector": {"matchLabels": {"app": "x"}},
                "targetRefs": [{"kind": "Service", "group": "", "name": "s"}]}),
            ),
            "a",
            &pod_x,
            false,
        ),
        (
            "AUDIT policy is not for ztunnel",
            ap(
                "a",
                json!({"selector": {"matchLabels": {"app": "x"}}, "action": "AUDIT"}),
            ),
            "a",
            &pod_x,
            false,
        ),
    ];
    for (name, policy, pod_ns, pod_labels, want) in cases {
        assert_eq!(
            selects(&policy, pod_ns, pod_labels, &Settings::default()),
            want,
            "case: {name}"
        );
    }
}

// ---- PeerAuthentication ----

const STRICT_KEY: &str = "istio-system/istio_converted_static_strict";

fn outcome(keys: &[&str], extra: Vec<Authorization>) -> PeerAuthOutcome {
    PeerAuthOutcome {
        policy_keys: keys.iter().map(|k| k.to_string()).collect(),
        extra,
        problems: Vec::new(),
    }
}

/// The port-level policy Weft publishes for PeerAuthentication `ns/name`.
fn port_policy(ns: &str, name: &str, m: Match) -> Authorization {
    Authorization {
        name: format!("istio_converted_peer_authentication_{name}"),
        namespace: ns.into(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![rule(vec![vec![m]])],
        dry_run: false,
        extensions: Vec::new(),
    }
}

#[test]
fn peer_authentication_resolves_modes() {
    let mode = |m: &str| json!({"mtls": {"mode": m}});
    let sel = |m: &str| json!({"selector": {"matchLabels": {"app": "x"}}, "mtls": {"mode": m}});
    let t1 = Some("2024-01-01T00:00:00Z");
    let t2 = Some("2024-06-01T00:00:00Z");
    let cases: Vec<(&str, &str, Vec<PeerAuthentication>, PeerAuthOutcome)> = vec![
        (
            "no PeerAuthentication: PERMISSIVE",
            "a",
            vec![],
            outcome(&[], vec![]),
        ),
        (
            "mesh STRICT",
            "a",
            vec![pa("istio-system", "mesh", t1, mode("STRICT"))],
            outcome(&[STRICT_KEY], vec![]),
        ),
        (
            "mesh STRICT applies in the root namespace too",
            "istio-system",
            vec![pa("istio-system", "mesh", t1, mode("STRICT"))],
            outcome(&[STRICT_KEY], vec![]),
        ),
        (
            "mesh PERMISSIVE",
            "a",
            vec![pa("istio-system", "mesh", t1, mode("PERMISSIVE"))],
            outcome(&[], vec![]),
        ),
        (
            "namespace PERMISSIVE overrides mesh STRICT",
            "a",
            vec![
                pa("istio-system", "mesh", t1, mode("STRICT")),
                pa("a", "ns", t1, mode("PERMISSIVE")),
            ],
            outcome(&[], vec![]),
        ),
        (
            "namespace DISABLE overrides mesh STRICT",
            "a",
            vec![
                pa("istio-system", "mesh", t1, mode("STRICT")),
                pa("a", "ns", t1, mode("DISABLE")),
            ],
            outcome(&[], vec![]),
        ),
        (
            "another namespace's STRICT does not apply",
            "a",
            vec![pa("b", "ns", t1, mode("STRICT"))],
            outcome(&[], vec![]),
        ),
        (
            "workload STRICT overrides namespace PERMISSIVE",
            "a",
            vec![
                pa("a", "ns", t1, mode("PERMISSIVE")),
                pa("a", "w", t1, sel("STRICT")),
            ],
            outcome(&[STRICT_KEY], vec![]),
        ),
        (
            "workload PERMISSIVE overrides mesh STRICT",
            "a",
            vec![
                pa("istio-system", "mesh", t1, mode("STRICT")),
                pa("a", "w", t1, sel("PERMISSIVE")),
            ],
            outcome(&[], vec![]),
        ),
        (
            "workload STRICT whose labels do not match",
            "a",
            vec![pa(
                "a",
                "w",
                t1,
                json!({"selector": {"matchLabels": {"app": "y"}}, "mtls": {"mode": "STRICT"}}),
            )],
            outcome(&[], vec![]),
        ),
        (
            "workload STRICT in another namespace (even the root) does not apply",
            "a",
            vec![
                pa("istio-system", "w", t1, sel("STRICT")),
                pa("b", "w", t1, sel("STRICT")),
            ],
            outcome(&[], vec![]),
        ),
        (
            "workload UNSET inherits namespace STRICT",
            "a",
            vec![
                pa("a", "ns", t1, mode("STRICT")),
                pa("a", "w", t1, sel("UNSET")),
            ],
            outcome(&[STRICT_KEY], vec![]),
        ),
        (
            "namespace UNSET and workload without mtls inherit mesh STRICT",
            "a",
            vec![
                pa("istio-system", "mesh", t1, mode("STRICT")),
                pa("a", "ns", t1, mode("UNSET")),
                pa(
                    "a",
                    "w",
                    t1,
                    json!({"selector": {"matchLabels": {"app": "x"}}}),
                ),
            ],
            outcome(&[STRICT_KEY], vec![]),
        ),
        (
            "oldest of two workload PAs wins (older PERMISSIVE)",
            "a",
            vec![
                pa("a", "new", t2, sel("STRICT")),
                pa("a", "old", t1, sel("PERMISSIVE")),
            ],
            outcome(&[], vec![]),
        ),
        (
            "oldest of two workload PAs wins (older STRICT)",
            "a",
            vec![
                pa("a", "old", t1, sel("STRICT")),
                pa("a", "new", t2, sel("PERMISSIVE")),
            ],
            outcome(&[STRICT_KEY], vec![]),
        ),
        (
            "same creation time: smaller name wins",
            "a",
            vec![
                pa("a", "b", t1, sel("PERMISSIVE")),
                pa("a", "a", t1, sel("STRICT")),
            ],
            outcome(&[STRICT_KEY], vec![]),
        ),
        (
            "missing creation time counts as newest",
            "a",
            vec![
                pa("a", "a", None, sel("STRICT")),
                pa("a", "b", t2, sel("PERMISSIVE")),
            ],
            outcome(&[], vec![]),
        ),
        (
            "oldest of two namespace PAs wins",
            "a",
            vec![
                pa("a", "new", t2, mode("PERMISSIVE")),
                pa("a", "old", t1, mode("STRICT")),
            ],
            outcome(&[STRICT_KEY], vec![]),
        ),
    ];
    for (name, pod_ns, pas, want) in cases {
        let got = peer_authentication(pod_ns, &labels(&[("app", "x")]), &pas, &Settings::default());
        assert_eq!(got, want, "case: {name}");
    }
}

#[test]
fn peer_authentication_port_level() {
    let t1 = Some("2024-01-01T00:00:00Z");
    let w = |mode: Value, ports: Value| {
        let mut spec = json!({"selector": {"matchLabels": {"app": "x"}}, "portLevelMtls": ports});
        if !mode.is_null() {
            spec["mtls"] = json!({"mode": mode});
        }
        pa("a", "w", t1, spec)
    };
    let mesh_strict = pa(
        "istio-system",
        "mesh",
        t1,
        json!({"mtls": {"mode": "STRICT"}}),
    );
    let key = "a/istio_converted_peer_authentication_w";
    let cases: Vec<(&str, Vec<PeerAuthentication>, PeerAuthOutcome)> = vec![
        (
            "PERMISSIVE/DISABLE ports carved out of workload STRICT",
            vec![w(
                json!("STRICT"),
                json!({"9090": {"mode": "DISABLE"}, "8080": {"mode": "PERMISSIVE"},
                       "7070": {"mode": "STRICT"}, "6060": {"mode": "UNSET"}}),
            )],
            outcome(
                &[key],
                vec![port_policy(
                    "a",
                    "w",
                    Match {
                        not_destination_ports: vec![8080, 9090],
                        ..no_principal_match()
                    },
                )],
            ),
        ),
        (
            "PERMISSIVE port carved out of inherited mesh STRICT",
            vec![
                mesh_strict.clone(),
                w(Value::Null, json!({"8080": {"mode": "PERMISSIVE"}})),
            ],
            outcome(
                &[key],
                vec![port_policy(
                    "a",
                    "w",
                    Match {
                        not_destination_ports: vec![8080],
                        ..no_principal_match()
                    },
                )],
            ),
        ),
        (
            "STRICT ports under workload PERMISSIVE",
            vec![w(
                json!("PERMISSIVE"),
                json!({"8443": {"mode": "STRICT"}, "443": {"mode": "STRICT"},
                       "80": {"mode": "PERMISSIVE"}}),
            )],
            outcome(
                &[key],
                vec![port_policy(
                    "a",
                    "w",
                    Match {
                        destination_ports: vec![443, 8443],
                        ..no_principal_match()
                    },
                )],
            ),
        ),
        (
            "STRICT port under the default (no other PA)",
            vec![w(Value::Null, json!({"443": {"mode": "STRICT"}}))],
            outcome(
                &[key],
                vec![port_policy(
                    "a",
                    "w",
                    Match {
                        destination_ports: vec![443],
                        ..no_principal_match()
                    },
                )],
            ),
        ),
        (
            "STRICT port under workload DISABLE",
            vec![
                mesh_strict.clone(),
                w(json!("DISABLE"), json!({"443": {"mode": "STRICT"}})),
            ],
            outcome(
                &[key],
                vec![port_policy(
                    "a",
                    "w",
                    Match {
                        destination_ports: vec![443],
                        ..no_principal_match()
                    },
                )],
            ),
        ),
        (
            "only STRICT ports under STRICT: plain static strict",
            vec![w(json!("STRICT"), json!({"443": {"mode": "STRICT"}}))],
            outcome(&[STRICT_KEY], vec![]),
        ),
        (
            "only PERMISSIVE ports under PERMISSIVE: nothing",
            vec![w(
                json!("PERMISSIVE"),
                json!({"80": {"mode": "PERMISSIVE"}}),
            )],
            outcome(&[], vec![]),
        ),
        (
            "port-level modes of a namespace-wide PA are ignored",
            vec![pa(
                "a",
                "ns",
                t1,
                json!({"mtls": {"mode": "STRICT"},
                "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
            )],
            outcome(&[STRICT_KEY], vec![]),
        ),
    ];
    for (name, pas, want) in cases {
        let got = peer_authentication("a", &labels(&[("app", "x")]), &pas, &Settings::default());
        assert_eq!(got, want, "case: {name}");
    }
}

#[test]
fn peer_authentication_reports_bad_port_keys() {
    let bad = pa(
        "a",
        "w",
        None,
        json!({"selector": {"matchLabels": {"app": "x"}}, "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"http": {"mode": "PERMISSIVE"}, "0": {"mode": "PERMISSIVE"}}}),
    );
    let got = peer_authentication("a", &labels(&[("app", "x")]), [&bad], &Settings::default());
    let problem = |key: &str| Problem {
        object: "PeerAuthentication a/w".into(),
        field: format!("spec.portLevelMtls[{key}]"),
        message: format!("invalid port {key:?}: want a number in 1-65535"),
    };
    assert_eq!(
        got,
        PeerAuthOutcome {
            policy_keys: vec![STRICT_KEY.into()],
            extra: Vec::new(),
            problems: vec![problem("0"), problem("http")],
        }
    );
}

// ---- fixed policies ----

#[test]
fn static_strict_shape() {
    let settings = Settings {
        root_namespace: "mesh-root".into(),
        ..Settings::default()
    };
    assert_eq!(
        static_strict(&settings),
        Authorization {
            name: "istio_converted_static_strict".into(),
            namespace: "mesh-root".into(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules: vec![rule(vec![vec![no_principal_match()]])],
            dry_run: false,
            extensions: Vec::new(),
        }
    );
}

#[test]
fn allow_from_waypoint_shape() {
    let identities = vec![
        "spiffe://cluster.local/ns/w/sa/waypoint".to_string(),
        "cluster.local/ns/w/sa/other".to_string(),
    ];
    let want = |rules| Authorization {
        name: "istio_allow_waypoint_w_waypoint".into(),
        namespace: "w".into(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Allow as i32,
        rules,
        dry_run: false,
        extensions: Vec::new(),
    };
    assert_eq!(
        allow_from_waypoint("w", "waypoint", &identities, &Settings::default()),
        want(vec![rule(vec![vec![Match {
            principals: vec![
                ex("cluster.local/ns/w/sa/waypoint"),
                ex("cluster.local/ns/w/sa/other")
            ],
            ..Match::default()
        }]])])
    );
    assert_eq!(
        allow_from_waypoint("w", "waypoint", &[], &Settings::default()),
        want(vec![])
    );
}

#[test]
fn every_l4_when_key_is_kept_in_allow_policies() {
    for key in L4_WHEN_KEYS {
        let value = if key.ends_with(".ip") {
            "10.0.0.1"
        } else {
            "443"
        };
        let policy = ap(
            "a",
            json!({"rules": [{"when": [{"key": key, "values": [value]}]}]}),
        );
        let got = authorization_policy(&policy, &Settings::default()).expect("translates");
        let rules = got.expect("for ztunnel").rules;
        assert_eq!(rules.len(), 1, "key {key}");
        assert_eq!(rules[0].clauses.len(), 1, "key {key}");
    }
}
