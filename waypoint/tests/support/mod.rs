//! A waypoint in one process on loopback: a test CA, the waypoint's HBONE server with its own
//! certificate, endpoints that are real HBONE servers (as a destination ztunnel would be) in
//! front of small HTTP/TCP apps, and a client that opens HBONE streams to the waypoint with a
//! client workload's certificate. State is fed through the xDS handlers with encoded resources.
#![allow(
    dead_code,
    clippy::unwrap_used,
    unreachable_pub,
    missing_docs,
    clippy::print_stdout
)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use waypoint::inbound::Inbound;
use waypoint::metrics::Metrics;
use waypoint::proxy::Proxy;
use waypoint::state::{Binding, WaypointState};
use waypoint::upstream::Forwarder;
use weft_core::ca::{Config, Signer};
use weft_core::cert_manager::LocalCa;
use weft_core::hbone::{
    self, ConnectRequest, Connector, Decision, Handler, Key, Pool, PoolConfig, Refusal, Server,
    Settings, TcpConnector,
};
use weft_core::xds::Update;
use weft_core::{SpiffeId, drain};
use weft_proto::istio::workload::{
    self as wpb, Address, GatewayAddress, NamespacedHostname, NetworkAddress, PortList,
    TunnelProtocol, address, gateway_address,
};
use weft_proto::type_url::ADDRESS_TYPE_URL;

/// Every await in a test is bounded by this.
pub const T: Duration = Duration::from_secs(10);
pub const WAYPOINT_HOST: &str = "wp.app.svc.cluster.local";
pub const CLIENT_IP: [u8; 4] = [127, 0, 0, 2];

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

pub fn any(type_url: &str, name: &str, value: Vec<u8>) -> Update {
    Update::Upsert {
        name: name.into(),
        version: "1".into(),
        body: prost_types::Any {
            type_url: type_url.into(),
            value,
        },
    }
}

fn waypoint_ref(bound: bool) -> Option<GatewayAddress> {
    bound.then(|| GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: "app".into(),
            hostname: WAYPOINT_HOST.into(),
        })),
        hbone_mtls_port: 15008,
    })
}

/// A Service `name.app.svc.cluster.local` with `vip` and `ports` (service port → target port).
pub fn service(name: &str, vip: [u8; 4], ports: &[(u32, u32)], bound: bool) -> Update {
    let s = wpb::Service {
        name: name.into(),
        namespace: "app".into(),
        hostname: format!("{name}.app.svc.cluster.local"),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: vip.to_vec(),
            length: None,
        }],
        ports: ports
            .iter()
            .map(|&(p, t)| wpb::Port {
                service_port: p,
                target_port: t,
                app_protocol: 0,
            })
            .collect(),
        waypoint: waypoint_ref(bound),
        ..Default::default()
    };
    any(
        ADDRESS_TYPE_URL,
        &format!("app/{name}.app.svc.cluster.local"),
        Address {
            r#type: Some(address::Type::Service(s)),
        }
        .encode_to_vec(),
    )
}

/// A workload `uid` (service account `sa`) at `ip`, an endpoint of `services`
/// (`service name`, service port, target port).
pub fn workload(
    uid: &str,
    sa: &str,
    ip: IpAddr,
    services: &[(&str, u32, u32)],
    bound: bool,
) -> Update {
    workload_with_tunnel(uid, sa, ip, services, bound, TunnelProtocol::Hbone)
}

/// [`workload`] with the given tunnel (`None`: reached with plain TCP).
pub fn workload_with_tunnel(
    uid: &str,
    sa: &str,
    ip: IpAddr,
    services: &[(&str, u32, u32)],
    bound: bool,
    tunnel: TunnelProtocol,
) -> Update {
    let w = wpb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "app".into(),
        service_account: sa.into(),
        workload_name: uid.into(),
        canonical_name: uid.into(),
        addresses: vec![match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }],
        tunnel_protocol: tunnel as i32,
        waypoint: waypoint_ref(bound),
        services: services
            .iter()
            .map(|&(name, port, target)| {
                (
                    format!("app/{name}.app.svc.cluster.local"),
                    PortList {
                        ports: vec![wpb::Port {
                            service_port: port,
                            target_port: target,
                            app_protocol: 0,
                        }],
                    },
                )
            })
            .collect(),
        ..Default::default()
    };
    any(
        ADDRESS_TYPE_URL,
        uid,
        Address {
            r#type: Some(address::Type::Workload(w)),
        }
        .encode_to_vec(),
    )
}

/// What an app does with each request: `n` is the app's request count (1-based).
pub type Behaviour = Arc<dyn Fn(usize) -> (StatusCode, Duration) + Send + Sync>;

