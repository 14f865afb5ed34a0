//! Staying up and losing nothing under pressure, against a real `toolgate serve`.

mod common;

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// With the audit writer blocked (its file is a pipe nobody reads), calls are refused with
/// 503 `audit_unavailable` once `audit.buffer` is used up, and nothing is forwarded unrecorded;
/// once the pipe is read again, calls flow; every forwarded call has exactly its audit line.
#[tokio::test]
async fn a_blocked_audit_writer_refuses_calls_instead_of_losing_them() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let fifo = gw.dir.0.join("audit.fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let config = gw.edited_config("blocked.yaml", |t| {
        t.replace(
            "  path: audit.jsonl\n",
            "  path: audit.fifo\n  buffer: 65\n",
        )
    });

    // The reader opens the pipe (so the gateway can), then reads only once released.
    let read = Arc::new(Mutex::new(Vec::<u8>::new()));
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let reader = {
        let (fifo, read) = (fifo.clone(), read.clone());
        std::thread::spawn(move || {
            let mut pipe = std::fs::File::open(fifo).unwrap();
            let _ = release_rx.recv();
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read.lock().unwrap().extend_from_slice(&chunk[..n]),
                }
            }
        })
    };
    let (child, addr, _) = spawn_serve(&config).await;
    let mut child = Killed(child);
    let url = format!("http://{addr}/billing/invoices/1");
    let token = gw.idp.delegated();

    // Calls until the writer has no room left (the pipe holds about 64 KiB).
    let (allowed, refused) = calls_until_refused(&url, &token, 5_000).await;
    assert_eq!(refused.json()["error"], "audit_unavailable");
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(
        upstream.requests().len(),
        allowed,
        "only calls whose line was queued were forwarded"
    );
    // Still refused while blocked: nothing more goes out.
    for _ in 0..5 {
        assert_eq!(get(&url, &token).await.status, 503);
    }
    assert_eq!(upstream.requests().len(), allowed);

    // The pipe is read again: calls flow.
    release_tx.send(()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get(&url, &token).await.status != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls never flowed again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once the writer has caught up (every forwarded call's line is out), it keeps up.
    let lines_read = || read.lock().unwrap().iter().filter(|b| **b == b'\n').count();
    while lines_read() < upstream.requests().len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        let answer = get(&url, &token).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }

    // At shutdown the writer writes out the rest, then the pipe closes.
    child.terminate_and_wait().await;
    reader.join().unwrap();
    let text = String::from_utf8(read.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit line"))
        .collect();
    assert_one_line_per_forwarded_call(&upstream, &lines);
}

/// Beyond `limits.max_in_flight`, requests are shed at once with 503 `overloaded` and
/// `Retry-After`, before any work (not even the token is read): the admitted ones complete,
/// nothing is reset, and once they finish requests pass again.
#[tokio::test]
async fn excess_load_is_shed_fast_while_admitted_calls_complete() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let config = gw.config_with_limits("small.yaml", "  max_in_flight: 4\n");
    let (child, addr, admin) = spawn_serve(&config).await;
    let _child = Killed(child);
    let token = gw.idp.delegated();

    // Four calls in flight, held at the upstream.
    let admitted: Vec<_> = (0..4)
        .map(|i| {
            let (url, token) = (
                format!("http://{addr}/billing/invoices?customer=held-{i}"),
                token.clone(),
            );
            tokio::spawn(async move { get(&url, &token).await.status })
        })
        .collect();
    upstream.wait_for_requests(4).await;

    // Open-loop excess: 40 more, concurrently; each is shed, none forwarded. Half of them
    // carry no valid token: shedding comes before authentication.
    let excess: Vec<_> = (0..40)
        .map(|i| {
            let url = format!("http://{addr}/billing/invoices/1");
            let token = if i % 2 == 0 {
                token.clone()
            } else {
                "not-even-a-token".into()
            };
            tokio::spawn(async move { get(&url, &token).await })
        })
        .collect();
    for answer in excess {
        let answer = answer.await.unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.json()["error"], "overloaded");
        assert_eq!(answer.headers["retry-after"], "1");
    }
    assert_eq!(upstream.requests().len(), 4, "nothing shed was forwarded");

    upstream.release();
    for call in admitted {
        assert_eq!(call.await.unwrap(), 200, "an admitted call failed");
    }
    assert_eq!(
        get(&format!("http://{addr}/billing/invoices/1"), &token)
            .await
            .status,
        200,
        "requests pass again"
    );
    let metrics = send("GET", &format!("http://{admin}/metrics"), &[], b"").await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert_eq!(metric(&text, "toolgate_requests_shed_total"), Some(40.0));
}

