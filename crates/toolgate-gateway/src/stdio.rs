//! MCP servers the gateway runs itself (`command:`), speaking JSON-RPC one message a line on
//! stdin and stdout. Each is served to the pipeline as a streamable HTTP server would serve it
//! (POST, GET, DELETE, `Mcp-Session-Id`), so what the pipeline does for an MCP upstream
//! (decisions, filtered listings, pins, sessions bound to their caller) holds unchanged.
//!
//! The gateway holds each process's handshake: it sends the first `initialize` it is given
//! (and `notifications/initialized`) itself and answers every agent's `initialize` from the
//! result. So a crashed process is started again, with backoff, and initialized as before
//! without the agent's help, and a shared process serves many sessions.
//!
//! Ids are the gateway's on the process's side: every request is renumbered (progress tokens
//! too) and answers are mapped back, so sessions sharing a process never see each other's.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;

use crate::answer::{full, json_response, Body};
use crate::config::{ProcessConfig, UpstreamConfig};
use crate::metrics::Metrics;

/// The most one line a process writes may hold; a longer one ends the process.
const MAX_LINE: usize = 16 << 20;
/// The most of one stderr line logged at once (a longer one is logged in parts).
const MAX_STDERR_LINE: usize = 2_000;
/// The most sessions of a shared process (each is only an id and a listener).
const MAX_SHARED_SESSIONS: usize = 10_000;
/// Messages waiting for a slow reader of one answer stream before more are dropped.
const STREAM_QUEUE: usize = 256;
/// Of a stream's queue, what only answers may take: a batch's answers (at most 64 requests)
/// always fit, however many notifications an agent leaves unread.
const ANSWER_ROOM: usize = 64;
/// How long a process is given to end at shutdown before it is killed.
const END_GRACE: Duration = Duration::from_secs(2);
/// The environment a process gets from the gateway's own (the rest is never passed: the
/// gateway's environment may hold other upstreams' secrets).
const PASSED_ENV: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ"];
const SESSION_HEADER: &str = "mcp-session-id";
/// JSON-RPC's internal error: the server cannot answer (exited, not started).
const SERVER_ERROR: i64 = -32603;

/// What a `command:` upstream runs, and with what secret.
#[derive(PartialEq)]
pub struct Spec {
    command: Vec<String>,
    env: Vec<(String, String)>,
    process: ProcessConfig,
    /// `credential: {mode: inject, env_var}`: the variable and its value.
    secret: Option<(String, String)>,
    timeout: Duration,
    idle_answer: Duration,
}

impl Spec {
    pub fn new(config: &UpstreamConfig, secret: Option<(String, String)>) -> Spec {
        Spec {
            command: config.command.clone().unwrap_or_default(),
            env: config.env.clone().into_iter().collect(),
            process: config.process.clone(),
            secret,
            timeout: Duration::from_secs(config.timeout_seconds),
            idle_answer: Duration::from_secs(config.response_idle_seconds),
        }
    }
}

/// A `command:` upstream run for the gateway's own commands (`pin`, `schema mcp`), not for
/// agents: one exchange at a time, its processes ended by `shutdown`.
pub struct LocalServer(Arc<StdioServer>);

impl LocalServer {
    /// Starts serving `config` (its secret read now); needs a tokio runtime.
    pub fn start(config: &UpstreamConfig) -> Result<LocalServer, String> {
        let secret =
            crate::upstream::process_secret(config).map_err(|e| crate::answer::error_chain(&e))?;
        let spec = Spec::new(config, secret);
        let metrics = Arc::new(Metrics::new());
        Ok(LocalServer(StdioServer::new(&config.name, spec, metrics)))
    }

    /// One MCP HTTP exchange, as `toolgate` itself (`{agent}` and `{user}` are `toolgate`).
    pub async fn exchange(&self, request: Request<Body>) -> Response<Body> {
        let opener = Opener {
            agent: "toolgate",
            user: Some("toolgate"),
        };
        self.0.handle(request, opener).await
    }

    pub async fn shutdown(&self) {
        self.0.shutdown().await;
    }
}

/// Who a session is for: what `{agent}` and `{user}` in `env` become.
pub struct Opener<'a> {
    pub agent: &'a str,
    pub user: Option<&'a str>,
}

