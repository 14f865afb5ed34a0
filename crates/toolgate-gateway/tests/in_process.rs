//! The pipeline driven in-process: `Gateway::handle` takes the test's own request bodies, and the
//! config is built in Rust (`TestConfig`): no subprocess, no socket, no YAML edited as text.
//! Every case here is refused before anything would be forwarded (the upstream's port is
//! closed: a case that forwarded would answer 502 and fail).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use toolgate_credential::SigningKey;
use toolgate_gateway::config::Config;
use toolgate_gateway::Gateway;

const SCHEMA: &str = r#"namespace Toolgate {
  type Env = { source_ip: ipaddr, hour: Long, time: datetime };
  entity Upstream; entity Tool in [Upstream]; entity Agent; entity User;
  action call;
  action list appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env } };
  action "billing/get_invoice" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, args: { invoice_id: Long, expand?: Set<String> } } };
  action "billing/refund" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, args: { amount: Long, memo?: { to?: String } } } };
  action "pd/create_incident" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, args: { From: String, title: String } } };
  action "lab/measure" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, args: { duration: decimal, samples?: Set<decimal> } } };
  action "tools/send_mail" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, args: { to: Set<String> } } };
}"#;

const POLICIES: &str = r#"permit (principal, action in Toolgate::Action::"call", resource);"#;

/// A config built field by field, typed by the gateway's own `Config` when built.
struct TestConfig {
    value: Value,
}

impl TestConfig {
    /// A gateway whose inbound issuer is `idp`, with the given policy files written.
    fn new(dir: &Path, idp: &SigningKey, policies: &[(&str, &str)]) -> TestConfig {
        let policy_dir = dir.join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        for (name, text) in policies {
            std::fs::write(policy_dir.join(name), text).unwrap();
        }
        let jwks = dir.join("idp.jwks.json");
        std::fs::write(&jwks, json!({"keys": [idp.public_jwk()]}).to_string()).unwrap();
        let (_, signing_pem) = SigningKey::generate().unwrap();
        std::fs::write(dir.join("signing.pem"), signing_pem).unwrap();
        let value = json!({
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "issuer": "https://toolgate.test",
            "policies": policy_dir,
            "inbound": {"jwt": [{"issuer": "https://idp.test", "jwks_file": jwks, "audiences": ["toolgate"]}]},
            "credentials": {"signing_key": dir.join("signing.pem")},
            "audit": {"path": dir.join("audit.jsonl")},
            "upstreams": [],
        });
        TestConfig { value }
    }

    /// A REST upstream at a closed port, with `(tool, method, path)` routes.
    fn rest(self, name: &str, routes: &[(&str, &str, &str)]) -> TestConfig {
        let routes: Vec<Value> = routes
            .iter()
            .map(|(tool, method, path)| json!({"tool": tool, "method": method, "path": path}))
            .collect();
        self.upstream(
            json!({"name": name, "url": "http://127.0.0.1:1", "audience": name, "routes": routes}),
        )
    }

    /// An MCP upstream at a closed port.
    fn mcp(self, name: &str) -> TestConfig {
        self.upstream(
            json!({"name": name, "url": "http://127.0.0.1:1/mcp", "audience": name, "kind": "mcp"}),
        )
    }

    fn upstream(mut self, entry: Value) -> TestConfig {
        self.value["upstreams"].as_array_mut().unwrap().push(entry);
        self
    }

    async fn start(self) -> Arc<Gateway> {
        let config: Config = serde_json::from_value(self.value).expect("a valid config");
        config.check().expect("a config that passes its checks");
        Gateway::new(config, None)
            .await
            .expect("the gateway starts")
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("toolgate-in-process-{}", uuid()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uuid() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// alice's assistant, as the test IdP says.
fn token(idp: &SigningKey) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": "https://idp.test", "aud": "toolgate", "sub": "alice",
        "act": {"sub": "assistant"}, "iat": now, "exp": now + 300});
    idp.sign("JWT", &claims).unwrap()
}

