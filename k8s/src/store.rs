//! The object store: a directory of Kubernetes YAML, one object per file
//! (`<kind>[.<group>]/<namespace or _cluster>/<name>.yaml`), written atomically (temp file, fsync,
//! rename) under an exclusive lock. It plays kube-apiserver + etcd for the local cluster; the
//! controller and node agents watch it as their files config source.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::manifest::{self, Object, ObjectKey};

/// Directory name for cluster-scoped objects.
const CLUSTER_SCOPE_DIR: &str = "_cluster";
/// First service VIP handed out (10.96.0.1 is left for a `kubernetes` service).
const FIRST_SERVICE_IP: u32 = u32::from_be_bytes([10, 96, 0, 10]);
const LAST_SERVICE_IP: u32 = u32::from_be_bytes([10, 96, 255, 254]);

/// Errors reading or writing the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("store file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored file is not valid YAML.
    #[error("store file {path} is not valid yaml")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_yaml::Error,
    },
    /// An object's namespace does not exist (neither stored nor in the same apply).
    #[error("{key}: namespace {namespace:?} not found")]
    NamespaceNotFound {
        /// The object.
        key: Box<ObjectKey>,
        /// Its namespace.
        namespace: String,
    },
    /// The same object appears twice in one apply.
    #[error("{0} appears more than once")]
    Duplicate(Box<ObjectKey>),
    /// A requested cluster IP belongs to another Service.
    #[error("{key}: spec.clusterIP {ip} is already allocated to {owner}")]
    ClusterIpTaken {
        /// The Service asking.
        key: Box<ObjectKey>,
        /// The address.
        ip: String,
        /// The Service holding it.
        owner: Box<ObjectKey>,
    },
    /// A requested cluster IP is outside the service range.
    #[error("{key}: spec.clusterIP {ip} is outside the service range 10.96.0.0/16")]
    ClusterIpOutOfRange {
        /// The Service asking.
        key: Box<ObjectKey>,
        /// The address.
        ip: String,
    },
    /// No service VIP is left.
    #[error("{0}: no free cluster IP left in 10.96.0.0/16")]
    ClusterIpExhausted(Box<ObjectKey>),
}

/// What an apply did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did not exist.
    Created,
    /// It existed and changed.
    Configured,
    /// It existed unchanged.
    Unchanged,
}

/// The store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Held while reading-modifying-writing; released on drop.
#[derive(Debug)]
pub struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

// === impl Store ===

