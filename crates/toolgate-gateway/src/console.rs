//! The operator console (`/console`, on the admin listener only): pending approvals to decide,
//! recent decisions (live), tasks, policy status. Server-rendered HTML with forms; a small
//! script of its own (no inline script, a strict Content-Security-Policy) refreshes the
//! decisions. An operator signs in with the admin token; the session is a cookie the gateway
//! signs (any replica reads it; a new admin token ends every session), and every change
//! carries a synchroniser token derived from the session, checked before anything else.
//! Everything an agent wrote is escaped.

use std::collections::HashMap;
use std::fmt::Write as _;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use toolgate_tasks::State;

use crate::answer::{full, Body};
use crate::audit::{AuditRecord, Verdict};
use crate::pipeline::read_limited;
use crate::Gateway;

const COOKIE: &str = "toolgate_console";
/// A console session lasts this long.
const SESSION_SECONDS: u64 = 8 * 3600;
/// The most a console form may hold.
const MAX_FORM: usize = 16 * 1024;
const APP_JS: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/console.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A signed-in operator's session (its cookie value), and its synchroniser token.
struct Session {
    csrf: String,
}

impl Gateway {
    /// Every `/console` request.
    pub(crate) async fn console(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        let session = self.console_session(&request);
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let response = match (&method, segments.as_slice(), session) {
            (&Method::GET, ["console", "app.js"], _) => asset("text/javascript", APP_JS),
            (&Method::GET, ["console", "console.css"], _) => asset("text/css", STYLE),
            (&Method::POST, ["console", "login"], _) => self.console_login(request).await,
            (&Method::GET, ["console"], None) => page(StatusCode::OK, "Sign in", &login_form(None)),
            (_, _, None) => redirect("/console"),
            (&Method::GET, ["console"], Some(session)) => {
                let filters = query(request.uri().query());
                let html = self.dashboard(&session, &filters).await;
                page(StatusCode::OK, "toolgate console", &html)
            }
            (&Method::GET, ["console", "decisions.json"], Some(_)) => {
                let filters = query(request.uri().query());
                let rows = self.recent_decisions(&filters);
                json_no_store(&json!({"decisions": rows}))
            }
            (&Method::GET, ["console", "decisions", id], Some(_)) => self.why_page(id),
            (&Method::POST, _, Some(session)) => self.console_change(request, &session).await,
            _ => page(StatusCode::NOT_FOUND, "Not found", "<p>Not found.</p>"),
        };
        with_security_headers(response)
    }

    /// The session a request's cookie names, if it is one the gateway signed, unexpired, for
    /// the current admin token.
    fn console_session<B>(&self, request: &Request<B>) -> Option<Session> {
        let cookie = cookie_value(request.headers(), COOKIE)?;
        let (expires, rest) = cookie.split_once('.')?;
        let (nonce, tag) = rest.split_once('.')?;
        let expires: u64 = expires.parse().ok()?;
        if expires <= toolgate_identity::unix_now() {
            return None;
        }
        let binding = self.console_binding(expires, nonce)?;
        if !self.minter.is_session_tag(&binding, tag) {
            return None;
        }
        let csrf = self
            .minter
            .session_tag(&json!(["console-csrf", cookie]).to_string());
        Some(Session { csrf })
    }

    /// What a session's tag signs: its expiry and nonce, and the admin token it was opened
    /// with (as its keyed id), so a new token ends every session.
    fn console_binding(&self, expires: u64, nonce: &str) -> Option<String> {
        let token = self.admin_token.as_deref()?;
        let token_id = self.minter.secret_id(token);
        Some(json!(["console", expires, nonce, token_id]).to_string())
    }

