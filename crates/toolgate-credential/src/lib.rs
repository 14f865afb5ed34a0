//! Outbound credentials: one narrow ES256 token per forwarded call, and the JWKS that lets
//! upstreams verify them.
#![forbid(unsafe_code)]

pub mod oauth;
pub mod secret;
pub mod tls;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::sync::Arc;

use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("signing key: {0}")]
    Key(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// HMAC-SHA256 of `data` under `key`, in lowercase hex (a webhook's signature).
pub fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, data);
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A P-256 private key with its public JWK; `kid` is the RFC 7638 thumbprint.
/// The key pair is parsed once: jsonwebtoken's `encode` re-parses a PKCS#8 key (a base-point
/// multiplication) on every call, which was most of the cost of a mint.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    pair: Arc<EcdsaKeyPair>,
    public_jwk: Value,
    /// The encoded JWS header of a credential (`typ` `at+jwt`), made once: every call signs one.
    credential_header: String,
    /// Names secrets for the audit (HMAC, keyed from this private key): a plain hash of a
    /// short secret could be reversed by trying candidates; this needs the key too.
    id_key: ring::hmac::Key,
    /// Binds MCP session ids to their caller (`Minter::session_tag`).
    session_key: ring::hmac::Key,
}

/// The `typ` of a minted credential (RFC 9068).
const CREDENTIAL_TYP: &str = "at+jwt";

impl SigningKey {
    /// From a PKCS#8 PEM ("BEGIN PRIVATE KEY") P-256 key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, CredentialError> {
        let secret = p256::SecretKey::from_pkcs8_pem(pem)
            .map_err(|e| CredentialError::Key(format!("not a PKCS#8 P-256 private key: {e}")))?;
        Self::from_secret(&secret)
    }

    /// A fresh random key, with its PKCS#8 PEM (for the demo and tests).
    pub fn generate() -> Result<(Self, String), CredentialError> {
        let secret = p256::SecretKey::random(&mut rand_core::OsRng);
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        Ok((Self::from_secret(&secret)?, pem.to_string()))
    }

    fn from_secret(secret: &p256::SecretKey) -> Result<Self, CredentialError> {
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        let point = p256::EncodedPoint::from(secret.public_key());
        let (x, y) = match (point.x(), point.y()) {
            (Some(x), Some(y)) => (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y)),
            _ => return Err(CredentialError::Key("public key has no coordinates".into())),
        };
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        let public_jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"});
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            der.as_bytes(),
            &SystemRandom::new(),
        )
        .map_err(|e| CredentialError::Key(format!("ring refused the key: {e}")))?;
        let credential_header = encoded_header(CREDENTIAL_TYP, &kid);
        // One key per use: a tag of one kind can never be had as a hash of the other.
        let derived = |label: &[u8]| {
            ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &Sha256::new()
                    .chain_update(label)
                    .chain_update(der.as_bytes())
                    .finalize(),
            )
        };
        let id_key = derived(b"toolgate secret ids\0");
        let session_key = derived(b"toolgate mcp sessions\0");
        Ok(SigningKey {
            kid,
            pair: Arc::new(pair),
            id_key,
            session_key,
            public_jwk,
            credential_header,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A secret's name for the audit: `hmac:` and 16 bytes of its HMAC (base64url). The same
    /// on every replica that holds this key; reveals nothing without it.
    pub fn secret_id(&self, secret: &str) -> String {
        let tag = ring::hmac::sign(&self.id_key, secret.as_bytes());
        format!("hmac:{}", URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16]))
    }

    /// The tag binding an MCP session to its caller (`bound`: who and which session), 16
    /// bytes of an HMAC under a key of its own, base64url.
    pub fn session_tag(&self, bound: &str) -> String {
        let tag = ring::hmac::sign(&self.session_key, bound.as_bytes());
        URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16])
    }

    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// Signs any claims as an ES256 JWT (JWS compact form) with this key's `kid` and `typ`.
    pub fn sign(&self, typ: &str, claims: &impl Serialize) -> Result<String, CredentialError> {
        if typ == CREDENTIAL_TYP {
            return self.sign_encoded(self.credential_header.clone(), claims);
        }
        self.sign_encoded(encoded_header(typ, &self.kid), claims)
    }

    /// Signs with a header of the caller's (tests use it for headers a verifier must refuse).
    pub fn sign_with_header(
        &self,
        header: &Value,
        claims: &impl Serialize,
    ) -> Result<String, CredentialError> {
        self.sign_encoded(URL_SAFE_NO_PAD.encode(header.to_string()), claims)
    }

    /// Appends the claims to an encoded header, then the signature of both.
    fn sign_encoded(
        &self,
        mut jws: String,
        claims: &impl Serialize,
    ) -> Result<String, CredentialError> {
        let claims =
            serde_json::to_vec(claims).map_err(|e| CredentialError::Sign(e.to_string()))?;
        jws.reserve(claims.len() * 4 / 3 + 100);
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(claims, &mut jws);
        let signature = self
            .pair
            .sign(&SystemRandom::new(), jws.as_bytes())
            .map_err(|e| CredentialError::Sign(e.to_string()))?;
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut jws);
        Ok(jws)
    }
}

