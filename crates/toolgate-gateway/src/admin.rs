//! The admin listener: metrics, health, readiness and policy reload. Never on the agent listener.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use toolgate_policy::PolicyEngine;

use crate::answer::{json_response, text_response, Body};
use crate::Gateway;

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
                let (status, body) = match self.reload_policies().await {
                    Ok(count) => (StatusCode::OK, json!({"reloaded": true, "policies": count})),
                    Err(errors) => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"reloaded": false, "errors": errors}),
                    ),
                };
                json_response(status, &body)
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
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
