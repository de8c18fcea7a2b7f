//! The suite behind `weft-bench run`: the list of scenarios, the figures each must produce, and
//! issue 9's targets with met/gap.
//!
//! A scenario's result is the JSON it writes under `bench/results/`; figures and targets are
//! JSON pointers into it, so the summary does not depend on each scenario's Rust types.
//!
//! **Adding a scenario** (e.g. `engine`, `scale`): add a [`Scenario`] entry to [`SCENARIOS`]
//! (its name, whether it needs the shared local cluster, the figures that must be finite), a
//! match arm in `main.rs`'s `run_one` that runs it and returns its JSON, and point its
//! [`TARGETS`] rows at the pointers it writes.

use serde_json::Value;

/// How a required figure is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// A finite number (a difference, a growth that may be 0).
    Finite,
    /// A finite number > 0 (a rate, a latency, a time, a size).
    Positive,
}

/// One entry of the suite.
#[derive(Debug)]
pub(crate) struct Scenario {
    /// Name on the command line (`--scenario`) and in the results' file names.
    pub(crate) name: &'static str,
    /// What it measures, for `--help` and the README.
    pub(crate) about: &'static str,
    /// Whether it runs on the shared local cluster (`testbed`; root).
    pub(crate) cluster: bool,
    /// Figures (JSON pointers into its result) that must be present and pass their check.
    pub(crate) figures: &'static [(&'static str, Check)],
}

use Check::{Finite, Positive};

/// Every scenario, in the order `run` runs them.
pub(crate) const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "hbone",
        about: "single-stream loopback throughput: plain TCP, plain mTLS, HBONE",
        cluster: false,
        figures: &[
            ("/ratios/hbone_over_mtls", Positive),
            ("/ratios/hbone_over_tcp", Positive),
        ],
    },
    Scenario {
        name: "controller",
        about: "control plane: full translation, change-to-delta with N ADS clients, memory",
        cluster: false,
        figures: &[
            ("/full_translation/median_ms", Positive),
            ("/change_to_delta/median_ms", Positive),
        ],
    },
    Scenario {
        name: "engine",
        about: "the waypoint's HTTP stack vs Envoy as an HTTP router, same route table, loopback, 1 worker each",
        cluster: false,
        figures: &[
            ("/ratio_per_core/http1", Positive),
            ("/ratio_per_core/h2c", Positive),
        ],
    },
    Scenario {
        name: "scale",
        about: "config scale: controller translation and memory, a real ztunnel's memory and apply time at 10,000 and 100,000 workloads",
        cluster: false,
        figures: &[("/ztunnel_bytes_per_workload_100000", Positive)],
    },
    Scenario {
        name: "latency",
        about: "fixed-rate 1 KiB HTTP/1.1 through S0, L4, L7 at 1/16/64 connections; proxy CPU and peak RSS at that rate",
        cluster: true,
        figures: &[
            ("/grid/c1/s0/p50_ms", Positive),
            ("/grid/c1/l4/p50_ms", Positive),
            ("/grid/c1/l7/p50_ms", Positive),
            ("/grid/c16/s0/max_ms", Positive),
            ("/grid/c16/l4/max_ms", Positive),
            ("/grid/c16/l7/max_ms", Positive),
            ("/grid/c64/s0/p99_ms", Positive),
            ("/grid/c64/l4/p99_ms", Positive),
            ("/grid/c64/l7/p99_ms", Positive),
            ("/grid/c16/s0_same/p99_ms", Positive),
            ("/grid/c16/l4_same/p99_ms", Positive),
            ("/ztunnel_at_rate/cores", Positive),
            ("/ztunnel_at_rate/peak_rss_mb_max", Positive),
            ("/waypoint_at_rate/cores", Positive),
            ("/waypoint_at_rate/peak_rss_mb", Positive),
        ],
    },
    Scenario {
        name: "waypoint",
        about: "requests/s per waypoint core through L7, HTTP/1.1 and h2c, closed loop",
        cluster: true,
        figures: &[
            ("/requests_per_core/h1/per_core", Positive),
            ("/requests_per_core/h2/per_core", Positive),
        ],
    },
    Scenario {
        name: "mesh",
        about: "L4 vs S0: iperf3 1/4 streams both directions cross/same node, requests/s and new connections/s per ztunnel core, memory per idle connection",
        cluster: true,
        figures: &[
            ("/throughput/cross-1/ratio", Positive),
            ("/throughput/cross-1-R/ratio", Positive),
            ("/throughput/cross-4/ratio", Positive),
            ("/throughput/cross-4-R/ratio", Positive),
            ("/throughput/same-1/ratio", Positive),
            ("/throughput/same-1-R/ratio", Positive),
            ("/throughput/same-4/ratio", Positive),
            ("/throughput/same-4-R/ratio", Positive),
            ("/requests_per_core/h1/per_core", Positive),
            ("/requests_per_core/h2/per_core", Positive),
            ("/new_connections/s0/per_sec", Positive),
            ("/new_connections/l4/per_core", Positive),
            ("/idle/bytes_per_connection_max", Finite),
        ],
    },
    Scenario {
        name: "kube-pods",
        about: "real Kubernetes with Weft installed by helm: N pods created through the API until all are Running and in every ztunnel's config",
        cluster: false,
        figures: &[
            ("/all_running_seconds", Positive),
            ("/all_in_every_ztunnel_seconds", Positive),
        ],
    },
];

