//! IP blocks of authorization policies: `addr/len` CIDRs or bare addresses, IPv4 or IPv6.

use std::net::IpAddr;

/// An address range. Host bits set in the configured address are ignored (`10.1.2.3/8`
/// is `10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d[/n]` or `v6[/n]`; `None` when it is neither.
    pub(super) fn parse(s: &str) -> Option<Cidr> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                let l: u8 = l.parse().ok()?;
                if l > max {
                    return None;
                }
                l
            }
            Some(_) => return None,
        };
        Some(Cidr { addr, len })
    }

    /// Whether `ip` is in the range; IPv4-mapped IPv6 addresses count as IPv4.
    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cidr;

    fn contains(cidr: &str, ip: &str) -> bool {
        Cidr::parse(cidr).unwrap().contains(ip.parse().unwrap())
    }

    #[test]
    fn v4_ranges_and_bare_addresses() {
        assert!(contains("10.0.0.0/8", "10.255.1.2"));
        assert!(!contains("10.0.0.0/8", "11.0.0.1"));
        assert!(contains("10.1.2.3/8", "10.9.9.9"));
        assert!(contains("192.168.1.7", "192.168.1.7"));
        assert!(!contains("192.168.1.7", "192.168.1.8"));
        assert!(contains("0.0.0.0/0", "8.8.8.8"));
        assert!(!contains("0.0.0.0/0", "::1"));
        assert!(contains("10.0.0.0/8", "::ffff:10.0.0.1"));
    }

    #[test]
    fn v6_ranges_and_bare_addresses() {
        assert!(contains("2001:db8::/32", "2001:db8:1::5"));
        assert!(!contains("2001:db8::/32", "2001:db9::5"));
        assert!(contains("::1", "::1"));
        assert!(contains("::/0", "fe80::1"));
        assert!(!contains("::/0", "10.0.0.1"));
    }

    #[test]
    fn rejects_bad_blocks() {
        for bad in [
            "10.0.0/8",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "host",
            "",
            "10.0.0.0/+8",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }
}
