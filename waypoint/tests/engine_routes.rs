//! Gateway API routing through the engine's public API (`ServiceRoutes`): matches, backends,
//! filters, redirects, mirrors, timeouts and config validation.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use waypoint::engine::{
    BackendTarget, LoadBalancer, OutlierDetection, Protocol, Routing, ServiceRoutes,
};
use weft_proto::weft::l7::v1 as pb;

const SVC: &str = "app.ns.svc.cluster.local";

fn exact(v: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Exact(v.into())),
    }
}

fn prefix(v: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::PathPrefix(v.into())),
    }
}

fn regex(v: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Regex(v.into())),
    }
}

fn path(m: pb::StringMatch) -> pb::RouteMatch {
    pb::RouteMatch {
        path: Some(m),
        ..Default::default()
    }
}

fn header(name: &str, m: pb::StringMatch) -> pb::HeaderMatch {
    pb::HeaderMatch {
        name: name.into(),
        value: Some(m),
    }
}

fn backend(host: &str, port: u32, weight: u32) -> pb::Backend {
    pb::Backend {
        hostname: host.into(),
        port,
        weight,
        filters: vec![],
    }
}

fn route(name: &str, m: Option<pb::RouteMatch>) -> pb::Route {
    pb::Route {
        name: name.into(),
        r#match: m,
        backends: vec![backend(name, 80, 1)],
        ..Default::default()
    }
}

fn service(routes: Vec<pb::Route>) -> pb::ServiceConfig {
    pb::ServiceConfig {
        namespace: "ns".into(),
        name: "app".into(),
        hostname: SVC.into(),
        ports: vec![pb::PortConfig {
            port: 80,
            protocol: pb::Protocol::Http as i32,
            routes,
        }],
        ..Default::default()
    }
}

fn compile(routes: Vec<pb::Route>) -> ServiceRoutes {
    ServiceRoutes::compile(&service(routes)).unwrap()
}

