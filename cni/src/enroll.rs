//! Which pods join the mesh (istio-ambient reference §1.1): a pod labelled
//! `istio.io/dataplane-mode=ambient`, or a pod in a namespace labelled so whose own label is not
//! `none`; never host-network pods, pods in excluded namespaces, sidecar-injected pods, or the
//! mesh's own pods (ztunnel, waypoints).

use std::collections::BTreeMap;

/// Label enrolling namespaces and pods.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Annotation the agent sets on enrolled pods (`enabled` or `pending`).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Annotation of sidecar-injected pods.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// The facts about a pod the decision needs.
#[derive(Debug, Clone)]
pub struct PodFacts<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Pod labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Pod annotations.
    pub annotations: &'a BTreeMap<String, String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Redirect the pod's traffic and hand it to ztunnel.
    Enroll,
    /// Leave the pod alone, and why.
    Skip(&'static str),
}

/// Decides whether a pod is in the mesh.
pub fn decide(
    pod: &PodFacts<'_>,
    namespace_labels: &BTreeMap<String, String>,
    excluded: &[String],
) -> Decision {
    if excluded.iter().any(|ns| ns == pod.namespace) {
        return Decision::Skip("namespace excluded");
    }
    if pod.host_network {
        return Decision::Skip("host network");
    }
    if pod.annotations.contains_key(SIDECAR_STATUS) {
        return Decision::Skip("sidecar injected");
    }
    if pod
        .labels
        .get("gateway.istio.io/managed")
        .map(String::as_str)
        == Some("istio.io-mesh-controller")
        || pod
            .labels
            .contains_key("gateway.networking.k8s.io/gateway-name")
    {
        return Decision::Skip("waypoint");
    }
    if pod.labels.get("app").map(String::as_str) == Some("ztunnel") {
        return Decision::Skip("ztunnel");
    }
    match (
        pod.labels.get(DATAPLANE_MODE).map(String::as_str),
        namespace_labels.get(DATAPLANE_MODE).map(String::as_str),
    ) {
        (Some("ambient"), _) => Decision::Enroll,
        (Some("none"), _) => Decision::Skip("pod opted out"),
        (_, Some("ambient")) => Decision::Enroll,
        _ => Decision::Skip("not ambient"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn enrollment_table() {
        let ambient = labels(&[(DATAPLANE_MODE, "ambient")]);
        let none = labels(&[(DATAPLANE_MODE, "none")]);
        let empty = BTreeMap::new();
        let excluded = vec!["kube-system".to_owned()];
        let sidecar = labels(&[(SIDECAR_STATUS, "{}")]);
        let waypoint = labels(&[("gateway.networking.k8s.io/gateway-name", "waypoint")]);
        let ztunnel = labels(&[("app", "ztunnel")]);
        let cases: Vec<(&str, PodFacts<'_>, &BTreeMap<String, String>, Decision)> = vec![
            (
                "pod label",
                PodFacts {
                    namespace: "a",
                    labels: &ambient,
                    annotations: &empty,
                    host_network: false,
                },
                &empty,
                Decision::Enroll,
            ),
            (
                "namespace label",
                PodFacts {
                    namespace: "a",
                    labels: &empty,
                    annotations: &empty,
                    host_network: false,
                },
                &ambient,
                Decision::Enroll,
            ),
            (
                "opted out in ambient ns",
                PodFacts {
                    namespace: "a",
                    labels: &none,
                    annotations: &empty,
                    host_network: false,
                },
                &ambient,
                Decision::Skip("pod opted out"),
            ),
            (
                "nothing",
                PodFacts {
                    namespace: "a",
                    labels: &empty,
                    annotations: &empty,
                    host_network: false,
                },
                &empty,
                Decision::Skip("not ambient"),
            ),
            (
                "excluded ns",
                PodFacts {
                    namespace: "kube-system",
                    labels: &ambient,
                    annotations: &empty,
                    host_network: false,
                },
                &ambient,
                Decision::Skip("namespace excluded"),
            ),
            (
                "host network",
                PodFacts {
                    namespace: "a",
                    labels: &ambient,
                    annotations: &empty,
                    host_network: true,
                },
                &ambient,
                Decision::Skip("host network"),
            ),
            (
                "sidecar",
                PodFacts {
                    namespace: "a",
                    labels: &empty,
                    annotations: &sidecar,
                    host_network: false,
                },
                &ambient,
                Decision::Skip("sidecar injected"),
            ),
            (
                "waypoint",
                PodFacts {
                    namespace: "a",
                    labels: &waypoint,
                    annotations: &empty,
                    host_network: false,
                },
                &ambient,
                Decision::Skip("waypoint"),
            ),
            (
                "ztunnel",
                PodFacts {
                    namespace: "a",
                    labels: &ztunnel,
                    annotations: &empty,
                    host_network: false,
                },
                &ambient,
                Decision::Skip("ztunnel"),
            ),
        ];
        for (name, pod, ns_labels, want) in cases {
            assert_eq!(decide(&pod, ns_labels, &excluded), want, "{name}");
        }
    }
}
