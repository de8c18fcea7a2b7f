//! The runner: kubelet, scheduler and the few controller-manager loops the local cluster needs.
//!
//! One daemon per cluster polls the object store and reconciles: a `default` ServiceAccount per
//! namespace; Deployment replicas as Pods (named `<deployment>-<pod-template-hash>-<suffix>`);
//! Pods scheduled round-robin onto nodes, given a network namespace through the node's CNI
//! chain and their containers' `command`+`args` started inside it; Pod status (`podIP`,
//! `hostIP`, `phase`, `Ready`, container states) from the processes and readiness probes;
//! EndpointSlices for Services with selectors; service VIP rules on every node. It restarts
//! nothing it was not asked to: a container that exits leaves its Pod not ready.
//!
//! Each started pod gets a service-account token ([`super::token`]): the file
//! `<pod dir>/token`, named to every container by `WEFT_SERVICE_ACCOUNT_TOKEN_FILE`, and a
//! registration the controller authenticates it by, removed when the pod stops or is deleted.
//! Container `env[].value`, `command` and `args` get Kubernetes `$(VAR)` expansion
//! ([`super::expansion`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::layout::{self, Layout};
use super::manifest::{Object, ObjectKey};
use super::pod::{self, Host, PodRuntime, pod_status, sandbox_backoff};
use super::proxy;
use super::store::{self, Store};
use super::token::{self, Token};

/// Label carrying the hash of a Deployment's pod template.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label marking EndpointSlices the runner manages.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "weft-runner";

/// Runner settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The cluster.
    pub layout: Layout,
    /// Number of nodes.
    pub nodes: u8,
    /// Directories searched for CNI plugins.
    pub plugin_dirs: Vec<PathBuf>,
    /// Directories searched for container programs before `PATH` (e.g. where `weft-echo` is).
    pub program_dirs: Vec<PathBuf>,
    /// Loop period; default 200 ms.
    pub tick: Duration,
}

/// Errors that stop the runner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed.
    #[error("object store")]
    Store(#[from] store::Error),
}

struct Runner {
    config: Config,
    store: Store,
    pods: BTreeMap<String, PodRuntime>,
    next_node: u8,
    applied_rules: Option<Vec<proxy::ServicePort>>,
}

/// Runs until `stop` is set, then stops every pod it started.
///
/// # Errors
/// [`Error`] when the store becomes unusable.
pub fn run(config: Config, stop: &AtomicBool) -> Result<(), Error> {
    let store = Store::new(config.layout.store_dir());
    let mut runner = Runner {
        config,
        store,
        pods: BTreeMap::new(),
        next_node: 1,
        applied_rules: None,
    };
    let mut last_revision = None;
    let mut last_full = Instant::now();
    let ready_file = runner.config.layout.state_dir().join("runner.ready");
    while !stop.load(Ordering::SeqCst) {
        let revision = runner.store.revision();
        if last_revision != Some(revision) || last_full.elapsed() > Duration::from_secs(5) {
            last_revision = Some(revision);
            last_full = Instant::now();
            if let Err(err) = runner.reconcile() {
                warn!(error = %err, "reconcile failed");
            }
            if !ready_file.exists() {
                let _ = std::fs::write(&ready_file, b"ready\n");
            }
        }
        runner.poll_pods();
        std::thread::sleep(runner.config.tick);
    }
    info!("runner stopping");
    let uids: Vec<String> = runner.pods.keys().cloned().collect();
    for uid in uids {
        if let Some(pod) = runner.pods.remove(&uid) {
            runner.stop_pod(pod);
        }
    }
    Ok(())
}

fn labels_match(labels: &Value, selector: &BTreeMap<String, String>) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels[k.as_str()].as_str() == Some(v.as_str()))
}

