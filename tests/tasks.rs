//! Just-in-time tasks end to end: lifecycle, task-bound credentials, revocation at completion
//! (introspection and the SSE feed), expiry, approvals; and two replicas sharing a real
//! redis-server (installed by scripts/test-deps.sh), including Redis going away and coming back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use serde_json::json;

/// Refunds above 100 need a human approval in the task.
const APPROVAL_GATE: &str = r#"
@id("refund-needs-approval")
forbid (principal, action == Toolgate::Action::"billing/refund", resource)
when { context.args.amount > 100 }
unless { context has task && context.task has approved && context.task.approved };
"#;

async fn gateway(upstream: &Upstream, extra_config: &str) -> Gateway {
    Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[("approval.cedar", APPROVAL_GATE)],
        inbound: None,
        mcp: None,
        extra_config,
    })
    .await
}

fn auth(token: &str) -> String {
    format!("Bearer {token}")
}

async fn start_task(base: &str, token: &str, ttl: u64) -> Answer {
    let body = json!({"intent": "refund invoice 42", "ttl_seconds": ttl}).to_string();
    send(
        "POST",
        &format!("{base}/v1/tasks"),
        &[
            ("authorization", &auth(token)),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

async fn in_task(base: &str, path: &str, token: &str, task: &str) -> Answer {
    send(
        "GET",
        &format!("{base}{path}"),
        &[("authorization", &auth(token)), ("toolgate-task", task)],
        b"",
    )
    .await
}

async fn introspect(base: &str, token: &str, credential: &str) -> Answer {
    let form = format!("token={credential}");
    send(
        "POST",
        &format!("{base}/oauth2/introspect"),
        &[
            ("authorization", &auth(token)),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        form.as_bytes(),
    )
    .await
}

fn last_credential(upstream: &Upstream) -> String {
    let seen = upstream.requests();
    let header = seen.last().expect("a forwarded call").headers["authorization"]
        .to_str()
        .unwrap()
        .to_string();
    header.strip_prefix("Bearer ").unwrap().to_string()
}

#[tokio::test]
async fn task_lifecycle_revokes_every_credential_at_completion() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream, "").await;
    let base = gw.url("");
    let token = gw.idp.delegated();

    let started = start_task(&base, &token, 120).await;
    assert_eq!(started.status, 201, "{:?}", started.body);
    let task = started.json()["task_id"].as_str().unwrap().to_string();
    let expires: chrono::DateTime<chrono::Utc> = started.json()["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // The revocation feed, open before the task ends.
    let feed_client = http_client(false);
    let feed = feed_client
        .request(
            http::Request::get(gw.url("/v1/revocations"))
                .header("authorization", auth(&token))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(feed.headers()["content-type"], "text/event-stream");
    let mut feed = feed.into_body();

    // A call in the task gets a credential bound to it, and it introspects active.
    assert_eq!(
        in_task(&base, "/billing/invoices/1", &token, &task)
            .await
            .status,
        200
    );
    let credential = last_credential(&upstream);
    let claims = claims_of(&credential);
    assert_eq!(claims["task_id"], task.as_str());
    assert!(claims["exp"].as_i64().unwrap() <= expires.timestamp());
    let active = introspect(&base, &token, &credential).await.json();
    assert_eq!(active["active"], true, "{active}");
    assert_eq!(
        (active["task_id"].as_str(), active["jti"].as_str()),
        (Some(task.as_str()), claims["jti"].as_str())
    );
    // A credential minted outside any task is active too; garbage is not.
    assert_eq!(
        get(&gw.url("/billing/invoices/2"), &token).await.status,
        200
    );
    let outside = last_credential(&upstream);
    assert_ne!(outside, credential, "the second call's own credential");
    assert!(claims_of(&outside).get("task_id").is_none());
    let active = introspect(&base, &token, &outside).await.json();
    assert_eq!(active["active"], true, "{active}");
    assert_eq!(active["jti"], claims_of(&outside)["jti"]);
    assert!(active.get("task_id").is_none(), "{active}");
    assert_eq!(
        introspect(&base, &token, "not-a-token").await.json(),
        json!({"active": false})
    );
    // Introspection itself needs an authenticated caller.
    let anonymous = send(
        "POST",
        &gw.url("/oauth2/introspect"),
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("token={credential}").as_bytes(),
    )
    .await;
    assert_eq!(anonymous.status, 401);

    let status = send(
        "GET",
        &gw.url(&format!("/v1/tasks/{task}")),
        &[("authorization", &auth(&token))],
        b"",
    )
    .await;
    assert_eq!(status.json()["state"], "active");

    // Another agent can neither read nor end it.
    let other = gw.idp.sign(json!({"sub": "intern-bot"}));
    for (method, path) in [
        ("GET", format!("/v1/tasks/{task}")),
        ("POST", format!("/v1/tasks/{task}/complete")),
    ] {
        assert_eq!(
            send(
                method,
                &gw.url(&path),
                &[("authorization", &auth(&other))],
                b""
            )
            .await
            .status,
            403
        );
    }

    // Completion: from that moment the credential reads inactive, and calls in the task are refused.
    let done = send(
        "POST",
        &gw.url(&format!("/v1/tasks/{task}/complete")),
        &[("authorization", &auth(&token))],
        b"",
    )
    .await;
    assert_eq!(done.status, 200, "{:?}", done.body);
    assert_eq!(done.json()["revoked"], 1);
    // At once: the very next introspection, with no wait, reads inactive.
    assert_eq!(
        introspect(&base, &token, &credential).await.json(),
        json!({"active": false})
    );
    assert_eq!(
        in_task(&base, "/billing/invoices/1", &token, &task)
            .await
            .status,
        403
    );
    let again = send(
        "POST",
        &gw.url(&format!("/v1/tasks/{task}/complete")),
        &[("authorization", &auth(&token))],
        b"",
    )
    .await;
    assert_eq!(again.status, 409);

    // The feed announced the revocation with the credential's jti.
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        let mut text = String::new();
        while !text.contains("event: revocation") || !text.ends_with("\n\n") {
            let frame = feed.frame().await.expect("feed open").unwrap();
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
        text
    })
    .await
    .expect("a revocation event within 5 s");
    assert!(
        event.contains(claims["jti"].as_str().unwrap()) && event.contains(&task),
        "{event}"
    );

    // The audit line of the task-bound call names the task and the credential.
    gw.audit_line(|l| l["task_id"] == task.as_str() && l["jti"] == claims["jti"])
        .await;

    // A restart with the memory store forgets the task: its id is unknown, hence denied.
    let (mut replica, addr) = gw.replica().await;
    let after_restart = in_task(
        &format!("http://{addr}"),
        "/billing/invoices/1",
        &token,
        &task,
    )
    .await;
    assert_eq!(after_restart.status, 403);
    let decision = after_restart.json()["decision_id"].clone();
    gw.audit_line(|l| {
        l["decision_id"] == decision && l["errors"][0] == format!("task {task} is unknown").as_str()
    })
    .await;
    let _ = replica.kill();
    let _ = replica.wait();
}

#[tokio::test]
async fn expiry_unknown_tasks_required_tasks_and_approvals() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream, "").await;
    let base = gw.url("");
    let token = gw.idp.delegated();

    // A task must be authorized (start_task): an agent outside the teams may not start one.
    let outsider = gw.idp.sign(json!({"sub": "intern-bot"}));
    assert_eq!(start_task(&base, &outsider, 60).await.status, 403);
    assert_eq!(start_task(&base, &token, 0).await.status, 400);

    // Unknown task: denied. A tool that needs a task: denied without one, allowed in one.
    assert_eq!(
        in_task(&base, "/billing/invoices/1", &token, "no-such-task")
            .await
            .status,
        403
    );
    assert_eq!(
        get(&gw.url("/billing/in-task/invoices"), &token)
            .await
            .status,
        403
    );
    let task = start_task(&base, &token, 60).await.json()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        in_task(&base, "/billing/in-task/invoices", &token, &task)
            .await
            .status,
        200
    );

    // Approval gate: a refund over 100 needs a human approval recorded on the task.
    let refund = |task: String| {
        let (url, token) = (gw.url("/billing/refunds"), token.clone());
        async move {
            send(
                "POST",
                &url,
                &[
                    ("authorization", &auth(&token)),
                    ("toolgate-task", &task),
                    ("content-type", "application/json"),
                ],
                br#"{"invoice_id": 42, "amount": 250}"#,
            )
            .await
        }
    };
    let denied = refund(task.clone()).await;
    assert_eq!(denied.status, 403);
    let approve =
        json!({"approver": "bob@example.com", "actions": ["billing/refund"], "note": "ticket 7"})
            .to_string();
    let approved = gw
        .admin(
            "POST",
            &format!("/admin/tasks/{task}/approve"),
            approve.as_bytes(),
        )
        .await;
    assert_eq!(approved.status, 200, "{:?}", approved.body);
    assert_eq!(refund(task.clone()).await.status, 200);
    let line = gw
        .audit_line(|l| l["action"] == "billing/refund" && l["decision"] == "allow")
        .await;
    assert_eq!(line["approval"]["approver"], "bob@example.com");
    assert_eq!(line["task_id"], task.as_str());
    // Outside the task the same refund is still denied.
    let outside = send(
        "POST",
        &gw.url("/billing/refunds"),
        &[
            ("authorization", &auth(&token)),
            ("content-type", "application/json"),
        ],
        br#"{"invoice_id": 42, "amount": 250}"#,
    )
    .await;
    assert_eq!(outside.status, 403);

    // Expiry: a short task refuses calls once its deadline passes. Two seconds, not one:
    // deadlines are whole seconds, so a one-second task started late in a second could
    // already be over when its first call comes a millisecond later.
    let short = start_task(&base, &token, 2).await.json()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        in_task(&base, "/billing/invoices/1", &token, &short)
            .await
            .status,
        200
    );
    let credential = last_credential(&upstream);
    // Waits (bounded) for the deadline to pass, as the task's own state says.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = gw.admin("GET", &format!("/admin/tasks/{short}"), b"").await;
        assert_eq!(status.status, 200);
        if status.json()["state"] == "expired" {
            break;
        }
        assert_eq!(status.json()["state"], "active");
        assert!(Instant::now() < deadline, "the task never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = in_task(&base, "/billing/invoices/1", &token, &short).await;
    assert_eq!(refused.status, 403);
    let decision = refused.json()["decision_id"].clone();
    gw.audit_line(|l| {
        l["decision_id"] == decision
            && l["errors"][0] == format!("task {short} is expired").as_str()
    })
    .await;
    assert_eq!(
        introspect(&base, &token, &credential).await.json()["active"],
        false
    );
}

