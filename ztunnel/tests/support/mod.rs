//! Shared fixtures of ztunnel's namespace tests: a throw-away pod netns with the pod address
//! 10.99.0.2 on a veth whose peer stays inside, in-pod rules, and root detection.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub, missing_docs)]

use std::io::Write as _;
use std::process::Command;

use ztunnel::netns::InpodNetns;

/// Whether the effective uid is root; otherwise prints why `test` skips.
pub fn root_or_skip(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().nth(1))
        == Some("0");
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test} needs root (network namespaces) and CI is set: a skip in CI is a failure"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: needs root (network namespaces)"
        );
    }
    root
}

/// Runs a command line (split on whitespace); panics with its stderr on failure.
pub fn run(line: &str) {
    let cmd: Vec<&str> = line.split_whitespace().collect();
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pod netns (`<prefix>-<pid>`) with lo up, 10.99.0.2/24 on `v0` (peer `v1` inside too), a
/// route for the service range, and the given iptables rules; deleted on drop.
pub struct PodNetns {
    pub name: String,
    pub netns: InpodNetns,
}

impl PodNetns {
    pub fn new(prefix: &str, iptables_rules: &[&str]) -> PodNetns {
        let name = format!("{prefix}-{}", std::process::id());
        run(&format!("ip netns add {name}"));
        let guard = Guard(name.clone());
        for step in [
            "link set lo up",
            "link add v0 type veth peer name v1",
            "addr add 10.99.0.2/24 dev v0",
            "link set v1 up",
            "link set v0 up",
            "route add 10.96.0.0/16 dev v0",
        ] {
            run(&format!("ip -n {name} {step}"));
        }
        for rule in iptables_rules {
            run(&format!("ip netns exec {name} iptables {rule}"));
        }
        let netns = InpodNetns::open(format!("/run/netns/{name}")).unwrap();
        std::mem::forget(guard);
        PodNetns { name, netns }
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

struct Guard(String);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// The in-pod rule that keeps ztunnel's own (marked) sockets from being redirected.
pub const SKIP_ZTUNNEL: &str = "-t nat -A OUTPUT -p tcp -m mark --mark 0x539/0xfff -j ACCEPT";
/// App traffic to the test service VIP goes to the outbound listener.
pub const VIP_TO_OUTBOUND: &str =
    "-t nat -A OUTPUT -p tcp -d 10.96.0.10 -j REDIRECT --to-ports 15001";
