//! `engine`: the waypoint's HTTP routing stack against Envoy as an HTTP router with the same
//! route table, on loopback, one worker each.
//!
//! One route table ([`ROUTES`], [`POLICY`]) is rendered twice: into `weft.l7.v1` resources (plus
//! the `istio.workload.Address` resources naming the services and endpoints) for the waypoint's
//! benchmark-only standalone mode (`waypoint bench-serve`: the production request pipeline on a
//! plain TCP listener, plain TCP to the endpoints — HBONE in and out are the only parts
//! replaced), and into an Envoy v3 bootstrap (static listener, HTTP connection manager with the
//! RBAC filter and the router, route_config, clusters) run with `--concurrency 1`. Both send to
//! the same upstream, an in-process hyper server answering 1 KiB (HTTP/1.1 and h2c), whose CPU
//! is not counted, and both write an access log line per request (the waypoint's `access`
//! events on stderr, Envoy's file access log), to files in `$TMPDIR/weft-bench-engine`, with
//! the generated configurations.
//!
//! Figures, per proxy:
//! * **requests/s per proxy core**, HTTP/1.1 and h2c: closed loop with `h2load` (`--h1` for
//!   HTTP/1.1) for `--secs`; requests completed (2xx only; anything else fails the run) / the
//!   proxy process's CPU-seconds (`/proc/<pid>/stat`), so the figure does not depend on how much
//!   of the shared cores the load generator and the upstream took; and the ratio
//!   waypoint / Envoy against the 1.2× target.
//! * **cost at a fixed rate** (`--rate`, default 1,000 req/s, HTTP/1.1 GET over
//!   `--rate-connections` keep-alive connections, open loop as in `mesh`): the proxy's CPU
//!   cores and RSS, and p50/p99 latency through it.
//! * peak RSS (VmHWM) over the whole run.

use std::convert::Infallible;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use prost::Message as _;
use serde_json::{Value, json};
use weft_proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use weft_proto::istio::workload::{
    self as wpb, Address, GatewayAddress, NamespacedHostname, NetworkAddress, PortList,
    TunnelProtocol, address, gateway_address,
};
use weft_proto::type_url::{ADDRESS_TYPE_URL, L7_POLICY_TYPE_URL, L7_SERVICE_TYPE_URL};
use weft_proto::weft::l7::v1 as pb;

use crate::controller::yes_no;
use crate::load::{Latency, fixed_rate_over};
use crate::procfs::{mib, rss_bytes};

/// Arguments of `engine`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Seconds of each closed-loop run (per proxy and protocol).
    #[arg(long = "engine-secs", default_value_t = 10)]
    pub(crate) secs: u64,
    /// Short runs: 2 s closed loop, 2 s fixed rate.
    #[arg(long)]
    pub(crate) quick: bool,
    /// HTTP/1.1 connections of the closed-loop run.
    #[arg(long = "engine-h1-connections", default_value_t = 64)]
    pub(crate) h1_connections: u32,
    /// h2c connections of the closed-loop run.
    #[arg(long = "engine-h2-connections", default_value_t = 16)]
    pub(crate) h2_connections: u32,
    /// Concurrent streams per h2c connection.
    #[arg(long = "engine-h2-streams", default_value_t = 10)]
    pub(crate) h2_streams: u32,
    /// Requests per second of the fixed-rate run.
    #[arg(long = "engine-rate", default_value_t = 1000)]
    pub(crate) rate: u32,
    /// Connections the fixed rate is spread over.
    #[arg(long = "engine-rate-connections", default_value_t = 16)]
    pub(crate) rate_connections: u32,
    /// Seconds of the fixed-rate run, per proxy.
    #[arg(long = "engine-rate-secs", default_value_t = 10)]
    pub(crate) rate_secs: u64,
    /// The Envoy binary (default: `/opt/weft-bench/bin/envoy`, else `envoy` on PATH).
    #[arg(long)]
    pub(crate) envoy: Option<PathBuf>,
    /// The waypoint binary (default: `waypoint` next to this executable).
    #[arg(long)]
    pub(crate) waypoint: Option<PathBuf>,
    /// Only run the waypoint (no Envoy; no ratio).
    #[arg(long = "engine-waypoint-only")]
    pub(crate) waypoint_only: bool,
    /// Closed-loop rounds per proxy and protocol, alternating which proxy goes first; each
    /// figure is the round with the median requests/s per core [quick: 1].
    #[arg(long = "engine-rounds", default_value_t = 3)]
    pub(crate) rounds: u32,
}

impl Args {
    fn secs(&self) -> u64 {
        if self.quick { 2 } else { self.secs.max(1) }
    }
    fn rate_secs(&self) -> u64 {
        if self.quick { 2 } else { self.rate_secs.max(1) }
    }
    fn rounds(&self) -> u32 {
        if self.quick { 1 } else { self.rounds.max(1) }
    }
}

