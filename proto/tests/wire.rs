//! Wire-format tests for the generated messages.
//!
//! The expected bytes are assembled by a tiny protobuf writer in this file ([`wire`]), using
//! field numbers and enum values written out as literals from the reference tables
//! (shared/reference/istio-ztunnel.md §2.7, §3, §4.2). Nothing on the expected side goes
//! through prost, so a wrong field number, type, nesting or enum value in the `.proto` files
//! makes these tests fail.

use std::collections::HashMap;
use std::fmt::Debug;

use prost::Message;
use prost_types::{Any, Duration, Struct, Value, value::Kind};

use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
    resource::CacheControl,
};
use weft_proto::google::rpc::Status;
use weft_proto::istio::security::{
    self, Action, Authorization, Clause, Match, Rule, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};
use weft_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use weft_proto::istio::workload::zds::{
    Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo,
    WorkloadRequest, WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use weft_proto::istio::workload::{
    Address, AppProtocol, ApplicationTunnel, Extension, GatewayAddress, IpFamilies, LoadBalancing,
    Locality, NamespacedHostname, NetworkAddress, NetworkMode, Port, PortList, Service,
    TunnelProtocol, WeightedWaypoint, Workload, WorkloadStatus, WorkloadType, address,
    application_tunnel, gateway_address, load_balancing, service,
};
use weft_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// A hand-rolled protobuf wire writer, independent of prost.
mod wire {
    /// Wire type 0.
    pub(crate) const VARINT: u32 = 0;
    /// Wire type 2.
    pub(crate) const LEN: u32 = 2;

    /// Base-128 varint, least significant group first.
    pub(crate) fn varint(mut value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let low = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(low);
                return out;
            }
            out.push(low | 0x80);
        }
    }

    /// Field key: `(field_number << 3) | wire_type`, as a varint.
    pub(crate) fn key(field: u32, wire_type: u32) -> Vec<u8> {
        varint(u64::from((field << 3) | wire_type))
    }

    /// A varint-typed field (uint32, int32 >= 0, int64 >= 0, bool, enum).
    pub(crate) fn uint(field: u32, value: u64) -> Vec<u8> {
        [key(field, VARINT), varint(value)].concat()
    }

    /// A length-delimited field with raw payload.
    pub(crate) fn bytes(field: u32, payload: &[u8]) -> Vec<u8> {
        [
            key(field, LEN),
            varint(payload.len() as u64),
            payload.to_vec(),
        ]
        .concat()
    }

    /// A string field.
    pub(crate) fn string(field: u32, value: &str) -> Vec<u8> {
        bytes(field, value.as_bytes())
    }

    /// An embedded message field whose body is the concatenation of `parts`.
    pub(crate) fn message(field: u32, parts: &[Vec<u8>]) -> Vec<u8> {
        bytes(field, &parts.concat())
    }

    /// A packed repeated varint field.
    pub(crate) fn packed(field: u32, values: &[u64]) -> Vec<u8> {
        let body: Vec<u8> = values.iter().flat_map(|v| varint(*v)).collect();
        bytes(field, &body)
    }

    /// A top-level message body.
    pub(crate) fn body(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }
}

use wire::{body, bytes, message, packed, string, uint};

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts prost encodes `msg` to exactly `expected`.
fn assert_encodes_to<M: Message>(msg: &M, expected: &[u8]) {
    let encoded = msg.encode_to_vec();
    assert_eq!(
        hex(&encoded),
        hex(expected),
        "prost bytes (left) != expected bytes (right)"
    );
    assert_eq!(msg.encoded_len(), expected.len());
}

/// Asserts `msg` survives encode/decode, and that the independently built bytes decode to it.
fn assert_round_trips<M: Message + Default + PartialEq + Debug>(msg: &M, expected: &[u8]) {
    let again = M::decode(msg.encode_to_vec().as_slice()).expect("decode own encoding");
    assert_eq!(&again, msg);
    let from_golden = M::decode(expected).expect("decode expected bytes");
    assert_eq!(&from_golden, msg);
}

const IPV6: [u8; 16] = [0xfd, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];

// ---------------------------------------------------------------------------------------
// Samples: (message built with the generated types, bytes built by the wire writer).
// ---------------------------------------------------------------------------------------

