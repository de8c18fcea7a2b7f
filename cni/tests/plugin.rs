//! Runs the built `weft-cni` binary the way a container runtime does (CNI_* environment, network
//! config on stdin, result on stdout) against a fake node agent on a unix socket, plus a few
//! library-level parsing checks.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Upper bound for one plugin run; the plugin's own agent timeout in these tests is ≤ 5 s.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

const CONTAINER_ID: &str = "3f6940ab5ab43bc5";
const NETNS: &str = "/var/run/netns/cni-7e1a";
const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                        K8S_POD_INFRA_CONTAINER_ID=3f6940ab5ab43bc5;K8S_POD_UID=0d1c2b3a-uid";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-cni-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the fake agent does with each request.
#[derive(Clone)]
enum Behaviour {
    /// Reply with this line.
    Reply(String),
    /// Read the request, never reply (hold the connection open).
    Silent,
}

/// A node agent stand-in: accepts on a unix socket, records each request line as JSON.
struct FakeAgent {
    _scratch: Scratch,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    fn replying(reply: Value) -> Self {
        FakeAgent::start(Behaviour::Reply(reply.to_string()))
    }

    fn start(behaviour: Behaviour) -> Self {
        let scratch = Scratch::new();
        let socket = scratch.path("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake agent");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            thread::spawn(move || serve(&listener, &behaviour, &requests, &stop))
        };
        FakeAgent {
            _scratch: scratch,
            socket,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Value> {
        self.requests.lock().expect("requests lock").clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    listener: &UnixListener,
    behaviour: &Behaviour,
    requests: &Mutex<Vec<Value>>,
    stop: &AtomicBool,
) {
    let mut held: Vec<UnixStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => panic!("fake agent accept: {e}"),
        };
        stream.set_nonblocking(false).expect("blocking stream");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut line = String::new();
        let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
        reader
            .read_line(&mut line)
            .expect("fake agent reads one request line");
        assert!(
            line.ends_with('\n'),
            "request must be newline-terminated: {line:?}"
        );
        let request: Value = serde_json::from_str(&line).expect("request is JSON");
        requests.lock().expect("requests lock").push(request);
        match behaviour {
            Behaviour::Reply(reply) => {
                let mut stream = stream;
                stream
                    .write_all(format!("{reply}\n").as_bytes())
                    .expect("fake agent replies");
            }
            Behaviour::Silent => held.push(stream),
        }
    }
}

/// One finished plugin run.
#[derive(Debug)]
struct Run {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// stdout as the single JSON document it must be.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    /// Asserts a CNI Error result with `code` and exit status 1; returns it.
    fn expect_error(&self, code: u64) -> Value {
        assert_eq!(self.status, 1, "exit status: {self:?}");
        let error = self.json();
        let keys: Vec<&str> = error
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 4, "error keys {keys:?}");
        for key in ["cniVersion", "code", "msg", "details"] {
            assert!(
                error.get(key).is_some(),
                "error result lacks {key}: {error}"
            );
        }
        assert_eq!(error["code"], code, "error code: {error}");
        error
    }

    /// Asserts success with nothing on stdout.
    fn expect_empty_success(&self) {
        assert_eq!(self.status, 0, "exit status: {self:?}");
        assert!(self.stdout.is_empty(), "stdout must be empty: {self:?}");
    }
}

/// Runs the plugin binary with exactly `env` (plus nothing inherited) and `stdin`.
fn run(env: &[(&str, &str)], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weft-cni");
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_owned();
    let writer = thread::spawn(move || {
        // The plugin may exit without reading stdin (e.g. missing CNI_COMMAND): ignore EPIPE.
        let _ = input.write_all(stdin.as_bytes());
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s)
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for weft-cni") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("weft-cni did not exit within {RUN_TIMEOUT:?} (env {env:?})");
        }
        thread::sleep(Duration::from_millis(5));
    };
    writer.join().expect("stdin writer");
    Run {
        status: status.code().expect("exited normally, not by signal"),
        stdout: out.join().expect("stdout reader").expect("read stdout"),
        stderr: err.join().expect("stderr reader").expect("read stderr"),
    }
}

