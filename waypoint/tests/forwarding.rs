//! The forwarder against real HBONE endpoints on loopback, driven with explicit plans (what the
//! engine's `Forward` turns into): load balancing, outlier ejection, retries and timeouts.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use waypoint::body::RequestBody;
use waypoint::engine::{BackendTarget, LoadBalancer, OutlierDetection, RetryPolicy};
use waypoint::error::Error;
use waypoint::upstream::{Destination, Plan};

const CLIENT: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)),
    0,
);

fn plan(lb: LoadBalancer) -> Plan {
    Plan {
        destination: Destination::Service(BackendTarget {
            hostname: Arc::from("echo.app.svc.cluster.local"),
            port: 80,
        }),
        request_timeout: None,
        attempt_timeout: None,
        retry: None,
        load_balancer: lb,
        outlier_detection: None,
        http2: false,
    }
}

async fn send(mesh: &Mesh, plan: &Plan) -> Result<(StatusCode, String), Error> {
    let (parts, ()) = Request::get("/")
        .header("host", "echo.app")
        .body(())
        .unwrap()
        .into_parts();
    let body = RequestBody::Buffered {
        data: bytes::Bytes::new(),
        trailers: None,
    };
    let answer = tokio::time::timeout(T, mesh.forwarder.forward(plan, &parts, body, CLIENT))
        .await
        .expect("forward timed out")
        .map_err(|f| f.error)?;
    let status = answer.response.status();
    let served_by = answer
        .response
        .headers()
        .get("x-served-by")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let _ = answer.response.into_body().collect().await;
    Ok((status, served_by))
}

