//! Kubernetes manifests: multi-document YAML into objects, validated against the `k8s-openapi`
//! types where they exist, with errors naming the file, the object and the field.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One Kubernetes object, kept as JSON so any kind can be stored and handed on.
#[derive(Debug, Clone, PartialEq)]
pub struct Object(pub Value);

/// What identifies an object: group, kind, namespace (none for cluster-scoped kinds), name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// API group (`""` for core, `apps`, `gateway.networking.k8s.io`, …).
    pub group: String,
    /// Kind, e.g. `Deployment`.
    pub kind: String,
    /// Namespace, `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

/// Where a manifest problem is.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    /// The file (or `-` for standard input).
    pub file: String,
    /// The object (`Kind ns/name`) or the document (`document 2`).
    pub object: String,
    /// The field path, when known (e.g. `spec.replicas`).
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.object)?;
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Kinds without a namespace.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "Node",
    "GatewayClass",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
];

// === impl Object ===

impl Object {
    /// `apiVersion`.
    pub fn api_version(&self) -> &str {
        self.0["apiVersion"].as_str().unwrap_or_default()
    }

    /// `kind`.
    pub fn kind(&self) -> &str {
        self.0["kind"].as_str().unwrap_or_default()
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.0["metadata"]["name"].as_str().unwrap_or_default()
    }

    /// `metadata.namespace`, `None` for cluster-scoped kinds.
    pub fn namespace(&self) -> Option<&str> {
        if CLUSTER_SCOPED.contains(&self.kind()) {
            None
        } else {
            Some(
                self.0["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default"),
            )
        }
    }

    /// `metadata.uid`.
    pub fn uid(&self) -> Option<&str> {
        self.0["metadata"]["uid"].as_str()
    }

    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        let group = match self.api_version().split_once('/') {
            Some((group, _)) => group.to_owned(),
            None => String::new(),
        };
        ObjectKey {
            group,
            kind: self.kind().to_owned(),
            namespace: self.namespace().map(str::to_owned),
            name: self.name().to_owned(),
        }
    }

    /// Deserializes into a typed object (e.g. `k8s_openapi::api::core::v1::Pod`).
    ///
    /// # Errors
    /// The field path and message of the first mismatch.
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(self.0.clone())
            .map_err(|e| (e.path().to_string(), e.inner().to_string()))
    }

    /// Builds an object from a typed value.
    ///
    /// # Panics
    /// Never for `k8s-openapi` types (they always serialize).
    pub fn from_typed<T: serde::Serialize>(value: &T) -> Self {
        Object(serde_json::to_value(value).unwrap_or(Value::Null))
    }
}