impl Store {
    /// A store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Takes the store's exclusive lock (blocking).
    ///
    /// # Errors
    /// [`Error::Io`] when the lock file cannot be opened.
    pub fn lock(&self) -> Result<Lock, Error> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let path = self.dir.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Self::io(&path))?;
        file.lock().map_err(Self::io(&path))?;
        Ok(Lock(file))
    }

    /// The store-wide resource version: increases on every write, so watchers can poll it.
    pub fn revision(&self) -> u64 {
        std::fs::read_to_string(self.dir.join(".revision"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn bump_revision(&self) -> Result<u64, Error> {
        let next = self.revision() + 1;
        write_atomic(&self.dir.join(".revision"), next.to_string().as_bytes())?;
        Ok(next)
    }

    /// The file an object lives in.
    pub fn path(&self, key: &ObjectKey) -> PathBuf {
        self.dir
            .join(key.kind_dir())
            .join(key.namespace.as_deref().unwrap_or(CLUSTER_SCOPE_DIR))
            .join(format!("{}.yaml", key.name))
    }

    /// Reads one object.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`].
    pub fn get(&self, key: &ObjectKey) -> Result<Option<Object>, Error> {
        read_object(&self.path(key))
    }

    /// Every object of a kind (`group`, `kind`), in all namespaces, sorted by namespace and name.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`].
    pub fn list(&self, group: &str, kind: &str) -> Result<Vec<Object>, Error> {
        let kind_dir = self.dir.join(manifest::kind_dir(group, kind));
        let mut objects = Vec::new();
        for ns_dir in sorted_entries(&kind_dir)? {
            for file in sorted_entries(&ns_dir)? {
                if file.extension().is_some_and(|e| e == "yaml")
                    && let Some(object) = read_object(&file)?
                {
                    objects.push(object);
                }
            }
        }
        Ok(objects)
    }

    /// Writes one object as is (caller holds the lock), stamping `metadata.resourceVersion`.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn put(&self, object: &Object) -> Result<(), Error> {
        let mut object = object.clone();
        let revision = self.bump_revision()?;
        object.0["metadata"]["resourceVersion"] = json!(revision.to_string());
        let path = self.path(&object.key());
        write_atomic(&path, &to_yaml(&object))
    }

    /// Removes one object (caller holds the lock). Returns whether it existed.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn remove(&self, key: &ObjectKey) -> Result<bool, Error> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                self.bump_revision()?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Self::io(&path)(e)),
        }
    }

    /// Replaces `status` of a stored object, keeping everything else as stored (the status
    /// subresource). Returns false when the object is gone.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`].
    pub fn update_status(&self, key: &ObjectKey, status: Value) -> Result<bool, Error> {
        let _lock = self.lock()?;
        let Some(mut object) = self.get(key)? else {
            return Ok(false);
        };
        if object.0["status"] == status {
            return Ok(true);
        }
        object.0["status"] = status;
        self.put(&object)?;
        Ok(true)
    }

    /// Creates or updates objects like `kubectl apply`, all or nothing: every object is checked
    /// (namespace exists, no duplicates, cluster IPs free) before anything is written, and the
    /// files are renamed into place only after all were written.
    ///
    /// Existing objects keep `uid`, `creationTimestamp`, `status` and an allocated
    /// `spec.clusterIP`; `metadata.generation` increases when `spec` changes. Services get a
    /// cluster IP from 10.96.0.0/16 unless headless.
    ///
    /// # Errors
    /// [`Error`] naming the offending object; nothing is written then.
    pub fn apply(&self, objects: &[Object]) -> Result<Vec<(ObjectKey, Outcome)>, Error> {
        let _lock = self.lock()?;
        let mut seen = BTreeMap::new();
        for object in objects {
            if seen.insert(object.key(), ()).is_some() {
                return Err(Error::Duplicate(Box::new(object.key())));
            }
        }
        let namespaces_in_batch: Vec<&str> = objects
            .iter()
            .filter(|o| o.kind() == "Namespace" && o.api_version() == "v1")
            .map(Object::name)
            .collect();
        for object in objects {
            if let Some(ns) = object.namespace() {
                let stored = self
                    .get(&ObjectKey::new("", "Namespace", None, ns))?
                    .is_some();
                if !stored && !namespaces_in_batch.contains(&ns) {
                    return Err(Error::NamespaceNotFound {
                        key: Box::new(object.key()),
                        namespace: ns.to_owned(),
                    });
                }
            }
        }

        let mut ips = self.allocated_cluster_ips()?;
        let mut staged = Vec::new();
        for object in objects {
            let key = object.key();
            let existing = self.get(&key)?;
            let mut merged = object.clone();
            merged.0.as_object_mut().map(|m| m.remove("status"));
            let now = timestamp();
            match &existing {
                Some(old) => {
                    let meta = &old.0["metadata"];
                    for field in ["uid", "creationTimestamp", "generation"] {
                        if !meta[field].is_null() {
                            merged.0["metadata"][field] = meta[field].clone();
                        }
                    }
                    if !old.0["status"].is_null() {
                        merged.0["status"] = old.0["status"].clone();
                    }
                }
                None => {
                    merged.0["metadata"]["uid"] = json!(new_uid());
                    merged.0["metadata"]["creationTimestamp"] = json!(now);
                    merged.0["metadata"]["generation"] = json!(1);
                }
            }
            if merged.0["metadata"]["namespace"].is_null()
                && let Some(ns) = key.namespace.as_deref()
            {
                merged.0["metadata"]["namespace"] = json!(ns);
            }
            if object.kind() == "Service" && object.api_version() == "v1" {
                self.assign_cluster_ip(&key, &mut merged, existing.as_ref(), &mut ips)?;
            }
            let outcome = match &existing {
                None => Outcome::Created,
                Some(old) if same_content(old, &merged) => Outcome::Unchanged,
                Some(old) => {
                    if old.0["spec"] != merged.0["spec"] {
                        let generation = old.0["metadata"]["generation"].as_i64().unwrap_or(1);
                        merged.0["metadata"]["generation"] = json!(generation + 1);
                    }
                    Outcome::Configured
                }
            };
            staged.push((key, merged, outcome));
        }

        // Write every changed object to a temp file first, then rename them all.
        let mut renames = Vec::new();
        for (key, object, outcome) in &staged {
            if *outcome == Outcome::Unchanged {
                continue;
            }
            let mut object = object.clone();
            let revision = self.bump_revision()?;
            object.0["metadata"]["resourceVersion"] = json!(revision.to_string());
            let path = self.path(key);
            let tmp = temp_path(&path);
            write_file(&tmp, &to_yaml(&object))?;
            renames.push((tmp, path));
        }
        for (tmp, path) in renames {
            std::fs::rename(&tmp, &path).map_err(Self::io(&path))?;
        }
        Ok(staged.into_iter().map(|(k, _, o)| (k, o)).collect())
    }

    /// Deletes objects; returns for each whether it existed.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn delete(&self, keys: &[ObjectKey]) -> Result<Vec<(ObjectKey, bool)>, Error> {
        let _lock = self.lock()?;
        keys.iter()
            .map(|key| Ok((key.clone(), self.remove(key)?)))
            .collect()
    }

    fn allocated_cluster_ips(&self) -> Result<BTreeMap<String, ObjectKey>, Error> {
        let mut ips = BTreeMap::new();
        for service in self.list("", "Service")? {
            if let Some(ip) = service.0["spec"]["clusterIP"].as_str()
                && ip != "None"
                && !ip.is_empty()
            {
                ips.insert(ip.to_owned(), service.key());
            }
        }
        Ok(ips)
    }

    fn assign_cluster_ip(
        &self,
        key: &ObjectKey,
        merged: &mut Object,
        existing: Option<&Object>,
        ips: &mut BTreeMap<String, ObjectKey>,
    ) -> Result<(), Error> {
        let spec = &mut merged.0["spec"];
        let requested = spec["clusterIP"].as_str().unwrap_or_default().to_owned();
        if requested == "None" || spec["type"] == "ExternalName" {
            return Ok(());
        }
        let previous = existing
            .and_then(|o| o.0["spec"]["clusterIP"].as_str().map(str::to_owned))
            .filter(|ip| !ip.is_empty() && ip != "None");
        let ip = if !requested.is_empty() {
            let in_range = requested
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| u32::from(ip) & 0xffff_0000 == FIRST_SERVICE_IP & 0xffff_0000);
            if !in_range {
                return Err(Error::ClusterIpOutOfRange {
                    key: Box::new(key.clone()),
                    ip: requested,
                });
            }
            if let Some(owner) = ips.get(&requested).filter(|owner| *owner != key) {
                return Err(Error::ClusterIpTaken {
                    key: Box::new(key.clone()),
                    ip: requested,
                    owner: Box::new(owner.clone()),
                });
            }
            requested
        } else if let Some(previous) = previous {
            previous
        } else {
            (FIRST_SERVICE_IP..=LAST_SERVICE_IP)
                .map(|n| std::net::Ipv4Addr::from(n).to_string())
                .find(|ip| !ips.contains_key(ip))
                .ok_or_else(|| Error::ClusterIpExhausted(Box::new(key.clone())))?
        };
        ips.insert(ip.clone(), key.clone());
        spec["clusterIP"] = json!(ip);
        spec["clusterIPs"] = json!([ip]);
        if spec["type"].is_null() {
            spec["type"] = json!("ClusterIP");
        }
        Ok(())
    }
}

