//! End-to-end: a real `toolgate serve` process between a real HTTP client and a real
//! recording upstream, all on loopback ephemeral ports.

mod common;

use common::*;
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};
use toolgate_credential::Claims;

/// Forbids refunds whose reason is "boom" with a policy that errs (Long overflow) exactly then.
const ERRING_FORBID: &str = r#"
@id("erring-forbid")
forbid (principal, action == Toolgate::Action::"billing/refund", resource)
when {
  context.args has reason && context.args.reason == "boom" &&
  context.args.amount + 9223372036854775807 < 0
};
"#;

async fn gateway(upstream: &Upstream) -> Gateway {
    Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[("erring.cedar", ERRING_FORBID)],
        inbound: None,
        mcp: None,
        extra_config: "",
    })
    .await
}

/// Verifies a minted credential against the gateway's published JWKS.
async fn verify_minted(gw: &Gateway, token: &str, audience: &str) -> Claims {
    let jwks: JwkSet = serde_json::from_slice(
        &send("GET", &gw.url("/.well-known/jwks.json"), &[], b"")
            .await
            .body,
    )
    .unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    let jwk = jwks
        .find(header.kid.as_deref().expect("kid set"))
        .expect("kid published");
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&["https://toolgate.test"]);
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
        .expect("minted token verifies")
        .claims
}

fn bearer(recorded: &Recorded) -> String {
    recorded.headers["authorization"]
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn allowed_call_is_forwarded_with_a_narrow_minted_credential() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let inbound = gw.idp.delegated();
    let headers = [
        ("authorization", format!("Bearer {inbound}")),
        ("cookie", "session=secret-cookie".to_string()),
        ("proxy-authorization", "Basic c2VjcmV0".to_string()),
        ("x-request-id", "r-1".to_string()),
    ];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // What no policy can see is refused, not forwarded: an undeclared query parameter.
    let undeclared = send(
        "GET",
        &gw.url("/billing/invoices/42?expand=lines"),
        &headers,
        b"",
    )
    .await;
    assert_eq!(undeclared.status, 400);
    let body: Value = serde_json::from_slice(&undeclared.body).unwrap();
    assert_eq!(
        (body["error"].as_str(), body["argument"].as_str()),
        (Some("undeclared_argument"), Some("expand"))
    );
    let first = send("GET", &gw.url("/billing/invoices/42"), &headers, b"").await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.headers["x-upstream"], "recorder");
    let second = get(&gw.url("/billing/invoices/43"), &inbound).await;
    assert_eq!(second.status, 200);

    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].uri, "/api/invoices/42");
    // A non-standard header is dropped: an API may read it as a parameter no policy saw.
    assert!(seen[0].headers.get("x-request-id").is_none());
    for r in &seen {
        assert!(
            r.headers.get("cookie").is_none() && r.headers.get("proxy-authorization").is_none()
        );
        for (name, value) in &r.headers {
            assert!(
                !value.to_str().unwrap_or("").contains(&inbound),
                "inbound token leaked in {name}"
            );
        }
    }

    let a = verify_minted(&gw, &bearer(&seen[0]), "https://billing.internal").await;
    let b = verify_minted(&gw, &bearer(&seen[1]), "https://billing.internal").await;
    assert_eq!(a.sub, "alice");
    assert_eq!(a.act.as_ref().unwrap().sub, "assistant");
    assert_eq!(a.aud, "https://billing.internal");
    assert_eq!(a.scope, "billing/get_invoice invoices:read");
    assert!(a.exp > a.iat && a.exp - a.iat <= 60, "exp within ttl");
    assert!(a.nbf <= a.iat);
    assert_ne!(a.jti, b.jti, "jti is unique per call");
    assert!(a.task_id.is_none());

    // Each decision has one audit line, and its decision_id and jti match the credential.
    let audit = gw.audit(2).await;
    for claims in [&a, &b] {
        let lines: Vec<&Value> = audit
            .iter()
            .filter(|l| l["decision_id"] == claims.decision_id.as_str())
            .collect();
        assert_eq!(lines.len(), 1);
        let line = lines[0];
        assert_eq!(line["jti"], claims.jti.as_str());
        assert_eq!(line["decision"], "allow");
        assert_eq!(line["agent"], "assistant");
        assert_eq!(line["user"], "alice");
        assert_eq!(line["action"], "billing/get_invoice");
        assert_eq!(line["policies"], json!(["billing-read"]));
        assert_eq!(line["upstream_status"], 200);
        assert!(line["eval_us"].as_u64().is_some());
    }
    let text = std::fs::read_to_string(&gw.audit_path).unwrap();
    assert!(
        !text.contains(&bearer(&seen[0])) && !text.contains(&inbound),
        "no token in the audit log"
    );
}

