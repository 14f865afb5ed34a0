//! The audit log: one JSON object per line per decision. Records go to a writer thread, so the
//! request path never waits on the disk; `audit.buffer` bounds what may be queued, and a call
//! takes its room before anything is forwarded.

use std::sync::Arc;

use std::io::Write;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use serde_json::{Map, Value};
use toolgate_policy::{ActionContext, AttrType};

use crate::metrics::Metrics;

/// What was decided about a request (or one MCP message): each audit line is one decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The default: a record becomes `Allow` only when a decision says so.
    #[default]
    Deny,
    Allow,
}

impl Verdict {
    pub fn of(allowed: bool) -> Verdict {
        if allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Deny => "deny",
            Verdict::Allow => "allow",
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditRecord {
    pub decision_id: String,
    pub time: String,
    pub agent: Option<String>,
    pub user: Option<String>,
    /// The issuer of the token that named agent and user.
    pub iss: Option<String>,
    pub action: Option<String>,
    pub resource: Option<String>,
    /// The upstream the call was routed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The declared arguments as the policy read them; `@sensitive` ones, and long ones, as
    /// `sha256:<hex>` of their JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Map<String, serde_json::Value>>,
    pub decision: Verdict,
    pub policies: Vec<String>,
    /// Each determining policy's version (`PolicySource::version`) when it decided.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub policy_versions: std::collections::BTreeMap<String, String>,
    pub errors: Vec<String>,
    pub task_id: Option<String>,
    /// A started task's intent (on its `start_task` line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// The human approval the decision relied on, if the call ran in an approved task.
    pub approval: Option<toolgate_tasks::Approval>,
    /// The approval of this one call: asked for (`requested`), used (`used`), or decided by
    /// an operator (`approved`, `denied`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_step: Option<&'static str>,
    /// The usage counters the decision read, as it read them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<serde_json::Map<String, serde_json::Value>>,
    /// What an allowed call reserved in its counters: given back if it never reaches the
    /// upstream.
    #[serde(skip)]
    pub usage_reserved: Vec<toolgate_tasks::usage::Reservation>,
    pub jti: Option<String>,
    /// Which `credential.mode` served the call (`mint`, `inject`, `exchange`,
    /// `client_credentials`), and the credential's id: the `jti` of a JWT, else a hash.
    pub credential_mode: Option<&'static str>,
    pub credential_id: Option<String>,
    /// When a minted credential expires (its `exp`, seconds since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_exp: Option<u64>,
    pub upstream_status: Option<u16>,
    /// The endpoints tried for the call (more than one: retried where nothing had reached
    /// the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    pub eval_us: Option<u64>,
    /// What the decision would have been with the `@mode("shadow")` policies enforced too,
    /// where that differs, and its determining and erring policies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_decision: Option<Verdict>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow_policies: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow_errors: Vec<String>,
    pub source_ip: String,
    pub method: String,
    pub path: String,
    /// The status the agent received.
    pub status: u16,
    /// The request's trace, when traces are on and this one is recorded.
    #[serde(skip)]
    pub trace: crate::trace::TraceSlot,
    /// Refused for want of a valid token (not an upstream's own 401): counted apart from
    /// the decisions.
    #[serde(skip)]
    pub unauthenticated: bool,
    /// A federated endpoint's request, relayed to its members as their own requests: those
    /// are recorded, this one is not.
    /// Set (shared with the relay) once a member was asked: read when the line is written,
    /// so a request the agent abandons mid-relay is not recorded twice.
    #[serde(skip)]
    pub relayed: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl AuditRecord {
    /// The record of a request: a fresh decision id, denied until a decision says otherwise.
    pub fn begin<B>(request: &http::Request<B>) -> Self {
        AuditRecord {
            decision_id: uuid::Uuid::now_v7().to_string(),
            time: toolgate_policy::utc_millis(chrono::Utc::now()),
            method: request.method().to_string(),
            path: request.uri().path().to_string(),
            ..AuditRecord::default()
        }
    }
}

/// Arguments longer than this (as JSON) are recorded as their hash.
const MAX_AUDITED_ARG_BYTES: usize = 1024;

/// The arguments of a call as its audit line keeps them: what the policy read, projected
/// through the declared types (an undeclared field, at any depth, the policy never saw), with
/// each value the schema marks `@sensitive`, and each longer than `MAX_AUDITED_ARG_BYTES`,
/// replaced by `hash` of its JSON (a keyed hash: a short secret cannot be guessed back). Also
/// the sensitive values' texts (as given and as JSON), to `scrub` from error messages that
/// quote them (Cedar's among them), longest first.
pub fn audited_args(
    args: &Map<String, Value>,
    declared: &ActionContext,
    hash: &dyn Fn(&str) -> String,
) -> (Map<String, Value>, Vec<String>) {
    let mut secrets = Vec::new();
    let audited = args
        .iter()
        .filter_map(|(name, value)| {
            let (ty, _) = declared.args.get(name)?;
            let kept = project(value, ty, name, &declared.sensitive, hash, &mut secrets);
            let text = kept.to_string();
            let kept = if text.len() > MAX_AUDITED_ARG_BYTES {
                Value::String(hash(&text))
            } else {
                kept
            };
            Some((name.clone(), kept))
        })
        .collect();
    secrets.retain(|t| !t.is_empty());
    // Longest first, so a value is replaced whole before a part of it is.
    secrets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    (audited, secrets)
}

/// `value` as the policy read it through `ty`: records keep their declared fields only, path
/// and query strings become the numbers and booleans they were read as, and a `sensitive`
/// path (`payment.card`) is hashed, its texts kept in `secrets`.
fn project(
    value: &Value,
    ty: &AttrType,
    path: &str,
    sensitive: &std::collections::BTreeSet<String>,
    hash: &dyn Fn(&str) -> String,
    secrets: &mut Vec<String>,
) -> Value {
    if sensitive.contains(path) {
        let json = value.to_string();
        leaf_texts(value, secrets);
        let hashed = Value::String(hash(&json));
        secrets.push(json);
        return hashed;
    }
    match (ty, value) {
        (AttrType::Record(fields), Value::Object(map)) => Value::Object(
            map.iter()
                .filter_map(|(name, inner)| {
                    let (ty, _) = fields.get(name)?;
                    let path = format!("{path}.{name}");
                    Some((
                        name.clone(),
                        project(inner, ty, &path, sensitive, hash, secrets),
                    ))
                })
                .collect(),
        ),
        (AttrType::Set(item), Value::Array(items)) => items
            .iter()
            .map(|inner| project(inner, item, path, sensitive, hash, secrets))
            .collect(),
        // As the policy reads it (`coerce`): one value where a set is declared is a set of one.
        (AttrType::Set(item), single) => {
            Value::Array(vec![project(single, item, path, sensitive, hash, secrets)])
        }
        (AttrType::Long, Value::String(text)) => text
            .trim()
            .parse::<i64>()
            .map_or_else(|_| value.clone(), Into::into),
        (AttrType::Bool, Value::String(text)) if text == "true" || text == "false" => {
            Value::Bool(text == "true")
        }
        _ => value.clone(),
    }
}

/// Every way an error message may quote a sensitive value's parts: each text as given and as
/// Cedar escapes it, and each number as read (`" 042"` is 42 to Cedar).
fn leaf_texts(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(text) => {
            out.push(text.clone());
            out.push(format!("{text:?}"));
            if let Ok(n) = text.trim().parse::<i64>() {
                out.push(n.to_string());
            }
        }
        Value::Number(n) => out.push(n.to_string()),
        Value::Array(items) => items.iter().for_each(|item| leaf_texts(item, out)),
        Value::Object(map) => map.values().for_each(|item| leaf_texts(item, out)),
        Value::Bool(_) | Value::Null => {}
    }
}

/// `texts` replaced by `<sensitive>` in `messages`.
pub fn scrub(messages: &mut [String], texts: &[String]) {
    for message in messages {
        for text in texts {
            if message.contains(text.as_str()) {
                *message = message.replace(text.as_str(), "<sensitive>");
            }
        }
    }
}

/// Room for one record in the writer's queue, taken before the call it records goes anywhere:
/// a call whose line could not be written is refused rather than forwarded unrecorded. Held
/// (never read) until the line is written; dropping it gives the room back.
pub struct AuditSlot(#[allow(dead_code)] OwnedSemaphorePermit);

/// A record with the room it occupies; the room is given back once the line is written.
struct Queued {
    record: AuditRecord,
    _slot: AuditSlot,
}

/// What the writer thread is told, in order.
// Records are nearly every message: boxing them would add an allocation to every call.
#[allow(clippy::large_enum_variant)]
enum Message {
    Record(Queued),
    /// Reopen the file (after a rotation): on reload and SIGHUP.
    Reopen,
    /// Write out everything queued, then end.
    Stop,
}

/// Where the writer writes, and how it reopens it (after a rotation, or an error).
enum Target {
    Stdout,
    File(String),
}

impl Target {
    fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        })
    }
}

