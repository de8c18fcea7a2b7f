//! Service VIPs for uncaptured traffic, as kube-proxy's iptables mode does it: `nat` rules inside
//! each node netns DNAT `VIP:port` to a ready endpoint chosen at random (equal probability), with
//! hairpin traffic (a pod reaching itself through its service) masqueraded.
//!
//! Rule generation is pure ([`rules`]); [`apply`] loads it with `iptables-restore --noflush`
//! so chains of other owners are untouched and the update is one transaction.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;

use super::netns;

/// Chain jumped to from `PREROUTING` and `OUTPUT`.
pub const SERVICES_CHAIN: &str = "WEFT-SERVICES";
/// Chain jumped to from `POSTROUTING` (hairpin masquerade).
pub const POSTROUTING_CHAIN: &str = "WEFT-POSTROUTING";
/// Mark set on hairpin connections so they are masqueraded.
pub const MASQUERADE_MARK: &str = "0x4000/0x4000";

/// One service port and its ready endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port-name`, for comments and chain names.
    pub id: String,
    /// The service VIP.
    pub vip: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Ready endpoints (pod IP and resolved target port).
    pub endpoints: Vec<SocketAddrV4>,
}

/// FNV-1a 64: a stable name hash (not for security) for chain names and template hashes.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn chain_name(prefix: &str, key: &str) -> String {
    // Stable across runs, short enough for iptables' 28-character chain names.
    format!("{prefix}-{:012X}", fnv1a(key.as_bytes()) & 0xffff_ffff_ffff)
}

/// The `iptables-restore` input (table `nat`) for `services`, deleting any of our chains in
/// `existing_chains` that are no longer needed.
pub fn rules(services: &[ServicePort], existing_chains: &[String]) -> String {
    let mut chains = BTreeSet::new();
    let mut body = String::new();
    for svc in services {
        if svc.endpoints.is_empty() {
            continue;
        }
        let svc_chain = chain_name("WEFT-SVC", &svc.id);
        chains.insert(svc_chain.clone());
        let _ = writeln!(
            body,
            "-A {SERVICES_CHAIN} -d {}/32 -p {proto} -m {proto} --dport {} -m comment --comment \"{}\" -j {svc_chain}",
            svc.vip,
            svc.port,
            svc.id,
            proto = svc.protocol
        );
        let n = svc.endpoints.len();
        for (i, endpoint) in svc.endpoints.iter().enumerate() {
            let sep_chain = chain_name("WEFT-SEP", &format!("{}/{endpoint}", svc.id));
            chains.insert(sep_chain.clone());
            let remaining = n - i;
            if remaining > 1 {
                let _ = writeln!(
                    body,
                    "-A {svc_chain} -m statistic --mode random --probability {:.10} -j {sep_chain}",
                    1.0 / remaining as f64
                );
            } else {
                let _ = writeln!(body, "-A {svc_chain} -j {sep_chain}");
            }
            let _ = writeln!(
                body,
                "-A {sep_chain} -s {}/32 -j MARK --set-xmark {MASQUERADE_MARK}",
                endpoint.ip()
            );
            let _ = writeln!(
                body,
                "-A {sep_chain} -p {proto} -m {proto} -j DNAT --to-destination {endpoint}",
                proto = svc.protocol
            );
        }
    }
    let stale: Vec<&String> = existing_chains
        .iter()
        .filter(|c| {
            (c.starts_with("WEFT-SVC-") || c.starts_with("WEFT-SEP-")) && !chains.contains(*c)
        })
        .collect();
    let mut out = String::from("*nat\n");
    let _ = writeln!(out, ":{SERVICES_CHAIN} - [0:0]");
    for chain in chains.iter().chain(stale.iter().copied()) {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(&body);
    for chain in stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// Creates our chains and the jumps to them in a node netns (once, at node creation).
///
/// # Errors
/// [`netns::Error`] from `iptables-restore`.
pub fn install(node_netns: &str) -> Result<(), netns::Error> {
    let text = format!(
        "*nat\n:{SERVICES_CHAIN} - [0:0]\n:{POSTROUTING_CHAIN} - [0:0]\n\
         -A PREROUTING -m comment --comment \"weft service vips\" -j {SERVICES_CHAIN}\n\
         -A OUTPUT -m comment --comment \"weft service vips\" -j {SERVICES_CHAIN}\n\
         -A POSTROUTING -m comment --comment \"weft hairpin\" -j {POSTROUTING_CHAIN}\n\
         -A {POSTROUTING_CHAIN} -m mark --mark {MASQUERADE_MARK} -j MASQUERADE\n\
         COMMIT\n"
    );
    restore(node_netns, &text)
}

fn restore(node_netns: &str, text: &str) -> Result<(), netns::Error> {
    let mut cmd: Command = netns::command_in(node_netns, "iptables-restore");
    cmd.args(["--noflush", "-w", "5"]);
    netns::run(&mut cmd, Some(text.as_bytes())).map(drop)
}

/// Our chains currently in a node netns' `nat` table.
///
/// # Errors
/// [`netns::Error`] from `iptables-save`.
pub fn current_chains(node_netns: &str) -> Result<Vec<String>, netns::Error> {
    let mut cmd = netns::command_in(node_netns, "iptables-save");
    cmd.args(["-t", "nat"]);
    let saved = netns::run(&mut cmd, None)?;
    Ok(saved
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("WEFT-"))
        .map(str::to_owned)
        .collect())
}

/// Replaces the service rules of a node netns with those for `services`.
///
/// # Errors
/// [`netns::Error`] from `iptables-save`/`iptables-restore`.
pub fn apply(node_netns: &str, services: &[ServicePort]) -> Result<(), netns::Error> {
    let existing = current_chains(node_netns)?;
    restore(node_netns, &rules(services, &existing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_spread_evenly_and_drop_stale_chains() {
        let svc = ServicePort {
            id: "a/echo:http".into(),
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: "tcp".into(),
            endpoints: vec![
                "10.244.1.2:8080".parse().unwrap(),
                "10.244.2.2:8080".parse().unwrap(),
                "10.244.2.3:8080".parse().unwrap(),
            ],
        };
        let stale = chain_name("WEFT-SVC", "a/gone:http");
        let text = rules(
            std::slice::from_ref(&svc),
            &[stale.clone(), "WEFT-SERVICES".into()],
        );
        assert!(text.starts_with("*nat\n:WEFT-SERVICES - [0:0]\n"));
        assert!(text.contains("-d 10.96.0.10/32 -p tcp -m tcp --dport 80"));
        assert!(text.contains("--probability 0.3333333333"));
        assert!(text.contains("--probability 0.5000000000"));
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 3);
        assert!(text.contains("--to-destination 10.244.2.3:8080"));
        assert!(text.contains(&format!("-X {stale}")));
        assert!(!text.contains("-X WEFT-SERVICES"));
        assert!(text.ends_with("COMMIT\n"));
        assert!(chain_name("WEFT-SEP", "x").len() <= 28);

        // No endpoints: no rule for the VIP.
        let empty = ServicePort {
            endpoints: vec![],
            ..svc
        };
        assert!(!rules(&[empty], &[]).contains("10.96.0.10"));
    }
}
