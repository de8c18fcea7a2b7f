//! Weft's Helm charts (`charts/`), offline: `helm lint`, `helm template` with the defaults and
//! with typical values (`charts/tests/values/`), every container `env` name one its binary
//! accepts (from the binary's own `--help`, which clap writes from its `Command`), the values
//! schemas refusing a misspelled or mistyped value, revisions naming and labelling everything,
//! the CRDs byte-identical to the pinned upstream manifests, and every rendered object valid
//! against the Kubernetes schemas offline and strictly (`charts/tests/validate.py`). The
//! server-side check against a real kube-apiserver is in `kubernetes.rs`. Needs helm and
//! kubernetes-validate (`scripts/install-deps`).

#![allow(clippy::unwrap_used)] // test helpers fail loudly

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use weft::cluster::kube;

const CHARTS: [&str; 4] = ["base", "controller", "ztunnel", "cni"];

fn charts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts")
}

/// helm, or `None` (with the reason printed) when it is not installed; with `CI` set that is
/// a failure.
fn helm() -> Option<PathBuf> {
    match kube::program("helm") {
        Ok(path) => Some(path),
        Err(err) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set and helm is missing: {err}"
            );
            eprintln!("SKIPPED: {err}");
            None
        }
    }
}

/// `helm template` of `chart` with `args`: (success, stdout, stderr).
fn template(helm: &Path, chart: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm)
        .args(["template", "t"])
        .arg(charts_dir().join(chart))
        .args(["--namespace", "istio-system"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// `charts/tests/validate.py` (kubernetes-validate from `scripts/install-deps`), or `None` (with
/// the reason printed) when it is not installed; with `CI` set that is a failure.
fn schema_validator() -> Option<PathBuf> {
    let script = charts_dir().join("tests/validate.py");
    let reason = match Command::new("python3").arg(&script).arg("--check").output() {
        Ok(out) if out.status.success() => return Some(script),
        // Exit 3: kubernetes-validate is not installed (or does not import).
        Ok(out) if out.status.code() == Some(3) => {
            String::from_utf8_lossy(&out.stderr).trim().to_owned()
        }
        Ok(out) => panic!(
            "{} --check: {}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(err) => format!("running python3: {err}"),
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set and the schema validator is missing: {reason}"
    );
    eprintln!("SKIPPED: {reason}");
    None
}

/// `python3 <validator>` with `yaml` on stdin: (exit code, stdout and stderr).
fn validate_yaml(validator: &Path, yaml: &str) -> (Option<i32>, String) {
    let mut child = Command::new("python3")
        .arg(validator)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // validate.py reads all of stdin before it writes anything: no deadlock on a full pipe.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(yaml.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The environment variables `binary` reads: clap's `[env: NAME=…]` in its `--help`, and
/// `RUST_LOG` (read by `weft_core::logging::init`, which every binary calls).
fn accepted_env(binary: &str) -> BTreeSet<String> {
    let path = Path::new(common::WEFT).with_file_name(binary);
    let out = Command::new(&path)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("running {} --help: {e}", path.display()));
    assert!(out.status.success(), "{} --help failed", path.display());
    let help = String::from_utf8_lossy(&out.stdout);
    let mut names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split('=').next().map(str::to_owned))
        .collect();
    names.insert("RUST_LOG".into());
    names
}

/// Every container env name of every workload, against its binary (its `command[0]`).
fn unknown_env(objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    for object in objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        if !matches!(kind, "Deployment" | "DaemonSet") {
            continue;
        }
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        for container in object["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let binary = container["command"][0]
                .as_str()
                .unwrap_or_else(|| panic!("{kind} {name}: a container without command"));
            let accepted = accepted_env(binary);
            for env in container["env"].as_array().into_iter().flatten() {
                let env_name = env["name"].as_str().unwrap_or_default();
                if !accepted.contains(env_name) {
                    problems.push(format!(
                        "{kind} {name}, container {}: env {env_name} is not read by {binary}",
                        container["name"]
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn every_chart_lints_and_renders_with_defaults_and_typical_values() {
    let Some(helm) = helm() else { return };
    for chart in CHARTS {
        let out = Command::new(&helm)
            .arg("lint")
            .arg(charts_dir().join(chart))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm lint {chart}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let values = charts_dir().join(format!("tests/values/{chart}.yaml"));
        for args in [vec![], vec!["-f", values.to_str().unwrap()]] {
            let (ok, out, err) = template(&helm, chart, &args);
            assert!(ok, "helm template {chart} {args:?}: {err}");
            let objects = objects(&out);
            if chart != "base" {
                assert!(!objects.is_empty(), "{chart} renders nothing");
            }
            let problems = unknown_env(&objects);
            assert!(problems.is_empty(), "{chart} {args:?}: {problems:#?}");
        }
    }
}

#[test]
fn every_rendered_object_validates_against_the_kubernetes_schemas() {
    // Offline and strict (an unknown field is an error): every object each chart renders, with
    // the defaults and with typical values, CRDs included, against the Kubernetes 1.35 schemas
    // kubernetes-validate bundles, and custom resources against the CRDs in charts/base/crds.
    let Some(helm) = helm() else { return };
    let Some(validator) = schema_validator() else {
        return;
    };
    for chart in CHARTS {
        let values = charts_dir().join(format!("tests/values/{chart}.yaml"));
        for args in [
            vec!["--include-crds"],
            vec!["--include-crds", "-f", values.to_str().unwrap()],
        ] {
            let (ok, out, err) = template(&helm, chart, &args);
            assert!(ok, "helm template {chart} {args:?}: {err}");
            let (code, report) = validate_yaml(&validator, &out);
            assert_eq!(code, Some(0), "{chart} {args:?}:\n{report}");
        }
    }
    // The check could fail: a misspelled field, in a Kubernetes kind and in a custom resource,
    // is reported with its object and field path.
    let deployment = "apiVersion: apps/v1
kind: Deployment
metadata: {name: broken, namespace: istio-system}
spec:
  replica: 2
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec: {containers: [{name: x, image: x}]}
";
    let gateway = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, hostnme: x}]
";
    for (broken, expected) in [
        (
            deployment,
            "ERROR Deployment/istio-system/broken (line 1): spec.replica: unknown field 'replica'",
        ),
        (
            gateway,
            "ERROR Gateway/demo/waypoint (line 1): spec.listeners[0].hostnme: unknown field 'hostnme'",
        ),
    ] {
        let (code, report) = validate_yaml(&validator, broken);
        assert_eq!(code, Some(1), "{report}");
        assert!(report.contains(expected), "{report}");
    }
}

#[test]
fn an_env_name_the_binary_does_not_read_is_found() {
    // The check above could fail: a name ztunnel does not read is reported with where it is.
    let objects = vec![serde_json::json!({
        "kind": "DaemonSet",
        "metadata": {"name": "ztunnel"},
        "spec": {"template": {"spec": {"containers": [{
            "name": "ztunnel",
            "command": ["ztunnel"],
            "env": [{"name": "XDS_ADDRESS", "value": "x"}, {"name": "ZTUNEL_WORKER_THREADS", "value": "2"}],
        }]}}},
    })];
    assert_eq!(
        unknown_env(&objects),
        [
            "DaemonSet ztunnel, container \"ztunnel\": env ZTUNEL_WORKER_THREADS is not read by ztunnel"
        ]
    );
}

#[test]
fn the_values_schemas_refuse_misspelled_and_mistyped_values() {
    let Some(helm) = helm() else { return };
    for (chart, args, what) in [
        ("controller", ["--set", "replicas=2"], "replicas"),
        ("controller", ["--set", "replicaCount=two"], "replicaCount"),
        (
            "ztunnel",
            ["--set", "xdsAddress=http://plain:15012"],
            "xdsAddress",
        ),
        ("cni", ["--set", "cni.binDir=opt/cni/bin"], "binDir"),
        ("base", ["--set", "crds=false"], "crds"),
    ] {
        let (ok, _, err) = template(&helm, chart, &args);
        assert!(!ok, "{chart} accepted {args:?}");
        assert!(
            err.contains("values don't meet the specifications of the schema")
                && err.contains(what),
            "{chart} {args:?}: {err}"
        );
    }
}

#[test]
fn a_revision_suffixes_every_name_and_labels_everything() {
    let Some(helm) = helm() else { return };
    for chart in ["controller", "ztunnel", "cni"] {
        let (ok, out, err) = template(&helm, chart, &["--set", "revision=canary"]);
        assert!(ok, "{err}");
        for object in objects(&out) {
            let name = object["metadata"]["name"].as_str().unwrap();
            assert!(name.ends_with("-canary"), "{chart}: {name}");
            assert_eq!(
                object["metadata"]["labels"]["istio.io/rev"], "canary",
                "{chart}: {name}"
            );
        }
    }
}

#[test]
fn the_crds_are_the_pinned_upstream_manifests() {
    // charts/base/update-crds extracts them from the Go modules sigs.k8s.io/gateway-api and
    // istio.io/api (module cache or proxy): run it into a scratch dir and compare the bytes.
    let have_go = Path::new("/usr/local/go/bin/go").is_file()
        || Command::new("go").arg("version").output().is_ok();
    if !have_go {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and Go is missing"
        );
        eprintln!("SKIPPED: no Go toolchain to fetch the CRD modules with");
        return;
    }
    let scratch = std::env::temp_dir().join(format!("weft-crds-{}", std::process::id()));
    let out = Command::new(charts_dir().join("base/update-crds"))
        .arg(&scratch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "update-crds: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let shipped = charts_dir().join("base/crds");
    assert_eq!(list(&shipped), list(&scratch));
    assert_eq!(list(&shipped).len(), 8, "{:?}", list(&shipped));
    for file in list(&shipped) {
        assert!(
            std::fs::read(shipped.join(&file)).unwrap()
                == std::fs::read(scratch.join(&file)).unwrap(),
            "charts/base/crds/{file} differs from upstream (run charts/base/update-crds)"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