/// The run with the median requests/s per core (the upper median of an even count).
fn median_run(mut runs: Vec<MaxRun>) -> MaxRun {
    runs.sort_by(|a, b| a.per_core().total_cmp(&b.per_core()));
    let middle = runs.len() / 2;
    runs.into_iter().nth(middle).unwrap_or_default()
}

/// Response body size of the upstream.
const RESPONSE_BYTES: usize = 1024;
/// The path every load request takes: the weighted-split route, after eight route entries that
/// do not match (one of them on a header the request carries with another value).
const LOAD_PATH: &str = "/bench/items";
const LOAD_HEADER: (&str, &str) = ("x-canary", "false");

const NAMESPACE: &str = "bench";
const WAYPOINT_HOST: &str = "waypoint.bench.svc.cluster.local";
const SERVICE_HOST: &str = "echo.bench.svc.cluster.local";
const SERVICE_VIP: [u8; 4] = [10, 96, 0, 10];
const SERVICE_PORT: u16 = 80;
const PEER: &str = "spiffe://cluster.local/ns/bench/sa/client";
/// Backends: (service name, VIP, endpoint IP).
const BACKENDS: [(&str, [u8; 4], [u8; 4]); 2] = [
    ("echo-v1", [10, 96, 0, 11], [127, 0, 0, 11]),
    ("echo-v2", [10, 96, 0, 12], [127, 0, 0, 12]),
];

/// One HTTPRoute-style route entry, in precedence order.
struct RouteSpec {
    name: &'static str,
    /// Gateway API `PathPrefix` (element-wise).
    prefix: &'static str,
    /// An exact header match.
    header: Option<(&'static str, &'static str)>,
    /// (backend service name, weight).
    backends: &'static [(&'static str, u32)],
    /// `RequestHeaderModifier` set / add.
    set: &'static [(&'static str, &'static str)],
    add: &'static [(&'static str, &'static str)],
}

const fn route(
    name: &'static str,
    prefix: &'static str,
    backends: &'static [(&'static str, u32)],
) -> RouteSpec {
    RouteSpec {
        name,
        prefix,
        header: None,
        backends,
        set: &[],
        add: &[],
    }
}

const V1: &[(&str, u32)] = &[("echo-v1", 1)];
const V2: &[(&str, u32)] = &[("echo-v2", 1)];

/// The route table (Gateway API precedence order: longer prefixes first, a header match before
/// the same prefix without one).
const ROUTES: [RouteSpec; 10] = [
    RouteSpec {
        header: Some(("x-canary", "true")),
        ..route("canary", "/bench", V2)
    },
    RouteSpec {
        set: &[("x-route", "split")],
        add: &[("x-weft-bench", "1")],
        ..route("split", "/bench", &[("echo-v1", 50), ("echo-v2", 50)])
    },
    route("api-v2", "/api/v2", V2),
    route("api-v1", "/api/v1", V1),
    route("static", "/static", V1),
    route("login", "/login", V1),
    route("users", "/users", V1),
    route("orders", "/orders", V2),
    route("search", "/search", V2),
    route("root", "/", V1),
];

/// The L7 ALLOW policy: from 127.0.0.0/8, GET or POST, on these path prefixes.
struct PolicySpec {
    ip_block: (&'static str, u32),
    methods: &'static [&'static str],
    path_prefixes: &'static [&'static str],
}

const POLICY: PolicySpec = PolicySpec {
    ip_block: ("127.0.0.0", 8),
    methods: &["GET", "POST"],
    path_prefixes: &[
        "/bench", "/api/", "/static/", "/users", "/orders", "/search",
    ],
};

/// The rendered route order must match the sort the engine would apply: reject a table whose
/// entries are not in Gateway API precedence (longer prefix first).
fn routes_in_precedence() -> bool {
    ROUTES.windows(2).all(|w| {
        w[0].prefix.len() >= w[1].prefix.len()
            || (w[0].prefix == w[1].prefix && w[0].header.is_some())
            || !w[1].prefix.starts_with(w[0].prefix)
    })
}

// === waypoint resources ===

fn ip_bytes(ip: [u8; 4]) -> Vec<u8> {
    ip.to_vec()
}

fn hostname(service: &str) -> String {
    format!("{service}.{NAMESPACE}.svc.cluster.local")
}

fn waypoint_ref() -> Option<GatewayAddress> {
    Some(GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: NAMESPACE.into(),
            hostname: WAYPOINT_HOST.into(),
        })),
        hbone_mtls_port: 15008,
    })
}

fn service_address(name: &str, vip: [u8; 4], target_port: u16, bound: bool) -> Resource {
    let s = wpb::Service {
        name: name.into(),
        namespace: NAMESPACE.into(),
        hostname: hostname(name),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: ip_bytes(vip),
            length: None,
        }],
        ports: vec![wpb::Port {
            service_port: u32::from(SERVICE_PORT),
            target_port: u32::from(target_port),
            app_protocol: 0,
        }],
        waypoint: bound.then(waypoint_ref).flatten(),
        ..Default::default()
    };
    resource(
        ADDRESS_TYPE_URL,
        format!("{NAMESPACE}/{}", hostname(name)),
        Address {
            r#type: Some(address::Type::Service(s)),
        }
        .encode_to_vec(),
    )
}

