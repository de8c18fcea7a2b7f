//! The delta ADS gRPC service: one task per stream that reads requests, polls the cache and
//! writes responses.
//!
//! Serves `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources` as
//! the node proxy uses it (istio-ztunnel.md §2.1–§2.5); state-of-the-world ADS is refused.
//!
//! **At most one outstanding response per type.** After sending a response for a type the
//! stream sends nothing more for that type until the client ACKs or NACKs it (matching nonce);
//! cache changes and new subscriptions accumulate meanwhile and go out together right after the
//! reply. This bounds what is in flight per client, keeps "what the client holds" exact, and
//! makes the ACK state in the [`Registry`] unambiguous. A reply with an unknown or stale nonce
//! is ignored. A NACK is logged and recorded; the rejected versions count as delivered, so
//! unchanged content is not resent in a loop — a resource is sent again when it changes again
//! (or when the client reconnects without it in `initial_resource_versions`, as ztunnel does
//! for rejected resources).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;
use weft_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weft_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

use super::cache::Cache;
use super::registry::{Nack, Registration, Registry, TypeInfo, now_unix_ms, struct_to_json};
use super::subscription::Subscription;
use crate::auth::{Authenticator, Caller, authenticate_metadata};
use weft_proto::type_url::{L7_POLICY_TYPE_URL, L7_SERVICE_TYPE_URL};

/// Largest request the service decodes, in bytes (a reconnecting client's
/// `initial_resource_versions` for 10,000+ resources is ~1 MiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// Responses buffered per stream before the stream task waits for the client to read (at most
/// one is outstanding per type, so this is never reached with the two types ztunnel uses).
const RESPONSE_BUFFER: usize = 16;

/// The delta ADS service. Cheap to clone; all clones share streams and shutdown.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    cache: Arc<Cache>,
    registry: Arc<Registry>,
    auth: Arc<dyn Authenticator>,
    shutdown: watch::Sender<bool>,
    streams: Mutex<JoinSet<()>>,
    /// Random per process, so nonces never repeat across controller restarts.
    nonce_prefix: String,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("connections", &self.inner.registry.len())
            .field("nonce_prefix", &self.inner.nonce_prefix)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server publishing `cache`, recording clients in `registry` and authenticating every
    /// stream's bearer token with `auth`.
    pub fn new(cache: Arc<Cache>, registry: Arc<Registry>, auth: Arc<dyn Authenticator>) -> Self {
        Server {
            inner: Arc::new(Inner {
                cache,
                registry,
                auth,
                shutdown: watch::Sender::new(false),
                streams: Mutex::new(JoinSet::new()),
                nonce_prefix: format!("{:08x}", rand::random::<u32>()),
            }),
        }
    }

    /// The tonic service, decoding requests up to [`MAX_REQUEST_BYTES`].
    pub fn service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The registry of connected clients.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// Ends every stream (the client sees the stream end with OK and reconnects), refuses new
    /// ones with `Unavailable`, and waits up to `grace` for the stream tasks to finish before
    /// aborting the rest.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutdown.send_replace(true);
        let mut streams = std::mem::take(&mut *self.lock_streams());
        let drained = tokio::time::timeout(grace, async {
            while streams.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                remaining = streams.len(),
                "xds streams not drained in time, aborting"
            );
            streams.shutdown().await;
        }
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Server {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    /// Refused: Weft serves incremental (delta) xDS only.
    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "state-of-the-world ADS is not served; use DeltaAggregatedResources (incremental xDS)",
        ))
    }

    /// Authenticates the caller (`authorization: Bearer <token>`; `Unauthenticated` if missing
    /// or invalid) and starts the stream task.
    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        if *self.inner.shutdown.borrow() {
            return Err(Status::unavailable("controller is shutting down"));
        }
        let peer = request.remote_addr();
        let caller = match authenticate_metadata(&*self.inner.auth, request.metadata()).await {
            Ok(caller) => caller,
            Err(err) => {
                tracing::info!(peer.addr = ?peer, error = %err, "xds stream rejected");
                return Err(err.into());
            }
        };
        let registration =
            self.inner
                .registry
                .register(caller.account(), caller.node.clone(), peer);
        let id = registration.id();
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let span = tracing::info_span!(
            "xds",
            xds.client = id,
            xds.node = tracing::field::Empty,
            peer.addr = ?peer,
        );
        span.in_scope(|| {
            tracing::info!(caller = %caller.account(), caller.node = ?caller.node, "xds client connected");
        });
        let stream = Stream {
            cache: self.inner.cache.clone(),
            caller: caller.clone(),
            registration,
            peer,
            node_id: None,
            nonce_prefix: format!("{}-{id}", self.inner.nonce_prefix),
            seq: 0,
            types: BTreeMap::new(),
            tx,
            span: span.clone(),
        };
        let run = stream.run(request.into_inner(), self.inner.shutdown.subscribe());
        let mut streams = self.lock_streams();
        while streams.try_join_next().is_some() {}
        streams.spawn(run.instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Type URLs whose resources are scoped to the calling waypoint (see [`Subscription`]).
const WAYPOINT_SCOPED_TYPES: [&str; 2] = [L7_SERVICE_TYPE_URL, L7_POLICY_TYPE_URL];

/// One delta ADS stream.
struct Stream {
    cache: Arc<Cache>,
    caller: Caller,
    registration: Registration,
    peer: Option<SocketAddr>,
    node_id: Option<String>,
    nonce_prefix: String,
    seq: u64,
    types: BTreeMap<String, TypeStream>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    span: tracing::Span,
}

/// One stream's state for one type URL.
struct TypeStream {
    sub: Subscription,
    /// Nonce of the response awaiting ACK/NACK.
    outstanding: Option<String>,
    /// The last reply was an ACK.
    acked: bool,
    info: TypeInfo,
}

/// Why a stream ends.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("client went away")]
    Gone,
    #[error("{0}")]
    Protocol(Status),
}

