//! The ZDS server: hands enrolled pods' network namespaces to ztunnel over a `SOCK_SEQPACKET`
//! unix socket (istio-ztunnel reference §4, istio-ambient reference §4.5).
//!
//! Per connection: read ztunnel's `ZdsHello{V1}`, send the snapshot (`AddWorkload` + the netns
//! fd by `SCM_RIGHTS` for every known pod, then `SnapshotSent`), then steady-state `AddWorkload`
//! / `DelWorkload`. Exactly one message is outstanding per connection: each waits for its `Ack`
//! (5 s). With several ztunnels connected (an upgrade), adds go to the newest, deletes to all.
#![allow(unsafe_code)] // accepted sockets arrive as raw fds; AsyncFd registration

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use weft_proto::istio::workload::zds::{
    AddWorkload, DelWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request::Payload, workload_response,
};

/// How long ztunnel has to acknowledge a message.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a pod could not be handed to ztunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No ztunnel is connected.
    #[error("no ztunnel connected")]
    NotConnected,
    /// ztunnel refused the pod.
    #[error("ztunnel refused: {0}")]
    Nack(String),
    /// ztunnel did not answer in time or the connection broke.
    #[error("ztunnel did not acknowledge: {0}")]
    NoAck(String),
    /// The socket could not be created.
    #[error("zds socket {0}: {1}")]
    Socket(String, String),
}

struct Outgoing {
    payload: Payload,
    fd: Option<Arc<OwnedFd>>,
    reply: oneshot::Sender<Result<(), Error>>,
}

struct Pod {
    info: WorkloadInfo,
    netns: Arc<OwnedFd>,
}

#[derive(Default)]
struct State {
    pods: BTreeMap<String, Pod>,
    connections: Vec<(u64, mpsc::Sender<Outgoing>)>,
    next_id: u64,
}

/// Counts snapshots ztunnels have acknowledged (`SnapshotSent` acked).
type Snapshots = tokio::sync::watch::Sender<u64>;

/// The ZDS server of one node.
#[derive(Clone)]
pub struct Server {
    state: Arc<Mutex<State>>,
    snapshots: Arc<Snapshots>,
    path: PathBuf,
    /// Whether ztunnels are taken (their first snapshot is complete only then).
    open: Arc<tokio::sync::watch::Sender<bool>>,
}

fn sys(path: &Path) -> impl FnOnce(nix::Error) -> Error + '_ {
    move |e| Error::Socket(path.display().to_string(), e.to_string())
}

impl Server {
    /// Binds `path` (replacing a stale socket file) and starts accepting ztunnels on the current
    /// runtime.
    ///
    /// # Errors
    /// [`Error::Socket`].
    pub fn bind(path: &Path) -> Result<Server, Error> {
        let server = Self::bind_closed(path)?;
        server.open();
        Ok(server)
    }

    /// Binds `path` like [`Server::bind`] but takes no ztunnel until [`Server::open`]: a ztunnel
    /// that connects meanwhile waits in the socket's backlog. A restarted agent restores every
    /// recorded pod first, so the snapshot a ztunnel gets is whole — a partial one would make
    /// ztunnel stop the proxies of the pods not yet restored.
    ///
    /// # Errors
    /// [`Error::Socket`].
    pub fn bind_closed(path: &Path) -> Result<Server, Error> {
        let _ = std::fs::remove_file(path);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let listener = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(sys(path))?;
        socket::bind(
            listener.as_raw_fd(),
            &UnixAddr::new(path).map_err(sys(path))?,
        )
        .map_err(sys(path))?;
        socket::listen(&listener, socket::Backlog::new(16).map_err(sys(path))?)
            .map_err(sys(path))?;
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open for its lifetime.
        let listener = unsafe { AsyncFd::register(listener) }
            .map_err(|e| Error::Socket(path.display().to_string(), e.to_string()))?;
        let server = Server {
            state: Arc::new(Mutex::new(State::default())),
            snapshots: Arc::new(Snapshots::new(0)),
            path: path.to_path_buf(),
            open: Arc::new(tokio::sync::watch::Sender::new(false)),
        };
        tokio::spawn(server.clone().accept_loop(listener));
        Ok(server)
    }

