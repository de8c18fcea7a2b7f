//! `kube-pods`: config propagation on real Kubernetes. A local cluster with the real control
//! plane and Weft installed by Helm (`weft cluster up --kubernetes`); N Pods created through the
//! API as fast as it takes them (64 creates in flight); measured from the first create until
//! every node's ztunnel has all N workloads in its config (its `/config_dump`), and until all N
//! pods are Running. The pods run `sleep infinity` in a namespace outside the mesh, so what is
//! measured is the API → kubelet → controller → xDS → ztunnel path, not N pod proxies.
//!
//! A node takes 110 pods (the kubelet's default `pods` capacity), so the default 1,000 pods run
//! on 10 nodes; `--quick` is 2 nodes and 60 pods. Needs root and `scripts/install-deps`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weft::cluster::{Cluster, Options, kube};

/// Options of the `kube-pods` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Pods to create through the API.
    #[arg(long = "kube-pods", default_value_t = 1000)]
    pub(crate) pods: usize,
    /// Nodes of the cluster (110 pods fit on each).
    #[arg(long = "kube-nodes", default_value_t = 10)]
    pub(crate) nodes: u8,
    /// Give up after this many seconds.
    #[arg(long = "kube-timeout-secs", default_value_t = 600)]
    pub(crate) timeout_secs: u64,
    /// CI size (set by `run --quick`): 60 pods on 2 nodes.
    #[arg(skip)]
    pub(crate) quick: bool,
}

const CLUSTER: &str = "bench-kube";
const NAMESPACE: &str = "scale";

struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = Cluster::down(CLUSTER, None);
    }
}

fn pod(i: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": format!("p-{i:05}"), "namespace": NAMESPACE, "labels": {"app": "scale"}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "enableServiceLinks": false,
            "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "none", "command": ["sleep", "infinity"]}],
        },
    })
}

/// Workloads of [`NAMESPACE`] in a ztunnel's `/config_dump` (fetched inside its pod's netns).
fn ztunnel_workloads(netns: &str) -> Option<usize> {
    let text = weft::cluster::netns::within(netns, || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect_timeout(
            &"127.0.0.1:15000".parse().ok()?,
            Duration::from_secs(2),
        )
        .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        conn.write_all(b"GET /config_dump HTTP/1.1\r\nHost: z\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).ok()?;
        Some(text)
    })
    .ok()??;
    let body = text.split_once("\r\n\r\n")?.1;
    let dump: Value = serde_json::from_str(body).ok()?;
    Some(
        dump["workloads"]
            .as_array()?
            .iter()
            .filter(|w| w["namespace"] == NAMESPACE)
            .count(),
    )
}

