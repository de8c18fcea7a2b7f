//! `mesh`: what the L4 mesh costs on the local cluster, measured against the same pods without
//! the mesh in the same run.
//!
//! Brings up a 2-node local cluster (release binaries next to this executable), with two copies
//! of the same pair of pods: namespace `plain` (not enrolled) and namespace `mesh` (labelled
//! `istio.io/dataplane-mode=ambient`). Each pair is a client pod on node-1 and a server pod on
//! node-2 running `weft-echo serve` (TCP echo on 9000) and `iperf3 -s`, so every figure is
//! cross-node and the only difference between the two paths is the mesh (two ztunnels, HBONE,
//! mTLS). Figures:
//!
//! * **Throughput**: `iperf3` single stream, client → server pod IP, `--throughput-secs` per run,
//!   runs alternating between the paths; the median per path and the mesh / no-mesh ratio.
//! * **Latency**: 1 KiB request → 1 KiB echo at a fixed rate (`--rate` requests/s spread over
//!   `--connections` connections, open loop): each request has a scheduled send time and its
//!   latency is measured from that time, not from when it was actually sent, so a stalled
//!   response also counts against the requests queued behind it (no coordinated omission). One
//!   blocking thread per connection sleeps until each scheduled time (Linux high-resolution
//!   sleeps; tokio's timer has 1 ms granularity, too coarse for a +0.1 ms figure).
//!   p50/p90/p99/p99.9/max per path and the added latency.
//! * **Memory**: both ztunnels' RSS idle, then with `--idle-connections` idle proxied connections
//!   open (client → server through both ztunnels, each confirmed by the server's greeting):
//!   bytes per connection = RSS growth / connections.
//!
//! The cluster is removed at the end (also on error).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use weft::cluster::{Cluster, Options, netns};

use crate::report::median;

/// Arguments of `mesh`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Seconds per iperf3 throughput run.
    #[arg(long, default_value_t = 5)]
    pub(crate) throughput_secs: u64,
    /// Throughput runs per path (alternating between the paths).
    #[arg(long, default_value_t = 3)]
    pub(crate) throughput_runs: u32,
    /// Requests per second of the fixed-rate latency run.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u32,
    /// Connections the fixed rate is spread over.
    #[arg(long, default_value_t = 16)]
    pub(crate) connections: u32,
    /// Seconds of the fixed-rate run, per path.
    #[arg(long, default_value_t = 10)]
    pub(crate) latency_secs: u64,
    /// Idle proxied connections held open for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) idle_connections: u32,
    /// Name of the local cluster the scenario creates and removes.
    #[arg(long, default_value = "bench")]
    pub(crate) cluster: String,
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
"#;

fn pods(ns: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {ns}}}
spec:
  nodeName: node-2
  containers:
  - name: echo
    command: [weft-echo, serve, --http-port, "8080", --tcp-port, "9000"]
    readinessProbe: {{tcpSocket: {{port: 9000}}}}
  - name: iperf
    command: [iperf3, --server, --port, "5201"]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {ns}}}
spec: {{nodeName: node-1, containers: [{{name: c, command: [sleep, infinity]}}]}}
"#
    )
}

/// Size of each latency request and its echo.
const REQUEST_BYTES: usize = 1024;

/// Removes the cluster when dropped.
pub(crate) struct Guard(pub(crate) String);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(err) = Cluster::down(&self.0, None) {
            eprintln!("removing cluster {}: {err}", self.0);
        }
    }
}

/// One path's pods.
struct PathPods {
    ns: &'static str,
    client_netns: String,
    server_ip: String,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone)]
pub(crate) struct Latency {
    pub(crate) samples: usize,
    pub(crate) errors: usize,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
}

impl Latency {
    pub(crate) fn from_samples(mut samples: Vec<Duration>, errors: usize) -> Latency {
        samples.sort();
        let at = |q: f64| {
            if samples.is_empty() {
                return f64::NAN;
            }
            // Nearest-rank percentile.
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1e3
        };
        Latency {
            samples: samples.len(),
            errors,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "samples": self.samples, "errors": self.errors,
            "p50_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99,
            "p99_9_ms": self.p999, "max_ms": self.max,
        })
    }
}

