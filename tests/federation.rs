//! One MCP endpoint over several servers nobody here wrote (`mcp_endpoints:`): the Python
//! SDK's FastMCP server (tests/mcp/server.py) and the reference everything server over
//! streamable HTTP, and the reference memory server over stdio, behind `/all`, used by the
//! official Python SDK client (tests/federation/client.py). scripts/test-deps.sh installs them.

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const POLICIES: &str = r#"
@id("fed-add") permit (principal, action == Toolgate::Action::"tools/add", resource);
@id("fed-pay-small") permit (principal, action == Toolgate::Action::"tools/pay", resource)
when { context.args.amount < 100 };
@id("fed-hide-admin") forbid (principal, action == Toolgate::Action::"list",
  resource == Toolgate::Tool::"tools/admin_reset");
@id("fed-every") permit (principal, action in [Toolgate::Action::"every/echo",
  Toolgate::Action::"every/trigger-long-running-operation",
  Toolgate::Action::"every/prompts/get", Toolgate::Action::"every/resources/read"], resource);
@id("fed-memory") permit (principal, action == Toolgate::Action::"memory/read_graph", resource);
"#;

const MEMORY_SCHEMA: &str = r#"namespace Toolgate {
  action "memory/read_graph" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo } };
}"#;

fn node_modules() -> std::path::PathBuf {
    repo().join(".toolgate-test/node/node_modules/@modelcontextprotocol")
}

