use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info_span, warn};

use super::io::TLS_BUFFER_LIMIT_BYTES;
use super::settings::{
    SERVER_MAX_CONCURRENT_STREAMS, SERVER_MAX_HEADER_LIST_BYTES, SERVER_MAX_SEND_BUFFER_BYTES,
    Settings, keepalive,
};
use super::stream::Stream;
use crate::certs::WorkloadCertificate;
use crate::copy::{ReadReady, copy_bidirectional};
use crate::drain;
use crate::identity::SpiffeId;
use crate::tls;

/// The target of a `CONNECT` request (`:authority`): an `ip:port` (IPv6 bracketed) or a
/// `host:port` (used by double HBONE and hostname targets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authority {
    /// `ip:port`.
    Addr(SocketAddr),
    /// `host:port`.
    Host {
        /// Host name.
        host: String,
        /// Port.
        port: u16,
    },
}

/// What the server hands to the [`Handler`] for each `CONNECT` stream.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// Where the client wants to go.
    pub authority: Authority,
    /// The client's SPIFFE identity from its verified certificate.
    pub peer_identity: SpiffeId,
    /// Request headers (`baggage`, `forwarded`, `traceparent`, …).
    pub headers: HeaderMap,
    /// The TCP peer (the client's HBONE connection source).
    pub peer_addr: SocketAddr,
    /// The local address the HBONE connection arrived on.
    pub local_addr: SocketAddr,
}

/// Why a `CONNECT` is refused; each maps to the status ztunnel answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed or misdirected request → 400.
    BadRequest,
    /// Denied by authorization policy → 401.
    Unauthorized,
    /// No such workload/port, or the upstream connect failed → 503.
    Unavailable,
}

impl Refusal {
    /// The HTTP status sent to the client.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The handler's answer to a `CONNECT`.
pub enum Decision<U> {
    /// Answer 200 with `headers` and copy bytes between the stream and `upstream`.
    Accept {
        /// The connection the stream is spliced to (usually TCP to the application).
        upstream: U,
        /// Extra response headers (e.g. the destination's `baggage`).
        headers: HeaderMap,
    },
    /// Answer with the refusal's status and end the stream.
    Refuse(Refusal),
    /// Answer 200 with `headers` and hand the stream itself to `serve` instead of splicing it
    /// to an upstream (an L7 proxy such as the waypoint parses the tunnelled bytes).
    /// [`Handler::finished`] is not called for such streams.
    Serve {
        /// Extra response headers.
        headers: HeaderMap,
        /// Runs the stream to its end.
        serve: ServeStream,
    },
}

/// Takes over an accepted stream (see [`Decision::Serve`]).
pub type ServeStream = Box<dyn FnOnce(Stream) -> BoxFuture<'static, ()> + Send>;

/// The caller-supplied decision for each `CONNECT` stream.
pub trait Handler: Send + Sync + 'static {
    /// The connection accepted streams are spliced to.
    type Upstream: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static;

    /// Decides what to do with a `CONNECT` stream. Called once per stream, concurrently.
    fn decide(
        &self,
        request: &ConnectRequest,
    ) -> impl Future<Output = Decision<Self::Upstream>> + Send;

    /// Called when an accepted stream ends, with its upstream and the bytes copied
    /// `(client → upstream, upstream → client)` or the error. The request is not kept while a
    /// stream is open (memory per idle stream): what the handler needs at the end travels in
    /// the upstream. Default: nothing.
    fn finished(&self, _upstream: Self::Upstream, _result: &io::Result<(u64, u64)>) {}
}

/// Errors serving one HBONE connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No certificate is available for the server's identity (e.g. not fetched yet, or expired).
    #[error("no server certificate available")]
    NoCertificate,
    /// The server certificate could not be turned into a TLS config.
    #[error("server tls config")]
    Config(#[source] tls::Error),
    /// The TLS handshake failed (e.g. client certificate refused).
    #[error("tls handshake with {peer}")]
    Tls {
        /// The client.
        peer: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The client certificate carried no SPIFFE identity.
    #[error("client {peer} presented no spiffe identity")]
    NoIdentity {
        /// The client.
        peer: SocketAddr,
    },
    /// The TLS or HTTP/2 handshake did not finish in time.
    #[error("handshake with {peer} timed out")]
    HandshakeTimeout {
        /// The client.
        peer: SocketAddr,
    },
    /// The HTTP/2 connection failed.
    #[error("http/2 connection with {peer}")]
    H2 {
        /// The client.
        peer: SocketAddr,
        /// The cause.
        #[source]
        source: h2::Error,
    },
    /// Keepalive PINGs went unanswered.
    #[error("keepalive with {peer}: {reason}")]
    Keepalive {
        /// The client.
        peer: SocketAddr,
        /// What failed.
        reason: &'static str,
    },
}

/// Supplies the certificate a server presents, looked up for every new connection so rotated
/// certificates take effect without restarting listeners.
pub trait ServerCertificate: Send + Sync + 'static {
    /// The certificate to present now, if one is available.
    fn current(&self) -> Option<Arc<WorkloadCertificate>>;
}