/// The scenario's result.
#[derive(Debug, Clone)]
pub(crate) struct MeshResult {
    args: Args,
    plain_gbps: Vec<f64>,
    mesh_gbps: Vec<f64>,
    plain_latency: Latency,
    mesh_latency: Latency,
    /// RSS in bytes of the client-side (node-1) and server-side (node-2) ztunnel: idle, then
    /// with the idle connections open.
    rss_idle: [u64; 2],
    rss_loaded: [u64; 2],
    /// Idle connections actually established.
    idle_established: u32,
}

impl MeshResult {
    fn throughput_ratio(&self) -> f64 {
        median(&self.mesh_gbps) / median(&self.plain_gbps)
    }

    fn bytes_per_connection(&self, node: usize) -> f64 {
        let growth = self.rss_loaded[node].saturating_sub(self.rss_idle[node]);
        growth as f64 / f64::from(self.idle_established.max(1))
    }
}

/// Runs the scenario.
///
/// # Errors
/// When the cluster cannot be brought up, a pod does not become ready, or a tool fails.
pub(crate) fn run(args: &Args) -> Result<MeshResult> {
    if !weft::cluster::is_root() {
        bail!("the mesh scenario runs on the local cluster, which needs root");
    }
    raise_fd_limit()?;
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("executable directory")?
        .to_path_buf();
    let weft_exe = exe_dir.join("weft");
    if !weft_exe.is_file() {
        bail!(
            "{} not found: build the workspace binaries first (cargo build --release --workspace --bins)",
            weft_exe.display()
        );
    }
    let _ = Cluster::down(&args.cluster, None);
    let mut options = Options::new(&args.cluster);
    options.nodes = 2;
    options.weft_exe = Some(weft_exe);
    eprintln!("bringing up local cluster {} (2 nodes)", args.cluster);
    let cluster = Cluster::up(&options).context("cluster up")?;
    let _guard = Guard(args.cluster.clone());
    cluster.apply_yaml(MANIFESTS)?;
    cluster.apply_yaml(&pods("plain"))?;
    cluster.apply_yaml(&pods("mesh"))?;
    let ready = Duration::from_secs(60);
    let mut paths = Vec::new();
    for ns in ["plain", "mesh"] {
        let found = cluster.wait_ready(ns, &[], 2, ready)?;
        let ip = |name: &str| -> Result<(String, String)> {
            let pod = found
                .iter()
                .find(|p| p.name() == name)
                .with_context(|| format!("pod {ns}/{name}"))?;
            let ip = pod.0["status"]["podIP"]
                .as_str()
                .context("pod ip")?
                .to_owned();
            let uid = pod.uid().context("pod uid")?.to_owned();
            Ok((ip, cluster.layout().pod_netns(&uid)))
        };
        let (server_ip, _) = ip("server")?;
        let (_, client_netns) = ip("client")?;
        paths.push(PathPods {
            ns,
            client_netns,
            server_ip,
        });
    }
    let (plain, mesh) = (&paths[0], &paths[1]);
    wait_enrolled(&cluster, ready)?;
    // Warm up: certificates fetched, HBONE pools connected, the server's workload known.
    let warm = Instant::now() + ready;
    while echo_round_trip(&mesh.client_netns, &mesh.server_ip).is_err() {
        if Instant::now() > warm {
            bail!("no traffic through the mesh after {ready:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    echo_round_trip(&plain.client_netns, &plain.server_ip)?;

    let mut plain_gbps = Vec::new();
    let mut mesh_gbps = Vec::new();
    for run in 1..=args.throughput_runs {
        for (path, out) in [(plain, &mut plain_gbps), (mesh, &mut mesh_gbps)] {
            let gbps = iperf3(&cluster, path, args.throughput_secs)?;
            eprintln!("throughput {} run {run}: {gbps:.2} Gbit/s", path.ns);
            out.push(gbps);
        }
    }

    // Latency: a 1 s warm-up per path (discarded), then two rounds alternating the paths, each
    // half the duration, so neither path always runs first (caches, CPU frequency, leftovers
    // of the throughput runs).
    let half = args.latency_secs.div_ceil(2).max(1);
    for path in [plain, mesh] {
        fixed_rate(path_addr(path)?, &path.client_netns, args, 1)?;
    }
    let mut samples = [(Vec::new(), 0usize), (Vec::new(), 0usize)];
    for round in 1..=2 {
        for (i, path) in [plain, mesh].into_iter().enumerate() {
            let (s, e) = fixed_rate(path_addr(path)?, &path.client_netns, args, half)?;
            eprintln!(
                "latency {} round {round}: {} samples, {e} errors",
                path.ns,
                s.len()
            );
            samples[i].0.extend(s);
            samples[i].1 += e;
        }
    }
    let [(plain_samples, plain_errors), (mesh_samples, mesh_errors)] = samples;
    let plain_latency = Latency::from_samples(plain_samples, plain_errors);
    let mesh_latency = Latency::from_samples(mesh_samples, mesh_errors);
    eprintln!(
        "latency plain: p50 {:.3} ms p99 {:.3} ms",
        plain_latency.p50, plain_latency.p99
    );
    eprintln!(
        "latency mesh: p50 {:.3} ms p99 {:.3} ms",
        mesh_latency.p50, mesh_latency.p99
    );

    std::thread::sleep(Duration::from_secs(2));
    let rss = |cluster: &Cluster| -> Result<[u64; 2]> {
        let mut out = [0; 2];
        for (i, node) in [1u8, 2].into_iter().enumerate() {
            let pid = cluster.ztunnel_pid(node).context("ztunnel pid")?;
            out[i] = rss_bytes(pid)?;
        }
        Ok(out)
    };
    let rss_idle = rss(&cluster)?;
    eprintln!(
        "opening {} idle connections through the mesh",
        args.idle_connections
    );
    let addr = path_addr(mesh)?;
    let count = args.idle_connections;
    let held = netns::within(&mesh.client_netns, move || open_idle(addr, count))??;
    let idle_established = u32::try_from(held.len()).unwrap_or(u32::MAX);
    std::thread::sleep(Duration::from_secs(2));
    let rss_loaded = rss(&cluster)?;
    drop(held);

    Ok(MeshResult {
        args: args.clone(),
        plain_gbps,
        mesh_gbps,
        plain_latency,
        mesh_latency,
        rss_idle,
        rss_loaded,
        idle_established,
    })
}

pub(crate) fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = 262_144.max(hard);
    setrlimit(Resource::RLIMIT_NOFILE, want, want)
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard, hard))
        .context("raising the open-files limit")
}

