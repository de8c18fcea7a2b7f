//! Gateway API HTTPRoute filters: `RequestHeaderModifier`, `ResponseHeaderModifier`,
//! `URLRewrite`, `RequestRedirect` and `RequestMirror`.

use http::header::{HOST, LOCATION};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{BackendTarget, ConfigError, pb};
use pb::filter::Kind;
use pb::path_modifier::Kind as PathKind;

/// One compiled filter.
#[derive(Debug)]
pub(super) enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

/// Header edits, applied as Envoy does: remove, then set (replace), then add (append).
#[derive(Debug)]
pub(super) struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

/// A path modifier of `URLRewrite` / `RequestRedirect`.
#[derive(Debug)]
pub(super) enum PathModifier {
    /// `ReplaceFullPath`.
    Full(String),
    /// `ReplacePrefixMatch`: `matched` is the route's `PathPrefix` and `replacement` the new
    /// prefix, both without their trailing `/`.
    Prefix {
        matched: String,
        replacement: String,
    },
}

/// `URLRewrite`.
#[derive(Debug)]
pub(super) struct Rewrite {
    hostname: Option<(Authority, HeaderValue)>,
    path: Option<PathModifier>,
}

/// `RequestRedirect`.
#[derive(Debug)]
pub(super) struct Redirect {
    scheme: Option<String>,
    hostname: Option<String>,
    port: Option<u16>,
    path: Option<PathModifier>,
    status: StatusCode,
}

/// `RequestMirror`.
#[derive(Debug)]
pub(super) struct Mirror {
    /// `None` for an invalid backend reference (empty hostname): never mirrored.
    target: Option<BackendTarget>,
    /// 0-100.
    percent: u32,
}

impl Filter {
    /// Compiles filter `f`; `field` names it in errors (`filter/0`, `backend/1/filter/0`) and
    /// `prefix` is the route's `PathPrefix` match (trailing `/` trimmed), if it has one.
    pub(super) fn compile(
        route: &str,
        field: &str,
        f: &pb::Filter,
        prefix: Option<&str>,
    ) -> Result<Filter, ConfigError> {
        let err = |msg: String| ConfigError(format!("{route}: {field}: {msg}"));
        Ok(match &f.kind {
            None => return Err(err("no filter kind".into())),
            Some(Kind::RequestHeaderModifier(m)) => Filter::RequestHeaders(
                HeaderModifier::compile(m)
                    .map_err(|e| err(format!("request_header_modifier {e}")))?,
            ),
            Some(Kind::ResponseHeaderModifier(m)) => Filter::ResponseHeaders(
                HeaderModifier::compile(m)
                    .map_err(|e| err(format!("response_header_modifier {e}")))?,
            ),
            Some(Kind::UrlRewrite(r)) => {
                let hostname = if r.hostname.is_empty() {
                    None
                } else {
                    let bad = || err(format!("url_rewrite hostname {:?}: invalid", r.hostname));
                    let authority = Authority::try_from(r.hostname.as_str()).map_err(|_| bad())?;
                    let value = HeaderValue::try_from(r.hostname.as_str()).map_err(|_| bad())?;
                    Some((authority, value))
                };
                let path = PathModifier::compile(&r.path, prefix)
                    .map_err(|e| err(format!("url_rewrite path {e}")))?;
                Filter::Rewrite(Rewrite { hostname, path })
            }
            Some(Kind::RequestRedirect(r)) => {
                let scheme = match r.scheme.as_str() {
                    "" => None,
                    s @ ("http" | "https") => Some(s.to_owned()),
                    s => {
                        return Err(err(format!(
                            "request_redirect scheme {s:?}: only http and https"
                        )));
                    }
                };
                let hostname = if r.hostname.is_empty() {
                    None
                } else if Authority::try_from(r.hostname.as_str()).is_ok()
                    && !r.hostname.contains(['@', '/', ':'])
                {
                    Some(r.hostname.clone())
                } else {
                    return Err(err(format!(
                        "request_redirect hostname {:?}: invalid",
                        r.hostname
                    )));
                };
                let port = match r.port {
                    0 => None,
                    p => Some(
                        u16::try_from(p)
                            .map_err(|_| err(format!("request_redirect port {p}: above 65535")))?,
                    ),
                };
                let status = match r.status_code {
                    0 | 302 => StatusCode::FOUND,
                    301 => StatusCode::MOVED_PERMANENTLY,
                    s => {
                        return Err(err(format!(
                            "request_redirect status_code {s}: only 301 or 302"
                        )));
                    }
                };
                let path = PathModifier::compile(&r.path, prefix)
                    .map_err(|e| err(format!("request_redirect path {e}")))?;
                Filter::Redirect(Redirect {
                    scheme,
                    hostname,
                    port,
                    path,
                    status,
                })
            }
            Some(Kind::RequestMirror(m)) => {
                if m.percent > 100 {
                    return Err(err(format!(
                        "request_mirror percent {}: above 100",
                        m.percent
                    )));
                }
                let Some(backend) = &m.backend else {
                    return Err(err("request_mirror backend: missing".into()));
                };
                let target = super::service::backend_target(backend)
                    .map_err(|e| err(format!("request_mirror backend {e}")))?;
                Filter::Mirror(Mirror {
                    target,
                    percent: m.percent,
                })
            }
        })
    }

