//! The toolgate server: listeners, the call pipeline, the upstream pool, admin endpoints,
//! metrics, audit and configuration.
#![forbid(unsafe_code)]
#![warn(clippy::too_many_lines)]

mod admin;
pub mod answer;
mod approvals;
pub mod args;
pub mod audit;
pub mod config;
mod conn_io;
mod console;
mod endpoints;
mod federation;
mod mcp;
pub mod metrics;
pub mod pins;
mod pipeline;
mod rest;
pub mod routes;
mod server;
mod stdio;
mod usage;
pub use stdio::LocalServer;
mod tasks;
pub mod trace;
mod upstream;
mod watch;
pub mod yaml_lines;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;
use toolgate_credential::{Minter, SigningKey};
use toolgate_identity::{Authenticator, IssuerConfig, KeySource};
use toolgate_policy::{LoadCache, PolicyEngine};

pub use admin::ReloadReport;
pub use config::Config;
pub use pipeline::{JWKS_PATH, TASK_HEADER};
pub use server::{Running, Shutdown};

use audit::{AuditSink, AuditWriter};
use metrics::Metrics;
use routes::RouteTable;
use upstream::{HttpClient, Upstream};

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    /// Itself, for the federated endpoints' calls to their members (made as agents' calls).
    me: std::sync::Weak<Gateway>,
    /// The config the gateway started with; only `upstreams` reloads (into `routing`).
    config: Config,
    config_path: Option<PathBuf>,
    policy: ArcSwap<PolicyEngine>,
    policy_dir: PathBuf,
    /// What the last load parsed and validated; held during a reload, so reloads run one at a time.
    load_cache: tokio::sync::Mutex<LoadCache>,
    auth: Authenticator,
    minter: Arc<Minter>,
    /// Routes and upstreams: swapped whole when the config's `upstreams` section reloads.
    routing: ArcSwap<Routing>,
    client: HttpClient,
    metrics: Arc<Metrics>,
    audit: AuditSink,
    /// Set at shutdown: the listeners stop accepting and endless streams (the revocation
    /// feed) end, so draining finishes.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// Places on the revocation feed (`tasks.max_feed_subscribers`).
    feed_places: Arc<tokio::sync::Semaphore>,
    /// Taken by `finish_audit` at shutdown.
    audit_writer: std::sync::Mutex<Option<AuditWriter>>,
    tasks: toolgate_tasks::Store,
    /// The admin listener's bearer token (`admin_token_file`); None: admin operations are off.
    admin_token: Option<String>,
    ready: AtomicBool,
    /// Off unless the config has `traces:`.
    tracer: Option<trace::Tracer>,
    /// MCP tools' input schemas, as their servers listed them (for `ambiguous_argument`).
    tool_schemas: Arc<mcp::ToolSchemas>,
    /// What the federated endpoints learned from their members' listings.
    federation: federation::Learned,
    /// The pinned tool definitions (`tool_pins:`), re-read at every reload; None: not pinned.
    pins: arc_swap::ArcSwapOption<pins::ToolPins>,
}