fn wait_enrolled(cluster: &Cluster, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let enrolled = ["server", "client"].iter().all(|name| {
            cluster.pod("mesh", name).is_ok_and(|p| {
                p.0["metadata"]["annotations"]["ambient.istio.io/redirection"] == "enabled"
            })
        });
        if enrolled {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("mesh pods not enrolled after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn path_addr(path: &PathPods) -> Result<SocketAddr> {
    Ok(format!("{}:9000", path.server_ip).parse()?)
}

/// Connects from `netns` to the server's echo port, reads its greeting and has 1 KiB echoed.
fn echo_round_trip(netns: &str, server_ip: &str) -> Result<()> {
    let addr: SocketAddr = format!("{server_ip}:9000").parse()?;
    netns::within(netns, move || -> Result<()> {
        let mut conn = connect(addr)?;
        let buf = [7u8; REQUEST_BYTES];
        conn.write_all(&buf)?;
        let mut back = [0u8; REQUEST_BYTES];
        conn.read_exact(&mut back)?;
        if back != buf {
            bail!("echo mismatch");
        }
        Ok(())
    })?
}

/// A connection to the echo port with the server's greeting line consumed.
fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut greeting = String::new();
    reader.read_line(&mut greeting)?;
    if !greeting.ends_with('\n') {
        bail!("no greeting from {addr} (connection refused by the path?)");
    }
    if !reader.buffer().is_empty() {
        bail!("unexpected bytes after the greeting");
    }
    Ok(conn)
}

/// `iperf3` single stream from the path's client pod to its server, in Gbit/s received.
fn iperf3(cluster: &Cluster, path: &PathPods, secs: u64) -> Result<f64> {
    let secs = secs.to_string();
    let out = cluster.exec(
        path.ns,
        "client",
        &[
            "iperf3",
            "--client",
            &path.server_ip,
            "--time",
            &secs,
            "--json",
        ],
    )?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3 in {}: {error}", path.ns);
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .context("iperf3 report without end.sum_received.bits_per_second")
}

/// A fixed-rate 1 KiB request/response run of `secs` from `netns` to `addr`: the latencies and
/// the number of connections that failed.
fn fixed_rate(
    addr: SocketAddr,
    client_netns: &str,
    args: &Args,
    secs: u64,
) -> Result<(Vec<Duration>, usize)> {
    let connections = args.connections.max(1);
    let conns = netns::within(client_netns, move || -> Result<Vec<TcpStream>> {
        (0..connections).map(|_| connect(addr)).collect()
    })??;
    fixed_rate_over(conns, args.rate, secs, |conn| {
        let request = [0x5au8; REQUEST_BYTES];
        let mut response = [0u8; REQUEST_BYTES];
        conn.write_all(&request)?;
        conn.read_exact(&mut response)
    })
}

/// Runs `exchange` on each of `conns` at a combined `rate` per second for `secs`, open loop:
/// every exchange has a scheduled start and its latency counts from that time, not from when it
/// actually started, so a stall also counts against the exchanges queued behind it (no
/// coordinated omission). One blocking thread per connection sleeps until each scheduled time
/// (Linux high-resolution sleeps; tokio's 1 ms timer is too coarse). A connection whose
/// exchange fails stops and counts as one error. Returns the latencies and the errors.
pub(crate) fn fixed_rate_over(
    conns: Vec<TcpStream>,
    rate: u32,
    secs: u64,
    exchange: fn(&mut TcpStream) -> std::io::Result<()>,
) -> Result<(Vec<Duration>, usize)> {
    let connections = u32::try_from(conns.len()).unwrap_or(u32::MAX).max(1);
    let interval = Duration::from_secs_f64(f64::from(connections) / f64::from(rate.max(1)));
    let per_connection = (secs as f64 / interval.as_secs_f64()).ceil() as u64;
    let start = Instant::now() + Duration::from_millis(100);
    let stagger = interval / connections;
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let first = start + stagger * u32::try_from(i).unwrap_or(0);
            std::thread::spawn(move || {
                let mut samples = Vec::with_capacity(per_connection as usize);
                let mut errors = 0;
                for n in 0..per_connection {
                    let scheduled = first + interval * u32::try_from(n).unwrap_or(u32::MAX);
                    let now = Instant::now();
                    if scheduled > now {
                        std::thread::sleep(scheduled - now);
                    }
                    if exchange(&mut conn).is_ok() {
                        samples.push(scheduled.elapsed());
                    } else {
                        errors += 1;
                        break;
                    }
                }
                (samples, errors)
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut errors = 0;
    for thread in threads {
        let (s, e) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("latency thread panicked"))?;
        samples.extend(s);
        errors += e;
    }
    Ok((samples, errors))
}

/// Opens `count` connections to `addr` (each confirmed by the greeting) and returns them.
fn open_idle(addr: SocketAddr, count: u32) -> Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(count as usize);
    for i in 0..count {
        match connect(addr) {
            Ok(conn) => held.push(conn),
            Err(err) => bail!("idle connection {i} of {count}: {err}"),
        }
    }
    Ok(held)
}

pub(crate) fn rss_bytes(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("VmRSS in /proc/PID/status")
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub(crate) fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

/// Prints the Markdown tables to stdout.
pub(crate) fn print(result: &MeshResult) {
    let a = &result.args;
    let (p, m) = (&result.plain_latency, &result.mesh_latency);
    println!("## weft-bench mesh: the L4 mesh on the local cluster vs the same pods without it");
    println!();
    println!(
        "Cross-node (client on node-1, server on node-2). Throughput: iperf3, 1 stream, {} s × {} \
         runs per path. Latency: 1 KiB echo, {} req/s open loop over {} connections, {} s per path \
         (two alternating rounds after a 1 s warm-up).",
        a.throughput_secs, a.throughput_runs, a.rate, a.connections, a.latency_secs
    );
    println!();
    println!("| figure | no mesh | mesh | mesh vs no mesh | target | meets |");
    println!("|--------|--------:|-----:|----------------:|--------|:-----:|");
    let ratio = result.throughput_ratio();
    println!(
        "| throughput, Gbit/s (median) | {:.2} | {:.2} | {:.2}× | ≥ 0.6× | {} |",
        median(&result.plain_gbps),
        median(&result.mesh_gbps),
        ratio,
        yes_no(ratio >= 0.6)
    );
    let rows: [(&str, f64, f64, Option<f64>); 5] = [
        ("latency p50, ms", p.p50, m.p50, Some(0.10)),
        ("latency p90, ms", p.p90, m.p90, None),
        ("latency p99, ms", p.p99, m.p99, Some(0.30)),
        ("latency p99.9, ms", p.p999, m.p999, None),
        ("latency max, ms", p.max, m.max, None),
    ];
    for (name, plain, mesh, target) in rows {
        let added = mesh - plain;
        let (target_text, meets) = target.map_or(("".to_owned(), ""), |t| {
            (format!("≤ +{t:.2} ms"), yes_no(added <= t))
        });
        println!("| {name} | {plain:.3} | {mesh:.3} | {added:+.3} ms | {target_text} | {meets} |");
    }
    println!(
        "| latency samples / errors | {} / {} | {} / {} | | | |",
        p.samples, p.errors, m.samples, m.errors
    );
    println!();
    println!(
        "| ztunnel | RSS idle, MiB | RSS with {} idle connections, MiB | bytes per connection | target | meets |",
        result.idle_established
    );
    println!("|---------|--------------:|------:|------:|--------|:-----:|");
    for (i, side) in ["node-1 (client side)", "node-2 (server side)"]
        .iter()
        .enumerate()
    {
        let per = result.bytes_per_connection(i);
        println!(
            "| {side} | {:.1} | {:.1} | {:.0} | ≤ 3072 | {} |",
            mib(result.rss_idle[i]),
            mib(result.rss_loaded[i]),
            per,
            yes_no(per <= 3072.0)
        );
    }
    println!();
    println!("{}", crate::report::machine_line());
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; run with --release for meaningful numbers");
    }
}

/// Writes the result as JSON to `dir/mesh-<unix-timestamp>.json`.
///
/// # Errors
/// Creating the directory or writing the file.
pub(crate) fn write_json(result: &MeshResult, dir: &Path) -> Result<std::path::PathBuf> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("mesh-{timestamp}.json"));
    let a = &result.args;
    let value = json!({
        "scenario": "mesh",
        "timestamp": timestamp,
        "machine": crate::report::machine_json(),
        "parameters": {
            "throughput_secs": a.throughput_secs, "throughput_runs": a.throughput_runs,
            "rate": a.rate, "connections": a.connections, "latency_secs": a.latency_secs,
            "request_bytes": REQUEST_BYTES, "idle_connections": a.idle_connections,
        },
        "throughput_gbps": {
            "plain": result.plain_gbps, "mesh": result.mesh_gbps,
            "plain_median": median(&result.plain_gbps), "mesh_median": median(&result.mesh_gbps),
            "ratio": result.throughput_ratio(),
        },
        "latency": {
            "plain": result.plain_latency.json(), "mesh": result.mesh_latency.json(),
            "added_p50_ms": result.mesh_latency.p50 - result.plain_latency.p50,
            "added_p99_ms": result.mesh_latency.p99 - result.plain_latency.p99,
        },
        "ztunnel_memory": {
            "idle_connections_established": result.idle_established,
            "rss_idle_bytes": result.rss_idle, "rss_loaded_bytes": result.rss_loaded,
            "bytes_per_connection": [result.bytes_per_connection(0), result.bytes_per_connection(1)],
        },
    });
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        let l = Latency::from_samples(samples, 2);
        assert_eq!(l.samples, 1000);
        assert_eq!(l.errors, 2);
        assert!((l.p50 - 0.500).abs() < 1e-9, "{}", l.p50);
        assert!((l.p99 - 0.990).abs() < 1e-9, "{}", l.p99);
        assert!((l.p999 - 0.999).abs() < 1e-9, "{}", l.p999);
        assert!((l.max - 1.000).abs() < 1e-9, "{}", l.max);
        assert!(Latency::from_samples(Vec::new(), 0).p50.is_nan());
    }
}
