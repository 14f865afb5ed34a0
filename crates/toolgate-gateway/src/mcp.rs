//! MCP upstreams (`kind: mcp`): every JSON-RPC message an agent POSTs is classified and, where
//! it calls a tool, reads a resource or gets a prompt, authorized on its own. Denied messages
//! are answered by the gateway as JSON-RPC errors and never forwarded; `tools/list` answers are
//! filtered, SSE streams event by event.
//!
//! A denial is HTTP 200 with a JSON-RPC error, not 403: MCP clients match errors to requests
//! by id, and a batch can mix allowed and denied calls in one HTTP exchange. An HTTP 403 would
//! fail the whole exchange in the client's transport instead of the one call.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use toolgate_identity::Caller;
use toolgate_mcp::json::{number_texts, to_vec_with_numbers};
use toolgate_mcp::{
    canonical_uri, code, error_response, filter_listing, intent, is_listing, mark_private,
    rewrite_event_data, tool_input_error, transport_headers_match, ArgsPlace, Intent, Listed,
    Payload, RpcError, SseSplitter,
};
use toolgate_policy::{PolicyEngine, Resource};

use crate::args::{render, ArgRefusal, Origin, Rules};

use crate::answer::{
    error_chain, full, is_event_stream, json_response, Body, BoxError, Denial, InternalError,
    Refusal, UpstreamError,
};
use crate::audit::{AuditRecord, Verdict};
use crate::endpoints::{Dispatch, Served};
use crate::pipeline::{authz_request, read_limited, ActionId, CallContext, Collected, Unfinished};
use crate::rest::check_json_body_headers;
use crate::upstream::{keep_standard_headers, Upstream};
use crate::Gateway;

/// MCP tools' input schemas, as their servers listed them: where a string argument may also
/// be read as JSON of another type, and what the pins are checked against. Bounded per
/// upstream; past it, that upstream's start again empty.
#[derive(Default)]
pub(crate) struct ToolSchemas {
    listed: std::sync::RwLock<std::collections::HashMap<(String, String), Arc<Value>>>,
    /// Tools once listed unlike their pin: refused until the lock file is reloaded, whatever
    /// the server lists after (a server that reverts cannot unlock a tool).
    changed: std::sync::RwLock<std::collections::HashSet<(String, String)>>,
}

const MAX_TOOL_SCHEMAS_PER_UPSTREAM: usize = 2_000;

impl ToolSchemas {
    /// The tool's listing entry (its `inputSchema`, `outputSchema`, ...), when seen.
    fn get(&self, upstream: &str, tool: &str) -> Option<Arc<Value>> {
        let map = self.listed.read().unwrap_or_else(|e| e.into_inner());
        map.get(&(upstream.to_string(), tool.to_string())).cloned()
    }

    fn forget(&self, upstream: &str) {
        let mut map = self.listed.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|(up, _), _| up != upstream);
    }

    fn learn(&self, upstream: &str, listing: &Value, pins: Option<&crate::pins::ToolPins>) {
        let Some(tools) = listing.pointer("/result/tools").and_then(Value::as_array) else {
            return;
        };
        let mut map = self.listed.write().unwrap_or_else(|e| e.into_inner());
        let held = map.keys().filter(|(up, _)| up == upstream).count();
        if held + tools.len() > MAX_TOOL_SCHEMAS_PER_UPSTREAM {
            map.retain(|(up, _), _| up != upstream);
        }
        for tool in tools {
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                continue;
            };
            let key = (upstream.to_string(), name.to_string());
            let digest = crate::pins::live_digest(tool);
            if pins.is_some_and(|pins| !pins.allows(upstream, name, &digest)) {
                let mut changed = self.changed.write().unwrap_or_else(|e| e.into_inner());
                if changed.len() < MAX_TOOL_SCHEMAS_PER_UPSTREAM * 4 {
                    changed.insert(key.clone());
                }
            }
            let entry = json!({
                "inputSchema": tool.get("inputSchema"),
                "outputSchema": tool.get("outputSchema"),
                "definition_sha256": digest,
            });
            map.insert(key, Arc::new(entry));
        }
    }

    /// Whether the tool was ever listed unlike its pin since the pins were last loaded.
    fn was_changed(&self, upstream: &str, tool: &str) -> bool {
        let changed = self.changed.read().unwrap_or_else(|e| e.into_inner());
        changed.contains(&(upstream.to_string(), tool.to_string()))
    }

    /// New pins: what was refused under the old ones is judged again by its next listing.
    pub(crate) fn pins_reloaded(&self) {
        let mut changed = self.changed.write().unwrap_or_else(|e| e.into_inner());
        changed.clear();
    }
}

/// What a server gives a caller to come back with: a session, a task handle.
const SESSION: &str = "mcp-session";
/// A session held by one of several endpoints: `<id>.<endpoint key>` is bound.
const SESSION_AT: &str = "mcp-session-at";
const TASK: &str = "mcp-task";

/// Ids a server gives out (session ids, task handles) bound to the caller they were given to:
/// `<id>.<tag>`, a tag keyed by the gateway of the upstream, the caller and the id. Another
/// caller's (or a made-up) id is unknown, with no state to share between replicas.
#[derive(Clone)]
pub(crate) struct Binder {
    minter: Arc<toolgate_credential::Minter>,
    upstream: String,
    issuer: String,
    agent: String,
    user: String,
}

impl Binder {
    fn new(gateway: &Gateway, ctx: &CallContext<'_>, upstream: &Upstream) -> Binder {
        Binder::for_caller(gateway, ctx.caller, upstream.name())
    }

    /// Ids given out at endpoint `name` (an upstream's, or a federated one's) to `caller`.
    pub(crate) fn for_caller(gateway: &Gateway, caller: &Caller, name: &str) -> Binder {
        Binder {
            minter: gateway.minter.clone(),
            upstream: name.to_string(),
            issuer: caller.issuer.clone(),
            agent: caller.agent.clone(),
            user: caller.user.clone().unwrap_or_default(),
        }
    }

    /// As a JSON array: no two different callers or ids write the same text.
    fn binding(&self, kind: &str, id: &str) -> String {
        json!([kind, self.upstream, self.issuer, self.agent, self.user, id]).to_string()
    }

    pub(crate) fn bind(&self, kind: &str, id: &str) -> String {
        format!("{id}.{}", self.minter.session_tag(&self.binding(kind, id)))
    }

