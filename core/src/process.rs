//! The process shell both proxy binaries share: the tokio runtime, the shutdown signal, the
//! admin, stats and readiness ports with their standard endpoints (`/healthz/ready`,
//! `/quitquitquit`; `/metrics` is [`crate::metrics::endpoint`], `/logging`
//! [`crate::admin::logging_endpoint`]), and the final drain.
//!
//! Does not own: the HTTP server itself ([`crate::admin::serve_http`]) or what a proxy reports
//! as pending or dumps in `/config_dump`.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{Instrument, info, info_span, warn};

use crate::admin::{Endpoint, serve_http};
use crate::drain;

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding {addr}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// The proxy's tokio runtime, threads named `thread_name`, I/O and timers enabled: with one
/// worker (the proxies' default) a current-thread runtime, else a multi-threaded one with
/// `worker_threads` workers.
///
/// With one worker the current-thread scheduler is cheaper than a one-worker multi-threaded
/// one (whose worker is a second thread beside `block_on`'s, with cross-thread wake-ups):
/// under `weft-bench engine`'s h2c load the waypoint's context switches fell from 3,267 to 441
/// per 5 s and its requests per core rose 9 % (HTTP/1.1) and 12 % (h2c); syscalls per request
/// were unchanged.
///
/// # Errors
/// The runtime's I/O driver could not be created.
pub fn runtime(
    worker_threads: usize,
    thread_name: &str,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(worker_threads);
        builder
    };
    builder.thread_name(thread_name).enable_all().build()
}

/// Resolves on SIGTERM or SIGINT (never, when the handlers cannot be installed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Binds a TCP listener on `addr`.
///
/// # Errors
/// [`BindError`] naming the address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// One HTTP port: where it listens and what it serves.
pub struct Port {
    /// The listen address.
    pub addr: SocketAddr,
    /// The endpoint answering every request.
    pub endpoint: Endpoint,
}

/// Binds the readiness, stats and admin ports (in that order) and serves each, in a task in
/// the span `readiness`, `stats` or `admin`, until the drain starts.
///
/// # Errors
/// [`BindError`] for the first port that cannot be bound (those before it are served).
pub async fn serve_ports(
    readiness: Port,
    stats: Port,
    admin: Port,
    drain: &drain::Watch,
) -> Result<(), BindError> {
    tokio::spawn(
        serve_http(
            bind(readiness.addr).await?,
            readiness.endpoint,
            drain.clone(),
        )
        .instrument(info_span!("readiness")),
    );
    tokio::spawn(
        serve_http(bind(stats.addr).await?, stats.endpoint, drain.clone())
            .instrument(info_span!("stats")),
    );
    tokio::spawn(
        serve_http(bind(admin.addr).await?, admin.endpoint, drain.clone())
            .instrument(info_span!("admin")),
    );
    Ok(())
}

/// The readiness port's endpoint: `/healthz/ready` is 200 `ready` when `pending()` (what
/// readiness still waits for, one line each) is empty, else 503 listing it; anything else is
/// 404.
pub fn readiness(pending: impl Fn() -> Vec<String> + Send + Sync + 'static) -> Endpoint {
    std::sync::Arc::new(move |_, path, _| match path {
        "/healthz/ready" => {
            let pending = pending();
            if pending.is_empty() {
                (StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready; pending:\n{}\n", pending.join("\n")),
                )
            }
        }
        _ => not_found(),
    })
}

/// `/quitquitquit` (Envoy's admin convention): POST notifies `quit` (the process then drains
/// and exits) and answers 200; any other method is 405.
pub fn quit(method: &http::Method, quit: &Notify) -> (StatusCode, &'static str, String) {
    if method == http::Method::POST {
        info!("shutdown requested through /quitquitquit");
        quit.notify_one();
        (StatusCode::OK, "text/plain", "draining\n".into())
    } else {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "POST /quitquitquit to drain and exit\n".into(),
        )
    }
}

/// The 404 answer of the admin, stats and readiness ports.
pub fn not_found() -> (StatusCode, &'static str, String) {
    (StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

/// Starts the drain and waits up to `deadline` for every drain-aware task, warning when the
/// deadline passes and the rest are closed.
pub async fn drain(trigger: drain::Trigger, deadline: Duration) {
    info!("draining");
    if trigger.drain(deadline).await == drain::Outcome::Forced {
        warn!("drain deadline passed; closing the rest");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_and_quit_answers() {
        let ready = readiness(Vec::new);
        assert_eq!(
            ready(&http::Method::GET, "/healthz/ready", ""),
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        );
        assert_eq!(
            ready(&http::Method::GET, "/other", "").0,
            StatusCode::NOT_FOUND
        );
        let waiting = readiness(|| vec!["xds: a".to_owned(), "pod b".to_owned()]);
        assert_eq!(
            waiting(&http::Method::GET, "/healthz/ready", ""),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready; pending:\nxds: a\npod b\n".to_owned()
            )
        );

        let notify = Notify::new();
        assert_eq!(
            quit(&http::Method::GET, &notify).0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(quit(&http::Method::POST, &notify).0, StatusCode::OK);
        // The POST stored a permit: a later wait returns at once.
        tokio::time::timeout(Duration::from_secs(5), notify.notified())
            .await
            .expect("quit notified");
    }
}