const SERVICE_KEY: &str = "bookinfo/reviews.bookinfo.svc.cluster.local";
const WORKLOAD_UID: &str = "cluster1//v1/Pod/bookinfo/reviews-v1-abc";

fn workload_address_sample() -> (Address, Vec<u8>) {
    let workload = Workload {
        name: "reviews-v1-abc".into(),
        namespace: "bookinfo".into(),
        addresses: vec![vec![10, 244, 1, 7], IPV6.to_vec()],
        network: "net-a".into(),
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        trust_domain: "td.example".into(),
        service_account: "bookinfo-reviews".into(),
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "bookinfo".into(),
                hostname: "waypoint.bookinfo.svc.cluster.local".into(),
            })),
            hbone_mtls_port: 15008,
        }),
        node: "node-3".into(),
        workload_type: WorkloadType::Pod as i32,
        native_tunnel: true,
        authorization_policies: vec!["bookinfo/deny-all".into()],
        status: WorkloadStatus::Unhealthy as i32,
        uid: WORKLOAD_UID.into(),
        services: HashMap::from([(
            SERVICE_KEY.to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 9080,
                    target_port: 9081,
                    app_protocol: AppProtocol::Http2 as i32,
                }],
            },
        )]),
        application_tunnel: Some(ApplicationTunnel {
            protocol: application_tunnel::Protocol::Proxy as i32,
            port: 15088,
        }),
        locality: Some(Locality {
            region: "eu".into(),
            zone: "eu-1a".into(),
            subzone: String::new(),
        }),
        network_mode: NetworkMode::HostNetwork as i32,
        capacity: Some(7),
        ..Default::default()
    };
    let workload_bytes = body(&[
        string(1, "reviews-v1-abc"),
        string(2, "bookinfo"),
        bytes(3, &[10, 244, 1, 7]),
        bytes(3, &IPV6),
        string(4, "net-a"),
        uint(5, 1), // HBONE
        string(6, "td.example"),
        string(7, "bookinfo-reviews"),
        message(
            8,
            &[
                message(
                    1,
                    &[
                        string(1, "bookinfo"),
                        string(2, "waypoint.bookinfo.svc.cluster.local"),
                    ],
                ),
                uint(3, 15008),
            ],
        ),
        string(9, "node-3"),
        uint(12, 2), // POD
        uint(14, 1),
        string(16, "bookinfo/deny-all"),
        uint(17, 1), // UNHEALTHY
        string(20, WORKLOAD_UID),
        // map<string, PortList> entry: key 1, value 2.
        message(
            22,
            &[
                string(1, SERVICE_KEY),
                message(
                    2,
                    &[message(1, &[uint(1, 9080), uint(2, 9081), uint(3, 2)])],
                ),
            ],
        ),
        message(23, &[uint(1, 1), uint(2, 15088)]), // PROXY
        message(24, &[string(1, "eu"), string(2, "eu-1a")]),
        uint(25, 1), // HOST_NETWORK
        // google.protobuf.UInt32Value { value = 1 }.
        message(27, &[uint(1, 7)]),
    ]);
    let msg = Address {
        r#type: Some(address::Type::Workload(workload)),
    };
    (msg, body(&[bytes(1, &workload_bytes)]))
}

