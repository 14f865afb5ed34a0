//! MCP upstreams (`kind: mcp`): every JSON-RPC message an agent POSTs is classified and, where
//! it calls a tool, reads a resource or gets a prompt, authorized on its own. Denied messages
//! are answered by the gateway as JSON-RPC errors and never forwarded; `tools/list` answers are
//! filtered, SSE streams event by event.
//!
//! A denial is HTTP 200 with a JSON-RPC error, not 403: MCP clients match errors to requests
//! by id, and a batch can mix allowed and denied calls in one HTTP exchange. An HTTP 403 would
//! fail the whole exchange in the client's transport instead of the one call.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use toolgate_identity::Caller;
use toolgate_mcp::{
    code, error_response, filter_tools, intent, rewrite_event_data, Intent, Payload, SseSplitter,
};
use toolgate_policy::{PolicyEngine, Resource};

use crate::answer::{full, json_response, Body, BoxError, Refusal};
use crate::audit::AuditRecord;
use crate::pipeline::{authz_request, read_limited, task_context, task_header};
use crate::upstream::Upstream;
use crate::Gateway;
use toolgate_tasks::Task;

/// The most a JSON (non-streamed) MCP answer may hold when it must be rewritten.
const MAX_JSON_ANSWER: usize = 16 << 20;
/// The most one SSE event may hold when the stream must be rewritten.
const MAX_SSE_EVENT: usize = 16 << 20;

/// What the gateway decided about the messages of one POST.
#[derive(Default)]
struct Plan {
    forward: Vec<Value>,
    /// The gateway's own answers (denials, refusals), in message order.
    answered: Vec<Value>,
    /// Ids of `tools/list` requests whose answers get filtered.
    list_ids: Vec<Value>,
    scope: Vec<String>,
    /// Audit lines of a batch's decisions (a single message uses the request's line).
    decisions: Vec<AuditRecord>,
}

