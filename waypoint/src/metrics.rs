//! Request and TCP telemetry in Istio's standard format with `reporter="waypoint"` (istio-ambient
//! reference §6.2): `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes` (histograms) for HTTP, and
//! `istio_tcp_connections_opened_total` / `_closed_total` / `istio_tcp_sent_bytes_total` /
//! `istio_tcp_received_bytes_total` for opaque TCP. Missing values are `unknown`. The standard
//! label set, the TCP counter names and the encoding are [`weft_core::metrics`]'s.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use weft_core::metrics::{Labels, Tcp, or_unknown};
use weft_core::state::{Service, Workload};

pub use weft_core::metrics::{Facts, encode};

/// The standard Istio labels ([`Labels`]) shared by HTTP and TCP metrics, as the waypoint
/// reports them.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    #[prometheus(flatten)]
    labels: Labels,
}

impl TcpLabels {
    /// Labels for `facts`, protocol `protocol` (`tcp`, `http`, `grpc`), flags `flags` (empty
    /// means `-`): reporter `waypoint`, always `mutual_tls` (HBONE in). With no source
    /// workload, the source namespace is the one the source principal names.
    pub fn new(facts: &Facts<'_>, protocol: &str, flags: &str) -> Self {
        let flags = if flags.is_empty() { "-" } else { flags };
        let mut labels = Labels::new("waypoint", facts, protocol, flags, "mutual_tls");
        if facts.source.is_none() {
            // Unknown source IP: the namespace its certificate names.
            labels.source_workload_namespace = or_unknown(
                facts
                    .source_principal
                    .as_deref()
                    .and_then(|p| p.split("/ns/").nth(1))
                    .and_then(|rest| rest.split('/').next())
                    .unwrap_or_default(),
            );
        }
        TcpLabels { labels }
    }
}

/// HTTP labels: the standard set plus `response_code` and `grpc_response_status`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    #[prometheus(flatten)]
    base: TcpLabels,
    /// The status sent downstream.
    pub response_code: String,
    /// The gRPC status (`grpc-status`), `unknown` for non-gRPC.
    pub grpc_response_status: String,
}

impl HttpLabels {
    /// Labels for one request.
    pub fn new(
        facts: &Facts<'_>,
        protocol: &str,
        flags: &str,
        status: u16,
        grpc_status: Option<&str>,
    ) -> Self {
        HttpLabels {
            base: TcpLabels::new(facts, protocol, flags),
            response_code: status.to_string(),
            grpc_response_status: or_unknown(grpc_status.unwrap_or_default()),
        }
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 10.0, 9))
}

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

/// What one request's labels are made of, cheap to compare: the workloads and the service by
/// identity (the key holds them, so an address is not reused while it is cached), the rest by
/// value. Equal keys always give equal [`HttpLabels`].
#[derive(Debug, Clone)]
pub struct RequestKey {
    /// Source workload, when known (by client IP).
    pub source: Option<Arc<Workload>>,
    /// Source principal (`spiffe://…`) from the peer certificate.
    pub source_principal: Arc<str>,
    /// Destination workload (the chosen endpoint), when known.
    pub destination: Option<Arc<Workload>>,
    /// Destination service.
    pub service: Option<Arc<Service>>,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// Response flags (`-` for none).
    pub flags: &'static str,
    /// The status sent downstream.
    pub status: u16,
    /// The gRPC status, if any.
    pub grpc_status: Option<String>,
}

fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn address<T>(a: &Option<Arc<T>>) -> usize {
    a.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize)
}

impl PartialEq for RequestKey {
    fn eq(&self, other: &Self) -> bool {
        same(&self.source, &other.source)
            && same(&self.destination, &other.destination)
            && same(&self.service, &other.service)
            && self.status == other.status
            && self.protocol == other.protocol
            && self.flags == other.flags
            && self.source_principal == other.source_principal
            && self.grpc_status == other.grpc_status
    }
}

impl Eq for RequestKey {}

impl Hash for RequestKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        address(&self.source).hash(state);
        address(&self.destination).hash(state);
        address(&self.service).hash(state);
        self.status.hash(state);
        self.protocol.hash(state);
        self.flags.hash(state);
        self.source_principal.hash(state);
        self.grpc_status.hash(state);
    }
}

impl RequestKey {
    /// The labels this key stands for.
    pub fn labels(&self) -> HttpLabels {
        let facts = Facts {
            source: self.source.as_deref(),
            source_principal: Some(self.source_principal.to_string()),
            destination: self.destination.as_deref(),
            destination_service: self
                .service
                .as_ref()
                .map(|s| (s.hostname.clone(), s.namespace.clone(), s.name.clone())),
        };
        HttpLabels::new(
            &facts,
            self.protocol,
            self.flags,
            self.status,
            self.grpc_status.as_deref(),
        )
    }
}

