//! The plugin configuration weft-cni receives on stdin (CNI spec §3 "Deriving execution
//! configuration"): the standard keys plus Weft's own.
//!
//! ```json
//! {
//!   "cniVersion": "1.1.0",
//!   "name": "k8s-pod-network",
//!   "type": "weft-cni",
//!   "agent_socket": "/var/run/weft-cni/cni-agent.sock",
//!   "agent_timeout_ms": 5000,
//!   "exclude_namespaces": ["kube-system"],
//!   "log_file": "/var/log/weft-cni.log",
//!   "prevResult": { "cniVersion": "1.1.0", "interfaces": [...], "ips": [...] }
//! }
//! ```
//!
//! Unknown keys (`runtimeConfig`, `args`, `cni.dev/*`, `cniVersions`, `ipam`, …) are ignored, as
//! chained plugins must tolerate what the runtime and conflist add. `type` is whatever the
//! conflist calls the binary and is not checked.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::error::Category;
use serde_json::{Map, Value};

use super::Error;
use super::agent::DEFAULT_AGENT_SOCKET;
use super::version::Version;

/// Default `agent_timeout_ms`: 5000 ms.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_millis(5000);

/// Default `exclude_namespaces`.
pub const DEFAULT_EXCLUDE_NAMESPACES: &[&str] = &["kube-system"];

/// One invalid field of the network config; several are reported together in
/// [`Error::InvalidConfig`] (CNI code 7).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigProblem {
    /// The JSON key.
    pub field: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

/// The validated plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `cniVersion`: the spec version of this invocation; results are written in it.
    pub cni_version: Version,
    /// `name`: the network name, when given.
    pub name: Option<String>,
    /// `type`: the binary name the runtime used, when given.
    pub plugin_type: Option<String>,
    /// `agent_socket`: the node agent's unix socket. Default [`DEFAULT_AGENT_SOCKET`].
    pub agent_socket: PathBuf,
    /// `agent_timeout_ms`: deadline for one whole agent exchange (connect + request + reply),
    /// in milliseconds on the wire, > 0. Default [`DEFAULT_AGENT_TIMEOUT`] (5000 ms). Keep it
    /// well below the runtime's CNI timeout.
    pub agent_timeout: Duration,
    /// `exclude_namespaces`: pods in these namespaces are passed through without asking the agent.
    /// Default [`DEFAULT_EXCLUDE_NAMESPACES`]. Exact names, no patterns.
    pub exclude_namespaces: Vec<String>,
    /// `log_file`: append the plugin's log here instead of stderr, when set.
    pub log_file: Option<PathBuf>,
    /// `prevResult`: the result of the previous plugin in the chain (a JSON object), if any.
    pub prev_result: Option<Map<String, Value>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cni_version: Version::LATEST,
            name: None,
            plugin_type: None,
            agent_socket: PathBuf::from(DEFAULT_AGENT_SOCKET),
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            exclude_namespaces: DEFAULT_EXCLUDE_NAMESPACES
                .iter()
                .map(|&s| s.into())
                .collect(),
            log_file: None,
            prev_result: None,
        }
    }
}

/// The keys weft-cni reads; everything else is ignored.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    agent_socket: Option<PathBuf>,
    agent_timeout_ms: Option<u64>,
    exclude_namespaces: Option<Vec<String>>,
    log_file: Option<PathBuf>,
}

/// Only `cniVersion`, read leniently to pick the version of an error reply.
#[derive(Deserialize)]
struct VersionPeek {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
}

/// The `cniVersion` string of `stdin`, if it is a JSON object carrying one (any value, even an
/// unsupported one); `None` otherwise. Never fails.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<VersionPeek>(stdin)
        .ok()?
        .cni_version
}

/// Maps a serde error on network config input to its CNI code: syntax errors are "failed to
/// decode content" (6); a well-formed document with a wrongly typed key is "invalid network
/// config" (7). Both keep serde's line/column.
pub(crate) fn decode_error(e: serde_json::Error) -> Error {
    match e.classify() {
        Category::Data => Error::ConfigShape(e),
        Category::Io | Category::Syntax | Category::Eof => Error::Decode(e),
    }
}

