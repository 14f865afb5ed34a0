//! The audit log: one JSON object per line per decision. Records go through a bounded
//! channel to a writer task, so the request path never waits on the disk.

use std::sync::Arc;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

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
    pub decision: Verdict,
    pub policies: Vec<String>,
    pub errors: Vec<String>,
    pub task_id: Option<String>,
    /// The human approval the decision relied on, if the call ran in an approved task.
    pub approval: Option<toolgate_tasks::Approval>,
    pub jti: Option<String>,
    pub upstream_status: Option<u16>,
    pub eval_us: Option<u64>,
    pub source_ip: String,
    pub method: String,
    pub path: String,
    /// The status the agent received.
    pub status: u16,
}

impl AuditRecord {
    /// The record of a request: a fresh decision id, denied until a decision says otherwise.
    pub fn begin<B>(request: &http::Request<B>) -> Self {
        AuditRecord {
            decision_id: uuid::Uuid::now_v7().to_string(),
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            method: request.method().to_string(),
            path: request.uri().path().to_string(),
            ..AuditRecord::default()
        }
    }
}

#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditRecord>,
    metrics: Arc<Metrics>,
}

impl AuditSink {
    /// Starts the writer task. `path` is a file to append to, or "-" for stdout.
    pub async fn start(
        path: &str,
        buffer: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(AuditSink, AuditWriter)> {
        let out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = if path == "-" {
            Box::new(tokio::io::stdout())
        } else {
            Box::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await?,
            )
        };
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(write_loop(rx, out, stopped));
        Ok((AuditSink { tx, metrics }, AuditWriter { handle, stop }))
    }

    /// Queues a record; when the writer is behind, drops it and counts the drop.
    pub fn record(&self, record: AuditRecord) {
        if self.tx.try_send(record).is_err() {
            self.metrics.audit_dropped.inc();
            tracing::warn!("audit writer is behind; record dropped");
        }
    }
}

/// The writer task. It runs until `finish`, which writes out everything queued before it.
pub struct AuditWriter {
    handle: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl AuditWriter {
    /// Stops taking records and returns once every record queued so far is written: at
    /// shutdown, after the listeners drained, so no call's line is lost with the process.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.handle.await;
    }
}

async fn write_loop(
    mut rx: mpsc::Receiver<AuditRecord>,
    mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut batch = Vec::with_capacity(64);
    let mut buf = Vec::with_capacity(64 << 10);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return;
                }
                write_batch(&mut batch, &mut buf, &mut out).await;
            }
            _ = &mut stop => {
                rx.close();
                while rx.recv_many(&mut batch, 256).await > 0 {
                    write_batch(&mut batch, &mut buf, &mut out).await;
                }
                return;
            }
        }
    }
}

async fn write_batch(
    batch: &mut Vec<AuditRecord>,
    buf: &mut Vec<u8>,
    out: &mut Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
) {
    buf.clear();
    for record in batch.drain(..) {
        if serde_json::to_writer(&mut *buf, &record).is_ok() {
            buf.push(b'\n');
        }
    }
    if let Err(e) = out.write_all(buf).await.and(out.flush().await) {
        tracing::error!(error = %e, "audit write failed");
    }
}
