//! Pod volumes on the netns kubelet: each volume of a pod becomes a host directory (or, for a
//! `hostPath`, a host path), and each container's `volumeMounts` become bind mounts in the
//! container's own mount namespace ([`netns::Bind`]).
//!
//! | volume | host side |
//! |--------|-----------|
//! | `emptyDir` | `<pod dir>/volumes/<name>/`, removed with the pod |
//! | `configMap`, `secret` | `<pod dir>/volumes/<name>/<key>` per key (or per `items` entry), from the API |
//! | `projected` | the same directory, one file per source item: `serviceAccountToken` (TokenRequest API, the source's audience and `expirationSeconds`), `configMap`, `secret`, `downwardAPI` |
//! | `downwardAPI` | one file per item (`fieldRef`) |
//! | `hostPath` | the node's path: see [`host_path`] |
//!
//! A ConfigMap or Secret that does not exist (and is not `optional`) fails the pod's start, which
//! the kubelet retries, as a kubelet keeps such a pod in `ContainerCreating`. Files are written
//! once, when the pod starts (a kubelet also refreshes them: here a changed ConfigMap reaches a
//! pod when it is restarted). Other volume types are refused with a message naming the volume.
//!
//! Every node of the local cluster is one machine, so a node's "host" file system is the
//! machine's, except the paths where nodes must not share state (the node agent's and ztunnel's
//! sockets, the CNI configuration and plugins): those live under the node's root directory.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};

use super::netns::Bind;

/// Host paths every node shares with the machine: a `hostPath` volume under one of them is the
/// machine's own path; any other `hostPath` is the node's, under its root directory. `/run` and
/// `/var/run` are the same directory on the machines we run on.
pub const SHARED_HOST_PATHS: [&str; 11] = [
    "/proc",
    "/sys",
    "/dev",
    "/run/netns",
    "/var/run/netns",
    "/lib/modules",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
];

/// Where a `hostPath` volume's `path` is on the machine for the node whose root directory is
/// `node_root`: the path itself under [`SHARED_HOST_PATHS`], else `node_root` + the path.
///
/// # Errors
/// A path that is not absolute or has `..` components.
pub fn host_path(node_root: &Path, path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "hostPath {path:?} must be an absolute path without \"..\""
        ));
    }
    if SHARED_HOST_PATHS.iter().any(|shared| p.starts_with(shared)) {
        return Ok(p.to_path_buf());
    }
    Ok(node_root.join(p.strip_prefix("/").unwrap_or(p)))
}

/// Where the data of a pod's volumes comes from.
pub trait Sources {
    /// A ConfigMap's (`secret` false) or Secret's (`secret` true) data, key → bytes; `None`
    /// when it does not exist.
    ///
    /// # Errors
    /// A message when it could not be read.
    fn data(
        &self,
        secret: bool,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String>;
    /// A ServiceAccount token for `audience` (the API server's own when `None`), valid for
    /// `expiration_seconds`, bound to the pod.
    ///
    /// # Errors
    /// A message when none could be issued.
    fn token(&self, audience: Option<&str>, expiration_seconds: i64) -> Result<String, String>;
    /// A downward-API field of the pod (`metadata.name`, `metadata.labels['x']`, …).
    fn field(&self, path: &str) -> Option<String>;
    /// The node's root directory (for `hostPath`).
    fn node_root(&self) -> PathBuf;
}

/// The pod's volumes on the host: name → path.
pub type Volumes = BTreeMap<String, PathBuf>;

/// Makes every volume of `pod` under `pod_dir/volumes/` (hostPath: resolves and checks it).
///
/// # Errors
/// A message naming the volume and what is wrong.
pub fn prepare(pod: &Pod, pod_dir: &Path, sources: &dyn Sources) -> Result<Volumes, String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut volumes = Volumes::new();
    for volume in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let path = prepare_one(volume, namespace, pod_dir, sources)
            .map_err(|e| format!("volume {:?}: {e}", volume.name))?;
        volumes.insert(volume.name.clone(), path);
    }
    Ok(volumes)
}

