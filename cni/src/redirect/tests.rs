//! Golden rule sets, written out by hand from the reference (§5.2), and a root test that the
//! kernel accepts them and that applying is idempotent and removal complete.

use super::*;

const DEFAULT_POD: &str = r#"table inet weft-ambient
delete table inet weft-ambient
table inet weft-ambient {
  chain prerouting_mangle {
    type filter hook prerouting priority mangle; policy accept;
    meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111
  }
  chain output_mangle {
    type route hook output priority mangle; policy accept;
    ct mark & 0xfff == 0x111 meta mark set ct mark
  }
  chain prerouting_nat {
    type nat hook prerouting priority dstnat; policy accept;
    ip saddr 169.254.7.127 meta l4proto tcp accept
    ip daddr != 127.0.0.1 tcp dport != 15008 meta mark & 0xfff != 0x539 redirect to :15006
  }
  chain output_nat {
    type nat hook output priority -100; policy accept;
    ip daddr 169.254.7.127 meta l4proto tcp accept
    oifname != "lo" meta nfproto ipv4 udp dport 53 meta mark & 0xfff != 0x539 redirect to :15053
    ip daddr != 127.0.0.1 tcp dport 53 meta mark & 0xfff != 0x539 redirect to :15053
    meta l4proto tcp meta mark & 0xfff == 0x111 accept
    oifname "lo" ip daddr != 127.0.0.1 accept
    ip daddr != 127.0.0.1 meta l4proto tcp meta mark & 0xfff != 0x539 redirect to :15001
  }
  chain prerouting_raw {
    type filter hook prerouting priority raw; policy accept;
    udp sport 53 meta mark & 0xfff != 0x539 ct zone set 1
  }
  chain output_raw {
    type filter hook output priority raw; policy accept;
    udp dport 53 meta mark & 0xfff == 0x539 ct zone set 1
  }
}
"#;

#[test]
fn default_pod() {
    assert_eq!(ruleset(&PodConfig::default()), DEFAULT_POD);
}

#[test]
fn dns_capture_off() {
    let expected: String = DEFAULT_POD
        .lines()
        .filter(|l| !l.contains(":15053") && !l.contains("ct zone"))
        .collect::<Vec<_>>()
        .join("\n");
    // Without DNS the raw chains are absent altogether.
    let expected = expected.replace(
        "  chain prerouting_raw {\n    type filter hook prerouting priority raw; policy accept;\n  }\n  chain output_raw {\n    type filter hook output priority raw; policy accept;\n  }\n",
        "",
    ) + "\n";
    let got = ruleset(&PodConfig {
        dns_capture: false,
        ..PodConfig::default()
    });
    assert_eq!(got, expected);
    assert!(!got.contains("raw"));
}

#[test]
fn ipv6_pod_gets_both_families() {
    let got = ruleset(&PodConfig {
        ipv6: true,
        dns_capture: false,
        bypass_inbound: false,
    });
    for line in [
        "    ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff meta l4proto tcp accept",
        "    ip6 daddr != ::1 tcp dport != 15008 meta mark & 0xfff != 0x539 redirect to :15006",
        "    oifname \"lo\" ip6 daddr != ::1 accept",
        "    ip6 daddr != ::1 meta l4proto tcp meta mark & 0xfff != 0x539 redirect to :15001",
        "    ip daddr != 127.0.0.1 meta l4proto tcp meta mark & 0xfff != 0x539 redirect to :15001",
    ] {
        assert!(
            got.contains(&format!("{line}\n")),
            "missing {line:?} in\n{got}"
        );
    }
    let routes = routes(&PodConfig {
        ipv6: true,
        ..PodConfig::default()
    });
    assert_eq!(
        routes,
        vec![
            "-4 rule add fwmark 0x111/0xfff pref 32764 lookup 100"
                .split(' ')
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            "-4 route add local 0.0.0.0/0 dev lo table 100"
                .split(' ')
                .map(str::to_owned)
                .collect(),
            "-6 rule add fwmark 0x111/0xfff pref 32764 lookup 100"
                .split(' ')
                .map(str::to_owned)
                .collect(),
            "-6 route add local ::/0 dev lo table 100"
                .split(' ')
                .map(str::to_owned)
                .collect(),
        ]
    );
}

#[test]
fn ingress_pods_get_outbound_capture_only() {
    let got = ruleset(&PodConfig {
        bypass_inbound: true,
        dns_capture: false,
        ipv6: false,
    });
    assert!(
        !got.contains(":15006") && !got.contains("169.254.7.127") && !got.contains("ct mark set")
    );
    assert!(got.contains("redirect to :15001"));
}

#[test]
fn the_kernel_accepts_the_rules_and_apply_is_idempotent() {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().nth(1))
        == Some("0");
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root (network namespaces) and CI is set: a skip in CI is a failure"
        );
        eprintln!(
            "SKIPPED the_kernel_accepts_the_rules_and_apply_is_idempotent: needs root (network namespaces)"
        );
        return;
    }
    let name = format!("weft-redirecttest-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.0])
                .status();
        }
    }
    let _guard = Guard(name.clone());
    // Like a pod after the loopback plugin ran.
    assert!(
        Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );
    let path = std::path::PathBuf::from(format!("/run/netns/{name}"));
    let list = |args: &[&str]| {
        run_in(
            &path,
            args[0],
            &args[1..]
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>(),
            None,
        )
        .unwrap()
    };
    for config in [
        PodConfig::default(),
        PodConfig {
            ipv6: true,
            ..PodConfig::default()
        },
    ] {
        apply(&path, &config).unwrap();
        let first = (
            list(&["nft", "list", "ruleset"]),
            list(&["ip", "rule"]),
            list(&["ip", "route", "show", "table", "100"]),
        );
        assert!(first.0.contains("redirect to :15001"), "{}", first.0);
        assert!(
            first.1.contains("fwmark 0x111/0xfff lookup 100"),
            "{}",
            first.1
        );
        assert!(first.2.contains("local default dev lo"), "{}", first.2);
        apply(&path, &config).unwrap();
        let second = (
            list(&["nft", "list", "ruleset"]),
            list(&["ip", "rule"]),
            list(&["ip", "route", "show", "table", "100"]),
        );
        assert_eq!(first, second, "re-applying changes nothing");
        assert_eq!(second.0.matches("table inet weft-ambient").count(), 1);
        remove(&path, &config).unwrap();
        assert!(!list(&["nft", "list", "ruleset"]).contains("weft-ambient"));
        assert!(!list(&["ip", "rule"]).contains("lookup 100"));
        remove(&path, &config).unwrap(); // removing twice is fine
    }
}