    /// The server's id inside a bound one, when it was bound to this caller.
    pub(crate) fn unbind<'a>(&self, kind: &str, bound: &'a str) -> Option<&'a str> {
        let (id, tag) = bound.rsplit_once('.')?;
        self.minter
            .is_session_tag(&self.binding(kind, id), tag)
            .then_some(id)
    }
}

/// Where a server's task id stands in an answer, and in a notification (or a server's request).
const TASK_IN_RESULT: [&str; 3] = [
    "/result/task/taskId",
    "/result/taskId",
    "/result/_meta/io.modelcontextprotocol~1related-task/taskId",
];
const TASK_IN_PARAMS: [&str; 2] = [
    "/params/taskId",
    "/params/_meta/io.modelcontextprotocol~1related-task/taskId",
];

/// The task handles one request may be given: in the answers to its own messages (a task
/// created for its call, a handle returned unasked, a task's own answers), and, in what else
/// the server sends on its streams, only the tasks those answers or its own `tasks/*` messages
/// named. Any other message naming a task is another caller's (a server routing to the wrong
/// stream) or nobody's: left out.
struct TaskHandles {
    binder: Binder,
    /// Ids of the request's forwarded messages.
    answers_to: Vec<Value>,
    /// The server's task ids this request owns.
    owned: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl TaskHandles {
    fn new(binder: Binder, answers_to: Vec<Value>, owned: Vec<String>) -> TaskHandles {
        TaskHandles {
            binder,
            answers_to,
            owned: std::sync::Mutex::new(owned.into_iter().collect()),
        }
    }

    /// Binds the task ids of a message the request owns; drops one naming another's task.
    fn apply(&self, message: &mut Value) -> bool {
        let method = message.get("method").and_then(Value::as_str);
        // The server's own requests about the client's tasks name the client's ids.
        if method.is_some_and(|m| m.starts_with("tasks/")) {
            return false;
        }
        let is_answer = message.get("result").is_some();
        let ours = is_answer
            && message
                .get("id")
                .is_some_and(|id| self.answers_to.contains(id));
        let pointers: &[&str] = if is_answer {
            &TASK_IN_RESULT
        } else {
            &TASK_IN_PARAMS
        };
        let mut changed = false;
        for pointer in pointers {
            let Some(Value::String(id)) = message.pointer_mut(pointer) else {
                continue;
            };
            let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
            let known = if ours {
                owned.insert(id.clone());
                true
            } else {
                owned.contains(id.as_str())
            };
            drop(owned);
            if !known {
                *message = Value::Null;
                return true;
            }
            *id = self.binder.bind(TASK, id);
            changed = true;
        }
        changed
    }
}

/// The most a JSON (non-streamed) MCP answer may hold when it must be rewritten.
const MAX_JSON_ANSWER: usize = 16 << 20;
/// The MCP session header, bound to its caller on the way out and checked on the way in.
pub(crate) const SESSION_HEADER: http::HeaderName = http::HeaderName::from_static("mcp-session-id");
/// The most one SSE event may hold when the stream must be rewritten.
const MAX_SSE_EVENT: usize = 16 << 20;

/// What the gateway decided about the messages of one POST.
#[derive(Default)]
struct Plan {
    /// The authorized messages, forwarded as re-serialised from what was authorized.
    forward: Vec<Value>,
    /// The gateway's own answers (denials, refusals), in message order.
    answered: Vec<Value>,
    /// Ids of listing requests whose answers get filtered.
    list_ids: Vec<Value>,
    /// Ids of requests decided (or answered by a listing): their results are marked private.
    decided_ids: Vec<Value>,
    /// The server's task ids this request's `tasks/*` messages name (the caller's own).
    owned_tasks: Vec<String>,
    /// A `subscriptions/listen` is forwarded: its stream is filtered.
    listens: bool,
    scope: Vec<String>,
    /// Audit lines of a batch's decisions (a single message uses the request's line).
    decisions: Vec<AuditRecord>,
}

impl Plan {
    /// A message that passes on authentication: listings and listen streams are filtered in
    /// the answer, and `server/discover`'s answer is marked private.
    fn pass(&mut self, upstream: &Upstream, message: &Value, method: &str, intent: Intent) {
        let id = message.get("id").cloned();
        match intent {
            Intent::List => self.list_ids.extend(id),
            Intent::Listen => self.listens = true,
            _ if method == "server/discover" => self.decided_ids.extend(id),
            _ => {}
        }
        // The method is the agent's word: the scope names the endpoint instead.
        self.scope
            .push(ActionId::endpoint(upstream.name()).to_string());
        self.forward.push(message.clone());
    }

    /// A message on a task: its handle must be one the caller was given, and is forwarded as
    /// the server's own id. `tasks/get`, `tasks/result` and `tasks/cancel` are forwarded (their
    /// answers are the caller's: handles bound, marked private); a `tasks/update` is returned
    /// with its input, to be decided.
    fn task(
        &mut self,
        upstream: &Upstream,
        binder: &Binder,
        message: &Value,
        handle: &str,
        update: Option<Map<String, Value>>,
        record: &mut AuditRecord,
    ) -> Option<(Map<String, Value>, Value)> {
        let id = message.get("id");
        let Some(task) = binder.unbind(TASK, handle) else {
            record
                .errors
                .push("task handle not issued to this caller".into());
            let answer = error_response(id, code::INVALID_PARAMS, "unknown task", None);
            self.answered.push(answer);
            return None;
        };
        self.owned_tasks.push(task.to_string());
        let mut message = message.clone();
        message["params"]["taskId"] = json!(task);
        if let Some(input) = update {
            return Some((input, message));
        }
        self.decided_ids.extend(id.cloned());
        self.scope
            .push(ActionId::endpoint(upstream.name()).to_string());
        self.forward.push(message);
        None
    }

    /// A message refused before any decision: the gateway's answer, the reason recorded.
    fn refuse(&mut self, record: &mut AuditRecord, why: String, answer: Value) {
        record.errors.push(why);
        self.answered.push(answer);
    }