fn compile_err(routes: Vec<pb::Route>) -> String {
    ServiceRoutes::compile(&service(routes))
        .unwrap_err()
        .to_string()
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn get(uri: &str) -> http::request::Parts {
    req("GET", uri, &[("host", "app")])
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(7)
}

/// The route name taken by `request` on port 80, or `None` for `NotFound`.
fn taken(s: &ServiceRoutes, request: &http::request::Parts) -> Option<String> {
    match s.route(80, request, &mut rng()) {
        Routing::Forward(f) => Some(f.route.to_owned()),
        Routing::NotFound => None,
        Routing::Respond(r) => panic!("unexpected answer {r:?}"),
    }
}

fn respond(r: Routing<'_>) -> http::Response<()> {
    match r {
        Routing::Respond(r) => r,
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn location(r: &http::Response<()>) -> &str {
    r.headers()["location"].to_str().unwrap()
}

fn filter(kind: pb::filter::Kind) -> pb::Filter {
    pb::Filter { kind: Some(kind) }
}

fn hdr(name: &str, value: &str) -> pb::Header {
    pb::Header {
        name: name.into(),
        value: value.into(),
    }
}

// ---- matching ----

#[test]
fn path_exact_matches_only_that_path_ignoring_query() {
    let s = compile(vec![route("r", Some(path(exact("/foo"))))]);
    assert_eq!(taken(&s, &get("/foo")).as_deref(), Some("r"));
    assert_eq!(taken(&s, &get("/foo?x=1")).as_deref(), Some("r"));
    assert_eq!(taken(&s, &get("/foo/")), None);
    assert_eq!(taken(&s, &get("/foobar")), None);
    assert_eq!(taken(&s, &get("/FOO")), None);
}

#[test]
fn path_prefix_is_element_wise() {
    for configured in ["/foo", "/foo/"] {
        let s = compile(vec![route("r", Some(path(prefix(configured))))]);
        for hit in ["/foo", "/foo/", "/foo/bar", "/foo/bar?q=1"] {
            assert_eq!(
                taken(&s, &get(hit)).as_deref(),
                Some("r"),
                "{configured} {hit}"
            );
        }
        for miss in ["/foobar", "/fo", "/", "/bar/foo"] {
            assert_eq!(taken(&s, &get(miss)), None, "{configured} {miss}");
        }
    }
    let root = compile(vec![route("root", Some(path(prefix("/"))))]);
    for p in ["/", "/a", "/a/b/c"] {
        assert_eq!(taken(&root, &get(p)).as_deref(), Some("root"), "{p}");
    }
}

#[test]
fn path_regex_is_a_full_match_on_the_path_without_query() {
    let s = compile(vec![route("r", Some(path(regex("/v[0-9]+"))))]);
    assert_eq!(taken(&s, &get("/v12")).as_deref(), Some("r"));
    assert_eq!(taken(&s, &get("/v1?page=2")).as_deref(), Some("r"));
    assert_eq!(taken(&s, &get("/v1/x")), None);
    assert_eq!(taken(&s, &get("/api/v1")), None);
    // Alternation is anchored as a whole, not only its first branch.
    let alt = compile(vec![route("alt", Some(path(regex("/a|/b"))))]);
    assert_eq!(taken(&alt, &get("/b")).as_deref(), Some("alt"));
    assert_eq!(taken(&alt, &get("/bx")), None);
    assert_eq!(taken(&alt, &get("/xa")), None);
    assert_eq!(taken(&alt, &get("/ax")), None);
    assert_eq!(taken(&alt, &get("/x/b")), None);
}

#[test]
fn header_exact_match_has_case_insensitive_names_and_case_sensitive_values() {
    let m = pb::RouteMatch {
        headers: vec![header("X-Version", exact("v2"))],
        ..Default::default()
    };
    let s = compile(vec![route("r", Some(m))]);
    assert_eq!(
        taken(&s, &req("GET", "/", &[("x-version", "v2")])).as_deref(),
        Some("r")
    );
    assert_eq!(
        taken(&s, &req("GET", "/", &[("X-VERSION", "v2")])).as_deref(),
        Some("r")
    );
    assert_eq!(taken(&s, &req("GET", "/", &[("x-version", "V2")])), None);
    assert_eq!(taken(&s, &req("GET", "/", &[("x-version", "v22")])), None);
    assert_eq!(taken(&s, &req("GET", "/", &[])), None);
}

#[test]
fn header_regex_is_a_full_match() {
    let m = pb::RouteMatch {
        headers: vec![header("x-user", regex("user-[0-9]+"))],
        ..Default::default()
    };
    let s = compile(vec![route("r", Some(m))]);
    assert_eq!(
        taken(&s, &req("GET", "/", &[("x-user", "user-42")])).as_deref(),
        Some("r")
    );
    assert_eq!(taken(&s, &req("GET", "/", &[("x-user", "user-42x")])), None);
    assert_eq!(
        taken(&s, &req("GET", "/", &[("x-user", "a-user-42")])),
        None
    );
}

#[test]
fn repeated_header_values_are_joined_with_commas() {
    let m = pb::RouteMatch {
        headers: vec![header("x-tag", exact("a,b"))],
        ..Default::default()
    };
    let s = compile(vec![route("r", Some(m))]);
    let two = req("GET", "/", &[("x-tag", "a"), ("x-tag", "b")]);
    assert_eq!(taken(&s, &two).as_deref(), Some("r"));
    assert_eq!(taken(&s, &req("GET", "/", &[("x-tag", "a")])), None);
}

#[test]
fn every_header_match_must_hold() {
    let m = pb::RouteMatch {
        headers: vec![header("a", exact("1")), header("b", exact("2"))],
        ..Default::default()
    };
    let s = compile(vec![route("r", Some(m))]);
    assert_eq!(
        taken(&s, &req("GET", "/", &[("a", "1"), ("b", "2")])).as_deref(),
        Some("r")
    );
    assert_eq!(taken(&s, &req("GET", "/", &[("a", "1")])), None);
    assert_eq!(taken(&s, &req("GET", "/", &[("a", "1"), ("b", "3")])), None);
}

#[test]
fn query_param_exact_uses_the_first_value_percent_decoded() {
    let m = pb::RouteMatch {
        query_params: vec![header("name", exact("a b"))],
        ..Default::default()
    };
    let s = compile(vec![route("r", Some(m))]);
    assert_eq!(taken(&s, &get("/?name=a%20b")).as_deref(), Some("r"));
    assert_eq!(
        taken(&s, &get("/?x=1&name=a%20b&name=zzz")).as_deref(),
        Some("r")
    );
    assert_eq!(taken(&s, &get("/?name=zzz&name=a%20b")), None);
    assert_eq!(
        taken(&s, &get("/?Name=a%20b")),
        None,
        "names are case-sensitive"
    );
    assert_eq!(taken(&s, &get("/")), None);
}

#[test]
fn query_param_regex_is_a_full_match() {
    let m = pb::RouteMatch {
        query_params: vec![header("page", regex("[0-9]+"))],
        ..Default::default()
    };
    let s = compile(vec![route("r", Some(m))]);
    assert_eq!(taken(&s, &get("/?page=12")).as_deref(), Some("r"));
    assert_eq!(taken(&s, &get("/?page=12a")), None);
}

#[test]
fn method_matches_exactly() {
    let m = pb::RouteMatch {
        method: "POST".into(),
        ..Default::default()
    };
    let s = compile(vec![route("r", Some(m))]);
    assert_eq!(taken(&s, &req("POST", "/", &[])).as_deref(), Some("r"));
    assert_eq!(taken(&s, &req("GET", "/", &[])), None);
}

#[test]
fn first_matching_entry_wins_in_the_given_order() {
    let s = compile(vec![
        route("exact", Some(path(exact("/a/b")))),
        route("prefix", Some(path(prefix("/a")))),
        route("all", None),
    ]);
    assert_eq!(taken(&s, &get("/a/b")).as_deref(), Some("exact"));
    assert_eq!(taken(&s, &get("/a/c")).as_deref(), Some("prefix"));
    assert_eq!(taken(&s, &get("/z")).as_deref(), Some("all"));
    // The engine does not re-sort: a catch-all first shadows everything.
    let s = compile(vec![
        route("all", None),
        route("exact", Some(path(exact("/a/b")))),
    ]);
    assert_eq!(taken(&s, &get("/a/b")).as_deref(), Some("all"));
}

#[test]
fn no_matching_entry_is_not_found() {
    let s = compile(vec![route("r", Some(path(exact("/only"))))]);
    assert!(matches!(
        s.route(80, &get("/other"), &mut rng()),
        Routing::NotFound
    ));
}

#[test]
fn port_without_routes_or_unlisted_forwards_to_the_service_itself() {
    let s = compile(vec![]);
    for port in [80, 9090] {
        match s.route(port, &get("/x"), &mut rng()) {
            Routing::Forward(f) => {
                assert_eq!(f.route, "default");
                assert_eq!(
                    f.backend,
                    BackendTarget {
                        hostname: SVC.into(),
                        port
                    }
                );
                assert!(f.mirrors.is_empty());
                assert_eq!(f.request_timeout, None);
                assert_eq!(f.backend_request_timeout, None);
                assert!(f.retry.is_none());
                // No filters: the request is untouched.
                let mut r = get("/x");
                f.apply_request(&mut r);
                assert_eq!(r.uri, "/x");
                assert_eq!(r.headers.len(), 1);
            }
            other => panic!("port {port}: {other:?}"),
        }
    }
    // A port with routes never falls back to the service itself.
    let s = compile(vec![route("r", Some(path(exact("/a"))))]);
    assert!(matches!(
        s.route(80, &get("/b"), &mut rng()),
        Routing::NotFound
    ));
    assert!(
        matches!(s.route(81, &get("/b"), &mut rng()), Routing::Forward(f) if f.route == "default")
    );
}

// ---- backends ----

#[test]
fn weighted_split_follows_weights() {
    let mut r = route("split", None);
    r.backends = vec![backend("a", 80, 80), backend("b", 8080, 20)];
    let s = compile(vec![r]);
    let mut rng = StdRng::seed_from_u64(42);
    let request = get("/");
    let (mut a, mut b) = (0u32, 0u32);
    for _ in 0..10_000 {
        match s.route(80, &request, &mut rng) {
            Routing::Forward(f) => match (&*f.backend.hostname, f.backend.port) {
                ("a", 80) => a += 1,
                ("b", 8080) => b += 1,
                other => panic!("unexpected backend {other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
    assert!(
        (7_800..=8_200).contains(&a),
        "a chosen {a} of 10000 (want 8000 ± 2 %)"
    );
    assert_eq!(a + b, 10_000);
}

#[test]
fn weight_zero_is_never_chosen() {
    let mut r = route("r", None);
    r.backends = vec![
        backend("zero", 80, 0),
        backend("one", 80, 1),
        backend("zero2", 80, 0),
    ];
    let s = compile(vec![r]);
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..1_000 {
        match s.route(80, &get("/"), &mut rng) {
            Routing::Forward(f) => assert_eq!(&*f.backend.hostname, "one"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn no_usable_backend_answers_500() {
    let mut zero = route("zero", None);
    zero.backends = vec![backend("a", 80, 0), backend("b", 80, 0)];
    let mut none = route("none", None);
    none.backends = vec![];
    for r in [zero, none] {
        let s = compile(vec![r]);
        let answer = respond(s.route(80, &get("/"), &mut rng()));
        assert_eq!(answer.status(), 500);
        assert!(answer.headers().get("location").is_none());
    }
}

#[test]
fn invalid_backend_reference_answers_500_for_its_share() {
    let mut r = route("r", None);
    r.backends = vec![backend("", 0, 1), backend("good", 80, 1)];
    let s = compile(vec![r]);
    let mut rng = StdRng::seed_from_u64(3);
    let (mut errors, mut forwards) = (0, 0);
    for _ in 0..2_000 {
        match s.route(80, &get("/"), &mut rng) {
            Routing::Respond(a) => {
                assert_eq!(a.status(), 500);
                errors += 1;
            }
            Routing::Forward(f) => {
                assert_eq!(&*f.backend.hostname, "good");
                forwards += 1;
            }
            Routing::NotFound => panic!("not found"),
        }
    }
    assert!((800..=1_200).contains(&errors), "{errors} 500s of 2000");
    assert_eq!(errors + forwards, 2_000);
}

// ---- filters ----

fn forward_with(r: pb::Route, request: &mut http::request::Parts) -> Option<http::response::Parts> {
    let s = compile(vec![r]);
    let decision = s.route(80, request, &mut rng());
    let Routing::Forward(f) = decision else {
        panic!("expected forward, got {decision:?}");
    };
    f.apply_request(request);
    let mut response = http::Response::builder()
        .header("server", "up")
        .header("x-drop", "1")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    f.apply_response(&mut response);
    Some(response)
}

#[test]
fn request_header_modifier_sets_adds_and_removes_case_insensitively() {
    let mut r = route("r", None);
    r.filters = vec![filter(pb::filter::Kind::RequestHeaderModifier(
        pb::HeaderModifier {
            set: vec![hdr("X-Set", "new")],
            add: vec![hdr("X-Add", "two")],
            remove: vec!["X-Remove".into()],
        },
    ))];
    let mut request = req(
        "GET",
        "/",
        &[
            ("x-set", "old"),
            ("x-set", "older"),
            ("x-add", "one"),
            ("x-remove", "gone"),
            ("keep", "k"),
        ],
    );
    forward_with(r, &mut request);
    let all = |n: &str| -> Vec<&str> {
        request
            .headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("x-set"), ["new"]);
    assert_eq!(all("x-add"), ["one", "two"]);
    assert!(all("x-remove").is_empty());
    assert_eq!(all("keep"), ["k"]);
}

#[test]
fn response_header_modifier_applies_to_the_response_only() {
    let mut r = route("r", None);
    r.filters = vec![filter(pb::filter::Kind::ResponseHeaderModifier(
        pb::HeaderModifier {
            set: vec![hdr("Server", "weft")],
            add: vec![hdr("x-added", "yes")],
            remove: vec!["X-Drop".into()],
        },
    ))];
    let mut request = get("/");
    let response = forward_with(r, &mut request).unwrap();
    assert_eq!(response.headers["server"], "weft");
    assert_eq!(response.headers["x-added"], "yes");
    assert!(response.headers.get("x-drop").is_none());
    assert!(request.headers.get("x-added").is_none());
    assert!(request.headers.get("server").is_none());
}

#[test]
fn backend_filters_apply_after_route_filters_for_the_chosen_backend_only() {
    let set = |v: &str| {
        filter(pb::filter::Kind::RequestHeaderModifier(
            pb::HeaderModifier {
                set: vec![hdr("x-by", v)],
                ..Default::default()
            },
        ))
    };
    let mut r = route("r", None);
    r.filters = vec![set("route")];
    let mut chosen = backend("chosen", 80, 1);
    chosen.filters = vec![set("backend")];
    let mut other = backend("other", 80, 0);
    other.filters = vec![set("other")];
    r.backends = vec![other, chosen];
    let mut request = get("/");
    forward_with(r, &mut request);
    assert_eq!(request.headers["x-by"], "backend");
}

fn rewrite(hostname: &str, path: Option<pb::path_modifier::Kind>) -> pb::Filter {
    filter(pb::filter::Kind::UrlRewrite(pb::UrlRewrite {
        hostname: hostname.into(),
        path: path.map(|k| pb::PathModifier { kind: Some(k) }),
    }))
}

#[test]
fn url_rewrite_hostname_sets_host_and_uri_authority() {
    let mut r = route("r", None);
    r.filters = vec![rewrite("new.example", None)];
    // HTTP/1.1 origin-form: only the Host header.
    let mut h1 = req("GET", "/p?q=1", &[("host", "old.example:8080")]);
    forward_with(r.clone(), &mut h1);
    assert_eq!(h1.headers["host"], "new.example");
    assert_eq!(h1.uri, "/p?q=1");
    // HTTP/2 (:authority in the URI): both.
    let mut h2 = req("GET", "http://old.example:8080/p?q=1", &[]);
    forward_with(r, &mut h2);
    assert_eq!(h2.uri.authority().unwrap(), "new.example");
    assert_eq!(h2.uri.scheme_str(), Some("http"));
    assert_eq!(h2.uri.path_and_query().unwrap(), "/p?q=1");
    assert_eq!(h2.headers["host"], "new.example");
}

#[test]
fn url_rewrite_full_path_keeps_the_query() {
    let mut r = route("r", Some(path(prefix("/old"))));
    r.filters = vec![rewrite(
        "",
        Some(pb::path_modifier::Kind::ReplaceFullPath("/new".into())),
    )];
    let mut request = get("/old/deep/x?a=1&b=2");
    forward_with(r, &mut request);
    assert_eq!(request.uri, "/new?a=1&b=2");
    assert_eq!(
        request.headers["host"], "app",
        "host untouched without a hostname"
    );
}

#[test]
fn url_rewrite_replace_prefix_match_is_element_wise() {
    // (route prefix, replacement, request, expected)
    let cases = [
        ("/foo", "/bar", "/foo/x", "/bar/x"),
        ("/foo", "/bar", "/foo", "/bar"),
        ("/foo", "/bar", "/foo/", "/bar/"),
        ("/foo/", "/bar", "/foo/x", "/bar/x"),
        ("/foo", "/bar/", "/foo/x", "/bar/x"),
        ("/foo", "/", "/foo/x", "/x"),
        ("/foo", "/", "/foo", "/"),
        ("/foo", "/bar", "/foo/x?q=1", "/bar/x?q=1"),
        ("/", "/api", "/x/y", "/api/x/y"),
    ];
    for (configured, replacement, before, after) in cases {
        let mut r = route("r", Some(path(prefix(configured))));
        r.filters = vec![rewrite(
            "",
            Some(pb::path_modifier::Kind::ReplacePrefixMatch(
                replacement.into(),
            )),
        )];
        let mut request = get(before);
        forward_with(r, &mut request);
        assert_eq!(
            request.uri, after,
            "prefix {configured} → {replacement} on {before}"
        );
    }
}

fn redirect(r: pb::RequestRedirect) -> pb::Route {
    pb::Route {
        name: "redir".into(),
        r#match: Some(path(prefix("/old"))),
        filters: vec![filter(pb::filter::Kind::RequestRedirect(r))],
        backends: vec![],
        ..Default::default()
    }
}

fn redirect_location(r: pb::RequestRedirect, request: http::request::Parts) -> (u16, String) {
    let s = compile(vec![redirect(r)]);
    let answer = respond(s.route(80, &request, &mut rng()));
    (answer.status().as_u16(), location(&answer).to_owned())
}

#[test]
fn redirect_defaults_to_302_keeping_host_path_and_query() {
    let (status, loc) = redirect_location(
        pb::RequestRedirect::default(),
        req("GET", "/old/x?a=1", &[("host", "app.example")]),
    );
    assert_eq!(status, 302);
    assert_eq!(loc, "http://app.example/old/x?a=1");
}

#[test]
fn redirect_301_and_hostname() {
    let (status, loc) = redirect_location(
        pb::RequestRedirect {
            hostname: "new.example".into(),
            status_code: 301,
            ..Default::default()
        },
        req("GET", "/old", &[("host", "app.example")]),
    );
    assert_eq!(status, 301);
    assert_eq!(loc, "http://new.example/old");
}

#[test]
fn redirect_without_scheme_or_port_keeps_the_request_port() {
    // Host carries a port: kept.
    let (_, loc) = redirect_location(
        pb::RequestRedirect {
            hostname: "new.example".into(),
            ..Default::default()
        },
        req("GET", "/old", &[("host", "app.example:8080")]),
    );
    assert_eq!(loc, "http://new.example:8080/old");
    // Host without port: the service port the request arrived on (80, the scheme default).
    let (_, loc) = redirect_location(
        pb::RequestRedirect::default(),
        req("GET", "/old", &[("host", "app.example")]),
    );
    assert_eq!(loc, "http://app.example/old");
    // Host without port on a non-default service port: that port (Gateway API: the
    // listener port).
    let mut c = service(vec![redirect(pb::RequestRedirect::default())]);
    c.ports[0].port = 8080;
    let s = ServiceRoutes::compile(&c).unwrap();
    let request = req("GET", "/old", &[("host", "app.example")]);
    let answer = respond(s.route(8080, &request, &mut rng()));
    assert_eq!(location(&answer), "http://app.example:8080/old");
    // Explicit default port in Host: omitted.
    let (_, loc) = redirect_location(
        pb::RequestRedirect::default(),
        req("GET", "/old", &[("host", "app.example:80")]),
    );
    assert_eq!(loc, "http://app.example/old");
}

#[test]
fn redirect_scheme_change_uses_the_scheme_default_port() {
    let (_, loc) = redirect_location(
        pb::RequestRedirect {
            scheme: "https".into(),
            ..Default::default()
        },
        req("GET", "/old?x=1", &[("host", "app.example:8080")]),
    );
    assert_eq!(loc, "https://app.example/old?x=1");
}

#[test]
fn redirect_explicit_port_is_shown_unless_it_is_the_scheme_default() {
    let cases = [
        ("https", 8443, "https://app.example:8443/old"),
        ("https", 443, "https://app.example/old"),
        ("", 443, "http://app.example:443/old"),
        ("", 80, "http://app.example/old"),
        ("http", 8080, "http://app.example:8080/old"),
    ];
    for (scheme, port, want) in cases {
        let (_, loc) = redirect_location(
            pb::RequestRedirect {
                scheme: scheme.into(),
                port,
                ..Default::default()
            },
            req("GET", "/old", &[("host", "app.example:9000")]),
        );
        assert_eq!(loc, want, "scheme {scheme:?} port {port}");
    }
}

#[test]
fn redirect_path_modifiers() {
    let full = pb::RequestRedirect {
        path: Some(pb::PathModifier {
            kind: Some(pb::path_modifier::Kind::ReplaceFullPath("/moved".into())),
        }),
        ..Default::default()
    };
    let (_, loc) = redirect_location(full, req("GET", "/old/a?q=1", &[("host", "h")]));
    assert_eq!(loc, "http://h/moved?q=1");
    let pre = pb::RequestRedirect {
        path: Some(pb::PathModifier {
            kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch("/new".into())),
        }),
        ..Default::default()
    };
    let (_, loc) = redirect_location(pre.clone(), req("GET", "/old/a/b", &[("host", "h")]));
    assert_eq!(loc, "http://h/new/a/b");
    let (_, loc) = redirect_location(pre, req("GET", "/old", &[("host", "h")]));
    assert_eq!(loc, "http://h/new");
}

#[test]
fn redirect_uses_the_uri_authority_and_ipv6_hosts() {
    let (_, loc) = redirect_location(
        pb::RequestRedirect {
            scheme: "https".into(),
            ..Default::default()
        },
        req("GET", "http://app.example:8080/old", &[]),
    );
    assert_eq!(loc, "https://app.example/old");
    let (_, loc) = redirect_location(
        pb::RequestRedirect::default(),
        req("GET", "/old", &[("host", "[fd00::1]:8080")]),
    );
    assert_eq!(loc, "http://[fd00::1]:8080/old");
}

#[test]
fn redirect_wins_over_backends() {
    let mut r = redirect(pb::RequestRedirect {
        hostname: "elsewhere".into(),
        ..Default::default()
    });
    r.backends = vec![backend("a", 80, 1)];
    let s = compile(vec![r]);
    let answer = respond(s.route(80, &req("GET", "/old", &[("host", "h")]), &mut rng()));
    assert_eq!(answer.status(), 302);
    assert_eq!(location(&answer), "http://elsewhere/old");
}

fn mirror(host: &str, percent: u32) -> pb::Filter {
    filter(pb::filter::Kind::RequestMirror(pb::RequestMirror {
        backend: Some(backend(host, 9000, 1)),
        percent,
    }))
}

#[test]
fn mirrors_are_sampled_by_percent() {
    let mut r = route("r", None);
    r.filters = vec![
        mirror("always", 100),
        mirror("half", 50),
        mirror("never", 0),
    ];
    let s = compile(vec![r]);
    let mut rng = StdRng::seed_from_u64(9);
    let (mut always, mut half) = (0, 0);
    for _ in 0..10_000 {
        let Routing::Forward(f) = s.route(80, &get("/"), &mut rng) else {
            panic!("expected forward");
        };
        for m in &f.mirrors {
            assert_eq!(m.port, 9000);
            match &*m.hostname {
                "always" => always += 1,
                "half" => half += 1,
                other => panic!("mirrored to {other}"),
            }
        }
    }
    assert_eq!(always, 10_000);
    assert!(
        (4_800..=5_200).contains(&half),
        "half mirrored {half} of 10000"
    );
}

#[test]
fn backend_mirror_applies_only_with_its_backend() {
    let mut r = route("r", None);
    let mut b = backend("b", 80, 1);
    b.filters = vec![mirror("shadow", 100)];
    r.backends = vec![b];
    let s = compile(vec![r]);
    let Routing::Forward(f) = s.route(80, &get("/"), &mut rng()) else {
        panic!("expected forward");
    };
    assert_eq!(
        f.mirrors,
        [BackendTarget {
            hostname: "shadow".into(),
            port: 9000
        }]
    );
}

#[test]
fn timeouts_and_retry_pass_through() {
    let mut r = route("r", Some(path(exact("/t"))));
    r.request_timeout_ms = 1_500;
    r.backend_request_timeout_ms = 250;
    r.retry = Some(pb::Retry {
        attempts: 3,
        codes: vec![503, 502],
        backoff_ms: 25,
    });
    let mut plain = route("plain", None);
    plain.retry = Some(pb::Retry {
        attempts: 0,
        codes: vec![],
        backoff_ms: 0,
    });
    let s = compile(vec![r, plain]);
    let Routing::Forward(f) = s.route(80, &get("/t"), &mut rng()) else {
        panic!("expected forward");
    };
    assert_eq!(f.request_timeout, Some(Duration::from_millis(1_500)));
    assert_eq!(f.backend_request_timeout, Some(Duration::from_millis(250)));
    let retry = f.retry.unwrap();
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.codes, [503, 502]);
    assert_eq!(retry.backoff, Duration::from_millis(25));
    let Routing::Forward(f) = s.route(80, &get("/other"), &mut rng()) else {
        panic!("expected forward");
    };
    assert_eq!(f.request_timeout, None, "0 ms = no deadline");
    assert_eq!(f.backend_request_timeout, None);
    assert_eq!(f.retry.unwrap().attempts, 1, "attempts is at least 1");
}

// ---- service-level settings ----

#[test]
fn service_settings_and_protocols() {
    let mut c = service(vec![]);
    c.ports = [
        (80, pb::Protocol::Http),
        (81, pb::Protocol::Http2),
        (82, pb::Protocol::Grpc),
        (83, pb::Protocol::Tcp),
        (84, pb::Protocol::Unspecified),
    ]
    .into_iter()
    .map(|(port, p)| pb::PortConfig {
        port,
        protocol: p as i32,
        routes: vec![],
    })
    .collect();
    let s = ServiceRoutes::compile(&c).unwrap();
    assert_eq!(s.hostname(), SVC);
    assert_eq!(s.load_balancer(), LoadBalancer::LeastRequest);
    assert_eq!(s.outlier_detection(), None);
    assert_eq!(s.protocol(80), Protocol::Http1);
    assert_eq!(s.protocol(81), Protocol::Http2);
    assert_eq!(s.protocol(82), Protocol::Grpc);
    assert_eq!(s.protocol(83), Protocol::Tcp);
    assert_eq!(s.protocol(84), Protocol::Detect);
    assert_eq!(s.protocol(85), Protocol::Detect, "unlisted port");
    assert_eq!(s.ports().collect::<Vec<_>>(), [80, 81, 82, 83, 84]);

    c.load_balancer = pb::LoadBalancer::RoundRobin as i32;
    c.outlier_detection = Some(pb::OutlierDetection {
        consecutive_failures: 5,
        base_ejection_ms: 30_000,
        max_ejection_percent: 10,
    });
    let s = ServiceRoutes::compile(&c).unwrap();
    assert_eq!(s.load_balancer(), LoadBalancer::RoundRobin);
    assert_eq!(
        s.outlier_detection(),
        Some(OutlierDetection {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
        })
    );
    c.outlier_detection = Some(pb::OutlierDetection {
        consecutive_failures: 0,
        base_ejection_ms: 30_000,
        max_ejection_percent: 10,
    });
    assert_eq!(
        ServiceRoutes::compile(&c).unwrap().outlier_detection(),
        None
    );
}

#[test]
fn route_names_are_listed_in_order() {
    let s = compile(vec![route("first", None), route("second", None)]);
    assert_eq!(s.route_names(80).collect::<Vec<_>>(), ["first", "second"]);
    assert_eq!(s.route_names(81).count(), 0);
}

// ---- validation ----

#[test]
fn compile_rejects_bad_regexes_naming_route_and_field() {
    let name = "HTTPRoute/app/r/rule/0/match/1";
    let e = compile_err(vec![route(name, Some(path(regex("("))))]);
    assert!(e.starts_with(&format!("{name}: path regex \"(\": ")), "{e}");
    let h = pb::RouteMatch {
        headers: vec![header("x-a", regex("[z-a]"))],
        ..Default::default()
    };
    let e = compile_err(vec![route(name, Some(h))]);
    assert!(
        e.starts_with(&format!("{name}: header \"x-a\" regex \"[z-a]\"")),
        "{e}"
    );
    let q = pb::RouteMatch {
        query_params: vec![header("page", regex("a{2,1}"))],
        ..Default::default()
    };
    let e = compile_err(vec![route(name, Some(q))]);
    assert!(
        e.starts_with(&format!("{name}: query param \"page\" regex")),
        "{e}"
    );
}

#[test]
fn compile_rejects_bad_headers_and_filters() {
    let cases: Vec<(pb::Route, &str)> = vec![
        (
            {
                let mut r = route("bad-match-name", None);
                r.r#match = Some(pb::RouteMatch {
                    headers: vec![header("bad name", exact("x"))],
                    ..Default::default()
                });
                r
            },
            "bad-match-name: header name \"bad name\"",
        ),
        (
            {
                let mut r = route("bad-set-name", None);
                r.filters = vec![filter(pb::filter::Kind::RequestHeaderModifier(
                    pb::HeaderModifier {
                        set: vec![hdr("bad:name", "v")],
                        ..Default::default()
                    },
                ))];
                r
            },
            "bad-set-name: filter/0: request_header_modifier set name \"bad:name\"",
        ),
        (
            {
                let mut r = route("bad-add-value", None);
                r.filters = vec![filter(pb::filter::Kind::ResponseHeaderModifier(
                    pb::HeaderModifier {
                        add: vec![hdr("x-ok", "line\nbreak")],
                        ..Default::default()
                    },
                ))];
                r
            },
            "bad-add-value: filter/0: response_header_modifier add \"x-ok\" value",
        ),
        (
            {
                let mut r = route("bad-remove", None);
                r.filters = vec![filter(pb::filter::Kind::RequestHeaderModifier(
                    pb::HeaderModifier {
                        remove: vec!["".into()],
                        ..Default::default()
                    },
                ))];
                r
            },
            "bad-remove: filter/0: request_header_modifier remove name",
        ),
        (
            redirect_named(
                "bad-status",
                pb::RequestRedirect {
                    status_code: 307,
                    ..Default::default()
                },
            ),
            "bad-status: filter/0: request_redirect status_code 307",
        ),
        (
            redirect_named(
                "bad-host",
                pb::RequestRedirect {
                    hostname: "a.example:80".into(),
                    ..Default::default()
                },
            ),
            "bad-host: filter/0: request_redirect hostname \"a.example:80\"",
        ),
        (
            redirect_named(
                "bad-scheme",
                pb::RequestRedirect {
                    scheme: "ftp".into(),
                    ..Default::default()
                },
            ),
            "bad-scheme: filter/0: request_redirect scheme \"ftp\"",
        ),
        (
            {
                let mut r = route("bad-rewrite-host", None);
                r.filters = vec![rewrite("bad host", None)];
                r
            },
            "bad-rewrite-host: filter/0: url_rewrite hostname \"bad host\"",
        ),
        (
            {
                let mut r = route("bad-full-path", None);
                r.filters = vec![rewrite(
                    "",
                    Some(pb::path_modifier::Kind::ReplaceFullPath("no-slash".into())),
                )];
                r
            },
            "bad-full-path: filter/0: url_rewrite path replace_full_path \"no-slash\"",
        ),
        (
            {
                let mut r = route("prefix-on-exact", Some(path(exact("/a"))));
                r.filters = vec![rewrite(
                    "",
                    Some(pb::path_modifier::Kind::ReplacePrefixMatch("/b".into())),
                )];
                r
            },
            "prefix-on-exact: filter/0: url_rewrite path replace_prefix_match \"/b\"",
        ),
        (
            {
                let mut r = route("prefix-on-any", None);
                let mut b = backend("b", 80, 1);
                b.filters = vec![rewrite(
                    "",
                    Some(pb::path_modifier::Kind::ReplacePrefixMatch("/b".into())),
                )];
                r.backends = vec![b];
                r
            },
            "prefix-on-any: backend/0/filter/0: url_rewrite path replace_prefix_match",
        ),
        (
            {
                let mut r = route("mirror-pct", None);
                r.filters = vec![mirror("m", 101)];
                r
            },
            "mirror-pct: filter/0: request_mirror percent 101",
        ),
        (
            {
                let mut r = route("backend-port", None);
                r.backends = vec![backend("b", 70_000, 1)];
                r
            },
            "backend-port: backend/0 port 70000",
        ),
        (
            {
                let mut r = route("retry-code", None);
                r.retry = Some(pb::Retry {
                    attempts: 2,
                    codes: vec![1000],
                    backoff_ms: 0,
                });
                r
            },
            "retry-code: retry codes 1000",
        ),
        (
            {
                let mut r = route("bad-method", None);
                r.r#match = Some(pb::RouteMatch {
                    method: "GE T".into(),
                    ..Default::default()
                });
                r
            },
            "bad-method: method \"GE T\"",
        ),
    ];
    for (r, want) in cases {
        let e = compile_err(vec![r]);
        assert!(e.starts_with(want), "got {e:?}, want prefix {want:?}");
    }
}

fn redirect_named(name: &str, r: pb::RequestRedirect) -> pb::Route {
    let mut route = redirect(r);
    route.name = name.into();
    route
}

#[test]
fn replace_prefix_match_is_accepted_on_a_prefix_route() {
    let mut r = route("ok", Some(path(prefix("/a"))));
    r.filters = vec![rewrite(
        "",
        Some(pb::path_modifier::Kind::ReplacePrefixMatch("/b".into())),
    )];
    assert!(ServiceRoutes::compile(&service(vec![r])).is_ok());
    let ok302 = redirect_named("zero", pb::RequestRedirect::default());
    assert!(ServiceRoutes::compile(&service(vec![ok302])).is_ok());
}

#[test]
fn compile_rejects_bad_service_fields() {
    let mut c = service(vec![]);
    c.ports[0].port = 70_000;
    let e = ServiceRoutes::compile(&c).unwrap_err().to_string();
    assert_eq!(e, "ServiceConfig ns/app: port 70000: above 65535");

    let mut c = service(vec![]);
    c.ports.push(c.ports[0].clone());
    let e = ServiceRoutes::compile(&c).unwrap_err().to_string();
    assert_eq!(e, "ServiceConfig ns/app: port 80: listed twice");

    let mut c = service(vec![]);
    c.ports[0].protocol = 42;
    let e = ServiceRoutes::compile(&c).unwrap_err().to_string();
    assert_eq!(
        e,
        "ServiceConfig ns/app: port 80 protocol 42: unknown value"
    );

    let mut c = service(vec![]);
    c.load_balancer = 9;
    let e = ServiceRoutes::compile(&c).unwrap_err().to_string();
    assert_eq!(e, "ServiceConfig ns/app: load_balancer 9: unknown value");
}
