//! Process logging for Weft's long-running binaries (controller, node agent, ztunnel): a
//! `tracing` subscriber on stderr whose filter can be changed at run time (ztunnel's admin
//! `/logging?level=…`, as Istio's ztunnel and Envoy offer).
//!
//! The filter uses `RUST_LOG` syntax (`info`, `ztunnel=debug,info`, …); the default is
//! `RUST_LOG` or `info`. Processes that never call [`init`] (tests embedding a component)
//! report that logging is not adjustable.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Installs the global subscriber (stderr, reloadable filter).
pub fn init() {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if tracing_subscriber::registry()
        .with(layer)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = CONTROL.set(Control {
            handle,
            current: Mutex::new(initial),
        });
    }
}

/// The filter in force, or `None` when [`init`] was not called.
pub fn current() -> Option<String> {
    let control = CONTROL.get()?;
    control.current.lock().ok().map(|c| c.clone())
}

/// Replaces the filter with `directives` (`RUST_LOG` syntax).
///
/// # Errors
/// A message naming the bad directive, or saying logging is not adjustable in this process.
pub fn set(directives: &str) -> Result<(), String> {
    let control = CONTROL
        .get()
        .ok_or_else(|| "logging is not adjustable in this process".to_owned())?;
    let filter = EnvFilter::try_new(directives)
        .map_err(|e| format!("invalid log level {directives:?}: {e}"))?;
    control
        .handle
        .reload(filter)
        .map_err(|e| format!("reloading the log filter: {e}"))?;
    if let Ok(mut current) = control.current.lock() {
        directives.clone_into(&mut current);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_changes_at_run_time_and_bad_levels_are_named() {
        init();
        // Another test in this binary may have installed a subscriber first; then logging is
        // not adjustable and says so.
        let Some(initial) = current() else {
            assert_eq!(
                set("debug").unwrap_err(),
                "logging is not adjustable in this process"
            );
            return;
        };
        assert!(!initial.is_empty());
        set("ztunnel=debug,info").unwrap();
        assert_eq!(current().as_deref(), Some("ztunnel=debug,info"));
        let err = set("ztunnel=notalevel").unwrap_err();
        assert!(
            err.starts_with("invalid log level \"ztunnel=notalevel\""),
            "{err}"
        );
        assert_eq!(
            current().as_deref(),
            Some("ztunnel=debug,info"),
            "unchanged on error"
        );
    }
}
