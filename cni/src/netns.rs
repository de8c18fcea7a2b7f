//! Finding a running pod's network namespace without a CNI record (istio-ambient reference
//! §4.3): pods enrolled after they started (a label added later) never pass through the
//! plugin, so the agent looks for a process of the pod in procfs. Every container of a pod
//! lives in a cgroup whose path contains the pod UID, written with `-` by the cgroupfs driver
//! (`/kubepods/besteffort/pod1a2b…-…/…`) and with `_` by the systemd driver
//! (`kubepods-besteffort-pod1a2b…_…slice`); the process's `ns/net` is the pod's netns.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Default procfs mount point.
pub const PROC_ROOT: &str = "/proc";

/// Why a pod's netns could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The proc root could not be listed.
    #[error("listing {path} to find pod {uid}")]
    ListProc {
        /// The proc root.
        path: PathBuf,
        /// The pod UID searched for.
        uid: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The UID is not one (too short to search for safely).
    #[error("pod uid {0:?} is not a UID")]
    BadUid(String),
    /// The process found shares the agent's own network namespace: the pod runs on the host
    /// network (or the cgroup match is wrong), and capturing it would capture the node.
    #[error(
        "pod {uid}: process {pid} is in the agent's own network namespace (host network); refusing"
    )]
    HostNetns {
        /// The pod UID.
        uid: String,
        /// The process found.
        pid: u32,
    },
}

/// The netns path (`<proc_root>/<pid>/ns/net`) of the lowest-numbered process whose
/// `<proc_root>/<pid>/cgroup` mentions pod `uid` (with `-` or `_` separators); `Ok(None)` when
/// no process matches (the pod's sandbox is gone or not started). The lowest pid is normally
/// the sandbox (pause) process, which lives as long as the pod. Processes that exit during the
/// scan are skipped.
///
/// # Errors
/// [`Error::ListProc`] when `proc_root` cannot be listed, [`Error::BadUid`] for a UID shorter
/// than 8 characters, [`Error::HostNetns`] when the process found is in the same network
/// namespace as `<proc_root>/self/ns/net`.
pub fn find(proc_root: &Path, uid: &str) -> Result<Option<PathBuf>, Error> {
    if uid.len() < 8 {
        return Err(Error::BadUid(uid.to_owned()));
    }
    let dashed = uid.replace('_', "-");
    let underscored = uid.replace('-', "_");
    let entries = std::fs::read_dir(proc_root).map_err(|source| Error::ListProc {
        path: proc_root.to_path_buf(),
        uid: uid.to_owned(),
        source,
    })?;
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        if !(cgroup.contains(&dashed) || cgroup.contains(&underscored)) {
            continue;
        }
        let netns = dir.join("ns").join("net");
        let Ok(found) = std::fs::metadata(&netns) else {
            continue; // exited, or a kernel thread
        };
        if let Ok(own) = std::fs::metadata(proc_root.join("self").join("ns").join("net"))
            && (own.dev(), own.ino()) == (found.dev(), found.ino())
        {
            return Err(Error::HostNetns {
                uid: uid.to_owned(),
                pid,
            });
        }
        return Ok(Some(netns));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test helpers fail loudly

    use super::*;

    const UID: &str = "1a2b3c4d-0000-4111-8222-123456789abc";

    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let dir = std::env::temp_dir().join(format!("weft-proc-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Tree(dir)
        }

        /// A fake process `pid` with the given cgroup file and an `ns/net` file.
        fn process(&self, pid: &str, cgroup: &str) -> PathBuf {
            let dir = self.0.join(pid);
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            std::fs::write(dir.join("cgroup"), cgroup).unwrap();
            std::fs::write(dir.join("ns").join("net"), pid).unwrap();
            dir.join("ns").join("net")
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn cgroupfs_driver_path_with_dashes() {
        let tree = Tree::new("dashes");
        tree.process("1", "0::/init.scope\n");
        tree.process(
            "300",
            &format!("0::/kubepods/besteffort/pod{UID}/0f0e0d0c0b0a\n"),
        );
        let pause = tree.process(
            "250",
            &format!("12:pids:/kubepods/besteffort/pod{UID}/aaaa\n11:cpu:/kubepods/besteffort/pod{UID}/aaaa\n"),
        );
        tree.process("251", "0::/kubepods/besteffort/podffffffff-0000/x\n");
        std::fs::create_dir_all(tree.0.join("sys")).unwrap(); // not a pid
        std::fs::write(tree.0.join("uptime"), "1 2").unwrap();
        assert_eq!(find(&tree.0, UID).unwrap(), Some(pause), "lowest pid wins");
    }

    #[test]
    fn systemd_driver_path_with_underscores() {
        let tree = Tree::new("underscores");
        let underscored = UID.replace('-', "_");
        let want = tree.process(
            "4242",
            &format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice/cri-containerd-abc.scope\n"
            ),
        );
        assert_eq!(find(&tree.0, UID).unwrap(), Some(want));
    }

    #[test]
    fn no_process_of_the_pod_is_none() {
        let tree = Tree::new("none");
        tree.process(
            "7",
            "0::/kubepods/besteffort/pod99999999-0000-4111-8222-123456789abc/c\n",
        );
        // A process without a readable netns (exited mid-scan) is skipped.
        std::fs::create_dir_all(tree.0.join("8")).unwrap();
        std::fs::write(
            tree.0.join("8").join("cgroup"),
            format!("0::/kubepods/pod{UID}/c\n"),
        )
        .unwrap();
        assert_eq!(find(&tree.0, UID).unwrap(), None);
    }

    #[test]
    fn the_agents_own_netns_is_refused() {
        let tree = Tree::new("own");
        let net = tree.process("55", &format!("0::/kubepods/pod{UID}/c\n"));
        std::fs::create_dir_all(tree.0.join("self").join("ns")).unwrap();
        std::fs::hard_link(&net, tree.0.join("self").join("ns").join("net")).unwrap();
        let err = find(&tree.0, UID).unwrap_err();
        assert!(matches!(err, Error::HostNetns { pid: 55, .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "pod {UID}: process 55 is in the agent's own network namespace (host network); refusing"
            )
        );
    }

    #[test]
    fn bad_input_is_named() {
        let err = find(Path::new("/nonexistent-proc"), UID).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("listing /nonexistent-proc to find pod {UID}")
        );
        assert!(matches!(
            find(Path::new("/proc"), ""),
            Err(Error::BadUid(_))
        ));
    }

    #[test]
    fn real_procfs_finds_nothing_for_an_unknown_uid() {
        // The real /proc: the scan runs over live processes without error.
        assert_eq!(find(Path::new(PROC_ROOT), UID).unwrap(), None);
    }
}
