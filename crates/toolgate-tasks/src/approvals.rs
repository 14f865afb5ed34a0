//! Approvals bound to one call: a policy's `@approval` forbid asked a person about exactly
//! this agent, user, action and arguments (by digest). Pending until a person decides; once
//! approved, the same call may run as many times as allowed (once by default), each use taken
//! atomically, whichever replica serves it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// One call a policy asked a person about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallApproval {
    pub id: String,
    pub agent: String,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub task: Option<String>,
    pub action: String,
    /// SHA-256 of the canonical typed arguments (those the policy read and the call forwards).
    pub digest: String,
    /// The arguments as the agent sent them (shown to operators; the audit keeps `@sensitive`
    /// ones hashed).
    pub args: Value,
    /// The asking policies' `@approval` text.
    pub reason: String,
    /// The asking policies, by id and version: the approval lifts only these.
    pub policies: Vec<(String, String)>,
    pub created_at: u64,
    pub expires_at: u64,
    pub status: Status,
    #[serde(default)]
    pub decided_by: Option<String>,
    #[serde(default)]
    pub decided_at: Option<u64>,
    #[serde(default)]
    pub note: Option<String>,
    /// Calls the approval still lets through.
    #[serde(default)]
    pub uses_left: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    /// Approved, and every use taken.
    Used,
}

impl CallApproval {
    /// What identifies the call: agent, user, action and argument digest.
    pub fn key(&self) -> String {
        let task = self.task.as_deref();
        call_key(
            &self.agent,
            self.user.as_deref(),
            task,
            &self.action,
            &self.digest,
        )
    }

    /// `pending`, `approved`, `denied`, `used` or `expired`.
    pub fn state(&self, now: u64) -> &'static str {
        match self.status {
            Status::Pending | Status::Approved if now >= self.expires_at => "expired",
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::Used => "used",
        }
    }

    pub fn usable(&self, now: u64) -> bool {
        self.status == Status::Approved && self.uses_left > 0 && now < self.expires_at
    }

    pub fn pending(&self, now: u64) -> bool {
        self.status == Status::Pending && now < self.expires_at
    }
}

/// The key of one call: a digest of who, in which task, what and the argument digest, with no
/// two different calls writing the same text.
pub fn call_key(
    agent: &str,
    user: Option<&str>,
    task: Option<&str>,
    action: &str,
    digest: &str,
) -> String {
    let text = serde_json::json!([agent, user, task, action, digest]).to_string();
    hex(&Sha256::digest(text.as_bytes()))
}

/// The digest of canonical arguments: their JSON with object keys sorted.
pub fn args_digest(args: &serde_json::Map<String, Value>) -> String {
    let canonical = sorted(&Value::Object(args.clone()));
    hex(&Sha256::digest(canonical.to_string().as_bytes()))
}

fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = serde_json::Map::new();
            for key in keys {
                out.insert(key.clone(), sorted(&map[key]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The outcome of asking for an approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// A new pending approval.
    New(String),
    /// The same call is already pending: its id (a retry loop cannot fill the bound).
    Pending(String),
    /// The agent (or the store) holds its most pending approvals.
    AtLimit,
}

/// A person's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub approve: bool,
    pub by: String,
    pub note: Option<String>,
    pub uses: u32,
    pub at: u64,
}

impl Decided {
    /// The approval as decided (it must be pending and unexpired).
    pub fn apply(&self, approval: &mut CallApproval) {
        approval.status = if self.approve {
            Status::Approved
        } else {
            Status::Denied
        };
        approval.decided_by = Some(self.by.clone());
        approval.decided_at = Some(self.at);
        approval.note = self.note.clone();
        approval.uses_left = if self.approve { self.uses.max(1) } else { 0 };
    }
}

/// Pending approvals one agent may have, and the store in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalBounds {
    pub per_agent: usize,
    pub total: usize,
}

