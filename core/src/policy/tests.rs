use std::net::IpAddr;

use weft_proto::istio::security as pb;
use weft_proto::istio::workload as wpb;

use super::*;
use crate::identity::SpiffeId;
use crate::state::{self, CidrError};

// === fixtures ===

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn string(m: pb::string_match::MatchType) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(m),
    }
}

fn exact(s: &str) -> pb::StringMatch {
    string(pb::string_match::MatchType::Exact(s.into()))
}

fn prefix(s: &str) -> pb::StringMatch {
    string(pb::string_match::MatchType::Prefix(s.into()))
}

fn suffix(s: &str) -> pb::StringMatch {
    string(pb::string_match::MatchType::Suffix(s.into()))
}

fn presence() -> pb::StringMatch {
    string(pb::string_match::MatchType::Presence(()))
}

fn cidr(addr: &str, length: u32) -> pb::Address {
    let address = match ip(addr) {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    pb::Address { address, length }
}

fn sa(namespace: &str, service_account: &str) -> pb::ServiceAccountMatch {
    pb::ServiceAccountMatch {
        namespace: namespace.into(),
        service_account: service_account.into(),
    }
}

fn ports(ports: &[u32]) -> pb::Match {
    pb::Match {
        destination_ports: ports.to_vec(),
        ..Default::default()
    }
}

/// Rules as nested lists: rules → clauses → matches.
type Nested = Vec<Vec<Vec<pb::Match>>>;

fn rules(rules: Nested) -> Vec<pb::Rule> {
    rules
        .into_iter()
        .map(|clauses| pb::Rule {
            clauses: clauses
                .into_iter()
                .map(|matches| pb::Clause { matches })
                .collect(),
        })
        .collect()
}

fn authorization(
    namespace: &str,
    name: &str,
    scope: pb::Scope,
    action: pb::Action,
    rules: Vec<pb::Rule>,
) -> pb::Authorization {
    pb::Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run: false,
        extensions: Vec::new(),
    }
}

fn policy(name: &str, action: pb::Action, rules: Vec<pb::Rule>) -> Policy {
    Policy::try_from(authorization(
        "app",
        name,
        pb::Scope::Namespace,
        action,
        rules,
    ))
    .unwrap()
}

/// A policy with one rule of one clause holding `m`.
fn single(m: pb::Match) -> Policy {
    policy("p", pb::Action::Allow, rules(vec![vec![vec![m]]]))
}

fn conn(identity: Option<&str>) -> Connection {
    Connection {
        src_ip: ip("10.0.0.1"),
        dst_ip: ip("10.0.1.1"),
        dst_port: 8080,
        src_identity: identity.map(|s| s.parse::<SpiffeId>().unwrap()),
    }
}

const CLIENT: &str = "spiffe://cluster.local/ns/app/sa/client";

// === evaluation order (§6.2) ===

