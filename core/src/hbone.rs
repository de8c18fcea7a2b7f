//! HBONE: TCP streams tunnelled as HTTP/2 `CONNECT` streams inside mutual TLS (port 15008).
//!
//! * [`Server`] terminates TLS + h2, accepts only `CONNECT` with an `ip:port` or `host:port`
//!   authority, asks a caller-supplied [`Handler`] for a decision (200/400/401/503) and copies
//!   bytes both ways with half-close, or hands the stream to the handler
//!   ([`Decision::Serve`], for a proxy that parses what is tunnelled).
//! * [`Pool`] multiplexes client streams over pooled connections keyed by
//!   (source identity, expected destination identities, destination address, source IP).
//! * [`Stream`] is one tunnelled stream as `AsyncRead + AsyncWrite`: FIN ⇄ `END_STREAM`,
//!   `RST_STREAM` with `NO_ERROR`/`CANCEL` read as EOF.
//! * [`headers`] builds and leniently parses `baggage`, `forwarded` and `traceparent`.
//!
//! HTTP/2 settings follow ztunnel (istio-ztunnel reference §1.4): 4 MiB stream window, 16 MiB
//! connection window, 1 MiB frames, PING every 10 s with a 20 s timeout.

pub mod headers;
mod io;
mod pool;
mod server;
mod settings;
mod stream;

pub use crate::copy::copy_bidirectional;
pub use pool::{
    CertificateSource, Connector, Error as PoolError, Key, Pool, PoolConfig, TcpConnector,
};
pub use server::{
    Authority, ConnectRequest, Decision, Error as ServerError, Handler, Refusal, ServeStream,
    Server, ServerCertificate,
};
pub use settings::Settings;
pub use stream::Stream;

/// The HBONE port on every captured pod, waypoint and gateway.
pub const PORT: u16 = 15008;
