use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, debug_span};

use super::io::TLS_BUFFER_LIMIT_BYTES;
use super::settings::{CLIENT_MAX_HEADER_LIST_BYTES, Settings, keepalive};
use super::stream::Stream;
use crate::certs::WorkloadCertificate;
use crate::identity::SpiffeId;
use crate::tls;

/// What identifies a pooled HBONE connection: streams share a connection only when all four match
/// (istio-ztunnel reference §1.8).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// Identity the client presents (the source workload's).
    pub src_identity: SpiffeId,
    /// Identities the server may present (sorted and deduplicated by [`Key::new`]).
    pub dst_identities: Vec<SpiffeId>,
    /// The next hop's HBONE address (`ip:15008`).
    pub dst: SocketAddr,
    /// Source IP the connection is made from, when it matters (per-pod egress).
    pub src_ip: Option<IpAddr>,
}

impl Key {
    /// A key; `dst_identities` is normalised so equal sets share connections.
    pub fn new(
        src_identity: SpiffeId,
        mut dst_identities: Vec<SpiffeId>,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> Self {
        dst_identities.sort();
        dst_identities.dedup();
        Key {
            src_identity,
            dst_identities,
            dst,
            src_ip,
        }
    }
}

/// Opens the TCP connection under an HBONE connection (in ztunnel: inside the pod's netns, marked,
/// bound to the pod IP).
pub trait Connector: Send + Sync + 'static {
    /// Connects to `dst`, from `src_ip` if given.
    fn connect(
        &self,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>>;
}

/// Supplies the client certificate for a source identity (in ztunnel: the certificate manager).
pub trait CertificateSource: Send + Sync + 'static {
    /// The current certificate for `identity`, waiting for a first one if needed.
    fn certificate<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCertificate>, Box<dyn std::error::Error + Send + Sync>>>;
}

impl CertificateSource for Arc<WorkloadCertificate> {
    fn certificate<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCertificate>, Box<dyn std::error::Error + Send + Sync>>>
    {
        let cert = self.clone();
        Box::pin(async move {
            if cert.identity() == identity {
                Ok(cert)
            } else {
                Err(format!("no certificate for {identity}").into())
            }
        })
    }
}

/// Plain `TcpStream::connect` with `TCP_NODELAY`, binding to `src_ip` when given.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect(
        &self,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let socket = if dst.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_nodelay(true)?;
            if let Some(ip) = src_ip {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            socket.connect(dst).await
        })
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// HTTP/2 settings for new connections.
    pub settings: Settings,
    /// Most streams per connection (further streams open another connection), capped by the
    /// peer's `SETTINGS_MAX_CONCURRENT_STREAMS`; default 100.
    pub max_streams_per_connection: usize,
    /// How long a connection with no streams stays pooled; default 5 min.
    pub idle_timeout: Duration,
    /// TCP connect timeout; default 10 s.
    pub connect_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            settings: Settings::default(),
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors opening an HBONE stream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No client certificate for the source identity.
    #[error("no certificate for {identity}")]
    Certificate {
        /// Source identity.
        identity: SpiffeId,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The client TLS config could not be built.
    #[error("client tls config")]
    Config(#[source] tls::Error),
    /// TCP connect to the next hop failed.
    #[error("connecting to {dst}")]
    Connect {
        /// Next hop.
        dst: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// TCP connect timed out (often a NetworkPolicy blocking 15008).
    #[error("connecting to {dst} timed out")]
    ConnectTimeout {
        /// Next hop.
        dst: SocketAddr,
    },
    /// The TLS handshake failed, e.g. the server's identity was not one of the expected.
    #[error("tls handshake with {dst}")]
    Tls {
        /// Next hop.
        dst: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The HTTP/2 handshake or request failed.
    #[error("http/2 with {dst}")]
    H2 {
        /// Next hop.
        dst: SocketAddr,
        /// The cause.
        #[source]
        source: h2::Error,
    },
    /// The handshakes did not finish in time.
    #[error("handshake with {dst} timed out")]
    HandshakeTimeout {
        /// Next hop.
        dst: SocketAddr,
    },
    /// The authority is not a valid URI authority.
    #[error("invalid connect authority {0:?}")]
    Authority(String),
    /// The server answered the `CONNECT` with a non-200 status.
    #[error("{dst} answered connect with {status}")]
    Status {
        /// Next hop.
        dst: SocketAddr,
        /// The status.
        status: StatusCode,
    },
}

impl Error {
    /// The response status when the server refused the `CONNECT`.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A pool of client HBONE connections (istio-ztunnel reference §1.8): one per key until it
/// carries `min(max_streams_per_connection, peer limit)` streams, then more; only one handshake
/// per key at a time; idle connections released after `idle_timeout`. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: PoolConfig,
    connector: Arc<dyn Connector>,
    certificates: Arc<dyn CertificateSource>,
    entries: Mutex<HashMap<Key, Arc<Entry>>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Entry {
    handshake: tokio::sync::Mutex<()>,
    conns: Mutex<Vec<Arc<Conn>>>,
}

struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    state: Mutex<ConnState>,
    closed: AtomicBool,
    limit: usize,
}

struct ConnState {
    active: usize,
    idle_since: Instant,
}

/// Decrements a connection's stream count when the stream goes away.
struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.active = state.active.saturating_sub(1);
            if state.active == 0 {
                state.idle_since = Instant::now();
            }
        }
    }
}

