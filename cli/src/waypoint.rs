//! `weft waypoint …`: waypoints as Gateway API `Gateway`s of class `istio-waypoint` in the local
//! cluster's object store, like `istioctl waypoint` (istio-ambient.md §1.2, §7).
//!
//! This module writes and reads the Gateway only. The controller provisions what a waypoint
//! needs (ServiceAccount, Deployment, Service, §2.6) and writes the Gateway's status
//! (`Accepted`, `Programmed`, `addresses`); the runner runs the Deployment's pods.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster::{Object, ObjectKey, Objects, Outcome, objects, store};
use crate::inspect::Report;

/// The Gateway API group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// The default waypoint name.
pub const DEFAULT_NAME: &str = "waypoint";
/// Gateway label choosing the traffic a waypoint handles.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// Namespace (or Service, Pod) label binding it to a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Namespace label enrolling its pods in the ambient mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The HBONE port of the waypoint's `mesh` listener.
pub const MESH_PORT: u16 = 15008;

/// Which traffic a waypoint handles (`istio.io/waypoint-for`); absent means `service`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum For {
    /// Traffic addressed to Service VIPs.
    Service,
    /// Traffic addressed to pod IPs.
    Workload,
    /// Both.
    All,
    /// Neither (the waypoint is deployed but not used).
    None,
}

impl For {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            For::Service => "service",
            For::Workload => "workload",
            For::All => "all",
            For::None => "none",
        }
    }
}

/// Errors of waypoint commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `none` names the opt-out of `istio.io/use-waypoint`, not a waypoint.
    #[error(
        "invalid waypoint name \"none\": it is reserved (istio.io/use-waypoint=none opts out of waypoints)"
    )]
    ReservedName,
    /// The waypoint exists and `--overwrite` was not given.
    #[error("waypoint {namespace}/{name} already exists (use --overwrite to replace it)")]
    Exists {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The namespace does not exist.
    #[error("namespace {0} not found")]
    NamespaceNotFound(String),
    /// No such waypoint.
    #[error("waypoint {namespace}/{name} not found")]
    NotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// `--wait` ran out of time.
    #[error(
        "timed out after {timeout:?} waiting for waypoint {namespace}/{name} to be Programmed ({last})"
    )]
    Timeout {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// How long.
        timeout: Duration,
        /// The Programmed condition last seen.
        last: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The cluster's objects (API server or store) could not be read or written.
    #[error(transparent)]
    Objects(#[from] objects::Error),
}

/// The waypoint Gateway `istioctl waypoint generate` prints.
pub fn gateway(namespace: &str, name: &str, traffic: Option<For>) -> Object {
    let mut metadata = json!({"name": name, "namespace": namespace});
    if let Some(traffic) = traffic {
        metadata["labels"] = json!({WAYPOINT_FOR_LABEL: traffic.as_str()});
    }
    Object(json!({
        "apiVersion": format!("{GATEWAY_GROUP}/v1"),
        "kind": "Gateway",
        "metadata": metadata,
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": MESH_PORT, "protocol": "HBONE"}],
        },
    }))
}

/// The Gateway as YAML (what `weft waypoint generate` prints).
pub fn generate(namespace: &str, name: &str, traffic: Option<For>) -> String {
    serde_yaml::to_string(&gateway(namespace, name, traffic).0).unwrap_or_default()
}

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(GATEWAY_GROUP, "Gateway", Some(namespace), name)
}

fn namespace_key(namespace: &str) -> ObjectKey {
    ObjectKey::new("", "Namespace", None, namespace)
}

/// What `weft waypoint apply` does.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Namespace of the waypoint.
    pub namespace: String,
    /// Its name; default `waypoint`.
    pub name: String,
    /// `istio.io/waypoint-for`, when given.
    pub traffic: Option<For>,
    /// Also label the namespace `istio.io/use-waypoint=<name>`.
    pub enroll_namespace: bool,
    /// Replace an existing waypoint of that name.
    pub overwrite: bool,
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Created, configured or unchanged.
    pub outcome: Outcome,
    /// The namespace was labelled `istio.io/use-waypoint=<name>`.
    pub enrolled: bool,
    /// The namespace is labelled `istio.io/dataplane-mode=ambient` (else the waypoint serves
    /// nobody: callers say so).
    pub namespace_ambient: bool,
}