/// Drives one request through `handle`; returns the status and the JSON answer.
async fn call(
    gw: &Arc<Gateway>,
    token: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let response = gw.clone().handle(request, peer).await;
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn what_no_policy_can_see_is_refused_before_anything_is_forwarded() {
    let dir = TempDir::new();
    let (idp, _) = SigningKey::generate().unwrap();
    let gw = TestConfig::new(
        &dir.0,
        &idp,
        &[("schema.cedarschema", SCHEMA), ("all.cedar", POLICIES)],
    )
    .rest(
        "billing",
        &[
            ("get_invoice", "GET", "/invoices/{invoice_id}"),
            ("refund", "POST", "/refunds"),
        ],
    )
    .upstream(json!({"name": "pd", "url": "http://127.0.0.1:1", "audience": "pd", "routes": [
        {"tool": "create_incident", "method": "POST", "path": "/incidents", "header_arguments": ["From"]}
    ]}))
    .mcp("tools")
    .start()
    .await;
    let token = token(&idp);
    let json = [("content-type", "application/json")];
    let mcp = [
        ("content-type", "application/json"),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let mail = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"send_mail","arguments":{"to":"[\"ceo@corp.example\"]"}}}"#;
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#;
    for (method, path, headers, body, status, error, argument) in [
        (
            "GET",
            "/billing/invoices/42?lines=1",
            &[][..],
            "",
            400,
            "undeclared_argument",
            "lines",
        ),
        (
            "GET",
            "/billing/invoices/x",
            &[],
            "",
            400,
            "invalid_argument",
            "invoice_id",
        ),
        (
            "GET",
            "/billing/invoices/1?expand=a,b",
            &[],
            "",
            400,
            "ambiguous_argument",
            "expand",
        ),
        (
            "POST",
            "/billing/refunds",
            &json,
            r#"{"amount":5,"memo":{"to":"bob","cc":"x"}}"#,
            400,
            "undeclared_argument",
            "memo.cc",
        ),
        (
            "POST",
            "/billing/refunds",
            &json,
            r#"{"amount":"5"}"#,
            400,
            "invalid_argument",
            "amount",
        ),
        (
            "POST",
            "/billing/refunds",
            &json,
            r#"{"amount":99999999999999999999}"#,
            400,
            "argument_not_representable",
            "amount",
        ),
        // A header argument comes from its header only (the upstream reads the header).
        (
            "POST",
            "/pd/incidents",
            &json,
            r#"{"From":"a@corp.example","title":"t"}"#,
            400,
            "bad_request",
            "",
        ),
    ] {
        let (got, answer) = call(&gw, &token, method, path, headers, body).await;
        assert_eq!(got.as_u16(), status, "{method} {path} {body}: {answer}");
        assert_eq!(
            answer["error"].as_str(),
            Some(error),
            "{method} {path} {body}"
        );
        let named = answer["argument"].as_str().unwrap_or_default();
        assert_eq!(named, argument, "{method} {path} {body}");
    }
    // MCP: JSON text where the tool takes a list is a tool error; a batch on 2025-11-25 is 400.
    let (status, answer) = call(&gw, &token, "POST", "/tools", &mcp, mail).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    assert_eq!(
        answer["result"]["structuredContent"],
        json!({"error": "ambiguous_argument", "argument": "to"})
    );
    let (status, answer) = call(&gw, &token, "POST", "/tools", &mcp, batch).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["code"], -32600);
}

/// A one-request upstream on a loopback port: answers `{}` and hands back the request's body.
async fn recorder() -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            seen.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&seen).to_string();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length || n == 0 {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                stream.write_all(answer).await.unwrap();
                return body.as_bytes().to_vec();
            }
        }
    });
    (addr, task)
}

#[tokio::test]
async fn numbers_reach_the_upstream_as_written_where_exactly_the_value_read() {
    let dir = TempDir::new();
    let (idp, _) = SigningKey::generate().unwrap();
    let (upstream, received) = recorder().await;
    let gw = TestConfig::new(
        &dir.0,
        &idp,
        &[("schema.cedarschema", SCHEMA), ("all.cedar", POLICIES)],
    )
    .upstream(
        json!({"name": "lab", "url": format!("http://{upstream}"), "audience": "lab", "routes": [
            {"tool": "measure", "method": "POST", "path": "/measurements"}
        ]}),
    )
    .start()
    .await;
    // No policy reads these decimals. A number goes as written where the text is exactly the
    // value read (`1.50`, `2e-7`); digits beyond a double go as the double the policy read.
    let body = r#"{"duration": 0.123456789012345678901, "samples": [1.50, 2e-7]}"#;
    let json = [("content-type", "application/json")];
    let (status, answer) = call(&gw, &token(&idp), "POST", "/lab/measurements", &json, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let forwarded = String::from_utf8(received.await.unwrap()).unwrap();
    assert_eq!(
        forwarded,
        r#"{"duration":0.12345678901234568,"samples":[1.50,2e-7]}"#
    );
}
