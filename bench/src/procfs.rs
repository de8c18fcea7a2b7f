//! What the benchmarks read about other processes from `/proc`: CPU-seconds, resident memory and
//! its peak, and which process runs in a given network namespace.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use anyhow::{Context as _, Result, bail};

/// User + system CPU time of `pid`, in seconds (`utime` + `stime` of `/proc/<pid>/stat`, proc(5)).
///
/// # Errors
/// The process is gone or the file has an unexpected shape.
pub(crate) fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command start at field 3 (state); utime is field 14 and
    // stime 15, so indices 11 and 12 of the rest.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("/proc/PID/stat fields")?
            .parse::<f64>()?)
    };
    // procfs reports clock ticks in USER_HZ, which the kernel fixes at 100 for userspace.
    const USER_HZ: f64 = 100.0;
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// The sum of [`cpu_seconds`] over `pids`.
///
/// # Errors
/// As [`cpu_seconds`].
pub(crate) fn cpu_seconds_all(pids: &[i32]) -> Result<f64> {
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
fn status_bytes(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

/// Resident memory (`VmRSS`) of `pid`, bytes.
///
/// # Errors
/// The process is gone.
pub(crate) fn rss_bytes(pid: i32) -> Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// Peak resident memory (`VmHWM`) of `pid` since it started or since [`reset_peak`], bytes.
///
/// # Errors
/// The process is gone.
pub(crate) fn peak_rss_bytes(pid: i32) -> Result<u64> {
    status_bytes(pid, "VmHWM")
}

/// Resets `pid`'s peak RSS to its current RSS (writes `5` to `/proc/<pid>/clear_refs`, proc(5);
/// needs root or the same user).
///
/// # Errors
/// The process is gone or the write is not permitted.
pub(crate) fn reset_peak(pid: i32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of pid {pid}"))
}

/// The pid of the process whose command (`/proc/<pid>/comm`) is `name` and which runs in network
/// namespace `netns` (a name under `/var/run/netns`).
///
/// # Errors
/// No such process.
pub(crate) fn pid_in_netns(name: &str, netns: &str) -> Result<i32> {
    let target = std::fs::metadata(Path::new(weft::cluster::netns::NETNS_DIR).join(netns))
        .with_context(|| format!("netns {netns}"))?;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim() != name {
            continue;
        }
        if let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            && ns.ino() == target.ino()
            && ns.dev() == target.dev()
        {
            return Ok(pid);
        }
    }
    bail!("no {name} process in netns {netns}")
}

/// Bytes in MiB.
pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Bytes in MB (10⁶), the unit of issue 9's memory targets.
pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let pid = i32::try_from(std::process::id()).unwrap();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let rss = rss_bytes(pid).unwrap();
        assert!(rss > 0);
        assert!(peak_rss_bytes(pid).unwrap() >= rss);
        assert!((mib(1024 * 1024) - 1.0).abs() < 1e-12);
        assert!((mb(2_000_000) - 2.0).abs() < 1e-12);
    }
}
