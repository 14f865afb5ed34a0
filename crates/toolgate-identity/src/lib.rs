//! Inbound authentication: verify an agent's JWT against its issuer's JWKS and say who is
//! calling: the agent, and the user it acts for (RFC 8693 `act`).
#![forbid(unsafe_code)]

mod fetch;
mod keys;

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::Engine as _;
use dashmap::DashMap;
use jsonwebtoken::{decode, decode_header, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use keys::{KeySet, VerifyingKey};

/// Allowed clock skew for `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 30;
/// By default an unknown `kid` triggers at most one JWKS refetch per issuer in this interval.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Verified tokens remembered by default (each a digest and its caller, about 1 KiB).
pub const CACHE_CAPACITY: usize = 65_536;

/// Where an issuer's verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    Url(String),
    /// An OpenID Connect discovery document whose `jwks_uri` names the JWKS.
    Discovery(String),
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    /// Put before every agent and user id this issuer asserts, so that no two issuers can
    /// name the same principal (empty: ids as the token has them).
    pub id_prefix: String,
    /// A URL-sourced JWKS is refetched on an unknown `kid` at most once per this interval.
    pub refetch_interval: Duration,
    /// Which claims name the agent and the user (default: `act.sub` and `sub`, RFC 8693).
    pub names: ClaimNames,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
}

/// The claims naming the agent and the user, as dotted claim paths (`azp`, `client_id`,
/// `appid`, `act.sub`). `agent: None` is RFC 8693: `act.sub` acting for `sub`, or `sub`
/// alone. With `agent` set, the user is `user`'s claim where the token has it, else none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimNames {
    pub agent: Option<String>,
    pub user: Option<String>,
}

/// Who is calling, as a verified token says.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `act.sub` when delegated, else `sub`.
    pub agent: String,
    /// `sub` when delegated.
    pub user: Option<String>,
    pub issuer: String,
    pub claims: Arc<Map<String, Value>>,
    pub exp: u64,
    /// Where the agent's and the user's own claims are: the object holding the claim that
    /// named each (a dotted path; empty: the token's claims; none: no claims of their own).
    agent_object: Option<String>,
    user_object: Option<String>,
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

static NO_CLAIMS: LazyLock<Map<String, Value>> = LazyLock::new(Map::new);

impl Caller {
    /// The claims that describe the agent: the object holding the claim that named it (the
    /// `act` object when delegated), else the token's.
    pub fn agent_claims(&self) -> &Map<String, Value> {
        match &self.agent_object {
            Some(path) => object_at(&self.claims, path),
            None => &NO_CLAIMS,
        }
    }

    /// The claims that describe the delegating user: by default the token's own.
    pub fn user_claims(&self) -> Option<&Map<String, Value>> {
        self.user.as_ref().map(|_| match &self.user_object {
            Some(path) => object_at(&self.claims, path),
            None => &*NO_CLAIMS,
        })
    }
}

/// The object at a dotted path of `claims` (empty: `claims` itself).
fn object_at<'c>(claims: &'c Map<String, Value>, path: &str) -> &'c Map<String, Value> {
    if path.is_empty() {
        return claims;
    }
    let mut at = claims;
    for part in path.split('.') {
        match at.get(part).and_then(Value::as_object) {
            Some(inner) => at = inner,
            None => return &NO_CLAIMS,
        }
    }
    at
}

/// The value at a dotted claim path.
fn claim_at<'c>(claims: &'c Map<String, Value>, path: &str) -> Option<&'c Value> {
    let (object, name) = match path.rsplit_once('.') {
        Some((object, name)) => (object_at(claims, object), name),
        None => (claims, path),
    };
    object.get(name)
}

/// The object part of a claim path: `act` of `act.sub`, empty for `azp`.
fn parent_of(path: &str) -> &str {
    path.rsplit_once('.').map_or("", |(object, _)| object)
}

/// Why a token was refused. Every variant means 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token issuer is not trusted")]
    UnknownIssuer,
    #[error("token signing key is unknown")]
    UnknownKey,
    #[error("token algorithm does not match its key")]
    AlgorithmMismatch,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token claims are invalid: {0}")]
    InvalidClaims(String),
}