impl ObjectKey {
    /// A key for a core/namespaced object.
    pub fn new(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> Self {
        ObjectKey {
            group: group.to_owned(),
            kind: kind.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        }
    }

    /// `kind` plus group, lowercase: the store's directory name for the kind
    /// (`pod`, `deployment.apps`, `gateway.gateway.networking.k8s.io`).
    pub fn kind_dir(&self) -> String {
        kind_dir(&self.group, &self.kind)
    }
}

/// The store directory name of a kind (see [`ObjectKey::kind_dir`]).
pub fn kind_dir(group: &str, kind: &str) -> String {
    if group.is_empty() {
        kind.to_ascii_lowercase()
    } else {
        format!("{}.{group}", kind.to_ascii_lowercase())
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Reads manifests from a file, or every `*.yaml`/`*.yml`/`*.json` file of a directory (sorted,
/// not recursive).
///
/// # Errors
/// [`Error`] for unreadable files and for the first invalid document or object.
pub fn read_path(path: &Path) -> Result<Vec<Object>, Error> {
    let io_err = |file: &Path, e: std::io::Error| Error {
        file: file.display().to_string(),
        object: "file".into(),
        field: None,
        message: e.to_string(),
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| io_err(path, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| io_err(&file, e))?;
        objects.extend(parse(&text, &file.display().to_string())?);
    }
    Ok(objects)
}

/// Parses multi-document YAML (or JSON) text, expands `kind: List`, and validates each object
/// fully: identity fields, the typed schema of known kinds, and the local cluster's rules (e.g.
/// containers must name a host program). This is what `weft cluster apply` accepts.
///
/// # Errors
/// [`Error`] naming `file`, the object or document, and the field.
pub fn parse(text: &str, file: &str) -> Result<Vec<Object>, Error> {
    parse_with(text, file, true)
}

/// Parses like [`parse`] but checks only what every consumer needs (`apiVersion`, `kind`,
/// `metadata.name`, namespace syntax); typed checks are left to the consumer. Config sources use
/// it to read manifests written for a real cluster.
///
/// # Errors
/// [`Error`] naming `file`, the object or document, and the field.
pub fn parse_documents(text: &str, file: &str) -> Result<Vec<Object>, Error> {
    parse_with(text, file, false)
}

fn parse_with(text: &str, file: &str, strict: bool) -> Result<Vec<Object>, Error> {
    let validate = |object: &Object| {
        if strict {
            validate(object)
        } else {
            validate_identity(object)
        }
    };
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_name = format!("document {}", index + 1);
        let err = |field: Option<String>, message: String| Error {
            file: file.to_owned(),
            object: doc_name.clone(),
            field,
            message,
        };
        let yaml = serde_yaml::Value::deserialize(document).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            err(None, format!("invalid yaml{at}: {e}"))
        })?;
        if yaml.is_null() {
            continue;
        }
        let value =
            serde_json::to_value(&yaml).map_err(|e| err(None, format!("not an object: {e}")))?;
        if value["kind"] == "List" {
            let Some(items) = value["items"].as_array() else {
                return Err(err(
                    Some("items".into()),
                    "a List needs an items array".into(),
                ));
            };
            for (i, item) in items.iter().enumerate() {
                let object = Object(item.clone());
                validate(&object).map_err(|(field, message)| Error {
                    file: file.to_owned(),
                    object: format!("{doc_name} item {i}"),
                    field,
                    message,
                })?;
                objects.push(object);
            }
            continue;
        }
        let object = Object(value);
        validate(&object).map_err(|(field, message)| Error {
            file: file.to_owned(),
            object: if object.name().is_empty() {
                doc_name.clone()
            } else {
                object.key().to_string()
            },
            field,
            message,
        })?;
        objects.push(object);
    }
    Ok(objects)
}

type Invalid = (Option<String>, String);

fn typed<T: DeserializeOwned>(object: &Object) -> Result<T, Invalid> {
    object
        .typed()
        .map_err(|(path, message)| (Some(path), message))
}

/// Checks the fields that identify an object.
fn validate_identity(object: &Object) -> Result<(), Invalid> {
    if !object.0.is_object() {
        return Err((None, "a manifest must be a mapping".into()));
    }
    for (field, value) in [
        ("apiVersion", object.api_version()),
        ("kind", object.kind()),
    ] {
        if value.is_empty() {
            return Err((Some(field.into()), "required".into()));
        }
    }
    let name = object.name();
    if name.is_empty() {
        return Err((Some("metadata.name".into()), "required".into()));
    }
    if !is_dns_subdomain(name) {
        return Err((
            Some("metadata.name".into()),
            format!("{name:?} is not a lowercase DNS-1123 subdomain"),
        ));
    }
    if let Some(ns) = object.namespace()
        && !is_dns_label(ns)
    {
        return Err((
            Some("metadata.namespace".into()),
            format!("{ns:?} is not a lowercase DNS-1123 label"),
        ));
    }
    Ok(())
}

/// Checks one object: identity fields, then the typed schema of known kinds, then the rules the
/// local cluster needs (e.g. containers must name a host program).
fn validate(object: &Object) -> Result<(), Invalid> {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, discovery::v1 as discovery};

