//! The plugin ↔ node-agent protocol and its unix-socket client.
//!
//! The plugin asks the node agent (`weft-cni-agent`) about a pod synchronously, before the pod's
//! sandbox starts, the way istio-cni's plugin POSTs to the agent's `pluginevent.sock` (see
//! `istio-ambient.md` §4.2). Weft uses a smaller protocol than Istio's HTTP-over-UDS:
//!
//! * **Transport**: a `SOCK_STREAM` unix socket, by default [`DEFAULT_AGENT_SOCKET`]. One
//!   connection per request; the plugin connects, writes one request, reads one reply, closes.
//! * **Framing**: each message is one UTF-8 JSON object on one line, ended by `\n` (JSON never
//!   needs a raw newline inside a value). Replies longer than [`MAX_REPLY_BYTES`] are rejected.
//! * **Deadline**: connect, write and read together must finish within the configured
//!   `agent_timeout_ms` (default 5000 ms); a full accept backlog counts against it too.
//! * **Request** ([`Request`]): `{"command":"ADD","namespace":"ns","name":"pod","uid":"…",
//!   "netns":"/var/run/netns/…","ips":["10.244.1.7"],"container_id":"…","ifname":"eth0"}`.
//!   `command` is `ADD`, `CHECK`, `DEL` or `STATUS`. A field whose value is unknown is omitted
//!   (read it as `null`/empty): `uid` when the runtime passed no `K8S_POD_UID`, `netns` on a `DEL`
//!   without one, `ips` when `prevResult` lists none. `ips` are the pod's addresses (no prefix
//!   length) from the sandbox interfaces in `prevResult`, which the API server does not know yet.
//!   `STATUS` carries only `command`.
//! * **Reply** ([`Reply`]): `{"enroll":true,"error":null}`. `enroll` is **required**: a reply
//!   without it is malformed and treated like no reply, so a confused agent can never let a pod
//!   start uncaptured. `error` (string or `null`) reports that the agent could not do what was
//!   asked; the optional `error_kind` (`"unknown_container"` or `"transient"`, default transient)
//!   lets `CHECK` tell "this pod was never captured" apart from "try again". Unknown fields are
//!   ignored in both directions.
//!
//! What the plugin does with the reply is decided in [`super::handler`]: on `ADD` anything but
//! `{"enroll": true|false, "error": null}` fails the ADD with CNI code 11 (fail closed).

use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where the node agent listens when the network config sets no `agent_socket`.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/weft-cni/cni-agent.sock";

/// Largest reply line the client accepts, in bytes (including the newline): 64 KiB.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The operation the plugin asks the agent about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// A pod sandbox is being created: decide on enrollment and, if enrolled, capture it before
    /// replying.
    Add,
    /// The runtime checks an existing pod: confirm its capture is still in place.
    Check,
    /// The pod sandbox is being torn down: forget it (best effort; the reply is ignored).
    Del,
    /// Readiness probe for CNI `STATUS`: can the agent service `ADD` now?
    Status,
}

impl Command {
    /// The wire spelling (`ADD`, `CHECK`, `DEL`, `STATUS`).
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Check => "CHECK",
            Command::Del => "DEL",
            Command::Status => "STATUS",
        }
    }
}

/// One request line from the plugin to the agent (see the module docs for the JSON shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// What is being asked.
    pub command: Command,
    /// Pod namespace (`K8S_POD_NAMESPACE` from `CNI_ARGS`); absent on `STATUS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pod name (`K8S_POD_NAME`); absent on `STATUS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Pod UID (`K8S_POD_UID`); absent when the runtime did not pass it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Network namespace path (`CNI_NETNS`); may be absent on `DEL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The pod's addresses from `prevResult` (sandbox interfaces only), without prefix length.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// `CNI_CONTAINERID` (the sandbox ID); absent on `STATUS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// `CNI_IFNAME`; absent on `STATUS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
}

impl Request {
    /// A `STATUS` request: only `command` is set.
    pub fn status() -> Self {
        Request {
            command: Command::Status,
            namespace: None,
            name: None,
            uid: None,
            netns: None,
            ips: Vec::new(),
            container_id: None,
            ifname: None,
        }
    }
}

