//! One call's way through the gateway:
//! **authenticate → classify → authorize → mint → forward → record**.
//!
//! `Gateway::call` lists the phases in order. REST and MCP differ only in how a request is
//! classified and its arguments read (`rest.rs`, `mcp.rs`); both then use `authorize`,
//! `forward` (mint, join the task, send) and `finish`, the one place that records.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use toolgate_credential::oauth::Grant;
use toolgate_credential::secret::opaque_id;
use toolgate_credential::Minted;
use toolgate_identity::{bearer_token, unix_now, Caller};
use toolgate_policy::{
    AuthzRequest, Decision, Env, PolicyEngine, Principal, Resource, TaskContext,
};
use toolgate_tasks::{Joined, Task};

use crate::answer::{
    can_keep_alive, error_chain, json_response, keep_alive, Body, Denial, InternalError, Refusal,
};
use crate::audit::{AuditRecord, AuditSlot, Verdict};
use crate::config::{Limits, UpstreamKind};
use crate::endpoints::Served;
use crate::routes::{Classified, ClassifyError};
use crate::trace::{Outcome, TRACEPARENT, TRACESTATE};
use crate::upstream::{strip_hop_by_hop, ClientView, Credentials, Upstream};
use crate::{Gateway, Routing};

/// What an action without a declaration declares: no arguments, none annotated.
pub(crate) static NO_ARGS: toolgate_policy::Record = toolgate_policy::Record::new();
pub(crate) static NO_NAMES: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();

pub const JWKS_PATH: &str = "/.well-known/jwks.json";
pub const TASK_HEADER: &str = "toolgate-task";
/// RFC 9728 protected resource metadata, for MCP clients discovering how to authenticate.
pub const RESOURCE_METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// A call to a tool, once classified.
enum Call {
    /// A REST tool: a route of a `rest` upstream matched.
    Rest(Classified),
    /// The endpoint of an MCP upstream: exactly `/<upstream>` (or `/<upstream>/`).
    Mcp { upstream: usize },
}

impl Call {
    fn upstream(&self) -> usize {
        match self {
            Call::Rest(route) => route.upstream,
            Call::Mcp { upstream } => *upstream,
        }
    }
}

/// What a call's decision reads beyond its arguments.
#[derive(Default, Clone)]
pub(crate) struct Extra {
    /// A person's approval of this call (`context.approval`).
    pub approval: Option<toolgate_policy::ApprovalContext>,
    /// Its usage counters before it (`context.usage`).
    pub usage: Option<Map<String, Value>>,
}

/// What every decision of one request shares: who calls, from where, under which policies,
/// in which task.
pub(crate) struct CallContext<'a> {
    pub caller: &'a Caller,
    pub client: ClientView,
    /// One policy snapshot for the whole call, even if a reload lands meanwhile.
    pub engine: Arc<PolicyEngine>,
    pub task: Option<Task>,
    /// The agent's own token, kept only for an upstream that exchanges it (RFC 8693).
    pub subject_token: Option<String>,
}

