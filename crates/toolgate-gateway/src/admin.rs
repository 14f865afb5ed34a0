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
use crate::audit::AuditRecord;
use crate::pipeline::read_limited;
use crate::{Config, Gateway, Routing};

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
    pub(crate) async fn admin(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => text_response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/readyz") => {
                if self.ready.load(Ordering::SeqCst) {
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
            (&Method::POST, "/admin/reload") => {
                let report = self.reload_all().await;
                let status = if report.ok() {
                    StatusCode::OK
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                json_response(status, &report.to_json())
            }
            (_, path) if path.starts_with("/admin/tasks/") => self.admin_task(request).await,
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        }
    }

    /// Operators' task endpoints: `GET /admin/tasks/{id}`, `POST .../complete|cancel`, and
    /// `POST .../approve` with `{approver, actions, note}`: a human approval recorded on the
    /// task, which policies read as `context.task.approved` for the approved actions.
    async fn admin_task(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let mut record = AuditRecord {
            agent: Some("admin".into()),
            decision: "allow",
            ..AuditRecord::begin(&request)
        };
        let result = match (request.method().clone(), segments.as_slice()) {
            (Method::GET, ["admin", "tasks", id]) => match self.tasks.get(id).await {
                Ok(Some(task)) => Ok(json_response(
                    StatusCode::OK,
                    &serde_json::to_value(&task).unwrap_or_default(),
                )),
                Ok(None) => Err(Refusal::NotFound("task_not_found")),
                Err(e) => Err(e.into()),
            },
            (Method::POST, ["admin", "tasks", id, verb @ ("complete" | "cancel")]) => {
                record.task_id = Some(id.to_string());
                let state = if *verb == "complete" {
                    State::Completed
                } else {
                    State::Cancelled
                };
                self.end_task(id, state, &mut record).await
            }
            (Method::POST, ["admin", "tasks", id, "approve"]) => {
                self.approve(id, request, &mut record).await
            }
            _ => Err(Refusal::NotFound("not_found")),
        };
        let response =
            result.unwrap_or_else(|refusal| refusal.into_response(&record.decision_id, None));
        record.status = response.status().as_u16();
        self.audit.record(record);
        response
    }

    async fn approve(
        &self,
        id: &str,
        request: Request<Incoming>,
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
        let body = read_limited(request.into_body(), crate::tasks::MAX_TASK_BODY).await?;
        let approve: Approve = serde_json::from_slice(&body).map_err(|e| {
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
        let mut report = ReloadReport {
            policies,
            key_errors,
            ..ReloadReport::default()
        };
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
        if current == new.upstreams {
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
        if undeclared.is_empty() {
            self.routing.store(Arc::new(Routing::new(&new.upstreams)));
            report.applied.push("upstreams".into());
            tracing::info!("upstreams and routes reloaded");
        } else {
            report.config_errors.extend(undeclared);
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
        match loaded {
            Ok(engine) => {
                let count = engine.policy_count();
                self.policy.store(Arc::new(engine));
                self.metrics.reloads.with_label_values(&["success"]).inc();
                self.metrics.policies_loaded.set(count as i64);
                tracing::info!(policies = count, "policies reloaded");
                Ok(count)
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                let errors: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
                tracing::error!(errors = ?errors, "policy reload refused; the active set stays");
                Err(errors)
            }
        }
    }
}
