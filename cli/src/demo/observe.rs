//! What the demo observes: the clients' replies and the proxies' own telemetry (the
//! destination ztunnels' `istio_tcp_connections_opened_total`, the waypoint's
//! `istio_requests_total`), read before and after each batch of requests.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::cluster::{Cluster, Object};
use crate::inspect;

use super::REQUESTS;

/// Connections the destination ztunnels counted, by (principal, security policy, flags).
pub(super) type Counts = BTreeMap<(String, String, String), u64>;

/// One `label="value"` set and value of a Prometheus text line.
pub(super) fn parse_line(line: &str) -> Option<(BTreeMap<&str, &str>, u64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let labels = head.split_once('{')?.1.strip_suffix('}')?;
    let mut map = BTreeMap::new();
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let end = after.find('"')?;
        map.insert(key.trim_start_matches(','), &after[..end]);
        rest = &after[end + 1..];
    }
    Some((map, value.parse::<f64>().ok()? as u64))
}

pub(super) fn destination_counts(cluster: &Cluster) -> Result<Counts> {
    let mut counts = Counts::new();
    for node in 1..=cluster.description().nodes {
        let (netns_name, address) = cluster.ztunnel_metrics(node)?;
        let (_, text) = inspect::http_get_in(&netns_name, address, "/metrics")?;
        for line in text.lines() {
            if !line.starts_with("istio_tcp_connections_opened_total{") {
                continue;
            }
            let Some((labels, value)) = parse_line(line) else {
                continue;
            };
            if labels.get("reporter") != Some(&"destination") {
                continue;
            }
            let get = |k: &str| labels.get(k).copied().unwrap_or_default().to_owned();
            *counts
                .entry((
                    get("source_principal"),
                    get("connection_security_policy"),
                    get("response_flags"),
                ))
                .or_default() += value;
        }
    }
    Ok(counts)
}

/// What one batch of requests from a pod did.
#[derive(Debug, Clone, Default)]
pub(super) struct Observed {
    pub(super) answered: usize,
    pub(super) sent: usize,
    pub(super) servers: BTreeSet<String>,
    pub(super) sources: BTreeSet<String>,
    /// New destination-side connections: (principal, policy, flags) → count.
    pub(super) mesh: Counts,
}

impl Observed {
    pub(super) fn all_answered(&self) -> bool {
        self.sent > 0 && self.answered == self.sent
    }

    pub(super) fn none_answered(&self) -> bool {
        self.answered == 0
    }

    pub(super) fn mtls_principals(&self, flags: &str) -> BTreeSet<&str> {
        self.mesh
            .iter()
            .filter(|((_, policy, f), n)| policy == "mutual_tls" && f == flags && **n > 0)
            .map(|((p, _, _), _)| p.as_str())
            .collect()
    }

    pub(super) fn counted(&self, policy: &str, flags: &str) -> bool {
        self.mesh
            .iter()
            .any(|((_, p, f), n)| p == policy && f == flags && *n > 0)
    }
}

pub(super) fn observe(cluster: &Cluster, ns: &str, pod: &str, url: &str) -> Result<Observed> {
    let before = destination_counts(cluster)?;
    let out = cluster.echo_client(ns, pod, url, REQUESTS)?;
    let mut observed = Observed::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(reply) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        observed.sent += 1;
        if reply["status"] == 200 {
            observed.answered += 1;
            if let Some(server) = reply["pod"].as_str() {
                observed.servers.insert(server.to_owned());
            }
            if let Some(source) = reply["source"].as_str() {
                let ip = source.rsplit_once(':').map_or(source, |(ip, _)| ip);
                observed.sources.insert(ip.to_owned());
            }
        }
    }
    // The destination side counts a connection when it opens; give the counters a moment.
    std::thread::sleep(Duration::from_millis(200));
    let after = destination_counts(cluster)?;
    for (key, n) in after {
        let delta = n.saturating_sub(before.get(&key).copied().unwrap_or(0));
        if delta > 0 {
            observed.mesh.insert(key, delta);
        }
    }
    Ok(observed)
}

