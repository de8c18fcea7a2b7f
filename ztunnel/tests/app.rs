//! ztunnel end to end with the real controller: xDS and certificates from `weft-controller`
//! (files source, TLS, bootstrap token), a pod handed over by a scripted node agent over ZDS
//! with its real network namespace, in-pod redirection rules, and traffic from the pod's app to
//! a service VIP carried over HBONE. Needs root (skipped with a printed reason otherwise).
#![allow(clippy::unwrap_used)] // test helpers fail loudly
#![allow(unsafe_code)] // the scripted agent adopts the fd accept(2) returns

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use clap::Parser;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_proto::istio::workload::zds::{
    AddWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest, workload_request::Payload,
};

mod support;

use support::{PodNetns, SKIP_ZTUNNEL, VIP_TO_OUTBOUND, root_or_skip};

const T: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http(addr, "GET", path).await
}

async fn http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let mut conn = TcpStream::connect(addr).await.ok()?;
    conn.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await.ok()?;
    let status = text.get(9..12)?.parse().ok()?;
    Some((status, text))
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: a, uid: pod-uid-1, labels: {app: echo}, annotations: {ambient.istio.io/redirection: enabled}}
spec: {nodeName: node-1, serviceAccountName: server, containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.99.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: a}
spec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10], selector: {app: echo}, ports: [{name: http, port: 80, targetPort: http}]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_serves_a_pod_with_the_real_controller() {
    if !root_or_skip("ztunnel_serves_a_pod_with_the_real_controller") {
        return;
    }
    let tag = std::process::id();
    let dir = std::env::temp_dir().join(format!("weft-ztunnel-app-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("store")).unwrap();
    std::fs::write(dir.join("store/objects.yaml"), OBJECTS).unwrap();

    // The pod's network namespace with the in-pod rules (subset of reference §5.2).
    let pod = PodNetns::new("weft-zttest", &[SKIP_ZTUNNEL, VIP_TO_OUTBOUND]);
    let (name, netns) = (pod.name.clone(), pod.netns.clone());
    let app = netns
        .run(|| {
            let l = std::net::TcpListener::bind("10.99.0.2:8080")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .unwrap();
    let app = tokio::net::TcpListener::from_std(app).unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = conn.read_to_end(&mut got).await;
                let _ = conn.write_all(&got).await;
            });
        }
    });

    // The controller.
    let xds: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let controller = weft_controller::config::Config::try_parse_from([
        "weft-controller",
        "--files",
        dir.join("store").to_str().unwrap(),
        "--state-dir",
        dir.join("controller").to_str().unwrap(),
        "--listen",
        &xds.to_string(),
        "--debug-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--drain-deadline",
        "1s",
    ])
    .unwrap();
    let (stop_controller, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(weft_controller::app::run(controller, async move {
        let _ = stopped.await;
    }));
    let root = dir.join("controller/ca/root-cert.pem");
    let token = dir.join("controller/tokens/node-1.token");
    tokio::time::timeout(T, async {
        while !token.exists() || TcpStream::connect(xds).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("controller up");

    // The scripted node agent: one pod, then the snapshot.
    let zds_path = dir.join("ztunnel.sock");
    let listener = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    socket::bind(listener.as_raw_fd(), &UnixAddr::new(&zds_path).unwrap()).unwrap();
    socket::listen(&listener, socket::Backlog::new(4).unwrap()).unwrap();
    let netns_fd: OwnedFd = std::fs::File::open(format!("/run/netns/{name}"))
        .unwrap()
        .into();
    let agent = std::thread::spawn(move || {
        let raw = socket::accept(listener.as_raw_fd()).unwrap();
        // SAFETY: accept(2) just returned this descriptor; nothing else owns it.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut buf = vec![0u8; 1024];
        let recv = |buf: &mut Vec<u8>| {
            let mut iov = [IoSliceMut::new(buf)];
            socket::recvmsg::<()>(conn.as_raw_fd(), &mut iov, None, MsgFlags::empty())
                .unwrap()
                .bytes
        };
        recv(&mut buf); // hello
        let add = WorkloadRequest {
            payload: Some(Payload::Add(AddWorkload {
                uid: "pod-uid-1".into(),
                workload_info: Some(WorkloadInfo {
                    name: "p".into(),
                    namespace: "a".into(),
                    service_account: "server".into(),
                }),
            })),
        }
        .encode_to_vec();
        let fds = [netns_fd.as_raw_fd()];
        socket::sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(&add)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let n = recv(&mut buf);
        let add_ack = buf[..n].to_vec();
        let snapshot = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(SnapshotSent {})),
        }
        .encode_to_vec();
        socket::send(conn.as_raw_fd(), &snapshot, MsgFlags::empty()).unwrap();
        let n = recv(&mut buf);
        (add_ack, buf[..n].to_vec(), conn)
    });

    // ztunnel.
    let readiness: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let stats: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = ztunnel::config::Config::try_parse_from([
        "ztunnel",
        "--xds-address",
        &format!("https://{xds}"),
        "--root-cert",
        root.to_str().unwrap(),
        "--server-name",
        "localhost",
        "--token",
        token.to_str().unwrap(),
        "--node-name",
        "node-1",
        "--zds-socket",
        zds_path.to_str().unwrap(),
        "--admin",
        &admin.to_string(),
        "--stats",
        &stats.to_string(),
        "--readiness",
        &readiness.to_string(),
    ])
    .unwrap();
    let ztunnel = tokio::spawn(ztunnel::app::run(config, std::future::pending()));

    // Ready once xDS synced and the agent's snapshot was applied.
    tokio::time::timeout(T, async {
        loop {
            if let Some((200, _)) = http_get(readiness, "/healthz/ready").await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("ztunnel ready");
    let (add_ack, snapshot_ack, _conn) = agent.join().unwrap();
    let decode = |b: &[u8]| match weft_proto::istio::workload::zds::WorkloadResponse::decode(b)
        .unwrap()
        .payload
        .unwrap()
    {
        weft_proto::istio::workload::zds::workload_response::Payload::Ack(ack) => ack.error,
    };
    assert_eq!(decode(&add_ack), "", "the pod was accepted");
    assert_eq!(decode(&snapshot_ack), "");

    // The pod's app dials the service VIP: captured on 15001, HBONE with controller-issued
    // certificates to 15008, then to the app.
    let std = netns
        .run_async(|| {
            let s = std::net::TcpStream::connect_timeout(
                &"10.96.0.10:80".parse().unwrap(),
                Duration::from_secs(3),
            )?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .await
        .unwrap();
    let mut stream = TcpStream::from_std(std).unwrap();
    stream.write_all(b"through the mesh").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(T, stream.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "through the mesh");

    let (_, metrics) = http_get(stats, "/stats/prometheus").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/a/sa/server\"")),
        "{metrics}"
    );
    let (_, dump) = http_get(admin, "/config_dump").await.unwrap();
    assert!(
        dump.contains("Kubernetes//Pod/a/p") && dump.contains("\"available\""),
        "{dump}"
    );

    // Per-pod state: the pod's proxy runs.
    let dump: serde_json::Value =
        serde_json::from_str(dump.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(dump["pods"][0]["name"], "a/p", "{dump}");
    assert_eq!(dump["pods"][0]["state"], "running", "{dump}");
    // Logging is set up by the binary, not by this embedding: the endpoint says so.
    assert_eq!(http_get(admin, "/logging").await.unwrap().0, 501);

    // /quitquitquit: only POST; it drains and ends ztunnel without the shutdown signal.
    assert_eq!(http_get(admin, "/quitquitquit").await.unwrap().0, 405);
    assert_eq!(http(admin, "POST", "/quitquitquit").await.unwrap().0, 200);
    let result = tokio::time::timeout(T, ztunnel)
        .await
        .expect("ztunnel stops")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    let _ = stop_controller.send(());
    let _ = std::fs::remove_dir_all(&dir);
}
