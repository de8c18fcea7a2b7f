//! L7 translation tables: fixtures in, `ServiceConfig`/`Policy`/route status out.

use serde_json::Value;
use weft_k8s::{Index, Resource, manifest};
use weft_proto::weft::l7::v1::{
    Action, Backend, LoadBalancer, OutlierDetection, Protocol, Route, ServiceConfig, filter,
    path_modifier, string_match,
};

use super::super::{Output, Settings, translate};
use super::parse_duration;

fn snapshot(yaml: &str) -> weft_k8s::Snapshot {
    let index = Index::new();
    let objects = manifest::parse_documents(yaml, "fixture.yaml").expect("fixture parses");
    let resources: Vec<Resource> = objects
        .iter()
        .filter_map(|o| Resource::from_object(o).expect("fixture objects are valid"))
        .collect();
    index.batch(resources, &[]);
    index.snapshot()
}

fn run(extra: &str) -> Output {
    translate(
        &snapshot(&format!("{BASE}\n---\n{extra}")),
        &Settings::default(),
    )
}

/// Namespace `a` bound to waypoint `wp`; services `echo` (http + tcp + grpc ports), `other`
/// (bound), `lonely` in namespace `b` (not bound).
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: a}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: a}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp-raw, port: 9000}
  - {name: rpc, port: 7070, appProtocol: grpc}
  - {name: other, port: 81, appProtocol: kubernetes.io/h2c}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: a}
spec: {clusterIP: 10.96.0.11, selector: {app: other}, ports: [{name: http-web, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: b}
spec: {clusterIP: 10.96.0.12, selector: {app: lonely}, ports: [{name: http, port: 80}]}
"#;

fn config<'a>(out: &'a Output, svc: &str) -> &'a ServiceConfig {
    let key = format!("a/wp/a/{svc}");
    out.l7_services
        .get(&key)
        .unwrap_or_else(|| panic!("no {key}: {:?}", out.l7_services.keys()))
}

fn routes<'a>(out: &'a Output, svc: &str, port: u32) -> &'a [Route] {
    &config(out, svc)
        .ports
        .iter()
        .find(|p| p.port == port)
        .unwrap_or_else(|| panic!("no port {port}"))
        .routes
}

fn names(routes: &[Route]) -> Vec<&str> {
    routes.iter().map(|r| r.name.as_str()).collect()
}

fn status<'a>(out: &'a Output, kind: &str, name: &str) -> &'a Value {
    &out.route_statuses
        .iter()
        .find(|s| s.kind == kind && s.name == name)
        .unwrap_or_else(|| panic!("no status for {kind} {name}: {:?}", out.route_statuses))
        .status
}

fn cond<'a>(status: &'a Value, parent: usize, type_: &str) -> &'a Value {
    status["parents"][parent]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn path(route: &Route) -> Option<&string_match::Kind> {
    route.r#match.as_ref()?.path.as_ref()?.kind.as_ref()
}

fn http_route(name: &str, created: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: a, generation: 3, creationTimestamp: \"{created}\"}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\n{spec}"
    )
}

#[test]
fn bound_services_get_configs_with_protocols_and_no_routes() {
    let out = run("");
    assert_eq!(
        out.l7_services.keys().collect::<Vec<_>>(),
        ["a/wp/a/echo", "a/wp/a/other"],
        "only services bound to the waypoint"
    );
    let echo = config(&out, "echo");
    assert_eq!(echo.hostname, "echo.a.svc.cluster.local");
    let protocols: Vec<(u32, i32)> = echo.ports.iter().map(|p| (p.port, p.protocol)).collect();
    assert_eq!(
        protocols,
        [
            (80, Protocol::Http as i32),
            (9000, Protocol::Tcp as i32),
            (7070, Protocol::Grpc as i32),
            (81, Protocol::Http2 as i32)
        ]
    );
    assert!(echo.ports.iter().all(|p| p.routes.is_empty()));
    assert_eq!(echo.load_balancer, LoadBalancer::LeastRequest as i32);
    assert_eq!(echo.outlier_detection, None);
    assert_eq!(
        config(&out, "other").ports[0].protocol,
        Protocol::Http as i32,
        "http- name prefix"
    );
}

