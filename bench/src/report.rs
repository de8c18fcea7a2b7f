//! Result types, the Markdown table on stdout and the JSON file.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

/// The median of `values` (mean of the middle two for an even count; NaN when empty).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2.0,
    }
}

/// One path's measured runs.
#[derive(Debug, Clone)]
pub(crate) struct PathResult {
    /// Name in the table.
    label: &'static str,
    /// Name in the JSON.
    key: &'static str,
    /// Throughput of each measured run, Gbit/s, in run order.
    gbps: Vec<f64>,
}

impl PathResult {
    pub(crate) fn new(label: &'static str, key: &'static str, gbps: Vec<f64>) -> Self {
        PathResult { label, key, gbps }
    }

    /// Median run in Gbit/s (mean of the middle two for an even count).
    pub(crate) fn median(&self) -> f64 {
        median(&self.gbps)
    }

    /// Fastest run in Gbit/s.
    pub(crate) fn best(&self) -> f64 {
        self.gbps.iter().copied().fold(f64::NAN, f64::max)
    }
}

/// The `hbone` scenario's result.
#[derive(Debug, Clone)]
pub(crate) struct HboneResult {
    /// Bytes per measured run.
    pub(crate) bytes: u64,
    /// Measured runs per path.
    pub(crate) runs: u32,
    /// Bytes of the unmeasured warm-up run per path.
    pub(crate) warmup_bytes: u64,
    /// Read/write buffer size, bytes.
    pub(crate) buffer_bytes: usize,
    pub(crate) tcp: PathResult,
    pub(crate) mtls: PathResult,
    pub(crate) hbone: PathResult,
}

impl HboneResult {
    fn paths(&self) -> [&PathResult; 3] {
        [&self.tcp, &self.mtls, &self.hbone]
    }

    /// HBONE median / mTLS median.
    fn hbone_over_mtls(&self) -> f64 {
        self.hbone.median() / self.mtls.median()
    }

    /// HBONE median / TCP median.
    fn hbone_over_tcp(&self) -> f64 {
        self.hbone.median() / self.tcp.median()
    }
}

/// The machine the benchmark ran on.
#[derive(Debug, Clone)]
struct Machine {
    /// `model name` from /proc/cpuinfo, or "unknown".
    cpu_model: String,
    /// CPUs this process may use (`std::thread::available_parallelism`).
    cores: usize,
}

impl Machine {
    fn detect() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .filter_map(|line| line.split_once(':'))
                    .find(|(name, _)| name.trim() == "model name")
                    .map(|(_, value)| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        Machine { cpu_model, cores }
    }
}

/// `CPU: <model> (<n> cores)`, for a report's footer.
pub(crate) fn machine_line() -> String {
    let machine = Machine::detect();
    format!("CPU: {} ({} cores)", machine.cpu_model, machine.cores)
}

/// The machine as JSON: `{"cpu_model", "cores"}`.
pub(crate) fn machine_json() -> serde_json::Value {
    let machine = Machine::detect();
    serde_json::json!({"cpu_model": machine.cpu_model, "cores": machine.cores})
}

/// Writes a scenario's `value` (an object) as JSON to `dir/<scenario>-<timestamp>.json`, with
/// `scenario`, `timestamp`, `build` and `machine` added.
///
/// # Errors
/// Creating the directory or writing the file.
pub(crate) fn write_json(
    scenario: &str,
    mut value: serde_json::Value,
    dir: &Path,
    timestamp: u64,
) -> Result<PathBuf> {
    if let Some(object) = value.as_object_mut() {
        object.insert("scenario".into(), scenario.into());
        object.insert("timestamp".into(), timestamp.into());
        object.insert("build".into(), build_profile().into());
        object.insert("machine".into(), machine_json());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{scenario}-{timestamp}.json"));
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The crypto provider the TLS paths ran on.
fn crypto_provider() -> &'static str {
    if cfg!(feature = "fips") {
        "boringssl"
    } else {
        "aws-lc-rs"
    }
}

/// Prints the Markdown table, the ratios and the machine to stdout.
pub(crate) fn print_hbone(result: &HboneResult) {
    let machine = Machine::detect();
    println!(
        "## weft-bench hbone: single-stream loopback throughput, {} bytes × {} runs per path",
        result.bytes, result.runs
    );
    println!();
    println!("| path       | median Gbit/s | best Gbit/s |");
    println!("|------------|--------------:|------------:|");
    for path in result.paths() {
        println!(
            "| {:<10} | {:>13.2} | {:>11.2} |",
            path.label,
            path.median(),
            path.best()
        );
    }
    println!();
    println!("HBONE/mTLS = {:.2}", result.hbone_over_mtls());
    println!("HBONE/TCP = {:.2}", result.hbone_over_tcp());
    println!();
    println!("CPU: {} ({} cores)", machine.cpu_model, machine.cores);
    println!(
        "tokio worker threads: {}; crypto provider: {}; build: {}",
        crate::WORKER_THREADS,
        crypto_provider(),
        build_profile()
    );
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; run with --release for meaningful numbers");
    }
}

