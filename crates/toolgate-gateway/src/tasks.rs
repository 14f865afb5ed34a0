//! Just-in-time tasks on the agent listener: `POST /v1/tasks`, `GET /v1/tasks/{id}`,
//! `POST /v1/tasks/{id}/complete|cancel`, the revocation feed `GET /v1/revocations` (SSE), and
//! `POST /oauth2/introspect` (RFC 7662). Calls join a task with `Toolgate-Task`; when the task
//! ends, every credential minted in it reads inactive.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http::{header, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use toolgate_identity::{unix_now, Caller};
use toolgate_policy::Resource;
use toolgate_tasks::{Created, Ended, Revocation, State, Task, MAX_TTL_SECONDS};

use std::time::Duration;

use crate::answer::{json_response, keep_alive, Body, BoxError, Refusal};
use crate::audit::{AuditRecord, Verdict};
use crate::pipeline::{read_limited, CallContext};
use crate::upstream::{ClientView, Credentials};
use crate::Gateway;

/// Task requests and introspection forms are small.
pub(crate) const MAX_TASK_BODY: usize = 64 << 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartTask {
    intent: String,
    ttl_seconds: u64,
    /// Other agents that may join the task, on behalf of the same user.
    #[serde(default)]
    share_with: Vec<String>,
}

