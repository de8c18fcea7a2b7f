//! Request identity and trace propagation: `x-request-id` (a random UUID v4 when absent) and W3C
//! `traceparent` (Trace Context §3.2: a new one with a random trace id and flags `01` when absent
//! or invalid, else the same trace id with a new span id — one span per waypoint hop).

use http::{HeaderMap, HeaderValue};
use rand::RngCore;
use weft_core::hbone::headers::{TRACEPARENT, TraceParent};

/// `x-request-id`.
pub const REQUEST_ID: &str = "x-request-id";

/// A random UUID v4 in its text form (RFC 9562 §5.4).
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(char::from(HEX[usize::from(x >> 4)]));
        out.push(char::from(HEX[usize::from(x & 0x0f)]));
    }
    out
}

/// Adds `x-request-id` if absent and sets `traceparent` for this hop; returns both values (for
/// the access log).
pub fn stamp(headers: &mut HeaderMap) -> (String, String) {
    let request_id = match headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => {
            let id = uuid_v4();
            if let Ok(value) = HeaderValue::from_str(&id) {
                headers.insert(REQUEST_ID, value);
            }
            id
        }
    };
    let incoming = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let fresh = TraceParent::random();
    let span = match incoming {
        Some(parent) => TraceParent {
            trace_id: parent.trace_id,
            parent_id: fresh.parent_id,
            flags: parent.flags,
        },
        None => TraceParent {
            flags: 0x01,
            ..fresh
        },
    };
    let value = span.to_header_value();
    let text = value.to_str().unwrap_or_default().to_owned();
    headers.insert(TRACEPARENT, value);
    (request_id, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_added_only_when_absent() {
        let mut h = HeaderMap::new();
        let (id, _) = stamp(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!(
            matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "variant: {id}"
        );
        assert_eq!(h[REQUEST_ID], id.as_str());
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(stamp(&mut h).0, "abc");
        assert_eq!(h[REQUEST_ID], "abc");
    }

    #[test]
    fn traceparent_created_or_continued() {
        let mut h = HeaderMap::new();
        let (_, tp) = stamp(&mut h);
        let created = TraceParent::parse(&tp).unwrap();
        assert_eq!(created.flags, 1);
        assert_eq!(h[TRACEPARENT], tp.as_str());

        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(parent));
        let (_, tp) = stamp(&mut h);
        let continued = TraceParent::parse(&tp).unwrap();
        assert_eq!(continued.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_ne!(continued.parent_id, 0xb7ad6b7169203331, "new span id");
        assert_eq!(continued.flags, 1);

        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        let (_, tp) = stamp(&mut h);
        assert!(TraceParent::parse(&tp).is_some(), "invalid one replaced");
    }
}
