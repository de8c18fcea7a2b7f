//! `mesh`: what the L4 mesh (two ztunnels, HBONE) costs against no mesh, on the shared
//! [`Testbed`], both paths in the same run:
//!
//! * **Throughput**: `iperf3` in the client pod to a server pod, 1 and 4 streams, both
//!   directions (`-R`), cross-node (server on node-2) and same-node (server on node-1);
//!   `--throughput-runs` runs per case alternating S0 and L4; medians and L4 / S0.
//! * **Requests/s per ztunnel core**: closed loop through L4 (Service VIP, cross-node), HTTP/1.1
//!   (`--max-connections` keep-alive connections, one blocking thread each) and h2c (the same
//!   number of connections, `weft-echo`'s hyper client), 1 KiB `POST`s for `--max-secs`;
//!   requests / CPU-seconds of both ztunnels together.
//! * **New connections/s**: `--new-connection-threads` threads connect, read the echo greeting
//!   and close, for `--new-connection-secs`, through S0 and L4; per second and per ztunnel core.
//! * **Memory per idle connection**: both ztunnels' RSS idle, then with `--idle-connections`
//!   connections open through L4 (each confirmed end to end by the server's greeting).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::{Map, Value, json};
use weft::cluster::netns;

use crate::load::{self, Closed};
use crate::procfs::{cpu_seconds_all, mib, rss_bytes};
use crate::report::median;
use crate::testbed::{Path, Testbed};

/// Arguments of `mesh`.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "mesh_args")]
pub(crate) struct Args {
    /// Seconds per iperf3 throughput run [quick: 1].
    #[arg(long, default_value_t = 5)]
    pub(crate) throughput_secs: u64,
    /// Runs per throughput case and path, alternating S0 and L4 [quick: 1].
    #[arg(long, default_value_t = 3)]
    pub(crate) throughput_runs: u32,
    /// Connections of the closed-loop requests/s runs [quick: 8].
    #[arg(long, default_value_t = 32)]
    pub(crate) max_connections: u32,
    /// Seconds of each closed-loop requests/s run [quick: 1].
    #[arg(long, default_value_t = 10)]
    pub(crate) max_secs: u64,
    /// Threads opening new connections [quick: 2].
    #[arg(long, default_value_t = 4)]
    pub(crate) new_connection_threads: u32,
    /// Seconds of each new-connection run [quick: 1].
    #[arg(long, default_value_t = 5)]
    pub(crate) new_connection_secs: u64,
    /// Idle proxied connections held open for the memory figure [quick: 500].
    #[arg(long, default_value_t = 10_000)]
    pub(crate) idle_connections: u32,
}

impl Args {
    /// The `--quick` sizes: every part runs, for about a second.
    pub(crate) fn quick(&mut self) {
        self.throughput_secs = 1;
        self.throughput_runs = 1;
        self.max_connections = 8;
        self.max_secs = 1;
        self.new_connection_threads = 2;
        self.new_connection_secs = 1;
        self.idle_connections = 500;
    }
}

/// The throughput cases: (key, same node, streams, reverse).
const CASES: [(&str, bool, u32, bool); 8] = [
    ("cross-1", false, 1, false),
    ("cross-1-R", false, 1, true),
    ("cross-4", false, 4, false),
    ("cross-4-R", false, 4, true),
    ("same-1", true, 1, false),
    ("same-1-R", true, 1, true),
    ("same-4", true, 4, false),
    ("same-4-R", true, 4, true),
];

