//! The one place request failures become HTTP statuses and Envoy-style `response_flags`.

use http::StatusCode;

/// Why the waypoint answered a request itself (or failed to get an upstream answer).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// L7 authorization denied the request.
    #[error("denied: {0}")]
    Denied(String),
    /// No route matched.
    #[error("no route matched")]
    NoRoute,
    /// The backend service is not known.
    #[error("no such backend service {0}")]
    NoCluster(String),
    /// The backend has no endpoints, or all are ejected / unhealthy.
    #[error("no healthy upstream for {0}")]
    NoHealthyUpstream(String),
    /// Connecting (TCP, TLS, HBONE CONNECT or HTTP handshake) to the endpoint failed.
    #[error("upstream connect to {endpoint} failed: {reason}")]
    ConnectFailure {
        /// The endpoint (`ip:port`).
        endpoint: String,
        /// The cause, as text.
        reason: String,
    },
    /// The request or attempt deadline passed.
    #[error("upstream request timeout")]
    Timeout,
    /// The upstream reset the stream or broke the HTTP protocol.
    #[error("upstream reset: {0}")]
    UpstreamReset(String),
}

impl Error {
    /// The status answered downstream.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Denied(_) => StatusCode::FORBIDDEN,
            Error::NoRoute => StatusCode::NOT_FOUND,
            Error::NoCluster(_) | Error::NoHealthyUpstream(_) | Error::ConnectFailure { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Error::UpstreamReset(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The Envoy response flag (`%RESPONSE_FLAGS%` short names).
    pub fn response_flags(&self) -> &'static str {
        match self {
            Error::Denied(_) => "RBAC",
            Error::NoRoute => "NR",
            Error::NoCluster(_) => "NC",
            Error::NoHealthyUpstream(_) => "UH",
            Error::ConnectFailure { .. } => "UF",
            Error::Timeout => "UT",
            Error::UpstreamReset(_) => "UR",
        }
    }

    /// The response body (Envoy's local reply texts).
    pub fn body(&self) -> &'static str {
        match self {
            Error::Denied(_) => "RBAC: access denied",
            Error::NoRoute => "",
            Error::NoCluster(_) | Error::NoHealthyUpstream(_) => "no healthy upstream",
            Error::ConnectFailure { .. } => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            }
            Error::Timeout => "upstream request timeout",
            Error::UpstreamReset(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: remote reset"
            }
        }
    }

    /// The gRPC status a gRPC client is answered with (Envoy's HTTP → gRPC mapping: 403
    /// `PERMISSION_DENIED` 7, 404 `UNIMPLEMENTED` 12, 502/503/504 `UNAVAILABLE` 14).
    pub fn grpc_status(&self) -> u16 {
        match self.status().as_u16() {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502..=504 => 14,
            _ => 2,
        }
    }

    /// Whether a retry may help (connect failures and resets; timeouts of an attempt are
    /// retried by the caller when the whole-request deadline allows).
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            Error::ConnectFailure { .. } | Error::UpstreamReset(_) | Error::Timeout
        )
    }

    /// Whether the outlier detector counts it against the endpoint.
    pub fn is_endpoint_failure(&self) -> bool {
        matches!(
            self,
            Error::ConnectFailure { .. } | Error::UpstreamReset(_) | Error::Timeout
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_mapping_table() {
        let cases: Vec<(Error, u16, &str)> = vec![
            (Error::Denied("p".into()), 403, "RBAC"),
            (Error::NoRoute, 404, "NR"),
            (Error::NoCluster("x".into()), 503, "NC"),
            (Error::NoHealthyUpstream("x".into()), 503, "UH"),
            (
                Error::ConnectFailure {
                    endpoint: "10.0.0.1:80".into(),
                    reason: "refused".into(),
                },
                503,
                "UF",
            ),
            (Error::Timeout, 504, "UT"),
            (Error::UpstreamReset("rst".into()), 502, "UR"),
        ];
        for (error, status, flags) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.response_flags(), flags, "{error}");
        }
        assert_eq!(Error::Denied("p".into()).body(), "RBAC: access denied");
        assert_eq!(Error::Denied("p".into()).grpc_status(), 7);
        assert_eq!(Error::NoRoute.grpc_status(), 12);
        assert_eq!(Error::Timeout.grpc_status(), 14);
        assert!(Error::UpstreamReset("x".into()).retriable());
        assert!(!Error::NoHealthyUpstream("x".into()).retriable());
    }
}