fn service_address_sample() -> (Address, Vec<u8>) {
    let service = Service {
        name: "reviews".into(),
        namespace: "bookinfo".into(),
        hostname: "reviews.bookinfo.svc.cluster.local".into(),
        addresses: vec![
            NetworkAddress {
                network: "net-a".into(),
                address: vec![10, 96, 0, 10],
                length: None,
            },
            NetworkAddress {
                network: String::new(),
                address: vec![10, 97, 0, 0],
                length: Some(16),
            },
            // proto3 `optional`: an explicit 0 is present on the wire.
            NetworkAddress {
                network: "net-b".into(),
                address: IPV6.to_vec(),
                length: Some(0),
            },
        ],
        ports: vec![
            Port {
                service_port: 9080,
                target_port: 0,
                app_protocol: AppProtocol::Http11 as i32,
            },
            Port {
                service_port: 443,
                target_port: 8443,
                app_protocol: AppProtocol::Tls as i32,
            },
        ],
        subject_alt_names: vec!["spiffe://td.example/ns/bookinfo/sa/reviews".into()],
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: "net-a".into(),
                address: vec![10, 96, 5, 5],
                length: None,
            })),
            hbone_mtls_port: 15008,
        }),
        load_balancing: Some(LoadBalancing {
            routing_preference: vec![
                load_balancing::Scope::Network as i32,
                load_balancing::Scope::Zone as i32,
            ],
            mode: load_balancing::Mode::Failover as i32,
            health_policy: load_balancing::HealthPolicy::AllowAll as i32,
        }),
        ip_families: IpFamilies::Dual as i32,
        extensions: vec![Extension {
            name: "ext.weft".into(),
            config: Some(Any {
                type_url: "type.googleapis.com/google.protobuf.Empty".into(),
                value: Vec::new(),
            }),
        }],
        canonical: true,
        ingress_use_waypoint: false,
        weighted_waypoints: vec![WeightedWaypoint {
            destination: Some(GatewayAddress {
                destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                    namespace: "istio-system".into(),
                    hostname: "wp.istio-system.svc.cluster.local".into(),
                })),
                hbone_mtls_port: 0,
            }),
            weight: 80,
        }],
        visibility: service::Visibility::Namespace as i32,
    };
    let service_bytes = body(&[
        string(1, "reviews"),
        string(2, "bookinfo"),
        string(3, "reviews.bookinfo.svc.cluster.local"),
        message(4, &[string(1, "net-a"), bytes(2, &[10, 96, 0, 10])]),
        message(4, &[bytes(2, &[10, 97, 0, 0]), uint(3, 16)]),
        message(4, &[string(1, "net-b"), bytes(2, &IPV6), uint(3, 0)]),
        message(5, &[uint(1, 9080), uint(3, 1)]), // HTTP11
        message(5, &[uint(1, 443), uint(2, 8443), uint(3, 5)]), // TLS
        string(6, "spiffe://td.example/ns/bookinfo/sa/reviews"),
        message(
            7,
            &[
                message(2, &[string(1, "net-a"), bytes(2, &[10, 96, 5, 5])]),
                uint(3, 15008),
            ],
        ),
        // NETWORK 6, ZONE 2 (packed); FAILOVER 2; ALLOW_ALL 1.
        message(8, &[packed(1, &[6, 2]), uint(2, 2), uint(3, 1)]),
        uint(9, 3), // DUAL
        message(
            10,
            &[
                string(1, "ext.weft"),
                message(2, &[string(1, "type.googleapis.com/google.protobuf.Empty")]),
            ],
        ),
        uint(11, 1),
        message(
            13,
            &[
                message(
                    1,
                    &[message(
                        1,
                        &[
                            string(1, "istio-system"),
                            string(2, "wp.istio-system.svc.cluster.local"),
                        ],
                    )],
                ),
                uint(2, 80),
            ],
        ),
        uint(14, 1), // NAMESPACE
    ]);
    let msg = Address {
        r#type: Some(address::Type::Service(service)),
    };
    (msg, body(&[bytes(2, &service_bytes)]))
}

