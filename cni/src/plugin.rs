//! The chained CNI plugin `weft-cni`: the short-lived binary the container runtime runs for each
//! pod sandbox, after the primary (interface) plugin.
//!
//! Like istio-cni's plugin in ambient mode (`istio-ambient.md` §4.2) it never touches networking
//! itself: on `ADD` it asks the node agent, synchronously over a unix socket ([`agent`]), whether
//! the pod is enrolled; the agent captures the pod before answering. The plugin then passes the
//! primary plugin's `prevResult` through unchanged. If the agent cannot confirm, the ADD fails
//! with CNI code 11 ("try again later") so **no pod starts uncaptured** (fail closed); see
//! [`handler`] for every command's behaviour.
//!
//! Protocol: CNI spec 1.0.0 and 1.1.0 (`ADD`, `DEL`, `CHECK`, `VERSION`, and 1.1's `STATUS`,
//! `GC`). Inputs are the `CNI_*` environment ([`Env`]) and the plugin configuration on stdin
//! ([`Config`]); [`parse`] validates both into an [`Invocation`], [`Invocation::execute`] runs it
//! against an [`AgentClient`] and returns the [`Output`] for stdout or a [`Failure`] whose Error
//! result goes to stdout with exit status 1. Logs never go to stdout.
//!
//! Not here: the agent side of the socket, enrollment policy, redirection rules
//! ([`crate::redirect`]).

pub mod agent;
pub mod config;
pub mod env;
pub mod error;
pub mod handler;
pub mod result;
pub mod version;

pub use agent::{AgentClient, UnixClient};
pub use config::Config;
pub use env::{Attachment, Command, Env, PodRef};
pub use error::{Error, ErrorReply, Failure};
pub use result::Output;
pub use version::{Version, VersionInfo};

use serde::Deserialize;

/// A validated invocation, ready to run.
#[derive(Debug, Clone)]
pub struct Invocation {
    command: Command,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// `VERSION`, with the `cniVersion` the runtime sent (if any).
    Version { requested: Option<String> },
    /// `ADD`, `CHECK`, `DEL`.
    Attachment {
        attachment: Attachment,
        config: Config,
    },
    /// `STATUS`, `GC`.
    Network { config: Config },
}

/// `VERSION`'s stdin: `{"cniVersion": "…"}` (other keys ignored).
#[derive(Deserialize)]
struct VersionRequest {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
}

/// Validates one invocation: `CNI_COMMAND`, the attachment variables the command needs, then the
/// configuration on `stdin` (not read for `VERSION` beyond its `cniVersion`; may be empty there).
///
/// Errors come back as a [`Failure`] in the config's `cniVersion` when stdin names one, else in
/// [`Version::LATEST`]: code 4 for the environment, 6/7 for undecodable or invalid config, 1 for
/// an unsupported `cniVersion` (or `STATUS`/`GC` below 1.1.0).
pub fn parse(env: &Env, stdin: &[u8]) -> Result<Invocation, Failure> {
    let reply_version = || {
        config::peek_version(stdin)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| Version::LATEST.as_str().to_owned())
    };
    let fail = |error| Failure::new(reply_version(), error);

    let command = env.command().map_err(fail)?;
    if command == Command::Version {
        let requested = if stdin.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            serde_json::from_slice::<VersionRequest>(stdin)
                .map_err(|e| fail(config::decode_error(e)))?
                .cni_version
                .filter(|v| !v.is_empty())
        };
        return Ok(Invocation {
            command,
            kind: Kind::Version { requested },
        });
    }
    let attachment = env.attachment(command).map_err(fail)?;
    let config = Config::from_json(stdin).map_err(fail)?;
    let kind = match attachment {
        Some(attachment) => Kind::Attachment { attachment, config },
        None => {
            if config.cni_version < Version::V1_1_0 {
                return Err(Failure::new(
                    config.cni_version.as_str(),
                    Error::CommandNeedsNewerVersion {
                        command,
                        version: config.cni_version,
                    },
                ));
            }
            Kind::Network { config }
        }
    };
    Ok(Invocation { command, kind })
}

