//! Endpoint choice per backend service: round robin or least request (power of two random
//! choices by outstanding requests), and passive outlier detection (Envoy's consecutive-5xx /
//! connect-failure ejection: the n-th ejection lasts n × base, at most `max_ejection_percent`
//! of the endpoints are ejected at once, a success resets the consecutive count).
//!
//! Times are tokio [`Instant`]s so tests run on a paused clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::time::Instant;

use crate::engine::{LoadBalancer, OutlierDetection};

/// What the choice needs to know of one endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct Candidate {
    /// Requests in flight to it.
    pub outstanding: usize,
    /// Ejected by outlier detection right now.
    pub ejected: bool,
    /// Already tried by this request (a retry prefers another endpoint).
    pub tried: bool,
}

/// Chooses among `candidates` (ordered by uid): never an ejected one; an untried one when any
/// is left. `rr` is the service's round-robin cursor. `None` when every endpoint is ejected
/// (or there are none).
pub fn choose(
    lb: LoadBalancer,
    candidates: &[Candidate],
    rr: &mut usize,
    rng: &mut impl Rng,
) -> Option<usize> {
    let mut eligible: Vec<usize> = (0..candidates.len())
        .filter(|&i| !candidates[i].ejected && !candidates[i].tried)
        .collect();
    if eligible.is_empty() {
        eligible = (0..candidates.len())
            .filter(|&i| !candidates[i].ejected)
            .collect();
    }
    match eligible.len() {
        0 => None,
        1 => Some(eligible[0]),
        n => match lb {
            LoadBalancer::RoundRobin => {
                let pick = eligible[*rr % n];
                *rr = rr.wrapping_add(1);
                Some(pick)
            }
            LoadBalancer::LeastRequest => {
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (eligible[a], eligible[b]);
                Some(if candidates[b].outstanding < candidates[a].outstanding {
                    b
                } else {
                    a
                })
            }
        },
    }
}

/// Passive health of one endpoint.
#[derive(Debug, Default)]
struct Health {
    outstanding: Arc<AtomicUsize>,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Health {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

#[derive(Debug, Default)]
struct ServiceHealth {
    rr: usize,
    endpoints: HashMap<String, Health>,
}

/// Holds one request's place in an endpoint's outstanding count until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The outlier state of one endpoint, for `/config_dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointReport {
    /// Requests in flight.
    pub outstanding: usize,
    /// Consecutive failures so far.
    pub consecutive_failures: u32,
    /// How many times it was ejected.
    pub ejections: u32,
    /// Remaining ejection, if ejected now.
    pub ejected_for: Option<std::time::Duration>,
}

/// Per-service load-balancing and outlier state, keyed by service key and endpoint uid.
#[derive(Debug, Default)]
pub struct Balancer {
    services: Mutex<HashMap<String, ServiceHealth>>,
}

impl Balancer {
    /// Chooses one of `uids` (the service's endpoints, ordered) for a request that already
    /// tried `tried`; the returned guard counts it as outstanding.
    pub fn pick(
        &self,
        service: &str,
        lb: LoadBalancer,
        uids: &[&str],
        tried: &[&str],
    ) -> Option<(usize, InFlight)> {
        let now = Instant::now();
        let mut services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !services.contains_key(service) {
            services.insert(service.to_owned(), ServiceHealth::default());
        }
        let svc = services.get_mut(service)?;
        let candidates: Vec<Candidate> = uids
            .iter()
            .map(|&uid| {
                if !svc.endpoints.contains_key(uid) {
                    svc.endpoints.insert(uid.to_owned(), Health::default());
                }
                let health = &svc.endpoints[uid];
                Candidate {
                    outstanding: health.outstanding.load(Ordering::Relaxed),
                    ejected: health.ejected(now),
                    tried: tried.contains(&uid),
                }
            })
            .collect();
        if svc.endpoints.len() > uids.len() {
            // Forget endpoints that left the service.
            let current: std::collections::HashSet<&str> = uids.iter().copied().collect();
            svc.endpoints
                .retain(|uid, _| current.contains(uid.as_str()));
        }
        let index = choose(lb, &candidates, &mut svc.rr, &mut rand::rng())?;
        let health = svc.endpoints.get(uids[index])?;
        health.outstanding.fetch_add(1, Ordering::Relaxed);
        Some((index, InFlight(health.outstanding.clone())))
    }

    /// Records an attempt's outcome for outlier detection: `failed` is a 5xx or a connect /
    /// reset failure. `total` is the service's endpoint count (for the ejection cap).
    pub fn record(
        &self,
        service: &str,
        uid: &str,
        failed: bool,
        detection: Option<OutlierDetection>,
        total: usize,
    ) {
        let now = Instant::now();
        let mut services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(svc) = services.get_mut(service) else {
            return;
        };
        let ejected_now = svc.endpoints.values().filter(|h| h.ejected(now)).count();
        let Some(health) = svc.endpoints.get_mut(uid) else {
            return;
        };
        if !failed {
            health.consecutive_failures = 0;
            return;
        }
        health.consecutive_failures += 1;
        let Some(od) = detection else {
            return;
        };
        if od.consecutive_failures == 0
            || health.consecutive_failures < od.consecutive_failures
            || health.ejected(now)
        {
            return;
        }
        let allowed = if od.max_ejection_percent == 0 {
            0
        } else {
            (total * od.max_ejection_percent.min(100) as usize / 100).max(1)
        };
        if ejected_now >= allowed {
            return;
        }
        health.ejections += 1;
        health.consecutive_failures = 0;
        health.ejected_until = Some(now + od.base_ejection * health.ejections);
        tracing::info!(
            svc = service,
            endpoint = %uid,
            ejections = health.ejections,
            "outlier ejected"
        );
    }

