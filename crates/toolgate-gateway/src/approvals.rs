//! Approvals bound to one call. A deny that only `@approval` forbids determine records a
//! pending approval of exactly this call (agent, user, action, argument digest, the asking
//! policies by id and version) and answers `approval_required`. Once a person approved it, the
//! same call is decided again with `context.approval`, and one use is taken atomically in the
//! store, only while the same policies, at the same versions, alone deny it.

use serde_json::{json, Map, Value};
use toolgate_policy::{ApprovalContext, Decision, Resource};
use toolgate_tasks::approvals::{
    args_digest, call_key, ApprovalBounds, Asked, CallApproval, Decided, Status,
};

use crate::answer::Refusal;
use crate::audit::AuditRecord;
use crate::pipeline::{CallContext, Extra};
use crate::Gateway;

/// What an approval is asked for: the call's arguments, their digest, the asking policies.
struct CallAsked {
    digest: String,
    args: Map<String, Value>,
    policies: Vec<(String, String)>,
}

/// A call's decision, and the approval it asked for (its deny is then `approval_required`).
pub(crate) struct CallDecision {
    pub decision: Decision,
    pub approval_id: Option<String>,
    /// A `@rate_limit` deny: when to come back.
    pub limited: Option<crate::usage::Limited>,
}

impl Gateway {
    /// Decides a call. Only a deny that `@approval` forbids alone determine reaches the
    /// store: an approved approval of this very call is used, else one is asked for.
    pub(crate) async fn decide_call(
        &self,
        ctx: &CallContext<'_>,
        action: &str,
        resource: Resource<'_>,
        args: Map<String, Value>,
        forwarded: Option<Map<String, Value>>,
        record: &mut AuditRecord,
    ) -> Result<CallDecision, Refusal> {
        let counted = self.reserve_usage(ctx, action, &args).await?;
        let usage = (!counted.is_empty()).then(|| counted.now());
        record.usage = usage.clone();
        let call = (action, resource.clone(), args.clone());
        let decided = self
            .decide_approved(ctx, call, forwarded, usage, record)
            .await;
        let mut decided = match decided {
            Ok(decided) if decided.decision.allowed => {
                record.usage_reserved = counted.reserved;
                return Ok(decided);
            }
            other => {
                // Denied (or refused): what it reserved is given back.
                self.release_usage(&counted.reserved).await;
                other?
            }
        };
        if decided.decision.rate_limited {
            let allows = |values| {
                let mut scratch = record.clone();
                let extra = Extra {
                    approval: None,
                    usage: Some(values),
                };
                let args = args.clone();
                self.authorize_with(ctx, action, resource.clone(), args, &mut scratch, extra)
                    .allowed
            };
            let limited = counted.retry_after(allows);
            if let Some((name, ..)) = &limited.counter {
                self.metrics.rate_limited.with_label_values(&[name]).inc();
            }
            decided.limited = Some(limited);
        }
        Ok(decided)
    }

