//! L7 authorization through the engine's public API (`PolicySet`), Istio AuthorizationPolicy
//! semantics.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::net::IpAddr;

use http::HeaderMap;
use waypoint::engine::{Denied, PolicySet, RequestFacts};
use weft_proto::weft::l7::v1 as pb;

const SVC: &str = "app.ns.svc.cluster.local";

fn facts(headers: &HeaderMap) -> RequestFacts<'_> {
    RequestFacts {
        service: Some(SVC),
        source_principal: Some("cluster.local/ns/client/sa/web"),
        source_namespace: Some("client"),
        source_ip: "10.1.2.3".parse().unwrap(),
        host: "app.ns.svc.cluster.local:8080",
        method: "GET",
        path: "/api/v1/items",
        port: 8080,
        headers,
    }
}

fn policy(name: &str, action: pb::Action, rules: Vec<pb::Rule>) -> pb::Policy {
    pb::Policy {
        namespace: "ns".into(),
        name: name.into(),
        action: action as i32,
        services: vec![],
        rules,
    }
}

fn allow(name: &str, rules: Vec<pb::Rule>) -> pb::Policy {
    policy(name, pb::Action::Allow, rules)
}

fn deny(name: &str, rules: Vec<pb::Rule>) -> pb::Policy {
    policy(name, pb::Action::Deny, rules)
}

fn from(s: pb::Source) -> pb::Rule {
    pb::Rule {
        from: vec![s],
        ..Default::default()
    }
}

fn to(o: pb::Operation) -> pb::Rule {
    pb::Rule {
        to: vec![o],
        ..Default::default()
    }
}

fn when(key: &str, values: &[&str], not_values: &[&str]) -> pb::Rule {
    pb::Rule {
        when: vec![cond(key, values, not_values)],
        ..Default::default()
    }
}

