//! The policy lifecycle (issue 14): shadow policies beside the enforced ones, and the audit log
//! read back (`toolgate audit why`, `toolgate audit report`) from what a running gateway wrote.

mod common;

use common::*;
use serde_json::json;

/// The shadow policies of docs/policy-guide.md's worked example, as written there.
fn guide_shadow_policies() -> String {
    let guide = std::fs::read_to_string(repo().join("docs/policy-guide.md")).unwrap();
    let start = guide
        .find("<!-- shadow-example -->")
        .expect("the example's marker");
    let block = &guide[start..guide.find("<!-- /shadow-example -->").expect("its end")];
    block
        .lines()
        .skip_while(|l| !l.starts_with("```cedar"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[tokio::test]
async fn shadow_policies_never_decide_and_the_audit_and_metrics_show_their_flips() {
    let upstream = Upstream::start().await;
    let shadow = guide_shadow_policies();
    assert!(shadow.contains("@mode(\"shadow\")"), "{shadow}");
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[("shadow.cedar", &shadow)],
        inbound: None,
        mcp: None,
        extra_config: "",
    })
    .await;
    let token = gw.idp.delegated();

    // Enforced: allow; shadow: deny. The call goes through.
    assert_eq!(
        get(&gw.url("/billing/invoices/7"), &token).await.status,
        200
    );
    assert_eq!(upstream.requests().len(), 1);
    let line = gw.audit_line(|l| l["args"]["invoice_id"] == 7).await;
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["shadow_decision"], "deny", "{line}");
    assert_eq!(line["shadow_policies"], json!(["no-invoice-7"]));

    // Enforced: deny (no permit); shadow: allow. The call is refused.
    let delete = send(
        "DELETE",
        &gw.url("/records/patients/p-100/record"),
        &[("authorization", &format!("Bearer {token}"))],
        b"",
    )
    .await;
    assert_eq!(delete.status, 403);
    assert_eq!(upstream.requests().len(), 1, "nothing more forwarded");
    let id = delete.json()["decision_id"].clone();
    let line = gw.audit_line(|l| l["decision_id"] == id).await;
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["shadow_decision"], "allow", "{line}");
    assert_eq!(line["shadow_policies"], json!(["would-delete"]));

    // Where the shadow policies agree, the line says nothing of them.
    assert_eq!(
        get(&gw.url("/billing/invoices/8"), &token).await.status,
        200
    );
    let line = gw.audit_line(|l| l["args"]["invoice_id"] == 8).await;
    assert!(line.get("shadow_decision").is_none(), "{line}");

    let metrics = gw.metrics().await;
    let flips = |policy: &str, flip: &str| {
        metric(
            &metrics,
            &format!("toolgate_shadow_flips_total{{flip=\"{flip}\",policy=\"{policy}\"}}"),
        )
    };
    assert_eq!(
        flips("no-invoice-7", "allow_to_deny"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        flips("would-delete", "deny_to_allow"),
        Some(1.0),
        "{metrics}"
    );

    // `toolgate authorize` says the same offline.
    let request = json!({"agent": "assistant", "user": "alice", "action": "billing/get_invoice",
                         "args": {"invoice_id": 7}});
    let answer = authorize(&gw.dir.0, &request, &[]);
    assert_eq!(answer["decision"], "allow", "{answer}");
    assert_eq!(answer["shadow"]["decision"], "deny", "{answer}");
    assert_eq!(answer["shadow"]["flipped_by"], json!(["no-invoice-7"]));
}