impl ServerCertificate for Arc<WorkloadCertificate> {
    fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        Some(self.clone())
    }
}

impl ServerCertificate for (crate::cert_manager::Manager, SpiffeId) {
    fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        self.0.current(&self.1)
    }
}

/// An HBONE server for one workload identity.
pub struct Server<H> {
    settings: Settings,
    certificate: Box<dyn ServerCertificate>,
    handler: Arc<H>,
}

// === impl Server ===

impl<H: Handler> Server<H> {
    /// A server presenting `certificate` (a fixed one, or a source such as the certificate
    /// manager) and asking `handler` about each stream.
    pub fn new(settings: Settings, certificate: impl ServerCertificate, handler: Arc<H>) -> Self {
        Server {
            settings,
            certificate: Box::new(certificate),
            handler,
        }
    }

    /// Accepts connections on `listener` until `drain` is signalled; each connection then gets
    /// an HTTP/2 GOAWAY and keeps its in-flight streams until they end.
    ///
    /// # Errors
    /// Only if accepting fails fatally; per-connection errors are logged.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        drain: drain::Watch,
    ) -> io::Result<()> {
        let mut stop = drain.clone();
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(err) if is_transient_accept_error(&err) => {
                        warn!(error = %err, "accept failed");
                        continue;
                    }
                    Err(err) => return Err(err),
                },
                () = stop.signaled() => return Ok(()),
            };
            let server = self.clone();
            let drain = drain.clone();
            tokio::spawn(
                async move {
                    if let Err(err) = server.serve_connection(tcp, drain).await {
                        debug!(error = %err, "hbone connection ended");
                    }
                }
                .instrument(info_span!("inbound", src.addr = %peer)),
            );
        }
    }

    /// Serves one accepted TCP connection: TLS, HTTP/2, then one task per `CONNECT` stream.
    ///
    /// # Errors
    /// [`Error`] for handshake, HTTP/2 or keepalive failures.
    pub async fn serve_connection(
        &self,
        tcp: TcpStream,
        mut drain: drain::Watch,
    ) -> Result<(), Error> {
        let peer_addr = tcp.peer_addr().map_err(|source| Error::Tls {
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let local_addr = tcp.local_addr().map_err(|source| Error::Tls {
            peer: peer_addr,
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let certificate = self.certificate.current().ok_or(Error::NoCertificate)?;
        let config = tls::server_config(&certificate).map_err(Error::Config)?;
        let handshake = async {
            let mut tls = TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .map_err(|source| Error::Tls {
                    peer: peer_addr,
                    source,
                })?;
            tls.get_mut()
                .1
                .set_buffer_limit(Some(TLS_BUFFER_LIMIT_BYTES));
            let peer_identity =
                tls::peer_identity(tls.get_ref().1).ok_or(Error::NoIdentity { peer: peer_addr })?;
            let conn = h2::server::Builder::new()
                .initial_window_size(self.settings.stream_window_bytes)
                .initial_connection_window_size(self.settings.connection_window_bytes)
                .max_frame_size(self.settings.max_frame_size_bytes)
                .max_header_list_size(SERVER_MAX_HEADER_LIST_BYTES)
                .max_send_buffer_size(SERVER_MAX_SEND_BUFFER_BYTES)
                .max_concurrent_streams(SERVER_MAX_CONCURRENT_STREAMS)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| Error::H2 {
                    peer: peer_addr,
                    source,
                })?;
            Ok::<_, Error>((conn, peer_identity))
        };
        let (mut conn, peer_identity) =
            tokio::time::timeout(self.settings.handshake_timeout, handshake)
                .await
                .map_err(|_| Error::HandshakeTimeout { peer: peer_addr })??;

        let ping_pong = conn.ping_pong().ok_or(Error::Keepalive {
            peer: peer_addr,
            reason: "ping unavailable",
        })?;
        let keepalive = keepalive(
            ping_pong,
            self.settings.keepalive_interval,
            self.settings.keepalive_timeout,
        );
        tokio::pin!(keepalive);
        let mut draining = false;
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((request, respond))) => {
                        let handler = self.handler.clone();
                        let base = ConnectRequest {
                            authority: Authority::Addr(local_addr),
                            peer_identity: peer_identity.clone(),
                            headers: HeaderMap::new(),
                            peer_addr,
                            local_addr,
                        };
                        tokio::spawn(
                            serve_stream(handler, Box::new((base, request, respond)))
                                .instrument(tracing::Span::current()),
                        );
                    }
                    Some(Err(source)) => return Err(Error::H2 { peer: peer_addr, source }),
                    None => return Ok(()),
                },
                reason = &mut keepalive => return Err(Error::Keepalive { peer: peer_addr, reason }),
                () = drain.signaled(), if !draining => {
                    draining = true;
                    conn.graceful_shutdown();
                }
            }
        }
    }
}