    /// A message the policy allowed, forwarded as rendered.
    fn decided(
        &mut self,
        tool: &ActionId,
        id: Option<&Value>,
        forward: Value,
        grants: Vec<String>,
    ) {
        self.scope.push(tool.to_string());
        self.scope.extend(grants);
        self.decided_ids.extend(id.cloned());
        self.forward.push(forward);
    }
}

/// A JSON-RPC error as the whole answer, with an HTTP status: for what is refused before any
/// message is read (media type, syntax, transport headers).
fn rpc_refusal(
    status: StatusCode,
    code: i64,
    message: &str,
    record: &mut AuditRecord,
) -> Response<Body> {
    record.errors.push(message.to_string());
    json_response(status, &error_response(None, code, message, None))
}

/// `Mcp-Name` as the forwarded message names it (a resource's canonical `uri`): a 2026-07-28
/// server checks the header against the body.
fn name_header_as_decided(headers: &mut http::HeaderMap, message: &Value) {
    if !headers.contains_key("mcp-name") {
        return;
    }
    let uri = message.pointer("/params/uri").and_then(Value::as_str);
    if let Some(value) = uri.and_then(|u| HeaderValue::from_str(u).ok()) {
        headers.insert("mcp-name", value);
    }
}

/// The first MCP revision without JSON-RPC batches.
const BATCHES_REMOVED_IN: &str = "2025-06-18";

/// Batches are read only for the revisions that had them (the version header absent means
/// 2025-03-26, as the transport says).
fn batches_allowed(headers: &http::HeaderMap) -> bool {
    match headers.get("mcp-protocol-version").map(|v| v.to_str()) {
        None => true,
        Some(Ok(version)) => version < BATCHES_REMOVED_IN,
        Some(Err(_)) => false,
    }
}

/// `Mcp-Method` and `Mcp-Name` against the body; a value that is not text never matches.
fn check_transport_headers(payload: &Payload, headers: &http::HeaderMap) -> Result<(), RpcError> {
    let values = |name: &str| -> Vec<&str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("\u{0}"))
            .collect()
    };
    let version = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok());
    transport_headers_match(payload, version, &values("mcp-method"), &values("mcp-name"))
}

impl Gateway {
    /// An MCP request: the session checked, then a GET or DELETE passed on, or a POST's
    /// messages read, decided one by one, and the decided ones forwarded as rendered.
    pub(crate) async fn mcp_call(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        request: Request<Body>,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let (mut parts, body) = request.into_parts();
        parts.uri = upstream.uri("", None)?;
        let listed = [upstream.config.forward_headers.as_slice()];
        keep_standard_headers(&mut parts.headers, &listed, upstream.config.kind);
        record.action = Some(format!("mcp:{}", parts.method));
        let binder = Binder::new(self, ctx, upstream);
        // A session is the caller's that the gateway gave it to: another caller's (or a made
        // up) id is unknown here, as a server says of a session it does not have.
        if let Some(bound) = parts.headers.get(SESSION_HEADER) {
            let Some((session, endpoint)) = Self::session_of(&binder, bound) else {
                record
                    .errors
                    .push("Mcp-Session-Id was not issued to this caller".into());
                return Err(Refusal::NotFound("session_not_found"));
            };
            parts.headers.insert(SESSION_HEADER, session);
            if endpoint.is_some() {
                parts.extensions.insert(Dispatch {
                    endpoint,
                    retry_unavailable: false,
                });
            }
        }
        if parts.method != Method::POST {
            return self
                .mcp_stream_or_end(ctx, upstream, parts, &binder, record)
                .await;
        }
        let (payload, raw) = match self.read_payload(&parts.headers, body, record).await? {
            Ok(payload) => payload,
            Err(refused) => return Ok(refused),
        };
        let plan = self.plan(ctx, upstream, &payload, &binder, record).await;
        let batch = matches!(payload, Payload::Batch(_));
        if plan.forward.is_empty() {
            return Ok(self.answer_alone(plan, batch));
        }
        self.forward_plan(ctx, upstream, parts, (plan, batch, raw), binder, record)
            .await
    }

    /// GET opens the server's event stream, DELETE ends the session: authentication is enough,
    /// and no body goes with either. The stream carries resource updates and replays earlier
    /// answers (`Last-Event-ID`), listings among them: both filtered.
    async fn mcp_stream_or_end(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        mut parts: http::request::Parts,
        binder: &Binder,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        record.decision = Verdict::Allow;
        // No request of this one's is answered on the stream: what names a task is left out.
        let tasks = TaskHandles::new(binder.clone(), Vec::new(), Vec::new());
        parts.headers.remove(header::CONTENT_LENGTH);
        let identity = HeaderValue::from_static("identity");
        parts.headers.insert(header::ACCEPT_ENCODING, identity);
        let scope = vec![ActionId::endpoint(upstream.name()).to_string()];
        let opens_stream = parts.method == Method::GET;
        let request = Request::from_parts(parts, full(Bytes::new()));
        let mut response = self.forward(ctx, upstream, request, scope, record).await?;
        Self::bind_session(binder, &mut response);
        if !(opens_stream && is_event_stream(response.headers())) {
            return Ok(response);
        }
        let filter = answer_filter(
            Listings::All,
            true,
            Visibility::new(ctx, upstream, tasks, self.pinned()),
            Some(self.learn_tools(upstream)),
        );
        rewrite_answer(response, filter, Vec::new(), false).await
    }

    /// A POST's JSON-RPC payload, or the gateway's answer refusing it (media type, syntax,
    /// transport headers, a batch on a revision without them).
    async fn read_payload(
        &self,
        headers: &http::HeaderMap,
        body: Body,
        record: &mut AuditRecord,
    ) -> Result<Result<(Payload, Bytes), Response<Body>>, Refusal> {
        if let Err(refusal) = check_json_body_headers(headers) {
            let status = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            let message = refusal.to_string();
            return Ok(Err(rpc_refusal(
                status,
                code::INVALID_REQUEST,
                &message,
                record,
            )));
        }
        let started = std::time::Instant::now();
        let bytes = read_limited(body, self.body_limit(self.config.limits.max_body_bytes)).await;
        record.trace.step("read_arguments", started);
        let bytes = bytes?;
        let payload = toolgate_mcp::parse(&bytes).and_then(|payload| {
            check_transport_headers(&payload, headers)?;
            if matches!(payload, Payload::Batch(_)) && !batches_allowed(headers) {
                return Err(RpcError {
                    code: code::INVALID_REQUEST,
                    message: "JSON-RPC batches are not part of MCP since 2025-06-18: send one message per request".into(),
                });
            }
            Ok((payload, bytes))
        });
        Ok(payload.map_err(|e| rpc_refusal(StatusCode::BAD_REQUEST, e.code, &e.message, record)))
    }

