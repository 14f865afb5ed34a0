//! Usage counters policies read (`context.usage.<name>`). A call reserves its amount in each
//! counter its action's context declares (one store round trip), is decided with their values
//! before it, and gives the amounts back when it is denied or never reaches the upstream. A
//! deny a `@rate_limit` policy determines is a 429 whose `Retry-After` is found by deciding the
//! call again at later positions of the windows.

use serde_json::{Map, Value};
use sha2::Digest;
use toolgate_policy::AttrType;
use toolgate_tasks::usage::{window_of, Reservation, Windows};

use crate::answer::Refusal;
use crate::config::{Counter, KeyPart};
use crate::pipeline::CallContext;
use crate::Gateway;

/// The counters a call touched: what it reserved, and what each held before it.
#[derive(Clone, Default)]
pub(crate) struct Counted {
    pub reserved: Vec<Reservation>,
    before: Vec<(Counter, Windows)>,
    now_ms: u64,
}

/// Why a call was limited: when to come back, and the counter for the `RateLimit` headers.
#[derive(Debug, Clone)]
pub struct Limited {
    pub retry_after: u64,
    pub counter: Option<(String, Option<u64>, u64, i64)>,
}

impl Limited {
    /// The 429 body (and, as is, a JSON-RPC error's `data`).
    pub fn body(&self, decision_id: &str) -> Value {
        let mut body = serde_json::json!({
            "error": "rate_limited", "retry_after": self.retry_after, "decision_id": decision_id,
        });
        if let Some((name, ..)) = &self.counter {
            body["counter"] = Value::from(name.clone());
        }
        body
    }

    /// `Retry-After`, and the IETF `RateLimit-Policy` and `RateLimit` headers of the counter
    /// the policy read (its `limit:` where configured).
    pub fn add_headers(&self, headers: &mut http::HeaderMap) {
        use http::HeaderValue;
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(self.retry_after),
        );
        let Some((name, limit, window, remaining)) = &self.counter else {
            return;
        };
        let Some(limit) = limit else {
            return;
        };
        let policy = format!("\"{name}\";q={limit};w={window}");
        let state = format!("\"{name}\";r={remaining};t={}", self.retry_after);
        for (header, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(header, value);
            }
        }
    }
}

impl Counted {
    /// `context.usage` at `at_ms` (the windows as this call found them).
    pub fn values_at(&self, at_ms: u64) -> Map<String, Value> {
        self.before
            .iter()
            .map(|(counter, windows)| {
                let window_ms = counter.window_seconds * 1000;
                let window = window_of(self.now_ms, window_ms);
                let value = windows.value_at(window, window_ms, at_ms);
                (counter.name.clone(), Value::from(value))
            })
            .collect()
    }

    pub fn now(&self) -> Map<String, Value> {
        self.values_at(self.now_ms)
    }

    pub fn is_empty(&self) -> bool {
        self.before.is_empty()
    }

    /// When the call would be decided otherwise, at the latest two windows on; by `allows`.
    pub fn retry_after(&self, allows: impl Fn(Map<String, Value>) -> bool) -> Limited {
        let longest = self
            .before
            .iter()
            .map(|(c, _)| c.window_seconds * 1000)
            .max()
            .unwrap_or(1000);
        let step = (2 * longest / 120).max(1000);
        let mut wait = step;
        while wait <= 2 * longest {
            if allows(self.values_at(self.now_ms + wait)) {
                break;
            }
            wait += step;
        }
        let retry_after = wait.min(2 * longest).div_ceil(1000);
        let counter = self.before.first().map(|(c, _)| {
            let value = self.now().get(&c.name).and_then(Value::as_i64).unwrap_or(0);
            let remaining = c.limit.map_or(0, |l| (l as i64 - value).max(0));
            (c.name.clone(), c.limit, c.window_seconds, remaining)
        });
        Limited {
            retry_after,
            counter,
        }
    }
}

impl Gateway {
    /// Reserves this call's amount in each counter its action declares in `context.usage`.
    /// A store that cannot be reached refuses the call (503): nothing passes uncounted.
    pub(crate) async fn reserve_usage(
        &self,
        ctx: &CallContext<'_>,
        action: &str,
        args: &Map<String, Value>,
    ) -> Result<Counted, Refusal> {
        let declared =
            ctx.engine
                .schema_info()
                .actions
                .get(action)
                .and_then(|c| match c.keys.get("usage") {
                    Some((AttrType::Record(record), _)) => Some(record),
                    _ => None,
                });
        let Some(declared) = declared else {
            return Ok(Counted::default());
        };
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let counters: Vec<&Counter> = self
            .config
            .usage
            .counters
            .iter()
            .filter(|c| declared.contains_key(&c.name))
            .filter(|c| {
                c.actions
                    .as_ref()
                    .is_none_or(|a| a.iter().any(|x| x == action))
            })
            .collect();
        let reserved: Vec<Reservation> = counters
            .iter()
            .map(|c| {
                let window_ms = c.window_seconds * 1000;
                Reservation {
                    key: self.counter_key(ctx, c, action),
                    window_ms,
                    amount: match &c.sum {
                        Some(arg) => args.get(arg).and_then(Value::as_i64).unwrap_or(0).max(0),
                        None => 1,
                    },
                    window: window_of(now_ms, window_ms),
                }
            })
            .collect();
        let windows = self.tasks.reserve_usage(&reserved).await?;
        Ok(Counted {
            reserved,
            before: counters.into_iter().cloned().zip(windows).collect(),
            now_ms,
        })
    }

    /// Gives a call's amounts back; a store that cannot be reached keeps them (counted high:
    /// never a call let past a limit).
    pub(crate) async fn release_usage(&self, reserved: &[toolgate_tasks::usage::Reservation]) {
        if reserved.is_empty() {
            return;
        }
        if let Err(e) = self.tasks.release_usage(reserved).await {
            tracing::warn!(error = %e, "usage not given back: counted until its window passes");
        }
    }

    /// The counter's key: its name and the parts the gateway authenticated or classified.
    fn counter_key(&self, ctx: &CallContext<'_>, counter: &Counter, action: &str) -> String {
        let caller = ctx.caller;
        let parts = counter.per.iter().map(|part| {
            let value = match part {
                KeyPart::Agent => caller.agent.as_str(),
                KeyPart::User => caller.user.as_deref().unwrap_or(""),
                KeyPart::Tool => action,
                KeyPart::Upstream => action.split('/').next().unwrap_or(""),
                KeyPart::Task => ctx.task.as_ref().map_or("", |t| t.id.as_str()),
                KeyPart::Issuer => caller.issuer.as_str(),
            };
            (*part as u8, value)
        });
        // Each part tagged with its kind and length-prefixed: no two different keys (nor a
        // counter whose `per:` changed) hash the same text.
        let mut hasher = sha2::Sha256::new();
        for (kind, part) in std::iter::once((u8::MAX, counter.name.as_str())).chain(parts) {
            hasher.update([kind]);
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let mut key = String::with_capacity(counter.name.len() + 33);
        key.push_str(&counter.name);
        key.push(':');
        for byte in &digest[..16] {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            key.push(char::from(HEX[usize::from(byte >> 4)]));
            key.push(char::from(HEX[usize::from(byte & 15)]));
        }
        key
    }
}
