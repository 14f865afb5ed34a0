//! MCP servers the gateway runs itself (`command:`), over stdio: a stand-in that records what
//! it is given and misbehaves on purpose (tests/stdio/recorder.py), and the reference memory
//! server (`@modelcontextprotocol/server-memory`, installed by scripts/test-deps.sh) driven by
//! the official Python SDK client.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SCHEMA: &str = r#"namespace Toolgate {
  action "rec/echo" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { text: String } } };
  action "rec/pid" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo } };
  action "rec/crash" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo } };
  action "rec/slow" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo } };
}"#;
const POLICIES: &str = r#"
@id("rec-echo") permit (principal, action == Toolgate::Action::"rec/echo", resource)
when { context.args.text != "forbidden" };
@id("rec-other") permit (principal, action in [Toolgate::Action::"rec/pid",
  Toolgate::Action::"rec/crash", Toolgate::Action::"rec/slow"], resource);
"#;

/// A gateway running the recorder as upstream `rec` with `process` settings; the recorder
/// writes into the returned folder, which also holds its secret.
async fn recorder_gateway(process: &str) -> (Gateway, TempDir) {
    let rest = Upstream::start().await;
    let records = TempDir::new("stdio-records");
    let secret = records.0.join("rec.secret");
    std::fs::write(&secret, "s3cret-for-rec").unwrap();
    let recorder = repo().join("tests/stdio/recorder.py");
    let upstream = format!(
        r#"  - name: rec
    kind: mcp
    command: ["{python}", "{recorder}"]
    env: {{ RECORD_DIR: "{records}", WHO: "{{agent}}/{{user}}" }}
    credential: {{ mode: inject, env_var: REC_SECRET, secret_file: "{secret}" }}
    process: {process}
"#,
        python = python().display(),
        recorder = recorder.display(),
        records = records.0.display(),
        secret = secret.display(),
    );
    let gw = Gateway::start_with_upstreams(
        GatewayOptions {
            upstream: rest.addr,
            extra_policies: &[("rec.cedarschema", SCHEMA), ("rec.cedar", POLICIES)],
            inbound: None,
            mcp: None,
            extra_config: "",
        },
        &upstream,
    )
    .await;
    // The REST upstream the harness config needs is never called here.
    std::mem::forget(rest);
    (gw, records)
}

async fn rpc(gw: &Gateway, token: &str, session: Option<&str>, body: Value) -> Answer {
    let auth = format!("Bearer {token}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json"),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    if let Some(session) = session {
        headers.push(("mcp-session-id", session));
    }
    send(
        "POST",
        &gw.url("/rec"),
        &headers,
        body.to_string().as_bytes(),
    )
    .await
}

async fn open(gw: &Gateway, token: &str) -> Answer {
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "stdio-test", "version": "1"}}});
    rpc(gw, token, None, initialize).await
}

fn session_of(answer: &Answer) -> String {
    answer
        .headers
        .get("mcp-session-id")
        .unwrap_or_else(|| panic!("no session: {} {:?}", answer.status, answer.body))
        .to_str()
        .unwrap()
        .to_string()
}

async fn call(gw: &Gateway, token: &str, session: &str, tool: &str, args: Value) -> Value {
    let message = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": tool, "arguments": args}});
    rpc(gw, token, Some(session), message).await.json()
}

fn text(answer: &Value) -> &str {
    answer["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text: {answer}"))
}