/// A `command:` upstream: its sessions and their processes.
pub struct StdioServer {
    name: String,
    spec: Spec,
    metrics: Arc<Metrics>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// The one process of `process.shared`, started with the first session.
    shared: Mutex<Option<Arc<Slot>>>,
}

/// Why a session was not opened.
struct Refused(StatusCode, &'static str);

/// One agent session.
struct Session {
    id: String,
    slot: Arc<Slot>,
    last_used: Mutex<Instant>,
}

/// Where a process runs (a session's own, or the shared one), started again when it exits.
struct Slot {
    env: Vec<(String, String)>,
    /// The running (or exited) process; `None` before the first start.
    process: tokio::sync::Mutex<Option<Running>>,
    /// The `initialize` it was first given, sent again to a restarted process; and the result.
    handshake: Mutex<Option<Handshake>>,
    /// Exits in a row, each soon after its start: the backoff before the next start.
    crashes: AtomicU64,
    /// The last start failed (no process, or no handshake).
    start_failed: AtomicBool,
}

#[derive(Clone)]
struct Handshake {
    initialize: Value,
    result: Option<Value>,
}

struct Running {
    inbox: Arc<Inbox>,
    child: Child,
    /// The process group the child leads (`process_group(0)`).
    group: Option<i32>,
    started: Instant,
}

/// What the process's side shares with its reader: where answers go.
struct Inbox {
    upstream: String,
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    /// Each session's open GET stream, for what the server says unasked.
    listeners: Mutex<HashMap<String, mpsc::Sender<Value>>>,
    shared: bool,
    alive: AtomicBool,
    /// How long a write may wait for the process to read.
    write_within: Duration,
}

/// A request sent to the process, waiting for its answer.
struct Pending {
    session: String,
    id: Value,
    progress_token: Option<Value>,
    to: mpsc::Sender<Value>,
}

impl StdioServer {
    pub fn new(name: &str, spec: Spec, metrics: Arc<Metrics>) -> Arc<StdioServer> {
        let server = Arc::new(StdioServer {
            name: name.to_string(),
            spec,
            metrics,
            sessions: Mutex::new(HashMap::new()),
            shared: Mutex::new(None),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&server)));
        server
    }

    /// Whether `spec` is what this server runs (a reload then keeps its processes).
    pub fn runs(&self, spec: &Spec) -> bool {
        self.spec == *spec
    }

    /// Answers one MCP HTTP exchange as a streamable HTTP server would.
    pub async fn handle(&self, request: Request<Body>, opener: Opener<'_>) -> Response<Body> {
        let session = request
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let wants_stream = accepts_event_stream(request.headers());
        let method = request.method().clone();
        let session = match session {
            Some(id) => match self.session(&id) {
                Some(session) => Some(session),
                None => return rpc_error(StatusCode::NOT_FOUND, "session not found"),
            },
            None => None,
        };
        match (method, session) {
            (Method::POST, session) => {
                let body = request.into_body().collect().await.map(|b| b.to_bytes());
                let Ok(body) = body else {
                    return rpc_error(StatusCode::BAD_REQUEST, "the body could not be read");
                };
                self.post(session, &body, wants_stream, opener).await
            }
            (Method::GET, Some(session)) => self.listen(&session).await,
            (Method::DELETE, Some(session)) => {
                self.end(&session.id);
                Response::new(full(Bytes::new()))
            }
            (Method::GET | Method::DELETE, None) => {
                rpc_error(StatusCode::BAD_REQUEST, "Mcp-Session-Id is required")
            }
            _ => rpc_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        }
    }

    fn session(&self, id: &str) -> Option<Arc<Session>> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get(id).cloned()?;
        *session.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        Some(session)
    }

    /// A POST's messages written to the process; the answers streamed back as they come.
    async fn post(
        &self,
        session: Option<Arc<Session>>,
        body: &[u8],
        wants_stream: bool,
        opener: Opener<'_>,
    ) -> Response<Body> {
        let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
            return rpc_error(StatusCode::BAD_REQUEST, "the body is not JSON");
        };
        let batch = parsed.is_array();
        let messages = match parsed {
            Value::Array(messages) => messages,
            message => vec![message],
        };
        let (session, opened) = match session {
            Some(session) => (session, false),
            None => match self.open(&messages, &opener) {
                Ok(session) => (session, true),
                Err(Refused(status, why)) => {
                    let mut refused = rpc_error(status, why);
                    if status == StatusCode::SERVICE_UNAVAILABLE {
                        let retry = HeaderValue::from_static("5");
                        refused.headers_mut().insert(header::RETRY_AFTER, retry);
                    }
                    return refused;
                }
            },
        };
        let inbox = match self.started(&session.slot, &session.id).await {
            Ok(inbox) => inbox,
            Err(why) => {
                if opened {
                    self.end(&session.id);
                }
                return answer_each(&messages, batch, &why);
            }
        };
        let (to, answers) = mpsc::channel(STREAM_QUEUE);
        let mut expected = 0;
        for message in messages {
            expected += usize::from(self.pass(&session, &inbox, message, &to).await);
        }
        drop(to);
        let mut response = if expected == 0 {
            accepted()
        } else if wants_stream {
            event_stream(answers, Some(self.spec.idle_answer))
        } else {
            collected(answers, batch, self.spec.timeout).await
        };
        if opened {
            if let Ok(value) = HeaderValue::from_str(&session.id) {
                response.headers_mut().insert(SESSION_HEADER, value);
            }
        }
        response
    }

    /// A new session, for a POST that is one `initialize` request; refused past the bound.
    fn open(&self, messages: &[Value], opener: &Opener<'_>) -> Result<Arc<Session>, Refused> {
        let initialize = match messages {
            [m] if m.get("method").and_then(Value::as_str) == Some("initialize") => m,
            _ => {
                return Err(Refused(
                    StatusCode::BAD_REQUEST,
                    "no Mcp-Session-Id: a session starts with initialize",
                ))
            }
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let bound = if self.spec.process.shared {
            MAX_SHARED_SESSIONS
        } else {
            self.spec.process.max
        };
        if sessions.len() >= bound {
            tracing::warn!(upstream = %self.name, bound, "a new MCP session was refused: the process bound is reached");
            return Err(Refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many sessions: every process of this server is taken",
            ));
        }
        let names = |placeholder| self.spec.env.iter().any(|(_, v)| v.contains(placeholder));
        let no_user = opener.user.is_none_or(str::is_empty);
        if (names("{user}") && no_user) || (names("{agent}") && opener.agent.is_empty()) {
            // An empty segment would name the folder every user's folder is in.
            return Err(Refused(
                StatusCode::FORBIDDEN,
                "this server keeps each caller's state apart ({user} or {agent} in its env), and the caller has none",
            ));
        }
        let slot = if self.spec.process.shared {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            shared
                .get_or_insert_with(|| Arc::new(Slot::new(self.spec.env.clone())))
                .clone()
        } else {
            Arc::new(Slot::new(substituted(&self.spec.env, &id, opener)))
        };
        slot.offer_handshake(initialize);
        let session = Arc::new(Session {
            id: id.clone(),
            slot,
            last_used: Mutex::new(Instant::now()),
        });
        sessions.insert(id, session.clone());
        Ok(session)
    }

    /// Ends a session (its own process with it).
    fn end(&self, id: &str) {
        let removed = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(session) = removed {
            if let Ok(mut running) = session.slot.process.try_lock() {
                if let Some(running) = running.as_mut() {
                    running.inbox.listeners_remove(id);
                }
            }
            if !self.spec.process.shared {
                self.stop_slot(&session.slot);
            }
        }
    }

    /// The slot's process, started (again) and initialized when it is not running.
    async fn started(&self, slot: &Arc<Slot>, session: &str) -> Result<Arc<Inbox>, String> {
        let mut process = slot.process.lock().await;
        if let Some(running) = process.as_ref() {
            if running.inbox.alive.load(Ordering::Acquire) {
                return Ok(running.inbox.clone());
            }
        }
        let ran = match process.take() {
            Some(exited) => Some(exited.started.elapsed()),
            // A start that failed waits as a crash does: a server that cannot start is not
            // started again on every request.
            None => slot.failed_start().then_some(Duration::ZERO),
        };
        if let Some(ran) = ran {
            self.metrics
                .process_restarts
                .with_label_values(&[&self.name])
                .inc();
            let backoff = slot.backoff(ran);
            tracing::warn!(upstream = %self.name, session, ?backoff, "the server process exited; starting it again");
            tokio::time::sleep(backoff).await;
        }
        let started = match self.spawn(&slot.env, session) {
            Ok(running) => {
                let handshake = slot.handshake();
                self.initialize(&running.inbox, handshake)
                    .await
                    .map(|result| (running, result))
            }
            Err(why) => Err(why),
        };
        let running = match started {
            Ok((running, result)) => {
                slot.initialized(result);
                running
            }
            Err(why) => {
                slot.start_failed.store(true, Ordering::Relaxed);
                return Err(why);
            }
        };
        slot.start_failed.store(false, Ordering::Relaxed);
        let inbox = running.inbox.clone();
        *process = Some(running);
        Ok(inbox)
    }

    /// Starts the command in a process group of its own (so that what it starts ends with it).
    fn spawn(&self, env: &[(String, String)], session: &str) -> Result<Running, String> {
        let (program, args) = self
            .spec
            .command
            .split_first()
            .ok_or("the upstream has no command")?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(
                PASSED_ENV
                    .iter()
                    .filter_map(|n| Some((n, std::env::var_os(n)?))),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some((name, value)) = &self.spec.secret {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("the server could not be started: {e}"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("the server's pipes could not be opened".into());
        };
        let inbox = Arc::new(Inbox {
            upstream: self.name.clone(),
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            listeners: Mutex::new(HashMap::new()),
            shared: self.spec.process.shared,
            alive: AtomicBool::new(true),
            write_within: self.spec.timeout,
        });
        let gauge = self.metrics.processes.with_label_values(&[&self.name]);
        gauge.inc();
        tokio::spawn(read_stdout(inbox.clone(), stdout, gauge));
        tokio::spawn(log_stderr(self.name.clone(), session.to_string(), stderr));
        tracing::info!(upstream = %self.name, session, pid = child.id(), "started the server process");
        let group = child.id().and_then(|pid| i32::try_from(pid).ok());
        Ok(Running {
            inbox,
            child,
            group,
            started: Instant::now(),
        })
    }

    /// Sends the handshake's `initialize` and `notifications/initialized`; its result.
    async fn initialize(&self, inbox: &Arc<Inbox>, handshake: Handshake) -> Result<Value, String> {
        let (to, mut answers) = mpsc::channel(STREAM_QUEUE);
        let mut request = handshake.initialize;
        inbox.send_request(&mut request, "", to).await?;
        let answered = async {
            while let Some(message) = answers.recv().await {
                if is_answer(&message) {
                    return Some(message);
                }
            }
            None
        };
        let answer = match tokio::time::timeout(self.spec.timeout, answered).await {
            Err(_) => return Err("the server did not answer initialize in time".into()),
            Ok(None) => return Err("the server exited before it answered initialize".into()),
            Ok(Some(answer)) => answer,
        };
        let Some(result) = answer.get("result").cloned() else {
            let error = answer.get("error").cloned().unwrap_or(Value::Null);
            return Err(format!("the server refused initialize: {error}"));
        };
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        inbox.write(&initialized).await?;
        Ok(result)
    }

    /// Passes one agent message on; whether an answer to it is awaited.
    async fn pass(
        &self,
        session: &Session,
        inbox: &Arc<Inbox>,
        mut message: Value,
        to: &mpsc::Sender<Value>,
    ) -> bool {
        let method = message.get("method").and_then(Value::as_str);
        let id = message.get("id").cloned();
        match (method, id) {
            // The gateway holds the handshake: every agent is answered from its result.
            (Some("initialize"), Some(id)) => {
                let result = session.slot.handshake().result.unwrap_or(Value::Null);
                let _ = to.try_send(json!({"jsonrpc": "2.0", "id": id, "result": result}));
                true
            }
            (Some("notifications/initialized"), None) => false,
            (Some(_), Some(id)) => {
                if let Err(why) = inbox
                    .send_request(&mut message, &session.id, to.clone())
                    .await
                {
                    let _ = to.try_send(error_answer(&id, &why));
                }
                true
            }
            (Some("notifications/cancelled"), None) => {
                if inbox.cancel_target(&mut message, &session.id) {
                    let _ = inbox.write(&message).await;
                }
                false
            }
            (Some(_), None) => {
                let _ = inbox.write(&message).await;
                false
            }
            // An answer to the server's own request: only a session's own process asked it.
            (None, _) => {
                if !inbox.shared {
                    let _ = inbox.write(&message).await;
                }
                false
            }
        }
    }

    /// A session's GET stream: what the server says outside any answer.
    async fn listen(&self, session: &Session) -> Response<Body> {
        let (to, from) = mpsc::channel(STREAM_QUEUE);
        // Started (again) if need be: a stream on an exited process would never carry anything.
        let inbox = match self.started(&session.slot, &session.id).await {
            Ok(inbox) => inbox,
            Err(why) => return rpc_error(StatusCode::SERVICE_UNAVAILABLE, &why),
        };
        inbox
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session.id.clone(), to);
        // A listen stream stays open as long as the agent keeps it: no idle cut-off.
        event_stream(from, None)
    }

    /// Ends every process, each given a moment to end on its own.
    pub async fn shutdown(&self) {
        let sessions: Vec<_> = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner()).take();
        let slots = sessions.into_iter().map(|s| s.slot.clone()).chain(shared);
        let mut ending = Vec::new();
        for slot in slots {
            if let Some(running) = slot.process.lock().await.take() {
                ending.push(running);
            }
        }
        for running in &ending {
            signal_group(running.group, Signal::Term);
        }
        let deadline = tokio::time::Instant::now() + END_GRACE;
        for running in &mut ending {
            let _ = tokio::time::timeout_at(deadline, running.child.wait()).await;
        }
        // What ignored the request (a server under `npx`, say) is ended now, the leader
        // reaped or not: its group id stays taken while any member lives.
        for running in &ending {
            signal_group(running.group, Signal::Kill);
        }
    }

    /// Ends a slot's process now (idle, or its session ended).
    fn stop_slot(&self, slot: &Slot) {
        if let Ok(mut process) = slot.process.try_lock() {
            process.take();
        }
    }

    /// Ends the sessions not used for `idle_seconds` (and the shared process once none is left).
    fn reap(&self) {
        let idle = Duration::from_secs(self.spec.process.idle_seconds);
        let stale: Vec<String> = {
            let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions
                .values()
                .filter(|s| {
                    s.last_used
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .elapsed()
                        > idle
                })
                .filter(|s| !s.slot.busy(&s.id))
                .map(|s| s.id.clone())
                .collect()
        };
        for id in stale {
            tracing::info!(upstream = %self.name, session = %id, "session idle: ending it");
            self.end(&id);
        }
        if self.spec.process.shared {
            // Under the sessions' lock, as `open` takes a slot: no session joins one ending.
            let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            if sessions.is_empty() {
                let slot = self.shared.lock().unwrap_or_else(|e| e.into_inner()).take();
                drop(sessions);
                if let Some(slot) = slot {
                    self.stop_slot(&slot);
                }
            }
        }
    }
}

