//! `weft demo`: the guided tour of incremental mesh adoption, L4 then L7, on a 2-node local
//! cluster.
//!
//! Brings the cluster up — the real Kubernetes control plane (etcd, kube-apiserver,
//! controller-manager, scheduler, kube-proxy per node, CoreDNS) with Weft installed by
//! `helm install` of its own charts (the controller as a Deployment, ztunnel and the CNI agent as
//! DaemonSets on our netns kubelets) — applies the manifests of
//! `examples/demo/` and `examples/bring-your-own-app/web.yaml` (built in; `--examples DIR`
//! reads them from a directory instead) and walks through eight steps, printing for each client
//! what was **observed**, never canned text:
//!
//! * (a) before enrollment: plaintext, no proxy on the path, the server sees the client's IP;
//! * (b) namespace `demo` labelled ambient, no pod restarted: the same requests are mutual TLS
//!   with the client's SPIFFE identity, the server still sees the client's IP, and the
//!   non-mesh client still gets through in plaintext (PERMISSIVE);
//! * (c) an AuthorizationPolicy allowing only the frontend's identity: the other clients are
//!   refused;
//! * (d) that policy removed and PeerAuthentication STRICT applied: mesh clients get through,
//!   the non-mesh client is refused;
//! * (e)–(h), in [`l7`]: a waypoint for the namespace (requests cross it, seen in its own
//!   metrics; curl → nginx too), an HTTPRoute canary split, an L7 AuthorizationPolicy next to
//!   the L4 one, and the waypoint removed — all without restarting a pod.
//!
//! Clients dial Services by their DNS names (`echo.demo`, `web.demo`, answered by CoreDNS).
//! What a request did comes from the client (status, which replica answered, the source address
//! the server saw) and from the destination ztunnels' metrics read before and after it
//! (`istio_tcp_connections_opened_total` by `connection_security_policy`, `source_principal`
//! and `response_flags`). Each step waits (up to [`CONVERGE`]) for the change to reach the
//! ztunnels before reporting; if what it expects never happens it still prints what it saw,
//! marks the line `UNEXPECTED`, and the demo fails at the end.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::cluster::{self, Cluster, Object, Options, kube, layout};

mod l7;
mod observe;

use observe::{Observed, Pods, observe};

/// The demo cluster's default name.
pub const DEFAULT_NAME: &str = "demo";

/// How long a step waits for the mesh to reflect a change.
pub const CONVERGE: Duration = Duration::from_secs(30);

/// The built-in copies of `examples/demo/`.
const APP: &str = include_str!("../../examples/demo/00-app.yaml");
const ALLOW_FRONTEND: &str = include_str!("../../examples/demo/10-allow-frontend.yaml");
const STRICT: &str = include_str!("../../examples/demo/20-strict-mtls.yaml");
const CANARY_ROUTE: &str = include_str!("../../examples/demo/30-canary-route.yaml");
const L7_POLICY: &str = include_str!("../../examples/demo/40-l7-policy.yaml");
/// The "bring your own app" web server (nginx), deployed next to echo.
const WEB: &str = include_str!("../../examples/bring-your-own-app/web.yaml");

/// The demo's manifests by file name (`--examples DIR` replaces them with `DIR/<name>`; the
/// web server's is `web.yaml`).
const MANIFESTS: [(&str, &str); 6] = [
    ("00-app.yaml", APP),
    ("10-allow-frontend.yaml", ALLOW_FRONTEND),
    ("20-strict-mtls.yaml", STRICT),
    ("30-canary-route.yaml", CANARY_ROUTE),
    ("40-l7-policy.yaml", L7_POLICY),
    ("web.yaml", WEB),
];

/// Requests per client per observation.
const REQUESTS: u32 = 4;

/// The namespace the demo enrolls.
const NS: &str = "demo";

/// The echo Service as clients dial it (a pod's resolver searches `<ns>.svc.cluster.local`).
const ECHO_HOST: &str = "echo.demo";
/// The nginx Service as clients dial it.
const WEB_HOST: &str = "web.demo";

/// What `weft demo` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Cluster name.
    pub name: String,
    /// Read the manifests from this directory instead of the built-in copies.
    pub examples: Option<PathBuf>,
    /// The `weft` executable whose directory holds the other binaries; default this one.
    pub weft_exe: Option<PathBuf>,
}

