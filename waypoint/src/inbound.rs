//! HBONE in: which CONNECT targets are served ([`crate::state::resolve`]), then per stream the
//! protocol (configured, else detected from the first bytes) and the server for it: hyper
//! HTTP/1.1 or HTTP/2 into [`Proxy`], or opaque TCP forwarded at L4.
//!
//! The HBONE server hands each accepted stream to this module ([`Decision::Serve`]); HTTP is
//! served by hyper directly on the tunnelled stream.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tracing::{Instrument, debug, info, info_span, warn};
use weft_core::copy::{ReadReady, copy_bidirectional};
use weft_core::drain;
use weft_core::hbone::headers::{FORWARDED, Forwarded, ForwardedFor};
use weft_core::hbone::{Authority, ConnectRequest, Decision, Handler, Refusal};

use crate::engine::{LoadBalancer, Protocol};
use crate::metrics::{Facts, TcpLabels};
use crate::proxy::{Downstream, Proxy};
use crate::state::{Binding, Target, resolve};
use crate::upstream::{Destination, Io, error_chain};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token accepted as the start of an HTTP/1 request line.
const MAX_METHOD_BYTES: usize = 20;

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// Anything else.
    Tcp,
}

/// Classifies the first bytes of a stream; `None` = need more bytes. `eof` = no more will come.
/// Pure: table-tested.
pub fn detect(prefix: &[u8], eof: bool) -> Option<Detected> {
    // Empty lines before a request line are ignored by HTTP/1.1 servers (RFC 9112 §2.2): skip
    // them here too, so such a request is parsed (and authorized) rather than tunnelled.
    let blank = prefix
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    let prefix = &prefix[blank..];
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] && !prefix.is_empty() {
        if prefix.len() >= H2_PREFACE.len() {
            return Some(Detected::Http2);
        }
        // "PRI" may also begin an HTTP/1 method; keep reading unless the stream ended.
        if !eof {
            return None;
        }
    }
    let method_len = prefix
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
        .count();
    if method_len > 0 && method_len <= MAX_METHOD_BYTES && prefix.get(method_len) == Some(&b' ') {
        return Some(Detected::Http1);
    }
    if method_len == prefix.len() && method_len <= MAX_METHOD_BYTES && !eof {
        return None; // still reading a method token (or nothing yet)
    }
    Some(Detected::Tcp)
}

/// A stream with bytes already read put back in front.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// `inner` with `prefix` to be read first.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    /// Passed through so writers that gather (h2 sends a frame head and a DATA payload as two
    /// buffers) make one `writev` instead of one write per buffer.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> ReadReady for Rewind<T> {}

/// The waypoint's HBONE handler.
#[derive(Debug)]
pub struct Inbound {
    proxy: Arc<Proxy>,
    binding: Binding,
    drain: drain::Watch,
}

impl Inbound {
    /// A handler serving targets bound per `binding` through `proxy`; streams stop taking new
    /// requests when `drain` is signalled.
    pub fn new(proxy: Arc<Proxy>, binding: Binding, drain: drain::Watch) -> Self {
        Inbound {
            proxy,
            binding,
            drain,
        }
    }
}

impl Handler for Inbound {
    /// Unused: every accepted stream is served here ([`Decision::Serve`]).
    type Upstream = DuplexStream;

    async fn decide(&self, request: &ConnectRequest) -> Decision<DuplexStream> {
        let addr = match &request.authority {
            Authority::Addr(addr) => *addr,
            Authority::Host { host, port } => {
                warn!(
                    dst.authority = %format!("{host}:{port}"),
                    src.identity = %request.peer_identity,
                    "connect refused (400): authority is not an ip:port"
                );
                return Decision::Refuse(Refusal::BadRequest);
            }
        };
        let target = {
            let inner = self.proxy.state().read();
            resolve(
                &inner.workloads,
                &self.binding,
                addr,
                request.peer_identity.namespace(),
            )
        };
        let target = match target {
            Ok(target) => target,
            Err(why) => {
                warn!(
                    dst.addr = %addr,
                    src.identity = %request.peer_identity,
                    reason = %why,
                    "connect refused (400): target not bound to this waypoint"
                );
                return Decision::Refuse(Refusal::BadRequest);
            }
        };
        let client = request
            .headers
            .get(FORWARDED)
            .and_then(|v| v.to_str().ok())
            .map(Forwarded::parse)
            .and_then(|f| f.for_addr)
            .map_or(request.peer_addr, |f| match f {
                ForwardedFor::Socket(addr) => addr,
                ForwardedFor::Ip(ip) => SocketAddr::new(ip, 0),
            });
        let stream = Stream {
            proxy: self.proxy.clone(),
            target,
            peer: request.peer_identity.clone(),
            client,
            drain: self.drain.clone(),
        };
        let span = info_span!("stream", dst.addr = %addr, src.addr = %client);
        Decision::Serve {
            headers: http::HeaderMap::new(),
            serve: Box::new(move |io| Box::pin(stream.serve(io).instrument(span))),
        }
    }
}