struct Issuer {
    config: IssuerConfig,
    keys: ArcSwap<KeySet>,
    /// When an unknown kid last caused a refetch; held while fetching so concurrent misses
    /// wait for one fetch. The load at start does not count: a rotation right after start
    /// must still be picked up.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

/// Verifies inbound tokens. Cheap to share behind an `Arc`.
pub struct Authenticator {
    issuers: Vec<Issuer>,
    cache: DashMap<[u8; 32], Caller>,
    cache_capacity: usize,
    fetcher: fetch::Fetcher,
}

impl Authenticator {
    /// Loads every issuer's keys. A URL that cannot be fetched now is retried on first use;
    /// a key file that cannot be read is an error.
    pub async fn new(configs: Vec<IssuerConfig>) -> Result<Self, String> {
        Self::with_cache(configs, CACHE_CAPACITY).await
    }

    /// As `new`, remembering at most `cache_capacity` verified tokens: when full, expired ones
    /// are dropped, and if that frees nothing, all (a flood of distinct tokens costs
    /// verifications, never memory).
    pub async fn with_cache(
        configs: Vec<IssuerConfig>,
        cache_capacity: usize,
    ) -> Result<Self, String> {
        let fetcher = fetch::Fetcher::new();
        let mut issuers = Vec::with_capacity(configs.len());
        for config in configs {
            let keys = match load_keys(&fetcher, &config).await {
                Ok(keys) => keys,
                Err(e) => match config.keys {
                    KeySource::File(_) => return Err(format!("issuer {}: {e}", config.issuer)),
                    KeySource::Url(_) | KeySource::Discovery(_) => {
                        tracing::warn!(issuer = %config.issuer, error = %e, "JWKS not available yet; will retry");
                        KeySet::default()
                    }
                },
            };
            issuers.push(Issuer {
                config,
                keys: ArcSwap::from_pointee(keys),
                last_fetch: tokio::sync::Mutex::new(None),
            });
        }
        Ok(Authenticator {
            issuers,
            cache: DashMap::new(),
            cache_capacity: cache_capacity.max(1),
            fetcher,
        })
    }

    /// Re-reads every issuer's keys (files and URLs); keeps the old set where a read fails.
    pub async fn reload_keys(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for issuer in &self.issuers {
            match load_keys(&self.fetcher, &issuer.config).await {
                Ok(keys) => issuer.keys.store(Arc::new(keys)),
                Err(e) => errors.push(format!("issuer {}: {e}", issuer.config.issuer)),
            }
        }
        self.cache.clear();
        errors
    }

    /// Authenticates an `Authorization` header value.
    pub async fn authenticate_header(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        self.authenticate(bearer_token(header).ok_or(AuthError::Missing)?)
            .await
    }

