//! The demo's L7 half, on the cluster and pods of the L4 half: (e) a waypoint for namespace
//! `demo`, (f) an HTTPRoute canary split, (g) an L7 AuthorizationPolicy next to the L4 one,
//! (h) the waypoint removed. Every line reports what the clients, the waypoint's own
//! telemetry (`istio_requests_total`, its access log) and the ztunnels' counters showed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::cluster::Object;
use crate::waypoint;

use super::observe::{self, Observed, Reply};
use super::{CONVERGE, NS, Tour};

/// The waypoint's pod label (Gateway API's, set on the Deployment's pods).
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Requests for the weighted split (±6 points of 90/10 is > 4 standard deviations at 400).
pub(super) const SPLIT_REQUESTS: u32 = 400;

/// Requests with the canary header.
pub(super) const CANARY_REQUESTS: u32 = 50;

/// The waypoint's principal as the destination ztunnels count it.
fn waypoint_principal() -> String {
    format!(
        "spiffe://cluster.local/ns/{NS}/sa/{}",
        waypoint::DEFAULT_NAME
    )
}

fn principal(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{NS}/sa/{sa}")
}

/// Whether `principals` (as the ztunnels' metrics spell them, with or without `spiffe://`)
/// hold `principal`.
fn holds_principal(principals: &BTreeSet<&str>, principal: &str) -> bool {
    let bare = |p: &str| p.trim_start_matches("spiffe://").to_owned();
    principals.iter().any(|p| bare(p) == bare(principal))
}

/// The UIDs of the app pods of `demo` (not the waypoint's, which come and go with it).
pub(super) fn app_pod_uids(tour: &Tour<'_>) -> Result<BTreeSet<String>> {
    Ok(tour
        .cluster
        .pods(Some(NS))?
        .iter()
        .filter(|p| p.0["metadata"]["labels"][GATEWAY_NAME_LABEL].is_null())
        .filter_map(|p| p.uid().map(str::to_owned))
        .collect())
}

/// The `version` label of each pod of `demo`, by pod name.
fn versions(tour: &Tour<'_>) -> Result<BTreeMap<String, String>> {
    Ok(tour
        .cluster
        .pods(Some(NS))?
        .iter()
        .filter_map(|p| {
            let version = p.0["metadata"]["labels"]["version"].as_str()?;
            Some((p.name().to_owned(), version.to_owned()))
        })
        .collect())
}

