//! The client task: connect, subscribe every type, apply responses through the handlers,
//! ACK/NACK each one, serve on-demand requests, and reconnect forever with backoff
//! (istio-ztunnel.md §2.1–§2.5).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Endpoint;
use tracing::{Instrument, debug, info, info_span, warn};
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use super::config::{Config, ConfigError, MAX_RESPONSE_BYTES, TokenError, TokenSource};
use super::handler::Handler;
use super::protocol::{DemandStep, Processed, Protocol};
use super::stats::{self, Stats, Termination};
use crate::drain;

/// Demands buffered between [`Handle::demand`] callers and the client task.
const COMMAND_BUFFER: usize = 1024;

/// A delta ADS client (`envoy.service.discovery.v3.AggregatedDiscoveryService/
/// DeltaAggregatedResources`), not yet running.
///
/// Build it with [`Client::new`], take a [`Handle`] for readiness, on-demand requests and
/// counters, then [`Client::spawn`] it (or await [`Client::run`]). It then:
/// * connects to [`Config::address`] (a new HTTP/2 connection per attempt) with
///   `authorization: Bearer <token>` (token read again per attempt) and `clusterid` headers;
/// * sends one initial `DeltaDiscoveryRequest` per handler with `node` set: a wildcard
///   subscription, or "subscribe to nothing" plus every name demanded so far for on-demand
///   types, and `initial_resource_versions` = every resource it holds (not rejected ones);
/// * passes each response to the type's [`Handler`] and answers it with an ACK, or a NACK
///   whose `error_detail.message` is `"<name>: <reason>; ..."` (valid resources still
///   applied);
/// * reconnects forever: after a failure with a delay doubling from
///   [`Config::backoff_initial`] to [`Config::backoff_max`] (reset by any processed
///   response), after a normal stream end after `backoff_initial`; handlers keep their state
///   meanwhile;
/// * stops when its [`drain::Watch`] is signalled.
pub struct Client {
    address: String,
    endpoint: Endpoint,
    token: Option<Arc<dyn TokenSource>>,
    cluster_id: AsciiMetadataValue,
    backoff: Backoff,
    protocol: Protocol,
    commands: mpsc::Receiver<Command>,
    ready: watch::Sender<bool>,
    handle: Handle,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.address)
            .field("types", &self.handle.types)
            .finish_non_exhaustive()
    }
}

/// What callers keep while the client runs: readiness, on-demand requests, counters.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    ready: watch::Receiver<bool>,
    stats: Arc<Stats>,
    /// Registered type URLs → whether on-demand.
    types: Arc<BTreeMap<&'static str, bool>>,
}

/// An on-demand request for the client task.
#[derive(Debug)]
struct Command {
    type_url: &'static str,
    name: String,
    waiter: oneshot::Sender<()>,
}

/// Why [`Handle::demand`] did not complete.
#[derive(Debug, thiserror::Error)]
pub enum DemandError {
    /// No handler is registered for the type URL.
    #[error("no xds handler for type url {type_url}")]
    UnknownType {
        /// The requested type URL.
        type_url: String,
    },
    /// The type URL is a wildcard subscription: everything arrives without asking.
    #[error("xds type url {type_url} is a wildcard subscription, not on-demand")]
    NotOnDemand {
        /// The requested type URL.
        type_url: &'static str,
    },
    /// No response mentioned the name in time. The name stays subscribed: a later response
    /// still delivers it.
    #[error("no xds response mentioned {name} ({type_url}) within {timeout:?}")]
    Timeout {
        /// The requested type URL.
        type_url: &'static str,
        /// The requested name.
        name: String,
        /// The caller's timeout.
        timeout: Duration,
    },
    /// The client task has stopped (drained or dropped).
    #[error("xds client stopped")]
    Stopped,
}

/// The client task stopped before becoming ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("xds client stopped before its first sync")]
pub struct Stopped;

