//! `latency`: fixed-rate 1 KiB HTTP/1.1 latency through S0, L4 and L7 on the shared [`Testbed`],
//! and what the proxies spend sustaining that rate.
//!
//! For each connection count of `--connections` (1, 16, 64), each path's client pod sends
//! `POST /bench` with a 1 KiB body to its Service VIP (server on node-2) at `--rate` requests/s
//! spread evenly over the connections, open loop ([`load::fixed_rate_over`]: latency from each
//! request's scheduled time, so stalls count against the requests queued behind them). Per
//! connection count: a 1 s warm-up per path (discarded), then two rounds of `--latency-secs / 2`
//! alternating the paths. Reported: p50/p90/p99/p99.9/max per path, L4 − S0, L7 − S0, L7 − L4.
//! S0 and L4 are also measured same-node: to the node-1 `server-local` pod's IP (port 8080).
//!
//! During the L4 runs at `--resource-connections` (16) both ztunnels' CPU-seconds and peak RSS
//! (VmHWM, reset just before) are read; during the L7 runs the waypoint's. Cores = CPU-seconds /
//! wall seconds of those runs.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde_json::{Map, Value, json};

use crate::load::{self, Latency};
use crate::mesh::num;
use crate::procfs::{cpu_seconds_all, mb, peak_rss_bytes, reset_peak};
use crate::testbed::{Path, Testbed};

/// Arguments of `latency`.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "latency_args")]
pub(crate) struct Args {
    /// Requests per second of every fixed-rate run.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u32,
    /// Connection counts the rate is spread over, one measurement each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64])]
    pub(crate) connections: Vec<u32>,
    /// Seconds per path and connection count (two alternating rounds of half) [quick: 1].
    #[arg(long, default_value_t = 10)]
    pub(crate) latency_secs: u64,
    /// The connection count during which the proxies' CPU and peak RSS are read.
    #[arg(long, default_value_t = 16)]
    pub(crate) resource_connections: u32,
}

impl Args {
    pub(crate) fn quick(&mut self) {
        self.latency_secs = 1;
    }
}

/// Proxy CPU-seconds and wall seconds accumulated over some runs.
#[derive(Default)]
struct Usage {
    cpu: f64,
    wall: f64,
}

/// Runs the scenario and prints its tables; returns its JSON.
///
/// # Errors
/// Connecting, the proxies gone.
pub(crate) fn run(bed: &Testbed, args: &Args) -> Result<Value> {
    // S0, L4, L7 to the node-2 server's VIP; then S0 and L4 to the node-1 server's pod IP.
    let same = |p: &Path| -> Result<(&'static str, String, SocketAddr)> {
        let ip = p
            .local_server_ip
            .as_deref()
            .context("no same-node server")?;
        Ok((p.ns, p.client_netns.clone(), format!("{ip}:8080").parse()?))
    };
    let cross = |p: &Path| (p.ns, p.client_netns.clone(), p.vip);
    let paths = [
        cross(&bed.s0),
        cross(&bed.l4),
        cross(&bed.l7),
        same(&bed.s0)?,
        same(&bed.l4)?,
    ];
    let half = args.latency_secs.div_ceil(2).max(1);
    let mut grid = Map::new();
    let (mut zt_usage, mut wp_usage) = (Usage::default(), Usage::default());
    let (mut zt_peak, mut wp_peak) = ([0u64; 2], 0u64);
    for &conns in &args.connections {
        let measure = conns == args.resource_connections;
        for (_, netns, addr) in &paths {
            load::fixed_rate_over(
                load::open_http(netns, *addr, conns)?,
                args.rate,
                1,
                load::post,
            )?;
        }
        if measure {
            for &pid in bed.ztunnels.iter().chain([&bed.waypoint]) {
                reset_peak(pid)?;
            }
        }
        let mut samples: [(Vec<_>, usize); 5] = Default::default();
        for round in 1..=2 {
            for (i, (ns, netns, addr)) in paths.iter().enumerate() {
                let open = load::open_http(netns, *addr, conns)?;
                let watched: &[i32] = match (measure, i) {
                    (true, 1) => &bed.ztunnels,
                    (true, 2) => std::slice::from_ref(&bed.waypoint),
                    _ => &[],
                };
                let cpu_before = cpu_seconds_all(watched)?;
                let started = Instant::now();
                let (s, e) = load::fixed_rate_over(open, args.rate, half, load::post)?;
                let usage = Usage {
                    cpu: cpu_seconds_all(watched)? - cpu_before,
                    wall: started.elapsed().as_secs_f64(),
                };
                match (measure, i) {
                    (true, 1) => {
                        zt_usage.cpu += usage.cpu / 2.0;
                        zt_usage.wall += usage.wall;
                    }
                    (true, 2) => {
                        wp_usage.cpu += usage.cpu;
                        wp_usage.wall += usage.wall;
                    }
                    _ => {}
                }
                let placement = if i < 3 { "cross-node" } else { "same-node" };
                eprintln!(
                    "latency {conns} conns {ns} {placement} round {round}: {} samples, {e} errors",
                    s.len()
                );
                samples[i].0.extend(s);
                samples[i].1 += e;
            }
        }
        if measure {
            zt_peak = [
                peak_rss_bytes(bed.ztunnels[0])?,
                peak_rss_bytes(bed.ztunnels[1])?,
            ];
            wp_peak = peak_rss_bytes(bed.waypoint)?;
        }
        let [s0, l4, l7, s0_same, l4_same] = samples.map(|(s, e)| Latency::from_samples(s, e));
        grid.insert(
            format!("c{conns}"),
            json!({
                "connections": conns,
                "s0": s0.json(), "l4": l4.json(), "l7": l7.json(),
                "l4_added": l4.added_json(&s0), "l7_added": l7.added_json(&s0),
                "l7_over_l4": l7.added_json(&l4),
                "s0_same": s0_same.json(), "l4_same": l4_same.json(),
                "l4_same_added": l4_same.added_json(&s0_same),
            }),
        );
    }
    let cores = |u: &Usage| {
        if u.wall > 0.0 {
            u.cpu / u.wall
        } else {
            f64::NAN
        }
    };
    let value = json!({
        "parameters": {
            "rate": args.rate, "connections": args.connections, "latency_secs": args.latency_secs,
            "request_bytes": load::REQUEST_BYTES, "resource_connections": args.resource_connections,
        },
        "grid": grid,
        "ztunnel_at_rate": {
            // Mean of the two ztunnels (client and server side) per wall second.
            "cores": cores(&zt_usage),
            "peak_rss_bytes": zt_peak,
            "peak_rss_mb_max": mb(zt_peak[0].max(zt_peak[1])),
        },
        "waypoint_at_rate": {
            "cores": cores(&wp_usage),
            "peak_rss_bytes": wp_peak,
            "peak_rss_mb": mb(wp_peak),
        },
    });
    print(&value, args);
    Ok(value)
}