impl Stream {
    async fn run(
        mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut generations = self.cache.subscribe();
        let reason = loop {
            let step = tokio::select! {
                _ = shutdown.wait_for(|down| *down) => break "controller shutting down",
                () = self.tx.closed() => break "client went away",
                message = inbound.message() => match message {
                    Ok(Some(request)) => self.on_request(request),
                    Ok(None) => break "client closed the stream",
                    Err(status) => {
                        tracing::debug!(status = %status, "xds request stream failed");
                        break "client stream failed";
                    }
                },
                changed = generations.changed() => match changed {
                    Ok(()) => Ok(()),
                    Err(_) => break "cache dropped",
                },
            };
            let step = match step {
                Ok(()) => self.push().await,
                Err(err) => Err(err),
            };
            match step {
                Ok(()) => self.publish(),
                Err(End::Gone) => break "client went away",
                Err(End::Protocol(status)) => {
                    tracing::warn!(status = %status, "xds protocol error, ending stream");
                    // Best effort: the client may already be gone.
                    let _ = self.tx.send(Err(status)).await;
                    break "protocol error";
                }
            }
        };
        tracing::info!(reason, "xds client disconnected");
    }

    /// Applies one request: node, ACK/NACK, subscription changes.
    fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<(), End> {
        if request.type_url.is_empty() {
            return Err(End::Protocol(Status::invalid_argument(
                "delta discovery request without type_url",
            )));
        }
        if let Some(node) = request.node.as_ref().filter(|_| self.node_id.is_none()) {
            self.node_id = Some(node.id.clone());
            self.span.record("xds.node", node.id.as_str());
            let metadata = node
                .metadata
                .as_ref()
                .map_or(serde_json::Value::Null, struct_to_json);
            let node_id = node.id.clone();
            self.registration.update(|info| {
                info.node_id = node_id;
                info.node_metadata = metadata;
            });
        }
        let type_url = request.type_url.clone();
        let _span = tracing::info_span!("xds", xds.type = %type_url).entered();
        let Some(ts) = self.types.get_mut(&type_url) else {
            let mut sub = Subscription::new(&request);
            if WAYPOINT_SCOPED_TYPES.contains(&type_url.as_str()) {
                // A waypoint (service account named after its Gateway) sees only its own
                // resources, named `<namespace>/<gateway>/…`.
                sub.restrict_to(format!(
                    "{}/{}/",
                    self.caller.namespace, self.caller.service_account
                ));
            }
            tracing::info!(
                wildcard = sub.wildcard,
                names = sub.names.len(),
                initial_versions = request.initial_resource_versions.len(),
                "xds subscribe"
            );
            if !request.response_nonce.is_empty() {
                tracing::debug!(xds.nonce = %request.response_nonce, "ignoring nonce on first request of type");
            }
            self.types.insert(
                type_url,
                TypeStream {
                    sub,
                    outstanding: None,
                    acked: false,
                    info: TypeInfo::default(),
                },
            );
            return Ok(());
        };

        if !request.response_nonce.is_empty() {
            if ts.outstanding.as_deref() == Some(request.response_nonce.as_str()) {
                ts.outstanding = None;
                match &request.error_detail {
                    Some(error) => {
                        tracing::warn!(
                            xds.node = self.node_id.as_deref().unwrap_or_default(),
                            peer.addr = ?self.peer,
                            xds.nonce = %request.response_nonce,
                            reason = %error.message,
                            "xds nack"
                        );
                        ts.acked = false;
                        ts.info.last_nack = Some(Nack {
                            nonce: request.response_nonce.clone(),
                            message: error.message.clone(),
                            at_unix_ms: now_unix_ms(),
                        });
                    }
                    None => {
                        tracing::debug!(xds.nonce = %request.response_nonce, "xds ack");
                        ts.acked = true;
                        ts.info.last_acked_nonce = Some(request.response_nonce.clone());
                        ts.info.acked_resources = ts.sub.held();
                    }
                }
            } else {
                tracing::debug!(
                    xds.nonce = %request.response_nonce,
                    outstanding = ?ts.outstanding,
                    "ignoring stale nonce"
                );
            }
        }
        if !request.resource_names_subscribe.is_empty()
            || !request.resource_names_unsubscribe.is_empty()
        {
            tracing::debug!(
                subscribe = ?request.resource_names_subscribe,
                unsubscribe = ?request.resource_names_unsubscribe,
                "xds subscription change"
            );
            ts.sub.update(
                &type_url,
                &request.resource_names_subscribe,
                &request.resource_names_unsubscribe,
                &self.cache,
            );
        }
        Ok(())
    }

