use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use weft_proto::istio::workload as pb;

use super::*;
use crate::identity::SpiffeId;

// === fixtures ===

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn bytes(s: &str) -> Vec<u8> {
    match ip(s) {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn port_list(ports: &[(u32, u32)]) -> Vec<pb::Port> {
    ports
        .iter()
        .map(|&(service_port, target_port)| pb::Port {
            service_port,
            target_port,
            app_protocol: 0,
        })
        .collect()
}

/// An HBONE pod: uid = name = service account.
fn pod(uid: &str, ns: &str, addr: &str) -> pb::Workload {
    pb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: ns.into(),
        addresses: vec![bytes(addr)],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        service_account: uid.into(),
        ..Default::default()
    }
}

/// `w` as an endpoint of `key` with the given port map.
fn member(mut w: pb::Workload, key: &str, ports: &[(u32, u32)]) -> pb::Workload {
    w.services.insert(
        key.into(),
        pb::PortList {
            ports: port_list(ports),
        },
    );
    w
}

fn net_addr(addr: &str, length: Option<u32>) -> pb::NetworkAddress {
    pb::NetworkAddress {
        network: String::new(),
        address: bytes(addr),
        length,
    }
}

fn svc(ns: &str, name: &str, vip: &str, ports: &[(u32, u32)]) -> pb::Service {
    pb::Service {
        name: name.into(),
        namespace: ns.into(),
        hostname: format!("{name}.{ns}.svc.cluster.local"),
        addresses: vec![net_addr(vip, None)],
        ports: port_list(ports),
        ..Default::default()
    }
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}.{ns}.svc.cluster.local")
}

fn waypoint_by_hostname(ns: &str, name: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Hostname(
            pb::NamespacedHostname {
                namespace: ns.into(),
                hostname: format!("{name}.{ns}.svc.cluster.local"),
            },
        )),
        hbone_mtls_port: 15008,
    }
}

fn waypoint_by_address(addr: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(net_addr(
            addr, None,
        ))),
        hbone_mtls_port: 15008,
    }
}

fn wl(w: pb::Workload) -> Workload {
    Workload::try_from(w).unwrap()
}

fn sv(s: pb::Service) -> Service {
    Service::try_from(s).unwrap()
}

fn always(r: u64) -> impl FnMut(u64) -> u64 {
    move |_| r
}

// === conversions ===

#[test]
fn workload_conversion_applies_defaults_and_builds_the_identity() {
    struct Case {
        name: &'static str,
        edit: fn(&mut pb::Workload),
        identity: &'static str,
        cluster_id: &'static str,
        capacity: u32,
        healthy: bool,
        tunnel: TunnelProtocol,
    }
    let cases = [
        Case {
            name: "all defaults",
            edit: |w| {
                w.service_account.clear();
                w.tunnel_protocol = 0;
            },
            identity: "spiffe://cluster.local/ns/ns1/sa/default",
            cluster_id: "Kubernetes",
            capacity: 1,
            healthy: true,
            tunnel: TunnelProtocol::None,
        },
        Case {
            name: "explicit values kept",
            edit: |w| {
                w.trust_domain = "example.org".into();
                w.service_account = "reviews".into();
                w.cluster_id = "east".into();
                w.capacity = Some(0);
                w.status = pb::WorkloadStatus::Unhealthy as i32;
            },
            identity: "spiffe://example.org/ns/ns1/sa/reviews",
            cluster_id: "east",
            capacity: 0,
            healthy: false,
            tunnel: TunnelProtocol::Hbone,
        },
        Case {
            name: "capacity set",
            edit: |w| w.capacity = Some(7),
            identity: "spiffe://cluster.local/ns/ns1/sa/a",
            cluster_id: "Kubernetes",
            capacity: 7,
            healthy: true,
            tunnel: TunnelProtocol::Hbone,
        },
    ];
    for case in cases {
        let mut w = pod("a", "ns1", "10.0.0.1");
        (case.edit)(&mut w);
        let w = Workload::try_from(w).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(w.identity(), &id(case.identity), "{}", case.name);
        assert_eq!(w.cluster_id, case.cluster_id, "{}", case.name);
        assert_eq!(w.capacity, case.capacity, "{}", case.name);
        assert_eq!(w.healthy, case.healthy, "{}", case.name);
        assert_eq!(w.tunnel, case.tunnel, "{}", case.name);
        assert_eq!(w.ips, vec![ip("10.0.0.1")], "{}", case.name);
    }
}

#[test]
fn workload_conversion_keeps_ports_waypoint_and_ipv6() {
    let mut w = member(
        pod("a", "ns1", "fd00::1"),
        "ns1/echo",
        &[(80, 8080), (90, 0)],
    );
    w.waypoint = Some(waypoint_by_hostname("wp", "waypoint"));
    w.network_mode = pb::NetworkMode::HostNetwork as i32;
    w.authorization_policies = vec!["ns1/allow".into()];
    let w = wl(w);
    assert_eq!(w.ips, vec![ip("fd00::1")]);
    assert_eq!(
        w.service_ports("ns1/echo"),
        Some(
            &[
                Port {
                    service_port: 80,
                    target_port: 8080
                },
                Port {
                    service_port: 90,
                    target_port: 0
                }
            ][..]
        )
    );
    assert_eq!(
        w.waypoint,
        Some(GatewayAddress {
            destination: GatewayDestination::Hostname {
                namespace: "wp".into(),
                hostname: "waypoint.wp.svc.cluster.local".into()
            },
            hbone_port: 15008
        })
    );
    assert!(w.host_network);
    assert_eq!(w.authorization_policies, vec!["ns1/allow".to_owned()]);
}

