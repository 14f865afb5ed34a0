//! README promises that no other suite covers, each against a real `toolgate serve` (or the
//! binary's commands) and a recording upstream. docs/testing.md maps every promise to its test.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn auth(token: &str) -> String {
    format!("Bearer {token}")
}

/// The credential the upstream received last.
fn last_credential(upstream: &Upstream) -> String {
    let seen = upstream.requests();
    let header = seen.last().expect("a forwarded request").headers["authorization"]
        .to_str()
        .unwrap()
        .to_string();
    header.strip_prefix("Bearer ").unwrap().to_string()
}

/// Polls (bounded) until `check` holds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// "Tokens are never written to the audit log or to logs": neither the agent's token, nor a
/// refused token, nor a minted credential appears in the audit file or in stderr, even at
/// `RUST_LOG=trace`, on allowed, denied, refused and unauthenticated calls, HTTP/1.1 and h2.
#[tokio::test]
async fn tokens_never_reach_logs_or_the_audit() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let logs = TempDir::new("logs");
    let (mut child, addr, _) =
        spawn_serve_logging(&gw.dir.0.join("toolgate.yaml"), "trace", Some(&logs.0)).await;
    let base = format!("http://{addr}");
    let token = gw.idp.delegated();
    let stranger = toolgate_credential::SigningKey::generate()
        .unwrap()
        .0
        .sign("JWT", &with_defaults(json!({"sub": "mallory"})))
        .unwrap();

    let allowed = get(&format!("{base}/billing/invoices/1"), &token).await;
    assert_eq!(allowed.status, 200);
    let minted = last_credential(&upstream);
    let denied = send(
        "DELETE",
        &format!("{base}/records/patients/p-100/record"),
        &[("authorization", &auth(&token))],
        b"",
    )
    .await;
    assert_eq!(denied.status, 403);
    let refused = send(
        "POST",
        &format!("{base}/billing/refunds"),
        &[
            ("authorization", &auth(&token)),
            ("content-type", "application/json"),
        ],
        br#"{"invoice_id":1,"amount":1,"Amount":2}"#,
    )
    .await;
    assert_eq!(refused.status, 400);
    assert_eq!(
        get(&format!("{base}/billing/invoices/1"), &stranger)
            .await
            .status,
        401
    );
    let h2 = http_client(true);
    let response = h2
        .request(
            http::Request::get(format!("{base}/billing/invoices/2"))
                .header("authorization", auth(&token))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let minted_h2 = last_credential(&upstream);

    gw.audit(5).await;
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(logs.0.join("stderr.log")).unwrap();
    assert!(!stderr.is_empty(), "trace logging wrote something");
    let audit = std::fs::read_to_string(&gw.audit_path).unwrap();
    for (what, secret) in [
        ("the agent's token", &token),
        ("a refused token", &stranger),
        ("a minted credential", &minted),
        ("a minted credential (h2)", &minted_h2),
    ] {
        // The signature alone is enough to find any copy of it, whole or in part.
        let signature = secret.rsplit('.').next().unwrap();
        assert!(!stderr.contains(signature), "{what} in the logs");
        assert!(!audit.contains(signature), "{what} in the audit");
    }
}

async fn gateway(upstream: &Upstream) -> Gateway {
    gateway_with(upstream, &[], "").await
}

async fn gateway_with(upstream: &Upstream, policies: &[(&str, &str)], config: &str) -> Gateway {
    Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: policies,
        inbound: None,
        mcp: None,
        extra_config: config,
    })
    .await
}

