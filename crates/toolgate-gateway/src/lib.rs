//! The toolgate server: listeners, the call pipeline, the upstream pool, admin endpoints,
//! metrics, audit and configuration.
#![forbid(unsafe_code)]

mod admin;
pub mod answer;
pub mod audit;
pub mod config;
mod mcp;
pub mod metrics;
mod pipeline;
pub mod routes;
mod server;
mod upstream;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;
use toolgate_credential::{Minter, SigningKey};
use toolgate_identity::{Authenticator, IssuerConfig, KeySource};
use toolgate_policy::{LoadCache, PolicyEngine};

pub use config::Config;
pub use pipeline::{JWKS_PATH, TASK_HEADER};
pub use server::{Running, Shutdown};

use audit::AuditSink;
use metrics::Metrics;
use routes::RouteTable;
use upstream::{HttpClient, Upstream};

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    config: Config,
    policy: ArcSwap<PolicyEngine>,
    policy_dir: PathBuf,
    /// What the last load parsed and validated; held during a reload, so reloads run one at a time.
    load_cache: tokio::sync::Mutex<LoadCache>,
    auth: Authenticator,
    minter: Minter,
    routes: RouteTable,
    upstreams: Vec<Upstream>,
    client: HttpClient,
    metrics: Arc<Metrics>,
    audit: AuditSink,
    ready: AtomicBool,
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
                    "{}:1: route {} {} of upstream {}: action \"{action}\" is not declared in the schema",
                    config.policies.join(toolgate_policy::SCHEMA_FILE).display(),
                    route.method,
                    route.path,
                    up.name
                ));
            }
        }
    }
    if let Err(e) = std::fs::read_to_string(&config.credentials.signing_key)
        .map_err(|e| e.to_string())
        .and_then(|pem| SigningKey::from_pkcs8_pem(&pem).map_err(|e| e.to_string()))
    {
        errors.push(format!(
            "{}:1: {e}",
            config.credentials.signing_key.display()
        ));
    }
    if errors.is_empty() {
        Ok(engine)
    } else {
        Err(errors)
    }
}

impl Gateway {
    /// Builds the gateway; refuses to start on an invalid policy set, config or key.
    pub async fn new(config: Config) -> Result<Arc<Gateway>, String> {
        let mut load_cache = LoadCache::default();
        let engine = check(&config, &mut load_cache).map_err(|e| e.join("\n"))?;
        let pem = std::fs::read_to_string(&config.credentials.signing_key)
            .map_err(|e| format!("{}: {e}", config.credentials.signing_key.display()))?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| e.to_string())?;
        let minter = Minter::new(key, config.issuer.clone(), config.credentials.ttl_seconds);
        let issuers = config
            .inbound
            .jwt
            .iter()
            .map(|j| IssuerConfig {
                issuer: j.issuer.clone(),
                audiences: j.audiences.clone(),
                keys: match (&j.jwks_file, &j.jwks_url) {
                    (Some(file), _) => KeySource::File(file.clone()),
                    (None, Some(url)) => KeySource::Url(url.clone()),
                    (None, None) => unreachable!("checked by Config::check"),
                },
            })
            .collect();
        let auth = Authenticator::new(issuers).await?;
        let metrics = Arc::new(Metrics::new());
        metrics.policies_loaded.set(engine.policy_count() as i64);
        let (audit, writer) =
            AuditSink::start(&config.audit.path, config.audit.buffer, metrics.clone())
                .await
                .map_err(|e| format!("audit {}: {e}", config.audit.path))?;
        // The writer ends by itself once the last sink (the gateway's) is dropped.
        tokio::spawn(writer.finish());
        let upstreams: Vec<Upstream> = config
            .upstreams
            .iter()
            .cloned()
            .map(Upstream::new)
            .collect();
        Ok(Arc::new(Gateway {
            policy_dir: config.policies.clone(),
            routes: RouteTable::new(&config.upstreams),
            policy: ArcSwap::from_pointee(engine),
            load_cache: tokio::sync::Mutex::new(load_cache),
            auth,
            minter,
            upstreams,
            client: upstream::client(),
            metrics,
            audit,
            ready: AtomicBool::new(false),
            config,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
