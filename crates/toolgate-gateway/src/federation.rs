//! One agent-facing MCP endpoint over several MCP upstreams (`mcp_endpoints:`). The endpoint
//! is an MCP server to the agent and a client of each member: every message for a member is
//! made the agent's own request to the member's endpoint (`/<upstream>`, through the whole
//! pipeline), so it is decided, credentialed, filtered, pinned and audited exactly as there.
//!
//! Names: a member's tool (and prompt) `t` is `<upstream>__t`, read back at the first `__`;
//! one longer than 64 characters is cut and ends in a digest, read back from the listings.
//! Resources keep their URIs, routed by what the members listed. Server requests on a stream
//! are renamed `<upstream>/<id>` so that two members' ids never meet, and the agent's answer
//! is routed back by that name.
//!
//! The endpoint speaks the handshake revisions (`initialize`, sessions): `server/discover` is
//! answered "method not found", on which clients of the 2026-07-28 revision fall back. Its
//! session id carries each member's session (as the member bound it to the caller), bound to
//! the caller in turn: any replica can serve it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use toolgate_identity::Caller;
use toolgate_mcp::{code, error_response, event_json, Payload, SseSplitter};

use crate::answer::{full, is_event_stream, json_response, Body, Refusal};
use crate::audit::{AuditRecord, Verdict};
use crate::config::McpEndpoint;
use crate::mcp::{rewrite_answer, Binder, Rewrite, SESSION_HEADER};
use crate::pipeline::read_limited;
use crate::Gateway;

/// What a federated session id binds: `mcp-fed-session`, keyed like a server's session.
const FEDERATED: &str = "mcp-fed-session";
/// The longest name many clients take for a tool.
const MAX_NAME: usize = 64;
/// The most listing pages read from one member for one listing.
const MAX_PAGES: usize = 50;
/// The most items of one listing from one member.
const MAX_ITEMS: usize = 10_000;
/// The revisions the endpoint speaks (the handshake ones), oldest first.
const REVISIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// The most of one member's answer read whole (a listing, an answer to a request).
const MAX_ANSWER: usize = 16 << 20;
/// The most names and URIs remembered per gateway (then forgotten and learned again).
const MAX_REMEMBERED: usize = 20_000;
/// A member's header the agent's request carries on: who calls, in which task, how traced.
const CARRIED: [&str; 4] = [
    "authorization",
    "toolgate-task",
    "traceparent",
    "tracestate",
];

/// Each member's session as the federated session holds it.
#[derive(Serialize, Deserialize, Default, Clone)]
struct Members(BTreeMap<String, Member>);

#[derive(Serialize, Deserialize, Clone)]
struct Member {
    /// The member's `Mcp-Session-Id` as its endpoint gave it (bound to the caller).
    session: Option<String>,
    /// The revision it agreed to.
    version: String,
}

/// What the endpoint learned from listings: long names cut, URIs and templates by member.
#[derive(Default)]
pub(crate) struct Learned {
    /// (endpoint, cut name) → (member, its own name).
    names: std::sync::Mutex<std::collections::HashMap<(String, String), (String, String)>>,
    /// (endpoint, caller, URI) → its member, as this caller's listings said; and the fixed
    /// starts of templates, apart: one caller's (or member's) listing never routes another's.
    uris: std::sync::Mutex<std::collections::HashMap<(String, String, String), Owner>>,
    templates: std::sync::Mutex<std::collections::HashMap<(String, String, String), Owner>>,
}

/// Who lists a URI: one member, or several (then it is refused rather than guessed).
#[derive(Clone, PartialEq)]
enum Owner {
    Member(String),
    Ambiguous,
}

impl Learned {
    fn remember<K: std::hash::Hash + Eq, V>(
        map: &std::sync::Mutex<std::collections::HashMap<K, V>>,
        key: K,
        value: V,
    ) {
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_REMEMBERED {
            map.clear();
        }
        map.insert(key, value);
    }

    /// Remembers `member` as the owner of `key`; a second member makes it ambiguous.
    fn own(
        map: &std::sync::Mutex<std::collections::HashMap<(String, String, String), Owner>>,
        key: (String, String, String),
        member: &str,
    ) {
        let owner = match Learned::recall(map, &key) {
            Some(Owner::Member(known)) if known != member => Owner::Ambiguous,
            Some(Owner::Ambiguous) => Owner::Ambiguous,
            _ => Owner::Member(member.to_string()),
        };
        Learned::remember(map, key, owner);
    }

    fn recall<K: std::hash::Hash + Eq, V: Clone>(
        map: &std::sync::Mutex<std::collections::HashMap<K, V>>,
        key: &K,
    ) -> Option<V> {
        map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }
}

