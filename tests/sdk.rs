//! The official MCP SDKs on both sides of the gateway: the Python SDK 2.x (the 2026-07-28
//! revision: `server/discover`, transport headers, stateless) and the TypeScript SDK 1.x (the
//! 2025-11-25 revision: `initialize`), each as client and as server, every pairing through a
//! real `toolgate serve`. scripts/test-deps.sh installs both (.toolgate-test/venv-mcp2,
//! .toolgate-test/node).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SCHEMA: &str = r#"namespace Toolgate {
  action "tools/add" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { a: Long, b: Long } } };
  action "tools/pay" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { amount: Long, to: String } } };
  action "tools/admin_reset" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo } };
  action "tools/slow_add" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { a: Long, b: Long } } };
  action "tools/prompts/get" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo,
      args: { name: String, arguments?: { name?: String, target?: String } } } };
}"#;
const POLICIES: &str = r#"
@id("sdk-add") permit (principal, action == Toolgate::Action::"tools/add", resource);
@id("sdk-pay-small") permit (principal, action == Toolgate::Action::"tools/pay", resource)
when { context.args.amount < 100 };
@id("sdk-slow-add") permit (principal, action == Toolgate::Action::"tools/slow_add", resource);
@id("sdk-greet") permit (principal, action == Toolgate::Action::"tools/prompts/get", resource)
when { context.args.name == "greet" };
@id("sdk-hide-admin") forbid (principal, action == Toolgate::Action::"list", resource == Toolgate::Tool::"tools/admin_reset");
"#;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Sdk {
    Python,
    TypeScript,
}

fn deps() -> PathBuf {
    repo().join(".toolgate-test")
}

/// How to run one of the SDK programs in tests/sdk.
fn program(sdk: Sdk, role: &str) -> Command {
    match sdk {
        Sdk::Python => {
            let python = deps().join("venv-mcp2/bin/python");
            assert!(
                python.exists(),
                "run scripts/test-deps.sh (the Python SDK 2.x venv)"
            );
            let mut command = Command::new(python);
            command.arg(repo().join(format!("tests/sdk/py_{role}.py")));
            command
        }
        Sdk::TypeScript => {
            // ES modules resolve packages from the script's own directory: run a copy there.
            let node = deps().join("node");
            assert!(
                node.join("node_modules/@modelcontextprotocol/sdk").exists(),
                "run scripts/test-deps.sh (the TypeScript SDK)"
            );
            let script = node.join(format!("ts_{role}.mjs"));
            std::fs::copy(repo().join(format!("tests/sdk/ts_{role}.mjs")), &script).unwrap();
            let mut command = Command::new("node");
            command.arg(script);
            command
        }
    }
}

/// Starts an SDK server on a free loopback port; waits (bounded) until it accepts connections.
async fn start_server(sdk: Sdk) -> (Killed, String) {
    start_role(sdk, "server").await
}

/// Starts an SDK program of `role` that serves on the port it is given; its endpoint URL.
async fn start_role(sdk: Sdk, role: &str) -> (Killed, String) {
    let (server, port) = start_program(&format!("{sdk:?} {role}"), || program(sdk, role)).await;
    (server, format!("http://127.0.0.1:{port}/mcp"))
}

/// A gateway with the SDK schema and policies in front of the MCP server at `url` (the REST
/// upstream it also needs is a recorder, returned to keep it alive).
async fn gateway_in_front_of(url: String) -> (Upstream, Gateway) {
    let rest = Upstream::start().await;
    let gw = Gateway::start(GatewayOptions {
        upstream: rest.addr,
        extra_policies: &[("tools.cedarschema", SCHEMA), ("sdk.cedar", POLICIES)],
        inbound: None,
        mcp: Some(url),
        extra_config: "",
    })
    .await;
    (rest, gw)
}

/// Runs an SDK client against `url` (bounded); returns what it printed.
async fn run_client(sdk: Sdk, url: &str, token: &str) -> Value {
    run(sdk, "client", url, token).await
}

