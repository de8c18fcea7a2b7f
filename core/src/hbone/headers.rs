//! The metadata headers carried on every HBONE `CONNECT`: `baggage` (W3C Baggage, describing the
//! source workload; the 200 response may carry the destination's), `forwarded` (RFC 7239:
//! client address and destination service) and `traceparent` (W3C Trace Context, a fresh
//! correlation id per connection).
//!
//! Builders emit exactly what ztunnel emits; parsers are lenient: unknown keys, malformed list
//! members and extra parameters are skipped, never an error.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use http::HeaderValue;
use rand::RngCore;

/// Header name of W3C Baggage.
pub const BAGGAGE: &str = "baggage";
/// Header name of RFC 7239 Forwarded.
pub const FORWARDED: &str = "forwarded";
/// Header name of W3C Trace Context.
pub const TRACEPARENT: &str = "traceparent";

/// Workload metadata carried in `baggage` (istio-ztunnel reference §1.5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster_name: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// `k8s.<type>.name`, type one of `deployment`, `cronjob`, `pod`, `job`: (type, name).
    pub workload: Option<(String, String)>,
    /// `service.name` (canonical service).
    pub service_name: Option<String>,
    /// `service.version` (canonical revision).
    pub service_version: Option<String>,
    /// `cloud.region`.
    pub region: Option<String>,
    /// `cloud.availability_zone`.
    pub zone: Option<String>,
}

const WORKLOAD_TYPES: [&str; 4] = ["deployment", "cronjob", "pod", "job"];

impl Baggage {
    /// Encodes as a `baggage` value: comma-separated `key=value`, only non-empty values.
    pub fn to_header_value(&self) -> Option<HeaderValue> {
        let mut out = String::new();
        let mut push = |key: &str, value: &Option<String>| {
            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                if !out.is_empty() {
                    out.push(',');
                }
                let _ = write!(out, "{key}={}", encode_value(value));
            }
        };
        push("k8s.cluster.name", &self.cluster_name);
        push("k8s.namespace.name", &self.namespace);
        if let Some((kind, name)) = &self.workload {
            push(&format!("k8s.{kind}.name"), &Some(name.clone()));
        }
        push("service.name", &self.service_name);
        push("service.version", &self.service_version);
        push("cloud.region", &self.region);
        push("cloud.availability_zone", &self.zone);
        if out.is_empty() {
            return None;
        }
        HeaderValue::from_str(&out).ok()
    }

    /// Parses a `baggage` value leniently: members without `=`, unknown keys and member
    /// properties (after `;`) are ignored; values are percent-decoded.
    pub fn parse(value: &str) -> Self {
        let mut baggage = Baggage::default();
        for member in value.split(',') {
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, raw)) = member.split_once('=') else {
                continue;
            };
            let (key, raw) = (key.trim(), raw.trim());
            if raw.is_empty() {
                continue;
            }
            let value = Some(decode_value(raw));
            match key {
                "k8s.cluster.name" => baggage.cluster_name = value,
                "k8s.namespace.name" => baggage.namespace = value,
                "service.name" => baggage.service_name = value,
                "service.version" => baggage.service_version = value,
                "cloud.region" => baggage.region = value,
                "cloud.availability_zone" => baggage.zone = value,
                other => {
                    let kind = other
                        .strip_prefix("k8s.")
                        .and_then(|k| k.strip_suffix(".name"))
                        .filter(|k| WORKLOAD_TYPES.contains(k));
                    if let (Some(kind), Some(value)) = (kind, value) {
                        baggage.workload = Some((kind.to_owned(), value));
                    }
                }
            }
        }
        baggage
    }
}

fn encode_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        // W3C Baggage value: baggage-octet excludes CTLs, space, '"', ',', ';', '\\' and '%'.
        if b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'\\' | b'%') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn decode_value(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = raw
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The parts of RFC 7239 `Forwarded` HBONE uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// `for=`: the original client address (port optional).
    pub for_addr: Option<ForwardedFor>,
    /// `host=`: the destination service FQDN.
    pub host: Option<String>,
}

/// A `for=` node: an address with or without port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// `ip:port`.
    Socket(SocketAddr),
    /// A bare IP.
    Ip(IpAddr),
}

impl ForwardedFor {
    /// The IP of the node.
    pub fn ip(&self) -> IpAddr {
        match self {
            ForwardedFor::Socket(addr) => addr.ip(),
            ForwardedFor::Ip(ip) => *ip,
        }
    }
}

impl Forwarded {
    /// Encodes as ztunnel does: `for="<ip:port>"` and, with a known service, `;host=<fqdn>`.
    pub fn to_header_value(client: SocketAddr, host: Option<&str>) -> Option<HeaderValue> {
        let mut out = format!("for=\"{client}\"");
        if let Some(host) = host.filter(|h| !h.is_empty()) {
            let _ = write!(out, ";host={host}");
        }
        HeaderValue::from_str(&out).ok()
    }

