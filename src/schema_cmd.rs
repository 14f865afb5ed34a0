//! `toolgate schema mcp`: the Cedar schema fragment for an MCP server's tools, from the server
//! itself (`--url`: initialize, then `tools/list` with every page) or a saved answer (`--from`).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use toolgate_mcp::{event_json, SseSplitter};

use crate::cedar_types::{cedar_schema_for_server, McpServer};

const PROTOCOL_VERSION: &str = "2025-06-18";

pub async fn run(
    upstream: &str,
    url: Option<&str>,
    from: Option<&Path>,
    headers: &[String],
) -> Result<ExitCode, String> {
    let server = match (url, from) {
        (Some(url), None) => fetch_server(url, headers).await?,
        (None, Some(path)) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let saved: Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            saved_server(&saved).ok_or("no tools array in the file")?
        }
        _ => return Err("give exactly one of --url and --from".into()),
    };
    print!("{}", cedar_schema_for_server(upstream, &server));
    Ok(ExitCode::SUCCESS)
}

/// What a saved file holds: a tools/list answer (whole, its result, or the tools array), or
/// an object with `tools` and, optionally, `resourceTemplates` and `prompts` (each a
/// listing's array; present means the server offers resources or prompts).
fn saved_server(saved: &Value) -> Option<McpServer> {
    let listing = saved.get("result").unwrap_or(saved);
    let tools = listing.get("tools").unwrap_or(listing).as_array()?.clone();
    let array = |key: &str| listing.get(key).and_then(Value::as_array).cloned();
    Some(McpServer {
        tools,
        templates: array("resourceTemplates"),
        prompts: array("prompts"),
    })
}

/// Where a session's messages go: a server's URL, or a `command:` server run here.
enum Server {
    Url {
        client: Box<
            Client<
                hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
                Full<Bytes>,
            >,
        >,
        url: String,
    },
    Command(toolgate_gateway::LocalServer, String),
}

struct Session {
    server: Server,
    headers: Vec<(String, String)>,
    session_id: Option<String>,
}

impl Session {
    fn name(&self) -> &str {
        match &self.server {
            Server::Url { url, .. } => url,
            Server::Command(_, name) => name,
        }
    }

    /// One request to the server: its status, headers and whole body.
    async fn send(
        &self,
        request: http::request::Builder,
        body: Bytes,
    ) -> Result<(http::response::Parts, Bytes), String> {
        let within = Duration::from_secs(15);
        let timed_out = |_| format!("{}: timed out", self.name());
        let (parts, body) = match &self.server {
            Server::Url { client, url } => {
                let request = request
                    .uri(url)
                    .body(Full::new(body))
                    .map_err(|e| e.to_string())?;
                let response = tokio::time::timeout(within, client.request(request))
                    .await
                    .map_err(timed_out)?
                    .map_err(|e| format!("{url}: {e}"))?;
                let (parts, body) = response.into_parts();
                (
                    parts,
                    body.collect().await.map_err(|e| e.to_string())?.to_bytes(),
                )
            }
            Server::Command(server, _) => {
                let body = Full::new(body).map_err(|never| match never {}).boxed();
                let request = request.uri("/").body(body).map_err(|e| e.to_string())?;
                let response = tokio::time::timeout(within, server.exchange(request))
                    .await
                    .map_err(timed_out)?;
                let (parts, body) = response.into_parts();
                (
                    parts,
                    body.collect().await.map_err(|e| e.to_string())?.to_bytes(),
                )
            }
        };
        Ok((parts, body))
    }