/// One request to a federated endpoint, and how to reach its members as the caller.
struct Federated {
    gateway: Arc<Gateway>,
    endpoint: McpEndpoint,
    peer: SocketAddr,
    /// The agent's headers every member request carries.
    carried: HeaderMap,
    /// The revision the agent asked for (members are asked in their own).
    version: Option<HeaderValue>,
    binder: Binder,
    /// Who calls (issuer, agent, user): what this caller's listings taught is this caller's.
    caller: String,
    /// Set once a member was asked anything: its requests then write the audit lines.
    relayed: Arc<AtomicBool>,
}

impl Gateway {
    /// A request to a federated endpoint, relayed to its members.
    pub(crate) async fn federated(
        &self,
        endpoint: McpEndpoint,
        request: Request<Body>,
        caller: &Caller,
        client_ip: IpAddr,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let gateway = self.me.upgrade().ok_or(Refusal::AuditUnavailable)?;
        let mut carried = HeaderMap::new();
        for name in CARRIED {
            for value in request.headers().get_all(name) {
                carried.append(name, value.clone());
            }
        }
        let binder = Binder::for_caller(self, caller, &endpoint.name);
        let fed = Federated {
            gateway,
            peer: SocketAddr::new(client_ip, 0),
            carried,
            version: request.headers().get("mcp-protocol-version").cloned(),
            binder,
            endpoint,
            caller: json!([caller.issuer, caller.agent, caller.user]).to_string(),
            relayed: Arc::default(),
        };
        record.relayed = Some(fed.relayed.clone());
        let members = match request.headers().get(SESSION_HEADER) {
            None => None,
            Some(bound) => match fed.members_of(bound) {
                Some(members) => Some(members),
                None => return Err(Refusal::NotFound("session_not_found")),
            },
        };
        let method = request.method().clone();
        // A request relayed to members is recorded by their requests, each with its decision;
        // what the endpoint answers itself has this line.
        let answered = match (method, members) {
            (Method::POST, members) => {
                let limit = self.body_limit(self.config.limits.max_body_bytes);
                let body = read_limited(request.into_body(), limit).await?;
                let response = fed.post(&body, members).await;
                // An error of its own is the endpoint's to record, even after members were
                // asked (a listing to find an unknown name).
                let own_error = response.extensions().get::<OwnError>().is_some();
                if own_error || !fed.relayed.load(Ordering::Relaxed) {
                    record_own_answer(&body, &response, record);
                    record.relayed = None;
                }
                Ok(response)
            }
            (Method::GET, Some(members)) => Ok(fed.listen(&members).await),
            (Method::DELETE, Some(members)) => {
                fed.end(&members).await;
                Ok(Response::new(full(Bytes::new())))
            }
            (Method::GET | Method::DELETE, None) => Ok(rpc(
                StatusCode::BAD_REQUEST,
                None,
                code::INVALID_REQUEST,
                "Mcp-Session-Id is required",
            )),
            _ => Err(Refusal::MethodNotAllowed("GET, POST, DELETE")),
        };
        answered
    }
}

/// The audit line of a message the endpoint answered itself (a ping, `initialized`, an
/// unknown method): no policy decided it; it passed unless answered with an error.
fn record_own_answer(body: &[u8], response: &Response<Body>, record: &mut AuditRecord) {
    let method = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|m| m.get("method").and_then(Value::as_str).map(str::to_string))
        .filter(|m| m.len() <= 128);
    record.action = Some(format!("mcp:{}", method.as_deref().unwrap_or("answer")));
    if let Some(OwnError(message)) = response.extensions().get::<OwnError>() {
        // Bounded: it may quote the agent's words.
        let message: String = message.chars().take(256).collect();
        record
            .errors
            .push(format!("answered by the federated endpoint: {message}"));
    } else if response.status().is_success() {
        record.decision = Verdict::Allow;
    }
}

impl Federated {
    fn members_of(&self, bound: &HeaderValue) -> Option<Members> {
        let encoded = self.binder.unbind(FEDERATED, bound.to_str().ok()?)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .ok()?;
        serde_json::from_slice(&json).ok()
    }

    fn session_id(&self, members: &Members) -> Option<HeaderValue> {
        let json = serde_json::to_vec(members).ok()?;
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        HeaderValue::from_str(&self.binder.bind(FEDERATED, &encoded)).ok()
    }