/// The scenario named `name`.
pub(crate) fn scenario(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// The figure at `pointer` in `result`, if it is a number (NaN when null, as serde_json writes
/// NaN).
fn figure(result: &Value, pointer: &str) -> Option<f64> {
    match result.pointer(pointer)? {
        Value::Null => Some(f64::NAN),
        v => v.as_f64(),
    }
}

/// Problems with a scenario's result: each required figure missing, NaN, infinite or, when
/// [`Check::Positive`], ≤ 0.
pub(crate) fn check(scenario: &Scenario, result: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for &(pointer, check) in scenario.figures {
        match figure(result, pointer) {
            None => problems.push(format!("{pointer}: missing")),
            Some(v) if !v.is_finite() => problems.push(format!("{pointer}: {v}")),
            Some(v) if check == Check::Positive && v <= 0.0 => {
                problems.push(format!("{pointer}: {v} (expected > 0)"))
            }
            Some(_) => {}
        }
    }
    problems
}

/// How a figure compares with its target.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bound {
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

impl Bound {
    fn met(self, value: f64) -> bool {
        match self {
            Bound::AtLeast(t) => value >= t,
            Bound::AtMost(t) => value <= t,
            Bound::Below(t) => value < t,
        }
    }

    fn text(self, unit: &str) -> String {
        match self {
            Bound::AtLeast(t) => format!("≥ {t}{unit}"),
            Bound::AtMost(t) => format!("≤ {t}{unit}"),
            Bound::Below(t) => format!("< {t}{unit}"),
        }
    }
}

/// One of issue 9's targets.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) label: &'static str,
    pub(crate) scenario: &'static str,
    pub(crate) pointer: &'static str,
    pub(crate) bound: Bound,
    pub(crate) unit: &'static str,
}

/// Issue 9's targets. Rows whose scenario is not in [`SCENARIOS`] print as "not on this branch".
pub(crate) const TARGETS: &[Target] = &[
    Target {
        label: "L4 cross-node single-stream throughput / S0",
        scenario: "mesh",
        pointer: "/throughput/cross-1/ratio",
        bound: Bound::AtLeast(0.6),
        unit: "×",
    },
    Target {
        label: "L4 added latency p50, 1,000 rps, 16 connections",
        scenario: "latency",
        pointer: "/grid/c16/l4_added/p50_ms",
        bound: Bound::AtMost(0.10),
        unit: " ms",
    },
    Target {
        label: "L4 added latency p99, 1,000 rps, 16 connections",
        scenario: "latency",
        pointer: "/grid/c16/l4_added/p99_ms",
        bound: Bound::AtMost(0.30),
        unit: " ms",
    },
    Target {
        label: "ztunnel CPU at 1,000 rps (mean of the two)",
        scenario: "latency",
        pointer: "/ztunnel_at_rate/cores",
        bound: Bound::AtMost(0.05),
        unit: " cores",
    },
    Target {
        label: "ztunnel peak RSS at 1,000 rps (larger of the two)",
        scenario: "latency",
        pointer: "/ztunnel_at_rate/peak_rss_mb_max",
        bound: Bound::AtMost(12.0),
        unit: " MB",
    },
    Target {
        label: "ztunnel memory per idle proxied connection (larger side)",
        scenario: "mesh",
        pointer: "/idle/bytes_per_connection_max",
        bound: Bound::AtMost(3000.0),
        unit: " B",
    },
    Target {
        label: "waypoint requests/s per core vs Envoy",
        scenario: "engine",
        pointer: "/waypoint_over_envoy",
        bound: Bound::AtLeast(1.2),
        unit: "×",
    },
    Target {
        label: "waypoint CPU at 1,000 rps",
        scenario: "latency",
        pointer: "/waypoint_at_rate/cores",
        bound: Bound::AtMost(0.15),
        unit: " cores",
    },
    Target {
        label: "waypoint peak RSS at 1,000 rps",
        scenario: "latency",
        pointer: "/waypoint_at_rate/peak_rss_mb",
        bound: Bound::AtMost(25.0),
        unit: " MB",
    },
    Target {
        label: "ztunnel config memory per workload, 100,000 workloads",
        scenario: "scale",
        pointer: "/ztunnel_bytes_per_workload_100000",
        bound: Bound::AtMost(1000.0),
        unit: " B",
    },
    Target {
        label: "controller: full translation (10,000 pods; 1,000 with --quick)",
        scenario: "controller",
        pointer: "/full_translation/median_ms",
        bound: Bound::Below(1000.0),
        unit: " ms",
    },
    Target {
        label: "controller: one change to 100 clients (10 with --quick)",
        scenario: "controller",
        pointer: "/change_to_delta/median_ms",
        bound: Bound::Below(50.0),
        unit: " ms",
    },
];