    /// Verifies a token, or answers from the cache of tokens verified before.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        if let Some(hit) = self.cache.get(&digest) {
            if hit.exp > now {
                return Ok(hit.clone());
            }
        }
        let caller = self.verify_uncached(token).await?;
        if self.cache.len() >= self.cache_capacity {
            self.cache.retain(|_, c| c.exp > now);
            if self.cache.len() >= self.cache_capacity {
                self.cache.clear();
            }
        }
        self.cache.insert(digest, caller.clone());
        Ok(caller)
    }

    /// Whether some issuer has keys to verify with: with none, every call would be a 401
    /// (an identity provider not reached yet).
    pub fn has_keys(&self) -> bool {
        self.issuers
            .iter()
            .any(|issuer| !issuer.keys.load().is_empty())
    }

    /// Verified tokens remembered now.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Verifies a token without the cache (the cache is `authenticate`'s).
    pub async fn verify_uncached(&self, token: &str) -> Result<Caller, AuthError> {
        let now = unix_now();
        let header = decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        refuse_critical_extensions(token)?;
        let issuer = self.issuer_of(token)?;
        let key = match issuer.keys.load().find(header.kid.as_deref()).cloned() {
            Some(key) => key,
            None => self.refetch(issuer, header.kid.as_deref()).await?,
        };
        if header.alg != key.alg {
            return Err(AuthError::AlgorithmMismatch);
        }
        let mut validation = Validation::new(key.alg);
        validation.leeway = issuer.config.leeway_seconds;
        validation.validate_nbf = true;
        validation.set_issuer(&[&issuer.config.issuer]);
        validation.set_audience(&issuer.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = decode::<Map<String, Value>>(token, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidAudience => AuthError::WrongAudience,
                K::InvalidIssuer => AuthError::UnknownIssuer,
                K::InvalidSignature => AuthError::BadSignature,
                K::InvalidAlgorithm => AuthError::AlgorithmMismatch,
                K::MissingRequiredClaim(c) => AuthError::InvalidClaims(format!("missing `{c}`")),
                _ => AuthError::Malformed(e.to_string()),
            }
        })?;
        check_numeric_dates(&data.claims)?;
        let caller = caller_from_claims(data.claims, &issuer.config, now)?;
        self.check_namespace(issuer, &caller)?;
        Ok(caller)
    }

    /// An id is the issuer's only if no other issuer's (longer) prefix claims it: an issuer
    /// with the empty prefix cannot assert `partner:bob` when `partner:` is another's.
    fn check_namespace(&self, issuer: &Issuer, caller: &Caller) -> Result<(), AuthError> {
        let own = &issuer.config.id_prefix;
        for other in &self.issuers {
            let prefix = &other.config.id_prefix;
            if prefix.len() > own.len()
                && std::iter::once(&caller.agent)
                    .chain(&caller.user)
                    .any(|id| id.starts_with(prefix.as_str()))
            {
                return Err(AuthError::InvalidClaims(format!(
                    "the subject lies in the id namespace of issuer {}",
                    other.config.issuer
                )));
            }
        }
        Ok(())
    }

    /// Picks the issuer by the token's (not yet verified) `iss`; verification then binds it.
    fn issuer_of(&self, token: &str) -> Result<&Issuer, AuthError> {
        let claims = jwt_part(token, 1, "payload")?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(AuthError::UnknownIssuer)?;
        self.issuers
            .iter()
            .find(|i| i.config.issuer == iss)
            .ok_or(AuthError::UnknownIssuer)
    }

    /// Unknown `kid`: refetch a URL-sourced JWKS, at most once per `refetch_interval`.
    async fn refetch(&self, issuer: &Issuer, kid: Option<&str>) -> Result<VerifyingKey, AuthError> {
        if let KeySource::File(_) = issuer.config.keys {
            return Err(AuthError::UnknownKey);
        }
        let mut last = issuer.last_fetch.lock().await;
        // Someone may have fetched while we waited for the lock.
        if let Some(key) = issuer.keys.load().find(kid) {
            return Ok(key.clone());
        }
        if last.is_some_and(|at| at.elapsed() < issuer.config.refetch_interval)
            && !issuer.keys.load().is_empty()
        {
            return Err(AuthError::UnknownKey);
        }
        *last = Some(Instant::now());
        match load_keys(&self.fetcher, &issuer.config).await {
            Ok(keys) => issuer.keys.store(Arc::new(keys)),
            Err(e) => {
                tracing::warn!(issuer = %issuer.config.issuer, error = %e, "JWKS refetch failed")
            }
        }
        issuer
            .keys
            .load()
            .find(kid)
            .cloned()
            .ok_or(AuthError::UnknownKey)
    }
}

/// The `jwks_uri` of an OpenID Connect discovery document, which must be the configured
/// issuer's own (OIDC Discovery §4.3: its `issuer` is exactly the one asked about).
/// `local`: the discovery document itself came from loopback, so may name a loopback JWKS
/// (a remote one may not: that would be a request into this host).
fn discovered_jwks_uri(doc: &[u8], issuer: &str, local: bool) -> Result<String, String> {
    let doc: Value = serde_json::from_slice(doc).map_err(|e| format!("not JSON: {e}"))?;
    if doc.get("issuer").and_then(Value::as_str) != Some(issuer) {
        return Err(format!("its issuer is not {issuer}"));
    }
    let uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("no jwks_uri")?;
    let parsed: hyper::Uri = uri.parse().map_err(|e| format!("jwks_uri {uri}: {e}"))?;
    let secure = match parsed.scheme_str() {
        Some("https") => !is_loopback(&parsed) || local,
        Some("http") => is_loopback(&parsed) && local,
        _ => false,
    };
    if !secure {
        return Err(format!(
            "jwks_uri {uri} must be https:// (http:// only on loopback, named by a loopback document)"
        ));
    }
    Ok(uri.to_string())
}