/// Writes the waypoint Gateway into the cluster's `store` (its API server or object store), and
/// with `enroll_namespace` labels its namespace.
///
/// # Errors
/// [`Error::ReservedName`] for `none`; [`Error::NamespaceNotFound`]; [`Error::Exists`] when it
/// exists without `overwrite`; [`Error::Objects`].
pub fn apply(store: &dyn Objects, options: &ApplyOptions) -> Result<Applied, Error> {
    if options.name == "none" {
        return Err(Error::ReservedName);
    }
    let namespace = store
        .get(&namespace_key(&options.namespace))?
        .ok_or_else(|| Error::NamespaceNotFound(options.namespace.clone()))?;
    if !options.overwrite
        && store
            .get(&key(&options.namespace, &options.name))?
            .is_some()
    {
        return Err(Error::Exists {
            namespace: options.namespace.clone(),
            name: options.name.clone(),
        });
    }
    let object = gateway(&options.namespace, &options.name, options.traffic);
    let outcome = store
        .apply(std::slice::from_ref(&object))?
        .first()
        .map_or(Outcome::Created, |(_, outcome)| *outcome);
    if options.enroll_namespace
        && !store.set_label(
            &namespace_key(&options.namespace),
            USE_WAYPOINT_LABEL,
            Some(&options.name),
        )?
    {
        return Err(Error::NamespaceNotFound(options.namespace.clone()));
    }
    Ok(Applied {
        outcome,
        enrolled: options.enroll_namespace,
        namespace_ambient: namespace.0["metadata"]["labels"][DATAPLANE_MODE_LABEL] == "ambient",
    })
}

/// The condition `kind` of a Gateway's status, if present.
fn condition<'a>(gateway: &'a Value, kind: &str) -> Option<&'a Value> {
    gateway["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// Whether the Gateway has condition `Programmed=True`.
pub fn programmed(gateway: &Object) -> bool {
    condition(&gateway.0, "Programmed").is_some_and(|c| c["status"] == "True")
}

/// Polls `store` every `interval` until waypoint `namespace/name` is `Programmed=True`, and
/// returns it.
///
/// # Errors
/// [`Error::NotFound`] when it disappears; [`Error::Timeout`] with the last condition seen.
pub fn wait_programmed(
    store: &dyn Objects,
    namespace: &str,
    name: &str,
    timeout: Duration,
    interval: Duration,
) -> Result<Object, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let gateway = store
            .get(&key(namespace, name))?
            .ok_or_else(|| Error::NotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
        if programmed(&gateway) {
            return Ok(gateway);
        }
        if Instant::now() >= deadline {
            let last = condition(&gateway.0, "Programmed").map_or_else(
                || "no Programmed condition yet".to_owned(),
                |c| {
                    format!(
                        "Programmed={} {}: {}",
                        c["status"].as_str().unwrap_or("Unknown"),
                        c["reason"].as_str().unwrap_or("-"),
                        c["message"].as_str().unwrap_or("-")
                    )
                },
            );
            return Err(Error::Timeout {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                timeout,
                last,
            });
        }
        std::thread::sleep(interval);
    }
}

/// Waypoint Gateways (class `istio-waypoint`) in `namespace` (every namespace for `None`).
///
/// # Errors
/// [`Error::Objects`].
pub fn waypoints(store: &dyn Objects, namespace: Option<&str>) -> Result<Vec<Object>, Error> {
    Ok(store
        .list(GATEWAY_GROUP, "Gateway")?
        .into_iter()
        .filter(|g| g.0["spec"]["gatewayClassName"] == WAYPOINT_CLASS)
        .filter(|g| namespace.is_none_or(|ns| g.namespace() == Some(ns)))
        .collect())
}

fn cell(v: &Value) -> String {
    match v.as_str() {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => "-".to_owned(),
    }
}