#[test]
fn workload_conversion_rejects_bad_fields() {
    type Check = fn(&Reason) -> bool;
    type Case = (&'static str, fn(&mut pb::Workload), &'static str, Check);
    let cases: Vec<Case> = vec![
        (
            "legacy mTLS",
            |w| w.tunnel_protocol = pb::TunnelProtocol::LegacyIstioMtls as i32,
            "tunnel_protocol",
            |r| matches!(r, Reason::LegacyIstioMtls),
        ),
        (
            "unknown tunnel",
            |w| w.tunnel_protocol = 9,
            "tunnel_protocol",
            |r| matches!(r, Reason::UnknownEnum { value: 9 }),
        ),
        (
            "5-byte address",
            |w| w.addresses.push(vec![10, 0, 0, 0, 1]),
            "addresses[1]",
            |r| matches!(r, Reason::Cidr(CidrError::AddressLength { len: 5 })),
        ),
        (
            "empty address",
            |w| w.addresses = vec![vec![]],
            "addresses[0]",
            |r| matches!(r, Reason::Cidr(CidrError::AddressLength { len: 0 })),
        ),
        (
            "empty uid",
            |w| w.uid.clear(),
            "uid",
            |r| matches!(r, Reason::Empty),
        ),
        (
            "unknown status",
            |w| w.status = 4,
            "status",
            |r| matches!(r, Reason::UnknownEnum { value: 4 }),
        ),
        (
            "unknown network mode",
            |w| w.network_mode = 5,
            "network_mode",
            |r| matches!(r, Reason::UnknownEnum { value: 5 }),
        ),
        (
            "service key without slash",
            |w| {
                w.services.insert("echo".into(), pb::PortList::default());
            },
            "services[\"echo\"]",
            |r| matches!(r, Reason::ServiceKey { .. }),
        ),
        (
            "target port out of range",
            |w| {
                w.services.insert(
                    "ns1/echo".into(),
                    pb::PortList {
                        ports: port_list(&[(80, 70000)]),
                    },
                );
            },
            "services[\"ns1/echo\"].ports[0].target_port",
            |r| matches!(r, Reason::Port { value: 70000 }),
        ),
        (
            "waypoint without destination",
            |w| w.waypoint = Some(pb::GatewayAddress::default()),
            "waypoint.destination",
            |r| matches!(r, Reason::Missing),
        ),
        (
            "waypoint with bad address",
            |w| {
                let mut gw = waypoint_by_address("10.0.0.9");
                if let Some(pb::gateway_address::Destination::Address(a)) = &mut gw.destination {
                    a.address.pop();
                }
                w.network_gateway = Some(gw);
            },
            "network_gateway.address.address",
            |r| matches!(r, Reason::Cidr(CidrError::AddressLength { len: 3 })),
        ),
        (
            "invalid namespace for an identity",
            |w| w.namespace = "Bad NS".into(),
            "trust_domain/namespace/service_account",
            |r| matches!(r, Reason::Identity(_)),
        ),
    ];
    for (name, edit, field, check) in cases {
        let mut w = pod("uid-1", "ns1", "10.0.0.1");
        edit(&mut w);
        let err = Workload::try_from(w).expect_err(name);
        assert_eq!(err.kind, "workload", "{name}");
        assert_eq!(err.field, field, "{name}");
        assert!(check(&err.reason), "{name}: wrong reason {:?}", err.reason);
        let text = err.to_string();
        assert!(text.contains(field), "{name}: {text}");
    }
}

#[test]
fn service_conversion_validates_and_defaults() {
    let mut s = svc("ns1", "echo", "10.96.0.1", &[(80, 8080)]);
    s.addresses.push(net_addr("10.10.0.0", Some(16)));
    s.addresses.push(net_addr("fd00::10", Some(128)));
    s.subject_alt_names = vec![
        "spiffe://cluster.local/ns/ns1/sa/echo".into(),
        "not-a-spiffe-id".into(),
    ];
    s.visibility = 7;
    s.waypoint = Some(pb::GatewayAddress {
        hbone_mtls_port: 0,
        ..waypoint_by_address("10.0.9.1")
    });
    let s = sv(s);
    assert_eq!(s.key(), "ns1/echo.ns1.svc.cluster.local");
    assert_eq!(
        s.visibility,
        Visibility::Public,
        "unknown visibility is PUBLIC"
    );
    assert_eq!(
        s.subject_alt_names,
        vec![id("spiffe://cluster.local/ns/ns1/sa/echo")]
    );
    assert_eq!(s.load_balancing, LoadBalancing::default());
    assert_eq!(s.waypoint.as_ref().map(|w| w.hbone_port), Some(15008));
    let vips: Vec<_> = s
        .vips
        .iter()
        .map(|v| (v.address, v.prefix_len, v.cidr()))
        .collect();
    assert_eq!(
        vips,
        vec![
            (ip("10.96.0.1"), None, None),
            (
                ip("10.10.0.0"),
                Some(16),
                Some(Cidr::new(ip("10.10.0.0"), 16).unwrap())
            ),
            (ip("fd00::10"), Some(128), None),
        ]
    );
}

