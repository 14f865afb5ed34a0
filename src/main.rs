//! The `toolgate` command: serve, demo, check, test, authorize, token, audit, schema.
#![forbid(unsafe_code)]

mod audit_cmd;
mod audit_suggest;
mod authorize;
mod cedar_types;
mod demo;
mod init_cmd;
mod openapi_cmd;
mod pin_cmd;
mod policy_test;
mod schema_cmd;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};
use toolgate_credential::SigningKey;

// Measured beside glibc malloc under the comparison benchmark (docs/benchmarks.md): a call
// allocates and frees many small objects across hyper, Cedar and serde.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use toolgate_gateway::{Config, Gateway};

#[derive(Parser)]
#[command(
    name = "toolgate",
    version,
    about = "A gateway between AI agents and their tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as text or JSON (default: TOOLGATE_LOG_FORMAT, else the config's
    /// log.format, else text).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM/SIGINT, then drain.
    Serve {
        /// The config file (YAML); reloaded when it changes.
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
    },
    /// Gateway + demo tool API + demo keys + the example policies, with ready curl lines.
    Demo {
        /// Where agents call the demo gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The admin listener: metrics, health, reload, tasks' admin API.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: std::net::SocketAddr,
        /// Write the demo's config, keys and policies in this folder and keep them after.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// Validate config, schema, policies and entities (strict); exit 1 with file:line errors.
    Check {
        /// The config file whose policies, keys and files are checked as serve loads them.
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
        /// Also reach the network dependencies as serve does: each issuer's keys (jwks_url,
        /// discovery), the Redis store, each token endpoint.
        #[arg(long)]
        online: bool,
    },
    /// Run policy test files (YAML: request + expected decision); prints `N passed, N failed`.
    Test {
        /// A test file, or a directory searched for *.yaml.
        path: PathBuf,
    },
    /// One offline decision; prints {decision, policies, errors}.
    Authorize {
        /// The config whose policies decide.
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
        /// A JSON or YAML request file (see docs/policy-guide.md).
        #[arg(long)]
        request: PathBuf,
        /// Also give each determining policy's file and line.
        #[arg(long)]
        explain: bool,
    },
    /// Dev helper: mint an inbound test token with a local key (never used by serve).
    Token {
        /// The config whose first inbound issuer gives the default --iss and --aud.
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
        /// PKCS#8 PEM P-256 private key of a test identity provider.
        #[arg(long)]
        key: PathBuf,
        /// The token's subject: the agent, or the user when --act is given.
        #[arg(long)]
        sub: String,
        /// The agent acting for --sub (RFC 8693 `act`).
        #[arg(long)]
        act: Option<String>,
        /// Audience (default: the first audience of the issuer in the config).
        #[arg(long)]
        aud: Option<String>,
        /// Issuer (default: the first inbound issuer in the config).
        #[arg(long)]
        iss: Option<String>,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Extra claims, NAME=VALUE (VALUE parsed as JSON when it is JSON); they win over the
        /// defaults, so `--claim exp=1` makes an expired token.
        #[arg(long = "claim")]
        claims: Vec<String>,
    },
    /// Read the audit log: why a decision was made; what agents use of what they may.
    Audit {
        #[command(subcommand)]
        query: AuditQuery,
    },
    /// Make an upstream, its routes and its Cedar actions from an API description.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Print a schema: a Cedar fragment for an MCP server's tools, or the config's JSON Schema.
    Schema {
        #[command(subcommand)]
        source: SchemaSource,
    },
    /// Exit 0 when URL answers 200 within 3 s (a container's health check: the image has no
    /// shell or curl).
    Health {
        /// The URL to GET.
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
    /// Write a working project in DIR (default: here): config, base schema, an example tool
    /// with its policy and tests, an example request, development keys. Overwrites nothing.
    Init {
        /// The project folder (created if missing).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Ask each MCP upstream for its tools and write their definitions into the config's
    /// `tool_pins:` lock file (review it): a tool whose live definition differs is then hidden
    /// and refused. Exit 1 when an upstream cannot be reached (its pins are kept).
    Pin {
        /// The config naming the upstreams and the lock file.
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
        /// Only this upstream (the others' pins are kept).
        #[arg(long)]
        upstream: Option<String>,
        /// Extra request headers for the upstreams, `NAME: VALUE` (a token they need).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Dev helper: write a new P-256 key (PKCS#8 PEM) and its public JWKS.
    Keygen {
        /// Where to write the private key (created readable by its owner only).
        #[arg(long)]
        private: PathBuf,
        /// Where to write the public key as a JWKS document.
        #[arg(long)]
        jwks: Option<PathBuf>,
    },
    /// Print a shell completion script: `toolgate completions bash > /etc/bash_completion.d/toolgate`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ImportSource {
    /// From an OpenAPI 3.0 or 3.1 document (YAML or JSON): writes NAME.upstream.yaml,
    /// NAME.cedarschema and (when absent) a starter NAME.cedar into --out.
    Openapi {
        /// The OpenAPI document (YAML or JSON).
        spec: PathBuf,
        /// The upstream's name: its routes are under /NAME/, its actions NAME/<tool>.
        #[arg(long)]
        upstream: String,
        /// The API's base URL (default: the document's first absolute server URL).
        #[arg(long)]
        url: Option<String>,
        /// The audience of the credentials minted for it (default: the URL).
        #[arg(long)]
        audience: Option<String>,
        /// The folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditQuery {
    /// Who, on whose behalf, what, in which task, under which policies, when, and whether the
    /// credential still lives.
    Why {
        /// A decision_id, or a credential's jti (or id).
        id: String,
        /// The audit log (JSON lines) to search.
        #[arg(long)]
        audit: PathBuf,
        /// The config whose current policies locate (and compare) the deciding ones.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The admin listener's URL, asked whether the credential's task has ended (with the
        /// config's admin_token_file).
        #[arg(long)]
        admin: Option<String>,
    },
    /// Per agent: the actions it called, those the policies permit that it never called, and
    /// the permits behind them.
    Report {
        /// The audit log (JSON lines) to read.
        #[arg(long)]
        audit: PathBuf,
        /// The config whose policies say what each agent may do.
        #[arg(long)]
        config: PathBuf,
        /// Only lines this recent: 7d, 12h, 30m (default: the whole file).
        #[arg(long)]
        since: Option<String>,
        /// Print a Cedar file `toolgate check` accepts: the report as `//` comments, then per
        /// agent each permit that allowed its calls narrowed to it and those actions, its
        /// conditions kept (a permit without conditions only where none can be, said so).
        #[arg(long)]
        suggest: bool,
    },
}

#[derive(Subcommand)]
enum SchemaSource {
    /// The JSON Schema of toolgate.yaml, for editors (e.g. a `# yaml-language-server: $schema=`
    /// line) and CI.
    Config,
    /// One action per tool of an MCP server, `args` typed from each tool's inputSchema.
    Mcp {
        /// The upstream name the tools are served under (actions are `<upstream>/<tool>`).
        #[arg(long)]
        upstream: String,
        /// The MCP endpoint (streamable HTTP) to ask with initialize + tools/list.
        #[arg(long)]
        url: Option<String>,
        /// A saved tools/list answer instead of --url.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Extra request headers for --url, `NAME: VALUE`.
        #[arg(long = "header")]
        headers: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(format) = cli.log_format {
        let name = match format {
            LogFormatArg::Text => "text",
            LogFormatArg::Json => "json",
        };
        // Read by init_tracing, before anything logs; nothing else runs yet.
        std::env::set_var("TOOLGATE_LOG_FORMAT", name);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Serve { config } => Config::load(&config).and_then(|loaded| {
            init_tracing(Some(&loaded.log))?;
            runtime()?.block_on(serve(loaded, &config))
        }),
        Command::Health { url } => health(&url),
        Command::Demo {
            listen,
            admin_listen,
            keep,
        } => runtime().and_then(|rt| rt.block_on(demo::run(listen, admin_listen, keep.as_deref()))),
        Command::Check { config, online } => return check(&config, online),
        Command::Test { path } => policy_test::run(&path),
        Command::Authorize {
            config,
            request,
            explain,
        } => authorize::run(&config, &request, explain),
        Command::Token {
            config,
            key,
            sub,
            act,
            aud,
            iss,
            ttl,
            claims,
        } => token(&config, &key, sub, act, aud, iss, ttl, &claims),
        Command::Keygen { private, jwks } => keygen(&private, jwks.as_deref()),
        Command::Init { dir } => init_cmd::run(&dir),
        Command::Pin {
            config,
            upstream,
            headers,
        } => runtime()
            .and_then(|rt| rt.block_on(pin_cmd::run(&config, upstream.as_deref(), &headers))),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "toolgate",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Import {
            source:
                ImportSource::Openapi {
                    spec,
                    upstream,
                    url,
                    audience,
                    out,
                },
        } => openapi_cmd::run(&spec, &upstream, url.as_deref(), audience.as_deref(), &out),
        Command::Audit {
            query:
                AuditQuery::Why {
                    id,
                    audit,
                    config,
                    admin,
                },
        } => audit_cmd::why(&id, &audit, config.as_deref(), admin.as_deref()),
        Command::Audit {
            query:
                AuditQuery::Report {
                    audit,
                    config,
                    since,
                    suggest,
                },
        } => audit_cmd::report(&audit, &config, since.as_deref(), suggest),
        Command::Schema {
            source: SchemaSource::Config,
        } => {
            let schema = schemars::schema_for!(toolgate_gateway::Config);
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema {
            source:
                SchemaSource::Mcp {
                    upstream,
                    url,
                    from,
                    headers,
                },
        } => runtime().and_then(|rt| {
            rt.block_on(schema_cmd::run(
                &upstream,
                url.as_deref(),
                from.as_deref(),
                &headers,
            ))
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("toolgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    // A second call (serve set it up from its config first) changes nothing.
    let _ = init_tracing(None);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Logs to stderr: the level from `RUST_LOG`, else the config's `log.level`, else `info`; the
/// format from `TOOLGATE_LOG_FORMAT`, else the config's `log.format`.
fn init_tracing(log: Option<&toolgate_gateway::config::Log>) -> Result<(), String> {
    use toolgate_gateway::config::LogFormat;
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(_) => {
            let level = log.and_then(|l| l.level.as_deref()).unwrap_or("info");
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| format!("log.level {level:?}: {e}"))?
        }
    };
    let format = match std::env::var("TOOLGATE_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("text") => LogFormat::Text,
        Ok(other) => return Err(format!("TOOLGATE_LOG_FORMAT {other:?}: text or json")),
        Err(_) => log.map_or(LogFormat::Text, |l| l.format),
    };
    // Colours only for a person at a terminal: a file, a pipe or a log shipper gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").unwrap_or_default().is_empty();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let _ = match format {
        // `message` and the event's fields at the top level, as Loki and Elasticsearch expect.
        LogFormat::Json => logs.json().flatten_event(true).try_init(),
        LogFormat::Text => logs.try_init(),
    };
    Ok(())
}

/// `toolgate health`: GET the URL (plain HTTP, loopback in a container) and expect a 200.
fn health(url: &str) -> Result<ExitCode, String> {
    match plain_get(url, None, std::time::Duration::from_secs(3))? {
        (http::StatusCode::OK, _) => Ok(ExitCode::SUCCESS),
        (status, _) => Err(format!("{url}: {status}")),
    }
}

/// A plain-HTTP GET (the admin listener's), with a bearer token if given: its status and body
/// (at most 1 MiB), or why there is none within `limit`.
fn plain_get(
    url: &str,
    bearer: Option<&str>,
    limit: std::time::Duration,
) -> Result<(http::StatusCode, bytes::Bytes), String> {
    use http_body_util::BodyExt as _;
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let mut request = http::Request::get(uri);
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let asked = async {
            let answer = client
                .request(request)
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            let status = answer.status();
            let body = http_body_util::Limited::new(answer.into_body(), 1 << 20)
                .collect()
                .await
                .map_err(|e| format!("{url}: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(limit, asked)
            .await
            .map_err(|_| format!("{url}: no answer within {} s", limit.as_secs()))?
    })
}

async fn serve(config: Config, config_path: &Path) -> Result<ExitCode, String> {
    let gateway = Gateway::new(config, Some(config_path.to_path_buf()))
        .await
        .map_err(|e| toolgate_gateway::answer::error_chain(&e))?;
    let running = gateway.start().await?;
    announce(&running);
    reload_on_sighup(gateway.clone());
    wait_for_signal().await;
    tracing::info!("shutting down: draining connections");
    running.shutdown.trigger();
    running.wait().await;
    gateway.stop_processes().await;
    gateway.finish_audit().await;
    Ok(ExitCode::SUCCESS)
}

/// One JSON line on stdout with the bound addresses (useful with port 0).
fn announce(running: &toolgate_gateway::Running) {
    println!(
        "{}",
        json!({"event": "listening", "listen": running.agent_addr.to_string(), "admin": running.admin_addr.to_string()})
    );
    tracing::info!(listen = %running.agent_addr, admin = %running.admin_addr, "toolgate serving");
}

/// SIGHUP reloads policies, JWKS files and the config's upstreams, as `POST /admin/reload` does.
fn reload_on_sighup(gateway: std::sync::Arc<Gateway>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let report = gateway.reload_all().await;
            tracing::info!(ok = report.ok(), report = %report.to_json(), "reload on SIGHUP");
        }
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn check(config_path: &Path, online: bool) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match toolgate_gateway::check(&config, &mut Default::default()) {
        Ok(engine) => {
            for warning in toolgate_gateway::check_warnings(&config, &engine, online) {
                eprintln!("warning: {warning}");
            }
            let unreached = match online {
                true => match runtime() {
                    Ok(rt) => rt.block_on(toolgate_gateway::check_online(&config)),
                    Err(e) => vec![e],
                },
                false => Vec::new(),
            };
            for e in &unreached {
                eprintln!("{e}");
            }
            if !unreached.is_empty() {
                return ExitCode::FAILURE;
            }
            println!("ok: {} policies valid", engine.policy_count());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn token(
    config_path: &Path,
    key_path: &Path,
    sub: String,
    act: Option<String>,
    aud: Option<String>,
    iss: Option<String>,
    ttl: u64,
    extra: &[String],
) -> Result<ExitCode, String> {
    let config = Config::load(config_path)?;
    let first = config.inbound.jwt.first();
    let iss = iss
        .or_else(|| first.map(|j| j.issuer.clone()))
        .ok_or("no --iss and no inbound issuer in the config")?;
    let aud = aud
        .or_else(|| first.and_then(|j| j.audiences.first().cloned()))
        .ok_or("no --aud and no inbound audience in the config")?;
    let pem =
        std::fs::read_to_string(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| e.to_string())?;
    let now = toolgate_identity::unix_now();
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(iss));
    claims.insert("sub".into(), json!(sub));
    claims.insert("aud".into(), json!(aud));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + ttl));
    if let Some(agent) = act {
        claims.insert("act".into(), json!({"sub": agent}));
    }
    // Last, so a test token can say anything: `--claim exp=1` is an expired one.
    for pair in extra {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--claim {pair}: expected NAME=VALUE"))?;
        let value =
            serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        claims.insert(name.to_string(), value);
    }
    println!("{}", key.sign("JWT", &claims).map_err(|e| e.to_string())?);
    Ok(ExitCode::SUCCESS)
}

fn keygen(private: &Path, jwks: Option<&Path>) -> Result<ExitCode, String> {
    let (key, pem) = SigningKey::generate().map_err(|e| e.to_string())?;
    write_private(private, &pem)?;
    if let Some(path) = jwks {
        let doc = json!({"keys": [key.public_jwk()]});
        std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("kid {}", key.kid());
    Ok(ExitCode::SUCCESS)
}

/// Writes a private key readable by its owner only.
pub fn write_private(path: &Path, pem: &str) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// `--help` explains every option and argument of every command.
    #[test]
    fn every_option_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if !["help", "version"].contains(&id) && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "toolgate", &mut missing);
        assert!(missing.is_empty(), "no help: {missing:?}");
    }
}
