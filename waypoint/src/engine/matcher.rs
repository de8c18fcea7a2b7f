//! Gateway API HTTPRoute request matching: path (Exact, element-wise PathPrefix, anchored
//! RegularExpression), headers, query parameters and method; every present part must hold.

use http::HeaderName;
use regex::Regex;

use super::ConfigError;
use super::pb;
use pb::string_match::Kind;

/// A compiled `RouteMatch`; `RouteMatch::default()` matches every request.
#[derive(Debug, Default)]
pub(super) struct RouteMatch {
    path: Option<PathMatch>,
    headers: Vec<HeaderMatch>,
    query_params: Vec<QueryMatch>,
    method: Option<http::Method>,
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    /// The prefix without its trailing `/` (empty for `/`: matches every path).
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

#[derive(Debug)]
struct HeaderMatch {
    name: HeaderName,
    value: ValueMatch,
}

#[derive(Debug)]
struct QueryMatch {
    name: String,
    value: ValueMatch,
}

impl RouteMatch {
    /// Compiles `m` of route `route` (the route name prefixes every error).
    pub(super) fn compile(route: &str, m: &pb::RouteMatch) -> Result<RouteMatch, ConfigError> {
        let err = |msg: String| ConfigError(format!("{route}: {msg}"));
        let path = match &m.path {
            None => None,
            Some(p) => Some(match &p.kind {
                None => return Err(err("path: no match kind".into())),
                Some(Kind::Exact(v)) => {
                    if !v.starts_with('/') {
                        return Err(err(format!("path exact {v:?}: must start with \"/\"")));
                    }
                    PathMatch::Exact(v.clone())
                }
                Some(Kind::PathPrefix(v)) => {
                    if !v.starts_with('/') {
                        return Err(err(format!("path prefix {v:?}: must start with \"/\"")));
                    }
                    PathMatch::Prefix(v.trim_end_matches('/').to_owned())
                }
                Some(Kind::Regex(v)) => PathMatch::Regex(
                    anchored(v).map_err(|e| err(format!("path regex {v:?}: {e}")))?,
                ),
            }),
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for h in &m.headers {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| err(format!("header name {:?}: invalid header name", h.name)))?;
            let value = value_match(&h.value).map_err(|e| err(format!("header {name:?} {e}")))?;
            headers.push(HeaderMatch { name, value });
        }
        let mut query_params = Vec::with_capacity(m.query_params.len());
        for q in &m.query_params {
            if q.name.is_empty() {
                return Err(err("query param name: empty".into()));
            }
            let value =
                value_match(&q.value).map_err(|e| err(format!("query param {:?} {e}", q.name)))?;
            query_params.push(QueryMatch {
                name: q.name.clone(),
                value,
            });
        }
        let method = if m.method.is_empty() {
            None
        } else {
            Some(
                http::Method::from_bytes(m.method.as_bytes())
                    .map_err(|_| err(format!("method {:?}: invalid method", m.method)))?,
            )
        };
        Ok(RouteMatch {
            path,
            headers,
            query_params,
            method,
        })
    }

    /// The matched path prefix (without trailing `/`) when the path match is a `PathPrefix`.
    pub(super) fn path_prefix(&self) -> Option<&str> {
        match &self.path {
            Some(PathMatch::Prefix(p)) => Some(p),
            _ => None,
        }
    }

    /// Whether every present part of the match holds for `request`.
    pub(super) fn matches(&self, request: &http::request::Parts) -> bool {
        if let Some(method) = &self.method
            && request.method != *method
        {
            return false;
        }
        if let Some(path) = &self.path {
            let p = request.uri.path();
            let ok = match path {
                PathMatch::Exact(v) => p == v,
                PathMatch::Prefix(v) => prefix_matches(v, p),
                PathMatch::Regex(r) => r.is_match(p),
            };
            if !ok {
                return false;
            }
        }
        for h in &self.headers {
            let mut values = request.headers.get_all(&h.name).iter().peekable();
            if values.peek().is_none() {
                return false;
            }
            let mut joined = Vec::new();
            for (i, v) in values.enumerate() {
                if i > 0 {
                    joined.push(b',');
                }
                joined.extend_from_slice(v.as_bytes());
            }
            let ok = match &h.value {
                ValueMatch::Exact(v) => joined == v.as_bytes(),
                ValueMatch::Regex(r) => r.is_match(&String::from_utf8_lossy(&joined)),
            };
            if !ok {
                return false;
            }
        }
        if !self.query_params.is_empty() {
            let query = request.uri.query().unwrap_or("");
            for q in &self.query_params {
                let Some(value) = query_param(query, &q.name) else {
                    return false;
                };
                let ok = match &q.value {
                    ValueMatch::Exact(v) => value == *v,
                    ValueMatch::Regex(r) => r.is_match(&value),
                };
                if !ok {
                    return false;
                }
            }
        }
        true
    }
}

/// Element-wise prefix match; `prefix` is already without its trailing `/`.
pub(super) fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Compiles `re` so that it must match the whole value.
pub(super) fn anchored(re: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{re})$"))
}

fn value_match(m: &Option<pb::StringMatch>) -> Result<ValueMatch, String> {
    match m.as_ref().and_then(|m| m.kind.as_ref()) {
        None => Err("value: no match kind".into()),
        Some(Kind::Exact(v)) => Ok(ValueMatch::Exact(v.clone())),
        Some(Kind::Regex(v)) => anchored(v)
            .map(ValueMatch::Regex)
            .map_err(|e| format!("regex {v:?}: {e}")),
        Some(Kind::PathPrefix(v)) => Err(format!("prefix {v:?}: only paths take a prefix match")),
    }
}

/// The percent-decoded value of the first query parameter named `name` (compared after
/// decoding); a parameter without `=` has the empty value.
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| percent_decode(k) == name)
        .map(|(_, v)| percent_decode(v))
}

/// Decodes `%XX` escapes (invalid escapes stay as they are; `+` is not a space).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decode_decodes_and_keeps_invalid_escapes() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("%2Fx%2f"), "/x/");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("a+b"), "a+b");
        assert_eq!(percent_decode("%41"), "A");
    }

    #[test]
    fn query_param_first_value_and_decoded_name() {
        assert_eq!(query_param("a=1&b=2&a=3", "a").as_deref(), Some("1"));
        assert_eq!(query_param("x%3Dy=v%26w", "x=y").as_deref(), Some("v&w"));
        assert_eq!(query_param("flag&z=1", "flag").as_deref(), Some(""));
        assert_eq!(query_param("A=1", "a"), None);
        assert_eq!(query_param("", "a"), None);
    }

    #[test]
    fn prefix_matches_element_wise() {
        assert!(prefix_matches("/foo", "/foo"));
        assert!(prefix_matches("/foo", "/foo/"));
        assert!(prefix_matches("/foo", "/foo/bar"));
        assert!(!prefix_matches("/foo", "/foobar"));
        assert!(!prefix_matches("/foo", "/fo"));
        assert!(prefix_matches("", "/anything"));
    }
}