/// Reaps idle sessions for as long as the server is in use.
async fn reap_idle(server: Weak<StdioServer>) {
    let every = match server.upgrade() {
        Some(s) => {
            Duration::from_secs(s.spec.process.idle_seconds).min(Duration::from_secs(20)) / 4
        }
        None => return,
    };
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        ticks.tick().await;
        match server.upgrade() {
            Some(server) => server.reap(),
            None => return,
        }
    }
}

impl Slot {
    fn new(env: Vec<(String, String)>) -> Slot {
        Slot {
            env,
            process: tokio::sync::Mutex::new(None),
            handshake: Mutex::new(None),
            crashes: AtomicU64::new(0),
            start_failed: AtomicBool::new(false),
        }
    }

    fn failed_start(&self) -> bool {
        self.start_failed.load(Ordering::Relaxed)
    }

    /// The first `initialize` given is the one every start of the process is sent.
    fn offer_handshake(&self, initialize: &Value) {
        let mut handshake = self.handshake.lock().unwrap_or_else(|e| e.into_inner());
        handshake.get_or_insert_with(|| Handshake {
            initialize: initialize.clone(),
            result: None,
        });
    }

    fn handshake(&self) -> Handshake {
        let handshake = self.handshake.lock().unwrap_or_else(|e| e.into_inner());
        handshake.clone().unwrap_or_else(|| Handshake {
            initialize: json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}),
            result: None,
        })
    }

    fn initialized(&self, result: Value) {
        let mut handshake = self.handshake.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handshake) = handshake.as_mut() {
            handshake.result = Some(result);
        }
    }

    /// The wait before starting again a process that ran for `ran`: doubling from 250 ms to
    /// 30 s while it keeps exiting within a minute.
    fn backoff(&self, ran: Duration) -> Duration {
        if ran > Duration::from_secs(60) {
            self.crashes.store(0, Ordering::Relaxed);
        }
        let crashes = self.crashes.fetch_add(1, Ordering::Relaxed).min(7);
        (Duration::from_millis(250) * 2u32.pow(crashes as u32)).min(Duration::from_secs(30))
    }

    /// Whether a request of the session's is still waiting for its answer.
    fn busy(&self, session: &str) -> bool {
        let Ok(process) = self.process.try_lock() else {
            return true;
        };
        process.as_ref().is_some_and(|running| {
            let pending = running
                .inbox
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // A request no one waits for any more (the agent went away, or gave up) does not
            // keep a session alive.
            pending
                .values()
                .any(|p| p.session == session && !p.to.is_closed())
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.inbox.alive.store(false, Ordering::Release);
        // The group too: `npx` and shells leave the server itself as their child.
        signal_group(self.group, Signal::Kill);
    }
}

enum Signal {
    Term,
    Kill,
}

/// Signals a process group (`None`: the child never started).
fn signal_group(group: Option<i32>, signal: Signal) {
    use rustix::process::{kill_process_group, Pid, Signal as Sig};
    let Some(group) = group.and_then(Pid::from_raw) else {
        return;
    };
    let signal = match signal {
        Signal::Term => Sig::TERM,
        Signal::Kill => Sig::KILL,
    };
    let _ = kill_process_group(group, signal);
}

impl Inbox {
    /// Writes one message, a line.
    async fn write(&self, message: &Value) -> Result<(), String> {
        let mut line = serde_json::to_vec(message).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut stdin = self.stdin.lock().await;
        let written = async {
            stdin.write_all(&line).await?;
            stdin.flush().await
        };
        match tokio::time::timeout(self.write_within, written).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the server process is not reading its input".into()),
            Err(_) => {
                // Stuck: taken for exited, so the next request starts it again.
                self.alive.store(false, Ordering::Release);
                Err("the server process stopped reading its input".into())
            }
        }
    }

    /// Sends a request under an id of the gateway's; its answer (and its progress) go to `to`.
    async fn send_request(
        &self,
        message: &mut Value,
        session: &str,
        to: mpsc::Sender<Value>,
    ) -> Result<(), String> {
        if !self.alive.load(Ordering::Acquire) {
            return Err("the server process exited".into());
        }
        let own = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let token = message.pointer_mut("/params/_meta/progressToken").map(|t| {
            let agents = t.clone();
            *t = json!(own);
            agents
        });
        message["id"] = json!(own);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                own,
                Pending {
                    session: session.to_string(),
                    id,
                    progress_token: token,
                    to,
                },
            );
        let written = self.write(message).await;
        if written.is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&own);
        }
        written
    }

    /// A cancellation names the agent's request id: it is given the gateway's. False when the
    /// session has no such request waiting.
    fn cancel_target(&self, message: &mut Value, session: &str) -> bool {
        let Some(target) = message.pointer("/params/requestId").cloned() else {
            return false;
        };
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let own = pending
            .iter()
            .find(|(_, p)| p.session == session && p.id == target)
            .map(|(own, _)| *own);
        drop(pending);
        match own {
            Some(own) => {
                message["params"]["requestId"] = json!(own);
                // A server need not answer a cancelled request: it waits no longer.
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&own);
                true
            }
            None => false,
        }
    }

    fn listeners_remove(&self, session: &str) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.remove(session);
    }

    /// Where one line the server wrote goes.
    async fn deliver(self: &Arc<Self>, mut message: Value) {
        if is_answer(&message) {
            let own = message.get("id").and_then(Value::as_u64);
            let pending = own.and_then(|own| {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending.remove(&own)
            });
            if let Some(pending) = pending {
                message["id"] = pending.id;
                // Room is kept for it (`ANSWER_ROOM`): the reader never waits on an agent.
                let _ = pending.to.try_send(message);
            }
            return;
        }
        if let Some(own) = message
            .pointer("/params/progressToken")
            .and_then(Value::as_u64)
        {
            let target = {
                let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                pending
                    .get(&own)
                    .map(|p| (p.progress_token.clone(), p.to.clone()))
            };
            if let Some((Some(token), to)) = target {
                message["params"]["progressToken"] = token;
                note(&to, message);
            }
            return;
        }
        self.unasked(message).await;
    }

    /// A request or notification of the server's own, not tied to a request's progress: to
    /// the latest request's stream, else the session's GET stream. A shared process's requests
    /// are answered by the gateway (no one session asked), its notifications go to all.
    async fn unasked(self: &Arc<Self>, message: Value) {
        let is_request = message.get("id").is_some();
        if self.shared {
            if is_request {
                let id = message.get("id").cloned().unwrap_or(Value::Null);
                let refused = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601,
                    "message": "a shared server cannot ask one agent (process.shared)"}});
                // Written by another task: the reader never waits on the server's input.
                let inbox = self.clone();
                tokio::spawn(async move { inbox.write(&refused).await });
                return;
            }
            // Only what is every session's news: a log line or a resource update may be one
            // session's business.
            let method = message.get("method").and_then(Value::as_str).unwrap_or("");
            if !method.ends_with("/list_changed") {
                return;
            }
            let listeners: Vec<_> = self
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            for listener in listeners {
                let _ = listener.try_send(message.clone());
            }
            return;
        }
        let latest = {
            let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending
                .iter()
                .filter(|(_, p)| !p.to.is_closed())
                .max_by_key(|(own, _)| **own)
                .map(|(_, p)| p.to.clone())
        };
        let to = latest.or_else(|| {
            let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            listeners.values().find(|l| !l.is_closed()).cloned()
        });
        match to {
            Some(to) => note(&to, message),
            None => {
                tracing::debug!(upstream = %self.upstream, "a server message with no one to take it was dropped")
            }
        }
    }

    /// The process ended: every request still waiting is answered with an error.
    fn exited(&self) {
        self.alive.store(false, Ordering::Release);
        let pending: Vec<Pending> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.drain().map(|(_, p)| p).collect()
        };
        for p in pending {
            let _ =
                p.to.try_send(error_answer(&p.id, "the server process exited"));
        }
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// A server message other than an answer, unless the stream's room is the answers'.
fn note(to: &mpsc::Sender<Value>, message: Value) {
    if to.capacity() > ANSWER_ROOM {
        let _ = to.try_send(message);
    }
}

