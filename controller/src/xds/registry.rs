//! The connected xDS clients and, per type URL, where each stands: subscription, what was sent,
//! ACKed and NACKed. Read by the debug endpoint and tests.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One connected client (one delta ADS stream).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectionInfo {
    /// Connection id, unique within this controller process (starts at 1).
    pub id: u64,
    /// `Node.id` from the client's first request that carried a node (empty until then); for
    /// ztunnel `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` (istio-ztunnel.md §2.4).
    pub node_id: String,
    /// `Node.metadata` as JSON (`null` until a node was sent).
    pub node_metadata: serde_json::Value,
    /// The authenticated caller, `namespace/service-account`.
    pub caller: String,
    /// The node the authenticated caller runs on, when known.
    pub caller_node: Option<String>,
    /// The client's TCP peer address, when known.
    pub peer_addr: Option<SocketAddr>,
    /// When the stream was accepted, milliseconds since the Unix epoch.
    pub connected_since_unix_ms: u64,
    /// Per type URL.
    pub types: BTreeMap<String, TypeInfo>,
}

/// One client's state for one type URL.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TypeInfo {
    /// Subscribed to every resource of the type.
    pub wildcard: bool,
    /// Explicitly subscribed names or aliases (on-demand), sorted.
    pub names: Vec<String>,
    /// Responses sent on this stream.
    pub responses_sent: u64,
    /// Resources sent on this stream (sum over responses; removals not counted).
    pub resources_sent: u64,
    /// Nonce of the last response sent.
    pub last_sent_nonce: Option<String>,
    /// Nonce of the last response the client ACKed.
    pub last_acked_nonce: Option<String>,
    /// Resources the client held (as the server knows) when it last ACKed.
    pub acked_resources: usize,
    /// A response is sent and not yet ACKed or NACKed.
    pub awaiting_ack: bool,
    /// The last response was ACKed and nothing is owed to the client.
    pub in_sync: bool,
    /// The last NACK on this stream, if any (kept after later ACKs, as history).
    pub last_nack: Option<Nack>,
}

/// A rejected response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nack {
    /// Nonce of the rejected response.
    pub nonce: String,
    /// `error_detail.message` from the client (ztunnel: `"<name>: <reason>; ..."`).
    pub message: String,
    /// When the NACK arrived, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// The connected clients.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, ConnectionInfo>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Every connected client, ordered by connection id.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let mut list: Vec<ConnectionInfo> = self.lock().values().cloned().collect();
        list.sort_unstable_by_key(|c| c.id);
        list
    }

    /// The client with connection id `id`, if connected.
    pub fn get(&self, id: u64) -> Option<ConnectionInfo> {
        self.lock().get(&id).cloned()
    }

    /// The connected clients whose `node_id` is `node_id`.
    pub fn by_node(&self, node_id: &str) -> Vec<ConnectionInfo> {
        let mut list: Vec<ConnectionInfo> = self
            .lock()
            .values()
            .filter(|c| c.node_id == node_id)
            .cloned()
            .collect();
        list.sort_unstable_by_key(|c| c.id);
        list
    }

    /// Number of connected clients.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Registers a new connection and returns its id; it is removed when the guard drops.
    pub(crate) fn register(
        self: &Arc<Self>,
        caller: String,
        caller_node: Option<String>,
        peer_addr: Option<SocketAddr>,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(
            id,
            ConnectionInfo {
                id,
                node_id: String::new(),
                node_metadata: serde_json::Value::Null,
                caller,
                caller_node,
                peer_addr,
                connected_since_unix_ms: now_unix_ms(),
                types: BTreeMap::new(),
            },
        );
        Registration {
            registry: self.clone(),
            id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ConnectionInfo>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A registered connection; deregisters on drop.
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Registration {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Edits this connection's entry.
    pub(crate) fn update(&self, edit: impl FnOnce(&mut ConnectionInfo)) {
        if let Some(info) = self.registry.lock().get_mut(&self.id) {
            edit(info);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `google.protobuf.Struct` as JSON (for `Node.metadata`).
pub(crate) fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_lifecycle() {
        let registry = Registry::new();
        let reg = registry.register("istio-system/ztunnel".into(), Some("n1".into()), None);
        reg.update(|c| c.node_id = "ztunnel~1.1.1.1~p.ns~ns.svc.cluster.local".into());
        assert_eq!(registry.len(), 1);
        let info = registry.get(reg.id()).unwrap();
        assert_eq!(info.caller, "istio-system/ztunnel");
        assert_eq!(
            registry
                .by_node("ztunnel~1.1.1.1~p.ns~ns.svc.cluster.local")
                .len(),
            1
        );
        let json = serde_json::to_value(registry.connections()).unwrap();
        assert_eq!(json[0]["caller_node"], "n1");
        drop(reg);
        assert!(registry.is_empty());
    }

    #[test]
    fn node_metadata_to_json() {
        use prost_types::value::Kind;
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            "NAME".into(),
            prost_types::Value {
                kind: Some(Kind::StringValue("ztunnel-abc".into())),
            },
        );
        s.fields.insert(
            "N".into(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(2.0)),
            },
        );
        let json = struct_to_json(&s);
        assert_eq!(json, serde_json::json!({"NAME": "ztunnel-abc", "N": 2.0}));
    }
}