fn print(v: &Value, args: &Args) {
    println!("## weft-bench latency: fixed-rate 1 KiB HTTP/1.1 through S0, L4 and L7");
    println!();
    println!(
        "Client pod on node-1 → Service VIP → server on node-2; {} req/s open loop, {} s per path \
         and connection count (two alternating rounds after a 1 s warm-up). Milliseconds.",
        args.rate, args.latency_secs
    );
    for &conns in &args.connections {
        let g = &v["grid"][format!("c{conns}")];
        println!();
        println!("{conns} connection(s):");
        println!();
        println!("| percentile | S0 | L4 | L7 | L4 − S0 | L7 − S0 | L7 − L4 |");
        println!("|------------|---:|---:|---:|--------:|--------:|--------:|");
        for key in ["p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms"] {
            println!(
                "| {} | {:.3} | {:.3} | {:.3} | {:+.3} | {:+.3} | {:+.3} |",
                key.trim_end_matches("_ms").replace('_', "."),
                num(&g["s0"][key]),
                num(&g["l4"][key]),
                num(&g["l7"][key]),
                num(&g["l4_added"][key]),
                num(&g["l7_added"][key]),
                num(&g["l7_over_l4"][key]),
            );
        }
        println!(
            "| samples / errors | {} / {} | {} / {} | {} / {} | | | |",
            g["s0"]["samples"],
            g["s0"]["errors"],
            g["l4"]["samples"],
            g["l4"]["errors"],
            g["l7"]["samples"],
            g["l7"]["errors"]
        );
        println!();
        println!("same node (server-local on node-1, pod IP), {conns} connection(s):");
        println!();
        println!("| percentile | S0 | L4 | L4 − S0 |");
        println!("|------------|---:|---:|--------:|");
        for key in ["p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms"] {
            println!(
                "| {} | {:.3} | {:.3} | {:+.3} |",
                key.trim_end_matches("_ms").replace('_', "."),
                num(&g["s0_same"][key]),
                num(&g["l4_same"][key]),
                num(&g["l4_same_added"][key]),
            );
        }
    }
    println!();
    println!(
        "| proxy at {} req/s ({} connections) | CPU cores | peak RSS, MB |",
        args.rate, args.resource_connections
    );
    println!("|------|---------:|-------------:|");
    let z = &v["ztunnel_at_rate"];
    println!(
        "| ztunnel (mean of node-1 and node-2; peak of the larger) | {:.3} | {:.1} |",
        num(&z["cores"]),
        num(&z["peak_rss_mb_max"])
    );
    let w = &v["waypoint_at_rate"];
    println!(
        "| waypoint | {:.3} | {:.1} |",
        num(&w["cores"]),
        num(&w["peak_rss_mb"])
    );
}
