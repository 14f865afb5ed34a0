//! Just-in-time tasks: an orchestrator starts a task, calls join it, and when it ends every
//! credential minted in it is revoked at once. State lives in memory (one gateway) or in Redis
//! (several replicas share it). Any doubt about a task's state is an error, never "active".
#![forbid(unsafe_code)]

pub mod approvals;
mod memory;
mod redis_store;
pub mod usage;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use memory::MemoryStore;
pub use redis_store::{redacted, RedisStore};

/// How long an ended task is remembered (so its credentials keep reading inactive, and its
/// id keeps being refused) beyond its deadline.
pub const RETENTION_SECONDS: u64 = 24 * 3600;
/// The longest a task may be asked to live.
pub const MAX_TTL_SECONDS: u64 = 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Active,
    Completed,
    Cancelled,
}

/// A human's approval, recorded on a task for some actions (or `*` for all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub approver: String,
    pub actions: Vec<String>,
    pub at: u64,
    #[serde(default)]
    pub note: String,
}

impl Approval {
    pub fn covers(&self, action: &str) -> bool {
        self.actions.iter().any(|a| a == "*" || a == action)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    /// The agent that started it: only it (or the admin listener) may read or end it.
    pub agent: String,
    /// The user the starting agent acted for: calls join only on that user's behalf.
    #[serde(default)]
    pub user: Option<String>,
    /// Other agents the owner let join (for the same user); approvals stay the owner's.
    #[serde(default)]
    pub shared_with: Vec<String>,
    pub intent: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub state: State,
    #[serde(default)]
    pub ended_at: Option<u64>,
    #[serde(default)]
    pub approvals: Vec<Approval>,
}

impl Task {
    pub fn new(agent: &str, user: Option<&str>, intent: &str, ttl_seconds: u64, now: u64) -> Task {
        Task {
            id: uuid::Uuid::new_v4().to_string(),
            agent: agent.to_string(),
            user: user.map(String::from),
            shared_with: Vec::new(),
            intent: intent.to_string(),
            created_at: now,
            expires_at: now + ttl_seconds.min(MAX_TTL_SECONDS),
            state: State::Active,
            ended_at: None,
            approvals: Vec::new(),
        }
    }

    /// Whether calls may run in it at `now`: started, not ended, before its deadline.
    pub fn is_live(&self, now: u64) -> bool {
        self.state == State::Active && now < self.expires_at
    }

    /// Whether `agent` acting for `user` may run calls in this task: the owner, or an agent it
    /// was shared with, always on behalf of the owner's user.
    pub fn admits(&self, agent: &str, user: Option<&str>) -> bool {
        self.user.as_deref() == user
            && (self.agent == agent || self.shared_with.iter().any(|a| a == agent))
    }

    /// The first approval that covers `action` for `agent`: approvals are given to the task's
    /// owner and never carry over to agents it was shared with.
    pub fn approval_for(&self, action: &str, agent: &str) -> Option<&Approval> {
        if agent != self.agent {
            return None;
        }
        self.approvals.iter().find(|a| a.covers(action))
    }

    /// The agents that may see this task's events: the owner and those it was shared with.
    pub fn audience(&self) -> Vec<String> {
        std::iter::once(self.agent.clone())
            .chain(self.shared_with.iter().cloned())
            .collect()
    }

    /// `active`, `completed`, `cancelled` or `expired`.
    pub fn status(&self, now: u64) -> &'static str {
        match self.state {
            State::Active if now >= self.expires_at => "expired",
            State::Active => "active",
            State::Completed => "completed",
            State::Cancelled => "cancelled",
        }
    }
}

/// Published when a task ends: every credential it lists is dead from `at` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub task_id: String,
    /// The task's owner and the agents it was shared with: who may see this event.
    #[serde(default)]
    pub agents: Vec<String>,
    pub state: State,
    pub jtis: Vec<String>,
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time: fail closed.
    #[error("task store unavailable: {0}")]
    Unavailable(String),
    #[error("task store data is corrupt: {0}")]
    Corrupt(String),
}

/// Ending a task: what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// It was active and is now ended; these credentials are revoked.
    Now(Task, Revocation),
    /// It had ended (or expired) before.
    Already(Task),
    Unknown,
}

/// Where tasks live.
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

