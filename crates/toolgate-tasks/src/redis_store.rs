//! Tasks in Redis, shared by every gateway replica. The end of a task is a `SET NX` marker, so
//! the first `complete`/`cancel` on any replica wins and every replica sees it on its next read.
//! Revocations are also published on a channel each replica relays to its own subscribers.
//! Redis not answering within `STORE_TIMEOUT` is `StoreError::Unavailable`: callers fail closed.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use tokio::sync::{broadcast, Mutex};

use crate::{
    Approval, Bounds, Created, Ended, Joined, Revocation, State, StoreError, Task,
    RETENTION_SECONDS, STORE_TIMEOUT,
};

const CHANNEL: &str = "toolgate:revocations";

pub struct RedisStore {
    client: redis::Client,
    bounds: Bounds,
    conn: Mutex<Option<ConnectionManager>>,
    pub(crate) events: broadcast::Sender<Revocation>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct EndMark {
    state: State,
    at: u64,
}

fn key(id: &str, part: &str) -> String {
    if part.is_empty() {
        format!("toolgate:task:{id}")
    } else {
        format!("toolgate:task:{id}:{part}")
    }
}

/// Every task whose keys still exist: ids scored by when they expire (`Bounds::total`).
const REMEMBERED_KEY: &str = "toolgate:tasks:remembered";

/// An agent's live tasks: ids scored by deadline.
fn agent_key(agent: &str) -> String {
    format!("toolgate:agent:{agent}:live")
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Opens the store; a Redis that is down now is connected to later (calls fail closed meanwhile).
    /// `url` may carry a password (`redis://:PASSWORD@host`): it is never said in errors.
    /// Whether `url` is one Redis takes (nothing is connected): `check` refuses what `serve`
    /// would.
    pub fn check_url(url: &str) -> Result<(), String> {
        redis::Client::open(url)
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", redacted(url)))
    }

    pub async fn open(url: &str, bounds: Bounds) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", redacted(url))))?;
        let events = broadcast::channel(1024).0;
        tokio::spawn(relay_revocations(client.clone(), events.clone()));
        let store = RedisStore {
            client,
            bounds,
            conn: Mutex::new(None),
            events,
        };
        if let Err(e) = store.connection().await {
            tracing::warn!(error = %e, "Redis not reachable yet; task-bound calls fail closed until it is");
        }
        Ok(store)
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(STORE_TIMEOUT)
            .set_response_timeout(STORE_TIMEOUT)
            .set_number_of_retries(1);
        let conn = bounded(ConnectionManager::new_with_config(
            self.client.clone(),
            config,
        ))
        .await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// One script: the agent's live tasks (a sorted set by deadline) and the tasks remembered
    /// (a sorted set by when their keys expire) are counted and the task added atomically,
    /// whichever replica starts it.
    pub async fn create(&self, task: &Task) -> Result<Created, StoreError> {
        static CREATE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r#"
                redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[3])
                if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[7]) then return 2 end
                redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
                if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 0 end
                redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
                redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
                redis.call('EXPIRE', KEYS[2], ARGV[2])
                redis.call('ZADD', KEYS[3], ARGV[3] + ARGV[2], ARGV[6])
                return 1
                "#,
            )
        });
        let mut conn = self.connection().await?;
        let json = serde_json::to_string(task).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let created: i64 = bounded(
            CREATE
                .key(key(&task.id, ""))
                .key(agent_key(&task.agent))
                .key(REMEMBERED_KEY)
                .arg(json)
                .arg(retention(task))
                .arg(task.created_at)
                .arg(task.expires_at)
                .arg(self.bounds.per_agent)
                .arg(&task.id)
                .arg(self.bounds.total)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(match created {
            1 => Created::Yes,
            2 => Created::Full,
            _ => Created::AgentAtLimit,
        })
    }

    /// The tasks whose keys expire last (the most recently started, mostly), newest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<Task>, StoreError> {
        let mut conn = self.connection().await?;
        let ids: Vec<String> = bounded(
            redis::cmd("ZRANGE")
                .arg(REMEMBERED_KEY)
                .arg(0)
                .arg(limit.saturating_sub(1))
                .arg("REV")
                .query_async(&mut conn),
        )
        .await?;
        let mut tasks = Vec::new();
        for id in ids {
            tasks.extend(self.get(&id).await?);
        }
        tasks.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        Ok(tasks)
    }

    pub async fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let mut conn = self.connection().await?;
        let (task, end, approvals): (Option<String>, Option<String>, Vec<String>) = bounded(
            redis::pipe()
                .get(key(id, ""))
                .get(key(id, "end"))
                .lrange(key(id, "approvals"), 0, -1)
                .query_async(&mut conn),
        )
        .await?;
        let Some(task) = task else {
            return Ok(None);
        };
        let mut task: Task =
            serde_json::from_str(&task).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if let Some(end) = end {
            let end: EndMark =
                serde_json::from_str(&end).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            task.state = end.state;
            task.ended_at = Some(end.at);
        }
        for approval in approvals {
            task.approvals.push(
                serde_json::from_str(&approval).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
        }
        Ok(Some(task))
    }

    pub async fn end(&self, id: &str, state: State, now: u64) -> Result<Ended, StoreError> {
        let Some(task) = self.get(id).await? else {
            return Ok(Ended::Unknown);
        };
        if !task.is_live(now) {
            return Ok(Ended::Already(task));
        }
        let mut conn = self.connection().await?;
        let mark = serde_json::to_string(&EndMark { state, at: now })
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let options = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::EX(retention(&task)));
        let won: Option<String> = bounded(conn.set_options(key(id, "end"), mark, options)).await?;
        if won.is_none() {
            // Another replica ended it first.
            return Ok(self.get(id).await?.map_or(Ended::Unknown, Ended::Already));
        }
        let jtis: Vec<String> = bounded(conn.smembers(key(id, "jtis"))).await?;
        let _ = bounded(conn.zrem::<_, _, i64>(agent_key(&task.agent), id)).await;
        let revocation = Revocation {
            task_id: id.to_string(),
            agents: task.audience(),
            state,
            jtis,
            at: now,
        };
        if let Ok(event) = serde_json::to_string(&revocation) {
            // Replicas learn of the end from the marker anyway; the event is for subscribers.
            let _ = bounded(conn.publish::<_, _, i64>(CHANNEL, event)).await;
        }
        let mut ended = task;
        ended.state = state;
        ended.ended_at = Some(now);
        Ok(Ended::Now(ended, revocation))
    }

    /// One script, so it runs between any two commands of `end` on any replica: either the
    /// end marker is already set (refused) or the jti is in the set `end` reads after setting it.
    pub async fn add_credential(&self, task: &Task, jti: &str) -> Result<Joined, StoreError> {
        static JOIN: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r#"
                if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
                if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
                if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[3]) then return 2 end
                redis.call('SADD', KEYS[3], ARGV[1])
                redis.call('EXPIRE', KEYS[3], ARGV[2])
                return 1
                "#,
            )
        });
        let mut conn = self.connection().await?;
        let joined: i64 = bounded(
            JOIN.key(key(&task.id, ""))
                .key(key(&task.id, "end"))
                .key(key(&task.id, "jtis"))
                .arg(jti)
                .arg(retention(task))
                .arg(self.bounds.credentials_per_task)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(match joined {
            1 => Joined::Recorded,
            2 => Joined::AtLimit,
            _ => Joined::Ended,
        })
    }

    pub async fn has_credential(&self, id: &str, jti: &str) -> Result<bool, StoreError> {
        let mut conn = self.connection().await?;
        bounded(conn.sismember(key(id, "jtis"), jti)).await
    }

    pub async fn approve(&self, id: &str, approval: Approval) -> Result<Option<Task>, StoreError> {
        let Some(task) = self.get(id).await? else {
            return Ok(None);
        };
        let mut conn = self.connection().await?;
        let json =
            serde_json::to_string(&approval).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        bounded(
            redis::pipe()
                .rpush(key(id, "approvals"), json)
                .ignore()
                .expire(key(id, "approvals"), retention(&task) as i64)
                .ignore()
                .query_async::<()>(&mut conn),
        )
        .await?;
        self.get(id).await
    }
}