    /// The state of `service`'s endpoints by uid.
    pub fn report(&self, service: &str) -> Vec<(String, EndpointReport)> {
        let now = Instant::now();
        let services = self
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(svc) = services.get(service) else {
            return Vec::new();
        };
        let mut out: Vec<_> = svc
            .endpoints
            .iter()
            .map(|(uid, h)| {
                (
                    uid.clone(),
                    EndpointReport {
                        outstanding: h.outstanding.load(Ordering::Relaxed),
                        consecutive_failures: h.consecutive_failures,
                        ejections: h.ejections,
                        ejected_for: h
                            .ejected_until
                            .filter(|&u| now < u)
                            .map(|u| u.duration_since(now)),
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn uids(n: usize) -> Vec<&'static str> {
        ["ep0", "ep1", "ep2", "ep3"][..n].to_vec()
    }

    #[test]
    fn round_robin_cycles_over_eligible_endpoints() {
        let b = Balancer::default();
        let eps = uids(3);
        let picks: Vec<usize> = (0..6)
            .map(|_| b.pick("s", LoadBalancer::RoundRobin, &eps, &[]).unwrap().0)
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_request_prefers_the_less_loaded() {
        let mut rng = rand::rng();
        let candidates = [
            Candidate {
                outstanding: 10,
                ..Default::default()
            },
            Candidate {
                outstanding: 0,
                ..Default::default()
            },
        ];
        for _ in 0..50 {
            assert_eq!(
                choose(LoadBalancer::LeastRequest, &candidates, &mut 0, &mut rng),
                Some(1)
            );
        }
        // Through the balancer: holding requests on one endpoint steers new ones away.
        let b = Balancer::default();
        let eps = uids(2);
        let (first, _held) = b.pick("s", LoadBalancer::LeastRequest, &eps, &[]).unwrap();
        let (_, _held2) = {
            // a second one held on the same endpoint
            let mut got = b.pick("s", LoadBalancer::LeastRequest, &eps, &[]).unwrap();
            while got.0 != first {
                got = b.pick("s", LoadBalancer::LeastRequest, &eps, &[]).unwrap();
            }
            got
        };
        for _ in 0..20 {
            let (i, _g) = b.pick("s", LoadBalancer::LeastRequest, &eps, &[]).unwrap();
            assert_ne!(i, first, "the loaded endpoint is avoided");
        }
    }

    #[test]
    fn retries_prefer_untried_and_ejected_are_skipped() {
        let c = |ejected, tried| Candidate {
            outstanding: 0,
            ejected,
            tried,
        };
        let mut rng = rand::rng();
        for _ in 0..20 {
            assert_eq!(
                choose(
                    LoadBalancer::LeastRequest,
                    &[c(false, true), c(false, false)],
                    &mut 0,
                    &mut rng
                ),
                Some(1)
            );
        }
        assert_eq!(
            choose(
                LoadBalancer::RoundRobin,
                &[c(false, true)],
                &mut 0,
                &mut rng
            ),
            Some(0),
            "the only endpoint is retried"
        );
        assert_eq!(
            choose(
                LoadBalancer::RoundRobin,
                &[c(true, false)],
                &mut 0,
                &mut rng
            ),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_base_times_ejections() {
        let b = Balancer::default();
        let eps = uids(2);
        let od = Some(OutlierDetection {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
        });
        b.pick("s", LoadBalancer::RoundRobin, &eps, &[]).unwrap();
        for _ in 0..2 {
            b.record("s", eps[0], true, od, 2);
        }
        b.record("s", eps[0], false, od, 2); // success resets the count
        for _ in 0..2 {
            b.record("s", eps[0], true, od, 2);
        }
        assert_eq!(b.report("s")[0].1.ejections, 0);
        b.record("s", eps[0], true, od, 2);
        assert_eq!(b.report("s")[0].1.ejections, 1);
        for _ in 0..10 {
            let (i, _) = b.pick("s", LoadBalancer::RoundRobin, &eps, &[]).unwrap();
            assert_eq!(i, 1, "ejected endpoint gets no traffic");
        }
        // The cap: the other endpoint cannot be ejected while 50% already is.
        for _ in 0..3 {
            b.record("s", eps[1], true, od, 2);
        }
        assert_eq!(b.report("s")[1].1.ejections, 0);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.report("s")[0].1.ejected_for.is_none());
        // The second ejection lasts twice as long.
        for _ in 0..3 {
            b.record("s", eps[0], true, od, 2);
        }
        assert_eq!(
            b.report("s")[0].1.ejected_for,
            Some(Duration::from_secs(20))
        );
    }
}