/// Too many headers get 431, too long a URI 414, on HTTP/1.1 and HTTP/2, before anything else.
#[tokio::test]
async fn header_count_and_uri_length_are_capped() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let token = format!("Bearer {}", gw.idp.delegated());
    // 64 headers in all pass (62, authorization and the client's host); 65 do not.
    let names: Vec<String> = (0..63).map(|i| format!("x-h{i}")).collect();
    let mut many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    many.push(("authorization", &token));
    let answer = send("GET", &gw.url("/billing/invoices/1"), &many, b"").await;
    assert_eq!(answer.status, 431);
    assert_eq!(answer.json()["error"], "headers_too_large");
    assert_eq!(
        send("GET", &gw.url("/billing/invoices/1"), &many[1..], b"")
            .await
            .status,
        200
    );
    let long = format!("/billing/invoices?customer={}", "a".repeat(8_200));
    let answer = send("GET", &gw.url(&long), &[("authorization", &token)], b"").await;
    assert_eq!(answer.status, 414);
    assert_eq!(answer.json()["error"], "uri_too_long");
    assert_eq!(upstream.requests().len(), 1);
}

/// One HTTP/2 connection gets at most `limits.max_concurrent_streams` (100) requests at once:
/// the 101st waits until one finishes.
#[tokio::test]
async fn an_h2_connection_gets_at_most_100_streams_at_once() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let token = gw.idp.delegated();
    let h2 = http_client(true);
    let calls: Vec<_> = (0..101)
        .map(|i| {
            let request =
                http::Request::get(gw.url(&format!("/billing/invoices?customer=held-{i}")))
                    .header("authorization", format!("Bearer {token}"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
            let h2 = h2.clone();
            tokio::spawn(async move { h2.request(request).await.map(|r| r.status()) })
        })
        .collect();
    upstream.wait_for_requests(100).await;
    // A window for a 101st stream to (wrongly) reach the upstream while the 100 are open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        upstream.requests().len(),
        100,
        "a 101st stream was served at once"
    );
    upstream.release();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), 200);
    }
    assert_eq!(upstream.requests().len(), 101);
}

/// A gateway whose header and body timeouts are one second and idle timeout two, so tests can
/// wait (bounded) for them without waiting long.
async fn impatient(upstream: &Upstream) -> (Gateway, Killed, std::net::SocketAddr) {
    let gw = Gateway::plain(upstream).await;
    let config = gw.config_with_limits(
        "impatient.yaml",
        "  header_read_seconds: 1\n  body_read_seconds: 1\n  idle_seconds: 2\n",
    );
    let (child, addr, _) = spawn_serve(&config).await;
    (gw, Killed(child), addr)
}

/// Reads what the gateway has sent so far (at least a byte; bounded: 10 s).
async fn read_some(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = vec![0; 64 << 10];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("the gateway answered")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).to_string()
}

/// Reads until the gateway closes the connection (bounded: 10 s); returns what it sent.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the gateway closed the connection")
        .ok();
    String::from_utf8_lossy(&answer).to_string()
}