pub fn ok() -> Behaviour {
    Arc::new(|_| (StatusCode::OK, Duration::ZERO))
}

/// An HTTP app (HTTP/1.1 and HTTP/2) on `ip`: answers per `behaviour` with `x-served-by: name`,
/// `x-proto: <version>` and echoes `x-request-id`, `traceparent` as `x-seen-request-id`,
/// `x-seen-traceparent`; the body is the request body.
pub struct App {
    pub addr: SocketAddr,
    pub count: Arc<AtomicUsize>,
}

pub async fn http_app(ip: IpAddr, name: &str, behaviour: Behaviour) -> App {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let name: Arc<str> = Arc::from(name);
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let name = name.clone();
            let counter = counter.clone();
            let behaviour = behaviour.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let name = name.clone();
                        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                        let (status, delay) = behaviour(n);
                        async move {
                            let version = format!("{:?}", req.version());
                            let grpc = req
                                .headers()
                                .get("content-type")
                                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                            let echoed: Vec<(String, http::HeaderValue)> = req
                                .headers()
                                .iter()
                                .filter(|(k, _)| k.as_str().starts_with("x-add"))
                                .map(|(k, v)| (format!("x-seen-{}", k.as_str()), v.clone()))
                                .collect();
                            let rid = req.headers().get("x-request-id").cloned();
                            let tp = req.headers().get("traceparent").cloned();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            tokio::time::sleep(delay).await;
                            let mut resp = Response::builder()
                                .status(status)
                                .header("x-served-by", &*name)
                                .header("x-proto", version);
                            if let Some(v) = rid {
                                resp = resp.header("x-seen-request-id", v);
                            }
                            if let Some(v) = tp {
                                resp = resp.header("x-seen-traceparent", v);
                            }
                            for (k, v) in echoed {
                                resp = resp.header(k, v);
                            }
                            if grpc {
                                // A trailers-only style answer: the status in the headers.
                                resp = resp
                                    .header("content-type", "application/grpc")
                                    .header("grpc-status", "0");
                            }
                            Ok::<_, Infallible>(resp.body(Full::new(body)).unwrap())
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            });
        }
    });
    App { addr, count }
}

