//! The netns kubelet's API on `<node IP>:10250`, the part the apiserver calls: container logs,
//! so `kubectl logs [-f] [--tail N]` works for pods on our nodes.
//!
//! TLS with the node's serving certificate (issued by the cluster CA for the node's name and
//! IP; the apiserver checks it with `--kubelet-certificate-authority`), and a client certificate
//! of the cluster CA required (the apiserver presents `kube-apiserver-kubelet-client`). A real
//! kubelet also asks the apiserver (SubjectAccessReview) whether the caller may; here the
//! cluster CA issues client certificates only to the control plane, the nodes and the admin, all
//! of whom may read logs.
//!
//! | path | answer |
//! |------|--------|
//! | `GET /containerLogs/<namespace>/<pod>/<container>` | the container's log; `tailLines=N` the last N lines, `limitBytes=N` at most N bytes, `follow=true` then what it writes until the pod stops or the caller goes |
//! | `GET /healthz` | `ok` |
//! | anything else (`exec`, `attach`, `portForward`, …) | 404 / 501 naming what is not served |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector;
use tracing::{debug, warn};

use super::layout::Layout;

/// The kubelet's port.
pub const PORT: u16 = 10250;

type Body = BoxBody<Bytes, std::io::Error>;

/// Errors setting the server up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate or key could not be read.
    #[error("reading {path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The port could not be bound.
    #[error("listening on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The TLS server configuration: `cert`/`key` served, client certificates of `ca` required.
///
/// # Errors
/// [`Error::Pem`] or [`Error::Tls`].
pub fn tls_config(cert: &Path, key: &Path, ca: &Path) -> Result<rustls::ServerConfig, Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |path: &Path, message: String| Error::Pem {
        path: path.to_path_buf(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(cert, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_file_iter(ca).map_err(|e| pem(ca, e.to_string()))? {
        roots
            .add(root.map_err(|e| pem(ca, e.to_string()))?)
            .map_err(|e| pem(ca, e.to_string()))?;
    }
    let provider = weft_core::tls::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the kubelet API on `addr` until the task is dropped: `pods` is the kubelet's view of
/// the pods bound to its node, `layout` where their logs are.
///
/// # Errors
/// [`Error::Listen`] when the port cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    config: rustls::ServerConfig,
    pods: reflector::Store<Pod>,
    layout: Layout,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let state = Arc::new((pods, layout));
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(err) => {
                    debug!(%peer, error = %err, "kubelet API: TLS handshake failed");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&req, &state.0, &state.1)) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                debug!(%peer, error = %err, "kubelet API connection ended");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.into()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// What `GET /containerLogs/…` asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct LogQuery {
    tail_lines: Option<usize>,
    limit_bytes: Option<usize>,
    follow: bool,
}

fn log_query(query: Option<&str>) -> Result<LogQuery, String> {
    let mut q = LogQuery::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{key}={v:?} is not a non-negative number"))
        };
        match key {
            "tailLines" => q.tail_lines = Some(number(value)?),
            "limitBytes" => q.limit_bytes = Some(number(value)?),
            "follow" => q.follow = value == "true" || value == "1",
            _ => {} // timestamps, sinceSeconds, previous…: not kept by this kubelet
        }
    }
    Ok(q)
}

/// The last `n` lines of `text`.
fn tail(text: &[u8], n: usize) -> &[u8] {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut start = body.len();
    for _ in 0..n {
        match body[..start].iter().rposition(|b| *b == b'\n') {
            Some(i) => start = i,
            None => return text,
        }
    }
    if start == body.len() {
        return &text[text.len()..];
    }
    &text[start + 1..]
}

fn handle(
    req: &Request<hyper::body::Incoming>,
    pods: &reflector::Store<Pod>,
    layout: &Layout,
) -> Response<Body> {
    let path = req.uri().path();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok");
    }
    let Some(rest) = path.strip_prefix("/containerLogs/") else {
        let first = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        return match first {
            "exec" | "attach" | "portForward" | "run" => text(
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "the local cluster's kubelet does not serve /{first}: use `weft cluster exec`"
                ),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                format!("{path}: not served by this kubelet"),
            ),
        };
    };
    if req.method() != http::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "logs are read with GET");
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let [namespace, name, container] = parts[..] else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{path}: want /containerLogs/<namespace>/<pod>/<container>"),
        );
    };
    let query = match log_query(req.uri().query()) {
        Ok(q) => q,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let Some(pod) = pods
        .state()
        .into_iter()
        .find(|p| p.namespace().as_deref() == Some(namespace) && p.name_any() == name)
    else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{name} is not on this node"),
        );
    };
    let known = pod
        .spec
        .as_ref()
        .is_some_and(|s| s.containers.iter().any(|c| c.name == container));
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{name} has no container {container:?}"),
        );
    }
    let uid = pod.uid().unwrap_or_default();
    let file = layout.pod_dir(&uid).join(format!("{container}.log"));
    let content = std::fs::read(&file).unwrap_or_default();
    let start = query
        .tail_lines
        .map_or(0, |n| content.len() - tail(&content, n).len());
    if let Some(limit) = query.limit_bytes {
        let end = (start + limit).min(content.len());
        return text(
            StatusCode::OK,
            String::from_utf8_lossy(&content[start..end]).into_owned(),
        );
    }
    if !query.follow {
        return text(
            StatusCode::OK,
            String::from_utf8_lossy(&content[start..]).into_owned(),
        );
    }
    // Follow: what is there, then every 200 ms what was appended, until the pod is gone from
    // this node or the caller hangs up.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let first = Bytes::copy_from_slice(&content[start..]);
    let mut offset = content.len();
    let pods = pods.clone();
    tokio::spawn(async move {
        if !first.is_empty() && tx.send(Ok(Frame::data(first))).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = tokio::fs::read(&file).await.unwrap_or_default();
            if now.len() > offset {
                let chunk = Bytes::copy_from_slice(&now[offset..]);
                offset = now.len();
                if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                    return;
                }
            } else if tx.is_closed() {
                return;
            }
            let here = pods
                .state()
                .iter()
                .any(|p| p.uid().as_deref() == Some(uid.as_str()));
            if !here {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Logs why the API could not start (the kubelet keeps running pods without it).
pub fn report(err: &Error) {
    warn!(error = %crate::echo::error_message(err), "kubelet API not serving: `kubectl logs` will not work on this node");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_tails() {
        assert_eq!(log_query(None).unwrap(), LogQuery::default());
        assert_eq!(
            log_query(Some("follow=true&tailLines=2&timestamps=true")).unwrap(),
            LogQuery {
                tail_lines: Some(2),
                limit_bytes: None,
                follow: true
            }
        );
        assert!(
            log_query(Some("tailLines=-1"))
                .unwrap_err()
                .contains("tailLines")
        );
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"a\nb\n", 0), b"");
        assert_eq!(tail(b"", 3), b"");
    }
}
