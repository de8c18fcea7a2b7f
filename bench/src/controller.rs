//! The `controller` scenario: Weft's control plane on a synthetic cluster.
//!
//! Builds a cluster of namespaces, nodes, services, pods and AuthorizationPolicies in a
//! [`weft_k8s::Index`], then measures:
//!
//! 1. **full translation**: [`translate`] of the whole snapshot, 5 runs (3 with `--quick`); every
//!    run's output is checked (resource counts, named target ports, per-workload policy
//!    references, no problems);
//! 2. **change-to-delta latency**: the delta ADS [`Server`] on loopback, fed by the production
//!    [`translation_loop`] (debounce [`DEBOUNCE`]), with `--clients` real tonic clients holding a
//!    wildcard Address subscription. One pod's Ready condition is flipped with [`Index::apply`]
//!    and the time is taken until every client has received the delta, which must hold exactly
//!    that workload; 10 repetitions (3 with `--quick`), each delta ACKed;
//! 3. **memory**: VmRSS and VmHWM from `/proc/self/status` at each stage. The peak is reset at
//!    the start of the scenario (`/proc/self/clear_refs`), so it covers this scenario only.
//!
//! The clients run in this process too: memory figures include their side of the streams.
//! No timing is asserted; correctness is, and any mismatch fails the run.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use prost::Message as _;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use weft_controller::app::{publish, translation_loop};
use weft_controller::auth::{BootstrapTokens, Caller};
use weft_controller::translate::{self, Output, Settings, translate, workload_uid};
use weft_controller::xds::{Cache, Registry, Server};
use weft_k8s::{Index, Resource};
use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use weft_proto::istio::workload::{Address, TunnelProtocol, Workload, WorkloadStatus, address};
use weft_proto::type_url::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// Namespaces in the synthetic cluster; services, pods and policies are spread over them.
pub(crate) const NAMESPACES: usize = 100;
/// Nodes the pods are scheduled on.
pub(crate) const NODES: usize = 10;
/// Pods (or services) per second-octet block of the address plan (see [`ip`]); also the most
/// the `controller` scenario's flags accept.
const MAX_OBJECTS: u32 = 64_000;
/// `pod-template-hash` of every pod's ReplicaSet.
const POD_TEMPLATE_HASH: &str = "5d8f7c6b9";
/// The container port the services' named `http` target port resolves to.
const HTTP_CONTAINER_PORT: u32 = 8080;
/// Service port of `http` (target port named `http`).
const HTTP_SERVICE_PORT: u32 = 80;
/// Service port and numeric target port of `grpc`.
const GRPC_PORT: u32 = 9090;

/// Debounce of the translation loop. A zero sleep still waits for tokio's next 1 ms timer tick.
pub(crate) const DEBOUNCE: Duration = Duration::ZERO;
/// Targets from the design: full translation, change-to-delta (100 clients), resident memory.
const TRANSLATION_TARGET: Duration = Duration::from_secs(1);
const CHANGE_TARGET: Duration = Duration::from_millis(50);
const RSS_TARGET_BYTES: f64 = 200e6;

/// Largest response a client decodes (tonic's default of 4 MiB is less than one initial
/// snapshot of 10,000 pods).
const MAX_RESPONSE_BYTES: usize = 1 << 30;
/// Responses with at most this many resources are kept whole for checking; bigger ones (initial
/// snapshots) are only counted.
const KEEP_RESOURCES: usize = 16;
/// Generous limits so a debug build or a loaded machine fails with a message, not a hang.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long "no further response arrives" is watched after the last change.
const QUIET: Duration = Duration::from_millis(200);
/// How long the ADS server gets to end its streams at the end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Arguments of the `controller` scenario.
#[derive(Debug, Clone, clap::Args)]
// `run` flattens this next to `hbone::Args`; clap needs distinct group names.
#[group(id = "controller_args")]
pub(crate) struct Args {
    /// Pods in the synthetic cluster [default: 10000; 1000 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_OBJECTS)))]
    pub(crate) pods: Option<u32>,

    /// Services, spread evenly over 100 namespaces [default: 1000; 100 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_OBJECTS)))]
    pub(crate) services: Option<u32>,

    /// AuthorizationPolicies, spread over the namespaces [default: 500; 50 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub(crate) policies: Option<u32>,

    /// Connected delta ADS clients [default: 100; 10 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) clients: Option<u32>,

    /// CI size: 1000 pods, 100 services, 50 policies, 10 clients, 3 translation runs and 3
    /// changes (explicit sizes still win).
    #[arg(long)]
    pub(crate) quick: bool,

    /// Baseline: feed the server with a full translation and full publish of every resource on
    /// each change (the translation loop before incremental translation), instead of the
    /// production loop.
    #[arg(long)]
    pub(crate) full_translation: bool,
}

/// What the scenario builds and how often it measures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) pods: usize,
    pub(crate) services: usize,
    pub(crate) policies: usize,
    pub(crate) clients: usize,
    pub(crate) translation_runs: usize,
    pub(crate) changes: usize,
    pub(crate) quick: bool,
}

impl Sizes {
    fn from_args(args: &Args) -> Self {
        let (pods, services, policies, clients, runs, changes) = if args.quick {
            (1_000, 100, 50, 10, 3, 3)
        } else {
            (10_000, 1_000, 500, 100, 5, 10)
        };
        let size = |arg: Option<u32>, default: usize| arg.map_or(default, |n| n as usize);
        Sizes {
            pods: size(args.pods, pods),
            services: size(args.services, services),
            policies: size(args.policies, policies),
            clients: size(args.clients, clients),
            translation_runs: runs,
            changes,
            quick: args.quick,
        }
    }

    /// Address resources a full translation produces: one per pod and one per service.
    pub(crate) fn addresses(&self) -> usize {
        self.pods + self.services
    }
}

/// Resource counts of a full translation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    workloads: usize,
    services: usize,
    authorizations: usize,
    hbone_workloads: usize,
    /// Sum over workloads of the selector policies each references.
    policy_references: usize,
}

