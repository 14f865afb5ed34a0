//! The gateway in front of real upstream frameworks (installed by scripts/test-deps.sh):
//! FastAPI on Pydantic 2, Express 5 reading queries with qs, and the official Python MCP SDK
//! 2.x. Each hostile case is one the framework executed, with a fresh credential, while the
//! policy decided on something else, before the forwarded call was rendered from the decision
//! (issue 22): an alias binding an undeclared key, JSON text the SDK decodes, an escape its URI
//! template decodes, a completion run undecided. Each honest case is a documented call, now
//! answered as its policy says. What each framework executed is read back from it.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

const SCHEMA: &str = r#"namespace Toolgate {
  type Transfer = { amount: Long, destination?: String };
  action "api/transfer" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: Transfer } };
  action "api/payout" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: Transfer } };
  action "api/create_incident" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: {
      From: String,
      incident: { type: String, title: String, body: { type: String, details: String } } } } };
  action "api/list_incidents" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { statuses?: Set<String> } } };
  action "api/measure" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { duration: decimal, limit?: decimal } } };
  action "qs/list_invoices" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { customer: String, status?: Set<String> } } };
  action "qs/refund" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { amount: Long } } };
  action "tools/send_mail" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { to: Set<String>, subject: String } } };
  action "tools/list_notes" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { owner?: String } } };
  action "tools/wait" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { duration: decimal } } };
  action "tools/resources/read" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { uri: String } } };
  action "tools/prompts/get" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo,
      args: { name: String, arguments?: { name?: String, topic?: String } } } };
}"#;

const POLICIES: &str = r#"
@id("fw-transfers")
permit (principal, action in [Toolgate::Action::"api/transfer", Toolgate::Action::"api/payout"], resource);
@id("fw-no-external")
@reason("transfers leave the company only with a human")
forbid (principal, action in [Toolgate::Action::"api/transfer", Toolgate::Action::"api/payout"], resource)
when { context.args has destination && context.args.destination like "ext-*" };
@id("fw-incidents")
permit (principal, action in [Toolgate::Action::"api/create_incident", Toolgate::Action::"api/list_incidents", Toolgate::Action::"api/measure"], resource);
@id("fw-measure-limit")
forbid (principal, action == Toolgate::Action::"api/measure", resource)
when { context.args has limit && context.args.limit.greaterThan(decimal("10.0")) };
@id("fw-acme-invoices")
permit (principal, action == Toolgate::Action::"qs/list_invoices", resource)
when { context.args.customer == "acme" };
@id("fw-refunds")
permit (principal, action == Toolgate::Action::"qs/refund", resource) when { context.args.amount < 500 };
@id("fw-mail") permit (principal, action == Toolgate::Action::"tools/send_mail", resource);
@id("fw-no-ceo")
@reason("mail to the CEO needs a human")
forbid (principal, action == Toolgate::Action::"tools/send_mail", resource)
when { context.args.to.contains("ceo@corp.example") };
@id("fw-own-notes")
permit (principal, action == Toolgate::Action::"tools/list_notes", resource)
when { context.args has owner && context.args.owner == "alice" };
@id("fw-wait") permit (principal, action == Toolgate::Action::"tools/wait", resource);
@id("fw-reads") permit (principal, action == Toolgate::Action::"tools/resources/read", resource);
@id("fw-not-bob")
forbid (principal, action == Toolgate::Action::"tools/resources/read", resource)
when { context.args.uri like "notes://bob/*" || context.args.uri like "file:///public/internal/*" };
@id("fw-prompts") permit (principal, action == Toolgate::Action::"tools/prompts/get", resource);
@id("fw-no-secret-plan")
forbid (principal, action == Toolgate::Action::"tools/prompts/get", resource)
when { context.args.name == "secret_plan" };
@id("fw-list") permit (principal, action == Toolgate::Action::"list", resource);
"#;

fn python(venv: &str, script: &str) -> Command {
    let python = repo().join(format!(".toolgate-test/{venv}/bin/python"));
    assert!(python.exists(), "run scripts/test-deps.sh ({venv})");
    let mut command = Command::new(python);
    command.arg(repo().join("tests/frameworks").join(script));
    command
}