/// Runs the scenario and prints its tables; returns its JSON.
///
/// # Errors
/// A tool failing, the proxies gone.
pub(crate) fn run(bed: &Testbed, args: &Args) -> Result<Value> {
    let (s0, l4) = (&bed.s0, &bed.l4);

    let mut throughput = Map::new();
    for (key, same_node, streams, reverse) in CASES {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for run in 1..=args.throughput_runs {
            for (path, out) in [(s0, &mut a), (l4, &mut b)] {
                let gbps = iperf3(bed, path, same_node, streams, reverse, args.throughput_secs)?;
                eprintln!("throughput {key} {} run {run}: {gbps:.2} Gbit/s", path.ns);
                out.push(gbps);
            }
        }
        let (ma, mb) = (median(&a), median(&b));
        throughput.insert(
            key.to_owned(),
            json!({
                "same_node": same_node, "streams": streams, "reverse": reverse,
                "s0_gbps": a, "l4_gbps": b, "s0_median_gbps": ma, "l4_median_gbps": mb,
                "ratio": mb / ma,
            }),
        );
    }

    let zt = &bed.ztunnels;
    let per_core = |name: &str, f: &dyn Fn() -> Result<Closed>| -> Result<Value> {
        let before = cpu_seconds_all(zt)?;
        let closed = f()?;
        let cpu = cpu_seconds_all(zt)? - before;
        eprintln!(
            "{name} through L4: {} done, {} failed, {:.0}/s, ztunnel CPU {cpu:.2} s",
            closed.done,
            closed.failed,
            closed.per_sec()
        );
        Ok(json!({
            "done": closed.done, "failed": closed.failed, "wall_secs": closed.wall_secs,
            "per_sec": closed.per_sec(), "ztunnel_cpu_secs": cpu,
            "per_core": closed.done as f64 / cpu,
        }))
    };
    let (conns, secs) = (args.max_connections, args.max_secs);
    let h1 = per_core("h1 requests", &|| {
        load::closed_loop_h1(&l4.client_netns, l4.vip, conns, secs)
    })?;
    let h2 = per_core("h2 requests", &|| {
        load::closed_loop_h2(&l4.client_netns, l4.vip, conns, secs)
    })?;

    let (threads, secs) = (args.new_connection_threads, args.new_connection_secs);
    for path in [s0, l4] {
        tune_client_ports(&path.client_netns);
    }
    let s0_conns = load::new_connections(&s0.client_netns, s0.echo_addr()?, threads, secs)?;
    eprintln!(
        "new connections S0: {:.0}/s ({} failed)",
        s0_conns.per_sec(),
        s0_conns.failed
    );
    // TIME_WAIT of the S0 run's sockets must not collide with the L4 run's (different netns,
    // but the same server pod sees both).
    std::thread::sleep(Duration::from_secs(1));
    let l4_conns = per_core("new connections", &|| {
        load::new_connections(&l4.client_netns, l4.echo_addr()?, threads, secs)
    })?;

    std::thread::sleep(Duration::from_secs(2));
    let rss = || -> Result<[u64; 2]> { Ok([rss_bytes(zt[0])?, rss_bytes(zt[1])?]) };
    let rss_idle = rss()?;
    eprintln!(
        "opening {} idle connections through L4",
        args.idle_connections
    );
    let addr = l4.echo_addr()?;
    let count = args.idle_connections;
    let held = netns::within(&l4.client_netns, move || open_idle(addr, count))??;
    let established = held.len();
    std::thread::sleep(Duration::from_secs(2));
    let rss_loaded = rss()?;
    drop(held);
    let per_conn: Vec<f64> = (0..2)
        .map(|i| rss_loaded[i].saturating_sub(rss_idle[i]) as f64 / established.max(1) as f64)
        .collect();

    let value = json!({
        "parameters": {
            "throughput_secs": args.throughput_secs, "throughput_runs": args.throughput_runs,
            "max_connections": args.max_connections, "max_secs": args.max_secs,
            "new_connection_threads": args.new_connection_threads,
            "new_connection_secs": args.new_connection_secs,
            "idle_connections": args.idle_connections, "request_bytes": load::REQUEST_BYTES,
        },
        "throughput": throughput,
        "requests_per_core": {"h1": h1, "h2": h2},
        "new_connections": {
            "s0": {"done": s0_conns.done, "failed": s0_conns.failed, "per_sec": s0_conns.per_sec()},
            "l4": l4_conns,
        },
        "idle": {
            "connections": established,
            "rss_idle_bytes": rss_idle, "rss_loaded_bytes": rss_loaded,
            "bytes_per_connection": per_conn,
            "bytes_per_connection_max": per_conn.iter().copied().fold(f64::NAN, f64::max),
        },
    });
    print(&value, args);
    Ok(value)
}