/// Why the gateway did not start: what failed, with its cause kept as the error's source
/// where the part that failed gives one (`answer::error_chain` writes it out on one line).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config, policies, schema or entities (each problem as `file:line: message`).
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("signing key {}", path.display())]
    SigningKey {
        path: PathBuf,
        #[source]
        source: KeyFileError,
    },
    #[error("inbound: {0}")]
    Inbound(String),
    #[error("admin_token_file {}: {why}", path.display())]
    AdminToken { path: PathBuf, why: String },
    #[error("tasks.store")]
    TaskStore(#[source] toolgate_tasks::StoreError),
    #[error("outbound TLS")]
    OutboundTls(#[source] toolgate_credential::tls::TlsError),
    #[error("upstreams")]
    Upstreams(#[source] upstream::SetupError),
    #[error("traces: {0}")]
    Traces(String),
    #[error("audit {path}")]
    Audit {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a key file was not read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("not a usable key")]
    Parse(#[source] toolgate_credential::CredentialError),
}

fn load_signing_key(path: &std::path::Path) -> Result<SigningKey, StartError> {
    let failed = |source| StartError::SigningKey {
        path: path.to_path_buf(),
        source,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| failed(KeyFileError::Read(e)))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| failed(KeyFileError::Parse(e)))
}

/// The admin token: the file's text without surrounding white space; at least 16 characters,
/// so a placeholder never guards the admin listener.
fn read_admin_token(path: &std::path::Path) -> Result<String, StartError> {
    let refused = |why: String| StartError::AdminToken {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| refused(e.to_string()))?;
    let token = text.trim();
    if token.len() < 16 || token.contains(char::is_whitespace) {
        return Err(refused(
            "the token must be at least 16 characters, without spaces".into(),
        ));
    }
    Ok(token.to_string())
}

/// What `serve` reads from local files at start beyond policies and signing keys, read as it
/// reads them: the inbound JWKS files, the admin token, the audit file's folder. (Network
/// sources, `jwks_url` and the task store, are not reached by `check`.)
fn local_files_problems(config: &Config) -> Vec<String> {
    let mut errors = Vec::new();
    for jwt in &config.inbound.jwt {
        let Some(jwks) = &jwt.jwks_file else { continue };
        let read = std::fs::read(jwks).map_err(|e| format!("cannot read it: {e}"));
        if let Err(why) = read.and_then(|doc| toolgate_identity::KeySet::from_jwks(&doc)) {
            let issuer = &jwt.issuer;
            errors.push(format!(
                "inbound.jwt {issuer}: jwks_file {}: {why}",
                jwks.display()
            ));
        }
    }
    if let Some(path) = &config.admin_token_file {
        if let Err(e) = read_admin_token(path) {
            errors.push(e.to_string());
        }
    }
    match config.tasks.store_url() {
        Ok(url) if url.starts_with("redis://") => {
            if let Err(why) = toolgate_tasks::RedisStore::check_url(&url) {
                errors.push(format!("tasks.store: {why}"));
            }
        }
        Ok(_) => {}
        Err(why) => errors.push(why),
    }
    if let Some(Err(why)) = config.tool_pins.as_deref().map(pins::ToolPins::load) {
        errors.push(why);
    }
    if let Some(tls) = &config.tls {
        if let Err(why) = server::tls_acceptor(&tls.cert, &tls.key) {
            errors.push(format!("tls: {why}"));
        }
    }
    if config.audit.path != "-" {
        let audit = std::path::Path::new(&config.audit.path);
        let folder = audit.parent().filter(|p| !p.as_os_str().is_empty());
        if audit.is_dir() {
            errors.push(format!(
                "audit.path {}: a folder, not a file (serve would not start)",
                audit.display()
            ));
        }
        if folder.is_some_and(|f| !f.is_dir()) {
            errors.push(format!(
                "audit.path {}: its folder does not exist (serve would not start)",
                audit.display()
            ));
        }
    }
    errors
}

/// Loads what the config names and checks that it fits together: policies valid, keys
/// readable, every route's action declared in the schema.
pub fn check(config: &Config, cache: &mut LoadCache) -> Result<PolicyEngine, Vec<String>> {
    let engine = PolicyEngine::load_cached(&config.policies, cache).map_err(|e| {
        e.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    })?;
    let mut errors = Vec::new();
    for up in &config.upstreams {
        for route in &up.routes {
            let action = format!("{}/{}", up.name, route.tool);
            if !engine.has_action(&action) {
                errors.push(format!(
                    "upstream {}: tool {} ({} {}): action \"{action}\" is not declared in the schema ({})",
                    up.name,
                    route.tool,
                    route.method,
                    route.path,
                    config.policies.join(toolgate_policy::SCHEMA_FILE).display(),
                ));
            }
        }
    }
    for (field, path) in std::iter::once(("signing_key", &config.credentials.signing_key)).chain(
        config
            .credentials
            .previous_keys
            .iter()
            .map(|key| ("previous_keys", key)),
    ) {
        if let Err(e) = load_signing_key(path) {
            let why = answer::error_chain(&e);
            errors.push(format!("credentials.{field} {}: {why}", path.display()));
        }
    }
    errors.extend(local_files_problems(config));
    errors.extend(check_upstreams(config));
    errors.extend(pins_against_schema(config, &engine));
    errors.extend(sums_against_schema(config, &engine));
    let errors: Vec<String> = errors.iter().map(|e| config.locate(e)).collect();
    if errors.is_empty() {
        Ok(engine)
    } else {
        Err(errors)
    }
}

/// What a passing `check` cannot promise, or what works but is likely not meant: network
/// dependencies `serve` reaches only once running, and MCP upstreams whose tools no policy
/// can show.
pub fn check_warnings(config: &Config, engine: &PolicyEngine, online: bool) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut remote = |place: String, what: &str| {
        if !online {
            warnings.push(format!(
                "{place}: {what} is reached over the network once serving; not checked here (--online checks it)"
            ));
        }
    };
    for jwt in &config.inbound.jwt {
        let at = format!("inbound.jwt {}", jwt.issuer);
        match jwt.key_source() {
            KeySource::Url(url) => remote(at, &format!("jwks_url {url}")),
            KeySource::Discovery(url) => {
                remote(at, &format!("the discovery document {url}"));
            }
            KeySource::File(_) => {}
        }
    }
    if config.tasks.store.starts_with("redis://") {
        remote("tasks.store".into(), "the Redis task store");
    }
    for up in &config.upstreams {
        if let Some(url) = &up.credential.token_endpoint {
            let place = format!("upstream {}: credential", up.name);
            remote(place, &format!("token_endpoint {url}"));
        }
    }
    let mcp = config
        .upstreams
        .iter()
        .filter(|u| u.kind == config::UpstreamKind::Mcp);
    if !engine.has_action("list") {
        for up in mcp {
            warnings.push(format!(
                "upstream {}: the schema declares no `list` action, so every tools/list it answers is empty",
                up.name
            ));
        }
    }
    let mut warnings: Vec<String> = warnings.iter().map(|w| config.locate(w)).collect();
    warnings.extend(policy_warnings(config, engine));
    warnings
}

/// What the policy folder holds that toolgate does not read: annotations it does not know
/// (the policy decides as written, without them), policy files in sub-folders.
fn policy_warnings(config: &Config, engine: &PolicyEngine) -> Vec<String> {
    let mut warnings: Vec<String> = engine
        .sources()
        .flat_map(|(id, source)| {
            source.unread_annotations.iter().map(move |key| {
                format!(
                    "{}:{}: policy `{id}`: @{key} is not read by toolgate; the policy decides as if it were absent",
                    source.file.display(),
                    source.line
                )
            })
        })
        .collect();
    warnings.extend(
        engine
            .sources()
            .filter(|(_, source)| source.reads_approval && source.approval.is_none())
            .map(|(id, source)| {
                format!(
                    "{}:{}: policy `{id}` reads context.approval but has no @approval: a call's approval is only given where @approval forbids alone deny it",
                    source.file.display(),
                    source.line
                )
            }),
    );
    let mut folders = vec![(config.policies.clone(), 0)];
    while let Some((folder, depth)) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            // A linked folder is not followed: a link back up would be walked forever.
            let linked = entry.file_type().is_ok_and(|t| t.is_symlink());
            if path.is_dir() && !linked && depth < 4 {
                folders.push((path, depth + 1));
            } else if depth > 0
                && path
                    .extension()
                    .is_some_and(|e| e == "cedar" || e == "cedarschema")
            {
                warnings.push(format!(
                    "{}: not loaded: only the files directly in {} are read",
                    path.display(),
                    config.policies.display()
                ));
            }
        }
    }
    warnings.sort();
    warnings
}