fn template_hash(template: &Value) -> String {
    let text = serde_json::to_string(template).unwrap_or_default();
    let hash = proxy::fnv1a(text.as_bytes());
    // Kubernetes-style: lowercase consonants and digits, 10 characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10)
        .map(|i| ALPHABET[((hash >> (i * 6)) % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn owner_uid(object: &Value, kind: &str) -> Option<String> {
    object["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == kind && r["controller"] == true)
        .and_then(|r| r["uid"].as_str().map(str::to_owned))
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

// === impl Runner ===

impl Runner {
    fn reconcile(&mut self) -> Result<(), Error> {
        self.service_accounts()?;
        self.deployments()?;
        self.pods()?;
        self.endpoint_slices()?;
        self.service_rules()?;
        Ok(())
    }

    fn service_accounts(&self) -> Result<(), Error> {
        for ns in self.store.list("", "Namespace")? {
            let key = ObjectKey::new("", "ServiceAccount", Some(ns.name()), "default");
            if self.store.get(&key)?.is_none() {
                let _lock = self.store.lock()?;
                self.store.put(&Object(json!({
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {
                        "name": "default",
                        "namespace": ns.name(),
                        "uid": store::new_uid(),
                        "creationTimestamp": store::timestamp(),
                    }
                })))?;
            }
        }
        Ok(())
    }

    fn deployments(&self) -> Result<(), Error> {
        let deployments = self.store.list("apps", "Deployment")?;
        let pods = self.store.list("", "Pod")?;
        let mut live_owners = BTreeSet::new();
        for object in &deployments {
            let Ok(deployment) = object.typed::<Deployment>() else {
                continue;
            };
            let Some(uid) = object.uid().map(str::to_owned) else {
                continue;
            };
            live_owners.insert(uid.clone());
            let Some(spec) = deployment.spec else {
                continue;
            };
            let template = object.0["spec"]["template"].clone();
            let hash = template_hash(&template);
            let ns = object.namespace().unwrap_or("default");
            let mut current: Vec<&Object> = Vec::new();
            for pod in pods
                .iter()
                .filter(|p| owner_uid(&p.0, "Deployment").as_deref() == Some(&uid))
            {
                if pod.0["metadata"]["labels"][POD_TEMPLATE_HASH] == hash.as_str() {
                    current.push(pod);
                } else {
                    self.delete_object(&pod.key())?;
                }
            }
            let desired = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
            current.sort_by_key(|p| {
                (
                    p.0["metadata"]["creationTimestamp"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    p.name().to_owned(),
                )
            });
            while current.len() > desired {
                if let Some(extra) = current.pop() {
                    self.delete_object(&extra.key())?;
                }
            }
            for _ in current.len()..desired {
                self.create_pod(object, &template, &hash, ns, &uid)?;
            }
            let ready = current.iter().filter(|p| is_ready(&p.0)).count();
            let status = json!({
                "observedGeneration": object.0["metadata"]["generation"],
                "replicas": current.len().max(desired.min(current.len())),
                "updatedReplicas": current.len(),
                "readyReplicas": ready,
                "availableReplicas": ready,
            });
            self.store.update_status(&object.key(), status)?;
        }
        // Garbage collection: pods whose Deployment is gone.
        for pod in &pods {
            if let Some(owner) = owner_uid(&pod.0, "Deployment")
                && !live_owners.contains(&owner)
            {
                self.delete_object(&pod.key())?;
            }
        }
        Ok(())
    }

    fn create_pod(
        &self,
        deployment: &Object,
        template: &Value,
        hash: &str,
        ns: &str,
        owner: &str,
    ) -> Result<(), Error> {
        let name = format!("{}-{hash}-{}", deployment.name(), random_suffix());
        let mut labels = template["metadata"]["labels"].clone();
        labels[POD_TEMPLATE_HASH] = json!(hash);
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "generateName": format!("{}-{hash}-", deployment.name()),
                "namespace": ns,
                "uid": store::new_uid(),
                "creationTimestamp": store::timestamp(),
                "labels": labels,
                "annotations": template["metadata"]["annotations"].clone(),
                "ownerReferences": [{
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": deployment.name(),
                    "uid": owner,
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
            "spec": template["spec"].clone(),
        });
        let mut pod = pod;
        if pod["metadata"]["annotations"].is_null() {
            pod["metadata"]
                .as_object_mut()
                .map(|m| m.remove("annotations"));
        }
        let _lock = self.store.lock()?;
        self.store.put(&Object(pod))?;
        info!(pod = %name, namespace = ns, "pod created for deployment");
        Ok(())
    }

    fn delete_object(&self, key: &ObjectKey) -> Result<(), Error> {
        let _lock = self.store.lock()?;
        self.store.remove(key)?;
        Ok(())
    }

    fn pods(&mut self) -> Result<(), Error> {
        let stored = self.store.list("", "Pod")?;
        let uids: BTreeSet<String> = stored
            .iter()
            .filter_map(|p| p.uid().map(str::to_owned))
            .collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !uids.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(pod) = self.pods.remove(&uid) {
                self.stop_pod(pod);
            }
        }
        for object in stored {
            let Some(uid) = object.uid().map(str::to_owned) else {
                continue;
            };
            if let Some(runtime) = self.pods.get(&uid) {
                let due = runtime
                    .sandbox
                    .as_ref()
                    .is_some_and(|r| r.retry_at <= Instant::now());
                if due {
                    let attempts = runtime.sandbox.as_ref().map_or(0, |r| r.attempts);
                    let mut runtime = self.start_pod(&object, &uid);
                    if let Some(retry) = runtime.sandbox.as_mut() {
                        retry.attempts = attempts + 1;
                        retry.retry_at = Instant::now() + sandbox_backoff(retry.attempts);
                    }
                    self.pods.insert(uid, runtime);
                }
                continue;
            }
            if !object.0["status"]["phase"].is_null() {
                // Started by an earlier runner of this cluster; nothing to attach to.
                continue;
            }
            let runtime = self.start_pod(&object, &uid);
            self.pods.insert(uid, runtime);
        }
        Ok(())
    }

    fn schedule(&mut self, object: &Object) -> Result<u8, String> {
        if let Some(name) = object.0["spec"]["nodeName"].as_str() {
            return layout::node_number(name)
                .filter(|n| (1..=self.config.nodes).contains(n))
                .ok_or_else(|| format!("spec.nodeName {name:?} is not a node of this cluster"));
        }
        let node = self.next_node;
        self.next_node = if node >= self.config.nodes {
            1
        } else {
            node + 1
        };
        // Bind: record the node in the stored spec, as the scheduler does.
        let key = object.key();
        if let Ok(_lock) = self.store.lock()
            && let Ok(Some(mut current)) = self.store.get(&key)
        {
            current.0["spec"]["nodeName"] = json!(layout::node_name(node));
            let _ = self.store.put(&current);
        }
        Ok(node)
    }

    fn start_pod(&mut self, object: &Object, uid: &str) -> PodRuntime {
        let node = self.schedule(object);
        let mut runtime = pod::start(&*self, object, uid, node);
        self.write_status(&mut runtime);
        runtime
    }

    fn poll_pods(&mut self) {
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            let Some(mut runtime) = self.pods.remove(&uid) else {
                continue;
            };
            pod::poll(&*self, &mut runtime);
            self.write_status(&mut runtime);
            self.pods.insert(uid, runtime);
        }
    }

    fn write_status(&self, runtime: &mut PodRuntime) {
        let status = pod_status(runtime);
        if status != runtime.last_status {
            match self.store.update_status(&runtime.key, status.clone()) {
                Ok(_) => runtime.last_status = status,
                Err(err) => warn!(pod = %runtime.key, error = %err, "writing pod status failed"),
            }
        }
    }

    fn stop_pod(&self, runtime: PodRuntime) {
        pod::stop(self, runtime, STOP_GRACE);
    }

    fn endpoint_slices(&self) -> Result<(), Error> {
        let services = self.store.list("", "Service")?;
        let pods = self.store.list("", "Pod")?;
        let existing: Vec<Object> = self
            .store
            .list("discovery.k8s.io", "EndpointSlice")?
            .into_iter()
            .filter(|s| s.0["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY)
            .collect();
        let mut desired_keys = BTreeSet::new();
        for svc_object in &services {
            let Ok(svc) = svc_object.typed::<Service>() else {
                continue;
            };
            let Some(spec) = svc.spec else { continue };
            let selector = spec.selector.clone().unwrap_or_default();
            if selector.is_empty() {
                continue;
            }
            let ns = svc_object.namespace().unwrap_or("default");
            let mut groups: BTreeMap<Vec<(String, u16, String)>, Vec<Value>> = BTreeMap::new();
            for pod in pods.iter().filter(|p| p.namespace() == Some(ns)) {
                if !labels_match(&pod.0["metadata"]["labels"], &selector) {
                    continue;
                }
                let Some(ip) = pod.0["status"]["podIP"].as_str() else {
                    continue;
                };
                if pod.0["status"]["phase"] != "Running" {
                    continue;
                }
                let Ok(typed_pod) = pod.typed::<Pod>() else {
                    continue;
                };
                let ports: Vec<(String, u16, String)> = spec
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| {
                        let target = resolve_target_port(p, &typed_pod)?;
                        Some((
                            p.name.clone().unwrap_or_default(),
                            target,
                            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        ))
                    })
                    .collect();
                let ready = is_ready(&pod.0);
                groups.entry(ports).or_default().push(json!({
                    "addresses": [ip],
                    "conditions": {"ready": ready, "serving": ready, "terminating": false},
                    "nodeName": pod.0["spec"]["nodeName"],
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": pod.name(), "uid": pod.uid()},
                }));
            }
            for (ports, mut endpoints) in groups {
                endpoints
                    .sort_by(|a, b| a["addresses"][0].as_str().cmp(&b["addresses"][0].as_str()));
                let port_key: String = ports.iter().map(|(n, p, _)| format!("{n}:{p},")).collect();
                let name = format!(
                    "{}-{}",
                    svc_object.name(),
                    &template_hash(&json!(port_key))[..5]
                );
                let key = ObjectKey::new("discovery.k8s.io", "EndpointSlice", Some(ns), &name);
                desired_keys.insert(key.clone());
                let ports_json: Vec<Value> = ports
                    .iter()
                    .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
                    .collect();
                let current = existing.iter().find(|s| s.key() == key);
                let unchanged = current.is_some_and(|c| {
                    c.0["endpoints"] == json!(endpoints) && c.0["ports"] == json!(ports_json)
                });
                if unchanged {
                    continue;
                }
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "uid": current.and_then(|c| c.uid()).map(str::to_owned).unwrap_or_else(store::new_uid),
                        "creationTimestamp": store::timestamp(),
                        "labels": {SERVICE_NAME_LABEL: svc_object.name(), MANAGED_BY_LABEL: MANAGED_BY},
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc_object.name(), "uid": svc_object.uid(), "controller": true}],
                    },
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": ports_json,
                });
                let _lock = self.store.lock()?;
                self.store.put(&Object(slice))?;
            }
        }
        for slice in existing {
            if !desired_keys.contains(&slice.key()) {
                self.delete_object(&slice.key())?;
            }
        }
        Ok(())
    }

    fn service_rules(&mut self) -> Result<(), Error> {
        let services = self.store.list("", "Service")?;
        let slices = self.store.list("discovery.k8s.io", "EndpointSlice")?;
        let mut ports = Vec::new();
        for svc in &services {
            let Some(vip) = svc.0["spec"]["clusterIP"]
                .as_str()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let ns = svc.namespace().unwrap_or("default");
            for port in svc.0["spec"]["ports"].as_array().into_iter().flatten() {
                let port_name = port["name"].as_str().unwrap_or_default();
                let protocol = port["protocol"]
                    .as_str()
                    .unwrap_or("TCP")
                    .to_ascii_lowercase();
                let mut endpoints = Vec::new();
                for slice in slices.iter().filter(|s| {
                    s.namespace() == Some(ns)
                        && s.0["metadata"]["labels"][SERVICE_NAME_LABEL] == svc.name()
                }) {
                    let Some(target) = slice.0["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|p| p["name"].as_str().unwrap_or_default() == port_name)
                        .and_then(|p| p["port"].as_u64())
                        .and_then(|p| u16::try_from(p).ok())
                    else {
                        continue;
                    };
                    for endpoint in slice.0["endpoints"].as_array().into_iter().flatten() {
                        if endpoint["conditions"]["ready"] != true {
                            continue;
                        }
                        if let Some(ip) = endpoint["addresses"][0]
                            .as_str()
                            .and_then(|a| a.parse().ok())
                        {
                            endpoints.push(SocketAddrV4::new(ip, target));
                        }
                    }
                }
                endpoints.sort();
                ports.push(proxy::ServicePort {
                    id: format!("{ns}/{}:{port_name}", svc.name()),
                    vip,
                    port: port["port"]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(0),
                    protocol,
                    endpoints,
                });
            }
        }
        if self.applied_rules.as_ref() == Some(&ports) {
            return Ok(());
        }
        let mut ok = true;
        for node in 1..=self.config.nodes {
            if let Err(err) = proxy::apply(&self.config.layout.node_netns(node), &ports) {
                warn!(node, error = %err, "applying service rules failed");
                ok = false;
            }
        }
        if ok {
            self.applied_rules = Some(ports);
        }
        Ok(())
    }
}

/// How long a stopped pod's containers get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

impl Host for Runner {
    fn layout(&self) -> &Layout {
        &self.config.layout
    }

    fn plugin_dirs(&self) -> &[PathBuf] {
        &self.config.plugin_dirs
    }

    fn program_dirs(&self) -> &[PathBuf] {
        &self.config.program_dirs
    }

    fn services(&self, namespace: &str) -> Result<Vec<Value>, String> {
        Ok(self
            .store
            .list("", "Service")
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|svc| svc.namespace() == Some(namespace))
            .map(|svc| svc.0)
            .collect())
    }

    /// A random token written to `token_file`, registered for the controller.
    fn issue_token(
        &self,
        runtime: &PodRuntime,
        service_account: Option<&str>,
        token_file: &Path,
    ) -> Result<Option<PathBuf>, String> {
        let token = Token::generate();
        token.write(token_file).map_err(|e| e.to_string())?;
        let registration = token::Registration {
            namespace: runtime
                .key
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            service_account: service_account
                .filter(|sa| !sa.is_empty())
                .unwrap_or("default")
                .to_owned(),
            pod: runtime.key.name.clone(),
            uid: runtime.uid.clone(),
            node: layout::node_name(runtime.node),
        };
        token::register(
            &self.config.layout.controller_state_dir(),
            &token,
            &registration,
        )
        .map(Some)
        .map_err(|e| crate::echo::error_message(&e))
    }
}

fn resolve_target_port(port: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_hash_is_stable_and_changes_with_the_template() {
        let a = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": []}});
        let b = json!({"metadata": {"labels": {"app": "y"}}, "spec": {"containers": []}});
        assert_eq!(template_hash(&a), template_hash(&a));
        assert_ne!(template_hash(&a), template_hash(&b));
        assert_eq!(template_hash(&a).len(), 10);
    }

    #[test]
    fn gateway_owned_deployments_run_and_only_orphaned_pods_are_collected() {
        let dir = std::env::temp_dir().join(format!("weft-runner-{}", store::new_uid()));
        let layout = Layout::new("t", Some(&dir)).unwrap();
        let store = Store::new(layout.store_dir());
        store
            .apply(&[Object(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app"}}),
            )])
            .unwrap();
        let template = json!({
            "metadata": {"labels": {"gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"}},
            "spec": pod::tests::waypoint_pod().0["spec"].clone(),
        });
        store
            .apply(&[Object(json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": "waypoint",
                    "namespace": "app",
                    "ownerReferences": [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": "waypoint", "uid": "gone-or-not", "controller": true}],
                },
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
                    "template": template,
                },
            }))])
            .unwrap();
        let runner = Runner {
            config: Config {
                layout,
                nodes: 1,
                plugin_dirs: Vec::new(),
                // Where `weft` is: cargo builds `waypoint` into the same directory.
                program_dirs: vec![dir.join("bin")],
                tick: Duration::from_millis(200),
            },
            store: store.clone(),
            pods: BTreeMap::new(),
            next_node: 1,
            applied_rules: None,
        };
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/waypoint"), b"#!/bin/sh\n").unwrap();
        assert_eq!(
            pod::resolve_program(&runner, "waypoint"),
            Some(dir.join("bin/waypoint")),
            "the waypoint program is found next to weft"
        );
        runner.deployments().unwrap();
        runner.deployments().unwrap();
        let deployment_key = ObjectKey::new("apps", "Deployment", Some("app"), "waypoint");
        assert!(
            store.get(&deployment_key).unwrap().is_some(),
            "a Deployment owned by a Gateway is never collected"
        );
        let pods = store.list("", "Pod").unwrap();
        assert_eq!(pods.len(), 1);
        assert!(pods[0].name().starts_with("waypoint-"));
        assert_eq!(
            pods[0].0["metadata"]["labels"]["istio.io/dataplane-mode"],
            "none"
        );
        assert_eq!(pods[0].0["spec"]["containers"][0]["command"][0], "waypoint");
        store.delete(&[deployment_key]).unwrap();
        runner.deployments().unwrap();
        assert!(
            store.list("", "Pod").unwrap().is_empty(),
            "pods of a deleted Deployment are collected"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn selectors_match_labels() {
        let labels = json!({"app": "echo", "version": "v1"});
        let mut selector = BTreeMap::new();
        assert!(
            !labels_match(&labels, &selector),
            "an empty selector selects nothing"
        );
        selector.insert("app".to_owned(), "echo".to_owned());
        assert!(labels_match(&labels, &selector));
        selector.insert("version".to_owned(), "v2".to_owned());
        assert!(!labels_match(&labels, &selector));
    }
}
