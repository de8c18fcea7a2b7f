//! The certificate manager: one certificate per workload identity, fetched from a CA, renewed at
//! half-life, retried with capped exponential backoff, and kept in service until it expires even
//! while the CA is failing (istio-ztunnel reference §3, "Rotation" and "Failure handling").
//!
//! Each identity gets a named worker task; callers read the current certificate without waiting
//! ([`Manager::current`]) or wait for the first one ([`Manager::fetch_certificate`]). All timing
//! uses tokio's clock, so tests drive it with a paused clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use rand::Rng;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use crate::ca::Signer;
use crate::certs::WorkloadCertificate;
use crate::csr;
use crate::hbone::CertificateSource;
use crate::identity::SpiffeId;

/// The error a [`CaClient`] reports; its message is kept as the identity's last error.
pub type FetchError = Box<dyn std::error::Error + Send + Sync>;

/// Obtains a signed certificate for an identity (in ztunnel: a CSR to the controller's
/// `IstioCertificateService.CreateCertificate`).
pub trait CaClient: Send + Sync + 'static {
    /// Generates a key and CSR for `identity` and returns the signed certificate.
    fn fetch<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, FetchError>>;
}

/// Manager settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// First retry delay after a failed fetch; default 500 ms; per identity.
    pub initial_backoff: Duration,
    /// Longest retry delay; default 150 s; per identity.
    pub max_backoff: Duration,
    /// Random spread applied to each retry delay, as a fraction (0.2 = ±20 %); default 0.2.
    pub jitter: f64,
    /// Most CA requests in flight at once; default 8; per manager.
    pub max_concurrent_fetches: usize,
    /// How long [`CertificateSource::certificate`] waits for a first certificate; default 10 s.
    pub wait_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(150),
            jitter: 0.2,
            max_concurrent_fetches: 8,
            wait_timeout: Duration::from_secs(10),
        }
    }
}

/// What the manager holds for one identity.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// The certificate in service, if any (kept until it expires, even while renewals fail).
    pub certificate: Option<Arc<WorkloadCertificate>>,
    /// The error of the last failed fetch, cleared by a success.
    pub last_error: Option<Arc<str>>,
    /// Fetch attempts so far.
    pub attempts: u64,
}

/// Errors waiting for a certificate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No certificate arrived in time; carries the CA's last error if there was one.
    #[error("no certificate for {identity} yet (last error: {})", last_error.as_deref().unwrap_or("none"))]
    NotReady {
        /// The identity.
        identity: SpiffeId,
        /// The last fetch error.
        last_error: Option<Arc<str>>,
    },
    /// The identity was forgotten while waiting.
    #[error("certificate for {0} was dropped")]
    Forgotten(SpiffeId),
}

/// Holds and renews one certificate per identity. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    client: Arc<dyn CaClient>,
    config: Config,
    permits: Arc<Semaphore>,
    workers: Mutex<HashMap<SpiffeId, Worker>>,
}

struct Worker {
    state: watch::Receiver<State>,
    task: JoinHandle<()>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === impl Manager ===

impl Manager {
    /// A manager fetching from `client`.
    pub fn new(client: Arc<dyn CaClient>, config: Config) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_concurrent_fetches.max(1)));
        Manager {
            inner: Arc::new(Inner {
                client,
                config,
                permits,
                workers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Starts fetching and renewing `identity`'s certificate if not already (e.g. when a workload
    /// with that identity appears on the node). Must be called within a tokio runtime.
    pub fn prefetch(&self, identity: &SpiffeId) {
        let _ = self.watch(identity);
    }

    /// Stops renewing `identity` and drops its certificate (e.g. when the last workload with that
    /// identity leaves the node).
    pub fn forget(&self, identity: &SpiffeId) {
        if let Ok(mut workers) = self.inner.workers.lock() {
            workers.remove(identity);
        }
    }

    /// The certificate currently in service for `identity`, without waiting.
    pub fn current(&self, identity: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        self.state(identity)?.certificate
    }

    /// The full state for `identity`, if it is managed.
    pub fn state(&self, identity: &SpiffeId) -> Option<State> {
        let workers = self.inner.workers.lock().ok()?;
        Some(workers.get(identity)?.state.borrow().clone())
    }

    /// Every managed identity.
    pub fn identities(&self) -> Vec<SpiffeId> {
        self.inner
            .workers
            .lock()
            .map(|w| w.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Starts managing `identity` if needed and waits until a certificate is in service.
    /// Callers bound the wait with a timeout.
    ///
    /// # Errors
    /// [`Error::Forgotten`] if the identity is dropped while waiting.
    pub async fn fetch_certificate(
        &self,
        identity: &SpiffeId,
    ) -> Result<Arc<WorkloadCertificate>, Error> {
        let mut rx = self.watch(identity);
        let state = rx
            .wait_for(|s| s.certificate.is_some())
            .await
            .map_err(|_| Error::Forgotten(identity.clone()))?;
        state
            .certificate
            .clone()
            .ok_or_else(|| Error::Forgotten(identity.clone()))
    }

    fn watch(&self, identity: &SpiffeId) -> watch::Receiver<State> {
        let mut workers = self
            .inner
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(worker) = workers.get(identity) {
            return worker.state.clone();
        }
        let (tx, rx) = watch::channel(State::default());
        let task = tokio::spawn(
            run_worker(
                self.inner.client.clone(),
                self.inner.config.clone(),
                self.inner.permits.clone(),
                identity.clone(),
                tx,
            )
            .instrument(info_span!("certificate", identity = %identity)),
        );
        workers.insert(
            identity.clone(),
            Worker {
                state: rx.clone(),
                task,
            },
        );
        rx
    }
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("config", &self.inner.config)
            .field("identities", &self.identities())
            .finish_non_exhaustive()
    }
}

impl CertificateSource for Manager {
    fn certificate<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<Arc<WorkloadCertificate>, FetchError>> {
        Box::pin(async move {
            match tokio::time::timeout(
                self.inner.config.wait_timeout,
                self.fetch_certificate(identity),
            )
            .await
            {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Error::NotReady {
                    identity: identity.clone(),
                    last_error: self.state(identity).and_then(|s| s.last_error),
                }
                .into()),
            }
        })
    }
}

/// How long from `now` until `at` in wall-clock terms, zero if already past.
fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now).unwrap_or(Duration::ZERO)
}