fn prev_result(version: &str) -> Value {
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "cni0", "mac": "00:11:22:33:44:55"},
            {"name": "veth3243", "mac": "55:44:33:22:11:11"},
            {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": NETNS}
        ],
        "ips": [
            {"address": "10.244.1.1/24", "interface": 0},
            {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 2},
            {"address": "fd00:10:244:1::7/64", "interface": 2}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"]}
    })
}

/// A chained plugin config for `socket`, with `prevResult` when `prev` is set; `extra` keys are
/// merged in last.
fn net_config(socket: &Path, version: &str, prev: bool, extra: Value) -> String {
    let mut config = json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "weft-cni",
        "agent_socket": socket,
        "agent_timeout_ms": 2000,
        "runtimeConfig": {"portMappings": []}
    });
    let map = config.as_object_mut().expect("object");
    if prev {
        map.insert("prevResult".into(), prev_result(version));
    }
    for (k, v) in extra.as_object().expect("extra is an object") {
        map.insert(k.clone(), v.clone());
    }
    config.to_string()
}

fn attachment_env<'a>(command: &'a str, args: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", CONTAINER_ID),
        ("CNI_NETNS", NETNS),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", args),
    ]
}

fn commands(agent: &FakeAgent) -> Vec<String> {
    agent
        .requests()
        .iter()
        .map(|r| r["command"].as_str().unwrap_or("?").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// VERSION
// ---------------------------------------------------------------------------------------------

#[test]
fn version_reports_supported_versions() {
    let run_version = |stdin: &str| run(&[("CNI_COMMAND", "VERSION")], stdin);

    let latest = run_version("");
    assert_eq!(latest.status, 0, "{latest:?}");
    assert_eq!(
        latest.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["1.0.0", "1.1.0"]})
    );

    let requested = run_version(r#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(requested.status, 0, "{requested:?}");
    assert_eq!(
        requested.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
    );
}

#[test]
fn unsupported_config_version_is_code_1_with_the_supported_list() {
    let agent = FakeAgent::replying(json!({"enroll": true, "error": null}));
    let result = run(
        &attachment_env("ADD", POD_ARGS),
        &net_config(&agent.socket, "0.3.1", true, json!({})),
    );
    let error = result.expect_error(1);
    assert_eq!(
        error["cniVersion"], "0.3.1",
        "error is written in the config's version"
    );
    let msg = error["msg"].as_str().expect("msg");
    assert!(
        msg.contains("0.3.1") && msg.contains("1.0.0") && msg.contains("1.1.0"),
        "{msg}"
    );
    assert!(
        agent.requests().is_empty(),
        "no agent call on a version mismatch"
    );
}

// ---------------------------------------------------------------------------------------------
// ADD
// ---------------------------------------------------------------------------------------------

#[test]
fn add_enrolled_pod_passes_prev_result_through() {
    let agent = FakeAgent::replying(json!({"enroll": true, "error": null}));
    let result = run(
        &attachment_env("ADD", POD_ARGS),
        &net_config(&agent.socket, "1.0.0", true, json!({})),
    );
    assert_eq!(result.status, 0, "{result:?}");
    assert_eq!(
        result.json(),
        prev_result("1.0.0"),
        "stdout must be prevResult, unchanged"
    );
    assert!(result.stdout.ends_with('\n') && result.stdout.lines().count() == 1);

    let requests = agent.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        requests[0],
        json!({
            "command": "ADD",
            "namespace": "default",
            "name": "web-0",
            "uid": "0d1c2b3a-uid",
            "netns": NETNS,
            "ips": ["10.244.1.7", "fd00:10:244:1::7"],
            "container_id": CONTAINER_ID,
            "ifname": "eth0"
        }),
        "host-side addresses (cni0's 10.244.1.1) are not pod IPs"
    );
}

