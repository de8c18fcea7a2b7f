//! `weft-bench`: Weft data-plane benchmarks, one scenario per subcommand.
//!
//! * `hbone`: single-stream loopback throughput of plain TCP, plain mTLS and HBONE.
//! * `run`: every scenario in turn (for now only `hbone`).
//!
//! Results go to stdout as a Markdown table and to `bench/results/<scenario>-<unix-time>.json`.

// A benchmark's report is its output: printing the result table to stdout is the point of this
// binary, so the workspace's `print_stdout` lint does not apply here.
#![allow(clippy::print_stdout)]

mod hbone;
mod report;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Tokio worker threads for every scenario: sender, proxies and receiver share them.
const WORKER_THREADS: usize = 2;

#[derive(Debug, Parser)]
#[command(name = "weft-bench", version, about = "Weft data-plane benchmarks")]
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
    /// Every scenario in turn (for now: hbone).
    Run(RunArgs),
}

/// Arguments of `run`: those of every scenario it runs.
#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    hbone: hbone::Args,
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
    let hbone_args = match cli.command {
        Command::Hbone(args) => args,
        Command::Run(args) => args.hbone,
    };
    let result = runtime.block_on(hbone::run(&hbone_args))?;
    report::print_hbone(&result);
    let path = report::write_hbone_json(&result, &cli.results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