/// Slow or silent clients cannot hold a connection: headers that never finish, a connection
/// that never sends a byte, an idle keep-alive connection, and a stalled body (408).
#[tokio::test]
async fn slow_and_silent_clients_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let (gw, _child, addr) = impatient(&upstream).await;
    let token = gw.idp.delegated();

    // Slowloris: headers begun, never finished: a JSON 408, then closed.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /billing/invoices/1 HTTP/1.1\r\nHost: x\r\nX-a: ")
        .await
        .unwrap();
    let answer = until_closed(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.ends_with("{\"error\":\"request_timeout\"}"),
        "{answer}"
    );

    // Trickled: a byte every 300 ms keeps the connection from going idle (2 s), but the head
    // must still be whole within its second.
    let mut trickled = tokio::net::TcpStream::connect(addr).await.unwrap();
    for byte in b"GET /billing/invoices/1 HTTP/1.1\r\nHost: x\r\nX-a: aaaaaaaa" {
        // Once it is cut off, writes may fail: what it answered is read below.
        if trickled.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let answer = until_closed(&mut trickled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // On a kept-alive connection the next head is timed from the end of the last answer.
    // (A head pipelined behind a request is in hyper's buffer, unseen: closed without a 408.)
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    second
        .write_all(
            format!(
                "GET /billing/invoices/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let first = read_some(&mut second).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    second.write_all(b"GET /billing/inv").await.unwrap();
    let answer = until_closed(&mut second).await;
    assert!(answer.contains("HTTP/1.1 408"), "{answer}");

    // Silent: connected, nothing sent (before HTTP/1.1 or HTTP/2 is even known).
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    until_closed(&mut silent).await;

    // Idle keep-alive: one request answered, then nothing.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(
        format!(
            "GET /billing/invoices/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answered = until_closed(&mut idle).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    // Stalled body: 10 of 100 bytes, then nothing: 408 and the connection ends.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(
            format!(
                "POST /billing/refunds HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"invoice_"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = until_closed(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(
        upstream.requests().len(),
        2,
        "only the idle and the kept-alive connections' first calls"
    );
}

/// A task flood is bounded: an agent's live tasks (429 `too_many_tasks`), the intent's size
/// (400), and the credentials one task records (429 `task_credential_limit`, nothing forwarded).
#[tokio::test]
async fn task_state_is_bounded() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: None,
        mcp: None,
        extra_config: "tasks:\n  max_active_per_agent: 3\n  max_intent_bytes: 64\n  max_credentials_per_task: 2\n",
    })
    .await;
    let token = format!("Bearer {}", gw.idp.delegated());
    let start = async |intent: &str| {
        send(
            "POST",
            &gw.url("/v1/tasks"),
            &[
                ("authorization", &token),
                ("content-type", "application/json"),
            ],
            serde_json::json!({"intent": intent, "ttl_seconds": 60})
                .to_string()
                .as_bytes(),
        )
        .await
    };
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let started = start("read invoices").await;
        assert_eq!(started.status, 201);
        tasks.push(started.json()["task_id"].as_str().unwrap().to_string());
    }
    let flood = start("read invoices").await;
    assert_eq!(flood.status, 429);
    assert_eq!(flood.json()["error"], "too_many_tasks");
    assert_eq!(start(&"x".repeat(65)).await.status, 400);
    // Ending one frees a place.
    let done = send(
        "POST",
        &gw.url(&format!("/v1/tasks/{}/complete", tasks[0])),
        &[("authorization", &token)],
        b"",
    )
    .await;
    assert_eq!(done.status, 200);
    assert_eq!(start("read invoices").await.status, 201);

    let call = async || {
        send(
            "GET",
            &gw.url("/billing/invoices/1"),
            &[("authorization", &token), ("toolgate-task", &tasks[1])],
            b"",
        )
        .await
    };
    assert_eq!(call().await.status, 200);
    assert_eq!(call().await.status, 200);
    let third = call().await;
    assert_eq!(third.status, 429);
    assert_eq!(third.json()["error"], "task_credential_limit");
    assert_eq!(upstream.requests().len(), 2);
}

/// Beyond `limits.max_connections` open connections, a new one is closed at once; when one
/// closes, the next is served.
#[tokio::test]
async fn the_connection_cap_holds() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let config = gw.config_with_limits("two.yaml", "  max_connections: 2\n");
    let (child, addr, admin) = spawn_serve(&config).await;
    let _child = Killed(child);
    let token = gw.idp.delegated();
    let request = format!(
        "GET /billing/invoices/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );

    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = third.write_all(request.as_bytes()).await;
    let answer = until_closed(&mut third).await;
    assert!(answer.is_empty(), "a third connection was served: {answer}");

    drop(first);
    // The freed place is taken by the next connection (bounded wait for the close to land).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut next = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = next.write_all(request.as_bytes()).await;
        if until_closed(&mut next).await.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place was never taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = send("GET", &format!("http://{admin}/metrics"), &[], b"").await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(metric(&text, "toolgate_connections_refused_total").unwrap() >= 1.0);
}

