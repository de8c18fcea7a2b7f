//! CNI: the per-node network configuration list and its execution exactly as a container
//! runtime does it (CNI specification 1.0: `CNI_*` environment, config on stdin, `prevResult`
//! chaining on ADD, DEL in reverse order with the cached ADD result).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use super::layout::{self, Layout};
use super::netns;

/// CNI spec version used in generated configs.
pub const CNI_VERSION: &str = "1.0.0";

/// Name of the network configuration list.
pub const NETWORK_NAME: &str = "weft";

/// Errors running CNI plugins.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plugin binary is not in any plugin directory.
    #[error("cni plugin {plugin:?} not found in {dirs:?}")]
    PluginNotFound {
        /// Plugin type.
        plugin: String,
        /// Directories searched.
        dirs: Vec<PathBuf>,
    },
    /// The plugin failed; `message` is the CNI error `msg` (and `details`) when it printed one.
    #[error("cni {command} {plugin} failed: {message}")]
    Plugin {
        /// ADD or DEL.
        command: &'static str,
        /// Plugin type.
        plugin: String,
        /// The error.
        message: String,
    },
    /// The plugin's output is not a CNI result.
    #[error("cni {command} {plugin}: invalid result {output:?}")]
    BadResult {
        /// ADD or DEL.
        command: &'static str,
        /// Plugin type.
        plugin: String,
        /// What it printed.
        output: String,
    },
    /// The final ADD result has no IPv4 address.
    #[error("cni result has no ipv4 address for the pod")]
    NoAddress,
    /// The config list could not be read or written.
    #[error("cni config {path}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The network configuration list for node `node`: `bridge` (pod bridge `cni0` with the node's
/// pod CIDR from `host-local`, routes only to the cluster ranges and the probe SNAT address — no
/// default route) followed by
/// `extra` chained plugins (e.g. the Weft CNI plugin).
pub fn conflist(layout: &Layout, node: u8, extra: &[Value]) -> Value {
    let ipam_dir = layout.node_dir(node).join("ipam");
    let net = |(ip, len): (Ipv4Addr, u8)| format!("{ip}/{len}");
    let mut plugins = vec![json!({
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{
                "subnet": format!("{}/24", layout::pod_cidr(node)),
                "gateway": layout::pod_gateway(node).to_string(),
            }]],
            "routes": [
                {"dst": net(layout::POD_NETWORK)},
                {"dst": net(layout::SERVICE_NETWORK)},
                {"dst": net(layout::NODE_NETWORK)},
                // Replies to node-local health probes, which the node agent SNATs to the
                // ambient probe address (Istio's 169.254.7.127) for enrolled pods.
                {"dst": "169.254.7.127/32"},
            ],
            "dataDir": ipam_dir,
        }
    })];
    plugins.extend(extra.iter().cloned());
    json!({"cniVersion": CNI_VERSION, "name": NETWORK_NAME, "plugins": plugins})
}

/// The loopback network, invoked for every pod before the config list (as container runtimes do).
fn loopback() -> Value {
    json!({"cniVersion": CNI_VERSION, "name": "loopback", "type": "loopback"})
}