#[tokio::test]
async fn policy_decisions_deny_with_decision_ids_and_forward_nothing() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let token = gw.idp.delegated();
    let auth = format!("Bearer {token}");
    let json_post = |body: &'static str| {
        let auth = auth.clone();
        let url = gw.url("/billing/refunds");
        async move {
            send(
                "POST",
                &url,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body.as_bytes(),
            )
            .await
        }
    };

    // No policy permits it: default deny.
    let no_policy = send(
        "DELETE",
        &gw.url("/records/patients/p-100/record"),
        &[("authorization", &auth)],
        b"",
    )
    .await;
    // A permit matches, a forbid too: forbid wins.
    let forbidden = json_post(r#"{"invoice_id": 42, "amount": 900}"#).await;
    // The forbid errs: Cedar would skip it and allow; toolgate denies.
    let erring = json_post(r#"{"invoice_id": 42, "amount": 10, "reason": "boom"}"#).await;
    // patient_id must equal the user's patient_id claim.
    let other_patient = get(&gw.url("/records/patients/p-200/record"), &token).await;
    let denied = [&no_policy, &forbidden, &erring, &other_patient];
    for answer in denied {
        assert_eq!(answer.status, 403, "{:?}", answer.body);
        assert_eq!(answer.json()["error"], "forbidden");
        assert!(answer.json()["decision_id"].as_str().is_some());
    }
    assert!(
        upstream.requests().is_empty(),
        "nothing denied reaches the upstream"
    );

    // The same calls within policy pass.
    assert_eq!(
        json_post(r#"{"invoice_id": 42, "amount": 90}"#)
            .await
            .status,
        200
    );
    assert_eq!(
        json_post(r#"{"invoice_id": 42, "amount": 10, "reason": "ok"}"#)
            .await
            .status,
        200
    );
    assert_eq!(
        get(&gw.url("/records/patients/p-100/record"), &token)
            .await
            .status,
        200
    );
    let refund = &upstream.requests()[0];
    assert_eq!(
        refund.body, r#"{"invoice_id":42,"amount":90}"#,
        "the body is forwarded as re-serialised from what the policy read"
    );

    let audit = gw.audit(7).await;
    let line = |answer: &Answer| {
        let id = answer.json()["decision_id"].as_str().unwrap().to_string();
        audit
            .iter()
            .find(|l| l["decision_id"] == id.as_str())
            .cloned()
            .expect("audit line")
    };
    assert_eq!(line(&no_policy)["policies"], json!([]));
    assert_eq!(line(&forbidden)["policies"], json!(["refund-limit"]));
    let erring_line = line(&erring);
    assert_eq!(erring_line["decision"], "deny");
    assert!(
        erring_line["errors"][0]
            .as_str()
            .unwrap()
            .contains("erring-forbid"),
        "{erring_line}"
    );
    assert!(
        line(&other_patient)["jti"].is_null(),
        "no credential minted on deny"
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let now = now();
    let idp = &gw.idp;
    let rsa = EncodingKey::from_rsa_pem(
        &std::fs::read(repo().join("tests/fixtures/idp-rsa.pem")).unwrap(),
    )
    .unwrap();
    let ed = EncodingKey::from_ed_pem(
        &std::fs::read(repo().join("tests/fixtures/idp-ed25519.pem")).unwrap(),
    )
    .unwrap();
    let signed = |alg: Algorithm, kid: &str, key: &EncodingKey, claims: Value| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &with_defaults(claims), key).unwrap()
    };
    let agent = json!({"sub": "alice", "act": {"sub": "assistant"}});

    // RS256 and EdDSA keys from the JWKS work like ES256.
    for token in [
        signed(Algorithm::RS256, "test-rsa", &rsa, agent.clone()),
        signed(Algorithm::EdDSA, "test-ed25519", &ed, agent.clone()),
    ] {
        assert_eq!(
            get(&gw.url("/billing/invoices/1"), &token).await.status,
            200
        );
    }

    // alg: none, and HS256 "signed" with the public key of a real kid.
    let none_header = b64(br#"{"alg":"none","typ":"JWT","kid":"test-rsa"}"#);
    let payload = b64(with_defaults(agent.clone()).to_string().as_bytes());
    let alg_none = format!("{none_header}.{payload}.");
    let public_jwk = idp.key.public_jwk().to_string();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(idp.key.kid().to_string());
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &with_defaults(agent.clone()),
        &EncodingKey::from_secret(public_jwk.as_bytes()),
    )
    .unwrap();
    // A token claiming RS256 over an ES256 key.
    let mut mixed = Header::new(Algorithm::RS256);
    mixed.kid = Some(idp.key.kid().to_string());
    let alg_mismatch = jsonwebtoken::encode(&mixed, &with_defaults(agent.clone()), &rsa).unwrap();
    // A valid signature over a tampered payload.
    let good = idp.delegated();
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(
            with_defaults(json!({"sub": "mallory", "act": {"sub": "assistant"}}))
                .to_string()
                .as_bytes()
        ),
        parts[2]
    );

    let bad = [
        (
            "expired",
            idp.sign(json!({"sub": "alice", "act": {"sub": "assistant"}, "exp": now - 120})),
        ),
        (
            "not yet valid",
            idp.sign(json!({"sub": "alice", "nbf": now + 600})),
        ),
        (
            "wrong issuer",
            idp.sign(json!({"sub": "alice", "iss": "https://evil.test"})),
        ),
        (
            "wrong audience",
            idp.sign(json!({"sub": "alice", "aud": "someone-else"})),
        ),
        (
            "unknown kid",
            signed(Algorithm::RS256, "no-such-kid", &rsa, agent.clone()),
        ),
        ("alg none", alg_none),
        ("hs256 with public key", hs256),
        ("alg mismatch", alg_mismatch),
        ("tampered", tampered),
        ("no sub", idp.sign(json!({"act": {"sub": "assistant"}}))),
        ("garbage", "not-a-jwt".to_string()),
        ("garbage dots", "a.b.c".to_string()),
    ];
    for (why, token) in &bad {
        let answer = get(&gw.url("/billing/invoices/1"), token).await;
        assert_eq!(answer.status, 401, "{why}: {:?}", answer.body);
        let challenge = answer.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer "), "{why}: {challenge}");
        assert_eq!(answer.json()["error"], "invalid_token", "{why}");
    }
    let missing = send("GET", &gw.url("/billing/invoices/1"), &[], b"").await;
    assert_eq!(missing.status, 401);
    let challenge = missing.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer realm=\"toolgate\", resource_metadata=\"http://"),
        "{challenge}"
    );
    assert!(
        !challenge.contains("error="),
        "no error code when no token was sent: {challenge}"
    );
    let basic = send(
        "GET",
        &gw.url("/billing/invoices/1"),
        &[("authorization", "Basic YTpi")],
        b"",
    )
    .await;
    assert_eq!(basic.status, 401);
    assert_eq!(
        upstream.requests().len(),
        2,
        "only the two valid tokens got through"
    );
}