/// Unknown config keys, anywhere, and values out of their documented range are refused with a
/// message that names them.
#[tokio::test]
async fn config_errors_are_refused_by_name() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let config = gw.dir.0.join("toolgate.yaml");
    assert!(toolgate(&["check", "--config", config.to_str().unwrap()])
        .status
        .success());
    for (name, edit, mentioning) in [
        (
            "unknown top-level key",
            &(|t: String| format!("{t}listen_backlog: 5\n")) as &dyn Fn(String) -> String,
            "listen_backlog",
        ),
        (
            "unknown key in an upstream",
            &|t: String| {
                t.replace(
                    "    timeout_seconds: 30\n",
                    "    timeout_seconds: 30\n    retries: 3\n",
                )
            },
            "retries",
        ),
        (
            "unknown key in a route",
            &|t: String| t.replace("path: /refunds }", "path: /refunds, cache: true }"),
            "cache",
        ),
        (
            "ttl_seconds 0",
            &|t: String| t.replace("ttl_seconds: 60", "ttl_seconds: 0"),
            "ttl_seconds",
        ),
        (
            "ttl_seconds 3601",
            &|t: String| t.replace("ttl_seconds: 60", "ttl_seconds: 3601"),
            "ttl_seconds",
        ),
        (
            "jwks_refetch_seconds 0",
            &|t: String| {
                t.replace(
                    "      audiences: [",
                    "      jwks_refetch_seconds: 0\n      audiences: [",
                )
            },
            "jwks_refetch_seconds",
        ),
        (
            "audit.buffer smaller than a batch",
            &|t: String| {
                t.replace(
                    "  path: audit.jsonl\n",
                    "  path: audit.jsonl\n  buffer: 64\n",
                )
            },
            "audit.buffer",
        ),
        (
            "arguments neither query nor body",
            &|t: String| t.replace("path: /refunds }", "path: /refunds, arguments: header }"),
            "arguments",
        ),
    ] {
        let bad = gw.edited_config("bad.yaml", edit);
        let out = toolgate(&["check", "--config", bad.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(stderr.contains(mentioning), "{name}: {stderr}");
    }
}

/// `previous_keys`: after a rotation (new `signing_key`, the old one under `previous_keys`,
/// restart), the JWKS serves both keys and a credential signed before still introspects
/// active, while new credentials are signed with the new key.
#[tokio::test]
async fn previous_keys_keep_earlier_credentials_verifying_after_rotation() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let token = gw.idp.delegated();
    assert_eq!(
        get(&gw.url("/billing/invoices/1"), &token).await.status,
        200
    );
    let before = last_credential(&upstream);
    let old_kid = header_kid(&before);

    let (_, new_pem) = toolgate_credential::SigningKey::generate().unwrap();
    std::fs::write(gw.dir.0.join("signing-new.pem"), new_pem).unwrap();
    let rotated = gw.edited_config("rotated.yaml", |t| {
        t.replace(
            "  signing_key: signing.pem\n",
            "  signing_key: signing-new.pem\n  previous_keys: [signing.pem]\n",
        )
    });
    let (mut child, addr, _) = spawn_serve(&rotated).await;
    let base = format!("http://{addr}");
    let jwks = send("GET", &format!("{base}/.well-known/jwks.json"), &[], b"")
        .await
        .json();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(
        kids.contains(&old_kid.as_str()) && kids.len() == 2,
        "{jwks}"
    );
    let introspected = introspect(&base, &token, &before).await;
    assert_eq!(introspected["active"], true, "{introspected}");
    assert_eq!(
        get(&format!("{base}/billing/invoices/1"), &token)
            .await
            .status,
        200
    );
    let after = last_credential(&upstream);
    assert_ne!(
        header_kid(&after),
        old_kid,
        "new credentials use the new key"
    );
    assert!(kids.contains(&header_kid(&after).as_str()));
    let _ = child.kill();
    let _ = child.wait();
}

fn header_kid(jwt: &str) -> String {
    use base64::Engine as _;
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_string()
}