    validate_identity(object)?;
    match (object.api_version(), object.kind()) {
        ("v1", "Namespace") => typed::<core::Namespace>(object).map(drop),
        ("v1", "ServiceAccount") => typed::<core::ServiceAccount>(object).map(drop),
        ("v1", "ConfigMap") => typed::<core::ConfigMap>(object).map(drop),
        ("v1", "Node") => typed::<core::Node>(object).map(drop),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            typed::<discovery::EndpointSlice>(object).map(drop)
        }
        ("v1", "Pod") => {
            let pod: core::Pod = typed(object)?;
            let spec = pod.spec.ok_or((Some("spec".into()), "required".into()))?;
            check_containers(&spec, "spec")
        }
        ("apps/v1", "Deployment") => {
            let deployment: apps::Deployment = typed(object)?;
            let spec = deployment
                .spec
                .ok_or((Some("spec".into()), "required".into()))?;
            let labels = spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            let selector = spec.selector.match_labels.clone().unwrap_or_default();
            if selector.is_empty() {
                return Err((
                    Some("spec.selector.matchLabels".into()),
                    "required (matchExpressions are not supported)".into(),
                ));
            }
            for (k, v) in &selector {
                if labels.get(k) != Some(v) {
                    return Err((
                        Some("spec.template.metadata.labels".into()),
                        format!("selector {k}={v} does not match the template labels"),
                    ));
                }
            }
            if spec.replicas.is_some_and(|r| r < 0) {
                return Err((Some("spec.replicas".into()), "must not be negative".into()));
            }
            let pod_spec = spec
                .template
                .spec
                .ok_or((Some("spec.template.spec".into()), "required".into()))?;
            check_containers(&pod_spec, "spec.template.spec")
        }
        ("v1", "Service") => {
            let service: core::Service = typed(object)?;
            let spec = service
                .spec
                .ok_or((Some("spec".into()), "required".into()))?;
            let headless = spec.cluster_ip.as_deref() == Some("None");
            let external = spec.type_.as_deref() == Some("ExternalName");
            let ports = spec.ports.unwrap_or_default();
            if ports.is_empty() && !headless && !external {
                return Err((
                    Some("spec.ports".into()),
                    "required: a Service needs at least one port".into(),
                ));
            }
            for (i, port) in ports.iter().enumerate() {
                if !(1..=65535).contains(&port.port) {
                    return Err((
                        Some(format!("spec.ports[{i}].port")),
                        format!("{} is not a valid port", port.port),
                    ));
                }
                if ports.len() > 1 && port.name.as_deref().unwrap_or_default().is_empty() {
                    return Err((
                        Some(format!("spec.ports[{i}].name")),
                        "required when a Service has several ports".into(),
                    ));
                }
            }
            if let Some(ip) = spec
                .cluster_ip
                .as_deref()
                .filter(|ip| !ip.is_empty() && *ip != "None")
            {
                ip.parse::<std::net::IpAddr>().map_err(|_| {
                    (
                        Some("spec.clusterIP".into()),
                        format!("{ip:?} is not an IP address"),
                    )
                })?;
            }
            Ok(())
        }
        // Any other kind is stored as-is for later consumers (Gateway, HTTPRoute,
        // AuthorizationPolicy, PeerAuthentication, …): identity fields were checked above.
        _ => {
            if !object.0["metadata"].is_object() {
                return Err((Some("metadata".into()), "must be a mapping".into()));
            }
            Ok(())
        }
    }
}

fn check_containers(spec: &k8s_openapi::api::core::v1::PodSpec, at: &str) -> Result<(), Invalid> {
    if spec.containers.is_empty() {
        return Err((
            Some(format!("{at}.containers")),
            "at least one container is required".into(),
        ));
    }
    for (i, container) in spec.containers.iter().enumerate() {
        if !is_dns_label(&container.name) {
            return Err((
                Some(format!("{at}.containers[{i}].name")),
                format!("{:?} is not a lowercase DNS-1123 label", container.name),
            ));
        }
        if container.command.as_ref().is_none_or(Vec::is_empty) {
            return Err((
                Some(format!("{at}.containers[{i}].command")),
                "required in the local cluster: images are not pulled, so the command must name a host program".into(),
            ));
        }
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_document_yaml_and_lists() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\n\
                    apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ServiceAccount, metadata: {name: s, namespace: a}}\n";
        let objects = parse(text, "x.yaml").unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].key().to_string(), "Namespace a");
        assert_eq!(objects[1].key().to_string(), "ServiceAccount a/s");
        assert_eq!(objects[1].key().kind_dir(), "serviceaccount");
    }

    #[test]
    fn unknown_kinds_are_kept_with_their_group() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: a}\nspec: {action: DENY}\n";
        let objects = parse(text, "p.yaml").unwrap();
        assert_eq!(
            objects[0].key().kind_dir(),
            "authorizationpolicy.security.istio.io"
        );
    }

    #[test]
    fn errors_name_file_object_and_field() {
        let bad_yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: x\n";
        let err = parse(bad_yaml, "bad.yaml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("bad.yaml: document 1: invalid yaml (line"),
            "{err}"
        );

        let bad_type = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: a}\n\
                        spec:\n  replicas: two\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, command: [x]}]}\n";
        let err = parse(bad_type, "d.yaml").unwrap_err();
        assert_eq!(err.object, "Deployment a/web");
        assert_eq!(err.field.as_deref(), Some("spec.replicas"));
        assert!(err.message.contains("invalid type"), "{err}");

        let no_ports =
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {selector: {app: x}}\n";
        let err = parse(no_ports, "s.yaml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "s.yaml: Service default/s: field spec.ports: required: a Service needs at least one port"
        );

        let no_command = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: nginx}]}\n";
        let err = parse(no_command, "p.yaml").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("spec.containers[0].command"));

        let bad_name = "apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad_Name}\n";
        assert_eq!(
            parse(bad_name, "n.yaml").unwrap_err().field.as_deref(),
            Some("metadata.name")
        );
    }
}
