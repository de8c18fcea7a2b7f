//! Looking inside a running local cluster's mesh: `weft ztunnel-config …` (each node's ztunnel
//! admin endpoint, `GET /config_dump` on 127.0.0.1:15000 inside ztunnel's network namespace:
//! its DaemonSet pod's, or the node's in a process cluster) and `weft proxy-status` (the
//! controller's xDS clients, `GET /debug/connections` on its debug port 15014, inside its pod's
//! namespace, or the control-plane namespace).
//!
//! Each command yields a [`Report`]: rows for the default table, and the JSON it came from for
//! `-o json|yaml`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{Cluster, layout, netns};

/// ztunnel's admin address inside a node's network namespace.
pub const ZTUNNEL_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);

/// Errors reading an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint could not be reached or answered with an error.
    #[error("{what}: {message}")]
    Endpoint {
        /// Which endpoint.
        what: String,
        /// Why.
        message: String,
    },
    /// No such node.
    #[error("node-{0} is not a node of this cluster (it has {1})")]
    NoSuchNode(u8, u8),
}

/// A section of ztunnel's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Workloads known from xDS.
    Workloads,
    /// Services known from xDS.
    Services,
    /// Authorization policies known from xDS.
    Policies,
    /// Workload certificates held for the node's pods.
    Certificates,
    /// Live connections: inbound with the facts they were authorized with, outbound with where
    /// they are carried.
    Connections,
    /// The node's enrolled pods and their proxies.
    Pods,
}

impl Section {
    fn key(self) -> &'static str {
        match self {
            Section::Workloads => "workloads",
            Section::Services => "services",
            Section::Policies => "policies",
            Section::Certificates => "certificates",
            Section::Connections => "connections",
            Section::Pods => "pods",
        }
    }
}

/// A table and the JSON it shows.
#[derive(Debug, Clone)]
pub struct Report {
    /// Column names.
    pub header: Vec<&'static str>,
    /// One row per item.
    pub rows: Vec<Vec<String>>,
    /// The items as JSON.
    pub json: Value,
}

impl Report {
    /// The report in `format`: `table`, `json` or `yaml`.
    ///
    /// # Errors
    /// An unknown format.
    pub fn render(&self, format: &str) -> Result<String, String> {
        match format {
            "table" => Ok(render_table(&self.header, &self.rows)),
            "json" => serde_json::to_string_pretty(&self.json).map_err(|e| e.to_string()),
            "yaml" => serde_yaml::to_string(&self.json).map_err(|e| e.to_string()),
            other => Err(format!(
                "unknown output format {other:?} (table, json or yaml)"
            )),
        }
    }
}

/// Columns padded to the widest cell, three spaces apart (as kubectl).
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i).map(String::len))
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("   ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// `GET path` on `addr` from inside network namespace `netns`: the status and body.
///
/// # Errors
/// [`Error::Endpoint`] when the namespace cannot be entered or the request fails.
pub fn http_get_in(netns_name: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), Error> {
    let what = format!("http://{addr}{path} in {netns_name}");
    let fail = |message: String| Error::Endpoint {
        what: what.clone(),
        message,
    };
    let path = path.to_owned();
    let text = netns::within(netns_name, move || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text)
    })
    .map_err(|e| fail(e.to_string()))?
    .map_err(|e| fail(e.to_string()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("malformed HTTP response".into()))?;
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail(format!("malformed status line {:?}", head.lines().next())))?;
    Ok((status, body.to_owned()))
}

fn get_json(netns_name: &str, addr: SocketAddr, path: &str) -> Result<Value, Error> {
    let (status, body) = http_get_in(netns_name, addr, path)?;
    let what = format!("http://{addr}{path} in {netns_name}");
    if status != 200 {
        return Err(Error::Endpoint {
            what,
            message: format!("status {status}: {}", body.trim()),
        });
    }
    serde_json::from_str(&body).map_err(|e| Error::Endpoint {
        what,
        message: format!("not JSON: {e}"),
    })
}

/// One node's `/config_dump`.
///
/// # Errors
/// [`Error`] when the node does not exist or its ztunnel does not answer.
pub fn config_dump(cluster: &Cluster, node: u8) -> Result<Value, Error> {
    let nodes = cluster.description().nodes;
    if !(1..=nodes).contains(&node) {
        return Err(Error::NoSuchNode(node, nodes));
    }
    let (netns_name, addr) = cluster.ztunnel_admin(node).map_err(|e| Error::Endpoint {
        what: format!("ztunnel on {}", layout::node_name(node)),
        message: e.to_string(),
    })?;
    get_json(&netns_name, addr, "/config_dump")
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(text).collect();
            if parts.is_empty() {
                "-".into()
            } else {
                parts.join(",")
            }
        }
        other => other.to_string(),
    }
}