#[test]
fn service_annotations_set_lb_and_outlier_detection() {
    let out = run(r#"
apiVersion: v1
kind: Service
metadata:
  name: tuned
  namespace: a
  annotations: {weft.dev/load-balancer: round-robin, weft.dev/outlier-consecutive-failures: "5", weft.dev/outlier-base-ejection: 1m}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata:
  name: bad
  namespace: a
  annotations: {weft.dev/load-balancer: random, weft.dev/outlier-consecutive-failures: "3", weft.dev/outlier-max-ejection-percent: "150"}
spec: {clusterIP: 10.96.0.21, ports: [{port: 80}]}
"#);
    let tuned = config(&out, "tuned");
    assert_eq!(tuned.load_balancer, LoadBalancer::RoundRobin as i32);
    assert_eq!(
        tuned.outlier_detection,
        Some(OutlierDetection {
            consecutive_failures: 5,
            base_ejection_ms: 60_000,
            max_ejection_percent: 50
        })
    );
    assert_eq!(
        tuned.ports[0].protocol,
        Protocol::Unspecified as i32,
        "no hint: detect"
    );
    let bad = config(&out, "bad");
    assert_eq!(bad.load_balancer, LoadBalancer::LeastRequest as i32);
    assert_eq!(
        bad.outlier_detection
            .as_ref()
            .map(|o| o.max_ejection_percent),
        Some(50)
    );
    for annotation in [
        "weft.dev/load-balancer",
        "weft.dev/outlier-max-ejection-percent",
    ] {
        assert!(
            out.problems
                .iter()
                .any(|p| p.contains("Service a/bad") && p.contains(annotation)),
            "{annotation}: {:?}",
            out.problems
        );
    }
}

#[test]
fn precedence_orders_entries() {
    let out = run(&[
        http_route(
            "old",
            "2024-01-01T00:00:00Z",
            r#"  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: other, port: 80}]
  - matches:
    - {path: {type: PathPrefix, value: /api/v1}}
    - {path: {type: Exact, value: /api}}
    - {path: {type: PathPrefix, value: /api}, headers: [{name: X-Canary, value: "1"}]}
    backendRefs: [{name: echo, port: 80}]
"#,
        ),
        http_route(
            "new",
            "2025-01-01T00:00:00Z",
            r#"  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}, {path: {type: RegularExpression, value: "/x/.*"}}]
    backendRefs: [{name: echo, port: 80}]
  - backendRefs: [{name: echo, port: 80}]
"#,
        ),
        http_route(
            "aaa-same-age",
            "2025-01-01T00:00:00Z",
            r#"  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: echo, port: 80}]
"#,
        ),
    ]
    .join("\n---\n"));
    assert_eq!(
        names(routes(&out, "echo", 80)),
        [
            "HTTPRoute/a/old/rule/1/match/1",          // exact
            "HTTPRoute/a/old/rule/1/match/0",          // longest prefix
            "HTTPRoute/a/old/rule/1/match/2",          // /api with a header
            "HTTPRoute/a/old/rule/0/match/0",          // /api, oldest route
            "HTTPRoute/a/aaa-same-age/rule/0/match/0", // same age: by name
            "HTTPRoute/a/new/rule/0/match/0",
            "HTTPRoute/a/new/rule/1/match/0", // no matches: prefix "/"
            "HTTPRoute/a/new/rule/0/match/1", // regex last
        ]
    );
    // Attached to port 80 only (parentRef port), and not to the tcp port.
    for port in [9000, 7070, 81] {
        assert!(routes(&out, "echo", port).is_empty(), "port {port}");
    }
    let catch_all = &routes(&out, "echo", 80)[6];
    assert_eq!(
        path(catch_all),
        Some(&string_match::Kind::PathPrefix("/".into()))
    );
    let st = status(&out, "HTTPRoute", "old");
    assert_eq!(
        st["parents"][0]["controllerName"],
        "istio.io/mesh-controller"
    );
    assert_eq!(st["parents"][0]["parentRef"]["name"], "echo");
    assert_eq!(cond(st, 0, "Accepted")["status"], "True");
    assert_eq!(cond(st, 0, "Accepted")["observedGeneration"], 3);
    assert_eq!(cond(st, 0, "ResolvedRefs")["status"], "True");
}

#[test]
fn method_and_query_matches_rank_and_translate() {
    let out = run(&http_route(
        "m",
        "2024-01-01T00:00:00Z",
        r#"  rules:
  - matches:
    - {path: {type: PathPrefix, value: /}}
    - {path: {type: PathPrefix, value: /}, queryParams: [{name: v, value: "2"}]}
    - {path: {type: PathPrefix, value: /}, method: POST}
    backendRefs: [{name: echo, port: 80}]
"#,
    ));
    let r = routes(&out, "echo", 80);
    assert_eq!(
        names(r),
        [
            "HTTPRoute/a/m/rule/0/match/2",
            "HTTPRoute/a/m/rule/0/match/1",
            "HTTPRoute/a/m/rule/0/match/0"
        ]
    );
    assert_eq!(
        r[0].r#match.as_ref().map(|m| m.method.as_str()),
        Some("POST")
    );
    let q = &r[1]
        .r#match
        .as_ref()
        .map(|m| m.query_params.clone())
        .unwrap_or_default();
    assert_eq!(q[0].name, "v");
}

#[test]
fn weights_filters_timeouts_and_retry() {
    let out = run(&http_route(
        "full",
        "2024-01-01T00:00:00Z",
        r#"  rules:
  - matches: [{path: {type: PathPrefix, value: /a}, headers: [{name: X-User, type: RegularExpression, value: "al.*"}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-set, value: "1"}], add: [{name: x-add, value: "2"}], remove: [x-gone]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-resp, value: "3"}]}
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: other, port: 80}, percent: 25}
    backendRefs:
    - {name: echo, port: 80, weight: 90}
    - name: other
      port: 80
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-backend, value: other}]}}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 3, codes: [502, 503], backoff: 100ms}
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example, port: 8443, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}
  - matches: [{path: {type: Exact, value: /mirror-fraction}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: other, port: 80}, fraction: {numerator: 1, denominator: 4}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: other, port: 80}}
    backendRefs: [{name: echo, port: 80}]