fn authorization_sample() -> (Authorization, Vec<u8>) {
    let msg = Authorization {
        name: "deny-external".into(),
        namespace: "bookinfo".into(),
        scope: security::Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![
                        StringMatch {
                            match_type: Some(MatchType::Exact(
                                "td.example/ns/bookinfo/sa/productpage".into(),
                            )),
                        },
                        StringMatch {
                            match_type: Some(MatchType::Prefix("td.example/ns/ops/".into())),
                        },
                    ],
                    not_principals: vec![StringMatch {
                        match_type: Some(MatchType::Presence(())),
                    }],
                    source_ips: vec![security::Address {
                        address: vec![192, 168, 7, 0],
                        length: 24,
                    }],
                    destination_ports: vec![80, 443, 15008],
                    service_accounts: vec![ServiceAccountMatch {
                        namespace: "bookinfo".into(),
                        service_account: "ratings".into(),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: true,
        extensions: Vec::new(),
    };
    let match_bytes = body(&[
        message(3, &[string(1, "td.example/ns/bookinfo/sa/productpage")]),
        message(3, &[string(2, "td.example/ns/ops/")]),
        // presence: google.protobuf.Empty, an empty embedded message.
        message(4, &[bytes(4, &[])]),
        message(5, &[bytes(1, &[192, 168, 7, 0]), uint(2, 24)]),
        // proto3 repeated scalars are packed.
        packed(9, &[80, 443, 15008]),
        message(11, &[string(1, "bookinfo"), string(2, "ratings")]),
    ]);
    let expected = body(&[
        string(1, "deny-external"),
        string(2, "bookinfo"),
        uint(3, 2), // WORKLOAD_SELECTOR
        uint(4, 1), // DENY
        // Rule.clauses 1 -> Clause.matches 2 -> Match.
        message(5, &[message(1, &[bytes(2, &match_bytes)])]),
        uint(6, 1),
    ]);
    (msg, expected)
}

fn zds_samples() -> Vec<(WorkloadRequest, Vec<u8>)> {
    vec![
        (
            WorkloadRequest {
                payload: Some(workload_request::Payload::Add(AddWorkload {
                    uid: "0c2e-pod-uid".into(),
                    workload_info: Some(WorkloadInfo {
                        name: "reviews-v1-abc".into(),
                        namespace: "bookinfo".into(),
                        service_account: "bookinfo-reviews".into(),
                    }),
                })),
            },
            body(&[message(
                1,
                &[
                    string(1, "0c2e-pod-uid"),
                    message(
                        2,
                        &[
                            string(1, "reviews-v1-abc"),
                            string(2, "bookinfo"),
                            string(3, "bookinfo-reviews"),
                        ],
                    ),
                ],
            )]),
        ),
        (
            WorkloadRequest {
                payload: Some(workload_request::Payload::Del(DelWorkload {
                    uid: "u".into(),
                })),
            },
            // del = 2 { uid = 2 (!) }: literally 12 03 12 01 'u'.
            vec![0x12, 0x03, 0x12, 0x01, b'u'],
        ),
        (
            WorkloadRequest {
                payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
            },
            vec![0x1a, 0x00],
        ),
        (
            WorkloadRequest {
                payload: Some(workload_request::Payload::Keep(KeepWorkload {
                    uid: "kept-uid".into(),
                })),
            },
            body(&[message(5, &[string(1, "kept-uid")])]),
        ),
    ]
}

fn zds_response_samples() -> Vec<(WorkloadResponse, Vec<u8>)> {
    vec![
        (
            WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(Ack {
                    error: "no netns".into(),
                })),
            },
            body(&[message(1, &[string(1, "no netns")])]),
        ),
        (
            WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(Ack {
                    error: String::new(),
                })),
            },
            vec![0x0a, 0x00],
        ),
    ]
}

const CSR: &str =
    "-----BEGIN CERTIFICATE REQUEST-----\nMIIBweft\n-----END CERTIFICATE REQUEST-----\n";
const SPIFFE: &str = "spiffe://td.example/ns/bookinfo/sa/reviews";

fn string_struct(key: &str, value: &str) -> Struct {
    Struct {
        fields: [(
            key.to_owned(),
            Value {
                kind: Some(Kind::StringValue(value.to_owned())),
            },
        )]
        .into(),
    }
}

/// google.protobuf.Struct { fields = 1: map<string, Value> } with Value.string_value = 3.
fn string_struct_bytes(key: &str, value: &str) -> Vec<u8> {
    message(1, &[string(1, key), message(2, &[string(3, value)])])
}

fn ca_request_sample() -> (IstioCertificateRequest, Vec<u8>) {
    let msg = IstioCertificateRequest {
        csr: CSR.into(),
        validity_duration: 86_400,
        metadata: Some(string_struct("ImpersonatedIdentity", SPIFFE)),
    };
    let expected = body(&[
        string(1, CSR),
        uint(3, 86_400),
        bytes(4, &string_struct_bytes("ImpersonatedIdentity", SPIFFE)),
    ]);
    (msg, expected)
}

fn ca_response_sample() -> (IstioCertificateResponse, Vec<u8>) {
    let chain = ["LEAF-PEM", "INTERMEDIATE-PEM", "ROOT-PEM"];
    let msg = IstioCertificateResponse {
        cert_chain: chain.iter().map(|s| (*s).to_owned()).collect(),
    };
    let expected = body(&[
        string(1, chain[0]),
        string(1, chain[1]),
        string(1, chain[2]),
    ]);
    (msg, expected)
}

