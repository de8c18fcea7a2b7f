//! One HTTPRoute or GRPCRoute → route entries (one per rule and match) with their Gateway API
//! precedence keys, plus what its status must say.

use std::cmp::Reverse;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;
use weft_k8s::Snapshot;
use weft_proto::weft::l7::v1::{
    Backend, Filter, Header, HeaderMatch, HeaderModifier, PathModifier, RequestMirror,
    RequestRedirect, Retry, Route, RouteMatch, StringMatch, UrlRewrite, filter, path_modifier,
    string_match,
};

use super::{Settings, condition, service_hostname};

/// Which route kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Http,
    Grpc,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "HTTPRoute",
            Kind::Grpc => "GRPCRoute",
        }
    }
}

/// Gateway API precedence (smaller sorts first): exact path, then path prefix (longest first),
/// then regex; a method match; most header matches; most query matches; oldest route; route
/// namespace/name; rule index; match index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Precedence {
    path_kind: u8,
    path_len: Reverse<usize>,
    no_method: bool,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    /// (missing timestamp, RFC 3339 timestamp): missing sorts last.
    created: (bool, String),
    namespace: String,
    name: String,
    rule: usize,
    matched: usize,
}

/// A parsed route.
pub(crate) struct Parsed {
    pub(crate) hostnames: Vec<String>,
    pub(crate) entries: Vec<(Precedence, Route)>,
    pub(crate) problems: Vec<String>,
    /// Rules dropped, with why (`rule <i>: ...`).
    rejected: Vec<String>,
    /// Rules in the route.
    rules: usize,
    /// (reason, message) of unresolved backend references.
    unresolved: Vec<(&'static str, String)>,
}

impl Parsed {
    pub(crate) fn accepted_condition(&self, generation: Option<i64>) -> Value {
        if self.rejected.is_empty() {
            condition("Accepted", true, "Accepted", "route accepted", generation)
        } else if self.rejected.len() == self.rules {
            condition(
                "Accepted",
                false,
                "UnsupportedValue",
                &format!("no usable rule: {}", self.rejected.join("; ")),
                generation,
            )
        } else {
            condition(
                "Accepted",
                true,
                "Accepted",
                &format!("rules dropped: {}", self.rejected.join("; ")),
                generation,
            )
        }
    }

    pub(crate) fn resolved_condition(&self, generation: Option<i64>) -> Value {
        match self.unresolved.first() {
            None => condition(
                "ResolvedRefs",
                true,
                "ResolvedRefs",
                "all references resolved",
                generation,
            ),
            Some((reason, _)) => condition(
                "ResolvedRefs",
                false,
                reason,
                &self
                    .unresolved
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                generation,
            ),
        }
    }
}

/// Parses a Gateway API duration (`1h`, `30s`, `200ms`, `1m30s`: 1–4 components of a number
/// and one of `h`, `m`, `s`, `ms`) into milliseconds.
///
/// # Errors
/// A message quoting the value.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a Gateway API duration (like 200ms, 1s, 1m30s)");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1000, 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += n * unit;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    Ok(total)
}

fn s(v: &Value) -> Option<&str> {
    v.as_str()
}

fn regex_ok(pattern: &str) -> Result<(), String> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map(drop)
        .map_err(|e| format!("invalid regular expression {pattern:?}: {e}"))
}

/// A path match: Exact and PathPrefix values must be absolute paths.
fn path_match(kind: &str, value: &str, field: &str) -> Result<StringMatch, String> {
    if matches!(kind, "Exact" | "PathPrefix") && !value.starts_with('/') {
        return Err(format!(
            "{field}.value: {value:?} does not start with \"/\""
        ));
    }
    string_match(kind, value, field)
}

