//! The certificate manager on tokio's paused clock, with real certificates from a real signer.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use support::{id, signer, within};
use tokio::time::Instant;
use weft_core::SpiffeId;
use weft_core::WorkloadCertificate;
use weft_core::cert_manager::{CaClient, Config, FetchError, LocalCa, Manager};
use weft_core::hbone::CertificateSource;

/// A CA that signs for real, records when it was asked, and can be switched to failing.
struct FlakyCa {
    ca: LocalCa,
    failing: AtomicBool,
    calls: Mutex<Vec<Instant>>,
}

impl FlakyCa {
    fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(FlakyCa {
            ca: LocalCa::new(signer(), ttl),
            failing: AtomicBool::new(false),
            calls: Mutex::new(Vec::new()),
        })
    }
    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

impl CaClient for FlakyCa {
    fn fetch<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, FetchError>> {
        self.calls.lock().unwrap().push(Instant::now());
        Box::pin(async move {
            if self.failing.load(Ordering::SeqCst) {
                Err("ca unavailable".into())
            } else {
                self.ca.issue(identity)
            }
        })
    }
}

fn config() -> Config {
    Config {
        jitter: 0.0,
        ..Config::default()
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn refreshes_at_half_life() {
    let ca = FlakyCa::new(Duration::from_secs(3600));
    let manager = Manager::new(ca.clone(), config());
    let identity = id("spiffe://cluster.local/ns/a/sa/client");
    let start = Instant::now();
    let first = within("first cert", manager.fetch_certificate(&identity))
        .await
        .unwrap();
    let half_life = first
        .refresh_at()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        secs(half_life) > 1790.0 && secs(half_life) <= 1800.0,
        "{half_life:?}"
    );

    tokio::time::sleep(half_life - Duration::from_secs(5)).await;
    assert_eq!(ca.calls().len(), 1, "no refresh before half-life");
    assert!(Arc::ptr_eq(&manager.current(&identity).unwrap(), &first));

    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = ca.calls();
    assert_eq!(calls.len(), 2, "refreshed once at half-life");
    let at = secs(calls[1] - start);
    assert!(
        (at - secs(half_life)).abs() < 1.0,
        "refresh at {at}s, half-life {half_life:?}"
    );
    let second = manager.current(&identity).unwrap();
    assert!(
        !Arc::ptr_eq(&second, &first),
        "the new certificate is in service"
    );
    assert_eq!(second.identity(), &identity);
}

#[tokio::test(start_paused = true)]
async fn keeps_serving_the_old_cert_and_backs_off_while_the_ca_fails() {
    let ca = FlakyCa::new(Duration::from_secs(1000));
    let manager = Manager::new(
        ca.clone(),
        Config {
            max_backoff: Duration::from_secs(20),
            ..config()
        },
    );
    let identity = id("spiffe://cluster.local/ns/a/sa/client");
    let start = Instant::now();
    let first = within("first cert", manager.fetch_certificate(&identity))
        .await
        .unwrap();
    let expiry = first.not_after().duration_since(SystemTime::now()).unwrap();
    ca.failing.store(true, Ordering::SeqCst);

    // Just before expiry: many failed renewals, the first certificate still in service.
    tokio::time::sleep(expiry - Duration::from_secs(2)).await;
    let current = manager
        .current(&identity)
        .expect("old cert kept while ca fails");
    assert!(Arc::ptr_eq(&current, &first));
    let state = manager.state(&identity).unwrap();
    assert_eq!(state.last_error.as_deref(), Some("ca unavailable"));

    let calls = ca.calls();
    let gaps: Vec<f64> = calls
        .windows(2)
        .skip(1)
        .map(|w| secs(w[1] - w[0]))
        .collect();
    let expected = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0];
    assert!(gaps.len() > expected.len(), "too few retries: {gaps:?}");
    for (gap, want) in gaps.iter().zip(expected) {
        assert!(
            (gap - want).abs() < 0.01,
            "gaps {gaps:?}, expected doubling to a 20 s cap"
        );
    }
    assert!(gaps.iter().all(|g| *g <= 20.01), "backoff capped: {gaps:?}");

    // The last retry is scheduled no later than expiry, and the cert is dropped once expired.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = ca.calls();
    let last = secs(*calls.last().unwrap() - start);
    assert!(
        (last - secs(expiry)).abs() < 1.0 || last < secs(expiry),
        "retry at {last}, expiry {expiry:?}"
    );
    assert!(
        manager.current(&identity).is_none(),
        "expired cert no longer served"
    );

    // The CA recovers: the next retry restores service.
    ca.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(25)).await;
    let restored = manager.current(&identity).expect("cert after recovery");
    assert!(!Arc::ptr_eq(&restored, &first));
}

#[tokio::test(start_paused = true)]
async fn waiters_get_the_first_cert_after_failures_and_time_out_with_the_error() {
    let ca = FlakyCa::new(Duration::from_secs(3600));
    ca.failing.store(true, Ordering::SeqCst);
    let manager = Manager::new(
        ca.clone(),
        Config {
            wait_timeout: Duration::from_secs(3),
            ..config()
        },
    );
    let identity = id("spiffe://cluster.local/ns/a/sa/client");
    let err = manager.certificate(&identity).await.unwrap_err();
    assert!(err.to_string().contains("ca unavailable"), "{err}");

    let waiter = {
        let manager = manager.clone();
        let identity = identity.clone();
        tokio::spawn(async move { manager.fetch_certificate(&identity).await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiter.is_finished());
    ca.failing.store(false, Ordering::SeqCst);
    let cert = within("waiter", waiter).await.unwrap().unwrap();
    assert_eq!(cert.identity(), &identity);
}

#[tokio::test(start_paused = true)]
async fn prefetch_and_forget() {
    let ca = FlakyCa::new(Duration::from_secs(3600));
    let manager = Manager::new(ca.clone(), config());
    let a = id("spiffe://cluster.local/ns/a/sa/a");
    let b = id("spiffe://cluster.local/ns/b/sa/b");
    manager.prefetch(&a);
    manager.prefetch(&b);
    manager.prefetch(&a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ca.calls().len(), 2, "one fetch per identity");
    assert!(manager.current(&a).is_some() && manager.current(&b).is_some());
    manager.forget(&a);
    assert!(manager.current(&a).is_none());
    assert_eq!(manager.identities(), vec![b.clone()]);
    tokio::time::sleep(Duration::from_secs(4000)).await;
    // Only b keeps renewing (twice in 4000 s at a 1800 s half-life).
    assert_eq!(ca.calls().len(), 4);
}

/// A CA that answers with a certificate for the wrong identity is treated as failing.
struct WrongCa(LocalCa);

impl CaClient for WrongCa {
    fn fetch<'a>(
        &'a self,
        _identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, FetchError>> {
        Box::pin(async move { self.0.issue(&id("spiffe://cluster.local/ns/x/sa/x")) })
    }
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_identity_is_rejected() {
    let manager = Manager::new(
        Arc::new(WrongCa(LocalCa::new(signer(), Duration::from_secs(60)))),
        Config {
            wait_timeout: Duration::from_secs(2),
            ..config()
        },
    );
    let identity = id("spiffe://cluster.local/ns/a/sa/a");
    let err = manager.certificate(&identity).await.unwrap_err();
    assert!(
        err.to_string().contains("spiffe://cluster.local/ns/x/sa/x"),
        "{err}"
    );
    assert!(manager.current(&identity).is_none());
}