/// Reads the server's lines until it ends (or writes a line past `MAX_LINE`).
async fn read_stdout(inbox: Arc<Inbox>, stdout: ChildStdout, gauge: prometheus::IntGauge) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line(&mut reader, &mut line).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(why) => {
                tracing::warn!(upstream = %inbox.upstream, "{why}: the server process is ended");
                break;
            }
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(message) if message.is_object() => inbox.deliver(message).await,
            _ if line.iter().all(u8::is_ascii_whitespace) => {}
            _ => {
                tracing::debug!(upstream = %inbox.upstream, "the server wrote a line that is not a JSON-RPC message; ignored")
            }
        }
    }
    inbox.exited();
    gauge.dec();
}

/// One line, without its end; false at the end of the output.
async fn read_line(
    reader: &mut BufReader<ChildStdout>,
    line: &mut Vec<u8>,
) -> Result<bool, String> {
    loop {
        let buffer = reader.fill_buf().await.map_err(|e| e.to_string())?;
        if buffer.is_empty() {
            return Ok(!line.is_empty());
        }
        let (taken, ended) = match buffer.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buffer.len(), false),
        };
        line.extend_from_slice(&buffer[..taken]);
        reader.consume(taken);
        if line.len() > MAX_LINE {
            return Err(format!("a line longer than {MAX_LINE} bytes"));
        }
        if ended {
            line.pop();
            return Ok(true);
        }
    }
}

