//! Refusals and the JSON answers they become. Each says where it came from: the agent's
//! request (4xx), the upstream (502/504), or the gateway itself (500). None carries a credential.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use toolgate_credential::oauth::TokenError;
use toolgate_identity::AuthError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Said once: the authentication error is this refusal's text, not also its cause.
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    #[error("forbidden")]
    Forbidden(Denial),
    #[error("tool_not_found")]
    ToolNotFound,
    /// Not found, named (`task_not_found`).
    #[error("{0}")]
    NotFound(&'static str),
    /// State the decision needs cannot be read (the task store): fail closed.
    #[error("task store unavailable")]
    Unavailable(#[from] toolgate_tasks::StoreError),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// An argument that is undeclared, ambiguous, not representable or not of its type.
    #[error("{}", .0.problem.code())]
    Argument(#[from] crate::args::ArgRefusal),
    /// A body the action's arguments cannot be read from (not JSON, encoded, a form).
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// The admin listener's operations without (or with a wrong) admin token.
    #[error("admin token missing or wrong")]
    AdminUnauthorized,
    /// The admin listener's operations while no `admin_token_file` is configured.
    #[error("admin operations are disabled")]
    AdminDisabled,
    #[error("body too large")]
    PayloadTooLarge,
    #[error("request headers too large or too many")]
    HeadersTooLarge,
    #[error("request URI too long")]
    UriTooLong,
    /// A `@rate_limit` policy's deny: 429 with `Retry-After` and the `RateLimit` headers.
    #[error("rate limited")]
    RateLimited(Box<crate::usage::Limited>),
    /// The state does not allow it (an approval no longer pending): 409.
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// A bound on what a caller may hold (tasks, credentials in a task): 429.
    #[error("limit reached: {0}")]
    TooMany(&'static str),
    /// A bound on what the gateway holds for everyone: 503, try later.
    #[error("at capacity: {0}")]
    AtCapacity(&'static str),
    /// The request body did not arrive in time.
    #[error("request body not received in time")]
    RequestTimeout,
    #[error("upstream unreachable")]
    UpstreamUnreachable(#[from] UpstreamError),
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("internal error")]
    Internal(#[from] InternalError),
    /// The audit writer has no room for the call's record: refused rather than unrecorded.
    #[error("audit writer behind")]
    AuditUnavailable,
    /// The upstream's token endpoint gave no usable token: nothing is forwarded.
    #[error("no credential for the upstream")]
    NoUpstreamToken(#[from] toolgate_credential::oauth::TokenError),
}

/// Where a refusal comes from (pingora's habit): the agent's request, the upstream, a dependency
/// the decision needs (the task store, a token endpoint), or the gateway itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Agent,
    Upstream,
    Dependency,
    Gateway,
}

/// The body for a token endpoint that gave no usable token. The endpoint's own error code is
/// the operator's clue; its description stays in the audit line (it may echo what toolgate
/// sent).
fn token_refusal_body(error: &TokenError, decision_id: &str) -> Value {
    match error {
        TokenError::Refused { code, .. } => {
            json!({"error": "upstream_credential_refused", "token_endpoint_error": code, "decision_id": decision_id})
        }
        TokenError::Unusable(_) => {
            json!({"error": "upstream_credential_unusable", "decision_id": decision_id})
        }
        TokenError::Timeout(_) | TokenError::Unreachable(_) => {
            json!({"error": "upstream_credential_unavailable", "decision_id": decision_id})
        }
    }
}

/// What the agent is told of a policy's deny: the `@reason` of the policy that determined it,
/// or that a policy could not be evaluated. Nothing else about the policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Denial {
    pub reason: Option<String>,
    pub evaluation_error: bool,
    /// A person may lift this deny: the pending approval of this call.
    pub approval_id: Option<String>,
}

impl Denial {
    pub fn of(decision: &toolgate_policy::Decision) -> Denial {
        Denial {
            reason: decision.reason.clone(),
            evaluation_error: decision.is_evaluation_error(),
            approval_id: None,
        }
    }

    /// The deny of a call a person may approve: `approval_required`, with the approval's id
    /// and the asking policy's `@approval` text.
    pub fn of_call(decision: &toolgate_policy::Decision, approval_id: Option<String>) -> Denial {
        let mut denial = Denial::of(decision);
        if approval_id.is_some() {
            denial.reason = decision.approval.clone().or(denial.reason);
            denial.approval_id = approval_id;
        }
        denial
    }

    /// The 403 body (and, less `error`, a JSON-RPC error's `data`).
    pub fn body(&self, decision_id: &str) -> Value {
        let mut body = json!({"error": "forbidden", "decision_id": decision_id});
        if let Some(id) = &self.approval_id {
            body["error"] = json!("approval_required");
            body["approval_id"] = json!(id);
        }
        if let Some(reason) = &self.reason {
            body["reason"] = json!(reason);
        }
        if self.evaluation_error {
            // Told apart from a policy's word: an operator's fix, not the agent's.
            body["evaluation_error"] = json!(true);
        }
        body
    }
}

/// What went wrong on the way to or back from an upstream (502).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("sending the request")]
    Send(#[source] hyper_util::client::legacy::Error),
    #[error("reading its answer")]
    Read(#[source] BoxError),
    #[error("its answer is not JSON")]
    InvalidJson(#[source] serde_json::Error),
    #[error("its answer is larger than {0} bytes, too large to filter")]
    TooLarge(usize),
    #[error("its answer is encoded although it was asked not to be: it cannot be filtered")]
    Encoded,
}

/// A failure of the gateway itself (500); never the agent's doing.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error("minting the credential")]
    Mint(#[source] toolgate_credential::CredentialError),
    #[error("the credential is not a header value")]
    CredentialHeader(#[source] http::header::InvalidHeaderValue),
    #[error("re-serialising {0}")]
    Serialise(&'static str, #[source] serde_json::Error),
}

/// An error and every cause below it, for the audit line.
pub use toolgate_policy::error_chain;

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::ToolNotFound | Refusal::NotFound(_) => StatusCode::NOT_FOUND,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BadRequest(_) | Refusal::Argument(_) => StatusCode::BAD_REQUEST,
            Refusal::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            Refusal::AdminDisabled => StatusCode::FORBIDDEN,
            Refusal::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            Refusal::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::Conflict(_) => StatusCode::CONFLICT,
            Refusal::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::AtCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::NoUpstreamToken(e) => match e {
                TokenError::Timeout(_) | TokenError::Unreachable(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                TokenError::Refused { .. } | TokenError::Unusable(_) => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// Where the refusal comes from: what fails closed, and whose doing it is.
    pub fn source(&self) -> Source {
        match self {
            Refusal::Unavailable(_) | Refusal::NoUpstreamToken(_) => Source::Dependency,
            Refusal::UpstreamUnreachable(_) | Refusal::UpstreamTimeout => Source::Upstream,
            Refusal::Internal(_) | Refusal::AuditUnavailable | Refusal::AtCapacity(_) => {
                Source::Gateway
            }
            _ => Source::Agent,
        }
    }

    /// The answer to the agent. Upstream and internal details stay in the audit log.
    pub fn into_response(
        self,
        decision_id: &str,
        resource_metadata: Option<&str>,
    ) -> Response<Body> {
        let mut body = self.body(decision_id);
        // Every refusal that has an audit line names it, so `toolgate audit why` finds it.
        if let (false, Some(fields)) = (decision_id.is_empty(), body.as_object_mut()) {
            fields
                .entry("decision_id")
                .or_insert_with(|| Value::String(decision_id.to_string()));
        }
        let mut response = json_response(self.status(), &body);
        self.add_headers(response.headers_mut(), resource_metadata);
        response
    }

    /// The JSON body: the machine-readable `error`, and what the agent may be told.
    fn body(&self, decision_id: &str) -> Value {
        match self {
            Refusal::Unauthenticated(AuthError::Missing) => {
                json!({"error": "unauthorized", "decision_id": decision_id})
            }
            Refusal::Unauthenticated(e) => {
                json!({"error": "invalid_token", "error_description": e.to_string(), "decision_id": decision_id})
            }
            Refusal::Forbidden(denial) => denial.body(decision_id),
            Refusal::ToolNotFound => json!({"error": "tool_not_found"}),
            Refusal::NotFound(what) => json!({"error": what}),
            Refusal::Unavailable(_) => {
                json!({"error": "task_store_unavailable", "decision_id": decision_id})
            }
            Refusal::BadRequest(why) => json!({"error": "bad_request", "error_description": why}),
            Refusal::Argument(refusal) => json!({
                "error": refusal.problem.code(),
                "argument": refusal.argument,
                "error_description": refusal.to_string(),
            }),
            Refusal::UnsupportedMediaType(why) => {
                json!({"error": "unsupported_media_type", "error_description": why})
            }
            Refusal::MethodNotAllowed(_) => json!({"error": "method_not_allowed"}),
            Refusal::AdminUnauthorized => json!({"error": "unauthorized"}),
            Refusal::AdminDisabled => {
                json!({"error": "admin_disabled", "error_description": "set admin_token_file to enable admin operations"})
            }
            Refusal::PayloadTooLarge => json!({"error": "payload_too_large"}),
            Refusal::HeadersTooLarge => json!({"error": "headers_too_large"}),
            Refusal::UriTooLong => json!({"error": "uri_too_long"}),
            Refusal::RequestTimeout => json!({"error": "request_timeout"}),
            Refusal::Conflict(what) => json!({"error": what}),
            Refusal::RateLimited(limited) => limited.body(decision_id),
            Refusal::TooMany(what) | Refusal::AtCapacity(what) => {
                json!({"error": what, "decision_id": decision_id})
            }
            Refusal::UpstreamUnreachable(_) => {
                json!({"error": "upstream_unreachable", "decision_id": decision_id})
            }
            Refusal::UpstreamTimeout => {
                json!({"error": "upstream_timeout", "decision_id": decision_id})
            }
            Refusal::Internal(_) => json!({"error": "internal_error", "decision_id": decision_id}),
            Refusal::AuditUnavailable => json!({"error": "audit_unavailable"}),
            Refusal::NoUpstreamToken(e) => token_refusal_body(e, decision_id),
        }
    }

    /// `Allow`, `Retry-After` and the `WWW-Authenticate` challenges.
    fn add_headers(&self, headers: &mut http::HeaderMap, resource_metadata: Option<&str>) {
        if let Refusal::MethodNotAllowed(allow) = self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Refusal::AuditUnavailable
        | Refusal::AtCapacity(_)
        | Refusal::NoUpstreamToken(TokenError::Timeout(_) | TokenError::Unreachable(_)) = self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Refusal::RateLimited(limited) = self {
            limited.add_headers(headers);
        }
        if let Refusal::AdminUnauthorized = self {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"toolgate-admin\""),
            );
        }
        if let Refusal::Unauthenticated(e) = self {
            let mut challenge = String::from("Bearer realm=\"toolgate\"");
            if !matches!(e, AuthError::Missing) {
                challenge.push_str(", error=\"invalid_token\"");
            }
            if let Some(url) = resource_metadata {
                challenge.push_str(&format!(", resource_metadata=\"{url}\""));
            }
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
    }
}

pub fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(full(serde_json::to_vec(body).unwrap_or_default()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An answer with no body.
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    response
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Whether a message is an event stream.
pub fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.to_ascii_lowercase().starts_with("text/event-stream"))
}

/// Whether comment lines can go into an answer's body: an event stream that is neither
/// encoded (a comment would corrupt gzip) nor of a declared length.
pub fn can_keep_alive(headers: &http::HeaderMap) -> bool {
    is_event_stream(headers)
        && !headers.contains_key(header::CONTENT_LENGTH)
        && headers
            .get(header::CONTENT_ENCODING)
            .is_none_or(|e| e.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// An event stream that carries a comment line whenever nothing came for `every`, so a quiet
/// stream (a long tool call, an idle feed) never looks dead to the gateway's idle limit or to
/// a proxy on the way. A comment goes only where a line begins, so no event is split or ended
/// early.
pub fn keep_alive(inner: Body, every: std::time::Duration) -> Body {
    KeepAlive {
        inner,
        quiet: crate::conn_io::IdleDeadline::new(every),
        line_start: true,
    }
    .boxed()
}

struct KeepAlive {
    inner: Body,
    quiet: crate::conn_io::IdleDeadline,
    line_start: bool,
}

impl http_body::Body for KeepAlive {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            if let Some(last) = frame
                .as_ref()
                .and_then(|f| f.as_ref().ok())
                .and_then(|f| f.data_ref())
                .and_then(|data| data.last())
            {
                self.line_start = *last == b'\n';
            }
            self.quiet.moved();
            return Poll::Ready(frame);
        }
        while self.quiet.passed(cx) {
            self.quiet.moved();
            if self.line_start {
                return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b": keep-alive\n",
                )))));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_authentication_refusal_is_said_once() {
        let refusal = Refusal::Unauthenticated(AuthError::Missing);
        assert_eq!(error_chain(&refusal), "no bearer token");
    }

    #[test]
    fn comments_go_only_into_plain_unframed_event_streams() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut map = http::HeaderMap::new();
            for (k, v) in pairs {
                map.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            map
        };
        let sse = ("content-type", "Text/Event-Stream; charset=utf-8");
        assert!(can_keep_alive(&headers(&[sse])));
        assert!(can_keep_alive(&headers(&[
            sse,
            ("content-encoding", "identity")
        ])));
        assert!(!can_keep_alive(&headers(&[
            sse,
            ("content-encoding", "gzip")
        ])));
        assert!(!can_keep_alive(&headers(&[sse, ("content-length", "10")])));
        assert!(!can_keep_alive(&headers(&[(
            "content-type",
            "application/json"
        )])));
    }
}