/// Why one connection attempt or stream ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("reading the bearer token")]
    Token(#[source] TokenError),
    #[error("bearer token is not a valid header value")]
    TokenHeader,
    #[error("connecting")]
    Connect(#[source] tonic::transport::Error),
    #[error("stream refused: {:?}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    #[error("stream failed: {:?}: {}", .0.code(), .0.message())]
    Stream(tonic::Status),
}

impl Client {
    /// A client for `config` delivering each type URL's resources to its handler (one
    /// handler per type URL).
    ///
    /// # Errors
    /// [`ConfigError`] for an invalid address or TLS settings (see [`Config::address`]), a
    /// cluster id that is not a header value, a zero or inverted backoff, no handlers, two
    /// handlers for one type URL, or an on-demand type URL without a handler.
    pub fn new(config: Config, handlers: Vec<Arc<dyn Handler>>) -> Result<Self, ConfigError> {
        let endpoint = config.endpoint()?;
        let cluster_id = MetadataValue::try_from(config.cluster_id.as_str()).map_err(|_| {
            ConfigError::ClusterId {
                cluster_id: config.cluster_id.clone(),
            }
        })?;
        if config.backoff_initial.is_zero() || config.backoff_initial > config.backoff_max {
            return Err(ConfigError::Backoff {
                initial: config.backoff_initial,
                max: config.backoff_max,
            });
        }
        let protocol = Protocol::new(config.node.to_proto(), handlers, &config.on_demand_types)?;
        let types: BTreeMap<&'static str, bool> = protocol.type_urls().collect();
        let (commands_tx, commands) = mpsc::channel(COMMAND_BUFFER);
        let (ready, ready_rx) = watch::channel(false);
        Ok(Client {
            address: config.address,
            endpoint,
            token: config.token,
            cluster_id,
            backoff: Backoff::new(config.backoff_initial, config.backoff_max),
            protocol,
            commands,
            ready,
            handle: Handle {
                commands: commands_tx,
                ready: ready_rx,
                stats: Arc::new(Stats::new(types.keys().copied())),
                types: Arc::new(types),
            },
        })
    }

    /// A handle for readiness, on-demand requests and counters; valid before and while the
    /// client runs.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs the client until `drain` is signalled, inside an `xds` span (field `xds.addr`).
    /// Never returns otherwise: every failure is logged and retried.
    pub fn run(self, drain: drain::Watch) -> impl Future<Output = ()> + Send + 'static {
        let span = info_span!("xds", xds.addr = %self.address);
        self.run_inner(drain).instrument(span)
    }

    /// [`Client::run`] on a new tokio task.
    pub fn spawn(self, drain: drain::Watch) -> JoinHandle<()> {
        tokio::spawn(self.run(drain))
    }

    async fn run_inner(mut self, mut drain: drain::Watch) {
        let stats = self.handle.stats.clone();
        if self.protocol.is_synced() {
            self.ready.send_replace(true);
        }
        info!(types = ?self.handle.types, "xds client starting");
        loop {
            if drain.is_draining() {
                break;
            }
            stats::add(&stats.connection_attempts, 1);
            let ended = tokio::select! {
                () = drain.signaled() => None,
                ended = self.session() => Some(ended),
            };
            let Some(ended) = ended else {
                stats.terminated(Termination::Complete);
                break;
            };
            let termination = classify(&ended);
            stats.terminated(termination);
            let delay = match termination {
                Termination::Complete | Termination::Reconnect => {
                    self.backoff.reset();
                    self.backoff.initial
                }
                Termination::ConnectionError | Termination::Error => self.backoff.failure(),
            };
            let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            match &ended {
                Ok(()) => info!(reason = %termination, retry_in_ms, "xds stream ended"),
                Err(err) => warn!(
                    reason = %termination,
                    error = %Chain(err),
                    retry_in_ms,
                    "xds stream ended"
                ),
            }
            if !self.wait(delay, &mut drain).await {
                break;
            }
        }
        info!("xds client stopped");
    }

    /// One connection attempt and, if it opens, the stream until it ends.
    async fn session(&mut self) -> Result<(), SessionError> {
        let authorization = match &self.token {
            Some(source) => {
                let token = source.token().map_err(SessionError::Token)?;
                let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| SessionError::TokenHeader)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(SessionError::Connect)?;
        let mut grpc = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);

        let (tx, rx) = mpsc::unbounded_channel();
        let initial = self.protocol.initial_requests();
        for request in initial {
            debug!(
                xds.type = %request.type_url,
                subscribe = ?request.resource_names_subscribe,
                unsubscribe = ?request.resource_names_unsubscribe,
                initial_versions = request.initial_resource_versions.len(),
                "xds subscribe"
            );
            // The receiver is alive: it is in `rx` until the call below takes it.
            let _ = tx.send(request);
        }
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
        if let Some(value) = authorization {
            request.metadata_mut().insert("authorization", value);
        }
        request
            .metadata_mut()
            .insert("clusterid", self.cluster_id.clone());
        let mut inbound = grpc
            .delta_aggregated_resources(request)
            .await
            .map_err(SessionError::Refused)?
            .into_inner();
        stats::add(&self.handle.stats.streams_opened, 1);
        info!("xds stream opened");

        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(response)) => {
                        let reply = self.on_response(response);
                        // A send fails only once the stream is gone; `message()` reports why.
                        let _ = tx.send(reply);
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(SessionError::Stream(status)),
                },
                Some(command) = self.commands.recv() => {
                    if let Some(request) = self.demand(command) {
                        let _ = tx.send(request);
                    }
                }
            }
        }
    }

    /// Processes one response: handler, counters, readiness, backoff reset; returns the
    /// ACK/NACK.
    fn on_response(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let span = info_span!("xds", xds.type = %response.type_url, xds.nonce = %response.nonce);
        let _entered = span.enter();
        let bytes = response.encoded_len() as u64;
        let (sent, removed) = (response.resources.len(), response.removed_resources.len());
        let type_url = response.type_url.clone();
        let processed = self.protocol.on_response(response);
        self.count(&type_url, bytes, &processed);
        if processed.is_nack() {
            let message = processed
                .reply
                .error_detail
                .as_ref()
                .map(|e| e.message.as_str())
                .unwrap_or_default();
            warn!(
                resources = sent,
                applied = processed.applied,
                rejected = processed.rejections.len(),
                known_type = processed.known_type,
                error = message,
                "xds nack"
            );
        } else {
            debug!(
                resources = sent,
                removed_resources = removed,
                applied = processed.applied,
                removed = processed.removed,
                "xds ack"
            );
        }
        self.backoff.reset();
        if self.protocol.is_synced() {
            self.ready.send_if_modified(|ready| {
                if *ready {
                    return false;
                }
                info!("xds synced: every wildcard type answered");
                *ready = true;
                true
            });
        }
        processed.reply
    }

    fn count(&self, type_url: &str, bytes: u64, processed: &Processed) {
        let Some(counters) = self.handle.stats.for_type(type_url) else {
            return;
        };
        stats::add(&counters.responses, 1);
        stats::add(&counters.response_bytes, bytes);
        stats::add(&counters.resources_applied, processed.applied as u64);
        stats::add(&counters.resources_removed, processed.removed as u64);
        stats::add(
            &counters.resources_rejected,
            processed.rejections.len() as u64,
        );
        if processed.is_nack() {
            stats::add(&counters.nacks, 1);
        } else {
            stats::add(&counters.acks, 1);
        }
    }

    /// Records a demand; returns the subscribe request to send if a stream is open.
    fn demand(&mut self, command: Command) -> Option<DeltaDiscoveryRequest> {
        let Command {
            type_url,
            name,
            waiter,
        } = command;
        match self.protocol.demand(type_url, name.clone(), waiter) {
            DemandStep::Subscribe(request) => {
                debug!(xds.type = type_url, xds.name = %name, "xds on-demand subscribe");
                Some(*request)
            }
            DemandStep::Answered | DemandStep::Waiting | DemandStep::NotOnDemand => None,
        }
    }

    /// Sleeps `delay` while recording demands for the next stream; `false` if drained.
    async fn wait(&mut self, delay: Duration, drain: &mut drain::Watch) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = drain.signaled() => return false,
                () = &mut sleep => return true,
                Some(command) = self.commands.recv() => {
                    // Sent with the next initial request.
                    let _ = self.demand(command);
                }
            }
        }
    }
}