/// A counter's `sum:` must be a `Long` argument of every action that reads the counter: an
/// undeclared one (forwarded unseen, `undeclared_arguments: forward`) or another type would
/// count 0 for an amount the upstream acts on.
pub(crate) fn sums_against_schema(config: &Config, engine: &PolicyEngine) -> Vec<String> {
    let mut errors = Vec::new();
    for counter in &config.usage.counters {
        let Some(sum) = &counter.sum else {
            continue;
        };
        for (action, context) in &engine.schema_info().actions {
            let reads = matches!(
                context.keys.get("usage"),
                Some((toolgate_policy::AttrType::Record(usage), _)) if usage.contains_key(&counter.name)
            );
            let counted = counter
                .actions
                .as_ref()
                .is_none_or(|a| a.iter().any(|x| x == action));
            if !(reads && counted) {
                continue;
            }
            if !matches!(
                context.args.get(sum),
                Some((toolgate_policy::AttrType::Long, _))
            ) {
                errors.push(format!(
                    "usage.counters: {}: sum: {sum} is not a Long argument of {action}, which reads the counter: declare context.args.{sum}: Long for it (an undeclared amount would count 0)",
                    counter.name
                ));
            }
        }
    }
    errors
}

/// A pinned tool's input schema and its declared arguments must name the same arguments:
/// else the policies were written for another tool than the one reviewed.
fn pins_against_schema(config: &Config, engine: &PolicyEngine) -> Vec<String> {
    match config.tool_pins.as_deref().map(pins::PinFile::read) {
        Some(Ok(file)) => pin_file_against_schema(&file, engine),
        _ => Vec::new(), // none, or unreadable: local_files_problems says so
    }
}

