//! TCP sockets inside pods' network namespaces, with the options ztunnel sets on them
//! (istio-ztunnel reference §5.1).
//!
//! Every socket is created through [`InpodNetns::run`], so it lives in the pod's namespace for
//! its whole life while all I/O is driven from ztunnel's ordinary tokio threads. Options:
//!
//! * `SO_MARK` (default [`DEFAULT_MARK`] = 1337 = 0x539) on every socket ztunnel creates in a pod
//!   netns; the pod's redirection rules (§5.2) exclude packets carrying it.
//! * Listeners: `SO_REUSEADDR`, `SO_REUSEPORT` (a new ztunnel can bind next to a draining one),
//!   `IP_TRANSPARENT` (best effort by default), backlog 128.
//! * Accepted and upstream sockets: `TCP_NODELAY` and TCP keepalive (idle 180 s, interval
//!   180 s, 9 probes).
//! * Upstream sockets to the pod's own app: `IP_TRANSPARENT` + `IP_FREEBIND` and a bind to the
//!   client's IP, so the app sees the real source.
//! * Original destination: `SO_ORIGINAL_DST`, then `IP6T_SO_ORIGINAL_DST`, then the local
//!   address (TPROXY).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::netns::{InpodNetns, context};

/// ztunnel's packet mark, 1337 (0x539): set as `SO_MARK` on every in-pod socket; the in-pod
/// rules match it with mask 0xfff (reference §5.2).
pub const DEFAULT_MARK: u32 = 0x539;

/// Listen backlog of in-pod listeners, in connections (ztunnel's value).
pub const DEFAULT_BACKLOG: u32 = 128;

/// Upstream connect timeout (ztunnel's value): 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a listener gets `IP_TRANSPARENT` (`IPV6_TRANSPARENT` for v6 addresses), which lets it
/// accept connections for non-local addresses (TPROXY) — ztunnel's `ENABLE_ORIG_SRC`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transparent {
    /// Not set (e.g. the DNS and SOCKS5 listeners).
    Off,
    /// Set; if the kernel refuses with `EPERM` (no `CAP_NET_ADMIN`), log and continue.
    #[default]
    BestEffort,
    /// Set; failing is an error.
    Required,
}

/// TCP keepalive parameters (`SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`).
/// Defaults are ztunnel's `KEEPALIVE_*`: idle 180 s, interval 180 s, 9 probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`, whole seconds). Default 180 s.
    pub idle: Duration,
    /// Time between probes (`TCP_KEEPINTVL`, whole seconds). Default 180 s.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`). Default 9.
    pub probes: u32,
}

impl Default for Keepalive {
    fn default() -> Keepalive {
        Keepalive {
            idle: Duration::from_secs(180),
            interval: Duration::from_secs(180),
            probes: 9,
        }
    }
}

impl Keepalive {
    fn to_socket2(self) -> TcpKeepalive {
        TcpKeepalive::new()
            .with_time(self.idle)
            .with_interval(self.interval)
            .with_retries(self.probes)
    }
}

/// Options of an in-pod listener ([`listener`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerOptions {
    /// `SO_MARK` value; 0 = leave unset. Default [`DEFAULT_MARK`] (0x539).
    pub mark: u32,
    /// `SO_REUSEPORT` (ztunnel's `INPOD_PORT_REUSE`). Default on.
    pub reuse_port: bool,
    /// `IP_TRANSPARENT`. Default [`Transparent::BestEffort`].
    pub transparent: Transparent,
    /// Listen backlog, in connections. Default [`DEFAULT_BACKLOG`] (128).
    pub backlog: u32,
}

impl Default for ListenerOptions {
    fn default() -> ListenerOptions {
        ListenerOptions {
            mark: DEFAULT_MARK,
            reuse_port: true,
            transparent: Transparent::BestEffort,
            backlog: DEFAULT_BACKLOG,
        }
    }
}

/// Options of an upstream connection made from a pod's netns ([`connect`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectOptions {
    /// `SO_MARK` value; 0 = leave unset. Default [`DEFAULT_MARK`] (0x539).
    pub mark: u32,
    /// Source IP to spoof (the original client's IP, inbound paths), bound with port 0 under
    /// `IP_TRANSPARENT` + `IP_FREEBIND` (v6: `IPV6_TRANSPARENT` + `IPV6_FREEBIND`). Ignored when
    /// equal to the destination IP. Must be the destination's address family (v4-mapped v6
    /// addresses count as v4). Default `None` (the kernel picks the pod's address).
    pub source: Option<IpAddr>,
    /// Time allowed for the TCP handshake. Default [`DEFAULT_CONNECT_TIMEOUT`] (10 s).
    pub timeout: Duration,
    /// Keepalive on the connection. Default [`Keepalive::default`].
    pub keepalive: Keepalive,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            mark: DEFAULT_MARK,
            source: None,
            timeout: DEFAULT_CONNECT_TIMEOUT,
            keepalive: Keepalive::default(),
        }
    }
}

