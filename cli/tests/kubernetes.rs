//! The local cluster's real Kubernetes control plane (`weft cluster up --kubernetes`): etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler built from their Go modules,
//! reached from the host through `weft cluster kubeconfig`. Needs root and the binaries
//! `scripts/install-deps` builds.

#![allow(clippy::unwrap_used)] // test helpers fail loudly
mod common;

use std::process::Command;
use std::time::Duration;

use common::{WEFT, http_get_in, root_or_skip, wait_until};
use serde_json::Value;
use weft::cluster::{self, Cluster, Options, kube};

/// `kubectl --kubeconfig <kc> <args>` on the host; (success, stdout, stderr).
fn kubectl(kubeconfig: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(kube::program("kubectl").expect("kubectl installed"));
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl runs");
    let mut pipe = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(pipe);
    let out = child.wait_with_output().expect("kubectl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(kubeconfig: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (ok, out, err) = kubectl(kubeconfig, &all, None);
    assert!(ok, "kubectl {args:?}: {err}");
    serde_json::from_str(&out).expect("kubectl -o json")
}

/// `GET /` of weft-echo at `addr` from inside `netns`: the answering pod's name, or the error.
fn get_pod_name(netns: &str, addr: &str) -> Result<String, String> {
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    cluster::netns::within(netns, move || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        conn.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)
            .map_err(|e| format!("read: {e}"))?;
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or(""))
            .map_err(|e| format!("answer {answer:?}: {e}"))?;
        body["pod"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no pod in {body}"))
    })
    .map_err(|e| e.to_string())?
}

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: nobody, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        image: weft/echo
        command: [weft-echo, serve, --http-port, "8080", --tcp-port, "9000"]
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /healthz, port: http}}
      terminationGracePeriodSeconds: 5
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

