//! Approvals bound to the call (`@approval` forbids): with Redis and two replicas, a refund
//! over the limit waits for a person, is seen from either replica, runs once on the other
//! replica after approval, and never with other arguments; deny and expiry are honoured; the
//! audit tells each step.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The example refund limit, made one a person may lift for one call.
const BILLING: &str = r#"
@id("billing-refund")
permit (principal in Toolgate::Team::"finance-agents", action == Toolgate::Action::"billing/refund", resource)
when { context has user };

@id("refund-limit")
@approval("refunds above 500 need a person")
forbid (principal, action == Toolgate::Action::"billing/refund", resource)
when { context.args.amount > 500 }
unless { context has approval };
"#;

/// The example schema, with `context.approval` declared for refunds.
fn schema() -> String {
    let schema = std::fs::read_to_string(repo().join("policies/schema.cedarschema")).unwrap();
    let refund = "args: { invoice_id: Long, amount: Long, reason?: String } }";
    assert!(schema.contains(refund));
    schema.replace(
        refund,
        "args: { invoice_id: Long, amount: Long, reason?: String }, approval?: { id: String, by: String, at: datetime, note?: String } }",
    )
}

async fn gateway(upstream: &Upstream, extra_config: &str) -> Gateway {
    let schema = schema();
    Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[("billing.cedar", BILLING), ("schema.cedarschema", &schema)],
        inbound: None,
        mcp: None,
        extra_config,
    })
    .await
}

