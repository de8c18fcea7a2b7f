//! The ZDS client against a scripted node agent on a real `SOCK_SEQPACKET` socket, with a real
//! network-namespace fd passed by `SCM_RIGHTS`.
#![allow(clippy::unwrap_used)] // test helpers fail loudly
#![allow(unsafe_code)] // the scripted agent adopts the fds accept(2) returns

use std::collections::BTreeSet;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use prost::Message;
use weft_proto::istio::workload::zds::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request::Payload, workload_response,
};
use ztunnel::zds::{self, Manager, Pod};

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Add {
        uid: String,
        name: String,
        netns_inode: u64,
    },
    Remove(String),
    Reconcile(BTreeSet<String>),
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Event>>>);

impl Manager for Recorder {
    fn add(&mut self, pod: Pod) -> futures::future::BoxFuture<'_, Result<(), String>> {
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", pod.netns.as_raw_fd()))
            .unwrap()
            .ino();
        self.0.lock().unwrap().push(Event::Add {
            uid: pod.uid,
            name: pod.info.name,
            netns_inode: inode,
        });
        Box::pin(std::future::ready(Ok(())))
    }
    fn remove(&mut self, uid: &str) {
        self.0.lock().unwrap().push(Event::Remove(uid.to_owned()));
    }
    fn reconcile(&mut self, keep: &BTreeSet<String>) {
        self.0.lock().unwrap().push(Event::Reconcile(keep.clone()));
    }
}

/// The scripted agent: a listening SEQPACKET socket.
struct Agent {
    listener: OwnedFd,
    path: PathBuf,
}

impl Agent {
    fn new(tag: &str) -> Agent {
        let path = std::env::temp_dir().join(format!("weft-zds-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        socket::listen(&listener, socket::Backlog::new(4).unwrap()).unwrap();
        Agent { listener, path }
    }

    /// Accepts a connection and checks the hello.
    fn accept(&self) -> OwnedFd {
        let raw = socket::accept(self.listener.as_raw_fd()).unwrap();
        // SAFETY: accept(2) just returned this descriptor; nothing else owns it.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        let hello = ZdsHello::decode(recv(&conn).as_slice()).unwrap();
        assert_eq!(hello.version, Version::V1 as i32);
        conn
    }
}

fn recv(conn: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(conn.as_raw_fd(), &mut iov, None, MsgFlags::empty()).unwrap();
    let n = msg.bytes;
    buf.truncate(n);
    buf
}

fn send(conn: &OwnedFd, payload: Payload, fd: Option<&OwnedFd>) -> String {
    let bytes = WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec();
    let iov = [IoSlice::new(&bytes)];
    let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    socket::sendmsg::<()>(conn.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).unwrap();
    let response = WorkloadResponse::decode(recv(conn).as_slice()).unwrap();
    match response.payload.unwrap() {
        workload_response::Payload::Ack(ack) => ack.error,
    }
}

fn add(uid: &str) -> Payload {
    Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: Some(WorkloadInfo {
            name: format!("pod-{uid}"),
            namespace: "a".into(),
            service_account: "sa".into(),
        }),
    })
}

fn netns() -> OwnedFd {
    std::fs::File::open("/proc/self/ns/net").unwrap().into()
}

fn self_netns_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_add_keep_del_and_protocol_errors() {
    let agent = Agent::new("proto");
    let recorder = Recorder::default();
    let (trigger, watch) = weft_core::drain::channel();
    let client = tokio::spawn(zds::run(
        agent.path.clone(),
        Box::new(recorder.clone()),
        watch,
    ));

    let script = std::thread::spawn(move || {
        let conn = agent.accept();
        assert_eq!(send(&conn, add("u1"), Some(&netns())), "", "add acked");
        assert!(
            send(&conn, add("u3"), None).contains("no netns fd"),
            "add without fd is nacked"
        );
        assert!(
            send(
                &conn,
                Payload::Keep(KeepWorkload { uid: "u2".into() }),
                Some(&netns())
            )
            .contains("only valid on AddWorkload")
        );
        assert_eq!(
            send(
                &conn,
                Payload::Keep(KeepWorkload { uid: "u2".into() }),
                None
            ),
            ""
        );
        assert_eq!(
            send(&conn, Payload::SnapshotSent(SnapshotSent {}), None),
            ""
        );
        assert_eq!(
            send(&conn, Payload::Del(DelWorkload { uid: "u1".into() }), None),
            ""
        );

        // Garbage: NACKed, and the client reconnects with a new hello.
        let garbage = [0xffu8, 0xff, 0xff];
        socket::send(conn.as_raw_fd(), &garbage, MsgFlags::empty()).unwrap();
        let response = WorkloadResponse::decode(recv(&conn).as_slice()).unwrap();
        let workload_response::Payload::Ack(ack) = response.payload.unwrap();
        assert!(ack.error.contains("undecodable"), "{}", ack.error);
        let conn = agent.accept();

        // Keep after the snapshot is fatal.
        assert_eq!(
            send(&conn, Payload::SnapshotSent(SnapshotSent {}), None),
            ""
        );
        assert!(
            send(
                &conn,
                Payload::Keep(KeepWorkload { uid: "u9".into() }),
                None
            )
            .contains("after the snapshot")
        );
        agent
    });

    let result = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("client ends")
        .unwrap();
    assert!(matches!(result, Err(zds::Error::Protocol(_))), "{result:?}");
    let agent = script.join().unwrap();
    let events = recorder.0.lock().unwrap().clone();
    assert_eq!(
        events,
        vec![
            Event::Add {
                uid: "u1".into(),
                name: "pod-u1".into(),
                netns_inode: self_netns_inode()
            },
            Event::Reconcile(["u1".to_owned(), "u2".to_owned()].into()),
            Event::Remove("u1".into()),
            Event::Reconcile(BTreeSet::new()),
        ]
    );
    drop(trigger);
    let _ = std::fs::remove_file(agent.path);
}

#[tokio::test]
async fn reconnects_until_the_agent_listens_and_stops_on_drain() {
    let path = std::env::temp_dir().join(format!("weft-zds-late-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let recorder = Recorder::default();
    let (trigger, watch) = weft_core::drain::channel();
    let client = tokio::spawn(zds::run(path.clone(), Box::new(recorder.clone()), watch));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !client.is_finished(),
        "keeps retrying while no agent listens"
    );
    let _ = trigger.drain(Duration::from_secs(1)).await;
    let result = tokio::time::timeout(Duration::from_secs(5), client)
        .await
        .expect("stops on drain")
        .unwrap();
    assert!(result.is_ok());
}
