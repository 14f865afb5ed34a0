//! Test harness: a real `toolgate serve` process on ephemeral loopback ports, a real HTTP
//! upstream that records what it receives, an HTTP client, and token helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use toolgate_credential::SigningKey;

pub const IDP: &str = "https://idp.test";
/// The admin listener's token in every test gateway (`admin_token_file: admin.token`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const AUDIENCE: &str = "toolgate";

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "toolgate-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copies the example policies into `dir/policies`, plus `extra` files.
pub fn write_policies(dir: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for entry in std::fs::read_dir(repo().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, policies.join(path.file_name().unwrap())).unwrap();
        }
    }
    for (name, text) in extra {
        std::fs::write(policies.join(name), text).unwrap();
    }
    policies
}

// ---------------------------------------------------------------- recording upstream

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A recording upstream's accept loop and connections, and whether it was killed.
#[derive(Default)]
struct Tasks {
    killed: bool,
    running: Vec<tokio::task::AbortHandle>,
}

/// A real HTTP server that records every request. A request whose URI contains `held` is
/// recorded, then answered only once the test calls `release`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Recorded>>>,
    released: Arc<tokio::sync::watch::Sender<bool>>,
    /// Its accept loop and connections, ended at once by `kill`.
    tasks: Arc<Mutex<Tasks>>,
}

/// What an MCP server replays on a GET with `Last-Event-ID` (asked for with `X-Test-Replay`):
/// an earlier `tools/list` answer, a resource update, a list-changed notification.
fn replayed_stream() -> Response<TestBody> {
    let events = [
        json!({"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"add"},{"name":"undeclared_tool"}]}}),
        json!({"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":"file:///secret"}}),
        json!({"jsonrpc":"2.0","method":"notifications/tools/list_changed"}),
    ];
    let body: String = events
        .iter()
        .map(|e| format!("event: message\ndata: {e}\n\n"))
        .collect();
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    response
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// A body fed through a channel: frames go out as they are sent.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|bytes| bytes.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// An MCP server's streamed answer (asked for with `X-Test-Stream`): a progress notification
/// at once, the result for `id` only once the test calls `Upstream::release`.
fn held_stream(id: Value, mut release: tokio::sync::watch::Receiver<bool>) -> Response<TestBody> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let progress = json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"p","progress":1}});
        let _ = tx
            .send(Bytes::from(format!("event: message\ndata: {progress}\n\n")))
            .await;
        let _ = release.wait_for(|r| *r).await;
        let result = json!({"jsonrpc":"2.0","id":id,"result":{"tools":[],"content":[{"type":"text","text":"done"}]}});
        let _ = tx
            .send(Bytes::from(format!("event: message\ndata: {result}\n\n")))
            .await;
    });
    let mut response = Response::new(ChannelBody(rx).boxed());
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    response
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_with(None).await
    }

    /// The same upstream behind TLS (the acceptor decides its certificate and whether it
    /// requires one of the client).
    pub async fn start_tls(acceptor: tokio_rustls::TlsAcceptor) -> Upstream {
        Upstream::start_with(Some(acceptor)).await
    }

    /// The same upstream on a given address (one a killed upstream had).
    pub async fn start_at(addr: SocketAddr) -> Upstream {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Upstream::serve(listener, None)
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Upstream::serve(listener, tls)
    }

    /// Ends the server as a crash would: its port refuses connections, and the connections
    /// it had are closed with whatever they were doing.
    pub fn kill(&self) {
        let mut tasks = self.tasks.lock().unwrap();
        tasks.killed = true;
        for task in tasks.running.drain(..) {
            task.abort();
        }
    }

    fn serve(
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let released = Arc::new(tokio::sync::watch::Sender::new(false));
        let release = released.clone();
        let tasks: Arc<Mutex<Tasks>> = Arc::default();
        let connections = tasks.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (log, release, tls) = (log.clone(), release.clone(), tls.clone());
                let connection = tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (log, release) = (log.clone(), release.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let held = parts.uri.to_string().contains("held");
                            let replay = parts.headers.contains_key("x-test-replay");
                            let stream = parts.headers.contains_key("x-test-stream");
                            log.lock().unwrap().push(Recorded {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                            });
                            if held {
                                let _ = release.subscribe().wait_for(|r| *r).await;
                            }
                            if replay {
                                return Ok(replayed_stream());
                            }
                            if stream {
                                let id = serde_json::from_slice::<Value>(
                                    &log.lock().unwrap().last().unwrap().body,
                                )
                                .map(|m| m["id"].clone())
                                .unwrap_or_default();
                                return Ok(held_stream(id, release.subscribe()));
                            }
                            let message = serde_json::from_slice::<Value>(
                                &log.lock().unwrap().last().unwrap().body,
                            )
                            .ok();
                            let answer = message
                                .as_ref()
                                .and_then(jsonrpc_echo)
                                .unwrap_or_else(|| json!({"ok": true}));
                            let mut response =
                                Response::new(Full::new(Bytes::from(answer.to_string())).boxed());
                            // As an MCP server does, `initialize` opens a session.
                            if message.is_some_and(|m| m["method"] == "initialize") {
                                response
                                    .headers_mut()
                                    .insert("mcp-session-id", "srv-session-1".parse().unwrap());
                            }
                            response
                                .headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            response
                                .headers_mut()
                                .insert("x-upstream", "recorder".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    serve_test_connection(stream, tls, service).await;
                });
                // One accepted as the test killed the server goes with the others.
                let mut connections = connections.lock().unwrap();
                if connections.killed {
                    connection.abort();
                    break;
                }
                connections.running.push(connection.abort_handle());
            }
        });
        tasks.lock().unwrap().running.push(accepting.abort_handle());
        Upstream {
            addr,
            seen,
            released,
            tasks,
        }
    }

    /// Answers every held request, now and from now on.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// Holds requests again until the next `release`.
    pub fn hold(&self) {
        self.released.send_replace(false);
    }

    /// Waits (bounded) until `n` requests have reached the upstream.
    pub async fn wait_for_requests(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.requests().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} requests never reached the upstream"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }
}