impl Handle {
    /// Asks the server for `name` of the on-demand `type_url` (`resource_names_subscribe`;
    /// a `network/ip` address, a workload uid or `namespace/hostname` for
    /// `istio.workload.Address`) and waits until a response mentions it — as a resource name,
    /// one of a resource's `aliases`, or a `removed_resources` name (nothing by that name) —
    /// and has been applied. The handler then holds whatever the server has for it.
    ///
    /// The name stays subscribed for the client's lifetime, across reconnects, so later
    /// changes arrive unasked; demanding an already answered name returns at once. Sent right
    /// away if a stream is open, else with the next stream's initial request.
    ///
    /// # Errors
    /// [`DemandError::UnknownType`] / [`DemandError::NotOnDemand`] for a type URL without a
    /// handler or with a wildcard subscription; [`DemandError::Timeout`] after `timeout`;
    /// [`DemandError::Stopped`] if the client task is gone.
    pub async fn demand(
        &self,
        type_url: &str,
        name: impl Into<String>,
        timeout: Duration,
    ) -> Result<(), DemandError> {
        let name = name.into();
        let type_url = match self.types.get_key_value(type_url) {
            Some((t, true)) => *t,
            Some((t, false)) => return Err(DemandError::NotOnDemand { type_url: t }),
            None => {
                return Err(DemandError::UnknownType {
                    type_url: type_url.to_owned(),
                });
            }
        };
        let (waiter, answered) = oneshot::channel();
        let command = Command {
            type_url,
            name: name.clone(),
            waiter,
        };
        let wait = async {
            self.commands
                .send(command)
                .await
                .map_err(|_| DemandError::Stopped)?;
            answered.await.map_err(|_| DemandError::Stopped)
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| DemandError::Timeout {
                type_url,
                name,
                timeout,
            })?
    }