fn workload_address(uid: &str, ip: [u8; 4], service: Option<(&str, u16)>) -> Resource {
    let w = wpb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: NAMESPACE.into(),
        service_account: uid.into(),
        workload_name: uid.into(),
        canonical_name: uid.into(),
        canonical_revision: "v1".into(),
        cluster_id: "Kubernetes".into(),
        addresses: vec![ip_bytes(ip)],
        // No tunnel: the waypoint reaches the endpoint over plain TCP.
        tunnel_protocol: TunnelProtocol::None as i32,
        services: service
            .map(|(name, target)| {
                (
                    format!("{NAMESPACE}/{}", hostname(name)),
                    PortList {
                        ports: vec![wpb::Port {
                            service_port: u32::from(SERVICE_PORT),
                            target_port: u32::from(target),
                            app_protocol: 0,
                        }],
                    },
                )
            })
            .into_iter()
            .collect(),
        ..Default::default()
    };
    resource(
        ADDRESS_TYPE_URL,
        uid.to_owned(),
        Address {
            r#type: Some(address::Type::Workload(w)),
        }
        .encode_to_vec(),
    )
}

fn resource(type_url: &str, name: String, value: Vec<u8>) -> Resource {
    Resource {
        version: "1".into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        }),
        name,
        ..Default::default()
    }
}

fn prefix_match(prefix: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: Some(pb::string_match::Kind::PathPrefix(prefix.into())),
    })
}

fn headers(list: &[(&str, &str)]) -> Vec<pb::Header> {
    list.iter()
        .map(|(n, v)| pb::Header {
            name: (*n).into(),
            value: (*v).into(),
        })
        .collect()
}