impl Gateway {
    pub(crate) async fn mcp_call(
        &self,
        request: Request<Incoming>,
        caller: &Caller,
        upstream: &Upstream,
        rest: &str,
        client_ip: IpAddr,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let engine = self.policy.load_full();
        let task = match task_header(&request)? {
            Some(id) => Some(self.joined_task(&id, record).await?),
            None if upstream.config.require_task => {
                record
                    .errors
                    .push("this upstream is only called inside a task".into());
                return Err(Refusal::Forbidden);
            }
            None => None,
        };
        let (mut parts, body) = request.into_parts();
        parts.uri = upstream.uri(rest, parts.uri.query())?;
        if parts.method != Method::POST {
            // GET (the server's stream) and DELETE (end of session): authentication is enough.
            record.action = Some(format!("mcp:{}", parts.method));
            record.decision = "allow";
            let minted = self.mint(
                caller,
                &upstream.config.audience,
                vec![format!("{}/mcp", upstream.name())],
                task.as_ref(),
                record,
            )?;
            if let Some(task) = &task {
                self.tasks.add_credential(task, &minted.claims.jti).await?;
            }
            let response = self
                .send(
                    upstream,
                    Request::from_parts(parts, body.map_err(Into::into).boxed()),
                    &minted.token,
                    client_ip,
                    record,
                )
                .await?;
            return Ok(response);
        }

        let bytes = read_limited(body, self.config.limits.max_body_bytes).await?;
        let payload = match toolgate_mcp::parse(&bytes) {
            Ok(payload) => payload,
            Err(e) => {
                record.errors.push(format!("invalid JSON-RPC: {e}"));
                return Ok(json_response(
                    StatusCode::BAD_REQUEST,
                    &error_response(None, e.code, &e.message, None),
                ));
            }
        };
        let batch = matches!(payload, Payload::Batch(_));
        let plan = self.plan(
            &engine,
            caller,
            upstream,
            &payload,
            task.as_ref(),
            client_ip,
            record,
        );
        record.action.get_or_insert_with(|| {
            if batch {
                "mcp:batch".into()
            } else {
                "mcp".into()
            }
        });

        if plan.forward.is_empty() {
            self.emit(plan.decisions, None);
            let answer = if batch {
                Value::Array(plan.answered)
            } else {
                plan.answered.into_iter().next().unwrap_or(Value::Null)
            };
            return Ok(json_response(StatusCode::OK, &answer));
        }
        if record.decision != "deny" {
            record.decision = "allow";
        }
        let minted = self.mint(
            caller,
            &upstream.config.audience,
            plan.scope.clone(),
            task.as_ref(),
            record,
        )?;
        if let Some(task) = &task {
            self.tasks.add_credential(task, &minted.claims.jti).await?;
        }
        self.emit(plan.decisions, Some(&minted.claims.jti));

        let body = if batch && !plan.answered.is_empty() {
            Bytes::from(Value::Array(plan.forward).to_string())
        } else {
            bytes
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        let response = self
            .send(
                upstream,
                Request::from_parts(parts, full(body)),
                &minted.token,
                client_ip,
                record,
            )
            .await?;

        if plan.list_ids.is_empty() && plan.answered.is_empty() {
            return Ok(response);
        }
        let keep = tool_filter(
            engine,
            caller.clone(),
            upstream.name().to_string(),
            client_ip,
        );
        rewrite_answer(
            response,
            list_filter(plan.list_ids, keep),
            plan.answered,
            batch,
        )
        .await
    }

    /// Classifies and authorizes each message.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        engine: &PolicyEngine,
        caller: &Caller,
        upstream: &Upstream,
        payload: &Payload,
        task: Option<&Task>,
        client_ip: IpAddr,
        record: &mut AuditRecord,
    ) -> Plan {
        let batch = matches!(payload, Payload::Batch(_));
        let mut plan = Plan::default();
        for message in payload.messages() {
            let id = message.get("id");
            let method = message
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("response");
            let (action, args) = match intent(message) {
                Err(e) => {
                    plan.answered
                        .push(error_response(id, e.code, &e.message, None));
                    continue;
                }
                Ok(Intent::Unknown(m)) => {
                    plan.answered.push(error_response(
                        id,
                        code::METHOD_NOT_FOUND,
                        &format!("method not allowed through toolgate: {m}"),
                        None,
                    ));
                    continue;
                }
                Ok(Intent::ListTools) => {
                    plan.list_ids.extend(id.cloned());
                    plan.scope.push(method.to_string());
                    plan.forward.push(message.clone());
                    continue;
                }
                Ok(Intent::Pass) => {
                    plan.scope.push(method.to_string());
                    plan.forward.push(message.clone());
                    continue;
                }
                Ok(Intent::CallTool { name, arguments }) => {
                    (format!("{}/{name}", upstream.name()), arguments)
                }
                Ok(Intent::Guarded { method, params }) => {
                    (format!("{}/{method}", upstream.name()), params)
                }
            };

            // One audit line per decision: the request's own for a single message.
            let mut own = batch.then(|| AuditRecord {
                decision_id: uuid::Uuid::now_v7().to_string(),
                ..record.clone()
            });
            let line = own.as_mut().unwrap_or(record);
            line.action = Some(action.clone());
            line.resource = Some(action.clone());
            if !engine.has_action(&action) {
                line.errors.push("tool_not_found".into());
                plan.answered.push(error_response(
                    id,
                    code::INVALID_PARAMS,
                    &format!("unknown tool: {action}"),
                    None,
                ));
            } else {
                let (up, tool) = action.split_once('/').unwrap_or_default();
                let resource = Resource::Tool { upstream: up, tool };
                let decision = {
                    let context = task.map(|t| task_context(t, &action, line));
                    self.authorize(
                        engine, caller, &action, resource, args, context, client_ip, line,
                    )
                };
                if decision.allowed {
                    plan.scope.push(action.clone());
                    plan.scope.extend(decision.grants);
                    plan.forward.push(message.clone());
                } else {
                    let data = json!({"decision_id": line.decision_id});
                    plan.answered.push(error_response(
                        id,
                        code::FORBIDDEN,
                        "forbidden by policy",
                        Some(data),
                    ));
                }
            }
            plan.decisions.extend(own);
        }
        plan
    }

    fn emit(&self, decisions: Vec<AuditRecord>, jti: Option<&str>) {
        for mut line in decisions {
            if line.decision == "allow" {
                line.jti = jti.map(String::from);
            }
            self.audit.record(line);
        }
    }
}

