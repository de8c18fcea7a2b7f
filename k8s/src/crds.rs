//! Istio's `security.istio.io/v1` custom resources, as Weft reads them: `AuthorizationPolicy`
//! and `PeerAuthentication` (field names and defaults follow Istio's published CRD schema).
//! Unknown fields are ignored so newer Istio manifests still load.

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// `spec.selector`: the workloads a policy applies to, by labels.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels every selected pod must carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `spec.targetRef(s)`: the Gateway API-style object a policy is attached to (waypoint-enforced).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    /// API group (`gateway.networking.k8s.io` for a Gateway, `""` for a Service).
    #[serde(default)]
    pub group: String,
    /// Kind (`Gateway`, `Service`, `ServiceEntry`, `GatewayClass`).
    pub kind: String,
    /// Name.
    pub name: String,
    /// Namespace (defaults to the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `AuthorizationPolicy.spec.action`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow matching requests (the default).
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Audit matching requests (not enforced by ztunnel).
    Audit,
    /// Delegate to an extension provider (not enforced by ztunnel).
    Custom,
}

/// `security.istio.io/v1` `AuthorizationPolicy`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to; none = the whole namespace (or mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Single attachment target (deprecated form of `targetRefs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Attachment targets (Gateway, Service, …): such policies are enforced by waypoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// What to do with matching requests.
    #[serde(default)]
    pub action: Action,
    /// Extension provider for `CUSTOM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
    /// Rules; a request matches the policy if it matches any rule. No rules: matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One rule: matches when every present part (`from`, `to`, `when`) matches.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Sources; any may match. Empty: any source.
    #[serde(default)]
    pub from: Vec<From>,
    /// Operations; any may match. Empty: any operation.
    #[serde(default)]
    pub to: Vec<To>,
    /// Extra conditions; all must match.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `rules[].from[]`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct From {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// `rules[].from[].source`: every present field must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities without `spiffe://` (`*`, prefix `x*`, suffix `*x`).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Negated `principals`.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Request (JWT) principals: L7.
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Negated `requestPrincipals`: L7.
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces (from the peer identity).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Negated `namespaces`.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer IPs or CIDRs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Negated `ipBlocks`.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs (X-Forwarded-For): L7.
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Negated `remoteIpBlocks`: L7.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    /// Peer service accounts as `namespace/name`.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Negated `serviceAccounts`.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
}

/// `rules[].to[]`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct To {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// `rules[].to[].operation`: every present field must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Request hosts: L7.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Negated `hosts`: L7.
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports (strings holding numbers).
    #[serde(default)]
    pub ports: Vec<String>,
    /// Negated `ports`.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// HTTP methods: L7.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Negated `methods`: L7.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// HTTP paths: L7.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Negated `paths`: L7.
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`: an attribute condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Attribute name, e.g. `source.ip`, `request.headers[x]`.
    pub key: String,
    /// Accepted values.
    #[serde(default)]
    pub values: Vec<String>,
    /// Rejected values.
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `PeerAuthentication` mTLS mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope.
    #[default]
    Unset,
    /// Plaintext only (ignored by ambient: HBONE is always mTLS).
    Disable,
    /// Accept mTLS and plaintext.
    Permissive,
    /// Accept mTLS only.
    Strict,
}

/// `spec.mtls` / `spec.portLevelMtls[port]`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Mtls {
    /// The mode.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// `security.istio.io/v1` `PeerAuthentication`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; none = namespace-wide (mesh-wide in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode for all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Per-port modes (workload-selector policies only), keyed by target port number (a string
    /// in YAML/JSON).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_manifests() {
        let ap: AuthorizationPolicy = serde_yaml::from_str(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: a}\n\
             spec:\n  action: DENY\n  selector: {matchLabels: {app: x}}\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/b/sa/c\"]}}]\n    to: [{operation: {ports: [\"8080\"], methods: [GET]}}]\n    when: [{key: source.ip, values: [10.0.0.0/8]}]\n  futureField: 1\n",
        )
        .unwrap();
        assert_eq!(ap.spec.action, Action::Deny);
        assert_eq!(ap.spec.rules[0].to[0].operation.methods, ["GET"]);
        assert_eq!(ap.spec.rules[0].when[0].key, "source.ip");

        let pa: PeerAuthentication = serde_yaml::from_str(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: a}\n\
             spec: {mtls: {mode: STRICT}, portLevelMtls: {\"8080\": {mode: PERMISSIVE}}}\n",
        )
        .unwrap();
        assert_eq!(pa.spec.mtls.unwrap().mode, MtlsMode::Strict);
        assert_eq!(pa.spec.port_level_mtls["8080"].mode, MtlsMode::Permissive);

        let bad = serde_yaml::from_str::<AuthorizationPolicy>(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: MAYBE}\n",
        );
        assert!(bad.is_err());
    }
}
