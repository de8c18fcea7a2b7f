//! Helpers shared by the local-cluster suites (`cluster.rs`, `waypoint.rs`).
#![allow(dead_code, unreachable_pub)] // each suite uses a subset

use std::time::{Duration, Instant};

use serde_json::Value;
use weft::cluster::{self, Cluster, Object, Options};

/// The `weft` binary under test.
pub const WEFT: &str = env!("CARGO_BIN_EXE_weft");
/// How long pods get to become ready.
pub const READY: Duration = Duration::from_secs(30);

/// `true` as root; otherwise prints why `test` skips.
pub fn root_or_skip(test: &str) -> bool {
    if cluster::is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root (the local cluster) and CI is set: a skip in CI is a failure"
    );
    eprintln!(
        "SKIPPED {test}: the local cluster needs root (network namespaces); CI runs it as root"
    );
    false
}

/// A cluster torn down when the test ends, even on panic.
pub struct TestCluster(pub Cluster);

impl TestCluster {
    /// Brings up cluster `name` with `nodes` nodes (removing a leftover of that name first):
    /// the real Kubernetes control plane with Weft installed by its Helm charts.
    pub fn up(name: &str, nodes: u8) -> Self {
        Self::up_with(name, nodes, true)
    }

    /// As [`TestCluster::up`] but the mesh runs as processes beside the YAML-file store (the
    /// suites still moving to [`TestCluster::up`]).
    pub fn up_processes(name: &str, nodes: u8) -> Self {
        Self::up_with(name, nodes, false)
    }

    fn up_with(name: &str, nodes: u8, kubernetes: bool) -> Self {
        let _ = Cluster::down(name, None);
        let mut options = Options::new(name);
        options.nodes = nodes;
        options.weft_exe = Some(WEFT.into());
        options.kubernetes = kubernetes;
        TestCluster(Cluster::up(&options).expect("cluster up"))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = Cluster::down(self.0.layout().name(), None);
    }
}

impl std::ops::Deref for TestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET path` on `addr` from inside a cluster namespace; returns the whole response text.
pub fn http_get_in(netns: &str, addr: std::net::SocketAddr, path: &str) -> String {
    let path = path.to_owned();
    weft::cluster::netns::within(netns, move || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let _ = conn.read_to_string(&mut text);
        text
    })
    .unwrap()
}

/// The pod's IP from its status.
pub fn ip_of(pod: &Object) -> String {
    pod.0["status"]["podIP"]
        .as_str()
        .expect("pod ip")
        .to_owned()
}

/// The cluster IP of Service `ns/name`.
pub fn cluster_ip(cluster: &Cluster, ns: &str, name: &str) -> String {
    cluster
        .service_ip(ns, name)
        .unwrap_or_else(|e| panic!("service {ns}/{name}: {e}"))
}

/// Runs `weft-echo` with `args` in pod `ns/pod` and returns its JSON lines (whatever the exit
/// status: failed requests are lines too).
pub fn echo_json(cluster: &Cluster, ns: &str, pod: &str, args: &[&str]) -> Vec<Value> {
    let mut argv = vec!["weft-echo"];
    argv.extend_from_slice(args);
    let out = cluster.exec(ns, pod, &argv).expect("exec weft-echo");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Sum of the samples of metric `name` in a Prometheus text exposition whose labels include
/// every `key="value"` in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