fn prepare_one(
    volume: &Volume,
    namespace: &str,
    pod_dir: &Path,
    sources: &dyn Sources,
) -> Result<PathBuf, String> {
    if let Some(host) = &volume.host_path {
        let path = host_path(&sources.node_root(), &host.path)?;
        check_host_path(&path, host.type_.as_deref().unwrap_or(""))?;
        return Ok(path);
    }
    let dir = pod_dir.join("volumes").join(&volume.name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    if volume.empty_dir.is_some() {
    } else if let Some(cm) = &volume.config_map {
        let mode = mode_of(cm.default_mode);
        files = keyed(
            sources,
            false,
            namespace,
            &cm.name,
            cm.items.as_deref(),
            cm.optional,
            mode,
        )?;
    } else if let Some(secret) = &volume.secret {
        let name = secret.secret_name.as_deref().unwrap_or_default();
        let mode = mode_of(secret.default_mode);
        files = keyed(
            sources,
            true,
            namespace,
            name,
            secret.items.as_deref(),
            secret.optional,
            mode,
        )?;
    } else if let Some(projected) = &volume.projected {
        let mode = mode_of(projected.default_mode);
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let jwt = sources.token(
                    token.audience.as_deref().filter(|a| !a.is_empty()),
                    token.expiration_seconds.unwrap_or(3607),
                )?;
                files.push((token.path.clone(), jwt.into_bytes(), 0o600));
            }
            if let Some(cm) = &source.config_map {
                files.extend(keyed(
                    sources,
                    false,
                    namespace,
                    &cm.name,
                    cm.items.as_deref(),
                    cm.optional,
                    mode,
                )?);
            }
            if let Some(secret) = &source.secret {
                files.extend(keyed(
                    sources,
                    true,
                    namespace,
                    &secret.name,
                    secret.items.as_deref(),
                    secret.optional,
                    mode,
                )?);
            }
            if let Some(downward) = &source.downward_api {
                for item in downward.items.iter().flatten() {
                    files.push((item.path.clone(), downward_value(sources, item)?, mode));
                }
            }
            if source.cluster_trust_bundle.is_some() || source.pod_certificate.is_some() {
                return Err(
                    "projected clusterTrustBundle and podCertificate sources are not supported"
                        .into(),
                );
            }
        }
    } else if let Some(downward) = &volume.downward_api {
        let mode = mode_of(downward.default_mode);
        for item in downward.items.iter().flatten() {
            files.push((item.path.clone(), downward_value(sources, item)?, mode));
        }
    } else {
        return Err("unsupported volume type (the local kubelet mounts emptyDir, configMap, secret, projected, downwardAPI and hostPath)".into());
    }
    for (name, bytes, mode) in files {
        write_file(&dir, &name, &bytes, mode)?;
    }
    Ok(dir)
}

fn mode_of(mode: Option<i32>) -> u32 {
    mode.and_then(|m| u32::try_from(m).ok()).unwrap_or(0o644) & 0o7777
}

fn downward_value(
    sources: &dyn Sources,
    item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
) -> Result<Vec<u8>, String> {
    let Some(field) = &item.field_ref else {
        return Err(format!(
            "downwardAPI item {:?}: only fieldRef is supported",
            item.path
        ));
    };
    sources
        .field(&field.field_path)
        .map(String::into_bytes)
        .ok_or_else(|| {
            format!(
                "downwardAPI item {:?}: unsupported fieldRef {}",
                item.path, field.field_path
            )
        })
}

/// The files of a ConfigMap or Secret: every key, or just `items` (key → path, mode).
fn keyed(
    sources: &dyn Sources,
    secret: bool,
    namespace: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
) -> Result<Vec<(String, Vec<u8>, u32)>, String> {
    let kind = if secret { "Secret" } else { "ConfigMap" };
    let Some(data) = sources.data(secret, namespace, name)? else {
        if optional == Some(true) {
            return Ok(Vec::new());
        }
        return Err(format!("{kind} {namespace}/{name} not found"));
    };
    let Some(items) = items.filter(|i| !i.is_empty()) else {
        return Ok(data.into_iter().map(|(k, v)| (k, v, mode)).collect());
    };
    let mut files = Vec::new();
    for item in items {
        match data.get(&item.key) {
            Some(bytes) => files.push((
                item.path.clone(),
                bytes.clone(),
                item.mode.map_or(mode, |m| mode_of(Some(m))),
            )),
            None if optional == Some(true) => {}
            None => {
                return Err(format!(
                    "{kind} {namespace}/{name} has no key {:?}",
                    item.key
                ));
            }
        }
    }
    Ok(files)
}

/// Writes `dir/name` (a relative path without `..`).
fn write_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), String> {
    let rel = Path::new(name);
    if name.is_empty() || rel.is_absolute() || rel.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "file path {name:?} must be relative, without \"..\""
        ));
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("setting the mode of {}: {e}", path.display()))
}

/// Checks (or makes) a hostPath as its `type` says (Kubernetes' HostPathType).
fn check_host_path(path: &Path, kind: &str) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    match kind {
        "" => {
            // No check, as Kubernetes; a missing directory is made so the bind has a source.
            if !path.exists() {
                std::fs::create_dir_all(path).map_err(|e| format!("creating {shown}: {e}"))?;
            }
            Ok(())
        }
        "DirectoryOrCreate" => {
            std::fs::create_dir_all(path).map_err(|e| format!("creating {shown}: {e}"))
        }
        "FileOrCreate" => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("creating {}: {e}", parent.display()))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(drop)
                .map_err(|e| format!("creating {shown}: {e}"))
        }
        "Directory" | "File" | "Socket" | "CharDevice" | "BlockDevice" => {
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("hostPath type {kind}: {shown}: {e}"))?;
            let ft = meta.file_type();
            let ok = match kind {
                "Directory" => ft.is_dir(),
                "File" => ft.is_file(),
                "Socket" => ft.is_socket(),
                "CharDevice" => ft.is_char_device(),
                _ => ft.is_block_device(),
            };
            if ok {
                Ok(())
            } else {
                Err(format!("hostPath type {kind}: {shown} is not one"))
            }
        }
        other => Err(format!("unknown hostPath type {other:?}")),
    }
}

