//! One call's way through the gateway:
//! **authenticate → classify → authorize → mint → forward → record**.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chrono::Utc;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};
use toolgate_credential::{Grant, Minted};
use toolgate_identity::{unix_now, Caller};
use toolgate_policy::{
    AuthzRequest, Decision, Env, PolicyEngine, Principal, Resource, TaskContext,
};
use toolgate_tasks::Task;

use crate::answer::{full, json_response, Body, Refusal};
use crate::audit::AuditRecord;
use crate::config::UpstreamKind;
use crate::routes::{Classified, ClassifyError};
use crate::upstream::Upstream;
use crate::{Gateway, Routing};

pub const JWKS_PATH: &str = "/.well-known/jwks.json";
pub const TASK_HEADER: &str = "toolgate-task";
/// RFC 9728 protected resource metadata, for MCP clients discovering how to authenticate.
pub const RESOURCE_METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

impl Gateway {
    /// Serves one request on the agent listener. Never panics on input; every outcome is
    /// answered, counted and (for calls) recorded.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        if request.method() == Method::GET {
            let path = request.uri().path();
            if path == JWKS_PATH {
                return json_response(StatusCode::OK, &self.minter.jwks());
            }
            if let Some(resource) = path.strip_prefix(RESOURCE_METADATA_PATH) {
                return self.resource_metadata(&self.routing.load(), &request, resource);
            }
        }
        let routing = self.routing.load_full();
        // Kept for a 401's `resource_metadata`; the URL is built only then.
        let host = request_host(&request);
        let mut record = AuditRecord {
            source_ip: peer.ip().to_string(),
            ..AuditRecord::begin(&request)
        };
        let mut upstream = None;
        let response = match self
            .call(&routing, request, peer.ip(), &mut record, &mut upstream)
            .await
        {
            Ok(response) => response,
            Err(refusal) => {
                if !matches!(refusal, Refusal::Forbidden) {
                    record.errors.push(refusal.to_string());
                }
                let metadata = matches!(refusal, Refusal::Unauthenticated(_))
                    .then(|| self.metadata_url(&routing, host.as_ref(), &record.path));
                refusal.into_response(&record.decision_id, metadata.as_deref())
            }
        };
        // record
        record.status = response.status().as_u16();
        self.metrics
            .requests
            .with_label_values(&[
                upstream.map_or("none", |i| routing.upstreams[i].name()),
                response.status().as_str(),
            ])
            .inc();
        self.audit.record(record);
        response
    }

    async fn call(
        &self,
        routing: &Routing,
        request: Request<Incoming>,
        client_ip: IpAddr,
        record: &mut AuditRecord,
        upstream_index: &mut Option<usize>,
    ) -> Result<Response<Body>, Refusal> {
        check_header_size(&request, self.config.limits.max_header_bytes)?;

        // authenticate
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller = self.auth.authenticate_header(authorization).await?;
        record.agent = Some(caller.agent.clone());
        record.user = caller.user.clone();
        let path = request.uri().path();
        if path.starts_with("/v1/") || path == "/oauth2/introspect" {
            return self.own_endpoint(request, &caller, client_ip, record).await;
        }

        // classify
        if let Some((index, rest)) = routing.routes.upstream(request.uri().path()) {
            let upstream = &routing.upstreams[index];
            if upstream.config.kind == UpstreamKind::Mcp {
                *upstream_index = Some(index);
                let rest = rest.to_string();
                return self
                    .mcp_call(request, &caller, upstream, &rest, client_ip, record)
                    .await;
            }
        }
        let call = routing
            .routes
            .classify(request.method(), request.uri().path())
            .map_err(|e| match e {
                ClassifyError::NotFound => Refusal::ToolNotFound,
                ClassifyError::BadPath(why) => Refusal::BadRequest(why.into()),
            })?;
        let upstream = &routing.upstreams[call.upstream];
        *upstream_index = Some(call.upstream);
        let action = format!("{}/{}", upstream.name(), call.tool);
        record.action = Some(action.clone());
        record.resource = Some(action.clone());

        // One policy snapshot for the whole call, even if a reload lands meanwhile.
        let engine = self.policy.load_full();
        let (request, args) = read_args(
            request,
            &call,
            &engine,
            &action,
            self.config.limits.max_body_bytes,
        )
        .await?;

        // authorize
        let task = match task_header(&request)? {
            Some(id) => Some(self.joined_task(&id, record).await?),
            None if call.require_task => {
                record
                    .errors
                    .push("this tool is only called inside a task".into());
                self.metrics.decisions.with_label_values(&["deny"]).inc();
                return Err(Refusal::Forbidden);
            }
            None => None,
        };
        let resource = Resource::Tool {
            upstream: upstream.name(),
            tool: &call.tool,
        };
        let context = task.as_ref().map(|t| task_context(t, &action, record));
        let decision = self.authorize(
            &engine, &caller, &action, resource, args, context, client_ip, record,
        );
        if !decision.allowed {
            return Err(Refusal::Forbidden);
        }

        // mint
        let mut scope = vec![action];
        scope.extend(decision.grants);
        let minted = self.mint(
            &caller,
            &upstream.config.audience,
            scope,
            task.as_ref(),
            record,
        )?;
        if let Some(task) = &task {
            // Unrecorded, the credential could not be listed when the task ends: fail closed.
            self.tasks.add_credential(task, &minted.claims.jti).await?;
        }

        // forward
        let (mut parts, body) = request.into_parts();
        parts.uri = upstream.uri(&call.rest, parts.uri.query())?;
        self.send(
            upstream,
            Request::from_parts(parts, body),
            &minted.token,
            client_ip,
            record,
        )
        .await
    }

    /// Forwards with the minted credential, timing the upstream and noting its status.
    pub(crate) async fn send(
        &self,
        upstream: &Upstream,
        request: Request<Body>,
        credential: &str,
        client_ip: IpAddr,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let started = Instant::now();
        let result = upstream
            .forward(&self.client, request, credential, client_ip)
            .await;
        self.metrics
            .upstream_duration
            .with_label_values(&[upstream.name()])
            .observe(started.elapsed().as_secs_f64());
        let response = result?;
        record.upstream_status = Some(response.status().as_u16());
        Ok(response)
    }

    /// Decides, and writes the decision into the record and the metrics.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn authorize(
        &self,
        engine: &PolicyEngine,
        caller: &Caller,
        action: &str,
        resource: Resource<'_>,
        args: Map<String, Value>,
        task: Option<TaskContext>,
        client_ip: IpAddr,
        record: &mut AuditRecord,
    ) -> Decision {
        let started = Instant::now();
        let mut request = authz_request(caller, action, resource, args, client_ip);
        request.task = task;
        let decision = engine.authorize(&request);
        let elapsed = started.elapsed();
        self.metrics.authz_duration.observe(elapsed.as_secs_f64());
        let outcome = if decision.allowed { "allow" } else { "deny" };
        self.metrics.decisions.with_label_values(&[outcome]).inc();
        record.decision = outcome;
        record.eval_us = Some(elapsed.as_micros() as u64);
        record.policies = decision.policies.clone();
        record.errors.extend(decision.errors.iter().cloned());
        decision
    }

    pub(crate) fn mint(
        &self,
        caller: &Caller,
        audience: &str,
        scope: Vec<String>,
        task: Option<&Task>,
        record: &mut AuditRecord,
    ) -> Result<Minted, Refusal> {
        let grant = Grant {
            user: caller.user.as_deref(),
            agent: &caller.agent,
            audience,
            scope,
            decision_id: &record.decision_id,
            task_id: task.map(|t| t.id.as_str()),
            not_after: task.map(|t| t.expires_at),
        };
        let minted = self
            .minter
            .mint(&grant, unix_now())
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        self.metrics.minted.inc();
        record.jti = Some(minted.claims.jti.clone());
        Ok(minted)
    }
}

