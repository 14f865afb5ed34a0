//! Forwarding to upstreams: a shared connection pool, the credential swap on the way out,
//! hop-by-hop header hygiene both ways, and bounded waiting.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use toolgate_credential::oauth::{ClientAuth, EndpointError, TokenEndpoint};
use toolgate_credential::secret::{Injected, Placement, Secret, SecretError, SecretSource};
use toolgate_credential::tls::{TlsError, TlsFiles};

use crate::answer::{Body, Refusal, UpstreamError};
use crate::config::{CredentialMode, InjectScheme, UpstreamConfig};
use crate::conn_io::IdleDeadline;
use crate::endpoints::{Dispatch, Endpoints, InFlight, Outcome, Served};
use crate::stdio::{Opener, Spec, StdioServer};
use toolgate_identity::Caller;

/// Hop-by-hop headers (RFC 9110 §7.6.1): never passed on, in either direction.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Also never sent upstream: the agent's own credentials, its Host, toolgate's control headers,
/// and what would change the operation after the decision (method and URL overrides) or
/// claim another client (forwarding headers, set below from the gateway's own view).
const AGENT_ONLY: [&str; 17] = [
    "host",
    "authorization",
    "proxy-authorization",
    "cookie",
    "toolgate-task",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-forwarded-for",
    "x-forwarded-proto",
];

/// Any other `x-forwarded-*` (host, port, prefix, server, ...) is the agent's word, not ours.
const FORWARDED_PREFIX: &str = "x-forwarded-";

/// The agent's request headers passed on to every upstream: content negotiation, conditional
/// requests and caching, tracing. Any other is dropped unless `forward_headers:` lists it: an
/// API may read a header as a parameter that no policy saw (OpenAPI `in: header` ones are
/// declared as arguments instead, `header_arguments:`).
const STANDARD_HEADERS: [&str; 23] = [
    "accept",
    "content-encoding",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "cache-control",
    "pragma",
    "content-type",
    "content-length",
    "content-language",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
    "range",
    "user-agent",
    "origin",
    "idempotency-key",
    "traceparent",
    "tracestate",
    "baggage",
    "toolgate-task",
];

/// MCP's own request headers: passed on to MCP upstreams, and to no REST one, listed or not.
const MCP_HEADERS: [&str; 5] = [
    "mcp-protocol-version",
    "mcp-session-id",
    "last-event-id",
    "mcp-method",
    "mcp-name",
];

/// MCP 2026-07-28 mirrors arguments a tool marks `x-mcp-header` into `Mcp-Param-*` headers;
/// the server checks them against the (rendered) body.
const MCP_PARAM_PREFIX: &str = "mcp-param-";

/// Drops the agent's headers but the standard ones, MCP's own on an MCP upstream, and those
/// `listed` (case-insensitive; never MCP's own on a REST upstream, which reads them as nothing).
pub(crate) fn keep_standard_headers(
    headers: &mut HeaderMap,
    listed: &[&[String]],
    kind: crate::config::UpstreamKind,
) {
    let mcp_own = |name: &str| name.starts_with("mcp-") || MCP_HEADERS.contains(&name);
    let keep = |name: &str| match kind {
        crate::config::UpstreamKind::Rest if mcp_own(name) => false,
        crate::config::UpstreamKind::Mcp
            if MCP_HEADERS.contains(&name) || name.starts_with(MCP_PARAM_PREFIX) =>
        {
            true
        }
        _ => {
            STANDARD_HEADERS.contains(&name)
                || listed
                    .iter()
                    .flat_map(|l| l.iter())
                    .any(|l| l.eq_ignore_ascii_case(name))
        }
    };
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| !keep(name.as_str()))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
}

/// Headers an injected secret may not use: those toolgate removes or sets itself on the way
/// out (they would be dropped, or say something else), and hop-by-hop ones.
pub(crate) fn never_injected(name: &HeaderName) -> bool {
    let name = name.as_str();
    (AGENT_ONLY.contains(&name) && name != "authorization")
        || HOP_BY_HOP.contains(&name)
        || name.starts_with(FORWARDED_PREFIX)
        || name.contains('_')
        || matches!(name, "content-length" | "content-type")
}

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// A pooled client trusting `tls` (default: the public web roots, no client certificate).
pub fn client(connect_timeout: Duration, tls: &TlsFiles) -> Result<HttpClient, TlsError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(toolgate_credential::tls::client_config(tls)?)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https))
}