pub(crate) fn rfc3339(unix: u64) -> String {
    DateTime::<Utc>::from_timestamp(unix as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A task as both listeners show it, with its state as of `now` (`expired` once past its
/// deadline).
pub(crate) fn task_json(task: &Task, now: u64) -> Value {
    json!({
        "task_id": task.id,
        "agent": task.agent,
        "user": task.user,
        "shared_with": task.shared_with,
        "intent": task.intent,
        "state": task.status(now),
        "created_at": rfc3339(task.created_at),
        "expires_at": rfc3339(task.expires_at),
        "ended_at": task.ended_at.map(rfc3339),
        "approvals": task.approvals,
    })
}

impl Gateway {
    /// Toolgate's own endpoints on the agent listener (`/v1/...`, `/oauth2/introspect`); any
    /// other path under them is 404. The caller is already authenticated.
    pub(crate) async fn own_endpoint(
        &self,
        request: Request<Body>,
        caller: &Caller,
        client: ClientView,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let path = request.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (request.method().clone(), segments.as_slice()) {
            (Method::POST, ["v1", "tasks"]) => {
                self.start_task(request, caller, client, record).await
            }
            (Method::GET, ["v1", "tasks", id]) => {
                let task = self.own_task(id, caller, record).await?;
                Ok(json_response(StatusCode::OK, &task_json(&task, unix_now())))
            }
            (Method::POST, ["v1", "tasks", id, verb @ ("complete" | "cancel")]) => {
                self.own_task(id, caller, record).await?;
                let state = if *verb == "complete" {
                    State::Completed
                } else {
                    State::Cancelled
                };
                self.end_task(id, state, record).await
            }
            (Method::GET, ["v1", "revocations"]) => {
                record.action = Some("revocations".into());
                record.decision = Verdict::Allow;
                self.revocation_feed(Some(caller.agent.clone()))
            }
            (Method::POST, ["oauth2", "introspect"]) => self.introspect(request, record).await,
            _ => Err(Refusal::ToolNotFound),
        }
    }

    /// `{intent, ttl_seconds, share_with?}`, within bounds.
    async fn read_start_task(&self, request: Request<Body>) -> Result<StartTask, Refusal> {
        crate::rest::check_json_body_headers(request.headers())?;
        let body = read_limited(request.into_body(), self.body_limit(MAX_TASK_BODY)).await?;
        let start: StartTask =
            serde_json::from_value(crate::rest::strict_json(&body)?).map_err(|e| {
                Refusal::BadRequest(format!(
                    "expected {{intent, ttl_seconds, share_with?}}: {e}"
                ))
            })?;
        if start.intent.len() > self.config.tasks.max_intent_bytes {
            return Err(Refusal::BadRequest(format!(
                "intent is longer than {} bytes",
                self.config.tasks.max_intent_bytes
            )));
        }
        if start.ttl_seconds == 0 || start.ttl_seconds > MAX_TTL_SECONDS {
            return Err(Refusal::BadRequest(format!(
                "ttl_seconds must be 1 to {MAX_TTL_SECONDS}"
            )));
        }
        Ok(start)
    }

    async fn start_task(
        &self,
        request: Request<Body>,
        caller: &Caller,
        client: ClientView,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        record.action = Some("start_task".into());
        let start = self.read_start_task(request).await?;
        let mut task = Task::new(
            &caller.agent,
            caller.user.as_deref(),
            &start.intent,
            start.ttl_seconds,
            unix_now(),
        );
        task.shared_with = start.share_with;
        record.resource = Some(format!("task:{}", task.id));
        record.task_id = Some(task.id.clone());
        record.intent = Some(task.intent.clone());
        let ctx = CallContext {
            caller,
            client,
            engine: self.policy.load_full(),
            task: Some(task),
            subject_token: None,
        };
        let task = ctx.task.as_ref().expect("set above");
        let decision = self.authorize(
            &ctx,
            "start_task",
            Resource::Task { id: &task.id },
            Map::new(),
            record,
        );
        if !decision.allowed {
            return Err(Refusal::Forbidden(crate::answer::Denial::of(&decision)));
        }
        match self.tasks.create(task).await? {
            Created::Yes => {}
            Created::AgentAtLimit => {
                record
                    .errors
                    .push("the agent has its maximum of live tasks".into());
                return Err(Refusal::TooMany("too_many_tasks"));
            }
            Created::Full => return Err(Refusal::AtCapacity("task_store_full")),
        }
        self.metrics.tasks_active.inc();
        Ok(json_response(
            StatusCode::CREATED,
            &json!({"task_id": task.id, "expires_at": rfc3339(task.expires_at), "state": "active"}),
        ))
    }

    /// The task, when it exists and `caller` started it (others get 403, as for a denial).
    async fn own_task(
        &self,
        id: &str,
        caller: &Caller,
        record: &mut AuditRecord,
    ) -> Result<Task, Refusal> {
        record.task_id = Some(id.to_string());
        record.resource = Some(format!("task:{id}"));
        let task = self
            .tasks
            .get(id)
            .await?
            .ok_or(Refusal::NotFound("task_not_found"))?;
        if task.agent != caller.agent || task.user != caller.user {
            record
                .errors
                .push(format!("task {id} was started by another agent"));
            return Err(Refusal::Forbidden(Default::default()));
        }
        record.decision = Verdict::Allow;
        Ok(task)
    }

    /// Ends a task and revokes its credentials (also used by the admin listener).
    pub(crate) async fn end_task(
        &self,
        id: &str,
        state: State,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        record.action = Some(match state {
            State::Completed => "complete_task".into(),
            _ => "cancel_task".into(),
        });
        let now = unix_now();
        match self.tasks.end(id, state, now).await? {
            Ended::Now(task, revocation) => {
                self.metrics.tasks_active.dec();
                self.metrics.revoked.inc_by(revocation.jtis.len() as u64);
                // Tokens the upstreams' endpoints issued for the task are never used again.
                for upstream in &self.routing.load().upstreams {
                    if let Credentials::Token { endpoint, .. } = &upstream.credentials {
                        endpoint.forget_task(id);
                    }
                }
                tracing::info!(
                    task_id = id,
                    revoked = revocation.jtis.len(),
                    "task ended; its credentials are revoked"
                );
                let mut answer = task_json(&task, now);
                answer["revoked"] = json!(revocation.jtis.len());
                Ok(json_response(StatusCode::OK, &answer))
            }
            Ended::Already(task) => Ok(json_response(
                StatusCode::CONFLICT,
                &json!({
                    "error": "task_not_active", "state": task.status(now)
                }),
            )),
            Ended::Unknown => Err(Refusal::NotFound("task_not_found")),
        }
    }

    /// The task a call joins (`Toolgate-Task`), if any. Refused: an unknown, ended or expired
    /// task, one that belongs to another agent or user and was not shared with this one, and no
    /// task where the tool requires one. A store that cannot say is a 503.
    pub(crate) async fn joined_task(
        &self,
        id: Option<String>,
        caller: &Caller,
        require_task: bool,
        record: &mut AuditRecord,
    ) -> Result<Option<Task>, Refusal> {
        let Some(id) = id else {
            if require_task {
                record
                    .errors
                    .push("this tool is only called inside a task".into());
                return Err(Refusal::Forbidden(Default::default()));
            }
            return Ok(None);
        };
        record.task_id = Some(id.clone());
        let now = unix_now();
        let refusal = match self.tasks.get(&id).await? {
            Some(task) if !task.is_live(now) => format!("task {id} is {}", task.status(now)),
            Some(task) if !task.admits(&caller.agent, caller.user.as_deref()) => {
                format!("task {id} belongs to another agent or user")
            }
            Some(task) => return Ok(Some(task)),
            None => format!("task {id} is unknown"),
        };
        record.errors.push(refusal);
        Err(Refusal::Forbidden(Default::default()))
    }

    /// RFC 7662: a credential this gateway minted is active while it verifies, has not
    /// expired, and (when minted in a task) the task is live and minted it.
    async fn introspect(
        &self,
        request: Request<Body>,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        record.action = Some("introspect".into());
        record.decision = Verdict::Allow;
        let form = read_limited(request.into_body(), self.body_limit(MAX_TASK_BODY)).await?;
        let token = form_urlencoded::parse(&form)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
            .ok_or_else(|| Refusal::BadRequest("form field `token` is required".into()))?;
        let inactive = || Ok(json_response(StatusCode::OK, &json!({"active": false})));
        let Ok(claims) = self.minter.verify(&token, unix_now()) else {
            return inactive();
        };
        record.jti = Some(claims.jti.clone());
        if let Some(task_id) = &claims.task_id {
            record.task_id = Some(task_id.clone());
            let live = match self.tasks.get(task_id).await? {
                Some(task) => {
                    task.is_live(unix_now())
                        && self.tasks.has_credential(task_id, &claims.jti).await?
                }
                None => false,
            };
            if !live {
                return inactive();
            }
        }
        let mut answer = serde_json::to_value(&claims).unwrap_or_default();
        answer["active"] = json!(true);
        answer["token_type"] = json!("Bearer");
        if let Some(act) = &claims.act {
            answer["client_id"] = json!(act.sub);
        }
        Ok(json_response(StatusCode::OK, &answer))
    }

    /// Server-sent events, one per ended task: `{task_id, state, jtis, at}`. An agent sees only
    /// the tasks it owns or shares (`for_agent`); the admin listener sees all. A subscriber that
    /// falls behind gets a `lagged` event saying how many it missed, and the stream ends, so it
    /// reconnects and reads task states rather than trusting a feed with holes.
    pub(crate) fn revocation_feed(
        &self,
        for_agent: Option<String>,
    ) -> Result<Response<Body>, Refusal> {
        let Ok(place) = self.feed_places.clone().try_acquire_owned() else {
            return Err(Refusal::AtCapacity("feed_full"));
        };
        let mut lagged = false;
        let events = BroadcastStream::new(self.tasks.revocations())
            .map_while(move |event| {
                if lagged {
                    return None;
                }
                Some(match event {
                    Ok(revocation) => Ok(revocation),
                    Err(BroadcastStreamRecvError::Lagged(missed)) => {
                        lagged = true;
                        tracing::warn!(
                            missed,
                            "a revocation subscriber fell behind; its feed ends"
                        );
                        Err(missed)
                    }
                })
            })
            .filter_map(move |event| {
                let line = feed_line(event, for_agent.as_deref())?;
                Some(Ok::<_, BoxError>(Frame::data(Bytes::from(line))))
            });
        // A first comment, so clients see the stream open at once.
        let hello = tokio_stream::once(Ok::<_, BoxError>(Frame::data(Bytes::from_static(
            b": toolgate revocations\n\n",
        ))));
        // At shutdown the feed ends, so draining does not wait for it.
        let closing = tokio_stream::wrappers::WatchStream::new(self.closing.subscribe())
            .filter(|closing| *closing)
            .map(|_| None);
        let events = events
            .map(Some)
            .chain(tokio_stream::once(None))
            .merge(closing)
            .map_while(move |frame| {
                let _place = &place;
                frame
            });
        // Kept alive like an upstream's stream; it still ends when the events do (a lagged
        // subscriber).
        let every = Duration::from_secs(self.config.limits.sse_keepalive_seconds);
        let mut response = Response::new(keep_alive(
            StreamBody::new(hello.chain(events)).boxed(),
            every,
        ));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-cache"),
        );
        Ok(response)
    }
}

/// One event of the revocation feed: a revocation the subscriber may see (`for_agent`: only an
/// agent's own), or how many it missed.
fn feed_line(event: Result<Revocation, u64>, for_agent: Option<&str>) -> Option<String> {
    match event {
        Ok(revocation) => {
            if for_agent.is_some_and(|a| !revocation.agents.iter().any(|x| x == a)) {
                return None;
            }
            let data = serde_json::to_string(&revocation).ok()?;
            Some(format!("event: revocation\ndata: {data}\n\n"))
        }
        Err(missed) => Some(format!("event: lagged\ndata: {{\"missed\": {missed}}}\n\n")),
    }
}
