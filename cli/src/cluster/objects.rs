//! Where a cluster's objects live, behind one interface: [`Objects`], implemented by the
//! Kubernetes API server of a `--kubernetes` cluster ([`super::api::KubeApi`]) and by the
//! YAML-file [`Store`] of a process cluster. The CLI verbs (`weft cluster apply|get|label`,
//! `weft waypoint …`), `weft demo` and the end-to-end suites go through it, so they run the same
//! on both.

use serde_json::json;

use super::manifest::{Object, ObjectKey};
use super::store::{self, Outcome, Store};

/// Errors reading or writing a cluster's objects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The YAML-file store failed or refused an apply.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The API server refused or failed a request: the object (or kind) and the server's own
    /// message (its `Status` message and code).
    #[error("{what}: {message}")]
    Api {
        /// The object or kind the request was about.
        what: String,
        /// The API server's message.
        message: String,
    },
    /// The API server serves no such kind (e.g. its CRD is not installed).
    #[error("{0}: the API server serves no such kind (is its CustomResourceDefinition installed?)")]
    UnknownKind(String),
    /// The API server could not be reached.
    #[error("the Kubernetes API server: {0}")]
    Unreachable(String),
}

/// Reads and writes a cluster's objects.
pub trait Objects {
    /// The object with `key`, if it exists.
    ///
    /// # Errors
    /// [`Error`] when it cannot be read.
    fn get(&self, key: &ObjectKey) -> Result<Option<Object>, Error>;

    /// Every object of `group`/`kind` in every namespace (each with its `apiVersion` and
    /// `kind` set).
    ///
    /// # Errors
    /// [`Error`] when they cannot be listed.
    fn list(&self, group: &str, kind: &str) -> Result<Vec<Object>, Error>;

    /// Creates or updates `objects` in order (the API server: server-side apply, field manager
    /// `weft`); returns what happened to each.
    ///
    /// # Errors
    /// [`Error`] naming the first object refused (the store applies all or nothing; the API
    /// server keeps the objects before it, as `kubectl apply` does).
    fn apply(&self, objects: &[Object]) -> Result<Vec<(ObjectKey, Outcome)>, Error>;

    /// Deletes objects (their dependents go with them: background propagation); returns for
    /// each whether it existed.
    ///
    /// # Errors
    /// [`Error`] naming the first object that could not be deleted.
    fn delete(&self, keys: &[ObjectKey]) -> Result<Vec<(ObjectKey, bool)>, Error>;

    /// Sets (`Some`) or removes (`None`) label `label` of the object with `key`; `false` when
    /// there is no such object.
    ///
    /// # Errors
    /// [`Error`] when it cannot be written.
    fn set_label(&self, key: &ObjectKey, label: &str, value: Option<&str>) -> Result<bool, Error>;
}

impl Objects for Store {
    fn get(&self, key: &ObjectKey) -> Result<Option<Object>, Error> {
        Ok(Store::get(self, key)?)
    }

    fn list(&self, group: &str, kind: &str) -> Result<Vec<Object>, Error> {
        Ok(Store::list(self, group, kind)?)
    }

    fn apply(&self, objects: &[Object]) -> Result<Vec<(ObjectKey, Outcome)>, Error> {
        Ok(Store::apply(self, objects)?)
    }

    fn delete(&self, keys: &[ObjectKey]) -> Result<Vec<(ObjectKey, bool)>, Error> {
        Ok(Store::delete(self, keys)?)
    }

    fn set_label(&self, key: &ObjectKey, label: &str, value: Option<&str>) -> Result<bool, Error> {
        let _lock = self.lock()?;
        let Some(mut object) = Store::get(self, key)? else {
            return Ok(false);
        };
        let current = object.0["metadata"]["labels"][label].as_str();
        if current == value {
            return Ok(true);
        }
        match value {
            Some(value) => object.0["metadata"]["labels"][label] = json!(value),
            None => {
                if let Some(labels) = object.0["metadata"]["labels"].as_object_mut() {
                    labels.remove(label);
                }
            }
        }
        self.put(&object)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_sets_and_removes_labels_and_reports_missing_objects() {
        let dir = std::env::temp_dir().join(format!("weft-objects-{}", store::new_uid()));
        let store = Store::new(&dir);
        Objects::apply(
            &store,
            &[Object(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}),
            )],
        )
        .unwrap();
        let key = ObjectKey::new("", "Namespace", None, "a");
        let objects: &dyn Objects = &store;
        assert!(objects.set_label(&key, "x", Some("1")).unwrap());
        assert_eq!(
            objects.get(&key).unwrap().unwrap().0["metadata"]["labels"]["x"],
            "1"
        );
        assert!(objects.set_label(&key, "x", None).unwrap());
        assert!(objects.get(&key).unwrap().unwrap().0["metadata"]["labels"]["x"].is_null());
        let missing = ObjectKey::new("", "Namespace", None, "b");
        assert!(!objects.set_label(&missing, "x", Some("1")).unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }
}