#[test]
fn evaluation_order() {
    use pb::Action::{Allow, Deny};
    // (action, dry run, matches): a matching policy allows port 8080, a non-matching one 81.
    type Spec = (pb::Action, bool, bool);
    let build = |specs: &[Spec]| -> Vec<Policy> {
        specs
            .iter()
            .enumerate()
            .map(|(i, &(action, dry_run, hit))| {
                let port = if hit { 8080 } else { 81 };
                let mut a = authorization(
                    "app",
                    &format!("p{i}"),
                    pb::Scope::Namespace,
                    action,
                    rules(vec![vec![vec![ports(&[port])]]]),
                );
                a.dry_run = dry_run;
                Policy::try_from(a).unwrap()
            })
            .collect()
    };
    let denied_by = |key: &str| Verdict::Deny(DenyReason::Policy { policy: key.into() });
    let none_allowed = Verdict::Deny(DenyReason::NoAllowMatched);
    let cases: Vec<(&str, Vec<Spec>, Verdict)> = vec![
        ("no policies", vec![], Verdict::Allow),
        (
            "matching deny",
            vec![(Deny, false, true)],
            denied_by("app/p0"),
        ),
        (
            "non-matching deny",
            vec![(Deny, false, false)],
            Verdict::Allow,
        ),
        (
            "allow exists, none matches",
            vec![(Allow, false, false)],
            none_allowed.clone(),
        ),
        ("matching allow", vec![(Allow, false, true)], Verdict::Allow),
        (
            "deny beats allow (allow first)",
            vec![(Allow, false, true), (Deny, false, true)],
            denied_by("app/p1"),
        ),
        (
            "deny beats allow (deny first)",
            vec![(Deny, false, true), (Allow, false, true)],
            denied_by("app/p0"),
        ),
        (
            "any allow suffices",
            vec![(Allow, false, false), (Allow, false, true)],
            Verdict::Allow,
        ),
        (
            "non-matching deny, non-matching allow",
            vec![(Deny, false, false), (Allow, false, false)],
            none_allowed.clone(),
        ),
        (
            "dry-run deny not enforced",
            vec![(Deny, true, true)],
            Verdict::Allow,
        ),
        (
            "dry-run allow does not require allow",
            vec![(Allow, true, false)],
            Verdict::Allow,
        ),
        (
            "dry-run allow does not allow",
            vec![(Allow, true, true), (Allow, false, false)],
            none_allowed,
        ),
    ];
    for (name, specs, want) in cases {
        let policies = build(&specs);
        assert_eq!(evaluate(&policies, &conn(Some(CLIENT))), want, "{name}");
    }
}

#[test]
fn deny_reasons_read_like_upstream() {
    assert_eq!(
        DenyReason::Policy {
            policy: "app/deny".into()
        }
        .to_string(),
        "explicitly denied by app/deny"
    );
    assert_eq!(
        DenyReason::NoAllowMatched.to_string(),
        "allow policies exist, but none allowed"
    );
}

#[test]
fn dry_run_matches_lists_matching_dry_run_policies_only() {
    let mut dry = authorization(
        "app",
        "dry",
        pb::Scope::Namespace,
        pb::Action::Deny,
        rules(vec![vec![vec![ports(&[8080])]]]),
    );
    dry.dry_run = true;
    let mut dry_miss = dry.clone();
    dry_miss.name = "dry-miss".into();
    dry_miss.rules = rules(vec![vec![vec![ports(&[81])]]]);
    let policies = [
        Policy::try_from(dry).unwrap(),
        Policy::try_from(dry_miss).unwrap(),
        single(ports(&[8080])),
    ];
    let keys: Vec<&str> = dry_run_matches(&policies, &conn(None))
        .map(Policy::key)
        .collect();
    assert_eq!(keys, vec!["app/dry"]);
}

// === structure (§6.3) ===

#[test]
fn rule_clause_and_match_structure() {
    let hit = || ports(&[8080]);
    let miss = || ports(&[81]);
    let cases: Vec<(&str, Nested, bool)> = vec![
        ("no rules never matches", vec![], false),
        ("rule without clauses matches", vec![vec![]], true),
        ("clause without matches matches", vec![vec![vec![]]], true),
        (
            "empty match never matches",
            vec![vec![vec![pb::Match::default()]]],
            false,
        ),
        (
            "match with only extensions is empty",
            vec![vec![vec![pb::Match {
                extensions: vec![wpb::Extension::default()],
                ..Default::default()
            }]]],
            false,
        ),
        (
            "empty match skipped, next one matches",
            vec![vec![vec![pb::Match::default(), hit()]]],
            true,
        ),
        (
            "any match in a clause",
            vec![vec![vec![miss(), hit()]]],
            true,
        ),
        (
            "all clauses of a rule",
            vec![vec![vec![hit()], vec![miss()]]],
            false,
        ),
        (
            "all clauses of a rule, all hit",
            vec![vec![vec![hit()], vec![hit()]]],
            true,
        ),
        (
            "any rule",
            vec![vec![vec![miss()]], vec![vec![hit()]]],
            true,
        ),
        (
            "no rule matches",
            vec![vec![vec![miss()]], vec![vec![miss()]]],
            false,
        ),
    ];
    for (name, spec, want) in cases {
        let p = policy("p", pb::Action::Allow, rules(spec));
        assert_eq!(p.matches(&conn(Some(CLIENT))), want, "{name}");
    }
    // An ALLOW policy without rules therefore denies everything; a DENY one denies nothing.
    let empty_allow = policy("empty-allow", pb::Action::Allow, vec![]);
    let empty_deny = policy("empty-deny", pb::Action::Deny, vec![]);
    assert_eq!(
        evaluate([&empty_allow], &conn(Some(CLIENT))),
        Verdict::Deny(DenyReason::NoAllowMatched)
    );
    assert_eq!(evaluate([&empty_deny], &conn(Some(CLIENT))), Verdict::Allow);
}

