//! Tasks in this process: the embedded default. A restart forgets them, so old task ids are
//! unknown afterwards, and unknown means denied.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use tokio::sync::broadcast;

use crate::{Approval, Bounds, Created, Ended, Joined, Revocation, State, Task};

/// How often, at most, tasks past their retention are swept (not on every create).
const SWEEP_SECONDS: u64 = 60;

pub struct MemoryStore {
    tasks: DashMap<String, (Task, HashSet<String>)>,
    /// Each agent's live tasks: id and deadline.
    live_by_agent: DashMap<String, Vec<(String, u64)>>,
    bounds: Bounds,
    last_sweep: AtomicU64,
    pub(crate) events: broadcast::Sender<Revocation>,
    pub(crate) approvals: crate::approvals::MemoryApprovals,
    pub(crate) counters: crate::usage::MemoryCounters,
}

impl MemoryStore {
    pub fn new(bounds: Bounds) -> Self {
        MemoryStore {
            tasks: DashMap::new(),
            live_by_agent: DashMap::new(),
            bounds,
            last_sweep: AtomicU64::new(0),
            events: broadcast::channel(1024).0,
            approvals: Default::default(),
            counters: Default::default(),
        }
    }

    pub fn create(&self, task: &Task) -> Created {
        let now = task.created_at;
        self.sweep(now, false);
        if self.tasks.len() >= self.bounds.total {
            self.sweep(now, true);
            if self.tasks.len() >= self.bounds.total {
                return Created::Full;
            }
        }
        // Counted and added under the agent's entry lock: two creates cannot both take the
        // last place.
        let mut live = self.live_by_agent.entry(task.agent.clone()).or_default();
        live.retain(|(_, expires)| *expires > now);
        if live.len() >= self.bounds.per_agent {
            return Created::AgentAtLimit;
        }
        live.push((task.id.clone(), task.expires_at));
        self.tasks
            .insert(task.id.clone(), (task.clone(), HashSet::new()));
        Created::Yes
    }

    /// The most recently started tasks, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Task> {
        let mut all: Vec<Task> = self.tasks.iter().map(|e| e.0.clone()).collect();
        all.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        all.truncate(limit);
        all
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
        if let Some(mut live) = self.live_by_agent.get_mut(&task.agent) {
            live.retain(|(live_id, _)| live_id != id);
        }
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
    pub fn add_credential(&self, id: &str, jti: &str, now: u64) -> Joined {
        let Some(mut entry) = self.tasks.get_mut(id) else {
            return Joined::Ended;
        };
        if !entry.0.is_live(now) {
            return Joined::Ended;
        }
        if entry.1.len() >= self.bounds.credentials_per_task {
            return Joined::AtLimit;
        }
        entry.1.insert(jti.to_string());
        Joined::Recorded
    }

    pub fn has_credential(&self, id: &str, jti: &str) -> bool {
        self.tasks.get(id).is_some_and(|e| e.1.contains(jti))
    }

    pub fn approve(&self, id: &str, approval: Approval) -> Option<Task> {
        let mut entry = self.tasks.get_mut(id)?;
        entry.0.approvals.push(approval);
        Some(entry.0.clone())
    }

    /// Drops tasks past their deadline by more than the retention time: at most once per
    /// `SWEEP_SECONDS` unless `now_anyway` (the store is full).
    fn sweep(&self, now: u64, now_anyway: bool) {
        let last = self.last_sweep.load(Ordering::Relaxed);
        if !now_anyway && now < last + SWEEP_SECONDS {
            return;
        }
        self.last_sweep.store(now, Ordering::Relaxed);
        self.tasks
            .retain(|_, (t, _)| t.expires_at + crate::RETENTION_SECONDS > now);
        self.live_by_agent.retain(|_, live| {
            live.retain(|(_, expires)| *expires > now);
            !live.is_empty()
        });
    }
}
