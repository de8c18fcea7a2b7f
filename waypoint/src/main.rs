//! `waypoint`: Weft's waypoint (L7 proxy).
//!
//! `waypoint bench-serve …` (hidden, benchmarks only) runs [`waypoint::standalone`] instead: the
//! same HTTP stack on plain TCP with a static configuration.

use clap::Parser;
use waypoint::config::Config;
use weft_core::process::{self, shutdown_signal};

fn main() -> anyhow::Result<()> {
    let _logs = weft_core::logging::init();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "bench-serve")
    {
        let config = waypoint::standalone::Config::parse_from(std::env::args_os().skip(1));
        let runtime = process::runtime(config.worker_threads, "waypoint")?;
        runtime.block_on(waypoint::standalone::run(config, shutdown_signal()))?;
        return Ok(());
    }
    let config = Config::parse();
    let runtime = process::runtime(config.worker_threads, "waypoint")?;
    runtime.block_on(waypoint::app::run(config, shutdown_signal()))?;
    Ok(())
}
