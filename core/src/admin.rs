//! The small HTTP/1.1 server behind ztunnel's and the waypoint's admin, stats and readiness
//! ports: each request is answered synchronously by one [`Endpoint`] closure, plus the shared
//! `/logging` endpoint (GET shows the filter, `POST ?level=` changes it).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::net::TcpListener;
use tracing::info;

use crate::{drain, logging};

/// An HTTP endpoint: `(method, path, query)` → status, content type, body. The query is empty
/// when absent.
pub type Endpoint =
    Arc<dyn Fn(&http::Method, &str, &str) -> (StatusCode, &'static str, String) + Send + Sync>;

/// The value of `key` in a URL query (`a=1&b=2`); our keys need no percent-decoding.
pub fn query_value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Serves `endpoint` on `listener` (HTTP/1.1) until the drain starts.
pub async fn serve_http(listener: TcpListener, endpoint: Endpoint, mut drain: drain::Watch) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(_) => continue,
            },
            () = drain.signaled() => return,
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (status, content_type, body) = endpoint(
                        request.method(),
                        request.uri().path(),
                        request.uri().query().unwrap_or(""),
                    );
                    let response = Response::builder()
                        .status(status)
                        .header("content-type", content_type)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_default();
                    async move { Ok::<_, Infallible>(response) }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// `/logging`: GET shows the current filter; `POST /logging?level=<RUST_LOG directives>`
/// changes it (400 naming a bad directive). `component` is the process's crate name, used in
/// the usage example.
pub fn logging_endpoint(
    method: &http::Method,
    query: &str,
    component: &str,
) -> (StatusCode, &'static str, String) {
    let Some(current) = logging::current() else {
        return (
            StatusCode::NOT_IMPLEMENTED,
            "text/plain",
            "logging is not adjustable in this process\n".into(),
        );
    };
    match (method, query_value(query, "level")) {
        (&http::Method::POST, Some(level)) => match logging::set(level) {
            Ok(()) => {
                info!(level, "log level changed through /logging");
                (StatusCode::OK, "text/plain", format!("level: {level}\n"))
            }
            Err(message) => (
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("{message}\n"),
            ),
        },
        (&http::Method::POST, None) => (
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!(
                "POST /logging?level=<RUST_LOG directives>, e.g. level=debug or level={component}=debug,info\n"
            ),
        ),
        _ => (StatusCode::OK, "text/plain", format!("level: {current}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_by_key() {
        assert_eq!(query_value("level=debug", "level"), Some("debug"));
        assert_eq!(
            query_value("a=1&level=ztunnel=debug,info", "level"),
            Some("ztunnel=debug,info")
        );
        assert_eq!(query_value("levels=x", "level"), None);
        assert_eq!(query_value("level", "level"), None);
        assert_eq!(query_value("", "level"), None);
    }
}
