//! Several endpoints per upstream (`urls:`): an endpoint killed mid-load loses no call that
//! could have been retried and never gets a call sent twice; it is ejected, `/readyz` says so
//! when none is left, and it comes back. An MCP session stays on the endpoint that made it.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SCHEMA: &str = r#"namespace Toolgate {
  action "pool/get_item" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, args: { id: Long } } };
  action "pool/create_item" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, args: { n: Long } } };
  action "pool/flaky" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, args: {} } };
  action "mcppool/add" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, args: { n: Long } } };
}"#;

const POLICIES: &str = r#"
@id("pool") permit (principal, action in [Toolgate::Action::"pool/get_item", Toolgate::Action::"pool/create_item", Toolgate::Action::"pool/flaky", Toolgate::Action::"mcppool/add"], resource);
"#;

/// Eject after one failure, for four seconds: the test sees an ejection, and its end soon after.
fn upstreams(a: &Upstream, b: &Upstream) -> String {
    let (a, b) = (a.addr, b.addr);
    format!(
        "  - name: pool
    urls: [http://{a}/api, http://{b}/api]
    audience: https://pool.internal
    passive_health: {{ failures: 1, eject_seconds: 4 }}
    routes:
      - {{ tool: get_item, method: GET, path: \"/items/{{id}}\" }}
      - {{ tool: create_item, method: POST, path: /items }}
      - {{ tool: flaky, method: GET, path: /flaky, retry: true }}
  - name: mcppool
    kind: mcp
    urls: [http://{a}/mcp, http://{b}/mcp]
    audience: https://mcppool.internal
    balance: least_requests
    passive_health: {{ failures: 1, eject_seconds: 4 }}
"
    )
}

async fn start(a: &Upstream, b: &Upstream) -> Gateway {
    Gateway::start_with_upstreams(
        GatewayOptions {
            upstream: a.addr,
            extra_policies: &[("pool.cedarschema", SCHEMA), ("pool.cedar", POLICIES)],
            inbound: None,
            mcp: None,
            extra_config: "",
        },
        &upstreams(a, b),
    )
    .await
}

/// One call: `n` names it in what the upstream records (the path, or the body).
async fn call(gw: &Gateway, token: &str, n: usize) -> Answer {
    call_at(&gw.url(""), token, n).await
}

async fn call_at(gateway: &str, token: &str, n: usize) -> Answer {
    let auth = format!("Bearer {token}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    if n.is_multiple_of(2) {
        send("GET", &format!("{gateway}/pool/items/{n}"), &headers, b"").await
    } else {
        let body = json!({ "n": n }).to_string();
        send(
            "POST",
            &format!("{gateway}/pool/items"),
            &headers,
            body.as_bytes(),
        )
        .await
    }
}

/// The call numbers an upstream received, each with how often.
fn received(upstream: &Upstream) -> HashMap<usize, usize> {
    let mut seen = HashMap::new();
    for r in upstream.requests() {
        let n = if r.method == "GET" {
            r.uri.rsplit('/').next().and_then(|n| n.parse().ok())
        } else {
            serde_json::from_slice::<Value>(&r.body)
                .ok()
                .and_then(|b| b["n"].as_u64())
                .map(|n| n as usize)
        };
        if let Some(n) = n {
            *seen.entry(n).or_default() += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_mid_load_loses_no_retryable_call_and_comes_back() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let gw = start(&a, &b).await;
    let token = gw.idp.delegated();

    // 120 calls, 6 at a time, GETs and POSTs; endpoint a is killed after the 40th answer.
    const CALLS: usize = 120;
    let killed_at: std::sync::Arc<std::sync::Mutex<Option<Instant>>> = Default::default();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = std::sync::Arc::new(a);
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (gw_url, token) = (gw.url(""), token.clone());
        let (next, done, a, killed_at) = (next.clone(), done.clone(), a.clone(), killed_at.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= CALLS {
                    return outcomes;
                }
                let started = Instant::now();
                let answer = call_at(&gw_url, &token, n).await;
                outcomes.push((n, started, answer.status.as_u16()));
                if done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == 40 {
                    a.kill();
                    *killed_at.lock().unwrap() = Some(Instant::now());
                }
            }
        }));
    }
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await.unwrap());
    }
    let killed_at = killed_at.lock().unwrap().expect("a was killed");
    let (at_a, at_b) = (received(&a), received(&b));

    // Nothing was sent twice: no call reached the upstreams more than once in all.
    for n in 0..CALLS {
        let times = at_a.get(&n).unwrap_or(&0) + at_b.get(&n).unwrap_or(&0);
        assert!(times <= 1, "call {n} reached the upstreams {times} times");
    }
    // A call that failed was one that reached a, unanswered, as it was killed: it cannot be
    // known not to have acted. Every call started once the kill was done succeeded, those
    // that tried a first included.
    let settled = killed_at + Duration::from_millis(1000);
    for &(n, started, status) in &outcomes {
        if status != 200 {
            assert_eq!(status, 502, "call {n}");
            assert!(
                started < settled,
                "call {n} started after the kill and failed"
            );
        } else {
            assert_eq!(
                at_a.get(&n).unwrap_or(&0) + at_b.get(&n).unwrap_or(&0),
                1,
                "call {n} answered 200 without reaching an upstream once"
            );
        }
    }
    let failed = outcomes.iter().filter(|o| o.2 != 200).count();
    assert!(
        failed <= 6,
        "{failed} calls failed: at most those in flight"
    );
    assert!(!at_a.is_empty() && at_b.len() > at_a.len());
    // Once a's ejection has run out, a call that finds it gone is sent on to b, and says so.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    for n in [3000, 3002] {
        assert_eq!(call(&gw, &token, n).await.status, 200);
    }
    let retried = gw
        .audit_line(|l| l["upstream"] == "pool" && l["attempts"] == 2 && l["status"] == 200)
        .await;
    assert_eq!(retried["upstream_status"], 200);
    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "toolgate_upstream_retries_total{upstream=\"pool\"}"
        )
        .unwrap()
            >= 1.0
    );
    let ejected = format!(
        "toolgate_upstream_endpoint_ejections_total{{endpoint=\"{}\",upstream=\"pool\"}}",
        a.addr
    );
    assert!(metric(&metrics, &ejected).unwrap() >= 1.0, "{metrics}");
    assert_eq!(
        send("GET", &gw.admin_url("/readyz"), &[], b"").await.status,
        200,
        "b is still healthy"
    );

    // b dies too: after a failed call each, no endpoint is healthy, and /readyz says which.
    b.kill();
    // The gateway's idle connections to b see it close (a call on one would not count as b
    // refusing a connection).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(call(&gw, &token, 1000).await.status, 502);
    assert_eq!(call(&gw, &token, 1002).await.status, 502);
    let ready = send("GET", &gw.admin_url("/readyz"), &[], b"").await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.json()["reason"].as_str().unwrap().contains("pool"),
        "{:?}",
        ready.body
    );
    let gateway_only = send("GET", &gw.admin_url("/readyz?upstreams=false"), &[], b"").await;
    assert_eq!(gateway_only.status, 200, "{:?}", gateway_only.body);

    // a comes back on its port: once its ejection has run out, calls reach it again.
    let revived = Upstream::start_at(a.addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = call(&gw, &token, 2000).await;
        if answer.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "a never came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(received(&revived).contains_key(&2000));
    let ready = send("GET", &gw.admin_url("/readyz"), &[], b"").await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
}

