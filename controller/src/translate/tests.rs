//! Translation tables from fixture manifests.

use std::collections::BTreeMap;

use weft_k8s::{Index, Resource, manifest};
use weft_proto::istio::workload::{
    Service, TunnelProtocol, Workload, WorkloadStatus, WorkloadType, address, gateway_address,
};

use super::*;

fn snapshot(yaml: &str) -> weft_k8s::Snapshot {
    let index = Index::new();
    let objects = manifest::parse_documents(yaml, "fixture.yaml").expect("fixture parses");
    let resources: Vec<Resource> = objects
        .iter()
        .filter_map(|o| Resource::from_object(o).expect("fixture objects are valid"))
        .collect();
    index.batch(resources, &[]);
    index.snapshot()
}

fn workload<'a>(out: &'a Output, ns: &str, name: &str) -> &'a Workload {
    let uid = format!("Kubernetes//Pod/{ns}/{name}");
    match out.addresses.get(&uid).map(|r| r.address.r#type.as_ref()) {
        Some(Some(address::Type::Workload(w))) => w,
        other => panic!("no workload {uid}: {other:?}"),
    }
}

fn service<'a>(out: &'a Output, ns: &str, name: &str) -> &'a Service {
    let key = format!("{ns}/{name}.{ns}.svc.cluster.local");
    match out.addresses.get(&key).map(|r| r.address.r#type.as_ref()) {
        Some(Some(address::Type::Service(s))) => s,
        other => panic!("no service {key}: {other:?}"),
    }
}

fn waypoint_host(addr: &Option<weft_proto::istio::workload::GatewayAddress>) -> Option<String> {
    match addr.as_ref()?.destination.as_ref()? {
        gateway_address::Destination::Hostname(h) => {
            Some(format!("{}/{}", h.namespace, h.hostname))
        }
        gateway_address::Destination::Address(_) => Some("address".into()),
    }
}

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-1
  namespace: a
  labels: {app: echo, version: v2}
  annotations: {ambient.istio.io/redirection: enabled}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: echo-5d8f7c9b6c, uid: u1, controller: true}]
spec:
  nodeName: node-1
  serviceAccountName: echo
  containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]
status:
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: a, labels: {app: other}}
spec: {nodeName: node-2, containers: [{name: c, image: x}]}
status: {podIP: 10.244.2.7, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: a}
spec: {containers: [{name: c, image: x}]}
status: {phase: Succeeded, podIP: 10.244.2.8}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: a}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: tcp-raw, port: 9000, targetPort: 9001}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: a}
spec: {clusterIP: None, selector: {app: echo}, ports: [{port: 8080}]}
"#;

#[test]
fn pods_become_workloads() {
    let pod_template_hash = "pod-template-hash: 5d8f7c9b6c";
    let yaml = BASE.replace(
        "{app: echo, version: v2}",
        &format!("{{app: echo, version: v2, {pod_template_hash}}}"),
    );
    let out = translate(&snapshot(&yaml), &Settings::default());
    assert!(out.problems.is_empty(), "{:?}", out.problems);

    let w = workload(&out, "a", "echo-1");
    assert_eq!(
        w.tunnel_protocol,
        TunnelProtocol::Hbone as i32,
        "redirection annotation → HBONE"
    );
    assert_eq!(w.addresses, vec![vec![10, 244, 1, 5]]);
    assert_eq!(w.node, "node-1");
    assert_eq!(w.service_account, "echo");
    assert_eq!(w.trust_domain, "", "default trust domain is elided");
    assert_eq!(w.status, WorkloadStatus::Healthy as i32);
    assert_eq!(w.workload_type, WorkloadType::Deployment as i32);
    assert_eq!(w.workload_name, "echo", "ReplicaSet hash stripped");
    assert_eq!(
        (w.canonical_name.as_str(), w.canonical_revision.as_str()),
        ("echo", "v2")
    );
    assert_eq!(w.cluster_id, "Kubernetes");
    let resource = &out.addresses["Kubernetes//Pod/a/echo-1"];
    assert_eq!(resource.aliases, vec!["/10.244.1.5".to_owned()]);

    // Services: named targetPort resolved per workload, headless included.
    let ports = &w.services["a/echo.a.svc.cluster.local"].ports;
    assert_eq!(
        ports
            .iter()
            .map(|p| (p.service_port, p.target_port))
            .collect::<Vec<_>>(),
        vec![(80, 8080), (9000, 9001)]
    );
    assert!(w.services.contains_key("a/headless.a.svc.cluster.local"));

    let plain = workload(&out, "a", "plain");
    assert_eq!(
        plain.tunnel_protocol,
        TunnelProtocol::None as i32,
        "no annotation → NONE"
    );
    assert_eq!(plain.status, WorkloadStatus::Unhealthy as i32);
    assert_eq!(plain.service_account, "");
    assert!(plain.services.is_empty());
    assert_eq!(plain.workload_type, WorkloadType::Pod as i32);
    assert!(
        !out.addresses.contains_key("Kubernetes//Pod/a/done"),
        "terminal pods are skipped"
    );
}

#[test]
fn services_become_services() {
    let out = translate(&snapshot(BASE), &Settings::default());
    let svc = service(&out, "a", "echo");
    assert_eq!(svc.hostname, "echo.a.svc.cluster.local");
    assert_eq!(svc.addresses.len(), 1);
    assert_eq!(svc.addresses[0].address, vec![10, 96, 0, 10]);
    assert_eq!(
        svc.ports
            .iter()
            .map(|p| (p.service_port, p.target_port))
            .collect::<Vec<_>>(),
        vec![(80, 0), (9000, 9001)],
        "named target port is 0 (resolved per workload)"
    );
    assert_eq!(
        svc.ports[0].app_protocol,
        weft_proto::istio::workload::AppProtocol::Http11 as i32
    );
    assert_eq!(
        svc.ports[1].app_protocol,
        weft_proto::istio::workload::AppProtocol::Tcp as i32
    );
    assert_eq!(
        out.addresses["a/echo.a.svc.cluster.local"].aliases,
        vec!["/10.96.0.10".to_owned()]
    );
    let headless = service(&out, "a", "headless");
    assert!(headless.addresses.is_empty(), "headless → no VIP");
}