/// One flip of a pod's Ready condition.
#[derive(Debug, Clone)]
struct Change {
    /// The workload `uid`, the only resource the delta may hold.
    workload: String,
    /// Whether the pod became Ready (`false`: it became not Ready).
    ready: bool,
    /// From `apply` until the first client received the delta.
    first: Duration,
    /// From `apply` until every client had received the delta: the measured latency.
    last: Duration,
}

/// Resident memory as `/proc/self/status` reports it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// VmRSS, KiB.
    pub(crate) rss_kib: u64,
    /// VmHWM (peak VmRSS), KiB.
    pub(crate) hwm_kib: u64,
}

/// The stages memory is read at, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Scenario start, before the synthetic objects are built.
    Start,
    /// Objects built and in the index.
    Indexed,
    /// Full translations done, loop published, server listening, no client yet.
    Ready,
    /// Every client holds and has ACKed the initial snapshot.
    Setup,
    /// After the last change.
    End,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Start => "start (before the synthetic objects)",
            Stage::Indexed => "objects built and indexed",
            Stage::Ready => "controller ready, no clients",
            Stage::Setup => "after setup (clients in sync)",
            Stage::End => "end (after the changes)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Stage::Start => "start",
            Stage::Indexed => "indexed",
            Stage::Ready => "controller_ready",
            Stage::Setup => "after_setup",
            Stage::End => "end",
        }
    }
}

/// The `controller` scenario's result.
#[derive(Debug, Clone)]
pub(crate) struct ControllerResult {
    sizes: Sizes,
    counts: Counts,
    /// Each timed full translation.
    translation: Vec<Duration>,
    /// Each re-publish of an unchanged translation into a warm cache (encode + hash all).
    republish: Vec<Duration>,
    /// From spawning the translation loop until the cache held the full translation.
    loop_first_publish: Duration,
    /// From the first client connect until every client had received the initial snapshot.
    initial_received: Duration,
    /// ... and until every client had ACKed it (registry in sync).
    initial_in_sync: Duration,
    /// Encoded size of the initial snapshot response (the largest any client received).
    initial_bytes: usize,
    changes: Vec<Change>,
    memory: Vec<(Stage, Option<Memory>)>,
    /// Whether the peak was reset at the start (else VmHWM is the whole process's peak).
    peak_reset: bool,
    /// The baseline loop (`--full-translation`) fed the server.
    full_translation: bool,
}

/// Runs the scenario.
///
/// # Errors
/// Set-up failures, a translation with other counts or content than the synthetic cluster
/// implies, a client failing, or a delta other than exactly the changed workload.
pub(crate) async fn run(args: &Args) -> Result<ControllerResult> {
    let sizes = Sizes::from_args(args);
    let peak_reset = reset_peak();
    let mut memory = vec![(Stage::Start, read_memory())];
    eprintln!(
        "controller: building {} namespaces, {NODES} nodes, {} services, {} pods, {} policies",
        NAMESPACES, sizes.services, sizes.pods, sizes.policies
    );
    let mut cluster = Cluster::build(sizes)?;
    let index = Index::new();
    index.batch(std::mem::take(&mut cluster.resources), &[]);
    memory.push((Stage::Indexed, read_memory()));
    let settings = Settings::default();

    // 1. Full translation of the whole snapshot.
    let snapshot = index.snapshot();
    let mut translation = Vec::with_capacity(sizes.translation_runs);
    let mut counts = Counts::default();
    let mut last = None;
    for run in 1..=sizes.translation_runs {
        let start = Instant::now();
        let out = translate(&snapshot, &settings);
        let elapsed = start.elapsed();
        counts = cluster
            .check(&out, &settings)
            .with_context(|| format!("full translation run {run}"))?;
        eprintln!(
            "controller: full translation {run}/{}: {} ({} addresses, {} authorizations)",
            sizes.translation_runs,
            ms(elapsed),
            out.addresses.len(),
            out.authorizations.len(),
        );
        translation.push(elapsed);
        last = Some(out);
    }
    drop(snapshot);
    let republish = match last {
        Some(out) => time_republish(&out, sizes.translation_runs)?,
        None => Vec::new(),
    };

    // 2. The ADS server fed by the production translation loop.
    let cache = Cache::new();
    let registry = Registry::new();
    let mut tokens = BootstrapTokens::default();
    for id in 0..sizes.clients {
        tokens.insert(
            client_token(id),
            Caller {
                namespace: "istio-system".into(),
                service_account: "ztunnel".into(),
                node: Some(node_name(id % NODES)),
                pod: None,
            },
        );
    }
    let server = Server::new(cache.clone(), registry.clone(), Arc::new(tokens));
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .context("binding the ADS listener")?;
    let addr = listener.local_addr()?;
    // `serve_with_incoming` ignores the builder's TCP_NODELAY (on by default when tonic binds
    // the listener itself, as the controller does), so set it on the accepted sockets here.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server.clone().service())
            .serve_with_incoming(incoming),
    );
    let started = Instant::now();
    let translating = if args.full_translation {
        tokio::spawn(full_translation_loop(
            index.clone(),
            cache.clone(),
            settings.clone(),
        ))
    } else {
        tokio::spawn(translation_loop(
            index.clone(),
            cache.clone(),
            settings.clone(),
            DEBOUNCE,
        ))
    };
    wait_published(&cache, &sizes).await?;
    let loop_first_publish = started.elapsed();
    eprintln!(
        "controller: translation loop published {} addresses in {}",
        cache.len(ADDRESS_TYPE_URL),
        ms(loop_first_publish)
    );
    memory.push((Stage::Ready, read_memory()));

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut clients = JoinSet::new();
    let started = Instant::now();
    for id in 0..sizes.clients {
        clients.spawn(run_client(id, addr, events_tx.clone()));
    }
    drop(events_tx);
    let initial = collect(
        &mut events,
        sizes.clients,
        SETUP_TIMEOUT,
        "initial snapshot",
    )
    .await?;
    for received in &initial {
        ensure!(
            received.resources == sizes.addresses() && received.removed == 0,
            "initial snapshot: client {} received {} resources and {} removals, expected {} \
             resources",
            received.client,
            received.resources,
            received.removed,
            sizes.addresses()
        );
    }
    let initial_received = latest(&initial).saturating_duration_since(started);
    let initial_bytes = initial.iter().map(|r| r.bytes).max().unwrap_or_default();
    wait_in_sync(&registry, sizes.clients, SETUP_TIMEOUT, "initial snapshot").await?;
    let initial_in_sync = started.elapsed();
    eprintln!(
        "controller: initial snapshot ({} resources) at {} clients: received in {}, ACKed in {}",
        sizes.addresses(),
        sizes.clients,
        ms(initial_received),
        ms(initial_in_sync)
    );
    memory.push((Stage::Setup, read_memory()));

    // Change one pod at a time; every client must get exactly that workload.
    let mut changes = Vec::with_capacity(sizes.changes);
    for rep in 1..=sizes.changes {
        let (namespace, name) = cluster.changed_pod(rep);
        let current = index
            .read(|s| s.pods.get(&(namespace.clone(), name.clone())).cloned())
            .with_context(|| format!("pod {namespace}/{name} is not in the index"))?;
        let (pod, ready) = flip_ready(&current)?;
        let workload = workload_uid(&settings.cluster_id, &namespace, &name);
        let what = format!("change {rep}/{} ({workload} ready={ready})", sizes.changes);

        let applied = Instant::now();
        index.apply(Resource::Pod(Arc::new(pod)));
        let received = collect(&mut events, sizes.clients, CHANGE_TIMEOUT, &what).await?;
        for r in &received {
            check_delta(r, &workload, ready).with_context(|| what.clone())?;
        }
        let change = Change {
            workload,
            ready,
            first: earliest(&received).saturating_duration_since(applied),
            last: latest(&received).saturating_duration_since(applied),
        };
        wait_in_sync(&registry, sizes.clients, CHANGE_TIMEOUT, &what).await?;
        eprintln!(
            "controller: {what}: first client {}, all {} clients {}",
            ms(change.first),
            sizes.clients,
            ms(change.last)
        );
        changes.push(change);
    }
    if let Ok(Some(event)) = tokio::time::timeout(QUIET, events.recv()).await {
        bail!(
            "unexpected event after the last change: {}",
            event.describe()
        );
    }
    memory.push((Stage::End, read_memory()));

    server.shutdown(SHUTDOWN_GRACE).await;
    serving.abort();
    translating.abort();
    clients.shutdown().await;

    Ok(ControllerResult {
        sizes,
        counts,
        translation,
        republish,
        loop_first_publish,
        initial_received,
        initial_in_sync,
        initial_bytes,
        changes,
        memory,
        peak_reset,
        full_translation: args.full_translation,
    })
}