fn string_match(kind: &str, value: &str, field: &str) -> Result<StringMatch, String> {
    let kind = match kind {
        "Exact" => string_match::Kind::Exact(value.to_owned()),
        "PathPrefix" => string_match::Kind::PathPrefix(value.to_owned()),
        "RegularExpression" => {
            regex_ok(value).map_err(|e| format!("{field}: {e}"))?;
            string_match::Kind::Regex(value.to_owned())
        }
        other => return Err(format!("{field}.type: unsupported match type {other:?}")),
    };
    Ok(StringMatch { kind: Some(kind) })
}

fn header_matches(list: &Value, field: &str, lowercase: bool) -> Result<Vec<HeaderMatch>, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, h)| {
            let name = s(&h["name"]).unwrap_or_default();
            let name = if lowercase {
                name.to_ascii_lowercase()
            } else {
                name.to_owned()
            };
            Ok(HeaderMatch {
                name,
                value: Some(string_match(
                    s(&h["type"]).unwrap_or("Exact"),
                    s(&h["value"]).unwrap_or_default(),
                    &format!("{field}[{i}]"),
                )?),
            })
        })
        .collect()
}

fn escape(text: &str) -> String {
    regex::escape(text)
}

/// An HTTPRoute match → (RouteMatch, precedence parts).
fn http_match(m: &Value, field: &str) -> Result<RouteMatch, String> {
    let path = &m["path"];
    let path = path_match(
        s(&path["type"]).unwrap_or("PathPrefix"),
        s(&path["value"]).unwrap_or("/"),
        &format!("{field}.path"),
    )?;
    Ok(RouteMatch {
        path: Some(path),
        headers: header_matches(&m["headers"], &format!("{field}.headers"), true)?,
        query_params: header_matches(&m["queryParams"], &format!("{field}.queryParams"), false)?,
        method: s(&m["method"]).unwrap_or_default().to_ascii_uppercase(),
    })
}

/// A GRPCRoute match: the method match becomes a path match on `/<service>/<method>`.
fn grpc_match(m: &Value, field: &str) -> Result<RouteMatch, String> {
    let method = &m["method"];
    let service = s(&method["service"]).filter(|v| !v.is_empty());
    let name = s(&method["method"]).filter(|v| !v.is_empty());
    let kind = s(&method["type"]).unwrap_or("Exact");
    let path = match (kind, service, name) {
        (_, None, None) => None,
        ("Exact", Some(svc), Some(meth)) => {
            Some(string_match::Kind::Exact(format!("/{svc}/{meth}")))
        }
        ("Exact", Some(svc), None) => {
            Some(string_match::Kind::Regex(format!("/{}/[^/]+", escape(svc))))
        }
        ("Exact", None, Some(meth)) => Some(string_match::Kind::Regex(format!(
            "/[^/]+/{}",
            escape(meth)
        ))),
        ("RegularExpression", svc, meth) => {
            for (part, v) in [("service", svc), ("method", meth)] {
                if let Some(v) = v {
                    regex_ok(v).map_err(|e| format!("{field}.method.{part}: {e}"))?;
                }
            }
            Some(string_match::Kind::Regex(format!(
                "/(?:{})/(?:{})",
                svc.unwrap_or("[^/]+"),
                meth.unwrap_or("[^/]+")
            )))
        }
        (other, _, _) => {
            return Err(format!(
                "{field}.method.type: unsupported match type {other:?}"
            ));
        }
    };
    if let Some(string_match::Kind::Regex(r)) = &path {
        regex_ok(r).map_err(|e| format!("{field}.method: {e}"))?;
    }
    Ok(RouteMatch {
        path: Some(StringMatch {
            kind: Some(path.unwrap_or_else(|| string_match::Kind::PathPrefix("/".into()))),
        }),
        headers: header_matches(&m["headers"], &format!("{field}.headers"), true)?,
        query_params: Vec::new(),
        method: String::new(),
    })
}

fn headers(list: &Value) -> Vec<Header> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|h| Header {
            name: s(&h["name"]).unwrap_or_default().to_owned(),
            value: s(&h["value"]).unwrap_or_default().to_owned(),
        })
        .collect()
}

