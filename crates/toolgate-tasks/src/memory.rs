//! Tasks in this process: the embedded default. A restart forgets them, so old task ids are
//! unknown afterwards, and unknown means denied.

use std::collections::HashSet;

use dashmap::DashMap;
use tokio::sync::broadcast;

use crate::{Approval, Ended, Revocation, State, Task};

pub struct MemoryStore {
    tasks: DashMap<String, (Task, HashSet<String>)>,
    pub(crate) events: broadcast::Sender<Revocation>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            tasks: DashMap::new(),
            events: broadcast::channel(1024).0,
        }
    }
}

impl MemoryStore {
    pub fn create(&self, task: &Task) {
        self.forget_old(task.created_at);
        self.tasks
            .insert(task.id.clone(), (task.clone(), HashSet::new()));
    }

    pub fn get(&self, id: &str) -> Option<Task> {
        self.tasks.get(id).map(|e| e.0.clone())
    }

    pub fn end(&self, id: &str, state: State, now: u64) -> Ended {
        let Some(mut entry) = self.tasks.get_mut(id) else {
            return Ended::Unknown;
        };
        let (task, jtis) = &mut *entry;
        if !task.is_live(now) {
            return Ended::Already(task.clone());
        }
        task.state = state;
        task.ended_at = Some(now);
        let revocation = Revocation {
            task_id: id.to_string(),
            agents: task.audience(),
            state,
            jtis: jtis.iter().cloned().collect(),
            at: now,
        };
        let _ = self.events.send(revocation.clone());
        Ended::Now(task.clone(), revocation)
    }

    /// Under the entry's lock, so `end` sees the credential or this sees the end.
    pub fn add_credential(&self, id: &str, jti: &str, now: u64) -> bool {
        let Some(mut entry) = self.tasks.get_mut(id) else {
            return false;
        };
        if !entry.0.is_live(now) {
            return false;
        }
        entry.1.insert(jti.to_string());
        true
    }

    pub fn has_credential(&self, id: &str, jti: &str) -> bool {
        self.tasks.get(id).is_some_and(|e| e.1.contains(jti))
    }

    pub fn approve(&self, id: &str, approval: Approval) -> Option<Task> {
        let mut entry = self.tasks.get_mut(id)?;
        entry.0.approvals.push(approval);
        Some(entry.0.clone())
    }

    /// Drops tasks past their deadline by more than the retention time.
    fn forget_old(&self, now: u64) {
        self.tasks
            .retain(|_, (t, _)| t.expires_at + crate::RETENTION_SECONDS > now);
    }
}