/// The baseline loop (`--full-translation`): on every index change, translate everything and
/// publish everything (encode and hash every resource), as the translation loop did before
/// incremental translation.
async fn full_translation_loop(index: Arc<Index>, cache: Arc<Cache>, settings: Settings) {
    let mut changes = index.changes();
    loop {
        let snapshot = index.snapshot();
        let out = translate(&snapshot, &settings);
        publish(&cache, &out);
        drop(out);
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(DEBOUNCE).await;
        changes.borrow_and_update();
    }
}

/// Times `runs` re-publishes of `out` into a cache that already holds it: what the translation
/// loop pays after every translation even when one resource changed (encode and hash all).
fn time_republish(out: &Output, runs: usize) -> Result<Vec<Duration>> {
    let cache = Cache::new();
    ensure!(
        publish(&cache, out),
        "first publish into an empty cache changed nothing"
    );
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let changed = publish(&cache, out);
        times.push(start.elapsed());
        ensure!(
            !changed,
            "re-publishing an identical translation changed the cache"
        );
    }
    Ok(times)
}

// === the synthetic cluster ===

/// The synthetic cluster's objects and what translating them must give.
pub(crate) struct Cluster {
    sizes: Sizes,
    /// Every object, for the index.
    pub(crate) resources: Vec<Resource>,
    /// Selector AuthorizationPolicies selecting each service's pods, by service number.
    selector_policies: Vec<usize>,
}

fn namespace_name(k: usize) -> String {
    format!("ns-{k}")
}

pub(crate) fn node_name(n: usize) -> String {
    format!("node-{n}")
}

pub(crate) fn node_ip(n: usize) -> String {
    format!("172.18.0.{}", n + 2)
}

/// `<a>.<b + i / 64,000>.<i % 64,000 / 250>.<i % 250 + 2>` for prefix `<a>.<b>`: unique for
/// `i < 64,000 × (256 − b)` (the second octet grows past 64,000 objects, so `10.244` covers
/// 768,000 pods).
fn ip(prefix: &str, i: usize) -> String {
    let (a, b) = prefix.split_once('.').unwrap_or((prefix, "0"));
    let b: usize = b.parse().unwrap_or(0);
    let block = MAX_OBJECTS as usize;
    format!(
        "{a}.{}.{}.{}",
        b + i / block,
        (i % block) / 250,
        i % 250 + 2
    )
}

fn client_token(id: usize) -> String {
    format!("bench-token-{id}")
}