"#,
    ));
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    let r = routes(&out, "echo", 80);
    let full = r
        .iter()
        .find(|r| r.name == "HTTPRoute/a/full/rule/0/match/0")
        .expect("rule 0");
    let m = full.r#match.as_ref().expect("match");
    assert_eq!(m.headers[0].name, "x-user", "header names are lowercased");
    assert_eq!(
        m.headers[0].value.as_ref().and_then(|v| v.kind.clone()),
        Some(string_match::Kind::Regex("al.*".into()))
    );
    assert_eq!(
        full.backends,
        [
            Backend {
                hostname: "echo.a.svc.cluster.local".into(),
                port: 80,
                weight: 90,
                filters: vec![]
            },
            Backend {
                hostname: "other.a.svc.cluster.local".into(),
                port: 80,
                weight: 1,
                filters: full.backends[1].filters.clone(),
            }
        ],
        "weight defaults to 1"
    );
    match full.backends[1].filters[0].kind.as_ref() {
        Some(filter::Kind::RequestHeaderModifier(h)) => assert_eq!(h.set[0].value, "other"),
        other => panic!("backend filter: {other:?}"),
    }
    let kinds: Vec<_> = full.filters.iter().filter_map(|f| f.kind.clone()).collect();
    match &kinds[..] {
        [
            filter::Kind::RequestHeaderModifier(req),
            filter::Kind::ResponseHeaderModifier(resp),
            filter::Kind::UrlRewrite(rw),
            filter::Kind::RequestMirror(mirror),
        ] => {
            assert_eq!(
                (req.set[0].name.as_str(), req.add[0].name.as_str()),
                ("x-set", "x-add")
            );
            assert_eq!(req.remove, ["x-gone"]);
            assert_eq!(resp.add[0].value, "3");
            assert_eq!(rw.hostname, "rewritten.example");
            assert_eq!(
                rw.path.as_ref().and_then(|p| p.kind.clone()),
                Some(path_modifier::Kind::ReplacePrefixMatch("/b".into()))
            );
            assert_eq!(mirror.percent, 25);
            assert_eq!(
                mirror.backend.as_ref().map(|b| b.hostname.as_str()),
                Some("other.a.svc.cluster.local")
            );
        }
        other => panic!("filters: {other:?}"),
    }
    assert_eq!(full.request_timeout_ms, 2000);
    assert_eq!(full.backend_request_timeout_ms, 500);
    let retry = full.retry.as_ref().expect("retry");
    assert_eq!(retry.attempts, 4, "retries plus the first attempt");
    assert_eq!(retry.codes, [502, 503]);
    assert_eq!(retry.backoff_ms, 100);

    let redirect = r
        .iter()
        .find(|r| r.name == "HTTPRoute/a/full/rule/1/match/0")
        .expect("rule 1");
    assert!(redirect.backends.is_empty());
    match redirect.filters[0].kind.as_ref() {
        Some(filter::Kind::RequestRedirect(rd)) => {
            assert_eq!(
                (
                    rd.scheme.as_str(),
                    rd.hostname.as_str(),
                    rd.port,
                    rd.status_code
                ),
                ("https", "new.example", 8443, 301)
            );
            assert_eq!(
                rd.path.as_ref().and_then(|p| p.kind.clone()),
                Some(path_modifier::Kind::ReplaceFullPath("/new".into()))
            );
        }
        other => panic!("redirect: {other:?}"),
    }
    let fractions = r
        .iter()
        .find(|r| r.name == "HTTPRoute/a/full/rule/2/match/0")
        .expect("rule 2");
    let percents: Vec<u32> = fractions
        .filters
        .iter()
        .filter_map(|f| match &f.kind {
            Some(filter::Kind::RequestMirror(m)) => Some(m.percent),
            _ => None,
        })
        .collect();
    assert_eq!(percents, [25, 100], "fraction 1/4, and 100 when unset");
    assert!(full.retry.is_some() && fractions.retry.is_none());
}