impl Gateway {
    /// The gateway's external base URL: `public_url`, else from the request's host.
    fn base_url(&self, host: Option<&HeaderValue>) -> String {
        if let Some(url) = &self.config.public_url {
            return url.trim_end_matches('/').to_string();
        }
        let host = host
            .and_then(|h| h.to_str().ok())
            .map(String::from)
            .unwrap_or_else(|| self.config.listen.to_string());
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{host}")
    }

    /// Where the metadata for the resource at `path` lives (path-suffixed, RFC 9728).
    fn metadata_url(&self, routing: &Routing, host: Option<&HeaderValue>, path: &str) -> String {
        let upstream = routing
            .routes
            .upstream(path)
            .map(|(index, _)| format!("/{}", routing.upstreams[index].name()))
            .unwrap_or_default();
        format!("{}{RESOURCE_METADATA_PATH}{upstream}", self.base_url(host))
    }

    fn resource_metadata<B>(
        &self,
        routing: &Routing,
        request: &Request<B>,
        resource_path: &str,
    ) -> Response<Body> {
        if !resource_path.is_empty() && routing.routes.upstream(resource_path).is_none() {
            return json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "not_found"}),
            );
        }
        let issuers: Vec<&str> = self
            .config
            .inbound
            .jwt
            .iter()
            .map(|j| j.issuer.as_str())
            .collect();
        json_response(
            StatusCode::OK,
            &serde_json::json!({
                "resource": format!("{}{resource_path}", self.base_url(request_host(request).as_ref())),
                "authorization_servers": issuers,
                "bearer_methods_supported": ["header"],
                "resource_name": "toolgate",
            }),
        )
    }
}

