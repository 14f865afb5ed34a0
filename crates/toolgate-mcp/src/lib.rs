//! MCP (JSON-RPC 2.0 over streamable HTTP) as toolgate needs it: parse and bound what agents
//! send, say what each message asks for, rewrite what servers answer. No I/O.
#![forbid(unsafe_code)]

pub mod json;
mod sse;

use serde_json::{json, Map, Value};

pub use sse::{rewrite_event_data, SseSplitter};

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
            for item in &items {
                check_message(item)?;
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
        if !(id.is_string() || id.is_i64() || id.is_u64()) {
            return Err(RpcError::new(
                code::INVALID_REQUEST,
                "id must be a string or an integer",
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
    /// `tools/call`: authorized as `<upstream>/<name>` with the arguments.
    CallTool {
        name: String,
        arguments: Map<String, Value>,
    },
    /// `tools/list`: forwarded; the answer is filtered.
    ListTools,
    /// `subscriptions/listen` (2026-07-28): forwarded; what it streams is filtered.
    Listen,
    /// `resources/read`, `prompts/get`: authorized as `<upstream>/<method>` with the params;
    /// `resources/subscribe` as the `resources/read` of its `uri`.
    Guarded {
        method: String,
        params: Map<String, Value>,
    },
    /// Authentication is enough: initialize, ping, notifications, listings, responses.
    Pass,
    /// A request method toolgate does not know: refused.
    Unknown(String),
}

/// Requests that need nothing beyond authentication.
const PASS_METHODS: [&str; 9] = [
    "initialize",
    "server/discover",
    "ping",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
    "completion/complete",
    "logging/setLevel",
    "resources/unsubscribe",
];

pub fn intent(message: &Value) -> Result<Intent, RpcError> {
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        return Ok(Intent::Pass);
    };
    // The params the gateway reads, exactly as spelled: a server that folds case would
    // otherwise take `Arguments` or `URI` the policy never saw.
    let params = |read: &[&str]| {
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
    Ok(match method {
        "tools/call" => {
            let params = params(&["name", "arguments"])?;
            let name = params
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| RpcError::new(code::INVALID_PARAMS, "tools/call needs a tool name"))?
                .to_string();
            let arguments = match params.get("arguments") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(a)) => a.clone(),
                Some(_) => {
                    return Err(RpcError::new(
                        code::INVALID_PARAMS,
                        "arguments must be an object",
                    ))
                }
            };
            Intent::CallTool { name, arguments }
        }
        "tools/list" => Intent::ListTools,
        "subscriptions/listen" => Intent::Listen,
        "resources/read" => Intent::Guarded {
            method: method.to_string(),
            params: normal_uri(params(&["uri"])?)?,
        },
        "prompts/get" => Intent::Guarded {
            method: method.to_string(),
            params: params(&["name", "arguments"])?,
        },
        // Watching a resource tells what changes in it: allowed to those who may read it.
        "resources/subscribe" => Intent::Guarded {
            method: "resources/read".to_string(),
            params: normal_uri(params(&["uri"])?)?,
        },
        m if PASS_METHODS.contains(&m) => Intent::Pass,
        other => Intent::Unknown(other.to_string()),
    })
}

/// A resource's `uri` must be an absolute URI already in its WHATWG normal form: servers that
/// parse it (the Python SDK's `AnyUrl`) would otherwise act on another one than the policy saw
/// (`file:///public/../secret` is `file:///secret`, `FILE:` is `file:`).
fn normal_uri(params: Map<String, Value>) -> Result<Map<String, Value>, RpcError> {
    let refuse = |why: String| Err(RpcError::new(code::INVALID_PARAMS, why));
    let Some(Value::String(uri)) = params.get("uri") else {
        return refuse("a resource uri (a string) is required".into());
    };
    match url::Url::parse(uri) {
        Ok(parsed) if parsed.as_str() == uri => Ok(params),
        Ok(parsed) => refuse(format!(
            "resource uri is not in normal form: send `{}`",
            parsed.as_str()
        )),
        Err(e) => refuse(format!("resource uri is not an absolute URI: {e}")),
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

/// Removes from a `tools/list` result every tool `keep` refuses. Returns how many were removed.
pub fn filter_tools(response: &mut Value, keep: &dyn Fn(&str) -> bool) -> usize {
    let Some(tools) = response
        .pointer_mut("/result/tools")
        .and_then(Value::as_array_mut)
    else {
        return 0;
    };
    let before = tools.len();
    tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(keep));
    before - tools.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_batch() {
        let single = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#;
        let Payload::Single(m) = parse(single).unwrap() else {
            panic!()
        };
        assert_eq!(
            intent(&m).unwrap(),
            Intent::CallTool {
                name: "add".into(),
                arguments: json!({"a": 1}).as_object().unwrap().clone()
            }
        );
        let batch = br#"[{"jsonrpc":"2.0","id":"a","method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#;
        assert_eq!(parse(batch).unwrap().messages().len(), 2);
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
        assert_eq!(
            m(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})),
            Intent::ListTools
        );
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
            Intent::Guarded { .. }
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
        assert!(intent(
            &json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","task":{}}})
        )
        .is_ok());
        for uri in [
            "file:///public/../secret",
            "file:///public/%2e%2e/secret",
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
        // Subscribing is reading.
        let m = json!({"jsonrpc":"2.0","id":1,"method":"resources/subscribe","params":{"uri":"file:///x"}});
        assert!(
            matches!(intent(&m).unwrap(), Intent::Guarded { method, .. } if method == "resources/read")
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
                let Ok(Intent::CallTool { arguments, .. }) = intent(&m) else {
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
        assert_eq!(filter_tools(&mut r, &|n| n == "add"), 2);
        assert_eq!(r["result"]["tools"], json!([{"name": "add"}]));
    }
}
