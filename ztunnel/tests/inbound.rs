//! Inbound HBONE on loopback: real certificates and TLS, the core HBONE client pool, and the
//! state fed through the xDS handlers as the controller would.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderMap, StatusCode};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_core::ca::{Config, Signer};
use weft_core::cert_manager::LocalCa;
use weft_core::hbone::{Key, Pool, PoolConfig, Server, Settings, TcpConnector};
use weft_core::xds::Update;
use weft_core::{SpiffeId, WorkloadCertificate, drain};
use weft_proto::istio::security::{
    Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match,
};
use weft_proto::istio::workload::{
    Address, NetworkAddress, Port, PortList, Service, Workload, address,
};
use weft_proto::type_url::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ztunnel::inbound::{AppConnector, Inbound};
use ztunnel::state::ProxyState;

const T: Duration = Duration::from_secs(10);

/// Connects on loopback and records the source ztunnel asked for (a pod netns would bind it).
struct PlainConnector(Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>);

impl AppConnector for PlainConnector {
    fn connect(
        &self,
        dst: SocketAddr,
        source: std::net::IpAddr,
    ) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        self.0.lock().unwrap().push(source);
        Box::pin(TcpStream::connect(dst))
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

fn upsert(name: &str, type_url: &str, value: Vec<u8>) -> Update {
    Update::Upsert {
        name: name.into(),
        version: "1".into(),
        body: prost_types::Any {
            type_url: type_url.into(),
            value,
        },
    }
}

fn server_workload() -> Update {
    let w = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: "srv".into(),
            name: "server".into(),
            namespace: "b".into(),
            service_account: "server".into(),
            addresses: vec![vec![127, 0, 0, 1]],
            workload_name: "server".into(),
            canonical_name: "server".into(),
            canonical_revision: "v1".into(),
            ..Default::default()
        })),
    };
    upsert("srv", ADDRESS_TYPE_URL, w.encode_to_vec())
}

fn policy(name: &str, action: Action, m: Match) -> Update {
    let a = Authorization {
        name: name.into(),
        namespace: "b".into(),
        scope: Scope::Namespace as i32,
        action: action as i32,
        rules: vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
        ..Default::default()
    };
    upsert(
        &format!("b/{name}"),
        AUTHORIZATION_TYPE_URL,
        a.encode_to_vec(),
    )
}

fn exact(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(string_match::MatchType::Exact(s.into())),
    }
}

struct Fixture {
    state: Arc<ProxyState>,
    sources: Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>,
    hbone: SocketAddr,
    app: SocketAddr,
    signer: Arc<Signer>,
    _drain: drain::Trigger,
}