    async fn console_login(&self, request: Request<Incoming>) -> Response<Body> {
        let Ok(form) = read_form(request, self.body_limit(MAX_FORM)).await else {
            return page(
                StatusCode::BAD_REQUEST,
                "Sign in",
                &login_form(Some("The form could not be read.")),
            );
        };
        let Some(expected) = self.admin_token.as_deref() else {
            let why = "The console is off: the config names no admin_token_file.";
            return page(StatusCode::FORBIDDEN, "Sign in", &login_form(Some(why)));
        };
        let presented = form.get("token").map(String::as_str).unwrap_or("");
        let right =
            crate::admin::constant_time_eq(presented.trim().as_bytes(), expected.as_bytes());
        self.audit_sign_in(right);
        if !right {
            tracing::warn!("console sign-in refused: wrong admin token");
            return page(
                StatusCode::UNAUTHORIZED,
                "Sign in",
                &login_form(Some("That is not the admin token.")),
            );
        }
        let expires = toolgate_identity::unix_now() + SESSION_SECONDS;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let Some(binding) = self.console_binding(expires, &nonce) else {
            return page(StatusCode::FORBIDDEN, "Sign in", &login_form(None));
        };
        let tag = self.minter.session_tag(&binding);
        // The admin listener speaks plain HTTP; a console reached over TLS (a proxy in front)
        // says so by its `approvals.console_url`.
        let behind_tls = self
            .config
            .approvals
            .console_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"));
        let secure = if behind_tls { "; Secure" } else { "" };
        let cookie = format!(
            "{COOKIE}={expires}.{nonce}.{tag}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECONDS}{secure}"
        );
        let mut response = redirect("/console");
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        response
    }

    /// A sign-in, as the audit records an admin token presented on the admin API.
    fn audit_sign_in(&self, right: bool) {
        let mut record = AuditRecord {
            decision_id: uuid::Uuid::now_v7().to_string(),
            time: toolgate_policy::utc_millis(chrono::Utc::now()),
            method: "POST".into(),
            path: "/console/login".into(),
            agent: Some("console".into()),
            action: Some("sign_in".into()),
            decision: Verdict::of(right),
            unauthenticated: !right,
            ..AuditRecord::default()
        };
        record.status = if right { 303 } else { 401 };
        if !right {
            record.errors.push("admin token missing or wrong".into());
        }
        self.finish(record, None);
    }

    /// A change (decide an approval, end a task, sign out): its synchroniser token first.
    async fn console_change(
        &self,
        request: Request<Incoming>,
        session: &Session,
    ) -> Response<Body> {
        let path = request.uri().path().to_string();
        // Room for its audit line first: an operator's change is never made unrecorded.
        let slot = match self.audit_room() {
            Ok(slot) => slot,
            Err(refusal) => return refusal.into_response("", None),
        };
        let mut record = AuditRecord {
            agent: Some("console".into()),
            decision: Verdict::Allow,
            ..AuditRecord::begin(&request)
        };
        let form = match read_form(request, self.body_limit(MAX_FORM)).await {
            Ok(form) => form,
            Err(()) => {
                return page(
                    StatusCode::BAD_REQUEST,
                    "Refused",
                    "<p>The form could not be read.</p>",
                )
            }
        };
        let presented = form.get("csrf").map(String::as_str).unwrap_or("");
        if !crate::admin::constant_time_eq(presented.as_bytes(), session.csrf.as_bytes()) {
            record.decision = Verdict::Deny;
            record
                .errors
                .push("console change without its synchroniser token".into());
            record.status = StatusCode::FORBIDDEN.as_u16();
            self.finish(record, Some(slot));
            return page(
                StatusCode::FORBIDDEN,
                "Refused",
                "<p>This form is stale or was not sent from the console. Reload the page.</p>",
            );
        }
        if path == "/console/logout" {
            return signed_out();
        }
        let outcome = self.console_action(&path, &form, &mut record).await;
        let response = match outcome {
            Ok(()) => redirect("/console"),
            Err(refusal) => {
                record.decision = Verdict::Deny;
                record.errors.push(crate::answer::error_chain(&refusal));
                let why = format!(
                    "<p>Refused: {}</p><p><a href=\"/console\">Back</a></p>",
                    esc(&refusal.to_string())
                );
                page(refusal.status(), "Refused", &why)
            }
        };
        record.status = response.status().as_u16();
        self.finish(record, Some(slot));
        response
    }

