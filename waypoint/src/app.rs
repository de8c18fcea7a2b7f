//! Wiring: identity (CA client + certificate manager), delta xDS → state, the HBONE server, the
//! upstream pool, admin / stats / readiness endpoints, and the drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use prometheus_client::registry::Registry;
use tracing::{Instrument, info, info_span};
use weft_core::hbone::{Pool, PoolConfig, Server, Settings, TcpConnector};
use weft_core::process::{self, Port};
use weft_core::{SpiffeId, cert_manager, control_plane, drain, xds};

use crate::config::Config;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::state::{Binding, WaypointState};
use crate::upstream::Forwarder;

/// Errors starting the waypoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The waypoint's identity is not a valid SPIFFE ID.
    #[error("waypoint identity")]
    Identity(#[source] weft_core::identity::Error),
    /// The connection to the controller (xDS, CA) could not be started.
    #[error(transparent)]
    ControlPlane(#[from] control_plane::Error),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] process::BindError),
    /// The HBONE server failed.
    #[error("hbone server")]
    Serve(#[source] std::io::Error),
}

pub use weft_core::admin::{Endpoint, serve_http};

/// What readiness still waits for, one line each (empty = ready).
pub fn pending_lines(certificate: bool, xds: bool) -> Vec<String> {
    let mut lines = Vec::new();
    if !certificate {
        lines.push("certificate: the waypoint's certificate not yet issued".to_owned());
    }
    if !xds {
        lines.push("xds: first Address and L7 responses not yet applied".to_owned());
    }
    lines
}

/// The `/config_dump` document.
pub fn config_dump(
    identity: &SpiffeId,
    certificates: &cert_manager::Manager,
    state: &WaypointState,
    binding: &Binding,
    forwarder: &Forwarder,
) -> serde_json::Value {
    let cert = certificates.state(identity).unwrap_or_default();
    let expires = cert.certificate.as_ref().and_then(|c| {
        c.not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs())
    });
    let inner = state.read();
    let bound_services: Vec<serde_json::Value> = inner
        .workloads
        .services()
        .filter(|s| {
            s.waypoint
                .as_ref()
                .is_some_and(|gw| binding.names(gw, &inner.workloads))
        })
        .map(|s| {
            let config = inner
                .service_names
                .get(&s.hostname)
                .and_then(|n| inner.services.get(n));
            let ports: Vec<serde_json::Value> = s
                .ports
                .iter()
                .map(|p| {
                    let port_config = config.and_then(|c| {
                        c.config
                            .ports
                            .iter()
                            .find(|pc| pc.port == u32::from(p.service_port))
                    });
                    serde_json::json!({
                        "port": p.service_port,
                        "target_port": p.target_port,
                        "protocol": port_config.map_or("detect".to_owned(), |pc| match pc.protocol() {
                            weft_proto::weft::l7::v1::Protocol::Unspecified => "detect".to_owned(),
                            other => format!("{other:?}").to_lowercase(),
                        }),
                        "routes": port_config.map(|pc| pc.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>()).unwrap_or_default(),
                    })
                })
                .collect();
            let health = forwarder.balancer().report(s.key());
            let endpoints: Vec<serde_json::Value> = inner
                .workloads
                .endpoints(s.key())
                .map(|w| {
                    let h = health.iter().find(|(uid, _)| *uid == w.uid).map(|(_, h)| h);
                    serde_json::json!({
                        "uid": w.uid,
                        "name": w.name,
                        "addresses": w.ips,
                        "identity": w.identity().to_string(),
                        "healthy": w.healthy,
                        "outstanding": h.map_or(0, |h| h.outstanding),
                        "consecutive_failures": h.map_or(0, |h| h.consecutive_failures),
                        "ejections": h.map_or(0, |h| h.ejections),
                        "ejected_for_ms": h.and_then(|h| h.ejected_for).map(|d| d.as_millis() as u64),
                    })
                })
                .collect();
            serde_json::json!({
                "hostname": s.hostname,
                "namespace": s.namespace,
                "name": s.name,
                "vips": s.vips.iter().map(|v| v.address.to_string()).collect::<Vec<_>>(),
                "config": config.map(|_| inner.service_names.get(&s.hostname)),
                "load_balancer": config.map(|c| match c.config.load_balancer() {
                    weft_proto::weft::l7::v1::LoadBalancer::LeastRequest => "least_request",
                    weft_proto::weft::l7::v1::LoadBalancer::RoundRobin => "round_robin",
                }),
                "outlier_detection": config.and_then(|c| c.config.outlier_detection.as_ref()).map(|od| serde_json::json!({
                    "consecutive_failures": od.consecutive_failures,
                    "base_ejection_ms": od.base_ejection_ms,
                    "max_ejection_percent": od.max_ejection_percent,
                })),
                "ports": ports,
                "endpoints": endpoints,
            })
        })
        .collect();
    let bound_workloads: Vec<serde_json::Value> = inner
        .workloads
        .workloads()
        .filter(|w| {
            w.waypoint
                .as_ref()
                .is_some_and(|gw| binding.names(gw, &inner.workloads))
        })
        .map(|w| {
            serde_json::json!({
                "uid": w.uid, "name": w.name, "namespace": w.namespace,
                "addresses": w.ips, "identity": w.identity().to_string(),
            })
        })
        .collect();
    let policies: Vec<serde_json::Value> = inner
        .policy_configs
        .iter()
        .map(|(name, p)| {
            serde_json::json!({
                "name": name,
                "action": format!("{:?}", p.action()).to_lowercase(),
                "services": p.services,
                "rules": p.rules.len(),
            })
        })
        .collect();
    serde_json::json!({
        "identity": identity.to_string(),
        "waypoint": binding.hostname,
        "certificate": {
            "state": if cert.certificate.is_some() { "available" } else { "pending" },
            "expires_unix": expires,
            "last_error": cert.last_error.as_deref(),
        },
        "services": bound_services,
        "workloads": bound_workloads,
        "policies": policies,
    })
}

/// Runs the waypoint until `shutdown` resolves (or POST `/quitquitquit`), then drains.
///
/// # Errors
/// [`Error`] when a component cannot start.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    info!(config = ?config, "starting");
    let identity = SpiffeId::new(
        &config.trust_domain,
        &config.pod_namespace,
        &config.service_account,
    )
    .map_err(Error::Identity)?;
    let (trigger, watch) = drain::channel();

    let state = WaypointState::new();
    let node = xds::NodeInfo {
        id: config.node_id(),
        metadata: [
            ("NAME".to_owned(), config.pod_name.clone()),
            ("NAMESPACE".to_owned(), config.pod_namespace.clone()),
            ("INSTANCE_IPS".to_owned(), config.instance_ip.clone()),
            ("SERVICE_ACCOUNT".to_owned(), config.service_account.clone()),
            (
                "WAYPOINT_NAME".to_owned(),
                config.waypoint_name().to_owned(),
            ),
        ]
        .into(),
    };
    let proxy = control_plane::Proxy {
        node,
        token: config.token.clone(),
        secret_ttl: config.secret_ttl,
        impersonate: false,
    };
    let connection = config
        .control_plane
        .connect(proxy, state.handlers(), watch.clone())?;
    let (xds_handle, certificates) = (connection.xds, connection.certificates);
    certificates.prefetch(&identity);

    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let registry = Arc::new(registry);

    let binding = Binding {
        namespace: config.pod_namespace.clone(),
        hostname: config.waypoint_hostname(),
        own_ips: config.instance_ips(),
    };
    let pool = Pool::new(
        PoolConfig::default(),
        Arc::new(TcpConnector),
        Arc::new(certificates.clone()),
    );
    let forwarder = Arc::new(Forwarder::new(state.clone(), pool, identity.clone()));
    let proxy =
        Arc::new(Proxy::new(state.clone(), forwarder.clone(), metrics).with_drain(watch.clone()));

    let readiness = {
        let xds = xds_handle.clone();
        let certificates = certificates.clone();
        let identity = identity.clone();
        process::readiness(move || {
            pending_lines(certificates.current(&identity).is_some(), xds.is_ready())
        })
    };
    let quit = Arc::new(tokio::sync::Notify::new());
    let admin: Endpoint = {
        let state = state.clone();
        let certificates = certificates.clone();
        let identity = identity.clone();
        let binding = binding.clone();
        let forwarder = forwarder.clone();
        let quit = quit.clone();
        Arc::new(move |method, path, query| match path {
            "/quitquitquit" => process::quit(method, &quit),
            "/logging" => weft_core::admin::logging_endpoint(method, query, "waypoint"),
            "/config_dump" => (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&config_dump(
                    &identity,
                    &certificates,
                    &state,
                    &binding,
                    &forwarder,
                ))
                .unwrap_or_default(),
            ),
            _ => process::not_found(),
        })
    };
    let readiness = Port {
        addr: config.readiness,
        endpoint: readiness,
    };
    let stats = Port {
        addr: config.stats,
        endpoint: weft_core::metrics::endpoint(registry),
    };
    let admin = Port {
        addr: config.admin,
        endpoint: admin,
    };
    process::serve_ports(readiness, stats, admin, &watch).await?;

    let listener = process::bind(config.hbone).await?;
    info!(addr = %config.hbone, identity = %identity, waypoint = %binding.hostname, "serving hbone");
    let inbound = Inbound::new(proxy, binding, watch.clone());
    let server = Arc::new(Server::new(
        Settings::default(),
        (certificates.clone(), identity.clone()),
        Arc::new(inbound),
    ));
    let serve = server.serve(listener, watch.clone());
    drop(watch);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        result = serve.instrument(info_span!("hbone")) => result.map_err(Error::Serve),
        () = &mut shutdown => Ok(()),
        () = quit.notified() => Ok(()),
    };
    process::drain(trigger, config.drain_duration).await;
    result
}

/// Waits up to `deadline` for `f` to hold, polling every 10 ms (tests and readiness probes).
pub async fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lists_what_is_pending() {
        assert!(pending_lines(true, true).is_empty());
        assert_eq!(
            pending_lines(false, false),
            vec![
                "certificate: the waypoint's certificate not yet issued",
                "xds: first Address and L7 responses not yet applied"
            ]
        );
    }
}