fn express() -> Command {
    // ES modules resolve packages from the script's own directory: run a copy beside them.
    let node = repo().join(".toolgate-test/node");
    assert!(
        node.join("node_modules/express").exists(),
        "run scripts/test-deps.sh (Express)"
    );
    let script = node.join("express_app.mjs");
    std::fs::copy(repo().join("tests/frameworks/express_app.mjs"), &script).unwrap();
    let mut command = Command::new("node");
    command.arg(script);
    command
}

/// The gateway in front of FastAPI (`api`), Express (`qs`) and the Python MCP SDK (`tools`).
struct Stage {
    gw: Gateway,
    token: String,
    fastapi: u16,
    express: u16,
    mcp: String,
    _apps: [Killed; 3],
    _recorder: Upstream,
}

async fn stage() -> Stage {
    let (fastapi_app, fastapi) =
        start_program("FastAPI", || python("venv-fastapi", "fastapi_app.py")).await;
    let (express_app, express) = start_program("Express", express).await;
    let (mcp_app, mcp_port) = start_program("the MCP SDK server", || {
        python("venv-mcp2", "mcp_server.py")
    })
    .await;
    let mcp = format!("http://127.0.0.1:{mcp_port}/mcp");
    let recorder = Upstream::start().await;
    let upstreams = format!(
        r#"  - name: api
    url: http://127.0.0.1:{fastapi}
    audience: https://api.internal
    routes:
      - {{ tool: transfer, method: POST, path: /transfers }}
      - {{ tool: payout, method: POST, path: /payouts }}
      - {{ tool: create_incident, method: POST, path: /incidents, header_arguments: [From] }}
      - {{ tool: list_incidents, method: GET, path: /incidents }}
      - {{ tool: measure, method: POST, path: /measurements }}
  - name: qs
    url: http://127.0.0.1:{express}
    audience: https://qs.internal
    routes:
      - {{ tool: list_invoices, method: GET, path: /invoices }}
      - {{ tool: refund, method: POST, path: /refunds }}
"#
    );
    let gw = Gateway::start_with_upstreams(
        GatewayOptions {
            upstream: recorder.addr,
            extra_policies: &[
                ("frameworks.cedarschema", SCHEMA),
                ("frameworks.cedar", POLICIES),
            ],
            inbound: None,
            mcp: Some(mcp.clone()),
            extra_config: "",
        },
        &upstreams,
    )
    .await;
    let token = gw.idp.delegated();
    Stage {
        gw,
        token,
        fastapi,
        express,
        mcp,
        _apps: [fastapi_app, express_app, mcp_app],
        _recorder: recorder,
    }
}

impl Stage {
    async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> Answer {
        let auth = format!("Bearer {}", self.token);
        let mut all = vec![("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            all.push(("content-type", "application/json"));
            body.to_string().into_bytes()
        };
        send(method, &self.gw.url(path), &all, &bytes).await
    }

    /// One JSON-RPC request to the MCP endpoint (2025-11-25: one message, JSON answers).
    async fn rpc(&self, method: &str, params: Value) -> Value {
        let message = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let answer = self
            .call(
                "POST",
                "/tools",
                &[
                    ("accept", "application/json, text/event-stream"),
                    ("mcp-protocol-version", "2025-11-25"),
                ],
                message,
            )
            .await;
        answer.json()
    }

    /// What a REST app executed since it was last asked.
    async fn executed(&self, port: u16) -> Value {
        send(
            "GET",
            &format!("http://127.0.0.1:{port}/executed"),
            &[],
            b"",
        )
        .await
        .json()
    }

    /// What the MCP server ran since it was last asked (its `executed` tool, called directly).
    async fn mcp_executed(&self) -> Value {
        let message = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "executed", "arguments": {}}});
        let answer = send(
            "POST",
            &self.mcp,
            &[
                ("content-type", "application/json"),
                ("accept", "application/json, text/event-stream"),
                ("mcp-protocol-version", "2025-11-25"),
            ],
            message.to_string().as_bytes(),
        )
        .await;
        let text = answer.json()["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        serde_json::from_str(&text).unwrap()
    }
}