    /// What a console form asks: decide an approval, end a task.
    async fn console_action(
        &self,
        path: &str,
        form: &HashMap<String, String>,
        record: &mut AuditRecord,
    ) -> Result<(), crate::answer::Refusal> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match segments.as_slice() {
            ["console", "approvals", id, verb @ ("approve" | "deny")] => {
                let body = json!({
                    "approver": form.get("approver").cloned().unwrap_or_default(),
                    "note": form.get("note").filter(|n| !n.trim().is_empty()),
                    "uses": form.get("uses").and_then(|n| n.trim().parse::<u64>().ok()),
                });
                let approve = *verb == "approve";
                self.decide_approval(id, approve, &body, record).await?;
                Ok(())
            }
            ["console", "tasks", id, verb @ ("complete" | "cancel")] => {
                record.task_id = Some(id.to_string());
                let state = match *verb {
                    "complete" => State::Completed,
                    _ => State::Cancelled,
                };
                self.end_task(id, state, record).await?;
                Ok(())
            }
            _ => Err(crate::answer::Refusal::NotFound("not_found")),
        }
    }

    /// The signed-in page.
    async fn dashboard(&self, session: &Session, filters: &HashMap<String, String>) -> String {
        let now = toolgate_identity::unix_now();
        let mut html = String::new();
        let _ = write!(
            html,
            "<header><h1>toolgate console</h1><form method=\"post\" action=\"/console/logout\">{}<button>Sign out</button></form></header>",
            csrf_field(session)
        );
        html.push_str(&self.policy_status());
        match self.tasks.approvals(now, 200).await {
            Ok(all) => html.push_str(&approvals_section(&all, session, now)),
            Err(e) => {
                let _ = write!(html, "<section><h2>Pending approvals</h2><p class=\"error\">The store cannot be read: {}</p></section>", esc(&e.to_string()));
            }
        }
        html.push_str(&decisions_section(&self.recent_decisions(filters), filters));
        match self.tasks.recent(50).await {
            Ok(tasks) => html.push_str(&tasks_section(&tasks, session, now)),
            Err(e) => {
                let _ = write!(html, "<section><h2>Tasks</h2><p class=\"error\">The store cannot be read: {}</p></section>", esc(&e.to_string()));
            }
        }
        html
    }

    /// The loaded policies (their digest), reloads and shadow flips.
    fn policy_status(&self) -> String {
        let engine = self.policy.load();
        let mut versions: Vec<String> = engine
            .sources()
            .map(|(id, source)| format!("{id}={}", source.version))
            .collect();
        versions.sort();
        use sha2::Digest;
        let digest = sha2::Sha256::digest(versions.join("\n").as_bytes());
        let version: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        let reloads = |result: &str| self.metrics.reloads.with_label_values(&[result]).get();
        let flips: u64 = self.metrics.shadow_flips_total();
        format!(
            "<section id=\"policy\"><h2>Policy status</h2><dl><dt>Policies loaded</dt><dd>{}</dd><dt>Set version</dt><dd><code>{version}</code></dd><dt>Reloads</dt><dd>{} taken, {} refused</dd><dt>Shadow flips</dt><dd>{flips}</dd></dl></section>",
            engine.policy_count(),
            reloads("success"),
            reloads("error"),
        )
    }

    /// The recent audit lines, filtered by agent, decision and tool (action), as the console
    /// shows them.
    fn recent_decisions(&self, filters: &HashMap<String, String>) -> Vec<Value> {
        let wanted = |line: &Value, key: &str, field: &str| match filters.get(key).map(|f| f.trim())
        {
            None | Some("") => true,
            Some(want) => line[field].as_str().is_some_and(|v| v.contains(want)),
        };
        self.audit
            .recent()
            .into_iter()
            .filter(|l| {
                wanted(l, "agent", "agent")
                    && wanted(l, "decision", "decision")
                    && wanted(l, "tool", "action")
            })
            .take(100)
            .map(|l| {
                json!({
                    "decision_id": l["decision_id"], "time": l["time"], "agent": l["agent"],
                    "user": l["user"], "action": l["action"], "decision": l["decision"],
                    "policies": l["policies"], "status": l["status"], "upstream": l["upstream"],
                    "approval_id": l["approval_id"], "approval_step": l["approval_step"],
                })
            })
            .collect()
    }

    /// One decision's whole audit line: who, what, which policies, why.
    fn why_page(&self, id: &str) -> Response<Body> {
        let line = self
            .audit
            .recent()
            .into_iter()
            .find(|l| l["decision_id"].as_str() == Some(id));
        let Some(line) = line else {
            let html = "<p>That decision is no longer among the recent ones: <code>toolgate audit why</code> reads it from the audit log.</p><p><a href=\"/console\">Back</a></p>";
            return page(StatusCode::NOT_FOUND, "Decision", html);
        };
        let pretty = serde_json::to_string_pretty(&line).unwrap_or_default();
        let html = format!(
            "<p><a href=\"/console\">Back</a></p><h2>Decision <code>{}</code></h2><p>{} by {} on {}: <strong>{}</strong></p><p>Policies: {}</p><pre>{}</pre>",
            esc(id),
            esc(line["action"].as_str().unwrap_or("")),
            esc(line["agent"].as_str().unwrap_or("")),
            esc(line["user"].as_str().unwrap_or("-")),
            esc(line["decision"].as_str().unwrap_or("")),
            esc(&line["policies"].to_string()),
            esc(&pretty),
        );
        page(StatusCode::OK, "Decision", &html)
    }
}