/// One pod's CNI invocation parameters.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The node network namespace the plugins run in (the "host" side for the pod).
    pub node_netns: String,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub pod_netns_path: PathBuf,
    /// `CNI_CONTAINERID` (the pod UID).
    pub container_id: String,
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME`.
    pub pod_name: String,
    /// `K8S_POD_UID`.
    pub pod_uid: String,
    /// Directories searched for plugin binaries (`CNI_PATH`).
    pub plugin_dirs: Vec<PathBuf>,
    /// Paths of the node's own file system the plugins see at their node paths (what a pod
    /// installed for them, e.g. the node agent's socket named in the configuration).
    pub binds: Vec<netns::Bind>,
}

impl Invocation {
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.pod_namespace, self.pod_name, self.container_id, self.pod_uid
        )
    }

    fn find(&self, plugin: &str) -> Result<PathBuf, Error> {
        self.plugin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| Error::PluginNotFound {
                plugin: plugin.to_owned(),
                dirs: self.plugin_dirs.clone(),
            })
    }

    fn exec(
        &self,
        command: &'static str,
        ifname: &str,
        config: &Value,
    ) -> Result<Option<Value>, Error> {
        let plugin = config["type"].as_str().unwrap_or_default().to_owned();
        let binary = self.find(&plugin)?;
        let cni_path = std::env::join_paths(&self.plugin_dirs).unwrap_or_default();
        let mut cmd: Command = netns::command_in(&self.node_netns, &binary);
        netns::with_binds(&mut cmd, &self.binds).map_err(|e| Error::Plugin {
            command,
            plugin: plugin.clone(),
            message: format!("preparing the node's paths: {e}"),
        })?;
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", &self.pod_netns_path)
            .env("CNI_IFNAME", ifname)
            .env("CNI_ARGS", self.cni_args())
            .env("CNI_PATH", cni_path);
        let input = serde_json::to_vec(config).unwrap_or_default();
        match netns::run(&mut cmd, Some(&input)) {
            Ok(stdout) if stdout.trim().is_empty() => Ok(None),
            Ok(stdout) => serde_json::from_str(&stdout)
                .map(Some)
                .map_err(|_| Error::BadResult {
                    command,
                    plugin,
                    output: stdout,
                }),
            Err(netns::Error::Failed { stderr, stdout, .. }) => Err(Error::Plugin {
                command,
                plugin,
                message: error_message(&stdout).unwrap_or(stderr),
            }),
            Err(err) => Err(Error::Plugin {
                command,
                plugin,
                message: err.to_string(),
            }),
        }
    }
}

/// The text of a CNI error result (`{"code", "msg", "details"}` on stdout):
/// `code N: msg (details)`.
fn error_message(stdout: &str) -> Option<String> {
    let error: Value = serde_json::from_str(stdout).ok()?;
    let code = error["code"].as_u64()?;
    let msg = error["msg"].as_str().unwrap_or_default();
    Some(match error["details"].as_str().filter(|d| !d.is_empty()) {
        Some(details) => format!("code {code}: {msg} ({details})"),
        None => format!("code {code}: {msg}"),
    })
}

/// Builds a single plugin's config from the list: list-level `cniVersion` and `name`, and
/// `prevResult` when chaining.
fn plugin_config(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
    let mut config = plugin.clone();
    config["cniVersion"] = list["cniVersion"].clone();
    config["name"] = list["name"].clone();
    if let Some(prev) = prev {
        config["prevResult"] = prev.clone();
    }
    config
}

/// CNI ADD: loopback, then each plugin of `list` in order, chaining `prevResult`. Returns the
/// final result.
///
/// # Errors
/// [`Error`] from the first failing plugin (the caller runs [`del`] to clean up).
pub fn add(list: &Value, inv: &Invocation) -> Result<Value, Error> {
    inv.exec("ADD", "lo", &loopback())?;
    let mut prev: Option<Value> = None;
    for plugin in list["plugins"].as_array().into_iter().flatten() {
        let config = plugin_config(list, plugin, prev.as_ref());
        let result = inv.exec("ADD", "eth0", &config)?;
        let plugin_type = plugin["type"].as_str().unwrap_or_default().to_owned();
        prev = Some(result.ok_or(Error::BadResult {
            command: "ADD",
            plugin: plugin_type,
            output: String::new(),
        })?);
    }
    prev.ok_or(Error::NoAddress)
}

/// CNI DEL: each plugin of `list` in reverse order with the cached ADD result as `prevResult`,
/// then loopback. Every plugin is called even if one fails; the first error is returned.
///
/// # Errors
/// The first [`Error`].
pub fn del(list: &Value, inv: &Invocation, cached: Option<&Value>) -> Result<(), Error> {
    let mut first_error = None;
    let plugins: Vec<&Value> = list["plugins"].as_array().into_iter().flatten().collect();
    for plugin in plugins.into_iter().rev() {
        let config = plugin_config(list, plugin, cached);
        if let Err(err) = inv.exec("DEL", "eth0", &config) {
            first_error.get_or_insert(err);
        }
    }
    if let Err(err) = inv.exec("DEL", "lo", &loopback()) {
        first_error.get_or_insert(err);
    }
    first_error.map_or(Ok(()), Err)
}

/// The pod's IPv4 address from a CNI result (the first `ips` entry on a sandbox interface).
///
/// # Errors
/// [`Error::NoAddress`].
pub fn pod_ip(result: &Value) -> Result<Ipv4Addr, Error> {
    let interfaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| {
            ip["interface"]
                .as_u64()
                .and_then(|i| interfaces.get(i as usize))
                .is_none_or(|iface| !iface["sandbox"].is_null())
        })
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .next()
        .ok_or(Error::NoAddress)
}

/// Writes `list` to `path`.
///
/// # Errors
/// [`Error::Config`].
pub fn write_conflist(path: &Path, list: &Value) -> Result<(), Error> {
    let io = |source| Error::Config {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let text = serde_json::to_string_pretty(list).unwrap_or_default();
    std::fs::write(path, text).map_err(io)
}

/// Reads a config list.
///
/// # Errors
/// [`Error::Config`].
pub fn read_conflist(path: &Path) -> Result<Value, Error> {
    let io = |source| Error::Config {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    serde_json::from_str(&text).map_err(|e| io(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_has_no_default_route_and_chains_extras() {
        let layout = Layout::new("t", Some(Path::new("/tmp/x"))).unwrap();
        let list = conflist(&layout, 2, &[json!({"type": "weft-cni"})]);
        let plugins = list["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[1]["type"], "weft-cni");
        let ipam = &plugins[0]["ipam"];
        assert_eq!(ipam["ranges"][0][0]["subnet"], "10.244.2.0/24");
        let routes: Vec<&str> = ipam["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap())
            .collect();
        assert_eq!(
            routes,
            [
                "10.244.0.0/16",
                "10.96.0.0/16",
                "10.240.0.0/24",
                "169.254.7.127/32"
            ]
        );
        let config = plugin_config(&list, &plugins[1], Some(&json!({"ips": []})));
        assert_eq!(config["name"], "weft");
        assert_eq!(config["cniVersion"], "1.0.0");
        assert!(config["prevResult"].is_object());
    }

    #[test]
    fn plugin_error_results_become_the_message() {
        assert_eq!(
            error_message(r#"{"cniVersion":"1.0.0","code":11,"msg":"agent down","details":"connect: refused"}"#)
                .as_deref(),
            Some("code 11: agent down (connect: refused)")
        );
        assert_eq!(
            error_message(r#"{"code":7,"msg":"bad config"}"#).as_deref(),
            Some("code 7: bad config")
        );
        assert_eq!(error_message("not json"), None);
        assert_eq!(error_message(r#"{"msg":"no code"}"#), None);
    }

    #[test]
    fn pod_ip_comes_from_the_sandbox_interface() {
        let result = json!({
            "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [{"interface": 2, "address": "10.244.1.7/24", "gateway": "10.244.1.1"}]
        });
        assert_eq!(pod_ip(&result).unwrap(), Ipv4Addr::new(10, 244, 1, 7));
        assert!(pod_ip(&json!({"ips": []})).is_err());
    }
}