    /// Starts taking ztunnels (see [`Server::bind_closed`]); idempotent.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes each time a ztunnel acknowledges a full snapshot: every pod known then (pending
    /// ones included) is now held by a ztunnel.
    pub fn snapshots(&self) -> tokio::sync::watch::Receiver<u64> {
        self.snapshots.subscribe()
    }

    /// Number of connected ztunnels.
    pub fn connections(&self) -> usize {
        self.state.lock().map(|s| s.connections.len()).unwrap_or(0)
    }

    async fn accept_loop(self, listener: AsyncFd<OwnedFd>) {
        let mut open = self.open.subscribe();
        if open.wait_for(|open| *open).await.is_err() {
            return;
        }
        loop {
            let Ok(mut guard) = listener.readable().await else {
                return;
            };
            let accepted = guard.try_io(|fd| {
                socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(std::io::Error::from)
            });
            let raw = match accepted {
                Ok(Ok(raw)) => raw,
                Ok(Err(err)) => {
                    warn!(error = %err, "zds accept failed");
                    continue;
                }
                Err(_would_block) => continue,
            };
            // SAFETY: accept4(2) just returned this descriptor; nothing else owns it.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: as for the listener.
            let Ok(conn) = (unsafe { AsyncFd::register(conn) }) else {
                continue;
            };
            let (tx, rx) = mpsc::channel(64);
            let (id, snapshot) = {
                let Ok(mut state) = self.state.lock() else {
                    return;
                };
                state.next_id += 1;
                let id = state.next_id;
                state.connections.push((id, tx));
                let snapshot: Vec<(String, WorkloadInfo, Arc<OwnedFd>)> = state
                    .pods
                    .iter()
                    .map(|(uid, p)| (uid.clone(), p.info.clone(), p.netns.clone()))
                    .collect();
                (id, snapshot)
            };
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(err) = serve(&conn, snapshot, rx, &this.snapshots).await {
                    debug!(error = %err, "zds connection ended");
                }
                if let Ok(mut state) = this.state.lock() {
                    state.connections.retain(|(c, _)| *c != id);
                }
            });
        }
    }

    /// Hands a pod to the newest ztunnel and waits for its acknowledgement; the pod is kept for
    /// the snapshots of later connections either way.
    ///
    /// # Errors
    /// [`Error::NotConnected`], [`Error::Nack`] or [`Error::NoAck`].
    pub async fn add_pod(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: OwnedFd,
    ) -> Result<(), Error> {
        let netns = Arc::new(netns);
        let newest = {
            let mut state = self.state.lock().map_err(|_| Error::NotConnected)?;
            state.pods.insert(
                uid.to_owned(),
                Pod {
                    info: info.clone(),
                    netns: netns.clone(),
                },
            );
            state.connections.last().map(|(_, tx)| tx.clone())
        };
        let tx = newest.ok_or(Error::NotConnected)?;
        send(
            &tx,
            Payload::Add(AddWorkload {
                uid: uid.to_owned(),
                workload_info: Some(info),
            }),
            Some(netns),
        )
        .await
    }

    /// Forgets a pod and tells every connected ztunnel to drop it.
    pub async fn del_pod(&self, uid: &str) {
        let connections: Vec<mpsc::Sender<Outgoing>> = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            state.pods.remove(uid);
            state.connections.iter().map(|(_, tx)| tx.clone()).collect()
        };
        for tx in connections {
            let result = send(
                &tx,
                Payload::Del(DelWorkload {
                    uid: uid.to_owned(),
                }),
                None,
            )
            .await;
            if let Err(err) = result {
                debug!(uid, error = %err, "zds del not acknowledged");
            }
        }
    }
}

