//! rustls configuration for HBONE, as ztunnel sets it up (TLS 1.3 only; AES-256-GCM and
//! AES-128-GCM suites; ALPN `h2`; client without SNI or session resumption; server requiring a
//! client certificate) and the SPIFFE verifiers used on each side.
//!
//! The crypto provider is aws-lc-rs by default and BoringSSL (`boring-rustls-provider`, FIPS
//! module) with the `fips` cargo feature.

mod config;
mod provider;
mod verify;

pub use config::{Error, client_config, peer_identity, server_config};
pub use provider::provider;
pub use verify::{IdentityVerifier, TrustDomainVerifier, VerifyError};
