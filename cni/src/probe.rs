//! Host-side SNAT for kubelet health probes (istio-ambient reference §4.4, "host-side rules"):
//! in the node's network namespace, TCP packets that come from a local socket and go to an
//! enrolled pod IP get source `169.254.7.127` (IPv6 `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`).
//! The in-pod rules ([`crate::redirect`]) let that source past ztunnel, so the kubelet probes
//! the application itself rather than ztunnel's inbound listener.
//!
//! One nftables table, `inet weft-ambient-host`, holds two named sets of enrolled pod IPs
//! (`probe-pods-v4`, `probe-pods-v6`) and one `nat` base chain on `postrouting`:
//!
//! * "From a local socket" is `meta skuid >= 0`: the expression only matches when the packet
//!   carries a full socket of this namespace with an owner, which is true for locally generated
//!   packets (the kubelet's connect) and false for forwarded ones (kube-proxy/load-balancer
//!   traffic from other nodes, other pods), so forwarded traffic is still captured in the pod.
//!   This is the nftables counterpart of iptables' `-m owner --socket-exists`. SNAT is not
//!   allowed on the `output` hook, and `fib saddr type local` would also match forwarded
//!   packets that happen to carry a node address, so neither was chosen.
//! * The chain runs at `srcnat - 10`, ahead of kube-proxy's and the primary CNI's masquerade
//!   rules at `srcnat`: whichever nat chain binds a connection's source first wins.
//!
//! The table is (re)created whole, with every enrolled IP, in one `nft -f` transaction at start
//! ([`Snat::sync`]); captures and releases then add or remove elements, one transaction per
//! change ([`Snat::update`]), idempotently (a removal first adds the element, so removing an IP
//! that is not there is not an error). Rule generation is pure ([`ruleset`], [`update`]).

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::redirect::{self, PROBE_SOURCE_V4, PROBE_SOURCE_V6};

/// The nftables table in the node's network namespace.
pub const TABLE: &str = "weft-ambient-host";
/// Set of enrolled IPv4 pod addresses.
pub const SET_V4: &str = "probe-pods-v4";
/// Set of enrolled IPv6 pod addresses.
pub const SET_V6: &str = "probe-pods-v6";

fn elements(ips: &BTreeSet<IpAddr>, v6: bool) -> String {
    ips.iter()
        .filter(|ip| ip.is_ipv6() == v6)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `nft -f` input that (re)creates the table holding exactly `ips`, in one transaction.
pub fn ruleset(ips: &BTreeSet<IpAddr>) -> String {
    let mut out = String::new();
    // Creating then deleting makes the transaction valid whether or not the table exists.
    let _ = writeln!(
        out,
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );
    for (set, kind, v6) in [(SET_V4, "ipv4_addr", false), (SET_V6, "ipv6_addr", true)] {
        let _ = writeln!(out, "  set {set} {{\n    type {kind};");
        let members = elements(ips, v6);
        if !members.is_empty() {
            let _ = writeln!(out, "    elements = {{ {members} }};");
        }
        let _ = writeln!(out, "  }}");
    }
    let _ = writeln!(out, "  chain postrouting_nat {{");
    let _ = writeln!(
        out,
        "    type nat hook postrouting priority srcnat - 10; policy accept;"
    );
    let _ = writeln!(
        out,
        "    meta l4proto tcp ip daddr @{SET_V4} meta skuid >= 0 snat ip to {PROBE_SOURCE_V4}"
    );
    let _ = writeln!(
        out,
        "    meta l4proto tcp ip6 daddr @{SET_V6} meta skuid >= 0 snat ip6 to {PROBE_SOURCE_V6}"
    );
    let _ = writeln!(out, "  }}\n}}");
    out
}

/// The `nft -f` input that adds `add` to and removes `remove` from the sets, in one
/// transaction; empty when there is nothing to do. Removing an absent IP is not an error (the
/// element is added first, then deleted).
pub fn update(add: &[IpAddr], remove: &[IpAddr]) -> String {
    let mut out = String::new();
    let set = |ip: &IpAddr| if ip.is_ipv6() { SET_V6 } else { SET_V4 };
    for ip in add {
        let _ = writeln!(out, "add element inet {TABLE} {} {{ {ip} }}", set(ip));
    }
    for ip in remove {
        let _ = writeln!(out, "add element inet {TABLE} {} {{ {ip} }}", set(ip));
        let _ = writeln!(out, "delete element inet {TABLE} {} {{ {ip} }}", set(ip));
    }
    out
}

/// Applies the probe SNAT table in one network namespace: the agent's own (the node's) by
/// default, or the one at `netns` (tests).
#[derive(Debug, Clone, Default)]
pub struct Snat {
    netns: Option<PathBuf>,
}

impl Snat {
    /// Rules in the agent's own network namespace (which must be the node's).
    pub fn new() -> Snat {
        Snat { netns: None }
    }

    /// Rules in the network namespace at `path` (e.g. `/run/netns/NAME`).
    pub fn in_netns(path: impl Into<PathBuf>) -> Snat {
        Snat {
            netns: Some(path.into()),
        }
    }

    fn nft(&self, input: &str) -> Result<(), redirect::Error> {
        let args = ["-f".to_owned(), "-".to_owned()];
        if let Some(path) = &self.netns {
            return redirect::run_in(path, "nft", &args, Some(input)).map(drop);
        }
        let failed = |stderr: String| redirect::Error::Command {
            command: "nft -f -".into(),
            path: "(node)".into(),
            stderr,
        };
        let mut child = Command::new("nft")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot run nft: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| failed(format!("writing to nft: {e}")))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| failed(format!("waiting for nft: {e}")))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(failed(
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ))
        }
    }

    /// (Re)creates the table holding exactly `ips` (one transaction).
    ///
    /// # Errors
    /// [`redirect::Error`] with nft's message when the kernel refuses the table.
    pub fn sync(&self, ips: &BTreeSet<IpAddr>) -> Result<(), redirect::Error> {
        self.nft(&ruleset(ips))
    }

    /// Adds and removes pod IPs (one transaction; nothing to do is not a call).
    ///
    /// # Errors
    /// [`redirect::Error`] with nft's message, e.g. when the table is missing.
    pub fn update(&self, add: &[IpAddr], remove: &[IpAddr]) -> Result<(), redirect::Error> {
        let input = update(add, remove);
        if input.is_empty() {
            return Ok(());
        }
        self.nft(&input)
    }
}

#[cfg(test)]
mod tests;