/// How many of `replies` each version answered.
fn shares(replies: &[Reply], versions: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut shares = BTreeMap::new();
    for reply in replies.iter().filter(|r| r.status == 200) {
        let version = reply
            .pod
            .as_ref()
            .and_then(|p| versions.get(p))
            .map_or("?", String::as_str);
        *shares.entry(version.to_owned()).or_default() += 1;
    }
    shares
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Steps (e)–(h). `vip` is Service echo's cluster IP, `web_vip` Service web's.
pub(super) fn run(tour: &mut Tour<'_>, vip: &str, web_vip: &str) -> Result<()> {
    let uids_before = app_pod_uids(tour)?;
    let waypoint_pod = step_e(tour, vip, web_vip)?;
    step_f(tour, vip, &waypoint_pod)?;
    step_g(tour, vip, &waypoint_pod)?;
    step_h(tour, vip)?;
    let uids_after = app_pod_uids(tour)?;
    if uids_before == uids_after {
        tour.say("    through (e)–(h) every app pod kept running (same pod UIDs)")?;
    } else {
        tour.unexpected += 1;
        tour.say("    UNEXPECTED: app pods were replaced between (e) and (h)")?;
    }
    Ok(())
}

/// (e) the waypoint: applied, programmed, and carrying frontend's requests.
fn step_e(tour: &mut Tour<'_>, vip: &str, web_vip: &str) -> Result<Object> {
    tour.say(
        "\n(e) `weft waypoint apply -n demo --enroll-namespace --wait` — L7 for namespace demo, \
         no pod restarted.",
    )?;
    let options = waypoint::ApplyOptions {
        namespace: NS.to_owned(),
        name: waypoint::DEFAULT_NAME.to_owned(),
        traffic: None,
        enroll_namespace: true,
        overwrite: false,
    };
    waypoint::apply(tour.cluster.objects()?, &options)?;
    waypoint::wait_programmed(
        tour.cluster.objects()?,
        NS,
        waypoint::DEFAULT_NAME,
        Duration::from_secs(60),
        Duration::from_millis(200),
    )?;
    let pod = tour
        .cluster
        .wait_ready(
            NS,
            &[(GATEWAY_NAME_LABEL, waypoint::DEFAULT_NAME)],
            1,
            Duration::from_secs(60),
        )?
        .remove(0);
    tour.say(&format!(
        "    waypoint demo/{} Programmed: pod {} on {}; namespace demo labelled \
         istio.io/use-waypoint={}",
        waypoint::DEFAULT_NAME,
        pod.name(),
        pod.0["spec"]["nodeName"].as_str().unwrap_or("-"),
        waypoint::DEFAULT_NAME
    ))?;

    // frontend → echo: counted by the waypoint with frontend's identity, and by the servers'
    // ztunnels as mTLS from the waypoint's identity.
    let url = format!("http://{vip}/hello");
    let frontend = principal("frontend");
    let echo_service = format!("echo.{NS}.svc.cluster.local");
    let deadline = Instant::now() + CONVERGE;
    let (o, counted) = loop {
        let before = observe::waypoint_counts(tour.cluster, &pod)?;
        let o = observe::observe(tour.cluster, NS, "frontend", &url)?;
        let counted = observe::grown(&before, &observe::waypoint_counts(tour.cluster, &pod)?);
        let through = counted
            .get(&(frontend.clone(), echo_service.clone(), "200".to_owned()))
            .copied()
            .unwrap_or(0);
        let done = o.all_answered()
            && through as usize >= o.sent
            && holds_principal(&o.mtls_principals("-"), &waypoint_principal());
        if done || Instant::now() > deadline {
            break (o, counted);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let through = counted
        .get(&(frontend.clone(), echo_service.clone(), "200".to_owned()))
        .copied()
        .unwrap_or(0);
    let ok = o.all_answered()
        && through as usize >= o.sent
        && holds_principal(&o.mtls_principals("-"), &waypoint_principal());
    let line = format!(
        "demo/frontend → echo.demo: {}/{} answered by {}; the waypoint counted {through} \
         (istio_requests_total{{reporter=\"waypoint\", source_principal=\"{frontend}\", \
         destination_service=\"{echo_service}\", response_code=\"200\"}}); the servers' \
         ztunnels saw mTLS from {}",
        o.answered,
        o.sent,
        o.servers.iter().cloned().collect::<Vec<_>>().join(", "),
        o.mtls_principals("-")
            .into_iter()
            .collect::<Vec<_>>()
            .join(", "),
    );
    tour.report(ok, &line, "through the waypoint with frontend's identity")?;

    // An app nobody here wrote: Debian's curl → nginx, through the same path.
    let web_service = format!("web.{NS}.svc.cluster.local");
    let before = observe::waypoint_counts(tour.cluster, &pod)?;
    let (status, title) = curl(tour, "frontend", &format!("http://{web_vip}/"))?;
    std::thread::sleep(Duration::from_millis(200));
    let counted = observe::grown(&before, &observe::waypoint_counts(tour.cluster, &pod)?);
    let through = counted
        .get(&(frontend.clone(), web_service.clone(), "200".to_owned()))
        .copied()
        .unwrap_or(0);
    let line = format!(
        "demo/frontend → web.demo (nginx) with `curl -s http://{web_vip}/`: HTTP {status}, \
         \"{title}\"; the waypoint counted {through} request(s) to {web_service} with \
         response_code=\"200\", source_principal=\"{frontend}\""
    );
    tour.report(
        status == 200 && title.contains("nginx") && through >= 1,
        &line,
        "nginx answered through the waypoint",
    )?;
    Ok(pod)
}

/// Runs Debian's curl in `pod`: the status and the page's `<title>`.
fn curl(tour: &Tour<'_>, pod: &str, url: &str) -> Result<(u16, String)> {
    let out = tour.cluster.exec(
        NS,
        pod,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            url,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let title = body
        .split_once("<title>")
        .and_then(|(_, rest)| rest.split_once("</title>"))
        .map_or("", |(title, _)| title);
    Ok((code.trim().parse().unwrap_or(0), title.to_owned()))
}

/// (f) the canary route: header → v2, the rest 90/10.
fn step_f(tour: &mut Tour<'_>, vip: &str, _waypoint: &Object) -> Result<()> {
    tour.say(
        "\n(f) `kubectl apply -f examples/demo/30-canary-route.yaml`: an HTTPRoute on \
         Service echo — `x-canary: yes` → echo-v2, the rest 90/10 echo-v1/echo-v2.",
    )?;
    let route = tour.manifest("30-canary-route.yaml")?;
    tour.cluster.apply_yaml(&route)?;
    let versions = versions(tour)?;
    let url = format!("http://{vip}/split");
    // Wait for the route: every canary request on v2.
    let deadline = Instant::now() + CONVERGE;
    let canary = loop {
        let replies = observe::echo_requests(
            tour.cluster,
            NS,
            "frontend",
            &url,
            CANARY_REQUESTS,
            &["-H", "x-canary: yes"],
        )?;
        let shares = shares(&replies, &versions);
        let done = replies.len() == CANARY_REQUESTS as usize
            && shares.get("v2").copied() == Some(replies.len());
        if done || Instant::now() > deadline {
            break (replies.len(), shares);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let (sent, canary_shares) = canary;
    let v2 = canary_shares.get("v2").copied().unwrap_or(0);
    tour.report(
        sent > 0 && v2 == sent,
        &format!(
            "demo/frontend → echo.demo with `x-canary: yes`: {v2}/{sent} answered by echo-v2 \
             ({:.0} %)",
            percent(v2, sent)
        ),
        "every canary request on v2",
    )?;
    let replies = observe::echo_requests(tour.cluster, NS, "frontend", &url, SPLIT_REQUESTS, &[])?;
    let shares = shares(&replies, &versions);
    let (v1, v2) = (
        shares.get("v1").copied().unwrap_or(0),
        shares.get("v2").copied().unwrap_or(0),
    );
    let total = replies.len();
    let (p1, p2) = (percent(v1, total), percent(v2, total));
    tour.report(
        v1 + v2 == total && (p1 - 90.0).abs() <= 6.0 && (p2 - 10.0).abs() <= 6.0,
        &format!(
            "demo/frontend → echo.demo, {total} requests without the header: echo-v1 {v1} \
             ({p1:.1} %), echo-v2 {v2} ({p2:.1} %)"
        ),
        "90/10 within ±6 points",
    )?;
    Ok(())
}

/// The waypoint's most recent access-log line for a 403 to `principal`: its `details` field.
fn denial_details(tour: &Tour<'_>, waypoint: &Object, principal: &str) -> Option<String> {
    let log = tour.cluster.logs(NS, waypoint.name(), None).ok()?;
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("status=403") && l.contains(principal))?;
    let details = line.split_once("details=")?.1;
    let end = details.find(" request_id=").unwrap_or(details.len());
    Some(details[..end].trim_matches('"').to_owned())
}

/// (g) L7 policy at the waypoint, the L4 policy at the ztunnels, together.
fn step_g(tour: &mut Tour<'_>, vip: &str, waypoint: &Object) -> Result<()> {
    tour.say(
        "\n(g) `kubectl apply -f examples/demo/40-l7-policy.yaml -f \
         examples/demo/10-allow-frontend.yaml`: at the waypoint only frontend may GET /api/*; \
         at the ztunnels the L4 rule of (c) again.",
    )?;
    tour.cluster
        .apply_yaml(&tour.manifest("40-l7-policy.yaml")?)?;
    tour.cluster
        .apply_yaml(&tour.manifest("10-allow-frontend.yaml")?)?;
    let api = format!("http://{vip}/api/items");
    let statuses = |replies: &[Reply]| -> Vec<u64> { replies.iter().map(|r| r.status).collect() };
    // Wait until batch is refused at L7 (the policy has reached the waypoint).
    let deadline = Instant::now() + CONVERGE;
    let batch = loop {
        let replies = observe::echo_requests(tour.cluster, NS, "batch", &api, 4, &[])?;
        if replies.len() == 4 && replies.iter().all(|r| r.status == 403)
            || Instant::now() > deadline
        {
            break replies;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    std::thread::sleep(Duration::from_millis(300)); // the access log is flushed every 100 ms
    let details = denial_details(tour, waypoint, &principal("batch"))
        .unwrap_or_else(|| "no access-log line found".to_owned());
    let body = batch
        .first()
        .and_then(|r| r.body.clone())
        .unwrap_or_default();
    tour.report(
        batch.len() == 4
            && batch.iter().all(|r| r.status == 403)
            && details.contains("echo-api-frontend-only"),
        &format!(
            "demo/batch → GET echo.demo/api/items: {:?} \"{body}\"; the waypoint's access log: \
             {details}",
            statuses(&batch)
        ),
        "403 from the waypoint, naming the policy",
    )?;
    let frontend = observe::echo_requests(tour.cluster, NS, "frontend", &api, 4, &[])?;
    tour.report(
        frontend.len() == 4 && frontend.iter().all(|r| r.status == 200),
        &format!(
            "demo/frontend → GET echo.demo/api/items: {:?}",
            statuses(&frontend)
        ),
        "200",
    )?;
    let admin = observe::echo_requests(
        tour.cluster,
        NS,
        "frontend",
        &format!("http://{vip}/admin"),
        2,
        &[],
    )?;
    tour.report(
        admin.len() == 2 && admin.iter().all(|r| r.status == 403),
        &format!(
            "demo/frontend → GET echo.demo/admin: {:?} (only /api/* is allowed)",
            statuses(&admin)
        ),
        "403",
    )?;
    // A connection that does not cross the waypoint (a pod dialled directly): the server's
    // ztunnel enforces the L4 rule.
    let echo_pod = tour
        .cluster
        .pods(Some(NS))?
        .into_iter()
        .find(|p| p.0["metadata"]["labels"]["version"] == "v1")
        .context("an echo-v1 pod")?;
    let ip = echo_pod.0["status"]["podIP"]
        .as_str()
        .unwrap_or("-")
        .to_owned();
    let direct = format!("http://{ip}:8080/");
    tour.request_to(
        NS,
        "batch",
        &direct,
        &format!("pod {} directly", echo_pod.name()),
        "refused by the server's ztunnel",
        Observed::none_answered,
    )?;
    tour.request_to(
        NS,
        "frontend",
        &direct,
        &format!("pod {} directly", echo_pod.name()),
        "answered over mTLS",
        Observed::all_answered,
    )?;
    Ok(())
}

/// (h) the waypoint removed: back to L4 only.
fn step_h(tour: &mut Tour<'_>, vip: &str) -> Result<()> {
    tour.say("\n(h) `weft waypoint delete -n demo waypoint` — back to L4 only, no pod restarted.")?;
    waypoint::delete(
        tour.cluster.objects()?,
        NS,
        &waypoint::Selection::Names(vec![waypoint::DEFAULT_NAME.to_owned()]),
    )?;
    let url = format!("http://{vip}/api/items");
    let frontend = principal("frontend");
    tour.request_to(
        NS,
        "frontend",
        &url,
        "echo.demo",
        "answered over mTLS with frontend's own identity (no waypoint)",
        |o| o.all_answered() && holds_principal(&o.mtls_principals("-"), &frontend),
    )?;
    tour.request_to(
        NS,
        "batch",
        &url,
        "echo.demo",
        "refused at L4 by the server's ztunnel (no HTTP 403 any more)",
        Observed::none_answered,
    )?;
    let left = tour
        .cluster
        .pods(Some(NS))?
        .iter()
        .filter(|p| !p.0["metadata"]["labels"][GATEWAY_NAME_LABEL].is_null())
        .count();
    tour.report(
        left == 0,
        &format!("waypoint pods left in demo: {left}"),
        "none",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_count_answers_by_version() {
        let versions: BTreeMap<String, String> = [("a", "v1"), ("b", "v2")]
            .map(|(p, v)| (p.to_owned(), v.to_owned()))
            .into();
        let reply = |status, pod: &str| Reply {
            status,
            pod: Some(pod.to_owned()),
            body: None,
        };
        let replies = [
            reply(200, "a"),
            reply(200, "a"),
            reply(200, "b"),
            reply(503, "b"),
        ];
        let shares = shares(&replies, &versions);
        assert_eq!(shares.get("v1"), Some(&2));
        assert_eq!(shares.get("v2"), Some(&1));
        assert_eq!(percent(1, 4), 25.0);
        assert_eq!(percent(1, 0), 0.0);
    }
}