impl Gateway {
    /// Serves one request on the agent listener. Never panics on input; every outcome is
    /// answered, counted and recorded. Any body type: hyper's from a connection, or a test's
    /// own, driven in-process.
    pub async fn handle<B>(self: Arc<Self>, request: Request<B>, peer: SocketAddr) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let arrived = Instant::now();
        let mut request = request.map(boxed);
        strip_hop_by_hop(request.headers_mut());
        // Room for this request's audit line first: without it nothing is done, let alone
        // forwarded.
        let slot = match self.audit_room() {
            Ok(slot) => slot,
            Err(refusal) => return refusal.into_response("", None),
        };
        if let Some(answer) = self.public_document(&request) {
            return answer;
        }
        let routing = self.routing.load_full();
        let _place = match self.admit(&routing, request.uri().path()) {
            Ok(place) => place,
            Err(NoPlace) => return crate::server::overloaded(&self.metrics),
        };
        // Kept for a 401's `resource_metadata`; the URL is built only then.
        let host = request_host(&request);
        // Written even if this future is dropped (the agent reset the stream or went away)
        // after the call was forwarded: a forwarded call always has its line.
        let record = AuditRecord {
            source_ip: peer.ip().to_string(),
            trace: match &self.tracer {
                Some(tracer) => tracer.begin(request.headers()),
                None => Default::default(),
            },
            ..AuditRecord::begin(&request)
        };
        crate::federation::line_is_certain(&request);
        let mut pending = Unfinished::new(&self, record, slot);
        let record = &mut pending.record;
        let mut upstream = None;
        let response = match self
            .call(&routing, request, peer.ip(), record, &mut upstream)
            .await
        {
            Ok(response) => response,
            Err(refusal) => {
                if !matches!(refusal, Refusal::Forbidden(_)) {
                    record.errors.push(error_chain(&refusal));
                }
                record.unauthenticated = matches!(refusal, Refusal::Unauthenticated(_));
                let metadata = (record.unauthenticated)
                    .then(|| self.metadata_url(&routing, host.as_ref(), &record.path));
                refusal.into_response(&record.decision_id, metadata.as_deref())
            }
        };
        let response = self.kept_alive(response, upstream.is_some());
        record.status = response.status().as_u16();
        let upstream_name = upstream.map_or("none", |i| routing.upstreams[i].name());
        self.metrics
            .requests
            .with_label_values(&[upstream_name, response.status().as_str()])
            .inc();
        self.metrics
            .request_duration
            .with_label_values(&[upstream_name])
            .observe(arrived.elapsed().as_secs_f64());
        pending.done();
        response
    }

    /// `handle`, boxed: a federated endpoint's calls to its members come back through it
    /// (and its future must not hold itself).
    pub(crate) fn handle_boxed(
        self: Arc<Self>,
        request: Request<http_body_util::Full<Bytes>>,
        peer: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>> {
        Box::pin(self.handle(request, peer))
    }

    /// An upstream's own in-flight limit, like the global one, before any work: a place, or
    /// `NoPlace`.
    fn admit(
        &self,
        routing: &Routing,
        path: &str,
    ) -> Result<Option<crate::upstream::Place>, NoPlace> {
        match routing.routes.upstream(path) {
            Some((index, _)) => match routing.upstreams[index].admit() {
                Some(place) => Ok(Some(place)),
                None => Err(NoPlace),
            },
            None => Ok(None),
        }
    }

    /// The documents served to anyone: the credential keys (JWKS) and the RFC 9728 metadata.
    fn public_document(&self, request: &Request<Body>) -> Option<Response<Body>> {
        if request.method() != Method::GET {
            return None;
        }
        let path = request.uri().path();
        if path == JWKS_PATH {
            return Some(json_response(StatusCode::OK, &self.minter.jwks()));
        }
        let resource = path.strip_prefix(RESOURCE_METADATA_PATH)?;
        Some(self.resource_metadata(&self.routing.load(), request, resource))
    }

    /// An upstream's event stream is kept alive while the tool works quietly.
    fn kept_alive(&self, response: Response<Body>, forwarded: bool) -> Response<Body> {
        if forwarded && can_keep_alive(response.headers()) {
            let every = Duration::from_secs(self.config.limits.sse_keepalive_seconds);
            response.map(|body| keep_alive(body, every))
        } else {
            response
        }
    }

    /// The phases in order. Authentication comes first, so nothing about routes or tools is
    /// told to an unauthenticated caller; the task is joined before any decision, so policies
    /// see it and a call in an ended task is refused whatever they say.
    async fn call(
        &self,
        routing: &Routing,
        request: Request<Body>,
        client_ip: IpAddr,
        record: &mut AuditRecord,
        upstream_index: &mut Option<usize>,
    ) -> Result<Response<Body>, Refusal> {
        check_request_head(&request, &self.config.limits)?;

        let caller = self.authenticate(&request, record).await?;
        let client = ClientView {
            ip: client_ip,
            scheme: if self.config.tls.is_some() {
                "https"
            } else {
                "http"
            },
        };

        // classify
        if is_own_endpoint(request.uri().path()) {
            return self.own_endpoint(request, &caller, client, record).await;
        }
        if let Some(endpoint) = routing.endpoint(request.uri().path()) {
            let endpoint = endpoint.clone();
            return self
                .federated(endpoint, request, &caller, client_ip, record)
                .await;
        }
        let started = Instant::now();
        let call = classify(routing, &request);
        record.trace.step("classify", started);
        let call = call?;
        *upstream_index = Some(call.upstream());
        let upstream = &routing.upstreams[call.upstream()];
        record.upstream = Some(upstream.name().to_string());
        let require_task = match &call {
            Call::Rest(route) => route.require_task,
            Call::Mcp { .. } => upstream.config.require_task,
        };
        let task = self
            .call_task(&request, &caller, require_task, record)
            .await?;
        let subject_token = match upstream.credentials {
            Credentials::Token { exchange: true, .. } => {
                let header = request.headers().get(header::AUTHORIZATION);
                bearer_token(header.and_then(|v| v.to_str().ok())).map(String::from)
            }
            _ => None,
        };
        let ctx = CallContext {
            caller: &caller,
            client,
            engine: self.policy.load_full(),
            task,
            subject_token,
        };

        // authorize → mint → forward, as each kind reads its arguments
        match call {
            Call::Rest(route) => self.rest_call(&ctx, upstream, route, request, record).await,
            Call::Mcp { .. } => self.mcp_call(&ctx, upstream, request, record).await,
        }
    }

    /// The caller, from the bearer token: the agent, the user it acts for, the issuer.
    async fn authenticate(
        &self,
        request: &Request<Body>,
        record: &mut AuditRecord,
    ) -> Result<Caller, Refusal> {
        let started = Instant::now();
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller = self.auth.authenticate_header(authorization).await;
        if let (Err(_), Some(tracer)) = (&caller, &self.tracer) {
            // Whether, and in which trace, a call is recorded is not an unknown caller's to
            // choose: its `traceparent` is set aside and `sample_ratio` decides.
            record.trace = tracer.begin(&http::HeaderMap::new());
        }
        record.trace.step("authenticate", started);
        self.metrics
            .token_cache
            .set(self.auth.cached_tokens() as i64);
        let caller = caller?;
        record.agent = Some(caller.agent.clone());
        record.user = caller.user.clone();
        record.iss = Some(caller.issuer.clone());
        Ok(caller)
    }

    /// The task the call names in `Toolgate-Task`, joined (or refused).
    async fn call_task(
        &self,
        request: &Request<Body>,
        caller: &Caller,
        require_task: bool,
        record: &mut AuditRecord,
    ) -> Result<Option<Task>, Refusal> {
        let task_id = task_header(request)?;
        let in_task = task_id.is_some();
        let started = Instant::now();
        let task = self
            .joined_task(task_id, caller, require_task, record)
            .await;
        if in_task {
            record.trace.step("task", started);
        }
        task
    }

    async fn rest_call(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        route: Classified,
        request: Request<Body>,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let tool = ActionId::new(upstream.name(), &route.tool);
        record.action = Some(tool.to_string());
        record.resource = Some(tool.to_string());
        let context = ctx.engine.schema_info().actions.get(tool.as_str());
        let declared = crate::rest::Declared {
            args: context.map_or(&NO_ARGS, |c| &c.args),
            rules: crate::args::Rules {
                undeclared: route.undeclared,
                reads: ctx.engine.arg_reads(tool.as_str()),
                free_form: context.map_or(&NO_NAMES, |c| &c.free_form),
                paths: context.map_or(&NO_NAMES, |c| &c.paths),
                json_text: None,
            },
        };
        let started = Instant::now();
        let read = crate::rest::read_call(
            request,
            &route,
            upstream,
            &declared,
            self.body_limit(self.config.limits.max_body_bytes),
        )
        .await;
        record.trace.step("read_arguments", started);
        let (request, args) = read?;
        // What is forwarded is what the policy saw only when nothing undeclared passes and
        // the body is read as declared arguments (not streamed).
        let seen = route.undeclared == crate::args::Undeclared::Refuse
            && context.is_some_and(|c| !c.args.is_empty());
        let forwarded = seen.then(|| args.clone());
        let decided = self
            .decide_call(ctx, tool.as_str(), tool.resource(), args, forwarded, record)
            .await?;
        if let Some(limited) = decided.limited {
            return Err(Refusal::RateLimited(Box::new(limited)));
        }
        let decision = decided.decision;
        if !decision.allowed {
            let denial = Denial::of_call(&decision, decided.approval_id);
            return Err(Refusal::Forbidden(denial));
        }
        let mut scope = vec![tool.to_string()];
        scope.extend(decision.grants);
        self.forward(ctx, upstream, request, scope, record).await
    }

    /// Decides one question and writes the decision into the record.
    pub(crate) fn authorize(
        &self,
        ctx: &CallContext<'_>,
        action: &str,
        resource: Resource<'_>,
        args: Map<String, Value>,
        record: &mut AuditRecord,
    ) -> Decision {
        self.authorize_with(ctx, action, resource, args, record, Extra::default())
    }

    /// `authorize`, with what only a call has: a person's approval of it, its usage counters.
    pub(crate) fn authorize_with(
        &self,
        ctx: &CallContext<'_>,
        action: &str,
        resource: Resource<'_>,
        args: Map<String, Value>,
        record: &mut AuditRecord,
        extra: Extra,
    ) -> Decision {
        let started = Instant::now();
        let declared = ctx.engine.schema_info().actions.get(action);
        let mut secrets = Vec::new();
        if let Some(declared) = declared.filter(|_| !args.is_empty()) {
            let hash = |text: &str| self.minter.secret_id(text);
            let (audited, sensitive) = crate::audit::audited_args(&args, declared, &hash);
            record.args = Some(audited);
            secrets = sensitive;
        }
        let mut request = authz_request(ctx.caller, action, resource, args, ctx.client.ip);
        request.approval = extra.approval;
        request.usage = extra.usage;
        request.task = ctx
            .task
            .as_ref()
            .map(|t| task_context(t, action, &ctx.caller.agent, record));
        let decision = ctx.engine.authorize(&request);
        let elapsed = started.elapsed();
        self.metrics.authz_duration.observe(elapsed.as_secs_f64());
        record.decision = Verdict::of(decision.allowed);
        record.eval_us = Some(elapsed.as_micros() as u64);
        if let Some(shadow) = &decision.shadow {
            let flip = if shadow.allowed {
                "deny_to_allow"
            } else {
                "allow_to_deny"
            };
            for policy in &shadow.flipped_by {
                self.metrics
                    .shadow_flips
                    .with_label_values(&[policy, flip])
                    .inc();
            }
            record.shadow_decision = Some(Verdict::of(shadow.allowed));
            record.shadow_policies = shadow.policies.clone();
            record.shadow_errors = shadow.errors.clone();
        }
        record.trace_decision(started);
        record.policies = decision.policies.clone();
        record.policy_versions = decision
            .policies
            .iter()
            .filter_map(|id| Some((id.clone(), ctx.engine.source(id)?.version.clone())))
            .collect();
        let errors_before = record.errors.len();
        record.errors.extend(decision.errors.iter().cloned());
        if !secrets.is_empty() {
            // Cedar's messages can quote a value; a sensitive one never reaches the audit.
            crate::audit::scrub(&mut record.errors[errors_before..], &secrets);
            crate::audit::scrub(&mut record.shadow_errors, &secrets);
        }
        decision
    }

    /// Gets the call's credential the way its upstream takes one, records it in the call's
    /// task (refused if the task ended meanwhile), and sends the request with it in place of
    /// whatever the agent sent.
    pub(crate) async fn forward(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        request: Request<Body>,
        scope: Vec<String>,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let reserved = std::mem::take(&mut record.usage_reserved);
        let result = self
            .forward_reserved(ctx, upstream, request, scope, record)
            .await;
        // What never reached the upstream (or that it failed) counts against no limit.
        let failed = result
            .as_ref()
            .map_or(true, |r| r.status().is_server_error());
        if failed {
            self.release_usage(&reserved).await;
        }
        result
    }

    async fn forward_reserved(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        request: Request<Body>,
        scope: Vec<String>,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        // mint (or inject, or exchange)
        let started = Instant::now();
        let credential = self.credential(ctx, upstream, scope, record).await;
        record.trace.step("credential", started);
        let (credential, id) = credential?;
        record.credential_mode = match upstream.credentials {
            Credentials::Process(None) => None,
            _ => Some(upstream.config.credential.mode().as_str()),
        };
        record.credential_id = id.clone();
        if let Some(task) = &ctx.task {
            // A minted credential is listed in its task, atomically with the task being live:
            // unrecorded, it could not be revoked when the task ends (fail closed). Other
            // modes' credentials are not toolgate's to revoke: the task must still be live.
            let joined = match upstream.credentials {
                Credentials::Mint => {
                    let id = id.as_deref().unwrap_or_default();
                    self.tasks.add_credential(task, id, unix_now()).await?
                }
                _ => match self.tasks.get(&task.id).await? {
                    Some(now) if now.is_live(unix_now()) => Joined::Recorded,
                    _ => Joined::Ended,
                },
            };
            if joined == Joined::AtLimit {
                record.jti = None;
                record.credential_id = None;
                record
                    .errors
                    .push(format!("task {} holds its maximum of credentials", task.id));
                return Err(Refusal::TooMany("task_credential_limit"));
            }
            if joined == Joined::Ended {
                // Made but never sent: no credential to name.
                record.jti = None;
                record.credential_id = None;
                record.decision = Verdict::Deny;
                record
                    .errors
                    .push(format!("task {} ended before the call", task.id));
                return Err(Refusal::Forbidden(Default::default()));
            }
        }

        self.send(ctx, upstream, request, credential, record).await
    }

    /// Sends the call, its credential in place, under the trace's forward step.
    async fn send(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        mut request: Request<Body>,
        credential: Option<(HeaderName, HeaderValue)>,
        record: &mut AuditRecord,
    ) -> Result<Response<Body>, Refusal> {
        let span = record.trace.span_id();
        if let Some(traceparent) = span.and_then(|id| record.trace.traceparent(id)) {
            // The upstream's work continues this trace, under the forward step; the caller's
            // `tracestate` only goes with the caller's trace.
            request.headers_mut().insert(TRACEPARENT, traceparent);
            if record.trace.restarted() {
                request.headers_mut().remove(TRACESTATE);
            }
        }
        let started = Instant::now();
        let mut served = Served::default();
        let result = upstream
            .forward(request, credential, &ctx.client, ctx.caller, &mut served)
            .await;
        record.attempts = Some(served.attempts).filter(|&n| n > 0);
        record.trace.step_as("forward", span, started);
        self.metrics
            .upstream_duration
            .with_label_values(&[upstream.name()])
            .observe(started.elapsed().as_secs_f64());
        let mut response = result?;
        record.upstream_status = Some(response.status().as_u16());
        if upstream.endpoints.len() > 1 {
            // Where an MCP session was made: its calls go back there.
            response.extensions_mut().insert(served);
        }
        Ok(response)
    }

    /// The header that carries the call's credential, and the credential's id for the audit
    /// and the task: toolgate's own token (`mint`), the upstream's static secret (`inject`), or
    /// a token from the upstream's token endpoint, for the scope the decision granted.
    async fn credential(
        &self,
        ctx: &CallContext<'_>,
        upstream: &Upstream,
        scope: Vec<String>,
        record: &mut AuditRecord,
    ) -> Result<(Option<(HeaderName, HeaderValue)>, Option<String>), Refusal> {
        let bearer = |token: &str| {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(InternalError::CredentialHeader)?;
            value.set_sensitive(true);
            Ok::<_, Refusal>(Some((header::AUTHORIZATION, value)))
        };
        match &upstream.credentials {
            Credentials::Mint => {
                let minted = self.mint(
                    ctx.caller,
                    &upstream.config.audience,
                    scope,
                    ctx.task.as_ref(),
                    record,
                )?;
                Ok((bearer(&minted.token)?, Some(minted.claims.jti)))
            }
            Credentials::Inject(secret, id) => Ok((Some(secret.header()), Some(id.clone()))),
            Credentials::Process(id) => Ok((None, id.clone())),
            Credentials::Token { endpoint, exchange } => {
                let now = unix_now();
                let caller = ctx.caller;
                let task = ctx.task.as_ref().map(|t| (t.id.as_str(), t.expires_at));
                let issued = if *exchange {
                    let subject = ctx
                        .subject_token
                        .as_deref()
                        .ok_or_else(|| Refusal::BadRequest("no bearer token to exchange".into()))?;
                    let actor = self
                        .minter
                        .actor_assertion(&caller.agent, endpoint.url(), now)
                        .map_err(InternalError::Mint)?;
                    // Whom the token is for: user and agent (as the issuer named them), and
                    // through which of their tokens (a narrower or revoked one is asked anew).
                    let user = caller.user.as_deref().unwrap_or("");
                    let whom = format!(
                        "{}:{user}{}:{}{}",
                        user.len(),
                        caller.agent.len(),
                        caller.agent,
                        opaque_id(subject)
                    );
                    let grant = Grant::Exchange {
                        subject_token: subject,
                        actor_token: &actor,
                        audience: &upstream.config.audience,
                        resource: upstream.config.primary_url(),
                    };
                    // Never used past the agent's own token.
                    let until = Some(caller.exp);
                    endpoint
                        .token(grant, &scope, &whom, task, until, now)
                        .await?
                } else {
                    endpoint
                        .token(Grant::ClientCredentials, &scope, "", task, None, now)
                        .await?
                };
                Ok((bearer(&issued.token)?, Some(issued.id)))
            }
        }
    }

    /// Room for one audit line, taken before the call it records does anything; without it
    /// the call is refused (counted), never run unrecorded.
    fn count_decision(&self, record: &AuditRecord) {
        let decision = record.decision.as_str();
        self.metrics.decisions.with_label_values(&[decision]).inc();
        // Labelled only with tools the schema declares: an agent's words (an MCP tool name,
        // a path) must not make new series.
        let tool = record
            .action
            .as_deref()
            .filter(|action| self.policy.load().has_action(action))
            .and_then(|action| action.split_once('/'))
            .map_or("none", |(_, tool)| tool);
        let upstream = record.upstream.as_deref().unwrap_or("none");
        self.metrics
            .tool_calls
            .with_label_values(&[upstream, tool, decision])
            .inc();
    }

    pub(crate) fn audit_room(&self) -> Result<AuditSlot, Refusal> {
        self.audit.reserve().ok_or_else(|| self.audit_refused())
    }

    /// Room for the `n` lines of a batch, all or none.
    pub(crate) fn audit_rooms(&self, n: usize) -> Result<Vec<AuditSlot>, Refusal> {
        self.audit
            .reserve_many(n)
            .ok_or_else(|| self.audit_refused())
    }

    fn audit_refused(&self) -> Refusal {
        self.metrics.audit_refused.inc();
        Refusal::AuditUnavailable
    }

    /// The one place an outcome is recorded: the decision metric and the audit line, in the
    /// room reserved for it (`None`: any room left).
    pub(crate) fn finish(&self, mut record: AuditRecord, slot: Option<AuditSlot>) {
        let relayed = record.relayed.as_ref();
        if relayed.is_some_and(|r| r.load(std::sync::atomic::Ordering::Relaxed)) {
            // Its calls to the members wrote their own lines, each with its decision.
            return;
        }
        if record.unauthenticated {
            self.metrics.unauthenticated.inc();
        } else {
            self.count_decision(&record);
        }
        let mut trace = record.trace.take();
        if !trace.is_traced() {
            self.audit.record(record, slot);
            return;
        }
        let outcome = Outcome::of(&record);
        let started = Instant::now();
        self.audit.record(record, slot);
        trace.step("record", started);
        if let Some(tracer) = &self.tracer {
            tracer.finish(trace, &outcome);
        }
    }

    pub(crate) fn mint(
        &self,
        caller: &Caller,
        audience: &str,
        scope: Vec<String>,
        task: Option<&Task>,
        record: &mut AuditRecord,
    ) -> Result<Minted, Refusal> {
        let grant = toolgate_credential::Grant {
            user: caller.user.as_deref(),
            agent: &caller.agent,
            audience,
            scope,
            decision_id: &record.decision_id,
            task_id: task.map(|t| t.id.as_str()),
            not_after: task.map(|t| t.expires_at),
        };
        let minted = self
            .minter
            .mint(&grant, unix_now())
            .map_err(InternalError::Mint)?;
        self.metrics.minted.inc();
        record.jti = Some(minted.claims.jti.clone());
        record.credential_exp = Some(minted.claims.exp);
        Ok(minted)
    }
}

