//! ztunnel's view of the mesh: the workload/service store and the policy store, fed by the
//! delta xDS client and read by every connection.
//!
//! Writes are batched per xDS response under one write lock; readers take a read lock for the
//! duration of a decision (never across an await). Policy changes are announced on a watch
//! channel so live connections can be re-checked.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use prost::Message;
use tokio::sync::watch;
use weft_core::address;
use weft_core::policy::{self, Policy};
use weft_core::state;
use weft_core::xds::{Handler, Rejection, Update};
use weft_proto::istio::security::Authorization;
use weft_proto::type_url::AUTHORIZATION_TYPE_URL;

/// Everything ztunnel knows.
#[derive(Debug, Default)]
pub struct Inner {
    /// Workloads and services.
    pub workloads: state::Store,
    /// Authorization policies.
    pub policies: policy::Store,
}

/// The shared, lockable state.
#[derive(Debug)]
pub struct ProxyState {
    inner: RwLock<Inner>,
    policy_version: watch::Sender<u64>,
}

impl Default for ProxyState {
    fn default() -> Self {
        ProxyState {
            inner: RwLock::new(Inner::default()),
            policy_version: watch::channel(0).0,
        }
    }
}

impl ProxyState {
    /// Empty state.
    pub fn new() -> Arc<ProxyState> {
        Arc::new(ProxyState::default())
    }

    /// Reads the state (hold only for a synchronous decision).
    pub fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes whenever a policy is added, changed or removed.
    pub fn policy_changes(&self) -> watch::Receiver<u64> {
        self.policy_version.subscribe()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The xDS handlers feeding this state.
    pub fn handlers(self: &Arc<Self>) -> Vec<Arc<dyn Handler>> {
        vec![
            Arc::new(AddressHandler::new(self.clone())),
            Arc::new(AuthorizationHandler(self.clone())),
        ]
    }
}

impl address::Sink for ProxyState {
    fn write_store(&self, apply: impl FnOnce(&mut state::Store)) {
        apply(&mut self.write().workloads);
    }
}

/// Applies `istio.workload.Address` resources (the shared [`address::Handler`]): a resource
/// that does not decode or convert is rejected on its own (NACK) and the rest are applied.
pub type AddressHandler = address::Handler<ProxyState>;

/// Applies `istio.security.Authorization` resources and announces policy changes.
#[derive(Debug)]
pub struct AuthorizationHandler(Arc<ProxyState>);

impl Handler for AuthorizationHandler {
    fn type_url(&self) -> &'static str {
        AUTHORIZATION_TYPE_URL
    }

    fn apply(&self, updates: Vec<Update>) -> Vec<Rejection> {
        let mut rejections = Vec::new();
        let mut changed = false;
        {
            let mut inner = self.0.write();
            for update in updates {
                match update {
                    Update::Upsert { name, body, .. } => {
                        let policy = Authorization::decode(body.value.as_slice())
                            .map_err(|e| {
                                Rejection::new(&name, format!("decoding Authorization: {e}"))
                            })
                            .and_then(|a| {
                                Policy::try_from(a).map_err(|e| Rejection::new(&name, e))
                            });
                        match policy {
                            Ok(policy) => changed |= inner.policies.upsert(policy),
                            Err(rejection) => rejections.push(rejection),
                        }
                    }
                    Update::Remove { name } => changed |= inner.policies.remove(&name).is_some(),
                }
            }
        }
        if changed {
            self.0.policy_version.send_modify(|v| *v += 1);
        }
        rejections
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_changes_are_announced() {
        use weft_proto::istio::security::{Action, Scope};
        let state = ProxyState::new();
        let mut changes = state.policy_changes();
        let handler = AuthorizationHandler(state.clone());
        let policy = Authorization {
            name: "p".into(),
            namespace: "a".into(),
            scope: Scope::Namespace as i32,
            action: Action::Deny as i32,
            ..Default::default()
        };
        let body = prost_types::Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: policy.encode_to_vec(),
        };
        assert!(
            handler
                .apply(vec![Update::Upsert {
                    name: "a/p".into(),
                    version: "1".into(),
                    body
                }])
                .is_empty()
        );
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert!(state.read().policies.get("a/p").is_some());
        handler.apply(vec![Update::Remove { name: "a/p".into() }]);
        assert!(changes.has_changed().unwrap());
        assert!(state.read().policies.get("a/p").is_none());
    }
}
