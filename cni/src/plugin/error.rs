//! Plugin errors, their CNI error codes, and the Error result printed on stdout.
//!
//! CNI spec §5 "Error": on failure the plugin exits non-zero (weft-cni: 1) and prints
//! `{"cniVersion", "code", "msg", "details"}` on stdout. Codes 0–99 are the spec's well-known
//! codes (see [`code`]); weft-cni uses no plugin-specific codes. `msg` is the error with its
//! causes on one line; `details` adds what an operator should know (e.g. why ADD fails closed).

use std::error::Error as _;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::PathBuf;

use serde::Serialize;

use super::agent;
use super::config::ConfigProblem;
use super::env::{Command, EnvProblem};
use super::version::Version;

/// The CNI spec's well-known error codes weft-cni returns.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (e.g. reading stdin).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (transient condition).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// `STATUS`: the plugin is not available (cannot service `ADD`).
    pub const NOT_AVAILABLE: u32 = 50;
}

/// Why an invocation failed. Each variant maps to one CNI code ([`Error::code`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Required `CNI_*` variables are missing or invalid (code 4); all problems are listed.
    #[error("invalid CNI environment: {}", join(.0))]
    Env(Vec<EnvProblem>),
    /// `CNI_COMMAND` is not one of ADD, DEL, CHECK, VERSION, STATUS, GC (code 4).
    #[error("invalid CNI environment: CNI_COMMAND {:?} is not one of {}", .0, commands())]
    UnknownCommand(String),
    /// Reading the network config from stdin failed (code 5).
    #[error("cannot read the network config from stdin")]
    ReadStdin(#[source] io::Error),
    /// stdin is not well-formed JSON (code 6); the cause carries serde's line/column.
    #[error("cannot decode the network config")]
    Decode(#[source] serde_json::Error),
    /// A key of the network config has the wrong type (code 7).
    #[error("invalid network config")]
    ConfigShape(#[source] serde_json::Error),
    /// Weft keys of the network config have invalid values (code 7); all are listed.
    #[error("invalid network config: {}", join(.0))]
    InvalidConfig(Vec<ConfigProblem>),
    /// The network config has no `cniVersion` (code 1).
    #[error(
        "the network config has no cniVersion; supported versions: {}",
        Version::supported_list()
    )]
    MissingVersion,
    /// The network config's `cniVersion` is not supported (code 1).
    #[error(
        "incompatible CNI version {requested:?}; supported versions: {}",
        Version::supported_list()
    )]
    UnsupportedVersion {
        /// The version the config asked for.
        requested: String,
    },
    /// `STATUS`/`GC` under a config older than 1.1.0 (code 1).
    #[error("CNI {command} needs cniVersion 1.1.0 or later, the network config has {version}")]
    CommandNeedsNewerVersion {
        /// The command.
        command: Command,
        /// The config's version.
        version: Version,
    },
    /// `ADD`/`CHECK` without `prevResult` (code 7): weft-cni is a chained plugin.
    #[error(
        "weft-cni must be chained after an interface plugin: the network config has no prevResult"
    )]
    NotChained,
    /// `prevResult` is labelled with a spec version whose result shape weft-cni does not speak
    /// (code 1).
    #[error(
        "prevResult has incompatible cniVersion {found}; supported versions: {}",
        Version::supported_list()
    )]
    PrevResultVersion {
        /// The label found.
        found: String,
    },
    /// `prevResult.interfaces`/`ips` do not have the CNI result shape (code 7).
    #[error("invalid prevResult")]
    PrevResultShape(#[source] serde_json::Error),
    /// `prevResult.ips[index].address` is not an address in CIDR notation (code 7).
    #[error(
        "invalid prevResult: ips[{index}].address {address:?} is not an IP address in CIDR notation"
    )]
    PrevResultAddress {
        /// Index into `ips`.
        index: usize,
        /// The value found.
        address: String,
    },
    /// The node agent could not confirm `command` for the pod (code 11): unreachable, timed out,
    /// malformed reply, or an error reply. On ADD this is the fail-closed path.
    #[error("weft-cni-agent at {} did not confirm {}", socket.display(), command.as_str())]
    AgentUnconfirmed {
        /// The agent's socket.
        socket: PathBuf,
        /// The request that was not confirmed.
        command: agent::Command,
        /// What went wrong.
        #[source]
        cause: AgentFailure,
    },
    /// `CHECK`: the agent has no record of this pod (code 3).
    #[error("weft-cni-agent at {} does not know the container: {message}", socket.display())]
    UnknownContainer {
        /// The agent's socket.
        socket: PathBuf,
        /// The agent's message.
        message: String,
    },
    /// `STATUS`: the agent cannot service ADD right now (code 50).
    #[error("weft-cni-agent at {} is not available", socket.display())]
    NotAvailable {
        /// The agent's socket.
        socket: PathBuf,
        /// What went wrong.
        #[source]
        cause: AgentFailure,
    },
}

