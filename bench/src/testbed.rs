//! The local cluster the cluster scenarios (`mesh`, `latency`, `waypoint`) share: one 2-node
//! cluster with the three paths of issue 9 side by side, brought up once per `weft-bench` run.
//!
//! | namespace | path | enrolment |
//! |-----------|------|-----------|
//! | `plain`   | S0: no mesh (Service VIP through the node's iptables DNAT, or pod IP) | none |
//! | `mesh`    | L4: client ztunnel → HBONE → server ztunnel | `istio.io/dataplane-mode=ambient` |
//! | `l7`      | L7: client ztunnel → waypoint → server ztunnel | ambient + `istio.io/use-waypoint` |
//!
//! Each namespace has a client pod on node-1, a server pod on node-2 (`weft-echo serve`: HTTP on
//! 8080 behind Service `echo` port 80, TCP echo on 9000; and `iperf3 --server` on 5201) and, in
//! `plain` and `mesh`, a same-node server pod `server-local` on node-1. The cluster is removed
//! when the [`Testbed`] is dropped (also on error).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use weft::cluster::{Cluster, ObjectKey, Options, netns};

use crate::load;
use crate::procfs;

/// Arguments shared by the cluster scenarios.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "testbed_args")]
pub(crate) struct Args {
    /// Name of the local cluster the cluster scenarios create and remove.
    #[arg(long, default_value = "bench")]
    pub(crate) cluster: String,
}

/// One path's endpoints.
#[derive(Debug, Clone)]
pub(crate) struct Path {
    /// Namespace (and path name in the JSON).
    pub(crate) ns: &'static str,
    /// Network namespace of the client pod (node-1).
    pub(crate) client_netns: String,
    /// Service `echo` VIP, port 80 (HTTP on the node-2 server).
    pub(crate) vip: SocketAddr,
    /// Pod IP of the node-2 server.
    pub(crate) server_ip: String,
    /// Pod IP of the node-1 server, in `plain` and `mesh`.
    pub(crate) local_server_ip: Option<String>,
}

impl Path {
    /// The node-2 server's TCP echo port.
    pub(crate) fn echo_addr(&self) -> Result<SocketAddr> {
        Ok(format!("{}:9000", self.server_ip).parse()?)
    }
}

/// The cluster and its three paths.
pub(crate) struct Testbed {
    pub(crate) cluster: Cluster,
    /// S0, no mesh.
    pub(crate) s0: Path,
    /// L4, two ztunnels.
    pub(crate) l4: Path,
    /// L7, two ztunnels and the `l7` namespace's waypoint.
    pub(crate) l7: Path,
    /// ztunnel pids on node-1 (client side) and node-2 (server side).
    pub(crate) ztunnels: [i32; 2],
    /// The waypoint's pid.
    pub(crate) waypoint: i32,
    /// Removes the cluster; declared last so it drops after `cluster`.
    _guard: Guard,
}

/// Removes the cluster when dropped.
struct Guard(String);

impl Drop for Guard {
    fn drop(&mut self) {
        eprintln!("removing local cluster {}", self.0);
        if let Err(err) = Cluster::down(&self.0, None) {
            eprintln!("removing cluster {}: {err}", self.0);
        }
    }
}

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: l7, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: l7}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

fn server(ns: &str, name: &str, app: &str, node: &str) -> String {
    format!(
        r#"
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  containers:
  - name: echo
    command: [weft-echo, serve, --http-port, "8080", --tcp-port, "9000"]
    readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}}}
  - name: iperf
    command: [iperf3, --server, --port, "5201"]
"#
    )
}

fn pods(ns: &str, same_node: bool) -> String {
    let mut out = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {ns}}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {ns}}}
spec: {{nodeName: node-1, containers: [{{name: c, command: [sleep, infinity]}}]}}
"#
    );
    out.push_str(&server(ns, "server", "echo", "node-2"));
    if same_node {
        out.push_str(&server(ns, "server-local", "echo-local", "node-1"));
    }
    out
}

/// Raises this process's open-files limit (the idle-connection figure holds 10,000 sockets).
fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = 262_144.max(hard);
    setrlimit(Resource::RLIMIT_NOFILE, want, want)
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard, hard))
        .context("raising the open-files limit")
}

/// The directory of this executable, where the workspace binaries must be.
fn exe_dir() -> Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("executable directory")?
        .to_path_buf())
}