fn service_config() -> pb::ServiceConfig {
    let routes = ROUTES
        .iter()
        .map(|r| pb::Route {
            name: format!("HTTPRoute/{NAMESPACE}/{}/rule/0/match/0", r.name),
            r#match: Some(pb::RouteMatch {
                path: prefix_match(r.prefix),
                headers: r
                    .header
                    .iter()
                    .map(|(n, v)| pb::HeaderMatch {
                        name: (*n).into(),
                        value: Some(pb::StringMatch {
                            kind: Some(pb::string_match::Kind::Exact((*v).into())),
                        }),
                    })
                    .collect(),
                ..Default::default()
            }),
            filters: if r.set.is_empty() && r.add.is_empty() {
                vec![]
            } else {
                vec![pb::Filter {
                    kind: Some(pb::filter::Kind::RequestHeaderModifier(
                        pb::HeaderModifier {
                            set: headers(r.set),
                            add: headers(r.add),
                            remove: vec![],
                        },
                    )),
                }]
            },
            backends: r
                .backends
                .iter()
                .map(|(b, w)| pb::Backend {
                    hostname: hostname(b),
                    port: u32::from(SERVICE_PORT),
                    weight: *w,
                    filters: vec![],
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    pb::ServiceConfig {
        namespace: NAMESPACE.into(),
        name: "echo".into(),
        hostname: SERVICE_HOST.into(),
        ports: vec![pb::PortConfig {
            port: u32::from(SERVICE_PORT),
            protocol: pb::Protocol::Unspecified as i32,
            routes,
        }],
        load_balancer: pb::LoadBalancer::LeastRequest as i32,
        outlier_detection: None,
    }
}

fn policy() -> pb::Policy {
    pb::Policy {
        namespace: NAMESPACE.into(),
        name: "allow-bench".into(),
        action: pb::Action::Allow as i32,
        services: vec![SERVICE_HOST.into()],
        rules: vec![pb::Rule {
            from: vec![pb::Source {
                ip_blocks: vec![format!("{}/{}", POLICY.ip_block.0, POLICY.ip_block.1)],
                ..Default::default()
            }],
            to: vec![pb::Operation {
                methods: POLICY.methods.iter().map(|m| (*m).into()).collect(),
                paths: POLICY
                    .path_prefixes
                    .iter()
                    .map(|p| format!("{p}*"))
                    .collect(),
                ..Default::default()
            }],
            when: vec![],
        }],
    }
}

/// The waypoint's resources file: length-delimited `DeltaDiscoveryResponse`s, Address then
/// ServiceConfig then Policy, as the controller would send them.
fn waypoint_resources(upstream_port: u16) -> Vec<u8> {
    let mut addresses = vec![
        service_address("echo", SERVICE_VIP, SERVICE_PORT, true),
        // The client (source labels in telemetry, as in the mesh).
        workload_address("client", [127, 0, 0, 1], None),
    ];
    for (name, vip, ip) in BACKENDS {
        addresses.push(service_address(name, vip, upstream_port, false));
        addresses.push(workload_address(
            &format!("{name}-0"),
            ip,
            Some((name, upstream_port)),
        ));
    }
    let responses = [
        (ADDRESS_TYPE_URL, addresses),
        (
            L7_SERVICE_TYPE_URL,
            vec![resource(
                L7_SERVICE_TYPE_URL,
                format!("{NAMESPACE}/waypoint/{NAMESPACE}/echo"),
                service_config().encode_to_vec(),
            )],
        ),
        (
            L7_POLICY_TYPE_URL,
            vec![resource(
                L7_POLICY_TYPE_URL,
                format!("{NAMESPACE}/waypoint/{NAMESPACE}/allow-bench"),
                policy().encode_to_vec(),
            )],
        ),
    ];
    let mut out = Vec::new();
    for (type_url, resources) in responses {
        let response = DeltaDiscoveryResponse {
            system_version_info: "1".into(),
            resources,
            type_url: type_url.into(),
            nonce: "1".into(),
            removed_resources: vec![],
        };
        out.extend(response.encode_length_delimited_to_vec());
    }
    out
}

// === Envoy bootstrap ===

fn envoy_bootstrap(listen: SocketAddr, admin: u16, upstream_port: u16, access_log: &Path) -> Value {
    let header_options = |list: &[(&str, &str)], action: &str| -> Vec<Value> {
        list.iter()
            .map(|(k, v)| json!({"header": {"key": k, "value": v}, "append_action": action}))
            .collect()
    };
    let routes: Vec<Value> = ROUTES
        .iter()
        .map(|r| {
            let mut m = if r.prefix == "/" {
                json!({"prefix": "/"})
            } else {
                // Gateway API PathPrefix is element-wise, as Envoy's path_separated_prefix.
                json!({"path_separated_prefix": r.prefix})
            };
            if let Some((name, value)) = r.header {
                m["headers"] = json!([{"name": name, "string_match": {"exact": value}}]);
            }
            let mut action = if r.backends.len() == 1 {
                json!({"cluster": r.backends[0].0})
            } else {
                json!({"weighted_clusters": {"clusters": r.backends.iter()
                    .map(|(b, w)| json!({"name": b, "weight": w})).collect::<Vec<_>>()}})
            };
            // The waypoint sets no route timeout; Envoy's default is 15 s.
            action["timeout"] = json!("0s");
            let mut to_add = header_options(r.set, "OVERWRITE_IF_EXISTS_OR_ADD");
            to_add.extend(header_options(r.add, "APPEND_IF_EXISTS_OR_ADD"));
            let mut entry = json!({"name": r.name, "match": m, "route": action});
            if !to_add.is_empty() {
                entry["request_headers_to_add"] = json!(to_add);
            }
            entry
        })
        .collect();
    let methods: Vec<Value> = POLICY
        .methods
        .iter()
        .map(|m| json!({"header": {"name": ":method", "string_match": {"exact": m}}}))
        .collect();
    let paths: Vec<Value> = POLICY
        .path_prefixes
        .iter()
        .map(|p| json!({"url_path": {"path": {"prefix": p}}}))
        .collect();
    let clusters: Vec<Value> = BACKENDS
        .iter()
        .map(|(name, _, ip)| {
            json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "10s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": Ipv4Addr::from(*ip).to_string(), "port_value": upstream_port}}}}]}]},
                // Like the waypoint: HTTP/2 upstream for HTTP/2 downstream, else HTTP/1.1.
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}},
            })
        })
        .collect();
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": listen.ip().to_string(), "port_value": listen.port()}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "bench",
                        "codec_type": "AUTO",
                        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                            "path": access_log.display().to_string()}}],
                        "route_config": {"name": "bench", "virtual_hosts": [{
                            "name": "echo", "domains": ["*"], "routes": routes}]},
                        "http_filters": [
                            {"name": "envoy.filters.http.rbac", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                                "rules": {"action": "ALLOW", "policies": {"allow-bench": {
                                    "permissions": [{"and_rules": {"rules": [
                                        {"or_rules": {"rules": methods}},
                                        {"or_rules": {"rules": paths}}]}}],
                                    "principals": [{"direct_remote_ip": {
                                        "address_prefix": POLICY.ip_block.0,
                                        "prefix_len": POLICY.ip_block.1}}]}}}}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                        ]
                    }
                }]}]
            }],
            "clusters": clusters,
        }
    })
}

// === upstream ===