/// Revocation feeds are capped (503 `feed_full` beyond `tasks.max_feed_subscribers`), and at
/// shutdown an open feed ends cleanly so the gateway exits without waiting out the drain.
#[tokio::test]
async fn feeds_are_capped_and_end_at_shutdown() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: None,
        mcp: None,
        extra_config: "tasks:\n  max_feed_subscribers: 2\n",
    })
    .await;
    let token = gw.idp.delegated();
    let client = http_client(false);
    let open = || {
        client.request(
            http::Request::get(gw.url("/v1/revocations"))
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
    };
    let first = open().await.unwrap();
    let second = open().await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open().await.unwrap();
    assert_eq!(third.status(), 503);
    drop(second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        let answer = open().await.unwrap();
        if answer.status() == 200 {
            break answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // SIGTERM: both open feeds end, and the gateway exits well before its 30 s drain.
    gw.terminate();
    for feed in [first, again] {
        let mut body = feed.into_body();
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                if frame.is_err() {
                    break;
                }
            }
        })
        .await
        .expect("the feed ended at shutdown");
    }
    assert!(gw.exited().await.success());
}

/// Many distinct valid tokens: the verified-token cache stays at `inbound.token_cache_size`,
/// and every call still passes (verified again when it is not remembered).
#[tokio::test]
async fn the_token_cache_stays_at_its_bound() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: Some(format!(
            "inbound:\n  token_cache_size: 10\n  jwt:\n    - issuer: {IDP}\n      jwks_file: idp.jwks.json\n      audiences: [{AUDIENCE}]\n"
        )),
        mcp: None,
        extra_config: "",
    })
    .await;
    for n in 0..40 {
        let token = gw
            .idp
            .sign(serde_json::json!({"sub": "alice", "act": {"sub": "assistant"}, "n": n}));
        assert_eq!(
            get(&gw.url("/billing/invoices/1"), &token).await.status,
            200
        );
        let entries = metric(&gw.metrics().await, "toolgate_token_cache_entries").unwrap();
        assert!(entries <= 10.0, "{entries} cached tokens");
    }
}

/// An upstream's own `max_in_flight`: when its calls fill it, more calls to it are shed (503)
/// while other upstreams are served.
#[tokio::test]
async fn one_slow_upstream_cannot_take_every_place() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let config = gw.edited_config("per-upstream.yaml", |t| {
        t.replace(
            "    timeout_seconds: 30\n",
            "    timeout_seconds: 30\n    max_in_flight: 2\n",
        )
    });
    let (child, addr, _) = spawn_serve(&config).await;
    let _child = Killed(child);
    let token = gw.idp.delegated();
    let held: Vec<_> = (0..2)
        .map(|i| {
            let (url, token) = (
                format!("http://{addr}/billing/invoices?customer=held-{i}"),
                token.clone(),
            );
            tokio::spawn(async move { get(&url, &token).await.status })
        })
        .collect();
    upstream.wait_for_requests(2).await;
    let shed = get(&format!("http://{addr}/billing/invoices/1"), &token).await;
    assert_eq!(shed.status, 503);
    assert_eq!(shed.json()["error"], "overloaded");
    let other = get(
        &format!("http://{addr}/records/patients/p-100/record"),
        &token,
    )
    .await;
    assert_eq!(other.status, 200, "another upstream is served");
    upstream.release();
    for call in held {
        assert_eq!(call.await.unwrap(), 200, "a held call failed");
    }
}

/// An upstream that stops sending in the middle of its answer is cut off after the upstream's
/// `response_idle_seconds`: the agent's stream ends instead of hanging.
#[tokio::test]
async fn a_stalled_upstream_answer_is_cut_off() {
    let upstream = Upstream::start().await;
    let (_child, mut body) = streamed_ping(&upstream, |gw| {
        gw.edited_config("stalled.yaml", |t| {
            t.replace(
                "    kind: mcp\n",
                "    kind: mcp\n    response_idle_seconds: 1\n",
            )
        })
    })
    .await;
    // The recorder sends one event, then holds the rest until released (never, here).
    let mut ended = String::new();
    while let Some(more) = next_chunk(&mut body).await {
        ended.push_str(&more);
    }
    assert!(ended.contains("notifications/progress"), "{ended}");
    assert!(!ended.contains("\"result\""), "{ended}");
}