async fn refund(addr: SocketAddr, token: &str, amount: u64) -> Answer {
    let auth = format!("Bearer {token}");
    let body = json!({"invoice_id": 7, "amount": amount}).to_string();
    send(
        "POST",
        &format!("http://{addr}/billing/refunds"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

async fn admin(admin: SocketAddr, method: &str, path: &str, body: Value) -> Answer {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let mut headers = vec![("authorization", auth.as_str())];
    if !body.is_empty() {
        headers.push(("content-type", "application/json"));
    }
    send(method, &format!("http://{admin}{path}"), &headers, &body).await
}

fn approval_id(answer: &Answer) -> String {
    assert_eq!(answer.status, 403, "{:?}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"], "approval_required", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .starts_with("refunds above 500 need a"),
        "{body}"
    );
    body["approval_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_lets_exactly_that_call_through_once_on_any_replica() {
    let data = TempDir::new("approvals-redis");
    let (_redis, port) = start_redis(&data.0, &[]).await;
    let upstream = Upstream::start().await;
    let gw = gateway(
        &upstream,
        &format!("tasks:\n  store: redis://127.0.0.1:{port}\n"),
    )
    .await;
    let (mut other, other_addr, other_admin) = gw.replica_with_admin().await;
    let token = gw.idp.delegated();

    // 1. Over the limit: a pending approval, and the same id for a retry of the same call.
    let id = approval_id(&refund(gw.addr, &token, 900).await);
    assert_eq!(approval_id(&refund(other_addr, &token, 900).await), id);
    assert!(upstream.requests().is_empty(), "nothing forwarded");

    // 2. Seen from either replica, with its arguments.
    let listed = admin(other_admin, "GET", "/admin/approvals", Value::Null)
        .await
        .json();
    let pending = listed["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["args"]["amount"], 900);
    assert_eq!(pending["action"], "billing/refund");
    assert_eq!(pending["policies"], json!(["refund-limit"]));

    // 3. Approved on one replica: the same call runs on the other, once.
    let decided = admin(
        gw.admin,
        "POST",
        &format!("/admin/approvals/{id}/approve"),
        json!({"approver": "carol", "note": "customer called"}),
    )
    .await;
    assert_eq!(decided.status, 200, "{:?}", decided.body);
    assert_eq!(decided.json()["state"], "approved");
    let ran = refund(other_addr, &token, 900).await;
    assert_eq!(ran.status, 200, "{:?}", ran.body);
    assert_eq!(upstream.requests().len(), 1);
    let again = approval_id(&refund(gw.addr, &token, 900).await);
    assert_ne!(again, id, "used once: the next call asks anew");
    assert_eq!(upstream.requests().len(), 1);

    // 4. Other arguments never ride on it: a new approval of their own.
    let other_call = approval_id(&refund(gw.addr, &token, 901).await);
    assert_ne!(other_call, id);
    assert_ne!(other_call, again);

    // 5. A denied approval lets nothing through; a decision on it again is refused.
    let denied = admin(
        other_admin,
        "POST",
        &format!("/admin/approvals/{other_call}/deny"),
        json!({"approver": "carol", "note": "no"}),
    )
    .await;
    assert_eq!(denied.status, 200, "{:?}", denied.body);
    assert_eq!(refund(gw.addr, &token, 901).await.status, 403);
    let twice = admin(
        gw.admin,
        "POST",
        &format!("/admin/approvals/{other_call}/approve"),
        json!({"approver": "mallory"}),
    )
    .await;
    assert_eq!(twice.status, 409, "{:?}", twice.body);
    assert_eq!(upstream.requests().len(), 1);

    // 6. A policy changed in between decides again: the approval lifted the policy as it was.
    let asked = approval_id(&refund(gw.addr, &token, 950).await);
    let decided = admin(
        gw.admin,
        "POST",
        &format!("/admin/approvals/{asked}/approve"),
        json!({"approver": "carol"}),
    )
    .await;
    assert_eq!(decided.status, 200);
    let policies = gw.dir.0.join("policies/billing.cedar");
    let changed = BILLING.replace("need a person", "need a second person");
    std::fs::write(&policies, changed).unwrap();
    let reloaded = admin(gw.admin, "POST", "/admin/reload", Value::Null).await;
    assert_eq!(reloaded.status, 200, "{:?}", reloaded.body);
    let after = refund(gw.addr, &token, 950).await;
    assert_eq!(after.status, 403, "{:?}", after.body);
    assert_ne!(after.json()["approval_id"], asked.as_str());
    assert_eq!(upstream.requests().len(), 1);

    // 7. The audit tells each step: asked, approved (by whom), used by the call.
    let asked = gw
        .audit_line(|l| l["approval_id"] == id.as_str() && l["approval_step"] == "requested")
        .await;
    assert_eq!(asked["action"], "billing/refund");
    assert_eq!(asked["decision"], "deny");
    let approved = gw
        .audit_line(|l| l["approval_id"] == id.as_str() && l["approval_step"] == "approved")
        .await;
    assert_eq!(approved["action"], "approve_call");
    // `audit why` on the call that ran tells its approval's story.
    let used = gw
        .audit_line(|l| l["approval_id"] == id.as_str() && l["approval_step"] == "used")
        .await;
    let audit = gw.audit_path.to_str().unwrap();
    let decision = used["decision_id"].as_str().unwrap();
    let why = toolgate(&["audit", "why", decision, "--audit", audit]);
    let said = String::from_utf8_lossy(&why.stdout);
    assert!(why.status.success(), "{said}");
    assert!(said.contains("approval:"), "{said}");
    assert!(
        said.contains("requested ") && said.contains("used "),
        "{said}"
    );
    assert!(said.contains("by carol (\"customer called\")"), "{said}");
    let _ = other.kill();
    let _ = other.wait();
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, "toolgate_approvals_total{step=\"approved\"}"),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_approval_cannot_be_decided() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream, "approvals:\n  expires_seconds: 1\n").await;
    let token = gw.idp.delegated();
    let id = approval_id(&refund(gw.addr, &token, 900).await);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let late = admin(
        gw.admin,
        "POST",
        &format!("/admin/approvals/{id}/approve"),
        json!({"approver": "carol"}),
    )
    .await;
    assert_eq!(late.status, 409, "{:?}", late.body);
    assert_eq!(late.json()["error"], "approval_expired");
    let ended = gw
        .audit_line(|l| l["approval_id"] == id.as_str() && l["approval_step"] == "expired")
        .await;
    assert_eq!(ended["action"], "approve_call");
    let listed = admin(
        gw.admin,
        "GET",
        &format!("/admin/approvals/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(listed.json()["state"], "expired");
    assert!(upstream.requests().is_empty());

    // `check` warns of a policy that reads context.approval without asking for one.
    std::fs::write(
        gw.dir.0.join("policies/lenient.cedar"),
        "@id(\"lenient\") permit (principal, action == Toolgate::Action::\"billing/refund\", resource) when { context has approval };\n",
    )
    .unwrap();
    let checked = toolgate(&[
        "check",
        "--config",
        gw.dir.0.join("toolgate.yaml").to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(
        said.contains("policy `lenient` reads context.approval but has no @approval"),
        "{said}"
    );
    assert!(!said.contains("policy `refund-limit` reads"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_call_asks_for_approval_in_its_json_rpc_error_and_runs_once_approved() {
    let (_server, url) = start_mcp_server("the FastMCP server", |port| {
        let mut command = Command::new(python());
        command
            .arg(repo().join("tests/mcp/server.py"))
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    })
    .await;
    let schema = r#"namespace Toolgate {
  action "tools/pay" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { amount: Long, to: String },
      approval?: { id: String, by: String } } };
}"#;
    let policies = r#"
@id("pay") permit (principal, action == Toolgate::Action::"tools/pay", resource);
@id("pay-limit") @approval("payments above 100 need a person")
forbid (principal, action == Toolgate::Action::"tools/pay", resource)
when { context.args.amount > 100 } unless { context has approval };
"#;
    let rest = Upstream::start().await;
    let gw = Gateway::start(GatewayOptions {
        upstream: rest.addr,
        extra_policies: &[("tools.cedarschema", schema), ("pay.cedar", policies)],
        inbound: None,
        mcp: Some(url),
        extra_config: "",
    })
    .await;
    let auth = format!("Bearer {}", gw.idp.delegated());
    let post = |session: Option<String>, body: Value| {
        let auth = auth.clone();
        let url = gw.url("/tools");
        async move {
            let mut headers = vec![
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
                ("accept", "application/json, text/event-stream"),
                ("mcp-protocol-version", "2025-06-18"),
            ];
            if let Some(session) = &session {
                headers.push(("mcp-session-id", session.as_str()));
            }
            send("POST", &url, &headers, body.to_string().as_bytes()).await
        }
    };
    let opened = post(
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "approvals-test", "version": "1"}}}),
    )
    .await;
    let session = opened.headers["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let pay = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "pay", "arguments": {"amount": 500, "to": "bob"}}});
    let events = |answer: &Answer| -> Value {
        let text = String::from_utf8_lossy(&answer.body).to_string();
        let data = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .unwrap_or(text);
        serde_json::from_str(&data).unwrap()
    };
    let asked = events(&post(Some(session.clone()), pay.clone()).await);
    assert_eq!(asked["error"]["message"], "approval required", "{asked}");
    let data = &asked["error"]["data"];
    assert_eq!(data["error"], "approval_required");
    assert_eq!(data["reason"], "payments above 100 need a person");
    let id = data["approval_id"].as_str().unwrap().to_string();

    let approved = gw
        .admin(
            "POST",
            &format!("/admin/approvals/{id}/approve"),
            json!({"approver": "carol"}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(approved.status, 200, "{:?}", approved.body);
    let paid = events(&post(Some(session.clone()), pay.clone()).await);
    assert!(paid.get("result").is_some(), "{paid}");
    let again = events(&post(Some(session), pay).await);
    assert_eq!(
        again["error"]["message"], "approval required",
        "used once: {again}"
    );
    drop(rest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_new_approval_is_posted_to_the_webhook_signed_once() {
    let upstream = Upstream::start().await;
    let hook = Upstream::start().await;
    let secret = TempDir::new("approval-hook");
    let secret_file = secret.0.join("hook.secret");
    std::fs::write(&secret_file, "hook-shared-secret\n").unwrap();
    let config = format!(
        "approvals:\n  webhook_url: http://{}/hooks/approvals\n  webhook_secret_file: {}\n  console_url: https://ops.example/console\n",
        hook.addr,
        secret_file.display()
    );
    let gw = gateway(&upstream, &config).await;
    let token = gw.idp.delegated();
    let id = approval_id(&refund(gw.addr, &token, 900).await);
    // A retry of the same call is the same approval: no second message.
    assert_eq!(approval_id(&refund(gw.addr, &token, 900).await), id);
    hook.wait_for_requests(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = hook.requests();
    assert_eq!(sent.len(), 1);
    let message = &sent[0];
    assert_eq!(message.uri, "/hooks/approvals");
    let body: Value = serde_json::from_slice(&message.body).unwrap();
    assert_eq!(body["approval_id"], id.as_str());
    assert_eq!(body["action"], "billing/refund");
    assert_eq!(
        body["console"],
        format!("https://ops.example/console#approval-{id}")
    );
    // The receiver checks the signature over `timestamp.body` with the shared secret.
    let timestamp = message.headers["toolgate-timestamp"].to_str().unwrap();
    let signed = format!("{timestamp}.{}", String::from_utf8_lossy(&message.body));
    let expected = toolgate_credential::hmac_sha256_hex(b"hook-shared-secret", signed.as_bytes());
    assert_eq!(
        message.headers["toolgate-signature"].to_str().unwrap(),
        format!("sha256={expected}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_that_cannot_lift_the_deny_and_a_denied_call_are_not_asked_again() {
    // This forbid asks for a person but never reads `context.approval`: an approval cannot
    // lift it, and asking again would never end.
    let stubborn = BILLING.replace("unless { context has approval };", ";");
    let upstream = Upstream::start().await;
    let schema = schema();
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[
            ("billing.cedar", &stubborn),
            ("schema.cedarschema", &schema),
        ],
        inbound: None,
        mcp: None,
        extra_config: "",
    })
    .await;
    let token = gw.idp.delegated();
    let id = approval_id(&refund(gw.addr, &token, 900).await);
    let approve = json!({"approver": "carol"});
    let path = format!("/admin/approvals/{id}/approve");
    assert_eq!(admin(gw.admin, "POST", &path, approve).await.status, 200);
    let still = refund(gw.addr, &token, 900).await;
    assert_eq!(still.status, 403);
    assert_eq!(still.json()["error"], "forbidden", "{:?}", still.body);

    // A person's no to a call holds for that call: it is not asked again while it stands.
    let other = approval_id(&refund(gw.addr, &token, 950).await);
    let deny = json!({"approver": "carol", "note": "no"});
    let path = format!("/admin/approvals/{other}/deny");
    assert_eq!(admin(gw.admin, "POST", &path, deny).await.status, 200);
    let refused = refund(gw.addr, &token, 950).await;
    assert_eq!(refused.json()["error"], "forbidden", "{:?}", refused.body);
    let listed = admin(gw.admin, "GET", "/admin/approvals", Value::Null)
        .await
        .json();
    assert_eq!(listed["approvals"].as_array().unwrap().len(), 2, "{listed}");
    assert!(upstream.requests().is_empty());
}
