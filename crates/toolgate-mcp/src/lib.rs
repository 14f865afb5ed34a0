//! MCP (JSON-RPC 2.0 over streamable HTTP) as toolgate needs it: parse and bound what agents
//! send, say what each message asks for, rewrite what servers answer. No I/O.
#![forbid(unsafe_code)]

pub mod json;
mod sse;
mod uri;

use serde_json::{json, Map, Value};

pub use sse::{event_json, rewrite_event_data, SseSplitter};
pub use uri::{canonical_uri, expand_template};

/// JSON-RPC error codes toolgate answers with.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// MCP answers an unknown tool with "invalid params".
    pub const INVALID_PARAMS: i64 = -32602;
    /// Denied by policy (implementation-defined server error range).
    pub const FORBIDDEN: i64 = -32003;
    /// MCP 2026-07-28: a transport header (`Mcp-Method`, `Mcp-Name`) does not match the body.
    pub const HEADER_MISMATCH: i64 = -32020;
}

/// Nesting allowed in one message (objects and arrays).
pub const MAX_DEPTH: usize = 32;
/// The largest integer id read: every JSON reader holds it exactly (2^53 - 1).
const MAX_EXACT_ID: u64 = (1 << 53) - 1;

/// Messages allowed in one batch.
pub const MAX_BATCH: usize = 64;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
}

/// What an agent POSTed: one message or a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Single(Value),
    Batch(Vec<Value>),
}

impl Payload {
    pub fn messages(&self) -> &[Value] {
        match self {
            Payload::Single(m) => std::slice::from_ref(m),
            Payload::Batch(ms) => ms,
        }
    }
}

/// Parses a POST body as JSON-RPC. Refuses what is not JSON, too deeply nested, not a
/// JSON-RPC 2.0 message, or an empty or oversized batch.
pub fn parse(body: &[u8]) -> Result<Payload, RpcError> {
    // Strict: duplicate or case-folded keys at any level (envelope, params, arguments) are
    // refused, so the server cannot read a different call than the one authorized.
    let value = json::parse_strict(body, MAX_DEPTH).map_err(|e| match e {
        json::JsonError::Syntax(e) => RpcError::new(code::PARSE_ERROR, format!("parse error: {e}")),
        json::JsonError::Ambiguous(e) => RpcError::new(code::INVALID_REQUEST, e),
    })?;
    match value {
        Value::Array(items) => {
            if items.is_empty() || items.len() > MAX_BATCH {
                return Err(RpcError::new(
                    code::INVALID_REQUEST,
                    format!("a batch holds 1 to {MAX_BATCH} messages"),
                ));
            }
            let mut ids = Vec::new();
            for item in &items {
                check_message(item)?;
                // Answers are matched to requests by id: two requests sharing one would let
                // one's answer be taken for the other's (a listing left unfiltered).
                if let (Some(id), Some(_)) = (item.get("id"), item.get("method")) {
                    if ids.contains(&id) {
                        return Err(RpcError::new(
                            code::INVALID_REQUEST,
                            "two requests in a batch share an id",
                        ));
                    }
                    ids.push(id);
                }
            }
            Ok(Payload::Batch(items))
        }
        single => {
            check_message(&single)?;
            Ok(Payload::Single(single))
        }
    }
}

/// The members JSON-RPC 2.0 defines. Any other is refused: a server that matches members
/// without regard to case would read `Method` or `Params` where the gateway saw none.
const ENVELOPE: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];

fn check_message(m: &Value) -> Result<(), RpcError> {
    let obj = m
        .as_object()
        .ok_or_else(|| RpcError::new(code::INVALID_REQUEST, "a JSON-RPC message is an object"))?;
    if let Some(key) = obj.keys().find(|k| !ENVELOPE.contains(&k.as_str())) {
        return Err(RpcError::new(
            code::INVALID_REQUEST,
            format!("`{key}` is not a JSON-RPC member"),
        ));
    }
    if obj.get("jsonrpc") != Some(&json!("2.0")) {
        return Err(RpcError::new(
            code::INVALID_REQUEST,
            "jsonrpc must be \"2.0\"",
        ));
    }
    if let Some(id) = obj.get("id") {
        // Beyond 2^53 a server reading numbers as doubles answers with another id, and the
        // answer would not be recognised (nor filtered) as the request's.
        let exact = |n: i64| n.unsigned_abs() <= MAX_EXACT_ID;
        if !(id.is_string() || id.as_i64().is_some_and(exact)) {
            return Err(RpcError::new(
                code::INVALID_REQUEST,
                "id must be a string or an integer within ±(2^53 - 1)",
            ));
        }
    }
    let answers = obj.contains_key("result") as u8 + obj.contains_key("error") as u8;
    match obj.get("method") {
        Some(Value::String(_)) if answers > 0 => Err(RpcError::new(
            code::INVALID_REQUEST,
            "a request carries no result or error",
        )),
        Some(Value::String(_)) => {
            if obj
                .get("params")
                .is_some_and(|p| !(p.is_object() || p.is_array()))
            {
                return Err(RpcError::new(
                    code::INVALID_REQUEST,
                    "params must be an object or an array",
                ));
            }
            Ok(())
        }
        Some(_) => Err(RpcError::new(
            code::INVALID_REQUEST,
            "method must be a string",
        )),
        // A response to a server's request: carries an id and a result or an error.
        None if obj.contains_key("id") && answers == 1 && !obj.contains_key("params") => Ok(()),
        None => Err(RpcError::new(
            code::INVALID_REQUEST,
            "neither a request, a notification nor a response",
        )),
    }
}