// === impl Pool ===

impl Pool {
    /// A pool using `connector` for TCP and `certificates` for client certificates. Spawns the
    /// idle sweeper on the current runtime; it stops when the last clone of the pool is dropped.
    pub fn new(
        config: PoolConfig,
        connector: Arc<dyn Connector>,
        certificates: Arc<dyn CertificateSource>,
    ) -> Self {
        let inner = Arc::new(Inner {
            config,
            connector,
            certificates,
            entries: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        let period = (inner.config.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(sweep(weak, period).instrument(debug_span!("pool_sweep")));
        Pool { inner }
    }

    /// Opens a `CONNECT` stream to `authority` (`ip:port` or `host:port`) over a pooled
    /// connection for `key`, sending `headers` (e.g. `baggage`, `forwarded`, `traceparent`).
    ///
    /// # Errors
    /// [`Error`]; [`Error::Status`] when the server refused the `CONNECT` (400/401/503).
    pub async fn connect(
        &self,
        key: &Key,
        authority: &str,
        headers: HeaderMap,
    ) -> Result<Stream, Error> {
        let uri = http::Uri::builder()
            .authority(authority)
            .build()
            .map_err(|_| Error::Authority(authority.to_owned()))?;
        let entry = self.entry(key);
        let conn = match entry.reserve() {
            Some(conn) => conn,
            None => {
                let _handshake = entry.handshake.lock().await;
                match entry.reserve() {
                    Some(conn) => conn,
                    None => {
                        let conn = self.handshake(key).await?;
                        let reserved = conn.try_reserve();
                        entry.conns.lock().map(|mut c| c.push(conn.clone())).ok();
                        if !reserved {
                            // A peer allowing zero streams: nothing can be sent on it.
                            return Err(Error::Status {
                                dst: key.dst,
                                status: StatusCode::SERVICE_UNAVAILABLE,
                            });
                        }
                        conn
                    }
                }
            }
        };
        let guard = StreamGuard(conn.clone());
        let dst = key.dst;
        let h2_err = |source| Error::H2 { dst, source };
        let mut send = conn.send.clone().ready().await.map_err(h2_err)?;
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(uri)
            .version(Version::HTTP_2)
            .body(())
            .map_err(|_| Error::Authority(authority.to_owned()))?;
        *request.headers_mut() = headers;
        let (response, send_stream) = send.send_request(request, false).map_err(h2_err)?;
        let response = response.await.map_err(h2_err)?;
        if response.status() != StatusCode::OK {
            return Err(Error::Status {
                dst,
                status: response.status(),
            });
        }
        let (parts, recv) = response.into_parts();
        Ok(Stream::new(
            send_stream,
            recv,
            parts.headers,
            Some(Box::new(guard)),
        ))
    }

    /// Live pooled connections for `key`.
    pub fn connections(&self, key: &Key) -> usize {
        let entries = self
            .inner
            .entries
            .lock()
            .map(|e| e.get(key).cloned())
            .ok()
            .flatten();
        entries.map_or(0, |entry| entry.live())
    }

    /// Live pooled connections over all keys.
    pub fn total_connections(&self) -> usize {
        let entries: Vec<Arc<Entry>> = self
            .inner
            .entries
            .lock()
            .map(|e| e.values().cloned().collect())
            .unwrap_or_default();
        entries.iter().map(|e| e.live()).sum()
    }

    fn entry(&self, key: &Key) -> Arc<Entry> {
        let mut entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.entry(key.clone()).or_default().clone()
    }

    async fn handshake(&self, key: &Key) -> Result<Arc<Conn>, Error> {
        let config = &self.inner.config;
        let dst = key.dst;
        let cert = self
            .inner
            .certificates
            .certificate(&key.src_identity)
            .await
            .map_err(|source| Error::Certificate {
                identity: key.src_identity.clone(),
                source,
            })?;
        let tls_config =
            tls::client_config(&cert, key.dst_identities.clone()).map_err(Error::Config)?;
        let tcp = tokio::time::timeout(
            config.connect_timeout,
            self.inner.connector.connect(dst, key.src_ip),
        )
        .await
        .map_err(|_| Error::ConnectTimeout { dst })?
        .map_err(|source| Error::Connect { dst, source })?;
        let handshakes = async {
            // No SNI is sent; rustls still needs a name, which the verifier ignores.
            let name = rustls::pki_types::ServerName::IpAddress(dst.ip().into());
            let mut tls = TlsConnector::from(tls_config)
                .connect(name, tcp)
                .await
                .map_err(|source| Error::Tls { dst, source })?;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(TLS_BUFFER_LIMIT_BYTES));
            h2::client::Builder::new()
                .initial_window_size(config.settings.stream_window_bytes)
                .initial_connection_window_size(config.settings.connection_window_bytes)
                .max_frame_size(config.settings.max_frame_size_bytes)
                .max_header_list_size(CLIENT_MAX_HEADER_LIST_BYTES)
                .max_send_buffer_size(config.settings.stream_window_bytes as usize)
                .initial_max_send_streams(config.max_streams_per_connection)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| Error::H2 { dst, source })
        };
        let (send, mut connection) =
            tokio::time::timeout(config.settings.handshake_timeout, handshakes)
                .await
                .map_err(|_| Error::HandshakeTimeout { dst })??;
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            state: Mutex::new(ConnState {
                active: 0,
                idle_since: Instant::now(),
            }),
            closed: AtomicBool::new(false),
            limit: config.max_streams_per_connection,
        });
        let ping_pong = connection.ping_pong();
        let settings = config.settings.clone();
        let driver_conn = Arc::downgrade(&conn);
        let span = debug_span!("hbone_connection", dst.addr = %dst, conn.id = conn.id);
        tokio::spawn(
            async move {
                let keepalive = async {
                    match ping_pong {
                        Some(pp) => {
                            keepalive(pp, settings.keepalive_interval, settings.keepalive_timeout)
                                .await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    result = &mut connection => {
                        if let Err(err) = result {
                            debug!(error = %err, "hbone connection failed");
                        }
                    }
                    reason = keepalive => debug!(reason, "hbone connection keepalive failed"),
                }
                if let Some(conn) = driver_conn.upgrade() {
                    conn.closed.store(true, Ordering::Release);
                }
            }
            .instrument(span),
        );
        debug!(dst.addr = %dst, src.identity = %key.src_identity, "hbone connection established");
        Ok(conn)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.inner.config)
            .field("connections", &self.total_connections())
            .finish_non_exhaustive()
    }
}

