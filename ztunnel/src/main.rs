//! `ztunnel`: Weft's node L4 proxy.

use clap::Parser;
use weft_core::process;
use ztunnel::config::Config;

fn main() -> anyhow::Result<()> {
    let _logs = weft_core::logging::init();
    let config = Config::parse();
    let runtime = process::runtime(config.worker_threads, "ztunnel")?;
    runtime.block_on(ztunnel::app::run(config, process::shutdown_signal()))?;
    Ok(())
}
