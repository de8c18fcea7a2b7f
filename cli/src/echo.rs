//! `weft-echo`: the test application the local cluster runs as pods, to observe the mesh from the
//! application's side.
//!
//! The server ([`bind`], [`serve`]) answers every HTTP/1.1 or h2c request with a JSON [`Echo`] of
//! what it saw (method, path, headers, the peer address of the TCP connection, …), with
//! `/status/<code>`, `/delay/<ms>` and `/healthz` as special paths and the `status`, `delay` and
//! `fail_every` controls (query parameters or `x-echo-*` headers), serves the gRPC
//! `weft.echo.v1.Echo` service on the same port (h2c, `content-type: application/grpc`;
//! [`grpc`] is its client), and runs a TCP echo port that
//! greets each connection with `<pod> <source>\n`, echoes every byte and half-closes after the
//! peer does. The clients ([`client`], [`tcp`]) drive those ports and report one [`Exchange`] or
//! [`TcpExchange`] per request or connection, errors included, so a run never aborts halfway.
//!
//! Does not own: argument parsing or printing (the `weft-echo` binary), or how pods are started
//! (the cluster runner).

mod client;
mod grpc;
mod server;

pub use client::{
    ClientConfig, ClientError, Exchange, Reply, Summary, TcpConfig, TcpExchange, TcpReply, client,
    tcp, tcp_once,
};
pub use grpc::{GrpcConfig, GrpcExchange, Method as GrpcMethod, SERVICE as GRPC_SERVICE, grpc};
pub use server::{
    COUNT_HEADER, DEFAULT_MAX_BODY_BYTES, DELAY_PARAM, Echo, FAIL_EVERY_PARAM, PodIdentity,
    STATUS_PARAM, ServeConfig, ServeError, Server, bind, serve,
};

/// `err` and each of its sources, joined with `": "`; a source whose text the previous message
/// already ends with is skipped.
pub fn error_message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