async fn three_endpoints(behaviours: [Behaviour; 3]) -> (Mesh, Vec<App>) {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", [10, 96, 0, 10], &[(80, 8080)], true)]);
    let mut apps = Vec::new();
    for (i, b) in behaviours.into_iter().enumerate() {
        apps.push(
            mesh.http_endpoint(&format!("ep{i}"), "echo", [127, 0, 0, 11 + i as u8], b)
                .await,
        );
    }
    (mesh, apps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let (mesh, apps) = three_endpoints([ok(), ok(), ok()]).await;
    let plan = plan(LoadBalancer::RoundRobin);
    let mut order = Vec::new();
    for _ in 0..9 {
        let (status, by) = send(&mesh, &plan).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        order.push(by);
    }
    for app in &apps {
        assert_eq!(app.count.load(Ordering::SeqCst), 3);
    }
    assert_eq!(order[0..3], order[3..6], "a fixed cycle: {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_the_busy_endpoint() {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", [10, 96, 0, 10], &[(80, 8080)], true)]);
    // ep0 answers its first requests slowly; ep1 always fast.
    let _slow = mesh
        .http_endpoint(
            "ep0",
            "echo",
            [127, 0, 0, 11],
            Arc::new(|_| (StatusCode::OK, Duration::from_millis(1500))),
        )
        .await;
    let fast = mesh
        .http_endpoint("ep1", "echo", [127, 0, 0, 12], ok())
        .await;
    let plan = plan(LoadBalancer::LeastRequest);
    let mesh = Arc::new(mesh);
    // Hold a request in flight on the slow endpoint: send until one lands there.
    let mut held = Vec::new();
    for _ in 0..20 {
        let (m, p) = (mesh.clone(), plan.clone());
        held.push(tokio::spawn(async move { send(&m, &p).await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        if _slow.count.load(Ordering::SeqCst) > 0 {
            break;
        }
    }
    assert!(
        _slow.count.load(Ordering::SeqCst) > 0,
        "no request reached ep0"
    );
    // While a request is in flight on ep0, new ones go to ep1 (two endpoints: the two random
    // choices are both, and the less loaded wins).
    let before = fast.count.load(Ordering::SeqCst);
    let mut slow_picks = 0;
    for _ in 0..10 {
        let (_, by) = send(&mesh, &plan).await.unwrap();
        if by == "ep0" {
            slow_picks += 1;
        }
    }
    assert_eq!(slow_picks, 0, "the busy endpoint got new requests");
    assert_eq!(fast.count.load(Ordering::SeqCst), before + 10);
    for h in held {
        let _ = tokio::time::timeout(T, h).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint_until_the_ejection_ends() {
    let (mesh, apps) = three_endpoints([
        Arc::new(|_| (StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)),
        ok(),
        ok(),
    ])
    .await;
    let mut plan = plan(LoadBalancer::RoundRobin);
    plan.outlier_detection = Some(OutlierDetection {
        consecutive_failures: 2,
        base_ejection: Duration::from_secs(1),
        max_ejection_percent: 50,
    });
    // Round robin: ep0 fails its 1st and 2nd request → ejected.
    for _ in 0..6 {
        send(&mesh, &plan).await.unwrap();
    }
    let failing = apps[0].count.load(Ordering::SeqCst);
    assert_eq!(failing, 2);
    let ejected = mesh
        .forwarder
        .balancer()
        .report("app/echo.app.svc.cluster.local");
    assert_eq!(ejected[0].1.ejections, 1, "{ejected:?}");
    for _ in 0..10 {
        let (status, by) = send(&mesh, &plan).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_ne!(by, "ep0", "an ejected endpoint gets no traffic");
    }
    assert_eq!(apps[0].count.load(Ordering::SeqCst), 2);
    // After the ejection it receives traffic again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        send(&mesh, &plan).await.unwrap();
    }
    assert!(
        apps[0].count.load(Ordering::SeqCst) > 2,
        "back after the ejection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_every_other_failure_into_success() {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", [10, 96, 0, 10], &[(80, 8080)], true)]);
    // One endpoint failing every other request (the retry cannot go elsewhere).
    let app = mesh
        .http_endpoint(
            "ep0",
            "echo",
            [127, 0, 0, 11],
            Arc::new(|n| {
                if n % 2 == 1 {
                    (StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)
                } else {
                    (StatusCode::OK, Duration::ZERO)
                }
            }),
        )
        .await;
    let mut plan = plan(LoadBalancer::RoundRobin);
    plan.retry = Some(RetryPolicy {
        attempts: 2,
        codes: vec![503],
        backoff: Duration::from_millis(5),
    });
    for _ in 0..5 {
        let (status, _) = send(&mesh, &plan).await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(app.count.load(Ordering::SeqCst), 10);
    // Without the retry policy, failures come through.
    plan.retry = None;
    let (status, _) = send(&mesh, &plan).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_go_to_another_endpoint_after_a_connect_failure() {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", [10, 96, 0, 10], &[(80, 8080)], true)]);
    // ep0 has no HBONE server (connect refused); ep1 works.
    mesh.apply(vec![workload(
        "ep0",
        "echo",
        [127, 0, 0, 11].into(),
        &[("echo", 80, 8080)],
        false,
    )]);
    let _app = mesh
        .http_endpoint("ep1", "echo", [127, 0, 0, 12], ok())
        .await;
    let mut plan = plan(LoadBalancer::RoundRobin);
    plan.retry = Some(RetryPolicy {
        attempts: 2,
        codes: vec![],
        backoff: Duration::from_millis(1),
    });
    for _ in 0..4 {
        let (status, by) = send(&mesh, &plan).await.unwrap();
        assert_eq!((status, by.as_str()), (StatusCode::OK, "ep1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_answers_504_at_the_deadline() {
    let mesh = Mesh::new().await;
    mesh.apply(vec![service("echo", [10, 96, 0, 10], &[(80, 8080)], true)]);
    let _app = mesh
        .http_endpoint(
            "ep0",
            "echo",
            [127, 0, 0, 11],
            Arc::new(|_| (StatusCode::OK, Duration::from_secs(5))),
        )
        .await;
    let mut plan = plan(LoadBalancer::RoundRobin);
    plan.request_timeout = Some(Duration::from_millis(300));
    let start = std::time::Instant::now();
    let err = send(&mesh, &plan).await.unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, Error::Timeout), "{err}");
    assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");

    // Per-attempt timeout, retried, still bounded by the whole-request deadline.
    plan.request_timeout = Some(Duration::from_millis(500));
    plan.attempt_timeout = Some(Duration::from_millis(100));
    plan.retry = Some(RetryPolicy {
        attempts: 10,
        codes: vec![],
        backoff: Duration::from_millis(1),
    });
    let start = std::time::Instant::now();
    let err = send(&mesh, &plan).await.unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err}");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}
