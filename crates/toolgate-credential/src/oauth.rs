//! Tokens from an upstream's own authorization server: OAuth 2.0 client credentials
//! (RFC 6749 §4.4) and token exchange (RFC 8693), with client authentication by secret
//! (`client_secret_basic`) or `private_key_jwt` (RFC 7523). Answers are checked (token type,
//! lifetime, never a wider scope than asked) and kept only within their lifetime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::json;

use crate::secret::{opaque_id, Secret};
use crate::tls::{client_config, plain_http_allowed, TlsError, TlsFiles};
use crate::SigningKey;

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Token answers read at most (a token endpoint answers with a small JSON object).
const MAX_ANSWER_BYTES: usize = 64 << 10;
/// Tokens kept at most per endpoint; beyond, the expired go, then all.
const MAX_CACHED: usize = 4096;
/// The longest token taken from an endpoint (a header value; bounds what the cache holds).
const MAX_TOKEN_BYTES: usize = 8 << 10;
/// The most of an endpoint's own words (`error_description`, a token type) kept for the audit.
const MAX_ENDPOINT_TEXT: usize = 200;
/// A kept token is used until this long before it expires, not up to the last second.
const EXPIRY_MARGIN_SECONDS: u64 = 10;

/// How toolgate authenticates to the token endpoint.
pub enum ClientAuth {
    /// `client_secret_basic`.
    Secret(Secret),
    /// `private_key_jwt`: an ES256 assertion signed with this key.
    PrivateKeyJwt(Box<SigningKey>),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The endpoint refused, with its OAuth `error` code (`invalid_target`, ...).
    #[error("the token endpoint refused ({status}): {code}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused {
        status: u16,
        code: String,
        description: Option<String>,
    },
    #[error("the token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the token endpoint is unreachable")]
    Unreachable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// It answered, but not with a token toolgate may use.
    #[error("the token endpoint's answer is not usable: {0}")]
    Unusable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("token_endpoint {0}: not a URL")]
    BadUrl(String),
    #[error("token_endpoint {0}: must be https:// (plain http only on loopback)")]
    NotHttps(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// SHA-256 of what a token was asked for (whom, task, scope).
type AskHash = [u8; 32];

/// A token for one upstream call, from the endpoint or kept from an earlier answer. Its
/// `Debug` names it by its id only.
#[derive(Clone)]
pub struct Issued {
    pub token: String,
    /// The token's `jti` if it is a JWT that names one, else a hash of it (for the audit).
    pub id: String,
    /// Unix seconds after which it is not used.
    pub use_until: u64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Issued({}, until {})", self.id, self.use_until)
    }
}

/// What to ask for.
pub enum Grant<'a> {
    ClientCredentials,
    Exchange {
        /// The agent's inbound (user-delegated) token.
        subject_token: &'a str,
        /// A toolgate-signed assertion naming the agent.
        actor_token: &'a str,
        audience: &'a str,
        resource: &'a str,
    },
}

/// One upstream's token endpoint.
pub struct TokenEndpoint {
    url: String,
    client_id: String,
    auth: ClientAuth,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    /// Issued tokens by a hash of what they were asked for (and for whom), with the task they
    /// serve.
    kept: Mutex<HashMap<AskHash, (Issued, Option<String>)>>,
    /// One ask in flight per key: calls that miss the cache together wait for its answer
    /// instead of each asking the endpoint.
    asking: Mutex<HashMap<AskHash, Arc<tokio::sync::Mutex<()>>>>,
}

impl TokenEndpoint {
    pub fn new(
        url: &str,
        client_id: &str,
        auth: ClientAuth,
        tls: &TlsFiles,
        timeout: Duration,
    ) -> Result<TokenEndpoint, EndpointError> {
        let parsed = url::Url::parse(url).map_err(|_| EndpointError::BadUrl(url.into()))?;
        match parsed.scheme() {
            "https" => {}
            "http" if plain_http_allowed(&parsed) => {}
            _ => return Err(EndpointError::NotHttps(url.into())),
        }
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_config(tls)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Ok(TokenEndpoint {
            url: url.to_string(),
            client_id: client_id.to_string(),
            auth,
            http: Client::builder(TokioExecutor::new()).build(https),
            timeout,
            kept: Mutex::new(HashMap::new()),
            asking: Mutex::new(HashMap::new()),
        })
    }

