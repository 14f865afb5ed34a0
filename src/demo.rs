//! `toolgate demo`: the gateway in front of a built-in billing/records API, with demo keys,
//! the example policies and ready curl lines. It runs the same config path as `serve`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{jwk::Jwk, Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use toolgate_credential::{Claims, SigningKey};
use toolgate_gateway::{Config, Gateway};

const POLICIES: [(&str, &str); 5] = [
    (
        "schema.cedarschema",
        include_str!("../policies/schema.cedarschema"),
    ),
    ("billing.cedar", include_str!("../policies/billing.cedar")),
    ("records.cedar", include_str!("../policies/records.cedar")),
    ("platform.cedar", include_str!("../policies/platform.cedar")),
    ("entities.json", include_str!("../policies/entities.json")),
];

const IDP: &str = "https://idp.demo";
const BILLING_AUD: &str = "https://billing.demo";
const RECORDS_AUD: &str = "https://records.demo";

/// `keep`: the folder to write the demo's config, keys and policies in, and leave there at the
/// end (otherwise a temporary one, removed).
pub async fn run(
    listen: SocketAddr,
    admin_listen: SocketAddr,
    keep: Option<&std::path::Path>,
) -> Result<ExitCode, String> {
    let dir = match keep {
        Some(dir) => dir.to_path_buf(),
        None => std::env::temp_dir().join(format!("toolgate-demo-{}", std::process::id())),
    };
    if keep.is_some() && dir.join("toolgate.yaml").exists() {
        return Err(format!(
            "{}: holds a toolgate.yaml already; the demo overwrites nothing",
            dir.display()
        ));
    }
    std::fs::create_dir_all(dir.join("policies")).map_err(|e| e.to_string())?;
    for (name, text) in POLICIES {
        std::fs::write(dir.join("policies").join(name), text).map_err(|e| e.to_string())?;
    }
    let (idp_key, idp_pem) = SigningKey::generate().map_err(|e| e.to_string())?;
    let (gateway_key, gateway_pem) = SigningKey::generate().map_err(|e| e.to_string())?;
    crate::write_private(&dir.join("idp.pem"), &idp_pem)?;
    crate::write_private(&dir.join("toolgate-signing.pem"), &gateway_pem)?;
    std::fs::write(
        dir.join("idp.jwks.json"),
        json!({"keys": [idp_key.public_jwk()]}).to_string(),
    )
    .map_err(|e| e.to_string())?;

    // A fresh admin token each run: the admin listener's operations need it.
    let admin_token = uuid::Uuid::new_v4().simple().to_string();
    crate::write_private(&dir.join("admin.token"), &admin_token)?;

    let api = start_demo_api(gateway_key.public_jwk().clone()).await?;
    let config_path = dir.join("toolgate.yaml");
    std::fs::write(&config_path, demo_config(listen, admin_listen, api))
        .map_err(|e| e.to_string())?;

    let config = Config::load(&config_path)?;
    let gateway = Gateway::new(config, Some(config_path.clone()))
        .await
        .map_err(|e| toolgate_gateway::answer::error_chain(&e))?;
    let running = gateway.start().await?;
    crate::announce(&running);
    crate::reload_on_sighup(gateway.clone());
    print_tour(
        &running.agent_addr,
        &running.admin_addr,
        &idp_key,
        &admin_token,
        &dir,
    )?;

    crate::wait_for_signal().await;
    running.shutdown.trigger();
    running.wait().await;
    gateway.finish_audit().await;
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ExitCode::SUCCESS)
}

fn demo_config(listen: SocketAddr, admin: SocketAddr, api: SocketAddr) -> String {
    format!(
        r#"# Written by `toolgate demo`.
listen: {listen}
admin_listen: {admin}
admin_token_file: admin.token
issuer: https://toolgate.demo
policies: policies/
inbound:
  jwt:
    - issuer: {IDP}
      jwks_file: idp.jwks.json
      audiences: [toolgate]
credentials:
  signing_key: toolgate-signing.pem
  ttl_seconds: 60
upstreams:
  - name: billing
    url: http://{api}/billing
    audience: {BILLING_AUD}
    kind: rest
    routes:
      - {{ tool: get_invoice, method: GET, path: "/invoices/{{invoice_id}}" }}
      - {{ tool: list_invoices, method: GET, path: /invoices }}
      - {{ tool: refund, method: POST, path: /refunds }}
  - name: records
    url: http://{api}/records
    audience: {RECORDS_AUD}
    kind: rest
    routes:
      - {{ tool: get_patient_record, method: GET, path: "/patients/{{patient_id}}/record" }}
      - {{ tool: delete_patient_record, method: DELETE, path: "/patients/{{patient_id}}/record" }}
tasks:
  store: memory
audit:
  path: "-"
"#
    )
}