/// A redis-server of the test's own, on a free loopback port, persisting every write to `dir`
/// (AOF, fsync always) so a restart keeps its data.
struct Redis {
    server: Option<Killed>,
    port: u16,
    dir: std::path::PathBuf,
}

/// Every acknowledged write is in the file before the reply: with the default (everysec)
/// Redis may postpone the write under disk load and lose it at the kill.
const DURABLE: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

impl Redis {
    async fn start(dir: &std::path::Path) -> Redis {
        let (server, port) = start_redis(dir, &DURABLE).await;
        Redis {
            server: Some(server),
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn kill(&mut self) {
        self.server = None;
    }

    /// Starts it again on the same port (the replicas know it by that), with its data.
    async fn restart(&mut self) {
        self.kill();
        let mut server = Killed(
            redis_command(&self.dir, self.port, &DURABLE)
                .spawn()
                .unwrap(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                server.0.try_wait().unwrap().is_none(),
                "redis-server exited at restart (port {} taken?)",
                self.port
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not come back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.server = Some(server);
    }
}

#[tokio::test]
async fn replicas_share_tasks_through_redis_and_fail_closed_without_it() {
    let data = TempDir::new("redis");
    let mut redis = Redis::start(&data.0).await;
    let port = redis.port;
    let upstream = Upstream::start().await;
    let store = format!(
        "tasks:\n  store: redis://127.0.0.1:{port}\n  max_active_per_agent: 4\n  max_credentials_per_task: 3\n  max_tasks: 6\n"
    );
    let gw = gateway(&upstream, &store).await;
    let (mut replica_b, b_addr) = gw.replica().await;
    let (a, b) = (gw.url(""), format!("http://{b_addr}"));
    let token = gw.idp.delegated();

    // Started on A, joined on B.
    let task = start_task(&a, &token, 120).await.json()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        in_task(&b, "/billing/invoices/1", &token, &task)
            .await
            .status,
        200
    );
    let minted_on_b = last_credential(&upstream);
    assert_eq!(
        introspect(&a, &token, &minted_on_b).await.json()["active"],
        true
    );

    // Completed on A: B refuses at once, and the credential B minted reads inactive on both.
    assert_eq!(
        send(
            "POST",
            &format!("{a}/v1/tasks/{task}/complete"),
            &[("authorization", &auth(&token))],
            b""
        )
        .await
        .status,
        200
    );
    assert_eq!(
        in_task(&b, "/billing/invoices/1", &token, &task)
            .await
            .status,
        403
    );
    assert_eq!(
        introspect(&b, &token, &minted_on_b).await.json()["active"],
        false
    );
    assert_eq!(
        introspect(&a, &token, &minted_on_b).await.json()["active"],
        false
    );

    // Redis goes away: task-bound calls fail closed with 503; other calls are unaffected.
    let live = start_task(&a, &token, 300).await.json()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        in_task(&a, "/billing/invoices/1", &token, &live)
            .await
            .status,
        200
    );
    let live_credential = last_credential(&upstream);
    redis.kill();
    let refused = in_task(&a, "/billing/invoices/1", &token, &live).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(refused.json()["error"], "task_store_unavailable");
    assert_eq!(start_task(&b, &token, 60).await.status, 503);
    assert_eq!(
        get(&format!("{b}/billing/invoices/1"), &token).await.status,
        200
    );
    // Task reads, completion and introspection of a task credential fail closed too.
    let read = send(
        "GET",
        &format!("{a}/v1/tasks/{live}"),
        &[("authorization", &auth(&token))],
        b"",
    )
    .await;
    assert_eq!(read.status, 503, "{:?}", read.body);
    let complete = send(
        "POST",
        &format!("{a}/v1/tasks/{live}/complete"),
        &[("authorization", &auth(&token))],
        b"",
    )
    .await;
    assert_eq!(complete.status, 503, "{:?}", complete.body);
    let introspection = introspect(&a, &token, &live_credential).await;
    assert_eq!(introspection.status, 503, "{:?}", introspection.body);

    // Redis comes back: nothing was lost, the ended task stays ended, the live one works.
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = in_task(&b, "/billing/invoices/1", &token, &live).await;
        if answer.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery within 15 s (last {} {:?})",
            answer.status,
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        in_task(&a, "/billing/invoices/1", &token, &live)
            .await
            .status,
        200
    );
    // The ended task is remembered as ended, not forgotten (which would be denied too).
    let ended = in_task(&a, "/billing/invoices/1", &token, &task).await;
    assert_eq!(ended.status, 403);
    let decision = ended.json()["decision_id"].clone();
    gw.audit_line(|l| {
        l["decision_id"] == decision
            && l["errors"][0] == format!("task {task} is completed").as_str()
    })
    .await;

    // Bounds hold across replicas: `live` has its 3 credentials; the agent's live tasks are
    // counted wherever they were started (one live now, so three more, then 429).
    let full = in_task(&a, "/billing/invoices/1", &token, &live).await;
    assert_eq!(full.status, 429, "{:?}", full.body);
    assert_eq!(full.json()["error"], "task_credential_limit");
    let mut started = Vec::new();
    for base in [&a, &b, &a] {
        let answer = start_task(base, &token, 60).await;
        assert_eq!(answer.status, 201);
        started.push(answer.json()["task_id"].as_str().unwrap().to_string());
    }
    let over = start_task(&b, &token, 60).await;
    assert_eq!(over.status, 429, "{:?}", over.body);
    assert_eq!(over.json()["error"], "too_many_tasks");
    // Ended tasks are still remembered: 5 of 6 now; one more fits, then the store is full
    // for every replica (503), although the agent has room again.
    let complete = |id: String| {
        let url = format!("{a}/v1/tasks/{id}/complete");
        let token = token.clone();
        async move { send("POST", &url, &[("authorization", &auth(&token))], b"").await }
    };
    assert_eq!(complete(started[0].clone()).await.status, 200);
    assert_eq!(start_task(&b, &token, 60).await.status, 201);
    assert_eq!(complete(started[1].clone()).await.status, 200);
    let full = start_task(&a, &token, 60).await;
    assert_eq!(full.status, 503, "{:?}", full.body);
    assert_eq!(full.json()["error"], "task_store_full");
    let _ = replica_b.kill();
    let _ = replica_b.wait();
}

/// `tasks.store_password_file`: the Redis password read from a file (a mounted Secret), so
/// the config holds none; a wrong one fails closed (503), and no error says the password.
#[tokio::test]
async fn the_redis_password_is_read_from_its_file() {
    let data = TempDir::new("redis-auth");
    let password = "a-password/with:odd@characters";
    let (_redis, port) = start_redis(&data.0, &["--requirepass", password]).await;
    let upstream = Upstream::start().await;
    let secret = data.0.join("redis.password");
    std::fs::write(&secret, format!("{password}\n")).unwrap();
    let store = format!(
        "tasks:\n  store: redis://127.0.0.1:{port}\n  store_password_file: {}\n",
        secret.display()
    );
    let gw = gateway(&upstream, &store).await;
    let token = gw.idp.delegated();
    let started = start_task(&gw.url(""), &token, 60).await;
    assert_eq!(started.status, 201, "{:?}", started.body);

    std::fs::write(&secret, "wrong\n").unwrap();
    let (mut wrong, wrong_addr) = gw.replica().await;
    let refused = start_task(&format!("http://{wrong_addr}"), &token, 60).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    let said = String::from_utf8_lossy(&refused.body);
    assert!(
        !said.contains(password) && !said.contains("wrong"),
        "{said}"
    );
    let _ = wrong.kill();
}
