//! The YAML configuration (see CONTRACT.md). Unknown keys are errors; relative paths are
//! resolved against the config file's directory.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    pub issuer: String,
    #[serde(default = "default_policies")]
    pub policies: PathBuf,
    pub inbound: Inbound,
    pub credentials: Credentials,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub tasks: Tasks,
    #[serde(default)]
    pub audit: Audit,
    #[serde(default)]
    pub tls: Option<Tls>,
    #[serde(default)]
    pub limits: Limits,
    /// The gateway's external URL (for RFC 9728 metadata); by default taken from `Host`.
    #[serde(default)]
    pub public_url: Option<String>,
    #[serde(default)]
    pub reload: Reload,
    /// The bearer token of the admin listener's operations; absent: they are disabled (403).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    #[serde(default)]
    pub log: Log,
    /// OpenTelemetry traces over OTLP/HTTP; absent: off.
    #[serde(default)]
    pub traces: Option<Traces>,
    /// The lock file of pinned MCP tool definitions (`toolgate pin` writes it). Set: a tool
    /// whose live definition is not its pin is hidden and refused.
    #[serde(default)]
    pub tool_pins: Option<PathBuf>,
    /// Agent-facing MCP endpoints over several MCP upstreams each (`/<name>`).
    #[serde(default)]
    pub mcp_endpoints: Vec<McpEndpoint>,
    /// Approvals of single calls that `@approval` policies ask for.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// Counters policies read as `context.usage.<name>`.
    #[serde(default)]
    pub usage: UsageConfig,
    /// The file it was read from, for problems found later to name their line.
    #[serde(skip)]
    pub source: Source,
}

/// A config's file and the lines of its nodes. Equal whatever they are: a reload compares
/// what the config says, not where it said it.
#[derive(Debug, Clone, Default)]
pub struct Source {
    pub path: PathBuf,
    pub lines: crate::yaml_lines::YamlLines,
}

impl PartialEq for Source {
    fn eq(&self, _: &Source) -> bool {
        true
    }
}

/// Where and how traces are sent (read at start).
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Traces {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans are posted to
    /// `<otlp_endpoint>/v1/traces`, or to the URL itself when it already ends so.
    pub otlp_endpoint: String,
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// The share of new traces recorded (0 to 1); a caller's `traceparent` decides for its own.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Sent with every export (a vendor's API key, say).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub tls: Option<OutboundTls>,
}

fn default_service_name() -> String {
    "toolgate".to_string()
}

fn default_sample_ratio() -> f64 {
    1.0
}

impl Traces {
    pub fn export_uri(&self) -> Result<http::Uri, String> {
        let base = self.otlp_endpoint.trim_end_matches('/');
        let url = if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        };
        // Not echoed: the value could hold a key.
        match url.parse::<http::Uri>() {
            Ok(uri) if uri.authority().is_some_and(|a| a.as_str().contains('@')) => Err(
                "traces.otlp_endpoint: no user info in the URL (a key goes in traces.headers)"
                    .to_string(),
            ),
            Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) => Ok(uri),
            _ => Err("traces.otlp_endpoint must be an http:// or https:// URL".to_string()),
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Err(e) = self.export_uri() {
            errors.push(e);
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            errors.push("traces.sample_ratio must be between 0 and 1".to_string());
        }
        // Headers carry a vendor's key: never in the clear across a network.
        let plain_remote = self.export_uri().is_ok_and(|uri| {
            uri.scheme_str() == Some("http")
                && !url::Url::parse(&uri.to_string())
                    .is_ok_and(|u| toolgate_credential::tls::plain_http_allowed(&u))
        });
        if plain_remote && !self.headers.is_empty() {
            errors.push(
                "traces.headers need an https:// otlp_endpoint (http:// only on loopback)"
                    .to_string(),
            );
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                errors.push(format!("traces.headers: `{name}` is not a valid header"));
            }
        }
        errors.extend(self.tls.as_ref().and_then(|tls| tls.problem("traces")));
        errors
    }
}