    /// One message: answered here, relayed to one member, or to each.
    async fn post(&self, body: &[u8], members: Option<Members>) -> Response<Body> {
        let message = match toolgate_mcp::parse(body) {
            Ok(Payload::Single(message)) => message,
            Ok(Payload::Batch(_)) => {
                let why = "a federated endpoint takes one message per request";
                return rpc(StatusCode::BAD_REQUEST, None, code::INVALID_REQUEST, why);
            }
            Err(e) => return rpc(StatusCode::BAD_REQUEST, None, e.code, &e.message),
        };
        let id = message.get("id").cloned();
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_string);
        let Some(members) = members else {
            return match method.as_deref() {
                Some("initialize") => self.initialize(&message).await,
                Some("server/discover") => not_found(id.as_ref(), "server/discover"),
                _ => rpc(
                    StatusCode::BAD_REQUEST,
                    id.as_ref(),
                    code::INVALID_REQUEST,
                    "no Mcp-Session-Id: a session starts with initialize",
                ),
            };
        };
        match (method.as_deref(), id) {
            (Some(method), Some(id)) => self.request(&members, method, message.clone(), &id).await,
            (Some("notifications/initialized"), None) => accepted(),
            (Some(_), None) => {
                // Notifications (cancellation among them: a member ignores ids not its own).
                self.each(&members, &message).await;
                accepted()
            }
            (None, Some(id)) => {
                self.answer_to_member(&members, message, &id).await;
                accepted()
            }
            (None, None) => rpc(
                StatusCode::BAD_REQUEST,
                None,
                code::INVALID_REQUEST,
                "not a JSON-RPC message",
            ),
        }
    }

    /// A request, by method.
    async fn request(
        &self,
        members: &Members,
        method: &str,
        message: Value,
        id: &Value,
    ) -> Response<Body> {
        match method {
            "ping" => answered(id, json!({})),
            "initialize" => self.initialize(&message).await,
            "tools/list" => {
                self.merged(members, &message, "tools", Renamed::Names)
                    .await
            }
            "prompts/list" => {
                self.merged(members, &message, "prompts", Renamed::Names)
                    .await
            }
            "resources/list" => {
                self.merged(members, &message, "resources", Renamed::Uris)
                    .await
            }
            "resources/templates/list" => {
                self.merged(members, &message, "resourceTemplates", Renamed::Templates)
                    .await
            }
            "tools/call" | "prompts/get" => self.named(members, message, id).await,
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                let uri = message.pointer("/params/uri").and_then(Value::as_str);
                let owner = match uri {
                    Some(uri) => self.owner_listed(members, uri).await,
                    None => None,
                };
                match owner {
                    Some(owner) => self.relay(members, &owner, message).await,
                    None => rpc(
                        StatusCode::OK,
                        Some(id),
                        -32002,
                        "unknown resource: list resources first",
                    ),
                }
            }
            "completion/complete" => self.completion(members, message, id).await,
            "logging/setLevel" => {
                self.each(members, &message).await;
                answered(id, json!({}))
            }
            "server/discover" => not_found(Some(id), method),
            _ if method.starts_with("tasks/") => rpc(
                StatusCode::OK,
                Some(id),
                code::METHOD_NOT_FOUND,
                "tasks are not federated: use the server's own endpoint",
            ),
            _ => not_found(Some(id), method),
        }
    }

    /// Opens a session with every member (at once, each bounded); a member that cannot be
    /// reached is left out of it.
    async fn initialize(&self, message: &Value) -> Response<Body> {
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let mut opened = tokio::task::JoinSet::new();
        for member in &self.endpoint.upstreams {
            let asking = self.asker(member, None);
            let message = message.clone();
            opened.spawn(async move { (asking.member.clone(), asking.open(message).await) });
        }
        let mut members = Members::default();
        let mut results = Vec::new();
        while let Some(Ok((name, result))) = opened.join_next().await {
            match result {
                Ok((member, result)) => {
                    members.0.insert(name.clone(), member);
                    results.push((name, result));
                }
                Err(why) => {
                    tracing::warn!(endpoint = %self.endpoint.name, member = %name, "left out of the session: {why}")
                }
            }
        }
        results.sort_by(|a, b| a.0.cmp(&b.0));
        let asked = message
            .pointer("/params/protocolVersion")
            .and_then(Value::as_str);
        let result = merged_initialize(&self.endpoint.name, asked, &results);
        let mut response = answered(&id, result);
        match self.session_id(&members) {
            Some(session) => {
                response.headers_mut().insert(SESSION_HEADER, session);
            }
            None => {
                return rpc(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Some(&id),
                    -32603,
                    "the session could not be formed",
                )
            }
        }
        response
    }

    /// A listing, every member's pages merged into one.
    async fn merged(
        &self,
        members: &Members,
        message: &Value,
        key: &str,
        renamed: Renamed,
    ) -> Response<Body> {
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let method = message["method"].as_str().unwrap_or_default().to_string();
        let mut listed = tokio::task::JoinSet::new();
        for name in members.0.keys() {
            let asking = self.asker(name, Some(members));
            let (method, key) = (method.clone(), key.to_string());
            listed.spawn(
                async move { (asking.member.clone(), asking.all_pages(&method, &key).await) },
            );
        }
        let mut by_member = Vec::new();
        while let Some(Ok((name, items))) = listed.join_next().await {
            match items {
                Ok(items) => by_member.push((name, items)),
                // A member down or slow leaves the others usable: its items are missing.
                Err(why) => {
                    tracing::warn!(endpoint = %self.endpoint.name, member = %name, "left out of {method}: {why}")
                }
            }
        }
        by_member.sort_by(|a, b| a.0.cmp(&b.0));
        let mut all = Vec::new();
        for (member, items) in by_member {
            all.extend(
                items
                    .into_iter()
                    .filter_map(|item| self.ours(&member, item, renamed)),
            );
        }
        answered(&id, json!({ key: all }))
    }

    /// A member's listed item as the endpoint lists it: a name made `<upstream>__<name>`, a URI
    /// (or a template's fixed start) remembered as the member's. `None`: not an item.
    fn ours(&self, member: &str, mut item: Value, renamed: Renamed) -> Option<Value> {
        let learned = &self.gateway.federation;
        let endpoint = self.endpoint.name.clone();
        match renamed {
            Renamed::Names => {
                let name = item.get("name")?.as_str()?;
                let outer = outer_name(member, name);
                if outer.len() < member.len() + 2 + name.len() {
                    let inner = (member.to_string(), name.to_string());
                    Learned::remember(&learned.names, (endpoint, outer.clone()), inner);
                }
                item["name"] = json!(outer);
            }
            Renamed::Uris => {
                let uri = item.get("uri")?.as_str()?.to_string();
                Learned::own(&learned.uris, (endpoint, self.caller.clone(), uri), member);
            }
            Renamed::Templates => {
                let template = item.get("uriTemplate")?.as_str()?;
                // Routed by what comes before its first variable: a scheme and more, never a
                // bare `{x}` or `file://` that would take every URI.
                let start = template.split('{').next().unwrap_or_default();
                let fixed = start
                    .split_once("://")
                    .is_some_and(|(_, rest)| !rest.is_empty());
                if fixed {
                    let key = (endpoint, self.caller.clone(), start.to_string());
                    Learned::own(&learned.templates, key, member);
                }
            }
        }
        Some(item)
    }

    /// `tools/call` and `prompts/get`: to the member the name says, under its own name.
    async fn named(&self, members: &Members, mut message: Value, id: &Value) -> Response<Body> {
        let outer = message
            .pointer("/params/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some((member, inner)) = self.inner_name_listed(members, outer).await else {
            let why = format!("unknown tool or prompt: {outer} (names are <upstream>__<name>)");
            return rpc(StatusCode::OK, Some(id), code::INVALID_PARAMS, &why);
        };
        message["params"]["name"] = json!(inner);
        self.relay(members, &member, message).await
    }

    /// `completion/complete`: to the member of the prompt or resource it completes.
    async fn completion(
        &self,
        members: &Members,
        mut message: Value,
        id: &Value,
    ) -> Response<Body> {
        let reference = message
            .pointer("/params/ref")
            .cloned()
            .unwrap_or(Value::Null);
        let member = match reference.get("type").and_then(Value::as_str) {
            Some("ref/prompt") => {
                let outer = reference
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let named = self.inner_name_listed(members, outer).await;
                named.map(|(member, inner)| {
                    message["params"]["ref"]["name"] = json!(inner);
                    member
                })
            }
            Some("ref/resource") => match reference.get("uri").and_then(Value::as_str) {
                Some(uri) => self.owner_listed(members, uri).await,
                None => None,
            },
            _ => None,
        };
        match member {
            Some(member) => self.relay(members, &member, message).await,
            None => rpc(
                StatusCode::OK,
                Some(id),
                code::INVALID_PARAMS,
                "unknown prompt or resource",
            ),
        }
    }

    /// The member and its own name for `<upstream>__<name>` (or a cut name listed earlier).
    fn inner_name(&self, outer: &str) -> Option<(String, String)> {
        let (member, inner) = outer.split_once("__")?;
        let known = self.endpoint.upstreams.iter().any(|m| m == member);
        if !known || inner.is_empty() {
            return None;
        }
        let key = (self.endpoint.name.clone(), outer.to_string());
        match Learned::recall(&self.gateway.federation.names, &key) {
            // A cut name stays its member's: another's listing cannot take it over.
            Some(found) if found.0 == member => Some(found),
            _ => Some((member.to_string(), inner.to_string())),
        }
    }

    /// `inner_name`, after listing again when the name is one cut here that this replica has
    /// not seen listed (another replica's, or forgotten).
    async fn inner_name_listed(&self, members: &Members, outer: &str) -> Option<(String, String)> {
        let cut = outer.len() == MAX_NAME;
        let key = (self.endpoint.name.clone(), outer.to_string());
        if cut && Learned::recall(&self.gateway.federation.names, &key).is_none() {
            let relist = json!({"jsonrpc": "2.0", "id": 0, "method": "tools/list"});
            self.merged(members, &relist, "tools", Renamed::Names).await;
            let relist = json!({"jsonrpc": "2.0", "id": 0, "method": "prompts/list"});
            self.merged(members, &relist, "prompts", Renamed::Names)
                .await;
        }
        self.inner_name(outer)
    }

    /// The member that lists `uri` (or a template it starts with); with one member offering
    /// resources, that one.
    fn owner_of(&self, members: &Members, uri: &str) -> Option<String> {
        if let [only] = members.0.keys().collect::<Vec<_>>()[..] {
            return Some(only.clone());
        }
        let learned = &self.gateway.federation;
        let key = (
            self.endpoint.name.clone(),
            self.caller.clone(),
            uri.to_string(),
        );
        let owner = Learned::recall(&learned.uris, &key).or_else(|| {
            let templates = learned.templates.lock().unwrap_or_else(|e| e.into_inner());
            templates
                .iter()
                .filter(|((endpoint, caller, start), _)| {
                    endpoint == &self.endpoint.name
                        && caller == &self.caller
                        && uri.starts_with(start.as_str())
                })
                .max_by_key(|((_, _, start), _)| start.len())
                .map(|(_, owner)| owner.clone())
        });
        match owner? {
            Owner::Member(member) if members.0.contains_key(&member) => Some(member),
            _ => None,
        }
    }

    /// `owner_of`, after listing resources again when this replica has not seen `uri` listed.
    async fn owner_listed(&self, members: &Members, uri: &str) -> Option<String> {
        if let Some(owner) = self.owner_of(members, uri) {
            return Some(owner);
        }
        let relist = json!({"jsonrpc": "2.0", "id": 0, "method": "resources/list"});
        self.merged(members, &relist, "resources", Renamed::Uris)
            .await;
        let relist = json!({"jsonrpc": "2.0", "id": 0, "method": "resources/templates/list"});
        self.merged(members, &relist, "resourceTemplates", Renamed::Templates)
            .await;
        self.owner_of(members, uri)
    }

    /// Relays one request to a member; its answer (JSON or a stream) comes back as it comes,
    /// the member's requests in it renamed.
    async fn relay(&self, members: &Members, member: &str, message: Value) -> Response<Body> {
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let asking = self.asker(member, Some(members));
        let response = match asking.send(&message).await {
            Ok(response) => response,
            Err(why) => return rpc(StatusCode::OK, Some(&id), -32603, &why),
        };
        if !response.status().is_success() {
            return failed(member, &id, response).await;
        }
        let (mut parts, body) = response.into_parts();
        parts.headers.remove(SESSION_HEADER);
        let response = Response::from_parts(parts, body);
        let prefix = member.to_string();
        let rename: Rewrite = Arc::new(move |message: &mut Value| rename_request(&prefix, message));
        match rewrite_answer(response, rename, Vec::new(), false).await {
            Ok(response) => response,
            Err(refusal) => rpc(StatusCode::OK, Some(&id), -32603, &refusal.to_string()),
        }
    }

    /// The agent's answer to a member's request (`<upstream>/<id>`), to that member.
    async fn answer_to_member(&self, members: &Members, mut message: Value, id: &Value) {
        let Some((member, inner)) = id.as_str().and_then(|id| id.split_once('/')) else {
            return;
        };
        let Ok(inner) = serde_json::from_str::<Value>(inner) else {
            return;
        };
        if !members.0.contains_key(member) {
            return;
        }
        message["id"] = inner;
        let _ = self.asker(member, Some(members)).send(&message).await;
    }

    /// A notification (or `logging/setLevel`) to every member; what they answer is theirs.
    async fn each(&self, members: &Members, message: &Value) {
        let mut sent = tokio::task::JoinSet::new();
        for name in members.0.keys() {
            let asking = self.asker(name, Some(members));
            let message = message.clone();
            sent.spawn(async move { asking.answer(&message).await.map(|(answer, _)| answer) });
        }
        while sent.join_next().await.is_some() {}
    }

    /// The session's stream: every member's GET stream merged, their requests renamed.
    async fn listen(&self, members: &Members) -> Response<Body> {
        let (to, from) = mpsc::channel::<Bytes>(256);
        let mut opened = 0;
        for name in members.0.keys() {
            let asking = self.asker(name, Some(members));
            let Ok(response) = asking.get().await else {
                continue;
            };
            if !response.status().is_success() || !is_event_stream(response.headers()) {
                continue;
            }
            opened += 1;
            tokio::spawn(relay_stream(name.clone(), response.into_body(), to.clone()));
        }
        drop(to);
        if opened == 0 {
            return rpc(
                StatusCode::METHOD_NOT_ALLOWED,
                None,
                code::INVALID_REQUEST,
                "no member offers a stream",
            );
        }
        let frames =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(from), |b| {
                Ok::<_, crate::answer::BoxError>(http_body::Frame::data(b))
            });
        let mut response = Response::new(StreamBody::new(frames).boxed());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        response
    }

    /// Ends every member's session.
    async fn end(&self, members: &Members) {
        for name in members.0.keys() {
            let _ = self.asker(name, Some(members)).delete().await;
        }
    }

    fn asker(&self, member: &str, members: Option<&Members>) -> Asker {
        let session = members.and_then(|m| m.0.get(member)).cloned();
        Asker {
            relayed: self.relayed.clone(),
            gateway: self.gateway.clone(),
            member: member.to_string(),
            peer: self.peer,
            carried: self.carried.clone(),
            version: session
                .as_ref()
                .and_then(|s| HeaderValue::from_str(&s.version).ok())
                .or_else(|| self.version.clone()),
            session: session.and_then(|s| s.session),
        }
    }
}

