//! TCP telemetry in Istio's format (istio-ztunnel reference §8): `istio_tcp_connections_opened`,
//! `istio_tcp_connections_closed`, `istio_tcp_received_bytes` and `istio_tcp_sent_bytes`
//! counters (`_total` when encoded) with the standard label set; missing values are the literal
//! `unknown`. Encoded as Prometheus text for `/metrics` and `/stats/prometheus`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use weft_core::state::Workload;

/// Which side reported the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The client side (outbound).
    Source,
    /// The server side (inbound).
    Destination,
}

/// The standard traffic labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(missing_docs)]
pub struct TrafficLabels {
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

const UNKNOWN: &str = "unknown";

fn or_unknown(value: &str) -> String {
    if value.is_empty() {
        UNKNOWN.to_owned()
    } else {
        value.to_owned()
    }
}

/// One connection's facts, from which labels are built.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo<'a> {
    /// Source workload, when known.
    pub source: Option<&'a Workload>,
    /// Source identity (`spiffe://…`), when authenticated.
    pub source_principal: Option<String>,
    /// Destination workload, when known.
    pub destination: Option<&'a Workload>,
    /// Destination service: (hostname, namespace, name), when service-addressed.
    pub destination_service: Option<(String, String, String)>,
    /// Whether the connection was mutual TLS (HBONE).
    pub mutual_tls: bool,
    /// Response flags (`-` when none; `DENY`, `CONNECT`, …).
    pub response_flags: &'static str,
}

impl TrafficLabels {
    /// Labels for a connection as seen by `reporter`.
    pub fn new(reporter: Reporter, info: &ConnectionInfo<'_>) -> Self {
        let s = info.source;
        let d = info.destination;
        let field = |w: Option<&Workload>, f: fn(&Workload) -> &str| {
            or_unknown(w.map(f).unwrap_or_default())
        };
        let (svc_host, svc_ns, svc_name) = info.destination_service.clone().unwrap_or_default();
        TrafficLabels {
            reporter: match reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            }
            .to_owned(),
            source_workload: field(s, |w| &w.workload_name),
            source_canonical_service: field(s, |w| &w.canonical_name),
            source_canonical_revision: field(s, |w| &w.canonical_revision),
            source_workload_namespace: field(s, |w| &w.namespace),
            source_principal: or_unknown(info.source_principal.as_deref().unwrap_or_default()),
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
            request_protocol: "tcp".to_owned(),
            response_flags: info.response_flags.to_owned(),
            connection_security_policy: if info.mutual_tls {
                "mutual_tls"
            } else {
                "unknown"
            }
            .to_owned(),
        }
    }
}

/// The TCP counters.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// `istio_tcp_connections_opened_total`.
    pub opened: Family<TrafficLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub closed: Family<TrafficLabels, Counter>,
    /// `istio_tcp_received_bytes_total` (client → server bytes).
    pub received_bytes: Family<TrafficLabels, Counter>,
    /// `istio_tcp_sent_bytes_total` (server → client bytes).
    pub sent_bytes: Family<TrafficLabels, Counter>,
}

impl Metrics {
    /// Registers the counters under the `istio` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "Connections opened",
            self.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "Connections closed",
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
    pub fn open(&self, labels: &TrafficLabels) -> OpenConnection {
        self.opened.get_or_create(labels).inc();
        OpenConnection {
            closed: self.closed.get_or_create(labels).clone(),
            received: self.received_bytes.get_or_create(labels).clone(),
            sent: self.sent_bytes.get_or_create(labels).clone(),
        }
    }
}

/// An open connection's close-time counters (from [`Metrics::open`]).
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

/// A connection carrying its [`OpenConnection`] counters (an HBONE handler's upstream), so the
/// close can be recorded without keeping the request or the labels.
#[derive(Debug)]
pub struct Counted<S> {
    /// The connection.
    pub inner: S,
    /// Its counters.
    pub counters: OpenConnection,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: weft_core::copy::ReadReady> weft_core::copy::ReadReady for Counted<S> {
    fn poll_read_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.inner.poll_read_ready(cx)
    }
}

/// Encodes a registry as Prometheus text.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_encode_with_istio_names_and_labels() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let labels = TrafficLabels::new(
            Reporter::Destination,
            &ConnectionInfo {
                source_principal: Some("spiffe://cluster.local/ns/a/sa/client".into()),
                mutual_tls: true,
                response_flags: "-",
                ..ConnectionInfo::default()
            },
        );
        metrics.open(&labels).close(11, 22);
        let text = encode(&registry);
        assert!(
            text.contains("istio_tcp_connections_opened_total{"),
            "{text}"
        );
        assert!(text.contains("reporter=\"destination\""));
        assert!(text.contains("source_principal=\"spiffe://cluster.local/ns/a/sa/client\""));
        assert!(text.contains("connection_security_policy=\"mutual_tls\""));
        assert!(text.contains("destination_workload=\"unknown\""));
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_received_bytes_total{") && l.ends_with(" 11")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_sent_bytes_total{") && l.ends_with(" 22")),
            "{text}"
        );
    }
}