/// Serves 1 KiB to every request on `addrs` (HTTP/1.1 or h2c), on its own runtime thread.
fn start_upstream(addrs: Vec<SocketAddr>) -> Result<()> {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listeners: Vec<std::net::TcpListener> = addrs
        .iter()
        .map(|a| std::net::TcpListener::bind(a).with_context(|| format!("binding {a}")))
        .collect::<Result<_>>()?;
    let body = bytes::Bytes::from(vec![b'x'; RESPONSE_BYTES]);
    std::thread::Builder::new()
        .name("upstream".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                for listener in listeners {
                    let _ = listener.set_nonblocking(true);
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        continue;
                    };
                    let body = body.clone();
                    tokio::spawn(async move {
                        while let Ok((stream, _)) = listener.accept().await {
                            let _ = stream.set_nodelay(true);
                            let body = body.clone();
                            tokio::spawn(async move {
                                let service = hyper::service::service_fn(move |_req| {
                                    let body = body.clone();
                                    async move {
                                        Ok::<_, Infallible>(hyper::Response::new(Full::new(body)))
                                    }
                                });
                                let _ = hyper_util::server::conn::auto::Builder::new(
                                    TokioExecutor::new(),
                                )
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                            });
                        }
                    });
                }
                std::future::pending::<()>().await;
            });
        })?;
    Ok(())
}

// === processes ===