async fn introspect(base: &str, token: &str, credential: &str) -> Value {
    send(
        "POST",
        &format!("{base}/oauth2/introspect"),
        &[
            ("authorization", &auth(token)),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        format!("token={credential}").as_bytes(),
    )
    .await
    .json()
}

/// `public_url` is the base of the RFC 9728 metadata and of the 401's `resource_metadata`,
/// whatever `Host` the request carries.
#[tokio::test]
async fn public_url_names_the_protected_resource() {
    let upstream = Upstream::start().await;
    let gw = gateway_with(&upstream, &[], "public_url: https://gw.example\n").await;
    let unauthenticated = send(
        "GET",
        &gw.url("/billing/invoices/1"),
        &[("host", "evil.example")],
        b"",
    )
    .await;
    assert_eq!(unauthenticated.status, 401);
    let challenge = unauthenticated.headers["www-authenticate"]
        .to_str()
        .unwrap();
    assert!(
        challenge.contains(
            "resource_metadata=\"https://gw.example/.well-known/oauth-protected-resource/billing\""
        ),
        "{challenge}"
    );
    let metadata = send(
        "GET",
        &gw.url("/.well-known/oauth-protected-resource/billing"),
        &[("host", "evil.example")],
        b"",
    )
    .await;
    assert_eq!(metadata.status, 200);
    assert_eq!(metadata.json()["resource"], "https://gw.example/billing");
}

/// With `reload.watch` (the default), a new IdP key in the JWKS file and a new route in the
/// config file take effect without a signal.
#[tokio::test]
async fn jwks_and_config_files_are_watched() {
    let upstream = Upstream::start().await;
    let gw = gateway_with(&upstream, &[], "reload:\n  debounce_ms: 100\n").await;

    let url = gw.url("/billing/invoices/1");
    let fresh = gw.idp.add_key();
    eventually("the new IdP key", async || {
        get(&url, &fresh).await.status == 200
    })
    .await;

    let token = gw.idp.delegated();
    let bills = gw.url("/billing/bills/7");
    assert_eq!(get(&bills, &token).await.status, 404);
    let config = gw.dir.0.join("toolgate.yaml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "      - { tool: list_invoices, method: GET, path: /invoices }\n",
        "      - { tool: list_invoices, method: GET, path: /invoices }\n      - { tool: get_invoice, method: GET, path: \"/bills/{invoice_id}\" }\n",
    );
    std::fs::write(&config, text).unwrap();
    eventually("the new route", async || {
        get(&bills, &token).await.status == 200
    })
    .await;
    assert_eq!(upstream.requests().last().unwrap().uri, "/api/bills/7");
}

/// `context.env` holds the caller's address, the time and its UTC hour.
#[tokio::test]
async fn policies_see_the_environment() {
    let upstream = Upstream::start().await;
    let policies = r#"
@id("env-now") permit (principal, action == Toolgate::Action::"records/delete_patient_record", resource)
when { context.env.source_ip.isLoopback() && context.env.time > datetime("2026-01-01T00:00:00Z")
       && context.env.hour >= 0 && context.env.hour <= 23 };
@id("env-range") forbid (principal, action == Toolgate::Action::"billing/list_invoices", resource)
when { context.env.source_ip.isInRange(ip("127.0.0.0/8")) };
"#;
    let gw = gateway_with(&upstream, &[("env.cedar", policies)], "").await;
    let token = gw.idp.delegated();
    let deleted = send(
        "DELETE",
        &gw.url("/records/patients/p-100/record"),
        &[("authorization", &auth(&token))],
        b"",
    )
    .await;
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    let listed = get(&gw.url("/billing/invoices"), &token).await;
    assert_eq!(listed.status, 403);
    let decision = listed.json()["decision_id"].clone();
    let line = gw.audit_line(|l| l["decision_id"] == decision).await;
    assert_eq!(line["policies"], json!(["env-range"]), "{line}");
    // And the hour is the current UTC hour (read on both sides of the call).
    let hour = || {
        chrono::Utc::now()
            .format("%H")
            .to_string()
            .parse::<u32>()
            .unwrap()
    };
    let before = hour();
    let at_hour = format!(
        "@id(\"env-hour\") permit (principal, action == Toolgate::Action::\"billing/refund\", resource) when {{ context.env.hour == {before} }};"
    );
    std::fs::write(gw.dir.0.join("policies/hour.cedar"), at_hour).unwrap();
    assert_eq!(gw.admin("POST", "/admin/reload", b"").await.status, 200);
    let refund = send(
        "POST",
        &gw.url("/billing/refunds"),
        &[
            ("authorization", &auth(&token)),
            ("content-type", "application/json"),
        ],
        br#"{"invoice_id": 1, "amount": 10}"#,
    )
    .await;
    let decision = refund.json()["decision_id"].clone();
    if hour() == before {
        assert_eq!(refund.status, 200);
        let line = gw.audit_line(|l| l["action"] == "billing/refund").await;
        assert!(
            line["policies"]
                .as_array()
                .unwrap()
                .contains(&json!("env-hour")),
            "{line}"
        );
    } else {
        let _ = decision; // the hour turned during the call: nothing to conclude
    }
}

/// `entities.json` attributes win over the token's claims of the same name.
#[tokio::test]
async fn entities_json_wins_over_claims() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let token = gw.idp.delegated(); // claims patient_id p-100
    let record = |p: &str| gw.url(&format!("/records/patients/{p}/record"));
    assert_eq!(get(&record("p-100"), &token).await.status, 200);
    let path = gw.dir.0.join("policies/entities.json");
    let mut entities: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    entities.as_array_mut().unwrap().push(json!({
        "uid": {"type": "Toolgate::User", "id": "alice"},
        "attrs": {"patient_id": "p-200"},
        "parents": []
    }));
    std::fs::write(&path, entities.to_string()).unwrap();
    assert_eq!(gw.admin("POST", "/admin/reload", b"").await.status, 200);
    assert_eq!(get(&record("p-200"), &token).await.status, 200);
    assert_eq!(get(&record("p-100"), &token).await.status, 403);
}