/// The server's stderr, in the gateway's log.
/// Read to its end whatever it holds (bytes that are not UTF-8, lines of any length): a pipe
/// left unread would stop the server.
async fn log_stderr(upstream: String, session: String, stderr: tokio::process::ChildStderr) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_STDERR_LINE as u64)
            .read_until(b'\n', &mut line)
            .await;
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                tracing::info!(upstream = %upstream, session = %session, "server stderr: {text}");
            }
        }
    }
}

/// `{session}`, `{agent}` and `{user}` in env values, each encoded to be one safe path segment.
fn substituted(
    env: &[(String, String)],
    session: &str,
    opener: &Opener<'_>,
) -> Vec<(String, String)> {
    env.iter()
        .map(|(name, value)| {
            let value = value
                .replace("{session}", &segment(session))
                .replace("{agent}", &segment(opener.agent))
                .replace("{user}", &segment(opener.user.unwrap_or("")));
            (name.clone(), value)
        })
        .collect()
}

/// Letters, digits, `-` and `_` as they are; every other byte as `%XX` (`.` and `/` too, so no
/// id can climb out of a folder).
fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn is_answer(message: &Value) -> bool {
    message.get("method").is_none()
        && (message.get("result").is_some() || message.get("error").is_some())
}

fn error_answer(id: &Value, why: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": SERVER_ERROR, "message": why}})
}