/// Seconds a task's keys live: until its deadline plus the retention time.
fn retention(task: &Task) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    task.expires_at.saturating_sub(now) + RETENTION_SECONDS
}

async fn bounded<T, E: std::fmt::Display>(
    op: impl Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(STORE_TIMEOUT, op).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(StoreError::Unavailable(
            "Redis did not answer in time".into(),
        )),
    }
}

/// Relays revocations published by any replica to this one's subscribers; reconnects forever.
async fn relay_revocations(client: redis::Client, events: broadcast::Sender<Revocation>) {
    use futures_util::StreamExt;
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(CHANNEL).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let payload: String = message.get_payload().unwrap_or_default();
                        if let Ok(revocation) = serde_json::from_str::<Revocation>(&payload) {
                            let _ = events.send(revocation);
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "revocation channel: Redis not reachable"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A store URL as it may be shown: its user information (a password) replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The last `@` of the whole text: a password may hold `/`, `?` or `#` that a parser
    // would take for the end of the authority.
    match rest.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod redaction_tests {
    #[test]
    fn passwords_are_never_shown() {
        for (url, shown) in [
            ("redis://:s3cret@redis:6379/0", "redis://***@redis:6379/0"),
            ("redis://user:s3cret@redis", "redis://***@redis"),
            ("redis://s3cret@redis/0", "redis://***@redis/0"),
            (
                "redis://:pa/ss@127.0.0.1:6390",
                "redis://***@127.0.0.1:6390",
            ),
            ("redis://:p?a#s@redis", "redis://***@redis"),
            ("redis://redis:6379", "redis://redis:6379"),
        ] {
            assert_eq!(super::redacted(url), shown);
        }
    }
}

/// Call approvals: the request itself (`toolgate:approval:<id>`, never rewritten), its state
/// (a hash beside it, changed only by the scripts below), the call's key to its id, and the
/// pending ones by expiry, in all and per agent (the bounds).
mod approvals {
    use super::{bounded, RedisStore};
    use crate::approvals::{ApprovalBounds, Asked, CallApproval, Decided, Status};
    use crate::{StoreError, RETENTION_SECONDS};
    use redis::AsyncCommands;

    const ALL: &str = "toolgate:approvals";

    fn record(id: &str) -> String {
        format!("toolgate:approval:{id}")
    }

    fn state(id: &str) -> String {
        format!("toolgate:approval:{id}:state")
    }

    fn call(key: &str) -> String {
        format!("toolgate:approval-call:{key}")
    }

    fn agent(agent: &str) -> String {
        format!("toolgate:approvals:agent:{agent}")
    }

    fn corrupt(e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(e.to_string())
    }

    impl RedisStore {
        pub async fn ask_approval(
            &self,
            approval: &CallApproval,
            bounds: ApprovalBounds,
            now: u64,
        ) -> Result<Asked, StoreError> {
            static ASK: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
                redis::Script::new(
                    r#"
                    local existing = redis.call('GET', KEYS[1])
                    if existing then
                      local st = redis.call('HMGET', 'toolgate:approval:' .. existing .. ':state', 'status', 'expires_at')
                      if st[1] == 'pending' and tonumber(st[2]) > tonumber(ARGV[3]) then return {1, existing} end
                    end
                    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
                    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[3])
                    if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) or redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then
                      return {2, ''}
                    end
                    redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[2])
                    redis.call('HSET', KEYS[5], 'status', 'pending', 'expires_at', ARGV[4], 'uses_left', 0)
                    redis.call('EXPIRE', KEYS[5], ARGV[2])
                    redis.call('SET', KEYS[1], ARGV[5], 'EX', ARGV[2])
                    redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
                    redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
                    redis.call('EXPIRE', KEYS[3], ARGV[2])
                    return {0, ARGV[5]}
                    "#,
                )
            });
            let mut conn = self.connection().await?;
            let json = serde_json::to_string(approval).map_err(corrupt)?;
            let ttl = approval.expires_at.saturating_sub(now) + RETENTION_SECONDS;
            let (outcome, id): (i64, String) = bounded(
                ASK.key(call(&approval.key()))
                    .key(ALL)
                    .key(agent(&approval.agent))
                    .key(record(&approval.id))
                    .key(state(&approval.id))
                    .arg(json)
                    .arg(ttl)
                    .arg(now)
                    .arg(approval.expires_at)
                    .arg(&approval.id)
                    .arg(bounds.per_agent)
                    .arg(bounds.total)
                    .invoke_async(&mut conn),
            )
            .await?;
            Ok(match outcome {
                0 => Asked::New(id),
                1 => Asked::Pending(id),
                _ => Asked::AtLimit,
            })
        }

        pub async fn approval(&self, id: &str) -> Result<Option<CallApproval>, StoreError> {
            let mut conn = self.connection().await?;
            let (json, fields): (Option<String>, std::collections::HashMap<String, String>) =
                bounded(
                    redis::pipe()
                        .get(record(id))
                        .hgetall(state(id))
                        .query_async(&mut conn),
                )
                .await?;
            let Some(json) = json else {
                return Ok(None);
            };
            let mut approval: CallApproval = serde_json::from_str(&json).map_err(corrupt)?;
            approval.status = match fields.get("status").map(String::as_str) {
                Some("approved") => Status::Approved,
                Some("denied") => Status::Denied,
                Some("used") => Status::Used,
                _ => Status::Pending,
            };
            approval.uses_left = fields
                .get("uses_left")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            approval.decided_by = fields.get("decided_by").cloned();
            approval.decided_at = fields.get("decided_at").and_then(|n| n.parse().ok());
            approval.note = fields.get("note").cloned();
            Ok(Some(approval))
        }

        pub async fn approval_of_call(
            &self,
            key: &str,
        ) -> Result<Option<CallApproval>, StoreError> {
            let mut conn = self.connection().await?;
            let id: Option<String> = bounded(conn.get(call(key))).await?;
            match id {
                Some(id) => self.approval(&id).await,
                None => Ok(None),
            }
        }

        pub async fn decide_approval(
            &self,
            id: &str,
            decided: &Decided,
        ) -> Result<Option<CallApproval>, StoreError> {
            static DECIDE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
                redis::Script::new(
                    r#"
                    local st = redis.call('HMGET', KEYS[1], 'status', 'expires_at')
                    if st[1] ~= 'pending' or tonumber(st[2]) <= tonumber(ARGV[1]) then return 0 end
                    redis.call('HSET', KEYS[1], 'status', ARGV[2], 'decided_by', ARGV[3], 'decided_at', ARGV[1], 'uses_left', ARGV[4])
                    if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'note', ARGV[5]) end
                    redis.call('ZREM', KEYS[2], ARGV[6])
                    return 1
                    "#,
                )
            });
            let Some(mut approval) = self.approval(id).await? else {
                return Ok(None);
            };
            decided.apply(&mut approval);
            let status = if decided.approve {
                "approved"
            } else {
                "denied"
            };
            let mut conn = self.connection().await?;
            let done: i64 = bounded(
                DECIDE
                    .key(state(id))
                    .key(agent(&approval.agent))
                    .arg(decided.at)
                    .arg(status)
                    .arg(&decided.by)
                    .arg(approval.uses_left)
                    .arg(decided.note.as_deref().unwrap_or(""))
                    .arg(id)
                    .invoke_async(&mut conn),
            )
            .await?;
            Ok((done == 1).then_some(approval))
        }

        pub async fn consume_approval(&self, id: &str, now: u64) -> Result<bool, StoreError> {
            static CONSUME: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
                redis::Script::new(
                    r#"
                    local st = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'uses_left')
                    if st[1] ~= 'approved' or tonumber(st[2]) <= tonumber(ARGV[1]) or tonumber(st[3]) < 1 then return 0 end
                    local left = redis.call('HINCRBY', KEYS[1], 'uses_left', -1)
                    if left == 0 then redis.call('HSET', KEYS[1], 'status', 'used') end
                    return 1
                    "#,
                )
            });
            let mut conn = self.connection().await?;
            let taken: i64 =
                bounded(CONSUME.key(state(id)).arg(now).invoke_async(&mut conn)).await?;
            Ok(taken == 1)
        }

        /// Approvals not yet expired a day ago, newest first (at most `limit`).
        pub async fn approvals(
            &self,
            now: u64,
            limit: usize,
        ) -> Result<Vec<CallApproval>, StoreError> {
            let mut conn = self.connection().await?;
            let since = now.saturating_sub(RETENTION_SECONDS);
            let ids: Vec<String> = bounded(
                redis::cmd("ZRANGE")
                    .arg(ALL)
                    .arg("+inf")
                    .arg(since)
                    .arg("BYSCORE")
                    .arg("REV")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut conn),
            )
            .await?;
            let mut all = Vec::new();
            for id in ids {
                all.extend(self.approval(&id).await?);
            }
            all.sort_by_key(|a| std::cmp::Reverse(a.created_at));
            Ok(all)
        }
    }
}