    /// A token for `scope` (and, for an exchange, for the caller it names), kept from an
    /// earlier answer while it lives, else asked for. `key` names whom the token is for
    /// besides the scope and task (for an exchange: user, agent and the subject token); a
    /// token is used until `not_after` at most (the caller's own token's expiry) and, in a
    /// task, until the task ends, and it is forgotten when the task ends (`forget_task`).
    pub async fn token(
        &self,
        grant: Grant<'_>,
        scope: &[String],
        key: &str,
        task: Option<(&str, u64)>,
        not_after: Option<u64>,
        now: u64,
    ) -> Result<Issued, TokenError> {
        // Asked in one order whatever the call's order, so equal asks share a token.
        let mut scope: Vec<&str> = scope.iter().map(String::as_str).collect();
        scope.sort_unstable();
        scope.dedup();
        // RFC 6749 §3.3: scope tokens are printable, without spaces, quotes or backslashes.
        if let Some(bad) = scope.iter().find(|s| {
            s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        }) {
            return Err(TokenError::Unusable(format!(
                "scope value {bad:?} cannot be asked for"
            )));
        }
        let scope = scope.join(" ");
        let task_id = task.map(|(id, _)| id);
        let key: AskHash = {
            use sha2::Digest;
            let mut hash = sha2::Sha256::new();
            for part in [key, task_id.unwrap_or(""), &scope] {
                hash.update((part.len() as u64).to_be_bytes());
                hash.update(part.as_bytes());
            }
            hash.finalize().into()
        };
        if let Some(kept) = self.kept_token(&key, now) {
            return Ok(kept);
        }
        let waiting = Waiting::new(self, key);
        // Behind another call's ask for as long as an ask may take, then its own.
        let _turn = tokio::time::timeout(self.timeout, waiting.turn().lock())
            .await
            .map_err(|_| TokenError::Timeout(self.timeout))?;
        // The call before may have been answered meanwhile.
        if let Some(kept) = self.kept_token(&key, now) {
            return Ok(kept);
        }
        self.ask_and_keep(&grant, &scope, key, task, not_after, now)
            .await
    }

    /// The token kept for `key`, while it lives.
    fn kept_token(&self, key: &AskHash, now: u64) -> Option<Issued> {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        kept.get(key)
            .filter(|(t, _)| t.use_until > now)
            .map(|(t, _)| t.clone())
    }

    async fn ask_and_keep(
        &self,
        grant: &Grant<'_>,
        scope: &str,
        key: AskHash,
        task: Option<(&str, u64)>,
        not_after: Option<u64>,
        now: u64,
    ) -> Result<Issued, TokenError> {
        let task_id = task.map(|(id, _)| id);
        let limit = [task.map(|(_, end)| end), not_after]
            .into_iter()
            .flatten()
            .min();
        let answer = self.ask(grant, scope, now).await?;
        let issued = checked(answer, grant, scope, limit, now)?;
        let mut kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() >= MAX_CACHED {
            kept.retain(|_, (t, _)| t.use_until > now);
            if kept.len() >= MAX_CACHED {
                kept.clear();
            }
        }
        if issued.use_until > now {
            kept.insert(key, (issued.clone(), task_id.map(String::from)));
        }
        Ok(issued)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Forgets every token kept for a task that ended.
    pub fn forget_task(&self, id: &str) {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, (_, task)| task.as_deref() != Some(id));
    }

