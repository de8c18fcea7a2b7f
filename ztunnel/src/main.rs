//! `ztunnel`: Weft's node L4 proxy.

use clap::Parser;
use ztunnel::config::Config;

fn main() -> anyhow::Result<()> {
    let _logs = weft_core::logging::init();
    let config = Config::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.max(1))
        .thread_name("ztunnel")
        .enable_all()
        .build()?;
    runtime.block_on(async {
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
        ztunnel::app::run(config, shutdown).await
    })?;
    Ok(())
}