impl Testbed {
    /// Brings the cluster up, waits until all three paths carry traffic and finds the proxies.
    ///
    /// # Errors
    /// Not root, binaries missing, a pod not ready, a path without traffic after 90 s.
    pub(crate) fn up(args: &Args) -> Result<Testbed> {
        if !weft::cluster::is_root() {
            bail!("the cluster scenarios run on the local cluster, which needs root");
        }
        raise_fd_limit()?;
        let dir = exe_dir()?;
        for bin in [
            "weft",
            "ztunnel",
            "waypoint",
            "weft-echo",
            "weft-controller",
        ] {
            if !dir.join(bin).is_file() {
                bail!(
                    "{bin} not found in {}: build the workspace binaries first (cargo build --release --workspace --bins)",
                    dir.display()
                );
            }
        }
        let _ = Cluster::down(&args.cluster, None);
        let mut options = Options::new(&args.cluster);
        options.nodes = 2;
        options.weft_exe = Some(dir.join("weft"));
        eprintln!("bringing up local cluster {} (2 nodes)", args.cluster);
        let started = Instant::now();
        let cluster = Cluster::up(&options).context("cluster up")?;
        let guard = Guard(args.cluster.clone());
        cluster.apply_yaml(NAMESPACES)?;
        cluster.apply_yaml(&pods("plain", true))?;
        cluster.apply_yaml(&pods("mesh", true))?;
        cluster.apply_yaml(&pods("l7", false))?;
        let ready = Duration::from_secs(90);
        let waypoint_pod = cluster
            .wait_ready(
                "l7",
                &[("gateway.networking.k8s.io/gateway-name", "waypoint")],
                1,
                ready,
            )
            .context("waypoint pod")?
            .remove(0);
        let waypoint_netns = cluster
            .layout()
            .pod_netns(waypoint_pod.uid().context("waypoint uid")?);
        let waypoint = procfs::pid_in_netns("waypoint", &waypoint_netns)?;
        let mut paths = Vec::new();
        // l7 also holds the waypoint's pod.
        for (ns, count, same_node) in [("plain", 3, true), ("mesh", 3, true), ("l7", 3, false)] {
            paths.push(path(&cluster, ns, count, same_node, ready)?);
        }
        let l7 = paths.pop().context("l7 path")?;
        let l4 = paths.pop().context("l4 path")?;
        let s0 = paths.pop().context("s0 path")?;
        wait_enrolled(
            &cluster,
            &[
                ("mesh", "server"),
                ("mesh", "server-local"),
                ("mesh", "client"),
                ("l7", "server"),
                ("l7", "client"),
            ],
            ready,
        )?;
        for p in [&s0, &l4, &l7] {
            warm_up(p, ready)?;
        }
        let ztunnels = [
            cluster.ztunnel_pid(1).context("node-1 ztunnel pid")?,
            cluster.ztunnel_pid(2).context("node-2 ztunnel pid")?,
        ];
        eprintln!(
            "cluster ready in {:.1} s: ztunnel pids {ztunnels:?}, waypoint pid {waypoint}",
            started.elapsed().as_secs_f64()
        );
        Ok(Testbed {
            cluster,
            s0,
            l4,
            l7,
            ztunnels,
            waypoint,
            _guard: guard,
        })
    }
}

/// Waits for `count` ready pods in `ns` and reads the path's addresses.
fn path(
    cluster: &Cluster,
    ns: &'static str,
    count: usize,
    same_node: bool,
    ready: Duration,
) -> Result<Path> {
    let pods = cluster.wait_ready(ns, &[], count, ready)?;
    let find = |name: &str| {
        pods.iter()
            .find(|p| p.name() == name)
            .with_context(|| format!("pod {ns}/{name}"))
    };
    let ip = |name: &str| -> Result<String> {
        Ok(find(name)?.0["status"]["podIP"]
            .as_str()
            .context("pod ip")?
            .to_owned())
    };
    let client_netns = cluster
        .layout()
        .pod_netns(find("client")?.uid().context("client uid")?);
    let svc = cluster
        .store()
        .get(&ObjectKey::new("", "Service", Some(ns), "echo"))?
        .context("echo service")?;
    let vip = svc.0["spec"]["clusterIP"].as_str().context("cluster ip")?;
    Ok(Path {
        ns,
        client_netns,
        vip: format!("{vip}:80").parse()?,
        server_ip: ip("server")?,
        local_server_ip: if same_node {
            Some(ip("server-local")?)
        } else {
            None
        },
    })
}

fn wait_enrolled(cluster: &Cluster, pods: &[(&str, &str)], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let enrolled = pods.iter().all(|(ns, name)| {
            cluster.pod(ns, name).is_ok_and(|p| {
                p.0["metadata"]["annotations"]["ambient.istio.io/redirection"] == "enabled"
            })
        });
        if enrolled {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("mesh pods not enrolled after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Retries until the path answers HTTP on the VIP and TCP echo on each server's pod IP
/// (certificates fetched, HBONE pools connected, the waypoint configured).
fn warm_up(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    // The L7 path carries HTTP to the Service only; the TCP echo ports are used through S0 and
    // L4.
    let mut echo = Vec::new();
    if path.ns != "l7" {
        echo.push(path.echo_addr()?);
    }
    if let Some(ip) = &path.local_server_ip {
        echo.push(format!("{ip}:9000").parse()?);
    }
    let vip = path.vip;
    loop {
        let echo = echo.clone();
        let ok = netns::within(&path.client_netns, move || -> Result<()> {
            let mut conn = load::connect_http(vip)?;
            load::post(&mut conn)?;
            for addr in echo {
                load::connect_echo(addr)?;
            }
            Ok(())
        })?;
        match ok {
            Ok(()) => return Ok(()),
            Err(err) if Instant::now() > deadline => {
                bail!(
                    "no traffic through the {} path after {timeout:?}: {err}",
                    path.ns
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
