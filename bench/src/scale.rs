//! The `scale` scenario: config memory and apply time at 10,000 and 100,000 workloads
//! (performance-anchors §5c item 7; anchors B10/B11).
//!
//! For each size N (pods; + 6 % services and N / 20 AuthorizationPolicies, the `controller`
//! scenario's synthetic cluster over 100 namespaces and 10 nodes):
//!
//! 1. **controller**: builds and indexes the objects, times one full [`translate`] (wall and
//!    thread CPU time, checked like the `controller` scenario), and reads this process's VmRSS
//!    after indexing and after translating + publishing into the xDS cache (the translation
//!    output dropped, as the translation loop does);
//! 2. **ztunnel**: a real `ztunnel` process (the release binary next to `weft-bench`, or
//!    `--ztunnel`) connects over TLS to the delta ADS server in this process with a bootstrap
//!    token, exactly as on a node, but with no ZDS pods. Once it has subscribed and nothing is
//!    published yet, its VmRSS is read (RSS₀); then the translation is published and the time is
//!    taken until ztunnel reports the first Address and Authorization responses applied (its
//!    readiness endpoint) and until the server saw both ACKed. Its VmRSS after a short settle
//!    (RSS₁), VmHWM and CPU time (utime + stime) are read, and `/config_dump` is checked to hold
//!    N workloads and every service. Bytes per workload = (RSS₁ − RSS₀) / N.
//!
//! Loopback only. Nothing is asserted on time; wrong content fails the run.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, ServerTlsConfig};
use weft_controller::app::publish;
use weft_controller::auth::{BootstrapTokens, Caller};
use weft_controller::translate::{Settings, translate};
use weft_controller::xds::{Cache, Registry, Server};
use weft_k8s::Index;
use weft_proto::type_url::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use crate::controller::{self, Cluster, Memory, NAMESPACES, NODES, Sizes};

/// Name in the controller's serving certificate, verified by ztunnel.
const SERVER_NAME: &str = "weft-controller.istio-system.svc";
/// The bootstrap token ztunnel presents.
const TOKEN: &str = "bench-scale-ztunnel";
/// Services per 100 pods (B10: 66k services for 1M pods).
const SERVICES_PERCENT: usize = 6;
/// Pods per AuthorizationPolicy.
const PODS_PER_POLICY: usize = 20;
/// Generous limits so a loaded machine fails with a message, not a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const APPLY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long ztunnel idles after subscribing, and after applying, before its memory is read.
const SETTLE: Duration = Duration::from_millis(500);
/// Readiness poll interval.
const POLL: Duration = Duration::from_millis(2);

/// Targets: translation of 10,000 pods, controller memory at 10,000 pods, ztunnel config
/// memory per workload at 100,000 workloads, and apply time (1M pods ≤ 3 s, so ≤ 3 µs each).
const TRANSLATION_TARGET: Duration = Duration::from_secs(1);
const CONTROLLER_RSS_TARGET_BYTES: f64 = 200e6;
const ZTUNNEL_BYTES_PER_WORKLOAD_TARGET: f64 = 1000.0;
const APPLY_TARGET_PER_WORKLOAD: Duration = Duration::from_micros(3);

/// Linux's USER_HZ: `/proc/<pid>/stat` CPU times are in 1/100 s.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// Arguments of the `scale` scenario.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "scale_args")]
pub(crate) struct Args {
    /// Workload (pod) counts, comma-separated [default: 10000,100000; 1000,5000 with --quick].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(100..=700_000))]
    pub(crate) workloads: Vec<u32>,

    /// The ztunnel binary [default: `ztunnel` next to this binary].
    #[arg(long)]
    pub(crate) ztunnel: Option<PathBuf>,

    /// CI sizes: 1,000 and 5,000 workloads.
    #[arg(long)]
    pub(crate) quick: bool,
}

