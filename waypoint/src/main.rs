//! `waypoint`: Weft's waypoint (L7 proxy).
//!
//! `waypoint bench-serve …` (hidden, benchmarks only) runs [`waypoint::standalone`] instead: the
//! same HTTP stack on plain TCP with a static configuration.

use clap::Parser;
use waypoint::config::Config;

fn main() -> anyhow::Result<()> {
    let _logs = weft_core::logging::init();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "bench-serve")
    {
        let config = waypoint::standalone::Config::parse_from(std::env::args_os().skip(1));
        let runtime = runtime(config.worker_threads)?;
        runtime.block_on(waypoint::standalone::run(config, shutdown()))?;
        return Ok(());
    }
    let config = Config::parse();
    let runtime = runtime(config.worker_threads)?;
    runtime.block_on(waypoint::app::run(config, shutdown()))?;
    Ok(())
}

fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .thread_name("waypoint")
        .enable_all()
        .build()
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