impl Config {
    /// Defaults for cluster `name`.
    pub fn new(name: &str) -> Self {
        Config {
            name: name.to_owned(),
            examples: None,
            weft_exe: None,
        }
    }
}

/// Removes the demo cluster; `false` if there was none.
///
/// # Errors
/// When removing fails.
pub fn down(name: &str) -> Result<bool> {
    Ok(Cluster::down(name, None)?)
}

/// The programs the mesh needs next to `weft`.
const BINARIES: [&str; 5] = [
    "weft-controller",
    "ztunnel",
    "weft-cni",
    "weft-cni-agent",
    "weft-echo",
];

/// Checks what the demo needs and says exactly what to do when something is missing.
fn preflight(config: &Config, weft_exe: &Path) -> Result<()> {
    if !cluster::is_root() {
        bail!(
            "weft demo needs root: it creates network namespaces, veth pairs and nftables rules \
             (run it as root, e.g. `sudo scripts/demo`)"
        );
    }
    let cni = Path::new(layout::DEFAULT_CNI_BIN_DIR);
    let missing: Vec<&str> = ["bridge", "host-local", "loopback"]
        .into_iter()
        .filter(|p| !cni.join(p).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "the CNI plugins {} are missing from {}: install Debian's containernetworking-plugins \
             (`apt-get install containernetworking-plugins`), or run `scripts/demo`, which \
             installs every missing package",
            missing.join(", "),
            cni.display()
        );
    }
    let tools: Vec<&str> = ["ip", "nft", "iptables"]
        .into_iter()
        .filter(|t| !on_path(t))
        .collect();
    if !tools.is_empty() {
        bail!(
            "{} not found on PATH: `apt-get install iproute2 nftables iptables`, or run \
             `scripts/demo`",
            tools.join(", ")
        );
    }
    let dir = weft_exe.parent().unwrap_or(Path::new("."));
    let absent: Vec<&str> = BINARIES
        .into_iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if !absent.is_empty() {
        bail!(
            "{} not found next to {}: build them with `cargo build --release --workspace \
             --bins` (or run `scripts/demo`)",
            absent.join(", "),
            weft_exe.display()
        );
    }
    let missing: Vec<&str> = kube::PROGRAMS
        .iter()
        .chain(&kube::NODE_PROGRAMS)
        .chain(&["kubectl", "helm"])
        .copied()
        .filter(|p| kube::program(p).is_err())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} not found in {}: `scripts/install-deps` builds the Kubernetes control plane \
             from its Go modules and installs kubectl and helm (or run `scripts/demo`)",
            missing.join(", "),
            kube::bin_dir().display()
        );
    }
    if Cluster::open(&config.name, None).is_ok() {
        bail!(
            "a cluster named {name:?} is already up (a previous demo?): `weft demo down{flag}` \
             removes it; or look around with `kubectl --kubeconfig $(weft cluster kubeconfig --cluster {name} --path) get pods -A`",
            name = config.name,
            flag = if config.name == DEFAULT_NAME {
                String::new()
            } else {
                format!(" --cluster {}", config.name)
            }
        );
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn manifest(examples: Option<&Path>, file: &str) -> Result<String> {
    match examples {
        Some(dir) => {
            let path = dir.join(file);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        }
        None => MANIFESTS
            .iter()
            .find(|(name, _)| *name == file)
            .map(|(_, text)| (*text).to_owned())
            .with_context(|| format!("no built-in manifest {file}")),
    }
}

/// Everything the report lines need.
struct Tour<'a> {
    cluster: &'a Cluster,
    examples: Option<&'a Path>,
    url: String,
    out: &'a mut dyn Write,
    unexpected: usize,
}