/// Every request of a POST answered with the same error (the server could not be started).
fn answer_each(messages: &[Value], batch: bool, why: &str) -> Response<Body> {
    let answers: Vec<Value> = messages
        .iter()
        .filter(|m| m.get("method").is_some())
        .filter_map(|m| m.get("id"))
        .map(|id| error_answer(id, why))
        .collect();
    match (batch, answers.len()) {
        (_, 0) => rpc_error(StatusCode::SERVICE_UNAVAILABLE, why),
        (false, _) => json_response(StatusCode::OK, &answers[0]),
        (true, _) => json_response(StatusCode::OK, &Value::Array(answers)),
    }
}

fn rpc_error(status: StatusCode, why: &str) -> Response<Body> {
    let answer =
        json!({"jsonrpc": "2.0", "id": null, "error": {"code": SERVER_ERROR, "message": why}});
    json_response(status, &answer)
}

fn accepted() -> Response<Body> {
    crate::answer::empty(StatusCode::ACCEPTED)
}

fn accepts_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// The messages as an SSE stream, ended when every answer is in (all senders gone), or when
/// nothing came for `idle`.
fn event_stream(from: mpsc::Receiver<Value>, idle: Option<Duration>) -> Response<Body> {
    use tokio_stream::StreamExt;
    let event = |message: Value| {
        let data = serde_json::to_string(&message).unwrap_or_default();
        Ok(Frame::data(Bytes::from(format!(
            "event: message\ndata: {data}\n\n"
        ))))
    };
    let messages = tokio_stream::wrappers::ReceiverStream::new(from);
    let body = match idle {
        Some(idle) => {
            let frames = messages
                .timeout(idle)
                .take_while(Result::is_ok)
                .filter_map(Result::ok)
                .map(event);
            StreamBody::new(frames).boxed()
        }
        None => StreamBody::new(messages.map(event)).boxed(),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The answers (only) as one JSON body, for an agent that does not take event streams.
async fn collected(
    mut from: mpsc::Receiver<Value>,
    batch: bool,
    within: Duration,
) -> Response<Body> {
    let mut answers = Vec::new();
    let all = async {
        while let Some(message) = from.recv().await {
            if is_answer(&message) {
                answers.push(message);
            }
        }
    };
    if tokio::time::timeout(within, all).await.is_err() {
        return rpc_error(
            StatusCode::GATEWAY_TIMEOUT,
            "the server did not answer in time",
        );
    }
    if batch {
        return json_response(StatusCode::OK, &Value::Array(answers));
    }
    let answer = answers.into_iter().next().unwrap_or(Value::Null);
    json_response(StatusCode::OK, &answer)
}