#[test]
fn service_conversion_rejects_bad_fields() {
    type Check = fn(&Reason) -> bool;
    type Case = (&'static str, fn(&mut pb::Service), &'static str, Check);
    let cases: Vec<Case> = vec![
        (
            "3-byte VIP",
            |s| {
                s.addresses[0].address.pop();
            },
            "addresses[0].address",
            |r| matches!(r, Reason::Cidr(CidrError::AddressLength { len: 3 })),
        ),
        (
            "prefix longer than 32",
            |s| s.addresses[0].length = Some(33),
            "addresses[0].length",
            |r| {
                matches!(
                    r,
                    Reason::Cidr(CidrError::PrefixLength { len: 33, max: 32 })
                )
            },
        ),
        (
            "empty hostname",
            |s| s.hostname.clear(),
            "hostname",
            |r| matches!(r, Reason::Empty),
        ),
        (
            "empty namespace",
            |s| s.namespace.clear(),
            "namespace",
            |r| matches!(r, Reason::Empty),
        ),
        (
            "port out of range",
            |s| s.ports = port_list(&[(65536, 80)]),
            "ports[0].service_port",
            |r| matches!(r, Reason::Port { value: 65536 }),
        ),
        (
            "unknown load-balancing mode",
            |s| {
                s.load_balancing = Some(pb::LoadBalancing {
                    mode: 8,
                    ..Default::default()
                })
            },
            "load_balancing.mode",
            |r| matches!(r, Reason::UnknownEnum { value: 8 }),
        ),
        (
            "weighted waypoint without destination",
            |s| s.weighted_waypoints = vec![pb::WeightedWaypoint::default()],
            "weighted_waypoints[0].destination",
            |r| matches!(r, Reason::Missing),
        ),
    ];
    for (name, edit, field, check) in cases {
        let mut s = svc("ns1", "echo", "10.96.0.1", &[(80, 8080)]);
        edit(&mut s);
        let err = Service::try_from(s).expect_err(name);
        assert_eq!(err.kind, "service", "{name}");
        assert_eq!(err.field, field, "{name}");
        assert!(check(&err.reason), "{name}: wrong reason {:?}", err.reason);
    }
}