const NODE_ID: &str = "ztunnel~10.0.0.5~ztunnel-x.istio-system~istio-system.svc.cluster.local";

fn node() -> Node {
    Node {
        id: NODE_ID.into(),
        cluster: "Kubernetes".into(),
        metadata: Some(string_struct("NAME", "ztunnel-x")),
        build_version: "weft-0.1".into(),
    }
}

fn node_bytes() -> Vec<u8> {
    body(&[
        string(1, NODE_ID),
        string(2, "Kubernetes"),
        bytes(3, &string_struct_bytes("NAME", "ztunnel-x")),
        // 4 (locality) is not described; build_version is 5.
        string(5, "weft-0.1"),
    ])
}

fn delta_request_sample() -> (DeltaDiscoveryRequest, Vec<u8>) {
    let msg = DeltaDiscoveryRequest {
        node: Some(node()),
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec!["*".into(), "/10.0.0.5".into()],
        resource_names_unsubscribe: vec!["*".into()],
        initial_resource_versions: HashMap::from([(SERVICE_KEY.to_owned(), "v42".to_owned())]),
        response_nonce: "nonce-7".into(),
        error_detail: Some(Status {
            code: 3,
            message: "a: bad; b: worse".into(),
            details: Vec::new(),
        }),
    };
    let expected = body(&[
        bytes(1, &node_bytes()),
        string(2, "type.googleapis.com/istio.workload.Address"),
        string(3, "*"),
        string(3, "/10.0.0.5"),
        string(4, "*"),
        message(5, &[string(1, SERVICE_KEY), string(2, "v42")]),
        string(6, "nonce-7"),
        message(7, &[uint(1, 3), string(2, "a: bad; b: worse")]),
    ]);
    (msg, expected)
}

fn delta_response_sample() -> (DeltaDiscoveryResponse, Vec<u8>) {
    let (address, address_bytes) = workload_address_sample();
    let msg = DeltaDiscoveryResponse {
        system_version_info: "sys-1".into(),
        resources: vec![Resource {
            version: "v43".into(),
            resource: Some(Any {
                type_url: ADDRESS_TYPE_URL.into(),
                value: address.encode_to_vec(),
            }),
            name: WORKLOAD_UID.into(),
            aliases: vec!["alias-1".into()],
            ttl: Some(Duration {
                seconds: 30,
                nanos: 0,
            }),
            cache_control: Some(CacheControl { do_not_cache: true }),
        }],
        type_url: ADDRESS_TYPE_URL.into(),
        nonce: "nonce-8".into(),
        removed_resources: vec![
            "bookinfo/gone.bookinfo.svc.cluster.local".into(),
            "uid-gone".into(),
        ],
    };
    let expected = body(&[
        string(1, "sys-1"),
        message(
            2,
            &[
                string(1, "v43"),
                message(
                    2,
                    &[
                        string(1, "type.googleapis.com/istio.workload.Address"),
                        bytes(2, &address_bytes),
                    ],
                ),
                string(3, WORKLOAD_UID),
                string(4, "alias-1"),
                message(6, &[uint(1, 30)]), // Duration.seconds = 1
                message(7, &[uint(1, 1)]),
            ],
        ),
        // 3 unused.
        string(4, "type.googleapis.com/istio.workload.Address"),
        string(5, "nonce-8"),
        string(6, "bookinfo/gone.bookinfo.svc.cluster.local"),
        string(6, "uid-gone"),
    ]);
    (msg, expected)
}