fn header_modifier(v: &Value) -> HeaderModifier {
    HeaderModifier {
        set: headers(&v["set"]),
        add: headers(&v["add"]),
        remove: v["remove"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect(),
    }
}

fn path_modifier(v: &Value, field: &str) -> Result<Option<PathModifier>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let kind = match s(&v["type"]) {
        Some("ReplaceFullPath") => path_modifier::Kind::ReplaceFullPath(
            s(&v["replaceFullPath"]).unwrap_or_default().to_owned(),
        ),
        Some("ReplacePrefixMatch") => path_modifier::Kind::ReplacePrefixMatch(
            s(&v["replacePrefixMatch"]).unwrap_or_default().to_owned(),
        ),
        other => return Err(format!("{field}.type: unsupported path modifier {other:?}")),
    };
    Ok(Some(PathModifier { kind: Some(kind) }))
}

/// Route context shared by the rule parsers.
struct Ctx<'a> {
    namespace: &'a str,
    snapshot: &'a Snapshot,
    settings: &'a Settings,
    unresolved: &'a mut Vec<(&'static str, String)>,
}

impl Ctx<'_> {
    /// A backendRef → Backend; unresolvable ones get an empty hostname (answered 500).
    fn backend(&mut self, b: &Value, field: &str, weight: u32) -> Result<Backend, String> {
        let group = s(&b["group"]).unwrap_or("");
        let kind = s(&b["kind"]).unwrap_or("Service");
        let name = s(&b["name"]).unwrap_or_default();
        let namespace = s(&b["namespace"]).unwrap_or(self.namespace);
        let port = b["port"].as_u64().and_then(|p| u32::try_from(p).ok());
        let mut backend = Backend {
            hostname: String::new(),
            port: port.unwrap_or(0),
            weight,
            filters: Vec::new(),
        };
        if !group.is_empty() || kind != "Service" {
            self.unresolved.push((
                "InvalidKind",
                format!("{field}: unsupported backend kind {group:?}/{kind:?} (only Service)"),
            ));
            return Ok(backend);
        }
        let Some(port) = port else {
            return Err(format!("{field}.port: required for a Service backend"));
        };
        if !self
            .snapshot
            .services
            .contains_key(&(namespace.to_owned(), name.to_owned()))
        {
            self.unresolved.push((
                "BackendNotFound",
                format!("{field}: service {namespace}/{name} not found"),
            ));
            return Ok(backend);
        }
        backend.hostname = service_hostname(namespace, name, self.settings);
        backend.port = port;
        Ok(backend)
    }

    fn filters(&mut self, list: &Value, field: &str, kind: Kind) -> Result<Vec<Filter>, String> {
        let mut out = Vec::new();
        for (i, f) in list.as_array().into_iter().flatten().enumerate() {
            let field = format!("{field}[{i}]");
            let t = s(&f["type"]).unwrap_or_default();
            let k = match t {
                "RequestHeaderModifier" => filter::Kind::RequestHeaderModifier(header_modifier(
                    &f["requestHeaderModifier"],
                )),
                "ResponseHeaderModifier" => filter::Kind::ResponseHeaderModifier(header_modifier(
                    &f["responseHeaderModifier"],
                )),
                "RequestRedirect" if kind == Kind::Http => {
                    let r = &f["requestRedirect"];
                    let status = r["statusCode"].as_u64().unwrap_or(302);
                    if status != 301 && status != 302 {
                        return Err(format!(
                            "{field}.requestRedirect.statusCode: {status} is not 301 or 302"
                        ));
                    }
                    filter::Kind::RequestRedirect(RequestRedirect {
                        scheme: s(&r["scheme"]).unwrap_or_default().to_owned(),
                        hostname: s(&r["hostname"]).unwrap_or_default().to_owned(),
                        port: r["port"]
                            .as_u64()
                            .and_then(|p| u32::try_from(p).ok())
                            .unwrap_or(0),
                        path: path_modifier(&r["path"], &format!("{field}.requestRedirect.path"))?,
                        status_code: u32::try_from(status).unwrap_or(302),
                    })
                }
                "URLRewrite" if kind == Kind::Http => {
                    let r = &f["urlRewrite"];
                    filter::Kind::UrlRewrite(UrlRewrite {
                        hostname: s(&r["hostname"]).unwrap_or_default().to_owned(),
                        path: path_modifier(&r["path"], &format!("{field}.urlRewrite.path"))?,
                    })
                }
                "RequestMirror" => {
                    let m = &f["requestMirror"];
                    let percent = if let Some(p) = m["percent"].as_u64() {
                        p.min(100)
                    } else if m["fraction"].is_object() {
                        let num = m["fraction"]["numerator"].as_u64().unwrap_or(0);
                        let den = m["fraction"]["denominator"].as_u64().unwrap_or(100).max(1);
                        (num * 100 / den).min(100)
                    } else {
                        100
                    };
                    let backend = self.backend(
                        &m["backendRef"],
                        &format!("{field}.requestMirror.backendRef"),
                        1,
                    )?;
                    filter::Kind::RequestMirror(RequestMirror {
                        backend: Some(backend),
                        percent: u32::try_from(percent).unwrap_or(100),
                    })
                }
                other => return Err(format!("{field}.type: unsupported filter {other:?}")),
            };
            out.push(Filter { kind: Some(k) });
        }
        Ok(out)
    }

    /// One rule → (route template without match/name, matches).
    fn rule(
        &mut self,
        rule: &Value,
        i: usize,
        kind: Kind,
    ) -> Result<(Route, Vec<RouteMatch>), String> {
        let field = format!("spec.rules[{i}]");
        let matches = rule["matches"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(j, m)| match kind {
                Kind::Http => http_match(m, &format!("{field}.matches[{j}]")),
                Kind::Grpc => grpc_match(m, &format!("{field}.matches[{j}]")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let filters = self.filters(&rule["filters"], &format!("{field}.filters"), kind)?;
        let mut backends = Vec::new();
        for (k, b) in rule["backendRefs"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let bfield = format!("{field}.backendRefs[{k}]");
            let weight = b["weight"]
                .as_u64()
                .map_or(Ok(1), u32::try_from)
                .map_err(|_| format!("{bfield}.weight: out of range"))?;
            let mut backend = self.backend(b, &bfield, weight)?;
            backend.filters = self.filters(&b["filters"], &format!("{bfield}.filters"), kind)?;
            backends.push(backend);
        }
        let timeout = |key: &str| -> Result<u64, String> {
            match s(&rule["timeouts"][key]) {
                None => Ok(0),
                Some(v) => parse_duration(v).map_err(|e| format!("{field}.timeouts.{key}: {e}")),
            }
        };
        let request_timeout_ms = timeout("request")?;
        let backend_request_timeout_ms = timeout("backendRequest")?;
        let retry = match &rule["retry"] {
            Value::Null => None,
            r => {
                let attempts = r["attempts"].as_u64().unwrap_or(2);
                let codes = r["codes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        c.as_u64()
                            .and_then(|c| u32::try_from(c).ok())
                            .filter(|c| (400..600).contains(c))
                            .ok_or_else(|| {
                                format!("{field}.retry.codes: {c} is not a 4xx/5xx code")
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let backoff_ms = match s(&r["backoff"]) {
                    None => 0,
                    Some(v) => {
                        parse_duration(v).map_err(|e| format!("{field}.retry.backoff: {e}"))?
                    }
                };
                Some(Retry {
                    attempts: u32::try_from(attempts + 1).unwrap_or(u32::MAX),
                    codes,
                    backoff_ms,
                })
            }
        };
        Ok((
            Route {
                name: String::new(),
                r#match: None,
                filters,
                backends,
                request_timeout_ms,
                backend_request_timeout_ms,
                retry,
            },
            matches,
        ))
    }
}

/// GRPCRoute precedence (Gateway API GRPCRoute: characters in the matching service, then in
/// the matching method, then header matches): an exact service+method match first, then any
/// other method match by the characters it names, then matches without a method.
fn grpc_precedence(m: &Value) -> (u8, usize) {
    let method = &m["method"];
    let service = s(&method["service"]).unwrap_or_default().len();
    let name = s(&method["method"]).unwrap_or_default().len();
    let exact = s(&method["type"]).unwrap_or("Exact") == "Exact";
    if exact && service > 0 && name > 0 {
        (0, service + name)
    } else {
        (1, service + name)
    }
}

/// HTTPRoute path precedence (as Istio ranks it): exact, then prefix by length, then regex.
fn precedence_parts(m: &RouteMatch) -> (u8, usize) {
    match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(string_match::Kind::Exact(p)) => (0, p.len()),
        Some(string_match::Kind::PathPrefix(p)) => (1, p.trim_end_matches('/').len()),
        Some(string_match::Kind::Regex(p)) => (2, p.len()),
        None => (1, 0),
    }
}

/// Parses a route (`spec` as JSON).
pub(crate) fn parse(
    kind: Kind,
    namespace: &str,
    name: &str,
    meta: &ObjectMeta,
    spec: &Value,
    snapshot: &Snapshot,
    settings: &Settings,
) -> Parsed {
    let created = meta
        .creation_timestamp
        .as_ref()
        .and_then(|t| serde_json::to_value(t).ok())
        .and_then(|v| v.as_str().map(str::to_owned));
    let mut unresolved = Vec::new();
    let mut parsed = Parsed {
        hostnames: spec["hostnames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.as_str().map(str::to_owned))
            .collect(),
        entries: Vec::new(),
        problems: Vec::new(),
        rejected: Vec::new(),
        rules: 0,
        unresolved: Vec::new(),
    };
    let rules: Vec<&Value> = spec["rules"].as_array().into_iter().flatten().collect();
    parsed.rules = rules.len();
    for (i, rule) in rules.into_iter().enumerate() {
        let mut ctx = Ctx {
            namespace,
            snapshot,
            settings,
            unresolved: &mut unresolved,
        };
        let (template, mut matches) = match ctx.rule(rule, i, kind) {
            Ok(r) => r,
            Err(message) => {
                parsed.problems.push(format!(
                    "{} {namespace}/{name}: {message}; rule {i} dropped",
                    kind.as_str()
                ));
                parsed.rejected.push(format!("rule {i}: {message}"));
                continue;
            }
        };
        if matches.is_empty() {
            matches.push(RouteMatch {
                path: Some(StringMatch {
                    kind: Some(string_match::Kind::PathPrefix("/".into())),
                }),
                ..RouteMatch::default()
            });
        }
        for (j, m) in matches.into_iter().enumerate() {
            let (path_kind, path_len) = match kind {
                Kind::Http => precedence_parts(&m),
                Kind::Grpc => grpc_precedence(&rule["matches"][j]),
            };
            let key = Precedence {
                path_kind,
                path_len: Reverse(path_len),
                no_method: m.method.is_empty(),
                headers: Reverse(m.headers.len()),
                query: Reverse(m.query_params.len()),
                created: (created.is_none(), created.clone().unwrap_or_default()),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                rule: i,
                matched: j,
            };
            let route = Route {
                name: format!("{}/{namespace}/{name}/rule/{i}/match/{j}", kind.as_str()),
                r#match: Some(m),
                ..template.clone()
            };
            parsed.entries.push((key, route));
        }
    }
    parsed.unresolved = unresolved;
    parsed
}