#[tokio::test]
async fn framing_errors_and_upstream_failures() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let token = gw.idp.delegated();
    let auth = format!("Bearer {token}");

    // Named by its decision id, as every refusal with an audit line is.
    let not_found = get(&gw.url("/billing/nowhere"), &token).await.json();
    assert_eq!(not_found["error"], "tool_not_found");
    let id = not_found["decision_id"].as_str().unwrap();
    assert!(
        gw.audit(1).await.iter().any(|l| l["decision_id"] == id),
        "{not_found}"
    );
    assert_eq!(get(&gw.url("/nosuchupstream/x"), &token).await.status, 404);
    assert_eq!(
        send(
            "PUT",
            &gw.url("/billing/invoices/1"),
            &[("authorization", &auth)],
            b""
        )
        .await
        .status,
        404
    );
    assert_eq!(
        get(&gw.url("/billing/invoices/..%2f..%2fadmin"), &token)
            .await
            .status,
        400
    );
    // Not of its declared type: refused as the agent's error, naming the argument.
    assert_eq!(
        get(&gw.url("/billing/invoices/not-a-number"), &token)
            .await
            .status,
        400
    );
    // The same argument twice with different values.
    assert_eq!(
        get(&gw.url("/billing/invoices/1?invoice_id=2"), &token)
            .await
            .status,
        400
    );

    let big = vec![b' '; 5000];
    let too_large = send(
        "POST",
        &gw.url("/billing/refunds"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        &big,
    )
    .await;
    assert_eq!(too_large.status, 413);
    assert_eq!(too_large.json()["error"], "payload_too_large");
    let not_json = send(
        "POST",
        &gw.url("/billing/refunds"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        b"{oops",
    )
    .await;
    assert_eq!(not_json.status, 400);
    let huge = "x".repeat(9000);
    let headers_too_large = send(
        "GET",
        &gw.url("/billing/invoices/1"),
        &[("authorization", &auth), ("x-big", &huge)],
        b"",
    )
    .await;
    assert_eq!(headers_too_large.status, 431);
    assert_eq!(headers_too_large.json()["error"], "headers_too_large");

    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn unreachable_upstream_answers_502_without_a_credential() {
    // A port bound (so no one else takes it) but not listening: connections are refused.
    let bound = tokio::net::TcpSocket::new_v4().unwrap();
    bound.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = bound.local_addr().unwrap();
    let gw = Gateway::start(GatewayOptions {
        upstream: closed,
        extra_policies: &[],
        inbound: None,
        mcp: None,
        extra_config: "",
    })
    .await;
    let down = get(&gw.url("/billing/invoices/1"), &gw.idp.delegated()).await;
    assert_eq!(down.status, 502, "{:?}", down.body);
    assert_eq!(down.json()["error"], "upstream_unreachable");
    assert!(
        !String::from_utf8_lossy(&down.body).contains("eyJ"),
        "no credential in error answers"
    );
    let audit = gw.audit(1).await;
    assert_eq!(
        (audit[0]["decision"].as_str(), audit[0]["status"].as_u64()),
        (Some("allow"), Some(502))
    );
    // The audit line keeps the cause, down to the connection error.
    let cause = audit[0]["errors"][0].as_str().unwrap();
    assert!(
        cause.starts_with("upstream unreachable: sending the request: ") && cause.len() > 45,
        "{cause}"
    );
}

#[tokio::test]
async fn slow_upstream_times_out_with_504() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    // billing's timeout made 1 s; the recorder holds anything mentioning "held" until
    // released, so only the gateway's own timeout can answer.
    let config = gw.edited_config("short.yaml", |t| {
        t.replace("    timeout_seconds: 30\n", "    timeout_seconds: 1\n")
    });
    let (child, addr, _) = spawn_serve(&config).await;
    let _child = Killed(child);
    let answer = get(
        &format!("http://{addr}/billing/invoices?customer=held"),
        &gw.idp.delegated(),
    )
    .await;
    assert_eq!(answer.status, 504, "{:?}", answer.body);
    assert_eq!(answer.json()["error"], "upstream_timeout");
    upstream.release();
    let audit = gw.audit(1).await;
    assert_eq!(audit[0]["decision"], "allow");
    assert_eq!(audit[0]["status"], 504);
    assert!(audit[0]["upstream_status"].is_null());
}

#[tokio::test]
async fn metrics_move_and_admin_endpoints_answer() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let token = gw.idp.delegated();
    assert_eq!(
        send("GET", &gw.admin_url("/healthz"), &[], b"")
            .await
            .status,
        200
    );
    assert_eq!(
        send("GET", &gw.admin_url("/readyz"), &[], b"").await.status,
        200
    );
    assert_eq!(
        send("GET", &gw.url("/metrics"), &[], b"").await.status,
        401,
        "no metrics on the agent listener"
    );

    get(&gw.url("/billing/invoices/1"), &token).await;
    get(&gw.url("/billing/invoices/2"), &token).await;
    send(
        "DELETE",
        &gw.url("/records/patients/p-1/record"),
        &[("authorization", &format!("Bearer {token}"))],
        b"",
    )
    .await;
    let metrics = gw.metrics().await;
    let value = |series: &str| -> f64 {
        metric(&metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert_eq!(
        value("toolgate_authz_decisions_total{decision=\"allow\"}"),
        2.0
    );
    // The DELETE denied by policy; the 401 for /metrics on the agent listener is counted
    // apart, so a scanner does not move the deny rate.
    assert_eq!(
        value("toolgate_authz_decisions_total{decision=\"deny\"}"),
        1.0
    );
    assert_eq!(value("toolgate_unauthenticated_total"), 1.0);
    assert_eq!(
        value("toolgate_tool_calls_total{decision=\"deny\",tool=\"delete_patient_record\",upstream=\"records\"}"),
        1.0
    );
    assert_eq!(
        value("toolgate_request_duration_seconds_count{upstream=\"billing\"}"),
        2.0
    );
    assert_eq!(
        value("toolgate_request_duration_seconds_count{upstream=\"none\"}"),
        1.0
    );
    assert_eq!(value("toolgate_config_watch_active"), 1.0);
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(metrics.contains(name), "{name}");
    }
    assert_eq!(value("toolgate_credentials_minted_total"), 2.0);
    assert_eq!(
        value("toolgate_requests_total{code=\"200\",upstream=\"billing\"}"),
        2.0
    );
    assert_eq!(
        value("toolgate_requests_total{code=\"403\",upstream=\"records\"}"),
        1.0
    );
    assert_eq!(value("toolgate_authz_duration_seconds_count"), 3.0);
    assert_eq!(
        value("toolgate_upstream_duration_seconds_count{upstream=\"billing\"}"),
        2.0
    );
    assert!(value("toolgate_policies_loaded") >= 5.0);
    for name in ["toolgate_policy_reloads_total", "toolgate_tasks_active"] {
        assert!(metrics.contains(name), "{name}");
    }
}

#[tokio::test]
async fn reload_takes_a_valid_set_and_keeps_the_old_one_on_error() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let token = gw.idp.delegated();
    let (url, auth) = (
        gw.url("/records/patients/p-100/record"),
        format!("Bearer {token}"),
    );
    let headers = [("authorization", auth.as_str())];
    let delete = || send("DELETE", &url, &headers, b"");
    assert_eq!(delete().await.status, 403);

    let policies = gw.dir.0.join("policies");
    std::fs::write(policies.join("extra.cedar"), "permit(principal, action == Toolgate::Action::\"records/delete_patient_record\", resource);").unwrap();
    let reload = gw.admin("POST", "/admin/reload", b"").await;
    assert_eq!(reload.status, 200, "{:?}", reload.body);
    assert_eq!(delete().await.status, 200);

    std::fs::write(
        policies.join("broken.cedar"),
        "permit(principal, action, resource) when { context.nope };",
    )
    .unwrap();
    gw.assert_reload_refused("broken.cedar:1:").await;
    assert_eq!(
        delete().await.status,
        200,
        "the previous valid set stays active"
    );
    let metrics = gw.metrics().await;
    assert!(metrics.contains("toolgate_policy_reloads_total{result=\"error\"} 1"));
    assert!(metrics.contains("toolgate_policy_reloads_total{result=\"success\"} 1"));
}