/// A request's audit line (or a batch message's) until it is finished: dropped unfinished (the
/// request's future was cancelled), it is written anyway, with status 499.
pub(crate) struct Unfinished<'a> {
    gateway: &'a Gateway,
    pub record: AuditRecord,
    slot: Option<AuditSlot>,
}

impl<'a> Unfinished<'a> {
    pub fn new(gateway: &'a Gateway, record: AuditRecord, slot: AuditSlot) -> Self {
        Unfinished {
            gateway,
            record,
            slot: Some(slot),
        }
    }

    /// Records the outcome, in the room reserved for it.
    pub fn done(mut self) {
        let record = std::mem::take(&mut self.record);
        self.gateway.finish(record, self.slot.take());
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let mut record = std::mem::take(&mut self.record);
            record.status = 499;
            record
                .errors
                .push("the agent went away before the answer".into());
            self.gateway.finish(record, Some(slot));
        }
    }
}

/// toolgate's own endpoints on the agent listener: `/v1/...`, `/oauth2/introspect`.
fn is_own_endpoint(path: &str) -> bool {
    path.starts_with("/v1/") || path == "/oauth2/introspect"
}

/// REST route or MCP endpoint. Under an MCP upstream only its endpoint exists, with the
/// methods of the streamable HTTP transport; nothing else there is ever forwarded.
fn classify<B>(routing: &Routing, request: &Request<B>) -> Result<Call, Refusal> {
    let path = request.uri().path();
    if let Some((index, below)) = routing.routes.upstream(path) {
        if routing.upstreams[index].config.kind == UpstreamKind::Mcp {
            if !(below.is_empty() || below == "/") {
                return Err(Refusal::ToolNotFound);
            }
            if !matches!(
                *request.method(),
                Method::POST | Method::GET | Method::DELETE
            ) {
                return Err(Refusal::MethodNotAllowed("POST, GET, DELETE"));
            }
            if request.uri().query().is_some() {
                return Err(Refusal::BadRequest(
                    "the MCP endpoint takes no query".into(),
                ));
            }
            return Ok(Call::Mcp { upstream: index });
        }
    }
    let route = routing
        .routes
        .classify(request.method(), path)
        .map_err(|e| match e {
            ClassifyError::NotFound => Refusal::ToolNotFound,
            ClassifyError::BadPath(why) => Refusal::BadRequest(why.into()),
        })?;
    Ok(Call::Rest(route))
}