/// `weft ztunnel-config SECTION [--node N]`: the section from every node's ztunnel (or one
/// node's), each item tagged with the reporting node (`ztunnel`, the NODE column).
///
/// # Errors
/// [`Error`] when a node's ztunnel does not answer.
pub fn ztunnel_config(
    cluster: &Cluster,
    section: Section,
    node: Option<u8>,
) -> Result<Report, Error> {
    let nodes: Vec<u8> = match node {
        Some(n) => vec![n],
        None => (1..=cluster.description().nodes).collect(),
    };
    let mut items = Vec::new();
    for n in nodes {
        let dump = config_dump(cluster, n)?;
        for mut item in dump[section.key()].as_array().cloned().unwrap_or_default() {
            item["ztunnel"] = Value::String(layout::node_name(n));
            items.push(item);
        }
    }
    let header: Vec<&'static str> = match section {
        Section::Workloads => vec![
            "NODE",
            "NAMESPACE",
            "NAME",
            "ADDRESS",
            "WORKLOAD-NODE",
            "PROTOCOL",
            "IDENTITY",
            "WAYPOINT",
        ],
        Section::Services => vec![
            "NODE",
            "NAMESPACE",
            "NAME",
            "VIPS",
            "PORTS",
            "ENDPOINTS",
            "WAYPOINT",
        ],
        Section::Policies => vec![
            "NODE",
            "NAMESPACE",
            "NAME",
            "ACTION",
            "SCOPE",
            "RULES",
            "DRY-RUN",
        ],
        Section::Certificates => vec!["NODE", "IDENTITY", "STATE", "EXPIRES", "LAST-ERROR"],
        Section::Connections => vec![
            "NODE",
            "DIRECTION",
            "SOURCE",
            "SOURCE-IDENTITY",
            "DESTINATION",
        ],
        Section::Pods => vec!["NODE", "POD", "STATE", "LAST-ERROR"],
    };
    // `/config_dump` items use these keys; the NODE column is added above.
    let keys: Vec<&str> = match section {
        Section::Workloads => vec![
            "namespace",
            "name",
            "addresses",
            "node",
            "protocol",
            "identity",
            "waypoint",
        ],
        Section::Services => vec![
            "namespace",
            "name",
            "vips",
            "ports",
            "endpoints",
            "waypoint",
        ],
        Section::Policies => vec!["namespace", "name", "action", "scope", "rules", "dry_run"],
        Section::Certificates => vec!["identity", "state", "expires", "last_error"],
        Section::Connections => vec![
            "direction",
            "source",
            "source_identity",
            "destination",
            "via",
        ],
        Section::Pods => vec!["name", "state", "last_error"],
    };
    let rows = items
        .iter_mut()
        .map(|item| {
            if section == Section::Connections {
                item["via"] = match (item["protocol"].as_str(), item["upstream"].as_str()) {
                    (Some(protocol), Some(upstream)) => {
                        Value::String(format!("{protocol} {upstream}"))
                    }
                    _ => Value::Null,
                };
            }
            if section == Section::Certificates {
                item["expires"] = item["expires_unix"]
                    .as_u64()
                    .and_then(|secs| {
                        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()
                    })
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .map_or(Value::Null, Value::String);
            }
            let mut row = vec![text(&item["ztunnel"])];
            row.extend(keys.iter().map(|k| text(&item[*k])));
            row
        })
        .collect();
    Ok(Report {
        header,
        rows,
        json: Value::Array(items),
    })
}

/// `weft proxy-status`: every xDS client of the controller, per type: what it has ACKed and
/// whether it is in sync.
///
/// # Errors
/// [`Error`] when the controller's debug endpoint does not answer.
pub fn proxy_status(cluster: &Cluster) -> Result<Report, Error> {
    let (netns_name, addr) = cluster.controller_debug().map_err(|e| Error::Endpoint {
        what: "the controller".into(),
        message: e.to_string(),
    })?;
    let connections = get_json(&netns_name, addr, "/debug/connections")?;
    Ok(proxy_status_report(connections))
}

/// What kind of proxy an xDS client is, from the types it subscribes to: `waypoint` when it
/// asks for the L7 types (`weft.l7.v1.ServiceConfig`, `weft.l7.v1.Policy`), `ztunnel` when it
/// asks for workload addresses or authorizations, else from its node id prefix
/// (`ztunnel~…`, `waypoint~…`), else `-`.
pub fn proxy_kind(connection: &Value) -> &'static str {
    let types = connection["types"].as_object();
    let has = |url: &str| types.is_some_and(|t| t.contains_key(url));
    let node_id = connection["node_id"].as_str().unwrap_or_default();
    if has(weft_proto::L7_SERVICE_TYPE_URL) || has(weft_proto::L7_POLICY_TYPE_URL) {
        "waypoint"
    } else if has(weft_proto::ADDRESS_TYPE_URL) || has(weft_proto::AUTHORIZATION_TYPE_URL) {
        "ztunnel"
    } else if node_id.starts_with("waypoint~") {
        "waypoint"
    } else if node_id.starts_with("ztunnel~") {
        "ztunnel"
    } else {
        "-"
    }
}

