//! An upstream's endpoints (`url:` or `urls:`): calls balanced over the healthy ones, an
//! endpoint that keeps failing ejected for a while (passive health), and the order in which one
//! call may try them.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::uri::{Authority, Scheme};
use http::Uri;

use crate::config::{Balance, PassiveHealth, UpstreamConfig};

/// A request's wishes for its endpoint, set before it is forwarded (a request extension).
#[derive(Debug, Clone, Default)]
pub(crate) struct Dispatch {
    /// The endpoint (its `key`) that holds the request's MCP session: only that one.
    pub endpoint: Option<String>,
    /// An idempotent call whose route allows it: tried again elsewhere on a 502 or 503.
    pub retry_unavailable: bool,
}

/// Where a forwarded call went: the endpoint that answered (or was tried last), and how many
/// endpoints were tried.
#[derive(Debug, Clone, Default)]
pub(crate) struct Served {
    pub endpoint: Option<String>,
    pub attempts: u32,
}

pub(crate) struct Endpoints {
    list: Vec<Endpoint>,
    balance: Balance,
    health: PassiveHealth,
    next: AtomicUsize,
    epoch: Instant,
}

pub(crate) struct Endpoint {
    scheme: Scheme,
    authority: Authority,
    /// Names the endpoint in a bound session id: the same across replicas and reloads.
    pub key: String,
    /// Names the endpoint in metrics and logs: `host:port`.
    pub label: String,
    in_flight: Arc<AtomicUsize>,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which no call is sent here (0: never ejected).
    ejected_until: AtomicU64,
}

/// A call in flight at an endpoint, counted for `least_requests` until dropped.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an endpoint's answer says of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Answered,
    /// No connection, or a 502/503: the endpoint's own failure. A 500, a timeout (a 504 from
    /// a proxy in front of it too) or a broken upload is not counted: an agent can provoke
    /// those with a slow or bad call.
    Failed,
}

/// At most this many endpoints are tried for one call.
pub(crate) const MAX_ATTEMPTS: usize = 3;

