//! `waypoint`: what the L7 path (ztunnel → waypoint → ztunnel) costs on top of the L4 path, in
//! the same run on the local cluster.
//!
//! Brings up a 2-node local cluster (release binaries next to this executable) with two copies
//! of the same client/server pair, both enrolled in the mesh: namespace `l4` (ztunnels only) and
//! namespace `l7` (a waypoint bound to the namespace). The client pod runs on node-1, the server
//! (`weft-echo serve`) on node-2, and the client dials the server's Service VIP, so the only
//! difference between the two paths is the waypoint. Figures:
//!
//! * **Latency**: 1 KiB HTTP/1.1 `POST`s at a fixed rate (`--rate`, default 1,000/s) over
//!   `--connections` keep-alive connections, open loop (latency from each request's scheduled
//!   time, so stalls count against the requests behind them); p50/p90/p99/p99.9/max per path and
//!   the latency the waypoint adds.
//! * **Waypoint cost at that rate**: CPU cores (CPU-seconds of the waypoint process / wall
//!   seconds) and peak RSS.
//! * **Requests/s per waypoint core**: closed loop over `--max-connections` connections for
//!   `--max-secs`, requests completed / waypoint CPU-seconds (so the figure does not depend on how
//!   much of the 2 cores the load generator and the other proxies take).
//!
//! The cluster is removed at the end (also on error).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use weft::cluster::{Cluster, Options, netns};

use crate::mesh::{Guard, Latency, fixed_rate_over, mib, raise_fd_limit, rss_bytes};

/// Arguments of `waypoint`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Requests per second of the fixed-rate run.
    #[arg(long = "waypoint-rate", default_value_t = 1000)]
    pub(crate) rate: u32,
    /// Connections the fixed rate is spread over.
    #[arg(long = "waypoint-connections", default_value_t = 16)]
    pub(crate) connections: u32,
    /// Seconds of the fixed-rate run, per path.
    #[arg(long = "waypoint-latency-secs", default_value_t = 10)]
    pub(crate) latency_secs: u64,
    /// Connections of the closed-loop maximum-rate run.
    #[arg(long = "waypoint-max-connections", default_value_t = 32)]
    pub(crate) max_connections: u32,
    /// Seconds of the closed-loop maximum-rate run.
    #[arg(long = "waypoint-max-secs", default_value_t = 10)]
    pub(crate) max_secs: u64,
    /// Name of the local cluster the scenario creates and removes.
    #[arg(long = "waypoint-cluster", default_value = "bench-wp")]
    pub(crate) cluster: String,
}

/// Size of each request body.
const REQUEST_BYTES: usize = 1024;

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: l4, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: l7, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: l7}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

fn pods(ns: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {ns}, labels: {{app: echo}}}}
spec:
  nodeName: node-2
  containers:
  - name: echo
    command: [weft-echo, serve, --http-port, "8080", --tcp-port, "9000"]
    readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {ns}}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {ns}}}
spec: {{nodeName: node-1, containers: [{{name: c, command: [sleep, infinity]}}]}}
"#
    )
}

/// The scenario's result.
#[derive(Debug, Clone)]
pub(crate) struct WaypointResult {
    args: Args,
    l4: Latency,
    l7: Latency,
    /// Waypoint CPU cores used during the fixed-rate L7 run.
    waypoint_cores_at_rate: f64,
    /// Waypoint RSS after the fixed-rate run and its peak (VmHWM), bytes.
    waypoint_rss: u64,
    waypoint_rss_peak: u64,
    /// Closed loop: requests completed, waypoint CPU-seconds, wall seconds.
    max_requests: u64,
    max_cpu_secs: f64,
    max_wall_secs: f64,
}

impl WaypointResult {
    fn requests_per_core(&self) -> f64 {
        self.max_requests as f64 / self.max_cpu_secs
    }
}

