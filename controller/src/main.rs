//! `weft-controller`: Weft's control plane.

use clap::Parser;
use weft_controller::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _logs = weft_core::logging::init();
    let config = Config::parse();
    weft_controller::app::run(config, weft_core::process::shutdown_signal()).await?;
    Ok(())
}