#[test]
fn bad_rules_are_dropped_with_status_and_others_kept() {
    let out = run(&http_route(
        "mixed",
        "2024-01-01T00:00:00Z",
        r#"  rules:
  - matches: [{path: {type: RegularExpression, value: "/(unclosed"}}]
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: Exact, value: /ok}}]
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: Exact, value: /slow}}]
    timeouts: {request: 5 seconds}
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: Exact, value: /ext}}]
    filters: [{type: ExtensionRef, extensionRef: {group: x, kind: Y, name: z}}]
    backendRefs: [{name: echo, port: 80}]
"#,
    ));
    assert_eq!(
        names(routes(&out, "echo", 80)),
        ["HTTPRoute/a/mixed/rule/1/match/0"]
    );
    let st = status(&out, "HTTPRoute", "mixed");
    let accepted = cond(st, 0, "Accepted");
    assert_eq!(accepted["status"], "True", "one rule still works");
    let message = accepted["message"].as_str().unwrap_or_default();
    for needle in [
        "rule 0: spec.rules[0].matches[0].path: invalid regular expression",
        "rule 2: spec.rules[2].timeouts.request",
        "rule 3: spec.rules[3].filters[0].type: unsupported filter \"ExtensionRef\"",
    ] {
        assert!(message.contains(needle), "{needle:?} in {message}");
    }
    assert!(
        out.problems
            .iter()
            .any(|p| p.starts_with("HTTPRoute a/mixed: spec.rules[0]")
                && p.ends_with("rule 0 dropped")),
        "{:?}",
        out.problems
    );

    let out = run(&http_route(
        "allbad",
        "2024-01-01T00:00:00Z",
        r#"  rules:
  - matches: [{path: {type: RegularExpression, value: "("}}]
"#,
    ));
    let accepted = cond(status(&out, "HTTPRoute", "allbad"), 0, "Accepted").clone();
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "UnsupportedValue");
    assert!(routes(&out, "echo", 80).is_empty());
    assert!(
        config(&out, "other").ports[0].routes.is_empty(),
        "others unaffected"
    );
}

#[test]
fn missing_and_invalid_backends_resolve_to_empty_hostname() {
    let out = run(&http_route(
        "refs",
        "2024-01-01T00:00:00Z",
        r#"  rules:
  - backendRefs:
    - {name: echo, port: 80, weight: 3}
    - {name: ghost, port: 80, weight: 1}
"#,
    ));
    let r = &routes(&out, "echo", 80)[0];
    assert_eq!(
        r.backends[1],
        Backend {
            hostname: String::new(),
            port: 80,
            weight: 1,
            filters: vec![]
        },
        "kept with its weight, empty hostname = 500"
    );
    let st = status(&out, "HTTPRoute", "refs");
    let resolved = cond(st, 0, "ResolvedRefs");
    assert_eq!(resolved["status"], "False");
    assert_eq!(resolved["reason"], "BackendNotFound");
    assert!(
        resolved["message"]
            .as_str()
            .is_some_and(|m| m.contains("service a/ghost not found"))
    );
    assert_eq!(cond(st, 0, "Accepted")["status"], "True");

    let out = run(&http_route(
        "kinds",
        "2024-01-01T00:00:00Z",
        r#"  rules:
  - backendRefs: [{group: example.com, kind: Bucket, name: b, port: 80}]
"#,
    ));
    let resolved = cond(status(&out, "HTTPRoute", "kinds"), 0, "ResolvedRefs").clone();
    assert_eq!(resolved["reason"], "InvalidKind");
    assert_eq!(routes(&out, "echo", 80)[0].backends[0].hostname, "");
}

