//! The client side of incremental xDS as plain data (no I/O): what to send on (re)connect,
//! how a response becomes handler updates and an ACK/NACK, on-demand subscriptions and
//! readiness. Follows envoy's "Incremental xDS" protocol as ztunnel uses it
//! (istio-ztunnel.md §2.3–§2.6).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use tokio::sync::oneshot;
use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use weft_proto::google::rpc::Status as RpcStatus;

use super::config::ConfigError;
use super::handler::{Handler, Rejection, Update};

/// The wildcard resource name.
const WILDCARD: &str = "*";

/// A held resource's version, as compact as it can be kept: 32 lowercase hex digits (the
/// content-hash versions Weft's controller sends) as 16 bytes, anything else as text. ztunnel
/// holds one per workload and service, so this is 40 bytes less per resource than a `String`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Version {
    Hex(u128),
    Text(Box<str>),
}

impl Version {
    fn new(text: String) -> Self {
        let hex = text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match u128::from_str_radix(&text, 16) {
            Ok(n) if hex => Version::Hex(n),
            _ => Version::Text(text.into_boxed_str()),
        }
    }

    /// The version as received.
    fn text(&self) -> String {
        match self {
            Version::Hex(n) => format!("{n:032x}"),
            Version::Text(text) => text.to_string(),
        }
    }
}

/// Every type's subscription and what the client holds, across connections.
pub(crate) struct Protocol {
    node: Node,
    types: BTreeMap<&'static str, TypeState>,
    /// Wildcard types whose first response has not been processed yet.
    unsynced: BTreeSet<&'static str>,
}

struct TypeState {
    handler: Arc<dyn Handler>,
    on_demand: bool,
    /// Accepted resources, name → version: what `initial_resource_versions` declares.
    held: BTreeMap<Box<str>, Version>,
    /// On-demand subscriptions: name (resource name or alias) → answer state.
    demanded: BTreeMap<String, Demanded>,
}

#[derive(Default)]
struct Demanded {
    /// A response mentioned the name since it was subscribed.
    answered: bool,
    waiters: Vec<oneshot::Sender<()>>,
}

/// What processing one response produced.
#[derive(Debug)]
pub(crate) struct Processed {
    /// The ACK or NACK to send.
    pub(crate) reply: DeltaDiscoveryRequest,
    /// A handler is registered for the response's type URL.
    pub(crate) known_type: bool,
    /// Upserts the handler accepted.
    pub(crate) applied: usize,
    /// Removals delivered to the handler.
    pub(crate) removed: usize,
    /// Resources rejected by the client or the handler.
    pub(crate) rejections: Vec<Rejection>,
}

impl Processed {
    /// Whether the reply is a NACK.
    pub(crate) fn is_nack(&self) -> bool {
        self.reply.error_detail.is_some()
    }
}

/// What a demand needs.
#[derive(Debug)]
pub(crate) enum DemandStep {
    /// The name is subscribed and was already answered: the handler's view of it is current
    /// (the waiter was told).
    Answered,
    /// The name is subscribed and its answer is pending; the waiter was queued.
    Waiting,
    /// Newly subscribed (waiter queued): send this request if a stream is open, else the name
    /// goes out with the next initial request.
    Subscribe(Box<DeltaDiscoveryRequest>),
    /// No on-demand handler for the type URL (the waiter is dropped).
    NotOnDemand,
}