    /// Tokens kept now.
    pub fn kept(&self) -> usize {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// The token request: the grant's form, and the client's authentication.
    fn request(
        &self,
        grant: &Grant<'_>,
        scope: &str,
        now: u64,
    ) -> Result<http::Request<Full<Bytes>>, TokenError> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        match grant {
            Grant::ClientCredentials => {
                form.append_pair("grant_type", "client_credentials");
            }
            Grant::Exchange {
                subject_token,
                actor_token,
                audience,
                resource,
            } => {
                form.append_pair("grant_type", TOKEN_EXCHANGE)
                    .append_pair("subject_token", subject_token)
                    .append_pair("subject_token_type", JWT_TOKEN_TYPE)
                    .append_pair("actor_token", actor_token)
                    .append_pair("actor_token_type", JWT_TOKEN_TYPE)
                    .append_pair("requested_token_type", ACCESS_TOKEN_TYPE)
                    .append_pair("audience", audience)
                    .append_pair("resource", resource);
            }
        }
        if !scope.is_empty() {
            form.append_pair("scope", scope);
        }
        let mut request = http::Request::post(&self.url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        match &self.auth {
            ClientAuth::Secret(secret) => {
                // RFC 6749 §2.3.1: both parts form-encoded before the basic encoding.
                let encode =
                    |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!("{}:{}", encode(&self.client_id), encode(secret.expose()));
                let mut value =
                    http::HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair)))
                        .map_err(|_| {
                            TokenError::Unusable("the client secret is not a header value".into())
                        })?;
                value.set_sensitive(true);
                request = request.header(http::header::AUTHORIZATION, value);
            }
            ClientAuth::PrivateKeyJwt(key) => {
                let assertion = key
                    .sign(
                        "JWT",
                        &json!({
                            "iss": self.client_id, "sub": self.client_id, "aud": self.url,
                            "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(),
                        }),
                    )
                    .map_err(|e| TokenError::Unusable(e.to_string()))?;
                form.append_pair("client_id", &self.client_id)
                    .append_pair("client_assertion_type", JWT_BEARER_ASSERTION)
                    .append_pair("client_assertion", &assertion);
            }
        }
        request
            .body(Full::new(Bytes::from(form.finish())))
            .map_err(|e| TokenError::Unusable(e.to_string()))
    }

    async fn ask(&self, grant: &Grant<'_>, scope: &str, now: u64) -> Result<Answer, TokenError> {
        let request = self.request(grant, scope, now)?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| TokenError::Unreachable(Box::new(e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(TokenError::Unreachable)?
                .to_bytes();
            Ok::<_, TokenError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| TokenError::Timeout(self.timeout))??;
        if !status.is_success() {
            let error: ErrorAnswer = serde_json::from_slice(&body).unwrap_or_default();
            // The code is passed on to the agent: only one shaped as RFC 6749 §5.2 says.
            let code = error
                .error
                .filter(|c| {
                    !c.is_empty()
                        && c.len() <= 64
                        && c.bytes()
                            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
                })
                .unwrap_or_else(|| "server_error".into());
            return Err(TokenError::Refused {
                status: status.as_u16(),
                code,
                description: error.error_description.map(|d| endpoint_text(&d)),
            });
        }
        serde_json::from_slice(&body)
            .map_err(|e| TokenError::Unusable(format!("not a token answer: {e}")))
    }
}

/// A call's place in the line of calls asking for one key: the entry goes once nobody is in
/// it (also when the call is dropped while waiting or asking).
struct Waiting<'a> {
    endpoint: &'a TokenEndpoint,
    key: AskHash,
    /// Cloned and dropped only under the map's lock, so its count there is exact.
    turn: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl<'a> Waiting<'a> {
    fn new(endpoint: &'a TokenEndpoint, key: AskHash) -> Self {
        let turn = endpoint
            .asking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone();
        Waiting {
            endpoint,
            key,
            turn: Some(turn),
        }
    }

    fn turn(&self) -> &tokio::sync::Mutex<()> {
        self.turn.as_deref().expect("held until dropped")
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut asking = self
            .endpoint
            .asking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(self.turn.take());
        // Held by the map alone: nobody else is in line.
        if asking
            .get(&self.key)
            .is_some_and(|t| Arc::strong_count(t) == 1)
        {
            asking.remove(&self.key);
        }
    }
}

#[derive(Deserialize)]
struct Answer {
    access_token: String,
    token_type: String,
    expires_in: Option<u64>,
    scope: Option<String>,
    issued_token_type: Option<String>,
}

#[derive(Deserialize, Default)]
struct ErrorAnswer {
    error: Option<String>,
    error_description: Option<String>,
}

