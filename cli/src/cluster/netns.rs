//! Network namespaces and the commands run in them: a thin shell over `ip`, `iptables-restore`
//! and `setns(2)`.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Directory where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A command that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be started.
    #[error("running {command}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The program exited unsuccessfully.
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
        /// What it printed on stdout (a CNI plugin's error result, for one).
        stdout: String,
    },
    /// Entering a namespace failed.
    #[error("entering network namespace {name}")]
    Enter {
        /// The namespace.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` (stdin `input` if given) and returns its stdout.
///
/// # Errors
/// [`Error::Spawn`] or [`Error::Failed`] with the command line and stderr.
pub fn run(cmd: &mut Command, input: Option<&[u8]>) -> Result<String, Error> {
    let command = describe(cmd);
    let output = if let Some(input) = input {
        use std::io::Write;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                command: command.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(input);
        }
        child.wait_with_output()
    } else {
        cmd.stdin(Stdio::null()).output()
    }
    .map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    check(command, output)
}

fn check(command: String, output: Output) -> Result<String, Error> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            stdout: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        })
    }
}

/// Runs `ip <args>`.
///
/// # Errors
/// As [`run`].
pub fn ip(args: &[&str]) -> Result<String, Error> {
    run(Command::new("ip").args(args), None)
}

/// Runs `ip -n <netns> <args>` (the command acts inside the namespace).
///
/// # Errors
/// As [`run`].
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String, Error> {
    run(Command::new("ip").arg("-n").arg(netns).args(args), None)
}

/// A command that runs `program` inside `netns` (`ip netns exec`).
pub fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(program);
    cmd
}

/// A command that runs `program` in `netns` by `setns(2)` alone: unlike [`command_in`] (`ip
/// netns exec`, which gives the process a mount namespace of its own) the process keeps the
/// host's mounts, so the network namespaces it creates (`ip netns add` bind-mounts them under
/// [`NETNS_DIR`]) are visible to everyone — what a node's kubelet needs.
///
/// # Errors
/// When the namespace cannot be opened.
pub fn command_setns(
    netns: &str,
    program: impl AsRef<std::ffi::OsStr>,
) -> std::io::Result<Command> {
    use std::os::fd::AsFd;
    let file = std::fs::File::open(Path::new(NETNS_DIR).join(netns))?;
    let mut cmd = Command::new(program);
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and makes one system call
    // (setns(2)) on a descriptor opened before the fork: it allocates nothing and takes no lock.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(())
        });
    }
    Ok(cmd)
}

/// A bind mount a process gets in a mount namespace of its own: `source` (a host path) seen at
/// `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host path (a directory or a file).
    pub source: std::path::PathBuf,
    /// Where the process sees it.
    pub target: std::path::PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Binds ready to be made in a forked child: the paths as C strings, made before the fork.
struct PreparedBinds(Vec<(std::ffi::CString, std::ffi::CString, bool)>);

impl PreparedBinds {
    /// Creates each missing target (an empty directory, or an empty file for a file source —
    /// the mount point stays empty on the host) and converts the paths.
    fn new(binds: &[Bind]) -> std::io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let mut prepared = Vec::new();
        for bind in binds {
            if bind.source == bind.target {
                continue;
            }
            if bind.source.is_dir() {
                std::fs::create_dir_all(&bind.target)?;
            } else if !bind.target.exists() {
                if let Some(parent) = bind.target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                File::create(&bind.target)?;
            }
            let c = |p: &Path| {
                std::ffi::CString::new(p.as_os_str().as_bytes())
                    .map_err(|_| std::io::Error::other(format!("{} has a NUL byte", p.display())))
            };
            prepared.push((c(&bind.source)?, c(&bind.target)?, bind.read_only));
        }
        Ok(PreparedBinds(prepared))
    }

    /// In the child: a mount namespace of its own whose mounts receive the host's but never
    /// propagate back (`/` recursively a slave), then each bind.
    fn apply(&self) -> std::io::Result<()> {
        use nix::mount::{MsFlags, mount};
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
        mount(
            None::<&str>,
            c"/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        )?;
        for (source, target, read_only) in &self.0 {
            mount(
                Some(source.as_c_str()),
                target.as_c_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            if *read_only {
                mount(
                    None::<&str>,
                    target.as_c_str(),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )?;
            }
        }
        Ok(())
    }
}

/// Makes `cmd` run with `binds` in a mount namespace of its own (nothing when `binds` is
/// empty). Missing targets are created on the host first, as empty mount points.
///
/// # Errors
/// When a target cannot be created or a path has a NUL byte; when spawned, an error if a mount
/// fails (needs CAP_SYS_ADMIN).
pub fn with_binds(cmd: &mut Command, binds: &[Bind]) -> std::io::Result<()> {
    if binds.iter().all(|b| b.source == b.target) {
        return Ok(());
    }
    let prepared = PreparedBinds::new(binds)?;
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes system calls
    // (unshare(2), mount(2)) on C strings allocated before the fork: it allocates nothing,
    // takes no lock and touches no state another thread could hold.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || prepared.apply());
    }
    Ok(())
}

/// A command that runs `program` as a pod's process: inside `netns`, inside a UTS namespace
/// of its own whose hostname is `hostname` (the pod's name), as the kubelet gives every pod
/// (Kubernetes sets a pod's hostname to `metadata.name`), and with its volumes (`binds`) in a
/// mount namespace of its own. Every container and `exec` of the pod gets the same hostname
/// this way; beyond its volumes the file system is the host's. `ip netns exec` also puts the
/// files of `/etc/netns/<netns>/` (the pod's `resolv.conf`) over those of `/etc`.
///
/// # Errors
/// When a volume's mount point cannot be made; when spawned, an error if the namespaces cannot
/// be made (needs CAP_SYS_ADMIN) or the hostname is invalid (longer than 64 bytes).
pub fn pod_command_in(
    netns: &str,
    hostname: &str,
    program: impl AsRef<std::ffi::OsStr>,
    binds: &[Bind],
) -> std::io::Result<Command> {
    let mut cmd = command_in(netns, program);
    let hostname = hostname.to_owned();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes two system calls
    // (unshare(2), sethostname(2)) on memory allocated before the fork: it allocates nothing,
    // takes no lock and touches no state another thread could hold.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)?;
            nix::unistd::sethostname(&hostname)?;
            Ok(())
        });
    }
    with_binds(&mut cmd, binds)?;
    Ok(cmd)
}

/// Creates a named network namespace with its loopback up.
///
/// # Errors
/// As [`run`].
pub fn add(name: &str) -> Result<(), Error> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a named network namespace (missing is fine).
///
/// # Errors
/// As [`run`], except for a namespace that does not exist.
pub fn delete(name: &str) -> Result<(), Error> {
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "delete", name]).map(drop)
}

/// Whether a named namespace exists.
pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Every named network namespace.
pub fn list() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// PIDs of processes inside `name`.
pub fn pids(name: &str) -> Vec<i32> {
    ip(&["netns", "pids", name])
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Runs `f` on a fresh thread that has entered `name`, so sockets it creates belong to that
/// namespace (they keep it after the thread ends). The calling thread is untouched.
///
/// # Errors
/// [`Error::Enter`] if the namespace cannot be entered.
pub fn within<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let enter = |source| Error::Enter {
        name: name.to_owned(),
        source,
    };
    let file = File::open(Path::new(NETNS_DIR).join(name)).map_err(enter)?;
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        Ok(f())
    })
    .join()
    .map_err(|_| std::io::Error::other("thread panicked"))
    .and_then(|r| r)
    .map_err(enter)
}