/// Creates a listening TCP socket bound to `addr` inside `netns` and registers it with the
/// current tokio runtime (must be called from within one). Sets `SO_MARK` (unless 0),
/// `SO_REUSEADDR`, `SO_REUSEPORT` (if enabled), `IP_TRANSPARENT`/`IPV6_TRANSPARENT` per
/// [`Transparent`], binds, listens with `opts.backlog` and makes it non-blocking. A `[::]`
/// listener also accepts IPv4 (v4-mapped) unless the pod sets `bindv6only`.
///
/// Blocks the calling thread while the netns worker creates the socket (a few syscalls).
///
/// Errors (with the option or address named): socket creation, an option (`EPERM` for
/// `SO_MARK`/`IP_TRANSPARENT` without `CAP_NET_ADMIN`), bind (`EADDRINUSE`,
/// `EADDRNOTAVAIL`), listen, tokio registration, or [`InpodNetns::run`] itself.
pub fn listener(
    netns: &InpodNetns,
    addr: SocketAddr,
    opts: &ListenerOptions,
) -> io::Result<TcpListener> {
    let opts = opts.clone();
    let std = netns.run(move || listen_here(addr, &opts))?;
    TcpListener::from_std(std).map_err(|e| context(e, format!("register listener {addr}")))
}

/// Socket options for a connection accepted on an in-pod listener: `TCP_NODELAY` and keepalive
/// with [`Keepalive::default`] (idle 180 s, interval 180 s, 9 probes).
///
/// Errors: `setsockopt` failed (e.g. `EBADF`/`ENOTSOCK` for something that is not a TCP socket).
pub fn accepted(stream: &impl AsFd) -> io::Result<()> {
    accepted_with(stream, &Keepalive::default())
}

/// [`accepted`] with explicit keepalive parameters.
///
/// Errors: as for [`accepted`].
pub fn accepted_with(stream: &impl AsFd, keepalive: &Keepalive) -> io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_tcp_nodelay(true)
        .map_err(|e| context(e, "set TCP_NODELAY".to_owned()))?;
    sock.set_tcp_keepalive(&keepalive.to_socket2())
        .map_err(|e| context(e, "set TCP keepalive".to_owned()))
}

/// The address a redirected connection was originally sent to: `getsockopt(SOL_IP,
/// SO_ORIGINAL_DST)`, else `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` (both from the
/// connection's conntrack entry, i.e. nat `REDIRECT`), else the socket's local address (TPROXY,
/// or a connection that was not redirected). v4-mapped IPv6 results are returned as IPv4.
///
/// Errors: only when even `getsockname` fails, or it is not an IP address.
pub fn original_dst(stream: &impl AsFd) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let found = sock
        .original_dst_v4()
        .ok()
        .and_then(|a| a.as_socket())
        .or_else(|| sock.original_dst_v6().ok().and_then(|a| a.as_socket()));
    if let Some(addr) = found {
        return Ok(canonical(addr));
    }
    let local = sock
        .local_addr()
        .map_err(|e| context(e, "read local address".to_owned()))?;
    local.as_socket().map(canonical).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket local address is not IP",
        )
    })
}