fn sotw_samples() -> ((DiscoveryRequest, Vec<u8>), (DiscoveryResponse, Vec<u8>)) {
    let request = DiscoveryRequest {
        version_info: "v1".into(),
        node: Some(node()),
        resource_names: vec!["bookinfo/deny-all".into()],
        type_url: AUTHORIZATION_TYPE_URL.into(),
        response_nonce: "n1".into(),
        error_detail: Some(Status {
            code: 13,
            message: "oops".into(),
            details: vec![Any {
                type_url: "t".into(),
                value: vec![1, 2],
            }],
        }),
    };
    let request_bytes = body(&[
        string(1, "v1"),
        bytes(2, &node_bytes()),
        string(3, "bookinfo/deny-all"),
        string(4, "type.googleapis.com/istio.security.Authorization"),
        string(5, "n1"),
        message(
            6,
            &[
                uint(1, 13),
                string(2, "oops"),
                message(3, &[string(1, "t"), bytes(2, &[1, 2])]),
            ],
        ),
    ]);
    let response = DiscoveryResponse {
        version_info: "v2".into(),
        resources: vec![Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: vec![0x0a, 0x01, b'x'],
        }],
        canary: true,
        type_url: AUTHORIZATION_TYPE_URL.into(),
        nonce: "n2".into(),
    };
    let response_bytes = body(&[
        string(1, "v2"),
        message(
            2,
            &[
                string(1, "type.googleapis.com/istio.security.Authorization"),
                bytes(2, &[0x0a, 0x01, b'x']),
            ],
        ),
        uint(3, 1),
        string(4, "type.googleapis.com/istio.security.Authorization"),
        string(5, "n2"),
    ]);
    ((request, request_bytes), (response, response_bytes))
}

// ---------------------------------------------------------------------------------------
// The writer itself, checked against the examples in the protobuf encoding guide.
// ---------------------------------------------------------------------------------------