/// What a message asks for, as far as authorization is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Intent {
    /// Decided as the action `<upstream>/<action>` on `args`; what is forwarded is rendered
    /// from the decided arguments as `place` says.
    Decide {
        action: String,
        args: Map<String, Value>,
        place: ArgsPlace,
    },
    /// A listing (`tools/list`, `resources/list`, `resources/templates/list`, `prompts/list`):
    /// forwarded; each item in the answer is shown only where reading it would be permitted.
    List,
    /// `subscriptions/listen` (2026-07-28): forwarded; what it streams is filtered.
    Listen,
    /// `tasks/get`, `tasks/result`, `tasks/cancel` on the task handle the caller was given
    /// (bound to it); `tasks/update` is also decided as `<upstream>/tasks/update` on its input.
    Task {
        task_id: String,
        update: Option<Map<String, Value>>,
    },
    /// Authentication is enough: initialize, server/discover, ping, notifications, responses.
    Pass,
    /// A request method toolgate does not know: refused.
    Unknown(String),
}

/// The actions MCP methods are decided as, beside tools' own (`<upstream>/<action>`).
pub const METHOD_ACTIONS: [&str; 4] = [
    "resources/read",
    "prompts/get",
    "logging/setLevel",
    "tasks/update",
];

/// What an agent's message is counted as: a method MCP defines for clients to send
/// (requests and notifications), `response` for an answer to the server, else `other`, so an
/// agent's words never make new metric series.
pub fn method_label(message: &Value) -> &'static str {
    const CLIENT_METHODS: [&str; 24] = [
        "initialize",
        "ping",
        "server/discover",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "subscriptions/listen",
        "tasks/get",
        "tasks/result",
        "tasks/cancel",
        "tasks/list",
        "tasks/update",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
    ];
    match message.get("method").and_then(Value::as_str) {
        None => "response",
        Some(method) => CLIENT_METHODS
            .into_iter()
            .find(|known| *known == method)
            .unwrap_or("other"),
    }
}

/// Where a decided message's arguments go back once rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgsPlace {
    /// `params.arguments` (`tools/call`): the tool's own arguments.
    Arguments,
    /// The decided members of `params` (`prompts/get`'s name and arguments, a `uri`).
    Params,
    /// Nothing is rendered back: the message is forwarded as read (`completion/complete`,
    /// decided as the read it would complete).
    Unchanged,
}