const MCP_SCHEMA: &str = r#"namespace Toolgate {
  action "tools/resources/read" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { uri: String } } };
  action "tools/prompts/get" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { name: String } } };
  action "tools/add" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { a?: Long } } };
}"#;
const MCP_POLICIES: &str = r#"
@id("public-files") permit (principal, action == Toolgate::Action::"tools/resources/read", resource)
when { context.args.uri like "file:///public/*" };
@id("greeting-only") permit (principal, action == Toolgate::Action::"tools/prompts/get", resource)
when { context.args.name == "greeting" };
@id("add") permit (principal, action == Toolgate::Action::"tools/add", resource);
@id("list-add") permit (principal, action == Toolgate::Action::"list", resource == Toolgate::Tool::"tools/add");
"#;

async fn mcp_gateway(upstream: &Upstream) -> Gateway {
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

async fn rpc(gw: &Gateway, token: &str, body: &str) -> Answer {
    send(
        "POST",
        &gw.url("/tools"),
        &[
            ("authorization", &auth(token)),
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ],
        body.as_bytes(),
    )
    .await
}

/// `resources/read` and `prompts/get` are decided like tool calls, on their params.
#[tokio::test]
async fn resource_reads_and_prompts_are_authorized() {
    let upstream = Upstream::start().await;
    let gw = mcp_gateway(&upstream).await;
    let token = gw.idp.delegated();
    for (message, allowed) in [
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///public/a.txt"}}"#,
            true,
        ),
        (
            r#"{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///secret/a.txt"}}"#,
            false,
        ),
        (
            r#"{"jsonrpc":"2.0","id":3,"method":"prompts/get","params":{"name":"greeting"}}"#,
            true,
        ),
        (
            r#"{"jsonrpc":"2.0","id":4,"method":"prompts/get","params":{"name":"exfiltrate"}}"#,
            false,
        ),
    ] {
        let before = upstream.requests().len();
        let answer = rpc(&gw, &token, message).await;
        assert_eq!(answer.status, 200, "{message}");
        let forwarded = upstream.requests().len() - before;
        if allowed {
            assert_eq!(forwarded, 1, "{message}");
            assert!(answer.json()["result"].is_object(), "{message}");
        } else {
            assert_eq!(forwarded, 0, "{message}");
            assert_eq!(answer.json()["error"]["code"], -32003, "{message}");
        }
    }
}