/// `<upstream>/<tool>`: a tool's (or an MCP method's) Cedar action id and resource id. Made
/// once from its parts and read back by them, never re-parsed from text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ActionId {
    id: String,
    split: usize,
}

impl ActionId {
    pub fn new(upstream: &str, tool: &str) -> ActionId {
        ActionId {
            id: format!("{upstream}/{tool}"),
            split: upstream.len(),
        }
    }

    /// An MCP endpoint's own scope, `<upstream>/mcp`: what a credential for messages that pass
    /// on authentication names (the method is the agent's word).
    pub fn endpoint(upstream: &str) -> ActionId {
        ActionId::new(upstream, "mcp")
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The tool (or method) part, after `<upstream>/`.
    pub fn tool(&self) -> &str {
        &self.id[self.split + 1..]
    }

    pub fn resource(&self) -> Resource<'_> {
        Resource::Tool {
            upstream: &self.id[..self.split],
            tool: &self.id[self.split + 1..],
        }
    }
}

impl std::fmt::Display for ActionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

impl Gateway {
    /// The gateway's external base URL: `public_url`, else from the request's host.
    fn base_url(&self, host: Option<&HeaderValue>) -> String {
        if let Some(url) = &self.config.public_url {
            return url.trim_end_matches('/').to_string();
        }
        // The Host header is the agent's word and ends up in a quoted header parameter: only a
        // plain host[:port] is used, never reflected as sent.
        let host = host
            .and_then(|h| h.to_str().ok())
            .filter(|h| is_plain_authority(h))
            .map(String::from)
            .unwrap_or_else(|| self.config.listen.to_string());
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{host}")
    }