/// `weft waypoint list`: NAMESPACE, NAME, FOR (default `service`), PROGRAMMED (the condition's
/// status, `Unknown` before the controller wrote one), ADDRESS (first `status.addresses`).
pub fn list_report(gateways: &[Object]) -> Report {
    let rows = gateways
        .iter()
        .map(|g| {
            let v = &g.0;
            vec![
                g.namespace().unwrap_or_default().to_owned(),
                g.name().to_owned(),
                v["metadata"]["labels"][WAYPOINT_FOR_LABEL]
                    .as_str()
                    .unwrap_or(For::Service.as_str())
                    .to_owned(),
                condition(v, "Programmed")
                    .and_then(|c| c["status"].as_str())
                    .unwrap_or("Unknown")
                    .to_owned(),
                cell(&v["status"]["addresses"][0]["value"]),
            ]
        })
        .collect();
    Report {
        header: vec!["NAMESPACE", "NAME", "FOR", "PROGRAMMED", "ADDRESS"],
        rows,
        json: Value::Array(gateways.iter().map(|g| g.0.clone()).collect()),
    }
}

/// `weft waypoint status`: one row per condition of each waypoint (a waypoint without status
/// gets one `-` row, meaning the controller has not seen it yet).
pub fn status_report(gateways: &[Object]) -> Report {
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for g in gateways {
        let ns = g.namespace().unwrap_or_default().to_owned();
        let conditions = g.0["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if conditions.is_empty() {
            rows.push(vec![
                ns.clone(),
                g.name().to_owned(),
                "-".into(),
                "-".into(),
                "-".into(),
                "no status yet (is the controller running?)".into(),
            ]);
        }
        for c in &conditions {
            rows.push(vec![
                ns.clone(),
                g.name().to_owned(),
                cell(&c["type"]),
                cell(&c["status"]),
                cell(&c["reason"]),
                cell(&c["message"]),
            ]);
        }
        json.push(json!({
            "namespace": ns,
            "name": g.name(),
            "conditions": conditions,
            "addresses": g.0["status"]["addresses"],
        }));
    }
    Report {
        header: vec![
            "NAMESPACE",
            "NAME",
            "CONDITION",
            "STATUS",
            "REASON",
            "MESSAGE",
        ],
        rows,
        json: Value::Array(json),
    }
}

/// Which waypoints `weft waypoint delete` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These names.
    Names(Vec<String>),
    /// Every waypoint of the namespace.
    All,
}

