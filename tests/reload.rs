//! Hot reload end to end: file watch, SIGHUP, the admin endpoint, config upstreams, JWKS
//! files; and reloads under constant load with zero failed requests.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const PERMIT_DELETE: &str =
    "@id(\"allow-delete\")\npermit (principal, action == Toolgate::Action::\"records/delete_patient_record\", resource);\n";

async fn gateway(upstream: &Upstream, extra_config: &str) -> Gateway {
    Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: None,
        mcp: None,
        extra_config,
    })
    .await
}

/// Polls (bounded) until `status` answers `want`.
async fn eventually(what: &str, want: u16, mut status: impl AsyncFnMut() -> u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = status().await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got} after 10 s, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn delete_status(gw: &Gateway, token: &str) -> u16 {
    send(
        "DELETE",
        &gw.url("/records/patients/p-100/record"),
        &[("authorization", &format!("Bearer {token}"))],
        b"",
    )
    .await
    .status
    .as_u16()
}

/// The config named as the README spells it, `--config toolgate.yaml` in its own folder: the
/// policy folder is watched all the same.
#[tokio::test]
async fn files_are_watched_when_the_config_is_named_relative_to_its_folder() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream, "reload:\n  debounce_ms: 100\n").await;
    let (child, addr, _) = spawn_serve_in(&gw.dir.0, "toolgate.yaml").await;
    let _child = Killed(child);
    let token = gw.idp.delegated();
    let status = async || {
        let url = format!("http://{addr}/records/patients/p-100/record");
        let auth = format!("Bearer {token}");
        send("DELETE", &url, &[("authorization", &auth)], b"")
            .await
            .status
            .as_u16()
    };
    assert_eq!(status().await, 403);
    std::fs::write(gw.dir.0.join("policies/extra.cedar"), PERMIT_DELETE).unwrap();
    eventually(
        "permit picked up by the relatively named gateway",
        200,
        status,
    )
    .await;
}

#[tokio::test]
async fn policy_files_are_watched() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream, "reload:\n  debounce_ms: 100\n").await;
    let token = gw.idp.delegated();
    assert_eq!(delete_status(&gw, &token).await, 403);
    std::fs::write(gw.dir.0.join("policies/extra.cedar"), PERMIT_DELETE).unwrap();
    eventually("permit picked up from the file", 200, async || {
        delete_status(&gw, &token).await
    })
    .await;
    std::fs::remove_file(gw.dir.0.join("policies/extra.cedar")).unwrap();
    eventually("permit gone with its file", 403, async || {
        delete_status(&gw, &token).await
    })
    .await;
}

#[tokio::test]
async fn sighup_reloads_policies_keys_and_upstreams() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream, "reload:\n  watch: false\n").await;
    let token = gw.idp.delegated();
    let hup = || {
        let status = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(gw.child.id().to_string())
            .status();
        assert!(status.unwrap().success());
    };

    // Policies: nothing happens until SIGHUP (watching is off).
    std::fs::write(gw.dir.0.join("policies/extra.cedar"), PERMIT_DELETE).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(delete_status(&gw, &token).await, 403);
    hup();
    eventually("permit after SIGHUP", 200, async || {
        delete_status(&gw, &token).await
    })
    .await;

    // A new IdP key in the JWKS file.
    let rotated = gw.idp.add_key();
    assert_eq!(
        get(&gw.url("/billing/invoices/1"), &rotated).await.status,
        401
    );
    hup();
    let url = gw.url("/billing/invoices/1");
    eventually("new key after SIGHUP", 200, async || {
        get(&url, &rotated).await.status.as_u16()
    })
    .await;

    // Routes: /invoices/{id} moves to /bills/{id}.
    let config_path = gw.dir.0.join("toolgate.yaml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replace(
            "path: \"/invoices/{invoice_id}\"",
            "path: \"/bills/{invoice_id}\"",
        ),
    )
    .unwrap();
    hup();
    let bills = gw.url("/billing/bills/7");
    eventually("new route after SIGHUP", 200, async || {
        get(&bills, &token).await.status.as_u16()
    })
    .await;
    assert_eq!(
        get(&gw.url("/billing/invoices/7"), &token).await.status,
        404
    );
    assert_eq!(upstream.requests().last().unwrap().uri, "/api/bills/7");
}

