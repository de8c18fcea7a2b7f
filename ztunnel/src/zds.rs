//! The ZDS client: receives enrolled pods from the CNI node agent over a `SOCK_SEQPACKET` unix
//! socket (istio-ztunnel reference §4), each `AddWorkload` carrying the pod's network namespace
//! as one `SCM_RIGHTS` file descriptor.
//!
//! Protocol, as ztunnel speaks it: connect and send a bare `ZdsHello{V1}`; then receive one
//! `WorkloadRequest` per datagram (`add`+fd, `keep`, `del`, `snapshot_sent`) and answer each with
//! exactly one `WorkloadResponse{ack}` (empty error = success). After `SnapshotSent`, every pod
//! not mentioned since the connection began is removed. `Keep` after the snapshot, a second
//! snapshot, or an `Add` without `workload_info` is a protocol error (fatal: a version
//! mismatch); an undecodable datagram is NACKed and the connection is re-made. The client
//! reconnects forever with backoff (10 ms doubling to 15 s).
#![allow(unsafe_code)] // SCM_RIGHTS file descriptors arrive as raw fds

use std::collections::BTreeSet;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use prost::Message;
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};
use weft_core::drain;
use weft_proto::istio::workload::zds::{
    Ack, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request,
    workload_response,
};

/// Default socket path (a hostPath shared with the node agent).
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// Largest datagram read, in bytes (ztunnel's buffer; the agent keeps messages well below).
const MAX_MESSAGE_BYTES: usize = 1024;

/// A pod handed over by the agent.
#[derive(Debug)]
pub struct Pod {
    /// Kubernetes pod UID.
    pub uid: String,
    /// Pod name, namespace and service account (maps the pod to its WDS workload).
    pub info: WorkloadInfo,
    /// The pod's network namespace.
    pub netns: OwnedFd,
}

/// What ztunnel does with the pods it is told about. Errors are returned to the agent as NACK
/// text; the agent retries.
pub trait Manager: Send + 'static {
    /// Starts (or keeps, if already running in the same netns) the proxy for a pod; may wait
    /// (e.g. for the pod's workload or certificate) before answering.
    fn add(&mut self, pod: Pod) -> futures::future::BoxFuture<'_, Result<(), String>>;
    /// Stops a pod's proxy (drains immediately).
    fn remove(&mut self, uid: &str);
    /// After a snapshot: stops every proxy whose uid is not in `keep`.
    fn reconcile(&mut self, keep: &BTreeSet<String>);
}

/// Errors of one ZDS connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed.
    #[error("zds socket {path}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent closed the connection.
    #[error("zds connection closed by the agent")]
    Closed,
    /// A datagram could not be decoded (NACKed; the connection is re-made).
    #[error("undecodable zds message: {0}")]
    Decode(String),
    /// The agent broke the protocol (fatal: treated as a version mismatch).
    #[error("zds protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether ztunnel must stop (a protocol error) rather than reconnect.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::Protocol(_))
    }
}

struct Connection {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl Connection {
    fn io(&self, source: std::io::Error) -> Error {
        Error::Socket {
            path: self.path.clone(),
            source,
        }
    }

    fn connect(path: &Path) -> Result<Connection, Error> {
        let io = |source: std::io::Error| Error::Socket {
            path: path.to_path_buf(),
            source,
        };
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| io(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| io(e.into()))?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(|e| io(e.into()))?;
        let flags =
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| io(e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|e| io(e.into()))?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and refers to
        // the same socket for the AsyncFd's whole lifetime.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io(e.into()))?;
        Ok(Connection {
            fd,
            path: path.to_path_buf(),
        })
    }

    async fn send(&self, bytes: &[u8]) -> Result<(), Error> {
        loop {
            let mut guard = self.fd.writable().await.map_err(|e| self.io(e))?;
            match guard.try_io(|fd| {
                socket::send(fd.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL).map_err(Into::into)
            }) {
                Ok(result) => return result.map(drop).map_err(|e| self.io(e)),
                Err(_would_block) => continue,
            }
        }
    }