/// Usage counters: one key per counter and fixed window, kept two windows; one script per call
/// adds every amount and reads each counter's two windows before it.
mod usage {
    use super::{bounded, RedisStore};
    use crate::usage::{Reservation, Windows};
    use crate::StoreError;

    fn key(reservation: &Reservation, window: u64) -> String {
        format!("toolgate:usage:{}:{window}", reservation.key)
    }

    impl RedisStore {
        pub async fn reserve_usage(
            &self,
            reservations: &[Reservation],
        ) -> Result<Vec<Windows>, StoreError> {
            static RESERVE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
                redis::Script::new(
                    r#"
                    local out = {}
                    for i = 1, #ARGV, 2 do
                      local current = KEYS[i]
                      local previous = KEYS[i + 1]
                      local after = redis.call('INCRBY', current, ARGV[i])
                      redis.call('PEXPIRE', current, ARGV[i + 1])
                      out[#out + 1] = after - tonumber(ARGV[i])
                      out[#out + 1] = tonumber(redis.call('GET', previous) or '0')
                    end
                    return out
                    "#,
                )
            });
            if reservations.is_empty() {
                return Ok(Vec::new());
            }
            let mut invocation = RESERVE.prepare_invoke();
            for r in reservations {
                invocation
                    .key(key(r, r.window))
                    .key(key(r, r.window.saturating_sub(1)))
                    .arg(r.amount)
                    .arg(r.window_ms * 2 + 1_000);
            }
            let mut conn = self.connection().await?;
            let counts: Vec<i64> = bounded(invocation.invoke_async(&mut conn)).await?;
            Ok(counts
                .chunks(2)
                .map(|pair| Windows {
                    current: pair[0],
                    previous: pair.get(1).copied().unwrap_or(0),
                })
                .collect())
        }

        pub async fn release_usage(&self, reservations: &[Reservation]) -> Result<(), StoreError> {
            if reservations.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for r in reservations {
                pipe.decr(key(r, r.window), r.amount).ignore();
            }
            let mut conn = self.connection().await?;
            bounded(pipe.query_async::<()>(&mut conn)).await
        }
    }
}