/// The base64url of an ES256 JWS header.
fn encoded_header(typ: &str, kid: &str) -> String {
    URL_SAFE_NO_PAD.encode(json!({"alg": "ES256", "typ": typ, "kid": kid}).to_string())
}

/// What one minted credential is for.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// The delegating user, if any; else the agent is the subject.
    pub user: Option<&'a str>,
    pub agent: &'a str,
    pub audience: &'a str,
    /// The tool action first, then any `@grants` of the determining permits.
    pub scope: Vec<String>,
    pub decision_id: &'a str,
    pub task_id: Option<&'a str>,
    /// An absolute upper bound on `exp` (e.g. a task's deadline).
    pub not_after: Option<u64>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    pub aud: String,
    pub scope: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    pub decision_id: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Actor {
    pub sub: String,
}

#[derive(Debug, Clone)]
pub struct Minted {
    pub token: String,
    pub claims: Claims,
}

/// Mints per-call credentials.
pub struct Minter {
    key: SigningKey,
    /// Keys signed with before a rotation: still published (and accepted by `verify`) so
    /// credentials minted before the rotation keep verifying until they expire.
    previous: Vec<SigningKey>,
    issuer: String,
    ttl_seconds: u64,
}

impl Minter {
    pub fn new(key: SigningKey, issuer: impl Into<String>, ttl_seconds: u64) -> Self {
        Minter {
            key,
            previous: Vec::new(),
            issuer: issuer.into(),
            ttl_seconds,
        }
    }

    /// Also publishes (and accepts) these earlier keys; new credentials use the current one.
    pub fn with_previous_keys(mut self, previous: Vec<SigningKey>) -> Self {
        self.previous = previous
            .into_iter()
            .filter(|k| k.kid() != self.key.kid())
            .collect();
        self
    }

    fn keys(&self) -> impl Iterator<Item = &SigningKey> {
        std::iter::once(&self.key).chain(&self.previous)
    }

    pub fn ttl_seconds(&self) -> u64 {
        self.ttl_seconds
    }

    /// A secret's name for the audit (see `SigningKey::secret_id`).
    pub fn secret_id(&self, secret: &str) -> String {
        self.key.secret_id(secret)
    }

    /// A session's tag under the current key.
    pub fn session_tag(&self, bound: &str) -> String {
        self.key.session_tag(bound)
    }

    /// Whether `tag` is a session's tag under the current key or one before a rotation
    /// (sessions opened before it go on).
    pub fn is_session_tag(&self, bound: &str, tag: &str) -> bool {
        self.keys().any(|key| {
            let expected = key.session_tag(bound);
            expected.len() == tag.len()
                && expected
                    .bytes()
                    .zip(tag.bytes())
                    .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                    == 0
        })
    }