/// Logging (read at start): `RUST_LOG` wins over `level`; `TOOLGATE_LOG_FORMAT` over `format`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter (default `info`).
    #[serde(default)]
    pub level: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Hot reload: policies, JWKS files and the config file are watched (and SIGHUP and
/// `POST /admin/reload` reload them too).
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reload {
    #[serde(default = "default_true")]
    pub watch: bool,
    /// Changes closer together than this are taken as one.
    #[serde(default = "default_debounce")]
    pub debounce_ms: u64,
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            watch: true,
            debounce_ms: default_debounce(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_debounce() -> u64 {
    300
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    #[serde(default)]
    pub jwt: Vec<JwtIssuer>,
    /// Verified tokens remembered (so a steady agent's token is checked once).
    #[serde(default = "default_token_cache")]
    pub token_cache_size: usize,
}

fn default_token_cache() -> usize {
    toolgate_identity::CACHE_CAPACITY
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    pub issuer: String,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// An OpenID Connect discovery document naming the JWKS (`jwks_uri`). With none of
    /// jwks_file, jwks_url, discovery_url: the issuer's `/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// The claim naming the agent, as a claim path (`azp`, `client_id`, `appid`, `act.sub`).
    /// Default: RFC 8693, `act.sub` acting for `sub`, or `sub` alone.
    #[serde(default)]
    pub agent_claim: Option<String>,
    /// With `agent_claim`: the claim naming the user, where the token has it (else no user).
    #[serde(default)]
    pub user_claim: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_clock_leeway")]
    pub clock_leeway_seconds: u64,
    /// `jwks_url`: an unknown `kid` refetches it at most once per this many seconds.
    #[serde(default = "default_jwks_refetch_seconds")]
    pub jwks_refetch_seconds: u64,
    pub audiences: Vec<String>,
    /// Put before the agent and user ids this issuer asserts (default: none with one issuer,
    /// `<issuer>#` with several), so one issuer can never name another's principals.
    #[serde(default)]
    pub id_prefix: Option<String>,
}

fn default_clock_leeway() -> u64 {
    toolgate_identity::LEEWAY_SECONDS
}

/// A URL a secret or a key may travel over: https, or plain http on loopback.
fn secure_url(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| {
        u.scheme() == "https"
            || (u.scheme() == "http" && toolgate_credential::tls::plain_http_allowed(&u))
    })
}

/// The longest clock leeway allowed: beyond it an expired token lives on noticeably.
const MAX_CLOCK_LEEWAY_SECONDS: u64 = 300;

impl JwtIssuer {
    /// Where the issuer's keys come from, as `check` has made sure exactly one is said (none:
    /// the issuer's own discovery document).
    pub fn key_source(&self) -> toolgate_identity::KeySource {
        use toolgate_identity::KeySource;
        match (&self.jwks_file, &self.jwks_url, &self.discovery_url) {
            (Some(file), _, _) => KeySource::File(file.clone()),
            (None, Some(url), _) => KeySource::Url(url.clone()),
            (None, None, Some(url)) => KeySource::Discovery(url.clone()),
            (None, None, None) => KeySource::Discovery(format!(
                "{}/.well-known/openid-configuration",
                self.issuer.trim_end_matches('/')
            )),
        }
    }

    fn problems(&self) -> Vec<String> {
        let at = format!("inbound.jwt {}", self.issuer);
        let mut errors = self.key_source_problems(&at);
        if !(1..=3600).contains(&self.jwks_refetch_seconds) {
            errors.push(format!("{at}: jwks_refetch_seconds must be 1..3600"));
        }
        if self.audiences.is_empty() {
            errors.push(format!("{at}: audiences must not be empty"));
        }
        if self.clock_leeway_seconds > MAX_CLOCK_LEEWAY_SECONDS {
            errors.push(format!(
                "{at}: clock_leeway_seconds must be at most {MAX_CLOCK_LEEWAY_SECONDS}"
            ));
        }
        if self.user_claim.is_some() && self.agent_claim.is_none() {
            errors.push(format!("{at}: user_claim needs agent_claim"));
        }
        for (field, path) in [
            ("agent_claim", &self.agent_claim),
            ("user_claim", &self.user_claim),
        ] {
            if path
                .as_ref()
                .is_some_and(|p| p.split('.').any(str::is_empty))
            {
                errors.push(format!(
                    "{at}: {field} must be a claim path such as azp or act.sub"
                ));
            }
        }
        errors
    }

    /// At most one key source, fetched over https (http only on loopback): whoever can change
    /// the keys in transit can sign any token.
    fn key_source_problems(&self, at: &str) -> Vec<String> {
        let mut errors = Vec::new();
        let sources = [
            self.jwks_file.is_some(),
            self.jwks_url.is_some(),
            self.discovery_url.is_some(),
        ];
        if sources.iter().filter(|&&s| s).count() > 1 {
            errors.push(format!(
                "{at}: set at most one of jwks_file, jwks_url, discovery_url"
            ));
        }
        if !sources.contains(&true) && !self.issuer.starts_with("https://") {
            errors.push(format!(
                "{at}: set one of jwks_file, jwks_url, discovery_url (discovery at the issuer needs an https:// issuer)"
            ));
        }
        for (field, url) in [
            ("jwks_url", &self.jwks_url),
            ("discovery_url", &self.discovery_url),
        ] {
            if url.as_deref().is_some_and(|u| !secure_url(u)) {
                errors.push(format!(
                    "{at}: {field} must be an https:// URL (http:// only on loopback)"
                ));
            }
        }
        errors
    }
}

impl Inbound {
    /// Each issuer's id prefix, as `JwtIssuer::id_prefix` describes.
    pub fn id_prefixes(&self) -> Vec<String> {
        let several = self.jwt.len() > 1;
        self.jwt
            .iter()
            .map(|j| match &j.id_prefix {
                Some(prefix) => prefix.clone(),
                None if several => format!("{}#", j.issuer),
                None => String::new(),
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub signing_key: PathBuf,
    /// Earlier signing keys, still published in the JWKS after a rotation (new credentials
    /// are signed with `signing_key`).
    #[serde(default)]
    pub previous_keys: Vec<PathBuf>,
    #[serde(default = "default_ttl")]
    pub ttl_seconds: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    Rest,
    Mcp,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// The server's URL; a `command:` upstream has none.
    #[serde(default)]
    pub url: String,
    /// Several endpoints of one server, instead of `url`: balanced, passively health-checked.
    #[serde(default)]
    pub urls: Vec<String>,
    /// How calls are spread over the healthy endpoints.
    #[serde(default)]
    pub balance: Balance,
    /// When an endpoint is set aside after failing.
    #[serde(default)]
    pub passive_health: PassiveHealth,
    /// `aud` of the credentials minted for it (optional on a `command:` upstream).
    #[serde(default)]
    pub audience: String,
    /// An MCP server the gateway runs itself, spoken to over stdin/stdout, instead of `url`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// A `command:` server's environment (besides PATH, HOME, LANG and TMPDIR): `{session}`,
    /// `{agent}` and `{user}` in values are replaced, encoded to be safe in a file name.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// How a `command:` server's processes are run.
    #[serde(default)]
    pub process: ProcessConfig,
    #[serde(default = "default_kind")]
    pub kind: UpstreamKind,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Time allowed for connecting and for the upstream's response headers.
    #[serde(default = "default_upstream_timeout")]
    pub timeout_seconds: u64,
    /// Every call to this upstream must run in a task (`Toolgate-Task`).
    #[serde(default)]
    pub require_task: bool,
    /// Calls to this upstream at once; beyond, a fast 503 `overloaded` (besides the global
    /// `limits.max_in_flight`), so one slow tool cannot take every place.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// An answer (body or event stream) that sends nothing for this long is cut off.
    #[serde(default = "default_response_idle")]
    pub response_idle_seconds: u64,
    /// Where the call's credential comes from (absent: `mode: mint`).
    #[serde(default)]
    pub credential: CredentialConfig,
    /// Outbound TLS to this upstream and its token endpoint.
    #[serde(default)]
    pub tls: Option<OutboundTls>,
    /// Arguments the schema does not declare: refused (400) or forwarded unseen by policies.
    /// An MCP upstream's setting; a route's own setting wins over it.
    #[serde(default)]
    pub undeclared_arguments: Option<crate::args::Undeclared>,
    /// Non-standard agent headers passed on to this upstream (others are dropped).
    #[serde(default)]
    pub forward_headers: Vec<String>,
}

/// How an upstream's calls are spread over its healthy endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each in turn.
    #[default]
    RoundRobin,
    /// The one with the fewest calls in flight (ties in turn).
    LeastRequests,
}

/// An endpoint that fails `failures` times in a row (no connection, a 502/503) is
/// ejected: no call goes to it for `eject_seconds`, unless no endpoint is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealth {
    #[serde(default = "default_health_failures")]
    pub failures: u32,
    #[serde(default = "default_eject_seconds")]
    pub eject_seconds: u64,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            failures: default_health_failures(),
            eject_seconds: default_eject_seconds(),
        }
    }
}

fn default_health_failures() -> u32 {
    5
}

fn default_eject_seconds() -> u64 {
    30
}

/// `usage:`: the counters policies read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    #[serde(default)]
    pub counters: Vec<Counter>,
}

