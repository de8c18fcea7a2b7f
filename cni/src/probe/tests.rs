//! The probe SNAT table as text (golden, written by hand from the reference §4.4), and a root
//! test in throwaway network namespaces: the kernel accepts the table, elements come and go,
//! a locally generated connection to an enrolled pod is SNATed and a forwarded one is not.
#![allow(clippy::unwrap_used)] // test helpers fail loudly

use super::*;

const TWO_PODS: &str = "table inet weft-ambient-host
delete table inet weft-ambient-host
table inet weft-ambient-host {
  set probe-pods-v4 {
    type ipv4_addr;
    elements = { 10.244.1.5, 10.244.1.7 };
  }
  set probe-pods-v6 {
    type ipv6_addr;
    elements = { fd00::5 };
  }
  chain postrouting_nat {
    type nat hook postrouting priority srcnat - 10; policy accept;
    meta l4proto tcp ip daddr @probe-pods-v4 meta skuid >= 0 snat ip to 169.254.7.127
    meta l4proto tcp ip6 daddr @probe-pods-v6 meta skuid >= 0 snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff
  }
}
";

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn table_with_pods() {
    assert_eq!(
        ruleset(&ips(&["10.244.1.7", "fd00::5", "10.244.1.5"])),
        TWO_PODS
    );
}

#[test]
fn empty_table_has_sets_without_elements() {
    let got = ruleset(&BTreeSet::new());
    let expected: String = TWO_PODS
        .lines()
        .filter(|l| !l.contains("elements"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn updates_are_one_transaction_and_removal_is_idempotent() {
    let a: IpAddr = "10.244.1.5".parse().unwrap();
    let b: IpAddr = "fd00::5".parse().unwrap();
    assert_eq!(
        update(&[a, b], &[]),
        "add element inet weft-ambient-host probe-pods-v4 { 10.244.1.5 }\n\
         add element inet weft-ambient-host probe-pods-v6 { fd00::5 }\n"
    );
    assert_eq!(
        update(&[], &[a]),
        "add element inet weft-ambient-host probe-pods-v4 { 10.244.1.5 }\n\
         delete element inet weft-ambient-host probe-pods-v4 { 10.244.1.5 }\n"
    );
    assert_eq!(update(&[], &[]), "");
}

struct Netns(String);

impl Netns {
    fn new(role: &str) -> Netns {
        let name = format!("weft-test-{role}-{}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success(),
            "ip netns add {name}"
        );
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let status = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "ip -n {} {args:?}", self.0);
    }

    fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?} in {}: {out:?}", self.0);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Opens (and at once loses) a TCP connection to `addr` port 9 from this namespace. The
    /// target has no listener: the SYN is answered by a RST, which is all the test needs.
    fn connect(&self, addr: &str) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.0, "timeout", "3", "bash", "-c"])
            .arg(format!("echo > /dev/tcp/{addr}/9"))
            .stderr(Stdio::null())
            .status()
            .unwrap();
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// Links `a` (address `.1`) and `b` (address `.2`) in `subnet` (`x.y.z` of a /24).
fn link(a: &Netns, b: &Netns, subnet: &str, if_a: &str, if_b: &str) {
    a.ip(&[
        "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", &b.0,
    ]);
    a.ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", if_a]);
    a.ip(&["link", "set", if_a, "up"]);
    b.ip(&["addr", "add", &format!("{subnet}.2/24"), "dev", if_b]);
    b.ip(&["link", "set", if_b, "up"]);
    b.ip(&["route", "add", "default", "via", &format!("{subnet}.1")]);
}

/// Packets counted by the pod's counter rule for `source`.
fn seen_from(pod: &Netns, source: &str) -> u64 {
    let table = pod.exec(&["nft", "list", "table", "inet", "seen"]);
    table
        .lines()
        .find(|l| l.contains(&format!("ip saddr {source} ")))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter for {source} in\n{table}"))
}

#[test]
fn local_probes_are_snated_and_forwarded_traffic_is_not() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root (network namespaces, nftables) and CI is set: a skip in CI is a failure"
        );
        eprintln!(
            "SKIPPED local_probes_are_snated_and_forwarded_traffic_is_not: needs root (network namespaces, nftables)"
        );
        return;
    }
    // node ── pod (10.99.0.0/24), node ── client (10.98.0.0/24); the node forwards.
    let node = Netns::new("node");
    let pod = Netns::new("pod");
    let client = Netns::new("client");
    link(&node, &pod, "10.99.0", "wt-pod", "eth0");
    link(&node, &client, "10.98.0", "wt-client", "eth0");
    node.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    let counters = "table inet seen { chain input { type filter hook input priority 0; policy accept; \
         ip saddr 169.254.7.127 tcp dport 9 counter; ip saddr 10.99.0.1 tcp dport 9 counter; \
         ip saddr 10.98.0.2 tcp dport 9 counter; }; }";
    pod.exec(&["nft", counters]);

    let snat = Snat::in_netns(node.path());
    snat.sync(&BTreeSet::new()).unwrap();
    snat.sync(&BTreeSet::new()).unwrap(); // re-creating is fine
    let listed = node.exec(&["nft", "list", "table", "inet", TABLE]);
    assert!(
        listed.contains("meta skuid >= 0 snat ip to 169.254.7.127")
            && listed.contains("snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
            && listed.contains("type nat hook postrouting priority srcnat - 10; policy accept;"),
        "{listed}"
    );
    assert!(!listed.contains("elements"), "{listed}");

    // Not enrolled: the node's own address reaches the pod.
    node.connect("10.99.0.2");
    assert_eq!(seen_from(&pod, "10.99.0.1"), 1);
    assert_eq!(seen_from(&pod, "169.254.7.127"), 0);

    let pod_ip: IpAddr = "10.99.0.2".parse().unwrap();
    let v6: IpAddr = "fd00::2".parse().unwrap();
    snat.update(&[pod_ip, v6], &[]).unwrap();
    snat.update(&[pod_ip], &[]).unwrap(); // adding twice is fine
    let v4_set = || node.exec(&["nft", "list", "set", "inet", TABLE, SET_V4]);
    assert!(
        v4_set().contains("elements = { 10.99.0.2 }"),
        "{}",
        v4_set()
    );
    assert!(
        node.exec(&["nft", "list", "set", "inet", TABLE, SET_V6])
            .contains("elements = { fd00::2 }")
    );

    // Enrolled: a local connection arrives from the probe address, a forwarded one keeps its
    // client's address.
    node.connect("10.99.0.2");
    assert_eq!(seen_from(&pod, "169.254.7.127"), 1, "local SYN SNATed");
    assert_eq!(seen_from(&pod, "10.99.0.1"), 1, "no new unSNATed SYN");
    client.connect("10.99.0.2");
    assert_eq!(seen_from(&pod, "10.98.0.2"), 1, "forwarded SYN not SNATed");
    assert_eq!(seen_from(&pod, "169.254.7.127"), 1);

    // A restart re-creates the table with the enrolled IPs in one go.
    snat.sync(&[pod_ip].into_iter().collect()).unwrap();
    assert!(
        v4_set().contains("elements = { 10.99.0.2 }"),
        "{}",
        v4_set()
    );

    snat.update(&[], &[pod_ip, v6]).unwrap();
    snat.update(&[], &[pod_ip]).unwrap(); // removing twice is fine
    assert!(!v4_set().contains("elements"), "{}", v4_set());
    node.connect("10.99.0.2");
    assert_eq!(seen_from(&pod, "10.99.0.1"), 2, "released: no SNAT");
    assert_eq!(seen_from(&pod, "169.254.7.127"), 1);
}