#[tokio::test]
async fn admin_reload_reports_what_needs_a_restart_and_refuses_bad_config() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream, "reload:\n  watch: false\n").await;
    let token = gw.idp.delegated();
    let config_path = gw.dir.0.join("toolgate.yaml");
    let original = std::fs::read_to_string(&config_path).unwrap();

    std::fs::write(
        &config_path,
        original.replace(
            "issuer: https://toolgate.test",
            "issuer: https://other.test",
        ),
    )
    .unwrap();
    let report = gw.admin("POST", "/admin/reload", b"").await;
    assert_eq!(report.status, 200);
    assert_eq!(report.json()["config"]["needs_restart"], json!(["issuer"]));

    // A route to an action the schema does not declare: refused, the old routes stay.
    std::fs::write(
        &config_path,
        original.replace("tool: list_invoices", "tool: list_everything"),
    )
    .unwrap();
    gw.assert_reload_refused("billing/list_everything").await;
    assert_eq!(get(&gw.url("/billing/invoices"), &token).await.status, 200);

    // Not YAML at all: refused with file:line.
    std::fs::write(&config_path, "listen: [").unwrap();
    gw.assert_reload_refused("toolgate.yaml:").await;
    assert_eq!(
        get(&gw.url("/billing/invoices/1"), &token).await.status,
        200
    );
}

/// A real load (8 concurrent clients on keep-alive connections) runs while policy sets are
/// swapped in: one that forbids the very call the load makes, one that allows it again, and
/// invalid ones that must be refused. Every answer is one the old or the new set gives (200 or
/// 403, never an error), and each valid set is seen to decide before the next swap.
#[tokio::test]
async fn reloads_under_constant_load_fail_no_request() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream, "reload:\n  watch: false\n").await;
    let token = gw.idp.delegated();
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let (allowed, forbidden, other) = (0, 1, 2);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, counts) = (stop.clone(), counts.clone());
        let url = gw.url("/billing/invoices/1");
        let auth = format!("Bearer {token}");
        clients.push(tokio::spawn(async move {
            let client = http_client(false);
            // Bounded: at most 20,000 requests per client.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let request = http::Request::get(&url)
                    .header("authorization", &auth)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let outcome = match client.request(request).await.map(|r| r.status().as_u16()) {
                    Ok(200) => allowed,
                    Ok(403) => forbidden,
                    _ => other,
                };
                counts[outcome].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Waits (bounded) until the load has received `outcome` more often than `before`.
    let seen = |outcome: usize, before: usize| {
        let counts = counts.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while counts[outcome].load(Ordering::Relaxed) <= before {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the load never saw the new set's decision"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    let extra = gw.dir.0.join("policies/extra.cedar");
    let (mut good, mut bad) = (0, 0);
    for round in 0..12 {
        let (text, expect) = match round % 4 {
            0 => (
                format!("@id(\"round-{round}\")\nforbid (principal, action == Toolgate::Action::\"billing/get_invoice\", resource);"),
                Some(forbidden),
            ),
            2 => (
                format!("@id(\"round-{round}\")\npermit (principal, action == Toolgate::Action::\"billing/list_invoices\", resource) when {{ context has user }};"),
                Some(allowed),
            ),
            _ => (
                "permit (principal, action, resource) when { context.nope };".to_string(),
                None,
            ),
        };
        let before = expect.map(|o| counts[o].load(Ordering::Relaxed));
        std::fs::write(&extra, text).unwrap();
        let report = gw.admin("POST", "/admin/reload", b"").await;
        assert_eq!(
            report.status == 200,
            expect.is_some(),
            "{:?}",
            report.json()
        );
        match (expect, before) {
            (Some(outcome), Some(before)) => {
                good += 1;
                seen(outcome, before).await;
            }
            _ => bad += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let [allowed, forbidden, other] = [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed));
    assert!(
        allowed > 0 && forbidden > 0,
        "both sets decided the load's calls"
    );
    assert_eq!(
        other,
        0,
        "{other} of {} answers were neither set's (200 or 403)",
        allowed + forbidden + other
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(&format!(
            "toolgate_policy_reloads_total{{result=\"success\"}} {good}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "toolgate_policy_reloads_total{{result=\"error\"}} {bad}"
    )));
}