    /// A token for exactly this call: `typ: at+jwt`, unique `jti`, `exp` within ttl and `not_after`.
    pub fn mint(&self, grant: &Grant<'_>, now: u64) -> Result<Minted, CredentialError> {
        let mut exp = now + self.ttl_seconds;
        if let Some(limit) = grant.not_after {
            exp = exp.min(limit);
        }
        let mut scope: Vec<&str> = Vec::with_capacity(grant.scope.len());
        for s in &grant.scope {
            if !scope.contains(&s.as_str()) {
                scope.push(s);
            }
        }
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: grant.user.unwrap_or(grant.agent).to_string(),
            act: grant.user.map(|_| Actor {
                sub: grant.agent.to_string(),
            }),
            aud: grant.audience.to_string(),
            scope: scope.join(" "),
            iat: now,
            nbf: now,
            exp,
            jti: uuid::Uuid::new_v4().to_string(),
            task_id: grant.task_id.map(String::from),
            decision_id: grant.decision_id.to_string(),
        };
        let token = self.key.sign(CREDENTIAL_TYP, &claims)?;
        Ok(Minted { token, claims })
    }

    /// The actor token of an RFC 8693 exchange: toolgate's word that `agent` is acting,
    /// for `audience` (the STS), valid for a minute.
    pub fn actor_assertion(
        &self,
        agent: &str,
        audience: &str,
        now: u64,
    ) -> Result<String, CredentialError> {
        self.key.sign(
            "JWT",
            &json!({
                "iss": self.issuer, "sub": agent, "aud": audience,
                "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(),
            }),
        )
    }

    /// Verifies a credential this minter issued: signature, `iss`, `nbf` and `exp` (any `aud`).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, CredentialError> {
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|e| CredentialError::Sign(format!("not a valid credential: {e}")))?
            .kid;
        let key = self
            .keys()
            .find(|k| kid.as_deref() == Some(k.kid()))
            .ok_or_else(|| CredentialError::Sign("credential signed with an unknown key".into()))?;
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk().clone())
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk)
            .map_err(|e| CredentialError::Key(e.to_string()))?;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_issuer(&[&self.issuer]);
        validation.validate_aud = false;
        validation.validate_exp = false;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| CredentialError::Sign(format!("not a valid credential: {e}")))?
            .claims;
        if claims.exp <= now || claims.nbf > now {
            return Err(CredentialError::Sign("credential is not valid now".into()));
        }
        Ok(claims)
    }

    /// The JWKS document upstreams use to verify minted tokens.
    pub fn jwks(&self) -> Value {
        json!({"keys": self.keys().map(SigningKey::public_jwk).collect::<Vec<_>>()})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, decode_header, jwk::JwkSet, Algorithm, DecodingKey, Validation};

    #[test]
    fn session_tags_outlive_a_rotation_and_are_not_secret_ids() {
        let (old, old_pem) = SigningKey::generate().unwrap();
        let (new, _) = SigningKey::generate().unwrap();
        let before = Minter::new(old, "https://t", 60);
        let tag = before.session_tag("[\"s\"]");
        assert!(before.is_session_tag("[\"s\"]", &tag));
        assert!(!before.is_session_tag("[\"t\"]", &tag));
        // A secret id of the same text is another value: the audit cannot hand out tags.
        assert_ne!(before.secret_id("[\"s\"]"), format!("hmac:{tag}"));
        let rotated = Minter::new(new, "https://t", 60)
            .with_previous_keys(vec![SigningKey::from_pkcs8_pem(&old_pem).unwrap()]);
        assert!(
            rotated.is_session_tag("[\"s\"]", &tag),
            "a session opened before goes on"
        );
        assert_ne!(
            rotated.session_tag("[\"s\"]"),
            tag,
            "new sessions use the new key"
        );
        let (other, _) = SigningKey::generate().unwrap();
        assert!(!Minter::new(other, "https://t", 60).is_session_tag("[\"s\"]", &tag));
    }

    #[test]
    fn minted_token_verifies_against_the_published_jwks() {
        let (key, pem) = SigningKey::generate().unwrap();
        assert_eq!(SigningKey::from_pkcs8_pem(&pem).unwrap().kid(), key.kid());
        let minter = Minter::new(key, "https://toolgate.test", 60);
        let grant = Grant {
            user: Some("alice"),
            agent: "assistant",
            audience: "https://billing.internal",
            scope: vec![
                "billing/get_invoice".into(),
                "invoices:read".into(),
                "billing/get_invoice".into(),
            ],
            decision_id: "d-1",
            task_id: Some("t-1"),
            not_after: Some(1_000_030),
        };
        let minted = minter.mint(&grant, 1_000_000).unwrap();

        let header = decode_header(&minted.token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        let jwks: JwkSet = serde_json::from_value(minter.jwks()).unwrap();
        let jwk = jwks.find(header.kid.as_deref().unwrap()).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&["https://billing.internal"]);
        validation.validate_exp = false;
        let claims = decode::<Claims>(
            &minted.token,
            &DecodingKey::from_jwk(jwk).unwrap(),
            &validation,
        )
        .unwrap()
        .claims;
        assert_eq!(claims, minted.claims);
        assert_eq!(claims.sub, "alice");
        assert_eq!(
            claims.act,
            Some(Actor {
                sub: "assistant".into()
            })
        );
        assert_eq!(claims.scope, "billing/get_invoice invoices:read");
        assert_eq!(claims.exp, 1_000_030, "exp is capped by not_after");
        assert_eq!(claims.task_id.as_deref(), Some("t-1"));
    }

    /// A call by agent `bot` acting for no one.
    fn bot_grant() -> Grant<'static> {
        Grant {
            user: None,
            agent: "bot",
            audience: "aud",
            scope: vec!["a/b".into()],
            decision_id: "d",
            task_id: None,
            not_after: None,
        }
    }

    #[test]
    fn every_mint_has_a_fresh_jti_and_agent_is_subject_without_user() {
        let (key, _) = SigningKey::generate().unwrap();
        let minter = Minter::new(key, "iss", 60);
        let grant = bot_grant();
        let a = minter.mint(&grant, 10).unwrap().claims;
        let b = minter.mint(&grant, 10).unwrap().claims;
        assert_ne!(a.jti, b.jti);
        assert_eq!((a.sub.as_str(), a.act.as_ref(), a.exp), ("bot", None, 70));
    }

    #[test]
    fn rotation_keeps_earlier_credentials_verifying() {
        let (old, _) = SigningKey::generate().unwrap();
        let (new, _) = SigningKey::generate().unwrap();
        let grant = bot_grant();
        let before = Minter::new(old.clone(), "iss", 60)
            .mint(&grant, 100)
            .unwrap();
        let rotated = Minter::new(new.clone(), "iss", 60).with_previous_keys(vec![old.clone()]);
        let jwks = rotated.jwks();
        let kids: Vec<&str> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids, vec![new.kid(), old.kid()]);
        assert_eq!(rotated.verify(&before.token, 120).unwrap(), before.claims);
        let after = rotated.mint(&grant, 120).unwrap();
        assert_eq!(
            decode_header(&after.token).unwrap().kid.as_deref(),
            Some(new.kid())
        );
        // Without the old key listed, its credentials no longer verify.
        assert!(Minter::new(new, "iss", 60)
            .verify(&before.token, 120)
            .is_err());
        // Nor does an expired one.
        assert!(rotated.verify(&before.token, 1_000).is_err());
    }

    #[test]
    fn a_non_p256_key_is_refused() {
        assert!(SigningKey::from_pkcs8_pem(
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"
        )
        .is_err());
    }
}