pub fn intent(message: &Value) -> Result<Intent, RpcError> {
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        return Ok(Intent::Pass);
    };
    if message.get("id").is_none() {
        // A request sent as a notification would run on the server with no answer to filter
        // or deny: only `notifications/*` may come without an id.
        if !method.starts_with("notifications/") {
            return Err(RpcError::new(
                code::INVALID_REQUEST,
                format!("`{method}` is a request and needs an id"),
            ));
        }
        return Ok(Intent::Pass);
    }
    let params = |read: &[&str]| read_params(message, read);
    let decide = |action: &str, args: Map<String, Value>, place| Intent::Decide {
        action: action.to_string(),
        args,
        place,
    };
    Ok(match method {
        "tools/call" => {
            let params = params(&["name", "arguments"])?;
            let name = params
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    RpcError::new(code::INVALID_PARAMS, "tools/call needs a tool name")
                })?;
            if METHOD_ACTIONS.contains(&name) {
                // Decided as `<upstream>/<name>`, it would be taken for the method's action.
                return Err(RpcError::new(
                    code::INVALID_PARAMS,
                    format!("a tool named `{name}` cannot be told from the MCP method's action"),
                ));
            }
            decide(
                name,
                object_member(&params, "arguments")?,
                ArgsPlace::Arguments,
            )
        }
        "prompts/get" => {
            let params = params(&["name", "arguments"])?;
            let mut args = Map::new();
            for key in ["name", "arguments"] {
                if let Some(value) = params.get(key) {
                    args.insert(key.to_string(), value.clone());
                }
            }
            decide(method, args, ArgsPlace::Params)
        }
        // Watching a resource (or ceasing to) tells what changes in it: decided as reading it.
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => decide(
            "resources/read",
            canonical_uri_param(params(&["uri"])?)?,
            ArgsPlace::Params,
        ),
        "logging/setLevel" => {
            let params = params(&["level"])?;
            let level = params.get("level").cloned().unwrap_or(Value::Null);
            decide(
                method,
                Map::from_iter([("level".into(), level)]),
                ArgsPlace::Params,
            )
        }
        "completion/complete" => {
            let (action, args) = completion(&params(&["ref", "argument", "context"])?)?;
            decide(action, args, ArgsPlace::Unchanged)
        }
        "tools/list" | "resources/list" | "resources/templates/list" | "prompts/list" => {
            Intent::List
        }
        "subscriptions/listen" => Intent::Listen,
        "tasks/get" | "tasks/result" | "tasks/cancel" | "tasks/update" => {
            let mut params = params(&["taskId"])?;
            let task_id = match params.remove("taskId") {
                Some(Value::String(id)) if !id.is_empty() => id,
                _ => {
                    return Err(RpcError::new(
                        code::INVALID_PARAMS,
                        format!("{method} needs a taskId"),
                    ))
                }
            };
            params.remove("_meta");
            let update = (method == "tasks/update").then_some(params);
            Intent::Task { task_id, update }
        }
        "initialize" | "server/discover" | "ping" => Intent::Pass,
        other => Intent::Unknown(other.to_string()),
    })
}

/// The params object, with the members the gateway reads spelled exactly as MCP defines them:
/// a server that folds case would otherwise take `Arguments` or `URI` the policy never saw.
fn read_params(message: &Value, read: &[&str]) -> Result<Map<String, Value>, RpcError> {
    let params = match message.get("params") {
        Some(Value::Object(p)) => p.clone(),
        None => Map::new(),
        Some(_) => {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                "params must be an object",
            ))
        }
    };
    match json::misspelled(&params, read.iter().copied().chain(["_meta"])) {
        Some(key) => Err(RpcError::new(
            code::INVALID_PARAMS,
            format!("params member `{key}` is not spelled as MCP defines it"),
        )),
        None => Ok(params),
    }
}

/// An object member that may be absent (or null): empty then.
fn object_member(params: &Map<String, Value>, name: &str) -> Result<Map<String, Value>, RpcError> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(a)) => Ok(a.clone()),
        Some(_) => Err(RpcError::new(
            code::INVALID_PARAMS,
            format!("{name} must be an object"),
        )),
    }
}

/// `{uri}` in its canonical form (`uri::canonical_uri`).
fn canonical_uri_param(params: Map<String, Value>) -> Result<Map<String, Value>, RpcError> {
    let Some(Value::String(uri)) = params.get("uri") else {
        return Err(RpcError::new(
            code::INVALID_PARAMS,
            "a resource uri (a string) is required",
        ));
    };
    let canonical = canonical_uri(uri).map_err(|e| RpcError::new(code::INVALID_PARAMS, e))?;
    Ok(Map::from_iter([("uri".into(), Value::String(canonical))]))
}