/// A proxy child process, killed on drop.
struct Proxy {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }
    fn cpu_seconds(&self) -> Result<f64> {
        crate::procfs::cpu_seconds(self.pid())
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn find_envoy(args: &Args) -> Result<PathBuf> {
    if let Some(p) = &args.envoy {
        return Ok(p.clone());
    }
    let default = PathBuf::from("/opt/weft-bench/bin/envoy");
    if default.is_file() {
        return Ok(default);
    }
    if let Some(p) = which("envoy") {
        return Ok(p);
    }
    bail!(
        "envoy not found (looked for /opt/weft-bench/bin/envoy and envoy on PATH): run scripts/install-deps, or pass --envoy"
    )
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Waits until one GET through `addr` answers 200 (the proxy is up and routes).
fn wait_serving(proxy: &mut Proxy) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = proxy.child.try_wait()? {
            bail!("{} exited during start-up: {status}", proxy.name);
        }
        let attempt = connect_http(proxy.addr).and_then(|mut c| get(&mut c));
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "{} not serving 200 at {} after 20 s: {e}",
                    proxy.name,
                    proxy.addr
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn start_waypoint(args: &Args, dir: &Path, upstream_port: u16) -> Result<Proxy> {
    let exe = match &args.waypoint {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable directory")?
            .join("waypoint"),
    };
    if !exe.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release -p waypoint -p weft-bench)",
            exe.display()
        );
    }
    let resources = dir.join("waypoint-resources.pb");
    std::fs::write(&resources, waypoint_resources(upstream_port))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let log = std::fs::File::create(dir.join("waypoint.log"))?;
    let child = Command::new(&exe)
        .arg("bench-serve")
        .arg("--resources")
        .arg(&resources)
        .arg("--listen")
        .arg(format!(
            "{addr}={}",
            SocketAddr::from((SERVICE_VIP, SERVICE_PORT))
        ))
        .args(["--peer", PEER, "--namespace", NAMESPACE])
        .args([
            "--waypoint-hostname",
            WAYPOINT_HOST,
            "--worker-threads",
            "1",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut proxy = Proxy {
        name: "waypoint",
        child,
        addr,
    };
    wait_serving(&mut proxy)?;
    Ok(proxy)
}

fn start_envoy(args: &Args, dir: &Path, upstream_port: u16) -> Result<Proxy> {
    let exe = find_envoy(args)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let config = envoy_bootstrap(
        addr,
        free_port()?,
        upstream_port,
        &dir.join("envoy-access.log"),
    );
    let path = dir.join("envoy.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
    let log = std::fs::File::create(dir.join("envoy.log"))?;
    let child = Command::new(&exe)
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "1", "--log-level", "warn"])
        .args(["--disable-hot-restart", "--use-dynamic-base-id"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut proxy = Proxy {
        name: "envoy",
        child,
        addr,
    };
    wait_serving(&mut proxy)?;
    Ok(proxy)
}

// === load ===

/// One closed-loop run's figures.
#[derive(Debug, Clone, Default)]
pub(crate) struct MaxRun {
    requests: u64,
    cpu_secs: f64,
    wall_secs: f64,
}

impl MaxRun {
    fn per_core(&self) -> f64 {
        self.requests as f64 / self.cpu_secs
    }
    fn json(&self) -> Value {
        json!({"requests": self.requests, "proxy_cpu_secs": self.cpu_secs,
               "wall_secs": self.wall_secs, "requests_per_core": self.per_core(),
               "requests_per_sec": self.requests as f64 / self.wall_secs})
    }
}

fn h2load(addr: SocketAddr, http1: bool, connections: u32, streams: u32, secs: u64) -> Result<u64> {
    let exe = which("h2load")
        .context("h2load not found (Debian nghttp2-client): run scripts/install-deps")?;
    let mut cmd = Command::new(exe);
    if http1 {
        cmd.arg("--h1");
    }
    let output = cmd
        .args(["-t", "1", "-c", &connections.to_string()])
        .args(["-m", &streams.to_string(), "-D", &secs.to_string()])
        .args(["-H", &format!("{}: {}", LOAD_HEADER.0, LOAD_HEADER.1)])
        .arg(format!("http://{addr}{LOAD_PATH}"))
        .stdin(Stdio::null())
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_h2load(&text).with_context(|| format!("h2load output:\n{text}"))
}

/// The 2xx count from h2load's summary; fails when any request was not a 2xx.
fn parse_h2load(text: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .context("no status codes line")?;
    let counts: Vec<u64> = line
        .trim_start_matches("status codes:")
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    let [ok, redirect, client, server] = counts[..] else {
        bail!("unexpected status codes line {line:?}");
    };
    if redirect + client + server > 0 {
        bail!("non-2xx answers: {line}");
    }
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .context("no requests line")?;
    if !requests.contains(" 0 failed") || !requests.contains(" 0 errored") {
        bail!("failed requests: {requests}");
    }
    Ok(ok)
}

fn max_run(proxy: &Proxy, args: &Args, http1: bool) -> Result<MaxRun> {
    let (connections, streams) = if http1 {
        (args.h1_connections, 1)
    } else {
        (args.h2_connections, args.h2_streams)
    };
    // Warm-up (pools, caches), not counted.
    h2load(proxy.addr, http1, connections, streams, 1)?;
    let cpu_before = proxy.cpu_seconds()?;
    let started = Instant::now();
    let requests = h2load(proxy.addr, http1, connections, streams, args.secs())?;
    let wall_secs = started.elapsed().as_secs_f64();
    let cpu_secs = proxy.cpu_seconds()? - cpu_before;
    eprintln!(
        "{} {}: {requests} requests, {cpu_secs:.2} CPU-s, {wall_secs:.2} s",
        proxy.name,
        if http1 { "http/1.1" } else { "h2c" }
    );
    Ok(MaxRun {
        requests,
        cpu_secs,
        wall_secs,
    })
}

/// The fixed-rate run's figures.
#[derive(Debug, Clone)]
pub(crate) struct RateRun {
    latency: Latency,
    cores: f64,
    rss: u64,
}

fn rate_run(proxy: &Proxy, args: &Args) -> Result<RateRun> {
    let open = || -> Result<Vec<TcpStream>> {
        (0..args.rate_connections.max(1))
            .map(|_| connect_http(proxy.addr).map_err(anyhow::Error::from))
            .collect()
    };
    fixed_rate_over(open()?, args.rate, 1, get)?;
    let conns = open()?;
    let cpu_before = proxy.cpu_seconds()?;
    let started = Instant::now();
    let (samples, errors) = fixed_rate_over(conns, args.rate, args.rate_secs(), get)?;
    let wall = started.elapsed().as_secs_f64();
    let cores = (proxy.cpu_seconds()? - cpu_before) / wall;
    let rss = rss_bytes(proxy.pid())?;
    eprintln!(
        "{} at {} req/s: {} samples, {errors} errors, {cores:.3} cores",
        proxy.name,
        args.rate,
        samples.len()
    );
    Ok(RateRun {
        latency: Latency::from_samples(samples, errors),
        cores,
        rss,
    })
}

fn connect_http(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(conn)
}

/// One `GET /bench/items` on a keep-alive connection; reads the whole response and fails unless
/// it is a 200 with the 1 KiB body.
fn get(conn: &mut TcpStream) -> std::io::Result<()> {
    let request = format!(
        "GET {LOAD_PATH} HTTP/1.1\r\nhost: echo\r\n{}: {}\r\n\r\n",
        LOAD_HEADER.0, LOAD_HEADER.1
    );
    conn.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(&mut *conn);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let mut length = None;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let length = length.ok_or_else(|| std::io::Error::other("response without content-length"))?;
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    if !reader.buffer().is_empty() {
        return Err(std::io::Error::other("bytes after the response"));
    }
    if status.split(' ').nth(1) == Some("200") && length == RESPONSE_BYTES {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("status line {status:?}")))
    }
}

// === the scenario ===

/// One proxy's figures.
#[derive(Debug, Clone)]
pub(crate) struct ProxyResult {
    h1: MaxRun,
    h2: MaxRun,
    rate: RateRun,
    rss_peak: u64,
}

impl ProxyResult {
    fn json(&self) -> Value {
        json!({
            "http1": self.h1.json(), "h2c": self.h2.json(),
            "fixed_rate": {"cores": self.rate.cores, "rss_bytes": self.rate.rss,
                           "latency": self.rate.latency.json()},
            "rss_peak_bytes": self.rss_peak,
        })
    }
}

/// The scenario's result.
#[derive(Debug, Clone)]
pub(crate) struct EngineResult {
    args: Args,
    waypoint: ProxyResult,
    envoy: Option<ProxyResult>,
    envoy_version: String,
}