/// A TCP echo app on `ip`.
pub async fn tcp_echo(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The destination side of an endpoint (what its ztunnel does): CONNECT `ip:port` → TCP to it;
/// records each CONNECT's `forwarded` header and peer identity.
struct Deliver(Arc<Mutex<Vec<(String, String)>>>);

impl Handler for Deliver {
    type Upstream = TcpStream;

    async fn decide(&self, request: &ConnectRequest) -> Decision<TcpStream> {
        let forwarded = request
            .headers
            .get("forwarded")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        self.0
            .lock()
            .unwrap()
            .push((forwarded, request.peer_identity.to_string()));
        let hbone::Authority::Addr(addr) = request.authority else {
            return Decision::Refuse(Refusal::BadRequest);
        };
        match TcpStream::connect(addr).await {
            Ok(tcp) => Decision::Accept {
                upstream: tcp,
                headers: http::HeaderMap::new(),
            },
            Err(_) => Decision::Refuse(Refusal::Unavailable),
        }
    }
}

/// Connects `ip:15008` to `ip:<the endpoint's test HBONE port>`.
#[derive(Default)]
pub struct PortMap(pub Mutex<HashMap<IpAddr, u16>>);

impl Connector for PortMap {
    fn connect(
        &self,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        let port = self.0.lock().unwrap().get(&dst.ip()).copied().unwrap_or(1);
        TcpConnector.connect(SocketAddr::new(dst.ip(), port), src_ip)
    }
}

pub struct Mesh {
    pub state: Arc<WaypointState>,
    pub metrics: Arc<Metrics>,
    pub forwarder: Arc<Forwarder>,
    pub waypoint: SocketAddr,
    pub waypoint_id: SpiffeId,
    pub ca: LocalCa,
    pub ports: Arc<PortMap>,
    pub client_pool: Pool,
    pub drain: Option<drain::Trigger>,
    pub watch: drain::Watch,
    /// What endpoints saw: (`forwarded`, peer identity) per CONNECT.
    pub connects: Arc<Mutex<Vec<(String, String)>>>,
}

impl Mesh {
    pub async fn new() -> Mesh {
        let signer = Arc::new(Signer::generate_root("cluster.local", Config::default()).unwrap());
        let ca = LocalCa::new(signer, Duration::from_secs(3600));
        let waypoint_id = id("app", "wp");
        let waypoint_cert = Arc::new(ca.issue(&waypoint_id).unwrap());
        let state = WaypointState::new();
        let ports = Arc::new(PortMap::default());
        let pool = Pool::new(
            PoolConfig::default(),
            ports.clone(),
            Arc::new(waypoint_cert.clone()),
        );
        let forwarder = Arc::new(Forwarder::new(state.clone(), pool, waypoint_id.clone()));
        let metrics = Arc::new(Metrics::default());
        let proxy = Arc::new(Proxy::new(
            state.clone(),
            forwarder.clone(),
            metrics.clone(),
        ));
        let (trigger, watch) = drain::channel();
        let binding = Binding {
            namespace: "app".into(),
            hostname: WAYPOINT_HOST.into(),
            own_ips: vec![[127, 0, 0, 1].into()],
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let waypoint = listener.local_addr().unwrap();
        let inbound = Inbound::new(proxy, binding, watch.clone());
        tokio::spawn(
            Arc::new(Server::new(
                Settings::default(),
                waypoint_cert,
                Arc::new(inbound),
            ))
            .serve(listener, watch.clone()),
        );
        let client_cert = Arc::new(ca.issue(&id("app", "client")).unwrap());
        let client_pool = Pool::new(
            PoolConfig::default(),
            Arc::new(TcpConnector),
            Arc::new(client_cert),
        );
        let mesh = Mesh {
            state,
            metrics,
            forwarder,
            waypoint,
            waypoint_id,
            ca,
            ports,
            client_pool,
            drain: Some(trigger),
            watch,
            connects: Arc::default(),
        };
        mesh.apply(vec![workload(
            "client",
            "client",
            IpAddr::from(CLIENT_IP),
            &[],
            false,
        )]);
        mesh
    }

    /// Applies Address updates (must all be accepted).
    pub fn apply(&self, updates: Vec<Update>) {
        let rejected = self.state.handlers()[0].apply(updates);
        assert!(rejected.is_empty(), "{rejected:?}");
    }

    /// Starts an endpoint HBONE server on `ip` presenting `sa`'s certificate.
    pub async fn endpoint_server(&self, ip: IpAddr, sa: &str) {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        self.ports.0.lock().unwrap().insert(ip, port);
        let cert = Arc::new(self.ca.issue(&id("app", sa)).unwrap());
        tokio::spawn(
            Arc::new(Server::new(
                Settings::default(),
                cert,
                Arc::new(Deliver(self.connects.clone())),
            ))
            .serve(listener, self.watch.clone()),
        );
    }

    /// An HTTP endpoint `uid` of service `svc` (port 80) at `ip`, with its HBONE server.
    pub async fn http_endpoint(
        &self,
        uid: &str,
        svc: &str,
        ip: [u8; 4],
        behaviour: Behaviour,
    ) -> App {
        let ip = IpAddr::from(ip);
        let app = http_app(ip, uid, behaviour).await;
        self.endpoint_server(ip, "echo").await;
        self.apply(vec![workload(
            uid,
            "echo",
            ip,
            &[(svc, 80, u32::from(app.addr.port()))],
            false,
        )]);
        app
    }

    /// Opens an HBONE stream to the waypoint for `authority`, from the client's IP.
    pub async fn connect(&self, authority: &str) -> Result<hbone::Stream, hbone::PoolError> {
        let key = Key::new(
            id("app", "client"),
            vec![self.waypoint_id.clone()],
            self.waypoint,
            Some(IpAddr::from(CLIENT_IP)),
        );
        tokio::time::timeout(
            T,
            self.client_pool
                .connect(&key, authority, http::HeaderMap::new()),
        )
        .await
        .expect("connect timed out")
    }

    /// An HTTP/1.1 client over a new stream to `authority`.
    pub async fn h1(
        &self,
        authority: &str,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let stream = self.connect(authority).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// An HTTP/2 client over a new stream to `authority`.
    pub async fn h2(
        &self,
        authority: &str,
    ) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let stream = self.connect(authority).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    pub fn metrics_text(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        self.metrics.register(&mut registry);
        waypoint::metrics::encode(&registry)
    }
}

/// GET `path` on `authority` over HTTP/1.1; (status, headers, body).
pub async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: &str,
    path: &str,
) -> (StatusCode, http::HeaderMap, String) {
    let request = Request::get(path)
        .header("host", authority)
        .body(Full::new(Bytes::new()))
        .unwrap();
    tokio::time::timeout(T, sender.ready())
        .await
        .expect("connection not ready in time")
        .expect("connection closed");
    let response = tokio::time::timeout(T, sender.send_request(request))
        .await
        .expect("request timed out")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(T, body.collect())
        .await
        .expect("body timed out")
        .unwrap()
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}