/// Runs an SDK program of `role` (`client`, `resume_client`) against `url`.
async fn run(sdk: Sdk, role: &str, url: &str, token: &str) -> Value {
    let mut command = program(sdk, role);
    command.arg(url).arg(token);
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .expect("the client finished within 60 s")
    .unwrap()
    .expect("run the SDK client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{sdk:?} client failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

#[tokio::test]
async fn every_official_sdk_pairing_works_through_the_gateway() {
    for server_sdk in [Sdk::Python, Sdk::TypeScript] {
        let (_server, url) = start_server(server_sdk).await;
        let (_rest, gw) = gateway_in_front_of(url).await;
        let token = gw.idp.delegated();
        for client_sdk in [Sdk::Python, Sdk::TypeScript] {
            let pairing = format!("{client_sdk:?} client, {server_sdk:?} server");
            let out = run_client(client_sdk, &gw.url("/tools"), &token).await;
            // The newest revision where both sides speak it; otherwise the fallback works.
            let protocol = if (client_sdk, server_sdk) == (Sdk::Python, Sdk::Python) {
                "2026-07-28"
            } else {
                "2025-11-25"
            };
            assert_eq!(out["protocol"], protocol, "{pairing}: {out}");
            assert_eq!(
                out["tools"],
                json!(["add", "pay"]),
                "{pairing}: the listing is filtered"
            );
            assert_eq!(out["add"]["text"], json!(["5"]), "{pairing}: {out}");
            assert_eq!(
                out["pay_small"]["text"],
                json!(["paid 50 to bob"]),
                "{pairing}: {out}"
            );
            // The canonical example prompt, its own `name` argument beside the prompt's name.
            assert_eq!(out["greet"], json!(["Hello, Ada!"]), "{pairing}: {out}");
            assert_eq!(out["prompts"], json!(["greet"]), "{pairing}: {out}");
            assert_eq!(out["exfiltrate"]["code"], -32003, "{pairing}: {out}");
            // An undeclared argument: a tool error the model can read, naming it.
            let undeclared = &out["pay_undeclared"];
            assert_eq!(
                (&undeclared["ok"], &undeclared["is_error"]),
                (&json!(true), &json!(true)),
                "{pairing}: {out}"
            );
            let text = undeclared["text"][0].as_str().unwrap_or_default();
            assert!(
                text.starts_with("undeclared_argument") && text.contains("`memo`"),
                "{pairing}: {out}"
            );
            let denied = &out["pay_large"];
            assert_eq!(denied["ok"], false, "{pairing}: {out}");
            assert_eq!(denied["code"], -32003, "{pairing}: {out}");
            let decision = denied["data"]["decision_id"].as_str().unwrap().to_string();
            let line = gw
                .audit_line(|l| l["decision_id"] == decision.as_str())
                .await;
            assert_eq!(
                (line["action"].as_str(), line["decision"].as_str()),
                (Some("tools/pay"), Some("deny")),
                "{pairing}"
            );
        }
        // Every allowed call was audited as allowed, with the credential that carried it.
        let allowed = gw
            .audit_line(|l| l["action"] == "tools/add" && l["decision"] == "allow")
            .await;
        assert!(allowed["jti"].is_string(), "{allowed}");
    }
}

/// SEP-1699: the server closes its SSE stream mid-call (the TypeScript SDK's `closeSSEStream`,
/// after a priming event that carries the id to resume from), and the client resumes with
/// `Last-Event-ID` on a GET: through the gateway, each SDK's client gets the answer, every time.
/// (The gateway dropped priming events, whose data is empty, and passed on a priming event
/// replayed from the server's store as `{}`, which clients cannot read.)
#[tokio::test]
async fn a_stream_closed_mid_call_is_resumed_through_the_gateway() {
    let (_server, url) = start_role(Sdk::TypeScript, "resume_server").await;
    let (_rest, gw) = gateway_in_front_of(url).await;
    let token = gw.idp.delegated();
    for client in [Sdk::Python, Sdk::TypeScript] {
        for round in 1..=3 {
            let out = run(client, "resume_client", &gw.url("/tools"), &token).await;
            assert_eq!(
                out["text"],
                json!(["5"]),
                "{client:?} client, round {round}: {out}"
            );
        }
    }
}