async fn send(
    tx: &mpsc::Sender<Outgoing>,
    payload: Payload,
    fd: Option<Arc<OwnedFd>>,
) -> Result<(), Error> {
    let (reply, answer) = oneshot::channel();
    tx.send(Outgoing { payload, fd, reply })
        .await
        .map_err(|_| Error::NoAck("connection closed".into()))?;
    answer
        .await
        .map_err(|_| Error::NoAck("connection closed".into()))?
}

async fn write(conn: &AsyncFd<OwnedFd>, bytes: &[u8], fd: Option<&OwnedFd>) -> std::io::Result<()> {
    loop {
        let mut guard = conn.writable().await?;
        let result = guard.try_io(|c| {
            let iov = [IoSlice::new(bytes)];
            let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
            let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
                Vec::new()
            } else {
                vec![ControlMessage::ScmRights(&fds)]
            };
            socket::sendmsg::<()>(c.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)
        });
        match result {
            Ok(r) => return r.map(drop),
            Err(_would_block) => continue,
        }
    }
}

async fn read(conn: &AsyncFd<OwnedFd>) -> std::io::Result<Vec<u8>> {
    loop {
        let mut guard = conn.readable().await?;
        let result = guard.try_io(|c| {
            let mut buf = vec![0u8; 1024];
            let n = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                socket::recvmsg::<()>(c.as_raw_fd(), &mut iov, None, MsgFlags::empty())
                    .map_err(std::io::Error::from)?
                    .bytes
            };
            buf.truncate(n);
            Ok(buf)
        });
        match result {
            Ok(Ok(buf)) if buf.is_empty() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "ztunnel disconnected",
                ));
            }
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn exchange(
    conn: &AsyncFd<OwnedFd>,
    payload: Payload,
    fd: Option<&OwnedFd>,
) -> Result<(), Error> {
    let bytes = WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec();
    let io = |e: std::io::Error| Error::NoAck(e.to_string());
    tokio::time::timeout(ACK_TIMEOUT, async {
        write(conn, &bytes, fd).await.map_err(io)?;
        let reply = read(conn).await.map_err(io)?;
        let response =
            WorkloadResponse::decode(reply.as_slice()).map_err(|e| Error::NoAck(e.to_string()))?;
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(ack)) => Err(Error::Nack(ack.error)),
            None => Err(Error::NoAck("empty response".into())),
        }
    })
    .await
    .map_err(|_| Error::NoAck(format!("no ack within {ACK_TIMEOUT:?}")))?
}

async fn serve(
    conn: &AsyncFd<OwnedFd>,
    snapshot: Vec<(String, WorkloadInfo, Arc<OwnedFd>)>,
    mut queue: mpsc::Receiver<Outgoing>,
    snapshots: &Snapshots,
) -> Result<(), Error> {
    let hello = tokio::time::timeout(ACK_TIMEOUT, read(conn))
        .await
        .map_err(|_| Error::NoAck("no hello".into()))?
        .map_err(|e| Error::NoAck(e.to_string()))?;
    let hello = ZdsHello::decode(hello.as_slice()).map_err(|e| Error::NoAck(e.to_string()))?;
    if hello.version != Version::V1 as i32 {
        return Err(Error::Nack(format!(
            "unsupported zds version {}",
            hello.version
        )));
    }
    info!(pods = snapshot.len(), "ztunnel connected; sending snapshot");
    for (uid, info, netns) in snapshot {
        let payload = Payload::Add(AddWorkload {
            uid: uid.clone(),
            workload_info: Some(info),
        });
        if let Err(err) = exchange(conn, payload, Some(&netns)).await {
            warn!(uid, error = %err, "snapshot add refused");
            if matches!(err, Error::NoAck(_)) {
                return Err(err);
            }
        }
    }
    exchange(conn, Payload::SnapshotSent(SnapshotSent {}), None).await?;
    snapshots.send_modify(|n| *n += 1);
    while let Some(outgoing) = queue.recv().await {
        let result = exchange(conn, outgoing.payload, outgoing.fd.as_deref()).await;
        let broken = matches!(result, Err(Error::NoAck(_)));
        let _ = outgoing.reply.send(result.clone());
        if broken {
            return result;
        }
    }
    Ok(())
}