const WAYPOINT: &str = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: a}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

#[test]
fn waypoint_binding_rules() {
    // Namespace label binds services (default waypoint-for: service), not workloads.
    let yaml = format!("{BASE}{WAYPOINT}").replace(
        "labels: {istio.io/dataplane-mode: ambient}",
        "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}",
    );
    let out = translate(&snapshot(&yaml), &Settings::default());
    assert_eq!(
        waypoint_host(&service(&out, "a", "echo").waypoint).as_deref(),
        Some("a/waypoint.a.svc.cluster.local")
    );
    assert_eq!(
        service(&out, "a", "echo")
            .waypoint
            .as_ref()
            .unwrap()
            .hbone_mtls_port,
        15008
    );
    assert_eq!(
        workload(&out, "a", "echo-1").waypoint,
        None,
        "service waypoint ignores pods"
    );
    // Workloads behind the service's waypoint reference the implicit allow policy.
    let allow = "a/istio_allow_waypoint_a_waypoint".to_owned();
    assert!(
        workload(&out, "a", "echo-1")
            .authorization_policies
            .contains(&allow)
    );
    assert!(out.authorizations.contains_key(&allow));
    assert!(
        !workload(&out, "a", "plain")
            .authorization_policies
            .contains(&allow)
    );

    // `none` on the service opts out.
    let opted_out = yaml.replace(
        "metadata: {name: echo, namespace: a}",
        "metadata: {name: echo, namespace: a, labels: {istio.io/use-waypoint: none}}",
    );
    let out = translate(&snapshot(&opted_out), &Settings::default());
    assert_eq!(service(&out, "a", "echo").waypoint, None);
    assert!(
        service(&out, "a", "headless").waypoint.is_some(),
        "others keep the namespace binding"
    );

    // A workload-only waypoint: pods bound, services not (waypoint-for mismatch).
    let workload_wp = yaml.replace(
        "metadata: {name: waypoint, namespace: a}",
        "metadata: {name: waypoint, namespace: a, labels: {istio.io/waypoint-for: workload}}",
    );
    let out = translate(&snapshot(&workload_wp), &Settings::default());
    assert_eq!(service(&out, "a", "echo").waypoint, None);
    assert!(workload(&out, "a", "echo-1").waypoint.is_some());

    // Naming a waypoint that does not exist: no waypoint, no fallback to the namespace's.
    let missing = yaml.replace(
        "metadata: {name: echo, namespace: a}",
        "metadata: {name: echo, namespace: a, labels: {istio.io/use-waypoint: nope}}",
    );
    let out = translate(&snapshot(&missing), &Settings::default());
    assert_eq!(service(&out, "a", "echo").waypoint, None);

    // Cross-namespace binding needs the waypoint to admit the namespace.
    let cross = format!(
        "{}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: wp}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: shared, namespace: wp}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {{namespaces: {{from: All}}}}}}]\n",
        BASE.replace(
            "metadata: {name: echo, namespace: a}",
            "metadata: {name: echo, namespace: a, labels: {istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: wp}}",
        )
    );
    let out = translate(&snapshot(&cross), &Settings::default());
    assert_eq!(
        waypoint_host(&service(&out, "a", "echo").waypoint).as_deref(),
        Some("wp/shared.wp.svc.cluster.local")
    );
    let same_only = cross.replace(", allowedRoutes: {namespaces: {from: All}}", "");
    let out = translate(&snapshot(&same_only), &Settings::default());
    assert_eq!(
        service(&out, "a", "echo").waypoint,
        None,
        "attachment denied"
    );
}

#[test]
fn selector_policies_and_strict_mtls_are_referenced() {
    let yaml = format!(
        "{BASE}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-echo, namespace: a}}\nspec: {{selector: {{matchLabels: {{app: echo}}}}, rules: [{{}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ns-wide, namespace: a}}\nspec: {{action: DENY, rules: [{{from: [{{source: {{namespaces: [evil]}}}}]}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: istio-system}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
    );
    let out = translate(&snapshot(&yaml), &Settings::default());
    let echo = &workload(&out, "a", "echo-1").authorization_policies;
    assert!(echo.contains(&"a/only-echo".to_owned()), "{echo:?}");
    assert!(
        !echo.contains(&"a/ns-wide".to_owned()),
        "namespace policies are not listed per workload"
    );
    assert!(
        echo.contains(&"istio-system/istio_converted_static_strict".to_owned()),
        "{echo:?}"
    );
    let plain = &workload(&out, "a", "plain").authorization_policies;
    assert!(!plain.contains(&"a/only-echo".to_owned()));
    assert!(out.authorizations.contains_key("a/ns-wide"));
    assert!(
        out.authorizations
            .contains_key("istio-system/istio_converted_static_strict")
    );
}

#[test]
fn a_bad_object_is_reported_and_the_rest_translates() {
    let yaml = BASE.replace("podIP: 10.244.2.7", "podIP: 10.244.2.x");
    let out = translate(&snapshot(&yaml), &Settings::default());
    assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
    assert!(out.problems[0].contains("Pod a/plain") && out.problems[0].contains("status.podIPs"));
    workload(&out, "a", "echo-1");
    service(&out, "a", "echo");
    let _ = BTreeMap::<String, String>::new();
}
