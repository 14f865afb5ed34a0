//! Usage counters as policy (`context.usage`, `@rate_limit`): with Redis and two replicas, a
//! per-agent call limit answers 429 with `Retry-After` and the `RateLimit` headers whichever
//! replica is used, a summed budget never overshoots under concurrent calls, and Redis down
//! refuses counted calls (503) rather than let them pass uncounted.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::json;

const LIMITS: &str = r#"
@id("calls-per-minute") @rate_limit
forbid (principal, action == Toolgate::Action::"billing/get_invoice", resource)
when { context has usage && context.usage has calls_per_minute && context.usage.calls_per_minute >= 3 };

@id("refund-budget")
forbid (principal, action == Toolgate::Action::"billing/refund", resource)
when { context has usage && context.usage has refund_total && context.usage.refund_total + context.args.amount > 1000 };
"#;

const COUNTERS: &str = "usage:
  counters:
    - name: calls_per_minute
      per: [agent, tool]
      window_seconds: 60
      limit: 3
    - name: refund_total
      per: [user]
      window_seconds: 86400
      actions: [billing/refund]
      sum: amount
";

fn schema() -> String {
    let schema = std::fs::read_to_string(repo().join("policies/schema.cedarschema")).unwrap();
    schema
        .replace(
            "args: { invoice_id: Long } }",
            "args: { invoice_id: Long }, usage?: { calls_per_minute?: Long } }",
        )
        .replace(
            "args: { invoice_id: Long, amount: Long, reason?: String } }",
            "args: { invoice_id: Long, amount: Long, reason?: String }, usage?: { refund_total?: Long } }",
        )
}

async fn get_invoice(addr: SocketAddr, token: &str) -> Answer {
    let auth = format!("Bearer {token}");
    send(
        "GET",
        &format!("http://{addr}/billing/invoices/7"),
        &[("authorization", &auth)],
        b"",
    )
    .await
}