/// Opens a TCP connection to `dst` from inside `netns`: the socket is created there (so the
/// connection leaves from the pod's address and routes) with `SO_MARK` (unless 0),
/// `TCP_NODELAY`, keepalive, and — when `opts.source` is set and differs from `dst`'s IP —
/// `IP_TRANSPARENT` + `IP_FREEBIND` (v6: `IPV6_TRANSPARENT` + `IPV6_FREEBIND`) and a bind to
/// `(source, 0)`, so the peer sees the client's IP. The non-blocking connect is then driven by
/// tokio on the calling task, bounded by `opts.timeout`.
///
/// Replies to a spoofed source must be routed back to this socket; inside a pod the CNI rules
/// do that (connmark 0x111 → routing table 100 → `local 0.0.0.0/0 dev lo`, reference §5.2).
///
/// Errors (naming the address): `InvalidInput` if `source` and `dst` are of different families;
/// socket or option errors (`EPERM` for `SO_MARK`/`IP_TRANSPARENT` without `CAP_NET_ADMIN`);
/// bind; the connect itself (`ConnectionRefused`, `NetworkUnreachable`, ...); `TimedOut` after
/// `opts.timeout`; or [`InpodNetns::run_async`] itself.
pub async fn connect(
    netns: &InpodNetns,
    dst: SocketAddr,
    opts: &ConnectOptions,
) -> io::Result<TcpStream> {
    let dst = canonical(dst);
    let source = opts
        .source
        .map(|ip| ip.to_canonical())
        .filter(|ip| *ip != dst.ip());
    if let Some(source) = source
        && source.is_ipv4() != dst.is_ipv4()
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source {source} and destination {dst} are of different address families"),
        ));
    }
    let (mark, keepalive) = (opts.mark, opts.keepalive);
    let socket = netns
        .run_async(move || upstream_here(dst, source, mark, keepalive))
        .await?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(opts.timeout, socket.connect(dst)).await {
        Ok(stream) => stream.map_err(|e| context(e, format!("connect to {dst}"))),
        Err(_elapsed) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out after {:?}", opts.timeout),
        )),
    }
}

/// Reads a socket's `SO_MARK` (0 = unmarked), for tests and diagnostics.
///
/// Errors: `getsockopt` failed (`ENOTSOCK`, `EBADF`).
pub fn mark_of(fd: &impl AsFd) -> io::Result<u32> {
    SockRef::from(fd)
        .mark()
        .map_err(|e| context(e, "read SO_MARK".to_owned()))
}

/// On the netns worker: the listener itself.
fn listen_here(addr: SocketAddr, opts: &ListenerOptions) -> io::Result<std::net::TcpListener> {
    let socket = new_tcp_socket(addr)?;
    set_mark(&socket, opts.mark)?;
    socket
        .set_reuse_address(true)
        .map_err(|e| context(e, format!("set SO_REUSEADDR on {addr}")))?;
    if opts.reuse_port {
        socket
            .set_reuse_port(true)
            .map_err(|e| context(e, format!("set SO_REUSEPORT on {addr}")))?;
    }
    if opts.transparent != Transparent::Off
        && let Err(e) = set_transparent(&socket, addr.is_ipv4())
    {
        if opts.transparent == Transparent::BestEffort
            && e.kind() == io::ErrorKind::PermissionDenied
        {
            warn!(listener.addr = %addr, error = %e, "ip_transparent refused, continuing without");
        } else {
            return Err(context(e, format!("set IP_TRANSPARENT on {addr}")));
        }
    }
    socket
        .bind(&SockAddr::from(addr))
        .map_err(|e| context(e, format!("bind {addr}")))?;
    let backlog = i32::try_from(opts.backlog).unwrap_or(i32::MAX);
    socket
        .listen(backlog)
        .map_err(|e| context(e, format!("listen on {addr}")))?;
    Ok(socket.into())
}

/// On the netns worker: an unconnected upstream socket, options set, bound if spoofing.
fn upstream_here(
    dst: SocketAddr,
    source: Option<IpAddr>,
    mark: u32,
    keepalive: Keepalive,
) -> io::Result<Socket> {
    let socket = new_tcp_socket(dst)?;
    set_mark(&socket, mark)?;
    accepted_with(&socket, &keepalive)?;
    if let Some(source) = source {
        set_transparent(&socket, source.is_ipv4())
            .map_err(|e| context(e, format!("set IP_TRANSPARENT to bind {source}")))?;
        let freebind = if source.is_ipv4() {
            socket.set_freebind_v4(true)
        } else {
            socket.set_freebind_v6(true)
        };
        freebind.map_err(|e| context(e, format!("set IP_FREEBIND to bind {source}")))?;
        socket
            .bind(&SockAddr::from(SocketAddr::new(source, 0)))
            .map_err(|e| context(e, format!("bind source {source}")))?;
    }
    Ok(socket)
}

fn new_tcp_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(|e| context(e, format!("create tcp socket for {addr}")))
}

fn set_mark(socket: &Socket, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    socket
        .set_mark(mark)
        .map_err(|e| context(e, format!("set SO_MARK {mark:#x}")))
}

fn set_transparent(socket: &Socket, v4: bool) -> io::Result<()> {
    if v4 {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    }
}

/// v4-mapped IPv6 (`::ffff:a.b.c.d`) → IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
