//! `weft-bench`: Weft's benchmark suite (issue 9). `weft-bench run [--quick] [--scenario …]`
//! runs every scenario (or the listed ones), prints each one's Markdown tables and then issue 9's
//! targets with met/gap, writes each scenario's JSON to `bench/results/<scenario>-<unix-time>.json`
//! and a summary to `run-<unix-time>.json`, and exits non-zero when a scenario failed or produced a
//! missing or NaN figure. Each scenario is also a subcommand:
//!
//! * `hbone`: single-stream loopback throughput of plain TCP, plain mTLS and HBONE.
//! * `controller`: the control plane on a synthetic cluster: full translation time,
//!   change-to-delta latency with N connected delta ADS clients, resident memory.
//! * `latency`, `waypoint`, `mesh` (root): on one shared 2-node local cluster ([`testbed`]) with
//!   S0 (no mesh), L4 (two ztunnels) and L7 (+ waypoint) side by side: fixed-rate latency and the
//!   proxies' CPU and memory at 1,000 requests/s; requests/s per waypoint core; L4 throughput,
//!   requests/s and new connections/s per ztunnel core, and memory per idle connection.
//!
//! The list of scenarios, their required figures and the targets are in [`suite`].

// A benchmark's report is its output: printing the result table to stdout is the point of this
// binary, so the workspace's `print_stdout` lint does not apply here.
#![allow(clippy::print_stdout)]

mod controller;
mod engine;
mod hbone;
mod kube_pods;
mod latency;
mod load;
mod mesh;
mod procfs;
mod report;
mod scale;
mod suite;
mod testbed;
mod waypoint;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

use suite::Outcome;
use testbed::Testbed;

/// Tokio worker threads for the in-process scenarios: sender, proxies and receiver share them.
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
    /// The suite: every scenario (or those of --scenario), then issue 9's targets.
    Run(RunArgs),
    /// Single-stream loopback throughput: plain TCP vs plain mTLS vs HBONE.
    Hbone(hbone::Args),
    /// Control plane: full translation, change-to-delta latency with N ADS clients, memory.
    Controller(controller::Args),
    /// Fixed-rate latency through S0, L4 and L7; proxy CPU/RSS at that rate (root).
    Latency {
        #[command(flatten)]
        testbed: testbed::Args,
        #[command(flatten)]
        args: latency::Args,
    },
    /// Requests/s per waypoint core through L7 (root).
    Waypoint {
        #[command(flatten)]
        testbed: testbed::Args,
        #[command(flatten)]
        args: waypoint::Args,
    },
    /// L4 vs no mesh: throughput, requests/s and connections/s per core, idle memory (root).
    Mesh {
        #[command(flatten)]
        testbed: testbed::Args,
        #[command(flatten)]
        args: mesh::Args,
    },
    /// Config scale: controller and real-ztunnel memory and apply time at 10k/100k workloads.
    Scale(scale::Args),
    /// The waypoint's HTTP stack vs Envoy as an HTTP router, same routes, loopback, 1 worker each.
    Engine(engine::Args),
    /// Real Kubernetes: N pods created through the API until in every ztunnel's config (root).
    KubePods(kube_pods::Args),
}

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// CI size: every scenario for about a second per measurement (small counts); every figure
    /// is still produced. Overrides the scenarios' size options.
    #[arg(long)]
    quick: bool,

    /// Scenarios to run, comma-separated [default: all, in the suite's order].
    #[arg(long, value_delimiter = ',', value_parser = scenario_name)]
    scenario: Vec<String>,

    #[command(flatten, next_help_heading = "hbone")]
    hbone: hbone::Args,

    #[command(flatten, next_help_heading = "cluster scenarios")]
    testbed: testbed::Args,

    #[command(flatten, next_help_heading = "latency")]
    latency: latency::Args,

    #[command(flatten, next_help_heading = "waypoint")]
    waypoint: waypoint::Args,

    #[command(flatten, next_help_heading = "mesh")]
    mesh: mesh::Args,

    #[command(flatten, next_help_heading = "kube-pods")]
    kube_pods: kube_pods::Args,
}

