//! The sealed cluster network: a cluster netns holding bridge `br0`, a control-plane netns and one
//! netns per node, each joined to the bridge by a veth pair created *inside* the cluster netns (so
//! nothing ever appears in the host namespace). Nodes route each other's pod CIDRs; nothing has
//! a default route, so a packet to any address outside the cluster ranges is dropped.

use super::layout::{self, Layout};
use super::{netns, proxy};

/// Errors building or tearing down the network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command failed.
    #[error("building cluster network")]
    Command(#[from] netns::Error),
}

/// Creates the cluster, control-plane and node namespaces for `nodes` nodes.
///
/// # Errors
/// [`Error`] from the first failing command (the caller tears down).
pub fn create(layout: &Layout, nodes: u8) -> Result<(), Error> {
    let net = layout.network_netns();
    netns::add(&net)?;
    netns::ip_in(&net, &["link", "add", "br0", "type", "bridge"])?;
    netns::ip_in(&net, &["link", "set", "br0", "up"])?;

    let pod_routes = |netns_name: &str, except: Option<u8>| -> Result<(), netns::Error> {
        for other in 1..=nodes {
            if Some(other) == except {
                continue;
            }
            let cidr = format!("{}/24", layout::pod_cidr(other));
            let via = layout::node_ip(other).to_string();
            netns::ip_in(netns_name, &["route", "add", &cidr, "via", &via])?;
        }
        Ok(())
    };

    let cp = layout.control_plane_netns();
    attach(
        &net,
        &cp,
        "cp",
        &format!("{}/24", layout::control_plane_ip()),
    )?;
    pod_routes(&cp, None)?;

    for node in 1..=nodes {
        let name = layout.node_netns(node);
        attach(
            &net,
            &name,
            &format!("n{node}"),
            &format!("{}/24", layout::node_ip(node)),
        )?;
        pod_routes(&name, Some(node))?;
        // The Service range, so the node's own processes (hostNetwork pods) can connect to a
        // Service VIP: kube-proxy's OUTPUT rules then rewrite it to an endpoint. Without an
        // endpoint's rewrite such a packet goes to the cluster network and is dropped there.
        let services = format!(
            "{}/{}",
            layout::SERVICE_NETWORK.0,
            layout::SERVICE_NETWORK.1
        );
        netns::ip_in(&name, &["route", "add", &services, "dev", "eth0"])?;
        sysctl(&name, "net.ipv4.ip_forward=1")?;
        proxy::install(&name)?;
    }
    Ok(())
}

/// Creates netns `name` and joins it to `br0` of `net` with a veth pair (`bridge_end` on the
/// bridge, `eth0` inside) carrying `address`.
fn attach(net: &str, name: &str, bridge_end: &str, address: &str) -> Result<(), netns::Error> {
    netns::add(name)?;
    netns::ip_in(
        net,
        &[
            "link", "add", bridge_end, "type", "veth", "peer", "name", "eth0", "netns", name,
        ],
    )?;
    netns::ip_in(net, &["link", "set", bridge_end, "master", "br0", "up"])?;
    netns::ip_in(name, &["addr", "add", address, "dev", "eth0"])?;
    netns::ip_in(name, &["link", "set", "eth0", "up"])?;
    Ok(())
}

fn sysctl(netns_name: &str, setting: &str) -> Result<(), netns::Error> {
    let mut cmd = netns::command_in(netns_name, "sysctl");
    cmd.args(["-qw", setting]);
    netns::run(&mut cmd, None).map(drop)
}

/// Every namespace of this cluster that currently exists, pods first, the cluster netns last
/// (the order to delete them in).
pub fn namespaces(layout: &Layout) -> Vec<String> {
    let prefix = layout.netns_prefix();
    let mut names: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    let rank = |n: &String| {
        if *n == layout.network_netns() {
            3
        } else if *n == layout.control_plane_netns() || n[prefix.len()..].starts_with("node") {
            2
        } else {
            1
        }
    };
    names.sort_by_key(|n| (rank(n), n.clone()));
    names
}

/// Kills every process inside the cluster's namespaces and deletes the namespaces (and with
/// them every veth, bridge, route and iptables rule they hold).
///
/// # Errors
/// [`Error`] from the first namespace that cannot be deleted (the rest are still attempted).
pub fn destroy(layout: &Layout) -> Result<(), Error> {
    let names = namespaces(layout);
    for name in &names {
        kill_all(&netns::pids(name));
    }
    let mut first_error = None;
    for name in &names {
        if let Err(err) = netns::delete(name) {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), |e| Err(e.into()))
}

/// SIGKILLs `pids` and waits (up to 5 s) until they are gone.
pub fn kill_all(pids: &[i32]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline && pids.iter().any(|p| process_alive(*p)) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `pid` is a running (not zombie) process.
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