/// How a listing's items are made the endpoint's.
#[derive(Clone, Copy)]
enum Renamed {
    Names,
    Uris,
    Templates,
}

/// On a member request: set once the member's own audit line is certain, so the federated
/// request's line is left to it.
#[derive(Clone)]
struct RelayedBy(Arc<AtomicBool>);

/// Called once a request's audit line is certain: a member request tells its federated one.
pub(crate) fn line_is_certain<B>(request: &Request<B>) {
    if let Some(RelayedBy(relayed)) = request.extensions().get() {
        relayed.store(true, Ordering::Relaxed);
    }
}

/// A member's own requests, as the caller, through the whole pipeline of its endpoint.
struct Asker {
    relayed: Arc<AtomicBool>,
    gateway: Arc<Gateway>,
    member: String,
    peer: SocketAddr,
    carried: HeaderMap,
    version: Option<HeaderValue>,
    session: Option<String>,
}

impl Asker {
    fn request(&self, method: Method, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        request
            .extensions_mut()
            .insert(RelayedBy(self.relayed.clone()));
        *request.method_mut() = method;
        *request.uri_mut() = format!("/{}", self.member).parse().unwrap_or_default();
        let headers = request.headers_mut();
        headers.extend(self.carried.clone());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        if let Some(version) = &self.version {
            headers.insert("mcp-protocol-version", version.clone());
        }
        if let Some(session) = self
            .session
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
        {
            headers.insert(SESSION_HEADER, session);
        }
        request
    }