/// A 400 naming the argument, with the error's code.
fn refused(answer: &Answer, code: &str, argument: &str) {
    assert_eq!(
        answer.status,
        400,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    let body = answer.json();
    assert_eq!(
        (body["error"].as_str(), body["argument"].as_str()),
        (Some(code), Some(argument)),
        "{body}"
    );
}

#[tokio::test]
async fn fastapi_binds_only_what_the_policy_saw() {
    let s = stage().await;
    // Pydantic binds each of these keys to `destination`, which the policy saw as absent.
    for (path, key) in [
        ("/api/transfers", "dest"), // Field(alias="destination"), populate_by_name
        ("/api/payouts", "dest"),   // AliasChoices
        ("/api/payouts", "to_account"), // AliasChoices
    ] {
        let body = json!({"amount": 100, key: "ext-attacker"});
        refused(
            &s.call("POST", path, &[], body).await,
            "undeclared_argument",
            key,
        );
    }
    assert_eq!(s.executed(s.fastapi).await, json!([]), "nothing ran");

    // Honest calls, decided on what FastAPI binds.
    let ok = s
        .call(
            "POST",
            "/api/transfers",
            &[],
            json!({"amount": 100, "destination": "acct-1"}),
        )
        .await;
    assert_eq!(ok.status, 200);
    let external = json!({"amount": 100, "destination": "ext-attacker"});
    let denied = s.call("POST", "/api/payouts", &[], external).await;
    assert_eq!(denied.status, 403);
    assert_eq!(
        denied.json()["reason"],
        "transfers leave the company only with a human"
    );
    assert_eq!(
        s.executed(s.fastapi).await,
        json!([{"transfer": {"amount": 100, "destination": "acct-1"}}])
    );
}

#[tokio::test]
async fn documented_calls_to_real_apis_are_answered_as_their_policies_say() {
    let s = stage().await;
    // PagerDuty's createIncident: a nested `type` in a declared record, and the acting user in
    // the `From` header (an `in: header` parameter, declared and forwarded as decided).
    let incident = json!({"incident": {"type": "incident", "title": "Disk full",
        "body": {"type": "incident_body", "details": "95% on /var"}}});
    let from = [("from", "alice@corp.example")];
    let created = s
        .call("POST", "/api/incidents", &from, incident.clone())
        .await;
    assert_eq!(
        created.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&created.body)
    );
    let mut extra = incident.clone();
    extra["incident"]["urgency"] = json!("high");
    refused(
        &s.call("POST", "/api/incidents", &from, extra).await,
        "undeclared_argument",
        "incident.urgency",
    );
    // `statuses[]` repeated, declared as a set, forwarded in the form it came.
    let listed = s
        .call(
            "GET",
            "/api/incidents?statuses[]=triggered&statuses[]=acknowledged",
            &[],
            Value::Null,
        )
        .await;
    assert_eq!(listed.status, 200);
    refused(
        &s.call(
            "GET",
            "/api/incidents?statuses[]=triggered&urgency=high",
            &[],
            Value::Null,
        )
        .await,
        "undeclared_argument",
        "urgency",
    );
    // A number with 5 decimals that no policy reads reaches the API with its digits; one that
    // a policy compares is refused, since Cedar holds 4.
    let measured = s
        .call(
            "POST",
            "/api/measurements",
            &[],
            json!({"duration": 0.12345}),
        )
        .await;
    assert_eq!(measured.status, 200);
    refused(
        &s.call(
            "POST",
            "/api/measurements",
            &[],
            json!({"duration": 1, "limit": 0.12345}),
        )
        .await,
        "argument_not_representable",
        "limit",
    );
    assert_eq!(
        s.executed(s.fastapi).await,
        json!([
            {"incident": incident, "from": "alice@corp.example"},
            {"list_incidents": {"statuses": ["triggered", "acknowledged"]}},
            {"measure": {"raw": {"duration": 0.12345}}},
        ])
    );
}

