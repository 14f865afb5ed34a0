//! Hostile requests, table by table, one table per invariant of docs/security.md: each sent over
//! a raw TCP socket (HTTP/1.1) or an h2 client to a real `toolgate serve`, each asserting the
//! answer and what the recording upstream received: nothing, or exactly the canonical form.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MCP_SCHEMA: &str = r#"namespace Toolgate {
  action "tools/add" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { a: Long, b: Long } } };
  action "tools/pay" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { amount: Long } } };
  action "tools/transfer" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo,
      args: { amount?: Long, to_account?: String, memo?: { to?: String } } } };
}"#;
const MCP_POLICIES: &str = r#"
@id("mcp-add") permit (principal, action == Toolgate::Action::"tools/add", resource);
@id("mcp-pay-small") permit (principal, action == Toolgate::Action::"tools/pay", resource)
when { context.args.amount < 100 };
@id("mcp-transfer") permit (principal, action == Toolgate::Action::"tools/transfer", resource);
@id("mcp-transfer-limit") forbid (principal, action == Toolgate::Action::"tools/transfer", resource)
when { context.args has amount && context.args.amount >= 100 };
@id("mcp-transfer-mallory") forbid (principal, action == Toolgate::Action::"tools/transfer", resource)
when { context.args has memo && context.args.memo has to && context.args.memo.to == "mallory" };
"#;

async fn hostile_gateway(upstream: &Upstream) -> Gateway {
    Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[
            ("tools.cedarschema", MCP_SCHEMA),
            ("mcp.cedar", MCP_POLICIES),
        ],
        inbound: None,
        mcp: Some(format!("http://{}/mcp", upstream.addr)),
        extra_config: "",
    })
    .await
}

/// Sends raw bytes on a fresh connection; returns the status and the whole answer.
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the gateway answers and closes within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    (status, text)
}

/// An HTTP/1.1 request with the agent's token (when given), closing the connection after.
fn request(
    method: &str,
    target: &str,
    token: Option<&str>,
    headers: &[&str],
    body: &str,
) -> Vec<u8> {
    let mut text =
        format!("{method} {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n");
    if let Some(token) = token {
        text.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body);
    text.into_bytes()
}

/// What the upstream must have received for a case.
enum Upstream_ {
    Nothing,
    /// One request, checked.
    Exactly(fn(&Recorded)),
}
use Upstream_::{Exactly, Nothing};

struct Case {
    name: &'static str,
    method: &'static str,
    target: &'static str,
    headers: &'static [&'static str],
    body: &'static str,
    status: u16,
    upstream: Upstream_,
}

const JSON: &str = "Content-Type: application/json";

async fn run_table(gw: &Gateway, upstream: &Upstream, token: &str, cases: &[Case]) {
    for case in cases {
        let before = upstream.requests().len();
        let (status, answer) = raw(
            gw.addr,
            &request(
                case.method,
                case.target,
                Some(token),
                case.headers,
                case.body,
            ),
        )
        .await;
        assert_eq!(status, case.status, "{}: {answer}", case.name);
        let seen = upstream.requests()[before..].to_vec();
        match &case.upstream {
            Nothing => assert!(seen.is_empty(), "{}: forwarded {seen:?}", case.name),
            Exactly(check) => {
                assert_eq!(seen.len(), 1, "{}: {seen:?}", case.name);
                check(&seen[0]);
                assert!(
                    !seen[0]
                        .headers
                        .get("authorization")
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .contains(token),
                    "{}: the inbound token went upstream",
                    case.name
                );
            }
        }
    }
}