    /// POSTs one message; returns the response with `id` (from JSON or SSE), if one is expected.
    async fn post(&mut self, message: Value) -> Result<Option<Value>, String> {
        let mut request = http::Request::post("/")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", PROTOCOL_VERSION);
        for (k, v) in &self.headers {
            request = request.header(k.as_str(), v.as_str());
        }
        if let Some(id) = &self.session_id {
            request = request.header("mcp-session-id", id.as_str());
        }
        let (parts, body) = self.send(request, Bytes::from(message.to_string())).await?;
        if let Some(id) = parts
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            self.session_id = Some(id.to_string());
        }
        let status = parts.status;
        let sse = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"));
        if !status.is_success() {
            return Err(format!(
                "{}: HTTP {status}: {}",
                self.name(),
                String::from_utf8_lossy(&body)
            ));
        }
        let Some(id) = message.get("id") else {
            return Ok(None);
        };
        let candidates: Vec<Value> = if sse {
            let mut splitter = SseSplitter::new(usize::MAX);
            let mut events = splitter.push(&body)?;
            events.push(splitter.finish());
            events.iter().filter_map(|e| event_json(e)).collect()
        } else {
            vec![serde_json::from_slice(&body).map_err(|e| format!("answer is not JSON: {e}"))?]
        };
        let answer = candidates
            .into_iter()
            .find(|m| m.get("id") == Some(id))
            .ok_or("no answer to the request")?;
        if let Some(error) = answer.get("error") {
            return Err(format!("server error: {error}"));
        }
        Ok(Some(answer))
    }
}

/// What an MCP server at `url` offers.
pub async fn fetch_server(url: &str, headers: &[String]) -> Result<McpServer, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let server = Server::Url {
        client: Box::new(Client::builder(TokioExecutor::new()).build(https)),
        url: url.to_string(),
    };
    fetch(server, headers).await
}

/// What a configured MCP upstream offers: asked at its URL, or of its command, run here.
pub async fn fetch_upstream(
    upstream: &toolgate_gateway::config::UpstreamConfig,
    headers: &[String],
) -> Result<McpServer, String> {
    if upstream.command.is_none() {
        return fetch_server(upstream.primary_url(), headers).await;
    }
    let local = toolgate_gateway::LocalServer::start(upstream)?;
    let server = Server::Command(local, upstream.name.clone());
    fetch(server, headers).await
}

async fn fetch(server: Server, headers: &[String]) -> Result<McpServer, String> {
    let mut session = Session {
        server,
        headers: headers
            .iter()
            .map(|h| {
                let (k, v) = h
                    .split_once(':')
                    .ok_or_else(|| format!("--header {h}: expected NAME: VALUE"))?;
                Ok((k.trim().to_string(), v.trim().to_string()))
            })
            .collect::<Result<_, String>>()?,
        session_id: None,
    };
    let offered = offered(&mut session).await;
    if let Server::Command(local, _) = &session.server {
        local.shutdown().await;
    }
    offered
}

/// The server's tools, resource templates and prompts, after the handshake.
async fn offered(session: &mut Session) -> Result<McpServer, String> {
    let initialized = session
        .post(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": "toolgate-schema", "version": env!("CARGO_PKG_VERSION")}}}),
        )
        .await?
        .ok_or("no initialize answer")?;
    session
        .post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await?;
    let offers = |capability: &str| {
        initialized
            .pointer(&format!("/result/capabilities/{capability}"))
            .is_some()
    };
    let tools = list_all(session, "tools/list", "tools").await?;
    let templates = match offers("resources") {
        true => Some(list_all(session, "resources/templates/list", "resourceTemplates").await?),
        false => None,
    };
    let prompts = match offers("prompts") {
        true => Some(list_all(session, "prompts/list", "prompts").await?),
        false => None,
    };
    Ok(McpServer {
        tools,
        templates,
        prompts,
    })
}

/// Every page of a listing (`method`), the items under `key`.
async fn list_all(session: &mut Session, method: &str, key: &str) -> Result<Vec<Value>, String> {
    let mut items = Vec::new();
    let mut cursor: Option<Value> = None;
    for page in 2..1000 {
        let params = match &cursor {
            Some(c) => json!({"cursor": c}),
            None => json!({}),
        };
        let answer = session
            .post(json!({"jsonrpc": "2.0", "id": page, "method": method, "params": params}))
            .await?
            .ok_or_else(|| format!("no {method} answer"))?;
        items.extend(
            answer
                .pointer(&format!("/result/{key}"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        );
        cursor = answer
            .pointer("/result/nextCursor")
            .filter(|c| !c.is_null())
            .cloned();
        if cursor.is_none() {
            break;
        }
    }
    Ok(items)
}