/// `pins_against_schema` for a lock file read: what `check`, start and reload refuse.
pub(crate) fn pin_file_against_schema(file: &pins::PinFile, engine: &PolicyEngine) -> Vec<String> {
    let mut errors = Vec::new();
    for (upstream, tools) in &file.upstreams {
        for (tool, pin) in tools {
            let action = format!("{upstream}/{tool}");
            let Some(declared) = engine.schema_info().actions.get(&action) else {
                continue;
            };
            let pinned: std::collections::BTreeSet<&str> = pin
                .definition
                .pointer("/inputSchema/properties")
                .and_then(serde_json::Value::as_object)
                .map(|p| p.keys().map(String::as_str).collect())
                .unwrap_or_default();
            let declared: std::collections::BTreeSet<&str> =
                declared.args.keys().map(String::as_str).collect();
            if pinned != declared {
                let only = |a: &std::collections::BTreeSet<&str>,
                            b: &std::collections::BTreeSet<&str>| {
                    a.difference(b).copied().collect::<Vec<_>>().join(", ")
                };
                errors.push(format!(
                    "tool_pins: {action}: the pinned input schema and the Cedar schema disagree (only pinned: [{}]; only declared: [{}]); regenerate one of them",
                    only(&pinned, &declared),
                    only(&declared, &pinned)
                ));
            }
        }
    }
    errors
}

/// The inbound issuers as the authenticator takes them.
fn issuer_configs(config: &Config) -> Vec<IssuerConfig> {
    config
        .inbound
        .jwt
        .iter()
        .zip(config.inbound.id_prefixes())
        .map(|(j, id_prefix)| IssuerConfig {
            id_prefix,
            refetch_interval: std::time::Duration::from_secs(j.jwks_refetch_seconds),
            issuer: j.issuer.clone(),
            audiences: j.audiences.clone(),
            keys: j.key_source(),
            names: toolgate_identity::ClaimNames {
                agent: j.agent_claim.clone(),
                user: j.user_claim.clone(),
            },
            leeway_seconds: j.clock_leeway_seconds,
        })
        .collect()
}

/// `check --online`: the network dependencies reached as `serve` reaches them: each issuer's
/// keys fetched (through discovery where so configured), the Redis store asked, each token
/// endpoint connected to (any HTTP answer will do).
pub async fn check_online(config: &Config) -> Vec<String> {
    let mut errors = Vec::new();
    for (jwt, issuer) in config.inbound.jwt.iter().zip(issuer_configs(config)) {
        if !matches!(issuer.keys, KeySource::File(_)) {
            if let Err(why) = toolgate_identity::fetch_keys(&issuer).await {
                errors.push(format!("inbound.jwt {}: {why}", jwt.issuer));
            }
        }
    }
    if let Ok(url) = config
        .tasks
        .store_url()
        .map(|u| u.starts_with("redis://").then_some(u))
    {
        let asked = match url {
            Some(url) => match toolgate_tasks::Store::open(&url, config.tasks.bounds()).await {
                Ok(store) => store.get("toolgate-check-online").await.map(|_| ()),
                Err(e) => Err(e),
            },
            None => Ok(()),
        };
        if let Err(e) = asked {
            errors.push(format!("tasks.store: {e}"));
        }
    }
    let timeout = std::time::Duration::from_secs(config.limits.upstream_connect_seconds);
    for up in &config.upstreams {
        let Some(endpoint) = &up.credential.token_endpoint else {
            continue;
        };
        let tls = up.tls.as_ref().map(|t| t.files()).unwrap_or_default();
        let reached = match (
            upstream::client(timeout, &tls),
            endpoint.parse::<http::Uri>(),
        ) {
            (Ok(client), Ok(uri)) => {
                let asked = client.get(uri);
                match tokio::time::timeout(timeout * 2, asked).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(answer::error_chain(&e)),
                    Err(_) => Err("no answer in time".to_string()),
                }
            }
            (Err(e), _) => Err(answer::error_chain(&e)),
            (_, Err(e)) => Err(e.to_string()),
        };
        if let Err(why) = reached {
            errors.push(format!(
                "upstream {}: credential: token_endpoint {endpoint}: {why}",
                up.name
            ));
        }
    }
    errors.iter().map(|e| config.locate(e)).collect()
}

