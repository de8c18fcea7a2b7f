//! AuthorizationPolicy and PeerAuthentication translation (placeholder: being written).