/// One counter: calls (or a summed argument) per key, in a sliding window.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Counter {
    /// `context.usage.<name>`.
    pub name: String,
    /// What the key is made of: agent, user, tool, upstream, task, issuer.
    #[serde(default)]
    pub per: Vec<KeyPart>,
    pub window_seconds: u64,
    /// Counted only for these actions (default: every call).
    #[serde(default)]
    pub actions: Option<Vec<String>>,
    /// Adds this declared `Long` argument instead of counting calls.
    #[serde(default)]
    pub sum: Option<String>,
    /// For the `RateLimit` headers only: the policies decide.
    #[serde(default)]
    pub limit: Option<u64>,
}

/// What a counter's key may hold: only what the gateway authenticated or classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyPart {
    Agent,
    User,
    Tool,
    Upstream,
    Task,
    Issuer,
}

impl UsageConfig {
    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut names = HashSet::new();
        for counter in &self.counters {
            let at = format!("usage.counters: {}", counter.name);
            let named = !counter.name.is_empty()
                && counter
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !named {
                errors.push(format!("{at}: name must be [a-z0-9_]"));
            }
            if !names.insert(counter.name.as_str()) {
                errors.push(format!("{at}: duplicate name"));
            }
            if counter.window_seconds == 0 || counter.window_seconds > 31 * 86_400 {
                errors.push(format!("{at}: window_seconds must be 1 to 31 days"));
            }
        }
        errors
    }
}

/// `approvals:`: how long a person has to decide, and how many may wait.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// A pending approval expires after this long; an approved one, this long after it was
    /// asked for.
    #[serde(default = "default_approval_seconds")]
    pub expires_seconds: u64,
    /// Pending approvals one agent may have (429 `too_many_pending_approvals` beyond).
    #[serde(default = "default_pending_per_agent")]
    pub max_pending_per_agent: usize,
    /// Approvals remembered at once (429 beyond).
    #[serde(default = "default_pending_total")]
    pub max_pending: usize,
    /// Each new pending approval is POSTed here (JSON), for chat or paging tools.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// The shared secret the webhook's `Toolgate-Signature` is made with (needed with
    /// `webhook_url`).
    #[serde(default)]
    pub webhook_secret_file: Option<PathBuf>,
    /// Where operators reach the console (the link a webhook message carries).
    #[serde(default)]
    pub console_url: Option<String>,
}

impl ApprovalsConfig {
    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.expires_seconds == 0 {
            errors.push("approvals.expires_seconds must be positive".to_string());
        }
        match (&self.webhook_url, &self.webhook_secret_file) {
            (Some(url), _) if !secure_url(url) => errors.push(format!(
                "approvals.webhook_url {url:?} must be an https:// URL (http:// only on loopback)"
            )),
            (Some(_), None) => errors.push(
                "approvals.webhook_url needs webhook_secret_file (its messages are signed)"
                    .to_string(),
            ),
            (None, Some(_)) => {
                errors.push("approvals.webhook_secret_file needs webhook_url".to_string())
            }
            _ => {}
        }
        errors
    }
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            expires_seconds: default_approval_seconds(),
            max_pending_per_agent: default_pending_per_agent(),
            max_pending: default_pending_total(),
            webhook_url: None,
            webhook_secret_file: None,
            console_url: None,
        }
    }
}

fn default_approval_seconds() -> u64 {
    3600
}

fn default_pending_per_agent() -> usize {
    20
}

fn default_pending_total() -> usize {
    10_000
}

/// One MCP endpoint over several MCP upstreams: agents connect to `/<name>` and see every
/// member's tools as `<upstream>__<tool>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpEndpoint {
    pub name: String,
    pub upstreams: Vec<String>,
}

/// A `command:` upstream's processes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// One process for every session: for servers that keep no per-client state. Otherwise
    /// each agent session gets its own.
    #[serde(default)]
    pub shared: bool,
    /// A session's process ends after this long without a message.
    #[serde(default = "default_process_idle")]
    pub idle_seconds: u64,
    /// The most processes of this upstream at once; a new session past it is refused (503).
    #[serde(default = "default_max_processes")]
    pub max: usize,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            shared: false,
            idle_seconds: default_process_idle(),
            max: default_max_processes(),
        }
    }
}

fn default_process_idle() -> u64 {
    300
}

fn default_max_processes() -> usize {
    16
}

/// The placeholders a `command:` upstream's `env` values may hold.
pub const ENV_PLACEHOLDERS: [&str; 3] = ["{session}", "{agent}", "{user}"];