/// The bind mounts of `container`: each `volumeMounts` entry (with its `subPath`) over its
/// `mountPath`.
///
/// # Errors
/// A mount naming an unknown volume, or a bad `subPath`.
pub fn binds(container: &Container, volumes: &Volumes) -> Result<Vec<Bind>, String> {
    let mut binds = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let source = volumes.get(&mount.name).ok_or_else(|| {
            format!(
                "container {}: volumeMount {:?} names no volume of the pod",
                container.name, mount.name
            )
        })?;
        let source = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            None => source.clone(),
            Some(sub) => {
                let rel = Path::new(sub);
                if rel.is_absolute() || rel.components().any(|c| c == Component::ParentDir) {
                    return Err(format!(
                        "container {}: subPath {sub:?} must be relative, without \"..\"",
                        container.name
                    ));
                }
                let path = source.join(rel);
                if !path.exists() {
                    std::fs::create_dir_all(&path)
                        .map_err(|e| format!("creating {}: {e}", path.display()))?;
                }
                path
            }
        };
        let target = PathBuf::from(&mount.mount_path);
        if !target.is_absolute() {
            return Err(format!(
                "container {}: mountPath {:?} must be absolute",
                container.name, mount.mount_path
            ));
        }
        binds.push(Bind {
            source,
            target,
            read_only: mount.read_only == Some(true),
        });
    }
    Ok(binds)
}

/// The `hostPath` volumes of `pod` that live under the node's root (not shared with the
/// machine): their paths on the node and on the machine, for the CNI plugins the kubelet runs
/// (a path a pod writes into the CNI configuration must mean the same to the plugin).
pub fn node_private_paths(pod: &Pod, node_root: &Path) -> Vec<Bind> {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref())
        .filter_map(|h| {
            let source = host_path(node_root, &h.path).ok()?;
            (source.starts_with(node_root) && source.is_dir()).then(|| Bind {
                source,
                target: PathBuf::from(&h.path),
                read_only: false,
            })
        })
        .collect()
}