    /// The member's `timeout_seconds`.
    fn timeout(&self) -> Duration {
        let routing = self.gateway.routing.load();
        let member = routing.upstreams.iter().find(|u| u.name() == self.member);
        Duration::from_secs(member.map_or(30, |u| u.config.timeout_seconds))
    }

    /// One exchange with the member's endpoint, its head bounded by the member's
    /// `timeout_seconds`.
    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<Response<Body>, String> {
        let handled = self.gateway.clone().handle_boxed(request, self.peer);
        tokio::time::timeout(self.timeout(), handled)
            .await
            .map_err(|_| format!("{} did not answer in time", self.member))
    }

    async fn send(&self, message: &Value) -> Result<Response<Body>, String> {
        let body = Bytes::from(message.to_string());
        self.exchange(self.request(Method::POST, body)).await
    }

    async fn get(&self) -> Result<Response<Body>, String> {
        self.exchange(self.request(Method::GET, Bytes::new())).await
    }

    async fn delete(&self) -> Result<Response<Body>, String> {
        self.exchange(self.request(Method::DELETE, Bytes::new()))
            .await
    }

    /// Sends a request and reads its answer: the whole exchange within the member's
    /// `timeout_seconds`, read only until the message answering it (a stream may stay open).
    /// A notification's is `Null`. With the member's `Mcp-Session-Id`, when it gave one.
    async fn answer(&self, message: &Value) -> Result<(Value, Option<String>), String> {
        let exchange = async {
            let response = self.send(message).await?;
            let session = response
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let Some(id) = message.get("id") else {
                return Ok((Value::Null, session));
            };
            let status = response.status();
            let answer = answer_in(response, id).await?;
            let answer = answer.ok_or_else(|| format!("HTTP {status}, no answer"))?;
            Ok((answer, session))
        };
        tokio::time::timeout(self.timeout(), exchange)
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|why: String| format!("{}: {why}", self.member))
    }

    /// The member's session: its `initialize` (and `initialized`); its result.
    async fn open(mut self, message: Value) -> Result<(Member, Value), String> {
        let (answer, session) = self.answer(&message).await?;
        let Some(result) = answer.get("result").cloned() else {
            return Err(format!(
                "initialize refused: {}",
                answer.get("error").unwrap_or(&answer)
            ));
        };
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .filter(|v| REVISIONS.contains(v))
            .ok_or("initialize: not a protocol revision this endpoint speaks")?
            .to_string();
        self.session = session.clone();
        self.version = HeaderValue::from_str(&version).ok();
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.answer(&initialized).await?;
        Ok((Member { session, version }, result))
    }

    /// Every page of a listing, the items under `key`.
    async fn all_pages(&self, method: &str, key: &str) -> Result<Vec<Value>, String> {
        let mut items = Vec::new();
        let mut cursor: Option<Value> = None;
        let mut cursors = Vec::new();
        for _ in 0..MAX_PAGES {
            let params = match &cursor {
                Some(cursor) => json!({"cursor": cursor}),
                None => json!({}),
            };
            // An id of the gateway's own: never one the agent uses in the member's session.
            let id = format!("toolgate-{}", uuid::Uuid::new_v4().simple());
            let asked = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
            let (answer, _) = self.answer(&asked).await?;
            if let Some(error) = answer.get("error") {
                // A member that offers none of these has none to list.
                if error.get("code") == Some(&json!(code::METHOD_NOT_FOUND)) {
                    return Ok(items);
                }
                return Err(format!("{method}: {error}"));
            }
            let page_items = answer
                .pointer(&format!("/result/{key}"))
                .and_then(Value::as_array);
            items.extend(page_items.into_iter().flatten().cloned());
            cursor = answer
                .pointer("/result/nextCursor")
                .filter(|c| !c.is_null())
                .cloned();
            // A cursor seen before would list the same pages again.
            match &cursor {
                Some(next) if !cursors.contains(next) && items.len() < MAX_ITEMS => {
                    cursors.push(next.clone())
                }
                _ => break,
            }
        }
        Ok(items)
    }
}