/// Batches of 64 messages and nesting of 32 levels pass; 65 and 33 are refused (400).
#[tokio::test]
async fn batch_and_depth_limits_hold_at_their_exact_bounds() {
    let upstream = Upstream::start().await;
    let gw = mcp_gateway(&upstream).await;
    let token = gw.idp.delegated();
    let batch = |n: usize| {
        let messages: Vec<Value> = (0..n)
            .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "ping"}))
            .collect();
        Value::Array(messages).to_string()
    };
    let full = rpc(&gw, &token, &batch(64)).await;
    assert_eq!(full.status, 200);
    assert_eq!(full.json().as_array().unwrap().len(), 64);
    let over = rpc(&gw, &token, &batch(65)).await;
    assert_eq!(over.status, 400);
    assert_eq!(over.json()["error"]["code"], -32600);

    // Message (1), params (2), `_meta` (3), then `levels - 3` arrays around a number.
    let nested = |levels: usize| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"add","arguments":{{"a":1}},"_meta":{{"x":{}1{}}}}}}}"#,
            "[".repeat(levels - 3),
            "]".repeat(levels - 3)
        )
    };
    let before = upstream.requests().len();
    let deepest = rpc(&gw, &token, &nested(32)).await;
    assert_eq!(deepest.status, 200, "{:?}", deepest.body);
    assert_eq!(
        upstream.requests().len(),
        before + 1,
        "32 levels are forwarded"
    );
    let deeper = rpc(&gw, &token, &nested(33)).await;
    assert_eq!(deeper.status, 400);
    assert_eq!(upstream.requests().len(), before + 1);
}

/// A `tools/list` answer (JSON) loses the tools the schema does not declare and the tools the
/// caller may not `list`.
#[tokio::test]
async fn listings_keep_only_declared_tools_the_caller_may_list() {
    let upstream = Upstream::start().await;
    let gw = mcp_gateway(&upstream).await;
    let token = gw.idp.delegated();
    // The recorder lists add, pay and admin_reset; only add is declared here, and listed.
    let list = rpc(
        &gw,
        &token,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    )
    .await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["result"]["tools"], json!([{"name": "add"}]));
}

/// Task endpoints: the owner cancels its task; the admin listener reads, completes and
/// cancels any task; an ended task cannot end again.
#[tokio::test]
async fn tasks_cancel_and_admin_task_endpoints() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let token = gw.idp.delegated();
    let start = async || {
        let answer = send(
            "POST",
            &gw.url("/v1/tasks"),
            &[
                ("authorization", &auth(&token)),
                ("content-type", "application/json"),
            ],
            br#"{"intent": "refund invoice 42", "ttl_seconds": 300}"#,
        )
        .await;
        assert_eq!(answer.status, 201);
        answer.json()["task_id"].as_str().unwrap().to_string()
    };
    let in_task = async |task: &str| {
        send(
            "GET",
            &gw.url("/billing/invoices/1"),
            &[("authorization", &auth(&token)), ("toolgate-task", task)],
            b"",
        )
        .await
        .status
    };

    // The owner cancels.
    let cancelled = start().await;
    assert_eq!(in_task(&cancelled).await, 200);
    let answer = send(
        "POST",
        &gw.url(&format!("/v1/tasks/{cancelled}/cancel")),
        &[("authorization", &auth(&token))],
        b"",
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["revoked"], 1);
    assert_eq!(in_task(&cancelled).await, 403);
    let state = send(
        "GET",
        &gw.url(&format!("/v1/tasks/{cancelled}")),
        &[("authorization", &auth(&token))],
        b"",
    )
    .await;
    assert_eq!(state.json()["state"], "cancelled");

    // The admin listener completes one, cancels another, and reads both.
    for (verb, state) in [("complete", "completed"), ("cancel", "cancelled")] {
        let task = start().await;
        assert_eq!(in_task(&task).await, 200);
        let ended = gw
            .admin("POST", &format!("/admin/tasks/{task}/{verb}"), b"")
            .await;
        assert_eq!(ended.status, 200, "{verb}: {:?}", ended.body);
        assert_eq!(ended.json()["revoked"], 1);
        assert_eq!(in_task(&task).await, 403);
        let read = gw.admin("GET", &format!("/admin/tasks/{task}"), b"").await;
        assert_eq!(read.json()["state"], state);
        let again = gw
            .admin("POST", &format!("/admin/tasks/{task}/{verb}"), b"")
            .await;
        assert_eq!(again.status, 409, "{verb} twice");
    }
    let unknown = gw.admin("GET", "/admin/tasks/no-such-task", b"").await;
    assert_eq!(unknown.status, 404);
}

