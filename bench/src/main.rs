//! `weft-bench`: Weft benchmarks, one scenario per subcommand.
//!
//! * `hbone`: single-stream loopback throughput of plain TCP, plain mTLS and HBONE.
//! * `controller`: the control plane on a synthetic cluster: full translation time,
//!   change-to-delta latency with N connected delta ADS clients, resident memory.
//! * `mesh`: the L4 mesh on a 2-node local cluster vs the same pods without it: cross-node
//!   throughput, fixed-rate 1 KiB latency, ztunnel memory per idle proxied connection (root).
//! * `waypoint`: the L7 path (ztunnel → waypoint → ztunnel) vs the L4 path on the local
//!   cluster: added latency at a fixed rate, waypoint CPU and memory, requests/s per waypoint
//!   core (root).
//! * `run`: every scenario in turn (`hbone`, `controller`, `mesh`, then `waypoint`).
//!
//! Results go to stdout as a Markdown table and to `bench/results/<scenario>-<unix-time>.json`.

// A benchmark's report is its output: printing the result table to stdout is the point of this
// binary, so the workspace's `print_stdout` lint does not apply here.
#![allow(clippy::print_stdout)]

mod controller;
mod engine;
mod hbone;
mod mesh;
mod report;
mod waypoint;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use tokio::runtime::Runtime;

/// Tokio worker threads for every scenario: sender, proxies and receiver share them.
const WORKER_THREADS: usize = 2;

#[derive(Debug, Parser)]
#[command(name = "weft-bench", version, about = "Weft benchmarks")]
struct Cli {
    /// Directory the JSON results are written to.
    #[arg(long, global = true, default_value_os_t = default_results_dir())]
    results_dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Single-stream loopback throughput: plain TCP vs plain mTLS vs HBONE.
    Hbone(hbone::Args),
    /// Control plane: full translation, change-to-delta latency with N ADS clients, memory.
    Controller(controller::Args),
    /// The L4 mesh on the local cluster vs no mesh: throughput, latency, ztunnel memory (root).
    Mesh(mesh::Args),
    /// The L7 path through a waypoint vs the L4 path: latency, waypoint CPU/memory, req/s per core (root).
    Waypoint(waypoint::Args),
    /// Every scenario in turn: hbone, controller, mesh, then waypoint.
    Run(RunArgs),
    /// The waypoint's HTTP stack vs Envoy as an HTTP router, same routes, loopback, 1 worker each.
    Engine(engine::Args),
}

/// Arguments of `run`: those of every scenario it runs.
#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten, next_help_heading = "hbone")]
    hbone: hbone::Args,

    #[command(flatten, next_help_heading = "controller")]
    controller: controller::Args,

    #[command(flatten, next_help_heading = "mesh")]
    mesh: mesh::Args,

    #[command(flatten, next_help_heading = "waypoint")]
    waypoint: waypoint::Args,
}

fn default_results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Hbone(args) => run_hbone(&runtime, &args, &cli.results_dir),
        Command::Controller(args) => run_controller(&runtime, &args, &cli.results_dir),
        Command::Mesh(args) => run_mesh(&args, &cli.results_dir),
        Command::Waypoint(args) => run_waypoint(&args, &cli.results_dir),
        Command::Engine(args) => run_engine(&args, &cli.results_dir),
        Command::Run(args) => {
            run_hbone(&runtime, &args.hbone, &cli.results_dir)?;
            println!();
            run_controller(&runtime, &args.controller, &cli.results_dir)?;
            println!();
            run_mesh(&args.mesh, &cli.results_dir)?;
            println!();
            run_waypoint(&args.waypoint, &cli.results_dir)
        }
    }
}

fn run_hbone(runtime: &Runtime, args: &hbone::Args, results_dir: &Path) -> anyhow::Result<()> {
    let result = runtime.block_on(hbone::run(args))?;
    report::print_hbone(&result);
    let path = report::write_hbone_json(&result, results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn run_mesh(args: &mesh::Args, results_dir: &Path) -> anyhow::Result<()> {
    let result = mesh::run(args)?;
    mesh::print(&result);
    let path = mesh::write_json(&result, results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn run_waypoint(args: &waypoint::Args, results_dir: &Path) -> anyhow::Result<()> {
    let result = waypoint::run(args)?;
    waypoint::print(&result);
    let path = waypoint::write_json(&result, results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn run_controller(
    runtime: &Runtime,
    args: &controller::Args,
    results_dir: &Path,
) -> anyhow::Result<()> {
    let result = runtime.block_on(controller::run(args))?;
    controller::print(&result);
    let path = controller::write_json(&result, results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn run_engine(args: &engine::Args, results_dir: &Path) -> anyhow::Result<()> {
    let result = engine::run(args, &std::env::temp_dir().join("weft-bench-engine"))?;
    engine::print(&result);
    let path = engine::write_json(&result, results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
