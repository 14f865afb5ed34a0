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