/// `require_task: true` on an upstream refuses every call to it outside a task.
#[tokio::test]
async fn require_task_on_an_upstream() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let config = gw.edited_config("in-tasks.yaml", |t| {
        t.replace(
            "    audience: https://records.internal\n",
            "    audience: https://records.internal\n    require_task: true\n",
        )
    });
    let (mut child, addr, _) = spawn_serve(&config).await;
    let base = format!("http://{addr}");
    let token = gw.idp.delegated();
    let outside = get(&format!("{base}/records/patients/p-100/record"), &token).await;
    assert_eq!(outside.status, 403);
    let decision = outside.json()["decision_id"].clone();
    gw.audit_line(|l| {
        l["decision_id"] == decision && l["errors"][0] == "this tool is only called inside a task"
    })
    .await;
    let task = send(
        "POST",
        &format!("{base}/v1/tasks"),
        &[
            ("authorization", &auth(&token)),
            ("content-type", "application/json"),
        ],
        br#"{"intent": "read my record", "ttl_seconds": 60}"#,
    )
    .await
    .json()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let inside = send(
        "GET",
        &format!("{base}/records/patients/p-100/record"),
        &[("authorization", &auth(&token)), ("toolgate-task", &task)],
        b"",
    )
    .await;
    assert_eq!(inside.status, 200);
    // The other upstream is not affected.
    assert_eq!(
        get(&format!("{base}/billing/invoices/1"), &token)
            .await
            .status,
        200
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The revocation feed and introspection need an authenticated caller.
#[tokio::test]
async fn the_revocation_feed_refuses_unauthenticated_callers() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let anonymous = send("GET", &gw.url("/v1/revocations"), &[], b"").await;
    assert_eq!(anonymous.status, 401);
    let forged = send(
        "GET",
        &gw.url("/v1/revocations"),
        &[("authorization", "Bearer not.a.token")],
        b"",
    )
    .await;
    assert_eq!(forged.status, 401);
}