    /// Nothing to forward: the gateway's own answers, each batch line written.
    fn answer_alone(&self, plan: Plan, batch: bool) -> Response<Body> {
        for mut line in plan.decisions {
            // The batch's answer carries each message's.
            line.status = StatusCode::OK.as_u16();
            self.finish(line, None);
        }
        if batch {
            return json_response(StatusCode::OK, &Value::Array(plan.answered));
        }
        let answer = plan.answered.into_iter().next().unwrap_or(Value::Null);
        json_response(single_answer_status(&answer), &answer)
    }

    /// Forwards the decided messages as rendered, writes each batch line with the outcome, and
    /// filters the answer.
    async fn forward_plan(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        mut parts: http::request::Parts,
        (mut plan, batch, raw): (Plan, bool, Bytes),
        binder: Binder,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        // Each decision line of a batch needs its room too before anything is forwarded, and
        // is written even if this future is dropped while the batch is forwarded.
        let slots = match self.audit_rooms(plan.decisions.len()) {
            Ok(slots) => slots,
            Err(refusal) => {
                for line in plan.decisions {
                    self.finish(line, None);
                }
                return Err(refusal);
            }
        };
        let lines: Vec<Unfinished> = std::mem::take(&mut plan.decisions)
            .into_iter()
            .zip(slots)
            .map(|(line, slot)| Unfinished::new(self, line, slot))
            .collect();
        record.decision = Verdict::Allow;
        // The requests forwarded: only their ids may be answered, and their answers' task
        // handles are the caller's.
        let answers_to = plan
            .forward
            .iter()
            .filter(|m| m.get("method").is_some())
            .filter_map(|m| m.get("id").cloned())
            .collect();
        let body = forwarded_body(&mut parts.headers, &mut plan, batch, &raw)?;
        for name in [header::CONTENT_LENGTH, header::CONTENT_ENCODING] {
            parts.headers.remove(name);
        }
        let json = HeaderValue::from_static("application/json");
        parts.headers.insert(header::CONTENT_TYPE, json);
        // The answer is read to be filtered: it must come unencoded.
        let identity = HeaderValue::from_static("identity");
        parts.headers.insert(header::ACCEPT_ENCODING, identity);
        let errors_before = record.errors.len();
        let request = Request::from_parts(parts, full(body));
        let forwarded = self
            .forward(
                ctx,
                upstream,
                request,
                std::mem::take(&mut plan.scope),
                record,
            )
            .await;
        finish_lines(lines, &forwarded, record, errors_before);
        let mut response = forwarded?;
        Self::bind_session(&binder, &mut response);
        let answer = Answer {
            response,
            plan,
            batch,
            answers_to,
        };
        self.filter_answer(ctx, upstream, answer, binder).await
    }

    /// The upstream's answer, filtered: listings, decided results marked private, task handles
    /// bound, the gateway's own answers added.
    async fn filter_answer(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        Answer {
            response,
            plan,
            batch,
            answers_to,
        }: Answer,
        binder: Binder,
    ) -> Result<Response<Body>, Refusal> {
        // Nothing asked, nothing to answer: whatever the body holds stays with the gateway.
        if answers_to.is_empty() && plan.answered.is_empty() && !is_event_stream(response.headers())
        {
            let (mut parts, _) = response.into_parts();
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.remove(header::CONTENT_TYPE);
            return Ok(Response::from_parts(parts, full(Bytes::new())));
        }
        // Every answer is read and filtered: a server may answer one request with another's
        // id, or with a listing where none was asked for.
        let listings = Listings::Ids {
            listings: plan.list_ids,
            decided: plan.decided_ids,
            requests: answers_to.clone(),
        };
        let tasks = TaskHandles::new(binder, answers_to, plan.owned_tasks);
        let visible = Visibility::new(ctx, upstream, tasks, self.pinned());
        let filter = answer_filter(
            listings,
            plan.listens,
            visible,
            Some(self.learn_tools(upstream)),
        );
        rewrite_answer(response, filter, plan.answered, batch).await
    }

    /// The pins in force, with where to count what they hide.
    fn pinned(&self) -> Option<Pinned> {
        self.pins.load_full().map(|pins| Pinned {
            pins,
            metrics: self.metrics.clone(),
        })
    }

    /// Where the tools an upstream lists are remembered.
    fn learn_tools(&self, upstream: &Upstream) -> (Arc<ToolSchemas>, String) {
        (self.tool_schemas.clone(), upstream.name().to_string())
    }