// === field kinds (§6.3) ===

#[test]
fn every_field_kind_positive_and_negative() {
    let m = pb::Match::default;
    let v6 = Connection {
        src_ip: ip("fd00::1"),
        dst_ip: ip("fd00:1::1"),
        dst_port: 8080,
        src_identity: None,
    };
    let mapped = Connection {
        src_ip: ip("::ffff:10.0.0.1"),
        ..conn(None)
    };
    let mtls = conn(Some(CLIENT));
    let other_td = conn(Some("spiffe://other.td/ns/app/sa/client"));
    let plain = conn(None);
    let cases: Vec<(&str, pb::Match, &Connection, bool)> = vec![
        // principals: compared without spiffe://
        (
            "principal exact",
            pb::Match {
                principals: vec![exact("cluster.local/ns/app/sa/client")],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "principal exact with scheme does not match",
            pb::Match {
                principals: vec![exact(CLIENT)],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "principal exact, one character short",
            pb::Match {
                principals: vec![exact("cluster.local/ns/app/sa/clien")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "principal exact, one character long",
            pb::Match {
                principals: vec![exact("cluster.local/ns/app/sa/clients")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "principal prefix",
            pb::Match {
                principals: vec![prefix("cluster.local/ns/app/")],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "principal prefix other namespace",
            pb::Match {
                principals: vec![prefix("cluster.local/ns/other/")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "principal prefix longer than the principal",
            pb::Match {
                principals: vec![prefix("cluster.local/ns/app/sa/client/x")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "principal suffix",
            pb::Match {
                principals: vec![suffix("/sa/client")],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "principal suffix spanning every part",
            pb::Match {
                principals: vec![suffix("local/ns/app/sa/client")],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "principal suffix other",
            pb::Match {
                principals: vec![suffix("/sa/other")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "principal presence",
            pb::Match {
                principals: vec![presence()],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "principal presence without identity",
            pb::Match {
                principals: vec![presence()],
                ..m()
            },
            &plain,
            false,
        ),
        (
            "principals are OR-ed",
            pb::Match {
                principals: vec![exact("x"), suffix("/sa/client")],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "not_principals hit",
            pb::Match {
                not_principals: vec![suffix("/sa/client")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "not_principals miss",
            pb::Match {
                not_principals: vec![suffix("/sa/other")],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "not_principals presence, plaintext",
            pb::Match {
                not_principals: vec![presence()],
                ..m()
            },
            &plain,
            true,
        ),
        (
            "not_principals presence, mTLS",
            pb::Match {
                not_principals: vec![presence()],
                ..m()
            },
            &mtls,
            false,
        ),
        // namespaces: from the identity
        (
            "namespace exact",
            pb::Match {
                namespaces: vec![exact("app")],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "namespace prefix",
            pb::Match {
                namespaces: vec![prefix("ap")],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "namespace other",
            pb::Match {
                namespaces: vec![exact("other")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "namespace without identity",
            pb::Match {
                namespaces: vec![presence()],
                ..m()
            },
            &plain,
            false,
        ),
        (
            "not_namespaces hit",
            pb::Match {
                not_namespaces: vec![exact("app")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "not_namespaces without identity",
            pb::Match {
                not_namespaces: vec![exact("app")],
                ..m()
            },
            &plain,
            true,
        ),
        // service accounts: (namespace, sa), trust domain ignored
        (
            "service account",
            pb::Match {
                service_accounts: vec![sa("app", "client")],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "service account in another trust domain",
            pb::Match {
                service_accounts: vec![sa("app", "client")],
                ..m()
            },
            &other_td,
            true,
        ),
        (
            "service account, wrong namespace",
            pb::Match {
                service_accounts: vec![sa("other", "client")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "service account without identity",
            pb::Match {
                service_accounts: vec![sa("app", "client")],
                ..m()
            },
            &plain,
            false,
        ),
        (
            "not_service_accounts hit",
            pb::Match {
                not_service_accounts: vec![sa("app", "client")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "not_service_accounts without identity",
            pb::Match {
                not_service_accounts: vec![sa("app", "client")],
                ..m()
            },
            &plain,
            true,
        ),
        // source / destination CIDRs
        (
            "source v4 in range",
            pb::Match {
                source_ips: vec![cidr("10.0.0.0", 24)],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "source v4 out of range",
            pb::Match {
                source_ips: vec![cidr("10.1.0.0", 16)],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "source IPv4-mapped in v4 range",
            pb::Match {
                source_ips: vec![cidr("10.0.0.0", 8)],
                ..m()
            },
            &mapped,
            true,
        ),
        (
            "not_source v4 /32 hit",
            pb::Match {
                not_source_ips: vec![cidr("10.0.0.1", 32)],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "not_source v4 miss",
            pb::Match {
                not_source_ips: vec![cidr("10.0.0.2", 32)],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "source v6 in range",
            pb::Match {
                source_ips: vec![cidr("fd00::", 64)],
                ..m()
            },
            &v6,
            true,
        ),
        (
            "source v4 range never holds a v6 address",
            pb::Match {
                source_ips: vec![cidr("0.0.0.0", 0)],
                ..m()
            },
            &v6,
            false,
        ),
        (
            "destination v4 in range",
            pb::Match {
                destination_ips: vec![cidr("10.0.1.0", 24)],
                ..m()
            },
            &mtls,
            true,
        ),
        (
            "destination v4 out of range",
            pb::Match {
                destination_ips: vec![cidr("10.0.2.0", 24)],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "not_destination v6 hit",
            pb::Match {
                not_destination_ips: vec![cidr("fd00:1::", 32)],
                ..m()
            },
            &v6,
            false,
        ),
        (
            "destination v6 exact",
            pb::Match {
                destination_ips: vec![cidr("fd00:1::1", 128)],
                ..m()
            },
            &v6,
            true,
        ),
        // ports
        ("port hit", ports(&[8080]), &mtls, true),
        ("port miss", ports(&[80]), &mtls, false),
        ("ports OR-ed", ports(&[80, 8080]), &mtls, true),
        (
            "not port hit",
            pb::Match {
                not_destination_ports: vec![8080],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "not port miss",
            pb::Match {
                not_destination_ports: vec![80],
                ..m()
            },
            &mtls,
            true,
        ),
        // kinds are AND-ed
        (
            "principal holds, port does not",
            pb::Match {
                principals: vec![presence()],
                destination_ports: vec![80],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "positive and negative of one kind",
            pb::Match {
                namespaces: vec![prefix("a")],
                not_namespaces: vec![exact("app")],
                ..m()
            },
            &mtls,
            false,
        ),
        (
            "every kind holds",
            pb::Match {
                principals: vec![suffix("/sa/client")],
                namespaces: vec![exact("app")],
                service_accounts: vec![sa("app", "client")],
                source_ips: vec![cidr("10.0.0.0", 8)],
                destination_ips: vec![cidr("10.0.1.1", 32)],
                destination_ports: vec![8080],
                not_destination_ports: vec![15008],
                ..m()
            },
            &mtls,
            true,
        ),
    ];
    for (name, mtch, c, want) in cases {
        assert_eq!(single(mtch).matches(c), want, "{name}");
    }
}

#[test]
fn strict_mtls_deny_rejects_plaintext_only() {
    // istiod's PeerAuthentication STRICT: DENY connections without a principal (§6.4).
    let strict = Policy::try_from(authorization(
        "istio-system",
        "istio_converted_static_strict",
        pb::Scope::WorkloadSelector,
        pb::Action::Deny,
        rules(vec![vec![vec![pb::Match {
            not_principals: vec![presence()],
            ..Default::default()
        }]]]),
    ))
    .unwrap();
    assert_eq!(
        evaluate([&strict], &conn(None)),
        Verdict::Deny(DenyReason::Policy {
            policy: "istio-system/istio_converted_static_strict".into()
        })
    );
    assert_eq!(evaluate([&strict], &conn(Some(CLIENT))), Verdict::Allow);
}

// === conversion ===

#[test]
fn conversion_rejects_bad_fields() {
    type Check = fn(&Reason) -> bool;
    type Case = (&'static str, fn(&mut pb::Authorization), String, Check);
    let at = "rules[0].clauses[0].matches[0]";
    let cases: Vec<Case> = vec![
        (
            "5-byte CIDR address",
            |a| {
                a.rules[0].clauses[0].matches[0].source_ips = vec![pb::Address {
                    address: vec![1, 2, 3, 4, 5],
                    length: 8,
                }]
            },
            format!("{at}.source_ips[0]"),
            |r| matches!(r, Reason::Cidr(CidrError::AddressLength { len: 5 })),
        ),
        (
            "v4 prefix 33",
            |a| a.rules[0].clauses[0].matches[0].not_destination_ips = vec![cidr("10.0.0.0", 33)],
            format!("{at}.not_destination_ips[0]"),
            |r| {
                matches!(
                    r,
                    Reason::Cidr(CidrError::PrefixLength { len: 33, max: 32 })
                )
            },
        ),
        (
            "v6 prefix 129",
            |a| a.rules[0].clauses[0].matches[0].destination_ips = vec![cidr("fd00::", 129)],
            format!("{at}.destination_ips[0]"),
            |r| {
                matches!(
                    r,
                    Reason::Cidr(CidrError::PrefixLength { len: 129, max: 128 })
                )
            },
        ),
        (
            "port over 65535",
            |a| a.rules[0].clauses[0].matches[0].destination_ports = vec![80, 65536],
            format!("{at}.destination_ports[1]"),
            |r| matches!(r, Reason::Port { value: 65536 }),
        ),
        (
            "unknown action",
            |a| a.action = 5,
            "action".into(),
            |r| matches!(r, Reason::UnknownEnum { value: 5 }),
        ),
        (
            "unknown scope",
            |a| a.scope = 6,
            "scope".into(),
            |r| matches!(r, Reason::UnknownEnum { value: 6 }),
        ),
    ];
    for (name, edit, field, check) in cases {
        let mut a = authorization(
            "app",
            "p",
            pb::Scope::Namespace,
            pb::Action::Allow,
            rules(vec![vec![vec![ports(&[80])]]]),
        );
        edit(&mut a);
        let err = Policy::try_from(a).expect_err(name);
        assert_eq!(err.policy, "app/p", "{name}");
        assert_eq!(err.field, field, "{name}");
        assert!(check(&err.reason), "{name}: wrong reason {:?}", err.reason);
        assert!(err.to_string().contains(&field), "{name}: {err}");
    }
}

#[test]
fn conversion_keeps_fields_and_drops_untyped_string_matches() {
    let p = policy(
        "p",
        pb::Action::Deny,
        rules(vec![vec![vec![pb::Match {
            principals: vec![pb::StringMatch { match_type: None }, exact("a")],
            source_ips: vec![cidr("10.0.0.0", 8)],
            not_destination_ports: vec![22],
            service_accounts: vec![sa("app", "x")],
            ..Default::default()
        }]]]),
    );
    assert_eq!(p.key(), "app/p");
    assert_eq!(p.action, Action::Deny);
    assert_eq!(p.scope, Scope::Namespace);
    assert_eq!(
        p.rules,
        vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch::Exact("a".into())],
                    source_ips: vec![state::Cidr::new(ip("10.0.0.0"), 8).unwrap()],
                    not_destination_ports: vec![22],
                    service_accounts: vec![ServiceAccountMatch {
                        namespace: "app".into(),
                        service_account: "x".into(),
                    }],
                    ..Default::default()
                }],
            }],
        }]
    );
}

// === applicability (§6.1) ===

fn workload(namespace: &str, policies: &[&str]) -> state::Workload {
    state::Workload::try_from(wpb::Workload {
        uid: "uid-1".into(),
        name: "pod".into(),
        namespace: namespace.into(),
        authorization_policies: policies.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    })
    .unwrap()
}

fn scoped(namespace: &str, name: &str, scope: pb::Scope) -> Policy {
    Policy::try_from(authorization(
        namespace,
        name,
        scope,
        pb::Action::Allow,
        rules(vec![vec![vec![ports(&[8080])]]]),
    ))
    .unwrap()
}

#[test]
fn applicable_policies_are_namespace_global_and_referenced() {
    let mut store = Store::new();
    for p in [
        scoped("app", "ns-wide", pb::Scope::Namespace),
        scoped("other", "ns-wide", pb::Scope::Namespace),
        scoped("istio-system", "mesh-wide", pb::Scope::Global),
        scoped("app", "selected", pb::Scope::WorkloadSelector),
        scoped("app", "not-selected", pb::Scope::WorkloadSelector),
    ] {
        assert!(store.upsert(p));
    }
    assert!(
        !store.upsert(scoped("app", "ns-wide", pb::Scope::Namespace)),
        "unchanged"
    );
    assert_eq!(store.len(), 5);

    let keys = |store: &Store, w: &state::Workload| -> Vec<String> {
        store
            .applicable(w)
            .into_iter()
            .map(|p| p.key().to_owned())
            .collect()
    };
    let cases: Vec<(&str, state::Workload, Vec<&str>)> = vec![
        (
            "namespace + global + referenced, unknown skipped",
            workload("app", &["app/selected", "app/missing"]),
            vec!["app/ns-wide", "istio-system/mesh-wide", "app/selected"],
        ),
        (
            "another namespace",
            workload("other", &[]),
            vec!["other/ns-wide", "istio-system/mesh-wide"],
        ),
        (
            "namespace policy referenced again is listed once",
            workload("app", &["app/ns-wide"]),
            vec!["app/ns-wide", "istio-system/mesh-wide"],
        ),
        (
            "no namespace policies",
            workload("empty", &[]),
            vec!["istio-system/mesh-wide"],
        ),
    ];
    for (name, w, want) in &cases {
        assert_eq!(keys(&store, w), *want, "{name}");
    }
    let w = workload("app", &["app/selected", "app/missing"]);
    assert_eq!(
        store.unknown_references(&w).collect::<Vec<_>>(),
        vec!["app/missing"]
    );

    // Re-scoping and removal update the indices.
    assert!(store.upsert(scoped("app", "ns-wide", pb::Scope::WorkloadSelector)));
    assert!(store.remove("istio-system/mesh-wide").is_some());
    assert!(store.remove("istio-system/mesh-wide").is_none());
    assert_eq!(keys(&store, &workload("app", &[])), Vec::<String>::new());
    assert_eq!(keys(&store, &workload("other", &[])), vec!["other/ns-wide"]);
}

#[test]
fn applicable_policies_feed_evaluation() {
    let mut store = Store::new();
    store.upsert(scoped("app", "allow-8080", pb::Scope::Namespace));
    let w = workload("app", &[]);
    let on = |port| Connection {
        dst_port: port,
        ..conn(Some(CLIENT))
    };
    assert_eq!(evaluate(store.applicable(&w), &on(8080)), Verdict::Allow);
    assert_eq!(
        evaluate(store.applicable(&w), &on(9090)),
        Verdict::Deny(DenyReason::NoAllowMatched)
    );
    assert_eq!(
        evaluate(store.applicable(&workload("other", &[])), &on(9090)),
        Verdict::Allow
    );
}
