//! Results: reading `prevResult`, passing it through, and what the plugin writes to stdout.
//!
//! weft-cni never changes the pod's interfaces, so on `ADD` it outputs the `prevResult` it was
//! given (CNI spec §5 "Success": "If a plugin makes no changes that would be reflected in the
//! Success result type, then it must output a result equivalent to the provided `prevResult`"),
//! with `cniVersion` set to the invocation's version. 1.0.0 and 1.1.0 results share one shape,
//! so relabelling between them is a valid conversion; older result versions are refused.

use std::io::{self, Write};
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::Error;
use super::version::{Version, VersionInfo};

/// What a successful invocation prints on stdout.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// `ADD`: the Success result (the passed-through `prevResult`).
    Result(Map<String, Value>),
    /// `VERSION`: the version result.
    Version(VersionInfo),
    /// `DEL`, `CHECK`, `STATUS`, `GC`: nothing.
    Empty,
}

impl Output {
    /// Writes the result as one JSON document plus a newline; nothing for [`Output::Empty`].
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        match self {
            Output::Result(map) => serde_json::to_writer(&mut out, map)?,
            Output::Version(info) => serde_json::to_writer(&mut out, info)?,
            Output::Empty => return Ok(()),
        }
        out.write_all(b"\n")?;
        out.flush()
    }
}

/// The parts of a CNI 1.x Success result weft-cni reads (CNI spec §5); the rest is kept as is.
#[derive(Deserialize)]
struct ResultView {
    #[serde(default)]
    interfaces: Vec<InterfaceView>,
    #[serde(default)]
    ips: Vec<IpView>,
}

#[derive(Deserialize)]
struct InterfaceView {
    /// The netns path for sandbox interfaces; empty/absent for host interfaces.
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct IpView {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

/// The pod's addresses in `prev`: every `ips[].address` (CIDR; a bare address is accepted)
/// whose `interface` index is absent, out of range, or names an interface with a non-empty
/// `sandbox`. Addresses on host-side interfaces (empty `sandbox`) are skipped. Order is kept,
/// duplicates dropped.
///
/// Errors: [`Error::PrevResultShape`] when `interfaces`/`ips` do not have the result shape,
/// [`Error::PrevResultAddress`] when an address does not parse (both CNI code 7).
pub fn pod_ips(prev: &Map<String, Value>) -> Result<Vec<IpAddr>, Error> {
    let view =
        ResultView::deserialize(Value::Object(prev.clone())).map_err(Error::PrevResultShape)?;
    let mut ips = Vec::new();
    for (index, ip) in view.ips.iter().enumerate() {
        let on_host = ip
            .interface
            .and_then(|i| view.interfaces.get(i))
            .is_some_and(|iface| iface.sandbox.as_deref().unwrap_or("").is_empty());
        if on_host {
            continue;
        }
        let addr = parse_cidr_address(&ip.address).ok_or_else(|| Error::PrevResultAddress {
            index,
            address: ip.address.clone(),
        })?;
        if !ips.contains(&addr) {
            ips.push(addr);
        }
    }
    Ok(ips)
}

/// The address part of `a.b.c.d/len` or `x::y/len` (the prefix length must be in range); a bare
/// address is accepted too.
fn parse_cidr_address(cidr: &str) -> Option<IpAddr> {
    let (addr, prefix) = match cidr.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (cidr, None),
    };
    let addr: IpAddr = addr.parse().ok()?;
    if let Some(prefix) = prefix {
        let len: u8 = prefix.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
    }
    Some(addr)
}

/// `prev` as this plugin's Success result for `version`: unchanged except that `cniVersion` is
/// set to `version` (inserted if missing; a 1.0.0/1.1.0 label is relabelled).
///
/// Errors: [`Error::PrevResultVersion`] (1) when `prev` is labelled with another spec version,
/// whose result shape differs; [`Error::PrevResultShape`]-like problems are not checked here.
pub fn pass_through(
    prev: &Map<String, Value>,
    version: Version,
) -> Result<Map<String, Value>, Error> {
    let mut result = prev.clone();
    match prev.get("cniVersion") {
        None => {}
        Some(Value::String(v)) if Version::parse(v).is_some() => {}
        Some(other) => {
            let found = other
                .as_str()
                .map_or_else(|| other.to_string(), str::to_owned);
            return Err(Error::PrevResultVersion { found });
        }
    }
    result.insert(
        "cniVersion".to_owned(),
        Value::String(version.as_str().to_owned()),
    );
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn pod_ips_table() {
        let cases: Vec<(Value, Result<Vec<&str>, ()>)> = vec![
            (json!({}), Ok(vec![])),
            (json!({"ips": []}), Ok(vec![])),
            (
                // Typical bridge result: host bridge, host veth, pod eth0.
                json!({
                    "interfaces": [
                        {"name": "cni0", "mac": "00:11:22:33:44:55"},
                        {"name": "veth1", "sandbox": ""},
                        {"name": "eth0", "sandbox": "/var/run/netns/blue"}
                    ],
                    "ips": [
                        {"address": "10.1.0.1/16", "interface": 0},
                        {"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2},
                        {"address": "fd00::5/64", "interface": 2}
                    ]
                }),
                Ok(vec!["10.1.0.5", "fd00::5"]),
            ),
            // No interface index, or one out of range: cannot prove it is on the host; keep it.
            (
                json!({"ips": [{"address": "10.0.0.7/24"}]}),
                Ok(vec!["10.0.0.7"]),
            ),
            (
                json!({"ips": [{"address": "10.0.0.7/24", "interface": 9}]}),
                Ok(vec!["10.0.0.7"]),
            ),
            (
                json!({"ips": [{"address": "10.0.0.7"}, {"address": "10.0.0.7/32"}]}),
                Ok(vec!["10.0.0.7"]),
            ),
            (json!({"ips": [{"address": "10.0.0.7/33"}]}), Err(())),
            (json!({"ips": [{"address": "pod-ip"}]}), Err(())),
            (json!({"ips": [{"gateway": "10.0.0.1"}]}), Err(())),
            (json!({"ips": "10.0.0.7"}), Err(())),
        ];
        for (prev, want) in cases {
            let got = pod_ips(&map(prev.clone()))
                .map(|ips| ips.iter().map(ToString::to_string).collect::<Vec<_>>())
                .map_err(|_| ());
            let want = want.map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>());
            assert_eq!(got, want, "prevResult {prev}");
        }
    }

    #[test]
    fn pass_through_sets_version_only() {
        let prev = map(json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.7/24"}], "x": 1}));
        let out = pass_through(&prev, Version::V1_0_0).expect("same version");
        assert_eq!(out, prev);
        let out = pass_through(&prev, Version::V1_1_0).expect("relabel");
        assert_eq!(out.get("cniVersion"), Some(&json!("1.1.0")));
        assert_eq!(out.get("ips"), prev.get("ips"));
        let bare = map(json!({"ips": []}));
        assert_eq!(
            pass_through(&bare, Version::V1_0_0)
                .expect("insert")
                .get("cniVersion"),
            Some(&json!("1.0.0"))
        );
        let old = map(json!({"cniVersion": "0.4.0"}));
        assert!(matches!(
            pass_through(&old, Version::V1_0_0),
            Err(Error::PrevResultVersion { .. })
        ));
    }

    #[test]
    fn empty_output_writes_nothing() {
        let mut buf = Vec::new();
        Output::Empty.write_to(&mut buf).expect("write");
        assert!(buf.is_empty());
        Output::Version(VersionInfo::answer(None))
            .write_to(&mut buf)
            .expect("write");
        assert!(buf.ends_with(b"\n"));
    }
}