/// Applied once the namespace's `default` ServiceAccount exists (admission requires it for a
/// bare Pod; a ReplicaSet just retries).
const NOWHERE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: nowhere, namespace: shop}
spec:
  nodeSelector: {weft.dev/no-such-node: "true"}
  containers: [{name: c, image: none, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: on-the-node, namespace: shop}
spec:
  hostNetwork: true
  containers:
  - name: echo
    image: weft/echo
    command: [weft-echo, serve, --http-port, "18080", --tcp-port, "19000"]
    env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
---
apiVersion: v1
kind: Pod
metadata: {name: crasher, namespace: shop}
spec:
  containers: [{name: c, image: none, command: [sh, -c, "exit 3"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: once, namespace: shop}
spec:
  restartPolicy: Never
  containers: [{name: c, image: none, command: [sh, -c, "exit 0"]}]
"#;

#[test]
fn a_real_control_plane_serves_the_cluster_through_kubectl() {
    if !root_or_skip("a_real_control_plane_serves_the_cluster_through_kubectl") {
        return;
    }
    let name = "kube-cp";
    let _ = Cluster::down(name, None);
    let mut options = Options::new(name);
    options.nodes = 2;
    options.weft_exe = Some(WEFT.into());
    options.control_plane = false;
    options.mesh = false;
    options.kubernetes = true;
    let up = Cluster::up(&options).expect("cluster up --kubernetes");
    let guard = common::TestCluster(up);

    // The kubeconfig `weft cluster kubeconfig` prints works from the host (through the
    // loopback forwarder) and authenticates with a client certificate of the cluster CA.
    let out = Command::new(WEFT)
        .args(["cluster", "kubeconfig", "--cluster", name, "--path"])
        .output()
        .expect("weft cluster kubeconfig");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kc = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let text = std::fs::read_to_string(&kc).expect("kubeconfig file");
    assert!(text.contains("server: https://127.0.0.1:"), "{text}");
    let (ok, ready, err) = kubectl(&kc, &["get", "--raw", "/readyz"], None);
    assert!(ok && ready.trim() == "ok", "readyz: {ready} {err}");
    let (ok, version, err) = kubectl(&kc, &["version", "-o", "json"], None);
    assert!(ok, "{err}");
    let version: Value = serde_json::from_str(&version).expect("version json");
    assert_eq!(version["serverVersion"]["gitVersion"], kube::KUBE_VERSION);

    // The apiserver owns the service range: `kubernetes` has its first address.
    let svc = json(&kc, &["get", "service", "kubernetes", "-n", "default"]);
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.1");

    // Each node's netns kubelet registered its Node: Ready, with its pod CIDR and address, and
    // renews its Lease.
    wait_until("2 Ready nodes", Duration::from_secs(30), || {
        let nodes = json(&kc, &["get", "nodes"]);
        let items = nodes["items"].as_array().cloned().unwrap_or_default();
        items.len() == 2
            && items.iter().all(|n| {
                n["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
    });
    for node in 1..=2u8 {
        let n = json(&kc, &["get", "node", &format!("node-{node}")]);
        assert_eq!(n["spec"]["podCIDR"], format!("10.244.{node}.0/24"), "{n}");
        assert_eq!(
            n["status"]["addresses"][0]["address"],
            format!("10.240.0.{}", 10 + node)
        );
        let lease = json(
            &kc,
            &[
                "get",
                "lease",
                "-n",
                "kube-node-lease",
                &format!("node-{node}"),
            ],
        );
        assert_eq!(lease["spec"]["holderIdentity"], format!("node-{node}"));
    }

    // kube-controller-manager makes the Deployment's ReplicaSet and Pods, the scheduler binds
    // them to nodes, the kubelets run them: Running and Ready (their readiness probe passes),
    // each with an IP of its node's pod CIDR.
    let (ok, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(APP));
    assert!(ok, "apply: {err}");
    wait_until(
        "2 Ready pods of the echo ReplicaSet",
        Duration::from_secs(60),
        || {
            let pods = json(&kc, &["get", "pods", "-n", "shop", "-l", "app=echo"]);
            let items = pods["items"].as_array().cloned().unwrap_or_default();
            items.len() == 2
                && items.iter().all(|p| {
                    p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
                        && p["status"]["phase"] == "Running"
                        && p["status"]["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                })
        },
    );
    let pods = json(&kc, &["get", "pods", "-n", "shop", "-l", "app=echo"]);
    let pods = pods["items"].as_array().cloned().unwrap_or_default();
    let layout = guard.layout().clone();
    for pod in &pods {
        let name = pod["metadata"]["name"].as_str().unwrap();
        let node: u8 = pod["spec"]["nodeName"]
            .as_str()
            .unwrap()
            .trim_start_matches("node-")
            .parse()
            .unwrap();
        let ip = pod["status"]["podIP"].as_str().unwrap();
        assert!(
            ip.starts_with(&format!("10.244.{node}.")),
            "{name} on node-{node} has {ip}"
        );
        assert_eq!(pod["status"]["hostIP"], format!("10.240.0.{}", 10 + node));
        // Reachable from the other node, and it knows its name (env from a fieldRef).
        let other = if node == 1 { 2 } else { 1 };
        let answer = http_get_in(
            &layout.node_netns(other),
            format!("{ip}:8080").parse().unwrap(),
            "/",
        );
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or(&answer))
            .unwrap_or_else(|_| panic!("echo answer: {answer}"));
        assert_eq!(body["pod"], name, "{body}");
    }

    // The real kube-proxy (iptables mode, in each node's namespace) serves the Service VIP
    // from the EndpointSlice the controller-manager keeps: requests from a pod reach both.
    let svc = json(&kc, &["get", "service", "echo", "-n", "shop"]);
    let vip = svc["spec"]["clusterIP"].as_str().unwrap().to_owned();
    assert!(vip.starts_with("10.96."), "{svc}");
    let client = layout.pod_netns(pods[0]["metadata"]["uid"].as_str().unwrap());
    let mut seen = std::collections::BTreeSet::new();
    let mut last_error = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the echo VIP {vip} answered only from {seen:?} in 30 s (last error: {last_error})"
        );
        match get_pod_name(&client, &format!("{vip}:80")) {
            Ok(pod) => {
                seen.insert(pod);
            }
            Err(e) => {
                last_error = e;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    // The controller-manager's other loops: the namespace's `default` ServiceAccount and root
    // CA ConfigMap.
    wait_until(
        "ServiceAccount default and kube-root-ca.crt in shop",
        Duration::from_secs(30),
        || {
            kubectl(
                &kc,
                &["get", "serviceaccount", "default", "-n", "shop"],
                None,
            )
            .0 && kubectl(
                &kc,
                &["get", "configmap", "kube-root-ca.crt", "-n", "shop"],
                None,
            )
            .0
        },
    );

    // kube-scheduler: a pod no node fits stays Pending, marked Unschedulable.
    let (ok, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(NOWHERE));
    assert!(ok, "apply: {err}");
    wait_until(
        "the scheduler reports pod nowhere unschedulable",
        Duration::from_secs(30),
        || {
            let pod = json(&kc, &["get", "pod", "nowhere", "-n", "shop"]);
            pod["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == "PodScheduled"
                        && c["status"] == "False"
                        && c["reason"] == "Unschedulable"
                })
            })
        },
    );

    // ServiceAccount tokens (TokenRequest API) authenticate, and RBAC decides: a ServiceAccount
    // with no role may not list pods, and the refusal names who and what. A token bound to
    // another audience (the CA's) is not accepted by the API at all.
    let token_for = |audience: Option<&str>| {
        let mut args = vec!["create", "token", "nobody", "-n", "shop"];
        args.extend(audience.map(|a| ["--audience", a]).into_iter().flatten());
        let (ok, token, err) = kubectl(&kc, &args, None);
        assert!(ok, "create token: {err}");
        token.trim().to_owned()
    };
    // A kubeconfig with only the token (kubectl would otherwise also present the admin's client
    // certificate, which the apiserver checks first).
    let as_token = |token: &str| {
        let mut doc: Value =
            serde_yaml::from_str(&std::fs::read_to_string(&kc).expect("kubeconfig")).expect("yaml");
        doc["users"][0]["user"] = serde_json::json!({ "token": token });
        let path = format!("{kc}.token");
        std::fs::write(&path, serde_yaml::to_string(&doc).expect("yaml")).expect("write");
        let out = kubectl(&path, &["get", "pods", "-n", "shop"], None);
        let _ = std::fs::remove_file(&path);
        out
    };
    let (ok, _, err) = as_token(&token_for(None));
    assert!(!ok, "a ServiceAccount without a role listed pods");
    assert!(
        err.contains("system:serviceaccount:shop:nobody")
            && err.contains("cannot list resource \"pods\""),
        "{err}"
    );
    let token = token_for(Some("istio-ca"));
    let (ok, _, err) = as_token(&token);
    assert!(
        !ok && err.contains("Unauthorized"),
        "an istio-ca token used on the API: {err}"
    );
    // TokenReview checks the token and its audience, as the CA will.
    let review = format!(
        r#"{{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","spec":{{"token":"{token}","audiences":["istio-ca"]}}}}"#
    );
    let (ok, out, err) = kubectl(&kc, &["create", "-o", "json", "-f", "-"], Some(&review));
    assert!(ok, "tokenreview: {err}");
    let review: Value = serde_json::from_str(&out).expect("review json");
    assert_eq!(review["status"]["authenticated"], true, "{review}");
    assert_eq!(
        review["status"]["user"]["username"],
        "system:serviceaccount:shop:nobody"
    );
    let wrong = format!(
        r#"{{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","spec":{{"token":"{token}","audiences":["someone-else"]}}}}"#
    );
    let (ok, out, err) = kubectl(&kc, &["create", "-o", "json", "-f", "-"], Some(&wrong));
    assert!(ok, "tokenreview: {err}");
    let wrong: Value = serde_json::from_str(&out).expect("review json");
    assert_ne!(
        wrong["status"]["authenticated"], true,
        "wrong audience accepted: {wrong}"
    );

    // hostNetwork: the pod runs in its node's namespace, with the node's IP.
    wait_until("pod on-the-node runs", Duration::from_secs(30), || {
        json(&kc, &["get", "pod", "on-the-node", "-n", "shop"])["status"]["phase"] == "Running"
    });
    let pod = json(&kc, &["get", "pod", "on-the-node", "-n", "shop"]);
    assert_eq!(pod["status"]["podIP"], pod["status"]["hostIP"], "{pod}");
    let node: u8 = pod["spec"]["nodeName"]
        .as_str()
        .unwrap()
        .trim_start_matches("node-")
        .parse()
        .unwrap();
    let other = if node == 1 { 2 } else { 1 };
    let host_ip = pod["status"]["hostIP"].as_str().unwrap().to_owned();
    wait_until(
        "on-the-node answers on its node's IP",
        Duration::from_secs(10),
        || {
            get_pod_name(&layout.node_netns(other), &format!("{host_ip}:18080"))
                .is_ok_and(|p| p == "on-the-node")
        },
    );

    // restartPolicy: Always restarts an exiting container with backoff (the pod stays
    // Running and counts restarts); Never leaves it, and a clean exit is Succeeded.
    wait_until("crasher restarted twice", Duration::from_secs(30), || {
        let pod = json(&kc, &["get", "pod", "crasher", "-n", "shop"]);
        pod["status"]["phase"] == "Running"
            && pod["status"]["containerStatuses"][0]["restartCount"].as_u64() >= Some(2)
    });
    wait_until("once Succeeded", Duration::from_secs(30), || {
        let pod = json(&kc, &["get", "pod", "once", "-n", "shop"]);
        pod["status"]["phase"] == "Succeeded"
            && pod["status"]["containerStatuses"][0]["restartCount"] == 0
    });

    // Graceful deletion: the kubelets stop the pods (SIGTERM) and delete them for good, their
    // network namespaces go, and the namespace itself can then be deleted.
    let uids: Vec<String> = pods
        .iter()
        .map(|p| p["metadata"]["uid"].as_str().unwrap().to_owned())
        .collect();
    let (ok, _, err) = kubectl(&kc, &["delete", "deployment", "echo", "-n", "shop"], None);
    assert!(ok, "delete deployment: {err}");
    wait_until("the echo pods are gone", Duration::from_secs(30), || {
        json(&kc, &["get", "pods", "-n", "shop", "-l", "app=echo"])["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    for uid in &uids {
        assert!(
            !cluster::netns::exists(&layout.pod_netns(uid)),
            "pod {uid}'s network namespace is left"
        );
    }
    let (ok, _, err) = kubectl(
        &kc,
        &[
            "delete",
            "namespace",
            "shop",
            "--wait=true",
            "--timeout=60s",
        ],
        None,
    );
    assert!(ok, "delete namespace: {err}");
    assert!(
        !kubectl(&kc, &["get", "namespace", "shop"], None).0,
        "namespace shop is still there"
    );

    // Weft's charts against the real apiserver: `helm install` of the base chart creates the
    // CRDs, and every object the other charts render passes the server's strict validation
    // (Kubernetes 1.35 schemas, unknown fields refused).
    let charts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts");
    let helm = kube::program("helm").expect("helm installed");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("runs");
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (ok, _, err) = kubectl(&kc, &["create", "namespace", "istio-system"], None);
    assert!(ok, "{err}");
    run(Command::new(&helm)
        .args(["install", "weft-base"])
        .arg(charts.join("base"))
        .args(["--namespace", "istio-system", "--wait", "--kubeconfig", &kc]));
    let crds = json(&kc, &["get", "crd"]);
    let names: Vec<&str> = crds["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["metadata"]["name"].as_str())
        .collect();
    for crd in [
        "authorizationpolicies.security.istio.io",
        "httproutes.gateway.networking.k8s.io",
        "referencegrants.gateway.networking.k8s.io",
    ] {
        assert!(names.contains(&crd), "{crd} not installed: {names:?}");
    }
    for chart in ["controller", "ztunnel", "cni"] {
        for values in [
            None,
            Some(charts.join(format!("tests/values/{chart}.yaml"))),
        ] {
            let mut cmd = Command::new(&helm);
            cmd.args(["template", "t"])
                .arg(charts.join(chart))
                .args(["--namespace", "istio-system"]);
            if let Some(v) = &values {
                cmd.arg("-f").arg(v);
            }
            let rendered = run(&mut cmd);
            let (ok, out, err) = kubectl(
                &kc,
                &["apply", "--dry-run=server", "--validate=strict", "-f", "-"],
                Some(&rendered),
            );
            assert!(ok, "{chart} {values:?} refused by the apiserver: {err}");
            assert!(out.contains("(server dry run)"), "{out}");
        }
    }
    run(Command::new(&helm).args([
        "uninstall",
        "weft-base",
        "--namespace",
        "istio-system",
        "--kubeconfig",
        &kc,
    ]));

    // Down removes the control plane with everything else: no process, no forwarder.
    let port: u16 = std::fs::read_to_string(kube::Paths::new(&layout).proxy_port_file())
        .expect("port file")
        .trim()
        .parse()
        .expect("port");
    drop(guard);
    assert!(cluster::network::namespaces(&layout).is_empty());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the apiserver forwarder still listens on 127.0.0.1:{port}"
    );
}

#[test]
fn up_without_kubernetes_installed_says_how_to_install_it_and_leaves_nothing() {
    if !root_or_skip("up_without_kubernetes_installed_says_how_to_install_it_and_leaves_nothing") {
        return;
    }
    let name = "kube-missing";
    let _ = Cluster::down(name, None);
    // The binaries are looked up in $WEFT_KUBE_BIN_DIR: point it at an empty directory, in a
    // child process so this test's environment stays as it is.
    let empty = std::env::temp_dir().join("weft-kube-empty-bin");
    std::fs::create_dir_all(&empty).expect("empty dir");
    let out = Command::new(WEFT)
        .args([
            "cluster",
            "up",
            "--kubernetes",
            "--nodes",
            "1",
            "--cluster",
            name,
        ])
        .env("WEFT_KUBE_BIN_DIR", &empty)
        .output()
        .expect("weft cluster up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up succeeded without Kubernetes");
    assert!(
        err.contains("not found in") && err.contains("scripts/install-deps"),
        "{err}"
    );
    let layout = cluster::Layout::new(name, None).expect("layout");
    assert!(
        cluster::network::namespaces(&layout).is_empty(),
        "namespaces left behind"
    );
    assert!(!layout.state_dir().exists(), "state dir left behind");
}

const MESHED_APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: demo}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        image: weft/echo
        command: [weft-echo, serve, --http-port, "8080", --tcp-port, "9000"]
        env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /healthz, port: http}}
      terminationGracePeriodSeconds: 5
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec:
  serviceAccountName: client
  terminationGracePeriodSeconds: 2
  containers:
  - name: client
    image: curlimages/curl
    # Debian's curl, by the short name, the namespace-qualified name and the full name: the
    # pod's resolv.conf points at CoreDNS and searches demo.svc.cluster.local first.
    command:
    - sh
    - -c
    - |
      while true; do
        for name in echo echo.demo echo.demo.svc.cluster.local; do
          curl -s -m 3 -o /dev/null -w "$name %{http_code}\n" "http://$name/"
        done
        sleep 0.5
      done
"#;

/// 3,000 requests at 200/s (15 s) from a meshed pod to the echo Service, summed up.
const LOAD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: load, namespace: demo, labels: {app: load}}
spec:
  serviceAccountName: client
  restartPolicy: Never
  containers:
  - name: load
    image: weft/echo
    command: [weft-echo, client, "http://echo.demo/", --rate, "200", --count, "3000", --concurrency, "8", --summary]
"#;

const WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: demo
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
"#;

/// Pods of `namespace` with label `selector`, as JSON.
fn pods_of(kc: &str, namespace: &str, selector: &str) -> Vec<Value> {
    json(kc, &["get", "pods", "-n", namespace, "-l", selector])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

#[test]
fn weft_installs_with_helm_and_meshes_pods_reached_by_dns_names() {
    if !root_or_skip("weft_installs_with_helm_and_meshes_pods_reached_by_dns_names") {
        return;
    }
    let name = "kube-mesh";
    let _ = Cluster::down(name, None);
    let mut options = Options::new(name);
    options.nodes = 2;
    options.weft_exe = Some(WEFT.into());
    options.kubernetes = true;
    // `up --kubernetes` installs Weft with `helm install` of charts/ and waits for it.
    let up = Cluster::up(&options).expect("cluster up --kubernetes with the mesh");
    let guard = common::TestCluster(up);
    let layout = guard.layout().clone();
    let kc = guard
        .0
        .kubeconfig_path()
        .expect("kubeconfig")
        .display()
        .to_string();

    // The releases, and the mesh as pods: the controller Deployment, and a ztunnel and a CNI
    // agent DaemonSet pod on every node, all Ready; CoreDNS too.
    let helm = kube::program("helm").expect("helm installed");
    let out = Command::new(&helm)
        .args([
            "list",
            "-n",
            "istio-system",
            "-o",
            "json",
            "--kubeconfig",
            &kc,
        ])
        .output()
        .expect("helm list");
    let releases: Value = serde_json::from_slice(&out.stdout).expect("helm list json");
    let mut names: Vec<&str> = releases
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "deployed")
        .filter_map(|r| r["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["weft-base", "weft-cni", "weft-controller", "weft-ztunnel"]
    );
    for (selector, count) in [
        ("app.kubernetes.io/name=ztunnel", 2),
        ("app.kubernetes.io/name=weft-cni", 2),
        ("app.kubernetes.io/name=weft-controller", 1),
    ] {
        let pods = pods_of(&kc, "istio-system", selector);
        assert_eq!(pods.len(), count, "{selector}: {pods:?}");
        assert!(
            pods.iter().all(is_ready),
            "{selector} not all Ready: {pods:?}"
        );
        if count == 2 {
            let mut nodes: Vec<&str> = pods
                .iter()
                .filter_map(|p| p["spec"]["nodeName"].as_str())
                .collect();
            nodes.sort_unstable();
            assert_eq!(nodes, ["node-1", "node-2"], "{selector}");
        }
    }
    wait_until("CoreDNS Ready", Duration::from_secs(30), || {
        pods_of(&kc, "kube-system", "k8s-app=kube-dns")
            .iter()
            .any(is_ready)
    });
    // The CNI agents chained weft-cni into each node's CNI configuration.
    for node in 1..=2u8 {
        let conf = layout
            .node_root(node)
            .join("etc/cni/net.d/10-weft.conflist");
        let text = std::fs::read_to_string(&conf).expect("node conflist");
        assert!(text.contains("\"weft-cni\""), "{}: {text}", conf.display());
    }

    // An ambient namespace: its pods are enrolled as they start (the CNI agent's annotation),
    // and the client reaches the Service by every DNS name.
    let (ok, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(MESHED_APP));
    assert!(ok, "apply: {err}");
    wait_until("the demo pods Ready", Duration::from_secs(60), || {
        let pods = pods_of(&kc, "demo", "app in (echo,client)");
        pods.len() == 3 && pods.iter().all(is_ready)
    });
    let pods = pods_of(&kc, "demo", "app in (echo,client)");
    for pod in &pods {
        assert_eq!(
            pod["metadata"]["annotations"]["ambient.istio.io/redirection"], "enabled",
            "{pod}"
        );
    }
    let client = pods
        .iter()
        .find(|p| p["metadata"]["name"] == "client")
        .expect("client pod");
    let client_log = layout
        .pod_dir(client["metadata"]["uid"].as_str().unwrap())
        .join("client.log");
    wait_until(
        "the client reaches echo by three names",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(&client_log).unwrap_or_default();
            [
                "echo 200",
                "echo.demo 200",
                "echo.demo.svc.cluster.local 200",
            ]
            .iter()
            .all(|line| log.lines().any(|l| l == *line))
        },
    );

    // `kubectl logs` reaches the netns kubelet's API (the apiserver dials the node's IP with
    // its kubelet client certificate): the last lines, and a container that does not exist.
    let (ok, logs, err) = kubectl(&kc, &["logs", "client", "-n", "demo", "--tail", "3"], None);
    assert!(ok, "kubectl logs: {err}");
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 3, "{logs}");
    assert!(lines.iter().all(|l| l.ends_with(" 200")), "{logs}");
    let (ok, _, err) = kubectl(&kc, &["logs", "client", "-n", "demo", "-c", "nope"], None);
    assert!(!ok && err.contains("nope"), "{err}");

    // Through the mesh: a server-side ztunnel counted the client's connections as mutual TLS
    // from the client's SPIFFE identity.
    let ztunnels = pods_of(&kc, "istio-system", "app.kubernetes.io/name=ztunnel");
    let principal = "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"";
    wait_until(
        "a ztunnel reports the client's mTLS connections",
        Duration::from_secs(30),
        || {
            ztunnels.iter().any(|z| {
                let ip = z["status"]["podIP"].as_str().unwrap_or_default();
                let node: u8 = z["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches("node-")
                    .parse()
                    .unwrap_or(1);
                let metrics = http_get_in(
                    &layout.node_netns(node),
                    format!("{ip}:15020").parse().unwrap(),
                    "/metrics",
                );
                metrics.lines().any(|l| {
                    l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\"")
                        && l.contains(principal)
                        && l.contains("connection_security_policy=\"mutual_tls\"")
                })
            })
        },
    );

    // The apiserver restarted under 200 requests/s of meshed traffic: the data plane does not
    // depend on it (ztunnels keep their config, the controller relists and serves again), so
    // not one request fails and no ztunnel NACKs what the controller sends after.
    let (ok, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(LOAD));
    assert!(ok, "apply load: {err}");
    wait_until("the load pod runs", Duration::from_secs(30), || {
        json(&kc, &["get", "pod", "load", "-n", "demo"])["status"]["phase"] == "Running"
    });
    std::thread::sleep(Duration::from_secs(3));
    let away = kube::restart(&layout, "kube-apiserver").expect("restart kube-apiserver");
    assert!(
        away > Duration::from_secs(1),
        "the apiserver was away only {away:?}"
    );
    wait_until("the load pod finishes", Duration::from_secs(60), || {
        let phase = json(&kc, &["get", "pod", "load", "-n", "demo"])["status"]["phase"].clone();
        phase == "Succeeded" || phase == "Failed"
    });
    let load = json(&kc, &["get", "pod", "load", "-n", "demo"]);
    let load_log = layout
        .pod_dir(load["metadata"]["uid"].as_str().unwrap())
        .join("load.log");
    let text = std::fs::read_to_string(&load_log).expect("load log");
    let summary: Value =
        serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_default();
    assert_eq!(summary["total"], 3000, "{text}");
    assert_eq!(
        summary["failed"], 0,
        "requests failed across the apiserver restart: {text}"
    );
    assert_eq!(load["status"]["phase"], "Succeeded", "{load}");
    let controller = &pods_of(
        &kc,
        "istio-system",
        "app.kubernetes.io/name=weft-controller",
    )[0];
    let connections = http_get_in(
        &layout.pod_netns(controller["metadata"]["uid"].as_str().unwrap()),
        "127.0.0.1:15014".parse().unwrap(),
        "/debug/connections",
    );
    assert!(connections.contains("ztunnel~"), "{connections}");
    assert!(
        !connections.contains("\"last_nack\":{"),
        "a NACK: {connections}"
    );

    // Only the RBAC the chart grants: with `pods` taken out of its ClusterRole, a restarted
    // controller says which verb on which resource it was refused and does not serve a partial
    // view; the ztunnels keep their last good config and traffic keeps flowing. With the rule
    // back it serves again.
    let role = json(&kc, &["get", "clusterrole", "weft-controller"]);
    let mut cut = role.clone();
    let resources = cut["rules"][0]["resources"]
        .as_array_mut()
        .expect("rule 0 resources");
    resources.retain(|r| r != "pods");
    cut["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (ok, _, err) = kubectl(&kc, &["replace", "-f", "-"], Some(&cut.to_string()));
    assert!(ok, "replace clusterrole: {err}");
    let (ok, _, err) = kubectl(
        &kc,
        &[
            "delete",
            "pod",
            "-n",
            "istio-system",
            "-l",
            "app.kubernetes.io/name=weft-controller",
            "--wait=false",
        ],
        None,
    );
    assert!(ok, "delete controller pod: {err}");
    let old_uid = controller["metadata"]["uid"].as_str().unwrap().to_owned();
    let mut refused_log = None;
    wait_until(
        "the new controller names the refused list",
        Duration::from_secs(60),
        || {
            let new = pods_of(
                &kc,
                "istio-system",
                "app.kubernetes.io/name=weft-controller",
            );
            let Some(pod) = new
                .iter()
                .find(|p| p["metadata"]["uid"] != old_uid.as_str())
            else {
                return false;
            };
            let log = layout
                .pod_dir(pod["metadata"]["uid"].as_str().unwrap())
                .join("controller.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            refused_log = Some(log);
            text.contains("cannot list resource \"pods\"")
        },
    );
    let before = std::fs::read_to_string(&client_log)
        .unwrap_or_default()
        .lines()
        .count();
    std::thread::sleep(Duration::from_secs(4));
    let text = std::fs::read_to_string(&client_log).unwrap_or_default();
    let fresh: Vec<&str> = text.lines().skip(before).collect();
    assert!(fresh.len() >= 6, "the client stalled: {fresh:?}");
    assert!(
        fresh.iter().all(|l| l.ends_with(" 200")),
        "requests failed without the controller's pods list: {fresh:?}"
    );
    let refused = std::fs::read_to_string(refused_log.as_ref().unwrap()).unwrap_or_default();
    assert!(
        !refused.contains("controller ready"),
        "served without listing pods: {refused}"
    );
    let mut restored = role.clone();
    restored["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (ok, _, err) = kubectl(&kc, &["replace", "-f", "-"], Some(&restored.to_string()));
    assert!(ok, "restore clusterrole: {err}");
    wait_until(
        "the controller serves again",
        Duration::from_secs(60),
        || {
            pods_of(
                &kc,
                "istio-system",
                "app.kubernetes.io/name=weft-controller",
            )
            .iter()
            .any(|p| p["metadata"]["uid"] != old_uid.as_str() && is_ready(p))
        },
    );

    // L7 where it pays: a waypoint Gateway for the namespace. The controller provisions its
    // Deployment (a pod on our kubelet, certificate from the CA by its projected token) and
    // programs the Gateway; the client's requests then cross it, in its access log with the
    // client's SPIFFE identity — with no pod restarted.
    let (ok, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(WAYPOINT));
    assert!(ok, "apply waypoint: {err}");
    let (ok, _, err) = kubectl(
        &kc,
        &[
            "label",
            "namespace",
            "demo",
            "istio.io/use-waypoint=waypoint",
        ],
        None,
    );
    assert!(ok, "label: {err}");
    wait_until(
        "the waypoint Gateway Programmed",
        Duration::from_secs(60),
        || {
            json(&kc, &["get", "gateway", "waypoint", "-n", "demo"])["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Programmed" && c["status"] == "True")
                })
        },
    );
    let waypoint = pods_of(
        &kc,
        "demo",
        "gateway.networking.k8s.io/gateway-name=waypoint",
    );
    assert_eq!(waypoint.len(), 1, "{waypoint:?}");
    let waypoint_log = layout
        .pod_dir(waypoint[0]["metadata"]["uid"].as_str().unwrap())
        .join("waypoint.log");
    wait_until(
        "the waypoint logs the client's requests",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&waypoint_log)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains("request complete")
                        && l.contains("status=200")
                        && l.contains("spiffe://cluster.local/ns/demo/sa/client")
                })
        },
    );
    for pod in pods_of(&kc, "demo", "app in (echo,client)") {
        assert_eq!(
            pod["status"]["containerStatuses"][0]["restartCount"], 0,
            "{pod}"
        );
        assert!(
            pods.iter()
                .any(|p| p["metadata"]["uid"] == pod["metadata"]["uid"]),
            "pod {} was replaced",
            pod["metadata"]["name"]
        );
    }

    // What the controller provisions comes back when deleted by hand (its periodic resync).
    let (ok, _, err) = kubectl(
        &kc,
        &["delete", "deployment", "waypoint", "-n", "demo"],
        None,
    );
    assert!(ok, "delete the waypoint Deployment: {err}");
    wait_until(
        "the waypoint Deployment re-created and available",
        Duration::from_secs(90),
        || {
            kubectl(&kc, &["get", "deployment", "waypoint", "-n", "demo"], None).0
                && json(&kc, &["get", "deployment", "waypoint", "-n", "demo"])["status"]["availableReplicas"]
                    == 1
        },
    );

    // A namespace deleted while enrolled cleans up: its pods stop, their network namespaces
    // (and the capture rules inside them) go, and no ztunnel keeps a proxy or a workload of it.
    let uids: Vec<String> = pods
        .iter()
        .map(|p| p["metadata"]["uid"].as_str().unwrap().to_owned())
        .collect();
    let (ok, _, err) = kubectl(
        &kc,
        &[
            "delete",
            "namespace",
            "demo",
            "--wait=true",
            "--timeout=60s",
        ],
        None,
    );
    assert!(ok, "delete namespace demo: {err}");
    for uid in &uids {
        assert!(
            !cluster::netns::exists(&layout.pod_netns(uid)),
            "pod {uid}'s network namespace is left"
        );
    }
    wait_until(
        "no ztunnel holds state of namespace demo",
        Duration::from_secs(30),
        || {
            ztunnels.iter().all(|z| {
                let netns = layout.pod_netns(z["metadata"]["uid"].as_str().unwrap());
                let dump = http_get_in(&netns, "127.0.0.1:15000".parse().unwrap(), "/config_dump");
                let body: Value = serde_json::from_str(dump.split("\r\n\r\n").nth(1).unwrap_or(""))
                    .unwrap_or_default();
                body.is_object()
                    && body["pods"].as_array().is_some_and(|p| {
                        p.iter()
                            .all(|p| !uids.iter().any(|u| p["uid"] == u.as_str()))
                    })
                    && body["workloads"]
                        .as_array()
                        .is_some_and(|w| w.iter().all(|w| w["namespace"] != "demo"))
            })
        },
    );
    for node in 1..=2u8 {
        let records = layout.node_root(node).join("var/run/weft-cni/pods.json");
        let text = std::fs::read_to_string(&records).unwrap_or_default();
        assert!(
            uids.iter().all(|u| !text.contains(u.as_str())),
            "{} still records a deleted pod: {text}",
            records.display()
        );
    }

    // Upgrade in place, then uninstall: every release's objects go.
    let charts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts");
    let out = Command::new(&helm)
        .args(["upgrade", "weft-ztunnel"])
        .arg(charts.join("ztunnel"))
        .args([
            "-n",
            "istio-system",
            "--set",
            "logLevel=debug",
            "--wait",
            "--timeout",
            "120s",
        ])
        .args(["--kubeconfig", &kc])
        .output()
        .expect("helm upgrade");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds = json(&kc, &["get", "daemonset", "ztunnel", "-n", "istio-system"]);
    assert_eq!(ds["status"]["numberReady"], 2, "{ds}");
    let env = &ds["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "RUST_LOG" && e["value"] == "debug"),
        "{env}"
    );
    for release in ["weft-ztunnel", "weft-cni", "weft-controller", "weft-base"] {
        let out = Command::new(&helm)
            .args([
                "uninstall",
                release,
                "-n",
                "istio-system",
                "--wait",
                "--kubeconfig",
                &kc,
            ])
            .output()
            .expect("helm uninstall");
        assert!(
            out.status.success(),
            "{release}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_until("istio-system empty", Duration::from_secs(60), || {
        let all = json(
            &kc,
            &[
                "get",
                "pods,daemonsets,deployments,services,serviceaccounts,roles,rolebindings",
                "-n",
                "istio-system",
                "-l",
                "app.kubernetes.io/managed-by=Helm",
            ],
        );
        all["items"].as_array().is_some_and(Vec::is_empty)
    });
    let cluster_wide = json(
        &kc,
        &[
            "get",
            "clusterroles,clusterrolebindings",
            "-l",
            "app.kubernetes.io/managed-by=Helm",
        ],
    );
    assert!(
        cluster_wide["items"].as_array().is_some_and(Vec::is_empty),
        "{cluster_wide}"
    );
}