async fn mcp(gw: &Gateway, token: &str, message: Value, session: Option<&str>) -> Answer {
    let auth = format!("Bearer {token}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    if let Some(session) = session {
        headers.push(("mcp-session-id", session));
    }
    send(
        "POST",
        &gw.url("/mcppool"),
        &headers,
        message.to_string().as_bytes(),
    )
    .await
}

fn add(id: usize) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": "add", "arguments": {"n": id}}})
}

/// The JSON-RPC ids an upstream received, each with how often.
fn ids(upstream: &Upstream) -> HashMap<u64, usize> {
    let mut seen = HashMap::new();
    for r in upstream.requests() {
        if let Some(id) = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|m| m["id"].as_u64())
        {
            *seen.entry(id).or_default() += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_sessions_stay_on_their_endpoint_and_no_message_is_sent_twice() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let gw = start(&a, &b).await;
    let token = gw.idp.delegated();

    // A session is made at one endpoint; all its calls go there.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}}});
    let opened = mcp(&gw, &token, init, None).await;
    assert_eq!(opened.status, 200, "{:?}", opened.body);
    let session = opened.headers["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let (home, other) = if a.requests().is_empty() {
        (&b, &a)
    } else {
        (&a, &b)
    };
    for id in 2..12 {
        let answer = mcp(&gw, &token, add(id), Some(&session)).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    assert!(home.requests().len() >= 11);
    assert!(
        other.requests().is_empty(),
        "a session's call left its endpoint"
    );

    // Calls without a session, 4 at a time, while the session's endpoint is killed: none is
    // sent twice, and every one started after the kill succeeds on the other endpoint.
    let mut killed_at = Instant::now() + Duration::from_secs(3600);
    let mut calls = Vec::new();
    for id in 100..160 {
        let (gw_url, token) = (gw.url("/mcppool"), token.clone());
        if id == 120 {
            home.kill();
            killed_at = Instant::now();
        }
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let auth = format!("Bearer {token}");
            let headers = [
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
                ("accept", "application/json, text/event-stream"),
                ("mcp-protocol-version", "2025-06-18"),
            ];
            let answer = send("POST", &gw_url, &headers, add(id).to_string().as_bytes()).await;
            (started, answer.status.as_u16())
        }));
        if calls.len().is_multiple_of(4) {
            for call in calls.drain(..) {
                let (started, status) = call.await.unwrap();
                assert!(
                    status == 200 || started < killed_at + Duration::from_millis(1000),
                    "a call started after the kill failed: {status}"
                );
            }
        }
    }
    for call in calls {
        call.await.unwrap();
    }
    let (at_home, at_other) = (ids(home), ids(other));
    for id in 100..160 {
        let times = at_home.get(&id).unwrap_or(&0) + at_other.get(&id).unwrap_or(&0);
        assert!(times <= 1, "message {id} was sent {times} times");
    }

    // The session's endpoint is gone: its call is not sent to another endpoint (which does
    // not hold the session).
    let before = other.requests().len();
    let lost = mcp(&gw, &token, add(500), Some(&session)).await;
    assert_eq!(lost.status, 502, "{:?}", lost.body);
    assert!(other.requests()[before..]
        .iter()
        .all(|r| !String::from_utf8_lossy(&r.body).contains("500")));
}

