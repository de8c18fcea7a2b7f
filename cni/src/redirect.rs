//! The in-pod redirection rules (istio-ztunnel reference §5.2), as one nftables table per pod.
//!
//! Inside an enrolled pod's network namespace: outbound TCP (not to loopback, not from ztunnel)
//! is redirected to 15001; inbound TCP except to 15008 (and not from ztunnel) to 15006; kubelet
//! probes from 169.254.7.127 bypass ztunnel; packets ztunnel marks `0x539` are never redirected
//! and mark their connections `0x111`, whose replies are steered back to ztunnel's transparent
//! sockets through `ip rule fwmark 0x111/0xfff lookup 100` + `local default dev lo table 100`;
//! DNS (optional) goes to 15053 with ztunnel's upstream DNS in conntrack zone 1.
//!
//! Why nftables rather than iptables-restore: the whole rule set is one table
//! (`inet weft-ambient`) replaced in one `nft -f` transaction (create, delete, re-create: atomic
//! and idempotent by construction, nothing duplicated on re-apply), removed with one
//! `delete table`, never touches chains other software owns, and covers IPv4 and IPv6 with one
//! `inet` table. Generation is pure ([`ruleset`]); [`apply`]/[`remove`] run `nft` and `ip`
//! inside the pod's namespace.

use std::fmt::Write;
use std::fs::File;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

/// The nftables table holding a pod's rules.
pub const TABLE: &str = "weft-ambient";
/// ztunnel's socket mark (`SO_MARK`), compared under [`MARK_MASK`].
pub const ZTUNNEL_MARK: u32 = 0x539;
/// Connection/packet mark of connections ztunnel made with a spoofed source.
pub const CONN_MARK: u32 = 0x111;
/// Mask for both marks.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table that delivers marked replies locally.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the `ip rule` for [`ROUTE_TABLE`].
pub const RULE_PRIORITY: u32 = 32764;
/// Source address kubelet probes are SNATed to on the node.
pub const PROBE_SOURCE_V4: &str = "169.254.7.127";
/// IPv6 probe source.
pub const PROBE_SOURCE_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
/// ztunnel's ports.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture.
pub const INBOUND_PORT: u16 = 15006;
/// HBONE (never redirected).
pub const HBONE_PORT: u16 = 15008;
/// DNS proxy.
pub const DNS_PORT: u16 = 15053;

/// What to capture in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodConfig {
    /// Redirect DNS (udp/tcp 53) to ztunnel's DNS proxy.
    pub dns_capture: bool,
    /// The pod has IPv6 addresses: add the IPv6 variants.
    pub ipv6: bool,
    /// Ingress-style pod (`ambient.istio.io/bypass-inbound-capture`): outbound rules only.
    pub bypass_inbound: bool,
}

impl Default for PodConfig {
    fn default() -> Self {
        PodConfig {
            dns_capture: true,
            ipv6: false,
            bypass_inbound: false,
        }
    }
}

/// The `nft -f` input that (re)creates the pod's table in one transaction.
pub fn ruleset(config: &PodConfig) -> String {
    let ztunnel = format!("meta mark & {MARK_MASK:#x} == {ZTUNNEL_MARK:#x}");
    let not_ztunnel = format!("meta mark & {MARK_MASK:#x} != {ZTUNNEL_MARK:#x}");
    let families: Vec<(&str, &str, &str)> = if config.ipv6 {
        vec![
            ("ip", "127.0.0.1", PROBE_SOURCE_V4),
            ("ip6", "::1", PROBE_SOURCE_V6),
        ]
    } else {
        vec![("ip", "127.0.0.1", PROBE_SOURCE_V4)]
    };
    let mut out = String::new();
    // Creating then deleting makes the transaction valid whether or not the table exists.
    let _ = writeln!(
        out,
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );

    // Connections ztunnel originates with a spoofed source get connmark 0x111.
    let _ = writeln!(out, "  chain prerouting_mangle {{");
    let _ = writeln!(
        out,
        "    type filter hook prerouting priority mangle; policy accept;"
    );
    if !config.bypass_inbound {
        let _ = writeln!(
            out,
            "    {ztunnel} ct mark set ct mark & {:#x} | {CONN_MARK:#x}",
            !MARK_MASK
        );
    }
    let _ = writeln!(out, "  }}");

    // Replies on those connections carry the mark again (restored from the connmark), so the
    // fwmark rule routes them back to ztunnel.
    let _ = writeln!(out, "  chain output_mangle {{");
    let _ = writeln!(
        out,
        "    type route hook output priority mangle; policy accept;"
    );
    if !config.bypass_inbound {
        let _ = writeln!(
            out,
            "    ct mark & {MARK_MASK:#x} == {CONN_MARK:#x} meta mark set ct mark"
        );
    }
    let _ = writeln!(out, "  }}");

    let _ = writeln!(out, "  chain prerouting_nat {{");
    let _ = writeln!(
        out,
        "    type nat hook prerouting priority dstnat; policy accept;"
    );
    if !config.bypass_inbound {
        for (family, loopback, probe) in &families {
            let _ = writeln!(out, "    {family} saddr {probe} meta l4proto tcp accept");
            let _ = writeln!(
                out,
                "    {family} daddr != {loopback} tcp dport != {HBONE_PORT} {not_ztunnel} redirect to :{INBOUND_PORT}"
            );
        }
    }
    let _ = writeln!(out, "  }}");

    let _ = writeln!(out, "  chain output_nat {{");
    let _ = writeln!(
        out,
        "    type nat hook output priority -100; policy accept;"
    );
    for (family, loopback, probe) in &families {
        if !config.bypass_inbound {
            let _ = writeln!(out, "    {family} daddr {probe} meta l4proto tcp accept");
        }
        if config.dns_capture {
            let _ = writeln!(
                out,
                "    oifname != \"lo\" meta nfproto {ipv} udp dport 53 {not_ztunnel} redirect to :{DNS_PORT}",
                ipv = if *family == "ip" { "ipv4" } else { "ipv6" }
            );
            let _ = writeln!(
                out,
                "    {family} daddr != {loopback} tcp dport 53 {not_ztunnel} redirect to :{DNS_PORT}"
            );
        }
    }
    let _ = writeln!(
        out,
        "    meta l4proto tcp meta mark & {MARK_MASK:#x} == {CONN_MARK:#x} accept"
    );
    for (family, loopback, _) in &families {
        let _ = writeln!(
            out,
            "    oifname \"lo\" {family} daddr != {loopback} accept"
        );
    }
    for (family, loopback, _) in &families {
        let _ = writeln!(
            out,
            "    {family} daddr != {loopback} meta l4proto tcp {not_ztunnel} redirect to :{OUTBOUND_PORT}"
        );
    }
    let _ = writeln!(out, "  }}");

    if config.dns_capture {
        // ztunnel's upstream DNS and its replies get their own conntrack zone so they do not
        // clash with the app's redirected DNS flows.
        let _ = writeln!(out, "  chain prerouting_raw {{");
        let _ = writeln!(
            out,
            "    type filter hook prerouting priority raw; policy accept;"
        );
        let _ = writeln!(out, "    udp sport 53 {not_ztunnel} ct zone set 1");
        let _ = writeln!(out, "  }}");
        let _ = writeln!(out, "  chain output_raw {{");
        let _ = writeln!(
            out,
            "    type filter hook output priority raw; policy accept;"
        );
        let _ = writeln!(out, "    udp dport 53 {ztunnel} ct zone set 1");
        let _ = writeln!(out, "  }}");
    }
    let _ = writeln!(out, "}}");
    out
}