#[test]
fn wire_writer_matches_known_encodings() {
    assert_eq!(uint(1, 150), [0x08, 0x96, 0x01]);
    assert_eq!(
        string(2, "testing"),
        [0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g']
    );
    assert_eq!(wire::varint(0), [0x00]);
    assert_eq!(wire::varint(300), [0xac, 0x02]);
    assert_eq!(wire::varint(u64::MAX).len(), 10);
    // Field 20, wire type 2: (20 << 3) | 2 = 162 = a2 01.
    assert_eq!(wire::key(20, wire::LEN), [0xa2, 0x01]);
    assert_eq!(
        packed(4, &[3, 270, 86942]),
        [0x22, 0x06, 0x03, 0x8e, 0x02, 0x9e, 0xa7, 0x05]
    );
}

// ---------------------------------------------------------------------------------------
// Golden bytes, one per message family.
// ---------------------------------------------------------------------------------------

#[test]
fn golden_workload_address() {
    let (msg, expected) = workload_address_sample();
    assert_encodes_to(&msg, &expected);
}

#[test]
fn golden_service_address() {
    let (msg, expected) = service_address_sample();
    assert_encodes_to(&msg, &expected);
}

#[test]
fn golden_authorization() {
    let (msg, expected) = authorization_sample();
    assert_encodes_to(&msg, &expected);
}

#[test]
fn golden_zds() {
    // ZdsHello { version = V1 }: field 1, varint 1.
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    assert_encodes_to(&hello, &[0x08, 0x01]);
    for (msg, expected) in zds_samples() {
        assert_encodes_to(&msg, &expected);
    }
    for (msg, expected) in zds_response_samples() {
        assert_encodes_to(&msg, &expected);
    }
}

#[test]
fn golden_ca() {
    let (request, request_bytes) = ca_request_sample();
    assert_encodes_to(&request, &request_bytes);
    let (response, response_bytes) = ca_response_sample();
    assert_encodes_to(&response, &response_bytes);
}

#[test]
fn golden_delta_xds() {
    let (request, request_bytes) = delta_request_sample();
    assert_encodes_to(&request, &request_bytes);
    let (response, response_bytes) = delta_response_sample();
    assert_encodes_to(&response, &response_bytes);
}

#[test]
fn golden_sotw_xds() {
    let ((request, request_bytes), (response, response_bytes)) = sotw_samples();
    assert_encodes_to(&request, &request_bytes);
    assert_encodes_to(&response, &response_bytes);
}

// ---------------------------------------------------------------------------------------
// Round trips.
// ---------------------------------------------------------------------------------------

#[test]
fn round_trip_all_samples() {
    let (m, b) = workload_address_sample();
    assert_round_trips(&m, &b);
    let (m, b) = service_address_sample();
    assert_round_trips(&m, &b);
    let (m, b) = authorization_sample();
    assert_round_trips(&m, &b);
    for (m, b) in zds_samples() {
        assert_round_trips(&m, &b);
    }
    for (m, b) in zds_response_samples() {
        assert_round_trips(&m, &b);
    }
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    assert_round_trips(&hello, &[0x08, 0x01]);
    let (m, b) = ca_request_sample();
    assert_round_trips(&m, &b);
    let (m, b) = ca_response_sample();
    assert_round_trips(&m, &b);
    let (m, b) = delta_request_sample();
    assert_round_trips(&m, &b);
    let (m, b) = delta_response_sample();
    assert_round_trips(&m, &b);
    let ((m, b), (m2, b2)) = sotw_samples();
    assert_round_trips(&m, &b);
    assert_round_trips(&m2, &b2);
}

#[test]
fn resource_payload_decodes_as_address() {
    let (response, _) = delta_response_sample();
    let any = response.resources[0]
        .resource
        .as_ref()
        .expect("resource set");
    assert_eq!(any.type_url, ADDRESS_TYPE_URL);
    let address = Address::decode(any.value.as_slice()).expect("decode Address");
    let (expected, _) = workload_address_sample();
    assert_eq!(address, expected);
}

#[test]
fn optional_length_distinguishes_absent_from_zero() {
    let absent = NetworkAddress {
        length: None,
        ..Default::default()
    };
    let zero = NetworkAddress {
        length: Some(0),
        ..Default::default()
    };
    assert_eq!(absent.encode_to_vec(), Vec::<u8>::new());
    assert_eq!(zero.encode_to_vec(), [0x18, 0x00]);
    assert_eq!(
        NetworkAddress::decode(&[0x18, 0x00][..])
            .expect("decode")
            .length,
        Some(0)
    );
    assert_eq!(
        NetworkAddress::decode(&[][..]).expect("decode").length,
        None
    );
}

// ---------------------------------------------------------------------------------------
// Malformed and forward-compatible input.
// ---------------------------------------------------------------------------------------

#[test]
fn garbage_is_an_error_not_a_panic() {
    let cases: &[(&str, &[u8])] = &[
        ("unterminated varint key", &[0xff, 0xff, 0xff]),
        (
            "truncated length-delimited field",
            &[0x0a, 0x05, b'a', b'b'],
        ),
        ("field number 0", &[0x00, 0x01]),
        ("wire type 7", &[0x0f, 0x00]),
        ("wrong wire type for string field 1", &[0x08, 0x01]),
        ("invalid UTF-8 in string field", &[0x0a, 0x02, 0xff, 0xfe]),
        (
            "overlong varint",
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
        (
            "length past end of buffer",
            &[0x1a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ),
    ];
    for (what, input) in cases {
        assert!(
            Workload::decode(*input).is_err(),
            "Workload accepted {what}"
        );
        assert!(Address::decode(*input).is_err(), "Address accepted {what}");
        assert!(
            Authorization::decode(*input).is_err(),
            "Authorization accepted {what}"
        );
        assert!(
            WorkloadRequest::decode(*input).is_err(),
            "WorkloadRequest accepted {what}"
        );
        assert!(
            DeltaDiscoveryResponse::decode(*input).is_err(),
            "DeltaDiscoveryResponse accepted {what}"
        );
        assert!(
            IstioCertificateResponse::decode(*input).is_err(),
            "IstioCertificateResponse accepted {what}"
        );
    }
}

#[test]
fn truncated_golden_messages_are_errors() {
    let (_, address) = workload_address_sample();
    let (_, delta) = delta_response_sample();
    // Cutting inside the outer length-delimited field must be detected.
    assert!(Address::decode(&address[..address.len() - 1]).is_err());
    assert!(Address::decode(&address[..3]).is_err());
    assert!(DeltaDiscoveryResponse::decode(&delta[..delta.len() / 2]).is_err());
    // A nested message whose inner field runs past its own length.
    let bad_add = body(&[bytes(1, &[0x0a, 0x09, b'x'])]);
    assert!(WorkloadRequest::decode(bad_add.as_slice()).is_err());
}

#[test]
fn unknown_and_reserved_fields_are_skipped() {
    let (address, _) = workload_address_sample();
    let Some(address::Type::Workload(workload)) = address.r#type else {
        panic!("sample is a workload");
    };
    let workload_bytes = workload.encode_to_vec();
    let extended = body(&[
        workload_bytes,
        string(15, "reserved field 15"),
        uint(99, 5),
        string(1000, "future field"),
    ]);
    assert_eq!(
        Workload::decode(extended.as_slice()).expect("decode"),
        workload
    );
}
