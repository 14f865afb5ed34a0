//! Secrets an upstream trusts and the agent must never hold: an API key injected after an allow
//! decision, or a token endpoint's client secret. Read from a file or an environment variable,
//! never printed (`Debug` and errors name where a secret lives, not what it is).

use std::path::PathBuf;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::File(path) => write!(f, "file {}", path.display()),
            SecretSource::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret from {0}: cannot read")]
    Unreadable(SecretSource, #[source] std::io::Error),
    #[error("secret from {0}: not set")]
    Unset(SecretSource),
    #[error("secret from {0}: empty")]
    Empty(SecretSource),
    #[error("secret from {0}: not usable in an HTTP header")]
    NotAHeaderValue(SecretSource),
    #[error("secret from {0}: basic credentials must read `user:password`")]
    NotBasic(SecretSource),
}

/// A secret's text. Its `Debug` shows nothing of it (the audit names it with
/// `SigningKey::secret_id`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Reads the secret now (on start and on every reload). A file's final newline is not
    /// part of it.
    pub fn read(source: &SecretSource) -> Result<Secret, SecretError> {
        let text = match source {
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| SecretError::Unreadable(source.clone(), e))?,
            SecretSource::Env(name) => {
                std::env::var(name).map_err(|_| SecretError::Unset(source.clone()))?
            }
        };
        let text = text.trim_end_matches(['\n', '\r']).to_string();
        if text.is_empty() {
            return Err(SecretError::Empty(source.clone()));
        }
        if text.bytes().any(|b| b.is_ascii_control()) {
            return Err(SecretError::NotAHeaderValue(source.clone()));
        }
        Ok(Secret(text))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// An opaque credential's id for the audit: `sha256:` and the first 16 bytes of its hash
/// (base64url). Names it without revealing it.
pub fn opaque_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    format!("sha256:{}", URL_SAFE_NO_PAD.encode(&digest[..16]))
}

/// How a static secret is put on a forwarded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// `<header>: <secret>`, e.g. `X-Api-Key`.
    Header(http::HeaderName),
    /// `Authorization: Bearer <secret>`.
    Bearer,
    /// `Authorization: Basic base64(<user:password>)`.
    Basic,
}

/// A static upstream secret and where it goes (`credential.mode: inject`).
#[derive(Debug, Clone)]
pub struct Injected {
    placement: Placement,
    secret: Secret,
    /// The header to send, made once.
    value: http::HeaderValue,
}

impl Injected {
    pub fn new(placement: Placement, source: &SecretSource) -> Result<Injected, SecretError> {
        let secret = Secret::read(source)?;
        let text = match placement {
            Placement::Header(_) => secret.expose().to_string(),
            Placement::Bearer => format!("Bearer {}", secret.expose()),
            Placement::Basic => {
                if !secret.expose().contains(':') {
                    return Err(SecretError::NotBasic(source.clone()));
                }
                format!("Basic {}", STANDARD.encode(secret.expose()))
            }
        };
        let mut value = http::HeaderValue::from_str(&text)
            .map_err(|_| SecretError::NotAHeaderValue(source.clone()))?;
        value.set_sensitive(true);
        Ok(Injected {
            placement,
            secret,
            value,
        })
    }

    /// The header that carries the secret.
    pub fn header(&self) -> (http::HeaderName, http::HeaderValue) {
        let name = match &self.placement {
            Placement::Header(name) => name.clone(),
            Placement::Bearer | Placement::Basic => http::header::AUTHORIZATION,
        };
        (name, self.value.clone())
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(text: &str) -> (tempfile_path::TempPath, SecretSource) {
        let path = tempfile_path::TempPath::new(text);
        let source = SecretSource::File(path.0.clone());
        (path, source)
    }

    /// A file removed when dropped.
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(text: &str) -> TempPath {
                let path =
                    std::env::temp_dir().join(format!("toolgate-secret-{}", uuid::Uuid::new_v4()));
                std::fs::write(&path, text).unwrap();
                TempPath(path)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn each_placement_carries_the_secret_and_nothing_prints_it() {
        let (_keep, source) = file_with("s3cr3t-key\n");
        let header =
            Injected::new(Placement::Header("x-api-key".parse().unwrap()), &source).unwrap();
        assert_eq!(header.header().0, "x-api-key");
        assert_eq!(header.header().1, "s3cr3t-key");
        assert!(header.header().1.is_sensitive());
        let bearer = Injected::new(Placement::Bearer, &source).unwrap();
        assert_eq!(
            bearer.header(),
            (
                http::header::AUTHORIZATION,
                "Bearer s3cr3t-key".parse().unwrap()
            )
        );
        assert!(!format!("{header:?}").contains("s3cr3t"));

        let (_keep, basic) = file_with("user:pa ss");
        let basic = Injected::new(Placement::Basic, &basic).unwrap();
        assert_eq!(basic.header().1, "Basic dXNlcjpwYSBzcw==");
    }

    #[test]
    fn unusable_secrets_are_refused_with_where_not_what() {
        let (_keep, empty) = file_with("\n");
        assert!(matches!(Secret::read(&empty), Err(SecretError::Empty(_))));
        // Not a text a file name holds (random hex names contained `abc` now and then).
        let (_keep, two_lines) = file_with("s3cr3t-x\ndef");
        let error = Injected::new(Placement::Bearer, &two_lines).unwrap_err();
        assert!(matches!(error, SecretError::NotAHeaderValue(_)));
        assert!(!error.to_string().contains("s3cr3t-x"));
        let (_keep, no_colon) = file_with("justpassword");
        assert!(matches!(
            Injected::new(Placement::Basic, &no_colon),
            Err(SecretError::NotBasic(_))
        ));
        let unset = SecretSource::Env("TOOLGATE_TEST_SURELY_UNSET_SECRET".into());
        assert!(matches!(Secret::read(&unset), Err(SecretError::Unset(_))));
        let missing = SecretSource::File("/nonexistent/secret".into());
        assert!(Secret::read(&missing)
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/secret"));
    }
}
