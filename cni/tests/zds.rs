//! The ZDS server against ztunnel's real ZDS client: snapshot on connect, live adds with the
//! netns fd, deletes, NACKs, and "no ztunnel connected".
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use weft_cni::zds::{Error, Server};
use weft_proto::istio::workload::zds::WorkloadInfo;
use ztunnel::zds::{Manager, Pod};

const T: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Add(String, u64),
    Remove(String),
    Reconcile(Vec<String>),
}

#[derive(Clone, Default)]
struct Recorder {
    events: Arc<Mutex<Vec<Event>>>,
    refuse: Arc<Mutex<Option<String>>>,
}

impl Manager for Recorder {
    fn add(&mut self, pod: Pod) -> BoxFuture<'_, Result<(), String>> {
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", pod.netns.as_raw_fd()))
            .unwrap()
            .ino();
        if let Some(reason) = self.refuse.lock().unwrap().clone() {
            return Box::pin(std::future::ready(Err(reason)));
        }
        self.events.lock().unwrap().push(Event::Add(pod.uid, inode));
        Box::pin(std::future::ready(Ok(())))
    }
    fn remove(&mut self, uid: &str) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Remove(uid.to_owned()));
    }
    fn reconcile(&mut self, keep: &BTreeSet<String>) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Reconcile(keep.iter().cloned().collect()));
    }
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "a".into(),
        service_account: "sa".into(),
    }
}

fn netns() -> OwnedFd {
    std::fs::File::open("/proc/self/ns/net").unwrap().into()
}

fn netns_inode() -> u64 {
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

async fn until(what: &str, f: impl Fn() -> bool) {
    tokio::time::timeout(T, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {what}"));
}

/// Waits until the recorder saw ztunnel reconcile a snapshot.
async fn reconciled(events: &Mutex<Vec<Event>>) {
    until("snapshot reconciled", || {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, Event::Reconcile(_)))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_live_adds_and_deletes_reach_ztunnel() {
    let path = std::env::temp_dir().join(format!("weft-cni-zds-{}.sock", std::process::id()));
    let server = Server::bind(&path).unwrap();
    assert_eq!(
        server.add_pod("u0", info("p0"), netns()).await,
        Err(Error::NotConnected)
    );

    // ztunnel connects: it gets the snapshot (u0) and reconciles.
    let recorder = Recorder::default();
    let (trigger, watch) = weft_core::drain::channel();
    let client = tokio::spawn(ztunnel::zds::run(
        path.clone(),
        Box::new(recorder.clone()),
        watch,
    ));
    let events = recorder.events.clone();
    reconciled(&events).await;
    assert_eq!(
        events.lock().unwrap().clone(),
        vec![
            Event::Add("u0".into(), netns_inode()),
            Event::Reconcile(vec!["u0".into()])
        ]
    );
    assert_eq!(server.connections(), 1);

    // Live add and delete.
    tokio::time::timeout(T, server.add_pod("u1", info("p1"), netns()))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(T, server.del_pod("u0")).await.unwrap();
    assert_eq!(
        events.lock().unwrap()[2..].to_vec(),
        vec![
            Event::Add("u1".into(), netns_inode()),
            Event::Remove("u0".into())
        ]
    );

    // A refusal comes back as the NACK text.
    *recorder.refuse.lock().unwrap() = Some("no workload yet".into());
    let refused = tokio::time::timeout(T, server.add_pod("u2", info("p2"), netns()))
        .await
        .unwrap();
    assert_eq!(refused, Err(Error::Nack("no workload yet".into())));

    drop(trigger);
    let _ = tokio::time::timeout(T, client).await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_server_takes_ztunnel_only_once_opened_with_every_pod() {
    // A restarted agent restores its pods one by one; a ztunnel connecting meanwhile must get
    // them all in its first snapshot, or it would stop the proxies of the pods not yet restored.
    let path =
        std::env::temp_dir().join(format!("weft-cni-zds-closed-{}.sock", std::process::id()));
    let server = Server::bind_closed(&path).unwrap();
    let recorder = Recorder::default();
    let (trigger, watch) = weft_core::drain::channel();
    let client = tokio::spawn(ztunnel::zds::run(
        path.clone(),
        Box::new(recorder.clone()),
        watch,
    ));
    assert_eq!(
        server.add_pod("u0", info("p0"), netns()).await,
        Err(Error::NotConnected)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.connections(), 0, "not taken while closed");
    assert!(recorder.events.lock().unwrap().is_empty());
    assert_eq!(
        server.add_pod("u1", info("p1"), netns()).await,
        Err(Error::NotConnected)
    );
    server.open();
    let events = recorder.events.clone();
    reconciled(&events).await;
    let seen = events.lock().unwrap().clone();
    assert_eq!(
        seen.last(),
        Some(&Event::Reconcile(vec!["u0".into(), "u1".into()])),
        "{seen:?}"
    );
    drop(trigger);
    let _ = tokio::time::timeout(T, client).await;
    let _ = std::fs::remove_file(&path);
}
