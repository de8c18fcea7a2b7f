//! The echo gRPC service (`weft.echo.v1.Echo`, served on the HTTP port for h2c requests with
//! content-type `application/grpc`) and its client.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, GrpcMethod, Request, Response, Status};
use weft_proto::weft::echo::v1::echo_client::EchoClient;
use weft_proto::weft::echo::v1::echo_server::{self, EchoServer};
use weft_proto::weft::echo::v1::{EchoRequest, EchoResponse};

use super::client::{ClientError, Summary};
use super::server::PodIdentity;

/// The gRPC service name.
pub const SERVICE: &str = "weft.echo.v1.Echo";

/// The `Echo` implementation: answers with the pod, the full method and the call's metadata.
#[derive(Debug, Clone)]
pub(super) struct Service {
    identity: PodIdentity,
}

/// The tower service the HTTP server hands gRPC requests to.
pub(super) fn server(identity: PodIdentity) -> EchoServer<Service> {
    EchoServer::new(Service { identity })
}

/// Whether a request is gRPC (`content-type: application/grpc`, with or without a `+codec`
/// suffix), per the gRPC over HTTP/2 protocol spec.
pub(super) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v == "application/grpc"
                || v.starts_with("application/grpc+")
                || v.starts_with("application/grpc;")
        })
}

/// The call's ASCII metadata, lowercase names; repeated names joined with `", "`.
fn ascii_metadata(metadata: &MetadataMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::<String, String>::new();
    for entry in metadata.iter() {
        if let KeyAndValueRef::Ascii(key, value) = entry {
            let value = value.to_str().unwrap_or_default();
            out.entry(key.as_str().to_owned())
                .and_modify(|joined| {
                    joined.push_str(", ");
                    joined.push_str(value);
                })
                .or_insert_with(|| value.to_owned());
        }
    }
    out
}

impl Service {
    fn answer(
        &self,
        request: Request<EchoRequest>,
        method: &str,
        transform: impl Fn(&str) -> String,
    ) -> Response<EchoResponse> {
        let full_method = request.extensions().get::<GrpcMethod<'_>>().map_or_else(
            || format!("/{SERVICE}/{method}"),
            |m| format!("/{}/{}", m.service(), m.method()),
        );
        let metadata = ascii_metadata(request.metadata());
        let message = transform(&request.get_ref().message);
        tracing::info!(method = full_method, "grpc request");
        Response::new(EchoResponse {
            message,
            pod: self.identity.pod.clone(),
            namespace: self.identity.namespace.clone(),
            method: full_method,
            metadata: metadata.into_iter().collect(),
        })
    }
}

#[tonic::async_trait]
impl echo_server::Echo for Service {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(self.answer(request, "Echo", str::to_owned))
    }

    async fn reverse(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<EchoResponse>, Status> {
        Ok(self.answer(request, "Reverse", |m| m.chars().rev().collect()))
    }
}

/// The RPC [`grpc`] calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// `/weft.echo.v1.Echo/Echo`: the message back.
    #[value(name = "Echo")]
    Echo,
    /// `/weft.echo.v1.Echo/Reverse`: the message reversed.
    #[value(name = "Reverse")]
    Reverse,
}

/// What [`grpc`] calls, how often and how.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// `host:port` or `http://host:port` (plaintext HTTP/2).
    pub target: String,
    /// The RPC.
    pub method: Method,
    /// The request message.
    pub message: String,
    /// Metadata sent with every call.
    pub metadata: http::HeaderMap,
    /// How many calls, one after the other on one channel.
    pub count: u64,
    /// The bound on each call (and on connecting).
    pub timeout: Duration,
}

impl GrpcConfig {
    /// One `Echo` call of `message` to `target` with a 5 s timeout and no extra metadata.
    pub fn new(target: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            method: Method::Echo,
            message: message.into(),
            metadata: http::HeaderMap::new(),
            count: 1,
            timeout: Duration::from_secs(5),
        }
    }
}

/// One call's outcome.
#[derive(Debug)]
pub struct GrpcExchange {
    /// The call's number, from 0.
    pub seq: u64,
    /// The response, or the status the call failed with.
    pub outcome: Result<EchoResponse, Status>,
}

#[derive(Serialize)]
struct ResponseLine<'a> {
    seq: u64,
    code: i32,
    status: String,
    message: &'a str,
    pod: &'a str,
    namespace: &'a str,
    method: &'a str,
    metadata: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct StatusLine {
    seq: u64,
    code: i32,
    status: String,
    error: String,
}

/// The status message followed by its causes (e.g. the connect error behind `Unavailable`).
fn status_message(status: &Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

impl GrpcExchange {
    /// The JSON line (without newline) `weft-echo grpc` prints: `{"seq", "code": 0, "status":
    /// "Ok", "message", "pod", "namespace", "method", "metadata"}` for an answer, `{"seq",
    /// "code", "status", "error"}` with the gRPC status code (number and name) and message for a
    /// failed call.
    pub fn to_json(&self) -> String {
        let line = match &self.outcome {
            Ok(response) => serde_json::to_string(&ResponseLine {
                seq: self.seq,
                code: Code::Ok as i32,
                status: format!("{:?}", Code::Ok),
                message: &response.message,
                pod: &response.pod,
                namespace: &response.namespace,
                method: &response.method,
                metadata: response
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
            }),
            Err(status) => serde_json::to_string(&StatusLine {
                seq: self.seq,
                code: status.code() as i32,
                status: format!("{:?}", status.code()),
                error: status_message(status),
            }),
        };
        line.unwrap_or_default()
    }
}

/// Makes [`GrpcConfig::count`] calls one after the other on one (lazily connected) channel and
/// calls `each` with every outcome, in order.
///
/// # Errors
/// [`ClientError::Url`] when the target is not a valid address; failed calls are reported
/// through `each`.
pub async fn grpc(
    config: GrpcConfig,
    mut each: impl FnMut(GrpcExchange),
) -> Result<Summary, ClientError> {
    let uri = if config.target.contains("://") {
        config.target.clone()
    } else {
        format!("http://{}", config.target)
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|_| ClientError::Url {
        url: config.target.clone(),
        reason: "not host:port or http://host:port",
    })?;
    let channel: Channel = endpoint
        .connect_timeout(config.timeout)
        .timeout(config.timeout)
        .connect_lazy();
    let mut client = EchoClient::new(channel);
    let metadata = MetadataMap::from_headers(config.metadata.clone());
    let mut summary = Summary::default();
    for seq in 0..config.count {
        let mut request = Request::new(EchoRequest {
            message: config.message.clone(),
        });
        *request.metadata_mut() = metadata.clone();
        let call = async {
            match config.method {
                Method::Echo => client.echo(request).await,
                Method::Reverse => client.reverse(request).await,
            }
        };
        let outcome = match tokio::time::timeout(config.timeout, call).await {
            Ok(result) => result.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "timed out after {} ms",
                config.timeout.as_millis()
            ))),
        };
        summary.total += 1;
        if outcome.is_err() {
            summary.failed += 1;
        }
        each(GrpcExchange { seq, outcome });
    }
    Ok(summary)
}