/// What became of one scenario in a run.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Ran; its result and the problems [`check`] found (empty when all is well).
    Ran(Value, Vec<String>),
    /// Failed with this error.
    Failed(String),
    /// Not selected.
    Skipped,
}

/// Each target's measured value (`None` when not measured) and verdict: `met`, `gap`,
/// `no figure`, `failed`, `not run` or `not on this branch`.
pub(crate) fn evaluate(
    results: &[(&str, Outcome)],
) -> Vec<(&'static Target, Option<f64>, &'static str)> {
    TARGETS
        .iter()
        .map(|t| {
            let outcome = results
                .iter()
                .find(|(n, _)| *n == t.scenario)
                .map(|(_, o)| o);
            let (value, verdict) = match (scenario(t.scenario), outcome) {
                (None, _) => (None, "not on this branch"),
                (Some(_), Some(Outcome::Ran(v, _))) => match figure(v, t.pointer) {
                    Some(x) if x.is_finite() => {
                        (Some(x), if t.bound.met(x) { "met" } else { "gap" })
                    }
                    _ => (None, "no figure"),
                },
                (Some(_), Some(Outcome::Failed(_))) => (None, "failed"),
                (Some(_), _) => (None, "not run"),
            };
            (t, value, verdict)
        })
        .collect()
}

/// [`evaluate`] as JSON: `[{"target", "scenario", "pointer", "bound", "value", "verdict"}]`.
pub(crate) fn targets_json(results: &[(&str, Outcome)]) -> Value {
    evaluate(results)
        .into_iter()
        .map(|(t, value, verdict)| {
            serde_json::json!({
                "target": t.label, "scenario": t.scenario, "pointer": t.pointer,
                "bound": t.bound.text(t.unit), "value": value, "verdict": verdict,
            })
        })
        .collect()
}

/// The targets table: `| target | scenario | measured | target | met |` for every target, from
/// `results` (scenario name → outcome).
pub(crate) fn targets_table(results: &[(&str, Outcome)]) -> String {
    let mut out = String::from(
        "| target | scenario | measured | target | met |\n|--------|----------|---------:|--------|:---:|\n",
    );
    for (t, value, met) in evaluate(results) {
        let measured = value.map_or("—".to_owned(), |x| format!("{x:.3}{}", t.unit));
        out.push_str(&format!(
            "| {} | {} | {measured} | {} | {met} |\n",
            t.label,
            t.scenario,
            t.bound.text(t.unit)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_unique_and_targets_point_at_known_or_future_scenarios() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert!(
                SCENARIOS[..i].iter().all(|o| o.name != s.name),
                "{}",
                s.name
            );
            assert!(!s.figures.is_empty(), "{} checks no figure", s.name);
        }
        for t in TARGETS {
            assert!(
                scenario(t.scenario).is_some() || ["engine", "scale"].contains(&t.scenario),
                "{}",
                t.label
            );
        }
    }

    #[test]
    fn check_flags_missing_nan_and_non_positive_figures() {
        let s = scenario("waypoint").unwrap();
        let good = json!({"requests_per_core": {"h1": {"per_core": 10.0}, "h2": {"per_core": 5}}});
        assert!(check(s, &good).is_empty());
        let bad = json!({"requests_per_core": {"h1": {"per_core": null}, "h2": {"per_core": 0}}});
        let problems = check(s, &bad);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(check(s, &json!({})).iter().all(|p| p.ends_with("missing")));
    }

    #[test]
    fn targets_table_says_met_gap_and_why_not() {
        let mesh = json!({"throughput": {"cross-1": {"ratio": 0.5}}, "idle": {"bytes_per_connection_max": 100.0}});
        let results = [
            ("mesh", Outcome::Ran(mesh, Vec::new())),
            ("latency", Outcome::Failed("boom".into())),
            ("controller", Outcome::Skipped),
        ];
        let table = targets_table(&results);
        assert!(
            table.contains(
                "| L4 cross-node single-stream throughput / S0 | mesh | 0.500× | ≥ 0.6× | gap |"
            ),
            "{table}"
        );
        assert!(table.contains("| 100.000 B | ≤ 3000 B | met |"), "{table}");
        assert!(
            table.contains("| latency | — | ≤ 0.1 ms | failed |"),
            "{table}"
        );
        // A listed scenario absent from the results was not run.
        assert!(
            table.contains("| engine | — | ≥ 1.2× | not run |"),
            "{table}"
        );
        assert!(
            table.contains("| controller | — | < 50 ms | not run |"),
            "{table}"
        );
    }
}
