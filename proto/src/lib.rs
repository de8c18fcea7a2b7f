//! Weft's wire types: prost messages and tonic client/server stubs generated from the
//! `.proto` files under `proto/` (Istio workload discovery, L4 authorization, ZDS, the
//! Istio CA service, and the trimmed Envoy aggregated discovery service).
//!
//! This crate owns the wire format and nothing else: no validation, no conversion into
//! domain types, no I/O. Module paths mirror the protobuf package names, so
//! `istio.workload.Workload` is [`istio::workload::Workload`]. See `proto/README.md`.

/// Protobuf packages under `istio.*`.
pub mod istio {
    /// `istio.workload`: WDS resources ([`Address`](workload::Address),
    /// [`Workload`](workload::Workload), [`Service`](workload::Service), ...).
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));

        /// `istio.workload.zds`: messages between the CNI node agent and the node proxy.
        #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }

    /// `istio.security`: the L4 [`Authorization`](security::Authorization) resource.
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }

    /// Protobuf packages under `istio.v1`.
    pub mod v1 {
        /// `istio.v1.auth`: the CA's `IstioCertificateService`.
        #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

/// Protobuf packages under `envoy.*` (a trimmed, wire-compatible subset).
pub mod envoy {
    /// Protobuf packages under `envoy.config`.
    pub mod config {
        /// Protobuf packages under `envoy.config.core`.
        pub mod core {
            /// `envoy.config.core.v3`: the xDS client [`Node`](v3::Node).
            #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
            }
        }
    }

    /// Protobuf packages under `envoy.service`.
    pub mod service {
        /// Protobuf packages under `envoy.service.discovery`.
        pub mod discovery {
            /// `envoy.service.discovery.v3`: `AggregatedDiscoveryService` and its messages.
            #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

/// Protobuf packages under `google.*` that are not prost well-known types.
pub mod google {
    /// `google.rpc`: [`Status`](rpc::Status), carried as xDS `error_detail`.
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

/// Protobuf packages under `weft.*` (Weft's own resources and test app).
pub mod weft {
    /// Protobuf packages under `weft.echo`.
    pub mod echo {
        /// `weft.echo.v1`: the test app's gRPC `Echo` service.
        #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/weft.echo.v1.rs"));
        }
    }

    /// Protobuf packages under `weft.l7`.
    pub mod l7 {
        /// `weft.l7.v1`: waypoint configuration ([`ServiceConfig`](v1::ServiceConfig) routes
        /// and [`Policy`](v1::Policy) L7 authorization), scoped per waypoint.
        #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/weft.l7.v1.rs"));
        }
    }
}

/// xDS type URLs of the resources the node proxy and the waypoint subscribe to.
pub mod type_url {
    /// Type URL of [`Address`](crate::istio::workload::Address) resources (workloads and
    /// services).
    pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
    /// Type URL of [`Authorization`](crate::istio::security::Authorization) resources.
    pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
    /// Type URL of the waypoint's per-service routes
    /// ([`ServiceConfig`](crate::weft::l7::v1::ServiceConfig)).
    pub const L7_SERVICE_TYPE_URL: &str = "type.googleapis.com/weft.l7.v1.ServiceConfig";
    /// Type URL of the waypoint's L7 authorization policies
    /// ([`Policy`](crate::weft::l7::v1::Policy)).
    pub const L7_POLICY_TYPE_URL: &str = "type.googleapis.com/weft.l7.v1.Policy";
}

pub use type_url::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_POLICY_TYPE_URL, L7_SERVICE_TYPE_URL,
};