/// Runs the scenario; its JSON result.
///
/// # Errors
/// Not root, Kubernetes not installed, a cluster that does not come up, the timeout.
pub(crate) fn run(args: &Args, exe_dir: &Path) -> Result<Value> {
    if !weft::cluster::is_root() {
        bail!("kube-pods runs a local Kubernetes cluster, which needs root");
    }
    let (pods, nodes) = if args.quick {
        (60, 2)
    } else {
        (args.pods, args.nodes)
    };
    if pods > usize::from(nodes) * 110 {
        bail!("{pods} pods do not fit on {nodes} nodes of 110 pods each");
    }
    let _ = Cluster::down(CLUSTER, None);
    let mut options = Options::new(CLUSTER);
    options.nodes = nodes;
    options.kubernetes = true;
    options.weft_exe = Some(exe_dir.join("weft"));
    eprintln!("bringing up {CLUSTER}: Kubernetes and Weft (helm) on {nodes} nodes");
    let up_started = Instant::now();
    let cluster = Cluster::up(&options).context("cluster up --kubernetes")?;
    let _down = Down;
    let up_seconds = up_started.elapsed().as_secs_f64();
    let layout = cluster.layout().clone();
    let kubeconfig = cluster.kubeconfig_path()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = runtime.block_on(async {
        let kc = ::kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let config = ::kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        anyhow::Ok(::kube::Client::try_from(config)?)
    })?;
    let kubectl = kube::program("kubectl")?;
    let kc = kubeconfig.display().to_string();
    let out = std::process::Command::new(&kubectl)
        .args(["--kubeconfig", &kc, "create", "namespace", NAMESPACE])
        .output()?;
    if !out.status.success() {
        bail!(
            "creating namespace: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The namespace's default ServiceAccount must exist before pods (admission).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = std::process::Command::new(&kubectl)
            .args([
                "--kubeconfig",
                &kc,
                "get",
                "serviceaccount",
                "default",
                "-n",
                NAMESPACE,
            ])
            .output()?
            .status
            .success();
        if ok {
            break;
        }
        if Instant::now() > deadline {
            bail!("no default ServiceAccount in {NAMESPACE} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ztunnels: Vec<String> = {
        let out = std::process::Command::new(&kubectl)
            .args([
                "--kubeconfig",
                &kc,
                "get",
                "pods",
                "-n",
                "istio-system",
                "-l",
                "app.kubernetes.io/name=ztunnel",
                "-o",
                "json",
            ])
            .output()?;
        let list: Value = serde_json::from_slice(&out.stdout)?;
        list["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p["metadata"]["uid"].as_str().map(|u| layout.pod_netns(u)))
            .collect()
    };
    if ztunnels.len() != usize::from(nodes) {
        bail!("{} ztunnel pods for {nodes} nodes", ztunnels.len());
    }

    eprintln!("creating {pods} pods");
    let started = Instant::now();
    let created = runtime.block_on(async {
        use futures::StreamExt;
        let api: ::kube::Api<k8s_openapi::api::core::v1::Pod> =
            ::kube::Api::namespaced(client.clone(), NAMESPACE);
        let results: Vec<Result<(), String>> = futures::stream::iter(0..pods)
            .map(|i| {
                let api = api.clone();
                async move {
                    let pod: k8s_openapi::api::core::v1::Pod =
                        serde_json::from_value(pod(i)).map_err(|e| e.to_string())?;
                    api.create(&Default::default(), &pod)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        results
    });
    let create_seconds = started.elapsed().as_secs_f64();
    if let Some(err) = created.iter().find_map(|r| r.as_ref().err()) {
        bail!("creating pods: {err}");
    }
    eprintln!("created in {create_seconds:.1} s; waiting for every ztunnel to have them");
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut all_in: BTreeMap<String, f64> = BTreeMap::new();
    let mut running_seconds = None;
    while all_in.len() < ztunnels.len() || running_seconds.is_none() {
        if started.elapsed() > timeout {
            bail!(
                "after {timeout:?}: {} of {} ztunnels had all {pods} workloads, pods running: {}",
                all_in.len(),
                ztunnels.len(),
                running_seconds.is_some()
            );
        }
        for netns in &ztunnels {
            if !all_in.contains_key(netns) && ztunnel_workloads(netns) == Some(pods) {
                all_in.insert(netns.clone(), started.elapsed().as_secs_f64());
            }
        }
        if running_seconds.is_none() {
            let out = std::process::Command::new(&kubectl)
                .args([
                    "--kubeconfig",
                    &kc,
                    "get",
                    "pods",
                    "-n",
                    NAMESPACE,
                    "--field-selector=status.phase=Running",
                    "-o",
                    "name",
                ])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).lines().count() == pods {
                running_seconds = Some(started.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let seconds_all = all_in.values().copied().fold(0.0, f64::max);
    let result = json!({
        "pods": pods,
        "nodes": nodes,
        "cluster_up_seconds": up_seconds,
        "create_seconds": create_seconds,
        "all_running_seconds": running_seconds,
        "all_in_every_ztunnel_seconds": seconds_all,
        "per_ztunnel_seconds": all_in.values().collect::<Vec<_>>(),
    });
    Ok(result)
}

/// Prints the scenario's table.
pub(crate) fn print(result: &Value) {
    println!(
        "## kube-pods: {} pods through the API on {} nodes\n",
        result["pods"], result["nodes"]
    );
    println!("| figure | seconds |\n|---|---:|");
    for (name, key) in [
        (
            "cluster up (Kubernetes + Weft by helm)",
            "cluster_up_seconds",
        ),
        ("all pods created (API accepted)", "create_seconds"),
        ("all pods Running", "all_running_seconds"),
        (
            "all pods in every ztunnel's config",
            "all_in_every_ztunnel_seconds",
        ),
    ] {
        println!(
            "| {name} | {:.2} |",
            result[key].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!();
}
