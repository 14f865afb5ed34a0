//! The admin listener: metrics, health, readiness and policy reload. Never on the agent listener.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use toolgate_policy::PolicyEngine;

use crate::answer::{json_response, text_response, Body};
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
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        }
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