/// Serves one accepted byte stream for `target` exactly as an accepted HBONE stream is served
/// (protocol detection, then HTTP/1.1 or HTTP/2 into `proxy`, or opaque TCP); `peer` stands for
/// the mTLS peer identity and `client` for the original client address. Used by
/// [`crate::standalone`], whose plain TCP listener replaces HBONE for benchmarks.
pub async fn serve_stream<I: Io>(
    proxy: Arc<Proxy>,
    target: Target,
    peer: weft_core::SpiffeId,
    client: SocketAddr,
    drain: drain::Watch,
    io: I,
) {
    Stream {
        proxy,
        target,
        peer,
        client,
        drain,
    }
    .serve(io)
    .await;
}

/// One accepted stream.
struct Stream {
    proxy: Arc<Proxy>,
    target: Target,
    peer: weft_core::SpiffeId,
    client: SocketAddr,
    drain: drain::Watch,
}

impl Stream {
    /// The configured protocol of the target port (`Detect` without a config).
    fn configured(&self) -> Protocol {
        let Target::Service { service, port } = &self.target else {
            return Protocol::Detect;
        };
        let inner = self.proxy.state().read();
        inner
            .routes(&service.hostname)
            .map_or(Protocol::Detect, |r| r.protocol(*port))
    }

    /// Serves the stream: a TCP port is never parsed; otherwise the first bytes decide between
    /// HTTP/2 (the preface) and HTTP/1.1, and, when the port is not declared HTTP, opaque TCP.
    async fn serve<I: Io>(self, mut io: I) {
        let configured = self.configured();
        let mut prefix = BytesMut::with_capacity(64);
        let protocol = if configured == Protocol::Tcp {
            Detected::Tcp
        } else {
            let detected = loop {
                let before = prefix.len();
                let read = io.read_buf(&mut prefix).await;
                let eof = matches!(read, Ok(0)) || read.is_err();
                if let Some(p) = detect(&prefix, eof) {
                    break p;
                }
                if eof && prefix.len() == before {
                    break Detected::Tcp;
                }
            };
            match (configured, detected) {
                // A declared HTTP port answers what is not HTTP/2 as HTTP/1.1 (400 if garbage).
                (Protocol::Http1 | Protocol::Http2 | Protocol::Grpc, Detected::Tcp) => {
                    Detected::Http1
                }
                (_, detected) => detected,
            }
        };
        debug!(protocol = ?protocol, "stream protocol");
        let io = Rewind::new(prefix.freeze(), io);
        match protocol {
            Detected::Http1 | Detected::Http2 => self.serve_http(io, protocol).await,
            Detected::Tcp => self.serve_tcp(io).await,
        }
    }