/// A completion is decided as the call it completes: `prompts/get` of the prompt with the
/// context's arguments and the completed one's current value, or `resources/read` of the uri
/// the template expands to with them.
fn completion(params: &Map<String, Value>) -> Result<(&'static str, Map<String, Value>), RpcError> {
    let invalid = |why: &str| RpcError::new(code::INVALID_PARAMS, why.to_string());
    let reference = object_member(params, "ref")?;
    let argument = object_member(params, "argument")?;
    let name = argument
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("completion/complete needs argument.name"))?;
    let value = argument
        .get("value")
        .filter(|v| v.is_string())
        .ok_or_else(|| invalid("completion/complete needs argument.value, a string"))?;
    let context = params
        .get("context")
        .map(|c| read_params(&json!({"params": c}), &["arguments"]))
        .transpose()?
        .unwrap_or_default();
    let mut arguments = object_member(&context, "arguments")?;
    // The completed argument once: the server's handler would read the context's copy.
    if arguments.insert(name.to_string(), value.clone()).is_some() {
        return Err(invalid(
            "completion/complete: argument.name is also in context.arguments",
        ));
    }
    match reference.get("type").and_then(Value::as_str) {
        Some("ref/prompt") => {
            let prompt = reference
                .get("name")
                .filter(|n| n.is_string())
                .ok_or_else(|| invalid("a prompt reference needs a name"))?;
            let args = Map::from_iter([
                ("name".into(), prompt.clone()),
                ("arguments".into(), Value::Object(arguments)),
            ]);
            Ok(("prompts/get", args))
        }
        Some("ref/resource") => {
            let template = reference
                .get("uri")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("a resource reference needs a uri"))?;
            let uri = expand_template(template, &arguments)
                .map_err(|e| RpcError::new(code::INVALID_PARAMS, e))?;
            let args = Map::from_iter([("uri".into(), Value::String(uri))]);
            Ok(("resources/read", canonical_uri_param(args)?))
        }
        _ => Err(invalid(
            "completion/complete: ref.type is ref/prompt or ref/resource",
        )),
    }
}

/// The first MCP revision whose clients must mirror the method and name into headers.
pub const HEADERS_REQUIRED_FROM: &str = "2026-07-28";

/// MCP 2026-07-28 transport headers: `Mcp-Method` must be the message's method and `Mcp-Name`
/// the name it acts on (`params.name` of `tools/call` and `prompts/get`, `params.uri` of
/// `resources/read`; `=?base64?...?=` decoded). Anything reading the body must refuse a
/// mismatch, or a component routing by header would act on another call than the server runs;
/// from 2026-07-28 on (`protocol_version`) a missing one is refused too. Each slice holds every
/// value of that header.
pub fn transport_headers_match(
    payload: &Payload,
    protocol_version: Option<&str>,
    method: &[&str],
    name: &[&str],
) -> Result<(), RpcError> {
    let mismatch = |what: &str| {
        Err(RpcError::new(
            code::HEADER_MISMATCH,
            format!("Header mismatch: {what}"),
        ))
    };
    let required = protocol_version.is_some_and(|v| v >= HEADERS_REQUIRED_FROM);
    if method.is_empty() && name.is_empty() && !required {
        return Ok(());
    }
    let Payload::Single(message) = payload else {
        return mismatch("transport headers on a batch");
    };
    let Some(body_method) = message.get("method").and_then(Value::as_str) else {
        return mismatch("transport headers on a response");
    };
    match method {
        [] if !required => {}
        [m] if *m == body_method => {}
        [] => return mismatch("Mcp-Method header is missing"),
        _ => return mismatch("Mcp-Method header does not match the body"),
    }
    let params = message.get("params");
    let body_name = match body_method {
        "tools/call" | "prompts/get" => params.and_then(|p| p.get("name")),
        "resources/read" => params.and_then(|p| p.get("uri")),
        _ => None,
    }
    .and_then(Value::as_str);
    match (name, body_name) {
        ([], None) => Ok(()),
        ([], Some(_)) if !required => Ok(()),
        ([], Some(_)) => mismatch("Mcp-Name header is missing"),
        ([n], Some(body)) if decode_header_value(n).as_deref() == Some(body) => Ok(()),
        _ => mismatch("Mcp-Name header does not match the body"),
    }
}

/// A header value as MCP encodes non-ASCII text: `=?base64?<standard base64 of UTF-8>?=`.
fn decode_header_value(value: &str) -> Option<String> {
    use base64::Engine as _;
    match value
        .strip_prefix("=?base64?")
        .and_then(|v| v.strip_suffix("?="))
    {
        Some(encoded) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            String::from_utf8(bytes).ok()
        }
        None => Some(value.to_string()),
    }
}

/// A JSON-RPC error response for the message's id (null when it has none).
pub fn error_response(id: Option<&Value>, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = json!({"code": code, "message": message});
    if let Some(data) = data {
        error["data"] = data;
    }
    json!({"jsonrpc": "2.0", "id": id.cloned().unwrap_or(Value::Null), "error": error})
}