impl Default for ApprovalBounds {
    fn default() -> Self {
        ApprovalBounds {
            per_agent: 20,
            total: 10_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_the_arguments_in_any_key_order_and_changes_with_any_value() {
        let a: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"amount": 900, "to": {"iban": "X", "name": "bob"}}"#).unwrap();
        let b: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"to": {"name": "bob", "iban": "X"}, "amount": 900}"#).unwrap();
        let c: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"to": {"name": "bob", "iban": "X"}, "amount": 901}"#).unwrap();
        assert_eq!(args_digest(&a), args_digest(&b));
        assert_ne!(args_digest(&a), args_digest(&c));
        assert_ne!(
            call_key("a", Some("u"), None, "x/y", "d"),
            call_key("a", None, None, "x/y", "d")
        );
    }
}

/// Approvals in this process (the `memory` store).
#[derive(Default)]
pub struct MemoryApprovals {
    inner: std::sync::Mutex<Held>,
}

#[derive(Default)]
struct Held {
    by_id: std::collections::HashMap<String, CallApproval>,
    by_call: std::collections::HashMap<String, String>,
}

impl Held {
    /// Forgets what expired a day ago (kept that long for the console and `audit why`).
    fn sweep(&mut self, now: u64) {
        let gone = |a: &CallApproval| now >= a.expires_at + crate::RETENTION_SECONDS;
        self.by_id.retain(|_, a| !gone(a));
        let by_id = &self.by_id;
        self.by_call.retain(|_, id| by_id.contains_key(id));
    }
}

impl MemoryApprovals {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn ask(&self, approval: CallApproval, bounds: ApprovalBounds, now: u64) -> Asked {
        let mut held = self.held();
        held.sweep(now);
        let key = approval.key();
        if let Some(existing) = held.by_call.get(&key).and_then(|id| held.by_id.get(id)) {
            if existing.pending(now) {
                return Asked::Pending(existing.id.clone());
            }
        }
        let pending = |a: &&CallApproval| a.pending(now);
        let of_agent = held
            .by_id
            .values()
            .filter(pending)
            .filter(|a| a.agent == approval.agent)
            .count();
        let all = held.by_id.values().filter(pending).count();
        if of_agent >= bounds.per_agent || all >= bounds.total {
            return Asked::AtLimit;
        }
        let id = approval.id.clone();
        held.by_call.insert(key, id.clone());
        held.by_id.insert(id.clone(), approval);
        Asked::New(id)
    }

    pub fn get(&self, id: &str) -> Option<CallApproval> {
        self.held().by_id.get(id).cloned()
    }

    /// The approval of this call (approved or not), by its key.
    pub fn of_call(&self, key: &str) -> Option<CallApproval> {
        let held = self.held();
        held.by_call
            .get(key)
            .and_then(|id| held.by_id.get(id))
            .cloned()
    }

    pub fn decide(&self, id: &str, decided: &Decided) -> Option<CallApproval> {
        let mut held = self.held();
        let approval = held.by_id.get_mut(id)?;
        if !approval.pending(decided.at) {
            return None;
        }
        decided.apply(approval);
        Some(approval.clone())
    }

    /// Takes one use: true when the approval was usable (and now has one use fewer).
    pub fn consume(&self, id: &str, now: u64) -> bool {
        let mut held = self.held();
        let Some(approval) = held.by_id.get_mut(id) else {
            return false;
        };
        if !approval.usable(now) {
            return false;
        }
        approval.uses_left -= 1;
        if approval.uses_left == 0 {
            approval.status = Status::Used;
        }
        true
    }

    /// Every approval still remembered, newest first.
    pub fn all(&self, now: u64) -> Vec<CallApproval> {
        let mut held = self.held();
        held.sweep(now);
        let mut all: Vec<CallApproval> = held.by_id.values().cloned().collect();
        all.sort_by_key(|a| std::cmp::Reverse(a.created_at));
        all
    }
}