impl UpstreamConfig {
    /// The server's endpoints: `urls`, or else `url` (none for a `command:` upstream).
    pub fn endpoint_urls(&self) -> Vec<&str> {
        if self.urls.is_empty() && !self.url.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.urls.iter().map(String::as_str).collect()
        }
    }

    /// The server's URL as one name (a token exchange's `resource`, `toolgate pin`): the
    /// first endpoint.
    pub fn primary_url(&self) -> &str {
        self.urls.first().unwrap_or(&self.url)
    }

    /// What is wrong with the endpoints of an upstream reached over HTTP.
    fn endpoint_url_problems(&self, at: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if !self.url.is_empty() && !self.urls.is_empty() {
            errors.push(format!("{at}: give url or urls, not both"));
        }
        let mut paths = HashSet::new();
        for url in self.endpoint_urls() {
            let parsed = url::Url::parse(url);
            let http = (url.starts_with("http://") || url.starts_with("https://"))
                && url.parse::<http::Uri>().is_ok();
            let Ok(parsed) = parsed.ok().filter(|_| http).ok_or(()) else {
                errors.push(format!(
                    "{at}: url {url:?} must be an http:// or https:// URL"
                ));
                continue;
            };
            if !parsed.username().is_empty() || parsed.password().is_some() {
                // It would be in metrics, logs and session ids: credentials go in `credential:`.
                errors.push(format!(
                    "{at}: url {url:?} must not hold a user or password"
                ));
            }
            paths.insert(parsed.path().trim_end_matches('/').to_string());
            // A long-lived secret, or a token for more than one call, never crosses a network
            // in the clear (a minted credential lives one call and one audience).
            let plain = parsed.scheme() == "http";
            let loopback = toolgate_credential::tls::plain_http_allowed(&parsed);
            if plain && !loopback && self.credential.mode() != CredentialMode::Mint {
                errors.push(format!(
                    "{at}: mode {} needs an https:// url (http:// only on loopback): {url}",
                    self.credential.mode().as_str()
                ));
            }
        }
        if self.endpoint_urls().is_empty() {
            errors.push(format!("{at}: url must be an http:// or https:// URL"));
        }
        if paths.len() > 1 {
            // A call's path is rendered once, then sent to whichever endpoint serves it.
            errors.push(format!("{at}: urls must all have the same path"));
        }
        let health = self.passive_health;
        if !(1..=1000).contains(&health.failures) || !(1..=86400).contains(&health.eject_seconds) {
            errors.push(format!(
                "{at}: passive_health.failures must be 1..1000 and eject_seconds 1..86400"
            ));
        }
        errors
    }

    /// What is wrong with a `command:` upstream (one the gateway runs over stdio).
    fn command_problems(&self, at: &str) -> Vec<String> {
        let mut errors = Vec::new();
        let mut refuse = |why: String| errors.push(format!("{at}: {why}"));
        let command = self.command.as_deref().unwrap_or_default();
        if command.first().is_none_or(|program| program.is_empty()) {
            refuse("command must name a program".into());
        }
        if command.iter().any(|part| part.contains('\0')) {
            refuse("command must not hold a NUL byte".into());
        }
        if !self.url.is_empty() || !self.urls.is_empty() {
            refuse("give url or command, not both".into());
        }
        if self.kind != UpstreamKind::Mcp {
            refuse("command is for kind: mcp upstreams".into());
        }
        if self.credential.mode == Some(CredentialMode::Mint) {
            refuse("credential mode mint needs a url: a process has no headers (use mode: inject with env_var)".into());
        }
        if matches!(
            self.credential.mode,
            Some(CredentialMode::Exchange | CredentialMode::ClientCredentials)
        ) {
            refuse("credential modes exchange and client_credentials need a url".into());
        }
        if self.tls.is_some() {
            refuse("tls does not apply to a command".into());
        }
        if !self.forward_headers.is_empty() {
            refuse("forward_headers does not apply to a command".into());
        }
        for (name, value) in &self.env {
            if !env_name(name) {
                refuse(format!("env: {name:?} is not a variable name"));
            }
            if value.contains('\0') {
                refuse(format!("env.{name} must not hold a NUL byte"));
            }
            let per_session = ENV_PLACEHOLDERS.iter().any(|p| value.contains(p));
            if per_session && self.process.shared {
                refuse(format!(
                    "env.{name}: {{session}}, {{agent}} and {{user}} need a process per session (process.shared is true)"
                ));
            }
        }
        if self.process.idle_seconds == 0 {
            refuse("process.idle_seconds must be positive".into());
        }
        if self.process.max == 0 {
            refuse("process.max must be positive".into());
        }
        errors
    }

    /// The secret, key and TLS files this upstream reads (watched, and read again on reload).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        let c = &self.credential;
        let tls = self.tls.as_ref();
        [&c.secret_file, &c.client_secret_file, &c.private_key]
            .into_iter()
            .chain(tls.map(|t| &t.ca_file))
            .chain(tls.map(|t| &t.client_cert))
            .chain(tls.map(|t| &t.client_key))
            .filter_map(|p| p.as_deref())
    }
}

/// How a forwarded call is credentialed (CONTRACT.md, `credential:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CredentialMode {
    /// toolgate's own per-call ES256 token.
    #[default]
    Mint,
    /// A static secret of the upstream's, injected after an allow.
    Inject,
    /// RFC 8693 token exchange at the upstream's STS.
    Exchange,
    /// OAuth 2.0 client credentials at the upstream's token endpoint.
    ClientCredentials,
}

impl CredentialMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialMode::Mint => "mint",
            CredentialMode::Inject => "inject",
            CredentialMode::Exchange => "exchange",
            CredentialMode::ClientCredentials => "client_credentials",
        }
    }
}

/// `inject` with `scheme:` instead of `header:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InjectScheme {
    Bearer,
    Basic,
}

/// The scope asked of a token endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScopeFrom {
    /// The tool action plus the `@grants` of the permits that decided.
    #[default]
    Decision,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// Absent: `mint`, except on a `command:` upstream, which then gets no credential.
    #[serde(default)]
    pub mode: Option<CredentialMode>,
    /// inject on a `command:` upstream: the environment variable that carries the secret.
    #[serde(default)]
    pub env_var: Option<String>,
    /// inject: the header that carries the secret (or `scheme`).
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub scheme: Option<InjectScheme>,
    /// inject: the secret, from a file or an environment variable.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_env: Option<String>,
    /// exchange, client_credentials.
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// `private_key_jwt` client authentication (ES256, PKCS#8 PEM).
    #[serde(default)]
    pub private_key: Option<PathBuf>,
    #[serde(default)]
    pub scope_from: ScopeFrom,
    /// How long the token endpoint may take (503 beyond).
    #[serde(default = "default_token_timeout")]
    pub timeout_seconds: u64,
}

fn default_token_timeout() -> u64 {
    10
}

/// Outbound TLS settings of one upstream (and its token endpoint).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboundTls {
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl OutboundTls {
    fn paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        [
            &mut self.ca_file,
            &mut self.client_cert,
            &mut self.client_key,
        ]
        .into_iter()
        .flatten()
    }

    fn problem(&self, at: &str) -> Option<String> {
        (self.client_cert.is_some() != self.client_key.is_some())
            .then(|| format!("{at}: tls.client_cert and tls.client_key go together"))
    }

    pub fn files(&self) -> toolgate_credential::tls::TlsFiles {
        toolgate_credential::tls::TlsFiles {
            ca_file: self.ca_file.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        }
    }
}

impl CredentialConfig {
    /// The mode in force (`mint` unless said).
    pub fn mode(&self) -> CredentialMode {
        self.mode.unwrap_or_default()
    }