/// One item of a listing answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed<'a> {
    Tool(&'a str),
    Resource(&'a str),
    /// A resource template, by its `uriTemplate`.
    Template(&'a str),
    Prompt(&'a str),
}

/// The listings MCP defines: the result member, and the item's key member.
const LISTINGS: [(&str, &str); 4] = [
    ("tools", "name"),
    ("resources", "uri"),
    ("resourceTemplates", "uriTemplate"),
    ("prompts", "name"),
];

/// Whether a message is a listing answer (a result holding one of the listings).
pub fn is_listing(message: &Value) -> bool {
    let result = message.get("result");
    LISTINGS.iter().any(|(member, _)| {
        result
            .and_then(|r| r.get(member))
            .is_some_and(Value::is_array)
    })
}

/// Whether a server's message reads the same to every client: no member a case-folding
/// reader (Go's `encoding/json`) takes for a known one (`Result`, `Tools`), a `method` that is a
/// string if present. The gateway filters the exact members; a variant would pass unfiltered.
pub fn server_message_is_plain(message: &Value) -> bool {
    const ENVELOPE: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];
    let Some(fields) = message.as_object() else {
        return false;
    };
    let method_ok = fields.get("method").is_none_or(Value::is_string);
    let result_ok = match fields.get("result") {
        Some(Value::Object(result)) => {
            json::misspelled(result, LISTINGS.iter().map(|(member, _)| *member)).is_none()
        }
        _ => true,
    };
    method_ok && result_ok && json::misspelled(fields, ENVELOPE).is_none()
}

/// Removes from a listing answer every item `keep` refuses (and any without its key). Returns
/// how many were removed.
pub fn filter_listing(response: &mut Value, keep: &dyn Fn(Listed<'_>) -> bool) -> usize {
    let mut removed = 0;
    for (member, key) in LISTINGS {
        let Some(items) = response
            .pointer_mut(&format!("/result/{member}"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        let before = items.len();
        items.retain(|item| {
            let Some(id) = item.get(key).and_then(Value::as_str) else {
                return false;
            };
            keep(match member {
                "tools" => Listed::Tool(id),
                "resources" => Listed::Resource(id),
                "resourceTemplates" => Listed::Template(id),
                _ => Listed::Prompt(id),
            })
        });
        removed += before - items.len();
    }
    removed
}

/// The longest a client may cache a result the gateway decided or filtered: a narrowed policy
/// takes effect within it.
pub const MAX_DECIDED_TTL_MS: u64 = 60_000;

/// Marks a result as decided for this caller (MCP 2026-07-28 caching): `cacheScope: "private"`,
/// and any `ttlMs` capped at `MAX_DECIDED_TTL_MS`. Says whether it changed the message.
pub fn mark_private(message: &mut Value) -> bool {
    let Some(result) = message.get_mut("result").and_then(Value::as_object_mut) else {
        return false;
    };
    result.insert("cacheScope".into(), json!("private"));
    if let Some(ttl) = result.get_mut("ttlMs") {
        if ttl.as_u64().is_none_or(|t| t > MAX_DECIDED_TTL_MS) {
            *ttl = json!(MAX_DECIDED_TTL_MS);
        }
    }
    true
}

/// Where a refusal's code goes when it cannot be the structured content.
pub const REFUSAL_META: &str = "io.toolgate/refusal";

/// The answer to a `tools/call` whose arguments were refused: a tool error the model can read
/// and correct (SEP-1303), with the machine-readable code in `structuredContent`, or (where the
/// tool declares an output schema the code would not match) in `_meta`.
pub fn tool_input_error(
    id: Option<&Value>,
    code: &str,
    argument: &str,
    message: &str,
    structured: bool,
) -> Value {
    let refusal = json!({"error": code, "argument": argument});
    // `resultType` is required from 2026-07-28 on, and ignored before.
    let mut result = json!({
        "resultType": "complete",
        "content": [{"type": "text", "text": format!("{code}: {message}")}],
        "isError": true,
    });
    if structured {
        result["structuredContent"] = refusal;
    } else {
        result["_meta"] = json!({ REFUSAL_META: refusal });
    }
    json!({"jsonrpc": "2.0", "id": id.cloned().unwrap_or(Value::Null), "result": result})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_messages_a_case_folding_client_reads_otherwise_are_not_plain() {
        assert!(server_message_is_plain(
            &json!({"jsonrpc":"2.0","id":1,"result":{"tools":[]}})
        ));
        for odd in [
            json!({"jsonrpc":"2.0","id":1,"result":{"tools":[],"Tools":[{"name":"x"}]}}),
            json!({"jsonrpc":"2.0","id":1,"Result":{"tools":[]}}),
            json!({"jsonrpc":"2.0","id":6,"ID":5,"result":{}}),
            json!({"jsonrpc":"2.0","id":5,"method":null,"result":{}}),
            json!([1]),
        ] {
            assert!(!server_message_is_plain(&odd), "{odd}");
        }
    }

    #[test]
    fn parses_single_and_batch() {
        let single = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#;
        let Payload::Single(m) = parse(single).unwrap() else {
            panic!()
        };
        assert_eq!(
            intent(&m).unwrap(),
            Intent::Decide {
                action: "add".into(),
                args: json!({"a": 1}).as_object().unwrap().clone(),
                place: ArgsPlace::Arguments,
            }
        );
        let batch = br#"[{"jsonrpc":"2.0","id":"a","method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#;
        assert_eq!(parse(batch).unwrap().messages().len(), 2);
        let twice = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":1,"method":"ping"}]"#;
        assert_eq!(parse(twice).unwrap_err().code, code::INVALID_REQUEST);
        let wide = br#"{"jsonrpc":"2.0","id":9007199254740993,"method":"tools/list"}"#;
        assert_eq!(parse(wide).unwrap_err().code, code::INVALID_REQUEST);
        assert!(parse(br#"{"jsonrpc":"2.0","id":-9007199254740991,"method":"ping"}"#).is_ok());
    }

    #[test]
    fn malformed_messages_are_refused() {
        let cases: [(&[u8], i64); 14] = [
            (b"{not json", code::PARSE_ERROR),
            (b"[]", code::INVALID_REQUEST),
            (b"42", code::INVALID_REQUEST),
            (br#"{"id":1,"method":"ping"}"#, code::INVALID_REQUEST),
            (
                br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
                code::INVALID_REQUEST,
            ),
            (
                br#"{"jsonrpc":"2.0","id":{"x":1},"method":"ping"}"#,
                code::INVALID_REQUEST,
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":7}"#,
                code::INVALID_REQUEST,
            ),
            (br#"{"jsonrpc":"2.0","id":1}"#, code::INVALID_REQUEST),
            (
                br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}, 5]"#,
                code::INVALID_REQUEST,
            ),
            // Members a case-folding server would read as the method or params.
            (
                br#"{"jsonrpc":"2.0","id":1,"result":{},"Method":"tools/call"}"#,
                code::INVALID_REQUEST,
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"ping","Params":{}}"#,
                code::INVALID_REQUEST,
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}"#,
                code::INVALID_REQUEST,
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"result":{},"params":{}}"#,
                code::INVALID_REQUEST,
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#,
                code::INVALID_REQUEST,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                parse(body).unwrap_err().code,
                want,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{"a":{}1{}}}}}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert_eq!(
            parse(deep.as_bytes()).unwrap_err().code,
            code::INVALID_REQUEST
        );
        // Refused at depth 33, long before serde_json's own recursion limit.
        let hostile = "[".repeat(100_000);
        assert_eq!(
            parse(hostile.as_bytes()).unwrap_err().code,
            code::INVALID_REQUEST
        );
    }

    #[test]
    fn intents() {
        let m = |v: Value| intent(&v).unwrap();
        for listing in [
            "tools/list",
            "resources/list",
            "resources/templates/list",
            "prompts/list",
        ] {
            assert_eq!(
                m(json!({"jsonrpc":"2.0","id":1,"method":listing})),
                Intent::List
            );
        }
        assert_eq!(
            m(json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{}})),
            Intent::Pass
        );
        assert_eq!(
            m(json!({"jsonrpc":"2.0","method":"notifications/whatever"})),
            Intent::Pass
        );
        assert_eq!(m(json!({"jsonrpc":"2.0","id":1,"result":{}})), Intent::Pass);
        assert_eq!(
            m(json!({"jsonrpc":"2.0","id":1,"method":"sampling/createMessage"})),
            Intent::Unknown("sampling/createMessage".into())
        );
        assert!(matches!(
            m(
                json!({"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///x"}})
            ),
            Intent::Decide {
                place: ArgsPlace::Params,
                ..
            }
        ));
        assert!(
            intent(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}})).is_err()
        );
        assert!(intent(&json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":[1]}})).is_err());
        // What the gateway reads must be spelled exactly; other params pass untouched.
        for params in [
            json!({"name":"a","Arguments":{"amount":900}}),
            json!({"name":"a","NAME":"b"}),
            json!({"name":"a","_Meta":{}}),
        ] {
            let m = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":params});
            assert_eq!(intent(&m).unwrap_err().code, code::INVALID_PARAMS, "{m}");
        }
        let m =
            json!({"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"URI":"file:///x"}});
        assert!(intent(&m).is_err());
        // A tool may not pass for a method's action; a task's methods name its handle.
        assert!(intent(
            &json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","task":{}}})
        )
        .is_ok());
        assert_eq!(
            intent(&json!({"jsonrpc":"2.0","id":1,"method":"tasks/update","params":{"taskId":"t.x","inputResponses":{}}})).unwrap(),
            Intent::Task {
                task_id: "t.x".into(),
                update: Some(json!({"inputResponses": {}}).as_object().unwrap().clone()),
            }
        );
        for params in [
            json!({"name":"resources/read","arguments":{"uri":"notes://alice/x"}}),
            json!({"name":"tasks/update","arguments":{}}),
        ] {
            let m = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":params});
            assert_eq!(intent(&m).unwrap_err().code, code::INVALID_PARAMS, "{m}");
        }
        for uri in [
            "file:///public/../secret",
            "file:///public/%2e%2e/secret",
            "file:///public/x%2F..%2Fsecret",
            "FILE:///secret",
            "https://example.com",
            "notes/1",
        ] {
            let m = json!({"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":uri}});
            assert_eq!(intent(&m).unwrap_err().code, code::INVALID_PARAMS, "{uri}");
        }
        for uri in [
            "file:///public/a",
            "memo://insights",
            "https://example.com/a?b=c",
        ] {
            let m = json!({"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":uri}});
            assert!(intent(&m).is_ok(), "{uri}");
        }
        // Subscribing (and ceasing to) is reading; the uri is decided in its canonical form.
        for method in [
            "resources/subscribe",
            "resources/unsubscribe",
            "resources/read",
        ] {
            let m =
                json!({"jsonrpc":"2.0","id":1,"method":method,"params":{"uri":"notes://bo%62/x"}});
            assert_eq!(
                intent(&m).unwrap(),
                Intent::Decide {
                    action: "resources/read".into(),
                    args: json!({"uri": "notes://bob/x"}).as_object().unwrap().clone(),
                    place: ArgsPlace::Params,
                }
            );
        }
        // A completion is decided as what it completes; setting the log level is an action.
        let complete = |reference: Value| {
            let params = json!({"ref": reference, "argument": {"name": "user", "value": "bo"},
                "context": {"arguments": {"kind": "salary"}}});
            intent(&json!({"jsonrpc":"2.0","id":1,"method":"completion/complete","params":params}))
        };
        assert_eq!(
            complete(json!({"type": "ref/prompt", "name": "greet"})).unwrap(),
            Intent::Decide {
                action: "prompts/get".into(),
                args: json!({"name": "greet", "arguments": {"user": "bo", "kind": "salary"}})
                    .as_object()
                    .unwrap()
                    .clone(),
                place: ArgsPlace::Unchanged,
            }
        );
        assert_eq!(
            complete(json!({"type": "ref/resource", "uri": "notes://{user}/{kind}"})).unwrap(),
            Intent::Decide {
                action: "resources/read".into(),
                args: json!({"uri": "notes://bo/salary"})
                    .as_object()
                    .unwrap()
                    .clone(),
                place: ArgsPlace::Unchanged,
            }
        );
        assert!(complete(json!({"type": "ref/other"})).is_err());
        let twice = json!({"ref": {"type": "ref/prompt", "name": "p"},
            "argument": {"name": "owner", "value": "me"},
            "context": {"arguments": {"owner": "victim"}}});
        let m = json!({"jsonrpc":"2.0","id":1,"method":"completion/complete","params":twice});
        assert_eq!(intent(&m).unwrap_err().code, code::INVALID_PARAMS);
        let m =
            json!({"jsonrpc":"2.0","id":1,"method":"logging/setLevel","params":{"level":"debug"}});
        assert!(
            matches!(intent(&m).unwrap(), Intent::Decide { action, .. } if action == "logging/setLevel")
        );
    }

    #[test]
    fn transport_headers_must_say_what_the_body_says() {
        let call = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{}}}"#).unwrap();
        let ok = |v: Option<&str>, m: &[&str], n: &[&str]| {
            transport_headers_match(&call, v, m, n).is_ok()
        };
        assert!(ok(None, &[], &[]));
        assert!(ok(Some("2025-11-25"), &[], &[]));
        assert!(ok(Some("2026-07-28"), &["tools/call"], &["add"]));
        assert!(ok(
            Some("2026-07-28"),
            &["tools/call"],
            &["=?base64?YWRk?="]
        ));
        assert!(!ok(Some("2026-07-28"), &[], &[]));
        assert!(!ok(Some("2026-07-28"), &["tools/call"], &[]));
        assert!(!ok(None, &["tools/call"], &["pay"]));
        assert!(!ok(None, &["tools/list"], &[]));
        assert!(!ok(None, &["Tools/Call"], &[]));
        assert!(!ok(None, &["tools/call", "tools/call"], &[]));
        assert!(!ok(None, &[], &["add", "add"]));
        let batch = parse(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#).unwrap();
        assert!(transport_headers_match(&batch, None, &["ping"], &[]).is_err());
        let e = transport_headers_match(&call, None, &["ping"], &[]).unwrap_err();
        assert_eq!(e.code, code::HEADER_MISMATCH);
    }

    #[test]
    fn requests_sent_as_notifications_are_refused() {
        for method in ["tools/call", "resources/read", "prompts/get", "tools/list"] {
            let m = json!({"jsonrpc":"2.0","method":method,"params":{"name":"add"}});
            assert_eq!(
                intent(&m).unwrap_err().code,
                code::INVALID_REQUEST,
                "{method}"
            );
        }
        let n = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
        assert_eq!(intent(&n).unwrap(), Intent::Pass);
    }

    proptest::proptest! {
        /// Whatever bytes arrive, the parser answers (never panics), and a message it accepts
        /// means the same once re-serialised (as the gateway forwards it): same payload, same
        /// intent.
        #[test]
        fn parsing_is_total_and_stable(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Ok(payload) = parse(&bytes) {
                let again = match &payload {
                    Payload::Single(m) => serde_json::to_vec(m).unwrap(),
                    Payload::Batch(ms) => serde_json::to_vec(ms).unwrap(),
                };
                let reparsed = parse(&again).unwrap();
                proptest::prop_assert_eq!(&reparsed, &payload);
                for (a, b) in payload.messages().iter().zip(reparsed.messages()) {
                    proptest::prop_assert_eq!(intent(a), intent(b));
                }
            }
        }

        /// Generated `tools/call` messages with arbitrary (case-varied) keys: either refused, or
        /// read with exactly the arguments a case-folding, last-key-wins reader sees.
        #[test]
        fn accepted_calls_read_alike_for_case_folding_readers(
            keys in proptest::collection::vec("[aA][mM][oO]|[a-z]{1,3}", 0..5),
            values in proptest::collection::vec(0..1000i64, 5),
        ) {
            let members: Vec<String> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect();
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{{}}}}}}}"#,
                members.join(",")
            );
            if let Ok(Payload::Single(m)) = parse(body.as_bytes()) {
                let Ok(Intent::Decide { args: arguments, .. }) = intent(&m) else {
                    return Ok(());
                };
                let mut folded = std::collections::BTreeMap::new();
                for (k, v) in keys.iter().zip(&values) {
                    folded.insert(json::fold_key(k), *v);
                }
                let seen: std::collections::BTreeMap<String, i64> = arguments
                    .iter()
                    .map(|(k, v)| (json::fold_key(k), v.as_i64().unwrap()))
                    .collect();
                proptest::prop_assert_eq!(seen, folded);
            }
        }
    }

    #[test]
    fn tools_are_filtered() {
        let mut r = json!({"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"add"},{"name":"pay"},{"nameless":true}]}});
        assert!(is_listing(&r));
        assert_eq!(filter_listing(&mut r, &|n| n == Listed::Tool("add")), 2);
        assert_eq!(r["result"]["tools"], json!([{"name": "add"}]));
        let mut r = json!({"jsonrpc":"2.0","id":1,"result":{
            "resources":[{"uri":"a://1"},{"uri":"a://2"}],
            "resourceTemplates":[{"uriTemplate":"a://{x}"}],
            "prompts":[{"name":"greet"},{"name":"secret"}]}});
        let keep =
            |item: Listed<'_>| matches!(item, Listed::Resource("a://1") | Listed::Prompt("greet"));
        assert_eq!(filter_listing(&mut r, &keep), 3);
        assert_eq!(r["result"]["resources"], json!([{"uri": "a://1"}]));
        assert_eq!(r["result"]["prompts"], json!([{"name": "greet"}]));
        let mut r = json!({"jsonrpc":"2.0","id":1,"result":{"ttlMs": 3600000}});
        assert!(mark_private(&mut r));
        assert_eq!(
            r["result"],
            json!({"ttlMs": MAX_DECIDED_TTL_MS, "cacheScope": "private"})
        );
        assert!(!mark_private(
            &mut json!({"jsonrpc":"2.0","id":1,"error":{}})
        ));
    }
}