fn body_json(r: &Recorded) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// Invariant 1 for REST: bodies, queries and paths reach the upstream only in a form no parser
/// reads differently from the policy.
#[tokio::test]
async fn rest_arguments_are_forwarded_only_as_the_policy_read_them() {
    let upstream = Upstream::start().await;
    let gw = hostile_gateway(&upstream).await;
    let token = gw.idp.delegated();
    let refund = "/billing/refunds";
    let cases = [
        Case {
            name: "duplicate key, last one over the limit",
            method: "POST",
            target: refund,
            headers: &[JSON],
            body: r#"{"invoice_id":42,"amount":10,"amount":900}"#,
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "key differing in ASCII case",
            method: "POST",
            target: refund,
            headers: &[JSON],
            body: r#"{"invoice_id":42,"amount":10,"Amount":900}"#,
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "declared key wrapped in an undeclared object (Rails wrap_parameters)",
            method: "POST",
            target: refund,
            headers: &[JSON],
            body: r#"{"invoice_id":42,"amount":10,"refund":{"amount":900}}"#,
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "key differing by a long s (Go folds it)",
            method: "POST",
            target: refund,
            headers: &[JSON],
            body: "{\"invoice_id\":42,\"amount\":10,\"reason\":\"a\",\"rea\u{17f}on\":\"b\"}",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "duplicate key deeper down",
            method: "POST",
            target: refund,
            headers: &[JSON],
            body: r#"{"invoice_id":42,"amount":10,"meta":{"x":1,"x":2}}"#,
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "JSON sent as text/plain",
            method: "POST",
            target: refund,
            headers: &["Content-Type: text/plain"],
            body: r#"{"invoice_id":42,"amount":900}"#,
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "JSON without a content type",
            method: "POST",
            target: refund,
            headers: &[],
            body: r#"{"invoice_id":42,"amount":900}"#,
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "UTF-16 charset",
            method: "POST",
            target: refund,
            headers: &["Content-Type: application/json; charset=utf-16"],
            body: r#"{"invoice_id":42,"amount":10}"#,
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "encoded body",
            method: "POST",
            target: refund,
            headers: &[JSON, "Content-Encoding: gzip"],
            body: r#"{"invoice_id":42,"amount":10}"#,
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "form body",
            method: "POST",
            target: refund,
            headers: &["Content-Type: application/x-www-form-urlencoded"],
            body: "invoice_id=42&amount=900",
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "a JSON array",
            method: "POST",
            target: refund,
            headers: &[JSON],
            body: r#"[{"invoice_id":42,"amount":10}]"#,
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "method override in the body",
            method: "POST",
            target: refund,
            headers: &[JSON],
            body: r#"{"invoice_id":42,"amount":10,"_method":"DELETE"}"#,
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "body on a GET with arguments, not JSON",
            method: "GET",
            target: "/billing/invoices/42",
            headers: &["Content-Type: text/plain"],
            body: "invoice_id=43",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "allowed refund, re-serialised",
            method: "POST",
            target: refund,
            headers: &["Content-Type: application/json; charset=UTF-8"],
            body: "{ \"invoice_id\" : 42,\n \"amount\": 10 }",
            status: 200,
            upstream: Exactly(|r| {
                assert_eq!(r.body, r#"{"invoice_id":42,"amount":10}"#);
                assert_eq!(r.headers["content-type"], "application/json");
            }),
        },
        Case {
            name: "query key differing in case",
            method: "GET",
            target: "/billing/invoices?customer=a&Customer=b",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "bracketed query name beside a declared one",
            method: "GET",
            target: "/billing/invoices?customer[]=acme",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "PHP-mangled query name",
            method: "GET",
            target: "/billing/invoices?cus.tomer=a&cus_tomer=b",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "method override in the query",
            method: "GET",
            target: "/billing/invoices?_method=DELETE",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "inbound credential in the query",
            method: "GET",
            target: "/billing/invoices?access_token=x",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "query re-encoded: + and ; cannot be read two ways",
            method: "GET",
            target: "/billing/invoices?customer=a+b%3Bc;limit=5",
            headers: &[],
            body: "",
            status: 200,
            upstream: Exactly(|r| {
                assert_eq!(r.uri, "/api/invoices?customer=a%20b%3Bc%3Blimit%3D5")
            }),
        },
        Case {
            name: "encoded slash in a parameter",
            method: "GET",
            target: "/billing/invoices/42%2F..%2F43",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "NUL in a parameter",
            method: "GET",
            target: "/billing/invoices/4%002",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "dot segment",
            method: "GET",
            target: "/billing/invoices/%2e%2e",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "path re-encoded from its decoded segments",
            method: "GET",
            target: "/billing/invoices/%34%32",
            headers: &[],
            body: "",
            status: 200,
            upstream: Exactly(|r| assert_eq!(r.uri, "/api/invoices/42")),
        },
        Case {
            name: "JSON body on a route that reads the query (FastAPI Query(), Go URL.Query())",
            method: "GET",
            target: "/billing/invoices",
            headers: &[JSON],
            body: r#"{"customer":"acme"}"#,
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "a body argument sent in the query (Express req.body, Spring @RequestBody)",
            method: "POST",
            target: "/billing/refunds?amount=10",
            headers: &[JSON],
            body: r#"{"invoice_id":42}"#,
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "format suffix on a path parameter (Rails reads 42.json as 42)",
            method: "GET",
            target: "/billing/invoices/42.json",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "override under PHP's mangling (.method is _method)",
            method: "POST",
            target: "/billing/export?.method=DELETE",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "tool without arguments: multipart/mixed (Rack reads it as a form)",
            method: "POST",
            target: "/billing/export",
            headers: &["Content-Type: multipart/mixed"],
            body: "_method=DELETE",
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "tool without arguments: text/json (Laravel reads it as JSON)",
            method: "POST",
            target: "/billing/export",
            headers: &["Content-Type: text/json"],
            body: r#"{"_method":"DELETE"}"#,
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "Connection naming the Content-Type, which the agent then loses",
            method: "POST",
            target: refund,
            headers: &[JSON, "Connection: content-type"],
            body: r#"{"invoice_id":42,"amount":10}"#,
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "query name with a leading space (PHP drops it)",
            method: "GET",
            target: "/billing/invoices?%20customer=a",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "query name with a NUL (PHP cuts there)",
            method: "GET",
            target: "/billing/invoices?customer%00x=a",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "bracketed root (Rack 2 files it under customer)",
            method: "GET",
            target: "/billing/invoices?[customer]=a",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "dotted name beside its root (qs allowDots, Spring)",
            method: "GET",
            target: "/billing/invoices?limit=5&limit.x=500",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "path literal in another case (Express routes it as the literal)",
            method: "GET",
            target: "/billing/INVOICES/42",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "tool without arguments: a body without a Content-Type",
            method: "POST",
            target: "/billing/export",
            headers: &[],
            body: "_method=DELETE",
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "tool without arguments: a form behind a list of media types",
            method: "POST",
            target: "/billing/export",
            headers: &["Content-Type: application/x-www-form-urlencoded,x"],
            body: "_method=DELETE",
            status: 415,
            upstream: Nothing,
        },
        Case {
            name: "tool without arguments: an override in a JSON body (Laravel reads it)",
            method: "POST",
            target: "/billing/export",
            headers: &[JSON],
            body: r#"{"_method":"DELETE"}"#,
            status: 400,
            upstream: Nothing,
        },
        Case {
            name: "tool without arguments: an opaque body streams as sent",
            method: "POST",
            target: "/billing/export",
            headers: &["Content-Type: application/octet-stream"],
            body: "raw bytes",
            status: 200,
            upstream: Exactly(|r| {
                assert_eq!(r.body, "raw bytes");
                assert_eq!(r.headers["content-type"], "application/octet-stream");
            }),
        },
        Case {
            name: "path parameter conflicting with the query",
            method: "GET",
            target: "/billing/invoices/42?invoice_id=43",
            headers: &[],
            body: "",
            status: 400,
            upstream: Nothing,
        },
    ];
    run_table(&gw, &upstream, &token, &cases).await;
}

/// Invariants 1 and 2 for MCP: only the endpoint, only its methods, only strict JSON-RPC whose
/// transport headers say what the body says, forwarded as re-serialised.
#[tokio::test]
async fn mcp_messages_are_forwarded_only_at_the_endpoint_and_as_authorized() {
    let upstream = Upstream::start().await;
    let gw = hostile_gateway(&upstream).await;
    let token = gw.idp.delegated();
    let call = |name: &str, args: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}","arguments":{args}}}}}"#
        )
    };
    let small_pay = call("pay", r#"{"amount":5}"#);
    let cases = [
        Case { name: "a path beside the endpoint", method: "POST", target: "/tools/admin", headers: &[JSON],
            body: leak(small_pay.clone()), status: 404, upstream: Nothing },
        Case { name: "a dot segment under the endpoint", method: "POST", target: "/tools/%2e%2e/billing", headers: &[JSON],
            body: leak(small_pay.clone()), status: 404, upstream: Nothing },
        Case { name: "another method", method: "PUT", target: "/tools", headers: &[JSON],
            body: leak(small_pay.clone()), status: 405, upstream: Nothing },
        Case { name: "a query on the endpoint", method: "POST", target: "/tools?x=1", headers: &[JSON],
            body: leak(small_pay.clone()), status: 400, upstream: Nothing },
        Case { name: "duplicate method in the envelope", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"pay","arguments":{"amount":900}}}"#,
            status: 400, upstream: Nothing },
        Case { name: "name differing in case in params", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","Name":"pay","arguments":{"a":1,"b":2,"amount":900}}}"#,
            status: 400, upstream: Nothing },
        Case { name: "duplicate argument", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pay","arguments":{"amount":5,"amount":900}}}"#,
            status: 400, upstream: Nothing },
        Case { name: "argument differing by the Kelvin sign", method: "POST", target: "/tools", headers: &[JSON],
            body: "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2,\"k\":1,\"\u{212a}\":2}}}",
            status: 400, upstream: Nothing },
        Case { name: "a response whose Method a case-folding server would run", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"result":{},"Method":"tools/call","Params":{"name":"pay","arguments":{"amount":900}}}"#,
            status: 400, upstream: Nothing },
        Case { name: "Arguments spelled otherwise in params", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","Arguments":{"amount":900}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "an optional argument spelled otherwise", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"Amount":900}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "a nested argument spelled otherwise", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"memo":{"TO":"mallory"}}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "an argument differing only in separators (camelCase binders read it)", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"toAccount":"mallory"}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "an argument differing only in separators (kebab-case)", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"to-account":"mallory"}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "an undeclared object holding a declared argument (Rails wrap_parameters)", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"transfer":{"amount":900}}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "an undeclared object holding a declared argument spelled otherwise", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"to_account":"bob","transfer":{"toAccount":"mallory"}}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "an argument differing by punctuation a camelizer splits on (lodash: ~)", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"to_account":"bob","to~account":"mallory"}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "an argument differing by a no-break space (humps)", method: "POST", target: "/tools", headers: &[JSON],
            body: "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"transfer\",\"arguments\":{\"to\u{a0}account\":\"mallory\"}}}",
            status: 200, upstream: Nothing },
        Case { name: "a declared record holding a name declared beside it", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"memo":{"to":"bob","amount":5000}}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "an undeclared argument beside declared ones (FastAPI AliasChoices may bind it)", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"to_account":"bob","note":{"text":"rent"}}}}"#,
            status: 200, upstream: Nothing },
        Case { name: "allowed transfer to a declared account", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"to_account":"bob"}}}"#,
            status: 200, upstream: Exactly(|r| assert_eq!(body_json(r)["params"]["arguments"]["to_account"], "bob")) },
        Case { name: "a dotted name Go folds to `uri` (U+0130)", method: "POST", target: "/tools", headers: &[JSON],
            body: "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"resources/read\",\"params\":{\"uri\":\"file:///public/a\",\"ur\u{130}\":\"file:///secret\"}}",
            status: 400, upstream: Nothing },
        Case { name: "a resource uri a server would normalise (../)", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///public/../secret"}}"#,
            status: 200, upstream: Nothing },
        Case { name: "subscribing to a resource nobody may read", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"resources/subscribe","params":{"uri":"file:///etc/shadow"}}"#,
            status: 200, upstream: Nothing },
        Case { name: "allowed transfer, spelled as declared", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"transfer","arguments":{"amount":5,"memo":{"to":"bob"}}}}"#,
            status: 200, upstream: Exactly(|r| assert_eq!(body_json(r)["params"]["arguments"]["memo"]["to"], "bob")) },
        Case { name: "a tool call as a notification", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"pay","arguments":{"amount":900}}}"#,
            status: 400, upstream: Nothing },
        Case { name: "JSON-RPC as text/plain", method: "POST", target: "/tools", headers: &["Content-Type: text/plain"],
            body: leak(small_pay.clone()), status: 415, upstream: Nothing },
        Case { name: "Mcp-Method contradicting the body", method: "POST", target: "/tools",
            headers: &[JSON, "Mcp-Method: tools/list"], body: leak(small_pay.clone()), status: 400, upstream: Nothing },
        Case { name: "Mcp-Name contradicting the body", method: "POST", target: "/tools",
            headers: &[JSON, "Mcp-Method: tools/call", "Mcp-Name: add"], body: leak(small_pay.clone()), status: 400, upstream: Nothing },
        Case { name: "2026-07-28 without its transport headers", method: "POST", target: "/tools",
            headers: &[JSON, "MCP-Protocol-Version: 2026-07-28"], body: leak(small_pay.clone()), status: 400, upstream: Nothing },
        Case { name: "unknown method, answered as a server would", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tools/burn"}"#, status: 404, upstream: Nothing },
        Case { name: "a task handle the gateway never gave this caller", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"taskId":"t-1"}}"#, status: 200, upstream: Nothing },
        Case { name: "a task handle with a made-up binding", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tasks/cancel","params":{"taskId":"t-1.AAAAAAAAAAAAAAAAAAAAAA"}}"#, status: 200, upstream: Nothing },
        Case { name: "listing every task (no caller's own: refused)", method: "POST", target: "/tools", headers: &[JSON],
            body: r#"{"jsonrpc":"2.0","id":1,"method":"tasks/list"}"#, status: 404, upstream: Nothing },
        Case { name: "allowed call with matching headers, re-serialised", method: "POST", target: "/tools",
            headers: &[JSON, "MCP-Protocol-Version: 2026-07-28", "Mcp-Method: tools/call", "Mcp-Name: =?base64?cGF5?=", "Mcp-Param-Region: eu"],
            body: "{ \"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"tools/call\",\n  \"params\": { \"name\": \"pay\", \"arguments\": { \"amount\": 5 } } }",
            status: 200,
            upstream: Exactly(|r| {
                assert_eq!(r.uri, "/mcp");
                assert_eq!(r.body, r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pay","arguments":{"amount":5}}}"#);
                assert_eq!(r.headers["mcp-param-region"], "eu");
            }) },
        Case { name: "the endpoint with a trailing slash goes to the configured URL", method: "POST", target: "/tools/",
            headers: &[JSON], body: r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#, status: 200,
            upstream: Exactly(|r| assert_eq!(r.uri, "/mcp")) },
        Case { name: "server/discover passes with authentication", method: "POST", target: "/tools",
            headers: &[JSON, "MCP-Protocol-Version: 2026-07-28", "Mcp-Method: server/discover"],
            body: r#"{"jsonrpc":"2.0","id":3,"method":"server/discover","params":{}}"#, status: 200,
            upstream: Exactly(|r| assert_eq!(body_json(r)["method"], "server/discover")) },
        Case { name: "a session id the gateway did not give this caller is unknown", method: "DELETE", target: "/tools",
            headers: &["Mcp-Session-Id: s-1"], body: "", status: 404, upstream: Nothing },
        Case { name: "DELETE ends the session, without a body", method: "DELETE", target: "/tools",
            headers: &[], body: "", status: 200,
            upstream: Exactly(|r| { assert_eq!((r.method.as_str(), r.uri.as_str()), ("DELETE", "/mcp")); assert!(r.body.is_empty()); }) },
        Case { name: "GET opens the server's stream, without a body", method: "GET", target: "/tools",
            headers: &["Accept: text/event-stream"], body: "", status: 200,
            upstream: Exactly(|r| { assert_eq!((r.method.as_str(), r.uri.as_str()), ("GET", "/mcp")); assert!(r.body.is_empty()); }) },
    ];
    run_table(&gw, &upstream, &token, &cases).await;

    // A GET stream may replay earlier answers: listings and resource updates are filtered
    // there as on the POST that asked for them.
    let (status, answer) = raw(
        gw.addr,
        &request(
            "GET",
            "/tools",
            Some(&token),
            &[
                "Accept: text/event-stream",
                "Last-Event-ID: 3",
                "X-Test-Replay: 1",
            ],
            "",
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("list_changed"), "{answer}");
    assert!(!answer.contains("undeclared_tool"), "{answer}");
    assert!(!answer.contains("file:///secret"), "{answer}");

    // A `subscriptions/listen` stream loses the resource updates the caller could not read.
    let (status, answer) = raw(
        gw.addr,
        &request(
            "POST",
            "/tools",
            Some(&token),
            &[
                JSON,
                "Accept: application/json, text/event-stream",
                "X-Test-Replay: 1",
            ],
            r#"{"jsonrpc":"2.0","id":9,"method":"subscriptions/listen","params":{}}"#,
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("list_changed"), "{answer}");
    assert!(!answer.contains("file:///secret"), "{answer}");

    // The denied call is answered by the gateway; the allowed one is audited as allowed.
    let (status, answer) = raw(
        gw.addr,
        &request(
            "POST",
            "/tools",
            Some(&token),
            &[JSON],
            &call("pay", r#"{"amount":900}"#),
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("-32003"), "{answer}");
    let allowed = gw
        .audit_line(|l| l["action"] == "tools/pay" && l["decision"] == "allow")
        .await;
    assert!(allowed["jti"].is_string(), "{allowed}");
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Invariant 3: nothing from the agent changes the operation after the decision.
#[tokio::test]
async fn override_and_forwarding_headers_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let gw = hostile_gateway(&upstream).await;
    let token = gw.idp.delegated();
    let overrides: &[&str] = &[
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Method-Override: DELETE",
        "X-Original-URL: /records/patients/p-200/record",
        "X-Rewrite-URL: /records/patients/p-200/record",
        "X-Forwarded-For: 10.9.9.9",
        "X-Forwarded-Host: admin.internal",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Prefix: /admin",
        "X-Real-IP: 10.9.9.9",
        "Forwarded: for=10.9.9.9;host=admin.internal",
        "Cookie: session=agent",
        "Proxy-Authorization: Basic eDp5",
        // Read as X-HTTP-Method-Override and X-Forwarded-Host behind CGI-style header maps.
        "X_HTTP_METHOD_OVERRIDE: DELETE",
        "X_Forwarded_Host: admin.internal",
    ];
    let check = |r: &Recorded| {
        for name in [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x-original-url",
            "x-rewrite-url",
            "x-forwarded-host",
            "x-forwarded-prefix",
            "x-real-ip",
            "forwarded",
            "cookie",
            "proxy-authorization",
            "x_http_method_override",
            "x_forwarded_host",
        ] {
            assert!(!r.headers.contains_key(name), "{name} reached the upstream");
        }
        assert_eq!(r.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(r.headers["x-forwarded-proto"], "http");
    };
    let before = upstream.requests().len();
    let (status, answer) = raw(
        gw.addr,
        &request("GET", "/billing/invoices/42", Some(&token), overrides, ""),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = raw(
        gw.addr,
        &request(
            "POST",
            "/tools",
            Some(&token),
            &[&[JSON], overrides].concat(),
            r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let seen = upstream.requests()[before..].to_vec();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "GET", "the method override was not applied");
    seen.iter().for_each(check);

    // The same over HTTP/2.
    use bytes::Bytes;
    use http_body_util::Full;
    let h2 = http_client(true);
    let mut builder = http::Request::get(gw.url("/billing/invoices/42"))
        .header("authorization", format!("Bearer {token}"));
    for header in overrides {
        let (name, value) = header.split_once(": ").unwrap();
        builder = builder.header(name, value);
    }
    let response = h2
        .request(builder.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    check(upstream.requests().last().unwrap());
    // And an ambiguous body over HTTP/2 is refused like over HTTP/1.1.
    let response = h2
        .request(
            http::Request::post(gw.url("/billing/refunds"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"invoice_id":42,"amount":10,"AMOUNT":900}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = h2
        .request(
            http::Request::post(gw.url("/tools/extra"))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        upstream.requests().len(),
        before + 3,
        "only the allowed h2 call went through"
    );
}

/// Invariant 4: a second identity provider cannot pose as the first.
#[tokio::test]
async fn a_second_issuer_cannot_act_as_the_first() {
    let upstream = Upstream::start().await;
    let partner = Partner::new();
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: Some(partner.inbound(Some(("", "partner:")))),
        mcp: None,
        extra_config: "",
    })
    .await;
    let partner_token = |claims: Value| partner.sign(claims);
    // The same names as the first issuer's finance agent: a different principal.
    let impostor =
        partner_token(json!({"sub": "alice", "act": {"sub": "assistant"}, "patient_id": "p-100"}));
    let answer = get(&gw.url("/billing/invoices/42"), &impostor).await;
    assert_eq!(answer.status, 403);
    let line = gw.audit_line(|l| l["agent"] == "partner:assistant").await;
    assert_eq!(line["user"], "partner:alice");
    assert_eq!(line["iss"], "https://partner.test");
    // The first issuer cannot assert ids in the partner's namespace either.
    let squatter = gw
        .idp
        .sign(json!({"sub": "alice", "act": {"sub": "partner:assistant"}}));
    assert_eq!(
        get(&gw.url("/billing/invoices/42"), &squatter).await.status,
        401
    );
    // The first issuer's agent keeps its plain ids.
    assert_eq!(
        get(&gw.url("/billing/invoices/42"), &gw.idp.delegated())
            .await
            .status,
        200
    );
    let line = gw
        .audit_line(|l| l["agent"] == "assistant" && l["decision"] == "allow")
        .await;
    assert_eq!(line["iss"], IDP);
    assert_eq!(upstream.requests().len(), 1);
}

/// Invariant 5: tasks belong to their owner (agent and user).
#[tokio::test]
async fn other_agents_cannot_join_a_task() {
    let upstream = Upstream::start().await;
    let gw = hostile_gateway(&upstream).await;
    let owner = gw.idp.delegated();
    let started = send(
        "POST",
        &gw.url("/v1/tasks"),
        &[
            ("authorization", &format!("Bearer {owner}")),
            ("content-type", "application/json"),
        ],
        br#"{"intent": "read invoice 42", "ttl_seconds": 60}"#,
    )
    .await;
    assert_eq!(started.status, 201, "{:?}", started.body);
    let task = started.json()["task_id"].as_str().unwrap().to_string();
    let in_task = |token: String| {
        let url = gw.url("/billing/invoices/42");
        let task = task.clone();
        async move {
            send(
                "GET",
                &url,
                &[
                    ("authorization", &format!("Bearer {token}")),
                    ("toolgate-task", &task),
                ],
                b"",
            )
            .await
            .status
        }
    };
    let before = upstream.requests().len();
    // Another finance agent for the same user, and the same agent for another user.
    let other_agent = gw
        .idp
        .sign(json!({"sub": "alice", "act": {"sub": "auditor"}}));
    let other_user = gw
        .idp
        .sign(json!({"sub": "bob", "act": {"sub": "assistant"}, "patient_id": "p-200"}));
    assert_eq!(in_task(other_agent.clone()).await, 403);
    assert_eq!(in_task(other_user.clone()).await, 403);
    assert_eq!(
        upstream.requests().len(),
        before,
        "nothing forwarded for the intruders"
    );
    let line = gw.audit_line(|l| l["agent"] == "auditor").await;
    assert!(
        line["errors"].to_string().contains("belongs to another"),
        "{line}"
    );
    // Nor may they read or end it.
    let complete = send(
        "POST",
        &gw.url(&format!("/v1/tasks/{task}/complete")),
        &[("authorization", &format!("Bearer {other_user}"))],
        b"",
    )
    .await;
    assert_eq!(complete.status, 403);
    // The owner can.
    assert_eq!(in_task(owner.clone()).await, 200);
}

/// Invariant 6: the admin listener's operations need the admin token; without one configured
/// they are off.
#[tokio::test]
async fn admin_operations_need_the_admin_token() {
    let upstream = Upstream::start().await;
    let gw = hostile_gateway(&upstream).await;
    let cases: [(&str, &str, &[&str], &str, u16); 8] = [
        ("POST", "/admin/reload", &[], "", 401),
        (
            "POST",
            "/admin/reload",
            &["Authorization: Bearer wrong-token-0123456789"],
            "",
            401,
        ),
        (
            "POST",
            "/admin/reload",
            &["Authorization: Basic dGVzdDp0ZXN0"],
            "",
            401,
        ),
        ("GET", "/admin/tasks/x", &[], "", 401),
        ("GET", "/admin/revocations", &[], "", 401),
        (
            "POST",
            "/admin/tasks/x/approve",
            &["Content-Type: application/json"],
            r#"{"approver":"eve","actions":["*"]}"#,
            401,
        ),
        (
            "POST",
            "/admin/reload",
            &[
                "Authorization: Bearer test-admin-token-0123456789",
                "Content-Type: text/plain",
            ],
            "x",
            415,
        ),
        (
            "POST",
            "/admin/tasks/x/approve",
            &[
                "Authorization: Bearer test-admin-token-0123456789",
                "Content-Type: application/x-www-form-urlencoded",
            ],
            "approver=eve",
            415,
        ),
    ];
    for (method, path, headers, body, want) in cases {
        let (status, answer) = raw(gw.admin, &request(method, path, None, headers, body)).await;
        assert_eq!(status, want, "{method} {path} {headers:?}: {answer}");
    }
    assert_eq!(gw.admin("POST", "/admin/reload", b"").await.status, 200);
    for open in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            send("GET", &gw.admin_url(open), &[], b"").await.status,
            200,
            "{open}"
        );
    }
    let refused = gw
        .audit_line(|l| l["agent"] == "admin" && l["status"] == 401)
        .await;
    assert_eq!(refused["decision"], "deny");

    // A gateway without admin_token_file: its operations are disabled.
    let dir = &gw.dir.0;
    let config = std::fs::read_to_string(dir.join("toolgate.yaml"))
        .unwrap()
        .replace("admin_token_file: admin.token\n", "");
    std::fs::write(dir.join("no-admin.yaml"), config).unwrap();
    let (child, _, admin) = spawn_serve(&dir.join("no-admin.yaml")).await;
    let mut child = child;
    let (status, _) = raw(
        admin,
        &request(
            "POST",
            "/admin/reload",
            None,
            &["Authorization: Bearer test-admin-token-0123456789"],
            "",
        ),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        send("GET", &format!("http://{admin}/metrics"), &[], b"")
            .await
            .status,
        200
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Invariant 7: tokens that a JWT library would half-check are refused, and the Host header is
/// never reflected into a challenge.
#[tokio::test]
async fn half_checked_tokens_and_hostile_hosts_are_refused() {
    let upstream = Upstream::start().await;
    let gw = hostile_gateway(&upstream).await;
    let crit = {
        let header =
            json!({"alg": "ES256", "typ": "JWT", "kid": gw.idp.key.kid(), "crit": ["exp"]});
        gw.idp
            .key
            .sign_with_header(
                &header,
                &with_defaults(json!({"sub": "alice", "act": {"sub": "assistant"}})),
            )
            .unwrap()
    };
    let far = (now() + 3600).to_string();
    let tokens = [
        ("crit header", crit),
        (
            "exp as a string",
            gw.idp
                .sign(json!({"sub": "alice", "act": {"sub": "assistant"}, "exp": far})),
        ),
        (
            "nbf in the future as a string",
            gw.idp
                .sign(json!({"sub": "alice", "act": {"sub": "assistant"}, "nbf": far})),
        ),
        (
            "nbf as a fraction",
            gw.idp
                .sign(json!({"sub": "alice", "act": {"sub": "assistant"}, "nbf": 1.5})),
        ),
    ];
    for (name, token) in tokens {
        assert_eq!(
            get(&gw.url("/billing/invoices/42"), &token).await.status,
            401,
            "{name}"
        );
    }
    assert!(upstream.requests().is_empty());
    let (status, answer) = raw(
        gw.addr,
        b"GET /tools HTTP/1.1\r\nHost: evil\", error=\"x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401);
    let challenge = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("www-authenticate"))
        .unwrap();
    assert!(!challenge.contains("evil"), "{challenge}");
}

/// Invariant 8: every refusal, on every path, is counted: a 401 as unauthenticated (so a
/// scanner does not move the deny rate), any other as a denying decision.
#[tokio::test]
async fn every_refusal_moves_the_decision_metrics() {
    let upstream = Upstream::start().await;
    let gw = hostile_gateway(&upstream).await;
    let token = gw.idp.delegated();
    let counts = || async {
        let metrics = gw.metrics().await;
        let deny = metric(
            &metrics,
            "toolgate_authz_decisions_total{decision=\"deny\"}",
        );
        let unauthenticated = metric(&metrics, "toolgate_unauthenticated_total");
        (deny.unwrap_or(0.0), unauthenticated.unwrap_or(0.0))
    };
    let moved = |before: (f64, f64), after: (f64, f64), status: u16| {
        if status == 401 {
            after == (before.0, before.1 + 1.0)
        } else {
            after == (before.0 + 1.0, before.1)
        }
    };
    let refusals: Vec<Vec<u8>> = vec![
        request("GET", "/billing/invoices/42", None, &[], ""),
        request("GET", "/billing/nowhere", Some(&token), &[], ""),
        request(
            "POST",
            "/billing/refunds",
            Some(&token),
            &[JSON],
            r#"{"a":1,"a":2}"#,
        ),
        request("POST", "/tools", Some(&token), &[JSON], "{not json"),
        request(
            "POST",
            "/v1/tasks",
            Some(&token),
            &["Content-Type: text/plain"],
            "x",
        ),
        request("POST", "/oauth2/introspect", None, &[], ""),
    ];
    for (i, refusal) in refusals.iter().enumerate() {
        let before = counts().await;
        let (status, _) = raw(gw.addr, refusal).await;
        assert!(status >= 400, "case {i}");
        let after = counts().await;
        assert!(
            moved(before, after, status),
            "case {i} (status {status}): {before:?} → {after:?}"
        );
    }
    let before = counts().await;
    let (status, _) = raw(gw.admin, &request("POST", "/admin/reload", None, &[], "")).await;
    assert_eq!(status, 401);
    assert!(moved(before, counts().await, status), "admin refusal");
    assert!(upstream.requests().is_empty());
}