impl Cluster {
    pub(crate) fn build(sizes: Sizes) -> Result<Self> {
        let mut resources =
            Vec::with_capacity(NAMESPACES + NODES + sizes.services + sizes.pods + sizes.policies);
        for k in 0..NAMESPACES {
            let name = namespace_name(k);
            resources.push(Resource::Namespace(Arc::new(serde_json::from_value(
                json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": name,
                        "labels": {
                            "kubernetes.io/metadata.name": name,
                            "istio.io/dataplane-mode": "ambient",
                        },
                    },
                }),
            )?)));
        }
        for n in 0..NODES {
            let name = node_name(n);
            resources.push(Resource::Node(Arc::new(serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "topology.kubernetes.io/region": "region-a",
                        "topology.kubernetes.io/zone": format!("zone-{}", n % 3),
                    },
                },
                "status": { "addresses": [{ "type": "InternalIP", "address": node_ip(n) }] },
            }))?)));
        }
        for s in 0..sizes.services {
            resources.push(Resource::Service(Arc::new(
                serde_json::from_value(service(s))
                    .with_context(|| format!("building service {s}"))?,
            )));
        }
        for p in 0..sizes.pods {
            resources.push(Resource::Pod(Arc::new(
                serde_json::from_value(pod(p, &sizes))
                    .with_context(|| format!("building pod {p}"))?,
            )));
        }
        let mut selector_policies = vec![0; sizes.services];
        for i in 0..sizes.policies {
            let (policy, selects) = policy(i, &sizes);
            if let Some(slot) = selects.and_then(|s| selector_policies.get_mut(s)) {
                *slot += 1;
            }
            resources.push(Resource::AuthorizationPolicy(Arc::new(
                serde_json::from_value(policy).with_context(|| format!("building policy {i}"))?,
            )));
        }
        Ok(Cluster {
            sizes,
            resources,
            selector_policies,
        })
    }

    /// The pod changed by repetition `rep`: spread over services and namespaces.
    pub(crate) fn changed_pod(&self, rep: usize) -> (String, String) {
        let p = (rep * 7919 + 13) % self.sizes.pods;
        let (s, name) = pod_name(p, &self.sizes);
        (namespace_name(s % NAMESPACES), name)
    }

    /// Checks a full translation against what the cluster implies and counts its resources.
    pub(crate) fn check(&self, out: &Output, settings: &Settings) -> Result<Counts> {
        if let Some(problem) = out.problems.first() {
            bail!(
                "translation reported {} problems, the first: {problem}",
                out.problems.len()
            );
        }
        let mut counts = Counts {
            authorizations: out.authorizations.len(),
            ..Counts::default()
        };
        for resource in out.addresses.values() {
            match &resource.address.r#type {
                Some(address::Type::Workload(w)) => {
                    counts.workloads += 1;
                    if w.tunnel_protocol == TunnelProtocol::Hbone as i32 {
                        counts.hbone_workloads += 1;
                    }
                    counts.policy_references += w.authorization_policies.len();
                    self.check_workload(w, settings)
                        .with_context(|| format!("workload {}", resource.name))?;
                }
                Some(address::Type::Service(_)) => counts.services += 1,
                None => bail!("address {} has no type", resource.name),
            }
        }
        let sizes = &self.sizes;
        ensure!(
            counts.workloads == sizes.pods,
            "{} workloads, expected one per pod ({})",
            counts.workloads,
            sizes.pods
        );
        ensure!(
            counts.services == sizes.services,
            "{} services, expected {}",
            counts.services,
            sizes.services
        );
        ensure!(
            counts.authorizations == sizes.policies,
            "{} authorizations, expected one per policy ({})",
            counts.authorizations,
            sizes.policies
        );
        ensure!(
            counts.hbone_workloads == sizes.pods.div_ceil(2),
            "{} HBONE workloads, expected every other pod ({})",
            counts.hbone_workloads,
            sizes.pods.div_ceil(2)
        );
        Ok(counts)
    }

    /// One workload: its service with the named target port resolved, its selector policies,
    /// healthy.
    fn check_workload(&self, w: &Workload, settings: &Settings) -> Result<()> {
        let s: usize = w
            .workload_name
            .strip_prefix("svc-")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("workload name {:?} is not svc-<n>", w.workload_name))?;
        let key = format!(
            "{0}/svc-{s}.{0}.svc.{1}",
            w.namespace, settings.domain_suffix
        );
        let ports = w
            .services
            .get(&key)
            .with_context(|| format!("not in its service {key}"))?;
        let ports: Vec<(u32, u32)> = ports
            .ports
            .iter()
            .map(|p| (p.service_port, p.target_port))
            .collect();
        ensure!(
            w.services.len() == 1
                && ports
                    == [
                        (HTTP_SERVICE_PORT, HTTP_CONTAINER_PORT),
                        (GRPC_PORT, GRPC_PORT)
                    ],
            "services {:?}, expected {key} with ports {HTTP_SERVICE_PORT}→{HTTP_CONTAINER_PORT} \
             (named) and {GRPC_PORT}→{GRPC_PORT}",
            w.services
        );
        let expected = self.selector_policies.get(s).copied().unwrap_or_default();
        ensure!(
            w.authorization_policies.len() == expected,
            "references {} selector policies {:?}, expected {expected}",
            w.authorization_policies.len(),
            w.authorization_policies
        );
        ensure!(
            w.status == WorkloadStatus::Healthy as i32,
            "not healthy although Ready"
        );
        Ok(())
    }
}

/// Service `s`: `svc-<s>` in namespace `s % 100`, selecting `app: svc-<s>`, with a named target
/// port (`http` → the pods' container port 8080) and a numeric one.
fn service(s: usize) -> serde_json::Value {
    let namespace = namespace_name(s % NAMESPACES);
    let name = format!("svc-{s}");
    let cluster_ip = ip("10.96", s);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace, "labels": { "app": name } },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "selector": { "app": name },
            "ports": [
                { "name": "http", "port": HTTP_SERVICE_PORT, "targetPort": "http", "protocol": "TCP" },
                { "name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "protocol": "TCP" },
            ],
        },
    })
}

/// Pod `p`'s service number and name: pods are dealt round-robin over the services.
fn pod_name(p: usize, sizes: &Sizes) -> (usize, String) {
    let s = p % sizes.services;
    (
        s,
        format!("svc-{s}-{POD_TEMPLATE_HASH}-{}", p / sizes.services),
    )
}

