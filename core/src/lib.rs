//! Weft's shared data-plane core: what ztunnel and the waypoint both need.
//!
//! Owns SPIFFE identities ([`identity`]), key/CSR generation ([`csr`]), the CA signer the
//! controller serves ([`ca`]), workload certificate parsing ([`certs`]) and rotation
//! ([`cert_manager`]), rustls configs and SPIFFE verifiers ([`tls`]), HBONE — the HTTP/2
//! `CONNECT`-over-mTLS tunnel — as server and pooled client ([`hbone`]), and the drain primitive
//! every accept loop uses ([`drain`]).
//!
//! Does not own: protobuf types (`weft-proto`), xDS, policy, sockets inside pod network
//! namespaces (ztunnel), or anything Kubernetes.

pub mod ca;
pub mod cert_manager;
pub mod certs;
pub mod csr;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod tls;

pub use certs::WorkloadCertificate;
pub use identity::SpiffeId;
