//! Process logging for Weft's long-running binaries (controller, node agent, ztunnel): a
//! `tracing` subscriber on stderr whose filter can be changed at run time (ztunnel's admin
//! `/logging?level=…`, as Istio's ztunnel and Envoy offer).
//!
//! The filter uses `RUST_LOG` syntax (`info`, `ztunnel=debug,info`, …); the default is
//! `RUST_LOG` or `info`. Processes that never call [`init`] (tests embedding a component)
//! report that logging is not adjustable.
//!
//! Output is buffered, as Envoy buffers its file access log: `INFO` and lower events (the
//! waypoint's per-request `access` events among them) are appended to an in-memory buffer that
//! is written out when it reaches [`BUFFER_BYTES`], every [`FLUSH_INTERVAL`], before any `WARN`
//! or `ERROR` event (which is written at once, so problems are never delayed), and when the guard [`init`]
//! returns drops at the end of `main`. A per-event `write(2)` to stderr was about an eighth of the waypoint's CPU per
//! request. Colours (ANSI escapes) are used only when stderr is a terminal.

use std::io::{IsTerminal as _, Write};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Buffered output is written out once it holds this many bytes.
pub const BUFFER_BYTES: usize = 64 * 1024;

/// Buffered output is written out at least this often.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The process-wide stderr buffer.
static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Writes out whatever log output is buffered. Called by the flusher thread, before `WARN` and
/// `ERROR` events, and at exit; call it before printing to stderr directly.
pub fn flush() {
    let mut buffer = BUFFER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    write_out(&mut buffer);
}

fn write_out(buffer: &mut Vec<u8>) {
    if buffer.is_empty() {
        return;
    }
    // Nothing sensible can be done when stderr itself fails; drop the lines rather than grow.
    let _ = std::io::stderr().lock().write_all(buffer);
    buffer.clear();
}

/// Writes out buffered log output when dropped; [`init`] returns it for `main` to hold.
#[must_use = "buffered log output is written out when the guard drops at the end of main"]
#[derive(Debug)]
pub struct FlushGuard(());

impl Drop for FlushGuard {
    fn drop(&mut self) {
        flush();
    }
}

/// A `MakeWriter` appending to [`BUFFER`]; `WARN`/`ERROR` writers write out on drop.
#[derive(Clone, Copy)]
struct BufferedStderr;

/// One event's writer.
struct EventWriter {
    urgent: bool,
}

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut buffer = BUFFER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        buffer.extend_from_slice(bytes);
        if buffer.len() >= BUFFER_BYTES {
            write_out(&mut buffer);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        flush();
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if self.urgent {
            flush();
        }
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter { urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> EventWriter {
        EventWriter {
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

/// Installs the global subscriber (buffered stderr, reloadable filter) and starts the flusher.
/// Hold the guard until `main` returns so the last lines are written out.
pub fn init() -> FlushGuard {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(BufferedStderr);
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
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(FLUSH_INTERVAL);
                    flush();
                }
            });
    }
    FlushGuard(())
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

    fn buffered() -> Vec<u8> {
        BUFFER.lock().unwrap().clone()
    }

    #[test]
    fn warnings_write_out_at_once_and_a_full_buffer_is_written_out() {
        // An urgent (WARN/ERROR) writer empties the buffer when the event ends, taking any
        // buffered INFO lines with it.
        let mut info = EventWriter { urgent: false };
        info.write_all(b"weft-logging-test info line\n").unwrap();
        drop(info);
        let mut warn = EventWriter { urgent: true };
        warn.write_all(b"weft-logging-test warn line\n").unwrap();
        drop(warn);
        let after = String::from_utf8_lossy(&buffered()).into_owned();
        assert!(!after.contains("weft-logging-test"), "{after}");

        // Reaching BUFFER_BYTES writes out without waiting for the flusher.
        let mut big = EventWriter { urgent: false };
        big.write_all(&vec![b'.'; BUFFER_BYTES]).unwrap();
        big.write_all(b"\n").unwrap();
        assert!(
            buffered().len() < BUFFER_BYTES,
            "the full buffer was written out"
        );
    }

    #[test]
    fn the_filter_changes_at_run_time_and_bad_levels_are_named() {
        let _guard = init();
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