/// Pod `p` of a Deployment's ReplicaSet behind service `p % services`: Running and Ready, with
/// an IP, on node `p % 10`, redirection enabled on even pods.
fn pod(p: usize, sizes: &Sizes) -> serde_json::Value {
    let (s, name) = pod_name(p, sizes);
    let namespace = namespace_name(s % NAMESPACES);
    let app = format!("svc-{s}");
    let node = p % NODES;
    let pod_ip = ip("10.244", p);
    let annotations = if p.is_multiple_of(2) {
        json!({ (translate::REDIRECTION_ANNOTATION): "enabled" })
    } else {
        json!({})
    };
    let condition = |kind: &str| json!({ "type": kind, "status": "True" });
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("00000000-0000-4000-8000-{p:012}"),
            "labels": { "app": app, "version": "v1", "pod-template-hash": POD_TEMPLATE_HASH },
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": format!("{app}-{POD_TEMPLATE_HASH}"),
                "uid": format!("00000000-0000-4000-9000-{s:012}"),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "nodeName": node_name(node),
            "serviceAccountName": app,
            "containers": [{
                "name": "app",
                "image": "registry.example/app:1.0",
                "ports": [
                    { "name": "http", "containerPort": HTTP_CONTAINER_PORT, "protocol": "TCP" },
                    { "name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP" },
                ],
            }],
        },
        "status": {
            "phase": "Running",
            "hostIP": node_ip(node),
            "podIP": pod_ip,
            "podIPs": [{ "ip": pod_ip }],
            "conditions": [
                condition("PodScheduled"),
                condition("Initialized"),
                condition("ContainersReady"),
                condition("Ready"),
            ],
        },
    })
}

/// Policy `i` in namespace `i % 100`, and the service whose pods it selects (if any and if that
/// service exists). By `i % 10`: 0–4 namespace-wide ALLOW from principals and namespaces; 5–8
/// DENY selecting one service, from ipBlocks/notNamespaces to ports; 9 L7-tainted (alternately
/// a selector ALLOW whose first rule holds methods/paths and is dropped, and a namespace-wide
/// DENY whose L7 `when` is dropped).
fn policy(i: usize, sizes: &Sizes) -> (serde_json::Value, Option<usize>) {
    let k = i % NAMESPACES;
    let namespace = namespace_name(k);
    let peer_namespace = namespace_name((k + 1) % NAMESPACES);
    // The services of namespace k are k, k + 100, ...; pick one by the policy's round.
    let in_namespace = sizes.services.saturating_sub(k).div_ceil(NAMESPACES);
    let target = (in_namespace > 0).then(|| k + NAMESPACES * ((i / NAMESPACES) % in_namespace));
    let selector = json!({ "matchLabels": { "app": format!("svc-{}", target.unwrap_or(k)) } });
    let (kind, spec, selects) = match i % 10 {
        0..=4 => (
            "allow",
            json!({
                "action": "ALLOW",
                "rules": [{
                    "from": [
                        { "source": { "principals": [
                            format!("cluster.local/ns/{peer_namespace}/sa/svc-{}", (k + 1) % NAMESPACES),
                            format!("cluster.local/ns/{namespace}/sa/*"),
                        ] } },
                        { "source": { "namespaces": ["istio-system", peer_namespace] } },
                    ],
                    "to": [{ "operation": { "ports": ["8080", "9090"] } }],
                }],
            }),
            None,
        ),
        5..=8 => (
            "deny",
            json!({
                "action": "DENY",
                "selector": selector,
                "rules": [
                    {
                        "from": [{ "source": { "ipBlocks": [
                            "203.0.113.0/24",
                            format!("198.51.100.{}/32", i % 250),
                        ] } }],
                        "to": [{ "operation": { "ports": ["8080"] } }],
                    },
                    {
                        "from": [{ "source": { "notNamespaces": [namespace, "istio-system"] } }],
                        "to": [{ "operation": { "ports": ["9090"] } }],
                    },
                ],
            }),
            target,
        ),
        _ if (i / 10).is_multiple_of(2) => (
            "l7-allow",
            json!({
                "action": "ALLOW",
                "selector": selector,
                "rules": [
                    { "to": [{ "operation": { "methods": ["GET", "HEAD"], "paths": ["/api/*"] } }] },
                    { "from": [{ "source": { "principals": [
                        format!("cluster.local/ns/{namespace}/sa/*"),
                    ] } }] },
                ],
            }),
            target,
        ),
        _ => (
            "l7-deny",
            json!({
                "action": "DENY",
                "rules": [{
                    "from": [{ "source": { "ipBlocks": ["192.0.2.0/24"] } }],
                    "when": [{ "key": "request.headers[x-debug]", "values": ["1"] }],
                }],
            }),
            None,
        ),
    };
    let policy = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": format!("{kind}-{i}"), "namespace": namespace },
        "spec": spec,
    });
    (policy, selects)
}

/// The pod with its Ready condition flipped, and whether it is now Ready.
pub(crate) fn flip_ready(pod: &Pod) -> Result<(Pod, bool)> {
    let mut pod = pod.clone();
    let ready = pod
        .status
        .as_mut()
        .and_then(|s| s.conditions.as_mut())
        .and_then(|cs| cs.iter_mut().find(|c| c.type_ == "Ready"))
        .context("pod has no Ready condition")?;
    let now_ready = ready.status != "True";
    ready.status = if now_ready { "True" } else { "False" }.to_owned();
    ready.reason = (!now_ready).then(|| "ContainersNotReady".to_owned());
    Ok((pod, now_ready))
}

// === the server side ===

/// Waits until the translation loop has published the full translation.
async fn wait_published(cache: &Cache, sizes: &Sizes) -> Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        if cache.len(ADDRESS_TYPE_URL) == sizes.addresses()
            && cache.is_published(AUTHORIZATION_TYPE_URL)
            && cache.len(AUTHORIZATION_TYPE_URL) == sizes.policies
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the translation loop did not publish {} addresses and {} authorizations within \
             {SETUP_TIMEOUT:?} (cache holds {} and {})",
            sizes.addresses(),
            sizes.policies,
            cache.len(ADDRESS_TYPE_URL),
            cache.len(AUTHORIZATION_TYPE_URL)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `clients` streams are connected and each has ACKed everything it was sent of
