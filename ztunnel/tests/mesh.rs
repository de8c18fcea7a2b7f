//! The L4 mesh in one process on loopback: a client pod's outbound path routes a service VIP to
//! the server pod's inbound HBONE listener (real certificates, TLS, HTTP/2), with the state fed
//! through the xDS handlers. Pods are distinct loopback addresses.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_core::ca::{Config, Signer};
use weft_core::cert_manager::LocalCa;
use weft_core::hbone::{Pool, PoolConfig, Server, Settings, TcpConnector};
use weft_core::xds::Update;
use weft_core::{SpiffeId, drain};
use weft_proto::istio::security::{
    Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match,
};
use weft_proto::istio::workload::{
    Address, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, address,
};
use weft_proto::type_url::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ztunnel::inbound::{AppConnector, Inbound};
use ztunnel::metrics::{self, Metrics};
use ztunnel::outbound::{Error as OutboundError, Outbound, UpstreamConnector};
use ztunnel::state::ProxyState;

const T: Duration = Duration::from_secs(10);
const CLIENT_IP: [u8; 4] = [127, 0, 0, 2];
const SERVER_IP: [u8; 4] = [127, 0, 0, 3];
const VIP: [u8; 4] = [10, 96, 0, 10];

struct Plain;

impl AppConnector for Plain {
    fn connect(
        &self,
        dst: SocketAddr,
        _: std::net::IpAddr,
    ) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(dst))
    }
}

impl UpstreamConnector for Plain {
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(dst))
    }
}

fn any(type_url: &str, name: &str, value: Vec<u8>) -> Update {
    Update::Upsert {
        name: name.into(),
        version: "1".into(),
        body: prost_types::Any {
            type_url: type_url.into(),
            value,
        },
    }
}