    /// The filter's redirect, if it is a `RequestRedirect`.
    pub(super) fn as_redirect(&self) -> Option<&Redirect> {
        match self {
            Filter::Redirect(r) => Some(r),
            _ => None,
        }
    }

    /// The filter's mirror, if it is a `RequestMirror`.
    pub(super) fn as_mirror(&self) -> Option<&Mirror> {
        match self {
            Filter::Mirror(m) => Some(m),
            _ => None,
        }
    }

    /// Applies a `RequestHeaderModifier` or `URLRewrite`; other filters do nothing here.
    pub(super) fn apply_request(&self, request: &mut http::request::Parts) {
        match self {
            Filter::RequestHeaders(m) => m.apply(&mut request.headers),
            Filter::Rewrite(r) => r.apply(request),
            _ => {}
        }
    }

    /// Applies a `ResponseHeaderModifier`; other filters do nothing here.
    pub(super) fn apply_response(&self, response: &mut http::response::Parts) {
        if let Filter::ResponseHeaders(m) = self {
            m.apply(&mut response.headers);
        }
    }
}

impl HeaderModifier {
    fn compile(m: &pb::HeaderModifier) -> Result<HeaderModifier, String> {
        let pairs = |list: &[pb::Header], what: &str| {
            list.iter()
                .map(|h| {
                    let name = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| format!("{what} name {:?}: invalid header name", h.name))?;
                    let value = HeaderValue::try_from(h.value.as_str()).map_err(|_| {
                        format!(
                            "{what} {:?} value {:?}: invalid header value",
                            h.name, h.value
                        )
                    })?;
                    Ok((name, value))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        let remove = m
            .remove
            .iter()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("remove name {n:?}: invalid header name"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(HeaderModifier {
            set: pairs(&m.set, "set")?,
            add: pairs(&m.add, "add")?,
            remove,
        })
    }

    fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl PathModifier {
    fn compile(
        m: &Option<pb::PathModifier>,
        prefix: Option<&str>,
    ) -> Result<Option<PathModifier>, String> {
        let Some(kind) = m.as_ref().and_then(|m| m.kind.as_ref()) else {
            return Ok(None);
        };
        let valid = |p: &str, what: &str| {
            if p.starts_with('/') && PathAndQuery::try_from(p).is_ok() && !p.contains(['?', '#']) {
                Ok(())
            } else {
                Err(format!("{what} {p:?}: must be a path starting with \"/\""))
            }
        };
        Ok(Some(match kind {
            PathKind::ReplaceFullPath(p) => {
                valid(p, "replace_full_path")?;
                PathModifier::Full(p.clone())
            }
            PathKind::ReplacePrefixMatch(p) => {
                valid(p, "replace_prefix_match")?;
                let Some(matched) = prefix else {
                    return Err(format!(
                        "replace_prefix_match {p:?}: the route's match is not a PathPrefix"
                    ));
                };
                PathModifier::Prefix {
                    matched: matched.to_owned(),
                    replacement: p.trim_end_matches('/').to_owned(),
                }
            }
        }))
    }

    /// The new path for `path` (without query). A path the prefix does not match element-wise
    /// (e.g. already rewritten) is kept.
    pub(super) fn apply(&self, path: &str) -> String {
        match self {
            PathModifier::Full(p) => p.clone(),
            PathModifier::Prefix {
                matched,
                replacement,
            } => {
                let Some(mut rest) = path.strip_prefix(matched.as_str()) else {
                    return path.to_owned();
                };
                if !rest.is_empty() && !rest.starts_with('/') {
                    return path.to_owned();
                }
                if matched.is_empty() && rest == "/" {
                    // Prefix `/` matched the whole path `/`.
                    rest = "";
                }
                let out = format!("{replacement}{rest}");
                if out.is_empty() { "/".to_owned() } else { out }
            }
        }
    }
}

impl Rewrite {
    fn apply(&self, request: &mut http::request::Parts) {
        let authority = self.hostname.as_ref().map(|(authority, value)| {
            request.headers.insert(HOST, value.clone());
            authority.clone()
        });
        let path = self.path.as_ref().map(|m| m.apply(request.uri.path()));
        if authority.is_none() && path.is_none() {
            return;
        }
        let mut parts = request.uri.clone().into_parts();
        if let Some(authority) = authority
            && parts.authority.is_some()
        {
            parts.authority = Some(authority);
        }
        if let Some(path) = path {
            let pq = match request.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            match PathAndQuery::try_from(pq) {
                Ok(pq) => parts.path_and_query = Some(pq),
                Err(_) => return,
            }
        }
        if let Ok(uri) = http::Uri::from_parts(parts) {
            request.uri = uri;
        }
    }
}

impl Redirect {
    /// The redirect answer for `request`, which arrived on service port `port`.
    ///
    /// `location` is `scheme://host[:port]path[?query]`: scheme = configured or the request's
    /// (`http` when the URI has none); host = configured or the request's without port
    /// (`fallback_host` when the request has none); port = configured, else the scheme's
    /// well-known port when the scheme is configured, else the request's (its `Host` port, or
    /// `port`, as Gateway API's listener port); the port is left out when it is the scheme's
    /// default (80 for http, 443 for https).
    pub(super) fn respond(
        &self,
        request: &http::request::Parts,
        port: u16,
        fallback_host: &str,
    ) -> http::Response<()> {
        let (req_host, req_port) = match super::request_authority(request) {
            Some(a) => super::split_host_port(a),
            None => (fallback_host, None),
        };
        let scheme = self
            .scheme
            .as_deref()
            .unwrap_or_else(|| request.uri.scheme_str().unwrap_or("http"));
        let host = self.hostname.as_deref().unwrap_or(req_host);
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => Some(p),
            (None, Some(s)) => default_port(s),
            (None, None) => Some(req_port.unwrap_or(port)),
        };
        let port = match port {
            Some(p) if Some(p) != default_port(scheme) => format!(":{p}"),
            _ => String::new(),
        };
        let path = match &self.path {
            Some(m) => m.apply(request.uri.path()),
            None => request.uri.path().to_owned(),
        };
        let query = request
            .uri
            .query()
            .map_or_else(String::new, |q| format!("?{q}"));
        let location = format!("{scheme}://{host}{port}{path}{query}");
        match HeaderValue::try_from(location) {
            Ok(location) => {
                let mut response = http::Response::new(());
                *response.status_mut() = self.status;
                response.headers_mut().insert(LOCATION, location);
                response
            }
            Err(_) => super::service::internal_error(),
        }
    }
}

impl Mirror {
    /// The mirror target when this request is sampled (`percent` out of 100 draws).
    pub(super) fn sample(&self, rng: &mut impl rand::Rng) -> Option<&BackendTarget> {
        let target = self.target.as_ref()?;
        match self.percent {
            0 => None,
            100.. => Some(target),
            p => (rng.random_range(0..100) < p).then_some(target),
        }
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::PathModifier;

    fn prefix(matched: &str, replacement: &str) -> PathModifier {
        PathModifier::Prefix {
            matched: matched.trim_end_matches('/').to_owned(),
            replacement: replacement.trim_end_matches('/').to_owned(),
        }
    }

    #[test]
    fn replace_prefix_match_table() {
        // (route prefix, replacement, request path, expected)
        let cases = [
            ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
            ("/foo", "/xyz", "/foo", "/xyz"),
            ("/foo/", "/xyz", "/foo/bar", "/xyz/bar"),
            ("/foo", "/xyz/", "/foo/bar", "/xyz/bar"),
            ("/foo/", "/xyz/", "/foo/bar", "/xyz/bar"),
            ("/foo", "/xyz", "/foo/", "/xyz/"),
            ("/foo", "/", "/foo/bar", "/bar"),
            ("/foo", "/", "/foo", "/"),
            ("/foo", "/", "/foo/", "/"),
            ("/", "/xyz", "/foo", "/xyz/foo"),
            ("/", "/xyz", "/", "/xyz"),
            ("/foo", "/xyz", "/other", "/other"),
            ("/foo", "/xyz", "/foobar", "/foobar"),
        ];
        for (matched, replacement, path, want) in cases {
            assert_eq!(
                prefix(matched, replacement).apply(path),
                want,
                "prefix {matched} -> {replacement} on {path}"
            );
        }
    }

    #[test]
    fn replace_full_path_ignores_the_old_path() {
        assert_eq!(PathModifier::Full("/new".into()).apply("/old/x"), "/new");
    }
}