#[test]
fn add_relabels_prev_result_to_the_config_version() {
    let agent = FakeAgent::replying(json!({"enroll": true, "error": null}));
    let mut config: Value =
        serde_json::from_str(&net_config(&agent.socket, "1.1.0", false, json!({})))
            .expect("config");
    config["prevResult"] = prev_result("1.0.0");
    let result = run(&attachment_env("ADD", POD_ARGS), &config.to_string());
    assert_eq!(result.status, 0, "{result:?}");
    assert_eq!(result.json(), prev_result("1.1.0"));
}

#[test]
fn add_non_ambient_pod_passes_through() {
    let agent = FakeAgent::replying(json!({"enroll": false, "error": null}));
    let result = run(
        &attachment_env("ADD", POD_ARGS),
        &net_config(&agent.socket, "1.1.0", true, json!({})),
    );
    assert_eq!(result.status, 0, "{result:?}");
    assert_eq!(result.json(), prev_result("1.1.0"));
    assert_eq!(commands(&agent), ["ADD"]);
}

#[test]
fn add_excluded_namespace_passes_through_without_the_agent() {
    let agent = FakeAgent::replying(json!({"enroll": true, "error": null}));
    let config = net_config(&agent.socket, "1.1.0", true, json!({}));

    let kube_system = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0";
    let result = run(&attachment_env("ADD", kube_system), &config);
    assert_eq!(result.status, 0, "{result:?}");
    assert_eq!(result.json(), prev_result("1.1.0"));

    let custom = net_config(
        &agent.socket,
        "1.1.0",
        true,
        json!({"exclude_namespaces": ["weft-system"]}),
    );
    let weft_system = "K8S_POD_NAMESPACE=weft-system;K8S_POD_NAME=agent-x";
    let result = run(&attachment_env("ADD", weft_system), &custom);
    assert_eq!(result.status, 0, "{result:?}");
    assert_eq!(result.json(), prev_result("1.1.0"));

    assert!(
        agent.requests().is_empty(),
        "excluded pods must not reach the agent"
    );
}

#[test]
fn add_non_kubernetes_container_passes_through_without_the_agent() {
    let result = run(
        &attachment_env("ADD", "IgnoreUnknown=1"),
        &net_config(
            Path::new("/nonexistent/agent.sock"),
            "1.1.0",
            true,
            json!({}),
        ),
    );
    assert_eq!(result.status, 0, "{result:?}");
    assert_eq!(result.json(), prev_result("1.1.0"));
}

#[test]
fn add_fails_closed_when_the_agent_is_not_listening() {
    let scratch = Scratch::new();
    let socket = scratch.path("nobody-home.sock");
    let result = run(
        &attachment_env("ADD", POD_ARGS),
        &net_config(&socket, "1.1.0", true, json!({})),
    );
    let error = result.expect_error(11);
    let msg = error["msg"].as_str().expect("msg");
    assert!(
        msg.contains(&*socket.to_string_lossy()),
        "msg names the socket: {msg}"
    );
    assert!(msg.contains("connect failed"), "msg names the cause: {msg}");
    assert!(
        error["details"]
            .as_str()
            .expect("details")
            .contains("fails closed")
    );
    assert_eq!(error["cniVersion"], "1.1.0");
}

#[test]
fn add_fails_closed_when_the_agent_does_not_answer_in_time() {
    let agent = FakeAgent::start(Behaviour::Silent);
    let result = run(
        &attachment_env("ADD", POD_ARGS),
        &net_config(
            &agent.socket,
            "1.1.0",
            true,
            json!({"agent_timeout_ms": 300}),
        ),
    );
    let error = result.expect_error(11);
    let msg = error["msg"].as_str().expect("msg");
    assert!(msg.contains("timed out"), "{msg}");
    assert_eq!(commands(&agent), ["ADD"]);
}