fn approvals_section(
    all: &[toolgate_tasks::approvals::CallApproval],
    session: &Session,
    now: u64,
) -> String {
    let mut html = String::from("<section id=\"approvals\"><h2>Pending approvals</h2>");
    let pending: Vec<_> = all.iter().filter(|a| a.pending(now)).collect();
    if pending.is_empty() {
        html.push_str("<p class=\"empty\">Nothing waits for a person.</p>");
    }
    for a in pending {
        let args = serde_json::to_string_pretty(&a.args).unwrap_or_default();
        let policies: Vec<&str> = a.policies.iter().map(|(id, _)| id.as_str()).collect();
        let _ = write!(
            html,
            "<article class=\"approval\" id=\"approval-{id}\" data-approval=\"{id}\"><h3>{action}</h3><p><span class=\"who\">{agent}</span> for <span class=\"who\">{user}</span>{task}</p><p class=\"reason\">{reason}</p><p>Asked by {policies}; {left} left.</p><pre class=\"args\">{args}</pre>\
             <form method=\"post\" action=\"/console/approvals/{id}/approve\">{csrf}<label>Approver <input name=\"approver\" required></label><label>Note <input name=\"note\"></label><label>Uses <input name=\"uses\" type=\"number\" min=\"1\" max=\"100\" value=\"1\"></label><button class=\"approve\">Approve</button></form>\
             <form method=\"post\" action=\"/console/approvals/{id}/deny\">{csrf}<label>Approver <input name=\"approver\" required></label><label>Note <input name=\"note\"></label><button class=\"deny\">Deny</button></form></article>",
            id = esc(&a.id),
            action = esc(&a.action),
            agent = esc(&a.agent),
            user = esc(a.user.as_deref().unwrap_or("no user")),
            task = a.task.as_deref().map(|t| format!(" in task <code>{}</code>", esc(t))).unwrap_or_default(),
            reason = esc(&a.reason),
            policies = esc(&policies.join(", ")),
            left = minutes(a.expires_at.saturating_sub(now)),
            args = esc(&args),
            csrf = csrf_field(session),
        );
    }
    html.push_str("</section>");
    html
}

fn decisions_section(rows: &[Value], filters: &HashMap<String, String>) -> String {
    let value = |key: &str| esc(filters.get(key).map(String::as_str).unwrap_or(""));
    let mut html = format!(
        "<section id=\"decisions\"><h2>Recent decisions</h2><form method=\"get\" action=\"/console\" class=\"filters\"><label>Agent <input name=\"agent\" value=\"{}\"></label><label>Decision <input name=\"decision\" value=\"{}\"></label><label>Tool <input name=\"tool\" value=\"{}\"></label><button>Filter</button></form>\
         <table><thead><tr><th>Time</th><th>Agent</th><th>User</th><th>Action</th><th>Decision</th><th>Policies</th><th>Status</th></tr></thead><tbody id=\"decision-rows\">",
        value("agent"),
        value("decision"),
        value("tool"),
    );
    for row in rows {
        html.push_str(&decision_row(row));
    }
    html.push_str("</tbody></table></section>");
    html
}

