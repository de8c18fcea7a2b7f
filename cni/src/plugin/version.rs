//! CNI spec versions weft-cni speaks, and the `VERSION` result.
//!
//! weft-cni supports spec 1.0.0 and 1.1.0 only (CNI spec §"Version": `supportedVersions`). Both
//! share the 1.x result shape (1.1.0 only adds optional fields), so a 1.0.0 `prevResult` is a
//! valid 1.1.0 result and vice versa. `STATUS` and `GC` exist from 1.1.0 on.

use std::fmt;

use serde::Serialize;

/// A CNI spec version weft-cni supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// CNI spec 1.0.0.
    V1_0_0,
    /// CNI spec 1.1.0 (adds `STATUS`, `GC`, `cniVersions`).
    V1_1_0,
}

impl Version {
    /// Every supported version, oldest first (the `supportedVersions` list).
    pub const SUPPORTED: [Version; 2] = [Version::V1_0_0, Version::V1_1_0];

    /// The newest supported version; used when the runtime names none (e.g. bare `VERSION`).
    pub const LATEST: Version = Version::V1_1_0;

    /// Parses an exact version string (`"1.0.0"`, `"1.1.0"`); anything else is `None`.
    pub fn parse(s: &str) -> Option<Version> {
        Version::SUPPORTED.into_iter().find(|v| v.as_str() == s)
    }

    /// The spec spelling, e.g. `"1.1.0"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// The supported versions as a comma-separated list, for error messages.
    pub fn supported_list() -> String {
        Version::SUPPORTED.map(Version::as_str).join(", ")
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `VERSION` result (CNI spec §5 "Version"):
/// `{"cniVersion": <requested or latest>, "supportedVersions": ["1.0.0", "1.1.0"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// The `cniVersion` given on stdin, echoed as the spec asks, or [`Version::LATEST`].
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// [`Version::SUPPORTED`].
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<&'static str>,
}

impl VersionInfo {
    /// The answer to a `VERSION` request that named `requested` (or nothing).
    pub fn answer(requested: Option<&str>) -> Self {
        VersionInfo {
            cni_version: requested.unwrap_or(Version::LATEST.as_str()).to_owned(),
            supported_versions: Version::SUPPORTED.map(Version::as_str).to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_is_exact() {
        assert_eq!(Version::parse("1.0.0"), Some(Version::V1_0_0));
        assert_eq!(Version::parse("1.1.0"), Some(Version::V1_1_0));
        for bad in ["0.4.0", "0.3.1", "1.0", "1.2.0", "", " 1.0.0"] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn version_info_shape() {
        let json = serde_json::to_value(VersionInfo::answer(None)).expect("encode");
        assert_eq!(
            json,
            serde_json::json!({"cniVersion": "1.1.0", "supportedVersions": ["1.0.0", "1.1.0"]})
        );
        assert_eq!(VersionInfo::answer(Some("1.0.0")).cni_version, "1.0.0");
    }
}