    /// Where the metadata for the resource at `path` lives (path-suffixed, RFC 9728).
    fn metadata_url(&self, routing: &Routing, host: Option<&HeaderValue>, path: &str) -> String {
        let upstream = routing
            .routes
            .upstream(path)
            .map(|(index, _)| format!("/{}", routing.upstreams[index].name()))
            .unwrap_or_default();
        format!("{}{RESOURCE_METADATA_PATH}{upstream}", self.base_url(host))
    }

    fn resource_metadata<B>(
        &self,
        routing: &Routing,
        request: &Request<B>,
        resource_path: &str,
    ) -> Response<Body> {
        if !resource_path.is_empty() && routing.routes.upstream(resource_path).is_none() {
            return json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "not_found"}),
            );
        }
        let issuers: Vec<&str> = self
            .config
            .inbound
            .jwt
            .iter()
            .map(|j| j.issuer.as_str())
            .collect();
        json_response(
            StatusCode::OK,
            &serde_json::json!({
                "resource": format!("{}{resource_path}", self.base_url(request_host(request).as_ref())),
                "authorization_servers": issuers,
                "bearer_methods_supported": ["header"],
                "resource_name": "toolgate",
            }),
        )
    }
}

fn is_plain_authority(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        && host.parse::<http::uri::Authority>().is_ok()
}