impl Invocation {
    /// The `CNI_COMMAND`.
    pub fn command(&self) -> Command {
        self.command
    }

    /// The plugin configuration; `None` for `VERSION`.
    pub fn config(&self) -> Option<&Config> {
        match &self.kind {
            Kind::Version { .. } => None,
            Kind::Attachment { config, .. } | Kind::Network { config } => Some(config),
        }
    }

    /// The attachment parameters; `Some` for `ADD`, `CHECK`, `DEL`.
    pub fn attachment(&self) -> Option<&Attachment> {
        match &self.kind {
            Kind::Attachment { attachment, .. } => Some(attachment),
            Kind::Version { .. } | Kind::Network { .. } => None,
        }
    }

    /// Runs the command. `connect` builds the agent client from the config (the binary passes
    /// [`UnixClient::from_config`]); it is not called for `VERSION` and `GC`.
    ///
    /// Returns what to print on stdout, or a [`Failure`] in the config's `cniVersion`. `DEL` and
    /// `GC` never fail here.
    pub fn execute<C, F>(&self, connect: F) -> Result<Output, Failure>
    where
        C: AgentClient,
        F: FnOnce(&Config) -> C,
    {
        let (config, outcome) = match &self.kind {
            Kind::Version { requested } => {
                return Ok(Output::Version(VersionInfo::answer(requested.as_deref())));
            }
            Kind::Attachment { attachment, config } => {
                let agent = connect(config);
                let outcome = match self.command {
                    Command::Add => handler::add(config, attachment, &agent),
                    Command::Check => handler::check(config, attachment, &agent),
                    _ => Ok(handler::del(config, attachment, &agent)),
                };
                (config, outcome)
            }
            Kind::Network { config } => {
                let outcome = match self.command {
                    Command::Status => handler::status(config, &connect(config)),
                    _ => Ok(handler::gc()),
                };
                (config, outcome)
            }
        };
        outcome.map_err(|error| Failure::new(config.cni_version.as_str(), error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_vars(pairs.iter().map(|(k, v)| (*k, *v)))
    }

    #[test]
    fn version_needs_no_stdin() {
        let inv = parse(&env(&[("CNI_COMMAND", "VERSION")]), b"").expect("valid");
        let out = inv.execute(|_| -> UnixClient { panic!("VERSION must not connect") });
        assert_eq!(out.ok(), Some(Output::Version(VersionInfo::answer(None))));
        let inv = parse(
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"1.0.0"}"#,
        )
        .expect("valid");
        let Ok(Output::Version(info)) = inv.execute(|_| -> UnixClient { panic!("no connect") })
        else {
            panic!("expected a version result");
        };
        assert_eq!(info.cni_version, "1.0.0");
        let err = parse(&env(&[("CNI_COMMAND", "VERSION")]), b"{").expect_err("bad json");
        assert_eq!(err.error.code(), 6);
    }

    #[test]
    fn failures_use_the_config_version() {
        let stdin = br#"{"cniVersion":"1.0.0","name":"n","type":"weft-cni"}"#;
        let err = parse(&env(&[("CNI_COMMAND", "ADD")]), stdin).expect_err("missing env");
        assert_eq!((err.error.code(), err.cni_version.as_str()), (4, "1.0.0"));
        let err = parse(&env(&[]), b"").expect_err("no command");
        assert_eq!((err.error.code(), err.cni_version.as_str()), (4, "1.1.0"));
        let err = parse(&env(&[("CNI_COMMAND", "STATUS")]), stdin).expect_err("1.0.0 STATUS");
        assert_eq!((err.error.code(), err.cni_version.as_str()), (1, "1.0.0"));
    }

    #[test]
    fn gc_is_a_no_op() {
        let stdin = br#"{"cniVersion":"1.1.0","name":"n","type":"weft-cni",
                        "cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}]}"#;
        let inv = parse(
            &env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")]),
            stdin,
        )
        .expect("valid");
        assert!(inv.attachment().is_none());
        let out = inv.execute(|_| -> UnixClient { panic!("GC must not connect") });
        assert_eq!(out.ok(), Some(Output::Empty));
    }
}