impl Config {
    /// Decodes and validates the plugin configuration.
    ///
    /// Errors, in the order they are checked: [`Error::Decode`] (6) for malformed JSON,
    /// [`Error::ConfigShape`] (7) for a key of the wrong type, [`Error::MissingVersion`] /
    /// [`Error::UnsupportedVersion`] (1) unless `cniVersion` is `1.0.0` or `1.1.0`, then
    /// [`Error::InvalidConfig`] (7) listing every bad Weft key.
    pub fn from_json(stdin: &[u8]) -> Result<Config, Error> {
        let raw: RawConfig = serde_json::from_slice(stdin).map_err(decode_error)?;
        let cni_version = match raw.cni_version.as_deref() {
            None | Some("") => return Err(Error::MissingVersion),
            Some(v) => Version::parse(v).ok_or_else(|| Error::UnsupportedVersion {
                requested: v.to_owned(),
            })?,
        };

        let mut problems = Vec::new();
        let defaults = Config::default();
        let agent_socket = match raw.agent_socket {
            Some(p) if p.as_os_str().is_empty() => {
                problems.push(problem("agent_socket", "must not be empty"));
                defaults.agent_socket
            }
            Some(p) => p,
            None => defaults.agent_socket,
        };
        let agent_timeout = match raw.agent_timeout_ms {
            Some(0) => {
                problems.push(problem("agent_timeout_ms", "must be greater than 0"));
                defaults.agent_timeout
            }
            Some(ms) => Duration::from_millis(ms),
            None => defaults.agent_timeout,
        };
        let exclude_namespaces = match raw.exclude_namespaces {
            Some(list) => {
                if list.iter().any(String::is_empty) {
                    problems.push(problem(
                        "exclude_namespaces",
                        "must not contain empty names",
                    ));
                }
                list
            }
            None => defaults.exclude_namespaces,
        };
        let log_file = match raw.log_file {
            Some(p) if p.as_os_str().is_empty() => None,
            other => other,
        };
        let prev_result = match raw.prev_result {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => {
                problems.push(problem(
                    "prevResult",
                    "must be a JSON object (a CNI result)",
                ));
                None
            }
        };
        if !problems.is_empty() {
            return Err(Error::InvalidConfig(problems));
        }
        Ok(Config {
            cni_version,
            name: raw.name,
            plugin_type: raw.plugin_type,
            agent_socket,
            agent_timeout,
            exclude_namespaces,
            log_file,
            prev_result,
        })
    }

    /// Whether pods in `namespace` are passed through without asking the agent.
    pub fn is_excluded(&self, namespace: &str) -> bool {
        self.exclude_namespaces.iter().any(|n| n == namespace)
    }
}

fn problem(field: &'static str, reason: &str) -> ConfigProblem {
    ConfigProblem {
        field,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply() {
        let config = Config::from_json(br#"{"cniVersion":"1.0.0","name":"net","type":"whatever"}"#)
            .expect("valid");
        assert_eq!(config.cni_version, Version::V1_0_0);
        assert_eq!(
            config.agent_socket,
            PathBuf::from("/var/run/weft-cni/cni-agent.sock")
        );
        assert_eq!(config.agent_timeout, Duration::from_millis(5000));
        assert_eq!(config.exclude_namespaces, vec!["kube-system".to_owned()]);
        assert_eq!(config.log_file, None);
        assert_eq!(config.prev_result, None);
        assert_eq!(config.plugin_type.as_deref(), Some("whatever"));
    }

    #[test]
    fn weft_keys_and_unknown_keys() {
        let config = Config::from_json(
            br#"{"cniVersion":"1.1.0","name":"net","type":"weft-cni",
                 "agent_socket":"/tmp/a.sock","agent_timeout_ms":250,
                 "exclude_namespaces":["kube-system","weft-system"],"log_file":"/tmp/cni.log",
                 "runtimeConfig":{"portMappings":[]},"cniVersions":["1.0.0","1.1.0"],
                 "cni.dev/valid-attachments":[],"prevResult":{"cniVersion":"1.1.0"}}"#,
        )
        .expect("valid");
        assert_eq!(config.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(config.agent_timeout, Duration::from_millis(250));
        assert!(config.is_excluded("weft-system"));
        assert!(!config.is_excluded("default"));
        assert_eq!(config.log_file, Some(PathBuf::from("/tmp/cni.log")));
        assert!(config.prev_result.is_some());
    }

    #[test]
    fn error_classification() {
        let code = |input: &str| {
            Config::from_json(input.as_bytes())
                .map(|_| ())
                .map_err(|e| e.code())
        };
        assert_eq!(code("{"), Err(6));
        assert_eq!(code(""), Err(6));
        assert_eq!(code("not json"), Err(6));
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","agent_timeout_ms":"soon"}"#),
            Err(7)
        );
        assert_eq!(code("42"), Err(7));
        assert_eq!(code(r#"{"name":"net"}"#), Err(1));
        assert_eq!(code(r#"{"cniVersion":"0.3.1"}"#), Err(1));
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","agent_timeout_ms":0}"#),
            Err(7)
        );
        assert_eq!(code(r#"{"cniVersion":"1.0.0","prevResult":[]}"#), Err(7));
        assert_eq!(code(r#"{"cniVersion":"1.0.0","prevResult":null}"#), Ok(()));
    }

    #[test]
    fn every_bad_key_is_reported() {
        let err = Config::from_json(
            br#"{"cniVersion":"1.0.0","agent_socket":"","agent_timeout_ms":0,
                 "exclude_namespaces":[""],"prevResult":"x"}"#,
        )
        .expect_err("invalid");
        let Error::InvalidConfig(problems) = err else {
            panic!("expected InvalidConfig, got {err:?}");
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            [
                "agent_socket",
                "agent_timeout_ms",
                "exclude_namespaces",
                "prevResult"
            ]
        );
    }

    #[test]
    fn peek_version_is_lenient() {
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.3.1"}"#).as_deref(),
            Some("0.3.1")
        );
        assert_eq!(peek_version(b"{"), None);
        assert_eq!(peek_version(b""), None);
    }
}
