//! OpenTelemetry traces (`traces:` in the config; off when absent): each request is a span and
//! each pipeline step a child span, sent in batches to a collector over OTLP/HTTP with the JSON
//! encoding. The request only pushes its finished spans on a bounded queue; a background task
//! batches and posts them, and a full queue or a failed post drops spans (counted), never
//! slows a call.
//!
//! Written here rather than with the opentelemetry SDK: its batch processor exports from a
//! thread of its own, outside the tokio runtime our hyper client needs, and what toolgate
//! needs is small: W3C trace context, span records, one JSON POST per batch.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::answer::full;
use crate::audit::AuditRecord;
use crate::config::Traces;
use crate::metrics::Metrics;
use crate::upstream::HttpClient;

/// The W3C trace context header (https://www.w3.org/TR/trace-context/).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Finished requests whose spans wait for the exporter; past this, spans are dropped.
const QUEUE: usize = 4096;
/// Spans per export request, and the longest a span waits for its batch to fill.
const MAX_BATCH: usize = 1024;
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest text attribute (OpenTelemetry's attribute value length limit).
const MAX_ATTRIBUTE_BYTES: usize = 256;
/// What is read of a collector's answer (to keep the connection) before it is dropped.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A parsed `traceparent`: the caller's trace, its span, and whether it records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// Reads a `traceparent` value as the W3C spec says: version 00 exactly, a later version
    /// by its first four fields; lowercase hex; ids not all zero. Anything else is `None`
    /// (the trace then starts here).
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let field = |range: std::ops::Range<usize>| -> Option<&str> {
            let bytes = value.get(range)?;
            bytes
                .iter()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                .then(|| std::str::from_utf8(bytes).ok())?
        };
        let version = field(0..2)?;
        let fits = match version {
            "ff" => false,
            "00" => value.len() == 55,
            _ => value.len() == 55 || value.get(55) == Some(&b'-'),
        };
        if !fits || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let trace_id = u128::from_str_radix(field(3..35)?, 16).ok()?;
        let span_id = u64::from_str_radix(field(36..52)?, 16).ok()?;
        let flags = u8::from_str_radix(field(53..55)?, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The header naming `span_id` of this trace as the parent, recorded.
    fn header(trace_id: u128, span_id: u64) -> HeaderValue {
        let text = format!("00-{trace_id:032x}-{span_id:016x}-01");
        HeaderValue::from_str(&text).expect("hex and dashes")
    }
}

fn new_span_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// One request's trace while it runs; travels in its audit record. A clone (an MCP batch's
/// line for one more message) belongs to the same trace and hangs its steps from the
/// request's span, but does not repeat that span.
#[derive(Debug, Default)]
pub struct TraceSlot(Option<Box<CallTrace>>);

#[derive(Debug)]
struct CallTrace {
    trace_id: u128,
    /// The request's span: the parent of every step.
    request_span: u64,
    /// Set on the line that owns the request's span: the caller's span it continues, if any.
    owner: Option<Option<u64>>,
    /// Whether a valid `traceparent` came (the trace is the caller's).
    continued: bool,
    started: Instant,
    started_unix_nanos: u64,
    steps: Vec<Step>,
}

#[derive(Debug)]
struct Step {
    name: &'static str,
    span_id: u64,
    start: Instant,
    end: Instant,
    attributes: Vec<KeyValue>,
}

impl Clone for TraceSlot {
    fn clone(&self) -> Self {
        TraceSlot(self.0.as_ref().map(|trace| {
            Box::new(CallTrace {
                owner: None,
                steps: Vec::new(),
                ..**trace
            })
        }))
    }
}

impl TraceSlot {
    /// Records a step of the pipeline that began at `start` and ends now.
    pub fn step(&mut self, name: &'static str, start: Instant) {
        self.step_as(name, self.span_id(), start);
    }

    /// A fresh span id for a step that must be named before it ends (the forward step, named
    /// upstream in `traceparent`); `None` when the request is not traced.
    pub fn span_id(&self) -> Option<u64> {
        self.0.as_ref().map(|_| new_span_id())
    }

    /// The `traceparent` that makes `span_id` the parent of what the upstream does.
    pub fn traceparent(&self, span_id: u64) -> Option<HeaderValue> {
        let trace = self.0.as_ref()?;
        Some(TraceParent::header(trace.trace_id, span_id))
    }

    /// Records a step under the id given out by `span_id`.
    pub fn step_as(&mut self, name: &'static str, span_id: Option<u64>, start: Instant) {
        self.push(name, span_id, start, Vec::new());
    }

    fn push(
        &mut self,
        name: &'static str,
        span_id: Option<u64>,
        start: Instant,
        attributes: Vec<KeyValue>,
    ) {
        if let (Some(trace), Some(span_id)) = (self.0.as_mut(), span_id) {
            trace.steps.push(Step {
                name,
                span_id,
                start,
                end: Instant::now(),
                attributes,
            });
        }
    }

    /// Whether the trace started here (no valid `traceparent` came): the caller's
    /// `tracestate` then belongs to no trace the upstream will see, and is not passed on.
    pub fn restarted(&self) -> bool {
        self.0.as_ref().is_some_and(|t| !t.continued)
    }

    pub fn take(&mut self) -> TraceSlot {
        TraceSlot(self.0.take())
    }

    pub fn is_traced(&self) -> bool {
        self.0.is_some()
    }
}

impl AuditRecord {
    /// Records the authorize step with the decision it made (a later step can still turn an
    /// allow into a deny: the request span has the final word).
    pub fn trace_decision(&mut self, start: Instant) {
        if self.trace.is_traced() {
            let attributes = decision_attributes(self);
            let span_id = self.trace.span_id();
            self.trace.push("authorize", span_id, start, attributes);
        }
    }
}

/// What the spans of a request say about it, read from its audit line.
pub struct Outcome {
    decision: Vec<KeyValue>,
    agent: Option<String>,
    task_id: Option<String>,
    credential_mode: Option<&'static str>,
    upstream_status: Option<u16>,
    method: String,
    status: u16,
}

impl Outcome {
    pub fn of(record: &AuditRecord) -> Outcome {
        Outcome {
            decision: decision_attributes(record),
            agent: record.agent.clone(),
            task_id: record.task_id.clone(),
            credential_mode: record.credential_mode,
            upstream_status: record.upstream_status,
            method: record.method.clone(),
            status: record.status,
        }
    }
}

/// `decision_id`, `decision` and `action` as the record has them now.
fn decision_attributes(record: &AuditRecord) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::string("decision_id", &record.decision_id),
        KeyValue::string("decision", record.decision.as_str()),
    ];
    if let Some(action) = &record.action {
        attributes.push(KeyValue::string("action", action));
    }
    attributes
}

