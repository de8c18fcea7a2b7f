//! What the caller plugs in per type URL: a [`Handler`] receives serialized resource updates
//! and answers with per-resource [`Rejection`]s.

use std::fmt;

/// Receives the resources of one xDS type URL.
///
/// The client never interprets resource bodies: it hands the serialized bytes to the handler,
/// which decodes them (e.g. `istio.workload.Address`), converts them into its own domain types
/// and applies every valid one (istio-ztunnel.md §2.5: processing is per resource; a bad
/// resource never poisons the batch).
///
/// Contract:
/// * [`Handler::apply`] is called on the client task once per `DeltaDiscoveryResponse` that
///   carries at least one update, in arrival order; it must not block for long (it delays the
///   ACK and every later response).
/// * A rejected [`Update::Upsert`] must leave the handler's previous state for that name (if
///   any) untouched: the client keeps advertising the previously accepted version, if any, in
///   `initial_resource_versions`, and never the rejected one, so the server sends it again
///   after a reconnect.
/// * The client never clears a handler: while the controller is unreachable the handler keeps
///   serving the last good configuration.
pub trait Handler: Send + Sync + 'static {
    /// The type URL this handler owns, e.g. `type.googleapis.com/istio.workload.Address`
    /// (`weft_proto::type_url`).
    fn type_url(&self) -> &'static str;

    /// Applies one response's updates (upserts in the order the server sent them, then
    /// removals) and returns the rejected ones, each with its reason; an empty vector means
    /// everything was applied.
    fn apply(&self, updates: Vec<Update>) -> Vec<Rejection>;
}

/// One change to a handler's resources.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A resource added or changed.
    Upsert {
        /// The resource name (workload `uid`, service `namespace/hostname`, policy
        /// `namespace/name`; istio-ztunnel.md §2.6).
        name: String,
        /// The server's opaque version of this content (Weft: a content hash).
        version: String,
        /// The serialized resource. `body.type_url` is the handler's type URL or empty.
        body: prost_types::Any,
    },
    /// A resource the client held was removed (`removed_resources`).
    Remove {
        /// The resource name.
        name: String,
    },
}

impl Update {
    /// The resource name the update is about.
    pub fn name(&self) -> &str {
        match self {
            Update::Upsert { name, .. } | Update::Remove { name } => name,
        }
    }
}

/// A resource a handler (or the client, for a malformed `Resource`) refused.
///
/// Rejections turn the response's ACK into a NACK whose `error_detail.message` lists them as
/// `"<name>: <reason>; <name>: <reason>"` (istio-ztunnel.md §2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The resource name, as in the [`Update`].
    pub name: String,
    /// Why, as lowercase text without a trailing period (e.g. `"invalid address length 5"`).
    pub reason: String,
}

impl Rejection {
    /// A rejection of `name` because of `reason` (an error is rendered with its `Display`).
    pub fn new(name: impl Into<String>, reason: impl fmt::Display) -> Self {
        Rejection {
            name: name.into(),
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}