/// An agent that resets its stream once the call was forwarded still leaves the call's audit
/// line (status 499, with the credential the upstream received).
#[tokio::test]
async fn a_cancelled_call_is_still_recorded() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let token = gw.idp.delegated();
    let h2 = http_client(true);
    let request = http::Request::get(gw.url("/billing/invoices?customer=held-cancel"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let call = tokio::spawn(async move { h2.request(request).await });
    upstream.wait_for_requests(1).await;
    call.abort(); // the stream is reset while the upstream holds the call
    let seen = upstream.requests()[0].headers["authorization"]
        .to_str()
        .unwrap()[7..]
        .to_string();
    let jti = claims_of(&seen)["jti"].as_str().unwrap().to_string();
    let line = gw.audit_line(|l| l["jti"] == jti.as_str()).await;
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["decision"], "allow");
    upstream.release();
}

/// A tool that works quietly keeps its event stream alive: a comment line every
/// `limits.sse_keepalive_seconds`, only between lines, so the events around it arrive whole.
#[tokio::test]
async fn a_quiet_upstream_stream_gets_keep_alive_comments() {
    let upstream = Upstream::start().await;
    let (_child, mut body) = streamed_ping(&upstream, |gw| {
        gw.config_with_limits("keepalive.yaml", "  sse_keepalive_seconds: 1\n")
    })
    .await;
    let mut text = String::new();
    while text.matches(": keep-alive\n").count() < 2 {
        text.push_str(&next_chunk(&mut body).await.expect("the stream ended early"));
    }
    upstream.release();
    while let Some(more) = next_chunk(&mut body).await {
        text.push_str(&more);
    }
    let (progress, rest) = text.split_once("\n\n").unwrap();
    assert!(progress.contains("notifications/progress"), "{text}");
    assert!(rest.starts_with(": keep-alive\n: keep-alive\n"), "{text}");
    let data: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("a whole event"))
        .collect();
    assert_eq!(data.len(), 2, "{text}");
    assert_eq!(data[1]["id"], 1);
}

/// Calls `url` until one is refused (503, the audit writer out of room), at most `bound`
/// allowed first; the allowed count and the refusal.
async fn calls_until_refused(url: &str, token: &str, bound: usize) -> (usize, Answer) {
    let mut allowed = 0;
    loop {
        let answer = get(url, token).await;
        match answer.status.as_u16() {
            200 => allowed += 1,
            503 => return (allowed, answer),
            other => panic!("unexpected {other}"),
        }
        assert!(allowed < bound, "the writer never refused a call");
    }
}

/// Every call the upstream received has exactly one `allow` line with its credential's `jti`.
fn assert_one_line_per_forwarded_call(upstream: &Upstream, lines: &[Value]) {
    let forwarded: Vec<String> = upstream
        .requests()
        .iter()
        .map(|r| {
            let credential = r.headers["authorization"].to_str().unwrap()[7..].to_string();
            claims_of(&credential)["jti"].as_str().unwrap().to_string()
        })
        .collect();
    let audited: Vec<&str> = lines
        .iter()
        .filter(|l| l["decision"] == "allow")
        .filter_map(|l| l["jti"].as_str())
        .collect();
    assert_eq!(
        audited.len(),
        forwarded.len(),
        "one line per forwarded call"
    );
    for jti in &forwarded {
        assert!(
            audited.contains(&jti.as_str()),
            "{jti} forwarded unrecorded"
        );
    }
}

/// A gateway in front of the recorder's MCP endpoint, served with the config `configure` writes, and the
/// answer to a `ping` sent with `X-Test-Stream`: a progress event at once, the result only once
/// the upstream is released.
async fn streamed_ping(
    upstream: &Upstream,
    configure: impl FnOnce(&Gateway) -> std::path::PathBuf,
) -> (Killed, hyper::body::Incoming) {
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: None,
        mcp: Some(format!("http://{}/mcp", upstream.addr)),
        extra_config: "",
    })
    .await;
    let (child, addr, _) = spawn_serve(&configure(&gw)).await;
    let response = http_client(false)
        .request(
            http::Request::post(format!("http://{addr}/tools"))
                .header("authorization", format!("Bearer {}", gw.idp.delegated()))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("x-test-stream", "1")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    (Killed(child), response.into_body())
}