/// An OTLP span in the JSON encoding (ids in hex, times as decimal strings, enums as numbers).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Span {
    trace_id: String,
    span_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    parent_span_id: String,
    name: &'static str,
    kind: u8,
    start_time_unix_nano: String,
    end_time_unix_nano: String,
    attributes: Vec<KeyValue>,
    status: Status,
}

const KIND_INTERNAL: u8 = 1;
const KIND_SERVER: u8 = 2;
const KIND_CLIENT: u8 = 3;

#[derive(Debug, Serialize)]
struct Status {
    /// 0 unset, 2 error.
    code: u8,
}

#[derive(Debug, Clone, Serialize)]
struct KeyValue {
    key: &'static str,
    value: AnyValue,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
enum AnyValue {
    StringValue(String),
    /// int64 is a decimal string in OTLP's JSON.
    IntValue(String),
}

impl KeyValue {
    /// A text attribute, cut to `MAX_ATTRIBUTE_BYTES`: an agent's words (an MCP method or
    /// tool name) must not make spans, and the queue holding them, large.
    fn string(key: &'static str, value: &str) -> KeyValue {
        let mut end = value.len().min(MAX_ATTRIBUTE_BYTES);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        KeyValue {
            key,
            value: AnyValue::StringValue(value[..end].to_string()),
        }
    }