    /// What is wrong with this upstream's `credential:` for its mode.
    #[allow(clippy::too_many_lines)] // config checking, not the request path: one rule a line
    fn problems(&self, upstream: &str, runs_command: bool) -> Vec<String> {
        let mut errors = Vec::new();
        let at = format!("upstream {upstream}: credential");
        let mode = self.mode().as_str();
        let set = |present: bool, name: &str, errors: &mut Vec<String>| {
            if present {
                errors.push(format!("{at}.{name} does not apply to mode {mode}"));
            }
        };
        let one_of = |count: usize, names: &str, errors: &mut Vec<String>| {
            if count != 1 {
                errors.push(format!("{at}: mode {mode} needs exactly one of {names}"));
            }
        };
        let inject = self.mode() == CredentialMode::Inject;
        let oauth = matches!(
            self.mode(),
            CredentialMode::Exchange | CredentialMode::ClientCredentials
        );
        if inject && runs_command {
            // A process's secret goes in its environment: there are no headers.
            set(self.header.is_some(), "header", &mut errors);
            set(self.scheme.is_some(), "scheme", &mut errors);
            match self.env_var.as_deref() {
                None => errors.push(format!("{at}: mode inject on a command needs env_var")),
                Some(name) if !env_name(name) => {
                    errors.push(format!("{at}.env_var {name:?} is not a variable name"))
                }
                Some(_) => {}
            }
        } else if inject {
            set(self.env_var.is_some(), "env_var", &mut errors);
            one_of(
                self.header.is_some() as usize + self.scheme.is_some() as usize,
                "header, scheme",
                &mut errors,
            );
        } else {
            set(self.env_var.is_some(), "env_var", &mut errors);
        }
        if inject {
            one_of(
                self.secret_file.is_some() as usize + self.secret_env.is_some() as usize,
                "secret_file, secret_env",
                &mut errors,
            );
            if let Some(header) = &self.header {
                match http::HeaderName::from_bytes(header.as_bytes()) {
                    Err(_) => errors.push(format!("{at}.header {header:?} is not a header name")),
                    Ok(name) if crate::upstream::never_injected(&name) => errors.push(format!(
                        "{at}.header {header:?} is one toolgate sets or strips itself"
                    )),
                    Ok(_) => {}
                }
            }
        } else {
            set(self.header.is_some(), "header", &mut errors);
            set(self.scheme.is_some(), "scheme", &mut errors);
            set(self.secret_file.is_some(), "secret_file", &mut errors);
            set(self.secret_env.is_some(), "secret_env", &mut errors);
        }
        if oauth {
            match &self.token_endpoint {
                None => errors.push(format!("{at}: mode {mode} needs token_endpoint")),
                Some(url) if secure_url(url) => {}
                Some(url) => errors.push(format!(
                    "{at}.token_endpoint {url:?} must be an https:// URL (http:// only on loopback)"
                )),
            }
            if self.client_id.as_deref().is_none_or(str::is_empty) {
                errors.push(format!("{at}: mode {mode} needs client_id"));
            }
            one_of(
                self.client_secret_file.is_some() as usize
                    + self.client_secret_env.is_some() as usize
                    + self.private_key.is_some() as usize,
                "client_secret_file, client_secret_env, private_key",
                &mut errors,
            );
            if !(1..=300).contains(&self.timeout_seconds) {
                errors.push(format!("{at}.timeout_seconds must be 1..300"));
            }
        } else {
            set(self.token_endpoint.is_some(), "token_endpoint", &mut errors);
            set(self.client_id.is_some(), "client_id", &mut errors);
            set(
                self.client_secret_file.is_some(),
                "client_secret_file",
                &mut errors,
            );
            set(
                self.client_secret_env.is_some(),
                "client_secret_env",
                &mut errors,
            );
            set(self.private_key.is_some(), "private_key", &mut errors);
        }
        errors
    }
}

fn default_response_idle() -> u64 {
    300
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub tool: String,
    pub method: String,
    pub path: String,
    /// Calls to this tool must run in a task (`Toolgate-Task`).
    #[serde(default)]
    pub require_task: bool,
    /// Where the upstream reads the declared arguments that are not path parameters. Default:
    /// `query` for GET, HEAD, DELETE and OPTIONS, `body` otherwise.
    #[serde(default)]
    pub arguments: Option<ArgumentsIn>,
    /// A path parameter may hold a `.`. Off by default: Rails and Spring read `42.json` as
    /// `42` in JSON format, not the `42.json` the policy would see.
    #[serde(default)]
    pub dots_in_params: bool,
    /// Arguments the schema does not declare: refused (400, the default) or forwarded.
    #[serde(default)]
    pub undeclared_arguments: Option<crate::args::Undeclared>,
    /// Request headers the API reads as arguments (OpenAPI `in: header`), by their argument
    /// name: decided like the others and forwarded as decided.
    #[serde(default)]
    pub header_arguments: Vec<String>,
    /// Non-standard agent headers passed on for this route (besides the upstream's).
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// An idempotent route's call answered 502 or 503 is tried again on another endpoint.
    #[serde(default)]
    pub retry: bool,
}

/// Where an upstream reads a route's arguments besides the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ArgumentsIn {
    Query,
    Body,
}

impl RouteConfig {
    pub fn arguments_in(&self) -> ArgumentsIn {
        self.arguments
            .unwrap_or_else(|| match self.method.to_ascii_uppercase().as_str() {
                "GET" | "HEAD" | "DELETE" | "OPTIONS" => ArgumentsIn::Query,
                _ => ArgumentsIn::Body,
            })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tasks {
    #[serde(default = "default_task_store")]
    pub store: String,
    /// A file holding the Redis password (a mounted Secret), so the config itself holds
    /// none and can live in a ConfigMap.
    #[serde(default)]
    pub store_password_file: Option<PathBuf>,
    /// Live tasks one agent may have started (429 `too_many_tasks` beyond).
    #[serde(default = "default_per_agent")]
    pub max_active_per_agent: usize,
    /// Tasks remembered at once, live or ended, over all replicas with Redis (503
    /// `task_store_full`).
    #[serde(default = "default_total_tasks")]
    pub max_tasks: usize,
    /// Credentials recorded in one task (429 `task_credential_limit` beyond).
    #[serde(default = "default_credentials_per_task")]
    pub max_credentials_per_task: usize,
    /// The longest `intent` a task may state (400 beyond).
    #[serde(default = "default_intent_bytes")]
    pub max_intent_bytes: usize,
    /// Open revocation feeds (`/v1/revocations`, `/admin/revocations`); 503 `feed_full` beyond.
    #[serde(default = "default_feed_subscribers")]
    pub max_feed_subscribers: usize,
}

impl Tasks {
    /// The store as `Store::open` takes it: the URL with the password file's password in it.
    pub fn store_url(&self) -> Result<String, String> {
        let Some(file) = &self.store_password_file else {
            return Ok(self.store.clone());
        };
        let at = || format!("tasks.store_password_file {}", file.display());
        let password = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", at()))?;
        let password = password.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(format!("{}: empty", at()));
        }
        let mut url = url::Url::parse(&self.store).map_err(|e| format!("tasks.store: {e}"))?;
        url.set_password(Some(password))
            .map_err(|()| format!("tasks.store: {} takes no password", url.scheme()))?;
        Ok(url.to_string())
    }
}

fn default_feed_subscribers() -> usize {
    1000
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks {
            store: default_task_store(),
            store_password_file: None,
            max_active_per_agent: default_per_agent(),
            max_tasks: default_total_tasks(),
            max_credentials_per_task: default_credentials_per_task(),
            max_intent_bytes: default_intent_bytes(),
            max_feed_subscribers: default_feed_subscribers(),
        }
    }
}