/// One reply line from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the pod is (now) part of the mesh. Required on the wire.
    pub enroll: bool,
    /// Why the agent could not do what was asked; `null`/absent when it could.
    #[serde(default)]
    pub error: Option<String>,
    /// Classifies `error`; absent means [`ErrorKind::Transient`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
}

impl Reply {
    /// A successful reply: `{"enroll": enroll, "error": null}`.
    pub fn ok(enroll: bool) -> Self {
        Reply {
            enroll,
            error: None,
            error_kind: None,
        }
    }
}

/// Classification of an agent error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The agent has no record of this pod/container (CNI code 3 on `CHECK`).
    UnknownContainer,
    /// A condition that may clear up (CNI code 11).
    Transient,
    /// A kind this plugin version does not know; treated as transient.
    #[serde(other)]
    Other,
}

/// Why the client got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path cannot be a unix socket address (e.g. longer than `sun_path`).
    #[error("invalid socket address")]
    Address(#[source] io::Error),
    /// `connect(2)` failed: no agent listening, permission denied, ….
    #[error("connect failed")]
    Connect(#[source] io::Error),
    /// The deadline passed during the given stage (`connect`, `write`, `read`).
    #[error("no reply within {timeout:?} (timed out during {stage})")]
    Timeout {
        /// The configured deadline for the whole exchange.
        timeout: Duration,
        /// Which stage was in progress.
        stage: &'static str,
    },
    /// Writing the request or reading the reply failed.
    #[error("{stage} failed")]
    Io {
        /// `write` or `read`.
        stage: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The agent closed the connection before a full reply line.
    #[error("agent closed the connection without a complete reply")]
    Closed,
    /// The reply line exceeded [`MAX_REPLY_BYTES`].
    #[error("reply longer than {MAX_REPLY_BYTES} bytes")]
    TooLarge,
    /// The reply was not a valid [`Reply`] (e.g. not JSON, or `enroll` missing).
    #[error("malformed reply")]
    Decode(#[source] serde_json::Error),
    /// The request could not be encoded (not expected to happen).
    #[error("cannot encode request")]
    Encode(#[source] serde_json::Error),
}

/// Asks the node agent about a pod; implemented over a unix socket by [`UnixClient`] and by
/// fakes in tests.
pub trait AgentClient {
    /// Sends one request and waits for its reply. Errors mean "no usable answer"; an answer that
    /// carries an `error` is still `Ok`.
    fn call(&self, request: &Request) -> Result<Reply, Error>;
}

impl<T: AgentClient + ?Sized> AgentClient for &T {
    fn call(&self, request: &Request) -> Result<Reply, Error> {
        (**self).call(request)
    }
}

/// [`AgentClient`] speaking the line protocol above over a unix stream socket, with one deadline
/// for the whole exchange.
#[derive(Debug, Clone)]
pub struct UnixClient {
    socket: PathBuf,
    timeout: Duration,
}

impl UnixClient {
    /// A client for the agent at `socket`; `timeout` bounds connect + write + read.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        UnixClient {
            socket: socket.into(),
            timeout,
        }
    }

    /// A client for the agent named by the network config (`agent_socket`, `agent_timeout_ms`).
    pub fn from_config(config: &super::Config) -> Self {
        UnixClient::new(config.agent_socket.clone(), config.agent_timeout)
    }

    /// The socket path this client connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self, deadline: Instant) -> Result<UnixStream, Error> {
        let addr = socket2::SockAddr::unix(&self.socket).map_err(Error::Address)?;
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .map_err(Error::Connect)?;
        // A blocking connect(2) on a unix stream socket waits for room in the listener's backlog
        // for at most SO_SNDTIMEO, so setting it first bounds the connect as well.
        socket
            .set_write_timeout(Some(remaining(deadline, self.timeout, "connect")?))
            .map_err(Error::Connect)?;
        match socket.connect(&addr) {
            Ok(()) => Ok(socket.into()),
            Err(e) if is_timeout(&e) => Err(Error::Timeout {
                timeout: self.timeout,
                stage: "connect",
            }),
            Err(e) => Err(Error::Connect(e)),
        }
    }
}

impl AgentClient for UnixClient {
    fn call(&self, request: &Request) -> Result<Reply, Error> {
        let deadline = Instant::now() + self.timeout;
        let mut line = serde_json::to_vec(request).map_err(Error::Encode)?;
        line.push(b'\n');

        let mut stream = self.connect(deadline)?;
        let io_err = |stage: &'static str, timeout: Duration| {
            move |source: io::Error| {
                if is_timeout(&source) {
                    Error::Timeout { timeout, stage }
                } else {
                    Error::Io { stage, source }
                }
            }
        };

        stream
            .set_write_timeout(Some(remaining(deadline, self.timeout, "write")?))
            .map_err(io_err("write", self.timeout))?;
        stream
            .write_all(&line)
            .map_err(io_err("write", self.timeout))?;

        let mut reply = Vec::with_capacity(256);
        let mut chunk = [0u8; 4096];
        loop {
            stream
                .set_read_timeout(Some(remaining(deadline, self.timeout, "read")?))
                .map_err(io_err("read", self.timeout))?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("read", self.timeout)(e)),
            };
            if n == 0 {
                return Err(Error::Closed);
            }
            reply.extend_from_slice(&chunk[..n]);
            if let Some(end) = reply.iter().position(|&b| b == b'\n') {
                reply.truncate(end);
                break;
            }
            if reply.len() >= MAX_REPLY_BYTES {
                return Err(Error::TooLarge);
            }
        }
        if reply.len() >= MAX_REPLY_BYTES {
            return Err(Error::TooLarge);
        }
        decode_reply(&reply)
    }
}