/// Runs the scenario.
pub(crate) fn run(args: &Args) -> Result<WaypointResult> {
    if !weft::cluster::is_root() {
        bail!("the waypoint scenario runs on the local cluster, which needs root");
    }
    raise_fd_limit()?;
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("executable directory")?
        .to_path_buf();
    let weft_exe = exe_dir.join("weft");
    if !weft_exe.is_file() || !exe_dir.join("waypoint").is_file() {
        bail!(
            "weft and waypoint not found in {}: build the workspace binaries first (cargo build --release --workspace --bins)",
            exe_dir.display()
        );
    }
    let _ = Cluster::down(&args.cluster, None);
    let mut options = Options::new(&args.cluster);
    options.nodes = 2;
    options.weft_exe = Some(weft_exe);
    eprintln!("bringing up local cluster {} (2 nodes)", args.cluster);
    let cluster = Cluster::up(&options).context("cluster up")?;
    let _guard = Guard(args.cluster.clone());
    cluster.apply_yaml(NAMESPACES)?;
    cluster.apply_yaml(&pods("l4"))?;
    cluster.apply_yaml(&pods("l7"))?;
    let ready = Duration::from_secs(90);
    let waypoint = cluster
        .wait_ready(
            "l7",
            &[("gateway.networking.k8s.io/gateway-name", "waypoint")],
            1,
            ready,
        )
        .context("waypoint pod")?
        .remove(0);
    let waypoint_netns = cluster
        .layout()
        .pod_netns(waypoint.uid().context("waypoint uid")?);
    let waypoint_pid = pid_in_netns("waypoint", &waypoint_netns)?;
    let mut targets = Vec::new();
    // l7 also holds the waypoint's pod.
    for (ns, pod_count) in [("l4", 2), ("l7", 3)] {
        let pods = cluster.wait_ready(ns, &[], pod_count, ready)?;
        let client = pods
            .iter()
            .find(|p| p.name() == "client")
            .context("client pod")?;
        let client_netns = cluster
            .layout()
            .pod_netns(client.uid().context("client uid")?);
        let svc = cluster
            .store()
            .get(&weft::cluster::ObjectKey::new(
                "",
                "Service",
                Some(ns),
                "echo",
            ))?
            .context("echo service")?;
        let vip = svc.0["spec"]["clusterIP"].as_str().context("cluster ip")?;
        let addr: SocketAddr = format!("{vip}:80").parse()?;
        targets.push((ns, client_netns, addr));
    }
    // Warm up until both paths answer (the L7 one through the waypoint).
    for (ns, client_netns, addr) in &targets {
        let deadline = Instant::now() + ready;
        loop {
            let addr = *addr;
            let ok = netns::within(client_netns, move || -> Result<()> {
                let mut conn = connect_http(addr)?;
                post(&mut conn)?;
                Ok(())
            })?;
            match ok {
                Ok(()) => break,
                Err(err) if Instant::now() > deadline => {
                    bail!("no HTTP through the {ns} path after {ready:?}: {err}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
    let waypoint_seen = cpu_seconds(waypoint_pid)?;
    eprintln!("waypoint pid {waypoint_pid} (CPU so far {waypoint_seen:.2} s)");

    // Fixed rate: 1 s warm-up per path, then two alternating rounds of half the duration.
    let half = args.latency_secs.div_ceil(2).max(1);
    let open = |client_netns: &str, addr: SocketAddr| -> Result<Vec<TcpStream>> {
        let n = args.connections.max(1);
        netns::within(client_netns, move || -> Result<Vec<TcpStream>> {
            (0..n).map(|_| connect_http(addr)).collect()
        })?
    };
    for (_, client_netns, addr) in &targets {
        fixed_rate_over(open(client_netns, *addr)?, args.rate, 1, post)?;
    }
    let mut samples = [(Vec::new(), 0usize), (Vec::new(), 0usize)];
    let mut l7_cpu = 0.0;
    let mut l7_wall = 0.0;
    for round in 1..=2 {
        for (i, (ns, client_netns, addr)) in targets.iter().enumerate() {
            let conns = open(client_netns, *addr)?;
            let cpu_before = cpu_seconds(waypoint_pid)?;
            let started = Instant::now();
            let (s, e) = fixed_rate_over(conns, args.rate, half, post)?;
            if *ns == "l7" {
                l7_wall += started.elapsed().as_secs_f64();
                l7_cpu += cpu_seconds(waypoint_pid)? - cpu_before;
            }
            eprintln!(
                "latency {ns} round {round}: {} samples, {e} errors",
                s.len()
            );
            samples[i].0.extend(s);
            samples[i].1 += e;
        }
    }
    let waypoint_rss = rss_bytes(waypoint_pid)?;
    let waypoint_rss_peak = hwm_bytes(waypoint_pid)?;
    let [(l4_samples, l4_errors), (l7_samples, l7_errors)] = samples;
    let l4 = Latency::from_samples(l4_samples, l4_errors);
    let l7 = Latency::from_samples(l7_samples, l7_errors);

    // Closed loop through the waypoint.
    let (_, client_netns, addr) = &targets[1];
    let addr = *addr;
    let n = args.max_connections.max(1);
    let conns = netns::within(client_netns, move || -> Result<Vec<TcpStream>> {
        (0..n).map(|_| connect_http(addr)).collect()
    })??;
    let cpu_before = cpu_seconds(waypoint_pid)?;
    let started = Instant::now();
    let until = started + Duration::from_secs(args.max_secs.max(1));
    let threads: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            std::thread::spawn(move || {
                let mut done = 0u64;
                while Instant::now() < until && post(&mut conn).is_ok() {
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut max_requests = 0;
    for thread in threads {
        max_requests += thread
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
    }
    let max_wall_secs = started.elapsed().as_secs_f64();
    let max_cpu_secs = cpu_seconds(waypoint_pid)? - cpu_before;
    Ok(WaypointResult {
        args: args.clone(),
        l4,
        l7,
        waypoint_cores_at_rate: if l7_wall > 0.0 {
            l7_cpu / l7_wall
        } else {
            f64::NAN
        },
        waypoint_rss,
        waypoint_rss_peak,
        max_requests,
        max_cpu_secs,
        max_wall_secs,
    })
}

/// A keep-alive HTTP/1.1 connection to `addr`.
fn connect_http(addr: SocketAddr) -> Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

/// One `POST /bench` with a 1 KiB body on a keep-alive connection; reads the whole response and
/// fails unless it is a 200.
fn post(conn: &mut TcpStream) -> std::io::Result<()> {
    const HEAD: &[u8] =
        b"POST /bench HTTP/1.1\r\nhost: echo\r\ncontent-type: application/octet-stream\r\ncontent-length: 1024\r\n\r\n";
    let mut request = Vec::with_capacity(HEAD.len() + REQUEST_BYTES);
    request.extend_from_slice(HEAD);
    request.resize(HEAD.len() + REQUEST_BYTES, b'x');
    conn.write_all(&request)?;
    let mut reader = BufReader::new(&mut *conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let ok = line.split(' ').nth(1) == Some("200");
    let mut length = None;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let length = length.ok_or_else(|| std::io::Error::other("response without content-length"))?;
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    if !reader.buffer().is_empty() {
        return Err(std::io::Error::other("bytes after the response"));
    }
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("status line {line:?}")))
    }
}

/// The pid of the process named `name` running in network namespace `netns`.
fn pid_in_netns(name: &str, netns_name: &str) -> Result<i32> {
    use std::os::unix::fs::MetadataExt as _;
    let target = std::fs::metadata(Path::new(weft::cluster::netns::NETNS_DIR).join(netns_name))?;
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
    bail!("no {name} process in netns {netns_name}")
}

/// User + system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
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
    // `rest` starts at field 3, so utime (14) is index 11 and stime (15) index 12.
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// Peak RSS (VmHWM) of `pid`, bytes.
fn hwm_bytes(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("VmHWM in /proc/PID/status")
}

/// Prints the Markdown tables to stdout.
pub(crate) fn print(result: &WaypointResult) {
    let a = &result.args;
    let (l4, l7) = (&result.l4, &result.l7);
    println!("## weft-bench waypoint: the L7 path (ztunnel → waypoint → ztunnel) vs the L4 path");
    println!();
    println!(
        "Cross-node (client on node-1, server on node-2, Service VIP). Latency: 1 KiB HTTP/1.1 POST, \
         {} req/s open loop over {} keep-alive connections, {} s per path (two alternating rounds \
         after a 1 s warm-up). Maximum rate: closed loop, {} connections, {} s.",
        a.rate, a.connections, a.latency_secs, a.max_connections, a.max_secs
    );
    println!();
    println!("| figure | L4 (ztunnels) | L7 (+ waypoint) | added by the waypoint |");
    println!("|--------|--------------:|----------------:|----------------------:|");
    for (name, x, y) in [
        ("latency p50, ms", l4.p50, l7.p50),
        ("latency p90, ms", l4.p90, l7.p90),
        ("latency p99, ms", l4.p99, l7.p99),
        ("latency p99.9, ms", l4.p999, l7.p999),
        ("latency max, ms", l4.max, l7.max),
    ] {
        println!("| {name} | {x:.3} | {y:.3} | {:+.3} ms |", y - x);
    }
    println!(
        "| samples / errors | {} / {} | {} / {} | |",
        l4.samples, l4.errors, l7.samples, l7.errors
    );
    println!();
    println!("| waypoint | value | target |");
    println!("|----------|------:|--------|");
    println!(
        "| CPU at {} req/s, cores | {:.3} | ≤ 0.15 |",
        a.rate, result.waypoint_cores_at_rate
    );
    println!(
        "| RSS after the fixed-rate run / peak, MiB | {:.1} / {:.1} | ≤ 25 MB |",
        mib(result.waypoint_rss),
        mib(result.waypoint_rss_peak)
    );
    println!(
        "| closed loop: requests/s (wall) | {:.0} | |",
        result.max_requests as f64 / result.max_wall_secs
    );
    println!(
        "| closed loop: requests/s per waypoint core | {:.0} | |",
        result.requests_per_core()
    );
    println!();
    println!("{}", crate::report::machine_line());
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; run with --release for meaningful numbers");
    }
}

/// Writes the result as JSON to `dir/waypoint-<unix-timestamp>.json`.
///
/// # Errors
/// Creating the directory or writing the file.
pub(crate) fn write_json(result: &WaypointResult, dir: &Path) -> Result<std::path::PathBuf> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("waypoint-{timestamp}.json"));
    let a = &result.args;
    let value = json!({
        "scenario": "waypoint",
        "timestamp": timestamp,
        "machine": crate::report::machine_json(),
        "parameters": {
            "rate": a.rate, "connections": a.connections, "latency_secs": a.latency_secs,
            "request_bytes": REQUEST_BYTES, "max_connections": a.max_connections,
            "max_secs": a.max_secs,
        },
        "latency": {
            "l4": result.l4.json(), "l7": result.l7.json(),
            "added_p50_ms": result.l7.p50 - result.l4.p50,
            "added_p99_ms": result.l7.p99 - result.l4.p99,
        },
        "waypoint": {
            "cores_at_rate": result.waypoint_cores_at_rate,
            "rss_bytes": result.waypoint_rss, "rss_peak_bytes": result.waypoint_rss_peak,
            "max_requests": result.max_requests, "max_cpu_secs": result.max_cpu_secs,
            "max_wall_secs": result.max_wall_secs,
            "requests_per_core": result.requests_per_core(),
        },
    });
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