/// the Address type (the registry's `in_sync`), so the next change is not held back by an
/// outstanding response.
async fn wait_in_sync(
    registry: &Registry,
    clients: usize,
    timeout: Duration,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let connections = registry.connections();
        let in_sync = connections
            .iter()
            .filter(|c| c.types.get(ADDRESS_TYPE_URL).is_some_and(|t| t.in_sync))
            .count();
        if connections.len() == clients && in_sync == clients {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: {in_sync} of {clients} clients in sync ({} connected) after {timeout:?}",
            connections.len()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// === the clients ===

/// What a client reports.
#[derive(Debug)]
enum Event {
    Received(Received),
    Failed { client: usize, error: String },
}

impl Event {
    fn describe(&self) -> String {
        match self {
            Event::Received(r) => format!(
                "client {} received {} resources and {} removals (nonce {})",
                r.client, r.resources, r.removed, r.nonce
            ),
            Event::Failed { client, error } => format!("client {client} failed: {error}"),
        }
    }
}

/// One response as a client saw it.
#[derive(Debug)]
struct Received {
    client: usize,
    /// When `message()` returned it.
    at: Instant,
    nonce: String,
    resources: usize,
    removed: usize,
    /// Encoded size of the response message.
    bytes: usize,
    /// The whole response when it holds at most [`KEEP_RESOURCES`] resources.
    response: Option<DeltaDiscoveryResponse>,
}

/// Runs client `id` until its stream ends, reporting every response (and any failure).
async fn run_client(id: usize, addr: SocketAddr, events: mpsc::UnboundedSender<Event>) {
    let error = match client_session(id, addr, &events).await {
        Ok(()) => "the server ended the stream".to_owned(),
        Err(err) => format!("{err:#}"),
    };
    // Nobody listens any more once the scenario is over.
    let _ = events.send(Event::Failed { client: id, error });
}

/// A ztunnel-like client: its own connection, one delta ADS stream with a wildcard Address
/// subscription, every response ACKed as soon as it has arrived.
async fn client_session(
    id: usize,
    addr: SocketAddr,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .context("connecting")?
        .max_decoding_message_size(MAX_RESPONSE_BYTES);
    let (requests, rx) = mpsc::channel(16);
    let node = id % NODES;
    let subscribe = DeltaDiscoveryRequest {
        node: Some(Node {
            id: format!(
                "ztunnel~{}~ztunnel-{id}.istio-system~istio-system.svc.cluster.local",
                node_ip(node)
            ),
            ..Default::default()
        }),
        type_url: ADDRESS_TYPE_URL.to_owned(),
        ..Default::default()
    };
    requests
        .send(subscribe)
        .await
        .map_err(|_| anyhow!("request stream closed"))?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", client_token(id))
            .parse()
            .context("token as metadata")?,
    );
    let mut responses = grpc
        .delta_aggregated_resources(request)
        .await
        .context("opening the delta ADS stream")?
        .into_inner();
    while let Some(response) = responses.message().await.context("receiving")? {
        let at = Instant::now();
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        requests
            .send(ack)
            .await
            .map_err(|_| anyhow!("request stream closed"))?;
        let received = Received {
            client: id,
            at,
            nonce: response.nonce.clone(),
            resources: response.resources.len(),
            removed: response.removed_resources.len(),
            bytes: response.encoded_len(),
            response: (response.resources.len() <= KEEP_RESOURCES).then_some(response),
        };
        if events.send(Event::Received(received)).is_err() {
            break;
        }
    }
    Ok(())
}

/// Waits for one response from each of `clients` clients (failing on a second one, a client
/// failure or the timeout), returned by client id.
async fn collect(
    events: &mut mpsc::UnboundedReceiver<Event>,
    clients: usize,
    timeout: Duration,
    what: &str,
) -> Result<Vec<Received>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut slots: Vec<Option<Received>> = (0..clients).map(|_| None).collect();
    let mut count = 0;
    while count < clients {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| {
                anyhow!("{what}: {count} of {clients} clients received it within {timeout:?}")
            })?
            .ok_or_else(|| anyhow!("{what}: every client stopped"))?;
        let received = match event {
            Event::Received(received) => received,
            failed @ Event::Failed { .. } => bail!("{what}: {}", failed.describe()),
        };
        let slot = slots
            .get_mut(received.client)
            .with_context(|| format!("{what}: unknown client {}", received.client))?;
        ensure!(
            slot.is_none(),
            "{what}: client {} received a second response ({} resources, nonce {})",
            received.client,
            received.resources,
            received.nonce
        );
        *slot = Some(received);
        count += 1;
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Checks a client's delta: exactly the changed workload, with its new status.
fn check_delta(received: &Received, workload: &str, ready: bool) -> Result<()> {
    let client = received.client;
    let response = received.response.as_ref().with_context(|| {
        format!(
            "client {client}: expected a delta of one resource, got {}",
            received.resources
        )
    })?;
    let names: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
    ensure!(
        response.type_url == ADDRESS_TYPE_URL
            && names == [workload]
            && response.removed_resources.is_empty(),
        "client {client}: delta of {} holds {names:?} and removes {:?}, expected exactly \
         [{workload}]",
        response.type_url,
        response.removed_resources
    );
    let body = response
        .resources
        .first()
        .and_then(|r| r.resource.as_ref())
        .with_context(|| format!("client {client}: the delta's resource has no body"))?;
    let address = Address::decode(body.value.as_slice())
        .with_context(|| format!("client {client}: decoding the delta's Address"))?;
    let Some(address::Type::Workload(w)) = address.r#type else {
        bail!("client {client}: the delta's Address is not a workload");
    };
    let status = if ready {
        WorkloadStatus::Healthy
    } else {
        WorkloadStatus::Unhealthy
    };
    ensure!(
        w.uid == workload && w.status == status as i32,
        "client {client}: the delta's workload is {} with status {}, expected {workload} {status:?}",
        w.uid,
        w.status
    );
    Ok(())
}

fn earliest(received: &[Received]) -> Instant {
    received
        .iter()
        .map(|r| r.at)
        .min()
        .unwrap_or_else(Instant::now)
}