fn is_loopback(uri: &hyper::Uri) -> bool {
    uri.host().is_some_and(|host| {
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

/// One base64url JSON part of a compact JWT (0: header, 1: payload), not yet verified.
fn jwt_part(token: &str, index: usize, name: &str) -> Result<Value, AuthError> {
    let part = token
        .split('.')
        .nth(index)
        .ok_or_else(|| AuthError::Malformed("not a JWT".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed(format!("{name} is not base64url")))?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed(format!("{name} is not JSON")))
}

/// RFC 7515 §4.1.11: a recipient must refuse a `crit` extension it does not understand, and
/// toolgate understands none.
fn refuse_critical_extensions(token: &str) -> Result<(), AuthError> {
    match jwt_part(token, 0, "header")?.get("crit") {
        None => Ok(()),
        Some(_) => Err(AuthError::Malformed(
            "critical header extensions (`crit`) are not supported".into(),
        )),
    }
}

/// `exp`, `nbf` and `iat` must be whole seconds: a date that is not a number would otherwise be
/// skipped by validation rather than checked.
fn check_numeric_dates(claims: &Map<String, Value>) -> Result<(), AuthError> {
    for name in ["exp", "nbf", "iat"] {
        if claims.get(name).is_some_and(|v| v.as_u64().is_none()) {
            return Err(AuthError::InvalidClaims(format!(
                "`{name}` must be a whole number of seconds"
            )));
        }
    }
    Ok(())
}

/// Maps verified claims to a caller, each id behind the issuer's `id_prefix`: by default,
/// with `act`, the agent is `act.sub` and the user `sub`; with `names.agent`, the agent is
/// that claim and the user `names.user`'s where present.
pub fn caller_from_claims(
    claims: Map<String, Value>,
    issuer: &IssuerConfig,
    now: u64,
) -> Result<Caller, AuthError> {
    let id = |path: &str| -> Result<String, AuthError> {
        match claim_at(&claims, path).and_then(Value::as_str) {
            Some(s) if !s.is_empty() => Ok(format!("{}{s}", issuer.id_prefix)),
            _ => Err(AuthError::InvalidClaims(format!(
                "`{path}` must be a non-empty string"
            ))),
        }
    };
    let (agent, agent_object, user, user_object) = match &issuer.names.agent {
        Some(agent_claim) => {
            let user = match issuer.names.user.as_deref() {
                Some(path) if claim_at(&claims, path).is_some() => Some((id(path)?, path)),
                _ => None,
            };
            // The token's own claims describe whom its `sub` names: the user when there is
            // one (a user-editable `name` must never read as the agent's), else the agent.
            let described = |path: &str, alone: bool| match parent_of(path) {
                "" if path == "sub" || alone => Some(String::new()),
                "" => None,
                object => Some(object.to_string()),
            };
            (
                id(agent_claim)?,
                described(agent_claim, user.is_none()),
                user.as_ref().map(|(user, _)| user.clone()),
                user.and_then(|(_, path)| described(path, false)),
            )
        }
        None => match claims.get("act") {
            None => (id("sub")?, Some(String::new()), None, None),
            Some(Value::Object(_)) => (
                id("act.sub")?,
                Some("act".to_string()),
                Some(id("sub")?),
                Some(String::new()),
            ),
            Some(_) => return Err(AuthError::InvalidClaims("`act` must be an object".into())),
        },
    };
    // `sub` is a required claim whoever it names.
    id("sub")?;
    let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(now);
    Ok(Caller {
        agent,
        user,
        issuer: issuer.issuer.clone(),
        agent_object,
        user_object,
        claims: Arc::new(claims),
        exp,
    })
}

/// An issuer's keys fetched now, as `serve` fetches them (`check --online`): how many.
pub async fn fetch_keys(issuer: &IssuerConfig) -> Result<usize, String> {
    let keys = load_keys(&fetch::Fetcher::new(), issuer).await?;
    match keys.len() {
        0 => Err("no usable key in the JWKS".into()),
        n => Ok(n),
    }
}

async fn load_keys(fetcher: &fetch::Fetcher, issuer: &IssuerConfig) -> Result<KeySet, String> {
    let doc = match &issuer.keys {
        KeySource::File(path) => tokio::fs::read(path)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        KeySource::Url(url) => fetcher.get(url).await?,
        KeySource::Discovery(url) => {
            let local = url.parse::<hyper::Uri>().is_ok_and(|u| is_loopback(&u));
            let jwks_uri = discovered_jwks_uri(&fetcher.get(url).await?, &issuer.issuer, local)
                .map_err(|why| format!("{url}: {why}"))?;
            fetcher.get(&jwks_uri).await?
        }
    };
    let (keys, warnings) = KeySet::from_jwks(&doc)?;
    for w in warnings {
        tracing::warn!("JWKS: {w}");
    }
    Ok(keys)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn issuer(name: &str, id_prefix: &str, names: ClaimNames) -> IssuerConfig {
        IssuerConfig {
            issuer: name.into(),
            audiences: vec!["toolgate".into()],
            keys: KeySource::Url("https://unused".into()),
            id_prefix: id_prefix.into(),
            refetch_interval: REFETCH_INTERVAL,
            names,
            leeway_seconds: LEEWAY_SECONDS,
        }
    }

    fn rfc8693() -> IssuerConfig {
        issuer("idp", "", ClaimNames::default())
    }

    /// A client-credentials token as Okta, Entra ID or Keycloak issue it: the caller in `azp`
    /// (or `client_id`, `appid`), no `act`; with `user_claim`, a user where the token names one.
    #[test]
    fn agent_claim_names_a_client_credentials_caller() {
        let azp = ClaimNames {
            agent: Some("azp".into()),
            user: None,
        };
        let token = json!({"sub": "service-account-7", "azp": "billing-agent", "team": "x"});
        let c = caller_from_claims(claims(token.clone()), &issuer("idp", "", azp), 0).unwrap();
        assert_eq!(c.agent, "billing-agent");
        assert!(c.user.is_none() && c.user_claims().is_none());
        assert_eq!(c.agent_claims().get("team"), Some(&json!("x")));
        let with_user = ClaimNames {
            agent: Some("azp".into()),
            user: Some("sub".into()),
        };
        let c =
            caller_from_claims(claims(token), &issuer("idp", "p:", with_user.clone()), 0).unwrap();
        assert_eq!(
            (c.agent.as_str(), c.user.as_deref()),
            ("p:billing-agent", Some("p:service-account-7"))
        );
        // The token's own claims describe its subject, the user: never the agent (a
        // user-editable claim must not read as the agent's).
        assert!(c.agent_claims().is_empty());
        assert_eq!(c.user_claims().unwrap().get("team"), Some(&json!("x")));
        let elsewhere = ClaimNames {
            agent: Some("azp".into()),
            user: Some("on_behalf_of".into()),
        };
        let token = json!({"sub": "svc", "azp": "a", "on_behalf_of": "alice", "team": "x"});
        let c = caller_from_claims(claims(token), &issuer("idp", "", elsewhere), 0).unwrap();
        assert!(c.agent_claims().is_empty() && c.user_claims().unwrap().is_empty());
        // A nested path; a user claim the token lacks means no user; a missing agent claim
        // is refused.
        let nested = ClaimNames {
            agent: Some("act.sub".into()),
            user: Some("oid".into()),
        };
        let c = caller_from_claims(
            claims(json!({"sub": "s", "act": {"sub": "a", "t": 1}})),
            &issuer("idp", "", nested),
            0,
        )
        .unwrap();
        assert_eq!((c.agent.as_str(), c.user.as_deref()), ("a", None));
        assert_eq!(c.agent_claims().get("t"), Some(&json!(1)));
        assert!(caller_from_claims(
            claims(json!({"sub": "s"})),
            &issuer("idp", "", with_user),
            0
        )
        .is_err());
    }

    #[test]
    fn delegated_token_names_agent_and_user() {
        let c = caller_from_claims(
            claims(json!({"sub": "alice", "act": {"sub": "assistant", "team": "x"}, "patient_id": "p-1"})), &rfc8693(), 0)
        .unwrap();
        assert_eq!(c.agent, "assistant");
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(c.agent_claims().get("team"), Some(&json!("x")));
        assert_eq!(
            c.user_claims().unwrap().get("patient_id"),
            Some(&json!("p-1"))
        );
    }

    #[test]
    fn plain_token_names_only_the_agent() {
        let c =
            caller_from_claims(claims(json!({"sub": "bot", "team": "y"})), &rfc8693(), 0).unwrap();
        assert_eq!(c.agent, "bot");
        assert!(c.user.is_none() && c.user_claims().is_none());
        assert_eq!(c.agent_claims().get("team"), Some(&json!("y")));
    }

    #[test]
    fn the_issuer_prefix_qualifies_agent_and_user() {
        let c = caller_from_claims(
            claims(json!({"sub": "alice", "act": {"sub": "assistant"}})),
            &issuer("https://partner", "partner:", ClaimNames::default()),
            0,
        )
        .unwrap();
        assert_eq!(c.agent, "partner:assistant");
        assert_eq!(c.user.as_deref(), Some("partner:alice"));
        assert_eq!(c.issuer, "https://partner");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        /// Whatever a token says in its header and claims (any alg, kid, crit, dates), without
        /// a signature of a trusted key it is refused, and verifying it never panics.
        #[test]
        fn forged_tokens_are_refused_without_panic(
            alg in "ES256|RS256|EdDSA|HS256|none|es256|",
            kid in "test-rsa|test-ed25519|[a-z]{0,4}",
            extra in "\"crit\":\\[\"exp\"\\]|\"typ\":\"JWT\"|",
            claims in proptest::collection::vec(("iss|aud|sub|exp|nbf|iat|act", "\"[a-z:/.]{0,12}\"|[0-9]{1,11}|null|\\{\\}"), 0..6),
            signature in "[A-Za-z0-9_-]{0,90}",
        ) {
            let header = format!(r#"{{"alg":"{alg}","kid":"{kid}"{}{extra}}}"#, if extra.is_empty() { "" } else { "," });
            let body: Vec<String> = claims.iter().map(|(k, v)| format!(r#""{k}":{v}"#)).collect();
            let body = format!("{{{}}}", body.join(","));
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            let token = format!("{}.{}.{signature}", b64(&header), b64(&body));
            let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/idp-extra.jwks.json");
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let result = runtime.block_on(async {
                let authenticator = Authenticator::new(vec![IssuerConfig {
                    issuer: "https://idp.test".into(),
                    audiences: vec!["toolgate".into()],
                    keys: KeySource::File(fixtures),
                    id_prefix: String::new(),
                    refetch_interval: REFETCH_INTERVAL,
                    names: ClaimNames::default(),
                    leeway_seconds: LEEWAY_SECONDS,
                }])
                .await
                .unwrap();
                authenticator.verify_uncached(&token).await
            });
            proptest::prop_assert!(result.is_err(), "{token}");
        }
    }

    #[test]
    fn crit_headers_and_non_numeric_dates_are_refused() {
        let token = |header: Value| format!("{}.{}.sig", b64(&header), b64(&json!({"iss": "x"})));
        assert!(refuse_critical_extensions(&token(json!({"alg": "ES256"}))).is_ok());
        assert!(
            refuse_critical_extensions(&token(json!({"alg": "ES256", "crit": ["exp"]}))).is_err()
        );
        for bad in [
            json!({"exp": "9999999999"}),
            json!({"exp": 1, "nbf": 1.5}),
            json!({"exp": 1, "iat": -3}),
            json!({"exp": 1, "nbf": null}),
        ] {
            assert!(check_numeric_dates(&claims(bad.clone())).is_err(), "{bad}");
        }
        assert!(check_numeric_dates(&claims(json!({"exp": 1, "nbf": 0, "iat": 2}))).is_ok());
    }

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn malformed_subjects_are_refused() {
        for bad in [
            json!({"sub": ""}),
            json!({"sub": 5}),
            json!({"sub": "u", "act": "agent"}),
            json!({"sub": "u", "act": {"sub": ""}}),
            json!({"sub": "u", "act": {}}),
        ] {
            assert!(
                caller_from_claims(claims(bad.clone()), &rfc8693(), 0).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn symmetric_and_unknown_keys_are_never_used() {
        let doc = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]});
        assert!(KeySet::from_jwks(doc.to_string().as_bytes()).is_err());
        let doc = json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "h"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed"}
        ]});
        let (set, warnings) = KeySet::from_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(warnings.len(), 1);
        assert_eq!(
            set.find(Some("ed")).unwrap().alg,
            jsonwebtoken::Algorithm::EdDSA
        );
        assert!(set.find(Some("h")).is_none());
        // Without a kid, the only key is used.
        assert!(set.find(None).is_some());
    }

    #[test]
    fn declared_alg_must_fit_the_key() {
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "alg": "ES256", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed"}
        ]});
        assert!(KeySet::from_jwks(doc.to_string().as_bytes()).is_err());
    }
}