fn starts(records: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(records.join("starts.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_server_is_decided_credentialed_and_restarted_after_a_crash() {
    let (gw, records) = recorder_gateway("{ idle_seconds: 60 }").await;
    let token = gw.idp.delegated();

    // `{user}` in its env keeps users apart: a caller acting for no user has no folder of
    // its own, and is refused rather than given the one every user's is in.
    let userless = gw.idp.sign(json!({"sub": "solo-agent"}));
    let refused = open(&gw, &userless).await;
    assert_eq!(refused.status, 403, "{:?}", refused.body);
    assert!(starts(&records.0).is_empty());

    let opened = open(&gw, &token).await;
    assert_eq!(opened.status, 200, "{:?}", opened.body);
    assert_eq!(opened.json()["result"]["serverInfo"]["name"], "recorder");
    let session = session_of(&opened);
    let listed = rpc(
        &gw,
        &token,
        Some(&session),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await
    .json();
    let names: Vec<&str> = listed["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    // Only the tools the schema declares are listed (later and ask are not).
    assert_eq!(names, ["echo", "pid", "crash", "slow"]);

    // Decided as any MCP upstream's calls: allowed, and denied without reaching the process.
    let echoed = call(&gw, &token, &session, "echo", json!({"text": "hello"})).await;
    assert_eq!(text(&echoed), "hello");
    let denied = call(&gw, &token, &session, "echo", json!({"text": "forbidden"})).await;
    assert_eq!(
        denied["error"]["message"], "forbidden by policy",
        "{denied}"
    );

    // A crash answers the call in flight, and the next call finds the server started again,
    // initialized as before without the agent's help.
    let first = text(&call(&gw, &token, &session, "pid", json!({})).await).to_string();
    let crashed = call(&gw, &token, &session, "crash", json!({})).await;
    assert!(
        crashed["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited")),
        "{crashed}"
    );
    let second = text(&call(&gw, &token, &session, "pid", json!({})).await).to_string();
    assert_ne!(first, second, "a new process after the crash");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "toolgate_mcp_process_restarts_total{upstream=\"rec\"}"
        ),
        Some(1.0),
        "{metrics}"
    );

    // What the process was given: its secret as a variable, `{agent}` and `{user}` filled, and
    // none of the gateway's own environment; never the agent's token, in input or environment.
    let starts = starts(&records.0);
    assert_eq!(starts.len(), 2, "{starts:?}");
    for start in &starts {
        let env = start["env"].as_object().unwrap();
        assert_eq!(env["REC_SECRET"], "s3cret-for-rec");
        assert_eq!(env["WHO"], "assistant/alice");
        let allowed = [
            "PATH",
            "HOME",
            "LANG",
            "LC_ALL",
            "TMPDIR",
            "TZ",
            "RECORD_DIR",
            "WHO",
            "REC_SECRET",
            // The interpreter sets this one itself.
            "LC_CTYPE",
        ];
        for name in env.keys() {
            assert!(allowed.contains(&name.as_str()), "{name} was passed on");
        }
        assert!(!start.to_string().contains(&token));
    }
    let input = std::fs::read_to_string(records.0.join("input.jsonl")).unwrap();
    assert!(
        !input.contains(&token),
        "the agent's token reached the server"
    );
    assert_eq!(
        input.matches("\"initialize\"").count(),
        2,
        "each start is initialized: {input}"
    );
    let audit = gw
        .audit_line(|l| l["action"] == "rec/pid" && l["decision"] == "allow")
        .await;
    assert_eq!(audit["upstream"], "rec");
    assert!(
        audit.get("jti").is_none_or(Value::is_null),
        "nothing is minted for a process"
    );
}

/// Polls the metrics until `series` reads `value` (bounded).
async fn wait_for_metric(gw: &Gateway, series: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = gw.metrics().await;
        if metric(&metrics, series) == Some(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never read {value}: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        // A zombie has exited; only its parent has yet to read its status.
        .is_ok_and(|stat| !stat.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_are_bounded_end_when_idle_and_end_at_shutdown() {
    let (mut gw, records) = recorder_gateway("{ max: 2, idle_seconds: 1 }").await;
    let token = gw.idp.delegated();
    let processes = "toolgate_mcp_processes{upstream=\"rec\"}";

    let first = session_of(&open(&gw, &token).await);
    let _second = session_of(&open(&gw, &token).await);
    wait_for_metric(&gw, processes, 2.0).await;
    // Past the bound, a new session is refused (and can be tried again later).
    let refused = open(&gw, &token).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(starts(&records.0).len(), 2);

    // Idle sessions end with their processes; the agent is told the session is gone, as a
    // server says of a session it does not have, and starts a new one.
    wait_for_metric(&gw, processes, 0.0).await;
    let gone = rpc(
        &gw,
        &token,
        Some(&first),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}),
    )
    .await;
    assert_eq!(gone.status, 404, "{:?}", gone.body);
    let again = session_of(&open(&gw, &token).await);
    let pid: u64 = text(&call(&gw, &token, &again, "pid", json!({})).await)
        .parse()
        .unwrap();
    assert!(alive(pid));

    // At shutdown every process ends with the gateway.
    gw.terminate();
    assert!(gw.exited().await.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the process outlived the gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reaches_the_caller_under_its_own_token() {
    let (gw, records) = recorder_gateway("{ idle_seconds: 60 }").await;
    let token = gw.idp.delegated();
    let session = session_of(&open(&gw, &token).await);
    let auth = format!("Bearer {token}");
    let message = json!({"jsonrpc": "2.0", "id": "call-1", "method": "tools/call",
        "params": {"name": "slow", "arguments": {}, "_meta": {"progressToken": "tok-1"}}});
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2025-06-18"),
        ("mcp-session-id", session.as_str()),
    ];
    let answer = send(
        "POST",
        &gw.url("/rec"),
        &headers,
        message.to_string().as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 200);
    let events: Vec<Value> = String::from_utf8(answer.body.to_vec())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{events:?}");
    for progress in &events[..2] {
        assert_eq!(progress["method"], "notifications/progress");
        assert_eq!(progress["params"]["progressToken"], "tok-1");
    }
    assert_eq!(events[2]["id"], "call-1");
    assert_eq!(text(&events[2]), "done");
    // The server saw the gateway's own ids and token, never the agent's.
    let input = std::fs::read_to_string(records.0.join("input.jsonl")).unwrap();
    assert!(
        !input.contains("tok-1") && !input.contains("call-1"),
        "{input}"
    );
}

const MEMORY_SCHEMA: &str = r#"namespace Toolgate {
  action "memory/create_entities" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo } };
  action "memory/delete_entities" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { entityNames: Set<String> } } };
  action "memory/read_graph" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo } };
}"#;
const MEMORY_POLICIES: &str = r#"
@id("memory-write") permit (principal, action in [Toolgate::Action::"memory/create_entities",
  Toolgate::Action::"memory/read_graph"], resource);