/// Deletes waypoint Gateways of `namespace`, and the objects the controller made for each
/// (ServiceAccount, Deployment, Service owned by that Gateway's UID: what the Kubernetes
/// garbage collector would remove; their pods then go with the Deployment). Namespace
/// `istio.io/use-waypoint` labels are left alone, as `istioctl` does. Returns each Gateway
/// key and whether it existed.
///
/// # Errors
/// [`Error::Objects`].
pub fn delete(
    store: &dyn Objects,
    namespace: &str,
    selection: &Selection,
) -> Result<Vec<(ObjectKey, bool)>, Error> {
    let targets: Vec<(ObjectKey, Option<Object>)> = match selection {
        Selection::Names(names) => names
            .iter()
            .map(|n| {
                let k = key(namespace, n);
                let current = store.get(&k)?;
                Ok((k, current))
            })
            .collect::<Result<_, Error>>()?,
        Selection::All => waypoints(store, Some(namespace))?
            .into_iter()
            .map(|g| (g.key(), Some(g)))
            .collect(),
    };
    let mut dependents = Vec::new();
    for (group, kind) in [
        ("apps", "Deployment"),
        ("", "Service"),
        ("", "ServiceAccount"),
    ] {
        dependents.extend(
            store
                .list(group, kind)?
                .into_iter()
                .filter(|o| o.namespace() == Some(namespace)),
        );
    }
    let mut results = Vec::new();
    for (gateway_key, current) in targets {
        let uid = current.as_ref().and_then(Object::uid).map(str::to_owned);
        let existed = deleted(store, &gateway_key)?;
        if let Some(uid) = uid {
            for dependent in &dependents {
                let owned = dependent.0["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r["kind"] == "Gateway" && r["uid"] == uid.as_str());
                if owned {
                    deleted(store, &dependent.key())?;
                }
            }
        }
        results.push((gateway_key, existed));
    }
    Ok(results)
}

/// Deletes one object; whether it existed.
fn deleted(store: &dyn Objects, key: &ObjectKey) -> Result<bool, Error> {
    Ok(store
        .delete(std::slice::from_ref(key))?
        .first()
        .is_some_and(|(_, existed)| *existed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Store;

    struct TempStore(std::path::PathBuf, Store);

    impl TempStore {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("weft-waypoint-{}", store::new_uid()));
            let s = Store::new(&dir);
            s.apply(&[
                Object(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})),
                Object(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app", "labels": {DATAPLANE_MODE_LABEL: "ambient"}}})),
            ])
            .unwrap();
            TempStore(dir, s)
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn options(namespace: &str, name: &str) -> ApplyOptions {
        ApplyOptions {
            namespace: namespace.into(),
            name: name.into(),
            traffic: None,
            enroll_namespace: false,
            overwrite: false,
        }
    }

    fn program(store: &Store, namespace: &str, name: &str) {
        let status = json!({
            "addresses": [{"type": "Hostname", "value": format!("{name}.{namespace}.svc.cluster.local")}],
            "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "Resource accepted"},
                {"type": "Programmed", "status": "True", "reason": "Programmed", "message": "Resource programmed, assigned to service(s) waypoint.app.svc.cluster.local:15008"},
            ],
        });
        assert!(store.update_status(&key(namespace, name), status).unwrap());
    }

    #[test]
    fn generate_prints_the_istioctl_gateway() {
        assert_eq!(
            generate("app", "waypoint", None),
            "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: app
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"
        );
        let with_for = generate("app", "wp", Some(For::Workload));
        assert!(
            with_for.contains("labels:\n    istio.io/waypoint-for: workload\n"),
            "{with_for}"
        );
        // It parses as a manifest the store accepts.
        let parsed = crate::cluster::manifest::parse(&with_for, "-").unwrap();
        assert_eq!(parsed[0].key(), key("app", "wp"));
    }

    #[test]
    fn apply_creates_refuses_duplicates_and_overwrites_on_request() {
        let t = TempStore::new();
        let applied = apply(&t.1, &options("app", "waypoint")).unwrap();
        assert_eq!(applied.outcome, Outcome::Created);
        assert!(applied.namespace_ambient);
        assert!(!applied.enrolled);
        let stored = t.1.get(&key("app", "waypoint")).unwrap().unwrap();
        assert_eq!(stored.0["spec"]["gatewayClassName"], WAYPOINT_CLASS);
        assert_eq!(stored.0["spec"]["listeners"][0]["port"], 15008);

        let err = apply(&t.1, &options("app", "waypoint")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "waypoint app/waypoint already exists (use --overwrite to replace it)"
        );

        program(&t.1, "app", "waypoint");
        let mut overwrite = options("app", "waypoint");
        overwrite.overwrite = true;
        overwrite.traffic = Some(For::All);
        assert_eq!(
            apply(&t.1, &overwrite).unwrap().outcome,
            Outcome::Configured
        );
        let stored = t.1.get(&key("app", "waypoint")).unwrap().unwrap();
        assert_eq!(stored.0["metadata"]["labels"][WAYPOINT_FOR_LABEL], "all");
        assert!(programmed(&stored), "the status survives an overwrite");
    }

    #[test]
    fn apply_rejects_none_and_unknown_namespaces_and_enrolls_on_request() {
        let t = TempStore::new();
        assert!(matches!(
            apply(&t.1, &options("app", "none")),
            Err(Error::ReservedName)
        ));
        assert!(matches!(
            apply(&t.1, &options("nope", "waypoint")),
            Err(Error::NamespaceNotFound(ns)) if ns == "nope"
        ));
        let mut enroll = options("default", "wp");
        enroll.enroll_namespace = true;
        let applied = apply(&t.1, &enroll).unwrap();
        assert!(applied.enrolled);
        assert!(!applied.namespace_ambient, "default is not ambient");
        let ns = t.1.get(&namespace_key("default")).unwrap().unwrap();
        assert_eq!(ns.0["metadata"]["labels"][USE_WAYPOINT_LABEL], "wp");
    }

    #[test]
    fn wait_returns_once_programmed_and_times_out_with_the_last_condition() {
        let t = TempStore::new();
        apply(&t.1, &options("app", "waypoint")).unwrap();
        let err = wait_programmed(
            &t.1,
            "app",
            "waypoint",
            Duration::from_millis(50),
            Duration::from_millis(10),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("no Programmed condition yet"),
            "{err}"
        );
        let store = t.1.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            program(&store, "app", "waypoint");
        });
        let gateway = wait_programmed(
            &t.1,
            "app",
            "waypoint",
            Duration::from_secs(10),
            Duration::from_millis(10),
        )
        .unwrap();
        assert!(programmed(&gateway));
        writer.join().unwrap();
        assert!(matches!(
            wait_programmed(&t.1, "app", "gone", Duration::ZERO, Duration::ZERO),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn list_and_status_show_what_the_controller_wrote() {
        let t = TempStore::new();
        apply(&t.1, &options("app", "waypoint")).unwrap();
        let mut workload = options("default", "wl");
        workload.traffic = Some(For::Workload);
        apply(&t.1, &workload).unwrap();
        // Not a waypoint: another class.
        t.1.apply(&[Object(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "ingress", "namespace": "app"},
            "spec": {"gatewayClassName": "istio", "listeners": []},
        }))])
        .unwrap();
        program(&t.1, "app", "waypoint");

        let all = waypoints(&t.1, None).unwrap();
        assert_eq!(
            list_report(&all).render("table").unwrap(),
            "\
NAMESPACE   NAME       FOR        PROGRAMMED   ADDRESS
app         waypoint   service    True         waypoint.app.svc.cluster.local
default     wl         workload   Unknown      -
"
        );
        let app = waypoints(&t.1, Some("app")).unwrap();
        assert_eq!(list_report(&app).rows.len(), 1);

        let status = status_report(&all);
        assert_eq!(status.header[2], "CONDITION");
        assert_eq!(
            status.rows,
            vec![
                vec![
                    "app",
                    "waypoint",
                    "Accepted",
                    "True",
                    "Accepted",
                    "Resource accepted"
                ],
                vec![
                    "app",
                    "waypoint",
                    "Programmed",
                    "True",
                    "Programmed",
                    "Resource programmed, assigned to service(s) waypoint.app.svc.cluster.local:15008"
                ],
                vec![
                    "default",
                    "wl",
                    "-",
                    "-",
                    "-",
                    "no status yet (is the controller running?)"
                ],
            ]
        );
        assert_eq!(
            status.json[0]["addresses"][0]["value"],
            "waypoint.app.svc.cluster.local"
        );
    }

    #[test]
    fn delete_removes_the_gateways_and_what_they_own_but_not_namespace_labels() {
        let t = TempStore::new();
        let mut enroll = options("app", "waypoint");
        enroll.enroll_namespace = true;
        apply(&t.1, &enroll).unwrap();
        apply(&t.1, &options("app", "second")).unwrap();
        let gw = t.1.get(&key("app", "waypoint")).unwrap().unwrap();
        let owner = json!([{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": "waypoint", "uid": gw.uid().unwrap(), "controller": true}]);
        t.1.apply(&[
            Object(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "waypoint", "namespace": "app", "ownerReferences": owner}, "spec": {"selector": {}, "template": {}}})),
            Object(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "waypoint", "namespace": "app", "ownerReferences": owner}, "spec": {"ports": [{"port": 15008}]}})),
            Object(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "waypoint", "namespace": "app", "ownerReferences": owner}})),
            Object(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "app"}, "spec": {"ports": [{"port": 80}]}})),
        ])
        .unwrap();

        let deleted = delete(
            &t.1,
            "app",
            &Selection::Names(vec!["waypoint".into(), "missing".into()]),
        )
        .unwrap();
        assert_eq!(
            deleted,
            vec![
                (key("app", "waypoint"), true),
                (key("app", "missing"), false)
            ]
        );
        assert!(t.1.get(&key("app", "second")).unwrap().is_some());
        for (group, kind) in [
            ("apps", "Deployment"),
            ("", "Service"),
            ("", "ServiceAccount"),
        ] {
            let left: Vec<String> =
                t.1.list(group, kind)
                    .unwrap()
                    .iter()
                    .map(|o| o.name().to_owned())
                    .collect();
            assert!(!left.contains(&"waypoint".to_owned()), "{kind}: {left:?}");
        }
        assert!(
            t.1.get(&ObjectKey::new("", "Service", Some("app"), "echo"))
                .unwrap()
                .is_some()
        );
        let ns = t.1.get(&namespace_key("app")).unwrap().unwrap();
        assert_eq!(ns.0["metadata"]["labels"][USE_WAYPOINT_LABEL], "waypoint");

        let deleted = delete(&t.1, "app", &Selection::All).unwrap();
        assert_eq!(deleted, vec![(key("app", "second"), true)]);
        assert!(waypoints(&t.1, None).unwrap().is_empty());
    }
}