/// `/etc/resolv.conf` of a pod whose `dnsPolicy` is `ClusterFirst` (the default): the cluster
/// DNS, the namespace's search path and `ndots:5`, as the kubelet writes it.
pub fn resolv_conf(dns: std::net::Ipv4Addr, namespace: &str) -> String {
    format!(
        "nameserver {dns}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(PathBuf);

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fake() -> Fake {
        let dir =
            std::env::temp_dir().join(format!("weft-volume-{}", super::super::store::new_uid()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Fake(dir)
    }

    impl Sources for Fake {
        fn data(
            &self,
            secret: bool,
            _namespace: &str,
            name: &str,
        ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
            Ok((name == "present").then(|| {
                BTreeMap::from([
                    (
                        "a".to_owned(),
                        if secret {
                            b"s-a".to_vec()
                        } else {
                            b"c-a".to_vec()
                        },
                    ),
                    ("b".to_owned(), b"b".to_vec()),
                ])
            }))
        }
        fn token(&self, audience: Option<&str>, expiration: i64) -> Result<String, String> {
            Ok(format!("jwt:{}:{expiration}", audience.unwrap_or("api")))
        }
        fn field(&self, path: &str) -> Option<String> {
            (path == "metadata.namespace").then(|| "demo".to_owned())
        }
        fn node_root(&self) -> PathBuf {
            self.0.join("root")
        }
    }

    fn pod(volumes: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "demo"},
            "spec": {"containers": [{"name": "c"}], "volumes": volumes},
        }))
        .expect("pod")
    }

    #[test]
    fn host_paths_under_shared_prefixes_are_the_machines_the_rest_the_nodes() {
        let root = Path::new("/n/root");
        assert_eq!(host_path(root, "/proc").unwrap(), PathBuf::from("/proc"));
        assert_eq!(
            host_path(root, "/var/run/netns").unwrap(),
            PathBuf::from("/var/run/netns")
        );
        assert_eq!(
            host_path(root, "/var/run/ztunnel").unwrap(),
            PathBuf::from("/n/root/var/run/ztunnel")
        );
        assert_eq!(
            host_path(root, "/etc/cni/net.d").unwrap(),
            PathBuf::from("/n/root/etc/cni/net.d")
        );
        // A prefix match is by component, not by string.
        assert_eq!(
            host_path(root, "/proclaim").unwrap(),
            PathBuf::from("/n/root/proclaim")
        );
        assert!(
            host_path(root, "relative")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(host_path(root, "/var/../etc").is_err());
    }

    #[test]
    fn volumes_become_files_and_mounts() {
        let fake = fake();
        let pod_dir = fake.0.join("pod");
        let pod = pod(serde_json::json!([
            {"name": "cm", "configMap": {"name": "present", "items": [{"key": "a", "path": "sub/x"}]}},
            {"name": "sec", "secret": {"secretName": "present"}},
            {"name": "token", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "istio-ca", "expirationSeconds": 600, "path": "istio-token"}},
                {"configMap": {"name": "present", "items": [{"key": "b", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
            ]}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "sock", "hostPath": {"path": "/var/run/ztunnel", "type": "DirectoryOrCreate"}},
        ]));
        let volumes = prepare(&pod, &pod_dir, &fake).expect("prepare");
        let read = |v: &str, f: &str| std::fs::read_to_string(volumes[v].join(f)).expect(f);
        assert_eq!(read("cm", "sub/x"), "c-a");
        assert!(!volumes["cm"].join("b").exists(), "only the listed items");
        assert_eq!(read("sec", "a"), "s-a");
        assert_eq!(read("sec", "b"), "b");
        assert_eq!(read("token", "istio-token"), "jwt:istio-ca:600");
        assert_eq!(read("token", "ca.crt"), "b");
        assert_eq!(read("token", "namespace"), "demo");
        let mode = std::fs::metadata(volumes["token"].join("istio-token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(volumes["scratch"].is_dir());
        assert_eq!(volumes["sock"], fake.node_root().join("var/run/ztunnel"));
        assert!(volumes["sock"].is_dir(), "DirectoryOrCreate makes it");

        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "volumeMounts": [
                {"name": "token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                {"name": "cm", "mountPath": "/etc/x", "subPath": "sub"},
            ],
        }))
        .unwrap();
        let binds = binds(&container, &volumes).expect("binds");
        assert_eq!(binds[0].target, PathBuf::from("/var/run/secrets/tokens"));
        assert!(binds[0].read_only);
        assert_eq!(binds[1].source, volumes["cm"].join("sub"));
        let private = node_private_paths(&pod, &fake.node_root());
        assert_eq!(private.len(), 1);
        assert_eq!(private[0].target, PathBuf::from("/var/run/ztunnel"));
    }

    #[test]
    fn missing_data_and_bad_volumes_are_named() {
        let fake = fake();
        let pod_dir = fake.0.join("pod");
        let err = prepare(
            &pod(serde_json::json!([{"name": "cm", "configMap": {"name": "absent"}}])),
            &pod_dir,
            &fake,
        )
        .unwrap_err();
        assert_eq!(err, "volume \"cm\": ConfigMap demo/absent not found");
        let ok = prepare(
            &pod(
                serde_json::json!([{"name": "cm", "configMap": {"name": "absent", "optional": true}}]),
            ),
            &pod_dir,
            &fake,
        );
        assert!(ok.is_ok());
        let err = prepare(&pod(serde_json::json!([{"name": "k", "configMap": {"name": "present", "items": [{"key": "zz", "path": "z"}]}}])), &pod_dir, &fake).unwrap_err();
        assert!(err.contains("has no key \"zz\""), "{err}");
        let err = prepare(
            &pod(serde_json::json!([{"name": "n", "nfs": {"server": "x", "path": "/"}}])),
            &pod_dir,
            &fake,
        )
        .unwrap_err();
        assert!(
            err.starts_with("volume \"n\": unsupported volume type"),
            "{err}"
        );
        let err = prepare(&pod(serde_json::json!([{"name": "h", "hostPath": {"path": "/nonexistent-weft", "type": "Directory"}}])), &pod_dir, &fake).unwrap_err();
        assert!(err.contains("hostPath type Directory"), "{err}");
        let err = prepare(&pod(serde_json::json!([{"name": "e", "configMap": {"name": "present", "items": [{"key": "a", "path": "../escape"}]}}])), &pod_dir, &fake).unwrap_err();
        assert!(err.contains("without \"..\""), "{err}");
        let container: Container = serde_json::from_value(
            serde_json::json!({"name": "c", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}),
        )
        .unwrap();
        assert!(
            binds(&container, &Volumes::new())
                .unwrap_err()
                .contains("names no volume")
        );
    }

    #[test]
    fn resolv_conf_searches_the_namespace_first() {
        assert_eq!(
            resolv_conf([10, 96, 0, 10].into(), "demo"),
            "nameserver 10.96.0.10\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }
}