    /// Decides a call with its usage; a deny `@approval` forbids alone determine is looked up
    /// in the store: an approved approval of this very call is used, else one is asked for.
    async fn decide_approved(
        &self,
        ctx: &CallContext<'_>,
        (action, resource, args): (&str, Resource<'_>, Map<String, Value>),
        forwarded: Option<Map<String, Value>>,
        usage: Option<Map<String, Value>>,
        record: &mut AuditRecord,
    ) -> Result<CallDecision, Refusal> {
        let extra = Extra {
            approval: None,
            usage: usage.clone(),
        };
        let mut decision =
            self.authorize_with(ctx, action, resource.clone(), args.clone(), record, extra);
        let plain = |decision| CallDecision {
            decision,
            approval_id: None,
            limited: None,
        };
        if decision.allowed || decision.approval.is_none() {
            return Ok(plain(decision));
        }
        // The call is identified by what it forwards: one that forwards what no policy saw
        // (undeclared arguments, a streamed body) cannot be approved as a whole.
        let Some(forwarded) = forwarded else {
            record.errors.push(
                "no approval can lift this deny: the call forwards what no policy reads (undeclared_arguments: forward, or a body not read as arguments)".into(),
            );
            decision.approval = None;
            return Ok(plain(decision));
        };
        let digest = args_digest(&forwarded);
        let now = toolgate_identity::unix_now();
        let caller = ctx.caller;
        let task = ctx.task.as_ref().map(|t| t.id.as_str());
        let key = call_key(&caller.agent, caller.user.as_deref(), task, action, &digest);
        let asking = self.policy_versions(ctx, &decision.policies);
        let latest = self.tasks.approval_of_call(&key).await?;
        if let Some(latest) = &latest {
            if latest.status == Status::Denied && now < latest.expires_at {
                // A person said no to this very call: it is not asked again until that expires.
                record.approval_id = Some(latest.id.clone());
                decision.approval = None;
                decision.reason = Some(format!("a person denied this call ({})", latest.id));
                return Ok(plain(decision));
            }
        }
        if let Some(approved) = latest.filter(|a| a.usable(now) && a.policies == asking) {
            let call = (action, resource, args);
            let used = self.use_approval(ctx, call, approved, usage, now, record);
            if let Some(decided) = used.await? {
                return Ok(decided);
            }
        }
        let asked = CallAsked {
            digest,
            args: forwarded,
            policies: asking,
        };
        let id = self.ask(ctx, action, &decision, asked, now, record).await?;
        Ok(CallDecision {
            decision,
            approval_id: Some(id),
            limited: None,
        })
    }

    /// Decides the call again with its approval (given by a person for the same policies,
    /// unchanged, alone denying it), and takes one use. `None`: the use was taken meanwhile
    /// (by another replica): the call asks anew.
    async fn use_approval(
        &self,
        ctx: &CallContext<'_>,
        (action, resource, args): (&str, Resource<'_>, Map<String, Value>),
        approved: CallApproval,
        usage: Option<Map<String, Value>>,
        now: u64,
        record: &mut AuditRecord,
    ) -> Result<Option<CallDecision>, Refusal> {
        let with = ApprovalContext {
            id: approved.id.clone(),
            by: approved.decided_by.clone().unwrap_or_default(),
            at: approved.decided_at.unwrap_or(now),
            note: approved.note.clone(),
        };
        // Decided on a copy of the line: unless the approval is taken, the line keeps the deny
        // it records.
        let mut line = record.clone();
        let extra = Extra {
            approval: Some(with),
            usage,
        };
        let mut decision = self.authorize_with(ctx, action, resource, args, &mut line, extra);
        if !decision.allowed {
            // Approved, and still denied (no permit, or the policy does not read
            // `context.approval`): asking again would never end.
            record.errors.push(format!(
                "approval {} given, and the call is still denied with it",
                approved.id
            ));
            decision.approval = None;
            return Ok(Some(CallDecision {
                decision,
                approval_id: None,
                limited: None,
            }));
        }
        if !self.tasks.consume_approval(&approved.id, now).await? {
            return Ok(None);
        }
        *record = line;
        self.metrics.approvals.with_label_values(&["used"]).inc();
        record.approval_id = Some(approved.id);
        record.approval_step = Some("used");
        Ok(Some(CallDecision {
            decision,
            approval_id: None,
            limited: None,
        }))
    }

    /// Records (or finds) the pending approval of this call; its id.
    async fn ask(
        &self,
        ctx: &CallContext<'_>,
        action: &str,
        decision: &Decision,
        asked: CallAsked,
        now: u64,
        record: &mut AuditRecord,
    ) -> Result<String, Refusal> {
        let caller = ctx.caller;
        let approval = CallApproval {
            id: uuid::Uuid::new_v4().to_string(),
            agent: caller.agent.clone(),
            user: caller.user.clone(),
            task: ctx.task.as_ref().map(|t| t.id.clone()),
            action: action.to_string(),
            digest: asked.digest,
            args: Value::Object(asked.args),
            reason: decision.approval.clone().unwrap_or_default(),
            policies: asked.policies,
            created_at: now,
            expires_at: now + self.config.approvals.expires_seconds,
            status: Status::Pending,
            decided_by: None,
            decided_at: None,
            note: None,
            uses_left: 0,
        };
        let bounds = ApprovalBounds {
            per_agent: self.config.approvals.max_pending_per_agent,
            total: self.config.approvals.max_pending,
        };
        let id = match self.tasks.ask_approval(&approval, bounds, now).await? {
            Asked::New(id) => {
                self.metrics
                    .approvals
                    .with_label_values(&["requested"])
                    .inc();
                self.notify(&approval);
                id
            }
            Asked::Pending(id) => id,
            Asked::AtLimit => return Err(Refusal::TooMany("too_many_pending_approvals")),
        };
        record.approval_id = Some(id.clone());
        record.approval_step = Some("requested");
        Ok(id)
    }

    /// The policies by id and their versions, as the approval records them.
    fn policy_versions(&self, ctx: &CallContext<'_>, ids: &[String]) -> Vec<(String, String)> {
        ids.iter()
            .map(|id| {
                let version = ctx.engine.source(id).map(|s| s.version.clone());
                (id.clone(), version.unwrap_or_default())
            })
            .collect()
    }

    /// An operator's decision on a pending approval (the admin API and the console).
    pub(crate) async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        body: &Value,
        record: &mut AuditRecord,
    ) -> Result<CallApproval, Refusal> {
        record.action = Some(if approve { "approve_call" } else { "deny_call" }.into());
        record.approval_id = Some(id.to_string());
        record.approval_step = Some(if approve { "approved" } else { "denied" });
        let by = body
            .get("approver")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim();
        if by.is_empty() {
            return Err(Refusal::BadRequest("a decision names its approver".into()));
        }
        let uses = match body.get("uses") {
            None | Some(Value::Null) => 1,
            Some(n) => n
                .as_u64()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| Refusal::BadRequest("uses must be 1..100".into()))?
                as u32,
        };
        let note = body.get("note").and_then(Value::as_str).map(str::to_string);
        let decided = Decided {
            approve,
            by: by.to_string(),
            note,
            uses,
            at: toolgate_identity::unix_now(),
        };
        let decided_approval = self.tasks.decide_approval(id, &decided).await?;
        let Some(approval) = decided_approval else {
            return Err(match self.tasks.approval(id).await? {
                Some(found) if found.state(decided.at) == "expired" => {
                    // The first word on an expired approval records its end.
                    record.approval_step = Some("expired");
                    Refusal::Conflict("approval_expired")
                }
                Some(_) => Refusal::Conflict("approval_not_pending"),
                None => Refusal::NotFound("approval_not_found"),
            });
        };
        record.user = approval.user.clone();
        record.resource = Some(approval.action.clone());
        // Who decided, and their note, as task approvals are recorded.
        record.approval = Some(toolgate_tasks::Approval {
            approver: decided.by.clone(),
            actions: vec![approval.action.clone()],
            at: decided.at,
            note: decided.note.clone().unwrap_or_default(),
        });
        let step = if approve { "approved" } else { "denied" };
        self.metrics.approvals.with_label_values(&[step]).inc();
        let waited = decided.at.saturating_sub(approval.created_at);
        self.metrics.approval_wait.observe(waited as f64);
        Ok(approval)
    }
}