impl EngineResult {
    fn ratio(&self, h1: bool) -> f64 {
        let pick = |p: &ProxyResult| if h1 { p.h1.per_core() } else { p.h2.per_core() };
        self.envoy
            .as_ref()
            .map_or(f64::NAN, |e| pick(&self.waypoint) / pick(e))
    }
}

/// Runs the scenario; scratch files go to `dir`.
pub(crate) fn run(args: &Args, dir: &Path) -> Result<EngineResult> {
    if !routes_in_precedence() {
        bail!("ROUTES is not in Gateway API precedence order");
    }
    which("h2load")
        .context("h2load not found (Debian nghttp2-client): run scripts/install-deps")?;
    let envoy_exe = if args.waypoint_only {
        None
    } else {
        Some(find_envoy(args)?)
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let upstream_port = free_port()?;
    start_upstream(
        BACKENDS
            .iter()
            .map(|(_, _, ip)| SocketAddr::new(IpAddr::from(*ip), upstream_port))
            .collect(),
    )?;
    let envoy_version = match &envoy_exe {
        Some(exe) => Command::new(exe)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default(),
        None => String::new(),
    };
    let waypoint = start_waypoint(args, dir, upstream_port)?;
    eprintln!("waypoint pid {} on {}", waypoint.pid(), waypoint.addr);
    let envoy = match envoy_exe {
        Some(_) => {
            let e = start_envoy(args, dir, upstream_port)?;
            eprintln!("envoy pid {} on {}", e.pid(), e.addr);
            Some(e)
        }
        None => None,
    };
    // Alternate the proxies, and which goes first, so drift on the shared machine hits both
    // alike; keep every round and report the median one.
    let mut runs: [[Vec<MaxRun>; 2]; 2] = Default::default();
    for round in 0..args.rounds() {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for http1 in [true, false] {
            for p in order {
                let proxy = if p == 0 {
                    Some(&waypoint)
                } else {
                    envoy.as_ref()
                };
                if let Some(proxy) = proxy {
                    runs[p][usize::from(!http1)].push(max_run(proxy, args, http1)?);
                }
            }
        }
    }
    let waypoint_rate = rate_run(&waypoint, args)?;
    let envoy_rate = envoy.as_ref().map(|e| rate_run(e, args)).transpose()?;
    let [[w1, w2], [e1, e2]] = runs.map(|per_protocol| per_protocol.map(median_run));
    let waypoint_result = ProxyResult {
        h1: w1,
        h2: w2,
        rate: waypoint_rate,
        rss_peak: crate::procfs::peak_rss_bytes(waypoint.pid())?,
    };
    let envoy_result = match (&envoy, envoy_rate) {
        (Some(e), Some(rate)) => Some(ProxyResult {
            h1: e1,
            h2: e2,
            rate,
            rss_peak: crate::procfs::peak_rss_bytes(e.pid())?,
        }),
        _ => None,
    };
    Ok(EngineResult {
        args: args.clone(),
        waypoint: waypoint_result,
        envoy: envoy_result,
        envoy_version,
    })
}

/// Prints the Markdown tables to stdout.
pub(crate) fn print(result: &EngineResult) {
    let a = &result.args;
    let w = &result.waypoint;
    println!(
        "## weft-bench engine: the waypoint's HTTP stack vs Envoy as an HTTP router (same routes)"
    );
    println!();
    println!(
        "Loopback, 1 worker each, {} route entries + 1 L7 ALLOW policy (RBAC in Envoy), upstream \
         1 KiB (in-process hyper, CPU not counted), access log on in both. The waypoint runs its \
         production request pipeline in `bench-serve` mode: **plain TCP in and out instead of \
         HBONE**. Closed loop: h2load, {} s, HTTP/1.1 {} connections, h2c {} × {} streams, {} \
         alternating round(s), the median round reported; requests/s per core = requests / \
         proxy CPU-seconds. Envoy: {}.",
        ROUTES.len(),
        a.secs(),
        a.h1_connections,
        a.h2_connections,
        a.h2_streams,
        a.rounds(),
        if result.envoy_version.is_empty() {
            "not run"
        } else {
            &result.envoy_version
        }
    );
    println!();
    println!("| figure | waypoint | Envoy | waypoint / Envoy | target | meets |");
    println!("|--------|---------:|------:|-----------------:|--------|:-----:|");
    let e = result.envoy.as_ref();
    let nan = f64::NAN;
    for (name, h1) in [("HTTP/1.1", true), ("h2c", false)] {
        let pick = |p: &ProxyResult| if h1 { p.h1.clone() } else { p.h2.clone() };
        let wr = pick(w);
        let er = e.map(pick).unwrap_or_default();
        let ratio = result.ratio(h1);
        println!(
            "| {name} requests/s per proxy core | {:.0} | {:.0} | {ratio:.2}× | ≥ 1.2× | {} |",
            wr.per_core(),
            if e.is_some() { er.per_core() } else { nan },
            yes_no(ratio >= 1.2)
        );
        println!(
            "| {name} requests / proxy CPU-s / wall requests/s | {} / {:.2} / {:.0} | {} / {:.2} / {:.0} | | | |",
            wr.requests,
            wr.cpu_secs,
            wr.requests as f64 / wr.wall_secs,
            er.requests,
            er.cpu_secs,
            er.requests as f64 / er.wall_secs,
        );
    }
    let er = e.map(|e| &e.rate);
    println!(
        "| CPU at {} req/s, cores | {:.3} | {:.3} | | waypoint ≤ 0.15 | {} |",
        a.rate,
        w.rate.cores,
        er.map_or(nan, |r| r.cores),
        yes_no(w.rate.cores <= 0.15)
    );
    println!(
        "| RSS after the fixed-rate run, MiB | {:.1} | {:.1} | | waypoint ≤ 25 MB | {} |",
        mib(w.rate.rss),
        er.map_or(nan, |r| mib(r.rss)),
        yes_no(w.rate.rss as f64 <= 25e6)
    );
    println!(
        "| peak RSS, MiB | {:.1} | {:.1} | | | |",
        mib(w.rss_peak),
        e.map_or(nan, |e| mib(e.rss_peak))
    );
    for (name, f) in [
        ("p50", (|l: &Latency| l.p50) as fn(&Latency) -> f64),
        ("p99", |l: &Latency| l.p99),
    ] {
        println!(
            "| latency {name} at {} req/s, ms | {:.3} | {:.3} | | | |",
            a.rate,
            f(&w.rate.latency),
            er.map_or(nan, |r| f(&r.latency))
        );
    }
    println!(
        "| fixed-rate samples / errors | {} / {} | {} / {} | | | |",
        w.rate.latency.samples,
        w.rate.latency.errors,
        er.map_or(0, |r| r.latency.samples),
        er.map_or(0, |r| r.latency.errors)
    );
    println!();
    println!("{}", crate::report::machine_line());
    if cfg!(debug_assertions) {
        println!("WARNING: debug build; run with --release for meaningful numbers");
    }
}

/// Writes the result as JSON to `dir/engine-<unix-timestamp>.json`.
///
/// # Errors
/// Creating the directory or writing the file.
pub(crate) fn write_json(result: &EngineResult, dir: &Path) -> Result<PathBuf> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("engine-{timestamp}.json"));
    let a = &result.args;
    let value = json!({
        "scenario": "engine",
        "timestamp": timestamp,
        "machine": crate::report::machine_json(),
        "parameters": {
            "secs": a.secs(), "rounds": a.rounds(), "h1_connections": a.h1_connections,
            "h2_connections": a.h2_connections, "h2_streams": a.h2_streams,
            "rate": a.rate, "rate_connections": a.rate_connections, "rate_secs": a.rate_secs(),
            "routes": ROUTES.len(), "response_bytes": RESPONSE_BYTES, "load_path": LOAD_PATH,
            "waypoint_transport": "plain tcp in and out (bench-serve), not HBONE",
            "envoy_version": result.envoy_version,
        },
        "waypoint": result.waypoint.json(),
        "envoy": result.envoy.as_ref().map(ProxyResult::json),
        "ratio_per_core": {"http1": result.ratio(true), "h2c": result.ratio(false)},
        "waypoint_over_envoy": result.ratio(true).min(result.ratio(false)),
    });
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_table_renders_for_both_proxies() {
        assert!(routes_in_precedence());
        let config = service_config();
        assert_eq!(config.ports[0].routes.len(), ROUTES.len());
        let envoy = envoy_bootstrap("127.0.0.1:1".parse().unwrap(), 2, 3, Path::new("/dev/null"));
        let routes = &envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"][0]["routes"];
        assert_eq!(routes.as_array().unwrap().len(), ROUTES.len());
        assert_eq!(
            routes[1]["route"]["weighted_clusters"]["clusters"][1]["weight"],
            50
        );
        let bytes = waypoint_resources(8080);
        let mut buf = bytes.as_slice();
        let mut types = Vec::new();
        while !buf.is_empty() {
            types.push(
                DeltaDiscoveryResponse::decode_length_delimited(&mut buf)
                    .unwrap()
                    .type_url,
            );
        }
        assert_eq!(
            types,
            [ADDRESS_TYPE_URL, L7_SERVICE_TYPE_URL, L7_POLICY_TYPE_URL]
        );
    }

    #[test]
    fn h2load_summary() {
        let ok = "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout\n\
                  status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        assert_eq!(parse_h2load(ok).unwrap(), 100);
        let denied = "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout\n\
                      status codes: 0 2xx, 0 3xx, 100 4xx, 0 5xx\n";
        assert!(parse_h2load(denied).is_err());
    }
}