@id("memory-delete") permit (principal, action == Toolgate::Action::"memory/delete_entities", resource)
unless { context.args.entityNames.contains("protected") };
@id("memory-hide") forbid (principal, action == Toolgate::Action::"list",
  resource == Toolgate::Tool::"memory/delete_relations");
"#;

/// Runs tests/stdio/memory_client.py (the Python SDK 1.x) against `url` (bounded).
async fn memory_client(url: &str, token: &str, entity: &str) -> Value {
    let mut command = std::process::Command::new(python());
    command
        .arg(repo().join("tests/stdio/memory_client.py"))
        .args([url, token, entity]);
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
    serde_json::from_str(stdout.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_memory_server_over_stdio_keeps_each_agent_apart() {
    let server = repo()
        .join(".toolgate-test/node/node_modules/@modelcontextprotocol/server-memory/dist/index.js");
    assert!(server.exists(), "run scripts/test-deps.sh (server-memory)");
    let rest = Upstream::start().await;
    let files = TempDir::new("memory-files");
    // create_entities carries records the schema does not declare: forwarded, unseen.
    let upstream = format!(
        r#"  - name: memory
    kind: mcp
    command: [node, "{server}"]
    env: {{ MEMORY_FILE_PATH: "{files}/memory-{{agent}}.jsonl" }}
    undeclared_arguments: forward
"#,
        server = server.display(),
        files = files.0.display(),
    );
    let gw = Gateway::start_with_upstreams(
        GatewayOptions {
            upstream: rest.addr,
            extra_policies: &[
                ("memory.cedarschema", MEMORY_SCHEMA),
                ("memory.cedar", MEMORY_POLICIES),
            ],
            inbound: None,
            mcp: None,
            extra_config: "",
        },
        &upstream,
    )
    .await;
    let url = gw.url("/memory");
    let assistant = gw.idp.delegated();
    let planner = gw
        .idp
        .sign(json!({"sub": "bob", "act": {"sub": "planner/v2"}}));

    let out = memory_client(&url, &assistant, "ada").await;
    assert_eq!(out["server"], "memory-server");
    let tools = out["tools"].as_array().unwrap();
    assert!(tools.contains(&json!("create_entities")), "{out}");
    assert!(!tools.contains(&json!("delete_relations")), "hidden: {out}");
    assert_eq!(out["create"]["ok"], true, "{out}");
    assert_eq!(out["delete_protected"]["ok"], false, "{out}");
    assert_eq!(out["delete_temp"]["ok"], true, "{out}");
    assert_eq!(out["graph"], json!(["ada", "protected"]));

    // Another agent's process has its own file: it never sees ada.
    let out = memory_client(&url, &planner, "grace").await;
    assert_eq!(out["graph"], json!(["grace", "protected"]), "{out}");
    assert!(files.0.join("memory-assistant.jsonl").exists());
    // `planner/v2` is one safe file name, not a folder.
    assert!(files.0.join("memory-planner%2Fv2.jsonl").exists());
    drop(rest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_what_a_command_upstream_cannot_do() {
    let (gw, _records) = recorder_gateway("{ idle_seconds: 60 }").await;
    let good = gw.dir.0.join("toolgate.yaml");
    let out = toolgate(&["check", "--config", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let credential = |t: String, with: &str| {
        let start = t.find("    credential: { mode: inject, env_var").unwrap();
        let end = start + t[start..].find('\n').unwrap();
        format!("{}{with}{}", &t[..start], &t[end..])
    };
    for (edit, says) in [
        (
            credential as fn(String, &str) -> String,
            ("    credential: { mode: mint }", "mint needs a url"),
        ),
        (
            credential,
            (
                "    credential: { mode: inject, secret_env: HOME }",
                "needs env_var",
            ),
        ),
        (
            credential,
            (
                "    credential: { mode: inject, env_var: A, header: X-Key, secret_env: HOME }",
                "header does not apply",
            ),
        ),
        (
            |t, with| t.replace("    process: { idle_seconds: 60 }", with),
            (
                "    process: { shared: true }",
                "need a process per session",
            ),
        ),
        (
            |t, with| t.replace("    process: { idle_seconds: 60 }", with),
            ("    url: http://127.0.0.1:9/mcp", "not both"),
        ),
        (
            |t, with| t.replace("  - name: rec\n    kind: mcp", with),
            ("  - name: rec\n    kind: rest", "kind: mcp"),
        ),
    ] {
        let config = gw.edited_config("bad.yaml", |t| edit(t, says.0));
        let out = toolgate(&["check", "--config", config.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}", says.0);
        assert!(text.contains(says.1), "{}: {text}", says.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_asks_a_command_upstream_by_running_it() {
    let (gw, records) = recorder_gateway("{ idle_seconds: 60 }").await;
    let config = gw.edited_config("pinned.yaml", |t| t + "tool_pins: tools.lock\n");
    let out = toolgate(&["pin", "--config", config.to_str().unwrap()]);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("rec: 6 tools pinned"), "{said}");
    let lock = std::fs::read_to_string(gw.dir.0.join("tools.lock")).unwrap();
    for tool in ["echo", "pid", "crash", "slow"] {
        assert!(lock.contains(&format!("    {tool}:")), "{lock}");
    }
    // The process ran as `toolgate` itself, and ended with the command.
    let started = starts(&records.0);
    let pin_run = started.last().unwrap();
    assert_eq!(pin_run["env"]["WHO"], "toolgate/toolgate");
    assert!(!alive(pin_run["pid"].as_u64().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_process_serves_every_session_and_keeps_their_ids_apart() {
    let rest = Upstream::start().await;
    let records = TempDir::new("stdio-shared");
    let upstream = format!(
        "  - name: rec\n    kind: mcp\n    command: [\"{}\", \"{}\"]\n    env: {{ RECORD_DIR: \"{}\" }}\n    process: {{ shared: true }}\n",
        python().display(),
        repo().join("tests/stdio/recorder.py").display(),
        records.0.display()
    );
    let gw = Gateway::start_with_upstreams(
        GatewayOptions {
            upstream: rest.addr,
            extra_policies: &[("rec.cedarschema", SCHEMA), ("rec.cedar", POLICIES)],
            inbound: None,
            mcp: None,
            extra_config: "",
        },
        &upstream,
    )
    .await;
    let alice = gw.idp.delegated();
    let bob = gw
        .idp
        .sign(json!({"sub": "bob", "act": {"sub": "planner"}}));
    let first = session_of(&open(&gw, &alice).await);
    let second = session_of(&open(&gw, &bob).await);
    assert_ne!(first, second);
    // Both callers use the same id (7) at once: each gets its own answer.
    let (a, b) = tokio::join!(
        call(&gw, &alice, &first, "echo", json!({"text": "from alice"})),
        call(&gw, &bob, &second, "echo", json!({"text": "from bob"})),
    );
    assert_eq!(text(&a), "from alice");
    assert_eq!(text(&b), "from bob");
    let pid_a = text(&call(&gw, &alice, &first, "pid", json!({})).await).to_string();
    let pid_b = text(&call(&gw, &bob, &second, "pid", json!({})).await).to_string();
    assert_eq!(pid_a, pid_b, "one process for every session");
    assert_eq!(starts(&records.0).len(), 1);
    // A session is still its caller's: bob cannot use alice's.
    let foreign = rpc(
        &gw,
        &bob,
        Some(&first),
        json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"}),
    )
    .await;
    assert_eq!(foreign.status, 404);
    drop(rest);
}