impl Gateway {
    /// POSTs a new pending approval to `approvals.webhook_url`, signed, off the request path
    /// (best effort: the approval waits in the console whatever the webhook does).
    fn notify(&self, approval: &CallApproval) {
        let config = &self.config.approvals;
        let (Some(url), Some(secret_file)) = (&config.webhook_url, &config.webhook_secret_file)
        else {
            return;
        };
        let console = config
            .console_url
            .as_deref()
            .map(|base| format!("{}#approval-{}", base.trim_end_matches('/'), approval.id));
        let body = json!({
            "approval_id": approval.id, "agent": approval.agent, "user": approval.user,
            "action": approval.action, "reason": approval.reason,
            "expires_at": approval.expires_at, "console": console,
        })
        .to_string();
        let (url, secret_file) = (url.clone(), secret_file.clone());
        let client = self.client.clone();
        tokio::spawn(async move {
            // Read when sent (off the request path): a rotated secret is used at once.
            let secret = match tokio::fs::read(&secret_file).await {
                Ok(secret) => secret.trim_ascii().to_vec(),
                Err(e) => {
                    tracing::warn!(file = %secret_file.display(), error = %e, "approval webhook secret unreadable: not sent");
                    return;
                }
            };
            let timestamp = toolgate_identity::unix_now().to_string();
            let signed = format!("{timestamp}.{body}");
            let signature = toolgate_credential::hmac_sha256_hex(&secret, signed.as_bytes());
            let request = http::Request::post(url.as_str())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header("toolgate-timestamp", &timestamp)
                .header("toolgate-signature", format!("sha256={signature}"))
                .body(crate::answer::full(body));
            let Ok(request) = request else {
                return;
            };
            let sent =
                tokio::time::timeout(std::time::Duration::from_secs(5), client.request(request));
            match sent.await {
                Ok(Ok(response)) if response.status().is_success() => {}
                Ok(Ok(response)) => {
                    tracing::warn!(status = %response.status(), "approval webhook refused the message")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "approval webhook not reached"),
                Err(_) => tracing::warn!("approval webhook did not answer in time"),
            }
        });
    }
}

/// An approval as the admin API and the console show it.
pub(crate) fn approval_json(approval: &CallApproval, now: u64) -> Value {
    json!({
        "id": approval.id,
        "state": approval.state(now),
        "agent": approval.agent,
        "user": approval.user,
        "task_id": approval.task,
        "action": approval.action,
        "args": approval.args,
        "reason": approval.reason,
        "policies": approval.policies.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        "created_at": approval.created_at,
        "expires_at": approval.expires_at,
        "decided_by": approval.decided_by,
        "decided_at": approval.decided_at,
        "note": approval.note,
        "uses_left": approval.uses_left,
    })
}
