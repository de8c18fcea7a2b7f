//! Counters the client keeps so the proxy can export `istio_xds_*` metrics
//! (istio-ztunnel.md §8): connection attempts, terminations by reason, and per type URL the
//! responses, bytes, resources, ACKs and NACKs.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an ADS stream (or an attempt to open one) ended; the `reason` label of ztunnel's
/// `istio_xds_connection_terminations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Termination {
    /// No stream was opened: token unreadable, TCP/TLS/HTTP/2 connect failed.
    ConnectionError,
    /// The server refused the stream or ended it with an unexpected gRPC status (e.g.
    /// `Unauthenticated`, `Unavailable` while shutting down, `PermissionDenied`).
    Error,
    /// The stream failed in a way the client recovers from at once (reconnect after the
    /// initial backoff): `Unknown`, `Cancelled`, `DeadlineExceeded`, or `Unavailable` for a
    /// closing transport or a GOAWAY (ztunnel's list).
    Reconnect,
    /// The stream ended cleanly: the server closed it with OK (e.g. its shutdown or maximum
    /// connection age; reconnect after the initial backoff), or the client stopped because its
    /// drain was signalled.
    Complete,
}

impl Termination {
    /// Every reason, in label order.
    pub const ALL: [Termination; 4] = [
        Termination::ConnectionError,
        Termination::Error,
        Termination::Reconnect,
        Termination::Complete,
    ];

    /// The metric label value (`ConnectionError`, `Error`, `Reconnect`, `Complete`).
    pub fn as_str(self) -> &'static str {
        match self {
            Termination::ConnectionError => "ConnectionError",
            Termination::Error => "Error",
            Termination::Reconnect => "Reconnect",
            Termination::Complete => "Complete",
        }
    }
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The client's counters; shared, lock-free, monotonically increasing from 0 at
/// [`Client::new`](super::Client::new).
#[derive(Debug)]
pub struct Stats {
    /// Connection attempts (each tries to open one ADS stream).
    pub connection_attempts: AtomicU64,
    /// Streams opened (the server accepted the `DeltaAggregatedResources` call).
    pub streams_opened: AtomicU64,
    terminations: [AtomicU64; 4],
    types: BTreeMap<&'static str, TypeStats>,
}

/// Counters for one type URL.
#[derive(Debug, Default)]
pub struct TypeStats {
    /// `DeltaDiscoveryResponse`s received (`istio_xds_message_total`).
    pub responses: AtomicU64,
    /// Their encoded size in bytes (`istio_xds_message_bytes_total`).
    pub response_bytes: AtomicU64,
    /// Resources accepted by the handler (upserts; removals not counted).
    pub resources_applied: AtomicU64,
    /// Removals delivered to the handler.
    pub resources_removed: AtomicU64,
    /// Resources rejected (by the client as malformed, or by the handler).
    pub resources_rejected: AtomicU64,
    /// Responses answered with an ACK.
    pub acks: AtomicU64,
    /// Responses answered with a NACK.
    pub nacks: AtomicU64,
}

impl Stats {
    pub(crate) fn new(type_urls: impl IntoIterator<Item = &'static str>) -> Self {
        Stats {
            connection_attempts: AtomicU64::new(0),
            streams_opened: AtomicU64::new(0),
            terminations: Default::default(),
            types: type_urls
                .into_iter()
                .map(|t| (t, TypeStats::default()))
                .collect(),
        }
    }

    /// Streams or attempts that ended for `reason`.
    pub fn terminations(&self, reason: Termination) -> u64 {
        self.terminations[reason as usize].load(Ordering::Relaxed)
    }

    /// The counters of `type_url`, if a handler is registered for it.
    pub fn for_type(&self, type_url: &str) -> Option<&TypeStats> {
        self.types.get(type_url)
    }

    /// Every registered type URL with its counters, sorted by type URL.
    pub fn types(&self) -> impl Iterator<Item = (&'static str, &TypeStats)> {
        self.types.iter().map(|(t, s)| (*t, s))
    }

    pub(crate) fn terminated(&self, reason: Termination) {
        self.terminations[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminations_are_counted_per_reason() {
        let stats = Stats::new(["a", "b"]);
        stats.terminated(Termination::Error);
        stats.terminated(Termination::Error);
        stats.terminated(Termination::Complete);
        let counts: Vec<u64> = Termination::ALL
            .iter()
            .map(|r| stats.terminations(*r))
            .collect();
        assert_eq!(counts, [0, 2, 0, 1]);
        assert_eq!(Termination::ConnectionError.to_string(), "ConnectionError");
        assert!(stats.for_type("a").is_some() && stats.for_type("c").is_none());
        assert_eq!(stats.types().count(), 2);
    }
}