/// Sets up each upstream as `serve` would (secrets, keys, TLS files read now): what fails.
fn check_upstreams(config: &Config) -> Vec<String> {
    let timeout = std::time::Duration::from_secs(config.limits.upstream_connect_seconds);
    let shared = match upstream::client(timeout, &Default::default()) {
        Ok(client) => client,
        Err(e) => return vec![answer::error_chain(&e)],
    };
    let mut errors: Vec<String> = config
        .upstreams
        .iter()
        // Only whether each can be set up matters here, not what its secret is named.
        .filter_map(|up| {
            let shared = upstream::Shared {
                client: &shared,
                connect_timeout: timeout,
                metrics: None,
                previous: None,
            };
            Upstream::new(up.clone(), &shared, &|_| String::new()).err()
        })
        .map(|e| answer::error_chain(&e))
        .collect();
    if let Some(Err(e)) = config.traces.as_ref().map(|t| trace_client(t, timeout)) {
        errors.push(e);
    }
    errors
}

/// The client that sends traces to the collector (its `tls:` files read now).
fn trace_client(
    traces: &config::Traces,
    timeout: std::time::Duration,
) -> Result<HttpClient, String> {
    let tls = traces.tls.as_ref().map(|t| t.files()).unwrap_or_default();
    upstream::client(timeout, &tls).map_err(|e| format!("traces.tls: {}", answer::error_chain(&e)))
}

/// Where calls go: the route table and the upstreams it names, from one config.
pub(crate) struct Routing {
    pub routes: RouteTable,
    pub upstreams: Vec<Upstream>,
    /// `mcp_endpoints:`, each over several MCP upstreams.
    pub endpoints: Vec<config::McpEndpoint>,
}

impl Routing {
    /// Sets up every upstream (reading its secrets and TLS files now), or says which cannot be.
    /// A reload keeps the stdio servers of `previous` whose command, environment and secret
    /// are unchanged (their sessions go on).
    pub fn new(
        config: &Config,
        shared: &upstream::Shared<'_>,
        minter: &Minter,
    ) -> Result<Self, upstream::SetupError> {
        let name_secret = |secret: &str| minter.secret_id(secret);
        Ok(Routing {
            routes: RouteTable::new(&config.upstreams),
            upstreams: config
                .upstreams
                .iter()
                .map(|u| Upstream::new(u.clone(), shared, &name_secret))
                .collect::<Result<_, _>>()?,
            endpoints: config.mcp_endpoints.clone(),
        })
    }