/// The message answering `id` in a member's answer (JSON, or an event of a stream), read
/// only as far as it.
async fn answer_in(response: Response<Body>, id: &Value) -> Result<Option<Value>, String> {
    let answers = |m: &Value| m.get("id") == Some(id) && m.get("method").is_none();
    if !is_event_stream(response.headers()) {
        let body = crate::pipeline::collect_at_most(response.into_body(), MAX_ANSWER)
            .await
            .map_err(|_| "the answer could not be read".to_string())?;
        let answer: Option<Value> = serde_json::from_slice(&body).ok();
        return Ok(answer.filter(answers));
    }
    let mut body = response.into_body();
    let mut splitter = SseSplitter::new(MAX_ANSWER);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let events = splitter.push(&data).map_err(|e| e.to_string())?;
        if let Some(answer) = events.iter().filter_map(|e| event_json(e)).find(answers) {
            return Ok(Some(answer));
        }
    }
    Ok(event_json(&splitter.finish()).filter(answers))
}

/// A member's failure as a JSON-RPC error on the agent's request, HTTP 200: a client takes an
/// HTTP error for the endpoint's (a 404 for its session's end), not for one member's.
async fn failed(member: &str, id: &Value, response: Response<Body>) -> Response<Body> {
    let status = response.status();
    if status == StatusCode::NOT_FOUND {
        // The member's session is gone (restarted, ended): so is the endpoint's, as the agent
        // reads a 404, and it opens a new one with every member.
        let why = format!("{member}: the session ended; initialize again");
        return rpc(StatusCode::NOT_FOUND, Some(id), code::INVALID_REQUEST, &why);
    }
    let body = crate::pipeline::collect_at_most(response.into_body(), MAX_ANSWER).await;
    let said: Option<Value> = body.ok().and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(answer) = said
        .as_ref()
        .filter(|a| a.get("error").is_some() && a.get("id") == Some(id))
    {
        return json_response(StatusCode::OK, answer);
    }
    let why = said
        .as_ref()
        .and_then(|s| s.get("error"))
        .and_then(Value::as_str)
        .unwrap_or("no answer");
    let message = format!("{member} is unavailable: HTTP {} ({why})", status.as_u16());
    rpc(StatusCode::OK, Some(id), -32603, &message)
}

