//! The access log (one event per request on target `access`, its fields) and `/config_dump`.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use support::*;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use weft_core::cert_manager;

type Events = Arc<Mutex<Vec<HashMap<String, String>>>>;

struct Capture(Events);

struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() == "access" {
            let mut fields = Fields(HashMap::new());
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_access_log_event_per_request_with_its_fields() {
    let events: Events = Arc::default();
    let subscriber = tracing_subscriber::registry().with(Capture(events.clone()));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", [10, 96, 0, 10], &[(80, 8080)], true)]);
    let app = mesh
        .http_endpoint("ep1", "echo", [127, 0, 0, 11], ok())
        .await;
    let mut client = mesh.h1("10.96.0.10:80").await;
    let (status, headers, _) = get(&mut client, "echo.app", "/path?q=1").await;
    assert_eq!(status, StatusCode::OK);
    let request_id = headers["x-seen-request-id"].to_str().unwrap().to_owned();
    assert!(waypoint::app::wait_until(T, || events.lock().unwrap().len() == 1).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    let want = [
        ("method", "GET"),
        ("path", "/path"),
        ("authority", "echo.app"),
        ("status", "200"),
        ("flags", "-"),
        ("src.principal", "spiffe://cluster.local/ns/app/sa/client"),
        ("route", "default"),
        ("protocol", "http"),
        ("request_id", request_id.as_str()),
    ];
    for (k, v) in want {
        assert_eq!(e.get(k).map(String::as_str), Some(v), "{k} in {e:?}");
    }
    assert_eq!(e["upstream"], app.addr.to_string());
    assert!(e["traceparent"].starts_with("00-"), "{e:?}");
    assert!(
        e.contains_key("duration_ms") && e.contains_key("bytes_sent"),
        "{e:?}"
    );

    // The config dump shows the identity, certificate, bound service with its endpoint.
    let signer = Arc::new(
        weft_core::ca::Signer::generate_root("cluster.local", weft_core::ca::Config::default())
            .unwrap(),
    );
    let certificates = cert_manager::Manager::new(
        Arc::new(cert_manager::LocalCa::new(
            signer,
            Duration::from_secs(3600),
        )),
        cert_manager::Config::default(),
    );
    let identity = id("app", "wp");
    tokio::time::timeout(T, certificates.fetch_certificate(&identity))
        .await
        .unwrap()
        .unwrap();
    let binding = waypoint::state::Binding {
        namespace: "app".into(),
        hostname: WAYPOINT_HOST.into(),
        own_ips: vec![],
    };
    let dump = waypoint::app::config_dump(
        &identity,
        &certificates,
        &mesh.state,
        &binding,
        &mesh.forwarder,
    );
    assert_eq!(dump["identity"], "spiffe://cluster.local/ns/app/sa/wp");
    assert_eq!(dump["certificate"]["state"], "available");
    assert!(dump["certificate"]["expires_unix"].as_u64().unwrap() > 0);
    let services = dump["services"].as_array().unwrap();
    assert_eq!(services.len(), 1, "{dump:#}");
    assert_eq!(services[0]["hostname"], "echo.app.svc.cluster.local");
    assert_eq!(services[0]["ports"][0]["port"], 80);
    assert_eq!(services[0]["ports"][0]["protocol"], "detect");
    assert_eq!(services[0]["endpoints"][0]["uid"], "ep1");
    assert_eq!(services[0]["endpoints"][0]["ejections"], 0);
    assert!(dump["policies"].as_array().unwrap().is_empty());
}