#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::UnboundedSender<Message>,
    /// `audit.buffer` slots: records queued or being written.
    room: Arc<Semaphore>,
    /// `audit.buffer`.
    capacity: usize,
    metrics: Arc<Metrics>,
    /// The last lines written, for the console (newest last).
    recent: Recent,
}

/// The last `RECENT` audit lines written, kept by the writer thread off the request path.
type Recent = Arc<std::sync::Mutex<std::collections::VecDeque<String>>>;

/// Audit lines the console can show.
const RECENT: usize = 500;

impl AuditSink {
    /// Starts the writer thread. `path` is a file to append to, or "-" for stdout.
    pub async fn start(
        path: &str,
        buffer: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(AuditSink, AuditWriter)> {
        let target = if path == "-" {
            Target::Stdout
        } else {
            Target::File(path.to_string())
        };
        let out = target.open()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (done, finished) = tokio::sync::oneshot::channel();
        let recent = Recent::default();
        let writer = Writer {
            target,
            out,
            metrics: metrics.clone(),
            recent: recent.clone(),
        };
        // Its own thread: plain blocking writes, so a write that returned has reached the
        // kernel (no runtime buffer to lose it in), and a slow disk never holds a worker.
        std::thread::Builder::new()
            .name("toolgate-audit".into())
            .spawn(move || {
                writer.run(rx);
                let _ = done.send(());
            })?;
        let room = Arc::new(Semaphore::new(buffer.max(1)));
        let sink = AuditSink {
            tx: tx.clone(),
            room: room.clone(),
            capacity: buffer.max(1),
            metrics,
            recent,
        };
        Ok((sink, AuditWriter { tx, room, finished }))
    }

    /// Room taken now: records queued for the writer, and calls in flight holding room for
    /// theirs.
    pub fn backlog(&self) -> usize {
        self.capacity - self.room.available_permits().min(self.capacity)
    }

    /// Takes room for one record, if the writer has any left.
    pub fn reserve(&self) -> Option<AuditSlot> {
        self.room.clone().try_acquire_owned().ok().map(AuditSlot)
    }

    /// Takes room for `n` records at once or none: a batch never holds part of the buffer
    /// while it waits for the rest.
    pub fn reserve_many(&self, n: usize) -> Option<Vec<AuditSlot>> {
        let mut all = self.room.clone().try_acquire_many_owned(n as u32).ok()?;
        let mut slots: Vec<AuditSlot> =
            (1..n).filter_map(|_| all.split(1)).map(AuditSlot).collect();
        slots.push(AuditSlot(all));
        Some(slots)
    }

    /// Queues a record in the room reserved for it (or any left). A record without room is
    /// dropped and counted: only records of calls that were not forwarded can lack it.
    pub fn record(&self, record: AuditRecord, slot: Option<AuditSlot>) {
        match slot.or_else(|| self.reserve()) {
            Some(slot) => {
                let queued = Message::Record(Queued {
                    record,
                    _slot: slot,
                });
                // Only after `finish`: a call that outlived the drain.
                if self.tx.send(queued).is_err() {
                    self.metrics.audit_dropped.inc();
                    tracing::error!("audit record after the writer finished: dropped");
                }
            }
            None => {
                self.metrics.audit_dropped.inc();
                tracing::warn!("audit writer is behind; record of an unforwarded call dropped");
            }
        }
    }

    /// The last audit lines written, newest first.
    pub fn recent(&self) -> Vec<serde_json::Value> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .rev()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Reopens the audit file (after a rotation): on reload and SIGHUP.
    pub fn reopen(&self) {
        let _ = self.tx.send(Message::Reopen);
    }
}

/// The writer thread, seen from the runtime.
pub struct AuditWriter {
    tx: mpsc::UnboundedSender<Message>,
    /// The sink's room, closed at `finish`: later calls are refused, not run unrecorded.
    room: Arc<Semaphore>,
    finished: tokio::sync::oneshot::Receiver<()>,
}

impl AuditWriter {
    /// Returns once every record queued so far is written (at shutdown, after the listeners
    /// drained, so no call's line is lost with the process), or after `grace` if the writer
    /// cannot write (a full disk), saying so.
    pub async fn finish(self, grace: Duration) {
        self.room.close();
        let _ = self.tx.send(Message::Stop);
        if tokio::time::timeout(grace, self.finished).await.is_err() {
            tracing::error!("audit writer could not write out its queue before exit");
        }
    }
}

struct Writer {
    target: Target,
    out: Box<dyn Write + Send>,
    metrics: Arc<Metrics>,
    recent: Recent,
}

/// Records written at once at most.
const BATCH: usize = 256;
/// How long the writer lets lines gather between writes.
const GATHER: Duration = Duration::from_millis(2);

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Message>) {
        let mut batch = Vec::with_capacity(BATCH);
        // Once stopped (the channel closed), what is left is still received, then `None`.
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Record(queued) => batch.push(queued),
                    Message::Reopen => {
                        self.write(&mut batch);
                        self.reopen();
                    }
                    Message::Stop => rx.close(),
                }
                if batch.len() < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            self.write(&mut batch);
            // Lines gather for a moment before the next write: one wake-up and one write per
            // batch instead of per call, so the writer does not keep preempting the workers
            // on a busy core. A line waits at most this long; its call already went on.
            std::thread::sleep(GATHER);
        }
    }

    /// Writes the batch, retrying (and reopening the file) until it is written: while it
    /// cannot be, the records keep their room, so new calls are refused, not unrecorded.
    fn write(&mut self, batch: &mut Vec<Queued>) {
        if batch.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(batch.len() * 512);
        let mut lines = Vec::with_capacity(batch.len());
        for queued in batch.iter() {
            let start = buf.len();
            if serde_json::to_writer(&mut buf, &queued.record).is_ok() {
                lines.push(String::from_utf8_lossy(&buf[start..]).into_owned());
                buf.push(b'\n');
            }
        }
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            for line in lines {
                if recent.len() == RECENT {
                    recent.pop_front();
                }
                recent.push_back(line);
            }
        }
        let mut delay = Duration::from_millis(100);
        // What was written stays written: a retry goes on from the start of the line that
        // failed, since the reopened file may be a new one (rotated): each line then reaches
        // one file whole, at the cost of a fragment left in the old one.
        let mut written = 0;
        loop {
            let result = match self.out.write(&buf[written..]) {
                Ok(0) if written < buf.len() => Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written += n;
                    if written < buf.len() {
                        continue;
                    }
                    self.out.flush()
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    self.metrics.audit_write_errors.inc();
                    tracing::error!(error = %e, "audit write failed; retrying, new calls are refused meanwhile");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                    self.reopen();
                    written = buf[..written]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |end| end + 1);
                }
            }
        }
        batch.clear();
    }

    fn reopen(&mut self) {
        match self.target.open() {
            Ok(out) => self.out = out,
            Err(e) => {
                self.metrics.audit_write_errors.inc();
                tracing::error!(error = %e, "audit file cannot be reopened");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_all_its_room_or_none() {
        let dir = std::env::temp_dir().join(format!("toolgate-audit-{}", std::process::id()));
        let path = dir.to_str().unwrap().to_string() + ".jsonl";
        let (sink, _writer) = AuditSink::start(&path, 3, Arc::new(Metrics::new()))
            .await
            .unwrap();
        let one = sink.reserve().unwrap();
        assert!(sink.reserve_many(3).is_none(), "took part of the room");
        let two = sink.reserve_many(2).unwrap();
        assert_eq!(two.len(), 2);
        assert!(sink.reserve().is_none());
        drop(two);
        assert_eq!(sink.reserve_many(2).map(|s| s.len()), Some(2));
        drop(one);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn audited_args_are_what_the_policy_read_with_sensitive_ones_hashed() {
        let mut declared = ActionContext::default();
        let mut payment = toolgate_policy::Record::new();
        payment.insert("card".into(), (AttrType::String, true));
        payment.insert("amount".into(), (AttrType::Long, true));
        declared.args.insert("id".into(), (AttrType::Long, true));
        declared.args.insert("flag".into(), (AttrType::Bool, false));
        declared.args.insert("ssn".into(), (AttrType::String, true));
        declared
            .args
            .insert("note".into(), (AttrType::String, false));
        declared
            .args
            .insert("payment".into(), (AttrType::Record(payment), true));
        declared.sensitive.insert("ssn".into());
        declared.sensitive.insert("payment.card".into());
        let args = serde_json::json!({"id": "42", "flag": "true", "ssn": "123-45-6789",
            "note": "x".repeat(2000), "undeclared": 1,
            "payment": {"card": "4111111111111111", "amount": 5, "cvv": "999"}});
        let hash = |text: &str| format!("hmac:{}", text.len());
        let (audited, secrets) = audited_args(args.as_object().unwrap(), &declared, &hash);
        assert_eq!(audited["id"], 42);
        assert_eq!(audited["flag"], true);
        assert_eq!(audited["ssn"], "hmac:13");
        assert_eq!(
            audited["payment"],
            serde_json::json!({"card": "hmac:18", "amount": 5})
        );
        assert!(audited["note"].as_str().unwrap().starts_with("hmac:"));
        assert!(!audited.contains_key("undeclared"));
        let text = serde_json::to_string(&audited).unwrap();
        for secret in ["6789", "4111", "999"] {
            assert!(!text.contains(secret), "{text}");
        }
        // Errors that quote a sensitive value lose it.
        let mut errors = vec![
            "bad value \"4111111111111111\" at payment.card".to_string(),
            "overflow adding `4111111111111111` and 1".to_string(),
        ];
        scrub(&mut errors, &secrets);
        assert_eq!(
            errors,
            [
                "bad value <sensitive> at payment.card",
                "overflow adding `<sensitive>` and 1"
            ]
        );
        // One object where a set of records is declared is read as a set of one: projected
        // so, its sensitive field hashed and its undeclared one left out.
        let mut card = toolgate_policy::Record::new();
        card.insert("number".into(), (AttrType::String, true));
        declared.args.insert(
            "cards".into(),
            (AttrType::Set(Box::new(AttrType::Record(card))), true),
        );
        declared.sensitive.insert("cards.number".into());
        let single = serde_json::json!({"cards": {"number": "4111111111111111", "x": "y"}});
        let (audited, _) = audited_args(single.as_object().unwrap(), &declared, &hash);
        assert_eq!(audited["cards"], serde_json::json!([{"number": "hmac:18"}]));
    }
}
