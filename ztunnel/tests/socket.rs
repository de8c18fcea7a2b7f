//! In-pod sockets against real network namespaces: each test makes its own throw-away netns
//! (`weft-sockettest-<pid>-<n>`, deleted on drop) and all traffic stays inside it; the host
//! namespace's network configuration is never touched. Needs root (skipped with a printed
//! reason otherwise; CI runs as root).
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use ztunnel::netns::{Id, InpodNetns};
use ztunnel::socket::{self, ConnectOptions, ListenerOptions, Transparent};

/// The pod's address (on `v0`, a veth whose peer `v1` is also in the netns).
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// Bound for every await.
const STEP: Duration = Duration::from_secs(5);

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1)) // effective uid
        == Some("0")
}

macro_rules! require_root {
    ($name:expr) => {
        if !is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} needs root (network namespaces) and CI is set: a skip in CI is a failure",
                $name
            );
            // Straight to stderr, past the test harness's output capture, so skips show.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {}: needs root (network namespaces)",
                $name
            );
            return;
        }
    };
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {STEP:?}: {what}"),
    }
}

/// Runs a command line (split on whitespace); panics with its stderr if it fails.
fn run(line: &str) {
    let cmd: Vec<&str> = line.split_whitespace().collect();
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throw-away named netns with `lo` up and `v0` (10.99.0.2/24) ⟷ `v1`, deleted on drop.
struct TestNetns {
    name: String,
    netns: InpodNetns,
}

impl TestNetns {
    fn new() -> TestNetns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("weft-sockettest-{}-{n}", std::process::id());
        run(&format!("ip netns add {name}"));
        // From here on the guard deletes the namespace, even if setup fails.
        let mut guard = Guard(Some(name.clone()));
        for step in [
            "link set lo up",
            "link add v0 type veth peer name v1",
            "addr add 10.99.0.2/24 dev v0",
            "link set v1 up",
            "link set v0 up",
        ] {
            run(&format!("ip -n {name} {step}"));
        }
        let netns = InpodNetns::open(format!("/run/netns/{name}")).unwrap();
        guard.0 = None;
        TestNetns { name, netns }
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    fn exec(&self, line: &str) {
        run(&format!("ip netns exec {} {line}", self.name));
    }

    /// Runs `ip -n <netns> <args>`.
    fn ip(&self, args: &str) {
        run(&format!("ip -n {} {args}", self.name));
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

struct Guard(Option<String>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(name) = &self.0 {
            delete_netns(name);
        }
    }
}

fn delete_netns(name: &str) {
    let _ = Command::new("ip").args(["netns", "delete", name]).status();
}

/// A plain client socket created in `netns` (no mark, no options), connected to `addr`.
async fn client_in(netns: &InpodNetns, addr: SocketAddr) -> TcpStream {
    let std = within(
        &format!("client connect to {addr}"),
        netns.run_async(move || {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_nonblocking(true)?;
            Ok(s)
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("client connect to {addr}: {e}"));
    TcpStream::from_std(std).unwrap()
}

async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    within("accept", listener.accept()).await.unwrap()
}

fn thread_netns() -> Id {
    let meta = std::fs::metadata("/proc/thread-self/ns/net").unwrap();
    Id {
        dev: meta.dev(),
        ino: meta.ino(),
    }
}

#[tokio::test]
async fn listener_lives_in_pod_netns() {
    require_root!("listener_lives_in_pod_netns");
    let pod = TestNetns::new();
    let listener = socket::listener(
        &pod.netns,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        &ListenerOptions::default(),
    )
    .unwrap();
    let port = listener.local_addr().unwrap().port();

    // Reachable from the pod netns on the pod's address.
    let pod_addr = SocketAddr::from((POD_IP, port));
    let client = client_in(&pod.netns, pod_addr).await;
    let (stream, peer) = accept(&listener).await;
    assert_eq!(peer, client.local_addr().unwrap());
    assert_eq!(peer.ip(), IpAddr::from(POD_IP));

    // accepted(): TCP_NODELAY and keepalive 180 s / 180 s / 9.
    socket::accepted(&stream).unwrap();
    let sock = SockRef::from(&stream);
    assert!(sock.tcp_nodelay().unwrap());
    assert!(sock.keepalive().unwrap());
    assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(180));
    assert_eq!(
        sock.tcp_keepalive_interval().unwrap(),
        Duration::from_secs(180)
    );
    assert_eq!(sock.tcp_keepalive_retries().unwrap(), 9);

    // No redirect rules in this netns: the original destination is the local address.
    assert_eq!(socket::original_dst(&stream).unwrap(), pod_addr);

    // Not visible from the test's (ztunnel's) own netns: loopback connect to the same port
    // never reaches the pod listener (and is normally refused outright).
    let host = within(
        "host loopback connect",
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
    )
    .await;
    if let Err(e) = &host {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    }
    let stray = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(
        stray.is_err(),
        "pod listener accepted a connection from the host netns"
    );
}

#[tokio::test]
async fn marks_on_listeners_and_upstreams() {
    require_root!("marks_on_listeners_and_upstreams");
    let pod = TestNetns::new();
    let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let marked = socket::listener(&pod.netns, any, &ListenerOptions::default()).unwrap();
    assert_eq!(socket::mark_of(&marked).unwrap(), 0x539);
    let unmarked_opts = ListenerOptions {
        mark: 0,
        transparent: Transparent::Off,
        reuse_port: false,
        ..ListenerOptions::default()
    };
    let unmarked = socket::listener(&pod.netns, any, &unmarked_opts).unwrap();
    assert_eq!(socket::mark_of(&unmarked).unwrap(), 0);
    assert!(!SockRef::from(&unmarked).reuse_port().unwrap());
    assert!(SockRef::from(&marked).reuse_port().unwrap());
    assert!(SockRef::from(&marked).ip_transparent_v4().unwrap());

    let dst = SocketAddr::from((POD_IP, marked.local_addr().unwrap().port()));
    let upstream = within(
        "connect marked upstream",
        socket::connect(&pod.netns, dst, &ConnectOptions::default()),
    )
    .await
    .unwrap();
    let (accepted, _) = accept(&marked).await;
    assert_eq!(socket::mark_of(&upstream).unwrap(), 0x539);
    assert!(upstream.nodelay().unwrap());
    assert_eq!(
        SockRef::from(&upstream).tcp_keepalive_time().unwrap(),
        Duration::from_secs(180)
    );
    // Linux copies the listener's mark to the sockets it accepts, so replies are marked too.
    assert_eq!(socket::mark_of(&accepted).unwrap(), 0x539);

    let plain = ConnectOptions {
        mark: 0,
        ..ConnectOptions::default()
    };
    let upstream = within(
        "connect unmarked upstream",
        socket::connect(&pod.netns, dst, &plain),
    )
    .await
    .unwrap();
    let _accepted = accept(&marked).await;
    assert_eq!(socket::mark_of(&upstream).unwrap(), 0);
}

#[tokio::test]
async fn original_dst_after_redirect() {
    require_root!("original_dst_after_redirect");
    let pod = TestNetns::new();
    pod.exec(
        "iptables -t nat -A OUTPUT -p tcp -d 10.99.0.9 --dport 80 -j REDIRECT --to-ports 15001",
    );
    // Dual-stack like ztunnel's 15001: the v4 connection arrives v4-mapped and must come back
    // canonicalised.
    let listener = socket::listener(
        &pod.netns,
        "[::]:15001".parse().unwrap(),
        &ListenerOptions::default(),
    )
    .unwrap();
    let _client = client_in(&pod.netns, "10.99.0.9:80".parse().unwrap()).await;
    let (stream, _) = accept(&listener).await;
    assert_eq!(
        socket::original_dst(&stream).unwrap(),
        "10.99.0.9:80".parse::<SocketAddr>().unwrap()
    );

    // A direct (not redirected) connection reports the local address.
    let _client = client_in(&pod.netns, "10.99.0.2:15001".parse().unwrap()).await;
    let (stream, _) = accept(&listener).await;
    assert_eq!(
        socket::original_dst(&stream).unwrap(),
        "10.99.0.2:15001".parse::<SocketAddr>().unwrap()
    );
}

#[tokio::test]
async fn connect_preserves_client_source() {
    require_root!("connect_preserves_client_source");
    let pod = TestNetns::new();
    // The reply path istio-cni installs in every pod (reference §5.2): packets ztunnel sends
    // (mark 0x539) tag their connection 0x111; the app's replies get that mark restored and
    // policy routing delivers them locally (table 100: everything is local) to ztunnel's
    // transparent socket instead of out of the pod. 10.99.0.77 is not configured anywhere, so
    // binding it also needs IP_TRANSPARENT/IP_FREEBIND.
    pod.exec(concat!(
        "iptables -t mangle -A PREROUTING -m mark --mark 0x539/0xfff",
        " -j CONNMARK --set-xmark 0x111/0xfff"
    ));
    pod.exec(concat!(
        "iptables -t mangle -A OUTPUT -m connmark --mark 0x111/0xfff",
        " -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
    ));
    pod.ip("rule add fwmark 0x111/0xfff pref 32764 lookup 100");
    pod.ip("route add local 0.0.0.0/0 dev lo table 100");

    let app = socket::listener(
        &pod.netns,
        "10.99.0.2:8080".parse().unwrap(),
        &ListenerOptions {
            mark: 0,
            transparent: Transparent::Off,
            ..ListenerOptions::default()
        },
    )
    .unwrap();
    let client_ip: IpAddr = "10.99.0.77".parse().unwrap();
    let opts = ConnectOptions {
        source: Some(client_ip),
        ..ConnectOptions::default()
    };
    let upstream = within(
        "spoofed connect",
        socket::connect(&pod.netns, "10.99.0.2:8080".parse().unwrap(), &opts),
    )
    .await
    .unwrap();
    let (_conn, peer) = accept(&app).await;
    assert_eq!(peer.ip(), client_ip);
    assert_eq!(upstream.local_addr().unwrap(), peer);
    assert!(SockRef::from(&upstream).ip_transparent_v4().unwrap());

    // Source equal to the destination IP: no spoofing, no transparent socket.
    let same = ConnectOptions {
        source: Some(IpAddr::from(POD_IP)),
        ..ConnectOptions::default()
    };
    let upstream = within(
        "same-ip connect",
        socket::connect(&pod.netns, "10.99.0.2:8080".parse().unwrap(), &same),
    )
    .await
    .unwrap();
    let (_conn, peer) = accept(&app).await;
    assert_eq!(peer.ip(), IpAddr::from(POD_IP));
    assert!(!SockRef::from(&upstream).ip_transparent_v4().unwrap());

    // Without the mark the reply is not steered back: the handshake never completes.
    let unmarked = ConnectOptions {
        mark: 0,
        timeout: Duration::from_secs(1),
        ..opts.clone()
    };
    let err = within(
        "unmarked spoofed connect",
        socket::connect(&pod.netns, "10.99.0.2:8080".parse().unwrap(), &unmarked),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    // Mixed families are refused up front.
    let mixed = ConnectOptions {
        source: Some("fd00::77".parse().unwrap()),
        ..ConnectOptions::default()
    };
    let err = within(
        "mixed-family connect",
        socket::connect(&pod.netns, "10.99.0.2:8080".parse().unwrap(), &mixed),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
}

#[tokio::test]
async fn run_switches_only_the_worker() {
    require_root!("run_switches_only_the_worker");
    let pod = TestNetns::new();
    let meta = std::fs::metadata(format!("/run/netns/{}", pod.name)).unwrap();
    let expected = Id {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    assert_eq!(pod.netns.id(), expected);
    let adopted = InpodNetns::new(
        std::fs::File::open(format!("/run/netns/{}", pod.name))
            .unwrap()
            .into(),
    )
    .unwrap();
    assert_eq!(adopted, pod.netns);
    assert_ne!(InpodNetns::current().unwrap(), pod.netns);

    let home = ztunnel::netns::init().unwrap();
    let before = thread_netns();
    assert_eq!(home, before);
    let inside = pod.netns.run(|| Ok(thread_netns())).unwrap();
    assert_eq!(inside, expected);
    assert_eq!(thread_netns(), before);

    let inside = within("run_async", pod.netns.run_async(|| Ok(thread_netns())))
        .await
        .unwrap();
    assert_eq!(inside, expected);
    assert_eq!(thread_netns(), before);

    // The worker goes home between jobs.
    let current = InpodNetns::current().unwrap();
    assert_eq!(current.run(|| Ok(thread_netns())).unwrap(), before);

    // Nested use would deadlock and is refused; a panic reaches the caller and the worker
    // survives it.
    let nested = pod.netns.clone();
    let err = pod.netns.run(move || nested.run(|| Ok(()))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
    let ns = pod.netns.clone();
    let panicked =
        std::thread::spawn(move || ns.run(|| -> std::io::Result<()> { panic!("boom") })).join();
    assert!(panicked.is_err());
    assert_eq!(pod.netns.run(|| Ok(thread_netns())).unwrap(), expected);
    assert_eq!(thread_netns(), before);
}