/// A route marked `retry:` has its idempotent call tried on the other endpoint after a 503;
/// a POST, or a route without it, is answered with the first endpoint's 503.
#[tokio::test]
async fn a_retry_route_tries_another_endpoint_after_a_503() {
    let unavailable = Unavailable::start().await;
    let b = Upstream::start().await;
    let gw = Gateway::start_with_upstreams(
        GatewayOptions {
            upstream: b.addr,
            extra_policies: &[("pool.cedarschema", SCHEMA), ("pool.cedar", POLICIES)],
            inbound: None,
            mcp: None,
            extra_config: "",
        },
        &format!(
            "  - name: pool
    urls: [http://{u}/api, http://{b}/api]
    audience: https://pool.internal
    passive_health: {{ failures: 100, eject_seconds: 2 }}
    routes:
      - {{ tool: get_item, method: GET, path: \"/items/{{id}}\" }}
      - {{ tool: flaky, method: GET, path: /flaky, retry: true }}
",
            u = unavailable.0,
            b = b.addr
        ),
    )
    .await;
    let token = gw.idp.delegated();
    let auth = format!("Bearer {token}");
    let headers = [("authorization", auth.as_str())];
    // Round robin: every other call starts at the unavailable endpoint.
    for _ in 0..4 {
        let flaky = send("GET", &gw.url("/pool/flaky"), &headers, b"").await;
        assert_eq!(flaky.status, 200, "a retry route reaches b in the end");
    }
    let mut plain_503 = 0;
    for _ in 0..4 {
        let item = send("GET", &gw.url("/pool/items/1"), &headers, b"").await;
        plain_503 += usize::from(item.status == 503);
    }
    assert_eq!(
        plain_503, 2,
        "without retry:, the first endpoint's 503 is the answer"
    );
    let line = gw
        .audit_line(|l| l["action"] == "pool/flaky" && l["attempts"] == 2)
        .await;
    assert_eq!(line["upstream_status"], 200);

    // What `check` refuses: a retry that could repeat an act, endpoints that differ in path,
    // both url and urls.
    let flaky = "{ tool: flaky, method: GET, path: /flaky, retry: true }";
    let urls = format!(
        "urls: [http://{}/api, http://{}/api]",
        unavailable.0, b.addr
    );
    for (from, to, says) in [
        (
            flaky.to_string(),
            flaky.replace("GET", "POST"),
            "retry is for idempotent methods only",
        ),
        (
            urls.clone(),
            urls.replacen("/api", "/v2", 1),
            "urls must all have the same path",
        ),
        (
            urls.clone(),
            format!("{urls}\n    url: http://{}", b.addr),
            "give url or urls, not both",
        ),
    ] {
        let config = gw.edited_config("bad.yaml", |t| t.replace(&from, &to));
        let out = toolgate(&["check", "--config", config.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{to}");
        assert!(text.contains(says), "{to}: {text}");
    }
}

/// An HTTP server that answers every request 503.
struct Unavailable(std::net::SocketAddr);

impl Unavailable {
    async fn start() -> Unavailable {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 8192];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let answer =
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Unavailable(addr)
    }
}
