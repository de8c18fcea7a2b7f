//! Pod network namespaces, and running code inside them (istio-ztunnel reference §5.1).
//!
//! ztunnel never moves its data-plane threads between namespaces. Instead, one long-lived worker
//! thread per process (`ztunnel-netns`) takes jobs over a channel: for each job it `setns(2)`s
//! into the pod's netns, runs the job (typically: create, bind and listen a socket) and
//! `setns(2)`s back to ztunnel's own netns, which it captured when it started. A socket keeps
//! the network namespace it was **created** in for its whole life — its binds, route lookups,
//! connects and accepts all happen there — so the socket can then be driven from any tokio
//! thread.
//!
//! Switching namespaces needs `CAP_SYS_ADMIN` (setns with `CLONE_NEWNET`); [`init`] checks it.

use std::cell::Cell;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use nix::sched::{CloneFlags, setns};
use tracing::{debug, error};

/// Path of the calling thread's own network namespace.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Identity of a network namespace: the `(st_dev, st_ino)` of its nsfs inode. Two fds (or
/// paths such as `/run/netns/<name>`) refer to the same namespace iff their ids are equal; this
/// is how an `AddWorkload` for an already-running pod is recognised as "same netns" (reference
/// §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id {
    /// `st_dev` of the namespace inode (the nsfs device).
    pub dev: u64,
    /// `st_ino` of the namespace inode.
    pub ino: u64,
}

impl Id {
    fn of(file: &File) -> io::Result<Id> {
        let meta = file.metadata()?;
        Ok(Id {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

/// A pod's network namespace: an open namespace fd (as received over ZDS, or opened from a path)
/// plus its [`Id`]. Cloning is cheap and shares the fd; the fd is closed when the last clone
/// (and any job still running in it) is gone.
#[derive(Clone, Debug)]
pub struct InpodNetns {
    file: Arc<File>,
    id: Id,
}

impl InpodNetns {
    /// Adopts a namespace fd (e.g. the `SCM_RIGHTS` fd of an `AddWorkload`).
    ///
    /// Errors: `fstat` of the fd failed. The fd is not checked to be a *network* namespace
    /// here (ztunnel only logs that diagnostic); a wrong fd makes every [`run`](Self::run) fail
    /// with `EINVAL` from `setns`.
    pub fn new(fd: OwnedFd) -> io::Result<InpodNetns> {
        let file = File::from(fd);
        let id = Id::of(&file).map_err(|e| context(e, "stat netns fd".to_owned()))?;
        Ok(InpodNetns {
            file: Arc::new(file),
            id,
        })
    }

    /// Opens a namespace by path, e.g. `/run/netns/<name>` (`ip netns`) or
    /// `/proc/<pid>/ns/net`.
    ///
    /// Errors: the path cannot be opened or stat'ed (message names the path).
    pub fn open(path: impl AsRef<Path>) -> io::Result<InpodNetns> {
        let path = path.as_ref();
        let file =
            File::open(path).map_err(|e| context(e, format!("open netns {}", path.display())))?;
        let id = Id::of(&file).map_err(|e| context(e, format!("stat netns {}", path.display())))?;
        Ok(InpodNetns {
            file: Arc::new(file),
            id,
        })
    }

    /// The calling thread's own network namespace (useful where ztunnel shares the pods'
    /// netns, and in tests).
    ///
    /// Errors: `/proc/thread-self/ns/net` cannot be opened.
    pub fn current() -> io::Result<InpodNetns> {
        InpodNetns::open(THREAD_NETNS)
    }

    /// The namespace's identity, `(st_dev, st_ino)` of the fd.
    pub fn id(&self) -> Id {
        self.id
    }

    /// Runs `f` on the netns worker thread while that thread is inside this namespace, then
    /// switches the worker back to ztunnel's own namespace. Blocks the calling thread until `f`
    /// has run (a few syscalls plus queueing behind other jobs); from async code prefer
    /// [`run_async`](Self::run_async). The calling thread never changes namespace.
    ///
    /// Anything `f` creates that is namespace-scoped (sockets) stays in this namespace.
    /// Jobs from all pods are serialised on the one worker, so `f` must be short and must not
    /// block (no blocking connects to remote peers).
    ///
    /// Errors: `f`'s own error; the worker cannot be started; `setns` into this namespace
    /// failed (`EPERM` without `CAP_SYS_ADMIN`, `EINVAL` if the fd is not a network namespace);
    /// the worker could not switch back afterwards (the result is dropped and the worker is
    /// replaced); or `run` was called from inside another job (it would deadlock).
    /// A panic in `f` is resumed on the calling thread.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(f, move |outcome| {
            // The caller may have gone away; nothing to do then.
            let _ = tx.send(outcome);
        })?;
        match rx.recv() {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => panic::resume_unwind(panic),
            Err(mpsc::RecvError) => Err(worker_gone()),
        }
    }

    /// Like [`run`](Self::run), but awaits the result without blocking the async runtime.
    /// Dropping the future does not cancel `f` if the worker already started it; its result is
    /// then dropped (closing any socket it made).
    ///
    /// Errors: as for [`run`](Self::run).
    pub async fn run_async<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(f, move |outcome| {
            let _ = tx.send(outcome);
        })?;
        match rx.await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => panic::resume_unwind(panic),
            Err(_) => Err(worker_gone()),
        }
    }

    fn submit<T, F, R>(&self, f: F, reply: R) -> io::Result<()>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
        R: FnOnce(thread::Result<io::Result<T>>) + Send + 'static,
    {
        if ON_WORKER.get() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "InpodNetns::run called from inside a netns job (would deadlock)",
            ));
        }
        let target = self.clone();
        let job: Job = Box::new(move |home: &InpodNetns| {
            let (outcome, healthy) = target.execute(home, f);
            reply(outcome);
            healthy
        });
        submit(job)
    }

    /// On the worker: enter, run, return home. Returns `false` when the worker could not get
    /// back home and must retire.
    fn execute<T>(
        &self,
        home: &InpodNetns,
        f: impl FnOnce() -> io::Result<T>,
    ) -> (thread::Result<io::Result<T>>, bool) {
        if let Err(e) = setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            let err = context(e.into(), format!("enter netns {}", self.id));
            return (Ok(Err(err)), true);
        }
        let outcome = panic::catch_unwind(AssertUnwindSafe(f));
        match setns(home.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            Ok(()) => (outcome, true),
            Err(e) => {
                error!(netns.id = %self.id, error = %e, "cannot return to ztunnel netns");
                let err = context(
                    e.into(),
                    format!("return from netns {} to {}", self.id, home.id),
                );
                (Ok(Err(err)), false)
            }
        }
    }
}