/// `audit.path: "-"` writes the audit lines to stdout.
#[tokio::test]
async fn audit_to_stdout() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let config = gw.edited_config("stdout.yaml", |t| {
        t.replace("  path: audit.jsonl\n", "  path: \"-\"\n")
    });
    let out = TempDir::new("stdout");
    let (mut child, addr, _) = spawn_serve_logging(&config, "warn", Some(&out.0)).await;
    let token = gw.idp.delegated();
    let answer = get(&format!("http://{addr}/billing/invoices/1"), &token).await;
    assert_eq!(answer.status, 200);
    let stdout = out.0.join("stdout.log");
    eventually("the audit line on stdout", async || {
        std::fs::read_to_string(&stdout)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| l["action"] == "billing/get_invoice" && l["decision"] == "allow")
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

/// `toolgate demo` starts, and the curl lines it prints give the outcomes the README's tour
/// table promises, run as printed (with curl's status code added).
#[tokio::test]
async fn the_demo_does_what_its_tour_says() {
    // `--keep`: its config, keys and policies are written there and left after it stops.
    let kept = TempDir::new("demo-keep");
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--keep",
        ])
        .arg(&kept.0)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the demo");
    let stdout = demo.stdout.take().unwrap();
    let (tour_tx, tour_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tour = Vec::new();
        let mut lines = std::io::BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            let last = line.contains("/admin/reload") && line.contains("401");
            tour.push(line);
            if last {
                break;
            }
        }
        let _ = tour_tx.send(tour);
        for _ in lines {} // keep draining: the demo audits to stdout
    });
    let tour = tokio::time::timeout(Duration::from_secs(30), tour_rx)
        .await
        .expect("the demo printed its tour")
        .unwrap();
    let mut demo = Killed(demo);
    let export = |name: &str| {
        tour.iter()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .unwrap_or_else(|| panic!("no {name} in the tour"))
            .to_string()
    };
    let (token, admin_token) = (export("TOKEN"), export("ADMIN_TOKEN"));
    let curl_lines: Vec<&String> = tour.iter().filter(|l| l.starts_with("curl ")).collect();
    // As printed, in order: the README's table, then metrics and the admin listener.
    let expected = [
        ("/billing/invoices/42", "200"),
        ("-X DELETE", "403"),
        ("/billing/refunds", "403"),
        ("/records/patients/p-100/record", "200"),
        ("/records/patients/p-200/record", "403"),
        ("curl -s -i ", "401"),
        ("/metrics", "200"),
    ];
    let run = |script: &str| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .env("TOKEN", &token)
            .env("ADMIN_TOKEN", &admin_token)
            .output()
            .expect("bash and curl (scripts/test-deps.sh installs curl)");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    for (line, (mentions, status)) in curl_lines.iter().zip(expected) {
        assert!(line.contains(mentions), "{line} (expected {mentions})");
        // `| grep` and comments stay out: the status is curl's own.
        let command = line
            .split(" | ")
            .next()
            .unwrap()
            .split("  #")
            .next()
            .unwrap();
        let code = run(&format!("{command} -o /dev/null -w '%{{http_code}}'"));
        assert_eq!(code, status, "{command}");
    }
    // The task block, as printed: the last call, after `complete`, is refused.
    let task_block: Vec<&str> = tour
        .iter()
        .skip_while(|l| !l.starts_with("TASK=$(curl"))
        .take(4)
        .map(String::as_str)
        .collect();
    assert_eq!(task_block.len(), 4, "{tour:?}");
    let script = format!(
        "{}\n{}\n{}\n{} -o /dev/null -w '%{{http_code}}'",
        task_block[0],
        task_block[1].to_string() + " -o /dev/null",
        task_block[2].to_string() + " -o /dev/null",
        task_block[3].split("  #").next().unwrap()
    );
    assert_eq!(run(&script), "403", "{script}");
    // The admin operations: with the printed admin token, and without.
    let admin: Vec<&&String> = curl_lines
        .iter()
        .filter(|l| l.contains("/admin/reload"))
        .collect();
    assert_eq!(admin.len(), 2);
    for (line, status) in admin.iter().zip(["200", "401"]) {
        let command = line.split("  #").next().unwrap();
        assert_eq!(
            run(&format!("{command} -o /dev/null -w '%{{http_code}}'")),
            status,
            "{line}"
        );
    }
    demo.terminate_and_wait().await;
    for kept_file in ["toolgate.yaml", "idp.pem", "policies/schema.cedarschema"] {
        assert!(kept.0.join(kept_file).exists(), "{kept_file} kept");
    }
}