#[tokio::test]
async fn jwks_url_is_refetched_on_unknown_kid_once_per_interval() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    // A JWKS server whose key set can be rotated, counting fetches.
    let first = toolgate_credential::SigningKey::generate().unwrap().0;
    let second = toolgate_credential::SigningKey::generate().unwrap().0;
    let served = Arc::new(Mutex::new(json!({"keys": [first.public_jwk()]})));
    let fetches = Arc::new(AtomicUsize::new(0));
    let jwks_addr = {
        let (served, fetches) = (served.clone(), fetches.clone());
        document_server(move |_| {
            fetches.fetch_add(1, Ordering::SeqCst);
            served.lock().unwrap().to_string()
        })
        .await
    };
    let upstream = Upstream::start().await;
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: Some(format!(
            "inbound:\n  jwt:\n    - issuer: {IDP}\n      jwks_url: http://{jwks_addr}/jwks.json\n      jwks_refetch_seconds: 1\n      audiences: [{AUDIENCE}]\n"
        )),
        mcp: None,
        extra_config: "",
    })
    .await;
    let claims = json!({"sub": "alice", "act": {"sub": "assistant"}});
    let url = gw.url("/billing/invoices/1");
    assert_eq!(
        get(
            &url,
            &first.sign("JWT", &with_defaults(claims.clone())).unwrap()
        )
        .await
        .status,
        200
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched once at start");

    // The IdP rotates; a token with the new kid triggers one refetch.
    *served.lock().unwrap() = json!({"keys": [first.public_jwk(), second.public_jwk()]});
    assert_eq!(
        get(
            &url,
            &second.sign("JWT", &with_defaults(claims.clone())).unwrap()
        )
        .await
        .status,
        200
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 2);

    // Unknown kids right after do not hammer the IdP.
    let stranger = toolgate_credential::SigningKey::generate().unwrap().0;
    for _ in 0..5 {
        assert_eq!(
            get(
                &url,
                &stranger
                    .sign("JWT", &with_defaults(claims.clone()))
                    .unwrap()
            )
            .await
            .status,
            401
        );
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 2, "refetch is debounced");

    // Once the interval (1 s here) has passed, an unknown kid refetches again: the IdP's next
    // key is picked up by exactly one more fetch, however often it is tried meanwhile.
    let third = toolgate_credential::SigningKey::generate().unwrap().0;
    *served.lock().unwrap() = json!({"keys": [first.public_jwk(), third.public_jwk()]});
    let token = third.sign("JWT", &with_defaults(claims.clone())).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while get(&url, &token).await.status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "no refetch after the interval"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        3,
        "one refetch per interval"
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_calls_and_exits_cleanly() {
    let upstream = Upstream::start().await;
    let mut gw = gateway(&upstream).await;
    let token = gw.idp.delegated();
    // Four calls in flight, held at the upstream, when the signal arrives.
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let url = gw.url(&format!("/billing/invoices?customer=held-{i}"));
            let token = token.clone();
            tokio::spawn(async move { get(&url, &token).await.status })
        })
        .collect();
    upstream.wait_for_requests(4).await;
    gw.terminate();
    // Draining: the listener closes (nothing new is accepted) while the four wait.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener stays open after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    upstream.release();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200, "an in-flight call was cut");
    }
    let status = gw.exited().await;
    assert!(status.success(), "{status:?}");
    assert_eq!(gw.audit(4).await.len(), 4, "audit written out before exit");
}

#[tokio::test]
async fn check_authorize_and_token_commands() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let config = gw.dir.0.join("toolgate.yaml");
    let config = config.to_str().unwrap();

    let ok = toolgate(&["check", "--config", config]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let request = gw.dir.0.join("request.yaml");
    std::fs::write(
        &request,
        "agent: assistant\nuser: alice\nuser_claims: {patient_id: p-100}\naction: records/get_patient_record\nargs: {patient_id: p-100}\n",
    )
    .unwrap();
    let out = toolgate(&[
        "authorize",
        "--config",
        config,
        "--request",
        request.to_str().unwrap(),
    ]);
    let decision: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        decision,
        json!({"decision": "allow", "policies": ["own-record-only"], "errors": []})
    );

    // `toolgate token` mints inbound tokens the gateway accepts.
    let key = gw.dir.0.join("dev-idp.pem");
    let jwks = gw.dir.0.join("idp.jwks.json");
    let keygen = toolgate(&[
        "keygen",
        "--private",
        key.to_str().unwrap(),
        "--jwks",
        gw.dir.0.join("dev.jwks.json").to_str().unwrap(),
    ]);
    assert!(keygen.status.success());
    let dev_jwk: Value =
        serde_json::from_slice(&std::fs::read(gw.dir.0.join("dev.jwks.json")).unwrap()).unwrap();
    let mut all: Value = serde_json::from_slice(&std::fs::read(&jwks).unwrap()).unwrap();
    all["keys"]
        .as_array_mut()
        .unwrap()
        .push(dev_jwk["keys"][0].clone());
    std::fs::write(&jwks, all.to_string()).unwrap();
    // The gateway read its JWKS file at start; a fresh one reads the new key.
    let (mut child, addr, _) = spawn_serve(&gw.dir.0.join("toolgate.yaml")).await;
    let token = toolgate(&[
        "token",
        "--config",
        config,
        "--key",
        key.to_str().unwrap(),
        "--sub",
        "alice",
        "--act",
        "assistant",
        "--claim",
        "patient_id=p-100",
    ]);
    let token = String::from_utf8(token.stdout).unwrap();
    let answer = get(
        &format!("http://{addr}/records/patients/p-100/record"),
        token.trim(),
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(answer.status, 200, "{:?}", answer.body);

    // A broken policy fails `check` with file:line.
    std::fs::write(
        gw.dir.0.join("policies/bad.cedar"),
        "permit(principal, action, resource)\nwhen { context.args.nope == 1 };",
    )
    .unwrap();
    let bad = toolgate(&["check", "--config", config]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("bad.cedar:2:"), "{stderr}");
}

#[tokio::test]
async fn metrics_pass_promtool() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    get(&gw.url("/billing/invoices/1"), &gw.idp.delegated()).await;
    let metrics = send("GET", &gw.admin_url("/metrics"), &[], b"").await.body;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/test-deps.sh installs it)");
    promtool.stdin.take().unwrap().write_all(&metrics).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

#[tokio::test]
async fn http2_and_streamed_bodies_pass() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let token = gw.idp.delegated();

    // HTTP/2 with prior knowledge on the plain-text agent listener.
    let h2 = http_client(true);
    let request = http::Request::get(gw.url("/billing/invoices/7"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = h2.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        r#"{"ok":true}"#
    );

    // The body of a tool that declares no arguments is streamed through, whatever
    // max_body_bytes says (4096 here).
    let blob = vec![b'z'; 200_000];
    let answer = send(
        "POST",
        &gw.url("/billing/export"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", "application/octet-stream"),
        ],
        &blob,
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].body.len(),
        blob.len(),
        "streamed body arrives whole"
    );
}