fn decision_row(row: &Value) -> String {
    let text = |key: &str| esc(row[key].as_str().unwrap_or(""));
    let policies: Vec<&str> = row["policies"]
        .as_array()
        .map(|p| p.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!(
        "<tr class=\"{decision}\"><td><a href=\"/console/decisions/{id}\">{time}</a></td><td>{agent}</td><td>{user}</td><td>{action}</td><td>{decision}</td><td>{policies}</td><td>{status}</td></tr>",
        id = text("decision_id"),
        time = text("time"),
        agent = text("agent"),
        user = text("user"),
        action = text("action"),
        decision = text("decision"),
        policies = esc(&policies.join(", ")),
        status = row["status"].as_u64().map(|s| s.to_string()).unwrap_or_default(),
    )
}

fn tasks_section(tasks: &[toolgate_tasks::Task], session: &Session, now: u64) -> String {
    let mut html = String::from("<section id=\"tasks\"><h2>Tasks</h2><table><thead><tr><th>Task</th><th>Agent</th><th>User</th><th>Intent</th><th>State</th><th></th></tr></thead><tbody>");
    for task in tasks {
        let actions = if task.is_live(now) {
            format!(
                "<form method=\"post\" action=\"/console/tasks/{id}/complete\">{csrf}<button>Complete</button></form><form method=\"post\" action=\"/console/tasks/{id}/cancel\">{csrf}<button>Cancel</button></form>",
                id = esc(&task.id),
                csrf = csrf_field(session)
            )
        } else {
            String::new()
        };
        let _ = write!(
            html,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{actions}</td></tr>",
            esc(&task.id),
            esc(&task.agent),
            esc(task.user.as_deref().unwrap_or("")),
            esc(&task.intent),
            task.status(now),
        );
    }
    html.push_str("</tbody></table></section>");
    html
}

fn login_form(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\">{}</p>", esc(e)))
        .unwrap_or_default();
    format!(
        "<section class=\"login\"><h1>toolgate console</h1>{error}<form method=\"post\" action=\"/console/login\"><label>Admin token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required autofocus></label><button>Sign in</button></form></section>"
    )
}

fn csrf_field(session: &Session) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&session.csrf)
    )
}

fn minutes(seconds: u64) -> String {
    match seconds {
        0..=59 => format!("{seconds} s"),
        60..=7199 => format!("{} min", seconds / 60),
        _ => format!("{} h", seconds / 3600),
    }
}

/// Text made safe in HTML text and attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><link rel=\"stylesheet\" href=\"/console/console.css\"><script src=\"/console/app.js\" defer></script></head><body>{body}</body></html>",
        esc(title)
    );
    let mut response = Response::new(full(html));
    *response.status_mut() = status;
    let html = HeaderValue::from_static("text/html; charset=utf-8");
    response.headers_mut().insert(header::CONTENT_TYPE, html);
    response
}

/// Back to the sign-in form, the session cookie gone.
fn signed_out() -> Response<Body> {
    let mut response = redirect("/console");
    let gone = format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&gone) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

fn asset(content_type: &'static str, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
    let value = HeaderValue::from_static(content_type);
    response.headers_mut().insert(header::CONTENT_TYPE, value);
    response
}

fn json_no_store(value: &Value) -> Response<Body> {
    crate::answer::json_response(StatusCode::OK, value)
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    response
}

fn with_security_headers(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn cookie_value<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn query(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// A form POST's fields (`application/x-www-form-urlencoded`, bounded).
async fn read_form(
    request: Request<Incoming>,
    limit: crate::pipeline::BodyLimit,
) -> Result<HashMap<String, String>, ()> {
    let (parts, body) = request.into_parts();
    let form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return Err(());
    }
    let bytes = read_limited(crate::pipeline::boxed(body), limit)
        .await
        .map_err(|_| ())?;
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}