impl Tasks {
    pub fn bounds(&self) -> toolgate_tasks::Bounds {
        toolgate_tasks::Bounds {
            per_agent: self.max_active_per_agent,
            total: self.max_tasks,
            credentials_per_task: self.max_credentials_per_task,
        }
    }
}

fn default_per_agent() -> usize {
    toolgate_tasks::Bounds::default().per_agent
}

fn default_total_tasks() -> usize {
    toolgate_tasks::Bounds::default().total
}

fn default_credentials_per_task() -> usize {
    toolgate_tasks::Bounds::default().credentials_per_task
}

fn default_intent_bytes() -> usize {
    4096
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// A file to append to, or "-" for stdout.
    #[serde(default = "default_audit_path")]
    pub path: String,
    /// Records waiting for the writer; beyond this they are dropped and counted, never waited for.
    #[serde(default = "default_audit_buffer")]
    pub buffer: usize,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            path: default_audit_path(),
            buffer: default_audit_buffer(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The largest body read to find arguments (413 beyond).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// The largest total size of request headers (431 beyond).
    #[serde(default = "default_max_header")]
    pub max_header_bytes: usize,
    /// Requests handled at once on the agent listener; beyond, a fast 503 with `Retry-After`
    /// before any work (token, policy, signature).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Request headers at most (431 beyond).
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// The longest request URI (414 beyond).
    #[serde(default = "default_max_uri")]
    pub max_uri_bytes: usize,
    /// HTTP/2 streams open at once on one connection; a client opening more waits.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    /// A request's headers must arrive within this (HTTP/1.1: also the keep-alive wait for
    /// the next request); else the connection closes.
    #[serde(default = "default_thirty")]
    pub header_read_seconds: u64,
    /// A request body the gateway reads must arrive within this; else 408.
    #[serde(default = "default_thirty")]
    pub body_read_seconds: u64,
    /// A connection with no bytes in either direction for this long is closed (idle
    /// keep-alive, silent HTTP/2 connections, and one that never sends a byte).
    #[serde(default = "default_idle")]
    pub idle_seconds: u64,
    /// Open connections per listener; beyond, a new connection is closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time allowed to connect to an upstream (502 beyond).
    #[serde(default = "default_connect")]
    pub upstream_connect_seconds: u64,
    /// How long, at shutdown, open requests may take to finish before connections are closed.
    #[serde(default = "default_thirty")]
    pub drain_seconds: u64,
    /// An event stream (an upstream's or the revocation feed) quiet for this long gets a
    /// comment line, so neither the idle limit nor a proxy on the way cuts it.
    #[serde(default = "default_keepalive")]
    pub sse_keepalive_seconds: u64,
}

fn default_keepalive() -> u64 {
    15
}

fn default_connect() -> u64 {
    5
}

fn default_max_connections() -> usize {
    10_000
}

fn default_thirty() -> u64 {
    30
}

fn default_idle() -> u64 {
    300
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: default_max_body(),
            max_header_bytes: default_max_header(),
            max_in_flight: default_max_in_flight(),
            max_headers: default_max_headers(),
            max_uri_bytes: default_max_uri(),
            max_concurrent_streams: default_max_streams(),
            header_read_seconds: default_thirty(),
            body_read_seconds: default_thirty(),
            idle_seconds: default_idle(),
            max_connections: default_max_connections(),
            upstream_connect_seconds: default_connect(),
            drain_seconds: default_thirty(),
            sse_keepalive_seconds: default_keepalive(),
        }
    }
}

fn default_max_headers() -> usize {
    // Below hyper's own HTTP/1.1 parser limit (100), so the refusal is ours, in JSON.
    64
}

fn default_max_uri() -> usize {
    8192
}

fn default_max_streams() -> u32 {
    100
}