impl Protocol {
    /// State for `handlers` (one per type URL), `on_demand` naming the types subscribed on
    /// demand.
    pub(crate) fn new(
        node: Node,
        handlers: Vec<Arc<dyn Handler>>,
        on_demand: &[&'static str],
    ) -> Result<Self, ConfigError> {
        if handlers.is_empty() {
            return Err(ConfigError::NoHandlers);
        }
        let mut types = BTreeMap::new();
        for handler in handlers {
            let type_url = handler.type_url();
            let state = TypeState {
                handler,
                on_demand: on_demand.contains(&type_url),
                held: BTreeMap::new(),
                demanded: BTreeMap::new(),
            };
            if types.insert(type_url, state).is_some() {
                return Err(ConfigError::DuplicateHandler { type_url });
            }
        }
        if let Some(type_url) = on_demand.iter().find(|t| !types.contains_key(*t)) {
            return Err(ConfigError::OnDemandWithoutHandler { type_url });
        }
        let unsynced = types
            .iter()
            .filter(|(_, ts)| !ts.on_demand)
            .map(|(t, _)| *t)
            .collect();
        Ok(Protocol {
            node,
            types,
            unsynced,
        })
    }

    /// The registered type URLs with whether each is on-demand.
    pub(crate) fn type_urls(&self) -> impl Iterator<Item = (&'static str, bool)> + '_ {
        self.types.iter().map(|(t, ts)| (*t, ts.on_demand))
    }

    /// Whether every wildcard type has had a response processed (ever; never reset).
    pub(crate) fn is_synced(&self) -> bool {
        self.unsynced.is_empty()
    }

    /// The accepted resources of `type_url`, name → version.
    #[cfg(test)]
    pub(crate) fn held(&self, type_url: &str) -> Option<BTreeMap<String, String>> {
        self.types.get(type_url).map(|ts| {
            ts.held
                .iter()
                .map(|(n, v)| (n.to_string(), v.text()))
                .collect()
        })
    }

    /// The first request of every type on a new stream, each with `node`:
    /// * wildcard types: empty subscribe/unsubscribe lists (implicit wildcard);
    /// * on-demand types: subscribe `["*", <every demanded name>]` and unsubscribe `["*"]`,
    ///   i.e. nothing but the names asked for so far (kept across reconnects);
    /// * `initial_resource_versions`: every accepted resource (rejected versions excluded).
    pub(crate) fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.types
            .iter()
            .map(|(type_url, ts)| {
                let (subscribe, unsubscribe) = if ts.on_demand {
                    let mut subscribe = vec![WILDCARD.to_owned()];
                    subscribe.extend(ts.demanded.keys().cloned());
                    (subscribe, vec![WILDCARD.to_owned()])
                } else {
                    (Vec::new(), Vec::new())
                };
                DeltaDiscoveryRequest {
                    node: Some(self.node.clone()),
                    type_url: (*type_url).to_owned(),
                    resource_names_subscribe: subscribe,
                    resource_names_unsubscribe: unsubscribe,
                    initial_resource_versions: ts
                        .held
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.text()))
                        .collect(),
                    response_nonce: String::new(),
                    error_detail: None,
                }
            })
            .collect()
    }

    /// Applies one response and returns the reply for it.
    ///
    /// Resources without a body or with a body of another type are rejected by the client;
    /// the rest go to the handler as [`Update::Upsert`]s, followed by an [`Update::Remove`] for
    /// each `removed_resources` name the client holds (names it does not hold, such as an
    /// on-demand name that resolved to nothing, are not delivered). Accepted versions are
    /// recorded, rejected ones are not. Any rejection makes the reply a NACK listing them
    /// (`"<name>: <reason>; ..."`, code 0); the valid resources stay applied. The handler is
    /// not called when nothing is to be delivered.
    pub(crate) fn on_response(&mut self, response: DeltaDiscoveryResponse) -> Processed {
        let DeltaDiscoveryResponse {
            type_url,
            nonce,
            resources,
            removed_resources,
            ..
        } = response;
        let known = self.types.get_key_value(type_url.as_str()).map(|(t, _)| *t);
        let Some((type_url_static, ts)) =
            known.and_then(|t| self.types.get_mut(t).map(|ts| (t, ts)))
        else {
            let rejection = Rejection::new(type_url.clone(), "no handler for this type url");
            return Processed {
                reply: reply(type_url, nonce, std::slice::from_ref(&rejection)),
                known_type: false,
                applied: 0,
                removed: 0,
                rejections: vec![rejection],
            };
        };

        let mut rejections = Vec::new();
        let mut updates = Vec::new();
        let mut versions = Vec::new();
        let mut mentioned: Vec<String> = Vec::new();
        for resource in resources {
            mentioned.push(resource.name.clone());
            mentioned.extend(resource.aliases);
            let body = match resource.resource {
                None => {
                    rejections.push(Rejection::new(resource.name, "resource has no body"));
                    continue;
                }
                Some(body) if !body.type_url.is_empty() && body.type_url != type_url => {
                    let reason = format!("body of type {} in a {type_url} response", body.type_url);
                    rejections.push(Rejection::new(resource.name, reason));
                    continue;
                }
                Some(body) => body,
            };
            versions.push((resource.name.clone(), resource.version.clone()));
            updates.push(Update::Upsert {
                name: resource.name,
                version: resource.version,
                body,
            });
        }
        let mut removals = Vec::new();
        for name in removed_resources {
            if ts.held.contains_key(name.as_str()) {
                removals.push(name.clone());
                updates.push(Update::Remove { name: name.clone() });
            }
            mentioned.push(name);
        }

        if !updates.is_empty() {
            rejections.extend(ts.handler.apply(updates));
        }
        let rejected: HashSet<&str> = rejections.iter().map(|r| r.name.as_str()).collect();
        let mut applied = 0;
        for (name, version) in versions {
            if !rejected.contains(name.as_str()) {
                ts.held.insert(name.into_boxed_str(), Version::new(version));
                applied += 1;
            }
        }
        for name in &removals {
            ts.held.remove(name.as_str());
        }

        for name in &mentioned {
            if let Some(demanded) = ts.demanded.get_mut(name) {
                demanded.answered = true;
                for waiter in demanded.waiters.drain(..) {
                    let _ = waiter.send(());
                }
            }
        }
        self.unsynced.remove(type_url_static);

        Processed {
            reply: reply(type_url, nonce, &rejections),
            known_type: true,
            applied,
            removed: removals.len(),
            rejections,
        }
    }

    /// Subscribes `name` of the on-demand `type_url` (if not yet) and queues `waiter` to be
    /// told when a response mentions it (as a resource name, an alias, or a removed name).
    pub(crate) fn demand(
        &mut self,
        type_url: &str,
        name: String,
        waiter: oneshot::Sender<()>,
    ) -> DemandStep {
        let Some(ts) = self.types.get_mut(type_url).filter(|ts| ts.on_demand) else {
            return DemandStep::NotOnDemand;
        };
        match ts.demanded.get_mut(&name) {
            Some(demanded) if demanded.answered => {
                let _ = waiter.send(());
                DemandStep::Answered
            }
            Some(demanded) => {
                demanded.waiters.retain(|w| !w.is_closed());
                demanded.waiters.push(waiter);
                DemandStep::Waiting
            }
            None => {
                ts.demanded.insert(
                    name.clone(),
                    Demanded {
                        answered: false,
                        waiters: vec![waiter],
                    },
                );
                DemandStep::Subscribe(Box::new(DeltaDiscoveryRequest {
                    type_url: type_url.to_owned(),
                    resource_names_subscribe: vec![name],
                    ..DeltaDiscoveryRequest::default()
                }))
            }
        }
    }
}