impl Tour<'_> {
    fn say(&mut self, text: &str) -> Result<()> {
        writeln!(self.out, "{text}")?;
        self.out.flush()?;
        Ok(())
    }

    /// The manifest `file` of the demo (built in, or from `--examples`).
    fn manifest(&self, file: &str) -> Result<String> {
        manifest(self.examples, file)
    }

    /// Prints an observation, marked `UNEXPECTED` (and counted) when it is not what the mesh
    /// should do.
    fn report(&mut self, ok: bool, line: &str, expected: &str) -> Result<()> {
        if ok {
            self.say(&format!("    {line}"))
        } else {
            self.unexpected += 1;
            self.say(&format!("    UNEXPECTED {line} (expected: {expected})"))
        }
    }

    /// Observes `ns/pod` → echo until `expected` holds (or [`CONVERGE`] passes) and reports it.
    fn request(
        &mut self,
        ns: &str,
        pod: &str,
        expected: &str,
        holds: impl Fn(&Observed) -> bool,
    ) -> Result<Observed> {
        let url = self.url.clone();
        self.request_to(ns, pod, &url, "echo.demo", expected, holds)
    }

    /// As [`Tour::request`] to `url`, named `target` in the report.
    fn request_to(
        &mut self,
        ns: &str,
        pod: &str,
        url: &str,
        target: &str,
        expected: &str,
        holds: impl Fn(&Observed) -> bool,
    ) -> Result<Observed> {
        let deadline = Instant::now() + CONVERGE;
        let observed = loop {
            let observed = observe(self.cluster, ns, pod, url)?;
            if holds(&observed) || Instant::now() > deadline {
                break observed;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        let line = self.describe(ns, pod, target, &observed)?;
        self.report(holds(&observed), &line, expected)?;
        Ok(observed)
    }

    fn describe(&self, ns: &str, pod: &str, target: &str, o: &Observed) -> Result<String> {
        let client = Pods::of(self.cluster, ns)?;
        let servers = Pods::of(self.cluster, NS)?;
        let mut text = format!("{ns}/{pod} → {target}: {}/{} answered", o.answered, o.sent);
        if o.answered > 0 {
            let by: Vec<String> = o
                .servers
                .iter()
                .map(|s| format!("{s} ({})", servers.node(s)))
                .collect();
            let seen: Vec<&str> = o.sources.iter().map(String::as_str).collect();
            let own = client.ip(pod);
            let whose = if seen == [own] {
                format!("{pod}'s own IP")
            } else {
                format!("{pod}'s IP is {own}")
            };
            text.push_str(&format!(
                " by {}; the server saw {} ({whose})",
                by.join(", "),
                seen.join(", ")
            ));
            let principals = o.mtls_principals("-");
            if !principals.is_empty() {
                let ids: Vec<String> = principals
                    .iter()
                    .map(|p| format!("spiffe://{}", p.trim_start_matches("spiffe://")))
                    .collect();
                text.push_str(&format!(
                    "; mTLS through ztunnel, client identity {}",
                    ids.join(", ")
                ));
            } else if o.counted("unknown", "-") {
                text.push_str("; plaintext, accepted by the server's ztunnel");
            } else if o.mesh.is_empty() {
                text.push_str("; plaintext, no proxy on the path");
            }
        } else {
            text.push_str(" — refused");
            let denied_mtls = o.mtls_principals("DENY");
            if !denied_mtls.is_empty() {
                let ids: Vec<&str> = denied_mtls.into_iter().collect();
                text.push_str(&format!(
                    ": the server's ztunnel denied identity {}",
                    ids.join(", ")
                ));
            } else if o.counted("unknown", "DENY") {
                text.push_str(": the server's ztunnel denied plaintext (no identity)");
            }
        }
        Ok(text)
    }
}

fn annotation(pod: &Object) -> Option<&str> {
    pod.0["metadata"]["annotations"]["ambient.istio.io/redirection"].as_str()
}

/// Runs the tour, writing the report to `out`. The cluster stays up for looking around.
///
/// # Errors
/// A missing prerequisite (with what to do), a cluster that fails to come up, or a step whose
/// observation never matched what the mesh should do.
pub fn run(config: &Config, out: &mut dyn Write) -> Result<()> {
    let weft_exe = match &config.weft_exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().context("locating the weft executable")?,
    };
    preflight(config, &weft_exe)?;
    let started = Instant::now();
    writeln!(
        out,
        "Weft demo: bringing up local cluster {:?}: 2 nodes running the real Kubernetes control \
         plane, Weft installed with `helm install` of charts/ (controller; ztunnel and CNI agent \
         per node). Ctrl-C is safe at any point: `weft demo down` removes everything.",
        config.name
    )?;
    let mut options = Options::new(&config.name);
    options.nodes = 2;
    options.weft_exe = Some(weft_exe);
    options.kubernetes = true;
    let cluster = Cluster::up(&options)?;
    let examples = config.examples.as_deref();
    cluster.apply_yaml(&manifest(examples, "00-app.yaml")?)?;
    cluster.apply_yaml(&manifest(examples, "web.yaml")?)?;
    let ready = Duration::from_secs(60);
    let echo = cluster.wait_ready(NS, &[("app", "echo")], 3, ready)?;
    cluster.wait_ready(NS, &[("app", "web")], 1, ready)?;
    cluster.wait_ready(NS, &[], 6, ready)?;
    cluster.wait_ready("legacy", &[], 1, ready)?;
    let vip = cluster.service_ip(NS, "echo")?;
    let web_vip = cluster.service_ip(NS, "web")?;
    let pods = Pods::of(&cluster, NS)?;
    let legacy = Pods::of(&cluster, "legacy")?;
    let placement: Vec<String> = echo
        .iter()
        .map(|p| format!("{} on {}", p.name(), pods.node(p.name())))
        .collect();
    writeln!(
        out,
        "Up in {:.0} s. Deployed examples/demo: Service echo.demo ({vip}) with replicas {}; \
         nginx as Service web.demo ({web_vip}); clients demo/frontend ({}), demo/batch ({}), \
         legacy/client ({}).",
        started.elapsed().as_secs_f64(),
        placement.join(", "),
        pods.ip("frontend"),
        pods.ip("batch"),
        legacy.ip("client"),
    )?;
    // Clients dial the Services by name: CoreDNS answers with the VIP.
    let mut tour = Tour {
        cluster: &cluster,
        examples,
        url: format!("http://{ECHO_HOST}/"),
        out,
        unexpected: 0,
    };

    tour.say("\n(a) Before enrollment: namespace demo is not in the mesh.")?;
    for (ns, pod) in [(NS, "frontend"), (NS, "batch"), ("legacy", "client")] {
        tour.request(ns, pod, "answered in plaintext, no proxy", |o| {
            o.all_answered() && o.mesh.is_empty()
        })?;
    }

    tour.say(
        "\n(b) `kubectl label namespace demo istio.io/dataplane-mode=ambient` — no pod is \
         restarted.",
    )?;
    let uids_before: BTreeSet<String> = cluster
        .pods(Some(NS))?
        .iter()
        .filter_map(|p| p.uid().map(str::to_owned))
        .collect();
    cluster.label_namespace(NS, "istio.io/dataplane-mode", Some("ambient"))?;
    let deadline = Instant::now() + CONVERGE;
    let enrolled = loop {
        let pods = cluster.pods(Some(NS))?;
        let enrolled: Vec<String> = pods
            .iter()
            .filter(|p| annotation(p) == Some("enabled"))
            .map(|p| p.name().to_owned())
            .collect();
        if enrolled.len() == pods.len() || Instant::now() > deadline {
            break enrolled;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let uids_after: BTreeSet<String> = cluster
        .pods(Some(NS))?
        .iter()
        .filter_map(|p| p.uid().map(str::to_owned))
        .collect();
    tour.say(&format!(
        "    enrolled by the node agents (ambient.istio.io/redirection=enabled): {}; {}",
        enrolled.join(", "),
        if uids_before == uids_after {
            "every pod kept running (same pod UIDs)"
        } else {
            "UNEXPECTED: pods were replaced"
        }
    ))?;
    if uids_before != uids_after || enrolled.len() != uids_after.len() {
        tour.unexpected += 1;
    }
    for pod in ["frontend", "batch"] {
        let principal = format!("cluster.local/ns/demo/sa/{pod}");
        tour.request(
            NS,
            pod,
            "answered over mTLS with the pod's identity",
            move |o| {
                o.all_answered()
                    && o.mtls_principals("-")
                        .iter()
                        .any(|p| p.trim_start_matches("spiffe://") == principal)
            },
        )?;
    }
    tour.request(
        "legacy",
        "client",
        "answered in plaintext through the server's ztunnel (PERMISSIVE)",
        |o| o.all_answered() && o.counted("unknown", "-"),
    )?;

    tour.say(
        "\n(c) `kubectl apply -f examples/demo/10-allow-frontend.yaml`: only \
         spiffe://cluster.local/ns/demo/sa/frontend may reach echo.",
    )?;
    cluster.apply_yaml(&manifest(examples, "10-allow-frontend.yaml")?)?;
    tour.request(NS, "batch", "refused", Observed::none_answered)?;
    tour.request(NS, "frontend", "answered over mTLS", Observed::all_answered)?;
    tour.request("legacy", "client", "refused", Observed::none_answered)?;

    tour.say(
        "\n(d) Policy removed; `kubectl apply -f examples/demo/20-strict-mtls.yaml`: \
         namespace demo accepts mutual TLS only.",
    )?;
    cluster.delete_yaml(&manifest(examples, "10-allow-frontend.yaml")?)?;
    cluster.apply_yaml(&manifest(examples, "20-strict-mtls.yaml")?)?;
    tour.request("legacy", "client", "refused", Observed::none_answered)?;
    tour.request(NS, "batch", "answered over mTLS", Observed::all_answered)?;
    tour.request(NS, "frontend", "answered over mTLS", Observed::all_answered)?;

    // The L7 half, on the same cluster and pods.
    l7::run(&mut tour, ECHO_HOST, WEB_HOST)?;

    let unexpected = tour.unexpected;
    let text = look_around(&config.name, &tour.url);
    tour.say(&text)?;
    if unexpected > 0 {
        bail!("{unexpected} step(s) did not behave as expected (lines marked UNEXPECTED)");
    }
    Ok(())
}

/// The closing hint: commands to look around the demo cluster and to remove it.
fn look_around(name: &str, url: &str) -> String {
    // The inspection commands default to cluster `weft` (or $WEFT_CLUSTER): name the demo's.
    let name_flag = format!(" --cluster {name}");
    let down_flag = if name == DEFAULT_NAME {
        String::new()
    } else {
        name_flag.clone()
    };
    format!(
        "\nLook around (the cluster stays up):\n  \
         weft ztunnel-config workloads{name_flag}      # what each node's ztunnel knows\n  \
         weft ztunnel-config policies{name_flag}\n  \
         weft ztunnel-config certificates{name_flag}\n  \
         weft proxy-status{name_flag}                   # the controller's xDS clients, ACKed and in sync\n  \
         export KUBECONFIG=$(weft cluster kubeconfig{name_flag} --path)\n  \
         kubectl get pods -A                          # the mesh: controller, ztunnel and CNI agent pods\n  \
         weft cluster exec{name_flag} demo/frontend -- weft-echo client {url}\n\
         Remove everything: weft demo down{down_flag}"
    )
}

#[cfg(test)]
mod tests {
    use super::observe::parse_line;
    use super::*;

    #[test]
    fn look_around_names_the_demo_cluster() {
        // Every inspection command names the cluster, the default one included (the CLI's own
        // default cluster is `weft`); `weft demo down` needs it only for other names.
        for (name, down) in [
            (DEFAULT_NAME, "weft demo down\n"),
            ("t", "weft demo down --cluster t\n"),
        ] {
            let text = look_around(name, "http://10.96.0.10/") + "\n";
            for line in text.lines().filter(|l| l.trim_start().starts_with("weft ")) {
                assert!(line.contains(&format!("--cluster {name}")), "{line}");
            }
            assert!(
                text.ends_with(&format!("Remove everything: {down}")),
                "{text}"
            );
        }
    }

    #[test]
    fn prometheus_lines_parse() {
        let (labels, value) = parse_line(
            r#"istio_tcp_connections_opened_total{reporter="destination",source_principal="spiffe://cluster.local/ns/demo/sa/frontend",connection_security_policy="mutual_tls",response_flags="-"} 3"#,
        )
        .unwrap();
        assert_eq!(labels["reporter"], "destination");
        assert_eq!(
            labels["source_principal"],
            "spiffe://cluster.local/ns/demo/sa/frontend"
        );
        assert_eq!(labels["response_flags"], "-");
        assert_eq!(value, 3);
        assert!(parse_line("# HELP x").is_none());
    }

    #[test]
    fn observations_classify() {
        let mut o = Observed {
            answered: 0,
            sent: 4,
            ..Observed::default()
        };
        o.mesh.insert(
            (
                "spiffe://cluster.local/ns/demo/sa/batch".into(),
                "mutual_tls".into(),
                "DENY".into(),
            ),
            4,
        );
        assert!(o.none_answered() && !o.all_answered());
        assert_eq!(
            o.mtls_principals("DENY").into_iter().collect::<Vec<_>>(),
            ["spiffe://cluster.local/ns/demo/sa/batch"]
        );
        assert!(o.mtls_principals("-").is_empty());
        assert!(!o.counted("unknown", "DENY"));
    }

    #[test]
    fn the_built_in_manifests_parse() {
        for (name, text) in MANIFESTS {
            let objects = crate::cluster::manifest::parse(text, name).unwrap();
            assert!(!objects.is_empty(), "{name}");
        }
    }
}
