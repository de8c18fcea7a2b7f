//! `weft-controller`: Weft's control plane.

use clap::Parser;
use weft_controller::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _logs = weft_core::logging::init();
    let config = Config::parse();
    let shutdown = async {
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
    };
    weft_controller::app::run(config, shutdown).await?;
    Ok(())
}