/// The next piece of a streamed answer, or `None` at its end.
async fn next_chunk(body: &mut hyper::body::Incoming) -> Option<String> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::frame(body),
    )
    .await
    {
        Ok(Some(Ok(frame))) => {
            Some(String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap())
        }
        Ok(_) => None,
        Err(_) => panic!("the stream carried nothing for 10 s"),
    }
}

/// At shutdown an HTTP/2 connection gets GOAWAY: the call in flight on it finishes, a new
/// stream on the same connection is refused, and the gateway exits 0.
#[tokio::test]
async fn shutdown_sends_http2_goaway_and_finishes_the_open_stream() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::plain(&upstream).await;
    let token = gw.idp.delegated();
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let base = gw.url("");
    let request = |path: &str| {
        http::Request::get(format!("{base}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let held = send.send_request(request("/billing/invoices?customer=held-goaway"));
    let held = tokio::spawn(held);
    upstream.wait_for_requests(1).await;
    gw.terminate();
    // Shutdown has begun once the listener closes; by then the connection has its GOAWAY,
    // so a new stream on it is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still listening");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = match send.ready().await {
        Err(_) => true,
        Ok(()) => send
            .send_request(request("/billing/invoices/1"))
            .await
            .is_err(),
    };
    assert!(refused, "a new stream was accepted after GOAWAY");
    assert_eq!(
        upstream.requests().len(),
        1,
        "a stream after GOAWAY went out"
    );
    upstream.release();
    let answer = held.await.unwrap().expect("the open stream was cut");
    assert_eq!(answer.status(), 200);
    let status = gw.exited().await;
    assert!(status.success(), "{status:?}");
}

/// A full disk (the audit file is `/dev/full`): writes fail, counted and logged; once the
/// writer's room is used up calls are refused; when space returns the writer reopens the file
/// by itself and everything queued is written. Then a rotation (the file moved away, SIGHUP):
/// new lines go to a new file. Across both files, one line per forwarded call.
#[tokio::test]
async fn the_audit_survives_a_full_disk_and_a_rotated_file() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let dir = gw.dir.0.clone();
    let audit = dir.join("disk.jsonl");
    std::os::unix::fs::symlink("/dev/full", &audit).unwrap();
    let config = gw.edited_config("disk.yaml", |t| {
        t.replace(
            "  path: audit.jsonl\n",
            "  path: disk.jsonl\n  buffer: 65\n",
        )
    });
    let (child, addr, admin) = spawn_serve_logging(&config, "warn", Some(&dir)).await;
    let mut child = Killed(child);
    let url = format!("http://{addr}/billing/invoices/1");
    let token = gw.idp.delegated();

    let (allowed, refused) = calls_until_refused(&url, &token, 1_000).await;
    assert_eq!(refused.json()["error"], "audit_unavailable");
    assert_eq!(upstream.requests().len(), allowed);
    let metrics = get(&format!("http://{admin}/metrics"), "").await.body;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metric(&metrics, "toolgate_audit_write_errors_total").unwrap() >= 1.0);
    assert!(metric(&metrics, "toolgate_audit_refused_total").unwrap() >= 1.0);
    let stderr = std::fs::read_to_string(dir.join("stderr.log")).unwrap();
    assert!(stderr.contains("audit write failed"), "{stderr}");

    // Space again: the writer's own retry reopens the path, now a real file.
    std::fs::remove_file(&audit).unwrap();
    std::fs::write(&audit, b"").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while get(&url, &token).await.status != 200 {
        assert!(tokio::time::Instant::now() < deadline, "calls never flowed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Rotation: the file moves away, SIGHUP, and new lines go to a new file.
    let rotated = dir.join("disk.jsonl.1");
    std::fs::rename(&audit, &rotated).unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !audit.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new file after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        assert_eq!(get(&url, &token).await.status, 200);
    }
    child.terminate_and_wait().await;

    let read = |path: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a whole audit line"))
            .collect()
    };
    let (before, after) = (read(&rotated), read(&audit));
    assert!(!after.is_empty(), "nothing written after the rotation");
    let lines: Vec<Value> = before.into_iter().chain(after).collect();
    assert_one_line_per_forwarded_call(&upstream, &lines);
}