/// An upstream, ready to take calls.
pub struct Upstream {
    pub config: UpstreamConfig,
    /// The first endpoint's URL: calls' URIs are formed with it, then sent to any endpoint.
    base: String,
    pub(crate) endpoints: Endpoints,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// `max_in_flight` places, when the upstream has a limit of its own.
    places: Option<Arc<Semaphore>>,
    transport: Transport,
    pub credentials: Credentials,
}

/// How calls reach the server.
enum Transport {
    /// The shared pool, or the upstream's own when it has TLS settings of its own.
    Http(Box<HttpClient>),
    /// A `command:` server, run by the gateway.
    Stdio(Arc<StdioServer>),
}

/// Where a forwarded call's credential comes from (`credential.mode`).
pub enum Credentials {
    /// toolgate's own per-call token.
    Mint,
    /// A static secret of the upstream's, and its name for the audit.
    Inject(Injected, String),
    /// A token from the upstream's own token endpoint.
    Token {
        endpoint: Box<TokenEndpoint>,
        /// RFC 8693 exchange (else client credentials).
        exchange: bool,
    },
    /// A `command:` server: none per call; its secret, if any, is in its environment (named
    /// for the audit).
    Process(Option<String>),
}

/// Why an upstream cannot be set up (its secrets, keys or TLS files): start and reload refuse.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstream {0}: credential")]
    Secret(String, #[source] SecretError),
    #[error("upstream {0}: credential.private_key: {1}")]
    Key(String, String),
    #[error("upstream {0}: token endpoint")]
    Endpoint(String, #[source] EndpointError),
    #[error("upstream {0}: tls")]
    Tls(String, #[source] TlsError),
    /// What `Config::check` refuses, met by a config that did not go through it.
    #[error("upstream {0}: credential: {1}")]
    Incomplete(String, &'static str),
}

impl Credentials {
    /// `name_secret` names a static secret for the audit (`Minter::secret_id`).
    fn new(
        config: &UpstreamConfig,
        name_secret: &dyn Fn(&str) -> String,
    ) -> Result<Credentials, SetupError> {
        let c = &config.credential;
        let name = || config.name.clone();
        let incomplete = |what| SetupError::Incomplete(config.name.clone(), what);
        let source = |file, env| secret_source(config, file, env);
        if config.command.is_some() {
            let secret = process_secret(config)?;
            return Ok(Credentials::Process(secret.map(|(_, s)| name_secret(&s))));
        }
        Ok(match c.mode() {
            CredentialMode::Mint => Credentials::Mint,
            CredentialMode::Inject => {
                let placement = match (&c.header, c.scheme) {
                    (Some(header), _) => Placement::Header(
                        HeaderName::from_bytes(header.as_bytes())
                            .map_err(|_| incomplete("header is not a header name"))?,
                    ),
                    (None, Some(InjectScheme::Bearer)) => Placement::Bearer,
                    (None, Some(InjectScheme::Basic)) => Placement::Basic,
                    (None, None) => return Err(incomplete("no header or scheme")),
                };
                let injected = Injected::new(placement, &source(&c.secret_file, &c.secret_env)?)
                    .map_err(|e| SetupError::Secret(name(), e))?;
                let id = name_secret(injected.secret().expose());
                Credentials::Inject(injected, id)
            }
            CredentialMode::Exchange | CredentialMode::ClientCredentials => {
                let auth = match &c.private_key {
                    Some(path) => {
                        let pem = std::fs::read_to_string(path).map_err(|e| {
                            SetupError::Key(name(), format!("{}: {e}", path.display()))
                        })?;
                        ClientAuth::PrivateKeyJwt(Box::new(
                            toolgate_credential::SigningKey::from_pkcs8_pem(&pem)
                                .map_err(|e| SetupError::Key(name(), e.to_string()))?,
                        ))
                    }
                    None => ClientAuth::Secret(
                        Secret::read(&source(&c.client_secret_file, &c.client_secret_env)?)
                            .map_err(|e| SetupError::Secret(name(), e))?,
                    ),
                };
                let tls = config.tls.as_ref().map(|t| t.files()).unwrap_or_default();
                let endpoint = TokenEndpoint::new(
                    c.token_endpoint
                        .as_deref()
                        .ok_or_else(|| incomplete("no token_endpoint"))?,
                    c.client_id
                        .as_deref()
                        .ok_or_else(|| incomplete("no client_id"))?,
                    auth,
                    &tls,
                    Duration::from_secs(c.timeout_seconds),
                )
                .map_err(|e| SetupError::Endpoint(name(), e))?;
                Credentials::Token {
                    endpoint: Box::new(endpoint),
                    exchange: c.mode() == CredentialMode::Exchange,
                }
            }
        })
    }
}

/// A `command:` upstream's secret (`credential: {mode: inject, env_var}`): the variable and
/// its value.
pub(crate) fn process_secret(
    config: &UpstreamConfig,
) -> Result<Option<(String, String)>, SetupError> {
    let c = &config.credential;
    let (Some(CredentialMode::Inject), Some(var)) = (c.mode, &c.env_var) else {
        return Ok(None);
    };
    let source = secret_source(config, &c.secret_file, &c.secret_env)?;
    let secret = Secret::read(&source).map_err(|e| SetupError::Secret(config.name.clone(), e))?;
    Ok(Some((var.clone(), secret.expose().to_string())))
}

/// Where a secret is read from: its file, or else its environment variable.
fn secret_source(
    config: &UpstreamConfig,
    file: &Option<std::path::PathBuf>,
    env: &Option<String>,
) -> Result<SecretSource, SetupError> {
    match (file, env) {
        (Some(path), _) => Ok(SecretSource::File(path.clone())),
        (None, Some(var)) => Ok(SecretSource::Env(var.clone())),
        (None, None) => Err(SetupError::Incomplete(
            config.name.clone(),
            "no secret file or variable",
        )),
    }
}

/// What every upstream of one config shares: the connection pool, and (when they are to run,
/// not only be checked) the metrics and the stdio servers already running, by name.
pub(crate) struct Shared<'a> {
    pub client: &'a HttpClient,
    pub connect_timeout: Duration,
    pub metrics: Option<&'a Arc<crate::metrics::Metrics>>,
    /// The routing being replaced: its stdio servers go on where unchanged.
    pub previous: Option<&'a crate::Routing>,
}

/// A call's place among an upstream's `max_in_flight`; given back when dropped.
pub struct Place(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Upstream {
    /// Sets up an upstream: its credentials (secrets read now) and, with TLS settings of its
    /// own, its own connection pool; else it shares `shared`.
    pub fn new(
        config: UpstreamConfig,
        shared: &Shared<'_>,
        name_secret: &dyn Fn(&str) -> String,
    ) -> Result<Self, SetupError> {
        let base = config.primary_url().trim_end_matches('/').to_string();
        let mut endpoints = Endpoints::new(&config, name_secret);
        let before = shared
            .previous
            .and_then(|p| p.upstreams.iter().find(|u| u.name() == config.name));
        if let Some(before) = before {
            endpoints.inherit(&before.endpoints);
        }
        let places = config.max_in_flight.map(|n| Arc::new(Semaphore::new(n)));
        let credentials = Credentials::new(&config, name_secret)?;
        let transport = if config.command.is_some() {
            let spec = Spec::new(&config, process_secret(&config)?);
            let running = shared.previous.and_then(|p| p.process(&config.name));
            match running {
                Some(server) if server.runs(&spec) => Transport::Stdio(server),
                _ => match shared.metrics {
                    Some(metrics) => {
                        Transport::Stdio(StdioServer::new(&config.name, spec, metrics.clone()))
                    }
                    // Only checked, never run.
                    None => Transport::Http(Box::new(shared.client.clone())),
                },
            }
        } else {
            Transport::Http(Box::new(match &config.tls {
                Some(tls) => client(shared.connect_timeout, &tls.files())
                    .map_err(|e| SetupError::Tls(config.name.clone(), e))?,
                None => shared.client.clone(),
            }))
        };
        Ok(Upstream {
            config,
            base,
            endpoints,
            metrics: shared.metrics.cloned(),
            places,
            transport,
            credentials,
        })
    }

    /// The upstream's stdio server, when it runs a command.
    pub(crate) fn stdio(&self) -> Option<&Arc<StdioServer>> {
        match &self.transport {
            Transport::Stdio(server) => Some(server),
            Transport::Http(_) => None,
        }
    }

    /// A place for one more call, if the upstream's own limit has one left.
    pub fn admit(&self) -> Option<Place> {
        match &self.places {
            None => Some(Place(None)),
            Some(places) => places
                .clone()
                .try_acquire_owned()
                .ok()
                .map(|p| Place(Some(p))),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// `base + path + ?query`, from the canonical path and query the call was read as.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, Refusal> {
        // Nothing after `/<upstream>` means the upstream URL itself (`/mcp`, not `/mcp/`).
        let mut uri = format!("{}{path}", self.base);
        if uri.is_empty() {
            // A `command:` server has no URL: the request only carries the path to it.
            uri.push('/');
        }
        if let Some(q) = query {
            uri.push('?');
            uri.push_str(q);
        }
        uri.parse()
            .map_err(|e| Refusal::BadRequest(format!("cannot form upstream URI: {e}")))
    }

    /// Sends the call with its credential (a header) in place of whatever the agent sent, to
    /// one endpoint after the other while nothing of it reached the one tried (`served` says
    /// where it went, and after how many attempts).
    pub(crate) async fn forward(
        &self,
        mut request: Request<Body>,
        credential: Option<(HeaderName, HeaderValue)>,
        agent: &ClientView,
        caller: &Caller,
        served: &mut Served,
    ) -> Result<Response<Body>, Refusal> {
        let headers = request.headers_mut();
        strip_hop_by_hop(headers);
        for name in AGENT_ONLY {
            headers.remove(name);
        }
        // Sessions are bound to their caller on MCP upstreams (mcp.rs); a REST route must not
        // carry a bare one to a server that is also served as MCP.
        if self.config.kind == crate::config::UpstreamKind::Rest {
            headers.remove("mcp-session-id");
        }
        // Servers behind CGI-style header maps (nginx, PHP, Rack, WSGI) read `_` as `-`:
        // `X_HTTP_Method_Override` would pass for a header removed above. Dropped as nginx
        // does by default.
        let agent_forwarded: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with(FORWARDED_PREFIX) || k.as_str().contains('_'))
            .cloned()
            .collect();
        for name in agent_forwarded {
            headers.remove(name);
        }
        // `insert` replaces any value the agent sent under the same name.
        if let Some((name, value)) = credential {
            headers.insert(name, value);
        }
        headers.insert("x-forwarded-for", agent.ip_header());
        headers.insert("x-forwarded-proto", HeaderValue::from_static(agent.scheme));
        *request.version_mut() = http::Version::HTTP_11;

        let client = match &self.transport {
            Transport::Http(client) => client,
            Transport::Stdio(server) => {
                let opener = Opener {
                    agent: &caller.agent,
                    user: caller.user.as_deref(),
                };
                // Streams come back at once; what is waited for (a start, a JSON answer) is
                // bounded as a URL's headers are.
                let timeout = Duration::from_secs(self.config.timeout_seconds);
                served.attempts = 1;
                return tokio::time::timeout(timeout, server.handle(request, opener))
                    .await
                    .map_err(|_| Refusal::UpstreamTimeout);
            }
        };
        self.send(client, request, served).await
    }

    /// Tries the endpoints in the balance's order. Another is tried only when the connection
    /// to the last failed (nothing of the call was written), or when it answered 502/503 to a
    /// call whose route allows it; and only with a body that can be sent again.
    async fn send(
        &self,
        client: &HttpClient,
        request: Request<Body>,
        served: &mut Served,
    ) -> Result<Response<Body>, Refusal> {
        let dispatch = request
            .extensions()
            .get::<Dispatch>()
            .cloned()
            .unwrap_or_default();
        let order = self.endpoints.order(dispatch.endpoint.as_deref());
        let (parts, body) = request.into_parts();
        let timeout = Duration::from_secs(self.config.timeout_seconds);
        // `timeout_seconds` bounds the call, not each attempt: tries cannot add up.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut body = Replay::new(body, order.len() > 1, timeout).await?;
        for (n, &index) in order.iter().enumerate() {
            if n > 0 {
                if let Some(metrics) = &self.metrics {
                    metrics
                        .upstream_retries
                        .with_label_values(&[self.name()])
                        .inc();
                }
            }
            let endpoint = self.endpoints.get(index);
            served.attempts += 1;
            served.endpoint = Some(endpoint.key.clone());
            let again = n + 1 < order.len() && body.can_replay();
            let Some(sent) = body.take() else {
                break;
            };
            let attempt = attempt_at(endpoint, &parts, sent);
            let in_flight = self.endpoints.enter(index);
            let result = tokio::time::timeout_at(deadline, client.request(attempt)).await;
            // Only what says the endpoint itself is failing: a slow tool or a broken upload
            // is the agent's to cause, not the endpoint's health.
            match &result {
                Ok(Ok(response)) if matches!(response.status().as_u16(), 502 | 503) => {
                    self.record(index, Outcome::Failed)
                }
                Ok(Ok(_)) => self.record(index, Outcome::Answered),
                Ok(Err(e)) if e.is_connect() => self.record(index, Outcome::Failed),
                _ => {}
            }
            // A second try needs time to be worth it: else the first answer stands.
            let time_left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let again = again && time_left >= timeout / 4;
            match result {
                Err(_) => return Err(Refusal::UpstreamTimeout),
                Ok(Err(e)) if e.is_connect() && again => continue,
                Ok(Err(e)) => return Err(UpstreamError::Send(e).into()),
                Ok(Ok(response))
                    if again
                        && dispatch.retry_unavailable
                        && matches!(response.status().as_u16(), 502 | 503)
                        // Never onto an ejected one: that only adds load to what is failing.
                        && !self.endpoints.ejected(order[n + 1]) =>
                {
                    continue
                }
                Ok(Ok(response)) => {
                    let idle = Duration::from_secs(self.config.response_idle_seconds);
                    return Ok(into_downstream(response, idle, in_flight));
                }
            }
        }
        // Only with no endpoint to try: a session's endpoint is gone from the config, so the
        // session is unknown here.
        Err(Refusal::NotFound("session_not_found"))
    }

    /// Records an endpoint's outcome, and says so when it ejected the endpoint.
    fn record(&self, index: usize, outcome: Outcome) {
        if !self.endpoints.record(index, outcome) {
            return;
        }
        let endpoint = &self.endpoints.get(index).label;
        tracing::warn!(
            upstream = self.name(),
            endpoint,
            "endpoint ejected after failing"
        );
        if let Some(metrics) = &self.metrics {
            metrics
                .endpoint_ejections
                .with_label_values(&[self.name(), endpoint])
                .inc();
        }
    }
}

/// The request as sent to `endpoint`: its own scheme and authority, the same everything else.
fn attempt_at(
    endpoint: &crate::endpoints::Endpoint,
    parts: &http::request::Parts,
    body: Body,
) -> Request<Body> {
    let mut attempt = Request::new(body);
    *attempt.method_mut() = parts.method.clone();
    *attempt.uri_mut() = endpoint.rebase(&parts.uri);
    *attempt.version_mut() = parts.version;
    *attempt.headers_mut() = parts.headers.clone();
    attempt
}

/// A request body that may have to be sent again: kept whole when small enough and another
/// endpoint may be tried; else sent once, as it streams.
enum Replay {
    Once(Option<Body>),
    Kept(bytes::Bytes),
}

/// A body larger than this (or of unknown length) is streamed, and its call never retried.
const REPLAY_LIMIT: u64 = 1 << 20;

impl Replay {
    async fn new(body: Body, may_retry: bool, within: Duration) -> Result<Replay, Refusal> {
        let small = http_body::Body::size_hint(&body)
            .exact()
            .is_some_and(|n| n <= REPLAY_LIMIT);
        if !(may_retry && small) {
            return Ok(Replay::Once(Some(body)));
        }
        let limit = crate::pipeline::BodyLimit {
            bytes: REPLAY_LIMIT as usize,
            within,
        };
        Ok(Replay::Kept(
            crate::pipeline::read_limited(body, limit).await?,
        ))
    }

    fn take(&mut self) -> Option<Body> {
        match self {
            Replay::Once(body) => body.take(),
            Replay::Kept(bytes) => Some(crate::answer::full(bytes.clone())),
        }
    }

    fn can_replay(&self) -> bool {
        matches!(self, Replay::Kept(_))
    }
}

fn into_downstream(
    response: Response<Incoming>,
    idle: Duration,
    in_flight: InFlight,
) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // A proxy answers in its own HTTP version (RFC 9110 §6.2), whatever the upstream spoke: an
    // HTTP/1.0 upstream must not turn the agent's keep-alive HTTP/1.1 into a closing 1.0.
    parts.version = http::Version::default();
    Response::from_parts(parts, IdleBody::new(body, idle, in_flight).boxed())
}

/// An upstream's answer, ended with an error once none of it has come for `idle`: a stalled
/// upstream cannot hold the agent's connection (and its place) forever.
struct IdleBody {
    inner: Incoming,
    deadline: IdleDeadline,
    /// The call counts as in flight at its endpoint until its answer is done with.
    _in_flight: InFlight,
}

impl IdleBody {
    fn new(inner: Incoming, idle: Duration, in_flight: InFlight) -> Self {
        IdleBody {
            inner,
            deadline: IdleDeadline::new(idle),
            _in_flight: in_flight,
        }
    }
}

impl http_body::Body for IdleBody {
    type Data = bytes::Bytes;
    type Error = crate::answer::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.deadline.moved();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if self.deadline.passed(cx) => {
                Poll::Ready(Some(Err("the upstream's answer went idle".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Removes the hop-by-hop headers and any the `Connection` header names. Done to each request
/// as it arrives, before anything is read from it: a header the agent names there
/// (`Connection: content-type`) is not the gateway's to read, and must not remove later what
/// the gateway sets itself.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The agent's connection as the gateway saw it: what the forwarding headers say.
#[derive(Debug, Clone, Copy)]
pub struct ClientView {
    pub ip: IpAddr,
    /// `http` or `https`: how the agent reached the gateway.
    pub scheme: &'static str,
}

impl ClientView {
    fn ip_header(&self) -> HeaderValue {
        HeaderValue::from_str(&self.ip.to_string()).expect("an IP address is a header value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_nominated_headers_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer inbound"),
            ("cookie", "session=1"),
            ("proxy-authorization", "Basic x"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("toolgate-task", "t"),
            ("accept", "application/json"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            left,
            vec![
                "authorization",
                "cookie",
                "proxy-authorization",
                "toolgate-task",
                "accept"
            ]
        );
    }

    #[test]
    fn uri_keeps_base_path_and_query() {
        let mut config = crate::config::UpstreamConfig {
            name: "b".into(),
            command: None,
            env: Default::default(),
            process: Default::default(),
            url: "http://127.0.0.1:9/api/".into(),
            urls: Vec::new(),
            balance: Default::default(),
            passive_health: Default::default(),
            audience: "a".into(),
            kind: crate::config::UpstreamKind::Rest,
            routes: vec![],
            timeout_seconds: 1,
            require_task: false,
            max_in_flight: None,
            response_idle_seconds: 300,
            credential: Default::default(),
            tls: None,
            undeclared_arguments: None,
            forward_headers: Vec::new(),
        };
        let client = client(Duration::from_secs(1), &TlsFiles::default()).unwrap();
        let shared = Shared {
            client: &client,
            connect_timeout: Duration::from_secs(1),
            metrics: None,
            previous: None,
        };
        let name = |s: &str| s.to_string();
        let up = Upstream::new(config.clone(), &shared, &name).unwrap();
        assert_eq!(
            up.uri("/invoices/4%202", Some("x=1")).unwrap(),
            "http://127.0.0.1:9/api/invoices/4%202?x=1"
        );
        config.url = "http://127.0.0.1:9".into();
        assert_eq!(
            Upstream::new(config, &shared, &name)
                .unwrap()
                .uri("", None)
                .unwrap(),
            "http://127.0.0.1:9/"
        );
    }
}