/// The host a request was sent to: `Host` (HTTP/1.1) or the URI authority (HTTP/2).
fn request_host<B>(request: &Request<B>) -> Option<HeaderValue> {
    request.headers().get(header::HOST).cloned().or_else(|| {
        request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// The task id a call names in `Toolgate-Task`, if any.
pub(crate) fn task_header<B>(request: &Request<B>) -> Result<Option<String>, Refusal> {
    match request.headers().get(TASK_HEADER) {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(id) if !id.trim().is_empty() && id.len() <= 128 => Ok(Some(id.trim().to_string())),
            _ => Err(Refusal::BadRequest(
                "Toolgate-Task must name a task id".into(),
            )),
        },
    }
}

/// The task as policies see it for `action`, noting any approval in the audit record.
pub(crate) fn task_context(task: &Task, action: &str, record: &mut AuditRecord) -> TaskContext {
    let approval = task.approval_for(action);
    record.approval = approval.cloned();
    TaskContext {
        id: task.id.clone(),
        intent: task.intent.clone(),
        approved: approval.is_some(),
        approved_by: approval.map(|a| a.approver.clone()),
    }
}

/// The Cedar question for a call by `caller`: agent, and user when delegated, with the claims
/// that describe each.
pub(crate) fn authz_request<'a>(
    caller: &'a Caller,
    action: &'a str,
    resource: Resource<'a>,
    args: Map<String, Value>,
    client_ip: IpAddr,
) -> AuthzRequest<'a> {
    AuthzRequest {
        agent: Principal {
            id: &caller.agent,
            claims: caller.agent_claims(),
        },
        user: caller.user.as_deref().map(|id| Principal {
            id,
            claims: caller.user_claims().unwrap_or(caller.agent_claims()),
        }),
        action,
        resource,
        args,
        env: Env {
            source_ip: client_ip,
            time: Utc::now(),
        },
        task: None,
    }
}

fn check_header_size<B>(request: &Request<B>, limit: usize) -> Result<(), Refusal> {
    let size: usize = request
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + request.uri().to_string().len();
    if size > limit {
        return Err(Refusal::HeadersTooLarge);
    }
    Ok(())
}

/// Path parameters, query parameters and (for JSON bodies of actions that declare args)
/// body fields. The same name from two sources with different values is refused: the
/// policy and the upstream could otherwise read different values.
async fn read_args(
    request: Request<Incoming>,
    call: &Classified,
    engine: &PolicyEngine,
    action: &str,
    max_body: usize,
) -> Result<(Request<Body>, Map<String, Value>), Refusal> {
    let mut args = Map::new();
    for (name, value) in &call.params {
        args.insert(name.clone(), Value::String(value.clone()));
    }
    if let Some(query) = request.uri().query() {
        let mut from_query: Map<String, Value> = Map::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = Value::String(value.into_owned());
            match from_query.get_mut(name.as_ref()) {
                Some(Value::Array(items)) => items.push(value),
                Some(first) => *first = Value::Array(vec![first.take(), value]),
                None => {
                    from_query.insert(name.into_owned(), value);
                }
            }
        }
        merge_args(&mut args, from_query)?;
    }

    let declares_args = engine
        .schema_info()
        .actions
        .get(action)
        .is_some_and(|ctx| !ctx.args.is_empty());
    let (parts, body) = request.into_parts();
    if !(declares_args && is_json(&parts.headers)) {
        return Ok((
            Request::from_parts(parts, body.map_err(Into::into).boxed()),
            args,
        ));
    }
    let declared_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared_length.is_some_and(|n| n > max_body as u64) {
        return Err(Refusal::PayloadTooLarge);
    }
    let bytes = read_limited(body, max_body).await?;
    if !bytes.is_empty() {
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Refusal::BadRequest(format!("body is not valid JSON: {e}")))?;
        if let Value::Object(fields) = value {
            merge_args(&mut args, fields)?;
        }
    }
    Ok((Request::from_parts(parts, full(bytes)), args))
}

/// Reads a request body whole, refusing more than `limit` bytes (413).
pub(crate) async fn read_limited(body: Incoming, limit: usize) -> Result<Bytes, Refusal> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Refusal::PayloadTooLarge
            } else {
                Refusal::BadRequest(format!("cannot read body: {e}"))
            }
        })
}

fn merge_args(args: &mut Map<String, Value>, more: Map<String, Value>) -> Result<(), Refusal> {
    for (name, value) in more {
        match args.get(&name) {
            Some(prior) if as_text(prior) != as_text(&value) => {
                return Err(Refusal::BadRequest(format!(
                    "argument `{name}` is given twice with different values"
                )))
            }
            Some(_) => {}
            None => {
                args.insert(name, value);
            }
        }
    }
    Ok(())
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .is_some_and(|t| t == "application/json" || t.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_argument_with_the_same_value_merges_and_a_conflict_is_refused() {
        let mut args = json!({"invoice_id": "42"}).as_object().unwrap().clone();
        merge_args(
            &mut args,
            json!({"invoice_id": 42, "amount": 5})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap();
        assert_eq!(args.get("amount"), Some(&json!(5)));
        assert_eq!(
            args.get("invoice_id"),
            Some(&json!("42")),
            "the first source stays"
        );
        let err = merge_args(
            &mut args,
            json!({"invoice_id": 43}).as_object().unwrap().clone(),
        )
        .unwrap_err();
        assert!(matches!(err, Refusal::BadRequest(_)));
    }

    #[test]
    fn json_content_types() {
        let mut h = http::HeaderMap::new();
        for (ct, want) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/merge-patch+json", true),
            ("text/plain", false),
        ] {
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(is_json(&h), want, "{ct}");
        }
    }
}