    async fn ack(&self, error: Option<String>) -> Result<(), Error> {
        let response = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: error.unwrap_or_default(),
            })),
        };
        self.send(&response.encode_to_vec()).await
    }

    /// Receives one datagram and the fds it carried.
    async fn recv(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        loop {
            let mut guard = self.fd.readable().await.map_err(|e| self.io(e))?;
            let result = guard.try_io(|fd| {
                let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
                let mut cmsg = nix::cmsg_space!([RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = socket::recvmsg::<()>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for raw in raw {
                            // SAFETY: the kernel just installed `raw` in our fd table for this
                            // message (SCM_RIGHTS); nothing else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                        }
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                let len = msg.bytes;
                Ok((len, truncated, fds, buf))
            });
            match result {
                Ok(Ok((0, _, _, _))) => return Err(Error::Closed),
                Ok(Ok((_, true, _, _))) => {
                    return Err(Error::Decode("message or control data truncated".into()));
                }
                Ok(Ok((len, false, fds, mut buf))) => {
                    buf.truncate(len);
                    return Ok((buf, fds));
                }
                Ok(Err(e)) => return Err(self.io(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Serves one connection until it ends: hello, snapshot, steady state.
///
/// # Errors
/// [`Error`]; [`Error::is_fatal`] tells whether to stop.
pub async fn serve_connection(path: &Path, manager: &mut dyn Manager) -> Result<(), Error> {
    let conn = Connection::connect(path)?;
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    conn.send(&hello.encode_to_vec()).await?;
    info!(socket = %path.display(), "zds connected");
    let mut mentioned = BTreeSet::new();
    let mut snapshot_done = false;
    loop {
        let (bytes, mut fds) = conn.recv().await?;
        let request = match WorkloadRequest::decode(bytes.as_slice()) {
            Ok(request) => request,
            Err(e) => {
                conn.ack(Some(format!("undecodable message: {e}"))).await?;
                return Err(Error::Decode(e.to_string()));
            }
        };
        use workload_request::Payload;
        let payload = request.payload;
        if !matches!(payload, Some(Payload::Add(_))) && !fds.is_empty() {
            conn.ack(Some(
                "file descriptors are only valid on AddWorkload".into(),
            ))
            .await?;
            continue;
        }
        match payload {
            Some(Payload::Add(add)) => {
                let Some(info) = add.workload_info else {
                    let reason = format!("AddWorkload {} without workload_info", add.uid);
                    conn.ack(Some(reason.clone())).await?;
                    return Err(Error::Protocol(reason));
                };
                if fds.is_empty() {
                    conn.ack(Some(format!("AddWorkload {} carried no netns fd", add.uid)))
                        .await?;
                    continue;
                }
                let netns = fds.remove(0); // extra fds are closed on drop
                mentioned.insert(add.uid.clone());
                debug!(uid = %add.uid, pod = %info.name, namespace = %info.namespace, "zds add");
                let result = manager
                    .add(Pod {
                        uid: add.uid,
                        info,
                        netns,
                    })
                    .await;
                conn.ack(result.err()).await?;
            }
            Some(Payload::Keep(keep)) => {
                if snapshot_done {
                    let reason = format!("KeepWorkload {} after the snapshot", keep.uid);
                    conn.ack(Some(reason.clone())).await?;
                    return Err(Error::Protocol(reason));
                }
                mentioned.insert(keep.uid);
                conn.ack(None).await?;
            }
            Some(Payload::Del(del)) => {
                debug!(uid = %del.uid, "zds del");
                if snapshot_done {
                    manager.remove(&del.uid);
                } else {
                    mentioned.remove(&del.uid);
                }
                conn.ack(None).await?;
            }
            Some(Payload::SnapshotSent(_)) => {
                if snapshot_done {
                    conn.ack(Some("second SnapshotSent".into())).await?;
                    return Err(Error::Protocol("second SnapshotSent".into()));
                }
                snapshot_done = true;
                manager.reconcile(&mentioned);
                info!(pods = mentioned.len(), "zds snapshot reconciled");
                conn.ack(None).await?;
            }
            None => {
                conn.ack(Some("empty WorkloadRequest".into())).await?;
            }
        }
    }
}

/// Connects to `path` and serves the agent forever, reconnecting with backoff (10 ms doubling
/// to 15 s), until `drain` signals or a protocol error occurs (returned: ztunnel exits).
///
/// # Errors
/// The fatal [`Error::Protocol`].
pub async fn run(
    path: PathBuf,
    mut manager: Box<dyn Manager>,
    mut drain: drain::Watch,
) -> Result<(), Error> {
    let mut backoff = Duration::from_millis(10);
    loop {
        let result = tokio::select! {
            result = serve_connection(&path, manager.as_mut()) => result,
            () = drain.signaled() => return Ok(()),
        };
        match result {
            Err(err) if err.is_fatal() => return Err(err),
            Err(Error::Closed) => backoff = Duration::from_millis(10),
            Err(err) => {
                warn!(error = %err, retry_in_ms = backoff.as_millis(), "zds connection failed")
            }
            Ok(()) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = drain.signaled() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}
