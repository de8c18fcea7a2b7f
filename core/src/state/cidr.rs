//! An IP network (`address/prefix`) with containment, as WDS CIDR VIPs and authorization
//! `source_ips`/`destination_ips` use it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 network: an address and a prefix length in bits (0–32 or 0–128).
///
/// The host bits of the address are kept as given; [`Cidr::contains`] ignores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    address: IpAddr,
    prefix_len: u8,
}

/// Why bytes and a prefix length are not a [`Cidr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address is neither 4 (IPv4) nor 16 (IPv6) bytes long.
    #[error("address is {len} bytes, expected 4 or 16")]
    AddressLength {
        /// Length of the address in bytes.
        len: usize,
    },
    /// The prefix length exceeds the address family's width.
    #[error("prefix length {len} exceeds {max} bits")]
    PrefixLength {
        /// The prefix length given.
        len: u32,
        /// 32 for IPv4, 128 for IPv6.
        max: u8,
    },
}

/// Parses a WDS / authorization address: 4 bytes (IPv4) or 16 bytes (IPv6), network byte order.
///
/// # Errors
/// [`CidrError::AddressLength`] for any other length.
pub(crate) fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, CidrError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(CidrError::AddressLength { len: bytes.len() })
}

/// Width of `ip`'s family in bits: 32 or 128.
pub(crate) fn max_prefix_len(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

// === impl Cidr ===

impl Cidr {
    /// The network `address/prefix_len`.
    ///
    /// # Errors
    /// [`CidrError::PrefixLength`] when `prefix_len` is over 32 (IPv4) or 128 (IPv6).
    pub fn new(address: IpAddr, prefix_len: u32) -> Result<Self, CidrError> {
        let max = max_prefix_len(address);
        match u8::try_from(prefix_len) {
            Ok(len) if len <= max => Ok(Cidr {
                address,
                prefix_len: len,
            }),
            _ => Err(CidrError::PrefixLength {
                len: prefix_len,
                max,
            }),
        }
    }

    /// Parses proto `address` bytes (4 or 16) and a prefix length.
    ///
    /// # Errors
    /// [`CidrError::AddressLength`] for a bad byte length, [`CidrError::PrefixLength`] for a prefix
    /// longer than the family allows.
    pub fn from_bytes(address: &[u8], prefix_len: u32) -> Result<Self, CidrError> {
        Cidr::new(ip_from_bytes(address)?, prefix_len)
    }

    /// The network's address, host bits as given.
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` lies in this network. Against an IPv4 network, an IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`, as dual-stack sockets report peers) counts as its IPv4 form; otherwise
    /// families never mix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(net), ip) => match ip.to_canonical() {
                IpAddr::V4(ip) => {
                    let mask = u32::MAX
                        .checked_shl(32 - u32::from(self.prefix_len))
                        .unwrap_or(0);
                    u32::from(net) & mask == u32::from(ip) & mask
                }
                IpAddr::V6(_) => false,
            },
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}