/// A member's GET stream into the merged one, its requests renamed; ends with it.
async fn relay_stream(member: String, mut body: Body, to: mpsc::Sender<Bytes>) {
    let mut splitter = SseSplitter::new(MAX_ANSWER);
    loop {
        // Ended with the agent's stream too: a member's stream may never end on its own.
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = to.closed() => return,
        };
        let Some(Ok(frame)) = frame else {
            return;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let Ok(events) = splitter.push(&data) else {
            return;
        };
        for event in events {
            let Some(mut message) = event_json(&event) else {
                continue;
            };
            rename_request(&member, &mut message);
            let event = format!("event: message\ndata: {message}\n\n");
            if to.send(Bytes::from(event)).await.is_err() {
                return;
            }
        }
    }
}

/// A member's request to the agent (sampling, elicitation, roots) named `<upstream>/<id>`.
fn rename_request(member: &str, message: &mut Value) -> bool {
    if message.get("method").is_none() {
        return false;
    }
    let Some(id) = message.get("id").cloned() else {
        return false;
    };
    message["id"] = json!(format!("{member}/{id}"));
    true
}

/// `<upstream>__<name>`, cut to `MAX_NAME` with a digest of the whole when longer.
fn outer_name(member: &str, name: &str) -> String {
    let whole = format!("{member}__{name}");
    if whole.len() <= MAX_NAME {
        return whole;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(whole.as_bytes());
    let tag: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let mut cut = whole;
    let keep = MAX_NAME - tag.len() - 1;
    while cut.len() > keep {
        cut.pop();
    }
    format!("{cut}_{tag}")
}

/// What the endpoint as a whole offers, from each member's `initialize` result.
fn merged_initialize(endpoint: &str, asked: Option<&str>, results: &[(String, Value)]) -> Value {
    let offers = |capability: &str| {
        results
            .iter()
            .any(|(_, r)| r.pointer(&format!("/capabilities/{capability}")).is_some())
    };
    let mut capabilities = serde_json::Map::new();
    for capability in ["tools", "prompts"] {
        if offers(capability) {
            capabilities.insert(capability.into(), json!({"listChanged": true}));
        }
    }
    if offers("resources") {
        let subscribe = results
            .iter()
            .any(|(_, r)| r.pointer("/capabilities/resources/subscribe") == Some(&json!(true)));
        capabilities.insert(
            "resources".into(),
            json!({"listChanged": true, "subscribe": subscribe}),
        );
    }
    for capability in ["logging", "completions"] {
        if offers(capability) {
            capabilities.insert(capability.into(), json!({}));
        }
    }
    // A revision every member agreed to: the oldest of theirs (and never newer than asked).
    let version = results
        .iter()
        .filter_map(|(_, r)| r.get("protocolVersion").and_then(Value::as_str))
        .chain(asked)
        .filter(|v| REVISIONS.contains(v))
        .min()
        .unwrap_or(REVISIONS[REVISIONS.len() - 1]);
    let instructions: Vec<String> = results
        .iter()
        .filter_map(|(name, r)| Some(format!("{name}: {}", r.get("instructions")?.as_str()?)))
        .collect();
    let mut result = json!({
        "protocolVersion": version,
        "capabilities": capabilities,
        "serverInfo": {"name": format!("toolgate/{endpoint}"), "version": env!("CARGO_PKG_VERSION")},
    });
    if !instructions.is_empty() {
        result["instructions"] = json!(instructions.join("\n\n"));
    }
    result
}

fn answered(id: &Value, result: Value) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"jsonrpc": "2.0", "id": id, "result": result}),
    )
}

/// Marks an error the endpoint answered itself, for its audit line.
#[derive(Clone)]
struct OwnError(String);

fn rpc(status: StatusCode, id: Option<&Value>, code: i64, message: &str) -> Response<Body> {
    let mut response = json_response(status, &error_response(id, code, message, None));
    response
        .extensions_mut()
        .insert(OwnError(message.to_string()));
    response
}

fn not_found(id: Option<&Value>, method: &str) -> Response<Body> {
    rpc(
        StatusCode::OK,
        id,
        code::METHOD_NOT_FOUND,
        &format!("method not found: {method}"),
    )
}

fn accepted() -> Response<Body> {
    crate::answer::empty(StatusCode::ACCEPTED)
}