/// The schema fragment `toolgate schema mcp` writes for the server at `url`.
fn schema_of(upstream: &str, url: &str) -> String {
    let out = toolgate(&["schema", "mcp", "--upstream", upstream, "--url", url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn start_everything() -> (Killed, String) {
    let server = node_modules().join("server-everything/dist/index.js");
    assert!(
        server.exists(),
        "run scripts/test-deps.sh (server-everything)"
    );
    start_mcp_server("the everything server", |port| {
        let mut command = Command::new("node");
        command
            .arg(&server)
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    })
    .await
}

async fn start_fastmcp() -> (Killed, String) {
    start_mcp_server("the FastMCP server", |port| {
        let mut command = Command::new(python());
        command
            .arg(repo().join("tests/mcp/server.py"))
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    })
    .await
}

/// Reads one JSON line the client printed (bounded).
async fn line_of(
    lines: &mut std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) -> Value {
    let line = tokio::task::block_in_place(|| lines.next())
        .expect("the client printed a line")
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
}

/// The three servers, and a gateway with `/all` over them (what it needs kept alive with it).
struct Federation {
    gw: Gateway,
    fastmcp: Killed,
    _everything: Killed,
    _rest: Upstream,
    _files: TempDir,
}

async fn federation() -> Federation {
    let (fastmcp, tools_url) = start_fastmcp().await;
    let (_everything, every_url) = start_everything().await;
    let memory = node_modules().join("server-memory/dist/index.js");
    let files = TempDir::new("fed-memory");
    let schemas = [
        schema_of("tools", &tools_url),
        schema_of("every", &every_url),
        MEMORY_SCHEMA.to_string(),
    ];
    let rest = Upstream::start().await;
    let more = format!(
        r#"  - name: every
    url: {every_url}
    audience: https://every.internal
    kind: mcp
  - name: memory
    kind: mcp
    command: [node, "{memory}"]
    env: {{ MEMORY_FILE_PATH: "{files}/memory-{{agent}}.jsonl" }}
"#,
        memory = memory.display(),
        files = files.0.display(),
    );
    let gw = Gateway::start_with_upstreams(
        GatewayOptions {
            upstream: rest.addr,
            extra_policies: &[
                ("tools.cedarschema", &schemas[0]),
                ("every.cedarschema", &schemas[1]),
                ("memory.cedarschema", &schemas[2]),
                ("fed.cedar", POLICIES),
            ],
            inbound: None,
            mcp: Some(tools_url),
            extra_config: "mcp_endpoints:\n  - name: all\n    upstreams: [tools, every, memory]\n",
        },
        &more,
    )
    .await;

    Federation {
        gw,
        fastmcp,
        _everything,
        _rest: rest,
        _files: files,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_endpoint_over_three_real_servers_decides_each_call_as_its_own() {
    let mut fed = federation().await;
    let gw = &fed.gw;
    let mut client = Killed(
        Command::new(python())
            .arg(repo().join("tests/federation/client.py"))
            .args([gw.url("/all"), gw.idp.delegated()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = std::io::BufReader::new(client.0.stdout.take().unwrap()).lines();
    let before = tokio::time::timeout(Duration::from_secs(60), line_of(&mut lines))
        .await
        .expect("the client's first part within 60 s");

    assert_eq!(before["server"], "toolgate/all", "{before}");
    let tools: Vec<&str> = before["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    // Every member's tools under `<upstream>__<tool>`, filtered per caller as on their own
    // endpoints (admin_reset is hidden; only declared tools are listed).
    for expected in [
        "tools__add",
        "tools__pay",
        "every__echo",
        "memory__read_graph",
    ] {
        assert!(tools.contains(&expected), "{expected}: {tools:?}");
    }
    assert!(!tools.contains(&"tools__admin_reset"), "{tools:?}");
    // Decided as on each server's own endpoint: the action stays `<upstream>/<tool>`.
    assert_eq!(before["add"]["text"], json!(["5"]), "{before}");
    assert_eq!(before["pay_large"]["ok"], false, "{before}");
    assert_eq!(before["pay_large"]["code"], -32003, "{before}");
    assert_eq!(before["echo"]["text"], json!(["Echo: hi"]), "{before}");
    assert_eq!(before["sum"]["ok"], false, "not permitted: {before}");
    assert_eq!(before["graph"]["ok"], true, "{before}");
    assert_eq!(before["long"]["ok"], true, "{before}");
    assert_eq!(before["progress"].as_array().unwrap().len(), 2, "{before}");
    assert!(
        before["prompts"]
            .as_array()
            .unwrap()
            .contains(&json!("every__simple-prompt")),
        "{before}"
    );
    assert!(!before["prompt"].as_array().unwrap().is_empty(), "{before}");
    assert!(before["resources"].as_u64().unwrap() > 0, "{before}");
    assert_eq!(before["read"]["contents"], 1, "{before}");

    // Audited under each member's own name.
    let line = gw
        .audit_line(|l| l["action"] == "every/echo" && l["decision"] == "allow")
        .await;
    assert_eq!(line["upstream"], "every");
    let line = gw
        .audit_line(|l| l["action"] == "tools/pay" && l["decision"] == "deny")
        .await;
    assert_eq!(line["upstream"], "tools");
    // What the endpoint answers itself has a line of its own.
    let own = gw
        .audit_line(|l| l["path"] == "/all" && l["action"] == "mcp:notifications/initialized")
        .await;
    assert_eq!(own["decision"], "allow", "{own}");

    // A member killed mid-session: its tools leave the listing, its calls get a clear error,
    // and the others go on in the same session.
    drop(fed.fastmcp.0.kill());
    let _ = fed.fastmcp.0.wait();
    let mut stdin = client.0.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    let after = tokio::time::timeout(Duration::from_secs(60), line_of(&mut lines))
        .await
        .expect("the client's second part within 60 s");
    let tools = after["tools"].as_array().unwrap();
    assert!(
        !tools
            .iter()
            .any(|t| t.as_str().unwrap().starts_with("tools__")),
        "{after}"
    );
    assert!(tools.contains(&json!("every__echo")), "{after}");
    assert_eq!(after["add"]["ok"], false, "{after}");
    assert_eq!(after["echo"]["text"], json!(["Echo: still"]), "{after}");
}

/// Runs a client program to completion (bounded); what it printed, as JSON.
async fn run_client(mut command: Command) -> Value {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .expect("the client finished within 60 s")
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_sdk_and_the_2026_python_sdk_use_it_too() {
    let fed = federation().await;
    let url = fed.gw.url("/all");
    let token = fed.gw.idp.delegated();

    // The TypeScript SDK 1.x (2025-11-25): progress, prompts and resources across members.
    let node = repo().join(".toolgate-test/node");
    let script = node.join("ts_fed_client.mjs");
    std::fs::copy(repo().join("tests/federation/ts_client.mjs"), &script).unwrap();
    let mut command = Command::new("node");
    command.arg(&script).args([&url, &token]);
    let ts = run_client(command).await;
    assert_eq!(ts["server"], "toolgate/all", "{ts}");
    assert_eq!(ts["add"]["text"], json!(["5"]), "{ts}");
    assert_eq!(ts["pay_large"]["code"], -32003, "{ts}");
    assert_eq!(ts["echo"]["text"], json!(["Echo: hi"]), "{ts}");
    assert_eq!(ts["progress"].as_array().unwrap().len(), 2, "{ts}");
    assert!(
        ts["prompts"]
            .as_array()
            .unwrap()
            .contains(&json!("every__simple-prompt")),
        "{ts}"
    );
    assert_eq!(ts["read"], 1, "{ts}");

    // The Python SDK 2.x asks for 2026-07-28 first (`server/discover`) and falls back to the
    // handshake the endpoint speaks.
    let python2 = repo().join(".toolgate-test/venv-mcp2/bin/python");
    let mut command = Command::new(python2);
    command
        .arg(repo().join("tests/federation/py2_client.py"))
        .args([&url, &token]);
    let py = run_client(command).await;
    assert_eq!(py["add"]["text"], json!(["5"]), "{py}");
    assert_eq!(py["pay_large"]["code"], -32003, "{py}");
    assert_eq!(py["echo"]["text"], json!(["Echo: hi"]), "{py}");
    assert!(
        py["tools"]
            .as_array()
            .unwrap()
            .contains(&json!("memory__read_graph")),
        "{py}"
    );
}

const REC_SCHEMA: &str = r#"namespace Toolgate {
  action "rec/later" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo } };
  action "rec/ask" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo } };
}"#;
const REC_POLICIES: &str = r#"
@id("rec-all") permit (principal, action in [Toolgate::Action::"rec/later", Toolgate::Action::"rec/ask"], resource);
"#;

/// Reads SSE events from `body` until one holds `wanted` (bounded); the text read.
async fn read_until(body: &mut hyper::body::Incoming, wanted: &str) -> String {
    let mut text = String::new();
    let reading = async {
        while !text.contains(wanted) {
            let frame = http_body_util::BodyExt::frame(body)
                .await
                .expect("stream open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reading)
        .await
        .unwrap_or_else(|_| panic!("no {wanted} within 10 s"));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_requests_and_news_reach_the_agent_and_its_answers_go_back() {
    let rest = Upstream::start().await;
    let recorder = repo().join("tests/stdio/recorder.py");
    let records = TempDir::new("fed-records");
    let more = format!(
        "  - name: rec\n    kind: mcp\n    command: [\"{}\", \"{}\"]\n    env: {{ RECORD_DIR: \"{}\" }}\n",
        python().display(),
        recorder.display(),
        records.0.display()
    );
    let gw = Gateway::start_with_upstreams(
        GatewayOptions {
            upstream: rest.addr,
            extra_policies: &[("rec.cedarschema", REC_SCHEMA), ("rec.cedar", REC_POLICIES)],
            inbound: None,
            mcp: None,
            extra_config: "mcp_endpoints:\n  - name: all\n    upstreams: [rec]\n",
        },
        &more,
    )
    .await;
    let token = gw.idp.delegated();
    let auth = format!("Bearer {token}");
    let client = http_client(false);
    let request = |method: &str, session: Option<&str>, body: String| {
        let mut request = http::Request::builder()
            .method(method)
            .uri(gw.url("/all"))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18");
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        request
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {"elicitation": {}},
        "clientInfo": {"name": "fed-test", "version": "1"}}});
    let opened = client
        .request(request("POST", None, initialize.to_string()))
        .await
        .unwrap();
    assert_eq!(opened.status(), 200);
    let session = opened.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();

    // The session's stream carries a member's news (its tools changed).
    let listening = client
        .request(request("GET", Some(&session), String::new()))
        .await
        .unwrap();
    assert_eq!(listening.status(), 200);
    let mut news = listening.into_body();
    let later = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "rec__later", "arguments": {}}});
    let answered = client
        .request(request("POST", Some(&session), later.to_string()))
        .await
        .unwrap();
    let mut answer = answered.into_body();
    read_until(&mut answer, "\"ok\"").await;
    read_until(&mut news, "notifications/tools/list_changed").await;

    // A member's own request reaches the agent under the member's name, and the agent's
    // answer goes back to that member, which then answers the call.
    let ask = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "rec__ask", "arguments": {}}});
    let asked = client
        .request(request("POST", Some(&session), ask.to_string()))
        .await
        .unwrap();
    let mut stream = asked.into_body();
    let text = read_until(&mut stream, "elicitation/create").await;
    assert!(text.contains(r#""id":"rec/\"ask-1\"""#), "{text}");
    let reply = json!({"jsonrpc": "2.0", "id": "rec/\"ask-1\"",
        "result": {"action": "accept", "content": {"name": "Ada"}}});
    let replied = client
        .request(request("POST", Some(&session), reply.to_string()))
        .await
        .unwrap();
    assert_eq!(replied.status(), 202);
    let text = read_until(&mut stream, "Ada").await;
    assert!(text.contains(r#""id":3"#), "{text}");
    drop(rest);
}

#[tokio::test]
async fn check_refuses_an_endpoint_that_cannot_be_served() {
    let rest = Upstream::start().await;
    let gw = Gateway::start(GatewayOptions {
        upstream: rest.addr,
        extra_policies: &[],
        inbound: None,
        mcp: Some("http://127.0.0.1:9/mcp".into()),
        extra_config: "",
    })
    .await;
    for (endpoints, says) in [
        (
            "[{name: all, upstreams: [nowhere]}]",
            "no upstream named nowhere",
        ),
        (
            "[{name: all, upstreams: [billing]}]",
            "billing is not kind: mcp",
        ),
        (
            "[{name: tools, upstreams: [tools]}]",
            "an upstream has this name",
        ),
        ("[{name: all, upstreams: []}]", "at least one MCP upstream"),
        ("[{name: v1, upstreams: [tools]}]", "reserved path"),
        ("[{name: all, upstreams: [tools, tools]}]", "named twice"),
    ] {
        let config = gw.edited_config("bad.yaml", |t| t + &format!("mcp_endpoints: {endpoints}\n"));
        let out = toolgate(&["check", "--config", config.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{endpoints}");
        assert!(text.contains(says), "{endpoints}: {text}");
    }
}