/// What the store may hold: each bound is answered with a clear refusal, never growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Live (active, unexpired) tasks one agent may have started.
    pub per_agent: usize,
    /// Tasks remembered at once, live or ended (in Redis: whose keys have not expired).
    pub total: usize,
    /// Credentials recorded in one task.
    pub credentials_per_task: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            per_agent: 100,
            total: 100_000,
            credentials_per_task: 10_000,
        }
    }
}

/// The outcome of `Store::create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Yes,
    /// The agent already has `Bounds::per_agent` live tasks.
    AgentAtLimit,
    /// The store holds `Bounds::total` tasks.
    Full,
}

/// The outcome of `Store::add_credential`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    Recorded,
    /// The task is no longer live: the call is refused.
    Ended,
    /// The task already lists `Bounds::credentials_per_task` credentials.
    AtLimit,
}

/// Time allowed for one store operation before the store counts as unavailable.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(750);

impl Store {
    /// `memory`, or `redis://host:port[/db]`.
    pub async fn open(spec: &str, bounds: Bounds) -> Result<Store, StoreError> {
        if spec == "memory" {
            return Ok(Store::Memory(MemoryStore::new(bounds)));
        }
        Ok(Store::Redis(RedisStore::open(spec, bounds).await?))
    }

    pub async fn create(&self, task: &Task) -> Result<Created, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.create(task)),
            Store::Redis(r) => r.create(task).await,
        }
    }

    /// The most recently started tasks (live and ended), newest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<Task>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.recent(limit)),
            Store::Redis(r) => r.recent(limit).await,
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.get(id)),
            Store::Redis(r) => r.get(id).await,
        }
    }

    /// Ends an active task (the first end wins) and revokes what was minted in it.
    pub async fn end(&self, id: &str, state: State, now: u64) -> Result<Ended, StoreError> {
        let ended = match self {
            Store::Memory(m) => m.end(id, state, now),
            Store::Redis(r) => r.end(id, state, now).await?,
        };
        Ok(ended)
    }

    /// Records a credential minted in a task (for revocation events and introspection), unless
    /// the task has ended meanwhile: atomic with `end`, so a credential is either listed in the
    /// revocation or refused here.
    pub async fn add_credential(
        &self,
        task: &Task,
        jti: &str,
        now: u64,
    ) -> Result<Joined, StoreError> {
        if !task.is_live(now) {
            return Ok(Joined::Ended);
        }
        match self {
            Store::Memory(m) => Ok(m.add_credential(&task.id, jti, now)),
            Store::Redis(r) => r.add_credential(task, jti).await,
        }
    }

    /// Whether `jti` was minted in task `id` (a credential claiming a task it was not minted in is forged).
    pub async fn has_credential(&self, id: &str, jti: &str) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.has_credential(id, jti)),
            Store::Redis(r) => r.has_credential(id, jti).await,
        }
    }

    pub async fn approve(&self, id: &str, approval: Approval) -> Result<Option<Task>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.approve(id, approval)),
            Store::Redis(r) => r.approve(id, approval).await,
        }
    }

    /// Records a pending approval of one call (or finds the same call's pending one).
    pub async fn ask_approval(
        &self,
        approval: &approvals::CallApproval,
        bounds: approvals::ApprovalBounds,
        now: u64,
    ) -> Result<approvals::Asked, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.approvals.ask(approval.clone(), bounds, now)),
            Store::Redis(r) => r.ask_approval(approval, bounds, now).await,
        }
    }

    pub async fn approval(&self, id: &str) -> Result<Option<approvals::CallApproval>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.approvals.get(id)),
            Store::Redis(r) => r.approval(id).await,
        }
    }

    /// The latest approval asked for this call (`CallApproval::key`), whatever its state.
    pub async fn approval_of_call(
        &self,
        key: &str,
    ) -> Result<Option<approvals::CallApproval>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.approvals.of_call(key)),
            Store::Redis(r) => r.approval_of_call(key).await,
        }
    }

    /// A person's decision on a pending, unexpired approval (`None`: there is none such).
    pub async fn decide_approval(
        &self,
        id: &str,
        decided: &approvals::Decided,
    ) -> Result<Option<approvals::CallApproval>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.approvals.decide(id, decided)),
            Store::Redis(r) => r.decide_approval(id, decided).await,
        }
    }

    /// Takes one use of an approved approval, atomically across replicas.
    pub async fn consume_approval(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.approvals.consume(id, now)),
            Store::Redis(r) => r.consume_approval(id, now).await,
        }
    }

    /// Approvals remembered (up to a day past their expiry), newest first.
    pub async fn approvals(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<approvals::CallApproval>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.approvals.all(now).into_iter().take(limit).collect()),
            Store::Redis(r) => r.approvals(now, limit).await,
        }
    }

    /// Adds each reservation's amount to its counter, atomically; what each counter's two
    /// windows held before.
    pub async fn reserve_usage(
        &self,
        reservations: &[usage::Reservation],
    ) -> Result<Vec<usage::Windows>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.counters.reserve(reservations)),
            Store::Redis(r) => r.reserve_usage(reservations).await,
        }
    }

    /// Gives reserved amounts back (the call was denied, or never reached the upstream).
    pub async fn release_usage(
        &self,
        reservations: &[usage::Reservation],
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.counters.release(reservations);
                Ok(())
            }
            Store::Redis(r) => r.release_usage(reservations).await,
        }
    }

    /// Revocations as they happen (on every replica, for the Redis store).
    pub fn revocations(&self) -> broadcast::Receiver<Revocation> {
        match self {
            Store::Memory(m) => m.events.subscribe(),
            Store::Redis(r) => r.events.subscribe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        let mut task = Task::new("assistant", Some("alice"), "refund", 60, 1_000);
        task.shared_with = vec!["auditor".into()];
        task.approvals.push(Approval {
            approver: "bob".into(),
            actions: vec!["*".into()],
            at: 1_000,
            note: String::new(),
        });
        task
    }

    #[test]
    fn only_the_owner_and_shared_agents_join_for_the_owners_user() {
        let task = task();
        assert!(task.admits("assistant", Some("alice")));
        assert!(task.admits("auditor", Some("alice")));
        assert!(!task.admits("intruder", Some("alice")));
        assert!(!task.admits("assistant", Some("mallory")));
        assert!(!task.admits("assistant", None));
    }

    #[test]
    fn approvals_stay_with_the_owner() {
        let task = task();
        assert!(task.approval_for("billing/refund", "assistant").is_some());
        assert!(task.approval_for("billing/refund", "auditor").is_none());
    }

    #[tokio::test]
    async fn a_credential_is_never_recorded_in_an_ended_task() {
        let store = Store::open("memory", Bounds::default()).await.unwrap();
        let task = Task::new("assistant", None, "x", 60, unix_now());
        assert_eq!(store.create(&task).await.unwrap(), Created::Yes);
        assert_eq!(
            store
                .add_credential(&task, "before", unix_now())
                .await
                .unwrap(),
            Joined::Recorded
        );
        let Ended::Now(_, revocation) = store
            .end(&task.id, State::Completed, unix_now())
            .await
            .unwrap()
        else {
            panic!("the task was active");
        };
        assert_eq!(revocation.jtis, vec!["before".to_string()]);
        assert_eq!(revocation.agents, vec!["assistant".to_string()]);
        // The call that raced the end: refused, so no live credential escapes the revocation.
        assert_eq!(
            store
                .add_credential(&task, "after", unix_now())
                .await
                .unwrap(),
            Joined::Ended
        );
        assert!(!store.has_credential(&task.id, "after").await.unwrap());
    }

    #[tokio::test]
    async fn the_memory_store_holds_to_its_bounds() {
        let bounds = Bounds {
            per_agent: 2,
            total: 3,
            credentials_per_task: 2,
        };
        let store = Store::open("memory", bounds).await.unwrap();
        let now = unix_now();
        let start = |agent: &str| Task::new(agent, None, "x", 60, now);
        let first = start("a");
        assert_eq!(store.create(&first).await.unwrap(), Created::Yes);
        assert_eq!(store.create(&start("a")).await.unwrap(), Created::Yes);
        assert_eq!(
            store.create(&start("a")).await.unwrap(),
            Created::AgentAtLimit
        );
        // Ending one frees the agent's place; the store itself holds three at most.
        store.end(&first.id, State::Completed, now).await.unwrap();
        assert_eq!(store.create(&start("b")).await.unwrap(), Created::Yes);
        assert_eq!(store.create(&start("a")).await.unwrap(), Created::Full);
        // Credentials per task.
        let live = Task::new("c", None, "x", 60, now);
        let store = Store::open("memory", bounds).await.unwrap();
        assert_eq!(store.create(&live).await.unwrap(), Created::Yes);
        for (jti, want) in [
            ("1", Joined::Recorded),
            ("2", Joined::Recorded),
            ("3", Joined::AtLimit),
        ] {
            assert_eq!(store.add_credential(&live, jti, now).await.unwrap(), want);
        }
    }

    fn unix_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }
}
