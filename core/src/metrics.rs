//! Istio's standard traffic telemetry as both proxies report it: the label set ([`Labels`],
//! built from [`Facts`]; missing values are the literal `unknown`), the four TCP counters
//! ([`Tcp`]: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total`), and the Prometheus text
//! encoding served on `/metrics` and `/stats/prometheus` ([`encode`], [`endpoint`]).
//! Follows the istio-ztunnel reference §8 and istio-ambient §6.2.
//!
//! Does not own: which reporter, protocol or flags a proxy records (ztunnel: `source` /
//! `destination`; the waypoint: `waypoint`, plus its request metrics).

use std::hash::Hash;
use std::sync::Arc;

use hyper::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::admin::Endpoint;
use crate::state::Workload;

/// The value of a label nothing is known about.
pub const UNKNOWN: &str = "unknown";

/// `value`, or [`UNKNOWN`] when it is empty.
pub fn or_unknown(value: &str) -> String {
    if value.is_empty() {
        UNKNOWN.to_owned()
    } else {
        value.to_owned()
    }
}

/// The facts a connection's or request's labels are built from.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    /// Source workload, when known (by client IP).
    pub source: Option<&'a Workload>,
    /// Source principal (`spiffe://…`) from the peer certificate, when authenticated.
    pub source_principal: Option<String>,
    /// Destination workload (the chosen endpoint), when known.
    pub destination: Option<&'a Workload>,
    /// Destination service: (hostname, namespace, name), when service-addressed.
    pub destination_service: Option<(String, String, String)>,
}

/// The standard Istio traffic labels, in Istio's order.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(missing_docs)]
pub struct Labels {
    pub reporter: String,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

impl Labels {
    /// Labels for `facts` as seen by `reporter` (`source`, `destination`, `waypoint`), with
    /// `request_protocol` (`tcp`, `http`, `grpc`), `response_flags` (`-` for none) and
    /// `connection_security_policy` (`mutual_tls` or `unknown`) taken as given. Workload
    /// labels come from the workloads' names and canonical labels (`app` and `version` are the
    /// canonical service and revision), the destination principal from the destination
    /// workload's identity; anything missing or empty is `unknown`.
    pub fn new(
        reporter: &str,
        facts: &Facts<'_>,
        request_protocol: &str,
        response_flags: &str,
        connection_security_policy: &str,
    ) -> Self {
        let s = facts.source;
        let d = facts.destination;
        let field = |w: Option<&Workload>, f: fn(&Workload) -> &str| {
            or_unknown(w.map(f).unwrap_or_default())
        };
        let (svc_host, svc_ns, svc_name) = facts.destination_service.clone().unwrap_or_default();
        Labels {
            reporter: reporter.to_owned(),
            source_workload: field(s, |w| &w.workload_name),
            source_canonical_service: field(s, |w| &w.canonical_name),
            source_canonical_revision: field(s, |w| &w.canonical_revision),
            source_workload_namespace: field(s, |w| &w.namespace),
            source_principal: or_unknown(facts.source_principal.as_deref().unwrap_or_default()),
            source_app: field(s, |w| &w.canonical_name),
            source_version: field(s, |w| &w.canonical_revision),
            source_cluster: field(s, |w| &w.cluster_id),
            destination_service: or_unknown(&svc_host),
            destination_service_namespace: or_unknown(&svc_ns),
            destination_service_name: or_unknown(&svc_name),
            destination_workload: field(d, |w| &w.workload_name),
            destination_canonical_service: field(d, |w| &w.canonical_name),
            destination_canonical_revision: field(d, |w| &w.canonical_revision),
            destination_workload_namespace: field(d, |w| &w.namespace),
            destination_principal: or_unknown(
                &d.map(|w| w.identity().to_string()).unwrap_or_default(),
            ),
            destination_app: field(d, |w| &w.canonical_name),
            destination_version: field(d, |w| &w.canonical_revision),
            destination_cluster: field(d, |w| &w.cluster_id),
            request_protocol: request_protocol.to_owned(),
            response_flags: response_flags.to_owned(),
            connection_security_policy: connection_security_policy.to_owned(),
        }
    }
}

/// The four Istio TCP counters over the label set `L` (a proxy's wrapper of [`Labels`]).
#[derive(Debug, Clone)]
pub struct Tcp<L> {
    /// `istio_tcp_connections_opened_total`.
    pub opened: Family<L, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub closed: Family<L, Counter>,
    /// `istio_tcp_received_bytes_total` (client → server bytes).
    pub received_bytes: Family<L, Counter>,
    /// `istio_tcp_sent_bytes_total` (server → client bytes).
    pub sent_bytes: Family<L, Counter>,
}

impl<L: Clone + Hash + Eq> Default for Tcp<L> {
    fn default() -> Self {
        Tcp {
            opened: Family::default(),
            closed: Family::default(),
            received_bytes: Family::default(),
            sent_bytes: Family::default(),
        }
    }
}

impl<L> Tcp<L>
where
    L: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    /// Registers the counters in `registry` under the `istio` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened",
            self.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "TCP connections closed",
            self.closed.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes received (client to server)",
            self.received_bytes.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent (server to client)",
            self.sent_bytes.clone(),
        );
    }

    /// Records a connection opening; the returned handle records its close. The handle keeps
    /// only the three counters (shared with the metric families), not the labels, so a
    /// long-lived connection costs a few pointers here.
    pub fn open(&self, labels: &L) -> OpenConnection {
        self.opened.get_or_create(labels).inc();
        OpenConnection {
            closed: self.closed.get_or_create(labels).clone(),
            received: self.received_bytes.get_or_create(labels).clone(),
            sent: self.sent_bytes.get_or_create(labels).clone(),
        }
    }
}