    /// The server's `Mcp-Session-Id` as the caller gets it: `<id>.<tag>`, so that only this
    /// caller can use it (checked by `session_of`, with no state to share between replicas).
    /// With several endpoints (an answer then says which one served it) the id bound is
    /// `<id>.<endpoint key>`: the session's calls go back to the endpoint that holds it.
    fn bind_session(binder: &Binder, response: &mut Response<Body>) {
        let endpoint = response
            .extensions()
            .get::<Served>()
            .and_then(|served| served.endpoint.clone());
        let headers = response.headers_mut();
        let Some(session) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
            headers.remove(SESSION_HEADER);
            return;
        };
        let bound = match endpoint {
            Some(key) => binder.bind(SESSION_AT, &format!("{session}.{key}")),
            None => binder.bind(SESSION, session),
        };
        match HeaderValue::from_str(&bound) {
            Ok(value) => {
                headers.insert(SESSION_HEADER, value);
            }
            Err(_) => {
                headers.remove(SESSION_HEADER);
            }
        }
    }

    /// The server's session id inside a bound one, when it was bound to this caller, and the
    /// endpoint that holds it.
    fn session_of(binder: &Binder, bound: &HeaderValue) -> Option<(HeaderValue, Option<String>)> {
        let bound = bound.to_str().ok()?;
        // An endpoint no longer configured holds the session: the call finds no endpoint
        // (404), rather than another that does not know it.
        let (session, endpoint) = match binder.unbind(SESSION_AT, bound) {
            Some(id) => {
                let (session, key) = id.rsplit_once('.')?;
                (session, Some(key.to_string()))
            }
            // One endpoint made it: whichever the upstream has now.
            None => (binder.unbind(SESSION, bound)?, None),
        };
        Some((HeaderValue::from_str(session).ok()?, endpoint))
    }

    /// Classifies and authorizes each message.
    async fn plan(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        payload: &Payload,
        binder: &Binder,
        record: &mut AuditRecord,
    ) -> Plan {
        let batch = matches!(payload, Payload::Batch(_));
        let mut plan = Plan::default();
        for message in payload.messages() {
            let method = self.count_message(upstream, message);
            let id = message.get("id");
            if !batch {
                record.action = Some(format!("mcp:{method}"));
            }
            let (action, args, place, message) = match intent(message) {
                Ok(Intent::Decide {
                    action,
                    args,
                    place,
                }) => (action, args, place, Cow::Borrowed(message)),
                Ok(Intent::Task { task_id, update }) => {
                    let unbound = plan.task(upstream, binder, message, &task_id, update, record);
                    let Some((input, message)) = unbound else {
                        continue;
                    };
                    // `tasks/update` carries input the task acts on: decided like arguments.
                    let action = "tasks/update".to_string();
                    (action, input, ArgsPlace::Params, Cow::Owned(message))
                }
                Ok(passing @ (Intent::Pass | Intent::List | Intent::Listen)) => {
                    plan.pass(upstream, message, method, passing);
                    continue;
                }
                Ok(Intent::Unknown(m)) => {
                    let (why, said) = (
                        format!("method not allowed: {m}"),
                        format!("method not found: {m}"),
                    );
                    plan.refuse(
                        record,
                        why,
                        error_response(id, code::METHOD_NOT_FOUND, &said, None),
                    );
                    continue;
                }
                Err(e) => {
                    let answer = error_response(id, e.code, &e.message, None);
                    plan.refuse(record, e.message, answer);
                    continue;
                }
            };
            let id = id.cloned();
            let deciding = (message.as_ref(), id.as_ref(), action, args, place);
            self.plan_decision(ctx, upstream, &mut plan, batch, deciding, record)
                .await;
        }
        plan
    }

    /// Decides one message into the plan, on its own audit line in a batch.
    async fn plan_decision(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        plan: &mut Plan,
        batch: bool,
        (message, id, action, args, place): (
            &Value,
            Option<&Value>,
            String,
            Map<String, Value>,
            ArgsPlace,
        ),
        record: &mut AuditRecord,
    ) {
        // One audit line per decision: the request's own for a single message.
        let mut own = batch.then(|| AuditRecord {
            decision_id: uuid::Uuid::now_v7().to_string(),
            errors: Vec::new(),
            ..record.clone()
        });
        let line = own.as_mut().unwrap_or(record);
        let tool = ActionId::new(upstream.name(), &action);
        line.action = Some(tool.to_string());
        line.resource = Some(tool.to_string());
        let decided = self.decide_message(ctx, upstream, message, &tool, args, place, line);
        match decided.await {
            Ok((forward, grants)) => plan.decided(&tool, id, forward, grants),
            Err(answer) => plan.answered.push(answer),
        }
        if let Some(own) = own.as_mut() {
            // A batch is forwarded once, under the request's line: given back with it.
            let reserved = std::mem::take(&mut own.usage_reserved);
            record.usage_reserved.extend(reserved);
        }
        plan.decisions.extend(own);
    }

    /// Counts an agent's message by upstream and method; its method (`response` for an
    /// answer to the server).
    fn count_message<'m>(&self, upstream: &Upstream, message: &'m Value) -> &'m str {
        self.metrics
            .mcp_messages
            .with_label_values(&[upstream.name(), toolgate_mcp::method_label(message)])
            .inc();
        message
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("response")
    }

    /// Reads one message's arguments as declared and decides it: the message to forward,
    /// rendered from the decided arguments, with the grants; or the gateway's own answer.
    #[allow(clippy::too_many_arguments)]
    async fn decide_message(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        message: &Value,
        tool: &ActionId,
        args: Map<String, Value>,
        place: ArgsPlace,
        line: &mut AuditRecord,
    ) -> Result<(Value, Vec<String>), Value> {
        let id = message.get("id");
        let Some(context) = ctx.engine.schema_info().actions.get(tool.as_str()) else {
            line.errors.push("tool_not_found".into());
            return Err(error_response(
                id,
                code::INVALID_PARAMS,
                &format!("unknown tool: {tool}"),
                None,
            ));
        };
        let listed = match place {
            ArgsPlace::Arguments => Some(self.tool_schemas.get(upstream.name(), tool.tool())),
            _ => None,
        };
        if let Some(listed) = &listed {
            self.pinned_tool(upstream, tool, listed.as_deref(), id, line)?;
        }
        let rules = Rules {
            undeclared: upstream.config.undeclared_arguments.unwrap_or_default(),
            reads: ctx.engine.arg_reads(tool.as_str()),
            free_form: &context.free_form,
            paths: &context.paths,
            json_text: listed.as_ref().map(|entry| input_schema(entry.as_deref())),
        };
        let rendered = match render(args, &context.args, Origin::Json, &rules) {
            Ok(rendered) => rendered,
            Err(refusal) => {
                line.errors.push(refusal.to_string());
                // A client checks structured content against the tool's output schema, even
                // on an error (the TypeScript SDK): there the code goes in `_meta`.
                let has_output_schema = listed
                    .flatten()
                    .is_some_and(|e| e.get("outputSchema").is_some_and(|s| !s.is_null()));
                return Err(argument_answer(id, place, &refusal, !has_output_schema));
            }
        };
        // The forwarded arguments identify the call, when no policy left any of them unseen.
        let seen = rules.undeclared == crate::args::Undeclared::Refuse;
        let forwarded = seen.then(|| rendered.forward.clone());
        let (action, policy) = (tool.as_str(), rendered.policy);
        let decided = self.decide_call(ctx, action, tool.resource(), policy, forwarded, line);
        let decided = decided.await.map_err(|refusal| {
            line.errors.push(error_chain(&refusal));
            error_response(id, code::FORBIDDEN, &refusal.to_string(), None)
        })?;
        if !decided.decision.allowed {
            return Err(denied(id, decided, &line.decision_id));
        }
        let decision = decided.decision;
        Ok((
            rendered_message(message, place, rendered.forward),
            decision.grants,
        ))
    }
}