    fn int(key: &'static str, value: impl Into<i64>) -> KeyValue {
        KeyValue {
            key,
            value: AnyValue::IntValue(value.into().to_string()),
        }
    }
}

impl CallTrace {
    fn unix_nanos(&self, at: Instant) -> String {
        let since = at.saturating_duration_since(self.started).as_nanos() as u64;
        (self.started_unix_nanos + since).to_string()
    }

    /// The spans of the finished request (or batch line), ending now.
    fn into_spans(mut self, outcome: &Outcome) -> Vec<Span> {
        let trace_id = format!("{:032x}", self.trace_id);
        let request_span = format!("{:016x}", self.request_span);
        let mut spans = Vec::with_capacity(self.steps.len() + 1);
        for step in std::mem::take(&mut self.steps) {
            let mut attributes = step.attributes;
            let failed = step_outcome(step.name, outcome, &mut attributes);
            spans.push(Span {
                trace_id: trace_id.clone(),
                span_id: format!("{:016x}", step.span_id),
                parent_span_id: request_span.clone(),
                name: step.name,
                kind: if step.name == "forward" {
                    KIND_CLIENT
                } else {
                    KIND_INTERNAL
                },
                start_time_unix_nano: self.unix_nanos(step.start),
                end_time_unix_nano: self.unix_nanos(step.end),
                attributes,
                status: Status {
                    code: if failed { 2 } else { 0 },
                },
            });
        }
        if let Some(caller_span) = self.owner {
            let mut attributes = outcome.decision.clone();
            // Not the path: it can hold argument values (a patient id); `action` names it.
            attributes.extend([
                KeyValue::string("http.request.method", &outcome.method),
                KeyValue::int("http.response.status_code", outcome.status),
            ]);
            if let Some(agent) = &outcome.agent {
                attributes.push(KeyValue::string("agent", agent));
            }
            if let Some(task) = &outcome.task_id {
                attributes.push(KeyValue::string("task_id", task));
            }
            spans.push(Span {
                trace_id,
                span_id: request_span,
                parent_span_id: caller_span.map_or_else(String::new, |id| format!("{id:016x}")),
                name: "request",
                kind: KIND_SERVER,
                start_time_unix_nano: self.unix_nanos(self.started),
                end_time_unix_nano: self.unix_nanos(Instant::now()),
                attributes,
                status: Status {
                    code: if outcome.status >= 500 { 2 } else { 0 },
                },
            });
        }
        spans
    }
}

enum Export {
    Spans(Vec<Span>),
    Flush(oneshot::Sender<()>),
}

/// Starts traces and sends finished ones to the collector.
pub struct Tracer {
    sample_ratio: f64,
    queue: mpsc::Sender<Export>,
    metrics: std::sync::Arc<Metrics>,
}

impl Tracer {
    /// Starts the exporter task (on the current tokio runtime).
    pub fn start(
        config: &Traces,
        client: HttpClient,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Tracer, String> {
        let uri = config.export_uri()?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("traces.headers: `{name}`: {e}"))?;
            let mut value =
                HeaderValue::from_str(value).map_err(|e| format!("traces.headers: {name}: {e}"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let exporter = Exporter {
            client,
            uri,
            headers,
            resource: serde_json::json!({
                "attributes": [
                    {"key": "service.name", "value": {"stringValue": config.service_name}},
                    {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
                ]
            }),
            metrics: metrics.clone(),
        };
        let (queue, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(exporter.run(receiver));
        Ok(Tracer {
            sample_ratio: config.sample_ratio,
            queue,
            metrics,
        })
    }

    /// The trace of a request arriving with `headers`: continues the caller's trace and
    /// follows its sampling choice, else starts one, recorded at `sample_ratio`.
    pub fn begin(&self, headers: &HeaderMap) -> TraceSlot {
        // Two `traceparent` headers name no one parent: the trace starts here.
        let mut given = headers.get_all(TRACEPARENT).iter();
        let parent = match (given.next(), given.next()) {
            (Some(value), None) => TraceParent::parse(value.as_bytes()),
            _ => None,
        };
        let (trace_id, sampled) = match parent {
            Some(parent) => (parent.trace_id, parent.sampled),
            None => {
                let id = loop {
                    let id = rand::random::<u128>();
                    if id != 0 {
                        break id;
                    }
                };
                // The id's low half is random: its share of the range is the sampling draw.
                let draw = (id as u64) as f64 / u64::MAX as f64;
                (id, self.sample_ratio >= 1.0 || draw < self.sample_ratio)
            }
        };
        if !sampled {
            return TraceSlot::default();
        }
        let started_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        TraceSlot(Some(Box::new(CallTrace {
            trace_id,
            request_span: new_span_id(),
            owner: Some(parent.map(|p| p.span_id)),
            continued: parent.is_some(),
            started: Instant::now(),
            started_unix_nanos,
            steps: Vec::with_capacity(8),
        })))
    }

    /// Queues a finished request's spans; dropped (counted) when the exporter is behind.
    pub fn finish(&self, trace: TraceSlot, outcome: &Outcome) {
        let Some(trace) = trace.0 else { return };
        let spans = trace.into_spans(outcome);
        let count = spans.len() as u64;
        if self.queue.try_send(Export::Spans(spans)).is_err() {
            self.metrics.trace_spans_dropped.inc_by(count);
        }
    }

    /// Sends what is queued; waits at most `limit` in all.
    pub async fn flush(&self, limit: Duration) {
        let (done, finished) = oneshot::channel();
        let _ = tokio::time::timeout(limit, async {
            if self.queue.send(Export::Flush(done)).await.is_ok() {
                let _ = finished.await;
            }
        })
        .await;
    }
}

struct Exporter {
    client: HttpClient,
    uri: Uri,
    headers: HeaderMap,
    resource: serde_json::Value,
    metrics: std::sync::Arc<Metrics>,
}

impl Exporter {
    async fn run(self, mut queue: mpsc::Receiver<Export>) {
        let mut batch = Vec::new();
        while let Some(first) = queue.recv().await {
            let mut flushed = None;
            match first {
                Export::Spans(spans) => batch.extend(spans),
                Export::Flush(done) => flushed = Some(done),
            }
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while flushed.is_none() && batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, queue.recv()).await {
                    Ok(Some(Export::Spans(spans))) => batch.extend(spans),
                    Ok(Some(Export::Flush(done))) => flushed = Some(done),
                    Ok(None) | Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.send(std::mem::take(&mut batch)).await;
            }
            if let Some(done) = flushed {
                let _ = done.send(());
            }
        }
    }

    async fn send(&self, spans: Vec<Span>) {
        let count = spans.len() as u64;
        let body = serde_json::json!({
            "resourceSpans": [{
                "resource": self.resource,
                "scopeSpans": [{
                    "scope": {"name": "toolgate", "version": env!("CARGO_PKG_VERSION")},
                    "spans": spans,
                }],
            }],
        });
        let mut request = Request::new(full(body.to_string()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        let outcome = tokio::time::timeout(EXPORT_TIMEOUT, self.client.request(request)).await;
        let failure = match outcome {
            Err(_) => Some("timed out".to_string()),
            Ok(Err(e)) => Some(crate::answer::error_chain(&e)),
            Ok(Ok(response)) => {
                let status = response.status();
                // Read (bounded) to its end, so the connection goes back to the pool.
                let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES);
                let _ = tokio::time::timeout(EXPORT_TIMEOUT, body.collect()).await;
                (!status.is_success()).then(|| format!("answered {status}"))
            }
        };
        match failure {
            None => self.metrics.trace_spans_exported.inc_by(count),
            Some(why) => {
                self.metrics.trace_spans_dropped.inc_by(count);
                // The host only: a URL's user info would be a secret.
                let collector = self.uri.host().unwrap_or_default();
                tracing::warn!(collector, "trace export of {count} spans failed: {why}");
            }
        }
    }
}

/// What the outcome adds to a step's span, and whether the step failed: the credential's mode,
/// and for the forward step the upstream's status (a client span fails on any error answer).
fn step_outcome(name: &str, outcome: &Outcome, attributes: &mut Vec<KeyValue>) -> bool {
    match name {
        "credential" => {
            if let Some(mode) = outcome.credential_mode {
                attributes.push(KeyValue::string("credential_mode", mode));
            }
            false
        }
        "forward" => match outcome.upstream_status {
            Some(status) => {
                attributes.push(KeyValue::int("http.response.status_code", status));
                status >= 400
            }
            None => true,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_read_as_the_spec_says() {
        let parent = TraceParent::parse(VALID.as_bytes()).expect("valid");
        assert_eq!(parent.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parent.span_id, 0x00f067aa0ba902b7);
        assert!(parent.sampled);
        let unsampled = VALID.replace("-01", "-00");
        assert!(!TraceParent::parse(unsampled.as_bytes()).unwrap().sampled);
        // A later version may append fields after a dash.
        let later = VALID.replacen("00-", "cc-", 1) + "-what-comes-next";
        assert!(TraceParent::parse(later.as_bytes()).is_some());
        for bad in [
            VALID.to_uppercase(),
            VALID.replacen("00-", "ff-", 1),
            format!("{VALID}-extra"),
            VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            VALID.replace("00f067aa0ba902b7", &"0".repeat(16)),
            VALID.replace('-', "_"),
            VALID[..54].to_string(),
            VALID.replacen("00-", "cc-", 1) + "x",
            String::new(),
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad}");
        }
        let header = TraceParent::header(parent.trace_id, parent.span_id);
        assert_eq!(header.to_str().unwrap(), VALID);
    }

    #[test]
    fn text_attributes_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ATTRIBUTE_BYTES);
        let AnyValue::StringValue(cut) = KeyValue::string("action", &long).value else {
            panic!("a string")
        };
        assert_eq!(cut.len(), MAX_ATTRIBUTE_BYTES);
        let odd = format!("x{long}");
        let AnyValue::StringValue(cut) = KeyValue::string("action", &odd).value else {
            panic!("a string")
        };
        assert_eq!(cut.len(), MAX_ATTRIBUTE_BYTES - 1, "never half a character");
    }

    #[test]
    fn a_batch_line_hangs_its_steps_from_the_request_span() {
        let started = Instant::now();
        let mut slot = TraceSlot(Some(Box::new(CallTrace {
            trace_id: 7,
            request_span: 9,
            owner: Some(None),
            continued: false,
            started,
            started_unix_nanos: 1_000,
            steps: Vec::new(),
        })));
        slot.step("authenticate", started);
        let mut line = slot.clone();
        line.step("authorize", started);
        let outcome = Outcome::of(&AuditRecord::default());
        let line_spans = line.0.unwrap().into_spans(&outcome);
        assert_eq!(line_spans.len(), 1, "no second request span");
        assert_eq!(line_spans[0].parent_span_id, format!("{:016x}", 9));
        let spans = slot.0.unwrap().into_spans(&outcome);
        let names: Vec<_> = spans.iter().map(|s| s.name).collect();
        assert_eq!(names, ["authenticate", "request"]);
        assert_eq!(spans[1].parent_span_id, "", "a new trace has no parent");
    }
}