    /// The federated endpoint a path names (`/<name>` or `/<name>/`).
    pub(crate) fn endpoint(&self, path: &str) -> Option<&config::McpEndpoint> {
        let name = path.strip_prefix('/')?;
        let name = name.strip_suffix('/').unwrap_or(name);
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// The stdio server running for upstream `name`.
    pub(crate) fn process(&self, name: &str) -> Option<Arc<stdio::StdioServer>> {
        let upstream = self.upstreams.iter().find(|u| u.name() == name)?;
        upstream.stdio().cloned()
    }
}

/// The least time the audit writer is given at shutdown to write out its queue.
const AUDIT_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl Gateway {
    /// Builds the gateway; refuses to start on an invalid policy set, config or key.
    /// `config_path` is where `config` was read from, for reloads (`None`: not reloadable).
    #[allow(clippy::too_many_lines)] // start-up, not the request path
    pub async fn new(
        config: Config,
        config_path: Option<PathBuf>,
    ) -> Result<Arc<Gateway>, StartError> {
        let mut load_cache = LoadCache::default();
        let engine = check(&config, &mut load_cache).map_err(StartError::Invalid)?;
        let key = load_signing_key(&config.credentials.signing_key)?;
        let previous = config
            .credentials
            .previous_keys
            .iter()
            .map(|p| load_signing_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        let minter = Minter::new(key, config.issuer.clone(), config.credentials.ttl_seconds)
            .with_previous_keys(previous);
        let auth =
            Authenticator::with_cache(issuer_configs(&config), config.inbound.token_cache_size)
                .await
                .map_err(StartError::Inbound)?;
        let admin_token = match &config.admin_token_file {
            Some(path) => Some(read_admin_token(path)?),
            None => None,
        };
        let pins = match &config.tool_pins {
            Some(path) => {
                Some(pins::ToolPins::load(path).map_err(|e| StartError::Invalid(vec![e]))?)
            }
            None => None,
        };
        let store = config
            .tasks
            .store_url()
            .map_err(|why| StartError::TaskStore(toolgate_tasks::StoreError::Unavailable(why)))?;
        let tasks = toolgate_tasks::Store::open(&store, config.tasks.bounds())
            .await
            .map_err(StartError::TaskStore)?;
        let connect_timeout =
            std::time::Duration::from_secs(config.limits.upstream_connect_seconds);
        let client = upstream::client(connect_timeout, &Default::default())
            .map_err(StartError::OutboundTls)?;
        let metrics = Arc::new(Metrics::new());
        let shared = upstream::Shared {
            client: &client,
            connect_timeout,
            metrics: Some(&metrics),
            previous: None,
        };
        let routing = Routing::new(&config, &shared, &minter).map_err(StartError::Upstreams)?;
        let tracer = match &config.traces {
            Some(traces) => {
                let client = trace_client(traces, connect_timeout).map_err(StartError::Traces)?;
                let tracer = trace::Tracer::start(traces, client, metrics.clone());
                Some(tracer.map_err(StartError::Traces)?)
            }
            None => None,
        };
        metrics.policies_loaded.set(engine.policy_count() as i64);
        let (audit, writer) =
            AuditSink::start(&config.audit.path, config.audit.buffer, metrics.clone())
                .await
                .map_err(|source| StartError::Audit {
                    path: config.audit.path.clone(),
                    source,
                })?;
        Ok(Arc::new_cyclic(|me| Gateway {
            me: me.clone(),
            policy_dir: config.policies.clone(),
            routing: ArcSwap::from_pointee(routing),
            policy: ArcSwap::from_pointee(engine),
            load_cache: tokio::sync::Mutex::new(load_cache),
            auth,
            minter: Arc::new(minter),
            client,
            metrics,
            audit,
            audit_writer: std::sync::Mutex::new(Some(writer)),
            closing: Arc::new(tokio::sync::watch::Sender::new(false)),
            feed_places: Arc::new(tokio::sync::Semaphore::new(
                config.tasks.max_feed_subscribers,
            )),
            tasks,
            admin_token,
            ready: AtomicBool::new(false),
            tracer,
            tool_schemas: Default::default(),
            federation: Default::default(),
            pins: arc_swap::ArcSwapOption::from(pins.map(Arc::new)),
            config,
            config_path,
        }))
    }

    /// Writes out every audit record queued so far, and sends the traces waiting; call once the listeners have drained.
    /// Waits at most `limits.drain_seconds` (at least `AUDIT_GRACE`) for a writer that cannot write.
    pub async fn finish_audit(&self) {
        let writer = self
            .audit_writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            // Never less than a few seconds: a healthy writer's queue must not be cut short
            // by a short drain; only a writer that cannot write is given up on.
            let drain = std::time::Duration::from_secs(self.config.limits.drain_seconds);
            writer.finish(drain.max(AUDIT_GRACE)).await;
        }
        if let Some(tracer) = &self.tracer {
            // Best effort, briefly: a hung collector must not hold the exit.
            tracer.flush(std::time::Duration::from_secs(2)).await;
        }
    }

    /// Ends the processes of `command:` upstreams; call once the listeners have drained.
    pub async fn stop_processes(&self) {
        let routing = self.routing.load_full();
        for upstream in &routing.upstreams {
            if let Some(server) = upstream.stdio() {
                server.shutdown().await;
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