#[tokio::test]
async fn express_with_qs_reads_only_what_the_policy_saw() {
    let stage = stage().await;
    let s = &stage;
    let get = |query: &str| {
        let path = format!("/qs/invoices?{query}");
        async move { s.call("GET", &path, &[], Value::Null).await }
    };
    // qs hands the handler what the policy never saw: an undeclared parameter, or a list
    // (`customer[]`, a repeated name) where the policy reads one string.
    refused(
        &get("customer=acme&admin=true").await,
        "undeclared_argument",
        "admin",
    );
    refused(
        &get("customer[]=acme&customer[]=globex").await,
        "invalid_argument",
        "customer",
    );
    refused(
        &get("customer=acme&customer=globex").await,
        "invalid_argument",
        "customer",
    );
    let proto = json!({"amount": 100, "__proto__": {"amount": 900}});
    refused(
        &s.call("POST", "/qs/refunds", &[], proto).await,
        "undeclared_argument",
        "__proto__",
    );
    assert_eq!(s.executed(s.express).await, json!([]), "nothing ran");

    // A declared set, in either form qs reads as a list; a lone value stays a lone value.
    assert_eq!(
        get("customer=acme&status[]=open&status[]=paid")
            .await
            .status,
        200
    );
    assert_eq!(
        get("customer=acme&status=open&status=paid").await.status,
        200
    );
    assert_eq!(get("customer=acme&status=open").await.status, 200);
    assert_eq!(get("customer=globex").await.status, 403);
    assert_eq!(
        s.executed(s.express).await,
        json!([
            {"invoices": {"customer": "acme", "status": ["open", "paid"]}},
            {"invoices": {"customer": "acme", "status": ["open", "paid"]}},
            {"invoices": {"customer": "acme", "status": "open"}},
        ])
    );
}

#[tokio::test]
async fn the_python_mcp_sdk_runs_only_what_the_policy_saw() {
    let s = stage().await;
    let call = |name: &str, arguments: Value| {
        s.rpc("tools/call", json!({"name": name, "arguments": arguments}))
    };
    // The code is the structured content, or in `_meta` where the tool's output schema is
    // what clients check structured content against.
    let tool_error = |answer: &Value, code: &str, argument: &str| {
        let result = &answer["result"];
        assert_eq!(result["isError"], true, "{answer}");
        let refusal = match &result["structuredContent"] {
            Value::Null => &result["_meta"]["io.toolgate/refusal"],
            structured => structured,
        };
        assert_eq!(
            refusal,
            &json!({"error": code, "argument": argument}),
            "{answer}"
        );
    };
    // The listing shows the declared, permitted tools; the gateway learns their input schemas.
    let tools = s.rpc("tools/list", json!({})).await;
    let mut names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["list_notes", "send_mail", "wait"], "{tools}");
    // JSON text the SDK's pre_parse_json decodes: a list of recipients, None for "every owner".
    let mail = call(
        "send_mail",
        json!({"to": "[\"ceo@corp.example\"]", "subject": "hi"}),
    )
    .await;
    tool_error(&mail, "ambiguous_argument", "to");
    let notes = call("list_notes", json!({"owner": "null"})).await;
    tool_error(&notes, "ambiguous_argument", "owner");
    // Escapes the SDK's URI template decodes, read in the canonical form the server acts on.
    for uri in ["notes://bo%62/salary", "file:///public/%69nternal/keys.txt"] {
        let read = s.rpc("resources/read", json!({"uri": uri})).await;
        assert_eq!(read["error"]["code"], -32003, "{uri}: {read}");
    }
    let slashed = json!({"uri": "file:///public/x%2F..%2Finternal%2Fkeys.txt"});
    assert_eq!(
        s.rpc("resources/read", slashed).await["error"]["code"],
        -32602
    );
    // A completion is decided as the read it completes: it runs the server's handler.
    let completions = [
        json!({"ref": {"type": "ref/prompt", "name": "secret_plan"},
            "argument": {"name": "topic", "value": "l"}}),
        json!({"ref": {"type": "ref/resource", "uri": "notes://{user}/salary"},
            "argument": {"name": "user", "value": "bob"}}),
    ];
    for params in completions {
        let answer = s.rpc("completion/complete", params.clone()).await;
        assert_eq!(answer["error"]["code"], -32003, "{params}: {answer}");
    }
    // Setting the server's log level is an action of its own, undeclared here: refused.
    let level = s.rpc("logging/setLevel", json!({"level": "debug"})).await;
    assert_eq!(level["error"]["code"], -32602, "{level}");
    assert_eq!(s.mcp_executed().await, json!([]), "nothing ran");

    // Honest calls, as the policies say; the deny says why. A subject that reads as a JSON
    // number is text to a tool whose schema takes only text.
    let mail = call(
        "send_mail",
        json!({"to": ["bob@corp.example"], "subject": "2026"}),
    )
    .await;
    assert_eq!(mail["result"]["isError"], false, "{mail}");
    let ceo = call(
        "send_mail",
        json!({"to": ["ceo@corp.example"], "subject": "hi"}),
    )
    .await;
    assert_eq!(ceo["error"]["code"], -32003);
    assert_eq!(
        ceo["error"]["data"]["reason"],
        "mail to the CEO needs a human"
    );
    let waited = call("wait", json!({"duration": 0.12345})).await;
    assert_eq!(
        waited["result"]["content"][0]["text"], "0.12345",
        "{waited}"
    );
    let own = call("list_notes", json!({"owner": "alice"})).await;
    assert_eq!(own["result"]["isError"], false, "{own}");
    assert_eq!(
        own["result"]["cacheScope"], "private",
        "a decided result is private"
    );
    let read = s
        .rpc("resources/read", json!({"uri": "notes://alice/salary"}))
        .await;
    assert_eq!(read["result"]["contents"][0]["text"], "salary of alice");
    assert_eq!(
        s.mcp_executed().await,
        json!([
            {"send_mail": {"to": ["bob@corp.example"], "subject": "2026"}},
            {"wait": {"duration": "0.12345"}},
            {"list_notes": {"owner": "alice"}},
            {"salary": {"user": "alice"}},
        ])
    );

    // Listings show what reading would be permitted, and nothing else.
    let prompts = s.rpc("prompts/list", json!({})).await;
    let names: Vec<&str> = prompts["result"]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["greet"], "{prompts}");
    assert_eq!(prompts["result"]["cacheScope"], "private");
    let greeting = s
        .rpc(
            "prompts/get",
            json!({"name": "greet", "arguments": {"name": "Ada"}}),
        )
        .await;
    assert_eq!(
        greeting["result"]["messages"][0]["content"]["text"], "Hello, Ada!",
        "{greeting}"
    );
}

