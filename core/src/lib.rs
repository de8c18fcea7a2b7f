//! Weft's shared data-plane core: what ztunnel and the waypoint both need.
//!
//! Owns SPIFFE identities ([`identity`]), key/CSR generation ([`csr`]), the CA signer the
//! controller serves ([`ca`]) and the CA client proxies use ([`ca_client`]), workload certificate
//! parsing ([`certs`]) and rotation ([`cert_manager`]), rustls configs and SPIFFE verifiers
//! ([`tls`]), HBONE — the HTTP/2 `CONNECT`-over-mTLS tunnel — as server and pooled client
//! ([`hbone`]), the delta xDS client ([`xds`]), the workload/service state and outbound routing
//! decisions it feeds ([`state`]) through one `istio.workload.Address` handler ([`address`]), L4
//! authorization ([`policy`]), the drain primitive every accept loop uses ([`drain`]), and the
//! process shell the proxies share: control-plane flags and connections ([`control_plane`]),
//! duration flags ([`duration`]), Istio's standard metric labels and the stats endpoint
//! ([`metrics`]), admin endpoints ([`admin`]), buffered reloadable logging ([`logging`]), and
//! runtime, signals, ports and drain ([`process`]).
//!
//! Does not own: protobuf types (`weft-proto`), sockets inside pod network namespaces
//! (ztunnel), or anything Kubernetes.

pub mod address;
pub mod admin;
pub mod ca;
pub mod ca_client;
pub mod cert_manager;
pub mod certs;
pub mod control_plane;
pub mod copy;
pub mod csr;
pub mod drain;
pub mod duration;
pub mod hbone;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod state;
pub mod tls;
pub mod xds;

pub use certs::WorkloadCertificate;
pub use identity::SpiffeId;
