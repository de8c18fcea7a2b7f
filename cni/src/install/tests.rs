//! The installer over temp dirs: chaining into a Calico-like conflist, `.conf` conversion,
//! idempotence, repair, malformed files left alone, waiting for the primary CNI, uninstall.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use serde_json::json;

use super::*;

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "ipam": {"type": "calico-ipam"},
      "policy": {"type": "k8s"},
      "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
    },
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

struct Dirs {
    root: PathBuf,
}

impl Dirs {
    fn new(name: &str) -> Dirs {
        let root = std::env::temp_dir().join(format!("weft-install-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net.d")).unwrap();
        std::fs::write(root.join("weft-cni-build"), b"#!/bin/sh\necho plugin\n").unwrap();
        Dirs { root }
    }

    fn conf(&self) -> PathBuf {
        self.root.join("net.d")
    }

    fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }

    fn config(&self) -> Config {
        Config {
            bin_dir: self.bin(),
            conf_dir: self.conf(),
            plugin_binary: self.root.join("weft-cni-build"),
            entry: entry(),
            poll: Duration::from_millis(20),
            uninstall_on_exit: true,
        }
    }

    fn json(&self, name: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.conf().join(name)).unwrap()).unwrap()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.conf())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn entry() -> Map<String, Value> {
    let Value::Object(map) = json!({
        "agent_socket": "/var/run/weft-cni/cni-agent.sock",
        "log_file": "/var/log/weft-cni.log",
    }) else {
        unreachable!()
    };
    map
}

fn ours() -> Value {
    json!({
        "type": "weft-cni",
        "agent_socket": "/var/run/weft-cni/cni-agent.sock",
        "log_file": "/var/log/weft-cni.log",
    })
}

#[test]
fn the_primary_config_is_the_lexically_first_conf_or_conflist() {
    assert_eq!(
        primary_config([
            "99-other.conflist",
            "10-calico.conflist",
            "05-x.json",
            "README"
        ]),
        Some("10-calico.conflist")
    );
    assert_eq!(
        primary_config(["20-b.conflist", "10-flannel.conf"]),
        Some("10-flannel.conf")
    );
    assert_eq!(
        primary_config([".10-calico.conflist.weft-tmp-7", "calico-kubeconfig"]),
        None
    );
}