/// An open connection's close-time counters (from [`Tcp::open`]).
#[derive(Debug)]
pub struct OpenConnection {
    closed: Counter,
    received: Counter,
    sent: Counter,
}

impl OpenConnection {
    /// Records the close with the bytes copied each way.
    pub fn close(self, client_to_server_bytes: u64, server_to_client_bytes: u64) {
        self.closed.inc();
        self.received.inc_by(client_to_server_bytes);
        self.sent.inc_by(server_to_client_bytes);
    }
}

/// Prometheus text encoding of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// The stats port's endpoint: `/metrics` and `/stats/prometheus` serve [`encode`] of
/// `registry` (`text/plain; version=0.0.4`); anything else is 404.
pub fn endpoint(registry: Arc<Registry>) -> Endpoint {
    Arc::new(move |_, path, _| match path {
        "/metrics" | "/stats/prometheus" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            encode(&registry),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_encode_with_istio_names_and_unknown_labels() {
        let metrics = Tcp::<Labels>::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let facts = Facts {
            source_principal: Some("spiffe://cluster.local/ns/a/sa/client".into()),
            destination_service: Some(("echo.b.svc.cluster.local".into(), "b".into(), "".into())),
            ..Facts::default()
        };
        let labels = Labels::new("destination", &facts, "tcp", "-", "mutual_tls");
        assert_eq!(labels.destination_service_name, UNKNOWN);
        metrics.open(&labels).close(11, 22);
        let text = endpoint(Arc::new(registry))(&http::Method::GET, "/metrics", "").2;
        for want in [
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/a/sa/client\"",
            "source_workload=\"unknown\"",
            "destination_service=\"echo.b.svc.cluster.local\"",
            "destination_workload=\"unknown\"",
            "request_protocol=\"tcp\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        for (name, value) in [
            ("istio_tcp_connections_opened_total{", " 1"),
            ("istio_tcp_connections_closed_total{", " 1"),
            ("istio_tcp_received_bytes_total{", " 11"),
            ("istio_tcp_sent_bytes_total{", " 22"),
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(name) && l.ends_with(value)),
                "{name}…{value} in {text}"
            );
        }
    }
}