/// The host a request was sent to: `Host` (HTTP/1.1) or the URI authority (HTTP/2).
fn request_host<B>(request: &Request<B>) -> Option<HeaderValue> {
    request.headers().get(header::HOST).cloned().or_else(|| {
        request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// The task id a call names in `Toolgate-Task`, if any.
pub(crate) fn task_header<B>(request: &Request<B>) -> Result<Option<String>, Refusal> {
    let mut values = request.headers().get_all(TASK_HEADER).iter();
    let first = values.next();
    match (first, values.next()) {
        (None, _) => Ok(None),
        (Some(v), None) => match v.to_str() {
            Ok(id) if !id.trim().is_empty() && id.len() <= 128 => Ok(Some(id.trim().to_string())),
            _ => Err(Refusal::BadRequest(
                "Toolgate-Task must name a task id".into(),
            )),
        },
        (Some(_), Some(_)) => Err(Refusal::BadRequest("Toolgate-Task is given twice".into())),
    }
}

/// The task as policies see it for `action` called by `agent`, noting any approval (which
/// only the task's owner has) in the audit record.
pub(crate) fn task_context(
    task: &Task,
    action: &str,
    agent: &str,
    record: &mut AuditRecord,
) -> TaskContext {
    let approval = task.approval_for(action, agent);
    record.approval = approval.cloned();
    TaskContext {
        id: task.id.clone(),
        intent: task.intent.clone(),
        approved: approval.is_some(),
        approved_by: approval.map(|a| a.approver.clone()),
        owner: task.agent.clone(),
        owner_user: task.user.clone(),
    }
}

/// The Cedar question for a call by `caller`: agent, and user when delegated, with the claims
/// that describe each.
pub(crate) fn authz_request<'a>(
    caller: &'a Caller,
    action: &'a str,
    resource: Resource<'a>,
    args: Map<String, Value>,
    client_ip: IpAddr,
) -> AuthzRequest<'a> {
    AuthzRequest {
        agent: Principal {
            id: &caller.agent,
            claims: caller.agent_claims(),
        },
        user: caller.user.as_deref().map(|id| Principal {
            id,
            claims: caller.user_claims().unwrap_or(caller.agent_claims()),
        }),
        action,
        resource,
        args,
        env: Env {
            source_ip: client_ip,
            time: Utc::now(),
        },
        task: None,
        issuer: &caller.issuer,
        approval: None,
        usage: None,
    }
}

/// The request line and headers within `limits`: URI length (414), header count and total
/// size (431), on HTTP/1.1 and HTTP/2 alike.
fn check_request_head<B>(request: &Request<B>, limits: &Limits) -> Result<(), Refusal> {
    // The length of the URI as written (`Uri`'s Display), without writing it.
    let target = request.uri();
    let uri = target.scheme_str().map_or(0, |s| s.len() + 3)
        + target.authority().map_or(0, |a| a.as_str().len())
        + target.path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri > limits.max_uri_bytes {
        return Err(Refusal::UriTooLong);
    }
    if request.headers().len() > limits.max_headers {
        return Err(Refusal::HeadersTooLarge);
    }
    let size: usize = request
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + uri;
    if size > limits.max_header_bytes {
        return Err(Refusal::HeadersTooLarge);
    }
    Ok(())
}

/// Any request body as the one type the pipeline reads.
pub(crate) fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    body.map_err(|e| Box::new(e) as crate::answer::BoxError)
        .boxed()
}

