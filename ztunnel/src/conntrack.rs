//! Live inbound connections and their re-authorization: every accepted inbound connection is
//! tracked with the facts its policy decision used; whenever authorization policies change, each
//! is evaluated again and those now denied are closed (ztunnel's late rejection, reference §6.3).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tracing::info;
use weft_core::copy::ReadReady;
use weft_core::policy::{self, Verdict};

use crate::state::ProxyState;

struct Tracked {
    workload_uid: Arc<str>,
    connection: policy::Connection,
    revoke: watch::Sender<bool>,
}

/// The set of live inbound connections.
#[derive(Default)]
pub struct Tracker {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Tracked>>,
}

/// Removes a connection from the tracker when dropped.
pub struct Registration {
    id: u64,
    tracker: Arc<Tracker>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut live) = self.tracker.live.lock() {
            live.remove(&self.id);
        }
    }
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Arc<Tracker> {
        Arc::new(Tracker::default())
    }

    /// Tracks a connection to the pod `workload_uid` authorized with `connection`; returns its
    /// registration and the signal that fires when it is revoked.
    pub fn register(
        self: &Arc<Self>,
        workload_uid: &Arc<str>,
        connection: policy::Connection,
    ) -> (Registration, watch::Receiver<bool>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (revoke, revoked) = watch::channel(false);
        if let Ok(mut live) = self.live.lock() {
            live.insert(
                id,
                Tracked {
                    workload_uid: workload_uid.clone(),
                    connection,
                    revoke,
                },
            );
        }
        (
            Registration {
                id,
                tracker: self.clone(),
            },
            revoked,
        )
    }

    /// The live connections, for the admin endpoint: `(pod uid, the facts authorized)`.
    pub fn snapshot(&self) -> Vec<(String, policy::Connection)> {
        self.live
            .lock()
            .map(|live| {
                live.values()
                    .map(|t| (t.workload_uid.to_string(), t.connection.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Whether there are no live connections.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evaluates every live connection against the current policies; revokes the denied ones
    /// and returns how many.
    pub fn recheck(&self, state: &ProxyState) -> usize {
        let inner = state.read();
        let Ok(live) = self.live.lock() else { return 0 };
        let mut revoked = 0;
        for tracked in live.values() {
            if *tracked.revoke.borrow() {
                continue;
            }
            let Some(workload) = inner.workloads.workload(&tracked.workload_uid) else {
                continue;
            };
            if let Verdict::Deny(reason) =
                policy::evaluate(inner.policies.applicable(workload), &tracked.connection)
            {
                info!(
                    src.addr = %tracked.connection.src_ip,
                    dst.port = tracked.connection.dst_port,
                    reason = %reason,
                    "connection closed: no longer authorized"
                );
                let _ = tracked.revoke.send(true);
                revoked += 1;
            }
        }
        revoked
    }

    /// Re-checks live connections on every policy change until the state goes away.
    pub async fn watch(self: Arc<Self>, state: Arc<ProxyState>) {
        let mut changes = state.policy_changes();
        while changes.changed().await.is_ok() {
            self.recheck(&state);
        }
    }
}

/// A connection that fails every read and write once revoked, which ends the copy loop and
/// closes both sides.
pub struct Revocable<S> {
    inner: S,
    revoked: Pin<Box<dyn Future<Output = ()> + Send>>,
    is_revoked: bool,
    _registration: Registration,
}

impl<S> Revocable<S> {
    /// Wraps `inner`; `revoked` fires when the connection must close.
    pub fn new(inner: S, registration: Registration, mut revoked: watch::Receiver<bool>) -> Self {
        Revocable {
            inner,
            revoked: Box::pin(async move {
                let _ = revoked.wait_for(|r| *r).await;
            }),
            is_revoked: false,
            _registration: registration,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.is_revoked && self.revoked.as_mut().poll(cx).is_ready() {
            self.is_revoked = true;
        }
        if self.is_revoked {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection revoked by authorization policy",
            ))
        } else {
            Ok(())
        }
    }
}

impl<S: ReadReady> ReadReady for Revocable<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Revocation wakes the copy too: the read that follows fails.
        if self.check(cx).is_err() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_read_ready(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Revocable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Revocable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Live outbound connections, for the admin endpoint (`/config_dump` → `connections`).
#[derive(Default)]
pub struct OutboundTable {
    next: AtomicU64,
    live: Mutex<HashMap<u64, OutboundEntry>>,
}

/// One live outbound connection.
#[derive(Debug, Clone)]
pub struct OutboundEntry {
    /// The source pod's workload uid.
    pub workload_uid: Arc<str>,
    /// The app's address.
    pub source: std::net::SocketAddr,
    /// The app's original destination.
    pub destination: std::net::SocketAddr,
    /// Where ztunnel carries it: the HBONE peer (`…:15008`) or the plain TCP target.
    pub upstream: std::net::SocketAddr,
    /// `hbone` or `tcp`.
    pub protocol: &'static str,
}

/// Removes an outbound connection from its table when dropped.
pub struct OutboundRegistration {
    id: u64,
    table: Arc<OutboundTable>,
}

impl Drop for OutboundRegistration {
    fn drop(&mut self) {
        if let Ok(mut live) = self.table.live.lock() {
            live.remove(&self.id);
        }
    }
}

impl OutboundTable {
    /// An empty table.
    pub fn new() -> Arc<OutboundTable> {
        Arc::new(OutboundTable::default())
    }

    /// Lists `entry` until the returned registration is dropped.
    pub fn register(self: &Arc<Self>, entry: OutboundEntry) -> OutboundRegistration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut live) = self.live.lock() {
            live.insert(id, entry);
        }
        OutboundRegistration {
            id,
            table: self.clone(),
        }
    }

    /// The live outbound connections.
    pub fn snapshot(&self) -> Vec<OutboundEntry> {
        self.live
            .lock()
            .map(|live| live.values().cloned().collect())
            .unwrap_or_default()
    }
}
