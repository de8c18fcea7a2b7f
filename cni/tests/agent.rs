//! The node agent's Kubernetes-mode reconcile, in throwaway network namespaces (root): a pod
//! enrolled after it started, with no CNI record, is found through a (fake) procfs whose
//! process points at the pod's netns, captured (in-pod rules), annotated, and its IP put in the
//! node's probe SNAT set; un-enrolling it undoes all three. In files mode (no procfs lookup) the
//! same pod is left alone, as the local cluster relies on CNI records.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use weft_cni::agent::{Agent, Config};
use weft_cni::annotate::Annotator;
use weft_cni::{probe, zds};
use weft_k8s::manifest::{Object, ObjectKey};
use weft_k8s::store::Store;
use weft_k8s::{Index, Resource};

const UID: &str = "5f1c2d3e-aaaa-4bbb-8ccc-0123456789ab";
const T: Duration = Duration::from_secs(20);

struct Netns(String);

impl Netns {
    fn new(role: &str) -> Netns {
        let name = format!("weft-test-agent-{role}-{}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        Netns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
    fn nft(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "nft {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

fn index_object(index: &Index, object: &Value) {
    let resource = Resource::from_object(&Object(object.clone()))
        .unwrap()
        .unwrap();
    index.apply(resource);
}

fn namespace(labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": labels}})
}

fn annotation(store: &Store) -> Option<String> {
    let pod = store
        .get(&ObjectKey::new("", "Pod", Some("shop"), "web-1"))
        .unwrap()
        .unwrap();
    pod.0["metadata"]["annotations"]["ambient.istio.io/redirection"]
        .as_str()
        .map(str::to_owned)
}

fn agent(
    dir: &Path,
    proc_root: Option<PathBuf>,
    index: &std::sync::Arc<Index>,
    store: &Store,
    node: &Netns,
) -> std::sync::Arc<Agent> {
    let run_dir = dir.join(if proc_root.is_some() {
        "run-kube"
    } else {
        "run-files"
    });
    Agent::new(
        Config {
            node: "node-1".into(),
            plugin_socket: run_dir.join("cni-agent.sock"),
            run_dir: run_dir.clone(),
            excluded_namespaces: vec!["kube-system".into()],
            dns_capture: false,
            pod_wait: Duration::from_millis(100),
            proc_root,
        },
        index.clone(),
        Annotator::Store(store.clone()),
        zds::Server::bind(&run_dir.join("ztunnel.sock")).unwrap(),
        Some(probe::Snat::in_netns(node.path())),
    )
}

#[tokio::test]
async fn a_running_pod_enrolled_later_is_found_through_procfs_and_captured() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root (network namespaces, nftables) and CI is set: a skip in CI is a failure"
        );
        eprintln!(
            "SKIPPED a_running_pod_enrolled_later_is_found_through_procfs_and_captured: needs root (network namespaces, nftables)"
        );
        return;
    }
    let node = Netns::new("node");
    let pod_ns = Netns::new("pod");
    let dir = std::env::temp_dir().join(format!("weft-agent-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A fake procfs: process 4242 of the pod (systemd cgroup driver), its ns/net the pod netns.
    let proc_root = dir.join("proc");
    std::fs::create_dir_all(proc_root.join("4242").join("ns")).unwrap();
    std::fs::write(
        proc_root.join("4242").join("cgroup"),
        format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-1.scope\n",
            UID.replace('-', "_")
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink(pod_ns.path(), proc_root.join("4242").join("ns").join("net"))
        .unwrap();

    let store = Store::new(dir.join("store"));
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "uid": UID},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.9", "podIPs": [{"ip": "10.244.1.9"}]}
    });
    store.put(&Object(pod.clone())).unwrap();
    let index = Index::new();
    index_object(&index, &pod);
    index_object(
        &index,
        &namespace(json!({"istio.io/dataplane-mode": "ambient"})),
    );

    let rules = || pod_ns.nft(&["list", "ruleset"]);
    let probe_set = || node.nft(&["list", "set", "inet", probe::TABLE, probe::SET_V4]);

    // Files mode: no record, no procfs lookup: the pod is left alone.
    let files = agent(&dir, None, &index, &store, &node);
    files.restore().await;
    tokio::time::timeout(T, files.reconcile())
        .await
        .expect("reconcile");
    assert!(!rules().contains("weft-ambient"), "{}", rules());
    assert!(!probe_set().contains("elements"), "{}", probe_set());
    assert_eq!(annotation(&store), None);
    drop(files);

    // Kubernetes mode: found through procfs and captured; no ztunnel is connected, so pending.
    let kube = agent(&dir, Some(proc_root.clone()), &index, &store, &node);
    kube.restore().await;
    tokio::time::timeout(T, kube.reconcile())
        .await
        .expect("reconcile");
    assert!(rules().contains("redirect to :15001"), "{}", rules());
    assert!(
        probe_set().contains("elements = { 10.244.1.9 }"),
        "{}",
        probe_set()
    );
    assert_eq!(annotation(&store).as_deref(), Some("pending"));
    let records: Value =
        serde_json::from_slice(&std::fs::read(dir.join("run-kube").join("pods.json")).unwrap())
            .unwrap();
    assert_eq!(
        records[UID]["netns"],
        json!(proc_root.join("4242").join("ns").join("net"))
    );
    assert_eq!(records[UID]["ips"], json!(["10.244.1.9"]));

    // Reconciling again changes nothing.
    let before = (rules(), probe_set());
    tokio::time::timeout(T, kube.reconcile())
        .await
        .expect("reconcile");
    assert_eq!((rules(), probe_set()), before);

    // The namespace leaves the mesh: rules, probe SNAT entry and annotation go.
    index_object(&index, &namespace(json!({})));
    tokio::time::timeout(T, kube.reconcile())
        .await
        .expect("reconcile");
    assert!(!rules().contains("weft-ambient"), "{}", rules());
    assert!(!probe_set().contains("elements"), "{}", probe_set());
    assert_eq!(annotation(&store), None);
    let _ = std::fs::remove_dir_all(&dir);
}