/// An upstream has no place left for one more call.
pub(crate) struct NoPlace;

/// How much of a request body is read, and for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimit {
    pub bytes: usize,
    pub within: std::time::Duration,
}

impl Gateway {
    pub(crate) fn body_limit(&self, bytes: usize) -> BodyLimit {
        BodyLimit {
            bytes,
            within: std::time::Duration::from_secs(self.config.limits.body_read_seconds),
        }
    }
}

/// Reads a request body whole, refusing more than `limit.bytes` (413) and a body that takes
/// longer than `limit.within` to arrive (408: a stalled upload holds nothing for long).
pub(crate) async fn read_limited(body: Body, limit: BodyLimit) -> Result<Bytes, Refusal> {
    tokio::time::timeout(limit.within, collect_at_most(body, limit.bytes))
        .await
        .map_err(|_| Refusal::RequestTimeout)?
        .map_err(|e| match e {
            Collected::TooLarge => Refusal::PayloadTooLarge,
            Collected::Read(e) => Refusal::BadRequest(format!("cannot read body: {e}")),
        })
}

/// Why a body was not read whole.
pub(crate) enum Collected {
    TooLarge,
    Read(crate::answer::BoxError),
}

/// A body read whole, refusing more than `max` bytes (a request's, or an answer to rewrite).
pub(crate) async fn collect_at_most(mut body: Body, max: usize) -> Result<Bytes, Collected> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(Collected::Read)?.into_data() {
            if out.len() + data.len() > max {
                return Err(Collected::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}