/// Lets the client pod reuse ports in TIME_WAIT and use a wide ephemeral range, so the
/// new-connection runs are not limited by the client's port space. Best effort.
fn tune_client_ports(client_netns: &str) {
    let status = netns::command_in(client_netns, "sysctl")
        .args([
            "-q",
            "-w",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ])
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("could not tune the ports of {client_netns} (sysctl); continuing");
    }
}

/// `iperf3` from the path's client pod to its node-2 server (or node-1 server when
/// `same_node`), in Gbit/s received.
fn iperf3(
    bed: &Testbed,
    path: &Path,
    same_node: bool,
    streams: u32,
    reverse: bool,
    secs: u64,
) -> Result<f64> {
    let server = if same_node {
        path.local_server_ip
            .as_deref()
            .context("no same-node server")?
    } else {
        &path.server_ip
    };
    let (secs, streams) = (secs.to_string(), streams.to_string());
    let mut argv = vec![
        "iperf3",
        "--client",
        server,
        "--time",
        &secs,
        "--parallel",
        &streams,
        "--json",
    ];
    if reverse {
        argv.push("--reverse");
    }
    let out = bed.cluster.exec(path.ns, "client", &argv)?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(error) = report["error"].as_str() {
        anyhow::bail!("iperf3 in {}: {error}", path.ns);
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .context("iperf3 report without end.sum_received.bits_per_second")
}

/// Opens `count` connections to `addr` (each confirmed by the greeting) and returns them.
fn open_idle(addr: SocketAddr, count: u32) -> Result<Vec<std::net::TcpStream>> {
    (0..count)
        .map(|i| {
            load::connect_echo(addr).with_context(|| format!("idle connection {i} of {count}"))
        })
        .collect()
}

/// Prints the scenario's Markdown tables.
fn print(v: &Value, args: &Args) {
    println!("## weft-bench mesh: the L4 mesh (two ztunnels, HBONE) vs no mesh (S0)");
    println!();
    println!(
        "Throughput: iperf3 in the client pod (node-1) to a server pod on node-2 (cross) or node-1 \
         (same), {} s × {} runs per case and path.",
        args.throughput_secs, args.throughput_runs
    );
    println!();
    println!("| case | S0 Gbit/s | L4 Gbit/s | L4 / S0 |");
    println!("|------|----------:|----------:|--------:|");
    for (key, ..) in CASES {
        let t = &v["throughput"][key];
        println!(
            "| {key} | {:.2} | {:.2} | {:.2}× |",
            num(&t["s0_median_gbps"]),
            num(&t["l4_median_gbps"]),
            num(&t["ratio"])
        );
    }
    println!();
    println!(
        "Closed loop through L4 (Service VIP, cross-node), {} connections, {} s; CPU of both ztunnels.",
        args.max_connections, args.max_secs
    );
    println!();
    println!("| load | per second (wall) | ztunnel CPU-s | per ztunnel core | failed |");
    println!("|------|------------------:|--------------:|-----------------:|-------:|");
    for (name, r) in [
        ("HTTP/1.1 requests", &v["requests_per_core"]["h1"]),
        ("h2c requests", &v["requests_per_core"]["h2"]),
        ("new connections (L4)", &v["new_connections"]["l4"]),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.0} | {} |",
            num(&r["per_sec"]),
            num(&r["ztunnel_cpu_secs"]),
            num(&r["per_core"]),
            r["failed"]
        );
    }
    let s0 = &v["new_connections"]["s0"];
    println!(
        "| new connections (S0) | {:.0} | | | {} |",
        num(&s0["per_sec"]),
        s0["failed"]
    );
    println!();
    let idle = &v["idle"];
    println!(
        "| ztunnel | RSS idle, MiB | RSS with {} idle connections, MiB | bytes per connection |",
        idle["connections"]
    );
    println!("|---------|--------------:|------:|------:|");
    for (i, side) in ["node-1 (client side)", "node-2 (server side)"]
        .iter()
        .enumerate()
    {
        println!(
            "| {side} | {:.1} | {:.1} | {:.0} |",
            mib(idle["rss_idle_bytes"][i].as_u64().unwrap_or(0)),
            mib(idle["rss_loaded_bytes"][i].as_u64().unwrap_or(0)),
            num(&idle["bytes_per_connection"][i])
        );
    }
}

/// A JSON number as f64 (NaN when absent or null).
pub(crate) fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}
