//! The `istio.workload.Address` xDS handler both proxies register: decodes each resource,
//! converts it with [`Resource::try_from`] and writes the batch into the owner's
//! [`state::Store`] under one write lock. A resource that does not decode, does not convert, or
//! whose name differs from the name inside it is rejected on its own (per-resource NACK,
//! istio-ztunnel.md §2.5) and the rest are applied.
//!
//! Does not own: the lock or the state around the store (each proxy's `state` module), nor any
//! other resource type.

use std::sync::Arc;

use prost::Message;
use weft_proto::istio::workload::Address;
use weft_proto::type_url::ADDRESS_TYPE_URL;

use crate::state::{self, Resource};
use crate::xds::{self, Rejection, Update};

/// State holding the workload/service [`state::Store`] that Address resources are applied to.
pub trait Sink: Send + Sync + 'static {
    /// Runs `apply` on the store under the owner's write lock; called once per xDS response.
    fn write_store(&self, apply: impl FnOnce(&mut state::Store));
}

/// The Address handler for the state `S` (register it with [`xds::Client::new`]).
#[derive(Debug)]
pub struct Handler<S>(Arc<S>);

impl<S: Sink> Handler<S> {
    /// A handler writing into `state`.
    pub fn new(state: Arc<S>) -> Self {
        Handler(state)
    }
}

/// Decodes and converts `updates` (pure): the changes to apply in order (`Ok` upserts, `Err`
/// removals by name) and the rejected resources.
fn convert(updates: Vec<Update>) -> (Vec<Result<Resource, String>>, Vec<Rejection>) {
    let mut rejections = Vec::new();
    let mut converted = Vec::with_capacity(updates.len());
    for update in updates {
        match update {
            Update::Upsert { name, body, .. } => {
                let resource = Address::decode(body.value.as_slice())
                    .map_err(|e| Rejection::new(&name, format!("decoding Address: {e}")))
                    .and_then(|a| Resource::try_from(a).map_err(|e| Rejection::new(&name, e)));
                match resource {
                    Ok(resource) if resource.name() != name => rejections.push(Rejection::new(
                        &name,
                        format!("resource is named {:?} inside", resource.name()),
                    )),
                    Ok(resource) => converted.push(Ok(resource)),
                    Err(rejection) => rejections.push(rejection),
                }
            }
            Update::Remove { name } => converted.push(Err(name)),
        }
    }
    (converted, rejections)
}

impl<S: Sink> xds::Handler for Handler<S> {
    fn type_url(&self) -> &'static str {
        ADDRESS_TYPE_URL
    }

    fn apply(&self, updates: Vec<Update>) -> Vec<Rejection> {
        let (converted, rejections) = convert(updates);
        self.0.write_store(|store| {
            for item in converted {
                match item {
                    Ok(resource) => {
                        store.upsert(resource);
                    }
                    Err(name) => {
                        store.remove(&name);
                    }
                }
            }
        });
        rejections
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use weft_proto::istio::workload::{Workload, address};

    use super::*;
    use crate::xds::Handler as _;

    #[derive(Debug, Default)]
    struct State(Mutex<state::Store>);

    impl Sink for State {
        fn write_store(&self, apply: impl FnOnce(&mut state::Store)) {
            apply(&mut self.0.lock().unwrap());
        }
    }

    fn workload(uid: &str, ip: [u8; 4]) -> prost_types::Any {
        let address = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                name: "p".into(),
                namespace: "a".into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        };
        prost_types::Any {
            type_url: ADDRESS_TYPE_URL.into(),
            value: address.encode_to_vec(),
        }
    }

    #[test]
    fn addresses_apply_and_bad_ones_are_rejected_alone() {
        let state = Arc::new(State::default());
        let handler = Handler::new(state.clone());
        assert_eq!(handler.type_url(), ADDRESS_TYPE_URL);
        let rejections = handler.apply(vec![
            Update::Upsert {
                name: "u1".into(),
                version: "1".into(),
                body: workload("u1", [10, 0, 0, 1]),
            },
            Update::Upsert {
                name: "u2".into(),
                version: "1".into(),
                body: prost_types::Any {
                    type_url: ADDRESS_TYPE_URL.into(),
                    value: vec![0xff, 0xff],
                },
            },
            Update::Upsert {
                name: "u3".into(),
                version: "1".into(),
                body: workload("other", [10, 0, 0, 3]),
            },
        ]);
        let names: Vec<&str> = rejections.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["u2", "u3"]);
        assert!(rejections[0].reason.starts_with("decoding Address"));
        assert!(rejections[1].reason.contains("\"other\""));
        assert!(state.0.lock().unwrap().workload("u1").is_some());
        assert!(
            state
                .0
                .lock()
                .unwrap()
                .workload_by_ip("", "10.0.0.1".parse().unwrap())
                .is_some()
        );
        assert!(
            handler
                .apply(vec![Update::Remove { name: "u1".into() }])
                .is_empty()
        );
        assert!(state.0.lock().unwrap().workload("u1").is_none());
    }
}