/// Why the agent did not confirm a request.
#[derive(Debug, thiserror::Error)]
pub enum AgentFailure {
    /// No usable reply (connect/timeout/I/O/malformed).
    #[error("no usable reply")]
    NoReply(#[source] agent::Error),
    /// The agent replied with an `error`.
    #[error("agent replied with an error: {0}")]
    Rejected(String),
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn commands() -> String {
    Command::ALL.map(Command::as_str).join(", ")
}

impl Error {
    /// The CNI error code for this error (see [`code`]).
    pub fn code(&self) -> u32 {
        match self {
            Error::MissingVersion
            | Error::UnsupportedVersion { .. }
            | Error::CommandNeedsNewerVersion { .. }
            | Error::PrevResultVersion { .. } => code::INCOMPATIBLE_VERSION,
            Error::UnknownContainer { .. } => code::UNKNOWN_CONTAINER,
            Error::Env(_) | Error::UnknownCommand(_) => code::INVALID_ENV,
            Error::ReadStdin(_) => code::IO_FAILURE,
            Error::Decode(_) => code::DECODE_FAILURE,
            Error::ConfigShape(_)
            | Error::InvalidConfig(_)
            | Error::NotChained
            | Error::PrevResultShape(_)
            | Error::PrevResultAddress { .. } => code::INVALID_CONFIG,
            Error::AgentUnconfirmed { .. } => code::TRY_AGAIN_LATER,
            Error::NotAvailable { .. } => code::NOT_AVAILABLE,
        }
    }

    /// The error and its causes on one line, `": "`-separated.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = self.source();
        while let Some(cause) = source {
            let _ = write!(out, ": {cause}");
            source = cause.source();
        }
        out
    }

    /// Operator guidance appended to `details`, where there is any.
    fn hint(&self) -> Option<&'static str> {
        match self {
            Error::AgentUnconfirmed {
                command: agent::Command::Add,
                ..
            } => Some(
                "weft-cni fails closed: a pod sandbox does not start until the node agent \
                 confirms whether the pod is captured, so no pod runs outside the mesh by \
                 accident; the runtime retries. Check that weft-cni-agent runs on this node \
                 and listens on agent_socket.",
            ),
            Error::AgentUnconfirmed { .. } | Error::NotAvailable { .. } => {
                Some("check that weft-cni-agent runs on this node and listens on agent_socket")
            }
            Error::NotChained => {
                Some("list weft-cni after the primary CNI plugin in the conflist's \"plugins\"")
            }
            Error::UnsupportedVersion { .. } | Error::MissingVersion => {
                Some("set the conflist's cniVersion to 1.0.0 or 1.1.0")
            }
            _ => None,
        }
    }
}

/// An error together with the `cniVersion` its Error result is written in.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    /// The config's `cniVersion` (as given, even if unsupported), or the latest supported one
    /// when the config could not be read.
    pub cni_version: String,
    /// What went wrong.
    #[source]
    pub error: Error,
}

impl Failure {
    /// Wraps `error` for an invocation in `cni_version`.
    pub fn new(cni_version: impl Into<String>, error: Error) -> Self {
        Failure {
            cni_version: cni_version.into(),
            error,
        }
    }

    /// Wraps `error` with the latest supported version (nothing better is known).
    pub fn latest(error: Error) -> Self {
        Failure::new(Version::LATEST.as_str(), error)
    }

    /// The CNI Error result.
    pub fn reply(&self) -> ErrorReply {
        let msg = self.error.chain();
        let details = match self.error.hint() {
            Some(hint) => format!("{msg}. {hint}"),
            None => msg.clone(),
        };
        ErrorReply {
            cni_version: self.cni_version.clone(),
            code: self.error.code(),
            msg,
            details,
        }
    }

    /// Writes the Error result as one JSON document plus a newline.
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        serde_json::to_writer(&mut out, &self.reply())?;
        out.write_all(b"\n")?;
        out.flush()
    }
}

/// The CNI Error result (CNI spec §5 "Error").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorReply {
    /// Same value as the configuration's `cniVersion`.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// A well-known code from [`code`].
    pub code: u32,
    /// Short message: the error and its causes.
    pub msg: String,
    /// Longer message: `msg` plus guidance.
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_shape_and_chain() {
        let failure = Failure::new(
            "1.0.0",
            Error::AgentUnconfirmed {
                socket: PathBuf::from("/run/x.sock"),
                command: agent::Command::Add,
                cause: AgentFailure::NoReply(agent::Error::Connect(io::Error::from(
                    io::ErrorKind::NotFound,
                ))),
            },
        );
        let reply = failure.reply();
        assert_eq!(reply.code, 11);
        assert_eq!(reply.cni_version, "1.0.0");
        assert!(
            reply
                .msg
                .starts_with("weft-cni-agent at /run/x.sock did not confirm ADD: ")
        );
        assert!(reply.msg.contains("connect failed"), "{}", reply.msg);
        assert!(reply.details.contains("fails closed"), "{}", reply.details);
        let json = serde_json::to_value(&reply).expect("encode");
        let keys: Vec<_> = json.as_object().expect("object").keys().cloned().collect();
        assert_eq!(keys.len(), 4);
        for key in ["cniVersion", "code", "msg", "details"] {
            assert!(keys.iter().any(|k| k == key), "missing {key}");
        }
    }

    #[test]
    fn env_errors_name_every_variable() {
        let e = Error::Env(vec![
            EnvProblem::Missing("CNI_NETNS"),
            EnvProblem::Missing("CNI_IFNAME"),
        ]);
        assert_eq!(e.code(), 4);
        assert_eq!(
            e.to_string(),
            "invalid CNI environment: CNI_NETNS is missing; CNI_IFNAME is missing"
        );
    }
}
