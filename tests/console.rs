//! The operator console on the admin listener: signed in with the admin token, a pending
//! approval approved in a real browser (Debian's Chromium driven by Playwright, installed by
//! scripts/test-deps.sh; the screenshot is kept under target/test-artifacts), and its defences
//! over raw HTTP: a change without the synchroniser token is refused, an agent's words are
//! shown as text, the console is not on the agent listener.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

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

/// An agent's words that would run, were they not escaped.
const PAYLOAD: &str = "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script>";

fn schema() -> String {
    let schema = std::fs::read_to_string(repo().join("policies/schema.cedarschema")).unwrap();
    schema.replace(
        "args: { invoice_id: Long, amount: Long, reason?: String } }",
        "args: { invoice_id: Long, amount: Long, reason?: String }, approval?: { id: String } }",
    )
}

async fn refund(addr: SocketAddr, token: &str) -> Answer {
    let auth = format!("Bearer {token}");
    let body = json!({"invoice_id": 7, "amount": 900, "reason": PAYLOAD}).to_string();
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

async fn console_gateway() -> (Upstream, Gateway) {
    let upstream = Upstream::start().await;
    let schema = schema();
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[("billing.cedar", BILLING), ("schema.cedarschema", &schema)],
        inbound: None,
        mcp: None,
        extra_config: "",
    })
    .await;
    (upstream, gw)
}

/// Signs in over HTTP; the session cookie (`name=value`).
async fn sign_in(gw: &Gateway) -> String {
    let body = format!("token={ADMIN_TOKEN}");
    let signed = send(
        "POST",
        &gw.admin_url("/console/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(signed.status, 303);
    let cookie = signed.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    cookie.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn the_console_refuses_forged_changes_escapes_agents_and_is_not_on_the_agent_listener() {
    let (upstream, gw) = console_gateway().await;
    let token = gw.idp.delegated();
    let asked = refund(gw.addr, &token).await;
    assert_eq!(asked.status, 403);
    let id = asked.json()["approval_id"].as_str().unwrap().to_string();

    // Signed out: the sign-in form, with a password field, under a strict CSP.
    let login = send("GET", &gw.admin_url("/console"), &[], b"").await;
    assert_eq!(login.status, 200);
    let html = String::from_utf8_lossy(&login.body).to_string();
    assert!(html.contains("type=\"password\""), "{html}");
    let csp = login.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let wrong = send(
        "POST",
        &gw.admin_url("/console/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        b"token=guess",
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(!wrong.headers.contains_key("set-cookie"));

    let cookie = sign_in(&gw).await;
    let page = send(
        "GET",
        &gw.admin_url("/console"),
        &[("cookie", &cookie)],
        b"",
    )
    .await;
    let html = String::from_utf8_lossy(&page.body).to_string();
    assert!(html.contains(&id), "the pending approval is shown");
    // The agent's words are text, never markup; no inline script at all.
    assert!(!html.contains("<img src=x"), "{html}");
    assert!(html.contains("&lt;img src=x onerror="), "{html}");
    assert!(!html.contains("<script>"), "{html}");

    // A change without the synchroniser token (a forged cross-site form) is refused.
    let forged = send(
        "POST",
        &gw.admin_url(&format!("/console/approvals/{id}/approve")),
        &[
            ("cookie", &cookie),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        b"approver=mallory",
    )
    .await;
    assert_eq!(forged.status, 403);
    assert_eq!(refund(gw.addr, &token).await.status, 403, "still pending");
    // Without a session nothing is changed either.
    let anonymous = send(
        "POST",
        &gw.admin_url(&format!("/console/approvals/{id}/approve")),
        &[("content-type", "application/x-www-form-urlencoded")],
        b"approver=mallory&csrf=x",
    )
    .await;
    assert_eq!(anonymous.status, 303);
    assert!(upstream.requests().is_empty());

    // The agent listener has no console, with or without the cookie.
    let agent_side = send("GET", &gw.url("/console"), &[("cookie", &cookie)], b"").await;
    assert_ne!(agent_side.status, 200);
    assert!(!String::from_utf8_lossy(&agent_side.body).contains("console"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_approves_in_a_real_browser_and_the_agent_retry_succeeds() {
    let python = repo().join(".toolgate-test/venv-browser/bin/python");
    assert!(
        python.exists() && std::path::Path::new("/usr/bin/chromium").exists(),
        "run scripts/test-deps.sh (Chromium and Playwright)"
    );
    let (upstream, gw) = console_gateway().await;
    let token = gw.idp.delegated();
    assert_eq!(refund(gw.addr, &token).await.status, 403);

    let artifacts = repo().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("console.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut command = Command::new(python);
    command
        .arg(repo().join("tests/console/browser.py"))
        .arg(gw.admin_url("/console"))
        .arg(ADMIN_TOKEN)
        .arg(&screenshot);
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .expect("the browser finished within 120 s")
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "browser failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["action"], "billing/refund", "{seen}");
    assert!(seen["args"].as_str().unwrap().contains("900"), "{seen}");
    assert!(
        seen["args"].as_str().unwrap().contains("<script>"),
        "shown as text: {seen}"
    );
    assert_eq!(seen["injected_elements"], 0, "{seen}");
    assert_eq!(seen["xss"], Value::Null, "{seen}");
    assert_eq!(seen["reason"], "refunds above 500 need a person");
    assert_eq!(seen["pending_after"], 0, "{seen}");
    assert_eq!(seen["page_errors"], json!([]), "{seen}");
    assert!(screenshot.exists(), "the screenshot is kept");

    // The agent's retry of the same call goes through, once.
    let ran = refund(gw.addr, &token).await;
    assert_eq!(ran.status, 200, "{:?}", ran.body);
    assert_eq!(upstream.requests().len(), 1);
    let used = gw
        .audit_line(|l| l["approval_step"] == "used" && l["decision"] == "allow")
        .await;
    assert_eq!(used["action"], "billing/refund");
    let approved = gw.audit_line(|l| l["approval_step"] == "approved").await;
    assert_eq!(approved["agent"], "console");
}
