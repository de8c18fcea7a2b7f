//! The command handlers: what `ADD`, `CHECK`, `DEL`, `STATUS` and `GC` do.
//!
//! The decision whether to ask the agent at all ([`decide`]) and how to read its reply
//! ([`judge`]) are plain functions; the handlers only call the agent and log.
//!
//! * `ADD`: requires `prevResult`. Non-Kubernetes containers (no `K8S_POD_NAMESPACE`/
//!   `K8S_POD_NAME` in `CNI_ARGS`) and pods in `exclude_namespaces` pass through without asking.
//!   Otherwise the agent decides: `{"enroll": true|false, "error": null}` → pass `prevResult`
//!   through; anything else (no agent, timeout, malformed or error reply) → CNI code 11.
//!   **Fail closed**: a pod whose enrollment the agent cannot confirm never starts; the runtime
//!   tears the sandbox down (DEL) and retries the ADD later, as istio-cni does.
//! * `CHECK`: requires `prevResult`; skipped pods succeed; otherwise the agent must confirm
//!   (error reply of kind `unknown_container` → code 3, other failures → code 11).
//! * `DEL`: tells the agent if it can, ignores every failure, always succeeds (CNI spec: DEL is
//!   idempotent and tolerates missing resources).
//! * `STATUS`: the agent answers `STATUS` without an error → success; otherwise code 50.
//! * `GC`: nothing to collect (weft-cni keeps no per-attachment state); succeeds.

use std::net::IpAddr;

use super::Config;
use super::agent::{self, AgentClient, ErrorKind, Reply};
use super::env::Attachment;
use super::error::{AgentFailure, Error};
use super::result::{Output, pass_through, pod_ips};

/// Why a pod is passed through without asking the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `CNI_ARGS` names no Kubernetes pod.
    NotKubernetes,
    /// The pod's namespace is in `exclude_namespaces`.
    ExcludedNamespace,
}

impl Skip {
    fn as_str(self) -> &'static str {
        match self {
            Skip::NotKubernetes => "not_kubernetes",
            Skip::ExcludedNamespace => "excluded_namespace",
        }
    }
}

/// What to do with an attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Do not involve the agent.
    Skip(Skip),
    /// Send this request to the agent.
    Ask(agent::Request),
}

/// Decides whether `command` for `attachment` involves the agent, and builds the request
/// (carrying `ips`, the pod's addresses from `prevResult`).
pub fn decide(
    command: agent::Command,
    config: &Config,
    attachment: &Attachment,
    ips: Vec<IpAddr>,
) -> Decision {
    let Some(pod) = &attachment.pod else {
        return Decision::Skip(Skip::NotKubernetes);
    };
    if config.is_excluded(&pod.namespace) {
        return Decision::Skip(Skip::ExcludedNamespace);
    }
    Decision::Ask(agent::Request {
        command,
        namespace: Some(pod.namespace.clone()),
        name: Some(pod.name.clone()),
        uid: pod.uid.clone(),
        netns: attachment.netns.clone(),
        ips,
        container_id: Some(attachment.container_id.clone()),
        ifname: Some(attachment.ifname.clone()),
    })
}

/// How the agent answered.
#[derive(Debug)]
pub enum Verdict {
    /// The agent did what was asked; `enrolled` is its `enroll` flag.
    Confirmed {
        /// Whether the pod is in the mesh.
        enrolled: bool,
    },
    /// The agent reports it does not know the pod/container.
    Unknown(String),
    /// No usable answer, or an error reply.
    Failed(AgentFailure),
}

/// Reads the outcome of one agent call.
pub fn judge(outcome: Result<Reply, agent::Error>) -> Verdict {
    match outcome {
        Err(e) => Verdict::Failed(AgentFailure::NoReply(e)),
        Ok(Reply {
            error: Some(message),
            error_kind: Some(ErrorKind::UnknownContainer),
            ..
        }) => Verdict::Unknown(message),
        Ok(Reply {
            error: Some(message),
            ..
        }) => Verdict::Failed(AgentFailure::Rejected(message)),
        Ok(Reply {
            enroll,
            error: None,
            ..
        }) => Verdict::Confirmed { enrolled: enroll },
    }
}