async fn run_worker(
    client: Arc<dyn CaClient>,
    config: Config,
    permits: Arc<Semaphore>,
    identity: SpiffeId,
    tx: watch::Sender<State>,
) {
    let mut backoff = config.initial_backoff;
    // When the certificate in service expires, on tokio's clock.
    let mut expires_at: Option<Instant> = None;
    loop {
        let result = {
            let _permit = permits.acquire().await;
            tx.send_modify(|s| s.attempts += 1);
            client.fetch(&identity).await
        };
        let now = Instant::now();
        let wall = SystemTime::now();
        let next = match result {
            Ok(cert) if cert.identity() != &identity => Err(format!(
                "ca returned a certificate for {}, not {identity}",
                cert.identity()
            )
            .into()),
            other => other,
        };
        match next {
            Ok(cert) => {
                backoff = config.initial_backoff;
                let refresh_in = if cert.not_before() > wall {
                    config.initial_backoff
                } else {
                    until(cert.refresh_at(), wall)
                };
                expires_at = Some(now + until(cert.not_after(), wall));
                debug!(
                    refresh_in_s = refresh_in.as_secs_f64(),
                    "certificate renewed"
                );
                tx.send_modify(|s| {
                    s.certificate = Some(Arc::new(cert));
                    s.last_error = None;
                });
                tokio::time::sleep_until(now + refresh_in).await;
            }
            Err(err) => {
                let delay = jittered(backoff, config.jitter);
                backoff = (backoff * 2).min(config.max_backoff);
                let mut wake = now + delay;
                if let Some(expiry) = expires_at {
                    // Never wait past the expiry of the certificate in service.
                    wake = wake.min(expiry.max(now));
                }
                warn!(error = %err, retry_in_s = (wake - now).as_secs_f64(), "certificate fetch failed");
                let message: Arc<str> = err.to_string().into();
                tx.send_modify(|s| s.last_error = Some(message));
                tokio::time::sleep_until(wake).await;
            }
        }
        if expires_at.is_some_and(|expiry| Instant::now() >= expiry) {
            warn!("certificate expired before it could be renewed");
            expires_at = None;
            tx.send_modify(|s| s.certificate = None);
        }
    }
}

fn jittered(delay: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return delay;
    }
    let factor = rand::rng().random_range((1.0 - jitter)..=(1.0 + jitter));
    delay.mul_f64(factor.max(0.0))
}

/// A [`CaClient`] that signs with an in-process [`Signer`]: generates a key and CSR exactly as a
/// remote client would, signs it for the identity and parses the chain. The controller uses it
/// for its own identity; tests and benchmarks use it as a real CA without a network hop.
#[derive(Debug, Clone)]
pub struct LocalCa {
    signer: Arc<Signer>,
    ttl: Duration,
}

impl LocalCa {
    /// Signs with `signer`, asking for `ttl` (capped by the signer's configuration).
    pub fn new(signer: Arc<Signer>, ttl: Duration) -> Self {
        LocalCa { signer, ttl }
    }

    /// Issues a certificate for `identity` synchronously.
    ///
    /// # Errors
    /// CSR generation, signing or chain parsing errors.
    pub fn issue(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, FetchError> {
        let request = csr::generate(identity)?;
        let chain = self.signer.sign(&request.csr_pem, identity, self.ttl)?;
        Ok(WorkloadCertificate::from_pem_chain(
            &chain,
            &request.key_pem,
            Some(identity),
        )?)
    }
}

impl CaClient for LocalCa {
    fn fetch<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, FetchError>> {
        Box::pin(async move { self.issue(identity) })
    }
}