/// Decodes one reply line (without its newline). `enroll` is required.
pub fn decode_reply(line: &[u8]) -> Result<Reply, Error> {
    serde_json::from_slice(line).map_err(Error::Decode)
}

fn remaining(deadline: Instant, timeout: Duration, stage: &'static str) -> Result<Duration, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(Error::Timeout { timeout, stage })
    } else {
        Ok(left)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_request_wire_shape() {
        let request = Request {
            command: Command::Add,
            namespace: Some("default".into()),
            name: Some("web-0".into()),
            uid: None,
            netns: Some("/var/run/netns/cni-1".into()),
            ips: vec!["10.244.1.7".parse().expect("ip")],
            container_id: Some("abc".into()),
            ifname: Some("eth0".into()),
        };
        let json = serde_json::to_value(&request).expect("encode");
        assert_eq!(
            json,
            serde_json::json!({
                "command": "ADD", "namespace": "default", "name": "web-0",
                "netns": "/var/run/netns/cni-1", "ips": ["10.244.1.7"],
                "container_id": "abc", "ifname": "eth0"
            })
        );
    }

    #[test]
    fn status_request_carries_only_the_command() {
        let json = serde_json::to_value(Request::status()).expect("encode");
        assert_eq!(json, serde_json::json!({"command": "STATUS"}));
    }

    #[test]
    fn reply_decoding() {
        let cases: &[(&str, Option<Reply>)] = &[
            (r#"{"enroll":true,"error":null}"#, Some(Reply::ok(true))),
            (r#"{"enroll":false}"#, Some(Reply::ok(false))),
            (
                r#"{"enroll":false,"error":"no such pod","error_kind":"unknown_container"}"#,
                Some(Reply {
                    enroll: false,
                    error: Some("no such pod".into()),
                    error_kind: Some(ErrorKind::UnknownContainer),
                }),
            ),
            (
                r#"{"enroll":false,"error":"x","error_kind":"brand_new","extra":1}"#,
                Some(Reply {
                    enroll: false,
                    error: Some("x".into()),
                    error_kind: Some(ErrorKind::Other),
                }),
            ),
            // `enroll` is required: an empty or error-only reply must not read as "not enrolled".
            (r#"{}"#, None),
            (r#"{"error":"boom"}"#, None),
            (r#"{"enroll":"yes"}"#, None),
            ("not json", None),
        ];
        for (line, want) in cases {
            let got = decode_reply(line.as_bytes()).ok();
            assert_eq!(&got, want, "reply {line}");
        }
    }
}