/// Writes the result as JSON to `dir/hbone-<unix-timestamp>.json`, creating `dir`.
///
/// # Errors
/// Creating the directory or writing the file.
pub(crate) fn write_hbone_json(result: &HboneResult, dir: &Path) -> Result<PathBuf> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("hbone-{timestamp}.json"));
    let json = hbone_json(result, &Machine::detect(), timestamp);
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub(crate) fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

fn hbone_json(result: &HboneResult, machine: &Machine, timestamp: u64) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{{\n  \"scenario\": \"hbone\",\n  \"timestamp\": {timestamp},\n  \"unit\": \"Gbit/s\",\n  \
         \"bytes\": {},\n  \"runs\": {},\n  \"warmup_bytes\": {},\n  \"buffer_bytes\": {},\n  \
         \"tokio_worker_threads\": {},\n  \"crypto_provider\": {},\n  \"build\": {},\n  \
         \"machine\": {{ \"cpu_model\": {}, \"cores\": {} }},\n  \"paths\": {{\n",
        result.bytes,
        result.runs,
        result.warmup_bytes,
        result.buffer_bytes,
        crate::WORKER_THREADS,
        json_string(crypto_provider()),
        json_string(build_profile()),
        json_string(&machine.cpu_model),
        machine.cores,
    );
    let paths = result.paths();
    for (i, path) in paths.iter().enumerate() {
        let runs: Vec<String> = path.gbps.iter().map(|&g| json_number(g)).collect();
        let _ = writeln!(
            out,
            "    {}: {{ \"label\": {}, \"median_gbps\": {}, \"best_gbps\": {}, \"runs_gbps\": [{}] }}{}",
            json_string(path.key),
            json_string(path.label),
            json_number(path.median()),
            json_number(path.best()),
            runs.join(", "),
            if i + 1 < paths.len() { "," } else { "" },
        );
    }
    let _ = write!(
        out,
        "  }},\n  \"ratios\": {{ \"hbone_over_mtls\": {}, \"hbone_over_tcp\": {} }}\n}}\n",
        json_number(result.hbone_over_mtls()),
        json_number(result.hbone_over_tcp()),
    );
    out
}

/// A JSON number with 3 decimals; `null` for NaN or infinity, which JSON cannot represent.
fn json_number(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.3}")
    } else {
        "null".to_owned()
    }
}

/// A JSON string literal: quotes, backslashes and control characters escaped (RFC 8259 §7).
fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for ch in value.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_best() {
        let odd = PathResult::new("x", "x", vec![3.0, 1.0, 2.0]);
        assert_eq!(odd.median(), 2.0);
        assert_eq!(odd.best(), 3.0);
        let even = PathResult::new("x", "x", vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!(even.median(), 2.5);
        assert_eq!(even.best(), 4.0);
    }

    #[test]
    fn escapes_json_strings() {
        assert_eq!(
            json_string("a\"b\\c\nd\u{1}é"),
            "\"a\\\"b\\\\c\\nd\\u0001é\""
        );
        assert_eq!(json_number(f64::NAN), "null");
        assert_eq!(json_number(1.23456), "1.235");
    }
}