/// One size's measurements.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    pods: usize,
    services: usize,
    policies: usize,
    /// Address resources (workloads + services) and authorizations published.
    addresses: usize,
    authorizations: usize,
    /// Full translation, wall and this thread's CPU.
    translation: Duration,
    translation_cpu: Duration,
    /// Encode + hash + insert of the whole translation into the empty cache.
    publish: Duration,
    /// This process before building the objects, after indexing, after translate + publish.
    controller_start: Option<Memory>,
    controller_indexed: Option<Memory>,
    controller_published: Option<Memory>,
    /// ztunnel subscribed with nothing published, and after applying everything.
    ztunnel_before: Option<Memory>,
    ztunnel_after: Option<Memory>,
    /// From the start of publish until ztunnel reported both types applied / the server saw
    /// both ACKed.
    apply: Duration,
    acked: Duration,
    /// ztunnel CPU (user + system) between RSS₀ and RSS₁.
    ztunnel_cpu: Duration,
}

/// The scenario's result.
#[derive(Debug, Clone)]
pub(crate) struct ScaleResult {
    quick: bool,
    points: Vec<Point>,
}

/// Runs the scenario for each size.
///
/// # Errors
/// Set-up failures, a translation other than the synthetic cluster implies, ztunnel failing to
/// start, sync or hold every workload.
pub(crate) async fn run(args: &Args) -> Result<ScaleResult> {
    let sizes: Vec<usize> = if !args.workloads.is_empty() {
        args.workloads.iter().map(|&n| n as usize).collect()
    } else if args.quick {
        vec![1_000, 5_000]
    } else {
        vec![10_000, 100_000]
    };
    let ztunnel = match &args.ztunnel {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating weft-bench")?
            .with_file_name("ztunnel"),
    };
    ensure!(
        ztunnel.is_file(),
        "no ztunnel binary at {} (build it with `cargo build --release -p ztunnel`, or pass \
         --ztunnel)",
        ztunnel.display()
    );
    let mut points = Vec::with_capacity(sizes.len());
    for pods in sizes {
        let point = run_one(pods, args.quick, &ztunnel)
            .await
            .with_context(|| format!("{pods} workloads"))?;
        points.push(point);
    }
    Ok(ScaleResult {
        quick: args.quick,
        points,
    })
}

async fn run_one(pods: usize, quick: bool, ztunnel: &Path) -> Result<Point> {
    let sizes = Sizes {
        pods,
        services: (pods * SERVICES_PERCENT / 100).max(1),
        policies: pods / PODS_PER_POLICY,
        clients: 1,
        translation_runs: 1,
        changes: 0,
        quick,
    };
    eprintln!(
        "scale: {} pods, {} services, {} policies over {NAMESPACES} namespaces and {NODES} nodes",
        sizes.pods, sizes.services, sizes.policies
    );
    let controller_start = controller::read_memory();
    let mut cluster = Cluster::build(sizes)?;
    let index = Index::new();
    index.batch(std::mem::take(&mut cluster.resources), &[]);
    let controller_indexed = controller::read_memory();

    let settings = Settings::default();
    let snapshot = index.snapshot();
    let cpu = thread_cpu();
    let started = Instant::now();
    let out = translate(&snapshot, &settings);
    let translation = started.elapsed();
    let translation_cpu = thread_cpu().saturating_sub(cpu);
    drop(snapshot);
    cluster.check(&out, &settings)?;
    let addresses = out.addresses.len();
    let authorizations = out.authorizations.len();
    eprintln!(
        "scale: translated {addresses} addresses, {authorizations} authorizations in {}",
        ms(translation)
    );

    // The controller's ADS server over TLS, as on a node.
    let dir = std::env::temp_dir().join(format!("weft-bench-scale-{}-{pods}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let signer = weft_core::ca::Signer::generate_root("cluster.local", Default::default())
        .context("generating the CA")?;
    let (chain, key) = signer
        .issue_serving(
            &[SERVER_NAME.to_owned()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Duration::from_secs(3600),
        )
        .context("issuing the serving certificate")?;
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, signer.root_bundle_pem()).context("writing the root")?;
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).context("writing the token")?;
    let mut tokens = BootstrapTokens::default();
    tokens.insert(
        TOKEN,
        Caller {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            node: Some(controller::node_name(0)),
            pod: None,
        },
    );
    let cache = Cache::new();
    let registry = Registry::new();
    let server = Server::new(cache.clone(), registry.clone(), Arc::new(tokens));
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .context("binding the ADS listener")?;
    let addr = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(chain, key)))?
            .add_service(server.clone().service())
            .serve_with_incoming(incoming),
    );

    let readiness = free_port().await?;
    let mut child = Ztunnel::spawn(ztunnel, &dir, addr, &root, &token, readiness).await?;
    let pid = child.pid();

    // Subscribed to both types, nothing published: ztunnel's baseline.
    wait_subscribed(&registry, &mut child).await?;
    tokio::time::sleep(SETTLE).await;
    let ztunnel_before = read_memory_of(pid);
    let cpu_before = process_cpu(pid);

    let started = Instant::now();
    publish(&cache, &out);
    let publish_time = started.elapsed();
    drop(out);
    let controller_published = controller::read_memory();
    let apply = wait_applied(readiness, &mut child, started).await?;
    let acked = wait_acked(&registry, started).await?;
    eprintln!(
        "scale: published in {}; ztunnel applied {} after publish start, ACKed {}",
        ms(publish_time),
        ms(apply),
        ms(acked)
    );
    tokio::time::sleep(SETTLE).await;
    let ztunnel_after = read_memory_of(pid);
    let ztunnel_cpu = process_cpu(pid).saturating_sub(cpu_before);

    check_dump(&child, &sizes).await?;
    child.stop();
    server.shutdown(Duration::from_secs(2)).await;
    serving.abort();
    let _ = std::fs::remove_dir_all(&dir);

    Ok(Point {
        pods,
        services: sizes.services,
        policies: sizes.policies,
        addresses,
        authorizations,
        translation,
        translation_cpu,
        publish: publish_time,
        controller_start,
        controller_indexed,
        controller_published,
        ztunnel_before,
        ztunnel_after,
        apply,
        acked,
        ztunnel_cpu,
    })
}