async fn start() -> Fixture {
    let signer = Arc::new(Signer::generate_root("cluster.local", Config::default()).unwrap());
    let state = ProxyState::new();
    let handlers = state.handlers();
    assert!(handlers[0].apply(vec![server_workload()]).is_empty());
    let app_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = app_listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = app_listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let cert = Arc::new(
        LocalCa::new(signer.clone(), Duration::from_secs(3600))
            .issue(&id("b", "server"))
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = listener.local_addr().unwrap();
    let (trigger, watch) = drain::channel();
    let sources = Arc::default();
    let inbound = Inbound::new(
        state.clone(),
        "srv".into(),
        PlainConnector(Arc::clone(&sources)),
    );
    tokio::spawn(
        Arc::new(Server::new(Settings::default(), cert, Arc::new(inbound))).serve(listener, watch),
    );
    Fixture {
        state,
        sources,
        hbone,
        app,
        signer,
        _drain: trigger,
    }
}

impl Fixture {
    fn pool(&self, client: &SpiffeId) -> (Pool, Key) {
        let cert: Arc<WorkloadCertificate> = Arc::new(
            LocalCa::new(self.signer.clone(), Duration::from_secs(3600))
                .issue(client)
                .unwrap(),
        );
        let pool = Pool::new(
            PoolConfig::default(),
            Arc::new(TcpConnector),
            Arc::new(cert),
        );
        (
            pool,
            Key::new(client.clone(), vec![id("b", "server")], self.hbone, None),
        )
    }

    async fn connect(
        &self,
        client: &SpiffeId,
        authority: &str,
    ) -> Result<weft_core::hbone::Stream, Option<StatusCode>> {
        self.connect_with(client, authority, HeaderMap::new()).await
    }

    async fn connect_with(
        &self,
        client: &SpiffeId,
        authority: &str,
        headers: HeaderMap,
    ) -> Result<weft_core::hbone::Stream, Option<StatusCode>> {
        let (pool, key) = self.pool(client);
        tokio::time::timeout(T, pool.connect(&key, authority, headers))
            .await
            .expect("connect in time")
            .map_err(|e| e.status())
    }

    fn apply_policies(&self, updates: Vec<Update>) {
        assert!(self.state.handlers()[1].apply(updates).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_streams_reach_the_app_with_destination_baggage() {
    let fx = start().await;
    let mut stream = fx
        .connect(&id("a", "client"), &fx.app.to_string())
        .await
        .unwrap();
    let baggage = stream
        .response_headers()
        .get("baggage")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        baggage.contains("k8s.namespace.name=b") && baggage.contains("service.version=v1"),
        "{baggage}"
    );
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(T, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_and_statuses() {
    let fx = start().await;
    let client = id("a", "client");
    // Not this pod's IP → 400; ztunnel's own port → 503; nothing listening → 503.
    assert_eq!(
        fx.connect(&client, &format!("127.0.0.2:{}", fx.app.port()))
            .await
            .unwrap_err(),
        Some(StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        fx.connect(&client, "127.0.0.1:15006").await.unwrap_err(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(
        fx.connect(&client, &closed.to_string()).await.unwrap_err(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    // Unknown local workload → 503.
    fx.state.handlers()[0].apply(vec![Update::Remove { name: "srv".into() }]);
    assert_eq!(
        fx.connect(&client, &fx.app.to_string()).await.unwrap_err(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_authorization_decides_with_401() {
    let fx = start().await;
    let a = id("a", "client");
    let c = id("c", "other");
    let app = fx.app.to_string();

    // DENY by principal: a refused, c allowed.
    fx.apply_policies(vec![policy(
        "deny-a",
        Action::Deny,
        Match {
            principals: vec![exact("cluster.local/ns/a/sa/client")],
            ..Default::default()
        },
    )]);
    assert_eq!(
        fx.connect(&a, &app).await.unwrap_err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert!(fx.connect(&c, &app).await.is_ok());

    // ALLOW only namespace c (the DENY removed): a refused, c allowed.
    fx.apply_policies(vec![
        Update::Remove {
            name: "b/deny-a".into(),
        },
        policy(
            "only-c",
            Action::Allow,
            Match {
                namespaces: vec![exact("c")],
                ..Default::default()
            },
        ),
    ]);
    assert_eq!(
        fx.connect(&a, &app).await.unwrap_err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert!(fx.connect(&c, &app).await.is_ok());

    // A port rule works on the target port.
    fx.apply_policies(vec![
        Update::Remove {
            name: "b/only-c".into(),
        },
        policy(
            "port",
            Action::Allow,
            Match {
                destination_ports: vec![u32::from(fx.app.port())],
                ..Default::default()
            },
        ),
    ]);
    assert!(fx.connect(&a, &app).await.is_ok());
    fx.apply_policies(vec![policy(
        "port",
        Action::Allow,
        Match {
            destination_ports: vec![1],
            ..Default::default()
        },
    )]);
    assert_eq!(
        fx.connect(&a, &app).await.unwrap_err(),
        Some(StatusCode::UNAUTHORIZED)
    );
}

fn service(name: &str, vip: [u8; 4], target_port: u32) -> Update {
    let hostname = format!("{name}.b.svc.cluster.local");
    let s = Address {
        r#type: Some(address::Type::Service(Service {
            name: name.into(),
            namespace: "b".into(),
            hostname: hostname.clone(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vip.to_vec(),
                length: None,
            }],
            ports: vec![Port {
                service_port: 80,
                target_port,
                app_protocol: 0,
            }],
            ..Default::default()
        })),
    };
    upsert(
        &format!("b/{hostname}"),
        ADDRESS_TYPE_URL,
        s.encode_to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostname_authorities_resolve_to_this_pods_target_port() {
    let fx = start().await;
    let app_port = u32::from(fx.app.port());
    // srv backs echo.b (service port 80 → the app's port by its own port map; the service's
    // own target port is deliberately wrong); other.b exists but srv is not its endpoint.
    let mut srv = Workload {
        uid: "srv".into(),
        name: "server".into(),
        namespace: "b".into(),
        service_account: "server".into(),
        addresses: vec![vec![127, 0, 0, 1]],
        ..Default::default()
    };
    srv.services.insert(
        "b/echo.b.svc.cluster.local".into(),
        PortList {
            ports: vec![Port {
                service_port: 80,
                target_port: app_port,
                app_protocol: 0,
            }],
        },
    );
    let rejected = fx.state.handlers()[0].apply(vec![
        upsert(
            "srv",
            ADDRESS_TYPE_URL,
            Address {
                r#type: Some(address::Type::Workload(srv)),
            }
            .encode_to_vec(),
        ),
        service("echo", [10, 96, 0, 1], 1),
        service("other", [10, 96, 0, 2], app_port),
    ]);
    assert!(rejected.is_empty(), "{rejected:?}");
    let client = id("a", "client");

    let mut stream = fx
        .connect(&client, "echo.b.svc.cluster.local:80")
        .await
        .unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(T, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");

    // Not an endpoint of that service → 400; no such service or port → 503.
    for (authority, status) in [
        ("other.b.svc.cluster.local:80", StatusCode::BAD_REQUEST),
        (
            "nope.b.svc.cluster.local:80",
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            "echo.b.svc.cluster.local:81",
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ] {
        assert_eq!(
            fx.connect(&client, authority).await.unwrap_err(),
            Some(status),
            "{authority}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_client_address_is_trusted_only_from_this_workloads_waypoint() {
    let fx = start().await;
    // The waypoint pod (b/waypoint at 127.0.0.9) and the server behind it, by address.
    let waypoint_pod = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: "wp".into(),
            name: "waypoint".into(),
            namespace: "b".into(),
            service_account: "waypoint".into(),
            addresses: vec![vec![127, 0, 0, 9]],
            ..Default::default()
        })),
    };
    let behind = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: "srv".into(),
            name: "server".into(),
            namespace: "b".into(),
            service_account: "server".into(),
            addresses: vec![vec![127, 0, 0, 1]],
            waypoint: Some(weft_proto::istio::workload::GatewayAddress {
                destination: Some(
                    weft_proto::istio::workload::gateway_address::Destination::Address(
                        NetworkAddress {
                            network: String::new(),
                            address: vec![127, 0, 0, 9],
                            length: None,
                        },
                    ),
                ),
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        })),
    };
    assert!(
        fx.state.handlers()[0]
            .apply(vec![
                upsert("wp", ADDRESS_TYPE_URL, waypoint_pod.encode_to_vec()),
                upsert("srv", ADDRESS_TYPE_URL, behind.encode_to_vec()),
            ])
            .is_empty()
    );
    let forwarded = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert("forwarded", value.parse().unwrap());
        headers
    };
    let app = fx.app.to_string();
    let waypoint = id("b", "waypoint");
    let client = id("a", "client");
    let cases = [
        // (peer, forwarded, source the app connection must use)
        (&waypoint, Some("for=\"10.1.2.3:5555\""), "10.1.2.3"),
        (
            &waypoint,
            Some("For=10.1.2.4;host=echo.b.svc.cluster.local"),
            "10.1.2.4",
        ),
        // Another family than the destination: unusable, the peer's address is kept.
        (&waypoint, Some("for=\"[fd00::7]:1\""), "127.0.0.1"),
        (&waypoint, None, "127.0.0.1"),
        // Anyone but the waypoint: the header is ignored.
        (&client, Some("for=\"10.1.2.3:5555\""), "127.0.0.1"),
        (&id("b", "impostor"), Some("for=10.6.6.6"), "127.0.0.1"),
    ];
    for (peer, header, want) in cases {
        fx.sources.lock().unwrap().clear();
        let headers = header.map(forwarded).unwrap_or_default();
        let _stream = fx.connect_with(peer, &app, headers).await.unwrap();
        assert_eq!(
            fx.sources.lock().unwrap().as_slice(),
            &[want.parse::<std::net::IpAddr>().unwrap()],
            "peer {peer}, forwarded {header:?}"
        );
    }
}
