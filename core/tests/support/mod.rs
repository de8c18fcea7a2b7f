//! Fixtures shared by weft-core's integration tests: a real CA, real certificates, loopback
//! servers.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use weft_core::SpiffeId;
use weft_core::WorkloadCertificate;
use weft_core::ca::{Config, Signer};
use weft_core::cert_manager::LocalCa;

/// Every await in a test is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn id(s: &str) -> SpiffeId {
    s.parse().expect("valid spiffe id")
}

pub fn signer() -> Arc<Signer> {
    Arc::new(Signer::generate_root("cluster.local", Config::default()).expect("root"))
}

pub fn issue(signer: &Arc<Signer>, identity: &str) -> Arc<WorkloadCertificate> {
    Arc::new(
        LocalCa::new(signer.clone(), Duration::from_secs(3600))
            .issue(&id(identity))
            .expect("issue"),
    )
}

pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}
