//! Where a waypoint or network gateway is reached (`istio.workload.GatewayAddress`).

use std::net::IpAddr;

use weft_proto::istio::workload as proto;

use super::cidr::ip_from_bytes;
use super::error::Reason;
use crate::hbone;

/// A waypoint or network gateway: where it is and on which port it serves HBONE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatewayAddress {
    /// The gateway's service or address.
    pub destination: GatewayDestination,
    /// Port the gateway serves HBONE (mTLS) on (`hbone_mtls_port`; 0 on the wire means
    /// [`hbone::PORT`], 15008).
    pub hbone_port: u16,
}

/// How a [`GatewayAddress`] names the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    /// A service, looked up by `namespace/hostname`; its endpoints are the gateway pods.
    Hostname {
        /// The service's namespace.
        namespace: String,
        /// The service's hostname (FQDN).
        hostname: String,
    },
    /// An address on a network: a gateway workload's IP or a gateway service's VIP.
    Address {
        /// The network the address belongs to (empty = the default network).
        network: String,
        /// The IP.
        ip: IpAddr,
    },
}

impl GatewayAddress {
    /// Converts the wire form; the error names the sub-field (`destination`, `hbone_mtls_port`,
    /// `address.address`) and why.
    fn from_proto(gw: proto::GatewayAddress) -> Result<Self, (&'static str, Reason)> {
        let destination = match gw.destination {
            Some(proto::gateway_address::Destination::Hostname(h)) => {
                GatewayDestination::Hostname {
                    namespace: h.namespace,
                    hostname: h.hostname,
                }
            }
            Some(proto::gateway_address::Destination::Address(a)) => GatewayDestination::Address {
                network: a.network,
                ip: ip_from_bytes(&a.address).map_err(|e| ("address.address", e.into()))?,
            },
            None => return Err(("destination", Reason::Missing)),
        };
        let hbone_port = match super::workload::port(gw.hbone_mtls_port) {
            Ok(0) => hbone::PORT,
            Ok(port) => port,
            Err(reason) => return Err(("hbone_mtls_port", reason)),
        };
        Ok(GatewayAddress {
            destination,
            hbone_port,
        })
    }
}

/// `hostname:port` for a service-named gateway, `ip:port` (after `network/` when not the default
/// network) for an address.
impl std::fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.destination {
            GatewayDestination::Hostname { hostname, .. } => {
                write!(f, "{hostname}:{}", self.hbone_port)
            }
            GatewayDestination::Address { network, ip } => {
                if !network.is_empty() {
                    write!(f, "{network}/")?;
                }
                write!(f, "{}", std::net::SocketAddr::new(*ip, self.hbone_port))
            }
        }
    }
}

/// Converts an optional gateway field, naming `field` in the error.
pub(crate) fn convert_optional(
    gw: Option<proto::GatewayAddress>,
    field: &'static str,
) -> Result<Option<GatewayAddress>, (String, Reason)> {
    gw.map(GatewayAddress::from_proto)
        .transpose()
        .map_err(|(sub, reason)| (format!("{field}.{sub}"), reason))
}