#[test]
fn address_resource_conversion() {
    let w = Resource::try_from(pb::Address {
        r#type: Some(pb::address::Type::Workload(pod("uid-1", "ns1", "10.0.0.1"))),
    })
    .unwrap();
    assert_eq!(w.name(), "uid-1");
    let s = Resource::try_from(pb::Address {
        r#type: Some(pb::address::Type::Service(svc(
            "ns1",
            "echo",
            "10.96.0.1",
            &[],
        ))),
    })
    .unwrap();
    assert_eq!(s.name(), "ns1/echo.ns1.svc.cluster.local");
    let err = Resource::try_from(pb::Address { r#type: None }).unwrap_err();
    assert_eq!((err.field.as_str(), err.reason), ("type", Reason::Missing));
}

#[test]
fn cidr_containment() {
    let cases = [
        ("10.0.0.0", 8, "10.255.1.2", true),
        ("10.0.0.0", 8, "11.0.0.1", false),
        ("10.1.2.3", 32, "10.1.2.3", true),
        ("10.1.2.3", 32, "10.1.2.4", false),
        ("0.0.0.0", 0, "192.168.1.1", true),
        ("0.0.0.0", 0, "::1", false),
        ("10.0.0.0", 8, "::ffff:10.1.1.1", true),
        ("fd00::", 8, "fdff::1", true),
        ("fd00::", 16, "fd01::1", false),
        ("::", 0, "10.0.0.1", false),
    ];
    for (net, len, addr, want) in cases {
        let cidr = Cidr::new(ip(net), len).unwrap();
        assert_eq!(cidr.contains(ip(addr)), want, "{cidr} contains {addr}");
    }
    assert_eq!(
        Cidr::new(ip("fd00::"), 129),
        Err(CidrError::PrefixLength { len: 129, max: 128 })
    );
    assert_eq!(
        Cidr::from_bytes(&[1, 2], 8),
        Err(CidrError::AddressLength { len: 2 })
    );
}

// === store ===

#[test]
fn workloads_are_indexed_by_ip_and_uid_and_updates_reindex() {
    let mut store = Store::new();
    assert!(store.upsert_workload(wl(pod("a", "ns1", "10.0.0.1"))));
    assert!(
        !store.upsert_workload(wl(pod("a", "ns1", "10.0.0.1"))),
        "unchanged"
    );
    assert_eq!(store.workload_by_ip("", ip("10.0.0.1")).unwrap().uid, "a");
    assert!(store.workload_by_ip("other", ip("10.0.0.1")).is_none());
    assert_eq!(store.workload("a").unwrap().uid, "a");

    // Moving to a new IP drops the old index entry.
    assert!(store.upsert_workload(wl(pod("a", "ns1", "10.0.0.2"))));
    assert!(store.workload_by_ip("", ip("10.0.0.1")).is_none());
    assert_eq!(store.workload_by_ip("", ip("10.0.0.2")).unwrap().uid, "a");

    // Another workload taking the IP wins; removing the first does not remove its entry.
    store.upsert_workload(wl(pod("b", "ns1", "10.0.0.2")));
    store.remove_workload("a");
    assert_eq!(store.workload_by_ip("", ip("10.0.0.2")).unwrap().uid, "b");
}

#[test]
fn removal_cleans_every_index() {
    let mut store = Store::new();
    store.upsert_service(sv(svc("ns1", "echo", "10.96.0.1", &[(80, 8080)])));
    store.upsert_workload(wl(member(
        pod("a", "ns1", "10.0.0.1"),
        &key("ns1", "echo"),
        &[],
    )));
    assert_eq!(store.endpoints(&key("ns1", "echo")).count(), 1);

    assert_eq!(
        store.remove_workload("a").map(|w| w.uid.clone()),
        Some("a".into())
    );
    assert!(store.workload("a").is_none());
    assert!(store.workload_by_ip("", ip("10.0.0.1")).is_none());
    assert_eq!(store.endpoints(&key("ns1", "echo")).count(), 0);
    assert!(store.remove_workload("a").is_none());

    assert!(store.remove_service(&key("ns1", "echo")).is_some());
    assert!(store.service(&key("ns1", "echo")).is_none());
    assert!(store.service_by_vip("", ip("10.96.0.1"), "ns1").is_none());
    assert!(
        store
            .service_by_hostname("echo.ns1.svc.cluster.local", "ns1")
            .is_none()
    );
    assert_eq!(store.services().count(), 0);
}

#[test]
fn service_updates_reindex_vips_and_report_changes() {
    let mut store = Store::new();
    assert!(store.upsert_service(sv(svc("ns1", "echo", "10.96.0.1", &[]))));
    assert!(!store.upsert_service(sv(svc("ns1", "echo", "10.96.0.1", &[]))));
    assert!(store.upsert_service(sv(svc("ns1", "echo", "10.96.0.2", &[]))));
    assert!(store.service_by_vip("", ip("10.96.0.1"), "ns1").is_none());
    assert_eq!(
        store
            .service_by_vip("", ip("10.96.0.2"), "ns1")
            .unwrap()
            .key(),
        key("ns1", "echo")
    );
    assert_eq!(store.services().count(), 1);
}

#[test]
fn endpoints_staged_before_their_service_attach_when_it_arrives() {
    let mut store = Store::new();
    let echo = key("ns1", "echo");
    store.upsert_workload(wl(member(pod("a", "ns1", "10.0.0.1"), &echo, &[])));
    let source = wl(pod("client", "ns1", "10.0.0.100"));
    let dst = sock("10.96.0.1:80");
    assert_eq!(
        store.outbound(&source, dst, &mut always(0)),
        Decision::Passthrough { target: dst },
        "service unknown yet"
    );
    assert_eq!(
        store
            .endpoints(&echo)
            .map(|w| w.uid.as_str())
            .collect::<Vec<_>>(),
        vec!["a"]
    );

    store.upsert_service(sv(svc("ns1", "echo", "10.96.0.1", &[(80, 8080)])));
    match store.outbound(&source, dst, &mut always(0)) {
        Decision::Hbone { authority, .. } => assert_eq!(authority, sock("10.0.0.1:8080")),
        other => panic!("expected HBONE, got {other:?}"),
    }

    // The service leaving and returning keeps the staged endpoint.
    store.remove_service(&echo);
    store.upsert_service(sv(svc("ns1", "echo", "10.96.0.1", &[(80, 8080)])));
    assert_eq!(store.endpoints(&echo).count(), 1);
}

#[test]
fn remove_by_name_tries_workload_uid_then_service_key() {
    let mut store = Store::new();
    let name = key("ns1", "echo");
    store.upsert_service(sv(svc("ns1", "echo", "10.96.0.1", &[])));
    let mut w = pod("x", "ns1", "10.0.0.1");
    w.uid = name.clone();
    store.upsert_workload(wl(w));

    let cases: [(&str, Option<&str>); 4] = [
        (&name, Some("workload")),
        (&name, Some("service")),
        (&name, None),
        ("a/b/c", None),
    ];
    for (i, (name, want)) in cases.into_iter().enumerate() {
        let got = store.remove(name).map(|r| match r {
            Removed::Workload(_) => "workload",
            Removed::Service(_) => "service",
        });
        assert_eq!(got, want, "removal #{i} of {name}");
    }
    assert!(store.workload_by_ip("", ip("10.0.0.1")).is_none());
    assert!(store.service_by_vip("", ip("10.96.0.1"), "ns1").is_none());
}

#[test]
fn lookups_honour_visibility_and_namespace_preference() {
    let mut store = Store::new();
    // Two services share a VIP and a hostname across namespaces; first seen is `a`.
    let shared = |ns: &str| pb::Service {
        hostname: "shared.example.com".into(),
        ..svc(ns, "shared", "10.96.0.5", &[])
    };
    store.upsert_service(sv(shared("a")));
    store.upsert_service(sv(shared("b")));
    let mut private = svc("priv", "db", "10.96.0.6", &[]);
    private.visibility = pb::service::Visibility::Namespace as i32;
    store.upsert_service(sv(private));

    let cases = [
        ("10.96.0.5", "b", Some("b")),
        ("10.96.0.5", "a", Some("a")),
        ("10.96.0.5", "c", Some("a")),
        ("10.96.0.6", "priv", Some("priv")),
        ("10.96.0.6", "other", None),
    ];
    for (vip, client, want) in cases {
        let got = store.service_by_vip("", ip(vip), client);
        assert_eq!(
            got.map(|s| s.namespace.as_str()),
            want,
            "{vip} from {client}"
        );
    }
    let host_cases = [
        ("shared.example.com", "b", Some("b")),
        ("shared.example.com", "c", Some("a")),
        ("db.priv.svc.cluster.local", "priv", Some("priv")),
        ("db.priv.svc.cluster.local", "other", None),
    ];
    for (host, client, want) in host_cases {
        let got = store.service_by_hostname(host, client);
        assert_eq!(
            got.map(|s| s.namespace.as_str()),
            want,
            "{host} from {client}"
        );
    }
    // A canonical service beats first-seen for clients in a third namespace.
    let mut canonical = shared("b");
    canonical.canonical = true;
    store.upsert_service(sv(canonical));
    assert_eq!(
        store
            .service_by_vip("", ip("10.96.0.5"), "c")
            .map(|s| s.namespace.as_str()),
        Some("b")
    );
    // Visibility-hidden services are invisible to routing too.
    let source = wl(pod("client", "other", "10.0.0.100"));
    let dst = sock("10.96.0.6:5432");
    assert_eq!(
        store.outbound(&source, dst, &mut always(0)),
        Decision::Passthrough { target: dst }
    );
}

#[test]
fn cidr_vips_match_by_longest_prefix_after_exact() {
    let mut store = Store::new();
    let with_cidr = |name: &str, addr: &str, len: Option<u32>| pb::Service {
        addresses: vec![net_addr(addr, len)],
        ..svc("ns1", name, "0.0.0.0", &[])
    };
    store.upsert_service(sv(with_cidr("wide", "10.0.0.0", Some(8))));
    store.upsert_service(sv(with_cidr("narrow", "10.1.0.0", Some(16))));
    store.upsert_service(sv(with_cidr("exact", "10.1.2.3", Some(32))));
    store.upsert_service(sv(with_cidr("v6", "fd00::", Some(64))));
    let cases = [
        ("10.1.2.3", Some("exact")),
        ("10.1.9.9", Some("narrow")),
        ("10.2.0.1", Some("wide")),
        ("11.0.0.1", None),
        ("fd00::abcd", Some("v6")),
        ("fd01::1", None),
    ];
    for (addr, want) in cases {
        let got = store.service_by_vip("", ip(addr), "ns1");
        assert_eq!(got.map(|s| s.name.as_str()), want, "{addr}");
    }
    store.remove_service(&key("ns1", "narrow"));
    assert_eq!(
        store
            .service_by_vip("", ip("10.1.9.9"), "ns1")
            .map(|s| s.name.as_str()),
        Some("wide")
    );
}

#[test]
fn host_network_workloads_are_not_indexed_by_ip() {
    let mut store = Store::new();
    let mut w = pod("node-agent", "kube-system", "192.168.0.10");
    w.network_mode = pb::NetworkMode::HostNetwork as i32;
    store.upsert_workload(wl(w));
    assert!(store.workload("node-agent").is_some());
    assert!(store.workload_by_ip("", ip("192.168.0.10")).is_none());
}

// === outbound ===

/// The routing fixture: a client, services with and without waypoints, HBONE and plain
/// endpoints, a workload-addressed waypoint.
fn fixture() -> Store {
    let mut store = Store::new();
    let mut waypoint_svc = svc("wp", "waypoint", "10.96.0.100", &[(15008, 15008)]);
    waypoint_svc.subject_alt_names = vec!["spiffe://cluster.local/ns/wp/sa/waypoint-extra".into()];
    store.upsert_service(sv(waypoint_svc));
    store.upsert_workload(wl(member(
        pod("waypoint", "wp", "10.0.9.1"),
        &key("wp", "waypoint"),
        &[(15008, 15008)],
    )));

    let mut echo = svc("app", "echo", "10.96.0.10", &[(80, 8080), (90, 0)]);
    echo.subject_alt_names = vec!["spiffe://cluster.local/ns/app/sa/echo-san".into()];
    store.upsert_service(sv(echo));
    store.upsert_workload(wl(member(
        pod("echo", "app", "10.0.1.1"),
        &key("app", "echo"),
        &[(90, 9090)],
    )));

    let mut waypointed = svc("app", "waypointed", "10.96.0.11", &[(80, 8080)]);
    waypointed.waypoint = Some(waypoint_by_hostname("wp", "waypoint"));
    store.upsert_service(sv(waypointed));

    store.upsert_service(sv(svc("app", "plain", "10.96.0.12", &[(80, 8080)])));
    let mut plain = member(pod("plain", "app", "10.0.2.1"), &key("app", "plain"), &[]);
    plain.tunnel_protocol = pb::TunnelProtocol::None as i32;
    store.upsert_workload(wl(plain));

    store.upsert_service(sv(svc("app", "override", "10.96.0.13", &[(80, 8080)])));
    store.upsert_workload(wl(member(
        pod("override", "app", "10.0.4.1"),
        &key("app", "override"),
        &[(80, 8181)],
    )));

    let mut behind = pod("behind", "app", "10.0.3.1");
    behind.waypoint = Some(waypoint_by_address("10.0.9.1"));
    store.upsert_workload(wl(behind));

    store.upsert_service(sv(svc("app", "empty", "10.96.0.14", &[(80, 8080)])));

    let mut passthrough = svc("app", "passthrough", "10.96.0.15", &[(80, 8080)]);
    passthrough.load_balancing = Some(pb::LoadBalancing {
        mode: pb::load_balancing::Mode::Passthrough as i32,
        ..Default::default()
    });
    store.upsert_service(sv(passthrough));

    let mut lost = svc("app", "lost", "10.96.0.16", &[(80, 8080)]);
    lost.waypoint = Some(waypoint_by_hostname("wp", "missing"));
    store.upsert_service(sv(lost));

    store.upsert_workload(wl(pod("client", "client", "10.0.0.1")));
    store
}

#[test]
fn outbound_decisions() {
    let store = fixture();
    let client = Arc::clone(store.workload("client").unwrap());
    let waypoint_pod = Arc::clone(store.workload("waypoint").unwrap());
    let w = |uid: &str| Arc::clone(store.workload(uid).unwrap());
    let s = |name: &str| Some(Arc::clone(store.service(&key("app", name)).unwrap()));
    let wp_ids = vec![
        id("spiffe://cluster.local/ns/wp/sa/waypoint"),
        id("spiffe://cluster.local/ns/wp/sa/waypoint-extra"),
    ];
    let echo_ids = vec![
        id("spiffe://cluster.local/ns/app/sa/echo"),
        id("spiffe://cluster.local/ns/app/sa/echo-san"),
    ];
    let cases: Vec<(&str, &Workload, &str, Decision)> = vec![
        (
            "service VIP with waypoint: authority unchanged",
            &client,
            "10.96.0.11:80",
            Decision::Waypoint {
                target: sock("10.0.9.1:15008"),
                authority: sock("10.96.0.11:80"),
                expected_identities: wp_ids.clone(),
                waypoint: Arc::clone(&waypoint_pod),
                service: s("waypointed"),
            },
        ),
        (
            "VIP to HBONE endpoint via service target port",
            &client,
            "10.96.0.10:80",
            Decision::Hbone {
                target: sock("10.0.1.1:15008"),
                authority: sock("10.0.1.1:8080"),
                expected_identities: echo_ids.clone(),
                destination: w("echo"),
                service: s("echo"),
            },
        ),
        (
            "named port (target 0) resolved from the endpoint's map",
            &client,
            "10.96.0.10:90",
            Decision::Hbone {
                target: sock("10.0.1.1:15008"),
                authority: sock("10.0.1.1:9090"),
                expected_identities: echo_ids.clone(),
                destination: w("echo"),
                service: s("echo"),
            },
        ),
        (
            "endpoint port map beats service target port",
            &client,
            "10.96.0.13:80",
            Decision::Hbone {
                target: sock("10.0.4.1:15008"),
                authority: sock("10.0.4.1:8181"),
                expected_identities: vec![id("spiffe://cluster.local/ns/app/sa/override")],
                destination: w("override"),
                service: s("override"),
            },
        ),
        (
            "undeclared service port has no endpoint",
            &client,
            "10.96.0.10:81",
            Decision::NoHealthyEndpoint {
                service: s("echo").unwrap(),
            },
        ),
        (
            "VIP to non-HBONE endpoint is plain TCP",
            &client,
            "10.96.0.12:80",
            Decision::Tcp {
                target: sock("10.0.2.1:8080"),
                destination: w("plain"),
                service: s("plain"),
            },
        ),
        (
            "service without endpoints",
            &client,
            "10.96.0.14:80",
            Decision::NoHealthyEndpoint {
                service: s("empty").unwrap(),
            },
        ),
        (
            "PASSTHROUGH load balancing",
            &client,
            "10.96.0.15:80",
            Decision::Passthrough {
                target: sock("10.96.0.15:80"),
            },
        ),
        (
            "waypoint that resolves to nothing",
            &client,
            "10.96.0.16:80",
            Decision::WaypointUnavailable {
                waypoint: s("lost").unwrap().waypoint.clone().unwrap(),
            },
        ),
        (
            "pod IP of an HBONE workload",
            &client,
            "10.0.1.1:8080",
            Decision::Hbone {
                target: sock("10.0.1.1:15008"),
                authority: sock("10.0.1.1:8080"),
                expected_identities: vec![id("spiffe://cluster.local/ns/app/sa/echo")],
                destination: w("echo"),
                service: None,
            },
        ),
        (
            "pod IP of a plain workload",
            &client,
            "10.0.2.1:8080",
            Decision::Tcp {
                target: sock("10.0.2.1:8080"),
                destination: w("plain"),
                service: None,
            },
        ),
        (
            "pod IP of a workload with its own waypoint",
            &client,
            "10.0.3.1:8080",
            Decision::Waypoint {
                target: sock("10.0.9.1:15008"),
                authority: sock("10.0.3.1:8080"),
                expected_identities: vec![id("spiffe://cluster.local/ns/wp/sa/waypoint")],
                waypoint: Arc::clone(&waypoint_pod),
                service: None,
            },
        ),
        (
            "the waypoint itself goes direct",
            &waypoint_pod,
            "10.0.3.1:8080",
            Decision::Hbone {
                target: sock("10.0.3.1:15008"),
                authority: sock("10.0.3.1:8080"),
                expected_identities: vec![id("spiffe://cluster.local/ns/app/sa/behind")],
                destination: w("behind"),
                service: None,
            },
        ),
        (
            "unknown destination passes through",
            &client,
            "192.168.1.1:443",
            Decision::Passthrough {
                target: sock("192.168.1.1:443"),
            },
        ),
        (
            "self-call to 15001",
            &client,
            "127.0.0.1:15001",
            Decision::Drop,
        ),
        (
            "self-call to 15006",
            &client,
            "127.0.0.1:15006",
            Decision::Drop,
        ),
        ("self-call to 15008", &client, "[::1]:15008", Decision::Drop),
        (
            "loopback to another port passes through",
            &client,
            "127.0.0.1:8080",
            Decision::Passthrough {
                target: sock("127.0.0.1:8080"),
            },
        ),
    ];
    for (name, source, dst, want) in cases {
        let got = store.outbound(source, sock(dst), &mut always(0));
        assert_eq!(got, want, "{name}");
    }
}

/// A service with the given endpoints `(uid, healthy, capacity)`, and a client.
fn lb_store(
    endpoints: &[(&str, bool, u32)],
    edit: impl FnOnce(&mut pb::Service),
) -> (Store, Workload) {
    let mut store = Store::new();
    let mut s = svc("app", "lb", "10.96.1.1", &[(80, 8080)]);
    edit(&mut s);
    store.upsert_service(sv(s));
    for (i, &(uid, healthy, capacity)) in endpoints.iter().enumerate() {
        let mut w = member(
            pod(uid, "app", &format!("10.0.5.{}", i + 1)),
            &key("app", "lb"),
            &[],
        );
        if !healthy {
            w.status = pb::WorkloadStatus::Unhealthy as i32;
        }
        w.capacity = Some(capacity);
        store.upsert_workload(wl(w));
    }
    (store, wl(pod("client", "client", "10.0.0.1")))
}

fn chosen(decision: &Decision) -> Option<&str> {
    match decision {
        Decision::Hbone { destination, .. } | Decision::Tcp { destination, .. } => {
            Some(destination.uid.as_str())
        }
        _ => None,
    }
}

#[test]
fn endpoint_selection_respects_health_policy() {
    let allow_all = |s: &mut pb::Service| {
        s.load_balancing = Some(pb::LoadBalancing {
            health_policy: pb::load_balancing::HealthPolicy::AllowAll as i32,
            ..Default::default()
        })
    };
    type Edit = fn(&mut pb::Service);
    type Endpoints = Vec<(&'static str, bool, u32)>;
    type Case = (&'static str, Endpoints, Edit, u64, Option<&'static str>);
    let cases: Vec<Case> = vec![
        (
            "unhealthy skipped",
            vec![("a-bad", false, 1), ("b-good", true, 1)],
            |_| {},
            0,
            Some("b-good"),
        ),
        (
            "only unhealthy: none",
            vec![("a-bad", false, 1)],
            |_| {},
            0,
            None,
        ),
        (
            "ALLOW_ALL keeps unhealthy",
            vec![("a-bad", false, 1), ("b-good", true, 1)],
            allow_all,
            0,
            Some("a-bad"),
        ),
        (
            "ALLOW_ALL, second draw",
            vec![("a-bad", false, 1), ("b-good", true, 1)],
            allow_all,
            1,
            Some("b-good"),
        ),
        (
            "capacity 0 never chosen",
            vec![("a-zero", true, 0)],
            |_| {},
            0,
            None,
        ),
    ];
    for (name, endpoints, edit, r, want) in cases {
        let (store, client) = lb_store(&endpoints, edit);
        let got = store.outbound(&client, sock("10.96.1.1:80"), &mut always(r));
        assert_eq!(chosen(&got), want, "{name}: {got:?}");
        if want.is_none() {
            assert!(
                matches!(got, Decision::NoHealthyEndpoint { .. }),
                "{name}: {got:?}"
            );
        }
    }
}

#[test]
fn endpoint_selection_is_weighted_by_capacity() {
    let (store, client) = lb_store(&[("a", true, 1), ("b", true, 3), ("c", true, 0)], |_| {});
    let cases = [(0, "a"), (1, "b"), (2, "b"), (3, "b"), (7, "b")];
    for (r, want) in cases {
        let mut asked = Vec::new();
        let mut rng = |n: u64| {
            asked.push(n);
            r
        };
        let got = store.outbound(&client, sock("10.96.1.1:80"), &mut rng);
        assert_eq!(chosen(&got), Some(want), "draw {r}");
        assert_eq!(asked, vec![4], "total capacity is drawn from once");
    }
}

#[test]
fn endpoint_selection_honours_locality_preference() {
    fn zoned(w: &mut pb::Workload, zone: &str) {
        w.locality = Some(pb::Locality {
            region: "r1".into(),
            zone: zone.into(),
            subzone: String::new(),
        });
    }
    let mode = |m: pb::load_balancing::Mode| {
        move |s: &mut pb::Service| {
            s.load_balancing = Some(pb::LoadBalancing {
                routing_preference: vec![
                    pb::load_balancing::Scope::Region as i32,
                    pb::load_balancing::Scope::Zone as i32,
                ],
                mode: m as i32,
                health_policy: 0,
            })
        }
    };
    let build = |edit: &dyn Fn(&mut pb::Service), zones: &[(&str, &str)]| {
        let mut store = Store::new();
        let mut s = svc("app", "lb", "10.96.1.1", &[(80, 8080)]);
        edit(&mut s);
        store.upsert_service(sv(s));
        for (i, (uid, zone)) in zones.iter().enumerate() {
            let mut w = member(
                pod(uid, "app", &format!("10.0.5.{}", i + 1)),
                &key("app", "lb"),
                &[],
            );
            zoned(&mut w, zone);
            store.upsert_workload(wl(w));
        }
        let mut client = pod("client", "client", "10.0.0.1");
        zoned(&mut client, "z1");
        (store, wl(client))
    };
    let failover = mode(pb::load_balancing::Mode::Failover);
    let strict = mode(pb::load_balancing::Mode::Strict);
    type Edit<'a> = &'a dyn Fn(&mut pb::Service);
    type Case<'a> = (
        &'static str,
        Edit<'a>,
        Vec<(&'static str, &'static str)>,
        Option<&'static str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "failover prefers same zone",
            &failover,
            vec![("a-far", "z2"), ("b-near", "z1")],
            Some("b-near"),
        ),
        (
            "failover falls back to same region",
            &failover,
            vec![("a-far", "z2")],
            Some("a-far"),
        ),
        (
            "strict requires every scope",
            &strict,
            vec![("a-far", "z2")],
            None,
        ),
        (
            "no preference: first by uid",
            &|_: &mut pb::Service| {},
            vec![("a-far", "z2"), ("b-near", "z1")],
            Some("a-far"),
        ),
    ];
    for (name, edit, zones, want) in cases {
        let (store, client) = build(edit, &zones);
        let got = store.outbound(&client, sock("10.96.1.1:80"), &mut always(0));
        assert_eq!(chosen(&got), want, "{name}: {got:?}");
    }
}

