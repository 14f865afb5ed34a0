//! The admin listener: metrics, health, readiness and policy reload. Never on the agent listener.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use toolgate_policy::PolicyEngine;

use toolgate_tasks::{Approval, State};

use crate::answer::{json_response, text_response, Body, Refusal};
use crate::audit::{AuditRecord, Verdict};
use crate::pipeline::{read_limited, BodyLimit};
use crate::{Config, Gateway, Routing};

/// A JSON body of an admin POST (`required`: it must have one). Anything else is refused, so a
/// browser's cross-site form cannot reach these endpoints.
async fn admin_body(
    request: Request<Incoming>,
    required: bool,
    limit: BodyLimit,
) -> Result<serde_json::Value, Refusal> {
    let (parts, body) = request.into_parts();
    let bytes = read_limited(crate::pipeline::boxed(body), limit).await?;
    if bytes.is_empty() && !required && !parts.headers.contains_key(http::header::CONTENT_TYPE) {
        return Ok(serde_json::Value::Null);
    }
    crate::rest::check_json_body_headers(&parts.headers)?;
    crate::rest::strict_json(&bytes)
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a reload did.
#[derive(Debug)]
pub struct ReloadReport {
    /// The number of policies now active, or why the new set was refused.
    pub policies: Result<usize, Vec<String>>,
    pub key_errors: Vec<String>,
    pub config_errors: Vec<String>,
    /// Config sections taken (`upstreams`).
    pub applied: Vec<String>,
    /// Config sections that changed but only apply after a restart.
    pub needs_restart: Vec<String>,
}

impl Default for ReloadReport {
    fn default() -> Self {
        ReloadReport {
            policies: Ok(0),
            key_errors: Vec::new(),
            config_errors: Vec::new(),
            applied: Vec::new(),
            needs_restart: Vec::new(),
        }
    }
}

impl ReloadReport {
    pub fn ok(&self) -> bool {
        self.policies.is_ok() && self.key_errors.is_empty() && self.config_errors.is_empty()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut errors: Vec<&String> = match &self.policies {
            Ok(_) => Vec::new(),
            Err(e) => e.iter().collect(),
        };
        errors.extend(self.key_errors.iter().chain(&self.config_errors));
        json!({
            "reloaded": self.policies.is_ok(),
            "policies": self.policies.as_ref().ok(),
            "errors": errors,
            "config": {"applied": self.applied, "needs_restart": self.needs_restart},
        })
    }
}

impl Gateway {
    /// `/metrics`, `/healthz` and `/readyz` are open (a sidecar's agent shares localhost with
    /// this listener); every other endpoint needs the admin token.
    pub(crate) async fn admin(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => {
                self.metrics.audit_backlog.set(self.audit.backlog() as i64);
                self.set_endpoint_health();
                text_response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(),
                )
            }
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                if !self.auth.has_keys() {
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"status": "not ready", "reason": "no issuer's keys are loaded yet (jwks_url or discovery not reached)"}),
                    )
                } else if let Some(reason) = self
                    .unhealthy_upstreams()
                    .filter(|_| request.uri().query() != Some("upstreams=false"))
                {
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"status": "not ready", "reason": reason}),
                    )
                } else if self.ready.load(Ordering::SeqCst) {
                    json_response(
                        StatusCode::OK,
                        &json!({"status": "ready", "policies": self.policy.load().policy_count()}),
                    )
                } else {
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"status": "not ready"}),
                    )
                }
            }
            // Browsers ask for it on every page: not an operation, not a line in the audit.
            (&Method::GET, "/favicon.ico") => crate::answer::empty(StatusCode::NOT_FOUND),
            (_, path) if path == "/console" || path.starts_with("/console/") => {
                self.console(request).await
            }
            _ => self.admin_operation(request).await,
        }
    }

    /// The upstreams whose every endpoint is ejected, said for `/readyz`.
    fn unhealthy_upstreams(&self) -> Option<String> {
        let routing = self.routing.load();
        let names: Vec<&str> = routing
            .upstreams
            .iter()
            .filter(|u| u.endpoints.none_healthy())
            .map(|u| u.name())
            .collect();
        (!names.is_empty()).then(|| {
            format!(
                "no healthy endpoint (every one ejected after failing) for upstream {}",
                names.join(", ")
            )
        })
    }

    /// `toolgate_upstream_endpoint_healthy`, as of now: an ejection ends by itself.
    fn set_endpoint_health(&self) {
        let routing = self.routing.load();
        self.metrics.endpoint_healthy.reset();
        for upstream in &routing.upstreams {
            for (index, endpoint) in upstream.endpoints.iter().enumerate() {
                let healthy = !upstream.endpoints.ejected(index);
                self.metrics
                    .endpoint_healthy
                    .with_label_values(&[upstream.name(), &endpoint.label])
                    .set(i64::from(healthy));
            }
        }
    }

    /// An operator's request: authenticated by the admin token, recorded like any decision.
    async fn admin_operation(&self, request: Request<Incoming>) -> Response<Body> {
        let slot = match self.audit_room() {
            Ok(slot) => slot,
            Err(refusal) => return refusal.into_response("", None),
        };
        let mut record = AuditRecord {
            agent: Some("admin".into()),
            ..AuditRecord::begin(&request)
        };
        let result = match self.check_admin_token(&request) {
            Ok(()) => {
                record.decision = Verdict::Allow;
                self.admin_route(request, &mut record).await
            }
            Err(refusal) => Err(refusal),
        };
        let response = result.unwrap_or_else(|refusal| {
            record.unauthenticated = matches!(refusal, Refusal::AdminUnauthorized);
            record.decision = Verdict::Deny;
            record.errors.push(crate::answer::error_chain(&refusal));
            refusal.into_response(&record.decision_id, None)
        });
        record.status = response.status().as_u16();
        self.finish(record, Some(slot));
        response
    }

    fn check_admin_token<B>(&self, request: &Request<B>) -> Result<(), Refusal> {
        let Some(expected) = &self.admin_token else {
            return Err(Refusal::AdminDisabled);
        };
        let presented = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match presented {
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
            _ => Err(Refusal::AdminUnauthorized),
        }
    }

    /// Operators' endpoints: `POST /admin/reload`, `GET /admin/revocations` (every task's
    /// events), `GET /admin/tasks/{id}`, `POST .../complete|cancel`, and `POST .../approve` with
    /// `{approver, actions, note}`: a human approval recorded on the task, which policies read
    /// as `context.task.approved` for the approved actions of the task's owner.
    async fn admin_route(
        &self,
        request: Request<Incoming>,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (request.method().clone(), segments.as_slice()) {
            (Method::POST, ["admin", "reload"]) => {
                record.action = Some("reload".into());
                admin_body(request, false, self.body_limit(crate::tasks::MAX_TASK_BODY)).await?;
                let report = self.reload_all().await;
                let status = if report.ok() {
                    StatusCode::OK
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                Ok(json_response(status, &report.to_json()))
            }
            (Method::GET, ["admin", "revocations"]) => {
                record.action = Some("revocations".into());
                self.revocation_feed(None)
            }
            (Method::GET, ["admin", "tasks", id]) => {
                record.task_id = Some(id.to_string());
                match self.tasks.get(id).await? {
                    Some(task) => Ok(json_response(
                        StatusCode::OK,
                        &crate::tasks::task_json(&task, toolgate_identity::unix_now()),
                    )),
                    None => Err(Refusal::NotFound("task_not_found")),
                }
            }
            (Method::POST, ["admin", "tasks", id, verb @ ("complete" | "cancel")]) => {
                record.task_id = Some(id.to_string());
                admin_body(request, false, self.body_limit(crate::tasks::MAX_TASK_BODY)).await?;
                let state = if *verb == "complete" {
                    State::Completed
                } else {
                    State::Cancelled
                };
                self.end_task(id, state, record).await
            }
            (method, ["admin", "approvals", ..]) => {
                let path: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
                self.approvals_route(method, &path[2..], request, record)
                    .await
            }
            (Method::POST, ["admin", "tasks", id, "approve"]) => {
                let body =
                    admin_body(request, true, self.body_limit(crate::tasks::MAX_TASK_BODY)).await?;
                self.approve(id, body, record).await
            }
            _ => Err(Refusal::NotFound("not_found")),
        }
    }

    /// `GET /admin/approvals[/{id}]`, `POST /admin/approvals/{id}/approve|deny` with
    /// `{approver, note?, uses?}`: approvals of single calls.
    async fn approvals_route(
        &self,
        method: Method,
        rest: &[String],
        request: Request<Incoming>,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        let now = toolgate_identity::unix_now();
        match (method, rest.as_slice()) {
            (Method::GET, []) => {
                record.action = Some("approvals".into());
                let all = self.tasks.approvals(now, 500).await?;
                let listed: Vec<_> = all
                    .iter()
                    .map(|a| crate::approvals::approval_json(a, now))
                    .collect();
                Ok(json_response(StatusCode::OK, &json!({"approvals": listed})))
            }
            (Method::GET, [id]) => {
                record.approval_id = Some(id.to_string());
                match self.tasks.approval(id).await? {
                    Some(a) => Ok(json_response(
                        StatusCode::OK,
                        &crate::approvals::approval_json(&a, now),
                    )),
                    None => Err(Refusal::NotFound("approval_not_found")),
                }
            }
            (Method::POST, [id, verb @ ("approve" | "deny")]) => {
                let limit = self.body_limit(crate::tasks::MAX_TASK_BODY);
                let body = admin_body(request, true, limit).await?;
                let approve = *verb == "approve";
                let approval = self.decide_approval(id, approve, &body, record).await?;
                let shown = crate::approvals::approval_json(&approval, now);
                Ok(json_response(StatusCode::OK, &shown))
            }
            _ => Err(Refusal::NotFound("not_found")),
        }
    }

    async fn approve(
        &self,
        id: &str,
        body: serde_json::Value,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Approve {
            approver: String,
            actions: Vec<String>,
            #[serde(default)]
            note: String,
        }
        record.task_id = Some(id.to_string());
        record.action = Some("approve_task".into());
        let approve: Approve = serde_json::from_value(body).map_err(|e| {
            Refusal::BadRequest(format!("expected {{approver, actions, note}}: {e}"))
        })?;
        if approve.approver.trim().is_empty() || approve.actions.is_empty() {
            return Err(Refusal::BadRequest(
                "an approval names its approver and at least one action".into(),
            ));
        }
        let approval = Approval {
            approver: approve.approver,
            actions: approve.actions,
            at: toolgate_identity::unix_now(),
            note: approve.note,
        };
        record.approval = Some(approval.clone());
        match self.tasks.get(id).await? {
            Some(task) if task.is_live(approval.at) => {}
            Some(task) => {
                return Ok(json_response(
                    StatusCode::CONFLICT,
                    &json!({"error": "task_not_active", "state": task.status(approval.at)}),
                ))
            }
            None => return Err(Refusal::NotFound("task_not_found")),
        }
        let task = self
            .tasks
            .approve(id, approval)
            .await?
            .ok_or(Refusal::NotFound("task_not_found"))?;
        Ok(json_response(
            StatusCode::OK,
            &serde_json::to_value(&task).unwrap_or_default(),
        ))
    }

    /// Reloads everything that can change while serving: policies, JWKS files (and URLs),
    /// and the config's `upstreams` (routes, URLs, audiences). Other config changes are
    /// reported as needing a restart. Each part that fails keeps its previous state.
    pub async fn reload_all(&self) -> ReloadReport {
        let policies = self.reload_policies().await;
        let key_errors = self.auth.reload_keys().await;
        // A rotated audit file is written anew from here on.
        self.audit.reopen();
        let mut report = ReloadReport {
            policies,
            key_errors,
            ..ReloadReport::default()
        };
        if let Some(path) = &self.config.tool_pins {
            // Refused as `check` and start refuse it: a lock file the schema disagrees with.
            let loaded = crate::pins::PinFile::read(path).and_then(|file| {
                let disagrees = crate::pin_file_against_schema(&file, &self.policy.load());
                match disagrees.is_empty() {
                    true => Ok(crate::pins::ToolPins::of(file)),
                    false => Err(disagrees.join("; ")),
                }
            });
            match loaded {
                Ok(pins) => {
                    // Only a lock file that says something new lifts what was refused.
                    let new = self.pins.load().as_deref() != Some(&pins);
                    self.pins.store(Some(Arc::new(pins)));
                    if new {
                        self.tool_schemas.pins_reloaded();
                    }
                }
                // The pins in force stay: a broken lock file unlocks nothing.
                Err(e) => report.config_errors.push(e),
            }
        }
        if let Some(path) = &self.config_path {
            match Config::load(path) {
                Err(e) => report.config_errors.push(e),
                Ok(new) => {
                    report.needs_restart = new
                        .needs_restart(&self.config)
                        .into_iter()
                        .map(String::from)
                        .collect();
                    self.reload_upstreams(&new, &mut report);
                }
            }
        }
        for e in report.key_errors.iter().chain(&report.config_errors) {
            tracing::error!(error = %e, "reload: kept the previous state");
        }
        if !report.needs_restart.is_empty() {
            tracing::warn!(sections = ?report.needs_restart, "config changes that only a restart applies");
        }
        report
    }

    fn reload_upstreams(&self, new: &Config, report: &mut ReloadReport) {
        let current: Vec<_> = self
            .routing
            .load()
            .upstreams
            .iter()
            .map(|u| u.config.clone())
            .collect();
        // Secrets and TLS files are read again on every reload (a rotated secret is taken
        // up), so upstreams that use them are set up again even when their config is the same.
        if current == new.upstreams && new.upstreams.iter().all(|u| u.files().next().is_none()) {
            return;
        }
        let engine = self.policy.load();
        let undeclared: Vec<String> = new
            .upstreams
            .iter()
            .flat_map(|up| {
                up.routes
                    .iter()
                    .map(move |r| format!("{}/{}", up.name, r.tool))
            })
            .filter(|action| !engine.has_action(action))
            .map(|action| format!("upstreams: action \"{action}\" is not declared in the schema"))
            .collect();
        if !undeclared.is_empty() {
            report.config_errors.extend(undeclared);
            return;
        }
        let connect_timeout =
            std::time::Duration::from_secs(self.config.limits.upstream_connect_seconds);
        let previous = self.routing.load_full();
        let shared = crate::upstream::Shared {
            client: &self.client,
            connect_timeout,
            metrics: Some(&self.metrics),
            previous: Some(&previous),
        };
        match Routing::new(new, &shared, &self.minter) {
            Ok(routing) => {
                self.routing.store(Arc::new(routing));
                report.applied.push("upstreams".into());
                tracing::info!("upstreams, routes and their credentials reloaded");
            }
            Err(e) => report.config_errors.push(crate::answer::error_chain(&e)),
        }
    }

    /// Loads and validates the policy directory off the request path, then swaps it in whole.
    /// An invalid set is refused and the active one stays.
    pub async fn reload_policies(&self) -> Result<usize, Vec<String>> {
        let mut cache = self.load_cache.lock().await;
        let started = Instant::now();
        let dir = self.policy_dir.clone();
        let mut work = std::mem::take(&mut *cache);
        let (loaded, work) =
            tokio::task::spawn_blocking(move || (PolicyEngine::load_cached(&dir, &mut work), work))
                .await
                .map_err(|e| vec![format!("reload task failed: {e}")])?;
        *cache = work;
        self.metrics
            .reload_duration
            .observe(started.elapsed().as_secs_f64());
        // A counter's `sum:` is checked against the new schema as at start.
        let loaded = loaded.map_err(|e| e.problems.iter().map(ToString::to_string).collect());
        let loaded = loaded.and_then(|engine| {
            let errors = crate::sums_against_schema(&self.config, &engine);
            if errors.is_empty() {
                Ok(engine)
            } else {
                Err(errors)
            }
        });
        match loaded {
            Ok(engine) => {
                let count = engine.policy_count();
                self.policy.store(Arc::new(engine));
                self.metrics.reloads.with_label_values(&["success"]).inc();
                self.metrics.policies_loaded.set(count as i64);
                tracing::info!(policies = count, "policies reloaded");
                Ok(count)
            }
            Err(errors) => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                tracing::error!(errors = ?errors, "policy reload refused; the active set stays");
                Err(errors)
            }
        }
    }
}