fn workload(
    uid: &str,
    ns: &str,
    sa: &str,
    ip: [u8; 4],
    hbone: bool,
    services: Vec<(&str, u32, u32)>,
) -> Update {
    let w = Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: if hbone {
            TunnelProtocol::Hbone as i32
        } else {
            TunnelProtocol::None as i32
        },
        services: services
            .into_iter()
            .map(|(key, port, target)| {
                (
                    key.to_owned(),
                    PortList {
                        ports: vec![Port {
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

fn service(target_port: u32) -> Update {
    let s = Service {
        name: "echo".into(),
        namespace: "b".into(),
        hostname: "echo.b.svc.cluster.local".into(),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: VIP.to_vec(),
            length: None,
        }],
        ports: vec![Port {
            service_port: 80,
            target_port,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    any(
        ADDRESS_TYPE_URL,
        "b/echo.b.svc.cluster.local",
        Address {
            r#type: Some(address::Type::Service(s)),
        }
        .encode_to_vec(),
    )
}

async fn echo_app(ip: [u8; 4]) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from((ip, 0))).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = conn
                    .write_all(format!("hello {}\n", peer.ip()).as_bytes())
                    .await;
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Mesh {
    tracker: Arc<ztunnel::conntrack::Tracker>,
    state: Arc<ProxyState>,
    metrics: Arc<Metrics>,
    outbound: Arc<Outbound<Plain>>,
    app: SocketAddr,
    _drain: drain::Trigger,
}

async fn mesh() -> Mesh {
    mesh_presenting("server").await
}

/// The mesh of [`mesh`] with the server pod presenting a certificate for service account
/// `presented` in namespace `b` (xDS says the server is `b/server`).
async fn mesh_presenting(presented: &str) -> Mesh {
    let signer = Arc::new(Signer::generate_root("cluster.local", Config::default()).unwrap());
    let ca = LocalCa::new(signer, Duration::from_secs(3600));
    let client_id = SpiffeId::new("cluster.local", "a", "client").unwrap();
    let app = echo_app(SERVER_IP).await;

    // One state (as both ztunnels would receive the same xDS).
    let state = ProxyState::new();
    let handlers = state.handlers();
    let rejected = handlers[0].apply(vec![
        workload("cli", "a", "client", CLIENT_IP, true, vec![]),
        workload(
            "srv",
            "b",
            "server",
            SERVER_IP,
            true,
            vec![("b/echo.b.svc.cluster.local", 80, u32::from(app.port()))],
        ),
        service(u32::from(app.port())),
    ]);
    assert!(rejected.is_empty(), "{rejected:?}");

    // The server pod's inbound HBONE listener.
    let listener = TcpListener::bind(SocketAddr::from((SERVER_IP, 0)))
        .await
        .unwrap();
    let hbone_port = listener.local_addr().unwrap().port();
    let (trigger, watch) = drain::channel();
    let presented = SpiffeId::new("cluster.local", "b", presented).unwrap();
    let server_cert = Arc::new(ca.issue(&presented).unwrap());
    let metrics = Arc::new(Metrics::default());
    let tracker = ztunnel::conntrack::Tracker::new();
    tokio::spawn(tracker.clone().watch(state.clone()));
    let inbound = Inbound::new(state.clone(), "srv".into(), Plain)
        .with_metrics(metrics.clone())
        .with_tracker(tracker.clone());
    tokio::spawn(
        Arc::new(Server::new(
            Settings::default(),
            server_cert,
            Arc::new(inbound),
        ))
        .serve(listener, watch),
    );

    // The client pod's outbound path with its own pool and certificate.
    let client_cert = Arc::new(ca.issue(&client_id).unwrap());
    let pool = Pool::new(
        PoolConfig::default(),
        Arc::new(TcpConnector),
        Arc::new(client_cert),
    );
    let outbound = Arc::new(
        Outbound::new(state.clone(), "cli".into(), pool, Plain)
            .with_hbone_port(hbone_port)
            .with_metrics(metrics.clone()),
    );
    Mesh {
        tracker,
        state,
        metrics,
        outbound,
        app,
        _drain: trigger,
    }
}

/// Plays the app in the client pod: connects to a "15001" listener whose accepted connection is
/// handed to the outbound path with `dst` as original destination.
async fn app_connect(
    mesh: &Mesh,
    dst: SocketAddr,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<(u64, u64), OutboundError>>,
) {
    let capture = TcpListener::bind(SocketAddr::from((CLIENT_IP, 0)))
        .await
        .unwrap();
    let addr = capture.local_addr().unwrap();
    let outbound = mesh.outbound.clone();
    let task = tokio::spawn(async move {
        let (conn, _) = capture.accept().await.unwrap();
        outbound.proxy(conn, dst).await
    });
    (TcpStream::connect(addr).await.unwrap(), task)
}

async fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while tokio::time::timeout(T, stream.read(&mut byte))
        .await
        .unwrap()
        .unwrap()
        == 1
    {
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_vip_through_hbone_to_the_server() {
    let mesh = mesh().await;
    let (mut app, task) = app_connect(&mesh, SocketAddr::from((VIP, 80))).await;
    let greeting = read_line(&mut app).await;
    assert!(greeting.starts_with("hello "), "{greeting}");
    app.write_all(b"marker-123\n").await.unwrap();
    assert_eq!(read_line(&mut app).await, "marker-123");
    app.shutdown().await.unwrap();
    let (sent, received) = tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(sent, 11);
    assert!(received >= 11 + greeting.len() as u64);

    // Both sides counted the connection as mutual TLS with the right principals.
    let text = mesh_metrics(&mesh);
    for reporter in ["source", "destination"] {
        let opened = counter_line(&text, "istio_tcp_connections_opened_total", reporter);
        assert!(
            opened.contains("connection_security_policy=\"mutual_tls\""),
            "{opened}"
        );
        assert!(
            opened.contains("source_principal=\"spiffe://cluster.local/ns/a/sa/client\""),
            "{opened}"
        );
        assert!(
            opened.contains("destination_principal=\"spiffe://cluster.local/ns/b/sa/server\""),
            "{opened}"
        );
        assert!(opened.ends_with(" 1"), "{opened}");
    }
    let source_bytes = counter_line(&text, "istio_tcp_received_bytes_total", "source");
    assert!(source_bytes.ends_with(" 11"), "{source_bytes}");
    let opened = counter_line(&text, "istio_tcp_connections_opened_total", "source");
    assert!(
        opened.contains("destination_service=\"echo.b.svc.cluster.local\""),
        "{opened}"
    );
    // The destination reports its close once the stream ends (asynchronously).
    tokio::time::timeout(T, async {
        loop {
            let text = mesh_metrics(&mesh);
            if text.lines().any(|l| {
                l.starts_with("istio_tcp_received_bytes_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.ends_with(" 11")
            }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}

fn mesh_metrics(mesh: &Mesh) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    mesh.metrics.register(&mut registry);
    metrics::encode(&registry)
}

fn counter_line(text: &str, name: &str, reporter: &str) -> String {
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{")) && l.contains(&format!("reporter=\"{reporter}\""))
        })
        .unwrap_or_else(|| panic!("no {name} for reporter {reporter} in:\n{text}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_connections_end_and_report_401() {
    let mesh = mesh().await;
    let deny = Authorization {
        name: "deny-a".into(),
        namespace: "b".into(),
        scope: Scope::Namespace as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    namespaces: vec![StringMatch {
                        match_type: Some(string_match::MatchType::Exact("a".into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    assert!(
        mesh.state.handlers()[1]
            .apply(vec![any(
                AUTHORIZATION_TYPE_URL,
                "b/deny-a",
                deny.encode_to_vec()
            )])
            .is_empty()
    );
    let (mut app, task) = app_connect(&mesh, SocketAddr::from((VIP, 80))).await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(T, app.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the app sees the connection end without data");
    let err = tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    match err {
        OutboundError::Hbone { source, .. } => {
            assert_eq!(source.status(), Some(http::StatusCode::UNAUTHORIZED))
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    let text = mesh_metrics(&mesh);
    for reporter in ["source", "destination"] {
        let closed = counter_line(&text, "istio_tcp_connections_closed_total", reporter);
        assert!(closed.contains("response_flags=\"DENY\""), "{closed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_mesh_and_unknown_destinations_use_plain_tcp() {
    let mesh = mesh().await;
    // The server switched out of the mesh: plain TCP to podIP:targetPort.
    assert!(
        mesh.state.handlers()[0]
            .apply(vec![workload(
                "srv",
                "b",
                "server",
                SERVER_IP,
                false,
                vec![("b/echo.b.svc.cluster.local", 80, u32::from(mesh.app.port()))]
            )])
            .is_empty()
    );
    let (mut app, _task) = app_connect(&mesh, SocketAddr::from((VIP, 80))).await;
    assert!(read_line(&mut app).await.starts_with("hello 127.0.0."));
    // An address the mesh does not know passes through unchanged.
    let outside = echo_app([127, 0, 0, 9]).await;
    let (mut app, _task) = app_connect(&mesh, outside).await;
    assert!(read_line(&mut app).await.starts_with("hello "));
    // A self-call is dropped.
    let (_app, task) = app_connect(&mesh, "127.0.0.1:15001".parse().unwrap()).await;
    assert!(matches!(
        tokio::time::timeout(T, task).await.unwrap().unwrap(),
        Err(OutboundError::SelfCall(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_applied_live_closes_an_established_connection() {
    let mesh = mesh().await;
    let (mut app, task) = app_connect(&mesh, SocketAddr::from((VIP, 80))).await;
    assert!(read_line(&mut app).await.starts_with("hello "));
    app.write_all(b"still-allowed\n").await.unwrap();
    assert_eq!(read_line(&mut app).await, "still-allowed");
    assert_eq!(mesh.tracker.len(), 1, "the inbound connection is tracked");

    // A DENY for the client's namespace arrives while the connection is open.
    let deny = Authorization {
        name: "late".into(),
        namespace: "b".into(),
        scope: Scope::Namespace as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    namespaces: vec![StringMatch {
                        match_type: Some(string_match::MatchType::Exact("a".into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    assert!(
        mesh.state.handlers()[1]
            .apply(vec![any(
                AUTHORIZATION_TYPE_URL,
                "b/late",
                deny.encode_to_vec()
            )])
            .is_empty()
    );
    // The server side closes: the app sees the stream end.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(T, app.read_to_end(&mut rest))
        .await
        .expect("connection closed");
    assert!(
        ended.is_err() || rest.is_empty(),
        "no more data after revocation: {rest:?}"
    );
    // Like any app seeing EOF, it closes; the client side then finishes too.
    drop(app);
    let _ = tokio::time::timeout(T, task)
        .await
        .expect("outbound side ends");
    tokio::time::timeout(T, async {
        while !mesh.tracker.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("untracked after close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_presenting_the_wrong_identity_is_refused() {
    // Same CA and trust domain, but the pod at the server's address holds another service
    // account's certificate: the client side must not send the app's bytes to it.
    let mesh = mesh_presenting("impostor").await;
    let (mut app, task) = app_connect(&mesh, SocketAddr::from((VIP, 80))).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(T, app.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        read.is_err() || buf.is_empty(),
        "the app must not reach the impostor: {:?}",
        String::from_utf8_lossy(&buf)
    );
    let result = tokio::time::timeout(T, task).await.unwrap().unwrap();
    let err = result.expect_err("the outbound proxy refuses the connection");
    let message = format!("{err:?}");
    assert!(
        message.contains("UnexpectedIdentity")
            && message.contains("spiffe://cluster.local/ns/b/sa/server")
            && message.contains("spiffe://cluster.local/ns/b/sa/impostor"),
        "{message}"
    );
    // Nothing reached the server's app: no destination-side connection was opened.
    let text = mesh_metrics(&mesh);
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")),
        "{text}"
    );
}