/// `share_with` lets named agents join a task for the same user only; an approval recorded
/// on the task is the owner's (others' calls do not inherit it), and policies read who gave it
/// (`context.task.approved_by`).
#[tokio::test]
async fn shared_tasks_and_approvals() {
    let upstream = Upstream::start().await;
    let only_bob = r#"
@id("refunds-need-bob") forbid (principal, action == Toolgate::Action::"billing/refund", resource)
when { context has task && !(context.task has approved_by && context.task.approved_by == "bob@example.com") };
"#;
    let gw = gateway_with(&upstream, &[("approvals.cedar", only_bob)], "").await;
    // Two more finance agents.
    let path = gw.dir.0.join("policies/entities.json");
    let mut entities: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for agent in ["helper", "auditor"] {
        entities.as_array_mut().unwrap().push(json!({
            "uid": {"type": "Toolgate::Agent", "id": agent},
            "attrs": {},
            "parents": [{"type": "Toolgate::Team", "id": "finance-agents"}]
        }));
    }
    std::fs::write(&path, entities.to_string()).unwrap();
    assert_eq!(gw.admin("POST", "/admin/reload", b"").await.status, 200);
    let owner = gw.idp.delegated();
    let as_agent =
        |agent: &str, user: &str| gw.idp.sign(json!({"sub": user, "act": {"sub": agent}}));
    let start = async |share: Value| {
        let body = json!({"intent": "refund invoice 42", "ttl_seconds": 300, "share_with": share});
        let answer = send(
            "POST",
            &gw.url("/v1/tasks"),
            &[
                ("authorization", &auth(&owner)),
                ("content-type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(answer.status, 201, "{:?}", answer.body);
        answer.json()["task_id"].as_str().unwrap().to_string()
    };
    let call = async |token: &str, task: &str, path: &str, body: &[u8]| {
        let method = if body.is_empty() { "GET" } else { "POST" };
        send(
            method,
            &gw.url(path),
            &[
                ("authorization", &auth(token)),
                ("toolgate-task", task),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
        .status
    };
    let read = "/billing/invoices/1";

    let task = start(json!(["helper"])).await;
    assert_eq!(
        call(&as_agent("helper", "alice"), &task, read, b"").await,
        200
    );
    assert_eq!(
        claims_of(&last_credential(&upstream))["task_id"],
        task.as_str()
    );
    assert_eq!(
        call(&as_agent("helper", "bob"), &task, read, b"").await,
        403,
        "another user"
    );
    assert_eq!(
        call(&as_agent("auditor", "alice"), &task, read, b"").await,
        403,
        "not shared"
    );

    // Approvals: by carol, the policy still refuses; by bob, the owner's refund passes, the
    // shared agent's does not inherit it.
    let refund = br#"{"invoice_id": 42, "amount": 250}"#;
    let approve = async |task: &str, approver: &str| {
        let body = json!({"approver": approver, "actions": ["billing/refund"]}).to_string();
        let path = format!("/admin/tasks/{task}/approve");
        gw.admin("POST", &path, body.as_bytes()).await.status
    };
    assert_eq!(call(&owner, &task, "/billing/refunds", refund).await, 403);
    let by_carol = start(json!([])).await;
    assert_eq!(approve(&by_carol, "carol@example.com").await, 200);
    assert_eq!(
        call(&owner, &by_carol, "/billing/refunds", refund).await,
        403
    );
    assert_eq!(approve(&task, "bob@example.com").await, 200);
    assert_eq!(call(&owner, &task, "/billing/refunds", refund).await, 200);
    assert_eq!(
        call(
            &as_agent("helper", "alice"),
            &task,
            "/billing/refunds",
            refund
        )
        .await,
        403,
        "the approval is the owner's"
    );
    let line = gw
        .audit_line(|l| l["action"] == "billing/refund" && l["decision"] == "allow")
        .await;
    assert_eq!(line["approval"]["approver"], "bob@example.com");
}

/// With several issuers and no `id_prefix`, each issuer's ids are prefixed `<issuer>#`.
#[tokio::test]
async fn several_issuers_prefix_ids_with_their_issuer_by_default() {
    let upstream = Upstream::start().await;
    let partner = Partner::new();
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: Some(partner.inbound(None)),
        mcp: None,
        extra_config: "",
    })
    .await;
    let answer = get(&gw.url("/billing/invoices/1"), &gw.idp.delegated()).await;
    // `assistant` of the example entities is no longer this caller: default deny.
    assert_eq!(answer.status, 403);
    let decision = answer.json()["decision_id"].clone();
    let line = gw.audit_line(|l| l["decision_id"] == decision).await;
    assert_eq!(line["agent"], format!("{IDP}#assistant").as_str());
    assert_eq!(line["user"], format!("{IDP}#alice").as_str());
    let theirs = partner.sign(json!({"sub": "alice", "act": {"sub": "assistant"}}));
    let answer = get(&gw.url("/billing/invoices/1"), &theirs).await;
    let decision = answer.json()["decision_id"].clone();
    let line = gw.audit_line(|l| l["decision_id"] == decision).await;
    assert_eq!(line["agent"], "https://partner.test#assistant");
}