fn same_content(old: &Object, new: &Object) -> bool {
    let strip = |o: &Object| {
        let mut v = o.0.clone();
        if let Some(meta) = v["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
        }
        v
    };
    strip(old) == strip(new)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            Ok(paths)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

fn read_object(path: &Path) -> Result<Option<Object>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    let value: Value = serde_yaml::from_str(&text).map_err(|source| Error::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Some(Object(value)))
}

fn to_yaml(object: &Object) -> Vec<u8> {
    serde_yaml::to_string(&object.0)
        .unwrap_or_default()
        .into_bytes()
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut file = File::create(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = temp_path(path);
    write_file(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A random RFC 4122 version-4 UID.
pub fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Now, as an RFC 3339 UTC timestamp with second precision (Kubernetes `Time`).
pub fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse;

    fn tmp_store(tag: &str) -> Store {
        let dir = std::env::temp_dir().join(format!("weft-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Store::new(dir)
    }

    #[test]
    fn apply_creates_updates_and_allocates_cluster_ips() {
        let store = tmp_store("apply");
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: a}\n\
                    spec: {selector: {app: echo}, ports: [{port: 80, targetPort: http}]}\n";
        let objects = parse(text, "t.yaml").unwrap();
        let outcomes = store.apply(&objects).unwrap();
        assert!(outcomes.iter().all(|(_, o)| *o == Outcome::Created));
        let key = ObjectKey::new("", "Service", Some("a"), "echo");
        let svc = store.get(&key).unwrap().unwrap();
        assert_eq!(svc.0["spec"]["clusterIP"], "10.96.0.10");
        let uid = svc.0["metadata"]["uid"].clone();

        // Re-applying keeps uid and IP and changes nothing.
        let outcomes = store.apply(&objects).unwrap();
        assert!(
            outcomes.iter().all(|(_, o)| *o == Outcome::Unchanged),
            "{outcomes:?}"
        );
        let svc = store.get(&key).unwrap().unwrap();
        assert_eq!(svc.0["metadata"]["uid"], uid);

        // A second service gets the next IP; a clash is refused.
        let second = parse("apiVersion: v1\nkind: Service\nmetadata: {name: two, namespace: a}\nspec: {ports: [{port: 1}]}\n", "t").unwrap();
        store.apply(&second).unwrap();
        assert_eq!(
            store.get(&second[0].key()).unwrap().unwrap().0["spec"]["clusterIP"],
            "10.96.0.11"
        );
        let clash = parse("apiVersion: v1\nkind: Service\nmetadata: {name: three, namespace: a}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 1}]}\n", "t").unwrap();
        assert!(matches!(
            store.apply(&clash),
            Err(Error::ClusterIpTaken { .. })
        ));
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn apply_is_all_or_nothing() {
        let store = tmp_store("atomic");
        let text = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: ok, namespace: default}\n---\n\
                    apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: orphan, namespace: missing}\n";
        let ns = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n",
            "t",
        )
        .unwrap();
        store.apply(&ns).unwrap();
        let before = store.revision();
        let err = store.apply(&parse(text, "t").unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("namespace \"missing\" not found"),
            "{err}"
        );
        assert_eq!(store.revision(), before);
        assert!(store.list("", "ServiceAccount").unwrap().is_empty());
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn timestamps_and_uids_have_kubernetes_shapes() {
        let ts = timestamp();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'));
        let uid = new_uid();
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4");
    }
}