/// The answer as a token toolgate may use: a bearer access token, never wider than asked,
/// used only within its lifetime (and `not_after`).
fn checked(
    answer: Answer,
    grant: &Grant<'_>,
    asked: &str,
    not_after: Option<u64>,
    now: u64,
) -> Result<Issued, TokenError> {
    if !answer.token_type.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Unusable(format!(
            "token_type {:?}, not Bearer",
            endpoint_text(&answer.token_type)
        )));
    }
    if let Grant::Exchange { .. } = grant {
        match answer.issued_token_type.as_deref() {
            Some(ACCESS_TOKEN_TYPE | JWT_TOKEN_TYPE) => {}
            other => {
                return Err(TokenError::Unusable(format!(
                    "issued_token_type {:?}, not an access token",
                    other.map(endpoint_text)
                )))
            }
        }
    }
    if answer.access_token.is_empty()
        || answer.access_token.len() > MAX_TOKEN_BYTES
        || http::HeaderValue::from_str(&answer.access_token).is_err()
    {
        return Err(TokenError::Unusable(format!(
            "access_token is not a header value of at most {MAX_TOKEN_BYTES} bytes"
        )));
    }
    if let Some(granted) = &answer.scope {
        let asked: Vec<&str> = asked.split_whitespace().collect();
        if let Some(wider) = granted.split_whitespace().find(|s| !asked.contains(s)) {
            return Err(TokenError::Unusable(format!(
                "scope {:?} was granted but not asked for",
                endpoint_text(wider)
            )));
        }
    }
    // Without a lifetime it is used for this call only.
    let use_until = match answer.expires_in {
        Some(0) => return Err(TokenError::Unusable("expires_in is 0".into())),
        Some(seconds) => {
            let margin = EXPIRY_MARGIN_SECONDS.min(seconds / 10);
            let until = now.saturating_add(seconds - margin);
            not_after.map_or(until, |limit| until.min(limit))
        }
        None => now,
    };
    let id = jwt_id(&answer.access_token).unwrap_or_else(|| opaque_id(&answer.access_token));
    Ok(Issued {
        token: answer.access_token,
        id,
        use_until,
    })
}

/// An endpoint's own words, as the audit keeps them: printable, and short (it may echo what
/// toolgate sent it).
fn endpoint_text(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_ENDPOINT_TEXT)
        .collect()
}

/// `jti:<jti>` of a JWT that names one (read, not verified: it is only a name for the audit).
fn jwt_id(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    claims
        .get("jti")?
        .as_str()
        .filter(|j| !j.is_empty() && j.len() <= 128)
        .map(|j| format!("jti:{j}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(scope: Option<&str>, expires_in: Option<u64>) -> Answer {
        Answer {
            access_token: "tok".into(),
            token_type: "bearer".into(),
            expires_in,
            scope: scope.map(String::from),
            issued_token_type: Some(ACCESS_TOKEN_TYPE.into()),
        }
    }

    #[test]
    fn answers_are_checked() {
        let cc = Grant::ClientCredentials;
        let ok = checked(answer(Some("a"), Some(300)), &cc, "a b", None, 1000).unwrap();
        assert_eq!(ok.use_until, 1000 + 300 - 10);
        assert!(ok.id.starts_with("sha256:"));
        let bounded = checked(answer(None, Some(300)), &cc, "a", Some(1100), 1000).unwrap();
        assert_eq!(bounded.use_until, 1100);
        let wider = checked(answer(Some("a admin"), Some(300)), &cc, "a", None, 1000);
        assert!(matches!(wider, Err(TokenError::Unusable(why)) if why.contains("admin")));
        assert_eq!(
            checked(answer(None, None), &cc, "a", None, 1000)
                .unwrap()
                .use_until,
            1000
        );
        let exchange = Grant::Exchange {
            subject_token: "s",
            actor_token: "a",
            audience: "aud",
            resource: "https://r",
        };
        let mut id_token = answer(None, Some(60));
        id_token.issued_token_type = Some("urn:ietf:params:oauth:token-type:id_token".into());
        assert!(checked(id_token, &exchange, "a", None, 1000).is_err());
        let mut not_bearer = answer(None, Some(60));
        not_bearer.token_type = "N_A".into();
        assert!(checked(not_bearer, &cc, "a", None, 1000).is_err());
    }

    #[test]
    fn a_jwt_is_named_by_its_jti() {
        let payload = URL_SAFE_NO_PAD.encode(r#"{"jti":"abc-1"}"#);
        assert_eq!(
            jwt_id(&format!("h.{payload}.s")).as_deref(),
            Some("jti:abc-1")
        );
        assert_eq!(jwt_id("opaque-token"), None);
    }
}