#[test]
fn weighted_waypoints_are_drawn_by_weight() {
    let mut store = fixture();
    store.upsert_service(sv(svc("wp", "waypoint2", "10.96.0.101", &[(15008, 15008)])));
    store.upsert_workload(wl(member(
        pod("waypoint2", "wp", "10.0.9.2"),
        &key("wp", "waypoint2"),
        &[],
    )));
    let mut s = svc("app", "split", "10.96.0.20", &[(80, 8080)]);
    s.weighted_waypoints = vec![
        pb::WeightedWaypoint {
            destination: Some(waypoint_by_hostname("wp", "waypoint")),
            weight: 1,
        },
        pb::WeightedWaypoint {
            destination: Some(waypoint_by_hostname("wp", "waypoint2")),
            weight: 2,
        },
    ];
    store.upsert_service(sv(s));
    let client = Arc::clone(store.workload("client").unwrap());
    for (r, want) in [
        (0, "10.0.9.1:15008"),
        (1, "10.0.9.2:15008"),
        (2, "10.0.9.2:15008"),
    ] {
        match store.outbound(&client, sock("10.96.0.20:80"), &mut always(r)) {
            Decision::Waypoint { target, .. } => assert_eq!(target, sock(want), "draw {r}"),
            other => panic!("draw {r}: expected waypoint, got {other:?}"),
        }
    }
}

