//! The files config source: a directory tree of Kubernetes manifests (`*.yaml`, `*.yml`,
//! `*.json`; hidden files and directories skipped) watched by polling modification times, as the
//! local cluster's object store is.
//!
//! A malformed file or object is logged with the file, object and field and skipped; the last
//! good version of whatever it held stays in the index. A removed file removes its objects.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::warn;

use crate::index::{Index, Resource, ResourceKey};
use crate::manifest;

/// Default interval between directory scans.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// Scan state: what each file last contributed.
#[derive(Debug, Default)]
pub struct Watcher {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (Stamp, BTreeSet<ResourceKey>)>,
    /// Problems seen in the last scan, one line each (file, object, field, message).
    pub problems: Vec<String>,
}

// === impl Watcher ===

impl Watcher {
    /// A watcher of `dir` (which need not exist yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Watcher {
            dir: dir.into(),
            ..Watcher::default()
        }
    }

    /// Scans once and applies every change to `index` as one batch. Returns whether anything
    /// changed.
    pub fn scan(&mut self, index: &Index) -> bool {
        self.problems.clear();
        let mut seen = BTreeSet::new();
        let mut apply = Vec::new();
        let mut delete = Vec::new();
        for path in manifest_files(&self.dir) {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = Stamp {
                modified: meta.modified().ok(),
                len: meta.len(),
            };
            seen.insert(path.clone());
            if self.files.get(&path).is_some_and(|(s, _)| *s == stamp) {
                continue;
            }
            let previous = self
                .files
                .get(&path)
                .map(|(_, keys)| keys.clone())
                .unwrap_or_default();
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    self.problem(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let objects = match manifest::parse_documents(&text, &path.display().to_string()) {
                Ok(objects) => objects,
                Err(e) => {
                    // Keep the last good objects of this file; retry when it changes again.
                    self.problem(e.to_string());
                    self.files.insert(path, (stamp, previous));
                    continue;
                }
            };
            let mut keys = BTreeSet::new();
            for object in &objects {
                match Resource::from_object(object) {
                    Ok(Some(resource)) => {
                        keys.insert(resource.key());
                        apply.push(resource);
                    }
                    Ok(None) => {}
                    Err(invalid) => {
                        self.problem(format!("{}: {invalid}", path.display()));
                        if previous.contains(&invalid.key) {
                            keys.insert(invalid.key); // last good version stays
                        }
                    }
                }
            }
            delete.extend(previous.difference(&keys).cloned());
            self.files.insert(path, (stamp, keys));
        }
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in removed {
            if let Some((_, keys)) = self.files.remove(&path) {
                delete.extend(keys);
            }
        }
        // An object moved between files is deleted from one and applied from the other.
        let applied: BTreeSet<ResourceKey> = apply.iter().map(Resource::key).collect();
        delete.retain(|k| !applied.contains(k));
        let changed = !apply.is_empty() || !delete.is_empty();
        index.batch(apply, &delete);
        changed
    }

    fn problem(&mut self, message: String) {
        warn!(source = "files", problem = %message, "skipping invalid manifest");
        self.problems.push(message);
    }
}

fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => {
                    if matches!(
                        path.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    ) {
                        out.push(path);
                    }
                }
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// Scans into `index` with `watcher` every `interval` until `stop` resolves. Pass a watcher
/// that already made the initial scan to avoid re-applying everything.
pub async fn run(
    mut watcher: Watcher,
    index: Arc<Index>,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        watcher.scan(&index);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut stop => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pod/a")).unwrap();
        dir
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a, labels: {v: \"1\"}}\nspec: {containers: [{name: c, image: x}]}\n";

    #[test]
    fn picks_up_changes_keeps_last_good_and_removes() {
        let dir = dir("scan");
        let index = Index::new();
        let mut watcher = Watcher::new(&dir);
        std::fs::write(dir.join("pod/a/p.yaml"), POD).unwrap();
        std::fs::write(dir.join(".lock"), "not yaml: [").unwrap();
        assert!(watcher.scan(&index));
        let key = ("a".to_owned(), "p".to_owned());
        assert!(index.snapshot().pods.contains_key(&key));
        assert!(!watcher.scan(&index), "nothing changed");

        // A broken edit keeps the previous object and reports the problem.
        std::fs::write(
            dir.join("pod/a/p.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {containers: 7}\n",
        )
        .unwrap();
        watcher.scan(&index);
        assert_eq!(watcher.problems.len(), 1, "{:?}", watcher.problems);
        assert!(
            watcher.problems[0].contains("spec.containers"),
            "{:?}",
            watcher.problems
        );
        let pod = index.snapshot().pods[&key].clone();
        assert_eq!(
            pod.metadata.labels.as_ref().unwrap()["v"],
            "1",
            "last good version kept"
        );

        // A good edit replaces it; deleting the file removes it.
        std::fs::write(dir.join("pod/a/p.yaml"), POD.replace("\"1\"", "\"2\"")).unwrap();
        watcher.scan(&index);
        assert_eq!(
            index.snapshot().pods[&key]
                .metadata
                .labels
                .as_ref()
                .unwrap()["v"],
            "2"
        );
        std::fs::remove_file(dir.join("pod/a/p.yaml")).unwrap();
        watcher.scan(&index);
        assert!(index.snapshot().pods.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
