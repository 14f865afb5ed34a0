//! Verification keys from a JWKS document. Each key's algorithm is fixed by the key itself
//! (its `alg`, or else its type and curve), never by the token that claims to be signed with it.

use std::collections::HashMap;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

#[derive(Clone)]
pub struct VerifyingKey {
    pub alg: Algorithm,
    pub key: DecodingKey,
}

/// The usable keys of one JWKS document.
#[derive(Clone, Default)]
pub struct KeySet {
    by_kid: HashMap<String, VerifyingKey>,
    /// Keys without a `kid`: usable only when the set holds exactly one key.
    unnamed: Vec<VerifyingKey>,
}

impl KeySet {
    /// Parses a JWKS document. Keys toolgate cannot use (symmetric, encryption-only, unknown
    /// curves) are skipped and named in the returned warnings; a document with no usable key
    /// is an error.
    pub fn from_jwks(doc: &[u8]) -> Result<(KeySet, Vec<String>), String> {
        let value: Value =
            serde_json::from_slice(doc).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let keys = value
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("JWKS has no `keys` array")?;
        let mut set = KeySet::default();
        let mut warnings = Vec::new();
        for (i, raw) in keys.iter().enumerate() {
            let name = raw
                .get("kid")
                .and_then(Value::as_str)
                .map_or(format!("#{i}"), String::from);
            if raw
                .get("use")
                .and_then(Value::as_str)
                .is_some_and(|u| u != "sig")
            {
                warnings.push(format!("key {name}: not a signing key, skipped"));
                continue;
            }
            match parse_key(raw) {
                Ok((kid, key)) => match kid {
                    Some(kid) => {
                        set.by_kid.insert(kid, key);
                    }
                    None => set.unnamed.push(key),
                },
                Err(e) => warnings.push(format!("key {name}: {e}, skipped")),
            }
        }
        if set.is_empty() {
            return Err(format!(
                "JWKS has no usable signing key ({})",
                warnings.join("; ")
            ));
        }
        Ok((set, warnings))
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key for a token's `kid`; a token without one matches only a set of one key.
    pub fn find(&self, kid: Option<&str>) -> Option<&VerifyingKey> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None if self.len() == 1 => self.by_kid.values().chain(&self.unnamed).next(),
            None => None,
        }
    }
}

fn parse_key(raw: &Value) -> Result<(Option<String>, VerifyingKey), String> {
    let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| format!("unreadable: {e}"))?;
    let natural = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return Err("unsupported curve".into()),
        },
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKeyPair(_) => return Err("unsupported curve".into()),
        AlgorithmParameters::OctetKey(_) => return Err("symmetric keys are never accepted".into()),
    };
    let alg = match jwk.common.key_algorithm {
        None => natural,
        Some(declared) => {
            let alg = asymmetric(declared).ok_or("unsupported `alg`")?;
            if family(alg) != family(natural) {
                return Err(format!("`alg` {alg:?} does not fit the key type"));
            }
            alg
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("invalid key material: {e}"))?;
    Ok((jwk.common.key_id.clone(), VerifyingKey { alg, key }))
}

fn asymmetric(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

fn family(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "P-256",
        Algorithm::ES384 => "P-384",
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => "RSA",
        Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512 => "RSA",
        Algorithm::EdDSA => "OKP",
        _ => "symmetric",
    }
}