fn is_transient_accept_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || err.raw_os_error() == Some(24) // EMFILE: keep serving once descriptors free up
}

/// Parses a `CONNECT` `:authority`: `ip:port` first, else `host:port`.
///
/// # Errors
/// `None` when there is no authority or no valid port.
pub(super) fn parse_authority(authority: &http::uri::Authority) -> Option<Authority> {
    if let Ok(addr) = SocketAddr::from_str(authority.as_str()) {
        return Some(Authority::Addr(addr));
    }
    let port = authority.port_u16()?;
    let host = authority.host();
    if host.is_empty() || host.starts_with('[') {
        return None;
    }
    Some(Authority::Host {
        host: host.to_owned(),
        port,
    })
}

/// A `CONNECT` stream as accepted by h2, not yet decided.
type PendingStream = (
    ConnectRequest,
    Request<h2::RecvStream>,
    h2::server::SendResponse<Bytes>,
);

/// Serves one stream. The request, the decision and the response are handled in a boxed
/// future freed before the copy starts, so an open stream's task holds only the two ends and
/// the copy state (hundreds of bytes, not kilobytes, per idle stream).
async fn serve_stream<H: Handler>(handler: Arc<H>, pending: Box<PendingStream>) {
    let opened = Box::pin(open_stream(&*handler, pending)).await;
    let (mut stream, mut upstream) = match opened {
        Some(Opened::Splice(stream, upstream)) => (stream, upstream),
        Some(Opened::Serve(stream, serve)) => return serve(stream).await,
        None => return,
    };
    let result = copy_bidirectional(&mut stream, &mut upstream).await;
    drop(stream);
    handler.finished(upstream, &result);
}

/// An answered stream: spliced to an upstream, or served by the handler.
enum Opened<U> {
    Splice(Stream, U),
    Serve(Stream, ServeStream),
}

/// Checks the request, asks the handler and answers: the stream and its upstream when
/// accepted.
async fn open_stream<H: Handler>(
    handler: &H,
    pending: Box<PendingStream>,
) -> Option<Opened<H::Upstream>> {
    let (mut base, request, mut respond) = *pending;
    let refuse = |respond: &mut h2::server::SendResponse<Bytes>, refusal: Refusal| {
        let response = Response::builder()
            .status(refusal.status())
            .body(())
            .unwrap_or_default();
        let _ = respond.send_response(response, true);
    };
    if request.method() != Method::CONNECT {
        debug!(method = %request.method(), "refused: not connect");
        refuse(&mut respond, Refusal::BadRequest);
        return None;
    }
    let Some(authority) = request.uri().authority().and_then(parse_authority) else {
        debug!(uri = %request.uri(), "refused: bad authority");
        refuse(&mut respond, Refusal::BadRequest);
        return None;
    };
    let (parts, recv) = request.into_parts();
    base.authority = authority;
    base.headers = parts.headers;
    let (target, headers) = match handler.decide(&base).await {
        Decision::Accept { upstream, headers } => (Ok(upstream), headers),
        Decision::Serve { headers, serve } => (Err(serve), headers),
        Decision::Refuse(refusal) => {
            debug!(status = refusal.status().as_u16(), "refused by handler");
            refuse(&mut respond, refusal);
            return None;
        }
    };
    let mut response = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .unwrap_or_default();
    *response.headers_mut() = headers;
    match respond.send_response(response, false) {
        Ok(send) => {
            let stream = Stream::new(send, recv, HeaderMap::new(), None);
            Some(match target {
                Ok(upstream) => Opened::Splice(stream, upstream),
                Err(serve) => Opened::Serve(stream, serve),
            })
        }
        Err(err) => {
            debug!(error = %err, "sending 200 failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_authorities() {
        let parse = |s: &str| parse_authority(&s.parse().unwrap());
        assert_eq!(
            parse("10.0.0.5:8080"),
            Some(Authority::Addr("10.0.0.5:8080".parse().unwrap()))
        );
        assert_eq!(
            parse("[fd00::5]:8080"),
            Some(Authority::Addr("[fd00::5]:8080".parse().unwrap()))
        );
        assert_eq!(
            parse("echo.a.svc.cluster.local:80"),
            Some(Authority::Host {
                host: "echo.a.svc.cluster.local".into(),
                port: 80
            })
        );
        assert_eq!(parse("10.0.0.5"), None);
        assert_eq!(parse("echo.a.svc"), None);
    }
}