impl Endpoints {
    /// The endpoints of an HTTP upstream (none for a `command:` one); `check` has vetted them.
    /// `name_secret` keys their names in session ids, so that an id does not tell the agent
    /// the address behind it.
    pub fn new(config: &UpstreamConfig, name_secret: &dyn Fn(&str) -> String) -> Endpoints {
        let list = config
            .endpoint_urls()
            .into_iter()
            .filter_map(|url| url.parse::<Uri>().ok())
            .filter_map(|uri| {
                let parts = uri.into_parts();
                let (scheme, authority) = (parts.scheme?, parts.authority?);
                let key = name_secret(&format!("endpoint {scheme}://{authority}"));
                Some(Endpoint {
                    key: key
                        .chars()
                        .filter(char::is_ascii_alphanumeric)
                        .take(16)
                        .collect(),
                    label: authority.to_string(),
                    scheme,
                    authority,
                    in_flight: Arc::default(),
                    failures: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                })
            })
            .collect();
        Endpoints {
            list,
            balance: config.balance,
            health: config.passive_health,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn get(&self, index: usize) -> &Endpoint {
        &self.list[index]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.list.iter()
    }

    pub fn index_of(&self, key: &str) -> Option<usize> {
        self.list.iter().position(|e| e.key == key)
    }

    /// Keeps what `previous` (the same upstream before a reload) learned of the endpoints
    /// that are still there: their health, their calls in flight, the turn.
    pub fn inherit(&mut self, previous: &Endpoints) {
        if self.list.len() < 2 {
            // A lone endpoint is never ejected, nor kept ejected.
            return;
        }
        self.epoch = previous.epoch;
        self.next = AtomicUsize::new(previous.next.load(Ordering::Relaxed));
        for endpoint in &mut self.list {
            if let Some(old) = previous.list.iter().find(|e| e.key == endpoint.key) {
                endpoint.in_flight = old.in_flight.clone();
                let failures = old.failures.load(Ordering::Relaxed);
                endpoint.failures = AtomicU32::new(failures);
                let until = old.ejected_until.load(Ordering::Relaxed);
                endpoint.ejected_until = AtomicU64::new(until);
            }
        }
    }

    /// The endpoints a call may try, in order (at most `MAX_ATTEMPTS`): the healthy ones as
    /// the balance picks them, then the ejected ones (with none healthy, trying beats
    /// refusing). A session's call may only go to the endpoint that holds the session.
    pub fn order(&self, pinned: Option<&str>) -> Vec<usize> {
        if let Some(key) = pinned {
            return self.index_of(key).into_iter().collect();
        }
        let n = self.list.len();
        if n <= 1 {
            return (0..n).collect();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = self.now_ms();
        let (mut healthy, ejected): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|k| (start + k) % n)
            .partition(|&i| !self.list[i].is_ejected(now));
        if self.balance == Balance::LeastRequests {
            // Stable: among equals, the turn decides.
            healthy.sort_by_key(|&i| self.list[i].in_flight.load(Ordering::Relaxed));
        }
        healthy.extend(ejected);
        healthy.truncate(MAX_ATTEMPTS);
        healthy
    }

    /// A call starts at endpoint `index`.
    pub fn enter(&self, index: usize) -> InFlight {
        let counter = self.list[index].in_flight.clone();
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    /// Records how endpoint `index` answered; true when this failure ejected it. A lone
    /// endpoint is never ejected: there is nowhere else to send its calls.
    pub fn record(&self, index: usize, outcome: Outcome) -> bool {
        if self.list.len() < 2 {
            return false;
        }
        let endpoint = &self.list[index];
        if outcome == Outcome::Answered {
            // An answer proves it healthy, ejected or not (tried when none was healthy).
            endpoint.failures.store(0, Ordering::Relaxed);
            endpoint.ejected_until.store(0, Ordering::Relaxed);
            return false;
        }
        let failures = endpoint.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.health.failures {
            return false;
        }
        // Back after a while; one more failure then ejects it again.
        let now = self.now_ms();
        let until = now.saturating_add(self.health.eject_seconds.saturating_mul(1000));
        endpoint
            .failures
            .store(self.health.failures.saturating_sub(1), Ordering::Relaxed);
        let was = endpoint.ejected_until.swap(until, Ordering::Relaxed);
        was <= now
    }

    /// Whether endpoint `index` is ejected now.
    pub fn ejected(&self, index: usize) -> bool {
        self.list[index].is_ejected(self.now_ms())
    }

    /// An upstream reached over HTTP whose every endpoint is ejected.
    pub fn none_healthy(&self) -> bool {
        self.list.len() > 1 && (0..self.list.len()).all(|i| self.ejected(i))
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means "never ejected".
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Endpoint {
    fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    /// `uri` (formed with any endpoint's base: they share their path) sent to this endpoint.
    pub fn rebase(&self, uri: &Uri) -> Uri {
        let mut parts = uri.clone().into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(urls: &[&str], balance: Balance) -> Endpoints {
        let config: UpstreamConfig = serde_norway::from_str(&format!(
            "{{name: b, audience: a, urls: [{}], passive_health: {{failures: 2, eject_seconds: 60}}}}",
            urls.join(", ")
        ))
        .unwrap();
        Endpoints::new(&UpstreamConfig { balance, ..config }, &|s| {
            format!(
                "{:x}",
                s.len() * 7919 + s.bytes().map(usize::from).sum::<usize>()
            )
        })
    }

    #[test]
    fn round_robin_takes_turns_and_skips_the_ejected() {
        let e = endpoints(
            &["http://a:1", "http://b:1", "http://c:1"],
            Balance::RoundRobin,
        );
        let firsts: Vec<usize> = (0..6).map(|_| e.order(None)[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert!(!e.record(1, Outcome::Failed));
        assert!(e.record(1, Outcome::Failed), "two failures in a row eject");
        for _ in 0..6 {
            let order = e.order(None);
            assert_ne!(order[0], 1);
            assert_eq!(order.last(), Some(&1), "ejected: tried last, not never");
        }
        assert!(!e.none_healthy());
    }

    #[test]
    fn a_lone_endpoint_is_never_ejected_and_an_ejection_is_said_once() {
        let lone = endpoints(&["http://a:1"], Balance::RoundRobin);
        for _ in 0..5 {
            assert!(!lone.record(0, Outcome::Failed));
        }
        assert!(!lone.none_healthy());
        let e = endpoints(&["http://a:1", "http://b:1"], Balance::RoundRobin);
        e.record(0, Outcome::Failed);
        assert!(e.record(0, Outcome::Failed));
        assert!(!e.record(0, Outcome::Failed), "already ejected");
    }

    #[test]
    fn a_reload_keeps_what_was_learned_of_the_endpoints_still_there() {
        let before = endpoints(&["http://a:1", "http://b:1"], Balance::RoundRobin);
        before.record(0, Outcome::Failed);
        before.record(0, Outcome::Failed);
        let busy = before.enter(1);
        let mut after = endpoints(
            &["http://b:1", "http://a:1", "http://c:1"],
            Balance::RoundRobin,
        );
        after.inherit(&before);
        assert!(after.ejected(1), "a is still ejected");
        assert!(!after.ejected(0) && !after.ejected(2));
        assert_eq!(
            after.get(0).in_flight.load(Ordering::Relaxed),
            1,
            "b's call"
        );
        drop(busy);
        assert_eq!(after.get(0).in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_answer_resets_the_failures() {
        let e = endpoints(&["http://a:1", "http://b:1"], Balance::RoundRobin);
        e.record(0, Outcome::Failed);
        e.record(0, Outcome::Answered);
        assert!(!e.record(0, Outcome::Failed));
        assert!(!e.ejected(0));
    }

    #[test]
    fn least_requests_prefers_the_idle_endpoint() {
        let e = endpoints(&["http://a:1", "http://b:1"], Balance::LeastRequests);
        let _busy = e.enter(0);
        assert!((0..4).all(|_| e.order(None)[0] == 1));
    }

    #[test]
    fn a_session_stays_on_its_endpoint_and_uris_are_rebased() {
        let e = endpoints(&["http://a:1/mcp", "https://b:2/mcp"], Balance::RoundRobin);
        let key = e.get(1).key.clone();
        assert_eq!(e.order(Some(&key)), [1]);
        assert_eq!(e.order(Some("unknown")), Vec::<usize>::new());
        let uri: Uri = "http://a:1/mcp?x=1".parse().unwrap();
        assert_eq!(e.get(1).rebase(&uri), "https://b:2/mcp?x=1");
        e.record(0, Outcome::Failed);
        e.record(0, Outcome::Failed);
        e.record(1, Outcome::Failed);
        e.record(1, Outcome::Failed);
        assert!(e.none_healthy());
        assert_eq!(
            e.order(None).len(),
            2,
            "none healthy: every endpoint is tried"
        );
    }
}