    /// Parses the first element of a `Forwarded` value leniently: parameter names are
    /// case-insensitive, values may be quoted, unknown parameters and obfuscated nodes are
    /// ignored.
    pub fn parse(value: &str) -> Self {
        let mut forwarded = Forwarded::default();
        let first = value.split(',').next().unwrap_or_default();
        for pair in first.split(';') {
            let Some((name, raw)) = pair.split_once('=') else {
                continue;
            };
            let raw = raw.trim().trim_matches('"');
            match name.trim().to_ascii_lowercase().as_str() {
                "for" => forwarded.for_addr = parse_node(raw),
                "host" if !raw.is_empty() => forwarded.host = Some(raw.to_owned()),
                _ => {}
            }
        }
        forwarded
    }
}

fn parse_node(raw: &str) -> Option<ForwardedFor> {
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        return Some(ForwardedFor::Socket(addr));
    }
    let bare = raw.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(ForwardedFor::Ip)
}

/// A W3C `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, never all zero.
    pub trace_id: u128,
    /// 8-byte parent span id, never zero.
    pub parent_id: u64,
    /// Trace flags (bit 0 = sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A fresh random id, unsampled, as ztunnel sends per outbound connection.
    pub fn random() -> Self {
        let mut rng = rand::rng();
        loop {
            let trace_id = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
            let parent_id = rng.next_u64();
            if trace_id != 0 && parent_id != 0 {
                return TraceParent {
                    trace_id,
                    parent_id,
                    flags: 0,
                };
            }
        }
    }

    /// Parses a `traceparent` leniently: versions other than `ff` are accepted (fields after
    /// the four known ones are ignored, per W3C Trace Context §3.2.4); all-zero ids and
    /// non-hex fields are rejected with `None`.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(version, 2) || version.eq_ignore_ascii_case("ff") {
            return None;
        }
        if !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let parent_id = u64::from_str_radix(parent, 16).ok()?;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// `00-<32 hex>-<16 hex>-<2 hex>`.
    pub fn to_header_value(&self) -> HeaderValue {
        let text = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        );
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("00-0-0-00"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baggage_builds_only_non_empty_and_round_trips() {
        let baggage = Baggage {
            cluster_name: Some("Kubernetes".into()),
            namespace: Some("a".into()),
            workload: Some(("deployment".into(), "echo".into())),
            service_name: Some("echo".into()),
            service_version: Some("v1".into()),
            region: None,
            zone: Some(String::new()),
        };
        let value = baggage.to_header_value().unwrap();
        assert_eq!(
            value.to_str().unwrap(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=a,k8s.deployment.name=echo,\
             service.name=echo,service.version=v1"
        );
        let parsed = Baggage::parse(value.to_str().unwrap());
        assert_eq!(parsed.workload, baggage.workload);
        assert_eq!(parsed.namespace.as_deref(), Some("a"));
        assert_eq!(parsed.zone, None);
        assert_eq!(Baggage::default().to_header_value(), None);
    }

    #[test]
    fn baggage_parse_is_lenient() {
        let parsed = Baggage::parse(
            " k8s.namespace.name = b ;prop=1,garbage,,k8s.widget.name=x,service.name=my%20svc,=,k8s.pod.name=p",
        );
        assert_eq!(parsed.namespace.as_deref(), Some("b"));
        assert_eq!(parsed.service_name.as_deref(), Some("my svc"));
        assert_eq!(parsed.workload, Some(("pod".into(), "p".into())));
        assert_eq!(Baggage::parse("%%%,==,;;"), Baggage::default());
        assert_eq!(
            Baggage::parse(
                Baggage {
                    service_name: Some("a,b;c%".into()),
                    ..Default::default()
                }
                .to_header_value()
                .unwrap()
                .to_str()
                .unwrap()
            )
            .service_name
            .as_deref(),
            Some("a,b;c%")
        );
    }

    #[test]
    fn forwarded_builds_and_parses() {
        let client: SocketAddr = "10.244.1.5:41234".parse().unwrap();
        let value = Forwarded::to_header_value(client, Some("echo.a.svc.cluster.local")).unwrap();
        assert_eq!(
            value.to_str().unwrap(),
            "for=\"10.244.1.5:41234\";host=echo.a.svc.cluster.local"
        );
        let parsed = Forwarded::parse(value.to_str().unwrap());
        assert_eq!(parsed.for_addr, Some(ForwardedFor::Socket(client)));
        assert_eq!(parsed.host.as_deref(), Some("echo.a.svc.cluster.local"));

        let v6 = Forwarded::parse("For=\"[2001:db8::1]:80\";proto=http, for=1.2.3.4");
        assert_eq!(
            v6.for_addr,
            Some(ForwardedFor::Socket("[2001:db8::1]:80".parse().unwrap()))
        );
        assert_eq!(Forwarded::parse("for=_hidden;host=").for_addr, None);
        assert_eq!(
            Forwarded::parse("for=[::1]").for_addr.map(|f| f.ip()),
            Some("::1".parse().unwrap())
        );
        assert_eq!(Forwarded::parse("nonsense"), Forwarded::default());
    }

    #[test]
    fn traceparent_builds_and_parses() {
        let tp = TraceParent::random();
        let text = tp.to_header_value().to_str().unwrap().to_owned();
        assert_eq!(text.len(), 55);
        assert_eq!(TraceParent::parse(&text), Some(tp));
        assert_ne!(
            TraceParent::random(),
            tp,
            "ids must be fresh per connection"
        );
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(TraceParent::parse(ok).unwrap().flags, 1);
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