fn latest(received: &[Received]) -> Instant {
    received
        .iter()
        .map(|r| r.at)
        .max()
        .unwrap_or_else(Instant::now)
}

// === memory ===

/// Resets VmHWM to the current VmRSS (Linux ≥ 4.0); `false` if that is not possible.
pub(crate) fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// VmRSS and VmHWM, or `None` without `/proc/self/status`.
pub(crate) fn read_memory() -> Option<Memory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
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

// === report ===

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2,
    }
}

fn max(samples: &[Duration]) -> Duration {
    samples.iter().copied().max().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

impl ControllerResult {
    fn memory_at(&self, stage: Stage) -> Option<Memory> {
        self.memory
            .iter()
            .find(|(s, _)| *s == stage)
            .and_then(|(_, m)| *m)
    }

    fn change_latencies(&self) -> Vec<Duration> {
        self.changes.iter().map(|c| c.last).collect()
    }

    fn first_client_latencies(&self) -> Vec<Duration> {
        self.changes.iter().map(|c| c.first).collect()
    }

    /// The table rows: (metric, target, measured, meets target).
    fn rows(&self) -> Vec<(String, String, String, Option<bool>)> {
        let sizes = &self.sizes;
        let mut rows = Vec::new();
        let translation = median(&self.translation);
        rows.push((
            format!("full translation (median of {})", self.translation.len()),
            format!("< {} s", TRANSLATION_TARGET.as_secs()),
            format!("{} (max {})", ms(translation), ms(max(&self.translation))),
            Some(translation < TRANSLATION_TARGET),
        ));
        let changes = self.change_latencies();
        let change = median(&changes);
        rows.push((
            format!(
                "change-to-delta, {} clients (median of {})",
                sizes.clients,
                changes.len()
            ),
            format!("< {} ms (100 clients)", CHANGE_TARGET.as_millis()),
            format!("{} (max {})", ms(change), ms(max(&changes))),
            Some(change < CHANGE_TARGET),
        ));
        let setup = self.memory_at(Stage::Setup);
        let target = format!("< 200 MB ({:.1} MiB)", RSS_TARGET_BYTES / 1_048_576.0);
        let memory_row = |label: &str, kib: Option<u64>| {
            (
                label.to_owned(),
                target.clone(),
                kib.map_or("n/a".to_owned(), |k| {
                    format!("{:.1} MiB ({:.0} MB)", mib(k), k as f64 * 1024.0 / 1e6)
                }),
                kib.map(|k| (k as f64 * 1024.0) < RSS_TARGET_BYTES),
            )
        };
        rows.push(memory_row(
            if self.peak_reset {
                "peak RSS after setup (VmHWM, since scenario start)"
            } else {
                "peak RSS after setup (VmHWM, whole process)"
            },
            setup.map(|m| m.hwm_kib),
        ));
        rows.push(memory_row(
            "RSS after setup (VmRSS)",
            setup.map(|m| m.rss_kib),
        ));
        rows
    }
}

/// Prints the result: the Markdown table, a verdict line per row, and the details.
pub(crate) fn print(result: &ControllerResult) {
    let sizes = &result.sizes;
    let counts = &result.counts;
    println!(
        "## weft-bench controller: {} pods, {} services, {} policies, {NAMESPACES} namespaces, \
         {NODES} nodes, {} clients{}{}",
        sizes.pods,
        sizes.services,
        sizes.policies,
        sizes.clients,
        if sizes.quick { " (--quick)" } else { "" },
        if result.full_translation {
            " — baseline: full translation + full publish per change"
        } else {
            ""
        }
    );
    println!();
    println!(
        "Full translation produces {} Address resources ({} workloads, {} of them HBONE, + {} \
         services) and {} Authorization resources; {} selector-policy references; 0 problems.",
        counts.workloads + counts.services,
        counts.workloads,
        counts.hbone_workloads,
        counts.services,
        counts.authorizations,
        counts.policy_references
    );
    println!();
    let rows = result.rows();
    println!("| metric | target | measured | meets target |");
    println!("|--------|--------|---------:|:------------:|");
    for (metric, target, measured, ok) in &rows {
        println!(
            "| {metric} | {target} | {measured} | {} |",
            ok.map_or("n/a", yes_no)
        );
    }
    println!();
    for (metric, _, _, ok) in &rows {
        println!("{metric}: meets target: {}", ok.map_or("n/a", yes_no));
    }
    println!();
    println!(
        "* initial snapshot ({} resources, {:.1} MiB encoded, each) to {} clients: all received {} \
         after the first connect, all ACKed {}",
        sizes.addresses(),
        result.initial_bytes as f64 / 1_048_576.0,
        sizes.clients,
        ms(result.initial_received),
        ms(result.initial_in_sync)
    );
    let first = result.first_client_latencies();
    println!(
        "* change-to-delta, first client: median {} (max {}); translation loop debounce {} ms \
         (a zero sleep still waits for tokio's next 1 ms timer tick)",
        ms(median(&first)),
        ms(max(&first)),
        DEBOUNCE.as_millis()
    );
    println!(
        "* translation loop's first translate + publish into the empty cache: {}; re-publish of \
         an unchanged translation (encode + hash every resource): median {}",
        ms(result.loop_first_publish),
        ms(median(&result.republish))
    );
    println!("* memory, VmRSS / VmHWM in MiB:");
    for (stage, memory) in &result.memory {
        match memory {
            Some(m) => println!(
                "  * {}: {:.1} / {:.1}",
                stage.label(),
                mib(m.rss_kib),
                mib(m.hwm_kib)
            ),
            None => println!("  * {}: n/a", stage.label()),
        }
    }
    if let (Some(start), Some(setup)) = (
        result.memory_at(Stage::Start),
        result.memory_at(Stage::Setup),
    ) {
        println!(
            "* RSS before building the synthetic objects {:.1} MiB → after setup {:.1} MiB \
             (+{:.1} MiB)",
            mib(start.rss_kib),
            mib(setup.rss_kib),
            mib(setup.rss_kib.saturating_sub(start.rss_kib))
        );
    }
    println!(
        "* the process hosts the index, translation, cache and ADS server and the {} clients: \
         memory includes the clients' side of the streams",
        sizes.clients
    );
    println!();
    println!(
        "CPU: {} ({} cores); tokio worker threads: {}; build: {}",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, usize::from),
        crate::WORKER_THREADS,
        build_profile()
    );
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; run with --release for meaningful numbers");
    }
}