type Rewrite = Arc<dyn Fn(&mut Value) -> bool + Send + Sync>;
type ToolFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Filters the answers to these `tools/list` requests; says whether it removed anything.
fn list_filter(list_ids: Vec<Value>, keep: ToolFilter) -> Rewrite {
    Arc::new(move |message: &mut Value| {
        message.get("id").is_some_and(|id| list_ids.contains(id))
            && filter_tools(message, &*keep) > 0
    })
}

/// Whether the caller may see a tool in a listing: the schema knows it and `list` permits it.
fn tool_filter(
    engine: Arc<PolicyEngine>,
    caller: Caller,
    upstream: String,
    client_ip: IpAddr,
) -> ToolFilter {
    Arc::new(move |tool: &str| {
        if !engine.has_action(&format!("{upstream}/{tool}")) {
            return false;
        }
        let resource = Resource::Tool {
            upstream: &upstream,
            tool,
        };
        let request = authz_request(&caller, "list", resource, Map::new(), client_ip);
        engine.authorize(&request).allowed
    })
}

/// Filters `tools/list` answers and adds the gateway's own answers, for JSON and SSE alike.
async fn rewrite_answer(
    response: Response<Body>,
    rewrite: Rewrite,
    answered: Vec<Value>,
    batch: bool,
) -> Result<Response<Body>, Refusal> {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.to_ascii_lowercase().starts_with("text/event-stream"));
    if sse {
        let body = SseRewrite::new(body, rewrite, answer_events(&answered));
        return Ok(Response::from_parts(parts, body.boxed()));
    }
    let bytes = read_answer(body).await?;
    let value = rewrite_json(&bytes, &rewrite, answered, batch)?;
    if batch {
        parts.status = StatusCode::OK;
    }
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(Response::from_parts(parts, full(value.to_string())))
}

/// The gateway's answers as SSE events, sent ahead of the upstream's.
fn answer_events(answered: &[Value]) -> VecDeque<Bytes> {
    answered
        .iter()
        .map(|a| Bytes::from(format!("event: message\ndata: {a}\n\n")))
        .collect()
}

fn rewrite_json(
    bytes: &[u8],
    rewrite: &Rewrite,
    answered: Vec<Value>,
    batch: bool,
) -> Result<Value, Refusal> {
    let mut value: Value = if bytes.is_empty() {
        Value::Array(Vec::new())
    } else {
        serde_json::from_slice(bytes).map_err(|e| {
            Refusal::UpstreamUnreachable(format!("upstream answered invalid JSON: {e}"))
        })?
    };
    match &mut value {
        Value::Array(items) => {
            for item in items {
                rewrite(item);
            }
        }
        single => {
            rewrite(single);
        }
    }
    if batch && !answered.is_empty() {
        let mut all = match value {
            Value::Array(items) => items,
            single => vec![single],
        };
        all.extend(answered);
        value = Value::Array(all);
    }
    Ok(value)
}

/// Reads an upstream answer whole, refusing more than `MAX_JSON_ANSWER` bytes.
async fn read_answer(mut body: Body) -> Result<Bytes, Refusal> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Refusal::UpstreamUnreachable(format!("reading the upstream's answer: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_JSON_ANSWER {
                return Err(Refusal::UpstreamUnreachable(
                    "the upstream's answer is too large to filter".into(),
                ));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// An SSE body rewritten event by event; nothing is held beyond the event being read.
struct SseRewrite {
    inner: Body,
    splitter: SseSplitter,
    pending: VecDeque<Bytes>,
    rewrite: Rewrite,
    done: bool,
}

impl SseRewrite {
    fn new(inner: Body, rewrite: Rewrite, prefix: VecDeque<Bytes>) -> Self {
        SseRewrite {
            inner,
            splitter: SseSplitter::new(MAX_SSE_EVENT),
            pending: prefix,
            rewrite,
            done: false,
        }
    }
}

impl http_body::Body for SseRewrite {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    let rest = self.splitter.finish();
                    if !rest.is_empty() {
                        self.pending.push_back(Bytes::from(rest));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let events = self.splitter.push(&data).map_err(BoxError::from)?;
                        let rewrite = self.rewrite.clone();
                        for event in events {
                            let out = rewrite_event_data(&event, |m| rewrite(m)).unwrap_or(event);
                            self.pending.push_back(Bytes::from(out));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }
}
