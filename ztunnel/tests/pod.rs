//! A pod proxy in a real network namespace: listeners created inside the pod's netns, the
//! in-pod redirection rules installed the way the node agent will, and traffic captured on
//! 15001 and 15006 and carried over HBONE on 15008 — all inside a throw-away netns
//! (`weft-podtest-<pid>`); the host namespace is never touched. Needs root (skipped with a
//! printed reason otherwise; CI runs as root).
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_core::ca::{Config, Signer};
use weft_core::cert_manager::{self, LocalCa, Manager};
use weft_core::xds::Update;
use weft_proto::istio::security::{
    Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match,
};
use weft_proto::istio::workload::zds::WorkloadInfo;
use weft_proto::istio::workload::{
    Address, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, address,
};
use weft_proto::type_url::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use ztunnel::metrics::Metrics;
use ztunnel::netns::InpodNetns;
use ztunnel::pod::{PodProxy, Shared};
use ztunnel::state::ProxyState;

mod support;

use support::{PodNetns, SKIP_ZTUNNEL, VIP_TO_OUTBOUND, root_or_skip};

const STEP: Duration = Duration::from_secs(10);

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

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An unmarked app client inside the pod (what the pod's own application does).
async fn app_client(netns: &InpodNetns, addr: SocketAddr) -> TcpStream {
    let std = netns
        .run_async(move || {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .await
        .unwrap();
    TcpStream::from_std(std).unwrap()
}

async fn exchange(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"marker-42\n").await?;
    stream.shutdown().await?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_traffic_goes_through_the_pod_proxy() {
    if !root_or_skip("captured_traffic_goes_through_the_pod_proxy") {
        return;
    }
    // The in-pod rules (reference §5.2, the subset this test exercises): ztunnel's own sockets
    // (mark 0x539) are never redirected; app traffic to a VIP goes to 15001, to the pod's app
    // port to 15006.
    let pod = PodNetns::new(
        "weft-podtest",
        &[
            SKIP_ZTUNNEL,
            VIP_TO_OUTBOUND,
            "-t nat -A OUTPUT -p tcp -d 10.99.0.2 --dport 8080 -j REDIRECT --to-ports 15006",
        ],
    );
    let netns = pod.netns.clone();

    // The app: an echo server on the pod IP that reports the peer it saw.
    let app = netns
        .run(|| {
            let l = std::net::TcpListener::bind("10.99.0.2:8080")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .unwrap();
    let app = tokio::net::TcpListener::from_std(app).unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, peer)) = app.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = conn.read_to_end(&mut got).await;
                let _ = conn
                    .write_all(
                        format!("from {} said {}", peer.ip(), String::from_utf8_lossy(&got))
                            .as_bytes(),
                    )
                    .await;
            });
        }
    });

    // State as the controller would send it: the pod (HBONE) behind service 10.96.0.10:80.
    let state = ProxyState::new();
    let workload = Workload {
        uid: "w-p".into(),
        name: "p".into(),
        namespace: "a".into(),
        service_account: "server".into(),
        addresses: vec![vec![10, 99, 0, 2]],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        services: [(
            "a/echo.a.svc.cluster.local".to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        )]
        .into(),
        ..Default::default()
    };
    let service = Service {
        name: "echo".into(),
        namespace: "a".into(),
        hostname: "echo.a.svc.cluster.local".into(),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 10],
            length: None,
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    let rejected = state.handlers()[0].apply(vec![
        any(
            ADDRESS_TYPE_URL,
            "w-p",
            Address {
                r#type: Some(address::Type::Workload(workload)),
            }
            .encode_to_vec(),
        ),
        any(
            ADDRESS_TYPE_URL,
            "a/echo.a.svc.cluster.local",
            Address {
                r#type: Some(address::Type::Service(service)),
            }
            .encode_to_vec(),
        ),
    ]);
    assert!(rejected.is_empty(), "{rejected:?}");

    let signer = Arc::new(Signer::generate_root("cluster.local", Config::default()).unwrap());
    let certificates = Manager::new(
        Arc::new(LocalCa::new(signer, Duration::from_secs(3600))),
        cert_manager::Config::default(),
    );
    let shared = Arc::new(Shared {
        state: state.clone(),
        certificates,
        metrics: Arc::new(Metrics::default()),
        start_timeout: STEP,
        tracker: ztunnel::conntrack::Tracker::new(),
        outbound_connections: ztunnel::conntrack::OutboundTable::new(),
    });
    let info = WorkloadInfo {
        name: "p".into(),
        namespace: "a".into(),
        service_account: "server".into(),
    };
    let proxy = within("pod proxy", PodProxy::start(shared, info, netns.clone()))
        .await
        .unwrap();
    assert_eq!(proxy.netns, netns.id());

    // Outbound: the app dials the VIP; 15001 → HBONE to 15008 (this pod) → app.
    let mut via_vip = app_client(&netns, "10.96.0.10:80".parse().unwrap()).await;
    let reply = within("vip exchange", exchange(&mut via_vip))
        .await
        .unwrap();
    assert_eq!(reply, "from 10.99.0.2 said marker-42\n");

    // Inbound plaintext: a direct connection to the app port is captured on 15006.
    let mut direct = app_client(&netns, "10.99.0.2:8080".parse().unwrap()).await;
    let reply = within("plaintext exchange", exchange(&mut direct))
        .await
        .unwrap();
    assert_eq!(reply, "from 10.99.0.2 said marker-42\n");

    // STRICT: deny connections without a principal; plaintext is refused, HBONE still works.
    let strict = Authorization {
        name: "strict".into(),
        namespace: "a".into(),
        scope: Scope::Namespace as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    not_principals: vec![StringMatch {
                        match_type: Some(string_match::MatchType::Presence(())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    assert!(
        state.handlers()[1]
            .apply(vec![any(
                AUTHORIZATION_TYPE_URL,
                "a/strict",
                strict.encode_to_vec()
            )])
            .is_empty()
    );
    let mut direct = app_client(&netns, "10.99.0.2:8080".parse().unwrap()).await;
    let refused = within("plaintext refused", exchange(&mut direct)).await;
    assert!(
        refused.map(|r| r.is_empty()).unwrap_or(true),
        "plaintext must get no reply under STRICT"
    );
    let mut via_vip = app_client(&netns, "10.96.0.10:80".parse().unwrap()).await;
    let reply = within("vip exchange under strict", exchange(&mut via_vip))
        .await
        .unwrap();
    assert_eq!(reply, "from 10.99.0.2 said marker-42\n");

    drop(proxy);
}