/// Writes the result as JSON to `dir/controller-<unix-timestamp>.json`, creating `dir`.
///
/// # Errors
/// Creating the directory, serializing or writing the file.
pub(crate) fn write_json(result: &ControllerResult, dir: &Path) -> Result<PathBuf> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("controller-{timestamp}.json"));
    let mut text = serde_json::to_string_pretty(&result.to_json(timestamp))?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn millis_all(samples: &[Duration]) -> Vec<f64> {
    samples.iter().copied().map(millis).collect()
}

impl ControllerResult {
    fn to_json(&self, timestamp: u64) -> serde_json::Value {
        let sizes = &self.sizes;
        let counts = &self.counts;
        let changes = self.change_latencies();
        let first = self.first_client_latencies();
        let memory: serde_json::Map<String, serde_json::Value> = self
            .memory
            .iter()
            .map(|(stage, m)| {
                let value = m.map_or(
                    serde_json::Value::Null,
                    |m| json!({ "rss_mib": mib(m.rss_kib), "hwm_mib": mib(m.hwm_kib) }),
                );
                (stage.key().to_owned(), value)
            })
            .collect();
        let rows: Vec<serde_json::Value> = self
            .rows()
            .into_iter()
            .map(|(metric, target, measured, ok)| {
                json!({ "metric": metric, "target": target, "measured": measured, "meets_target": ok })
            })
            .collect();
        let change_details: Vec<serde_json::Value> = self
            .changes
            .iter()
            .map(|c| {
                json!({
                    "workload": c.workload,
                    "ready": c.ready,
                    "first_client_ms": millis(c.first),
                    "all_clients_ms": millis(c.last),
                })
            })
            .collect();
        let targets: BTreeMap<&str, serde_json::Value> = BTreeMap::from([
            ("full_translation_ms", json!(millis(TRANSLATION_TARGET))),
            ("change_to_delta_ms", json!(millis(CHANGE_TARGET))),
            ("rss_bytes", json!(RSS_TARGET_BYTES)),
        ]);
        json!({
            "scenario": "controller",
            "translation_loop": if self.full_translation { "full (baseline)" } else { "incremental" },
            "timestamp": timestamp,
            "unit": "ms, MiB",
            "quick": sizes.quick,
            "sizes": {
                "namespaces": NAMESPACES,
                "nodes": NODES,
                "pods": sizes.pods,
                "services": sizes.services,
                "policies": sizes.policies,
                "clients": sizes.clients,
            },
            "resources": {
                "addresses": counts.workloads + counts.services,
                "workloads": counts.workloads,
                "hbone_workloads": counts.hbone_workloads,
                "services": counts.services,
                "authorizations": counts.authorizations,
                "selector_policy_references": counts.policy_references,
            },
            "full_translation": {
                "median_ms": millis(median(&self.translation)),
                "max_ms": millis(max(&self.translation)),
                "runs_ms": millis_all(&self.translation),
            },
            "republish_unchanged": {
                "median_ms": millis(median(&self.republish)),
                "runs_ms": millis_all(&self.republish),
            },
            "translation_loop_first_publish_ms": millis(self.loop_first_publish),
            "initial_snapshot": {
                "all_received_ms": millis(self.initial_received),
                "all_acked_ms": millis(self.initial_in_sync),
                "bytes_per_client": self.initial_bytes,
            },
            "change_to_delta": {
                "debounce_ms": millis(DEBOUNCE),
                "median_ms": millis(median(&changes)),
                "max_ms": millis(max(&changes)),
                "first_client_median_ms": millis(median(&first)),
                "runs": change_details,
            },
            "memory": memory,
            "peak_reset_at_start": self.peak_reset,
            "targets": targets,
            "table": rows,
            "tokio_worker_threads": crate::WORKER_THREADS,
            "build": build_profile(),
            "machine": {
                "cpu_model": cpu_model(),
                "cores": std::thread::available_parallelism().map_or(0, usize::from),
            },
        })
    }
}

pub(crate) fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// `model name` from /proc/cpuinfo, or "unknown".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(name, _)| name.trim() == "model name")
                .map(|(_, value)| value.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(pods: usize, services: usize, policies: usize) -> Sizes {
        Sizes {
            pods,
            services,
            policies,
            clients: 1,
            translation_runs: 1,
            changes: 1,
            quick: true,
        }
    }

    #[test]
    fn small_cluster_translates_as_expected() {
        let sizes = sizes(300, 30, 40);
        let cluster = Cluster::build(sizes).unwrap();
        let index = Index::new();
        index.batch(cluster.resources.clone(), &[]);
        let settings = Settings::default();
        let out = translate(&index.snapshot(), &settings);
        let counts = cluster.check(&out, &settings).unwrap();
        assert_eq!(counts.workloads, 300);
        assert_eq!(counts.authorizations, 40);
        assert!(counts.policy_references > 0);

        let (namespace, name) = cluster.changed_pod(1);
        let pod = index
            .read(|s| s.pods.get(&(namespace.clone(), name.clone())).cloned())
            .unwrap();
        let (flipped, ready) = flip_ready(&pod).unwrap();
        assert!(!ready);
        let (back, ready) = flip_ready(&flipped).unwrap();
        assert!(ready);
        assert_eq!(back.status, pod.status);
    }

    #[test]
    fn medians() {
        let d = Duration::from_millis;
        assert_eq!(median(&[d(3), d(1), d(2)]), d(2));
        assert_eq!(
            median(&[d(4), d(1), d(2), d(3)]),
            Duration::from_micros(2500)
        );
        assert_eq!(max(&[d(4), d(1)]), d(4));
    }
}
