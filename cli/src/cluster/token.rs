//! Per-pod service-account tokens: the local cluster's stand-in for projected service-account
//! tokens plus the TokenReview API.
//!
//! When the runner starts a pod it generates a [`Token`] (32 random bytes, lowercase hex), writes
//! it to `<pod dir>/token` (mode 0600) and exports [`TOKEN_FILE_ENV`] to every container. It
//! registers the token for the controller as
//! `<controller state dir>/tokens/pods/<lowercase hex SHA-256 of the token>.json` holding a
//! [`Registration`]; the controller authenticates a presented token by hashing it and reading
//! that file (the TokenReview answer). The registration is removed when the pod stops or is
//! deleted, which revokes the token as Kubernetes does for bound tokens of a deleted pod.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::store;

/// The environment variable naming the pod's token file, set in every container.
pub const TOKEN_FILE_ENV: &str = "WEFT_SERVICE_ACCOUNT_TOKEN_FILE";
/// The token's file name inside the pod directory.
pub const TOKEN_FILE_NAME: &str = "token";

/// Errors writing a token or its registration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the token file failed.
    #[error("writing token file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the registration failed.
    #[error("registering token")]
    Register(#[source] store::Error),
}

/// A service-account token: 64 lowercase hex characters (32 random bytes) from [`Token::generate`],
/// or a JWT from the API ([`Token::from_secret`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A fresh random token.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Token(hex(&bytes))
    }

    /// A token issued elsewhere (e.g. a ServiceAccount token from the TokenRequest API).
    pub fn from_secret(text: String) -> Self {
        Token(text)
    }

    /// The token text, as written to the token file.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Lowercase hex SHA-256 of the token text: the registration's file stem.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.0.as_bytes()))
    }

    /// Writes the token to `path` with mode 0600 (replacing an older one).
    ///
    /// # Errors
    /// [`Error::Write`].
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let err = |source| Error::Write {
            path: path.to_path_buf(),
            source,
        };
        let _ = std::fs::remove_file(path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        file.write_all(self.0.as_bytes()).map_err(err)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Who a token was issued to: the JSON the controller reads back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// The pod's namespace.
    pub namespace: String,
    /// `spec.serviceAccountName`, or `default`.
    pub service_account: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID.
    pub uid: String,
    /// The node the pod runs on (`node-1`, …).
    pub node: String,
}

/// The directory of pod token registrations under the controller's state directory:
/// `<controller state dir>/tokens/pods`.
pub fn registry_dir(controller_state_dir: &Path) -> PathBuf {
    controller_state_dir.join("tokens").join("pods")
}

/// The registration file of a token with SHA-256 `hash` (lowercase hex).
pub fn registration_path(controller_state_dir: &Path, hash: &str) -> PathBuf {
    registry_dir(controller_state_dir).join(format!("{hash}.json"))
}

/// Registers `token` for `registration` (atomic write; directories created as needed) and
/// returns the file written.
///
/// # Errors
/// [`Error::Register`].
pub fn register(
    controller_state_dir: &Path,
    token: &Token,
    registration: &Registration,
) -> Result<PathBuf, Error> {
    let path = registration_path(controller_state_dir, &token.hash());
    let text = serde_json::to_vec_pretty(registration).unwrap_or_default();
    store::write_atomic(&path, &text).map_err(Error::Register)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_64_hex_characters_and_hash_with_sha256() {
        let token = Token::generate();
        assert_eq!(token.as_str().len(), 64);
        assert!(
            token
                .as_str()
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        assert_ne!(token, Token::generate());
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            Token("abc".into()).hash(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
    }

    #[test]
    fn token_files_are_private_and_registrations_are_json() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weft-token-{}", store::new_uid()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = Token::generate();
        let file = dir.join(TOKEN_FILE_NAME);
        token.write(&file).unwrap();
        token.write(&file).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), token.as_str());
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let controller = dir.join("controller");
        let registration = Registration {
            namespace: "ns".into(),
            service_account: "waypoint".into(),
            pod: "waypoint-abc".into(),
            uid: "u-1".into(),
            node: "node-2".into(),
        };
        let path = register(&controller, &token, &registration).unwrap();
        assert_eq!(
            path,
            controller
                .join("tokens/pods")
                .join(format!("{}.json", token.hash()))
        );
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"namespace": "ns", "serviceAccount": "waypoint", "pod": "waypoint-abc", "uid": "u-1", "node": "node-2"})
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