/// `toolgate schema mcp --url` on the official Python SDK's server: its resources and prompts
/// become `tools/resources/read` and `tools/prompts/get`, typed from its templates and prompt
/// arguments, and `toolgate check` takes the fragment beside `toolgate init`'s base schema.
#[tokio::test]
async fn schema_mcp_declares_the_servers_resources_and_prompts() {
    let (_server, port) = start_program("the MCP SDK server", || {
        python("venv-mcp2", "mcp_server.py")
    })
    .await;
    let url = format!("http://127.0.0.1:{port}/mcp");
    let out = toolgate(&["schema", "mcp", "--upstream", "tools", "--url", &url]);
    let fragment = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "action \"tools/resources/read\" in [call]",
        "args: { uri: String }",
        "//   template: notes://{user}/salary",
        "//   template: file:///public/{folder}/{name}",
        "action \"tools/prompts/get\" in [call]",
        "args: { name: String, arguments?: { name?: String, topic?: String } }",
    ] {
        assert!(fragment.contains(expected), "{expected} not in\n{fragment}");
    }
    let dir = TempDir::new("schema-mcp");
    let project = dir.0.join("project");
    assert!(toolgate(&["init", &project.to_string_lossy()])
        .status
        .success());
    std::fs::write(project.join("policies/tools.cedarschema"), &fragment).unwrap();
    std::fs::write(
        project.join("policies/tools.cedar"),
        "@id(\"reads\") permit (principal, action == Toolgate::Action::\"tools/resources/read\", resource)\nwhen { context.args.uri like \"file:///public/*\" };\n@id(\"greet\") permit (principal, action == Toolgate::Action::\"tools/prompts/get\", resource)\nwhen { context.args.name == \"greet\" && context.args has arguments && context.args.arguments has name };\n",
    )
    .unwrap();
    let config = project.join("toolgate.yaml");
    let checked = toolgate(&["check", "--config", &config.to_string_lossy()]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
}