fn unconfirmed(config: &Config, command: agent::Command, cause: AgentFailure) -> Error {
    Error::AgentUnconfirmed {
        socket: config.agent_socket.clone(),
        command,
        cause,
    }
}

/// `ADD`: see the module docs. Returns the passed-through `prevResult`.
pub fn add(
    config: &Config,
    attachment: &Attachment,
    agent: &dyn AgentClient,
) -> Result<Output, Error> {
    let prev = config.prev_result.as_ref().ok_or(Error::NotChained)?;
    let result = pass_through(prev, config.cni_version)?;
    let request = match decide(agent::Command::Add, config, attachment, Vec::new()) {
        Decision::Skip(skip) => {
            tracing::info!(
                container.id = %attachment.container_id,
                skip.reason = skip.as_str(),
                "pod passed through without asking the agent"
            );
            return Ok(Output::Result(result));
        }
        Decision::Ask(request) => agent::Request {
            ips: pod_ips(prev)?,
            ..request
        },
    };
    match judge(agent.call(&request)) {
        Verdict::Confirmed { enrolled } => {
            tracing::info!(
                container.id = %attachment.container_id,
                pod.namespace = request.namespace.as_deref(),
                pod.name = request.name.as_deref(),
                pod.enrolled = enrolled,
                "agent confirmed the pod"
            );
            Ok(Output::Result(result))
        }
        Verdict::Unknown(message) => Err(fail_closed(config, AgentFailure::Rejected(message))),
        Verdict::Failed(cause) => Err(fail_closed(config, cause)),
    }
}

/// The fail-closed error (CNI code 11); the binary logs it with the invocation's failure.
fn fail_closed(config: &Config, cause: AgentFailure) -> Error {
    unconfirmed(config, agent::Command::Add, cause)
}

/// `CHECK`: see the module docs. Success prints nothing.
pub fn check(
    config: &Config,
    attachment: &Attachment,
    agent: &dyn AgentClient,
) -> Result<Output, Error> {
    let prev = config.prev_result.as_ref().ok_or(Error::NotChained)?;
    let request = match decide(agent::Command::Check, config, attachment, Vec::new()) {
        Decision::Skip(_) => return Ok(Output::Empty),
        Decision::Ask(request) => agent::Request {
            ips: pod_ips(prev)?,
            ..request
        },
    };
    match judge(agent.call(&request)) {
        Verdict::Confirmed { .. } => Ok(Output::Empty),
        Verdict::Unknown(message) => Err(Error::UnknownContainer {
            socket: config.agent_socket.clone(),
            message,
        }),
        Verdict::Failed(cause) => Err(unconfirmed(config, agent::Command::Check, cause)),
    }
}

/// `DEL`: best effort; never fails. A missing or unreadable `prevResult` only means the agent is
/// told no IPs.
pub fn del(config: &Config, attachment: &Attachment, agent: &dyn AgentClient) -> Output {
    let ips = config
        .prev_result
        .as_ref()
        .and_then(|prev| pod_ips(prev).ok())
        .unwrap_or_default();
    if let Decision::Ask(request) = decide(agent::Command::Del, config, attachment, ips) {
        match judge(agent.call(&request)) {
            Verdict::Confirmed { .. } => {}
            Verdict::Unknown(message) | Verdict::Failed(AgentFailure::Rejected(message)) => {
                tracing::warn!(
                    container.id = %attachment.container_id,
                    agent.error = %message,
                    "agent reported an error on DEL; ignored"
                );
            }
            Verdict::Failed(cause) => {
                tracing::warn!(
                    container.id = %attachment.container_id,
                    error = %unconfirmed(config, agent::Command::Del, cause).chain(),
                    "agent not told about DEL; ignored"
                );
            }
        }
    }
    Output::Empty
}