fn scenario_name(name: &str) -> Result<String, String> {
    match suite::scenario(name) {
        Some(_) => Ok(name.to_owned()),
        None => Err(format!(
            "unknown scenario {name:?}; known: {}",
            suite::SCENARIOS
                .iter()
                .map(|s| format!("{} ({})", s.name, s.about))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

fn default_results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()?;
    let dir = &cli.results_dir;
    let timestamp = report::unix_time();
    match cli.command {
        Command::Run(args) => return run_suite(&runtime, args, dir),
        Command::Hbone(args) => {
            run_hbone(&runtime, &args, dir)?;
        }
        Command::Controller(args) => {
            run_controller(&runtime, &args, dir)?;
        }
        Command::Scale(args) => {
            run_scale(&runtime, &args, dir)?;
        }
        Command::Engine(args) => {
            run_engine(&args, dir)?;
        }
        Command::KubePods(args) => {
            run_kube_pods(&args, dir)?;
        }
        Command::Latency { testbed, args } => {
            let bed = Testbed::up(&testbed)?;
            write(dir, "latency", latency::run(&bed, &args)?, timestamp)?;
        }
        Command::Waypoint { testbed, args } => {
            let bed = Testbed::up(&testbed)?;
            write(dir, "waypoint", waypoint::run(&bed, &args)?, timestamp)?;
        }
        Command::Mesh { testbed, args } => {
            let bed = Testbed::up(&testbed)?;
            write(dir, "mesh", mesh::run(&bed, &args)?, timestamp)?;
        }
    }
    println!();
    println!("{}", report::machine_line());
    Ok(ExitCode::SUCCESS)
}

/// `run`: the selected scenarios in the suite's order (one local cluster for all cluster
/// scenarios), the targets table, the summary JSON; failure when any scenario failed or produced
/// a missing/NaN figure.
fn run_suite(runtime: &Runtime, mut args: RunArgs, dir: &Path) -> Result<ExitCode> {
    if args.quick {
        args.hbone.bytes = 64 << 20;
        args.hbone.runs = 1;
        args.latency.quick();
        args.waypoint.quick();
        args.mesh.quick();
    }
    let selected = |name: &str| args.scenario.is_empty() || args.scenario.iter().any(|s| s == name);
    let timestamp = report::unix_time();
    let started = Instant::now();
    let mut bed: Option<Result<Testbed, String>> = None;
    let mut results: Vec<(&str, Outcome)> = Vec::new();
    for scenario in suite::SCENARIOS {
        if !selected(scenario.name) {
            results.push((scenario.name, Outcome::Skipped));
            continue;
        }
        eprintln!("== scenario {}", scenario.name);
        let scenario_started = Instant::now();
        let result = if scenario.cluster {
            let bed = bed.get_or_insert_with(|| {
                Testbed::up(&args.testbed).map_err(|err| format!("local cluster: {err:#}"))
            });
            match bed {
                Ok(bed) => run_on_cluster(scenario.name, bed, &args),
                Err(err) => Err(anyhow::anyhow!("{err}")),
            }
        } else {
            run_in_process(scenario.name, runtime, &args, dir)
        };
        let result = result.and_then(|value| {
            if scenario.cluster {
                write(dir, scenario.name, value.clone(), timestamp)?;
            }
            Ok(value)
        });
        println!();
        let outcome = match result {
            Ok(value) => {
                let problems = suite::check(scenario, &value);
                Outcome::Ran(value, problems)
            }
            Err(err) => {
                eprintln!("scenario {} failed: {err:#}", scenario.name);
                Outcome::Failed(format!("{err:#}"))
            }
        };
        eprintln!(
            "== scenario {} done in {:.1} s",
            scenario.name,
            scenario_started.elapsed().as_secs_f64()
        );
        results.push((scenario.name, outcome));
    }
    drop(bed);

    println!(
        "## weft-bench run: issue 9's targets{}",
        if args.quick {
            " (--quick: sizes too small for the verdicts to mean anything)"
        } else {
            ""
        }
    );
    println!();
    print!("{}", suite::targets_table(&results));
    println!();
    let mut failures = Vec::new();
    let mut statuses = serde_json::Map::new();
    for (name, outcome) in &results {
        let status = match outcome {
            Outcome::Ran(_, problems) if problems.is_empty() => json!("ok"),
            Outcome::Ran(_, problems) => {
                failures.push(format!("{name}: bad figures: {}", problems.join("; ")));
                json!({"bad_figures": problems})
            }
            Outcome::Failed(err) => {
                failures.push(format!("{name}: failed: {err}"));
                json!({"failed": err})
            }
            Outcome::Skipped => json!("skipped"),
        };
        statuses.insert((*name).to_owned(), status);
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("{}", report::machine_line());
    println!(
        "build: {}; {}; {elapsed:.0} s",
        report::build_profile(),
        if args.quick { "--quick" } else { "full run" }
    );
    let summary = json!({
        "quick": args.quick,
        "elapsed_secs": elapsed,
        "scenarios": statuses,
        "targets": suite::targets_json(&results),
    });
    write(dir, "run", summary, timestamp)?;
    if failures.is_empty() {
        println!("all scenarios ran and produced their figures");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAILED:");
        for failure in &failures {
            println!("* {failure}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// Runs a cluster scenario on the shared testbed; returns its JSON.
fn run_on_cluster(name: &str, bed: &Testbed, args: &RunArgs) -> Result<Value> {
    match name {
        "latency" => latency::run(bed, &args.latency),
        "waypoint" => waypoint::run(bed, &args.waypoint),
        "mesh" => mesh::run(bed, &args.mesh),
        other => anyhow::bail!("no runner for cluster scenario {other}"),
    }
}

/// Runs an in-process scenario (it writes its own JSON); returns its JSON.
fn run_in_process(name: &str, runtime: &Runtime, args: &RunArgs, dir: &Path) -> Result<Value> {
    let path = match name {
        "hbone" => run_hbone(runtime, &args.hbone, dir)?,
        "controller" => {
            let controller = controller::Args {
                pods: None,
                services: None,
                policies: None,
                clients: None,
                quick: args.quick,
                full_translation: false,
            };
            run_controller(runtime, &controller, dir)?
        }
        "scale" => {
            let scale = scale::Args {
                workloads: Vec::new(),
                ztunnel: None,
                quick: args.quick,
            };
            run_scale(runtime, &scale, dir)?
        }
        "engine" => {
            #[derive(clap::Parser)]
            struct Defaults {
                #[command(flatten)]
                engine: engine::Args,
            }
            let mut engine = <Defaults as clap::Parser>::try_parse_from(["engine"])?.engine;
            engine.quick = args.quick;
            run_engine(&engine, dir)?
        }
        "kube-pods" => {
            let mut kube = args.kube_pods.clone();
            kube.quick = args.quick;
            run_kube_pods(&kube, dir)?
        }
        other => anyhow::bail!("no runner for scenario {other}"),
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn write(dir: &Path, scenario: &str, value: Value, timestamp: u64) -> Result<()> {
    let path = report::write_json(scenario, value, dir, timestamp)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn run_hbone(runtime: &Runtime, args: &hbone::Args, results_dir: &Path) -> Result<PathBuf> {
    let result = runtime.block_on(hbone::run(args))?;
    report::print_hbone(&result);
    let path = report::write_hbone_json(&result, results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(path)
}

fn run_controller(
    runtime: &Runtime,
    args: &controller::Args,
    results_dir: &Path,
) -> Result<PathBuf> {
    let result = runtime.block_on(controller::run(args))?;
    controller::print(&result);
    let path = controller::write_json(&result, results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(path)
}

fn run_scale(runtime: &Runtime, args: &scale::Args, results_dir: &Path) -> Result<PathBuf> {
    let result = runtime.block_on(scale::run(args))?;
    scale::print(&result);
    let path = scale::write_json(&result, results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(path)
}

fn run_kube_pods(args: &kube_pods::Args, results_dir: &Path) -> Result<PathBuf> {
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("executable directory")?
        .to_path_buf();
    let result = kube_pods::run(args, &exe_dir)?;
    kube_pods::print(&result);
    let path = report::write_json("kube-pods", result, results_dir, report::unix_time())?;
    eprintln!("wrote {}", path.display());
    Ok(path)
}

fn run_engine(args: &engine::Args, results_dir: &Path) -> Result<PathBuf> {
    let result = engine::run(args, &std::env::temp_dir().join("weft-bench-engine"))?;
    engine::print(&result);
    let path = engine::write_json(&result, results_dir)?;
    eprintln!("wrote {}", path.display());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn command_line_is_consistent() {
        // Clap's own checks (unique argument ids and flags across the flattened scenario options).
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["weft-bench", "run", "--quick", "--scenario", "mesh,latency"])
                .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert!(args.quick);
        assert_eq!(args.scenario, ["mesh", "latency"]);
        assert_eq!(args.latency.connections, [1, 16, 64]);
        assert!(Cli::try_parse_from(["weft-bench", "run", "--scenario", "nope"]).is_err());
    }
}