#[test]
fn add_fails_closed_on_error_or_malformed_replies() {
    for (reply, needle) in [
        (
            json!({"enroll": false, "error": "iptables-restore failed"}),
            "iptables-restore failed",
        ),
        (
            json!({"enroll": true, "error": "ztunnel not connected"}),
            "ztunnel not connected",
        ),
        // `enroll` is required: an empty reply must not read as "not enrolled".
        (json!({}), "malformed reply"),
        (json!({"error": null}), "malformed reply"),
    ] {
        let agent = FakeAgent::replying(reply.clone());
        let result = run(
            &attachment_env("ADD", POD_ARGS),
            &net_config(&agent.socket, "1.1.0", true, json!({})),
        );
        let error = result.expect_error(11);
        let msg = error["msg"].as_str().expect("msg");
        assert!(msg.contains(needle), "reply {reply}: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// DEL, CHECK, and the runtime's ordering
// ---------------------------------------------------------------------------------------------

#[test]
fn del_is_idempotent_with_and_without_an_agent() {
    let agent = FakeAgent::replying(json!({"enroll": false, "error": null}));
    let with_agent = net_config(&agent.socket, "1.1.0", true, json!({}));
    for _ in 0..2 {
        run(&attachment_env("DEL", POD_ARGS), &with_agent).expect_empty_success();
    }
    assert_eq!(commands(&agent), ["DEL", "DEL"]);
    assert_eq!(
        agent.requests()[0]["ips"],
        json!(["10.244.1.7", "fd00:10:244:1::7"])
    );

    // No agent, no prevResult, no CNI_NETNS (all allowed on DEL).
    let scratch = Scratch::new();
    let without_agent = net_config(&scratch.path("gone.sock"), "1.1.0", false, json!({}));
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", CONTAINER_ID),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", POD_ARGS),
    ];
    for _ in 0..2 {
        run(&env, &without_agent).expect_empty_success();
    }

    // An agent that errors is ignored too.
    let failing = FakeAgent::replying(json!({"enroll": false, "error": "unknown pod"}));
    run(
        &attachment_env("DEL", POD_ARGS),
        &net_config(&failing.socket, "1.0.0", true, json!({})),
    )
    .expect_empty_success();
}

#[test]
fn add_check_del_in_runtime_order() {
    let agent = FakeAgent::replying(json!({"enroll": true, "error": null}));
    let config = net_config(&agent.socket, "1.1.0", true, json!({}));

    let add = run(&attachment_env("ADD", POD_ARGS), &config);
    assert_eq!(add.status, 0, "{add:?}");
    // The runtime caches ADD's result and hands it back as prevResult to CHECK and DEL.
    let mut cached: Value = serde_json::from_str(&config).expect("config");
    cached["prevResult"] = add.json();
    let cached = cached.to_string();

    run(&attachment_env("CHECK", POD_ARGS), &cached).expect_empty_success();
    run(&attachment_env("DEL", POD_ARGS), &cached).expect_empty_success();
    assert_eq!(commands(&agent), ["ADD", "CHECK", "DEL"]);
    let check = &agent.requests()[1];
    assert_eq!(check["namespace"], "default");
    assert_eq!(check["ips"], json!(["10.244.1.7", "fd00:10:244:1::7"]));
}

#[test]
fn check_maps_agent_answers_to_codes() {
    let unknown = FakeAgent::replying(
        json!({"enroll": false, "error": "pod not captured", "error_kind": "unknown_container"}),
    );
    let result = run(
        &attachment_env("CHECK", POD_ARGS),
        &net_config(&unknown.socket, "1.1.0", true, json!({})),
    );
    result.expect_error(3);

    let scratch = Scratch::new();
    let result = run(
        &attachment_env("CHECK", POD_ARGS),
        &net_config(&scratch.path("gone.sock"), "1.1.0", true, json!({})),
    );
    result.expect_error(11);

    let result = run(
        &attachment_env("CHECK", POD_ARGS),
        &net_config(&scratch.path("gone.sock"), "1.1.0", false, json!({})),
    );
    result.expect_error(7);
}

// ---------------------------------------------------------------------------------------------
// STATUS, GC
// ---------------------------------------------------------------------------------------------

#[test]
fn status_reflects_agent_reachability() {
    let agent = FakeAgent::replying(json!({"enroll": false, "error": null}));
    let status_env = [("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")];
    run(
        &status_env,
        &net_config(&agent.socket, "1.1.0", false, json!({})),
    )
    .expect_empty_success();
    assert_eq!(agent.requests(), [json!({"command": "STATUS"})]);

    let scratch = Scratch::new();
    let socket = scratch.path("gone.sock");
    let result = run(&status_env, &net_config(&socket, "1.1.0", false, json!({})));
    let error = result.expect_error(50);
    assert!(
        error["msg"]
            .as_str()
            .expect("msg")
            .contains(&*socket.to_string_lossy())
    );

    let not_ready = FakeAgent::replying(json!({"enroll": false, "error": "ztunnel not connected"}));
    run(
        &status_env,
        &net_config(&not_ready.socket, "1.1.0", false, json!({})),
    )
    .expect_error(50);

    // STATUS does not exist before spec 1.1.0.
    run(
        &status_env,
        &net_config(&agent.socket, "1.0.0", false, json!({})),
    )
    .expect_error(1);
}

#[test]
fn gc_is_a_no_op() {
    let scratch = Scratch::new();
    let config = net_config(
        &scratch.path("gone.sock"),
        "1.1.0",
        false,
        json!({"cni.dev/valid-attachments": [{"containerID": CONTAINER_ID, "ifname": "eth0"}]}),
    );
    run(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &config,
    )
    .expect_empty_success();
}

// ---------------------------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_inputs_get_cni_error_results() {
    let scratch = Scratch::new();
    let socket = scratch.path("agent.sock");
    let good = net_config(&socket, "1.1.0", true, json!({}));
    let no_prev = net_config(&socket, "1.1.0", false, json!({}));
    let add = attachment_env("ADD", POD_ARGS);
    let add_without = |var: &str| -> Vec<(&str, &str)> {
        add.iter().copied().filter(|(k, _)| *k != var).collect()
    };
    let with = |pairs: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
        let mut env: Vec<(&str, &str)> = add
            .iter()
            .copied()
            .filter(|(k, _)| !pairs.iter().any(|(p, _)| p == k))
            .collect();
        env.extend_from_slice(pairs);
        env
    };

    struct Case<'a> {
        name: &'a str,
        env: Vec<(&'a str, &'a str)>,
        stdin: String,
        code: u64,
        /// Text the msg must contain.
        needle: &'a str,
    }
    let cases = [
        Case {
            name: "malformed JSON",
            env: add.clone(),
            stdin: r#"{"cniVersion": "1.1.0", "name": "#.into(),
            code: 6,
            needle: "line 1 column",
        },
        Case {
            name: "missing CNI_COMMAND",
            env: add_without("CNI_COMMAND"),
            stdin: good.clone(),
            code: 4,
            needle: "CNI_COMMAND is missing",
        },
        Case {
            name: "missing CNI_NETNS on ADD",
            env: add_without("CNI_NETNS"),
            stdin: good.clone(),
            code: 4,
            needle: "CNI_NETNS is missing",
        },
        Case {
            name: "missing CNI_CONTAINERID and CNI_IFNAME",
            env: with(&[("CNI_CONTAINERID", ""), ("CNI_IFNAME", "")]),
            stdin: good.clone(),
            code: 4,
            needle: "CNI_CONTAINERID is missing; CNI_IFNAME is missing",
        },
        Case {
            name: "invalid CNI_IFNAME",
            env: with(&[("CNI_IFNAME", "eth0:1")]),
            stdin: good.clone(),
            code: 4,
            needle: "CNI_IFNAME is invalid",
        },
        Case {
            name: "unknown command",
            env: with(&[("CNI_COMMAND", "FROB")]),
            stdin: good.clone(),
            code: 4,
            needle: "\"FROB\"",
        },
        Case {
            name: "ADD without prevResult",
            env: add.clone(),
            stdin: no_prev.clone(),
            code: 7,
            needle: "must be chained after an interface plugin",
        },
        Case {
            name: "wrongly typed field",
            env: add.clone(),
            stdin: net_config(&socket, "1.1.0", true, json!({"agent_timeout_ms": "5s"})),
            code: 7,
            needle: "invalid network config",
        },
        Case {
            name: "invalid Weft field",
            env: add.clone(),
            stdin: net_config(&socket, "1.1.0", true, json!({"agent_timeout_ms": 0})),
            code: 7,
            needle: "agent_timeout_ms: must be greater than 0",
        },
        Case {
            name: "unsupported cniVersion",
            env: add.clone(),
            stdin: net_config(&socket, "0.4.0", true, json!({})),
            code: 1,
            needle: "supported versions: 1.0.0, 1.1.0",
        },
        Case {
            name: "missing cniVersion",
            env: add.clone(),
            stdin: r#"{"name":"n","type":"weft-cni"}"#.into(),
            code: 1,
            needle: "no cniVersion",
        },
    ];
    for case in cases {
        let result = run(&case.env, &case.stdin);
        assert_eq!(result.status, 1, "{}: {result:?}", case.name);
        let error = result.expect_error(case.code);
        let msg = error["msg"].as_str().expect("msg");
        assert!(
            msg.contains(case.needle),
            "{}: msg {msg:?} lacks {:?}",
            case.name,
            case.needle
        );
        assert!(
            !result.stderr.is_empty(),
            "{}: the failure is logged to stderr",
            case.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------------

#[test]
fn logs_go_to_log_file_never_stdout() {
    let agent = FakeAgent::replying(json!({"enroll": true, "error": null}));
    let scratch = Scratch::new();
    let log = scratch.path("weft-cni.log");
    let result = run(
        &attachment_env("ADD", POD_ARGS),
        &net_config(&agent.socket, "1.1.0", true, json!({"log_file": log})),
    );
    assert_eq!(result.status, 0, "{result:?}");
    assert_eq!(result.json(), prev_result("1.1.0"));
    let logged = std::fs::read_to_string(&log).expect("log file written");
    assert!(
        logged.contains("invoked") && logged.contains("web-0"),
        "{logged}"
    );
    assert!(logged.contains("agent confirmed the pod"), "{logged}");
    assert!(
        result.stderr.is_empty(),
        "logs went to the file: {:?}",
        result.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Library-level parsing
// ---------------------------------------------------------------------------------------------

mod parsing {
    use weft_cni::plugin::agent::{self, decode_reply};
    use weft_cni::plugin::env::CniArgs;
    use weft_cni::plugin::{Command, Env, PodRef, parse};

    use super::*;

    #[test]
    fn parse_builds_the_attachment_from_env_and_stdin() {
        let env = Env::from_vars(attachment_env("ADD", POD_ARGS));
        let stdin = net_config(Path::new("/run/a.sock"), "1.0.0", true, json!({}));
        let invocation = parse(&env, stdin.as_bytes()).expect("valid invocation");
        assert_eq!(invocation.command(), Command::Add);
        let attachment = invocation.attachment().expect("attachment");
        assert_eq!(attachment.container_id, CONTAINER_ID);
        assert_eq!(attachment.netns.as_deref(), Some(NETNS));
        assert_eq!(
            attachment.pod,
            Some(PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: Some("0d1c2b3a-uid".into())
            })
        );
        let config = invocation.config().expect("config");
        assert_eq!(config.agent_socket, Path::new("/run/a.sock"));
        assert_eq!(config.agent_timeout, Duration::from_millis(2000));
    }

    #[test]
    fn cni_args_without_pod_name_is_not_kubernetes() {
        let args = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=default").expect("valid");
        assert_eq!(args.pod(), None);
        assert_eq!(args.get("IgnoreUnknown"), Some("1"));
        assert!(CniArgs::parse("K8S_POD_NAME").is_err());
    }

    #[test]
    fn replies_must_say_enroll() {
        assert_eq!(
            decode_reply(br#"{"enroll":true,"error":null}"#).ok(),
            Some(agent::Reply::ok(true))
        );
        assert!(decode_reply(br#"{"error":null}"#).is_err());
    }
}