// === impl Entry ===

impl Entry {
    /// Reserves a stream slot on a live connection with room, if there is one.
    fn reserve(&self) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().ok()?;
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        conns.iter().find(|c| c.try_reserve()).cloned()
    }

    fn live(&self) -> usize {
        self.conns
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|c| !c.closed.load(Ordering::Acquire))
                    .count()
            })
            .unwrap_or(0)
    }
}

// === impl Conn ===

impl Conn {
    fn try_reserve(&self) -> bool {
        let limit = self.limit.min(self.send.current_max_send_streams());
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        if state.active < limit {
            state.active += 1;
            true
        } else {
            false
        }
    }

    fn idle_for(&self, now: Instant) -> Option<Duration> {
        let state = self.state.lock().ok()?;
        (state.active == 0).then(|| now.saturating_duration_since(state.idle_since))
    }
}

/// Drops connections idle for longer than the idle timeout, and closed ones, every `period`.
async fn sweep(pool: Weak<Inner>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = pool.upgrade() else { return };
        let now = Instant::now();
        let idle_timeout = inner.config.idle_timeout;
        let Ok(mut entries) = inner.entries.lock() else {
            return;
        };
        entries.retain(|_, entry| {
            let Ok(mut conns) = entry.conns.lock() else {
                return true;
            };
            conns.retain(|c| {
                !c.closed.load(Ordering::Acquire)
                    && c.idle_for(now).is_none_or(|idle| idle < idle_timeout)
            });
            !conns.is_empty() || Arc::strong_count(entry) > 1
        });
    }
}