fn print_tour(
    agent: &SocketAddr,
    admin: &SocketAddr,
    idp: &SigningKey,
    admin_token: &str,
    dir: &Path,
) -> Result<(), String> {
    let now = toolgate_identity::unix_now();
    // Alice's assistant: an agent acting on behalf of the user alice (patient p-100).
    let token = idp
        .sign(
            "JWT",
            &json!({"iss": IDP, "aud": "toolgate", "sub": "alice", "act": {"sub": "assistant"},
                    "patient_id": "p-100", "iat": now, "exp": now + 3600}),
        )
        .map_err(|e| e.to_string())?;
    let base = format!("http://{agent}");
    let auth = "-H \"Authorization: Bearer $TOKEN\"";
    println!(
        r#"
toolgate demo is running: agent listener {base}, admin http://{admin}
config, demo keys and policies: {dir}

The token is alice's assistant: agent `assistant` acting for user `alice` (patient p-100),
valid for an hour. Audit lines appear below as decisions are made.

export TOKEN={token}

# 1. allowed: read an invoice on alice's behalf (the API shows the narrow credential it received)
curl -s {auth} {base}/billing/invoices/42

# 2. denied by default-deny: no policy permits deleting a patient record
curl -s -X DELETE {auth} {base}/records/patients/p-100/record

# 3. denied by forbid: refunds above 500 are forbidden even though a permit matches
curl -s -X POST {auth} -H 'Content-Type: application/json' -d '{{"invoice_id": 42, "amount": 900}}' {base}/billing/refunds

# more: own record allowed, another patient's denied, no token refused
curl -s {auth} {base}/records/patients/p-100/record
curl -s {auth} {base}/records/patients/p-200/record
curl -s -i {base}/billing/invoices/42
curl -s http://{admin}/metrics | grep ^toolgate_

# tasks: credentials that die when the work is done
TASK=$(curl -s -X POST {auth} -H 'Content-Type: application/json' -d '{{"intent": "refund invoice 42", "ttl_seconds": 600}}' {base}/v1/tasks | sed 's/.*"task_id":"\([^"]*\)".*/\1/')
curl -s {auth} -H "Toolgate-Task: $TASK" {base}/billing/invoices/42
curl -s -X POST {auth} {base}/v1/tasks/$TASK/complete
curl -s {auth} -H "Toolgate-Task: $TASK" {base}/billing/invoices/42     # now 403

# the admin listener: /metrics, /healthz and /readyz are open; its operations need the admin token
export ADMIN_TOKEN={admin_token}
curl -s -X POST -H "Authorization: Bearer $ADMIN_TOKEN" http://{admin}/admin/reload
curl -s -X POST http://{admin}/admin/reload                                  # 401 without it
"#,
        dir = dir.display()
    );
    Ok(())
}

/// The demo tool API. It verifies the credential toolgate minted, as a real upstream should.
async fn start_demo_api(gateway_jwk: Value) -> Result<SocketAddr, String> {
    let jwk: Jwk = serde_json::from_value(gateway_jwk).map_err(|e| e.to_string())?;
    let key = Arc::new(DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let key = key.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let key = key.clone();
                    async move { Ok::<_, std::convert::Infallible>(demo_api(req, &key).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn demo_api(req: Request<Incoming>, key: &DecodingKey) -> Response<Full<Bytes>> {
    let path: Vec<String> = req
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let audience = match path.first().map(String::as_str) {
        Some("billing") => BILLING_AUD,
        Some("records") => RECORDS_AUD,
        _ => return reply(StatusCode::NOT_FOUND, json!({"error": "no such API"})),
    };
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[audience]);
    let claims = match jsonwebtoken::decode::<Claims>(&token, key, &validation) {
        Ok(data) => data.claims,
        Err(e) => {
            return reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": format!("credential refused: {e}")}),
            )
        }
    };
    let seen = json!({"sub": claims.sub, "act": claims.act, "aud": claims.aud, "scope": claims.scope,
                      "jti": claims.jti, "expires_in": claims.exp.saturating_sub(claims.iat)});
    let method = req.method().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let segments: Vec<&str> = path.iter().skip(1).map(String::as_str).collect();
    let result = match (method.as_str(), segments.as_slice()) {
        ("GET", ["invoices", id]) => {
            json!({"invoice_id": id, "amount": 120, "currency": "EUR", "status": "paid"})
        }
        ("GET", ["invoices"]) => json!({"invoices": [{"invoice_id": 41}, {"invoice_id": 42}]}),
        ("POST", ["refunds"]) => json!({"refund": "accepted", "request": body}),
        ("GET", ["patients", id, "record"]) => {
            json!({"patient_id": id, "allergies": ["penicillin"]})
        }
        ("DELETE", ["patients", id, "record"]) => json!({"deleted": id}),
        _ => return reply(StatusCode::NOT_FOUND, json!({"error": "no such endpoint"})),
    };
    reply(
        StatusCode::OK,
        json!({"result": result, "credential_seen": seen}),
    )
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response
}
