//! Per-upstream credential modes (issue 12): a static secret injected after an allow, OAuth 2.0
//! client credentials, and RFC 8693 token exchange, against a recording upstream and a token
//! endpoint written for these tests (`TokenServer`: no real STS installs offline).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::Value;
use toolgate_credential::SigningKey;

/// A gateway on the harness's config with a `credential:` block (YAML lines at four spaces)
/// on the billing upstream, logging at `trace` into its own directory.
struct Fronted {
    _child: Killed,
    addr: SocketAddr,
    admin: SocketAddr,
    audit: PathBuf,
    /// Where its stderr and stdout go.
    logs: PathBuf,
}

impl Fronted {
    async fn start(gw: &Gateway, name: &str, block: &str) -> Fronted {
        Fronted::edited(gw, name, |t| {
            t.replace(
                "    timeout_seconds: 30\n",
                &format!("    timeout_seconds: 30\n{block}"),
            )
        })
        .await
    }

    /// On the harness's config with `edit` applied (and an audit file of its own).
    async fn edited(gw: &Gateway, name: &str, edit: impl Fn(String) -> String) -> Fronted {
        let config = gw.edited_config(&format!("{name}.yaml"), |t| {
            edit(t).replace("path: audit.jsonl", &format!("path: {name}-audit.jsonl"))
        });
        let logs = gw.dir.0.join(name);
        std::fs::create_dir_all(&logs).unwrap();
        let (child, addr, admin) = spawn_serve_logging(&config, "trace", Some(&logs)).await;
        Fronted {
            _child: Killed(child),
            addr,
            admin,
            audit: gw.dir.0.join(format!("{name}-audit.jsonl")),
            logs,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every audit line written so far (waits, bounded, for at least `n`).
    async fn audit(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines: Vec<Value> = std::fs::read_to_string(&self.audit)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} audit lines never came"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the gateway wrote: logs, audit, announcement.
    fn outputs(&self) -> String {
        [
            self.logs.join("stderr.log"),
            self.logs.join("stdout.log"),
            self.audit.clone(),
        ]
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect()
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn header<'a>(recorded: &'a Recorded, name: &str) -> Option<&'a str> {
    recorded.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_secret_reaches_only_the_upstream_and_rotates_on_reload() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let secret_file = gw.dir.0.join("crm.key");
    std::fs::write(&secret_file, "key-one-8f3a1c\n").unwrap();
    let g = Fronted::start(
        &gw,
        "inject",
        "    credential: { mode: inject, header: X-Api-Key, secret_file: crm.key }\n",
    )
    .await;
    let token = gw.idp.delegated();

    // The agent's own X-Api-Key and bearer token never pass; the upstream's key does.
    let allowed = send(
        "GET",
        &g.url("/billing/invoices/42"),
        &[
            ("authorization", &bearer(&token)),
            ("x-api-key", "agent-guess"),
        ],
        b"",
    )
    .await;
    assert_eq!(allowed.status, 200, "{:?}", allowed.body);
    let seen = upstream.requests();
    let call = seen.last().unwrap();
    assert_eq!(header(call, "x-api-key"), Some("key-one-8f3a1c"));
    assert_eq!(header(call, "authorization"), None);
    assert!(!format!("{:?}", call.headers).contains(&token));

    // A denied call forwards nothing, and its answer names no secret.
    let denied = send(
        "POST",
        &g.url("/billing/refunds"),
        &[
            ("authorization", &bearer(&token)),
            ("content-type", "application/json"),
        ],
        br#"{"amount": 900}"#,
    )
    .await;
    assert_eq!(denied.status, 403);
    assert_eq!(upstream.requests().len(), seen.len());
    assert!(!String::from_utf8_lossy(&denied.body).contains("key-one"));

    let lines = g.audit(2).await;
    assert_eq!(lines[0]["credential_mode"], "inject");
    let id = lines[0]["credential_id"].as_str().unwrap();
    // Named by an HMAC under the gateway's key: a short secret cannot be guessed from it.
    assert!(id.starts_with("hmac:"), "{id}");
    assert_eq!(lines[0]["jti"], Value::Null);
    assert_eq!(
        lines[1]["credential_mode"],
        Value::Null,
        "denied: nothing was sent"
    );

    // The secret file is rotated; a reload takes the new one.
    std::fs::write(&secret_file, "key-two-b71e09\n").unwrap();
    let reload = send(
        "POST",
        &format!("http://{}/admin/reload", g.admin),
        &[("authorization", &bearer(ADMIN_TOKEN))],
        b"",
    )
    .await;
    assert_eq!(reload.status, 200, "{:?}", reload.body);
    let again = get(&g.url("/billing/invoices/43"), &token).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        header(upstream.requests().last().unwrap(), "x-api-key"),
        Some("key-two-b71e09")
    );
    let lines = g.audit(3).await;
    assert_ne!(lines[2]["credential_id"], lines[0]["credential_id"]);

    // No secret in any log line (at trace), audit line or answer.
    let outputs = g.outputs();
    assert!(outputs.contains("toolgate serving"), "the logs were read");
    for secret in ["key-one-8f3a1c", "key-two-b71e09", token.as_str()] {
        assert!(
            !outputs.contains(secret),
            "{secret} leaked into the outputs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_and_basic_schemes_and_bad_secrets_refused_at_start() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    std::fs::write(gw.dir.0.join("bearer.key"), "opaque-bearer-5521").unwrap();
    let g = Fronted::start(
        &gw,
        "bearer",
        "    credential: { mode: inject, scheme: bearer, secret_file: bearer.key }\n",
    )
    .await;
    assert_eq!(
        get(&g.url("/billing/invoices/1"), &gw.idp.delegated())
            .await
            .status,
        200
    );
    assert_eq!(
        header(upstream.requests().last().unwrap(), "authorization"),
        Some("Bearer opaque-bearer-5521")
    );

    std::env::set_var("TOOLGATE_TEST_BASIC_SECRET", "svc:pa55-word-77");
    let g = Fronted::start(
        &gw,
        "basic",
        "    credential: { mode: inject, scheme: basic, secret_env: TOOLGATE_TEST_BASIC_SECRET }\n",
    )
    .await;
    assert_eq!(
        get(&g.url("/billing/invoices/1"), &gw.idp.delegated())
            .await
            .status,
        200
    );
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("svc:pa55-word-77")
    );
    assert_eq!(
        header(upstream.requests().last().unwrap(), "authorization"),
        Some(expected.as_str())
    );

    // `toolgate check` and start refuse a missing secret, a header toolgate sets itself, and
    // a token endpoint in the clear off loopback, each with a message naming where, not what.
    for (block, says) in [
        (
            "    credential: { mode: inject, header: X-Api-Key, secret_file: missing.key }\n",
            "missing.key",
        ),
        (
            "    credential: { mode: inject, header: X-Forwarded-For, secret_env: TOOLGATE_TEST_BASIC_SECRET }\n",
            "sets or strips itself",
        ),
        (
            "    credential: { mode: client_credentials, token_endpoint: \"http://sts.example/token\", client_id: tg, client_secret_env: TOOLGATE_TEST_BASIC_SECRET }\n",
            "https://",
        ),
        (
            "    credential: { mode: mint, secret_file: bearer.key }\n",
            "does not apply to mode mint",
        ),
        // A secret to a plain-HTTP upstream off loopback (the url is moved below).
        (
            "    credential: { mode: inject, scheme: bearer, secret_file: bearer.key }\n    url: http://tools.example/api\n",
            "needs an https:// url",
        ),
    ] {
        let config = gw.edited_config("bad.yaml", |t| {
            let moved = if block.contains("url:") {
                // The harness's own billing url line goes; the block's takes its place.
                t.lines()
                    .filter(|l| !(l.starts_with("    url: http://") && l.ends_with("/api")))
                    .map(|l| format!("{l}\n"))
                    .collect()
            } else {
                t
            };
            moved.replace("    timeout_seconds: 30\n", &format!("    timeout_seconds: 30\n{block}"))
        });
        let out = toolgate(&["check", "--config", config.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{block}");
        assert!(text.contains(says), "{block}: {text}");
        assert!(!text.contains("pa55-word"), "{text}");
    }
}

/// A gateway whose billing upstream gets its tokens from `sts` (`more`: YAML lines at four
/// spaces after the `credential:` block, e.g. its `tls:`).
async fn with_token_endpoint(
    gw: &Gateway,
    name: &str,
    sts: &TokenServer,
    mode: &str,
    auth: &str,
    more: &str,
) -> Fronted {
    Fronted::start(
        gw,
        name,
        &format!(
            "    credential:\n      mode: {mode}\n      token_endpoint: {}\n      client_id: toolgate-test\n      {auth}\n      timeout_seconds: 1\n{more}",
            sts.url()
        ),
    )
    .await
}

/// A recording upstream, the harness's gateway, a token endpoint, and a gateway whose billing
/// upstream gets client-credentials tokens from it with `secret`.
async fn with_client_credentials(
    name: &str,
    secret: &str,
) -> (Upstream, Gateway, TokenServer, Fronted) {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    std::fs::write(gw.dir.0.join("sts-client"), format!("{secret}\n")).unwrap();
    let sts = TokenServer::start().await;
    let auth = "client_secret_file: sts-client";
    let g = with_token_endpoint(&gw, name, &sts, "client_credentials", auth, "").await;
    (upstream, gw, sts, g)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_are_asked_for_the_granted_scope_and_kept_while_they_live() {
    let (upstream, gw, sts, g) = with_client_credentials("cc", "client-secret-4410").await;
    let token = gw.idp.delegated();

    assert_eq!(get(&g.url("/billing/invoices/1"), &token).await.status, 200);
    assert_eq!(get(&g.url("/billing/invoices/2"), &token).await.status, 200);
    let asked = sts.requests();
    assert_eq!(asked.len(), 1, "the second call used the kept token");
    assert_eq!(asked[0].form["grant_type"], "client_credentials");
    assert_eq!(asked[0].form["scope"], "billing/get_invoice invoices:read");
    let basic =
        base64::engine::general_purpose::STANDARD.encode("toolgate-test:client-secret-4410");
    assert_eq!(
        asked[0].authorization.as_deref(),
        Some(format!("Basic {basic}").as_str())
    );
    for call in upstream.requests() {
        assert_eq!(header(&call, "authorization"), Some("Bearer sts-1"));
    }
    // Another tool, another scope: another token.
    assert_eq!(get(&g.url("/billing/invoices"), &token).await.status, 200);
    assert_eq!(
        sts.requests()[1].form["scope"],
        "billing/list_invoices invoices:read"
    );
    assert_eq!(
        header(upstream.requests().last().unwrap(), "authorization"),
        Some("Bearer sts-2")
    );
    let lines = g.audit(3).await;
    assert_eq!(lines[0]["credential_mode"], "client_credentials");
    assert!(lines[0]["credential_id"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(lines[0]["credential_id"], lines[1]["credential_id"]);

    // A token wider than asked is refused, and nothing is forwarded.
    sts.answer(TokenAnswer::Issue {
        expires_in: Some(300),
        scope: Some("billing/refund refunds:write admin".into()),
    });
    let forwarded = upstream.requests().len();
    let widened = send(
        "POST",
        &g.url("/billing/refunds"),
        &[
            ("authorization", &bearer(&token)),
            ("content-type", "application/json"),
        ],
        br#"{"invoice_id": 1, "amount": 100}"#,
    )
    .await;
    assert_eq!(widened.status, 502, "{:?}", widened.body);
    assert_eq!(widened.json()["error"], "upstream_credential_unusable");
    assert_eq!(upstream.requests().len(), forwarded);
    assert!(!g.outputs().contains("client-secret-4410"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_failures_fail_closed() {
    let (upstream, gw, sts, g) = with_client_credentials("fail", "client-secret-9").await;
    let token = gw.idp.delegated();
    let cases = [
        (
            TokenAnswer::Error {
                status: 400,
                code: "invalid_target".into(),
            },
            502,
            "upstream_credential_refused",
            Some("invalid_target"),
        ),
        (
            TokenAnswer::Error {
                status: 503,
                code: "temporarily_unavailable".into(),
            },
            502,
            "upstream_credential_refused",
            Some("temporarily_unavailable"),
        ),
        (
            TokenAnswer::Error {
                status: 500,
                code: "<script>\"".into(),
            },
            502,
            "upstream_credential_refused",
            Some("server_error"),
        ),
        (
            TokenAnswer::Hang,
            503,
            "upstream_credential_unavailable",
            None,
        ),
    ];
    for (i, (how, status, error, code)) in cases.into_iter().enumerate() {
        sts.answer(how);
        let answer = get(&g.url(&format!("/billing/invoices/{i}")), &token).await;
        assert_eq!(answer.status, status, "{:?}", answer.body);
        assert_eq!(answer.json()["error"], error);
        assert_eq!(answer.json()["token_endpoint_error"].as_str(), code);
        if status == 503 {
            assert_eq!(answer.headers["retry-after"], "1");
        }
    }
    assert!(upstream.requests().is_empty(), "nothing was forwarded");
    let lines = g.audit(4).await;
    assert!(lines
        .iter()
        .all(|l| l["decision"] == "allow" && l["upstream_status"].is_null()));
    assert!(lines[0]["errors"].to_string().contains("invalid_target"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_sends_the_user_token_and_an_actor_assertion() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let (client_key, pem) = SigningKey::generate().unwrap();
    std::fs::write(gw.dir.0.join("sts-client.pem"), pem).unwrap();
    let sts = TokenServer::start().await;
    let g = with_token_endpoint(
        &gw,
        "exchange",
        &sts,
        "exchange",
        "private_key: sts-client.pem",
        "",
    )
    .await;
    let token = gw.idp.delegated();

    assert_eq!(get(&g.url("/billing/invoices/1"), &token).await.status, 200);
    let asked = sts.requests();
    assert_eq!(asked.len(), 1);
    let form = &asked[0].form;
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:token-exchange"
    );
    assert_eq!(
        form["subject_token"], token,
        "the user-delegated token is the subject"
    );
    assert_eq!(
        form["subject_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    assert_eq!(
        form["requested_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(form["audience"], "https://billing.internal");
    assert_eq!(form["resource"], format!("http://{}/api", upstream.addr));
    assert_eq!(form["scope"], "billing/get_invoice invoices:read");
    assert_eq!(
        asked[0].authorization, None,
        "private_key_jwt, not a secret"
    );

    // The actor token: toolgate's key (its JWKS) says the agent acts; for the STS only.
    let jwks = get(&g.url("/.well-known/jwks.json"), "").await.json();
    let actor = verify_es256(&form["actor_token"], &jwks);
    assert_eq!(actor["sub"], "assistant");
    assert_eq!(actor["iss"], "https://toolgate.test");
    assert_eq!(actor["aud"], sts.url());
    assert_eq!(
        form["actor_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    // The client's assertion: signed with its private key, for the token endpoint.
    assert_eq!(
        form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    let client_jwks = serde_json::json!({"keys": [client_key.public_jwk()]});
    let assertion = verify_es256(&form["client_assertion"], &client_jwks);
    assert_eq!(
        (assertion["iss"].as_str(), assertion["sub"].as_str()),
        (Some("toolgate-test"), Some("toolgate-test"))
    );
    assert_eq!(assertion["aud"], sts.url());
    assert_eq!(
        header(upstream.requests().last().unwrap(), "authorization"),
        Some("Bearer sts-1")
    );

    // Kept while it lives: the same caller's next call asks nothing.
    assert_eq!(get(&g.url("/billing/invoices/2"), &token).await.status, 200);
    assert_eq!(sts.requests().len(), 1);

    // In a task: a token of its own, used until the task ends, forgotten when it does.
    let task_id = start_task(&g, &token).await;
    let in_task = |n: u32| {
        let url = g.url(&format!("/billing/invoices/{n}"));
        let (token, task_id) = (token.clone(), task_id.clone());
        async move {
            send(
                "GET",
                &url,
                &[
                    ("authorization", &bearer(&token)),
                    ("toolgate-task", &task_id),
                ],
                b"",
            )
            .await
        }
    };
    assert_eq!(in_task(3).await.status, 200);
    assert_eq!(in_task(4).await.status, 200);
    assert_eq!(
        sts.requests().len(),
        2,
        "one token for the task, kept within it"
    );
    assert_eq!(
        header(upstream.requests().last().unwrap(), "authorization"),
        Some("Bearer sts-2")
    );
    let done = send(
        "POST",
        &g.url(&format!("/v1/tasks/{task_id}/complete")),
        &[("authorization", &bearer(&token))],
        b"",
    )
    .await;
    assert_eq!(done.status, 200);
    assert_eq!(in_task(5).await.status, 403, "the task ended");
    assert_eq!(sts.requests().len(), 2);

    let lines = g.audit(5).await;
    let task_line = lines
        .iter()
        .find(|l| l["task_id"] == task_id.as_str() && l["action"] == "billing/get_invoice")
        .unwrap();
    assert_eq!(task_line["credential_mode"], "exchange");
    assert!(task_line["credential_id"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));

    // A refused exchange fails closed with the STS's code.
    sts.answer(TokenAnswer::Error {
        status: 400,
        code: "invalid_target".into(),
    });
    let other = gw
        .idp
        .sign(serde_json::json!({"sub": "bob", "act": {"sub": "assistant"}}));
    let refused = get(&g.url("/billing/invoices/6"), &other).await;
    assert_eq!(refused.status, 502);
    assert_eq!(refused.json()["token_endpoint_error"], "invalid_target");
}

async fn start_task(g: &Fronted, token: &str) -> String {
    let answer = send(
        "POST",
        &g.url("/v1/tasks"),
        &[
            ("authorization", &bearer(token)),
            ("content-type", "application/json"),
        ],
        br#"{"intent": "reconcile invoices", "ttl_seconds": 600}"#,
    )
    .await;
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    answer.json()["task_id"].as_str().unwrap().to_string()
}

/// The claims of an ES256 JWT, verified against a JWKS.
fn verify_es256(token: &str, jwks: &Value) -> Value {
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let key =
        jsonwebtoken::DecodingKey::from_jwk(set.find(&kid).expect("signed by a published key"))
            .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .unwrap()
        .claims
}

/// The billing upstream moved to `https://localhost:<port>/api`, with `tls` (YAML lines at
/// four spaces) under it.
async fn over_tls(gw: &Gateway, name: &str, upstream: &Upstream, tls: &str) -> Fronted {
    let plain = format!("    url: http://{}/api\n", gw_upstream(gw));
    let secure = format!(
        "    url: https://localhost:{}/api\n{tls}",
        upstream.addr.port()
    );
    Fronted::edited(gw, name, |t| t.replace(&plain, &secure)).await
}

/// The recording upstream the harness's config names for billing.
fn gw_upstream(gw: &Gateway) -> String {
    let config = std::fs::read_to_string(gw.dir.0.join("toolgate.yaml")).unwrap();
    let line = config
        .lines()
        .find(|l| l.contains("url: http://") && l.ends_with("/api"))
        .unwrap();
    line.trim()
        .trim_start_matches("url: http://")
        .trim_end_matches("/api")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_over_tls_with_a_private_ca_and_with_mtls() {
    let recorder = Upstream::start().await;
    let gw = Gateway::plain(&recorder).await;
    let pki = Pki::new(&gw.dir.0);
    let token = gw.idp.delegated();

    // A private CA: trusted only where the upstream's tls says so.
    let private = Upstream::start_tls(pki.acceptor(false)).await;
    let trusting = over_tls(&gw, "ca", &private, "    tls: { ca_file: ca.pem }\n").await;
    let answer = get(&trusting.url("/billing/invoices/7"), &token).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let seen = private.requests();
    assert_eq!(seen.len(), 1);
    // Over TLS the client and the upstream agree on h2 (the URI is then absolute).
    let uri: http::Uri = seen[0].uri.parse().unwrap();
    assert_eq!(uri.path(), "/api/invoices/7");
    assert!(header(&seen[0], "authorization")
        .unwrap()
        .starts_with("Bearer ey"));
    let untrusting = over_tls(&gw, "public-roots", &private, "").await;
    let refused = get(&untrusting.url("/billing/invoices/8"), &token).await;
    assert_eq!(
        refused.status, 502,
        "a certificate from an unknown CA: {:?}",
        refused.body
    );
    assert_eq!(private.requests().len(), 1, "nothing reached it");

    // mTLS: the upstream takes only clients with a certificate from its CA.
    let strict = Upstream::start_tls(pki.acceptor(true)).await;
    let with_cert = over_tls(
        &gw,
        "mtls",
        &strict,
        "    tls: { ca_file: ca.pem, client_cert: client.pem, client_key: client.key }\n",
    )
    .await;
    assert_eq!(
        get(&with_cert.url("/billing/invoices/9"), &token)
            .await
            .status,
        200
    );
    assert_eq!(strict.requests().len(), 1);
    let without = over_tls(
        &gw,
        "no-client-cert",
        &strict,
        "    tls: { ca_file: ca.pem }\n",
    )
    .await;
    assert_eq!(
        get(&without.url("/billing/invoices/10"), &token)
            .await
            .status,
        502
    );
    assert_eq!(strict.requests().len(), 1);
    assert!(
        recorder.requests().is_empty(),
        "nothing went to the plain upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_over_tls_is_verified_with_the_upstreams_ca() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let pki = Pki::new(&gw.dir.0);
    std::fs::write(gw.dir.0.join("sts-client"), "client-secret-77\n").unwrap();
    let sts = TokenServer::start_tls(pki.acceptor(false)).await;
    let auth = "client_secret_file: sts-client";
    // The upstream's own tls settings verify its token endpoint too.
    let tls = "    tls: { ca_file: ca.pem }\n";
    let trusting = with_token_endpoint(&gw, "sts-ca", &sts, "client_credentials", auth, tls).await;
    let token = gw.idp.delegated();
    let answer = get(&trusting.url("/billing/invoices/1"), &token).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(sts.requests().len(), 1);
    assert_eq!(
        header(upstream.requests().last().unwrap(), "authorization"),
        Some("Bearer sts-1")
    );

    // Without the CA, the endpoint's certificate is not trusted: no token, nothing forwarded.
    let untrusting =
        with_token_endpoint(&gw, "sts-public", &sts, "client_credentials", auth, "").await;
    let refused = get(&untrusting.url("/billing/invoices/2"), &token).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(refused.json()["error"], "upstream_credential_unavailable");
    assert_eq!(sts.requests().len(), 1);
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_python_check_accepts_a_minted_credential_only() {
    let upstream = Upstream::start().await;
    let gw = Gateway::plain(&upstream).await;
    let inbound = gw.idp.delegated();
    assert_eq!(
        get(&gw.url("/billing/invoices/5"), &inbound).await.status,
        200
    );
    let minted = header(&upstream.requests()[0], "authorization")
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_string();
    let check = |token: &str, audience: &str| {
        std::process::Command::new(python())
            .arg(repo().join("docs/examples/verify_credential.py"))
            .args([
                &gw.url("/.well-known/jwks.json"),
                "https://toolgate.test",
                audience,
                token,
            ])
            .output()
            .unwrap()
    };
    let out = check(&minted, "https://billing.internal");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let claims: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (claims["sub"].as_str(), claims["act"]["sub"].as_str()),
        (Some("alice"), Some("assistant"))
    );
    assert_eq!(claims["scope"], "billing/get_invoice invoices:read");
    // The Rust check of docs/credentials.md agrees.
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(get(&gw.url("/.well-known/jwks.json"), "").await.json()).unwrap();
    let claims = verify(
        &minted,
        &jwks,
        "https://toolgate.test",
        "https://billing.internal",
    )
    .unwrap();
    assert_eq!(claims["aud"], "https://billing.internal");
    assert!(verify(
        &minted,
        &jwks,
        "https://toolgate.test",
        "https://records.internal"
    )
    .is_err());
    assert!(verify(
        &inbound,
        &jwks,
        "https://toolgate.test",
        "https://billing.internal"
    )
    .is_err());
    // Another tool's audience, and the agent's own token, are refused.
    for (token, audience) in [
        (minted.as_str(), "https://records.internal"),
        (inbound.as_str(), "https://billing.internal"),
    ] {
        let out = check(token, audience);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("refused: "));
    }
}

/// The Rust check of docs/credentials.md, as printed there.
fn verify(
    token: &str,
    jwks: &jsonwebtoken::jwk::JwkSet,
    issuer: &str,
    audience: &str,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
    let header = decode_header(token)?;
    if header.typ.as_deref() != Some("at+jwt") {
        return Err("not an access token".into());
    }
    let kid = header.kid.ok_or("no kid")?;
    let jwk = jwks
        .find(&kid)
        .ok_or("unknown kid: refetch the JWKS once")?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud"]);
    validation.leeway = 5;
    Ok(decode::<serde_json::Value>(token, &DecodingKey::from_jwk(jwk)?, &validation)?.claims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_miss_the_cache_together_ask_the_endpoint_once() {
    let (upstream, gw, sts, g) = with_client_credentials("herd", "client-secret-5").await;
    // The endpoint answers slowly: every call below misses the cache while the first asks.
    sts.answer(TokenAnswer::IssueAfter(Duration::from_millis(300)));
    let token = gw.idp.delegated();
    let calls: Vec<_> = (0..6)
        .map(|n| {
            let (url, token) = (g.url(&format!("/billing/invoices/{n}")), token.clone());
            tokio::spawn(async move { get(&url, &token).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().status, 200);
    }
    assert_eq!(sts.requests().len(), 1, "one ask for six calls");
    for call in upstream.requests() {
        assert_eq!(header(&call, "authorization"), Some("Bearer sts-1"));
    }
}