/// `toolgate audit ...` on the gateway's audit file and config; stdout, checked to succeed.
fn audit_cmd(gw: &Gateway, args: &[&str]) -> String {
    let config = gw.dir.0.join("toolgate.yaml");
    let audit = gw.audit_path.to_str().unwrap().to_string();
    let mut all = vec!["audit"];
    all.extend_from_slice(args);
    all.extend(["--audit", &audit, "--config", config.to_str().unwrap()]);
    let out = toolgate(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The minted credential's jti the upstream received last.
fn last_jti(upstream: &Upstream) -> String {
    let seen = upstream.requests().last().unwrap().headers["authorization"]
        .to_str()
        .unwrap()[7..]
        .to_string();
    claims_of(&seen)["jti"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn audit_why_and_report_read_what_a_running_gateway_wrote() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let token = gw.idp.delegated();
    let auth = format!("Bearer {token}");

    // A task: started, one call in it, completed (its credential revoked).
    let started = send(
        "POST",
        &gw.url("/v1/tasks"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        json!({"intent": "review invoice 42", "ttl_seconds": 600})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(started.status, 201);
    let task = started.json()["task_id"].as_str().unwrap().to_string();
    let in_task = send(
        "GET",
        &gw.url("/billing/invoices/42"),
        &[("authorization", &auth), ("toolgate-task", &task)],
        b"",
    )
    .await;
    assert_eq!(in_task.status, 200);
    let revoked = last_jti(&upstream);
    let completed = send(
        "POST",
        &gw.url(&format!("/v1/tasks/{task}/complete")),
        &[("authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(completed.status, 200);
    // A call outside any task: its credential lives until it expires.
    assert_eq!(
        get(&gw.url("/billing/invoices/43"), &token).await.status,
        200
    );
    let live = last_jti(&upstream);
    // A denial.
    let denied = send(
        "DELETE",
        &gw.url("/records/patients/p-100/record"),
        &[("authorization", &auth)],
        b"",
    )
    .await;
    let denied_id = denied.json()["decision_id"].as_str().unwrap().to_string();
    gw.audit_line(|l| l["decision_id"] == denied_id.as_str())
        .await;

    // The deciding policy is rewritten afterwards (the rotation `why` must notice).
    let billing = gw.dir.0.join("policies/billing.cedar");
    let text = std::fs::read_to_string(&billing).unwrap();
    let rotated = text.replacen(
        "when { context has user };",
        "when { context has user && context.env.hour >= 0 };",
        1,
    );
    assert_ne!(rotated, text);
    std::fs::write(&billing, rotated).unwrap();

    let why = audit_cmd(&gw, &["why", &revoked]);
    for expected in [
        "agent assistant, on behalf of user alice, token from https://idp.test",
        "billing/get_invoice (GET /billing/invoices/42)",
        r#"{"invoice_id":42}"#,
        "allow, answered 200 (upstream 200)",
        &format!("{task}, intent \"review invoice 42\", started"),
        "completed",
        "billing-read at ",
        "billing.cedar:2 (CHANGED since this decision)",
        "not live: revoked when its task was completed",
    ] {
        assert!(why.contains(expected), "missing {expected:?} in:\n{why}");
    }
    // The admin listener is asked when given.
    let admin = format!("http://{}", gw.admin);
    let why_admin = audit_cmd(&gw, &["why", &revoked, "--admin", &admin]);
    assert!(
        why_admin.contains("not live: revoked, its task is completed (admin listener)"),
        "{why_admin}"
    );

    let why_live = audit_cmd(&gw, &["why", &live]);
    assert!(why_live.contains("(mint): live until "), "{why_live}");
    assert!(!why_live.contains("task:"), "{why_live}");

    let why_denied = audit_cmd(&gw, &["why", &denied_id]);
    for expected in [
        "records/delete_patient_record",
        "deny, answered 403",
        "none (no policy permits: default deny)",
        "credential: none (nothing was forwarded)",
    ] {
        assert!(
            why_denied.contains(expected),
            "missing {expected:?} in:\n{why_denied}"
        );
    }
    let unknown = toolgate(&[
        "audit",
        "why",
        "no-such-id",
        "--audit",
        gw.audit_path.to_str().unwrap(),
    ]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no decision or credential"));

    // The report: what assistant called, and what it may call but never did.
    let report = audit_cmd(&gw, &["report", "--since", "1h", "--suggest"]);
    for expected in [
        "agent assistant",
        "billing/get_invoice: 2 allowed, last ",
        "records/delete_patient_record: 0 allowed, 1 denied",
        "permitted but never called:",
        "billing/list_invoices: by billing-read (",
        "billing/refund: by billing-refund (",
        "records/get_patient_record: by own-record-only (",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
    assert!(
        !report.contains("    billing/get_invoice: by"),
        "a called action is not unused:\n{report}"
    );
    // The suggested permit covers exactly the allowed calls, keeps billing-read's (rewritten)
    // condition, and `toolgate check` takes the whole output as it is.
    let suggested = &report[report.find("// Suggested").expect("a suggestion")..];
    for expected in [
        r#"action == Toolgate::Action::"billing/get_invoice""#,
        "when { (context has user) && (context.env.hour >= 0) }",
        "// billing-read changed since some of these calls: its conditions are kept as they are now.",
    ] {
        assert!(suggested.contains(expected), "missing {expected:?} in:\n{suggested}");
    }
    std::fs::write(gw.dir.0.join("policies/suggested.cedar"), &report).unwrap();
    let config = gw.dir.0.join("toolgate.yaml");
    let check = toolgate(&["check", "--config", config.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // A window that is not a duration is refused.
    let bad = toolgate(&[
        "audit",
        "report",
        "--audit",
        gw.audit_path.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--since",
        "soon",
    ]);
    assert!(!bad.status.success());
}

/// The gateway's config, keys and policies (not its audit) copied to a new directory.
fn copy_project(gw: &Gateway) -> TempDir {
    let copy = TempDir::new("suggest");
    for sub in ["", "policies"] {
        std::fs::create_dir_all(copy.0.join(sub)).unwrap();
        for entry in std::fs::read_dir(gw.dir.0.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() && path != gw.audit_path {
                std::fs::copy(&path, copy.0.join(sub).join(path.file_name().unwrap())).unwrap();
            }
        }
    }
    copy
}

/// Rewrites a policy file without the policies `ids`, each kept one as written.
fn remove_policies(file: &std::path::Path, ids: &[&str]) {
    let text = std::fs::read_to_string(file).unwrap();
    let kept: Vec<String> = toolgate_policy::parse_policy_file(file, &text)
        .unwrap()
        .into_iter()
        .filter(|(policy, _)| !ids.contains(&policy.id().to_string().as_str()))
        .map(|(policy, _)| policy.to_string())
        .collect();
    assert_eq!(kept.len(), text.matches("@id(").count() - ids.len());
    std::fs::write(file, kept.join("\n\n")).unwrap();
}

/// Calls by `assistant`: through billing-read and billing-refund (with a user), one refused
/// (billing-read wants a user), one through `temp-list` alone (no user). Waits for the audit.
async fn calls_for_the_suggestion(gw: &Gateway) {
    let delegated = gw.idp.delegated();
    let own = gw.idp.sign(json!({"sub": "assistant"}));
    let url = gw.url("/billing/invoices/42");
    assert_eq!(get(&url, &delegated).await.status, 200);
    assert_eq!(get(&url, &own).await.status, 403);
    let refund = send(
        "POST",
        &gw.url("/billing/refunds"),
        &[
            ("authorization", &format!("Bearer {delegated}")),
            ("content-type", "application/json"),
        ],
        br#"{"invoice_id": 42, "amount": 100}"#,
    )
    .await;
    assert_eq!(refund.status, 200);
    assert_eq!(get(&gw.url("/billing/invoices"), &own).await.status, 200);
    let listed = gw
        .audit_line(|l| l["action"] == "billing/list_invoices")
        .await;
    assert_eq!(listed["policies"], json!(["temp-list"]), "{listed}");
}

#[tokio::test]
async fn audit_report_suggests_permits_that_keep_their_conditions() {
    let upstream = Upstream::start().await;
    let temporary = "@id(\"temp-list\")\npermit (principal == Toolgate::Agent::\"assistant\", action == Toolgate::Action::\"billing/list_invoices\", resource);\n";
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[("temporary.cedar", temporary)],
        inbound: None,
        mcp: None,
        extra_config: "",
    })
    .await;
    calls_for_the_suggestion(&gw).await;

    // In a copy of the project, temp-list is gone: the report is read against that set.
    let copy = copy_project(&gw);
    std::fs::remove_file(copy.0.join("policies/temporary.cedar")).unwrap();
    let config = copy.0.join("toolgate.yaml");
    let out = toolgate(&[
        "audit",
        "report",
        "--suggest",
        "--audit",
        gw.audit_path.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let suggested = String::from_utf8(out.stdout).unwrap();
    for expected in [
        "// agent assistant",
        "//     billing/get_invoice: 1 allowed, 1 denied, last ",
        "// It narrows permit billing-read (",
        "// It narrows permit billing-refund (",
        "// Suggested for agent \"assistant\": a permit WITHOUT CONDITIONS.",
        "//   billing/list_invoices: temp-list is no longer in the policy set",
    ] {
        assert!(
            suggested.contains(expected),
            "missing {expected:?} in:\n{suggested}"
        );
    }
    assert!(!suggested.contains("nothing more"), "{suggested}");

    // The file replaces the permits it narrows, and `toolgate check` takes it as it is.
    remove_policies(
        &copy.0.join("policies/billing.cedar"),
        &["billing-read", "billing-refund"],
    );
    std::fs::write(copy.0.join("policies/suggested.cedar"), &suggested).unwrap();
    let check = toolgate(&["check", "--config", config.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}\n{suggested}",
        String::from_utf8_lossy(&check.stderr)
    );

    // What the narrowed permits' conditions refused is still refused; the rest is allowed.
    let invoice = json!({"invoice_id": 7});
    let refund = |amount: i64| json!({"invoice_id": 7, "amount": amount});
    for (request, decision, by) in [
        (
            json!({"agent": "assistant", "user": "alice", "action": "billing/get_invoice", "args": invoice}),
            "allow",
            "suggested-assistant-billing-read-",
        ),
        (
            json!({"agent": "assistant", "action": "billing/get_invoice", "args": invoice}),
            "deny",
            "",
        ),
        (
            json!({"agent": "assistant", "user": "alice", "action": "billing/refund", "args": refund(100)}),
            "allow",
            "suggested-assistant-billing-refund-",
        ),
        (
            json!({"agent": "assistant", "action": "billing/refund", "args": refund(100)}),
            "deny",
            "",
        ),
        (
            json!({"agent": "assistant", "user": "alice", "action": "billing/refund", "args": refund(600)}),
            "deny",
            "refund-limit",
        ),
        // Never allowed through billing-read, and temp-list is gone: not permitted.
        (
            json!({"agent": "intern-bot", "user": "alice", "action": "billing/get_invoice", "args": invoice}),
            "deny",
            "",
        ),
        // What temp-list allowed, now gone: only a commented-out permit without conditions,
        // which nothing enforces until a person enables it.
        (
            json!({"agent": "assistant", "action": "billing/list_invoices"}),
            "deny",
            "",
        ),
    ] {
        let answer = authorize(&copy.0, &request, &[]);
        assert_eq!(answer["decision"], decision, "{request}: {answer}");
        let policies = answer["policies"].as_array().unwrap();
        assert_eq!(policies.is_empty(), by.is_empty(), "{request}: {answer}");
        assert!(
            policies.iter().all(|p| p.as_str().unwrap().starts_with(by)),
            "{request}: {answer}"
        );
    }
}
