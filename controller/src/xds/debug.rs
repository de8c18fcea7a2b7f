//! A tiny HTTP/1.1 debug endpoint over the [`Registry`] and the [`Cache`].
//!
//! * `GET /debug/connections` → JSON array of [`ConnectionInfo`](super::ConnectionInfo).
//! * `GET /debug/resources?type=<type_url>` → JSON array of `{name, version, aliases}` sorted by
//!   name (empty for a type never published); without `type`, 400 listing the published types.
//! * anything else → 404 (405 for other methods on those paths).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::cache::Cache;
use super::registry::Registry;

/// Serves the debug endpoint on `listener` until the returned future is dropped (which also
/// aborts the connections it serves). Accept errors are logged and retried after 100 ms.
pub async fn serve_debug(listener: TcpListener, registry: Arc<Registry>, cache: Arc<Cache>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((io, peer)) => {
                    let (registry, cache) = (registry.clone(), cache.clone());
                    let service = hyper::service::service_fn(move |req| {
                        let response = handle(&req, &registry, &cache);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let span = tracing::debug_span!("debug", peer.addr = %peer);
                    connections.spawn(
                        async move {
                            if let Err(err) = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(io), service)
                                .await
                            {
                                tracing::debug!(error = %err, "debug connection failed");
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(err) => {
                    tracing::warn!(error = %err, "debug endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn handle(
    req: &http::Request<Incoming>,
    registry: &Registry,
    cache: &Cache,
) -> http::Response<Full<Bytes>> {
    let (status, body) = route(req.method(), req.uri(), registry, cache);
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The status and JSON body for one request (pure, for tests).
fn route(
    method: &Method,
    uri: &http::Uri,
    registry: &Registry,
    cache: &Cache,
) -> (StatusCode, String) {
    let path = uri.path();
    if path != "/debug/connections" && path != "/debug/resources" {
        return error(StatusCode::NOT_FOUND, "not found");
    }
    if method != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
    }
    let json = if path == "/debug/connections" {
        serde_json::to_string_pretty(&registry.connections())
    } else {
        let Some(type_url) = query_param(uri.query().unwrap_or_default(), "type") else {
            return (
                StatusCode::BAD_REQUEST,
                serde_json::json!({
                    "error": "missing query parameter: type",
                    "types": cache.types(),
                })
                .to_string(),
            );
        };
        let list: Vec<serde_json::Value> = cache
            .list(&type_url)
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": &*r.name,
                    "version": &*r.version,
                    "aliases": &r.aliases,
                })
            })
            .collect();
        serde_json::to_string_pretty(&list)
    };
    match json {
        Ok(json) => (StatusCode::OK, json),
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
    }
}

fn error(status: StatusCode, message: &str) -> (StatusCode, String) {
    (status, serde_json::json!({ "error": message }).to_string())
}

/// The percent-decoded value of `key` in a query string (`+` is a space).
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::Resource;

    #[test]
    fn query_params_are_decoded() {
        let q = "x=1&type=type.googleapis.com%2Fistio.workload.Address&y";
        assert_eq!(
            query_param(q, "type").as_deref(),
            Some("type.googleapis.com/istio.workload.Address")
        );
        assert_eq!(query_param(q, "y").as_deref(), Some(""));
        assert_eq!(query_param(q, "z"), None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a+b%20c"), "a b c");
    }

    #[test]
    fn routes() {
        let registry = Registry::new();
        let cache = Cache::new();
        cache.set(
            "t",
            vec![Resource {
                name: "b".into(),
                aliases: vec!["/10.0.0.1".into()],
                body: prost_types::Any::default(),
            }],
        );
        let get = |uri: &str| route(&Method::GET, &uri.parse().unwrap(), &registry, &cache);
        let (status, body) = get("/debug/resources?type=t");
        assert_eq!(status, StatusCode::OK);
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list[0]["name"], "b");
        assert_eq!(list[0]["aliases"][0], "/10.0.0.1");
        assert_eq!(list[0]["version"].as_str().unwrap().len(), 32);
        assert_eq!(get("/debug/resources").0, StatusCode::BAD_REQUEST);
        assert_eq!(get("/debug/connections"), (StatusCode::OK, "[]".into()));
        assert_eq!(get("/nope").0, StatusCode::NOT_FOUND);
        let post = route(
            &Method::POST,
            &"/debug/connections".parse().unwrap(),
            &registry,
            &cache,
        );
        assert_eq!(post.0, StatusCode::METHOD_NOT_ALLOWED);
    }
}
