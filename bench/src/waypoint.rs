//! `waypoint`: the waypoint's maximum request rate per core on the shared [`Testbed`]'s L7 path
//! (client ztunnel → waypoint → server ztunnel, Service VIP, cross-node).
//!
//! Closed loop, HTTP/1.1 (`--waypoint-max-connections` keep-alive connections, one blocking
//! thread each) and h2c (`weft-echo`'s hyper client, the same number of connections), 1 KiB
//! `POST`s for `--waypoint-max-secs`: requests completed / waypoint CPU-seconds, so the figure
//! does not depend on how much of the machine the load generator and the ztunnels take. The
//! waypoint's latency and its CPU and memory at 1,000 requests/s are in the `latency` scenario.

use anyhow::Result;
use serde_json::{Value, json};

use crate::load::{self, Closed};
use crate::mesh::num;
use crate::procfs::cpu_seconds;
use crate::testbed::Testbed;

/// Arguments of `waypoint`.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "waypoint_args")]
pub(crate) struct Args {
    /// Connections of the closed-loop runs [quick: 8].
    #[arg(
        id = "waypoint_max_connections",
        long = "waypoint-max-connections",
        default_value_t = 32
    )]
    pub(crate) max_connections: u32,
    /// Seconds of each closed-loop run [quick: 1].
    #[arg(
        id = "waypoint_max_secs",
        long = "waypoint-max-secs",
        default_value_t = 10
    )]
    pub(crate) max_secs: u64,
}

impl Args {
    pub(crate) fn quick(&mut self) {
        self.max_connections = 8;
        self.max_secs = 1;
    }
}

/// Runs the scenario and prints its table; returns its JSON.
///
/// # Errors
/// Connecting, the waypoint gone.
pub(crate) fn run(bed: &Testbed, args: &Args) -> Result<Value> {
    let l7 = &bed.l7;
    let (conns, secs) = (args.max_connections, args.max_secs);
    let per_core = |name: &str, f: &dyn Fn() -> Result<Closed>| -> Result<Value> {
        let before = cpu_seconds(bed.waypoint)?;
        let closed = f()?;
        let cpu = cpu_seconds(bed.waypoint)? - before;
        eprintln!(
            "{name} through L7: {} done, {} failed, {:.0}/s, waypoint CPU {cpu:.2} s",
            closed.done,
            closed.failed,
            closed.per_sec()
        );
        Ok(json!({
            "done": closed.done, "failed": closed.failed, "wall_secs": closed.wall_secs,
            "per_sec": closed.per_sec(), "waypoint_cpu_secs": cpu,
            "per_core": closed.done as f64 / cpu,
        }))
    };
    let h1 = per_core("h1 requests", &|| {
        load::closed_loop_h1(&l7.client_netns, l7.vip, conns, secs)
    })?;
    let h2 = per_core("h2 requests", &|| {
        load::closed_loop_h2(&l7.client_netns, l7.vip, conns, secs)
    })?;
    let value = json!({
        "parameters": {
            "max_connections": conns, "max_secs": secs, "request_bytes": load::REQUEST_BYTES,
        },
        "requests_per_core": {"h1": h1, "h2": h2},
    });
    println!("## weft-bench waypoint: requests/s per waypoint core (L7 path, closed loop)");
    println!();
    println!("{conns} connections, {secs} s, 1 KiB POST through ztunnel → waypoint → ztunnel.");
    println!();
    println!(
        "| load | requests/s (wall) | waypoint CPU-s | requests/s per waypoint core | failed |"
    );
    println!(
        "|------|------------------:|---------------:|-----------------------------:|-------:|"
    );
    for (name, r) in [
        ("HTTP/1.1", &value["requests_per_core"]["h1"]),
        ("h2c", &value["requests_per_core"]["h2"]),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.0} | {} |",
            num(&r["per_sec"]),
            num(&r["waypoint_cpu_secs"]),
            num(&r["per_core"]),
            r["failed"]
        );
    }
    Ok(value)
}