async fn refund(addr: SocketAddr, token: String, amount: u64) -> Answer {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_replicas_and_a_budget_never_overshoots() {
    let data = TempDir::new("usage-redis");
    let (mut redis, port) = start_redis(&data.0, &[]).await;
    let upstream = Upstream::start().await;
    let schema = schema();
    let config = format!("tasks:\n  store: redis://127.0.0.1:{port}\n{COUNTERS}");
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[("schema.cedarschema", &schema), ("limits.cedar", LIMITS)],
        inbound: None,
        mcp: None,
        extra_config: &config,
    })
    .await;
    let (other, other_addr) = gw.replica().await;
    // Killed however the test ends: a replica left running would hold the test's output open.
    let _other = Killed(other);
    let token = gw.idp.delegated();

    // Three calls a minute, whichever replica takes them; the fourth is a 429.
    for addr in [other_addr, gw.addr, other_addr] {
        assert_eq!(get_invoice(addr, &token).await.status, 200);
    }
    let limited = get_invoice(gw.addr, &token).await;
    assert_eq!(limited.status, 429, "{:?}", limited.body);
    let body = limited.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["counter"], "calls_per_minute");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=120).contains(&retry), "{retry}");
    assert_eq!(body["retry_after"], retry);
    assert_eq!(
        limited.headers["ratelimit-policy"].to_str().unwrap(),
        "\"calls_per_minute\";q=3;w=60"
    );
    assert!(limited.headers["ratelimit"]
        .to_str()
        .unwrap()
        .starts_with("\"calls_per_minute\";r=0;t="));
    let line = gw
        .audit_line(|l| l["status"] == 429 && l["action"] == "billing/get_invoice")
        .await;
    assert_eq!(line["usage"]["calls_per_minute"], 3);
    assert_eq!(upstream.requests().len(), 3);

    // A summed budget: ten concurrent refunds of 200 over both replicas, 1000 in all.
    let mut calls = Vec::new();
    for i in 0..10 {
        let addr = if i % 2 == 0 { gw.addr } else { other_addr };
        calls.push(tokio::spawn(refund(addr, token.clone(), 200)));
    }
    let mut allowed = 0;
    for call in calls {
        let answer = call.await.unwrap();
        match answer.status.as_u16() {
            200 => allowed += 1,
            403 => {}
            other => panic!("{other}: {:?}", answer.body),
        }
    }
    assert!(
        (1..=5).contains(&allowed),
        "{allowed} refunds of 200 within 1000"
    );
    let refunded = upstream
        .requests()
        .iter()
        .filter(|r| r.uri.contains("refunds"))
        .count();
    assert_eq!(
        refunded, allowed,
        "what was allowed, and only that, was forwarded"
    );
    let metrics = gw.metrics().await;
    assert!(
        metric(
            &metrics,
            "toolgate_rate_limited_total{counter=\"calls_per_minute\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );

    // Limits are tested offline with the counters' values given (`authorize --request`).
    for (calls, decided) in [(2, "allow"), (3, "deny")] {
        let request = json!({"agent": "assistant", "user": "alice", "action": "billing/get_invoice",
                             "args": {"invoice_id": 7}, "usage": {"calls_per_minute": calls}});
        let said = authorize(&gw.dir.0, &request, &[]);
        assert_eq!(said["decision"], decided, "{said}");
    }

    // Redis gone: a counted call is refused, never let through uncounted.
    drop(redis.0.kill());
    let _ = redis.0.wait();
    let refused = get_invoice(gw.addr, &token).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
}

const GROUP_LIMITS: &str = r#"
@id("calls-per-minute") @rate_limit
forbid (principal, action == Toolgate::Action::"billing/get_invoice", resource)
when { context has usage && context.usage has calls_per_minute && context.usage.calls_per_minute >= 3 }
unless { principal in Toolgate::Team::"finance-agents" && context has usage && context.usage has calls_per_minute && context.usage.calls_per_minute < 5 };

@id("intern-reads")
permit (principal == Toolgate::Agent::"intern-bot", action == Toolgate::Action::"billing/get_invoice", resource);
"#;

/// A group's exception to a limit (memory store); the limit tested offline by a policy test
/// file and `authorize --explain` with `usage:`; `check` refusing a `sum:` the action does not
/// declare as a Long.
#[tokio::test]
async fn a_group_exception_and_limits_tested_offline() {
    let upstream = Upstream::start().await;
    let schema = schema();
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[
            ("schema.cedarschema", &schema),
            ("limits.cedar", GROUP_LIMITS),
        ],
        inbound: None,
        mcp: None,
        extra_config: COUNTERS,
    })
    .await;
    // The finance team's agent has 5 calls a minute; an agent outside it, 3.
    let intern = gw.idp.sign(json!({"sub": "intern-bot"}));
    for (token, allowed) in [(intern, 3), (gw.idp.delegated(), 5)] {
        for n in 0..allowed {
            assert_eq!(get_invoice(gw.addr, &token).await.status, 200, "call {n}");
        }
        let limited = get_invoice(gw.addr, &token).await;
        assert_eq!(limited.status, 429, "{:?}", limited.body);
    }

    // The same limits as policy tests, with the counters' values given.
    let tests = gw.dir.0.join("limits.test.yaml");
    std::fs::write(
        &tests,
        r#"policies: policies
tests:
  - name: the finance agent's fifth call
    request: { agent: assistant, user: alice, action: billing/get_invoice, args: { invoice_id: 7 }, usage: { calls_per_minute: 4 } }
    expect: allow
  - name: its sixth
    request: { agent: assistant, user: alice, action: billing/get_invoice, args: { invoice_id: 7 }, usage: { calls_per_minute: 5 } }
    expect: deny
    policies: [calls-per-minute]
  - name: the intern's fourth
    request: { agent: intern-bot, action: billing/get_invoice, args: { invoice_id: 7 }, usage: { calls_per_minute: 3 } }
    expect: deny
    policies: [calls-per-minute]
"#,
    )
    .unwrap();
    let out = toolgate(&["test", tests.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let request = json!({"agent": "intern-bot", "action": "billing/get_invoice",
                         "args": {"invoice_id": 7}, "usage": {"calls_per_minute": 3}});
    let said = authorize(&gw.dir.0, &request, &["--explain"]);
    assert_eq!(said["decision"], "deny", "{said}");
    assert_eq!(said["policies"][0]["id"], "calls-per-minute", "{said}");
    assert!(said["policies"][0]["file"]
        .as_str()
        .unwrap()
        .ends_with("limits.cedar"));

    // A sum over an argument the counted action does not declare as a Long would count 0
    // for what is forwarded: refused.
    let config = gw.edited_config("bad.yaml", |t| t.replace("sum: amount", "sum: total"));
    let out = toolgate(&["check", "--config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("sum: total is not a Long argument of billing/refund"),
        "{text}"
    );
}