impl Gateway {
    /// With `tool_pins:`, a tool is called only as pinned: its definition, as this gateway
    /// last saw it listed, is its pin. Unseen since start or since `list_changed` is refused
    /// too: nothing the server says unlocks a tool, only a reloaded lock file.
    fn pinned_tool(
        &self,
        upstream: &Upstream,
        tool: &ActionId,
        listed: Option<&Value>,
        id: Option<&Value>,
        line: &mut AuditRecord,
    ) -> Result<(), Value> {
        let Some(pins) = self.pins.load_full() else {
            return Ok(());
        };
        let live = listed
            .and_then(|entry| entry.get("definition_sha256"))
            .and_then(Value::as_str);
        let name = tool.tool();
        let changed = self.tool_schemas.was_changed(upstream.name(), name);
        let (code, why) = match live {
            Some(live) if pins.allows(upstream.name(), name, live) && !changed => return Ok(()),
            Some(_) => (
                "tool_definition_changed",
                "its definition is not the pinned one (tool_pins)",
            ),
            None => (
                "tool_definition_unverified",
                "its definition has not been listed through the gateway since it started or since the server's tools changed: list tools first",
            ),
        };
        self.metrics
            .pin_refusals
            .with_label_values(&[upstream.name(), pins.label(upstream.name(), name), "call"])
            .inc();
        line.errors.push(format!("{code}: {why}"));
        Err(error_response(
            id,
            code::INVALID_PARAMS,
            &format!("tool {name} refused: {why}"),
            Some(json!({ "error": code })),
        ))
    }
}

/// A listed tool's input schema, when it has one.
/// A deny as the JSON-RPC error MCP clients read: `forbidden by policy` (the data less its
/// `error`), `approval required` (the data naming the approval), or `rate limited` (the data
/// with `retry_after`).
fn denied(id: Option<&Value>, decided: crate::approvals::CallDecision, decision_id: &str) -> Value {
    if let Some(limited) = decided.limited {
        let data = limited.body(decision_id);
        return error_response(id, code::FORBIDDEN, "rate limited", Some(data));
    }
    let denial = Denial::of_call(&decided.decision, decided.approval_id);
    let mut data = denial.body(decision_id);
    let message = match denial.approval_id {
        Some(_) => "approval required",
        None => {
            if let Some(data) = data.as_object_mut() {
                data.remove("error");
            }
            "forbidden by policy"
        }
    };
    error_response(id, code::FORBIDDEN, message, Some(data))
}

fn input_schema(entry: Option<&Value>) -> Option<&Value> {
    entry
        .and_then(|e| e.get("inputSchema"))
        .filter(|s| !s.is_null())
}

/// The gateway's answer to a message whose arguments it refused: a tool error for `tools/call`
/// (the model reads it and can correct the call), invalid params otherwise.
fn argument_answer(
    id: Option<&Value>,
    place: ArgsPlace,
    refusal: &ArgRefusal,
    structured: bool,
) -> Value {
    let code = refusal.problem.code();
    let message = refusal.to_string();
    match place {
        ArgsPlace::Arguments => tool_input_error(id, code, &refusal.argument, &message, structured),
        _ => error_response(
            id,
            code::INVALID_PARAMS,
            &refusal.to_string(),
            Some(json!({"error": code, "argument": refusal.argument})),
        ),
    }
}

/// The message as forwarded: its decided arguments replaced by their rendering.
fn rendered_message(message: &Value, place: ArgsPlace, forward: Map<String, Value>) -> Value {
    let mut out = message.clone();
    let Some(params) = out.get_mut("params").and_then(Value::as_object_mut) else {
        return out;
    };
    match place {
        ArgsPlace::Arguments => {
            params.insert("arguments".into(), Value::Object(forward));
        }
        ArgsPlace::Params => params.extend(forward),
        ArgsPlace::Unchanged => {}
    }
    out
}

pub(crate) type Rewrite = Arc<dyn Fn(&mut Value) -> bool + Send + Sync>;