/// The `ip` commands (arguments after `ip`) that route marked replies back to ztunnel, for each
/// address family the pod uses.
pub fn routes(config: &PodConfig) -> Vec<Vec<String>> {
    let mut families = vec![("-4", "0.0.0.0/0")];
    if config.ipv6 {
        families.push(("-6", "::/0"));
    }
    let mut commands = Vec::new();
    for (flag, default) in families {
        let mark = format!("{CONN_MARK:#x}/{MARK_MASK:#x}");
        commands.push(
            [
                flag,
                "rule",
                "add",
                "fwmark",
                &mark,
                "pref",
                &RULE_PRIORITY.to_string(),
                "lookup",
                &ROUTE_TABLE.to_string(),
            ]
            .map(str::to_owned)
            .to_vec(),
        );
        commands.push(
            [
                flag,
                "route",
                "add",
                "local",
                default,
                "dev",
                "lo",
                "table",
                &ROUTE_TABLE.to_string(),
            ]
            .map(str::to_owned)
            .to_vec(),
        );
    }
    commands
}

/// Errors installing or removing rules.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netns could not be entered.
    #[error("entering pod netns {path}")]
    Enter {
        /// The netns path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A command failed.
    #[error("{command} in pod netns {path} failed: {stderr}")]
    Command {
        /// The command.
        command: String,
        /// The netns path.
        path: String,
        /// What it printed.
        stderr: String,
    },
}

/// Runs `program args` with `input` on stdin inside the netns at `path`: a thread enters the
/// namespace and spawns the child from there (children inherit their parent thread's netns).
pub(crate) fn run_in(
    path: &Path,
    program: &str,
    args: &[String],
    input: Option<&str>,
) -> Result<String, Error> {
    let display = path.display().to_string();
    let enter = |source| Error::Enter {
        path: display.clone(),
        source,
    };
    let file = File::open(path).map_err(enter)?;
    let program = program.to_owned();
    let args = args.to_vec();
    let input = input.map(str::to_owned);
    let command_line = format!("{program} {}", args.join(" "));
    let output = std::thread::spawn(move || -> io::Result<std::process::Output> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            use std::io::Write as _;
            stdin.write_all(text.as_bytes())?;
        }
        child.wait_with_output()
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))
    .and_then(|r| r)
    .map_err(enter)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: command_line,
            path: display,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Installs (or re-installs, idempotently) the rules and routes in the pod netns at `netns`.
///
/// # Errors
/// [`Error`] naming the failing command; the nft transaction is all-or-nothing.
pub fn apply(netns: &Path, config: &PodConfig) -> Result<(), Error> {
    run_in(
        netns,
        "nft",
        &["-f".into(), "-".into()],
        Some(&ruleset(config)),
    )?;
    for args in routes(config) {
        // `ip rule add` and `ip route add` fail with "File exists" when already present.
        match run_in(netns, "ip", &args, None) {
            Ok(_) => {}
            Err(Error::Command { stderr, .. }) if stderr.contains("File exists") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes the rules and routes (missing pieces are fine).
///
/// # Errors
/// [`Error`] when the netns cannot be entered.
pub fn remove(netns: &Path, config: &PodConfig) -> Result<(), Error> {
    let _ = run_in(
        netns,
        "nft",
        &["delete".into(), "table".into(), "inet".into(), TABLE.into()],
        None,
    );
    for mut args in routes(config) {
        if let Some(verb) = args.get_mut(2) {
            *verb = "del".into();
        }
        match run_in(netns, "ip", &args, None) {
            Ok(_) | Err(Error::Command { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