/// One label set's request metrics, looked up in the families once.
#[derive(Debug, Clone)]
struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Label sets whose handles are kept; past this the cache starts over (the families keep every
/// series; only the shortcut to them is dropped).
const MAX_CACHED_LABEL_SETS: usize = 1024;

/// The waypoint's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `istio_requests_total`.
    pub requests: Family<HttpLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub duration: HistogramFamily,
    /// `istio_request_bytes`.
    pub request_bytes: HistogramFamily,
    /// `istio_response_bytes`.
    pub response_bytes: HistogramFamily,
    /// `istio_tcp_connections_opened_total`.
    pub tcp_opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub tcp_closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total` (client → server).
    pub tcp_received: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total` (server → client).
    pub tcp_sent: Family<TcpLabels, Counter>,
    /// Request metric handles by [`RequestKey`], so a request builds no label strings and
    /// hashes no label set once its key was seen.
    handles: Arc<Mutex<HashMap<RequestKey, RequestHandles>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_received: Family::default(),
            tcp_sent: Family::default(),
            handles: Arc::default(),
        }
    }
}

/// One finished request, as recorded.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// Labels.
    pub labels: HttpLabels,
    /// Duration in milliseconds.
    pub duration_ms: f64,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
}

impl Metrics {
    /// Registers everything under the `istio` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Requests handled", self.requests.clone());
        istio.register(
            "request_duration_milliseconds",
            "Request duration",
            self.duration.clone(),
        );
        istio.register(
            "request_bytes",
            "Request body sizes",
            self.request_bytes.clone(),
        );
        istio.register(
            "response_bytes",
            "Response body sizes",
            self.response_bytes.clone(),
        );
        Tcp {
            opened: self.tcp_opened.clone(),
            closed: self.tcp_closed.clone(),
            received_bytes: self.tcp_received.clone(),
            sent_bytes: self.tcp_sent.clone(),
        }
        .register(registry);
    }

    /// Records one finished request whose labels are `key`'s ([`RequestKey::labels`]): the
    /// same series [`Metrics::record`] updates, without building the labels again for a key
    /// already seen.
    pub fn record_request(
        &self,
        key: &RequestKey,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let Ok(mut cache) = self.handles.lock() else {
            return self.record(&RequestRecord {
                labels: key.labels(),
                duration_ms,
                request_bytes,
                response_bytes,
            });
        };
        if !cache.contains_key(key) {
            if cache.len() >= MAX_CACHED_LABEL_SETS {
                cache.clear();
            }
            let labels = key.labels();
            let handles = RequestHandles {
                requests: self.requests.get_or_create(&labels).clone(),
                duration: self.duration.get_or_create(&labels).clone(),
                request_bytes: self.request_bytes.get_or_create(&labels).clone(),
                response_bytes: self.response_bytes.get_or_create(&labels).clone(),
            };
            cache.insert(key.clone(), handles);
        }
        if let Some(h) = cache.get(key) {
            h.requests.inc();
            h.duration.observe(duration_ms);
            h.request_bytes.observe(request_bytes as f64);
            h.response_bytes.observe(response_bytes as f64);
        }
    }

    /// Records one finished request.
    pub fn record(&self, record: &RequestRecord) {
        self.requests.get_or_create(&record.labels).inc();
        self.duration
            .get_or_create(&record.labels)
            .observe(record.duration_ms);
        self.request_bytes
            .get_or_create(&record.labels)
            .observe(record.request_bytes as f64);
        self.response_bytes
            .get_or_create(&record.labels)
            .observe(record.response_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_default_to_unknown_and_name_the_waypoint() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let facts = Facts {
            source_principal: Some("spiffe://cluster.local/ns/a/sa/c".into()),
            destination_service: Some((
                "echo.b.svc.cluster.local".into(),
                "b".into(),
                "echo".into(),
            )),
            ..Default::default()
        };
        metrics.record(&RequestRecord {
            labels: HttpLabels::new(&facts, "http", "", 200, None),
            duration_ms: 3.0,
            request_bytes: 0,
            response_bytes: 5,
        });
        let text = encode(&registry);
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .unwrap();
        for want in [
            "reporter=\"waypoint\"",
            "source_principal=\"spiffe://cluster.local/ns/a/sa/c\"",
            "source_workload=\"unknown\"",
            "source_workload_namespace=\"a\"",
            "destination_service=\"echo.b.svc.cluster.local\"",
            "response_code=\"200\"",
            "response_flags=\"-\"",
            "request_protocol=\"http\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(want), "{want} in {line}");
        }
        assert!(line.ends_with(" 1"), "{line}");
        assert!(text.contains("istio_request_duration_milliseconds_bucket{"));

        // The cached path updates the same series as `record`.
        let key = RequestKey {
            source: None,
            source_principal: Arc::from("spiffe://cluster.local/ns/a/sa/c"),
            destination: None,
            service: None,
            protocol: "http",
            flags: "-",
            status: 200,
            grpc_status: None,
        };
        let labels = key.labels();
        for _ in 0..3 {
            metrics.record_request(&key, 1.0, 0, 5);
        }
        metrics.record(&RequestRecord {
            labels: labels.clone(),
            duration_ms: 1.0,
            request_bytes: 0,
            response_bytes: 5,
        });
        assert_eq!(metrics.requests.get_or_create(&labels).get(), 4);
        assert_eq!(key.labels(), labels);
        assert!(text.contains("istio_response_bytes_sum{"));
    }
}