    /// Resolves once every wildcard type has had its first response processed (ACKed, or
    /// NACKed with the valid resources applied); at once if there are no wildcard types.
    /// Stays resolved across reconnects (ztunnel's "state manager" readiness gate).
    ///
    /// # Errors
    /// [`Stopped`] if the client task ended before that.
    pub async fn ready(&self) -> Result<(), Stopped> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| Stopped)
    }

    /// Whether [`Handle::ready`] has resolved.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// The client's counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

/// The reconnect delay: `initial`, doubling per failure up to `max`.
#[derive(Debug, Clone)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before retrying after a failure; doubles the next one.
    fn failure(&mut self) -> Duration {
        let delay = self.next;
        self.next = delay.saturating_mul(2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// How a session's end counts (istio-ztunnel.md §2.1 and ztunnel's termination reasons).
fn classify(ended: &Result<(), SessionError>) -> Termination {
    match ended {
        Ok(()) => Termination::Complete,
        Err(SessionError::Token(_) | SessionError::TokenHeader | SessionError::Connect(_)) => {
            Termination::ConnectionError
        }
        Err(SessionError::Stream(status)) if is_normal_end(status) => Termination::Reconnect,
        Err(SessionError::Refused(_) | SessionError::Stream(_)) => Termination::Error,
    }
}

/// Statuses ztunnel treats as a routine stream end (reconnect at once).
fn is_normal_end(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => true,
        tonic::Code::Unavailable => {
            let message = status.message();
            message.contains("transport is closing") || message.contains("received prior goaway")
        }
        _ => false,
    }
}

/// An error and its sources, `": "`-separated.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(15));
        let delays: Vec<u128> = (0..13).map(|_| backoff.failure().as_millis()).collect();
        assert_eq!(
            delays,
            [
                10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 15000, 15000
            ]
        );
        backoff.reset();
        assert_eq!(backoff.failure(), Duration::from_millis(10));
    }

    #[test]
    fn terminations_are_classified_like_ztunnel() {
        use tonic::{Code, Status};
        let stream = |code, msg: &str| Err(SessionError::Stream(Status::new(code, msg)));
        let cases = [
            (Ok(()), Termination::Complete),
            (
                stream(Code::Unknown, "h2 protocol error"),
                Termination::Reconnect,
            ),
            (stream(Code::Cancelled, ""), Termination::Reconnect),
            (stream(Code::DeadlineExceeded, ""), Termination::Reconnect),
            (
                stream(Code::Unavailable, "transport is closing"),
                Termination::Reconnect,
            ),
            (
                stream(Code::Unavailable, "received prior goaway: code: NO_ERROR"),
                Termination::Reconnect,
            ),
            (
                stream(Code::Unavailable, "shutting down"),
                Termination::Error,
            ),
            (
                stream(Code::Unauthenticated, "bad token"),
                Termination::Error,
            ),
            (
                Err(SessionError::Refused(Status::unknown("odd"))),
                Termination::Error,
            ),
            (Err(SessionError::TokenHeader), Termination::ConnectionError),
        ];
        for (ended, expected) in cases {
            assert_eq!(classify(&ended), expected, "{ended:?}");
        }
    }

    #[test]
    fn error_chain_includes_sources() {
        let err = SessionError::Token(TokenError::Read {
            path: "/var/run/secrets/tokens/istio-token".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
        assert_eq!(
            Chain(&err).to_string(),
            "reading the bearer token: reading token file \
             /var/run/secrets/tokens/istio-token: no such file"
        );
    }

    struct Null;

    impl Handler for Null {
        fn type_url(&self) -> &'static str {
            weft_proto::ADDRESS_TYPE_URL
        }

        fn apply(&self, _: Vec<super::super::Update>) -> Vec<super::super::Rejection> {
            Vec::new()
        }
    }

    #[tokio::test]
    async fn demand_validates_the_type_and_times_out_while_disconnected() {
        let mut config = Config::new("http://127.0.0.1:1");
        config.on_demand_types = vec![weft_proto::ADDRESS_TYPE_URL];
        let bad = Config {
            backoff_initial: Duration::ZERO,
            ..config.clone()
        };
        assert!(matches!(
            Client::new(bad, vec![Arc::new(Null)]),
            Err(ConfigError::Backoff { .. })
        ));
        let bad = Config {
            cluster_id: "bad\nid".into(),
            ..config.clone()
        };
        assert!(matches!(
            Client::new(bad, vec![Arc::new(Null)]),
            Err(ConfigError::ClusterId { .. })
        ));

        let client = Client::new(config, vec![Arc::new(Null)]).unwrap();
        let handle = client.handle();
        assert!(!handle.is_ready());
        let err = handle
            .demand("type.googleapis.com/x.Y", "a", Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(matches!(err, DemandError::UnknownType { .. }), "{err}");

        let (trigger, watch) = drain::channel();
        let task = client.spawn(watch);
        // Only an on-demand type: ready without any response.
        tokio::time::timeout(Duration::from_secs(5), handle.ready())
            .await
            .expect("ready in time")
            .unwrap();
        let err = handle
            .demand(
                weft_proto::ADDRESS_TYPE_URL,
                "/10.0.0.1",
                Duration::from_millis(50),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, DemandError::Timeout { .. }), "{err}");
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            drain::Outcome::Graceful
        );
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("client task ends on drain")
            .unwrap();
        assert!(handle.stats().terminations(Termination::ConnectionError) >= 1);
        let err = handle
            .demand(
                weft_proto::ADDRESS_TYPE_URL,
                "/10.0.0.2",
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, DemandError::Stopped), "{err}");
    }
}