/// The HTTP status of the gateway's own answer to a single message: as an MCP server answers
/// an unknown method (404) or a malformed request (400); a policy's denial is a JSON-RPC error
/// the client matches by id (200).
fn single_answer_status(answer: &Value) -> StatusCode {
    match answer.pointer("/error/code").and_then(Value::as_i64) {
        Some(code::METHOD_NOT_FOUND) => StatusCode::NOT_FOUND,
        Some(code::INVALID_REQUEST | code::PARSE_ERROR) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

/// The message (or batch) forwarded: the plan's, with the digits the agent sent for its numbers.
fn forwarded_body(
    headers: &mut http::HeaderMap,
    plan: &mut Plan,
    batch: bool,
    raw: &[u8],
) -> Result<Bytes, Refusal> {
    let forwarded = if batch {
        Value::Array(std::mem::take(&mut plan.forward))
    } else {
        name_header_as_decided(headers, &plan.forward[0]);
        plan.forward.swap_remove(0)
    };
    let body = match number_texts(raw) {
        Some(texts) => to_vec_with_numbers(&forwarded, &texts, &crate::args::same_number),
        None => {
            serde_json::to_vec(&forwarded).map_err(|e| InternalError::Serialise("JSON-RPC", e))?
        }
    };
    Ok(Bytes::from(body))
}

/// Writes each batch line once the credential (or the failure) is known: an allowed message
/// shares the request's fate (its task may have ended meanwhile), and each line records the
/// HTTP status that carried its answer (a batch's answer is a 200).
fn finish_lines(
    lines: Vec<Unfinished<'_>>,
    forwarded: &Result<Response<Body>, Refusal>,
    record: &AuditRecord,
    errors_before: usize,
) {
    let mut failure = record.errors[errors_before..].to_vec();
    let carried = match forwarded {
        Ok(_) => StatusCode::OK,
        Err(refusal) => {
            if !matches!(refusal, Refusal::Forbidden(_)) {
                failure.push(error_chain(refusal));
            }
            refusal.status()
        }
    };
    for mut pending in lines {
        let line = &mut pending.record;
        line.status = carried.as_u16();
        if line.decision == Verdict::Allow {
            line.decision = record.decision;
            line.jti = record.jti.clone();
            line.credential_mode = record.credential_mode;
            line.credential_id = record.credential_id.clone();
            line.credential_exp = record.credential_exp;
            line.upstream_status = record.upstream_status;
            line.attempts = record.attempts;
            line.errors.extend(failure.iter().cloned());
        }
        pending.done();
    }
}

/// The upstream's answer to a plan's messages.
struct Answer {
    response: Response<Body>,
    plan: Plan,
    batch: bool,
    /// The ids of the requests forwarded.
    answers_to: Vec<Value>,
}

/// Which answers are filtered listings, and which results the gateway decided.
enum Listings {
    /// The answers to these requests (a POST's own): listings, and results decided.
    Ids {
        listings: Vec<Value>,
        decided: Vec<Value>,
        /// Every request of the POST: an answer to any other id is dropped (a client that
        /// matches ids loosely, `"5"` for 5, would take it for one it never let through).
        requests: Vec<Value>,
    },
    /// Any listing answer (a stream that may replay earlier answers).
    All,
}

/// Filters what the server answers: the items of listing answers, and on a
/// `subscriptions/listen` stream the resource updates the caller may not read; marks what the
/// gateway decided or filtered as private to this caller. Says whether it changed the message
/// (a dropped one becomes `null`).
fn answer_filter(
    listings: Listings,
    listens: bool,
    visible: Arc<Visibility>,
    schemas: Option<(Arc<ToolSchemas>, String)>,
) -> Rewrite {
    Arc::new(move |message: &mut Value| {
        // What a client could read otherwise than the gateway filters is not passed on.
        if !toolgate_mcp::server_message_is_plain(message) {
            *message = Value::Null;
            return true;
        }
        let id = message.get("id");
        let answer = message.get("method").is_none();
        let (listing, decided) = match &listings {
            Listings::Ids {
                listings,
                decided,
                requests,
            } => {
                if answer && !id.is_some_and(|id| requests.contains(id)) {
                    *message = Value::Null;
                    return true;
                }
                (
                    id.is_some_and(|id| listings.contains(id)) || is_listing(message),
                    id.is_some_and(|id| decided.contains(id)),
                )
            }
            Listings::All => (is_listing(message), false),
        };
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let (Some("notifications/tools/list_changed"), Some((schemas, upstream))) =
            (method.as_deref(), &schemas)
        {
            // The tools changed: what was learned of them may no longer hold.
            schemas.forget(upstream);
        }
        if listing {
            // Learned only from answers to this POST's own requests: a stream may replay
            // an old listing (`Last-Event-ID`), which must not stand for the tools today.
            let own = matches!(listings, Listings::Ids { .. });
            if let (Some((schemas, upstream)), true) = (&schemas, own) {
                let pins = visible.pinned.as_ref().map(|p| &*p.pins);
                schemas.learn(upstream, message, pins);
            }
            visible.hide_unpinned(message, schemas.as_ref().map(|(s, _)| &**s));
            filter_listing(message, &|item| visible.item(item));
        }
        let tasks = visible.tasks.apply(message);
        if message.is_null() {
            return true;
        }
        if listing || decided {
            return mark_private(message) | listing | tasks;
        }
        if listens && method.as_deref() == Some("notifications/resources/updated") {
            let uri = message.pointer("/params/uri").cloned().unwrap_or_default();
            if !visible.resource(uri) {
                *message = Value::Null;
                return true;
            }
        }
        tasks
    })
}

/// What the caller may see of an upstream, decided like the calls themselves.
struct Visibility {
    engine: Arc<PolicyEngine>,
    caller: Caller,
    upstream: String,
    client_ip: IpAddr,
    /// The task handles the caller may be given on this answer or stream.
    tasks: TaskHandles,
    pinned: Option<Pinned>,
}

/// The pinned tool definitions in force, and the metrics that count what they hide.
struct Pinned {
    pins: Arc<crate::pins::ToolPins>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Visibility {
    fn new(
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        tasks: TaskHandles,
        pinned: Option<Pinned>,
    ) -> Arc<Visibility> {
        Arc::new(Visibility {
            engine: ctx.engine.clone(),
            caller: ctx.caller.clone(),
            upstream: upstream.name().to_string(),
            client_ip: ctx.client.ip,
            tasks,
            pinned,
        })
    }

    /// Removes from a `tools/list` answer every tool whose definition is not its pin, or was
    /// not since the pins were loaded.
    fn hide_unpinned(&self, message: &mut Value, schemas: Option<&ToolSchemas>) {
        let Some(Pinned { pins, metrics }) = &self.pinned else {
            return;
        };
        let Some(tools) = message
            .pointer_mut("/result/tools")
            .and_then(Value::as_array_mut)
        else {
            return;
        };
        tools.retain(|tool| {
            let name = tool.get("name").and_then(Value::as_str).unwrap_or_default();
            let pinned = pins.allows(&self.upstream, name, &crate::pins::live_digest(tool))
                && !schemas.is_some_and(|s| s.was_changed(&self.upstream, name));
            if !pinned {
                let label = pins.label(&self.upstream, name);
                metrics
                    .pin_refusals
                    .with_label_values(&[&self.upstream, label, "listing"])
                    .inc();
                tracing::debug!(upstream = %self.upstream, tool = %label, "a listed tool's definition is not its pin: hidden");
            }
            pinned
        });
    }

    /// An item of a listing: shown where the call that reads it would be permitted (a tool
    /// where `list` permits it); hidden where that decision errs.
    fn item(&self, item: Listed<'_>) -> bool {
        match item {
            Listed::Tool(tool) => {
                let id = ActionId::new(&self.upstream, tool);
                self.engine.has_action(id.as_str())
                    && self.allowed("list", id.resource(), Map::new())
            }
            Listed::Resource(uri) => {
                let uri = canonical_uri(uri).unwrap_or_else(|_| uri.to_string());
                self.resource(Value::String(uri))
            }
            // A template is decided as a read of its text: a policy over uris sees the
            // template's fixed parts.
            Listed::Template(template) => self.resource(Value::String(template.to_string())),
            Listed::Prompt(name) => {
                let id = ActionId::new(&self.upstream, "prompts/get");
                let args = Map::from_iter([("name".to_string(), Value::String(name.into()))]);
                self.engine.has_action(id.as_str())
                    && self.allowed(id.as_str(), id.resource(), args)
            }
        }
    }

    /// A resource (listed, or updated on a stream): the caller could read it.
    fn resource(&self, uri: Value) -> bool {
        let id = ActionId::new(&self.upstream, "resources/read");
        let args = Map::from_iter([("uri".to_string(), uri)]);
        self.engine.has_action(id.as_str()) && self.allowed(id.as_str(), id.resource(), args)
    }

    fn allowed(&self, action: &str, resource: Resource<'_>, args: Map<String, Value>) -> bool {
        let request = authz_request(&self.caller, action, resource, args, self.client_ip);
        self.engine.authorize(&request).allowed
    }
}

/// Filters `tools/list` answers and adds the gateway's own answers, for JSON and SSE alike.
pub(crate) async fn rewrite_answer(
    response: Response<Body>,
    rewrite: Rewrite,
    answered: Vec<Value>,
    batch: bool,
) -> Result<Response<Body>, Refusal> {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    // Asked for unencoded (`forward_plan`): an encoded answer cannot be read, so not filtered.
    if parts
        .headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(UpstreamError::Encoded.into());
    }
    if is_event_stream(&parts.headers) {
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

/// The rewrite applied to one message, or to each of a batch (a 2025-03-26 server may batch
/// its answers, in a body or in one event); a dropped message leaves the batch. Says whether
/// anything changed.
fn apply(rewrite: &Rewrite, value: &mut Value) -> bool {
    let Value::Array(items) = value else {
        return rewrite(value);
    };
    let mut changed = false;
    for item in items.iter_mut() {
        changed |= rewrite(item);
    }
    items.retain(|item| !item.is_null());
    if items.is_empty() && changed {
        *value = Value::Null;
    }
    changed
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
        serde_json::from_slice(bytes).map_err(|e| Refusal::from(UpstreamError::InvalidJson(e)))?
    };
    let was_batch = value.is_array();
    apply(rewrite, &mut value);
    if was_batch && value.is_null() {
        // Every answer of a batch dropped: an empty batch, not `null`.
        value = Value::Array(Vec::new());
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
async fn read_answer(body: Body) -> Result<Bytes, Refusal> {
    crate::pipeline::collect_at_most(body, MAX_JSON_ANSWER)
        .await
        .map_err(|e| match e {
            Collected::TooLarge => UpstreamError::TooLarge(MAX_JSON_ANSWER).into(),
            Collected::Read(e) => UpstreamError::Read(e).into(),
        })
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
                    // An unterminated last event is filtered like the others, never passed raw.
                    let rest = self.splitter.finish();
                    let rewrite = self.rewrite.clone();
                    let out = rewrite_event_data(&rest, |m| apply(&rewrite, m)).unwrap_or(rest);
                    if !out.is_empty() {
                        self.pending.push_back(Bytes::from(out));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let events = self.splitter.push(&data).map_err(BoxError::from)?;
                        let rewrite = self.rewrite.clone();
                        for event in events {
                            let out =
                                rewrite_event_data(&event, |m| apply(&rewrite, m)).unwrap_or(event);
                            if !out.is_empty() {
                                self.pending.push_back(Bytes::from(out));
                            }
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binder(agent: &str) -> Binder {
        let (key, _) = toolgate_credential::SigningKey::generate().unwrap();
        Binder {
            minter: Arc::new(toolgate_credential::Minter::new(key, "https://tg", 60)),
            upstream: "tools".into(),
            issuer: "https://idp".into(),
            agent: agent.into(),
            user: "alice".into(),
        }
    }

    #[test]
    fn task_handles_are_bound_to_the_caller_they_were_given_to() {
        let alice = binder("assistant");
        // The answer to alice's own call (id 1) creates a task: bound to her.
        let handles = TaskHandles::new(alice.clone(), vec![json!(1)], Vec::new());
        let mut created = json!({"jsonrpc": "2.0", "id": 1, "result": {"resultType": "task",
            "task": {"taskId": "t.1", "status": "working"}}});
        assert!(handles.apply(&mut created));
        let handle = created["result"]["task"]["taskId"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(handle.starts_with("t.1."));
        assert_eq!(alice.unbind(TASK, &handle), Some("t.1"));
        // Another agent (same key), a bare id, a session's tag: unknown.
        let mallory = Binder {
            agent: "mallory".into(),
            ..alice.clone()
        };
        assert_eq!(mallory.unbind(TASK, &handle), None);
        assert_eq!(alice.unbind(TASK, "t.1"), None);
        assert_eq!(alice.unbind(SESSION, &handle), None);
        // Status of her task on the same stream: bound; of another's task: left out.
        let status = |id: &str| {
            json!({"jsonrpc": "2.0", "method": "notifications/tasks/status",
            "params": {"taskId": id, "status": "completed"}})
        };
        let mut own = status("t.1");
        assert!(handles.apply(&mut own));
        assert_eq!(own["params"]["taskId"], json!(handle));
        let mut other = status("t.2");
        assert!(handles.apply(&mut other));
        assert!(other.is_null());
        // An answer to a request that is not hers, naming a task: left out.
        let mut stray = json!({"jsonrpc": "2.0", "id": 7, "result": {"task": {"taskId": "t.3"}}});
        assert!(handles.apply(&mut stray));
        assert!(stray.is_null());
        // The server's own request about the client's task is the client's id: untouched.
        let mut ask =
            json!({"jsonrpc": "2.0", "id": 9, "method": "tasks/get", "params": {"taskId": "c.1"}});
        assert!(!handles.apply(&mut ask));
        assert_eq!(ask["params"]["taskId"], "c.1");
    }

    #[test]
    fn listed_tools_are_remembered_with_their_schemas() {
        let schemas = ToolSchemas::default();
        let listing = json!({"jsonrpc": "2.0", "id": 0, "result": {"tools": [
            {"name": "pay", "inputSchema": {"type": "object"}, "outputSchema": {"type": "object"}},
            {"name": "add", "inputSchema": {"type": "object"}},
        ]}});
        schemas.learn("tools", &listing, None);
        let pay = schemas.get("tools", "pay").unwrap();
        assert!(input_schema(Some(&pay)).is_some());
        assert!(pay.get("outputSchema").is_some_and(|s| !s.is_null()));
        let add = schemas.get("tools", "add").unwrap();
        assert!(add.get("outputSchema").is_some_and(Value::is_null));
        assert!(schemas.get("other", "pay").is_none());
    }
}