impl AsFd for InpodNetns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl PartialEq for InpodNetns {
    /// Same namespace (by [`Id`]), regardless of which fd refers to it.
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for InpodNetns {}

/// Starts the netns worker now, capturing the calling thread's namespace as ztunnel's own
/// ("home") namespace, and checks that the process may `setns` (round trip into the home
/// namespace). Call once at start-up from the main thread to fail fast without
/// `CAP_SYS_ADMIN`; otherwise the first [`InpodNetns::run`] starts the worker lazily and the
/// home namespace is that of the thread calling it.
///
/// Errors: the namespace cannot be opened, the thread cannot be spawned, or `setns` is refused.
pub fn init() -> io::Result<Id> {
    let home = {
        let mut worker = WORKER.lock().unwrap_or_else(PoisonError::into_inner);
        worker.home()?.clone()
    };
    home.run(|| Ok(()))?;
    Ok(home.id)
}

/// A job: gets ztunnel's home namespace, returns whether the worker is still healthy.
type Job = Box<dyn FnOnce(&InpodNetns) -> bool + Send + 'static>;

thread_local! {
    /// Set on the netns worker thread (nested `run` would deadlock).
    static ON_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// The process-wide worker.
static WORKER: Mutex<Worker> = Mutex::new(Worker {
    home: None,
    jobs: None,
});

struct Worker {
    /// ztunnel's own namespace, captured once.
    home: Option<InpodNetns>,
    /// The running worker thread's queue, if any.
    jobs: Option<mpsc::Sender<Job>>,
}

impl Worker {
    fn home(&mut self) -> io::Result<&InpodNetns> {
        if self.home.is_none() {
            let home = InpodNetns::current()?;
            debug!(netns.id = %home.id, "captured ztunnel netns");
            self.home = Some(home);
        }
        self.home.as_ref().ok_or_else(worker_gone)
    }

    fn spawn(&mut self) -> io::Result<mpsc::Sender<Job>> {
        let home = self.home()?.clone();
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("ztunnel-netns".to_owned())
            .spawn(move || worker_main(&home, &rx))
            .map_err(|e| context(e, "spawn netns worker thread".to_owned()))?;
        self.jobs = Some(tx.clone());
        Ok(tx)
    }
}

fn submit(job: Job) -> io::Result<()> {
    let mut worker = WORKER.lock().unwrap_or_else(PoisonError::into_inner);
    let jobs = match &worker.jobs {
        Some(jobs) => jobs.clone(),
        None => worker.spawn()?,
    };
    // A retired worker dropped its queue: start a new one and hand it the job.
    if let Err(mpsc::SendError(job)) = jobs.send(job) {
        worker.spawn()?.send(job).map_err(|_| worker_gone())?;
    }
    Ok(())
}

fn worker_main(home: &InpodNetns, jobs: &mpsc::Receiver<Job>) {
    ON_WORKER.set(true);
    // A replacement worker is spawned from a caller's thread; make sure it starts at home.
    let here = InpodNetns::current().map(|ns| ns.id);
    if here.as_ref().ok() != Some(&home.id)
        && let Err(e) = setns(home.file.as_fd(), CloneFlags::CLONE_NEWNET)
    {
        error!(netns.id = %home.id, error = %e, "netns worker cannot enter ztunnel netns");
        return;
    }
    while let Ok(job) = jobs.recv() {
        if !job(home) {
            // Stuck in a pod's namespace: retire; queued jobs see their reply dropped.
            return;
        }
    }
}

fn worker_gone() -> io::Error {
    io::Error::other("netns worker thread is gone")
}

/// An error with what was being done; the cause stays reachable as its `source`.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
struct Context {
    what: String,
    #[source]
    source: io::Error,
}

/// Wraps `source` in an `io::Error` of the same kind whose message says what was being done.
pub(crate) fn context(source: io::Error, what: String) -> io::Error {
    io::Error::new(source.kind(), Context { what, source })
}