#[tokio::test]
async fn policy_test_files_and_explain() {
    // The shipped tests of the example policies pass.
    let shipped = toolgate(&["test", repo().join("policies/tests").to_str().unwrap()]);
    let out = String::from_utf8_lossy(&shipped.stdout).to_string();
    assert!(shipped.status.success(), "{out}");
    // Every case of the shipped files ran (not "0 passed").
    let cases: usize = std::fs::read_dir(repo().join("policies/tests"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .map(|text| text.lines().filter(|l| l.starts_with("  - name:")).count())
        .sum();
    assert!(cases >= 15, "the shipped files hold their cases");
    assert!(
        out.trim_end()
            .ends_with(&format!("{cases} passed, 0 failed")),
        "{out}"
    );

    // A wrong expectation fails with exit 1 and says why.
    let dir = TempDir::new("policy-test");
    write_policies(&dir.0, &[]);
    std::fs::write(
        dir.0.join("wrong.yaml"),
        "policies: policies\ntests:\n  - name: right\n    request: { agent: assistant, user: alice, action: billing/refund, args: { invoice_id: 1, amount: 900 } }\n    expect: deny\n    policies: [refund-limit]\n  - name: wrong\n    request: { agent: assistant, user: alice, action: billing/refund, args: { invoice_id: 1, amount: 900 } }\n    expect: allow\n",
    )
    .unwrap();
    let failing = toolgate(&["test", dir.0.join("wrong.yaml").to_str().unwrap()]);
    let out = String::from_utf8_lossy(&failing.stdout).to_string();
    assert_eq!(failing.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL") && out.contains("expected Allow, got Deny"),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("1 passed, 1 failed"));

    // --explain names each determining policy's file and line.
    std::fs::write(dir.0.join("toolgate.yaml"), format!(
        "issuer: https://t\npolicies: policies\ninbound:\n  jwt:\n    - {{issuer: {IDP}, jwks_file: x.json, audiences: [a]}}\ncredentials:\n  signing_key: k.pem\n"
    ))
    .unwrap();
    std::fs::write(dir.0.join("req.yaml"), "agent: assistant\nuser: alice\naction: billing/refund\nargs: { invoice_id: 1, amount: 900 }\n").unwrap();
    let explained = toolgate(&[
        "authorize",
        "--config",
        dir.0.join("toolgate.yaml").to_str().unwrap(),
        "--request",
        dir.0.join("req.yaml").to_str().unwrap(),
        "--explain",
    ]);
    assert!(
        explained.status.success(),
        "{}",
        String::from_utf8_lossy(&explained.stderr)
    );
    let explained: Value = serde_json::from_slice(&explained.stdout).unwrap();
    assert_eq!(explained["decision"], "deny");
    let policy = &explained["policies"][0];
    assert_eq!(policy["id"], "refund-limit");
    assert!(policy["file"].as_str().unwrap().ends_with("billing.cedar"));
    let text = std::fs::read_to_string(policy["file"].as_str().unwrap()).unwrap();
    let line = text
        .lines()
        .nth(policy["line"].as_u64().unwrap() as usize - 1)
        .unwrap();
    assert!(line.contains("refund-limit"), "{line}");
}

#[tokio::test]
async fn tls_listener_negotiates_h2_and_refuses_plain_http() {
    let upstream = Upstream::start().await;
    let fixtures = repo().join("tests/fixtures");
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: None,
        mcp: None,
        extra_config: &format!(
            "tls:\n  cert: {}\n  key: {}\n",
            fixtures.join("tls.crt").display(),
            fixtures.join("tls.key").display()
        ),
    })
    .await;
    let token = gw.idp.delegated();

    // A client that trusts only the test certificate.
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(fixtures.join("tls-ca.crt")).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let url = format!("https://127.0.0.1:{}/billing/invoices/3", gw.addr.port());
    let request = http::Request::get(&url)
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = client.request(request).await.expect("TLS request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2, "ALPN offers h2");
    assert_eq!(upstream.requests().len(), 1);

    // Plain HTTP to the TLS listener: the connection is closed without an HTTP answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    plain
        .write_all(
            format!("GET /billing/invoices/3 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        plain.read_to_end(&mut answer),
    )
    .await
    .expect("the gateway closes the connection")
    .ok();
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/"),
        "answered in plain HTTP: {answer:?}"
    );
    assert_eq!(upstream.requests().len(), 1);
}

/// An upstream that answers in HTTP/1.0 (Python's `http.server`, common for small tools) is
/// answered to the agent in the gateway's own HTTP/1.1 (RFC 9110 §6.2), on a connection kept
/// alive for the next call.
#[tokio::test]
async fn an_http_1_0_upstream_is_answered_in_the_gateways_own_version() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let files = TempDir::new("http10");
    std::fs::write(files.0.join("hello.txt"), "hello").unwrap();
    let directory = files.0.to_string_lossy().to_string();
    let (_server, port) = start_program("python http.server", || {
        let mut command = std::process::Command::new("python3");
        let quiet_server = ["-m", "http.server", "--bind", "127.0.0.1", "--directory"];
        command.args(quiet_server).arg(&directory);
        command
    })
    .await;
    let recorder = Upstream::start().await;
    let schema = r#"namespace Toolgate { action "files/get" in [call] appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env, args: { name: String } } }; }"#;
    let policy = r#"permit (principal, action == Toolgate::Action::"files/get", resource);"#;
    let upstreams = format!(
        "  - name: files\n    url: http://127.0.0.1:{port}\n    audience: files\n    routes:\n      - {{ tool: get, method: GET, path: \"/{{name}}\", dots_in_params: true }}\n"
    );
    let options = GatewayOptions {
        upstream: recorder.addr,
        extra_policies: &[("files.cedarschema", schema), ("files.cedar", policy)],
        inbound: None,
        mcp: None,
        extra_config: "",
    };
    let gw = Gateway::start_with_upstreams(options, &upstreams).await;
    let token = gw.idp.delegated();
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /files/hello.txt HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    for call in 1..=2 {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).ends_with("hello") {
            let within = std::time::Duration::from_secs(10);
            let read = tokio::time::timeout(within, stream.read(&mut chunk))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            assert!(read > 0, "call {call}: the connection closed: {seen:?}");
            seen.extend_from_slice(&chunk[..read]);
        }
        let answer = String::from_utf8_lossy(&seen);
        assert!(answer.starts_with("HTTP/1.1 200"), "call {call}: {answer}");
    }
}