    async fn serve_http<I: Io>(self, io: Rewind<I>, protocol: Detected) {
        let http2 = protocol == Detected::Http2;
        let downstream = Arc::new(Downstream {
            target: self.target,
            peer_text: Arc::from(self.peer.to_string()),
            peer: self.peer,
            client: self.client,
            http2,
        });
        let proxy = self.proxy.clone();
        let service = hyper::service::service_fn(move |request| {
            // Boxed: the request future is ~9 KB, and hyper moves it into each per-stream
            // task (h2) and through several poll states; a pointer is cheaper to move.
            Box::pin(proxy.clone().handle(downstream.clone(), request))
        });
        let io = TokioIo::new(io);
        let mut drain = self.drain;
        if http2 {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(error = %error_chain(&e), "http/2 downstream ended");
            }
        } else {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = drain.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(error = %error_chain(&e), "http/1 downstream ended");
            }
        }
    }

    async fn serve_tcp<I: Io>(self, mut io: Rewind<I>) {
        if let Err(denied) = self
            .proxy
            .authorize_connection(&self.target, &self.peer, self.client)
        {
            let labels = TcpLabels::new(
                &Facts {
                    source_principal: Some(self.peer.to_string()),
                    ..Facts::default()
                },
                "tcp",
                denied.response_flags(),
            );
            let metrics = self.proxy.metrics();
            metrics.tcp_opened.get_or_create(&labels).inc();
            metrics.tcp_closed.get_or_create(&labels).inc();
            info!(
                target: "access",
                flags = denied.response_flags(),
                error = %denied,
                src.addr = %self.client,
                src.principal = %self.peer,
                "tcp connection denied"
            );
            return;
        }
        let (destination, service) = match &self.target {
            Target::Service { service, port } => (
                Destination::Service(crate::engine::BackendTarget {
                    hostname: Arc::from(service.hostname.as_str()),
                    port: *port,
                }),
                Some((
                    service.hostname.clone(),
                    service.namespace.clone(),
                    service.name.clone(),
                )),
            ),
            Target::Workload { workload, port } => (
                Destination::Workload {
                    workload: workload.clone(),
                    port: *port,
                },
                None,
            ),
        };
        let load_balancer = match &self.target {
            Target::Service { service, .. } => self
                .proxy
                .state()
                .read()
                .routes(&service.hostname)
                .map_or(LoadBalancer::LeastRequest, |r| r.load_balancer()),
            Target::Workload { .. } => LoadBalancer::LeastRequest,
        };
        let source = self
            .proxy
            .state()
            .read()
            .workloads
            .workload_by_ip("", self.client.ip())
            .cloned();
        let connected = self
            .proxy
            .forwarder()
            .connect_tcp(&destination, load_balancer, self.client)
            .await;
        let metrics = self.proxy.metrics().clone();
        let (endpoint, mut upstream, _in_flight) = match connected {
            Ok(c) => c,
            Err(failure) => {
                let facts = Facts {
                    source: source.as_deref(),
                    source_principal: Some(self.peer.to_string()),
                    destination: failure.endpoint.as_ref().map(|e| &*e.workload),
                    destination_service: service,
                };
                let labels = TcpLabels::new(&facts, "tcp", failure.error.response_flags());
                metrics.tcp_opened.get_or_create(&labels).inc();
                metrics.tcp_closed.get_or_create(&labels).inc();
                info!(
                    target: "access",
                    flags = failure.error.response_flags(),
                    error = %failure.error,
                    src.addr = %self.client,
                    src.principal = %self.peer,
                    "tcp connection failed"
                );
                return;
            }
        };
        let facts = Facts {
            source: source.as_deref(),
            source_principal: Some(self.peer.to_string()),
            destination: Some(&endpoint.workload),
            destination_service: service,
        };
        let labels = TcpLabels::new(&facts, "tcp", "-");
        metrics.tcp_opened.get_or_create(&labels).inc();
        let start = tokio::time::Instant::now();
        // The detection prefix goes first; then both directions.
        let prefix = std::mem::take(&mut io.prefix);
        let mut result = upstream.write_all(&prefix).await.map(|()| (0, 0));
        if result.is_ok() {
            result = copy_bidirectional(&mut io.inner, &mut upstream).await;
        }
        let (received, sent) = match &result {
            Ok((r, s)) => (r + prefix.len() as u64, *s),
            Err(_) => (prefix.len() as u64, 0),
        };
        metrics.tcp_received.get_or_create(&labels).inc_by(received);
        metrics.tcp_sent.get_or_create(&labels).inc_by(sent);
        metrics.tcp_closed.get_or_create(&labels).inc();
        info!(
            target: "access",
            upstream = %endpoint.addr,
            src.addr = %self.client,
            src.principal = %self.peer,
            bytes_received = received,
            bytes_sent = sent,
            duration_ms = start.elapsed().as_millis() as u64,
            error = result.as_ref().err().map(|e| e.to_string()),
            "tcp connection complete"
        );
        let _ = upstream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_table() {
        let cases: &[(&[u8], bool, Option<Detected>)] = &[
            (b"GET / HTTP/1.1\r\n", false, Some(Detected::Http1)),
            (b"POST /x HTTP/1.1\r\n", false, Some(Detected::Http1)),
            (b"GE", false, None),
            (b"", false, None),
            (b"", true, Some(Detected::Tcp)),
            (H2_PREFACE, false, Some(Detected::Http2)),
            (b"PRI * HTT", false, None),
            (b"PRI /x HTTP/1.1\r\n", false, Some(Detected::Http1)),
            (b"\x16\x03\x01\x02\x00", false, Some(Detected::Tcp)),
            (b"hello world", false, Some(Detected::Tcp)),
            (b"SSH-2.0-OpenSSH\r\n", false, Some(Detected::Tcp)),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", false, Some(Detected::Tcp)),
            (b"GET", true, Some(Detected::Tcp)),
            (b"\r\nGET / HTTP/1.1\r\n", false, Some(Detected::Http1)),
            (b"\r\n", false, None),
        ];
        for (prefix, eof, want) in cases {
            assert_eq!(
                detect(prefix, *eof),
                *want,
                "{:?}",
                String::from_utf8_lossy(prefix)
            );
        }
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
