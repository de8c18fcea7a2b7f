//! Names, addresses and paths of one local cluster: pure functions of its name and node count.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Default parent of cluster state directories.
pub const DEFAULT_STATE_ROOT: &str = "/var/run/weft/clusters";

/// Where Debian's `containernetworking-plugins` installs the CNI plugins.
pub const DEFAULT_CNI_BIN_DIR: &str = "/usr/lib/cni";

/// Most nodes a cluster may have (pod CIDRs are `10.244.<node>.0/24`).
pub const MAX_NODES: u8 = 16;

/// Node network: every node and the control plane have an address in `10.240.0.0/24`.
pub const NODE_NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 240, 0, 0), 24);
/// Pod network: `10.244.<node>.0/24` per node.
pub const POD_NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);
/// Service VIPs.
pub const SERVICE_NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);

/// The fixed layout of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    name: String,
    state_dir: PathBuf,
}

/// A cluster name that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid cluster name {0:?}: use 1-20 characters of lowercase letters, digits and '-', starting with a letter"
)]
pub struct InvalidName(pub String);

impl Layout {
    /// The layout of cluster `name` with state under `state_dir` (default
    /// `/var/run/weft/clusters/<name>`).
    ///
    /// # Errors
    /// [`InvalidName`] unless the name is 1–20 of `[a-z0-9-]`, starting with a letter (it is part
    /// of network namespace names).
    pub fn new(name: &str, state_dir: Option<&Path>) -> Result<Self, InvalidName> {
        let valid = !name.is_empty()
            && name.len() <= 20
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return Err(InvalidName(name.to_owned()));
        }
        let state_dir = state_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| Path::new(DEFAULT_STATE_ROOT).join(name));
        Ok(Layout {
            name: name.to_owned(),
            state_dir,
        })
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Root of everything the cluster writes to disk.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The object store (one YAML file per object).
    pub fn store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }

    /// Per-node files: CNI config, IPAM state, run dir.
    pub fn node_dir(&self, node: u8) -> PathBuf {
        self.state_dir.join("nodes").join(node_name(node))
    }

    /// Node `node`'s own root directory on a Kubernetes cluster: where its `hostPath` volumes
    /// that are not the machine's live (see [`super::volume::host_path`]), its CNI
    /// configuration (`etc/cni/net.d`) and plugins (`opt/cni/bin`) among them.
    pub fn node_root(&self, node: u8) -> PathBuf {
        self.node_dir(node).join("root")
    }

    /// Per-pod files: container logs.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.state_dir.join("pods").join(uid)
    }

    /// Prefix shared by every network namespace of this cluster.
    pub fn netns_prefix(&self) -> String {
        format!("weft-{}-", self.name)
    }

    /// The cluster network namespace holding the bridge all nodes attach to.
    pub fn network_netns(&self) -> String {
        format!("{}net", self.netns_prefix())
    }

    /// The control-plane network namespace.
    pub fn control_plane_netns(&self) -> String {
        format!("{}cp", self.netns_prefix())
    }

    /// Node `node`'s network namespace (nodes count from 1).
    pub fn node_netns(&self, node: u8) -> String {
        format!("{}node{node}", self.netns_prefix())
    }

    /// A pod's network namespace, from its UID.
    pub fn pod_netns(&self, uid: &str) -> String {
        let short: String = uid.chars().filter(|c| *c != '-').take(12).collect();
        format!("{}p{short}", self.netns_prefix())
    }

    /// File holding the runner daemon's PID.
    pub fn runner_pid_file(&self) -> PathBuf {
        self.state_dir.join("runner.pid")
    }

    /// The runner daemon's log.
    pub fn runner_log(&self) -> PathBuf {
        self.state_dir.join("runner.log")
    }

    /// The controller's state directory (CA root, node bootstrap tokens, pod token
    /// registrations under `tokens/pods`).
    pub fn controller_state_dir(&self) -> PathBuf {
        self.state_dir.join("controller")
    }

    /// The cluster description written by `up`.
    pub fn cluster_file(&self) -> PathBuf {
        self.state_dir.join("cluster.json")
    }
}

/// Kubernetes node name of node `node` (`node-1`, `node-2`, …).
pub fn node_name(node: u8) -> String {
    format!("node-{node}")
}

/// Parses a node name back into its number.
pub fn node_number(name: &str) -> Option<u8> {
    name.strip_prefix("node-")?.parse().ok()
}

/// The control plane's address.
pub fn control_plane_ip() -> Ipv4Addr {
    Ipv4Addr::new(10, 240, 0, 2)
}

/// Node `node`'s address on the node network.
pub fn node_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 240, 0, 10 + node)
}

/// Node `node`'s pod CIDR base (`10.244.<node>.0`, prefix 24).
pub fn pod_cidr(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, 0)
}

/// Node `node`'s pod gateway (the CNI bridge address).
pub fn pod_gateway(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, 1)
}

/// Whether `ip` lies in `net/prefix`.
pub fn contains(net: (Ipv4Addr, u8), ip: Ipv4Addr) -> bool {
    let mask = if net.1 == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(net.1))
    };
    u32::from(net.0) & mask == u32::from(ip) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let layout = Layout::new("demo", None).unwrap();
        assert_eq!(layout.node_netns(2), "weft-demo-node2");
        assert_eq!(layout.state_dir(), Path::new("/var/run/weft/clusters/demo"));
        assert_eq!(
            layout.pod_netns("1234abcd-0000-1111-2222-333344445555"),
            "weft-demo-p1234abcd0000"
        );
        assert_eq!(node_ip(1), Ipv4Addr::new(10, 240, 0, 11));
        assert_eq!(pod_gateway(2), Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(node_number(&node_name(3)), Some(3));
        assert!(contains(SERVICE_NETWORK, Ipv4Addr::new(10, 96, 3, 4)));
        assert!(!contains(SERVICE_NETWORK, Ipv4Addr::new(10, 97, 0, 1)));
        for bad in ["", "Demo", "1abc", "a_b", "abcdefghijklmnopqrstu"] {
            assert!(Layout::new(bad, None).is_err(), "{bad:?}");
        }
    }
}