    /// Sends what each type without an outstanding response is owed.
    async fn push(&mut self) -> Result<(), End> {
        let mut responses = Vec::new();
        for (type_url, ts) in &mut self.types {
            if ts.outstanding.is_some() {
                continue;
            }
            let Some(delta) = ts.sub.poll(type_url, &self.cache) else {
                continue;
            };
            self.seq += 1;
            let nonce = format!("{}-{}", self.nonce_prefix, self.seq);
            tracing::debug!(
                xds.type = %type_url,
                xds.nonce = %nonce,
                generation = delta.generation,
                resources = delta.resources.len(),
                removed = delta.removed.len(),
                "xds push"
            );
            ts.outstanding = Some(nonce.clone());
            ts.info.responses_sent += 1;
            ts.info.resources_sent += delta.resources.len() as u64;
            ts.info.last_sent_nonce = Some(nonce.clone());
            responses.push(DeltaDiscoveryResponse {
                system_version_info: delta.generation.to_string(),
                resources: delta.resources,
                type_url: type_url.clone(),
                nonce,
                removed_resources: delta.removed,
            });
        }
        // Record before sending, so an ACK racing the registry update finds it current.
        self.publish();
        for response in responses {
            self.tx.send(Ok(response)).await.map_err(|_| End::Gone)?;
        }
        Ok(())
    }

    /// Copies this stream's per-type state into the registry.
    fn publish(&mut self) {
        let generation = self.cache.generation();
        let mut infos = BTreeMap::new();
        for (type_url, ts) in &mut self.types {
            ts.info.wildcard = ts.sub.wildcard;
            ts.info.names = ts.sub.names.iter().cloned().collect();
            ts.info.awaiting_ack = ts.outstanding.is_some();
            ts.info.in_sync = ts.outstanding.is_none() && ts.acked && ts.sub.is_current(generation);
            infos.insert(type_url.clone(), ts.info.clone());
        }
        self.registration.update(|info| info.types = infos);
    }
}