/// The pod name, IP and node of each pod of `ns`.
pub(super) struct Pods(BTreeMap<String, (String, String)>);

impl Pods {
    pub(super) fn of(cluster: &Cluster, ns: &str) -> Result<Pods> {
        Ok(Pods(
            cluster
                .pods(Some(ns))?
                .iter()
                .map(|p| {
                    (
                        p.name().to_owned(),
                        (
                            p.0["status"]["podIP"].as_str().unwrap_or("-").to_owned(),
                            p.0["spec"]["nodeName"].as_str().unwrap_or("-").to_owned(),
                        ),
                    )
                })
                .collect(),
        ))
    }

    pub(super) fn ip(&self, pod: &str) -> &str {
        self.0.get(pod).map_or("-", |(ip, _)| ip.as_str())
    }

    pub(super) fn node(&self, pod: &str) -> &str {
        self.0.get(pod).map_or("-", |(_, node)| node.as_str())
    }
}

/// Requests the waypoint counted (`istio_requests_total{reporter="waypoint"}`), by (source
/// principal, destination service, response code).
pub(super) type RequestCounts = BTreeMap<(String, String, String), u64>;

/// The waypoint pod's request counters, read from its metrics endpoint (pod IP, port 15020)
/// inside the pod's network namespace.
pub(super) fn waypoint_counts(cluster: &Cluster, waypoint: &Object) -> Result<RequestCounts> {
    let uid = waypoint.uid().context("the waypoint pod has no uid")?;
    let ip: std::net::IpAddr = waypoint.0["status"]["podIP"]
        .as_str()
        .context("the waypoint pod has no IP")?
        .parse()
        .context("the waypoint pod's IP")?;
    let (_, text) = inspect::http_get_in(
        &cluster.layout().pod_netns(uid),
        std::net::SocketAddr::new(ip, 15020),
        "/metrics",
    )?;
    let mut counts = RequestCounts::new();
    for line in text.lines() {
        if !line.starts_with("istio_requests_total{") {
            continue;
        }
        let Some((labels, value)) = parse_line(line) else {
            continue;
        };
        if labels.get("reporter") != Some(&"waypoint") {
            continue;
        }
        let get = |k: &str| labels.get(k).copied().unwrap_or_default().to_owned();
        *counts
            .entry((
                get("source_principal"),
                get("destination_service"),
                get("response_code"),
            ))
            .or_default() += value;
    }
    Ok(counts)
}

/// What grew from `before` to `after`.
pub(super) fn grown(before: &RequestCounts, after: &RequestCounts) -> RequestCounts {
    after
        .iter()
        .filter_map(|(key, n)| {
            let delta = n.saturating_sub(before.get(key).copied().unwrap_or(0));
            (delta > 0).then(|| (key.clone(), delta))
        })
        .collect()
}

/// One HTTP request's outcome as `weft-echo client` prints it (a JSON line).
#[derive(Debug, Clone)]
pub(super) struct Reply {
    /// HTTP status; 0 when the request failed (refused, reset, timed out).
    pub(super) status: u64,
    /// The pod that answered (weft-echo's `pod`), when a weft-echo server did.
    pub(super) pod: Option<String>,
    /// The response body when it was text (the waypoint's `RBAC: access denied`).
    pub(super) body: Option<String>,
}

/// `count` requests from `ns/pod` to `url` with extra `weft-echo client` flags (`-H …`), 16 at
/// a time, each on its own connection.
pub(super) fn echo_requests(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    url: &str,
    count: u32,
    extra: &[&str],
) -> Result<Vec<Reply>> {
    let count = count.to_string();
    let mut argv = vec![
        "weft-echo",
        "client",
        url,
        "--count",
        &count,
        "--concurrency",
        "16",
        "--timeout-ms",
        "5000",
    ];
    argv.extend_from_slice(extra);
    let out = cluster.exec(ns, pod, &argv)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|reply| Reply {
            status: reply["status"].as_u64().unwrap_or(0),
            pod: reply["pod"].as_str().map(str::to_owned),
            body: reply["body"].as_str().map(str::to_owned),
        })
        .collect())
}