#[test]
fn parents_unbound_and_gateway_attachment() {
    let out = run(r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-lonely, namespace: b}
spec:
  parentRefs: [{group: "", kind: Service, name: lonely}]
  rules: [{backendRefs: [{name: lonely, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-wp, namespace: a}
spec:
  parentRefs: [{name: wp}]
  hostnames: [other.a.svc.cluster.local]
  rules: [{backendRefs: [{name: other, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-wp-all, namespace: a}
spec:
  parentRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  rules: [{backendRefs: [{name: other, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ingress, namespace: a}
spec:
  parentRefs: [{name: some-ingress-gateway}]
  rules: [{matches: [{path: {type: RegularExpression, value: "("}}], backendRefs: [{name: other, port: 80}]}]
"#);
    let st = status(&out, "HTTPRoute", "to-lonely");
    let accepted = cond(st, 0, "Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "NoMatchingParent");
    assert_eq!(accepted["message"], "service is not bound to a waypoint");
    assert!(!out.l7_services.keys().any(|k| k.contains("lonely")));

    assert_eq!(
        names(routes(&out, "other", 80)),
        [
            "HTTPRoute/a/to-wp/rule/0/match/0",
            "HTTPRoute/a/to-wp-all/rule/0/match/0"
        ]
    );
    assert_eq!(
        names(routes(&out, "echo", 80)),
        ["HTTPRoute/a/to-wp-all/rule/0/match/0"],
        "hostnames filter which bound services a Gateway-parented route reaches"
    );
    assert!(routes(&out, "echo", 9000).is_empty(), "never on tcp ports");
    assert!(
        !out.route_statuses.iter().any(|s| s.name == "ingress"),
        "routes of other Gateways are not ours to report"
    );
    assert!(
        !out.problems.iter().any(|p| p.contains("ingress")),
        "nor their problems: {:?}",
        out.problems
    );
}

#[test]
fn grpc_methods_become_paths() {
    let out = run(r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: a}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
  - matches:
    - method: {service: weft.echo.v1.Echo, method: Say}
    - method: {service: weft.echo.v1.Echo}
    - method: {method: Say}
    - method: {type: RegularExpression, service: "weft\\..*", method: "S.*"}
    - headers: [{name: X-Tenant, value: t1}]
    backendRefs: [{name: echo, port: 7070}]
"#);
    let r = routes(&out, "echo", 7070);
    let by_name = |j: usize| {
        r.iter()
            .find(|e| e.name == format!("GRPCRoute/a/g/rule/0/match/{j}"))
            .and_then(path)
            .cloned()
    };
    use string_match::Kind::{Exact, PathPrefix, Regex};
    assert_eq!(by_name(0), Some(Exact("/weft.echo.v1.Echo/Say".into())));
    assert_eq!(
        by_name(1),
        Some(Regex(r"/weft\.echo\.v1\.Echo/[^/]+".into()))
    );
    assert_eq!(by_name(2), Some(Regex("/[^/]+/Say".into())));
    assert_eq!(by_name(3), Some(Regex(r"/(?:weft\..*)/(?:S.*)".into())));
    assert_eq!(by_name(4), Some(PathPrefix("/".into())));
    assert_eq!(
        names(r),
        [
            "GRPCRoute/a/g/rule/0/match/0", // exact service + method
            "GRPCRoute/a/g/rule/0/match/1", // service only: 17 characters
            "GRPCRoute/a/g/rule/0/match/3", // regex: 10 characters
            "GRPCRoute/a/g/rule/0/match/2", // method only: 3 characters
            "GRPCRoute/a/g/rule/0/match/4", // headers only, no method
        ]
    );
    assert!(
        routes(&out, "echo", 80).is_empty(),
        "parentRef port 7070 only"
    );
    let svc_only = regex::Regex::new(r"^(?:/weft\.echo\.v1\.Echo/[^/]+)$").expect("regex");
    assert!(svc_only.is_match("/weft.echo.v1.Echo/Other"));
    assert!(!svc_only.is_match("/weft.echo.v1.Echo/a/b"));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("200ms"), Ok(200));
    assert_eq!(parse_duration("1s"), Ok(1000));
    assert_eq!(parse_duration("1m"), Ok(60_000));
    assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
    assert_eq!(parse_duration("0s"), Ok(0));
    for bad in ["", "1", "1d", "1.5s", "s", "123456s", "1h1h1h1h1h"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn l7_policies_by_gateway_and_service_target() {
    let out = run(r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: wp-wide, namespace: a}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/b/sa/bad], notNamespaces: [a], ipBlocks: [10.0.0.0/8], serviceAccounts: [b/evil]}}]
    to: [{operation: {methods: [DELETE], paths: [/admin*], hosts: [echo.a.svc.cluster.local], ports: ["80"], notPorts: ["81"]}}]
    when: [{key: "request.headers[x-debug]", values: ["1"]}, {key: "request.auth.claims[iss]", values: [x]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-get, namespace: a}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}, {kind: Service, group: "", name: other}]
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET]}}]
  - from: [{source: {requestPrincipals: ["*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: a}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: AUDIT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-port, namespace: a}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: ALLOW
  rules: [{to: [{operation: {ports: ["eighty"]}}]}]
"#);
    assert_eq!(
        out.l7_policies.keys().collect::<Vec<_>>(),
        ["a/wp/a/bad-port", "a/wp/a/echo-get", "a/wp/a/wp-wide"]
    );
    let wide = &out.l7_policies["a/wp/a/wp-wide"];
    assert_eq!(wide.action, Action::Deny as i32);
    assert!(
        wide.services.is_empty(),
        "Gateway target: the whole waypoint"
    );
    let rule = &wide.rules[0];
    assert_eq!(
        rule.from[0].principals,
        ["cluster.local/ns/b/sa/bad", "cluster.local/ns/b/sa/evil"]
    );
    assert_eq!(rule.from[0].not_namespaces, ["a"]);
    assert_eq!(rule.from[0].ip_blocks, ["10.0.0.0/8"]);
    let op = &rule.to[0];
    assert_eq!(
        (op.methods.clone(), op.paths.clone()),
        (vec!["DELETE".to_owned()], vec!["/admin*".to_owned()])
    );
    assert_eq!(
        (op.ports.clone(), op.not_ports.clone()),
        (vec![80], vec![81])
    );
    assert_eq!(op.hosts, ["echo.a.svc.cluster.local"]);
    assert_eq!(rule.when.len(), 1, "unsupported when key ignored in DENY");
    assert_eq!(rule.when[0].key, "request.headers[x-debug]");

    let get = &out.l7_policies["a/wp/a/echo-get"];
    assert_eq!(get.action, Action::Allow as i32);
    assert_eq!(
        get.services,
        ["echo.a.svc.cluster.local", "other.a.svc.cluster.local"]
    );
    assert_eq!(
        get.rules.len(),
        1,
        "ALLOW rule with requestPrincipals dropped"
    );
    assert_eq!(get.rules[0].to[0].methods, ["GET"]);

    assert!(
        out.l7_policies["a/wp/a/bad-port"].rules.is_empty(),
        "ALLOW fails closed"
    );
    assert!(
        out.problems
            .iter()
            .any(|p| p.contains("AuthorizationPolicy a/bad-port") && p.contains("\"eighty\""))
    );
    assert!(
        out.problems
            .iter()
            .any(|p| p.contains("AuthorizationPolicy a/audit") && p.contains("spec.action"))
    );
    // targetRef policies are never L4 policies for ztunnel.
    assert!(
        out.authorizations
            .keys()
            .all(|k| !k.starts_with("a/wp-wide") && !k.starts_with("a/echo-get"))
    );
}

#[test]
fn implicit_waypoint_policy_attaches_to_workloads_behind_it() {
    use weft_proto::istio::security::{Scope, string_match::MatchType};
    use weft_proto::istio::workload::address;
    let pod = |name: &str, ns: &str, labels: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\nspec: {{nodeName: n1, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        )
    };
    let out = run(&[
        pod("echo-1", "a", "{app: echo}", "10.244.0.1"),
        pod("other-1", "a", "{app: other}", "10.244.0.2"),
        pod("stray", "a", "{app: stray}", "10.244.0.3"),
        pod("lonely-1", "b", "{app: lonely}", "10.244.0.4"),
        pod(
            "direct",
            "b",
            "{app: direct, istio.io/use-waypoint: wl}",
            "10.244.0.5",
        ),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wl, namespace: b, labels: {istio.io/waypoint-for: workload}}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n".to_owned(),
        // A selector policy with L7 fields: ztunnel enforces it fail-closed (the rule is dropped).
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: l7-selector, namespace: a}\nspec: {selector: {matchLabels: {app: echo}}, action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}\n".to_owned(),
    ]
    .join("\n---\n"));
    let policies = |ns: &str, name: &str| -> Vec<String> {
        match out.addresses[&format!("Kubernetes//Pod/{ns}/{name}")]
            .address
            .r#type
            .as_ref()
        {
            Some(address::Type::Workload(w)) => w.authorization_policies.clone(),
            other => panic!("{other:?}"),
        }
    };
    let wp = "a/istio_allow_waypoint_a_wp".to_owned();
    let wl = "b/istio_allow_waypoint_b_wl".to_owned();
    assert!(
        policies("a", "echo-1").contains(&wp),
        "backs a bound service"
    );
    assert!(policies("a", "other-1").contains(&wp));
    assert!(
        !policies("a", "stray").contains(&wp),
        "backs no bound service"
    );
    assert!(
        policies("b", "lonely-1").is_empty(),
        "unbound: {:?}",
        policies("b", "lonely-1")
    );
    assert_eq!(
        policies("b", "direct"),
        std::slice::from_ref(&wl),
        "bound directly"
    );
    let allow = &out.authorizations[&wp];
    assert_eq!(allow.scope, Scope::WorkloadSelector as i32);
    let principal = &allow.rules[0].clauses[0].matches[0].principals[0];
    assert_eq!(
        principal.match_type,
        Some(MatchType::Exact("cluster.local/ns/a/sa/wp".into()))
    );
    assert!(out.authorizations.contains_key(&wl));

    let l7_selector = &out.authorizations["a/l7-selector"];
    assert!(
        l7_selector.rules.is_empty(),
        "selector ALLOW with L7 fields allows nothing at ztunnel"
    );
    assert!(policies("a", "echo-1").contains(&"a/l7-selector".to_owned()));
}

#[test]
fn consumer_routes_cross_namespace_gateways_and_listener_ports() {
    let out = run(r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: b}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: a}]
  rules: [{backendRefs: [{name: lonely, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: from-b, namespace: b}
spec:
  parentRefs: [{name: wp, namespace: a}]
  rules: [{backendRefs: [{name: lonely, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: listener-port, namespace: a}
spec:
  parentRefs: [{name: wp, port: 15008, sectionName: mesh}]
  hostnames: [echo]
  rules:
  - matches: [{path: {type: PathPrefix, value: no-slash}}]
  - backendRefs: [{name: echo, port: 80}]
"#);
    let consumer = cond(status(&out, "HTTPRoute", "consumer"), 0, "Accepted").clone();
    assert_eq!(consumer["status"], "False");
    assert_eq!(consumer["reason"], "UnsupportedValue");
    assert!(
        consumer["message"]
            .as_str()
            .is_some_and(|m| m.contains("consumer routes"))
    );
    let from_b = cond(status(&out, "HTTPRoute", "from-b"), 0, "Accepted").clone();
    assert_eq!(from_b["reason"], "NotAllowedByListeners");
    assert!(
        !routes(&out, "echo", 80)
            .iter()
            .any(|r| r.name.contains("/b/")),
        "neither reaches a's service"
    );

    // A Gateway parent's port is the listener's: the route still lands on the service ports;
    // the short hostname `echo` selects echo only. The rule with a relative path is dropped.
    assert_eq!(
        names(routes(&out, "echo", 80)),
        ["HTTPRoute/a/listener-port/rule/1/match/0"]
    );
    assert_eq!(
        names(routes(&out, "echo", 81)),
        ["HTTPRoute/a/listener-port/rule/1/match/0"]
    );
    assert!(routes(&out, "other", 80).is_empty());
    let accepted = cond(status(&out, "HTTPRoute", "listener-port"), 0, "Accepted").clone();
    assert!(
        accepted["message"]
            .as_str()
            .is_some_and(|m| m.contains("rule 0: spec.rules[0].matches[0].path.value")),
        "{accepted}"
    );
}