fn default_max_in_flight() -> usize {
    1024
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_policies() -> PathBuf {
    PathBuf::from("policies")
}
fn default_ttl() -> u64 {
    60
}
fn default_kind() -> UpstreamKind {
    UpstreamKind::Rest
}
fn default_upstream_timeout() -> u64 {
    30
}
fn default_jwks_refetch_seconds() -> u64 {
    toolgate_identity::REFETCH_INTERVAL.as_secs()
}

fn default_task_store() -> String {
    "memory".into()
}
fn default_audit_path() -> String {
    "-".into()
}
fn default_audit_buffer() -> usize {
    8192
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_max_header() -> usize {
    16 << 10
}

/// First path segments toolgate serves itself on the agent listener.
pub const RESERVED_PATHS: [&str; 3] = ["v1", "oauth2", ".well-known"];

/// The longest a minted credential may live.
pub const MAX_TTL_SECONDS: u64 = 3600;

impl Config {
    /// The sections that differ from `other` and that only a restart applies (everything but
    /// `upstreams`, which reloads).
    pub fn needs_restart(&self, other: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut differs = |name: &'static str, same: bool| {
            if !same {
                changed.push(name);
            }
        };
        differs("listen", self.listen == other.listen);
        differs("admin_listen", self.admin_listen == other.admin_listen);
        differs("issuer", self.issuer == other.issuer);
        differs("policies", self.policies == other.policies);
        differs("inbound", self.inbound == other.inbound);
        differs("credentials", self.credentials == other.credentials);
        differs("tasks", self.tasks == other.tasks);
        differs("audit", self.audit == other.audit);
        differs("tls", self.tls == other.tls);
        differs("limits", self.limits == other.limits);
        differs("public_url", self.public_url == other.public_url);
        differs("reload", self.reload == other.reload);
        differs("log", self.log == other.log);
        differs("traces", self.traces == other.traces);
        differs(
            "admin_token_file",
            self.admin_token_file == other.admin_token_file,
        );
        // The lock file itself is re-read at reload; which file (or whether any) is not.
        differs("tool_pins", self.tool_pins == other.tool_pins);
        differs("approvals", self.approvals == other.approvals);
        differs("usage", self.usage == other.usage);
        changed
    }

    /// Reads, parses, checks and resolves a config file.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let mut config: Config = serde_norway::from_str(&text).map_err(|e| {
            let line = e.location().map_or(1, |l| l.line());
            // serde's message ends with the place it names at the front.
            let message = e.to_string();
            let message = match message.rfind(" at line ") {
                Some(at) if e.location().is_some() => message[..at].to_string(),
                _ => message,
            };
            format!("{}:{line}: {message}", path.display())
        })?;
        config.source = Source {
            path: path.to_path_buf(),
            lines: crate::yaml_lines::YamlLines::of(&text),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.check().map_err(|errors| {
            errors
                .iter()
                .map(|e| config.locate(e))
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        Ok(config)
    }

    /// `file:line: problem`, the line found from the config path the problem opens with:
    /// `upstream NAME[: tool T | : credential | : tls]`, `inbound.jwt ISSUER`, or a dotted key
    /// such as `limits.max_in_flight`.
    pub fn locate(&self, problem: &str) -> String {
        let line = self.source.lines.line(&self.place_of(problem)).unwrap_or(1);
        format!("{}:{line}: {problem}", self.source.path.display())
    }

    fn place_of(&self, problem: &str) -> String {
        // A name (an issuer is a URL: its own `:` are not the end) up to `: ` or a space.
        let named = |prefix: &str| {
            let rest = problem.strip_prefix(prefix)?;
            let end = [rest.find(": "), rest.find(' ')]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(rest.len());
            Some((&rest[..end], &rest[end..]))
        };
        if let Some((name, rest)) = named("upstream ") {
            let Some(i) = self.upstreams.iter().position(|u| u.name == name) else {
                return "upstreams".into();
            };
            let tool = rest
                .strip_prefix(": tool ")
                .map(|t| t.trim_start_matches('`').split(['`', ':', ' ']).next());
            if let Some(Some(tool)) = tool {
                if let Some(j) = self.upstreams[i].routes.iter().position(|r| r.tool == tool) {
                    return format!("upstreams.{i}.routes.{j}");
                }
            }
            for field in ["credential", "tls"] {
                if rest.starts_with(&format!(": {field}")) {
                    return format!("upstreams.{i}.{field}");
                }
            }
            return format!("upstreams.{i}");
        }
        if let Some((issuer, rest)) = named("inbound.jwt ") {
            if let Some(k) = self.inbound.jwt.iter().position(|j| j.issuer == issuer) {
                let field = rest
                    .strip_prefix(": ")
                    .and_then(|r| r.split([' ', ':']).next());
                return match field {
                    Some(field) => format!("inbound.jwt.{k}.{field}"),
                    None => format!("inbound.jwt.{k}"),
                };
            }
        }
        let key = problem.split([':', ' ']).next().unwrap_or_default();
        key.to_string()
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.policies);
        resolve(&mut self.credentials.signing_key);
        self.credentials.previous_keys.iter_mut().for_each(resolve);
        for jwt in &mut self.inbound.jwt {
            if let Some(f) = jwt.jwks_file.as_mut() {
                resolve(f);
            }
        }
        if let Some(p) = self.admin_token_file.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.tasks.store_password_file.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.tool_pins.as_mut() {
            resolve(p);
        }
        for upstream in &mut self.upstreams {
            let credential = &mut upstream.credential;
            for path in [
                &mut credential.secret_file,
                &mut credential.client_secret_file,
                &mut credential.private_key,
            ]
            .into_iter()
            .flatten()
            {
                resolve(path);
            }
            if let Some(tls) = upstream.tls.as_mut() {
                tls.paths_mut().for_each(resolve);
            }
        }
        if let Some(tls) = self.traces.as_mut().and_then(|t| t.tls.as_mut()) {
            tls.paths_mut().for_each(resolve);
        }
        if let Some(tls) = self.tls.as_mut() {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
        }
        if self.audit.path != "-" {
            let mut p = PathBuf::from(&self.audit.path);
            resolve(&mut p);
            self.audit.path = p.to_string_lossy().into_owned();
        }
    }

    /// Everything wrong with the config that the types cannot say.
    #[allow(clippy::too_many_lines)] // config checking, not the request path: one rule a line
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if self.inbound.jwt.is_empty() {
            errors
                .push("inbound.jwt: no issuer configured, every call would be refused".to_string());
        }
        for (name, value) in [
            ("max_in_flight", self.limits.max_in_flight),
            ("max_headers", self.limits.max_headers),
            ("max_uri_bytes", self.limits.max_uri_bytes),
            (
                "max_concurrent_streams",
                self.limits.max_concurrent_streams as usize,
            ),
            (
                "header_read_seconds",
                self.limits.header_read_seconds as usize,
            ),
            ("body_read_seconds", self.limits.body_read_seconds as usize),
            ("idle_seconds", self.limits.idle_seconds as usize),
            (
                "sse_keepalive_seconds",
                self.limits.sse_keepalive_seconds as usize,
            ),
            ("max_connections", self.limits.max_connections),
            (
                "upstream_connect_seconds",
                self.limits.upstream_connect_seconds as usize,
            ),
            (
                "tasks.max_active_per_agent",
                self.tasks.max_active_per_agent,
            ),
            ("tasks.max_tasks", self.tasks.max_tasks),
            (
                "tasks.max_credentials_per_task",
                self.tasks.max_credentials_per_task,
            ),
            ("tasks.max_intent_bytes", self.tasks.max_intent_bytes),
            (
                "tasks.max_feed_subscribers",
                self.tasks.max_feed_subscribers,
            ),
            ("inbound.token_cache_size", self.inbound.token_cache_size),
        ] {
            if value == 0 {
                let name = if name.contains('.') {
                    name.to_string()
                } else {
                    format!("limits.{name}")
                };
                errors.push(format!("{name} must be at least 1"));
            }
        }
        // A batch's request takes one line, then each message one more, all at once.
        if self.audit.buffer <= toolgate_mcp::MAX_BATCH {
            errors.push(format!(
                "audit.buffer must be more than {} (one MCP batch and its request)",
                toolgate_mcp::MAX_BATCH
            ));
        }
        for jwt in &self.inbound.jwt {
            errors.extend(jwt.problems());
        }
        // Distinct prefixes: an id then belongs to the issuer with the longest prefix of it,
        // and authentication refuses an issuer asserting ids under another's.
        let prefixes = self.inbound.id_prefixes();
        for (i, a) in prefixes.iter().enumerate() {
            if prefixes[i + 1..].contains(a) {
                errors.push(format!(
                    "inbound.jwt: two issuers share the id prefix `{a}`, so they could name the same principal"
                ));
            }
        }
        if self.credentials.ttl_seconds == 0 || self.credentials.ttl_seconds > MAX_TTL_SECONDS {
            errors.push(format!(
                "credentials.ttl_seconds must be between 1 and {MAX_TTL_SECONDS}"
            ));
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            errors.push("admin_listen must differ from listen".to_string());
        }
        if self.tasks.store != "memory" && !self.tasks.store.starts_with("redis://") {
            errors.push(format!(
                "tasks.store: `{}` is neither memory nor redis://host:port",
                toolgate_tasks::redacted(&self.tasks.store)
            ));
        }
        if self.tasks.store_password_file.is_some() {
            let url = url::Url::parse(&self.tasks.store);
            if url.as_ref().map_or(true, |u| u.password().is_some()) {
                errors.push(
                    "tasks.store_password_file: needs a redis:// store without a password of its own"
                        .to_string(),
                );
            }
        }
        if let Some(traces) = &self.traces {
            errors.extend(traces.problems());
        }
        let mut names = HashSet::new();
        for up in &self.upstreams {
            let at = format!("upstream {}", up.name);
            if !valid_name(&up.name) {
                errors.push(format!("{at}: name must be non-empty [A-Za-z0-9_-]"));
            }
            if RESERVED_PATHS.contains(&up.name.as_str()) {
                errors.push(format!(
                    "{at}: the name is reserved for toolgate's own endpoints"
                ));
            }
            if !names.insert(up.name.as_str()) {
                errors.push(format!("{at}: duplicate name"));
            }
            if up.command.is_some() {
                errors.extend(up.command_problems(&at));
            } else {
                errors.extend(up.endpoint_url_problems(&at));
                if up.audience.is_empty() {
                    errors.push(format!("{at}: audience must not be empty"));
                }
            }
            if up.timeout_seconds == 0 {
                errors.push(format!("{at}: timeout_seconds must be positive"));
            }
            errors.extend(up.credential.problems(&up.name, up.command.is_some()));
            errors.extend(up.tls.as_ref().and_then(|tls| tls.problem(&at)));
            if up.kind == UpstreamKind::Mcp && !up.routes.is_empty() {
                errors.push(format!("{at}: routes are for rest upstreams only"));
            }
            for route in &up.routes {
                if !valid_name(&route.tool) {
                    errors.push(format!(
                        "{at}: tool `{}`: name must be [A-Za-z0-9_-]",
                        route.tool
                    ));
                }
                if route.method.parse::<http::Method>().is_err() {
                    errors.push(format!(
                        "{at}: tool {}: invalid method `{}`",
                        route.tool, route.method
                    ));
                }
                let idempotent = route
                    .method
                    .parse::<http::Method>()
                    .is_ok_and(|m| m.is_idempotent());
                if route.retry && !idempotent {
                    errors.push(format!(
                        "{at}: tool {}: retry is for idempotent methods only (GET, HEAD, OPTIONS, PUT, DELETE): a {} may have acted before its 502",
                        route.tool, route.method
                    ));
                }
                if let Err(e) = crate::routes::Template::parse(&route.path) {
                    errors.push(format!("{at}: tool {}: {e}", route.tool));
                }
                for name in &route.header_arguments {
                    if let Err(why) = header_argument_name(name) {
                        errors.push(format!(
                            "{at}: tool {}: header argument `{name}`: {why}",
                            route.tool
                        ));
                    }
                }
            }
        }
        errors.extend(self.endpoint_problems());
        errors.extend(self.approvals.problems());
        errors.extend(self.usage.problems());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// What is wrong with `mcp_endpoints:`.
    fn endpoint_problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut names = HashSet::new();
        for endpoint in &self.mcp_endpoints {
            let at = format!("mcp_endpoints: {}", endpoint.name);
            if !valid_name(&endpoint.name) || RESERVED_PATHS.contains(&endpoint.name.as_str()) {
                errors.push(format!(
                    "{at}: name must be [A-Za-z0-9_-], not a reserved path"
                ));
            }
            if self.upstreams.iter().any(|u| u.name == endpoint.name) {
                errors.push(format!(
                    "{at}: an upstream has this name (both would be /{})",
                    endpoint.name
                ));
            }
            if !names.insert(endpoint.name.as_str()) {
                errors.push(format!("{at}: duplicate name"));
            }
            if endpoint.upstreams.is_empty() {
                errors.push(format!(
                    "{at}: upstreams must name at least one MCP upstream"
                ));
            }
            let mut members = HashSet::new();
            for member in &endpoint.upstreams {
                match self.upstreams.iter().find(|u| &u.name == member) {
                    None => errors.push(format!("{at}: no upstream named {member}")),
                    Some(up) if up.kind != UpstreamKind::Mcp => {
                        errors.push(format!("{at}: {member} is not kind: mcp"))
                    }
                    Some(_) => {}
                }
                // `<upstream>__<tool>` is read back at the first `__`.
                if member.contains("__") || member.ends_with('_') {
                    errors.push(format!(
                        "{at}: {member}: a member's name must not hold `__` nor end in `_`"
                    ));
                }
                if !members.insert(member.as_str()) {
                    errors.push(format!("{at}: {member} is named twice"));
                }
            }
        }
        errors
    }
}

/// Whether a request header can carry an argument: one the gateway forwards as it sets it.
/// Refused: names with `_` (dropped on the way out: CGI-style servers read them as `-`), the
/// agent's credentials and the headers the gateway removes or sets itself, hop-by-hop ones, the
/// body's own (`Content-Type`, `Content-Length`, `Content-Encoding`), and MCP's own (dropped on
/// REST upstreams).
pub fn header_argument_name(name: &str) -> Result<(), &'static str> {
    let Ok(parsed) = http::HeaderName::from_bytes(name.as_bytes()) else {
        return Err("not a header name");
    };
    let lower = parsed.as_str();
    if crate::upstream::never_injected(&parsed)
        || matches!(
            lower,
            "content-encoding" | "authorization" | "last-event-id"
        )
        || lower.starts_with("mcp-")
    {
        return Err("the gateway removes or sets this header itself");
    }
    Ok(())
}

/// A portable environment variable name.
fn env_name(name: &str) -> bool {
    name.bytes().next().is_some_and(|b| !b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