/// Serves one accepted connection with `service`, over TLS when `tls` is given (a refused
/// handshake, e.g. no or an unknown client certificate, ends it there).
pub async fn serve_test_connection<S, B>(
    stream: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    service: S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    match tls {
        None => {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        Some(acceptor) => {
            if let Ok(stream) = acceptor.accept(stream).await {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }
    }
}

/// Answers JSON-RPC like a small MCP server: `tools/list` lists add, pay and admin_reset;
/// any other request gets `{"method": ...}` back. `None` when the body is not JSON-RPC.
fn jsonrpc_echo(message: &Value) -> Option<Value> {
    if let Value::Array(batch) = message {
        return Some(Value::Array(
            batch.iter().filter_map(jsonrpc_echo).collect(),
        ));
    }
    let id = message.get("id")?;
    let method = message.get("method")?.as_str()?;
    let result = match method {
        "tools/list" => {
            json!({"tools": [{"name": "add"}, {"name": "pay"}, {"name": "admin_reset"}]})
        }
        other => json!({"method": other}),
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

// ---------------------------------------------------------------- OTLP receiver

/// The spans a recording upstream received as an OTLP/HTTP (JSON) collector, flattened, each
/// with its resource's `service.name`; every export checked for the protocol's shape.
pub fn received_spans(collector: &Upstream) -> Vec<Value> {
    let mut spans = Vec::new();
    for export in collector.requests() {
        assert_eq!(export.method, "POST");
        assert_eq!(export.uri, "/v1/traces");
        assert_eq!(export.headers["content-type"], "application/json");
        let body: Value = serde_json::from_slice(&export.body).expect("OTLP JSON");
        for resource in body["resourceSpans"].as_array().expect("resourceSpans") {
            let service = attribute(&resource["resource"], "service.name");
            for scope in resource["scopeSpans"].as_array().expect("scopeSpans") {
                assert_eq!(scope["scope"]["name"], "toolgate");
                for span in scope["spans"].as_array().expect("spans") {
                    let mut span = span.clone();
                    span["service"] = service.clone();
                    spans.push(span);
                }
            }
        }
    }
    spans
}

/// An attribute's value (string or, as OTLP's JSON writes int64, a decimal string).
pub fn attribute(item: &Value, key: &str) -> Value {
    item["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|kv| kv["key"] == key)
        .map(|kv| {
            let value = &kv["value"];
            value
                .get("stringValue")
                .or_else(|| value.get("intValue"))
                .cloned()
                .unwrap_or(Value::Null)
        })
        .unwrap_or(Value::Null)
}

/// The spans of one trace, once its request span has arrived (bounded wait).
pub async fn trace_of(collector: &Upstream, trace_id: &str) -> Vec<Value> {
    for _ in 0..100 {
        let spans: Vec<Value> = received_spans(collector)
            .into_iter()
            .filter(|s| s["traceId"] == trace_id)
            .collect();
        if spans.iter().any(|s| s["name"] == "request") {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no request span of trace {trace_id} within 5 s");
}

pub fn named<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
}

// ---------------------------------------------------------------- documents over HTTP

/// A server on loopback answering every GET with `document(path)` (an identity provider's
/// JWKS or discovery document); its address.
pub async fn document_server(
    document: impl Fn(&str) -> String + Send + Sync + 'static,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let document = Arc::new(document);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let document = document.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = document(req.uri().path());
                    async move {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            body,
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------- keys and tokens

/// The test identity provider's ES256 key, and its JWKS (with the committed RSA/EdDSA keys).
pub struct Idp {
    pub key: SigningKey,
    pub jwks_path: PathBuf,
}

impl Idp {
    pub fn new(dir: &Path) -> Idp {
        let (key, _) = SigningKey::generate().unwrap();
        let extra: Value = serde_json::from_slice(
            &std::fs::read(repo().join("tests/fixtures/idp-extra.jwks.json")).unwrap(),
        )
        .unwrap();
        let mut keys = vec![key.public_jwk().clone()];
        keys.extend(extra["keys"].as_array().unwrap().iter().cloned());
        let jwks_path = dir.join("idp.jwks.json");
        std::fs::write(&jwks_path, json!({"keys": keys}).to_string()).unwrap();
        Idp { key, jwks_path }
    }

    /// alice's assistant: agent `assistant` acting for user `alice` (patient p-100).
    pub fn delegated(&self) -> String {
        self.sign(json!({"sub": "alice", "act": {"sub": "assistant"}, "patient_id": "p-100"}))
    }

    /// Standard claims (iss, aud, iat, exp) merged under `claims`, signed ES256.
    pub fn sign(&self, claims: Value) -> String {
        self.key.sign("JWT", &with_defaults(claims)).unwrap()
    }

    /// The IdP rotates in a new key (appended to its JWKS file); returns alice's assistant's
    /// token signed with it.
    pub fn add_key(&self) -> String {
        let (key, _) = SigningKey::generate().unwrap();
        let mut jwks: Value =
            serde_json::from_slice(&std::fs::read(&self.jwks_path).unwrap()).unwrap();
        jwks["keys"]
            .as_array_mut()
            .unwrap()
            .push(key.public_jwk().clone());
        std::fs::write(&self.jwks_path, jwks.to_string()).unwrap();
        key.sign(
            "JWT",
            &with_defaults(json!({"sub": "alice", "act": {"sub": "assistant"}})),
        )
        .unwrap()
    }
}

/// A second identity provider, `https://partner.test`, with its own key and JWKS file.
pub struct Partner {
    pub key: SigningKey,
    _dir: TempDir,
    jwks_path: PathBuf,
}

pub const PARTNER: &str = "https://partner.test";

impl Partner {
    pub fn new() -> Partner {
        let dir = TempDir::new("partner");
        let (key, _) = SigningKey::generate().unwrap();
        let jwks_path = dir.0.join("partner.jwks.json");
        std::fs::write(&jwks_path, json!({"keys": [key.public_jwk()]}).to_string()).unwrap();
        Partner {
            key,
            _dir: dir,
            jwks_path,
        }
    }

    /// The `inbound:` section trusting the test IdP and this one, each with its `id_prefix`
    /// (None: the default).
    pub fn inbound(&self, prefixes: Option<(&str, &str)>) -> String {
        let prefix = |p: Option<&str>| {
            p.map(|p| format!("      id_prefix: \"{p}\"\n"))
                .unwrap_or_default()
        };
        format!(
            "inbound:\n  jwt:\n    - issuer: {IDP}\n      jwks_file: idp.jwks.json\n      audiences: [{AUDIENCE}]\n{}    - issuer: {PARTNER}\n      jwks_file: {}\n      audiences: [{AUDIENCE}]\n{}",
            prefix(prefixes.map(|p| p.0)),
            self.jwks_path.display(),
            prefix(prefixes.map(|p| p.1)),
        )
    }

    /// Standard claims with this issuer, merged under `claims`, signed.
    pub fn sign(&self, claims: Value) -> String {
        let mut all = with_defaults(claims);
        all["iss"] = json!(PARTNER);
        self.key.sign("JWT", &all).unwrap()
    }
}

pub fn with_defaults(claims: Value) -> Value {
    let now = now();
    let mut all = json!({"iss": IDP, "aud": AUDIENCE, "iat": now, "exp": now + 600});
    for (k, v) in claims.as_object().unwrap() {
        all[k] = v.clone();
    }
    all
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT's claims, read without verifying (for asserting on what an upstream received).
pub fn claims_of(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------- the gateway process

pub struct GatewayOptions<'a> {
    pub upstream: SocketAddr,
    pub extra_policies: &'a [(&'a str, &'a str)],
    /// Replaces the `inbound:` section (default: the Idp's JWKS file).
    pub inbound: Option<String>,
    /// An MCP server's URL, served as upstream `tools` (kind: mcp).
    pub mcp: Option<String>,
    /// Appended to the config file.
    pub extra_config: &'a str,
}

/// A child process, killed on drop.
pub struct Killed(pub Child);

impl Killed {
    /// Sends SIGTERM and waits (at most 10 s) for the process to exit.
    pub async fn terminate_and_wait(&mut self) {
        assert!(Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap()
            .success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().unwrap().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "no exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a server that takes its port as an argument on a free loopback port, and waits
/// (bounded) until it accepts connections. A port found free can be taken before the server
/// binds it: then the server exits, and it is started again on another port. A server that
/// stays up and accepts on that port is the one started.
pub async fn start_on_free_port(
    what: &str,
    mut command: impl FnMut(u16) -> Command,
) -> (Killed, u16) {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Killed(
            command(port)
                .spawn()
                .unwrap_or_else(|e| panic!("start {what}: {e}")),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if server.0.try_wait().unwrap().is_some() {
                break; // exited: most likely the port was taken meanwhile
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
                && server.0.try_wait().unwrap().is_none()
            {
                return (server, port);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} did not listen within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("{what} exited at start five times");
}

/// redis-server on loopback `port`, its files in `dir`, no snapshots; `extra` arguments after.
pub fn redis_command(dir: &Path, port: u16, extra: &[&str]) -> Command {
    let mut command = Command::new("redis-server");
    command
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null());
    command
}

/// A redis-server of the test's own on a free port (installed by scripts/test-deps.sh).
pub async fn start_redis(dir: &Path, extra: &[&str]) -> (Killed, u16) {
    start_on_free_port("redis-server (scripts/test-deps.sh installs it)", |port| {
        redis_command(dir, port, extra)
    })
    .await
}

/// Starts a program that takes its port as its last argument, quiet, on a free port.
pub async fn start_program(what: &str, program: impl Fn() -> Command) -> (Killed, u16) {
    start_on_free_port(what, |port| {
        let mut command = program();
        command
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    })
    .await
}

/// Starts an MCP server (`command(port)`) on a free port; returns it and its endpoint URL.
pub async fn start_mcp_server(what: &str, command: impl FnMut(u16) -> Command) -> (Killed, String) {
    let (server, port) = start_on_free_port(what, command).await;
    (server, format!("http://127.0.0.1:{port}/mcp"))
}

/// A running `toolgate serve` child process, killed on drop.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: TempDir,
    pub idp: Idp,
    pub audit_path: PathBuf,
}

impl Gateway {
    pub async fn start(options: GatewayOptions<'_>) -> Gateway {
        Gateway::start_with_upstreams(options, "").await
    }

    /// `start`, with more upstream entries (YAML, as items of `upstreams:`).
    pub async fn start_with_upstreams(options: GatewayOptions<'_>, more: &str) -> Gateway {
        let dir = TempDir::new("e2e");
        let idp = Idp::new(&dir.0);
        write_policies(&dir.0, options.extra_policies);
        // A tool that declares no arguments, on a route that forwards what is undeclared: its
        // bodies stream through unread.
        std::fs::write(
            dir.0.join("policies/harness.cedarschema"),
            "namespace Toolgate { action \"billing/export\" in [call] appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env } }; }",
        )
        .unwrap();
        std::fs::write(
            dir.0.join("policies/harness.cedar"),
            "@id(\"harness-export\")\npermit (principal, action == Toolgate::Action::\"billing/export\", resource);\n",
        )
        .unwrap();
        let (_, signing_pem) = SigningKey::generate().unwrap();
        std::fs::write(dir.0.join("signing.pem"), signing_pem).unwrap();
        std::fs::write(dir.0.join("admin.token"), ADMIN_TOKEN).unwrap();
        let inbound = options.inbound.unwrap_or_else(|| {
            format!(
                "inbound:\n  jwt:\n    - issuer: {IDP}\n      jwks_file: idp.jwks.json\n      audiences: [{AUDIENCE}]\n"
            )
        });
        let up = options.upstream;
        let mcp = options
            .mcp
            // The recording upstream's own controls are not standard headers: let through.
            .map(|url| format!("  - name: tools\n    url: {url}\n    audience: https://tools.internal\n    kind: mcp\n    forward_headers: [X-Test-Replay, X-Test-Stream]\n"))
            .unwrap_or_default();
        let config = format!(
            r#"listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
admin_token_file: admin.token
issuer: https://toolgate.test
policies: policies/
{inbound}credentials:
  signing_key: signing.pem
  ttl_seconds: 60
upstreams:
  - name: billing
    url: http://{up}/api
    audience: https://billing.internal
    kind: rest
    timeout_seconds: 30
    routes:
      - {{ tool: get_invoice, method: GET, path: "/invoices/{{invoice_id}}" }}
      - {{ tool: list_invoices, method: GET, path: /invoices }}
      - {{ tool: refund, method: POST, path: /refunds }}
      - {{ tool: export, method: POST, path: /export, undeclared_arguments: forward }}
      - {{ tool: list_invoices, method: GET, path: /in-task/invoices, require_task: true }}
  - name: records
    url: http://{up}
    audience: https://records.internal
    kind: rest
    routes:
      - {{ tool: get_patient_record, method: GET, path: "/patients/{{patient_id}}/record" }}
      - {{ tool: delete_patient_record, method: DELETE, path: "/patients/{{patient_id}}/record" }}
{mcp}{more}limits:
  max_body_bytes: 4096
  max_header_bytes: 8192
audit:
  path: audit.jsonl
{extra_config}"#,
            extra_config = options.extra_config,
        );
        std::fs::write(dir.0.join("toolgate.yaml"), config).unwrap();
        let audit_path = dir.0.join("audit.jsonl");
        let (child, addr, admin) = spawn_serve(&dir.0.join("toolgate.yaml")).await;
        Gateway {
            child,
            addr,
            admin,
            dir,
            idp,
            audit_path,
        }
    }

    /// Another `toolgate serve` on the same config (keys, policies, store): a second replica.
    pub async fn replica(&self) -> (Child, SocketAddr) {
        let (child, addr, _) = self.replica_with_admin().await;
        (child, addr)
    }

    /// `replica`, with its admin listener's address.
    pub async fn replica_with_admin(&self) -> (Child, SocketAddr, SocketAddr) {
        spawn_serve(&self.dir.0.join("toolgate.yaml")).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let answer = send("GET", &self.admin_url("/metrics"), &[], b"").await;
        String::from_utf8(answer.body.to_vec()).expect("metrics are text")
    }

    /// A request to the admin listener with the admin token (and a JSON body, if any).
    pub async fn admin(&self, method: &str, path: &str, body: &[u8]) -> Answer {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let mut headers = vec![("authorization", auth.as_str())];
        if !body.is_empty() {
            headers.push(("content-type", "application/json"));
        }
        send(method, &self.admin_url(path), &headers, body).await
    }

    /// The audit lines written so far; waits (bounded) until at least `at_least` are there.
    pub async fn audit(&self, at_least: usize) -> Vec<Value> {
        for _ in 0..100 {
            // Only whole lines: the writer may be half way through the last one.
            let lines: Vec<Value> = std::fs::read_to_string(&self.audit_path)
                .unwrap_or_default()
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
                .collect();
            if lines.len() >= at_least {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {at_least} audit lines after 2 s");
    }

    /// Waits (bounded) until an audit line satisfies `wanted`, and returns it.
    pub async fn audit_line(&self, wanted: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..100 {
            let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
            if let Some(line) = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|l| wanted(l))
            {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no matching audit line after 2 s");
    }

    /// `POST /admin/reload` must be refused (422), its first error mentioning `mentioning`.
    pub async fn assert_reload_refused(&self, mentioning: &str) {
        let reload = self.admin("POST", "/admin/reload", b"").await;
        assert_eq!(reload.status, 422, "{:?}", reload.body);
        let errors = reload.json()["errors"].clone();
        assert!(
            errors[0].as_str().unwrap_or_default().contains(mentioning),
            "{errors}"
        );
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    /// A gateway on the harness's config, with no additions.
    pub async fn plain(upstream: &Upstream) -> Gateway {
        Gateway::start(GatewayOptions {
            upstream: upstream.addr,
            extra_policies: &[],
            inbound: None,
            mcp: None,
            extra_config: "",
        })
        .await
    }

    /// This gateway's config file with `edit` applied, written beside it as `name` (for a
    /// second `toolgate serve` on the same keys and policies).
    pub fn edited_config(&self, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
        let text = std::fs::read_to_string(self.dir.0.join("toolgate.yaml")).unwrap();
        let edited = edit(text.clone());
        assert_ne!(edited, text, "the edit applies");
        let path = self.dir.0.join(name);
        std::fs::write(&path, edited).unwrap();
        path
    }

    /// This gateway's config with `lines` (YAML, two-space indented) added under `limits:`.
    pub fn config_with_limits(&self, name: &str, lines: &str) -> PathBuf {
        self.edited_config(name, |t| {
            t.replace(
                "  max_body_bytes: 4096\n",
                &format!("  max_body_bytes: 4096\n{lines}"),
            )
        })
    }

    /// Sends SIGTERM. Await `exited` for the outcome; the runtime keeps serving meanwhile.
    pub fn terminate(&mut self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        assert!(status.unwrap().success());
    }

    /// Waits (bounded, without blocking the runtime) for the gateway to exit.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway did not exit within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `toolgate serve` and reads the bound addresses from its first stdout line.
pub async fn spawn_serve(config: &Path) -> (Child, SocketAddr, SocketAddr) {
    spawn_serve_logging(config, "warn", None).await
}

/// `spawn_serve` with `RUST_LOG=rust_log`; with `output`, stderr goes to `output/stderr.log`
/// and what stdout prints after the announcement to `output/stdout.log`.
pub async fn spawn_serve_logging(
    config: &Path,
    rust_log: &str,
    output: Option<&Path>,
) -> (Child, SocketAddr, SocketAddr) {
    let stderr = match output {
        Some(dir) => Stdio::from(std::fs::File::create(dir.join("stderr.log")).unwrap()),
        None => Stdio::inherit(),
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_toolgate"));
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", rust_log)
        .stderr(stderr);
    announced_serve(command, output).await
}

/// `toolgate serve --config NAME` run in `dir`: the config given by a bare relative name, as
/// the README spells it.
pub async fn spawn_serve_in(dir: &Path, name: &str) -> (Child, SocketAddr, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_toolgate"));
    command
        .current_dir(dir)
        .args(["serve", "--config", name])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    announced_serve(command, None).await
}

/// Starts `command` (a `toolgate serve`) and waits (bounded) for its announcement: the
/// listener and admin addresses.
pub async fn announced_serve(
    mut command: Command,
    output: Option<&Path>,
) -> (Child, SocketAddr, SocketAddr) {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn toolgate");
    let stdout = child.stdout.take().unwrap();
    let rest: Box<dyn std::io::Write + Send> = match output {
        Some(dir) => Box::new(std::fs::File::create(dir.join("stdout.log")).unwrap()),
        None => Box::new(std::io::sink()),
    };
    let (announced_tx, announced_rx) = tokio::sync::oneshot::channel();
    // Reads the announcement, then keeps draining stdout (an audit on "-" writes there).
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = announced_tx.send(line);
        let mut rest = rest;
        let _ = std::io::copy(&mut reader, &mut rest);
    });
    let line = tokio::time::timeout(Duration::from_secs(20), announced_rx)
        .await
        .expect("gateway announced itself in time")
        .unwrap();
    let announced: Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not an announcement: {line:?}"));
    (
        child,
        announced["listen"].as_str().unwrap().parse().unwrap(),
        announced["admin"].as_str().unwrap().parse().unwrap(),
    )
}

/// The Python of the test venv (the MCP SDK 1.x, and PyJWT with it).
pub fn python() -> PathBuf {
    let python = repo().join(".toolgate-test/venv/bin/python");
    assert!(
        python.exists(),
        "the test venv is missing: run scripts/test-deps.sh"
    );
    python
}

/// Runs the toolgate binary to completion.
pub fn toolgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(args)
        .output()
        .expect("run toolgate")
}

/// `toolgate authorize` with the config in `dir` (`toolgate.yaml`), and `more` arguments:
/// the JSON answer for `request`.
pub fn authorize(dir: &Path, request: &Value, more: &[&str]) -> Value {
    let path = dir.join("request.json");
    std::fs::write(&path, request.to_string()).unwrap();
    let config = dir.join("toolgate.yaml");
    let mut args = vec![
        "authorize",
        "--config",
        config.to_str().unwrap(),
        "--request",
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    let out = toolgate(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

// ---------------------------------------------------------------- HTTP client

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }
}

pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let client = http_client(false);
    let mut request = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("answer within 10 s")
        .expect("request sent");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// The value of one series (its full name and labels, as written) in Prometheus text.
pub fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

/// A pooled HTTP client for requests whose answers a test reads as they stream; `h2` for
/// HTTP/2 only (h2c).
pub fn http_client(h2: bool) -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build_http()
}

pub async fn get(url: &str, token: &str) -> Answer {
    send(
        "GET",
        url,
        &[("authorization", &format!("Bearer {token}"))],
        b"",
    )
    .await
}

// ---------------------------------------------------------------- token endpoint stand-in

/// A stand-in for an upstream's token endpoint (an STS: none installs offline): OAuth 2.0
/// client credentials and RFC 8693 token exchange over real HTTP, recording every request and
/// answering as the test sets (`TokenServer::answer`). Issued tokens are `sts-1`, `sts-2`, ...
pub struct TokenServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<TokenRequest>>>,
    answer: Arc<Mutex<TokenAnswer>>,
    tls: bool,
}

/// One request the token endpoint received.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub form: std::collections::HashMap<String, String>,
    pub authorization: Option<String>,
}

/// How the token endpoint answers.
#[derive(Debug, Clone)]
pub enum TokenAnswer {
    /// A bearer token for the scope asked (or `scope`, when set: a widened grant).
    Issue {
        expires_in: Option<u64>,
        scope: Option<String>,
    },
    /// An OAuth error answer.
    Error { status: u16, code: String },
    /// No answer at all (until the test ends).
    Hang,
    /// `Issue` (300 s, the scope asked), after this long: calls that miss the gateway's cache
    /// meanwhile would each ask, were they not made to wait for the first.
    IssueAfter(Duration),
}

impl TokenServer {
    pub async fn start() -> TokenServer {
        TokenServer::start_with(None).await
    }

    /// The same endpoint behind TLS.
    pub async fn start_tls(acceptor: tokio_rustls::TlsAcceptor) -> TokenServer {
        TokenServer::start_with(Some(acceptor)).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> TokenServer {
        let is_tls = tls.is_some();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(TokenAnswer::Issue {
            expires_in: Some(300),
            scope: None,
        }));
        let (log, how) = (seen.clone(), answer.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (log, how, tls) = (log.clone(), how.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (log, how) = (log.clone(), how.clone());
                        async move {
                            let authorization = req
                                .headers()
                                .get("authorization")
                                .map(|v| v.to_str().unwrap().to_string());
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let form: std::collections::HashMap<String, String> =
                                form_urlencoded::parse(&body).into_owned().collect();
                            let n = {
                                let mut log = log.lock().unwrap();
                                log.push(TokenRequest {
                                    form: form.clone(),
                                    authorization,
                                });
                                log.len()
                            };
                            let mut how = how.lock().unwrap().clone();
                            if let TokenAnswer::IssueAfter(wait) = how {
                                tokio::time::sleep(wait).await;
                                how = TokenAnswer::Issue {
                                    expires_in: Some(300),
                                    scope: None,
                                };
                            }
                            let (status, body) = match how {
                                TokenAnswer::Hang | TokenAnswer::IssueAfter(_) => {
                                    // IssueAfter became an Issue above.
                                    std::future::pending::<()>().await;
                                    unreachable!()
                                }
                                TokenAnswer::Error { status, code } => (
                                    status,
                                    json!({"error": code, "error_description": "refused by the test"}),
                                ),
                                TokenAnswer::Issue { expires_in, scope } => {
                                    let mut body = json!({
                                        "access_token": format!("sts-{n}"),
                                        "token_type": "Bearer",
                                        "scope": scope.unwrap_or_else(|| form.get("scope").cloned().unwrap_or_default()),
                                    });
                                    if let Some(seconds) = expires_in {
                                        body["expires_in"] = json!(seconds);
                                    }
                                    if form.get("grant_type").map(String::as_str)
                                        == Some("urn:ietf:params:oauth:grant-type:token-exchange")
                                    {
                                        body["issued_token_type"] =
                                            json!("urn:ietf:params:oauth:token-type:access_token");
                                    }
                                    (200, body)
                                }
                            };
                            let mut response =
                                Response::new(Full::new(Bytes::from(body.to_string())));
                            *response.status_mut() = StatusCode::from_u16(status).unwrap();
                            response
                                .headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    serve_test_connection(stream, tls, service).await;
                });
            }
        });
        TokenServer {
            addr,
            seen,
            answer,
            tls: is_tls,
        }
    }

    /// Its URL (`https://localhost:...` when it serves TLS).
    pub fn url(&self) -> String {
        match self.tls {
            false => format!("http://{}/token", self.addr),
            true => format!("https://localhost:{}/token", self.addr.port()),
        }
    }

    pub fn answer(&self, how: TokenAnswer) {
        *self.answer.lock().unwrap() = how;
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------- a private PKI

/// A private CA with a server certificate for `localhost`/127.0.0.1 and a client certificate,
/// written as PEM files into `dir` (`ca.pem`, `server.pem`, `server.key`, `client.pem`,
/// `client.key`). `acceptor(require_client)` serves the server certificate.
pub struct Pki {
    pub dir: PathBuf,
    server_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    server_key: Vec<u8>,
    ca: rustls::pki_types::CertificateDer<'static>,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "toolgate test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            (cert, key)
        };
        let (server, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
        let (client, client_key) = leaf(vec!["toolgate.client".into()]);
        for (name, text) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server.pem()),
            ("server.key", server_key.serialize_pem()),
            ("client.pem", client.pem()),
            ("client.key", client_key.serialize_pem()),
        ] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        Pki {
            dir: dir.to_path_buf(),
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_der(),
            ca: ca.der().clone(),
        }
    }

    /// A TLS acceptor with the server certificate; with `require_client`, only clients with
    /// a certificate from this CA get through the handshake.
    pub fn acceptor(&self, require_client: bool) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.server_key.clone().into());
        let mut config = builder
            .with_single_cert(self.server_chain.clone(), key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}
