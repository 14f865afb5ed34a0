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
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: None,
        mcp: None,
        extra_config: "",
    })
    .await;
    let fifo = gw.dir.0.join("audit.fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let config = gw.dir.0.join("blocked.yaml");
    let text = std::fs::read_to_string(gw.dir.0.join("toolgate.yaml"))
        .unwrap()
        .replace("  path: audit.jsonl\n", "  path: audit.fifo\n  buffer: 4\n");
    std::fs::write(&config, text).unwrap();

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
    let mut allowed = 0;
    let refused = loop {
        let answer = get(&url, &token).await;
        match answer.status.as_u16() {
            200 => allowed += 1,
            503 => break answer,
            other => panic!("unexpected {other}"),
        }
        assert!(allowed < 5_000, "the blocked writer never refused a call");
    };
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
    for _ in 0..20 {
        assert_eq!(get(&url, &token).await.status, 200);
    }

    // At shutdown the writer writes out the rest, then the pipe closes.
    assert!(std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status()
        .unwrap()
        .success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while child.0.try_wait().unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.join().unwrap();
    let text = String::from_utf8(read.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit line"))
        .collect();
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