/// The `weft proxy-status` report from the controller's `/debug/connections` JSON: one row per
/// client and type URL (PROXY, KIND, CALLER, TYPE, ACKED, SYNC, LAST-NACK); each JSON item
/// gains a `kind` ([`proxy_kind`]).
pub fn proxy_status_report(mut connections: Value) -> Report {
    let mut rows = Vec::new();
    for c in connections.as_array_mut().into_iter().flatten() {
        let kind = proxy_kind(c);
        c["kind"] = Value::String(kind.to_owned());
        let types = c["types"].as_object().cloned().unwrap_or_default();
        for (type_url, t) in types {
            let short = type_url.rsplit('.').next().unwrap_or(&type_url).to_owned();
            let sync = if t["in_sync"] == true {
                "SYNCED".to_owned()
            } else if t["awaiting_ack"] == true {
                "STALE (awaiting ACK)".to_owned()
            } else {
                "NOT SENT".to_owned()
            };
            let nack = t["last_nack"]["message"]
                .as_str()
                .map_or_else(|| "-".to_owned(), str::to_owned);
            rows.push(vec![
                text(&c["node_id"]),
                kind.to_owned(),
                text(&c["caller"]),
                short,
                text(&t["acked_resources"]),
                sync,
                nack,
            ]);
        }
    }
    rows.sort();
    Report {
        header: vec![
            "PROXY",
            "KIND",
            "CALLER",
            "TYPE",
            "ACKED",
            "SYNC",
            "LAST-NACK",
        ],
        rows,
        json: connections,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_to_the_widest_cell() {
        let out = render_table(
            &["NAME", "IP"],
            &[
                vec!["a".into(), "10.0.0.1".into()],
                vec!["longer-name".into(), "-".into()],
            ],
        );
        assert_eq!(
            out,
            "NAME          IP\na             10.0.0.1\nlonger-name   -\n"
        );
    }

    #[test]
    fn cells_render_json_values() {
        assert_eq!(text(&Value::Null), "-");
        assert_eq!(text(&serde_json::json!("")), "-");
        assert_eq!(
            text(&serde_json::json!(["10.0.0.1", "fd00::1"])),
            "10.0.0.1,fd00::1"
        );
        assert_eq!(text(&serde_json::json!([])), "-");
        assert_eq!(text(&serde_json::json!(3)), "3");
        assert_eq!(text(&serde_json::json!(true)), "true");
    }

    #[test]
    fn proxy_status_tells_waypoints_from_ztunnels() {
        let connections = serde_json::json!([
            {
                "id": 2,
                "node_id": "waypoint~10.244.1.7~waypoint-abc.app~app.svc.cluster.local",
                "caller": "app/waypoint",
                "types": {
                    "type.googleapis.com/weft.l7.v1.ServiceConfig": {"acked_resources": 2, "in_sync": true, "awaiting_ack": false, "last_nack": null},
                    "type.googleapis.com/weft.l7.v1.Policy": {"acked_resources": 0, "in_sync": false, "awaiting_ack": true, "last_nack": {"message": "deny-all: bad rule"}},
                },
            },
            {
                "id": 1,
                "node_id": "ztunnel~10.240.0.11~ztunnel-node-1.istio-system~istio-system.svc.cluster.local",
                "caller": "istio-system/ztunnel",
                "types": {
                    "type.googleapis.com/istio.workload.Address": {"acked_resources": 9, "in_sync": true},
                },
            },
            {"id": 3, "node_id": "", "caller": "x/y", "types": {}},
        ]);
        let report = proxy_status_report(connections);
        assert_eq!(
            report.render("table").unwrap(),
            "\
PROXY                                                                            KIND       CALLER                 TYPE            ACKED   SYNC                   LAST-NACK
waypoint~10.244.1.7~waypoint-abc.app~app.svc.cluster.local                       waypoint   app/waypoint           Policy          0       STALE (awaiting ACK)   deny-all: bad rule
waypoint~10.244.1.7~waypoint-abc.app~app.svc.cluster.local                       waypoint   app/waypoint           ServiceConfig   2       SYNCED                 -
ztunnel~10.240.0.11~ztunnel-node-1.istio-system~istio-system.svc.cluster.local   ztunnel    istio-system/ztunnel   Address         9       SYNCED                 -
"
        );
        assert_eq!(report.json[0]["kind"], "waypoint");
        assert_eq!(report.json[1]["kind"], "ztunnel");
        assert_eq!(report.json[2]["kind"], "-");
        // Before it subscribes, the node id tells.
        assert_eq!(
            proxy_kind(
                &serde_json::json!({"node_id": "waypoint~1.2.3.4~w.ns~ns.svc.cluster.local"})
            ),
            "waypoint"
        );
    }

    #[test]
    fn reports_render_in_three_formats() {
        let report = Report {
            header: vec!["NAME"],
            rows: vec![vec!["x".into()]],
            json: serde_json::json!([{"name": "x"}]),
        };
        assert_eq!(report.render("table").unwrap(), "NAME\nx\n");
        assert!(report.render("json").unwrap().contains("\"name\": \"x\""));
        assert_eq!(report.render("yaml").unwrap(), "- name: x\n");
        assert_eq!(
            report.render("xml").unwrap_err(),
            "unknown output format \"xml\" (table, json or yaml)"
        );
    }
}