fn cond(key: &str, values: &[&str], not_values: &[&str]) -> pb::Condition {
    pb::Condition {
        key: key.into(),
        values: strings(values),
        not_values: strings(not_values),
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn any_rule() -> pb::Rule {
    pb::Rule::default()
}

fn set(policies: &[pb::Policy]) -> PolicySet {
    let mut s = PolicySet::default();
    for p in policies {
        s.insert(&format!("wp-ns/wp/{}/{}", p.namespace, p.name), p)
            .unwrap();
    }
    s
}

/// Whether a single ALLOW policy with `rule` allows `f`.
fn allowed_by(rule: pb::Rule, f: &RequestFacts<'_>) -> bool {
    match set(&[allow("p", vec![rule])]).check(f) {
        Ok(()) => true,
        Err(Denied::NotAllowed { .. }) => false,
        Err(other) => panic!("unexpected {other:?}"),
    }
}

#[test]
fn no_policies_allow_everything() {
    let h = HeaderMap::new();
    let s = PolicySet::default();
    assert!(s.is_empty());
    assert_eq!(s.check(&facts(&h)), Ok(()));
}

#[test]
fn deny_is_evaluated_before_allow() {
    let h = HeaderMap::new();
    let s = set(&[
        allow("all", vec![any_rule()]),
        deny(
            "no-get",
            vec![to(pb::Operation {
                methods: strings(&["GET"]),
                ..Default::default()
            })],
        ),
    ]);
    assert_eq!(s.check(&facts(&h)), Err(Denied::Policy("ns/no-get".into())));
    let post = RequestFacts {
        method: "POST",
        ..facts(&h)
    };
    assert_eq!(s.check(&post), Ok(()));
}

#[test]
fn allow_policies_that_apply_but_do_not_match_deny() {
    let h = HeaderMap::new();
    let s = set(&[
        allow(
            "post-only",
            vec![to(pb::Operation {
                methods: strings(&["POST"]),
                ..Default::default()
            })],
        ),
        allow(
            "from-admin",
            vec![from(pb::Source {
                namespaces: strings(&["admin"]),
                ..Default::default()
            })],
        ),
    ]);
    assert_eq!(
        s.check(&facts(&h)),
        Err(Denied::NotAllowed {
            policies: vec!["ns/from-admin".into(), "ns/post-only".into()]
        })
    );
    // Any one ALLOW matching is enough.
    let admin = RequestFacts {
        source_namespace: Some("admin"),
        ..facts(&h)
    };
    assert_eq!(s.check(&admin), Ok(()));
}

#[test]
fn without_an_applicable_allow_policy_requests_are_allowed() {
    let h = HeaderMap::new();
    let mut other = allow("other-svc", vec![]);
    other.services = strings(&["other.ns.svc.cluster.local"]);
    let non_matching_deny = deny(
        "d",
        vec![to(pb::Operation {
            methods: strings(&["DELETE"]),
            ..Default::default()
        })],
    );
    let s = set(&[other, non_matching_deny]);
    assert_eq!(s.check(&facts(&h)), Ok(()));
}

#[test]
fn policies_are_scoped_to_their_services() {
    let h = HeaderMap::new();
    let mut scoped = deny("scoped", vec![any_rule()]);
    scoped.services = strings(&["APP.ns.svc.cluster.local", "x.ns.svc.cluster.local"]);
    let s = set(&[scoped]);
    assert_eq!(s.check(&facts(&h)), Err(Denied::Policy("ns/scoped".into())));
    let other = RequestFacts {
        service: Some("y.ns.svc.cluster.local"),
        ..facts(&h)
    };
    assert_eq!(s.check(&other), Ok(()));
    let workload = RequestFacts {
        service: None,
        ..facts(&h)
    };
    assert_eq!(
        s.check(&workload),
        Ok(()),
        "workload traffic ignores service-scoped policies"
    );

    // A waypoint-wide policy (no services) applies to workload-addressed traffic too.
    let s = set(&[deny("wide", vec![any_rule()])]);
    assert_eq!(s.check(&workload), Err(Denied::Policy("ns/wide".into())));
    assert_eq!(s.check(&other), Err(Denied::Policy("ns/wide".into())));
}

#[test]
fn policy_without_rules_matches_nothing_and_empty_rule_matches_all() {
    let h = HeaderMap::new();
    // ALLOW with no rules applies but never matches: deny-all.
    assert_eq!(
        set(&[allow("none", vec![])]).check(&facts(&h)),
        Err(Denied::NotAllowed {
            policies: vec!["ns/none".into()]
        })
    );
    // DENY with no rules never denies.
    assert_eq!(set(&[deny("none", vec![])]).check(&facts(&h)), Ok(()));
    // An empty rule matches every request.
    assert_eq!(
        set(&[allow("all", vec![any_rule()])]).check(&facts(&h)),
        Ok(())
    );
}

#[test]
fn principals_with_or_without_spiffe_prefix() {
    let h = HeaderMap::new();
    let f = facts(&h);
    for p in [
        "spiffe://cluster.local/ns/client/sa/web",
        "cluster.local/ns/client/sa/web",
    ] {
        let rule = from(pb::Source {
            principals: strings(&[p]),
            ..Default::default()
        });
        assert!(allowed_by(rule, &f), "{p}");
    }
    let rule = from(pb::Source {
        principals: strings(&["spiffe://cluster.local/ns/client/sa/other"]),
        ..Default::default()
    });
    assert!(!allowed_by(rule, &f));
    let prefix = from(pb::Source {
        principals: strings(&["spiffe://cluster.local/ns/client/*"]),
        ..Default::default()
    });
    assert!(allowed_by(prefix, &f));
    // A caller that passes the SPIFFE ID with its scheme still matches.
    let with_scheme = RequestFacts {
        source_principal: Some("spiffe://cluster.local/ns/client/sa/web"),
        ..facts(&h)
    };
    let exact = from(pb::Source {
        principals: strings(&["cluster.local/ns/client/sa/web"]),
        ..Default::default()
    });
    assert!(allowed_by(exact, &with_scheme));
}

#[test]
fn wildcard_principal_requires_an_identity_and_not_principals_accepts_none() {
    let h = HeaderMap::new();
    let plaintext = RequestFacts {
        source_principal: None,
        source_namespace: None,
        ..facts(&h)
    };
    let any = from(pb::Source {
        principals: strings(&["*"]),
        ..Default::default()
    });
    assert!(allowed_by(any.clone(), &facts(&h)));
    assert!(!allowed_by(any, &plaintext));
    let any_ns = from(pb::Source {
        namespaces: strings(&["*"]),
        ..Default::default()
    });
    assert!(!allowed_by(any_ns, &plaintext));
    // Istio's "deny plaintext": DENY notPrincipals ["*"].
    let s = set(&[deny(
        "plaintext",
        vec![from(pb::Source {
            not_principals: strings(&["*"]),
            ..Default::default()
        })],
    )]);
    assert_eq!(
        s.check(&plaintext),
        Err(Denied::Policy("ns/plaintext".into()))
    );
    assert_eq!(s.check(&facts(&h)), Ok(()));
}

#[test]
fn prefix_suffix_and_wildcard_strings() {
    let h = HeaderMap::new();
    let f = facts(&h);
    let ns = |v: &str| {
        from(pb::Source {
            namespaces: strings(&[v]),
            ..Default::default()
        })
    };
    assert!(allowed_by(ns("cli*"), &f));
    assert!(allowed_by(ns("*ent"), &f));
    assert!(allowed_by(ns("*"), &f));
    assert!(allowed_by(ns("client"), &f));
    assert!(!allowed_by(ns("clien"), &f));
    assert!(!allowed_by(ns("x*"), &f));
    assert!(!allowed_by(ns("*x"), &f));
    let suffix_principal = from(pb::Source {
        principals: strings(&["*/sa/web"]),
        ..Default::default()
    });
    assert!(allowed_by(suffix_principal, &f));
}

#[test]
fn namespaces_and_not_namespaces() {
    let h = HeaderMap::new();
    let f = facts(&h);
    let rule = from(pb::Source {
        namespaces: strings(&["a", "client"]),
        not_namespaces: strings(&["client"]),
        ..Default::default()
    });
    assert!(!allowed_by(rule, &f), "not_namespaces vetoes");
    let rule = from(pb::Source {
        not_namespaces: strings(&["other"]),
        ..Default::default()
    });
    assert!(allowed_by(rule, &f));
    let rule = from(pb::Source {
        not_principals: strings(&["cluster.local/ns/client/*"]),
        ..Default::default()
    });
    assert!(!allowed_by(rule, &f));
}

#[test]
fn hosts_match_case_insensitively_with_and_without_port() {
    let h = HeaderMap::new();
    let f = facts(&h); // host "app.ns.svc.cluster.local:8080"
    let hosts = |v: &[&str]| {
        to(pb::Operation {
            hosts: strings(v),
            ..Default::default()
        })
    };
    assert!(allowed_by(hosts(&["app.ns.svc.cluster.local"]), &f));
    assert!(allowed_by(hosts(&["APP.NS.svc.cluster.local"]), &f));
    assert!(allowed_by(hosts(&["app.ns.svc.cluster.local:8080"]), &f));
    assert!(!allowed_by(hosts(&["app.ns.svc.cluster.local:9090"]), &f));
    assert!(allowed_by(hosts(&["*.cluster.local"]), &f));
    assert!(allowed_by(hosts(&["app.*"]), &f));
    assert!(!allowed_by(hosts(&["other.ns.svc.cluster.local"]), &f));
    let upper = RequestFacts {
        host: "App.NS.svc.cluster.local",
        ..f
    };
    assert!(allowed_by(hosts(&["app.ns.svc.cluster.local"]), &upper));
    let not = to(pb::Operation {
        not_hosts: strings(&["app.ns.svc.cluster.local"]),
        ..Default::default()
    });
    assert!(
        !allowed_by(not, &f),
        "not_hosts compares without the port too"
    );
}

#[test]
fn methods_paths_and_ports() {
    let h = HeaderMap::new();
    let f = facts(&h); // GET /api/v1/items :8080
    let op = |o: pb::Operation| to(o);
    assert!(allowed_by(
        op(pb::Operation {
            methods: strings(&["POST", "GET"]),
            ..Default::default()
        }),
        &f
    ));
    assert!(!allowed_by(
        op(pb::Operation {
            methods: strings(&["POST"]),
            ..Default::default()
        }),
        &f
    ));
    assert!(!allowed_by(
        op(pb::Operation {
            not_methods: strings(&["GET"]),
            ..Default::default()
        }),
        &f
    ));
    assert!(allowed_by(
        op(pb::Operation {
            not_methods: strings(&["DELETE"]),
            ..Default::default()
        }),
        &f
    ));
    assert!(allowed_by(
        op(pb::Operation {
            paths: strings(&["/api/*"]),
            ..Default::default()
        }),
        &f
    ));
    assert!(allowed_by(
        op(pb::Operation {
            paths: strings(&["*/items"]),
            ..Default::default()
        }),
        &f
    ));
    assert!(allowed_by(
        op(pb::Operation {
            paths: strings(&["/api/v1/items"]),
            ..Default::default()
        }),
        &f
    ));
    assert!(!allowed_by(
        op(pb::Operation {
            paths: strings(&["/api"]),
            ..Default::default()
        }),
        &f
    ));
    assert!(!allowed_by(
        op(pb::Operation {
            not_paths: strings(&["/api/*"]),
            ..Default::default()
        }),
        &f
    ));
    assert!(allowed_by(
        op(pb::Operation {
            ports: vec![80, 8080],
            ..Default::default()
        }),
        &f
    ));
    assert!(!allowed_by(
        op(pb::Operation {
            ports: vec![80],
            ..Default::default()
        }),
        &f
    ));
    assert!(!allowed_by(
        op(pb::Operation {
            not_ports: vec![8080],
            ..Default::default()
        }),
        &f
    ));
    assert!(allowed_by(
        op(pb::Operation {
            not_ports: vec![80],
            ..Default::default()
        }),
        &f
    ));
    // Paths are compared without a query, even if one slips through.
    let with_query = RequestFacts {
        path: "/admin?x=1",
        ..f
    };
    assert!(!allowed_by(
        op(pb::Operation {
            not_paths: strings(&["/admin"]),
            ..Default::default()
        }),
        &with_query
    ));
    // Every non-empty field of one operation must hold.
    let both = op(pb::Operation {
        methods: strings(&["GET"]),
        paths: strings(&["/admin"]),
        ..Default::default()
    });
    assert!(!allowed_by(both, &f));
}

#[test]
fn any_source_and_any_operation_of_a_rule() {
    let h = HeaderMap::new();
    let f = facts(&h);
    let rule = pb::Rule {
        from: vec![
            pb::Source {
                namespaces: strings(&["x"]),
                ..Default::default()
            },
            pb::Source {
                namespaces: strings(&["client"]),
                ..Default::default()
            },
        ],
        to: vec![
            pb::Operation {
                methods: strings(&["PUT"]),
                ..Default::default()
            },
            pb::Operation {
                paths: strings(&["/api/*"]),
                ..Default::default()
            },
        ],
        when: vec![],
    };
    assert!(allowed_by(rule.clone(), &f));
    let mut no_op = rule;
    no_op.to.remove(1);
    assert!(!allowed_by(no_op, &f), "from holds but to does not");
}

#[test]
fn ip_blocks_v4_and_v6() {
    let h = HeaderMap::new();
    let v4 = facts(&h);
    let v6 = RequestFacts {
        source_ip: "fd00:10::7".parse::<IpAddr>().unwrap(),
        ..facts(&h)
    };
    let blocks = |v: &[&str]| {
        from(pb::Source {
            ip_blocks: strings(v),
            ..Default::default()
        })
    };
    assert!(allowed_by(blocks(&["10.0.0.0/8"]), &v4));
    assert!(allowed_by(blocks(&["10.1.2.3"]), &v4));
    assert!(!allowed_by(blocks(&["10.1.2.4", "192.168.0.0/16"]), &v4));
    assert!(!allowed_by(blocks(&["fd00::/8"]), &v4));
    assert!(allowed_by(blocks(&["fd00:10::/32"]), &v6));
    assert!(allowed_by(blocks(&["fd00:10::7"]), &v6));
    assert!(!allowed_by(blocks(&["fd00:11::/32"]), &v6));
    assert!(!allowed_by(blocks(&["0.0.0.0/0"]), &v6));
    let not = from(pb::Source {
        not_ip_blocks: strings(&["10.1.0.0/16"]),
        ..Default::default()
    });
    assert!(!allowed_by(not.clone(), &v4));
    assert!(allowed_by(not, &v6));
}

#[test]
fn header_conditions_present_and_absent() {
    let mut h = HeaderMap::new();
    h.insert("x-env", "prod".parse().unwrap());
    h.append("x-tag", "a".parse().unwrap());
    h.append("x-tag", "b".parse().unwrap());
    let empty = HeaderMap::new();
    let with = facts(&h);
    let without = facts(&empty);
    assert!(allowed_by(
        when("request.headers[x-env]", &["prod"], &[]),
        &with
    ));
    assert!(allowed_by(
        when("request.headers[X-Env]", &["pr*"], &[]),
        &with
    ));
    assert!(!allowed_by(
        when("request.headers[x-env]", &["dev"], &[]),
        &with
    ));
    assert!(
        !allowed_by(when("request.headers[x-env]", &["*"], &[]), &without),
        "absent never matches values"
    );
    assert!(
        allowed_by(when("request.headers[x-env]", &[], &["prod"]), &without),
        "absent satisfies not_values"
    );
    assert!(!allowed_by(
        when("request.headers[x-env]", &[], &["prod"]),
        &with
    ));
    assert!(allowed_by(
        when("request.headers[x-tag]", &["a,b"], &[]),
        &with
    ));
    // Every condition of a rule must hold.
    let both = pb::Rule {
        when: vec![
            cond("request.headers[x-env]", &["prod"], &[]),
            cond("request.method", &["POST"], &[]),
        ],
        ..Default::default()
    };
    assert!(!allowed_by(both, &with));
}

#[test]
fn source_and_destination_conditions() {
    let h = HeaderMap::new();
    let f = facts(&h);
    let plaintext = RequestFacts {
        source_principal: None,
        source_namespace: None,
        ..facts(&h)
    };
    assert!(allowed_by(when("source.ip", &["10.0.0.0/8"], &[]), &f));
    assert!(!allowed_by(when("source.ip", &[], &["10.1.2.3"]), &f));
    assert!(allowed_by(when("source.namespace", &["client"], &[]), &f));
    assert!(!allowed_by(
        when("source.namespace", &["client"], &[]),
        &plaintext
    ));
    assert!(allowed_by(
        when("source.namespace", &[], &["client"]),
        &plaintext
    ));
    assert!(allowed_by(
        when(
            "source.principal",
            &["spiffe://cluster.local/ns/client/sa/web"],
            &[]
        ),
        &f
    ));
    assert!(!allowed_by(
        when("source.principal", &["*"], &[]),
        &plaintext
    ));
    assert!(allowed_by(when("destination.port", &["8080"], &[]), &f));
    assert!(!allowed_by(when("destination.port", &["80"], &[]), &f));
    assert!(!allowed_by(when("destination.port", &[], &["8080"]), &f));
    assert!(allowed_by(when("request.method", &["GET"], &[]), &f));
    assert!(!allowed_by(when("request.method", &[], &["GET"]), &f));
    assert!(allowed_by(
        when("request.host", &["APP.ns.svc.cluster.local"], &[]),
        &f
    ));
    assert!(!allowed_by(when("request.host", &["other"], &[]), &f));
}

#[test]
fn insert_rejects_unusable_policies_naming_the_field() {
    let mut s = PolicySet::default();
    let bad_cidr = allow(
        "p",
        vec![from(pb::Source {
            ip_blocks: strings(&["10.0.0.0/8", "10.0.0/8"]),
            ..Default::default()
        })],
    );
    let e = s.insert("wp/p", &bad_cidr).unwrap_err().to_string();
    assert_eq!(
        e,
        "Policy wp/p: rules/0/from/0/ip_blocks: \"10.0.0/8\": invalid CIDR or address"
    );
    let unknown = allow("p", vec![when("request.auth.claims[iss]", &["x"], &[])]);
    let e = s.insert("wp/p", &unknown).unwrap_err().to_string();
    assert!(
        e.contains("rules/0/when/0") && e.contains("unsupported"),
        "{e}"
    );
    let bad_port = allow("p", vec![when("destination.port", &["http"], &[])]);
    assert!(s.insert("wp/p", &bad_port).is_err());
    let big_port = allow(
        "p",
        vec![to(pb::Operation {
            ports: vec![70_000],
            ..Default::default()
        })],
    );
    assert!(s.insert("wp/p", &big_port).is_err());
    let bad_cond_cidr = allow("p", vec![when("source.ip", &["nope"], &[])]);
    assert!(s.insert("wp/p", &bad_cond_cidr).is_err());
    let empty_cond = allow("p", vec![when("source.ip", &[], &[])]);
    assert!(s.insert("wp/p", &empty_cond).is_err());
    assert!(s.is_empty(), "nothing rejected was inserted");
}

#[test]
fn bad_update_keeps_the_previous_version() {
    let h = HeaderMap::new();
    let mut s = PolicySet::default();
    let v1 = deny(
        "d",
        vec![from(pb::Source {
            ip_blocks: strings(&["10.0.0.0/8"]),
            ..Default::default()
        })],
    );
    s.insert("wp/d", &v1).unwrap();
    assert_eq!(s.check(&facts(&h)), Err(Denied::Policy("ns/d".into())));
    let v2 = deny(
        "d",
        vec![from(pb::Source {
            ip_blocks: strings(&["10.0.0.0/99"]),
            ..Default::default()
        })],
    );
    assert!(s.insert("wp/d", &v2).is_err());
    assert_eq!(s.len(), 1);
    assert_eq!(
        s.check(&facts(&h)),
        Err(Denied::Policy("ns/d".into())),
        "v1 still in force"
    );
    // A good update replaces it.
    let v3 = deny(
        "d",
        vec![from(pb::Source {
            ip_blocks: strings(&["192.168.0.0/16"]),
            ..Default::default()
        })],
    );
    s.insert("wp/d", &v3).unwrap();
    assert_eq!(s.check(&facts(&h)), Ok(()));
    assert_eq!(s.len(), 1);
}

#[test]
fn remove_drops_a_policy() {
    let h = HeaderMap::new();
    let mut s = set(&[deny("d", vec![any_rule()])]);
    assert_eq!(s.names().collect::<Vec<_>>(), ["wp-ns/wp/ns/d"]);
    s.remove("wp-ns/wp/ns/d");
    s.remove("absent");
    assert!(s.is_empty());
    assert_eq!(s.check(&facts(&h)), Ok(()));
}