/// `STATUS`: the agent must answer a `STATUS` request without an error.
pub fn status(config: &Config, agent: &dyn AgentClient) -> Result<Output, Error> {
    let cause = match judge(agent.call(&agent::Request::status())) {
        Verdict::Confirmed { .. } => return Ok(Output::Empty),
        Verdict::Unknown(message) => AgentFailure::Rejected(message),
        Verdict::Failed(cause) => cause,
    };
    Err(Error::NotAvailable {
        socket: config.agent_socket.clone(),
        cause,
    })
}

/// `GC`: nothing to collect.
pub fn gc() -> Output {
    Output::Empty
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::plugin::env::PodRef;

    /// Answers every call with a clone of `reply`, recording requests.
    struct Scripted {
        reply: Result<Reply, ()>,
        seen: RefCell<Vec<agent::Request>>,
    }

    impl Scripted {
        fn new(reply: Result<Reply, ()>) -> Self {
            Scripted {
                reply,
                seen: RefCell::new(Vec::new()),
            }
        }
    }

    impl AgentClient for Scripted {
        fn call(&self, request: &agent::Request) -> Result<Reply, agent::Error> {
            self.seen.borrow_mut().push(request.clone());
            self.reply.clone().map_err(|()| agent::Error::Closed)
        }
    }

    fn config(prev: bool) -> Config {
        let prev = prev.then(|| {
            serde_json::json!({
                "cniVersion": "1.1.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
                "ips": [{"address": "10.244.0.9/24", "interface": 0}]
            })
            .as_object()
            .cloned()
            .unwrap_or_default()
        });
        Config {
            prev_result: prev,
            ..Config::default()
        }
    }

    fn attachment(namespace: Option<&str>) -> Attachment {
        Attachment {
            container_id: "c1".into(),
            netns: Some("/var/run/netns/p".into()),
            ifname: "eth0".into(),
            pod: namespace.map(|ns| PodRef {
                namespace: ns.into(),
                name: "p".into(),
                uid: None,
            }),
        }
    }

    #[test]
    fn decide_table() {
        let cfg = config(true);
        assert_eq!(
            decide(agent::Command::Add, &cfg, &attachment(None), vec![]),
            Decision::Skip(Skip::NotKubernetes)
        );
        assert_eq!(
            decide(
                agent::Command::Add,
                &cfg,
                &attachment(Some("kube-system")),
                vec![]
            ),
            Decision::Skip(Skip::ExcludedNamespace)
        );
        let Decision::Ask(request) =
            decide(agent::Command::Del, &cfg, &attachment(Some("ns")), vec![])
        else {
            panic!("expected Ask");
        };
        assert_eq!(request.command, agent::Command::Del);
        assert_eq!(request.namespace.as_deref(), Some("ns"));
        assert_eq!(request.container_id.as_deref(), Some("c1"));
    }

    #[test]
    fn judge_table() {
        let err = |kind| Reply {
            enroll: false,
            error: Some("e".into()),
            error_kind: kind,
        };
        assert!(matches!(
            judge(Ok(Reply::ok(true))),
            Verdict::Confirmed { enrolled: true }
        ));
        assert!(matches!(
            judge(Ok(Reply::ok(false))),
            Verdict::Confirmed { enrolled: false }
        ));
        assert!(matches!(
            judge(Ok(err(Some(ErrorKind::UnknownContainer)))),
            Verdict::Unknown(m) if m == "e"
        ));
        assert!(matches!(
            judge(Ok(err(None))),
            Verdict::Failed(AgentFailure::Rejected(_))
        ));
        assert!(matches!(
            judge(Ok(err(Some(ErrorKind::Other)))),
            Verdict::Failed(AgentFailure::Rejected(_))
        ));
        assert!(matches!(
            judge(Err(agent::Error::Closed)),
            Verdict::Failed(AgentFailure::NoReply(_))
        ));
    }

    #[test]
    fn add_outcomes() {
        let cfg = config(true);
        let pod = attachment(Some("default"));
        for (reply, want_code) in [
            (Ok(Reply::ok(true)), None),
            (Ok(Reply::ok(false)), None),
            (
                Ok(Reply {
                    enroll: true,
                    error: Some("rules failed".into()),
                    error_kind: None,
                }),
                Some(11),
            ),
            (
                Ok(Reply {
                    enroll: false,
                    error: Some("?".into()),
                    error_kind: Some(ErrorKind::UnknownContainer),
                }),
                Some(11),
            ),
            (Err(()), Some(11)),
        ] {
            let agent = Scripted::new(reply.clone());
            let got = add(&cfg, &pod, &agent).map_err(|e| e.code());
            match want_code {
                None => assert!(matches!(got, Ok(Output::Result(_))), "{reply:?}: {got:?}"),
                Some(code) => assert_eq!(got.err(), Some(code), "{reply:?}"),
            }
            let seen = agent.seen.borrow();
            assert_eq!(seen.len(), 1);
            assert_eq!(
                seen[0].ips,
                vec!["10.244.0.9".parse::<IpAddr>().expect("ip")]
            );
        }
    }

    #[test]
    fn add_requires_prev_result_even_when_skipping() {
        let agent = Scripted::new(Err(()));
        let err = add(&config(false), &attachment(None), &agent).expect_err("not chained");
        assert_eq!(err.code(), 7);
        assert!(agent.seen.borrow().is_empty());
    }

    #[test]
    fn check_outcomes() {
        let cfg = config(true);
        let pod = attachment(Some("default"));
        let unknown = Reply {
            enroll: false,
            error: Some("no such pod".into()),
            error_kind: Some(ErrorKind::UnknownContainer),
        };
        let code = |reply: Result<Reply, ()>| {
            check(&cfg, &pod, &Scripted::new(reply))
                .map(|_| ())
                .map_err(|e| e.code())
        };
        assert_eq!(code(Ok(Reply::ok(true))), Ok(()));
        assert_eq!(code(Ok(unknown)), Err(3));
        assert_eq!(
            code(Ok(Reply {
                enroll: true,
                error: Some("rules missing".into()),
                error_kind: None
            })),
            Err(11)
        );
        assert_eq!(code(Err(())), Err(11));
        assert_eq!(
            check(&config(false), &pod, &Scripted::new(Err(())))
                .map_err(|e| e.code())
                .err(),
            Some(7)
        );
    }

    #[test]
    fn del_and_gc_always_succeed() {
        for reply in [Ok(Reply::ok(true)), Err(())] {
            let agent = Scripted::new(reply);
            assert_eq!(
                del(&config(false), &attachment(Some("default")), &agent),
                Output::Empty
            );
            assert_eq!(agent.seen.borrow().len(), 1);
        }
        let agent = Scripted::new(Err(()));
        assert_eq!(
            del(&config(true), &attachment(Some("kube-system")), &agent),
            Output::Empty
        );
        assert!(
            agent.seen.borrow().is_empty(),
            "excluded pods are never sent to the agent"
        );
        assert_eq!(gc(), Output::Empty);
    }

    #[test]
    fn status_outcomes() {
        let cfg = config(false);
        assert_eq!(
            status(&cfg, &Scripted::new(Ok(Reply::ok(false)))).ok(),
            Some(Output::Empty)
        );
        let err = status(&cfg, &Scripted::new(Err(()))).expect_err("unavailable");
        assert_eq!(err.code(), 50);
        let reply = Reply {
            enroll: false,
            error: Some("ztunnel not connected".into()),
            error_kind: None,
        };
        assert_eq!(
            status(&cfg, &Scripted::new(Ok(reply)))
                .map_err(|e| e.code())
                .err(),
            Some(50)
        );
    }
}
