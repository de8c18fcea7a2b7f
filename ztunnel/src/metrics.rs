//! TCP telemetry in Istio's format (istio-ztunnel reference §8): `istio_tcp_connections_opened`,
//! `istio_tcp_connections_closed`, `istio_tcp_received_bytes` and `istio_tcp_sent_bytes`
//! counters (`_total` when encoded) with the standard label set; missing values are the literal
//! `unknown`. Encoded as Prometheus text for `/metrics` and `/stats/prometheus`. The label set,
//! the counters and the encoding are [`weft_core::metrics`]'s; this module says how ztunnel
//! fills them (reporter `source` or `destination`, protocol `tcp`).

use prometheus_client::encoding::EncodeLabelSet;
use weft_core::metrics::{Facts, Labels, Tcp};
use weft_core::state::Workload;

pub use weft_core::metrics::{OpenConnection, encode};

/// Which side reported the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The client side (outbound).
    Source,
    /// The server side (inbound).
    Destination,
}

/// The standard traffic labels ([`Labels`]) as ztunnel reports them.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    #[prometheus(flatten)]
    labels: Labels,
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
    /// Labels for a connection as seen by `reporter`: protocol `tcp`, the connection's flags,
    /// `mutual_tls` for HBONE and `unknown` otherwise.
    pub fn new(reporter: Reporter, info: &ConnectionInfo<'_>) -> Self {
        let facts = Facts {
            source: info.source,
            source_principal: info.source_principal.clone(),
            destination: info.destination,
            destination_service: info.destination_service.clone(),
        };
        let reporter = match reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        };
        let policy = if info.mutual_tls {
            "mutual_tls"
        } else {
            "unknown"
        };
        TrafficLabels {
            labels: Labels::new(reporter, &facts, "tcp", info.response_flags, policy),
        }
    }
}

/// The TCP counters.
pub type Metrics = Tcp<TrafficLabels>;

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

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

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