/// `toolgate init` writes a project the README's offline tour runs in as printed: check,
/// policy tests, an offline decision, a development token the gateway accepts. It overwrites
/// nothing.
#[tokio::test]
async fn init_writes_a_project_the_offline_tour_runs_in() {
    let dir = TempDir::new("init");
    let project = dir.0.join("project");
    let at = |name: &str| project.join(name).to_string_lossy().to_string();
    let init = toolgate(&["init", &at("")]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let check = toolgate(&["check", "--config", &at("toolgate.yaml")]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let tests = toolgate(&["test", &at("policies/tests")]);
    let printed = String::from_utf8_lossy(&tests.stdout);
    assert!(
        tests.status.success() && printed.contains("2 passed, 0 failed"),
        "{printed}"
    );
    let decision = toolgate(&[
        "authorize",
        "--config",
        &at("toolgate.yaml"),
        "--request",
        &at("req.yaml"),
    ]);
    let decision: Value = serde_json::from_slice(&decision.stdout).unwrap();
    assert_eq!(decision["decision"], "allow", "{decision}");
    // A development token, accepted by the gateway serving the project.
    let token = toolgate(&[
        "token",
        "--config",
        &at("toolgate.yaml"),
        "--key",
        &at("idp.pem"),
        "--sub",
        "alice",
        "--act",
        "assistant",
    ]);
    let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
    let (child, addr, _) = spawn_serve(&project.join("toolgate.yaml")).await;
    let _serving = Killed(child);
    // Authenticated and allowed (the example upstream itself is not running here: 502).
    let answer = get(&format!("http://{addr}/example/items/42"), &token).await;
    assert!(
        ![401, 403].contains(&answer.status.as_u16()),
        "{}: {:?}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    let again = toolgate(&["init", &at("")]);
    assert!(!again.status.success(), "init overwrote the project");
}

/// Logs for machines: `--log-format json` puts `message` at the top level of each line, and
/// nothing written to a file carries terminal colours.
#[tokio::test]
async fn logs_have_a_flag_a_flat_json_shape_and_no_colours_off_a_terminal() {
    let dir = TempDir::new("logs");
    let project = dir.0.join("project");
    let init = toolgate(&["init", &project.to_string_lossy()]);
    assert!(init.status.success());
    let config = project.join("toolgate.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    std::fs::write(&config, text).unwrap();
    for format in ["json", "text"] {
        let stderr = dir.0.join(format!("{format}.log"));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"));
        command
            .args(["--log-format", format, "serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("TOOLGATE_LOG_FORMAT")
            .stderr(std::fs::File::create(&stderr).unwrap());
        let (child, _, _) = announced_serve(command, None).await;
        let _serving = Killed(child);
        // The log line follows the announcement on stdout.
        let mut logged = String::new();
        for _ in 0..100 {
            logged = std::fs::read_to_string(&stderr).unwrap();
            if logged.contains("toolgate serving") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(!logged.contains('\u{1b}'), "colours in a file: {logged}");
        let serving = logged
            .lines()
            .find(|l| l.contains("toolgate serving"))
            .unwrap_or_else(|| panic!("{logged}"));
        if format == "json" {
            let line: Value = serde_json::from_str(serving).unwrap();
            assert_eq!(line["message"], "toolgate serving", "{line}");
            assert!(line["listen"].is_string(), "{line}");
        } else {
            assert!(serde_json::from_str::<Value>(serving).is_err(), "{serving}");
        }
    }
    let completions = toolgate(&["completions", "bash"]);
    let script = String::from_utf8_lossy(&completions.stdout);
    assert!(
        completions.status.success() && script.contains("import"),
        "{script}"
    );
}

/// `check` passing means `serve` starts, and `check` failing means `serve` refuses: over a
/// table of broken configs, both refuse, each problem said once at its own file and line.
#[tokio::test]
async fn check_and_serve_agree_on_every_broken_config() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let policies = gw.dir.0.join("policies");
    std::fs::write(gw.dir.0.join("not-a-key.pem"), "not a key").unwrap();
    // Two policy folders, each the gateway's own plus one broken policy.
    for (folder, policy) in [
        ("policies-semicolon", "@id(\"bad\")\npermit (principal, action, resource)\n// next\n\n@id(\"next\")\nforbid (principal, action, resource);\n"),
        ("policies-typed", "@id(\"bad\")\npermit (principal, action, resource)\nwhen { context.nope > 1 };\n"),
    ] {
        let copy = gw.dir.0.join(folder);
        std::fs::create_dir(&copy).unwrap();
        for entry in std::fs::read_dir(&policies).unwrap() {
            let entry = entry.unwrap();
            if entry.path().is_file() {
                std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
            }
        }
        std::fs::write(copy.join("bad.cedar"), policy).unwrap();
    }
    type Edit = fn(String) -> String;
    // (name, edit, the file named first (empty: the config), text expected once)
    let table: Vec<(&str, Edit, &str, &str)> = vec![
        (
            "missing JWKS file",
            |t| t.replace("jwks_file: idp.jwks.json", "jwks_file: missing.jwks.json"),
            "",
            "jwks_file",
        ),
        (
            "missing audit folder",
            |t| t.replace("path: audit.jsonl", "path: missing/audit.jsonl"),
            "",
            "its folder does not exist",
        ),
        (
            "missing secret file",
            |t| {
                t.replace(
                    "    audience: https://records.internal\n",
                    "    audience: https://records.internal\n    credential: { mode: inject, header: X-Key, secret_file: missing.secret }\n",
                )
            },
            "",
            "No such file or directory",
        ),
        (
            "a route naming an undeclared tool",
            |t| {
                t.replace(
                    "      - { tool: refund, method: POST, path: /refunds }\n",
                    "      - { tool: refund, method: POST, path: /refunds }\n      - { tool: nope, method: GET, path: /nope }\n",
                )
            },
            "",
            "\"billing/nope\" is not declared",
        ),
        (
            "an unknown key",
            |t| t.replace("limits:\n", "limits:\n  max_bodies: 1\n"),
            "",
            "unknown field `max_bodies`",
        ),
        (
            "a signing key that is not a key",
            |t| t.replace("signing_key: signing.pem", "signing_key: not-a-key.pem"),
            "",
            "credentials.signing_key",
        ),
        (
            "a missing admin token file",
            |t| {
                t.replace(
                    "admin_token_file: admin.token",
                    "admin_token_file: gone.token",
                )
            },
            "",
            "admin_token_file",
        ),
        (
            "a policy without its `;`",
            |t| t.replace("policies: policies/", "policies: policies-semicolon/"),
            "bad.cedar:2:",
            "missing `;` at the end of this policy (the next starts on line 5)",
        ),
        (
            "a policy reading what the schema does not declare",
            |t| t.replace("policies: policies/", "policies: policies-typed/"),
            "bad.cedar:3:",
            "policy `bad`: attribute `nope`",
        ),
        (
            "a TLS certificate file that does not exist",
            |t| {
                t.replace(
                    "limits:\n",
                    "tls: { cert: missing.crt, key: missing.key }\nlimits:\n",
                )
            },
            "",
            "tls: ",
        ),
        (
            "a Redis password file that does not exist",
            |t| {
                t.replace(
                    "limits:\n",
                    "tasks:\n  store: redis://127.0.0.1:1\n  store_password_file: missing.password\nlimits:\n",
                )
            },
            "",
            "tasks.store_password_file",
        ),
        (
            "an audit path that is a folder",
            |t| t.replace("path: audit.jsonl", "path: policies"),
            "",
            "a folder, not a file",
        ),
        (
            "a Redis URL whose password holds a slash",
            |t| {
                t.replace(
                    "limits:\n",
                    "tasks:\n  store: \"redis://:pa/ss@127.0.0.1:6390\"\nlimits:\n",
                )
            },
            "",
            "redis://***@127.0.0.1:6390",
        ),
        (
            "a JWKS fetched over plain http off loopback",
            |t| {
                t.replace(
                    "jwks_file: idp.jwks.json",
                    "jwks_url: http://idp.example/jwks.json",
                )
            },
            "",
            "jwks_url must be an https:// URL",
        ),
        (
            "a policy directory that does not exist",
            |t| t.replace("policies: policies/", "policies: nowhere/"),
            "nowhere",
            "",
        ),
    ];
    let text = std::fs::read_to_string(gw.dir.0.join("toolgate.yaml")).unwrap();
    for (i, (name, edit, place, said)) in table.into_iter().enumerate() {
        let broken = gw.edited_config(&format!("broken-{i}.yaml"), edit);
        let edited = std::fs::read_to_string(&broken).unwrap();
        let checked = toolgate(&["check", "--config", broken.to_str().unwrap()]);
        let problems = String::from_utf8_lossy(&checked.stderr).to_string();
        assert!(!checked.status.success(), "{name}: check passed");
        let first = problems.lines().next().unwrap_or_default();
        let config = format!("{}:", broken.display());
        let place = if place.is_empty() {
            config.as_str()
        } else {
            place
        };
        assert!(first.contains(place), "{name}: {problems}");
        assert_eq!(
            problems.matches(said).count().min(1),
            1,
            "{name}: {problems}"
        );
        if !said.is_empty() {
            assert_eq!(
                first.matches(said).count(),
                1,
                "{name}: said twice: {first}"
            );
        }
        assert!(!first.contains("for policy"), "{name}: said twice: {first}");
        // The line is the edit's: a line of the config that differs from the original.
        if let Some(line) = first
            .strip_prefix(&format!("{}:", broken.display()))
            .and_then(|rest| rest.split(':').next())
            .and_then(|n| n.parse::<usize>().ok())
        {
            let at = edited.lines().nth(line - 1).unwrap_or_default();
            let near = edited.lines().skip(line.saturating_sub(2)).take(3);
            assert!(
                near.clone().any(|l| !text.lines().any(|o| o == l)),
                "{name}: line {line} ({at:?}) is not near the edit: {problems}"
            );
        }
        let serve = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"))
            .args(["serve", "--config"])
            .arg(&broken)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let output = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            tokio::task::spawn_blocking(move || serve.wait_with_output()),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: serve kept running where check refused"))
        .unwrap()
        .unwrap();
        assert!(!output.status.success(), "{name}: serve started");
        let refused = String::from_utf8_lossy(&output.stderr);
        assert!(refused.contains(said), "{name}: serve said {refused}");
        assert!(
            !problems.contains("pa/ss") && !refused.contains("pa/ss"),
            "{name}: a password said"
        );
    }
    drop(policies);
}

/// A passing `check` says what it could not promise (what `serve` reaches over the network)
/// and what is likely a mistake (MCP listings no policy can fill), without failing.
#[test]
fn check_warns_of_what_it_cannot_promise() {
    let dir = TempDir::new("warn");
    let project = dir.0.join("project");
    assert!(toolgate(&["init", &project.to_string_lossy()])
        .status
        .success());
    let schema = project.join("policies/schema.cedarschema");
    let text = std::fs::read_to_string(&schema).unwrap();
    let start = text.find("  action list appliesTo").unwrap();
    let end = start + text[start..].find("};\n").unwrap() + 3;
    std::fs::write(&schema, format!("{}{}", &text[..start], &text[end..])).unwrap();
    let config = project.join("toolgate.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("upstreams:\n", "tasks:\n  store: redis://127.0.0.1:6379\nupstreams:\n  - name: tools\n    url: http://127.0.0.1:9002/mcp\n    audience: https://tools.internal\n    kind: mcp\n");
    std::fs::write(&config, text).unwrap();
    // Not read: an annotation toolgate does not know, a policy file in a sub-folder.
    let policy = project.join("policies/example.cedar");
    let text = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(
        &policy,
        text.replace(
            "@id(\"example-read\")",
            "@id(\"example-read\")\n@ratelimit(\"10/minute\")",
        ),
    )
    .unwrap();
    std::fs::create_dir(project.join("policies/more")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink("..", project.join("policies/more/up")).unwrap();
    std::fs::write(
        project.join("policies/more/extra.cedar"),
        "forbid (principal, action, resource);",
    )
    .unwrap();
    let out = toolgate(&["check", "--config", &config.to_string_lossy()]);
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{warned}");
    assert!(
        warned.contains("upstream tools: the schema declares no `list` action"),
        "{warned}"
    );
    assert!(
        warned.contains("policy `example-read`: @ratelimit is not read by toolgate"),
        "{warned}"
    );
    assert!(warned.contains("more/extra.cedar: not loaded"), "{warned}");
    assert_eq!(
        warned.matches("not loaded").count(),
        1,
        "a link was followed: {warned}"
    );
    assert!(
        warned.contains("tasks.store: the Redis task store"),
        "{warned}"
    );
    assert!(
        warned
            .lines()
            .all(|l| l.starts_with(&format!("warning: {}", project.display()))),
        "{warned}"
    );
    // `toolgate token --claim` wins over the defaults: an expired test token.
    let token = toolgate(&[
        "token",
        "--config",
        &config.to_string_lossy(),
        "--key",
        &project.join("idp.pem").to_string_lossy(),
        "--sub",
        "alice",
        "--claim",
        "exp=1",
    ]);
    let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
    let payload = token.split('.').nth(1).unwrap();
    use base64::Engine as _;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["exp"], 1, "{claims}");
}

/// Identity as Okta, Entra ID and Keycloak issue it: the agent named by `agent_claim` (a
/// client-credentials caller in `azp`), the user by `user_claim` where the token has one, the
/// keys found through OIDC discovery, and the clock leeway as configured.
#[tokio::test]
async fn agent_claim_discovery_and_leeway_as_identity_providers_issue_tokens() {
    let key = toolgate_credential::SigningKey::generate().unwrap().0;
    // Its discovery document names the JWKS by an address known only once it listens.
    let idp_addr = std::sync::Arc::new(std::sync::OnceLock::new());
    let idp = {
        let (idp_addr, jwks) = (idp_addr.clone(), json!({"keys": [key.public_jwk()]}));
        document_server(move |path| match path {
            "/.well-known/openid-configuration" => {
                let at = idp_addr.get().map(ToString::to_string).unwrap_or_default();
                json!({"issuer": IDP, "jwks_uri": format!("http://{at}/keys")}).to_string()
            }
            "/keys" => jwks.to_string(),
            _ => String::new(),
        })
        .await
    };
    idp_addr.set(idp).unwrap();
    let upstream = Upstream::start().await;
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: Some(format!(
            "inbound:\n  jwt:\n    - issuer: {IDP}\n      discovery_url: http://{idp}/.well-known/openid-configuration\n      agent_claim: azp\n      user_claim: on_behalf_of\n      clock_leeway_seconds: 0\n      audiences: [{AUDIENCE}]\n"
        )),
        mcp: None,
        extra_config: "",
    })
    .await;
    let url = gw.url("/billing/invoices/1");
    let token = |claims: Value| key.sign("JWT", &with_defaults(claims)).unwrap();
    // A client-credentials token: the agent is `azp`, and there is no user (the policy
    // permits invoices only on behalf of one).
    let machine = token(json!({"sub": "service-account-42", "azp": "assistant"}));
    assert_eq!(get(&url, &machine).await.status, 403);
    // The same client acting for a user the token names.
    let delegated =
        token(json!({"sub": "service-account-42", "azp": "assistant", "on_behalf_of": "alice"}));
    assert_eq!(get(&url, &delegated).await.status, 200);
    let audit = gw.audit(2).await;
    assert_eq!(audit[0]["agent"], "assistant");
    assert!(audit[0]["user"].is_null(), "{}", audit[0]);
    assert_eq!(
        (&audit[1]["agent"], &audit[1]["user"]),
        (&json!("assistant"), &json!("alice"))
    );
    // No leeway: a token expired five seconds ago is refused (the default 30 s would take it).
    let now = toolgate_identity::unix_now();
    let expired =
        token(json!({"sub": "s", "azp": "assistant", "on_behalf_of": "alice", "exp": now - 5}));
    assert_eq!(get(&url, &expired).await.status, 401);
}

/// `toolgate schema config`: a JSON Schema (2020-12) that editors and CI can check a config
/// with. The configs toolgate itself writes and runs pass it; an unknown key or a wrong type
/// fails it, as `check` does.
#[tokio::test]
async fn the_config_schema_accepts_real_configs_and_refuses_what_check_refuses() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let dir = TempDir::new("config-schema");
    let schema = toolgate(&["schema", "config"]);
    assert!(schema.status.success());
    std::fs::write(dir.0.join("schema.json"), &schema.stdout).unwrap();
    let project = dir.0.join("project");
    assert!(toolgate(&["init", &project.to_string_lossy()])
        .status
        .success());
    let as_json = |path: &std::path::Path| -> Value {
        let yaml: serde_norway::Value =
            serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        serde_json::to_value(yaml).unwrap()
    };
    let good = [
        as_json(&project.join("toolgate.yaml")),
        as_json(&gw.dir.0.join("toolgate.yaml")),
    ];
    let mut unknown_key = good[0].clone();
    unknown_key["limits"] = json!({"max_bodies": 1});
    let mut wrong_type = good[0].clone();
    wrong_type["credentials"]["ttl_seconds"] = json!("sixty");
    let python = repo().join(".toolgate-test/venv-k8s/bin/python");
    assert!(python.exists(), "run scripts/test-deps.sh (jsonschema)");
    for (config, valid) in [
        (&good[0], true),
        (&good[1], true),
        (&unknown_key, false),
        (&wrong_type, false),
    ] {
        std::fs::write(dir.0.join("config.json"), config.to_string()).unwrap();
        let out = std::process::Command::new(&python)
            .current_dir(&dir.0)
            .args([
                "-c",
                "import json, jsonschema; jsonschema.Draft202012Validator(json.load(open('schema.json'))).validate(json.load(open('config.json')))",
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.success(),
            valid,
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `/readyz` says not ready while no issuer's keys are loaded (the identity provider not yet
/// reached): such a replica would answer every call 401. Ready once the keys come.
#[tokio::test]
async fn not_ready_until_some_issuer_has_keys() {
    use std::sync::{Arc, Mutex};
    let key = toolgate_credential::SigningKey::generate().unwrap().0;
    let served = Arc::new(Mutex::new(String::from("not yet")));
    let jwks = {
        let served = served.clone();
        document_server(move |_| served.lock().unwrap().clone()).await
    };
    let upstream = Upstream::start().await;
    let gw = Gateway::start(GatewayOptions {
        upstream: upstream.addr,
        extra_policies: &[],
        inbound: Some(format!(
            "inbound:\n  jwt:\n    - issuer: {IDP}\n      jwks_url: http://{jwks}/jwks.json\n      jwks_refetch_seconds: 1\n      audiences: [{AUDIENCE}]\n"
        )),
        mcp: None,
        extra_config: "",
    })
    .await;
    let ready = || async { send("GET", &gw.admin_url("/readyz"), &[], b"").await };
    let waiting = ready().await;
    assert_eq!(waiting.status, 503);
    assert!(waiting.json()["reason"].as_str().unwrap().contains("keys"));
    *served.lock().unwrap() = json!({"keys": [key.public_jwk()]}).to_string();
    // An unknown kid fetches the keys again.
    let token = key
        .sign(
            "JWT",
            &with_defaults(json!({"sub": "alice", "act": {"sub": "assistant"}})),
        )
        .unwrap();
    assert_eq!(
        get(&gw.url("/billing/invoices/1"), &token).await.status,
        200
    );
    assert_eq!(ready().await.status, 200);
}

/// `check --online` reaches what `serve` reaches over the network: an issuer's keys, the
/// Redis store. Reached, it passes with no "not checked" warning; unreached, it fails,
/// naming each at its line, where plain `check` only warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_reaches_what_serve_reaches() {
    let key = toolgate_credential::SigningKey::generate().unwrap().0;
    let jwks = json!({"keys": [key.public_jwk()]}).to_string();
    let idp = document_server(move |_| jwks.clone()).await;
    let dir = TempDir::new("online");
    let project = dir.0.join("project");
    assert!(toolgate(&["init", &project.to_string_lossy()])
        .status
        .success());
    let config = project.join("toolgate.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let reached = text.replace(
        "jwks_file: idp.jwks.json",
        &format!("jwks_url: http://{idp}/jwks.json"),
    );
    std::fs::write(&config, &reached).unwrap();
    let path = config.to_string_lossy().to_string();
    let online = toolgate(&["check", "--config", &path, "--online"]);
    let said = String::from_utf8_lossy(&online.stderr);
    assert!(online.status.success(), "{said}");
    assert!(!said.contains("not checked"), "{said}");

    let unreached = reached.replace(&idp.to_string(), "127.0.0.1:1").replace(
        "upstreams:\n",
        "tasks:\n  store: redis://127.0.0.1:1\nupstreams:\n",
    );
    std::fs::write(&config, unreached).unwrap();
    let offline = toolgate(&["check", "--config", &path]);
    let warned = String::from_utf8_lossy(&offline.stderr);
    assert!(
        offline.status.success() && warned.contains("not checked here"),
        "{warned}"
    );
    let online = toolgate(&["check", "--config", &path, "--online"]);
    let said = String::from_utf8_lossy(&online.stderr);
    assert!(!online.status.success(), "{said}");
    assert!(said.contains(&format!("{path}:")), "{said}");
    assert!(said.contains("inbound.jwt https://idp.example:"), "{said}");
    assert!(
        said.contains("tasks.store: task store unavailable"),
        "{said}"
    );
}