#[test]
fn chains_into_a_calico_conflist_keeping_everything_else() {
    let dirs = Dirs::new("calico");
    std::fs::write(dirs.conf().join("10-calico.conflist"), CALICO).unwrap();
    std::fs::write(dirs.conf().join("calico-kubeconfig"), "kubeconfig").unwrap();
    let outcome = install_config(&dirs.conf(), &entry()).unwrap();
    assert_eq!(
        outcome,
        Outcome::Written(dirs.conf().join("10-calico.conflist"))
    );
    let mut want: Value = serde_json::from_str(CALICO).unwrap();
    want["plugins"].as_array_mut().unwrap().push(ours());
    assert_eq!(dirs.json("10-calico.conflist"), want);
    assert_eq!(
        dirs.names(),
        ["10-calico.conflist", "calico-kubeconfig"],
        "no temp files left"
    );
    let mode = std::fs::metadata(dirs.conf().join("10-calico.conflist"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[test]
fn installing_again_changes_nothing_and_never_duplicates() {
    let dirs = Dirs::new("idempotent");
    let path = dirs.conf().join("10-calico.conflist");
    std::fs::write(&path, CALICO).unwrap();
    install_config(&dirs.conf(), &entry()).unwrap();
    let first = std::fs::read(&path).unwrap();
    let inode = std::fs::metadata(&path).unwrap().ino();
    assert_eq!(
        install_config(&dirs.conf(), &entry()).unwrap(),
        Outcome::Unchanged(path.clone())
    );
    assert_eq!(std::fs::read(&path).unwrap(), first);
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "not rewritten"
    );

    // Changed settings replace our entry in place; stray copies are dropped.
    let mut doubled: Value = serde_json::from_str(CALICO).unwrap();
    let plugins = doubled["plugins"].as_array_mut().unwrap();
    plugins.insert(1, json!({"type": "weft-cni", "agent_socket": "/old.sock"}));
    plugins.push(json!({"type": "weft-cni"}));
    std::fs::write(&path, doubled.to_string()).unwrap();
    install_config(&dirs.conf(), &entry()).unwrap();
    let types: Vec<String> = dirs.json("10-calico.conflist")["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, ["calico", "weft-cni", "portmap", "bandwidth"]);
    assert_eq!(dirs.json("10-calico.conflist")["plugins"][1], ours());
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist() {
    let dirs = Dirs::new("conf");
    let flannel = json!({
        "name": "cbr0",
        "cniVersion": "0.3.1",
        "type": "flannel",
        "delegate": {"hairpinMode": true, "isDefaultGateway": true}
    });
    std::fs::write(dirs.conf().join("10-flannel.conf"), flannel.to_string()).unwrap();
    let outcome = install_config(&dirs.conf(), &entry()).unwrap();
    assert_eq!(
        outcome,
        Outcome::Written(dirs.conf().join("10-flannel.conflist"))
    );
    assert_eq!(
        dirs.names(),
        ["10-flannel.conflist"],
        "the .conf is replaced"
    );
    assert_eq!(
        dirs.json("10-flannel.conflist"),
        json!({"name": "cbr0", "cniVersion": "0.3.1", "plugins": [flannel, ours()]})
    );
    assert_eq!(
        install_config(&dirs.conf(), &entry()).unwrap(),
        Outcome::Unchanged(dirs.conf().join("10-flannel.conflist"))
    );
}

#[test]
fn malformed_configs_are_named_and_left_untouched() {
    let cases = [
        (
            "10-a.conflist",
            "{\"plugins\": [",
            "not JSON: EOF while parsing a list at line 1 column 13",
        ),
        (
            "10-a.conflist",
            "[1, 2]",
            "the top level is not a JSON object",
        ),
        ("10-a.conflist", "{\"name\": \"x\"}", "no \"plugins\" list"),
        (
            "10-a.conflist",
            "{\"plugins\": {}}",
            "\"plugins\" is not a list",
        ),
        (
            "10-a.conflist",
            "{\"plugins\": [{\"type\": \"a\"}, 3]}",
            "plugins[1] is not an object",
        ),
        (
            "10-a.conflist",
            "{\"plugins\": [{\"type\": \"a\"}, {\"ipam\": {}}]}",
            "plugins[1] has no string \"type\"",
        ),
        (
            "10-a.conf",
            "{\"name\": \"x\"}",
            "a single-plugin .conf needs a string \"type\"",
        ),
    ];
    for (name, text, reason) in cases {
        let dirs = Dirs::new("malformed");
        let path = dirs.conf().join(name);
        std::fs::write(&path, text).unwrap();
        let err = install_config(&dirs.conf(), &entry()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "CNI config {} is malformed (left untouched): {reason}",
                path.display()
            ),
            "{text}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "untouched");
        assert_eq!(dirs.names(), [name], "nothing else written");
        assert!(uninstall(&dirs.conf()).is_err(), "uninstall refuses it too");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}

#[test]
fn without_a_config_the_installer_waits() {
    let dirs = Dirs::new("waiting");
    std::fs::write(dirs.conf().join("calico-kubeconfig"), "x").unwrap();
    assert_eq!(
        install_config(&dirs.conf(), &entry()).unwrap(),
        Outcome::Waiting
    );
    assert_eq!(
        install_config(&dirs.root.join("missing"), &entry()).unwrap(),
        Outcome::Waiting,
        "a conf dir not yet created is a wait too"
    );
    assert_eq!(dirs.names(), ["calico-kubeconfig"]);
}

#[test]
fn the_binary_is_copied_executable_and_replaced_when_changed() {
    let dirs = Dirs::new("binary");
    let source = dirs.root.join("weft-cni-build");
    let (installed, copied) = install_binary(&source, &dirs.bin(), None).unwrap();
    assert!(copied);
    let target = dirs.bin().join("weft-cni");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(&source).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        install_binary(&source, &dirs.bin(), installed).unwrap(),
        (installed, false)
    );
    // A fresh agent (nothing remembered) finds identical bytes and does not rewrite.
    assert!(!install_binary(&source, &dirs.bin(), None).unwrap().1);
    // Someone replaces it: the next pass puts ours back.
    std::fs::remove_file(&target).unwrap();
    std::fs::write(&target, b"other").unwrap();
    assert!(install_binary(&source, &dirs.bin(), installed).unwrap().1);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(&source).unwrap()
    );
    let err = install_binary(&dirs.root.join("nope"), &dirs.bin(), None).unwrap_err();
    assert!(
        err.to_string().starts_with("reading the plugin binary ")
            && err.to_string().ends_with("/nope"),
        "{err}"
    );
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn run_waits_installs_repairs_and_uninstalls() {
    let dirs = Dirs::new("run");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(dirs.config(), async {
        let _ = stopped.await;
    }));
    let path = dirs.conf().join("10-calico.conflist");
    let chained = |dirs: &Dirs| {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .is_some_and(|v| {
                v["plugins"]
                    .as_array()
                    .is_some_and(|p| p.iter().filter(|p| **p == ours()).count() == 1)
            })
            && dirs.bin().join("weft-cni").exists()
    };

    // The primary CNI writes its config later.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(!path.exists());
    std::fs::write(&path, CALICO).unwrap();
    until("the entry is chained", || chained(&dirs)).await;

    // The primary CNI rewrites its file (our entry gone): repaired.
    std::fs::write(&path, CALICO).unwrap();
    until("the entry is back after a rewrite", || chained(&dirs)).await;

    // The binary is deleted: repaired.
    std::fs::remove_file(dirs.bin().join("weft-cni")).unwrap();
    until("the binary is back", || chained(&dirs)).await;

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("run ends on shutdown")
        .unwrap();
    assert_eq!(
        dirs.json("10-calico.conflist"),
        serde_json::from_str::<Value>(CALICO).unwrap()
    );
    assert!(
        dirs.bin().join("weft-cni").exists(),
        "the binary stays for DELs of old pods"
    );
}