/// An ACK (no rejections) or a NACK for the response `nonce` of `type_url`.
fn reply(type_url: String, nonce: String, rejections: &[Rejection]) -> DeltaDiscoveryRequest {
    let error_detail = (!rejections.is_empty()).then(|| RpcStatus {
        code: 0,
        message: rejections
            .iter()
            .map(Rejection::to_string)
            .collect::<Vec<_>>()
            .join("; "),
        details: Vec::new(),
    });
    DeltaDiscoveryRequest {
        type_url,
        response_nonce: nonce,
        error_detail,
        ..DeltaDiscoveryRequest::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use weft_proto::envoy::service::discovery::v3::Resource;

    use super::*;

    const A: &str = "type.googleapis.com/istio.workload.Address";
    const P: &str = "type.googleapis.com/istio.security.Authorization";

    /// Records updates; rejects upserts whose body is `b"bad"`.
    #[derive(Default)]
    struct Recorder {
        type_url: &'static str,
        seen: Mutex<Vec<Vec<Update>>>,
    }

    impl Handler for Recorder {
        fn type_url(&self) -> &'static str {
            self.type_url
        }

        fn apply(&self, updates: Vec<Update>) -> Vec<Rejection> {
            let rejections = updates
                .iter()
                .filter_map(|u| match u {
                    Update::Upsert { name, body, .. } if body.value == b"bad" => {
                        Some(Rejection::new(name.clone(), "bad body"))
                    }
                    _ => None,
                })
                .collect();
            self.seen.lock().unwrap().push(updates);
            rejections
        }
    }

    impl Recorder {
        fn new(type_url: &'static str) -> Arc<Self> {
            Arc::new(Recorder {
                type_url,
                seen: Mutex::default(),
            })
        }

        fn take(&self) -> Vec<Vec<Update>> {
            std::mem::take(&mut *self.seen.lock().unwrap())
        }
    }

    fn node() -> Node {
        Node {
            id: "ztunnel~10.0.0.1~z.ns~ns.svc.cluster.local".into(),
            ..Node::default()
        }
    }

    fn protocol(on_demand: &[&'static str]) -> (Protocol, Arc<Recorder>, Arc<Recorder>) {
        let (a, p) = (Recorder::new(A), Recorder::new(P));
        let handlers: Vec<Arc<dyn Handler>> = vec![a.clone(), p.clone()];
        (Protocol::new(node(), handlers, on_demand).unwrap(), a, p)
    }

    fn resource(name: &str, version: &str, body: &[u8], aliases: &[&str]) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            resource: Some(prost_types::Any {
                type_url: A.into(),
                value: body.to_vec(),
            }),
            ..Resource::default()
        }
    }

    fn response(
        type_url: &str,
        nonce: &str,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: nonce.into(),
            resources,
            removed_resources: removed.iter().map(|r| (*r).to_owned()).collect(),
            ..DeltaDiscoveryResponse::default()
        }
    }

    fn initial(proto: &Protocol, type_url: &str) -> DeltaDiscoveryRequest {
        let mut requests = proto.initial_requests();
        requests.retain(|r| r.type_url == type_url);
        assert_eq!(requests.len(), 1, "one initial request per type");
        requests.remove(0)
    }

    fn names(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u {
                Update::Upsert { name, version, .. } => format!("+{name}@{version}"),
                Update::Remove { name } => format!("-{name}"),
            })
            .collect()
    }

    #[test]
    fn versions_round_trip_compactly() {
        let hash = "0123456789abcdef0123456789abcdef".to_owned();
        assert_eq!(
            Version::new(hash.clone()),
            Version::Hex(0x0123456789abcdef0123456789abcdef)
        );
        assert_eq!(Version::new(hash.clone()).text(), hash);
        assert_eq!(Version::new("0".repeat(32)).text(), "0".repeat(32));
        for other in [
            "v1",
            "",
            "0123456789ABCDEF0123456789ABCDEF",
            "+123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(
                Version::new(other.to_owned()),
                Version::Text(other.into()),
                "{other}"
            );
            assert_eq!(Version::new(other.to_owned()).text(), other);
        }
    }

    #[test]
    fn construction_errors() {
        let handlers: Vec<Arc<dyn Handler>> = vec![Recorder::new(A), Recorder::new(A)];
        assert!(matches!(
            Protocol::new(node(), handlers, &[]),
            Err(ConfigError::DuplicateHandler { type_url: A })
        ));
        assert!(matches!(
            Protocol::new(node(), vec![], &[]),
            Err(ConfigError::NoHandlers)
        ));
        let handlers: Vec<Arc<dyn Handler>> = vec![Recorder::new(A)];
        assert!(matches!(
            Protocol::new(node(), handlers, &[P]),
            Err(ConfigError::OnDemandWithoutHandler { type_url: P })
        ));
    }

    #[test]
    fn initial_requests_wildcard_and_on_demand() {
        let (mut proto, _, _) = protocol(&[A]);
        let (tx, _rx) = oneshot::channel();
        proto.demand(A, "/10.0.0.5".into(), tx);
        assert_eq!(proto.initial_requests().len(), 2);
        let address = initial(&proto, A);
        assert_eq!(address.node.as_ref().unwrap().id, node().id);
        assert_eq!(address.resource_names_subscribe, ["*", "/10.0.0.5"]);
        assert_eq!(address.resource_names_unsubscribe, ["*"]);
        let authz = initial(&proto, P);
        assert!(authz.node.is_some());
        assert!(authz.resource_names_subscribe.is_empty());
        assert!(authz.resource_names_unsubscribe.is_empty());
        assert!(authz.initial_resource_versions.is_empty());
    }

    #[test]
    fn ack_applies_and_records_versions() {
        let (mut proto, a, p) = protocol(&[]);
        assert!(!proto.is_synced());
        let out = proto.on_response(response(
            A,
            "n1",
            vec![
                resource("w1", "v1", b"ok", &[]),
                resource("w2", "v1", b"ok", &[]),
            ],
            &[],
        ));
        assert_eq!(out.reply.type_url, A);
        assert_eq!(out.reply.response_nonce, "n1");
        assert!(out.reply.error_detail.is_none() && out.reply.node.is_none());
        assert!(out.reply.resource_names_subscribe.is_empty());
        assert_eq!((out.applied, out.removed, out.is_nack()), (2, 0, false));
        assert_eq!(names(&a.take()[0]), ["+w1@v1", "+w2@v1"]);
        assert!(!proto.is_synced(), "authorization not answered yet");

        let out = proto.on_response(response(P, "n2", vec![], &[]));
        assert!(!out.is_nack());
        assert!(p.take().is_empty(), "an empty response delivers nothing");
        assert!(proto.is_synced());

        let out = proto.on_response(response(A, "n3", vec![], &["w1", "never-held"]));
        assert_eq!(out.removed, 1);
        assert_eq!(names(&a.take()[0]), ["-w1"], "only held names are removed");
        let held: Vec<_> = proto.held(A).unwrap().keys().cloned().collect();
        assert_eq!(held, ["w2"]);
        assert_eq!(
            initial(&proto, A).initial_resource_versions,
            [("w2".to_owned(), "v1".to_owned())].into()
        );
    }

    #[test]
    fn nack_lists_rejections_and_keeps_the_rest() {
        let (mut proto, a, _) = protocol(&[]);
        proto.on_response(response(
            A,
            "n1",
            vec![resource("w1", "v1", b"ok", &[])],
            &[],
        ));
        a.take();
        let mut no_body = resource("w4", "v1", b"", &[]);
        no_body.resource = None;
        let mut wrong_type = resource("w5", "v1", b"ok", &[]);
        if let Some(body) = wrong_type.resource.as_mut() {
            body.type_url = P.into();
        }
        let out = proto.on_response(response(
            A,
            "n2",
            vec![
                resource("w1", "v2", b"bad", &[]),
                resource("w2", "v1", b"ok", &[]),
                resource("w3", "v1", b"bad", &[]),
                no_body,
                wrong_type,
            ],
            &[],
        ));
        assert!(out.is_nack());
        let detail = out.reply.error_detail.unwrap();
        assert_eq!(detail.code, 0);
        assert_eq!(
            detail.message,
            format!(
                "w4: resource has no body; w5: body of type {P} in a {A} response; \
                 w1: bad body; w3: bad body"
            )
        );
        assert_eq!(out.reply.response_nonce, "n2");
        assert_eq!(out.applied, 1);
        assert_eq!(
            names(&a.take()[0]),
            ["+w1@v2", "+w2@v1", "+w3@v1"],
            "the handler sees every well-formed resource"
        );
        let held = proto.held(A).unwrap();
        assert_eq!(
            held.get("w1").map(String::as_str),
            Some("v1"),
            "old version kept"
        );
        assert_eq!(held.get("w2").map(String::as_str), Some("v1"));
        assert!(!held.contains_key("w3"), "rejected resource not recorded");
    }

    #[test]
    fn unknown_type_is_nacked() {
        let (mut proto, _, _) = protocol(&[]);
        let out = proto.on_response(response("type.googleapis.com/x.Y", "n", vec![], &[]));
        assert!(!out.known_type && out.is_nack());
        assert_eq!(
            out.reply.error_detail.unwrap().message,
            "type.googleapis.com/x.Y: no handler for this type url"
        );
        assert!(!proto.is_synced());
    }

    #[test]
    fn on_demand_names_resolve_by_name_alias_or_removal() {
        let (mut proto, a, _) = protocol(&[A]);
        assert_eq!(
            proto.unsynced.len(),
            1,
            "only authorization gates readiness"
        );

        let (tx, mut by_alias) = oneshot::channel();
        let DemandStep::Subscribe(request) = proto.demand(A, "/10.0.0.5".into(), tx) else {
            panic!("first demand subscribes");
        };
        assert_eq!(request.type_url, A);
        assert_eq!(request.resource_names_subscribe, ["/10.0.0.5"]);
        assert!(request.node.is_none() && request.response_nonce.is_empty());
        let (tx, mut again) = oneshot::channel();
        assert!(matches!(
            proto.demand(A, "/10.0.0.5".into(), tx),
            DemandStep::Waiting
        ));
        let (tx, mut missing) = oneshot::channel();
        assert!(matches!(
            proto.demand(A, "/10.9.9.9".into(), tx),
            DemandStep::Subscribe(_)
        ));
        let (tx, _rx) = oneshot::channel();
        assert!(matches!(
            proto.demand(P, "x".into(), tx),
            DemandStep::NotOnDemand
        ));

        proto.on_response(response(
            A,
            "n1",
            vec![resource("uid-1", "v1", b"ok", &["/10.0.0.5"])],
            &[],
        ));
        assert!(by_alias.try_recv().is_ok() && again.try_recv().is_ok());
        assert!(missing.try_recv().is_err(), "not mentioned yet");
        assert_eq!(names(&a.take()[0]), ["+uid-1@v1"]);

        proto.on_response(response(A, "n2", vec![], &["/10.9.9.9"]));
        assert!(missing.try_recv().is_ok());
        assert!(a.take().is_empty(), "an unknown name delivers nothing");

        let (tx, _rx) = oneshot::channel();
        assert!(matches!(
            proto.demand(A, "/10.9.9.9".into(), tx),
            DemandStep::Answered
        ));
        assert_eq!(
            initial(&proto, A).resource_names_subscribe,
            ["*", "/10.0.0.5", "/10.9.9.9"],
            "names stay subscribed across reconnects"
        );
    }
}