#[test]
fn gateway_addresses_display_as_host_or_address_with_port() {
    use crate::state::{GatewayAddress, GatewayDestination};
    let host = GatewayAddress {
        destination: GatewayDestination::Hostname {
            namespace: "app".into(),
            hostname: "waypoint.app.svc.cluster.local".into(),
        },
        hbone_port: 15008,
    };
    assert_eq!(host.to_string(), "waypoint.app.svc.cluster.local:15008");
    let addr = GatewayAddress {
        destination: GatewayDestination::Address {
            network: "net1".into(),
            ip: "10.0.0.7".parse().unwrap(),
        },
        hbone_port: 15008,
    };
    assert_eq!(addr.to_string(), "net1/10.0.0.7:15008");
}

#[test]
fn only_a_waypoint_serving_the_workload_or_its_services_counts_as_its_waypoint() {
    let mut store = fixture();
    store.upsert_workload(wl(member(
        pod("served", "app", "10.0.5.1"),
        &key("app", "waypointed"),
        &[(80, 8080)],
    )));
    store.upsert_workload(wl(member(
        pod("stray", "app", "10.0.6.1"),
        &key("app", "lost"),
        &[],
    )));
    let waypoint = id("spiffe://cluster.local/ns/wp/sa/waypoint");
    let waypoint_san = id("spiffe://cluster.local/ns/wp/sa/waypoint-extra");
    let client = id("spiffe://cluster.local/ns/client/sa/client");
    let w = |uid: &str| Arc::clone(store.workload(uid).unwrap());

    // Through a service's waypoint (by hostname): its pods' identities and the service's SANs.
    assert!(store.is_waypoint_of(&w("served"), &waypoint));
    assert!(store.is_waypoint_of(&w("served"), &waypoint_san));
    assert!(!store.is_waypoint_of(&w("served"), &client));
    // The workload's own waypoint, by the waypoint pod's address.
    assert!(store.is_waypoint_of(&w("behind"), &waypoint));
    assert!(!store.is_waypoint_of(&w("behind"), &client));
    // No waypoint at all: nobody, not even a waypoint identity.
    assert!(!store.is_waypoint_of(&w("echo"), &waypoint));
    // A waypoint that resolves to nothing vouches for nobody.
    assert!(!store.is_waypoint_of(&w("stray"), &waypoint));
}