// === ztunnel ===

/// The spawned ztunnel; killed when dropped.
struct Ztunnel {
    child: Child,
    admin: u16,
    log: PathBuf,
}

impl Ztunnel {
    async fn spawn(
        program: &Path,
        dir: &Path,
        xds: SocketAddr,
        root: &Path,
        token: &Path,
        readiness: u16,
    ) -> Result<Self> {
        let admin = free_port().await?;
        let stats = free_port().await?;
        let log = dir.join("ztunnel.log");
        let stderr = std::fs::File::create(&log).context("creating the ztunnel log")?;
        let loopback = |port: u16| format!("127.0.0.1:{port}");
        let child = Command::new(program)
            .args(["--xds-address", &format!("https://{xds}")])
            .args(["--root-cert", &root.display().to_string()])
            .args(["--server-name", SERVER_NAME])
            .args(["--token", &token.display().to_string()])
            .args(["--node-name", &controller::node_name(0)])
            .args(["--instance-ip", "127.0.0.1"])
            .args([
                "--zds-socket",
                &dir.join("ztunnel.sock").display().to_string(),
            ])
            .args(["--admin", &loopback(admin)])
            .args(["--stats", &loopback(stats)])
            .args(["--readiness", &loopback(readiness)])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Ztunnel { child, admin, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of its log if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "ztunnel exited ({status}); log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that was free a moment ago.
async fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    Ok(listener.local_addr()?.port())
}

/// Waits until ztunnel's stream holds Address and Authorization subscriptions.
async fn wait_subscribed(registry: &Registry, child: &mut Ztunnel) -> Result<()> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let subscribed = registry.connections().iter().any(|c| {
            c.types.contains_key(ADDRESS_TYPE_URL) && c.types.contains_key(AUTHORIZATION_TYPE_URL)
        });
        if subscribed {
            return Ok(());
        }
        child.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "ztunnel did not subscribe within {CONNECT_TIMEOUT:?} (log: {})",
            child.log.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until ztunnel's readiness no longer lists xDS as pending; the time since `since`.
async fn wait_applied(readiness: u16, child: &mut Ztunnel, since: Instant) -> Result<Duration> {
    let deadline = since + APPLY_TIMEOUT;
    loop {
        if let Ok((_, body)) = http_get(readiness, "/healthz/ready").await
            && !body.contains("xds:")
        {
            return Ok(since.elapsed());
        }
        child.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "ztunnel did not apply the config within {APPLY_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the server has seen both types ACKed and current; the time since `since`.
async fn wait_acked(registry: &Registry, since: Instant) -> Result<Duration> {
    let deadline = since + APPLY_TIMEOUT;
    loop {
        let acked = registry.connections().iter().any(|c| {
            [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]
                .iter()
                .all(|t| c.types.get(*t).is_some_and(|t| t.in_sync))
        });
        if acked {
            return Ok(since.elapsed());
        }
        ensure!(
            Instant::now() < deadline,
            "ztunnel did not ACK within {APPLY_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Checks ztunnel's `/config_dump` holds every workload and service.
async fn check_dump(child: &Ztunnel, sizes: &Sizes) -> Result<()> {
    let (status, body) = http_get(child.admin, "/config_dump").await?;
    ensure!(status == 200, "/config_dump answered {status}");
    let dump: serde_json::Value = serde_json::from_str(&body).context("parsing /config_dump")?;
    let count = |key: &str| dump[key].as_array().map_or(0, Vec::len);
    ensure!(
        count("workloads") == sizes.pods && count("services") == sizes.services,
        "ztunnel holds {} workloads and {} services, expected {} and {}",
        count("workloads"),
        count("services"),
        sizes.pods,
        sizes.services
    );
    Ok(())
}

/// `GET path` on a loopback HTTP/1 endpoint: status and body.
async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, body.to_owned()))
}

// === measurements ===

/// VmRSS and VmHWM of process `pid`.
fn read_memory_of(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|line| {
            line.strip_prefix(name)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// utime + stime of process `pid` (zero if unreadable).
fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / CLOCK_TICKS_PER_SECOND)
}

/// This thread's CPU time (user + system).
fn thread_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(Duration::ZERO, |u| {
        let t = |tv: nix::sys::time::TimeVal| {
            Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000)
        };
        t(u.user_time()) + t(u.system_time())
    })
}

// === report ===

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mib(m: Option<Memory>) -> String {
    m.map_or("n/a".to_owned(), |m| {
        format!("{:.1}", m.rss_kib as f64 / 1024.0)
    })
}

impl Point {
    /// (RSS₁ − RSS₀) / workloads, bytes.
    fn ztunnel_bytes_per_workload(&self) -> Option<f64> {
        let (before, after) = (self.ztunnel_before?, self.ztunnel_after?);
        Some((after.rss_kib as f64 - before.rss_kib as f64) * 1024.0 / self.pods as f64)
    }

    fn controller_rss_bytes(&self) -> Option<f64> {
        self.controller_published.map(|m| m.rss_kib as f64 * 1024.0)
    }

    /// Controller memory attributable to this size: published − start, bytes.
    fn controller_delta_bytes(&self) -> Option<f64> {
        let (start, published) = (self.controller_start?, self.controller_published?);
        Some((published.rss_kib as f64 - start.rss_kib as f64) * 1024.0)
    }
}

/// (target, condition, measured, met) rows for the sizes the targets are stated at.
fn targets(result: &ScaleResult) -> Vec<(String, String, Option<bool>)> {
    let mut rows = Vec::new();
    for p in &result.points {
        if p.pods == 10_000 {
            rows.push((
                format!(
                    "translation of 10,000 pods < {} s",
                    TRANSLATION_TARGET.as_secs()
                ),
                ms(p.translation),
                Some(p.translation < TRANSLATION_TARGET),
            ));
            rows.push((
                "controller RSS at 10,000 pods (1 client) < 200 MB".to_owned(),
                p.controller_rss_bytes()
                    .map_or("n/a".into(), |b| format!("{:.0} MB", b / 1e6)),
                p.controller_rss_bytes()
                    .map(|b| b < CONTROLLER_RSS_TARGET_BYTES),
            ));
        }
        if p.pods == 100_000 || result.quick {
            let per = p.ztunnel_bytes_per_workload();
            rows.push((
                format!(
                    "ztunnel config memory ≤ 1 KB/workload at {} workloads",
                    p.pods
                ),
                per.map_or("n/a".into(), |b| format!("{b:.0} B/workload")),
                per.map(|b| b <= ZTUNNEL_BYTES_PER_WORKLOAD_TARGET),
            ));
            let target = APPLY_TARGET_PER_WORKLOAD * p.pods as u32;
            rows.push((
                format!(
                    "ztunnel apply ≤ 3 s per 1M pods (≤ {} at {} workloads)",
                    ms(target),
                    p.pods
                ),
                ms(p.apply),
                Some(p.apply <= target),
            ));
        }
    }
    rows
}

/// Prints the Markdown table and the targets with met/gap.
pub(crate) fn print(result: &ScaleResult) {
    println!(
        "## weft-bench scale: config memory and apply time{}",
        if result.quick { " (--quick)" } else { "" }
    );
    println!();
    println!(
        "| workloads | services | policies | translate (CPU) | publish | controller RSS indexed → published (Δ from start) | ztunnel RSS before → after | ztunnel B/workload | ztunnel apply / ACKed | ztunnel CPU |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in &result.points {
        println!(
            "| {} | {} | {} | {} ({}) | {} | {} → {} MiB (+{:.1} MiB) | {} → {} MiB | {} | {} / {} | {} |",
            p.pods,
            p.services,
            p.policies,
            ms(p.translation),
            ms(p.translation_cpu),
            ms(p.publish),
            mib(p.controller_indexed),
            mib(p.controller_published),
            p.controller_delta_bytes().unwrap_or(f64::NAN) / 1_048_576.0,
            mib(p.ztunnel_before),
            mib(p.ztunnel_after),
            p.ztunnel_bytes_per_workload()
                .map_or("n/a".into(), |b| format!("{b:.0}")),
            ms(p.apply),
            ms(p.acked),
            ms(p.ztunnel_cpu),
        );
    }
    println!();
    for (target, measured, met) in targets(result) {
        let verdict = match met {
            Some(true) => "met".to_owned(),
            Some(false) => "GAP".to_owned(),
            None => "n/a".to_owned(),
        };
        println!("* {target}: {measured} — {verdict}");
    }
    println!();
    println!(
        "Addresses = workloads + services; apply = publish start → ztunnel readiness shows both \
         types applied (includes the controller's encode, TLS, decode and ztunnel's state \
         update); ztunnel RSS₀ is read after it subscribed with nothing published. {}; build: {}",
        crate::report::machine_line(),
        controller::build_profile()
    );
}

/// Writes `dir/scale-<unix-timestamp>.json`.
///
/// # Errors
/// Creating the directory or writing the file.
pub(crate) fn write_json(result: &ScaleResult, dir: &Path) -> Result<PathBuf> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("scale-{timestamp}.json"));
    let millis = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let memory = |m: Option<Memory>| {
        m.map_or(
            serde_json::Value::Null,
            |m| json!({ "rss_kib": m.rss_kib, "hwm_kib": m.hwm_kib }),
        )
    };
    let points: Vec<serde_json::Value> = result
        .points
        .iter()
        .map(|p| {
            json!({
                "workloads": p.pods,
                "services": p.services,
                "policies": p.policies,
                "addresses": p.addresses,
                "authorizations": p.authorizations,
                "translation_ms": millis(p.translation),
                "translation_cpu_ms": millis(p.translation_cpu),
                "publish_ms": millis(p.publish),
                "controller": {
                    "start": memory(p.controller_start),
                    "indexed": memory(p.controller_indexed),
                    "published": memory(p.controller_published),
                },
                "ztunnel": {
                    "before": memory(p.ztunnel_before),
                    "after": memory(p.ztunnel_after),
                    "bytes_per_workload": p.ztunnel_bytes_per_workload(),
                    "apply_ms": millis(p.apply),
                    "acked_ms": millis(p.acked),
                    "cpu_ms": millis(p.ztunnel_cpu),
                },
            })
        })
        .collect();
    let targets: Vec<serde_json::Value> = targets(result)
        .into_iter()
        .map(
            |(target, measured, met)| json!({ "target": target, "measured": measured, "met": met }),
        )
        .collect();
    // The target's figure: at 100,000 workloads, else (e.g. --quick) the largest size run.
    let headline = result
        .points
        .iter()
        .find(|p| p.pods == 100_000)
        .or_else(|| result.points.iter().max_by_key(|p| p.pods))
        .and_then(Point::ztunnel_bytes_per_workload);
    let value = json!({
        "scenario": "scale",
        "ztunnel_bytes_per_workload_100000": headline,
        "timestamp": timestamp,
        "quick": result.quick,
        "namespaces": NAMESPACES,
        "nodes": NODES,
        "points": points,
        "targets": targets,
        "build": controller::build_profile(),
        "machine": crate::report::machine_json(),
        "settings": BTreeMap::from([
            ("services_percent", SERVICES_PERCENT),
            ("pods_per_policy", PODS_PER_POLICY),
        ]),
    });
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
