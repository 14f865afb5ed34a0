//! `toolgate import openapi`: an upstream, its routes and its Cedar actions from an OpenAPI
//! 3.0 or 3.1 document: one tool per operation, `context.args` typed from its path, query and
//! JSON body parameters. What Cedar cannot say, or toolgate does not read, is left out and
//! reported; a re-run on a newer document reports what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;
use serde_json::{Map, Value};
use toolgate_policy::{ActionContext, AttrType, SchemaInfo};

use crate::cedar_types::{
    action_declaration, looks_sensitive, one_line, printable, quote, render_record, Field, Typer,
};

mod document;
mod examples;
mod overrides;

use document::{yaml_to_json, Document, MAX_REF_DEPTH};
use overrides::Overrides;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[derive(Serialize)]
struct UpstreamEntry {
    name: String,
    url: String,
    audience: String,
    kind: &'static str,
    routes: Vec<Route>,
}

#[derive(Serialize, Clone, PartialEq)]
struct Route {
    tool: String,
    method: String,
    path: String,
    /// Set only where the method's default (query for GET, HEAD, DELETE, OPTIONS; else body)
    /// is not where the operation's arguments are.
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'static str>,
    /// Request headers the operation reads as parameters (`in: header`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    header_arguments: Vec<String>,
}

/// One imported operation.
struct Tool {
    route: Route,
    summary: Option<String>,
    args: Vec<Field>,
}

pub fn run(
    spec: &Path,
    upstream: &str,
    url: Option<&str>,
    audience: Option<&str>,
    out: &Path,
) -> Result<ExitCode, String> {
    if upstream.is_empty()
        || !upstream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!("--upstream `{upstream}`: a name of [A-Za-z0-9_-]"));
    }
    let doc = Document::read(spec)?;
    openapi_version(&doc.root).map_err(|e| format!("{}: {e}", spec.display()))?;
    let url = base_url(&doc.root, spec, url)?;
    let mut notes = Vec::new();
    let mut tools = operations(&doc, &mut notes)?;
    if tools.is_empty() {
        return Err(format!("{}: no operations under `paths`", spec.display()));
    }
    if let Some(webhooks) = doc.root.get("webhooks").and_then(Value::as_object) {
        for name in webhooks.keys() {
            notes.push(format!(
                "webhook `{name}`: the API calls out, not an operation an agent calls"
            ));
        }
    }
    let overrides_name = format!("{upstream}.overrides.yaml");
    let overrides_path = out.join(&overrides_name);
    let overrides = match Overrides::read(&overrides_path)? {
        Some(overrides) => Some(overrides.apply(&mut tools)?),
        None => None,
    };
    let origin = origin(
        &doc.root,
        spec,
        overrides.is_some().then_some(&overrides_name),
    );
    let entry = UpstreamEntry {
        name: upstream.to_string(),
        audience: audience.unwrap_or(&url).to_string(),
        url,
        kind: "rest",
        routes: tools.iter().map(|t| t.route.clone()).collect(),
    };
    let imported = Imported {
        upstream,
        origin: &origin,
        tools: &tools,
    };
    let written = imported.write(&entry, out)?;
    imported.report(&written, &notes);
    if let Some(conflicts) = overrides {
        println!("applied {}", overrides_path.display());
        for line in conflicts {
            println!("  {}", one_line(&line));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The document, for the written files' comments (on one line: they are the document's
/// words), and the overrides file when one was applied.
fn origin(doc: &Value, spec: &Path, overrides: Option<&String>) -> String {
    let text = |pointer: &str, default: &'static str| {
        doc.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let mut origin = format!(
        "{} {} ({}, openapi {})",
        text("/info/title", "an OpenAPI document"),
        text("/info/version", ""),
        spec.file_name().unwrap_or_default().to_string_lossy(),
        text("/openapi", "")
    );
    if let Some(overrides) = overrides {
        origin.push_str(&format!(" with the changes in {overrides}"));
    }
    one_line(&origin)
}

/// What an import made, before it is written.
struct Imported<'a> {
    upstream: &'a str,
    /// The document, for the files' comments.
    origin: &'a str,
    tools: &'a [Tool],
}

/// What an import wrote.
struct Written {
    routes: PathBuf,
    schema: PathBuf,
    policies: PathBuf,
    /// The starter policies were written (there were none).
    starter: bool,
    /// Since the files of a previous import, if there were some.
    changes: Option<Vec<String>>,
}

impl Imported<'_> {
    fn schema(&self) -> Result<String, String> {
        let mut schema = format!(
            "// Generated by `toolgate import openapi` from {}: one action per operation.\nnamespace Toolgate {{\n",
            self.origin
        );
        for tool in self.tools {
            schema.push_str(&action_declaration(
                &format!("{}/{}", self.upstream, tool.route.tool),
                tool.summary.as_deref(),
                &render_record(&tool.args),
            ));
        }
        schema.push_str("}\n");
        if schema.len() > MAX_SCHEMA_BYTES {
            return Err(format!(
                "the schema would be {} MiB, more than {} MiB: the document's types fan out too far",
                schema.len() >> 20,
                MAX_SCHEMA_BYTES >> 20
            ));
        }
        Ok(schema)
    }

    fn write(&self, entry: &UpstreamEntry, out: &Path) -> Result<Written, String> {
        let routes_yaml = format!(
            "# Generated by `toolgate import openapi` from {}.\n# A list with one upstream: put the entry under `upstreams:` in the config.\n{}",
            self.origin,
            serde_norway::to_string(&vec![entry]).map_err(|e| e.to_string())?
        );
        let schema = self.schema()?;
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
        let upstream = self.upstream;
        let routes = out.join(format!("{upstream}.upstream.yaml"));
        let schema_path = out.join(format!("{upstream}.cedarschema"));
        let policies = out.join(format!("{upstream}.cedar"));
        let changes = changes_since(&routes, &schema_path, upstream, self.tools, &schema)?;
        write(&routes, &routes_yaml)?;
        write(&schema_path, &schema)?;
        // The team's own policies are never overwritten.
        let starter = !policies.exists();
        if starter {
            write(&policies, &starter_policies(upstream, self.tools))?;
        }
        Ok(Written {
            routes,
            schema: schema_path,
            policies,
            starter,
            changes,
        })
    }

    fn report(&self, written: &Written, notes: &[String]) {
        println!(
            "imported {} operations of {} as upstream `{}`",
            self.tools.len(),
            self.origin,
            self.upstream
        );
        println!("wrote {}", written.routes.display());
        println!("wrote {}", written.schema.display());
        if written.starter {
            println!("wrote {} (permits nothing yet)", written.policies.display());
        } else {
            println!("kept {} (your policies)", written.policies.display());
        }
        if !notes.is_empty() {
            println!("notes (read as JSON text where Cedar has no type; left out where toolgate does not read it):");
            for line in notes {
                println!("  {}", printable(line));
            }
        }
        if let Some(changes) = &written.changes {
            println!("since the last import:");
            for line in changes {
                println!("  {}", printable(line));
            }
        }
    }
}

/// The document's OpenAPI version, 3.0 or 3.1; anything else is refused, saying what to do.
fn openapi_version(doc: &Value) -> Result<&str, String> {
    let version = doc.get("openapi").and_then(Value::as_str).unwrap_or("");
    if version.starts_with("3.0.") || version.starts_with("3.1.") {
        return Ok(version);
    }
    Err(match doc.get("swagger") {
        Some(swagger) => format!(
            "Swagger {}: only OpenAPI 3.0 and 3.1 documents are read: convert it first (e.g. `npx swagger2openapi SPEC -o openapi.yaml`) and import the result",
            one_line(&swagger.as_str().map_or_else(|| swagger.to_string(), String::from))
        ),
        None => format!(
            "openapi `{}`: only OpenAPI 3.0 and 3.1 documents are read",
            one_line(version)
        ),
    })
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `--url`, or else the document's first server URL; absolute http(s) either way.
fn base_url(doc: &Value, spec: &Path, given: Option<&str>) -> Result<String, String> {
    let url = match given {
        Some(url) => url.to_string(),
        None => server_url(doc).ok_or_else(|| {
            format!(
                "{}: no absolute http(s) server URL in `servers`: give --url",
                spec.display()
            )
        })?,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("--url {url}: an http:// or https:// URL"));
    }
    Ok(url)
}

/// The first server's URL, its variables at their defaults, when it is absolute.
fn server_url(doc: &Value) -> Option<String> {
    let server = doc.pointer("/servers/0")?;
    let mut url = server.get("url")?.as_str()?.to_string();
    if let Some(variables) = server.get("variables").and_then(Value::as_object) {
        for (name, variable) in variables {
            let default = variable.get("default")?.as_str()?;
            url = url.replace(&format!("{{{name}}}"), default);
        }
    }
    (url.starts_with("http://") || url.starts_with("https://"))
        .then(|| url.trim_end_matches('/').to_string())
}

/// Every operation under `paths`, in path order, then method order.
fn operations(doc: &Document, skipped: &mut Vec<String>) -> Result<Vec<Tool>, String> {
    let Some(paths) = doc.root.get("paths").and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    let mut tools: Vec<Tool> = Vec::new();
    let mut names = BTreeSet::new();
    let shared_names = shared_names(doc, paths)?;
    let mut tally = Tally {
        budget: MAX_INLINED_NODES,
        standard_headers: 0,
    };
    for (path, item) in paths {
        if let Some(why) = unroutable(path) {
            skipped.push(format!(
                "path `{}`: {why}; its operations are left out",
                one_line(path)
            ));
            continue;
        }
        if path.len() > 1 && path.ends_with('/') {
            skipped.push(format!(
                "path `{path}`: toolgate forwards it without the trailing /"
            ));
        }
        let item = resolve(doc, item, 0)?;
        let shared = item.get("parameters").cloned().unwrap_or(Value::Null);
        for method in METHODS {
            let Some(operation) = item.get(method) else {
                continue;
            };
            let operation = resolve(doc, operation, 0)?;
            let name = unique_name(&mut names, &shared_names, &operation, method, path);
            let mut typer = Typer::default();
            let operation = Operation {
                name: &name,
                method,
                path,
                shared: &shared,
                operation: &operation,
            };
            let tool = operation_tool(doc, &operation, &mut typer, &mut tally)?;
            skipped.extend(typer.skipped.into_iter().map(|s| format!("{name}: {s}")));
            tools.push(tool);
        }
    }
    if tally.standard_headers > 0 {
        skipped.push(format!(
            "{} header parameters named Accept, Content-Type or Authorization: not arguments (OpenAPI ignores them; the agent's client and the gateway set these headers)",
            tally.standard_headers
        ));
    }
    Ok(tools)
}

/// The name an operation asks for: its operationId, else its method and path.
fn base_name(operation: &Value, method: &str, path: &str) -> String {
    operation
        .get("operationId")
        .and_then(Value::as_str)
        .map(tool_name)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| tool_name(&format!("{method}{path}")))
}

/// The names several operations ask for: none of them gets the bare name, so an operation
/// added later can never take over a name (and the permits naming it) from another route.
fn shared_names(doc: &Document, paths: &Map<String, Value>) -> Result<BTreeSet<String>, String> {
    let mut seen = BTreeSet::new();
    let mut shared = BTreeSet::new();
    for (path, item) in paths {
        let item = resolve(doc, item, 0)?;
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                let base = base_name(&resolve(doc, operation, 0)?, method, path);
                if !seen.insert(base.clone()) {
                    shared.insert(base);
                }
            }
        }
    }
    Ok(shared)
}

/// The tool's name: its operationId (or method and path); where several operations ask for
/// one, each gets it with its own method and path; numbered only if that still collides.
fn unique_name(
    names: &mut BTreeSet<String>,
    shared: &BTreeSet<String>,
    operation: &Value,
    method: &str,
    path: &str,
) -> String {
    let mut base = base_name(operation, method, path);
    if shared.contains(&base) {
        base = tool_name(&format!("{base}_{method}{path}"));
    }
    let mut name = base.clone();
    for n in 2.. {
        if names.insert(name.clone()) {
            break;
        }
        name = format!("{base}_{n}");
    }
    name
}

/// What is counted over the whole document.
struct Tally {
    /// Values `$ref` expansion may still make: references fanning out across operations are
    /// bounded as those within one.
    budget: usize,
    /// Header parameters named Accept, Content-Type or Authorization, which OpenAPI ignores.
    standard_headers: usize,
}

/// Why toolgate cannot route a path template as written, if it cannot.
fn unroutable(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("not a path");
    }
    if path.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Some("control characters or spaces");
    }
    if path.contains('#') {
        // Slack and Box describe variants of one operation as `/path#variant`.
        return Some("it has a #fragment, which HTTP never sends: its operations could not be told apart from those of the path without it");
    }
    let partial = path.split('/').any(|segment| {
        let whole = segment.starts_with('{')
            && segment.ends_with('}')
            && segment.matches('{').count() == 1
            && segment.matches('}').count() == 1;
        (segment.contains('{') || segment.contains('}')) && !whole
    });
    partial.then_some(
        "a parameter that is not a whole segment (toolgate's templates take whole segments)",
    )
}

/// A stable tool name: the operationId (or method and path) in [A-Za-z0-9_-].
fn tool_name(text: &str) -> String {
    let mut name = String::new();
    for c in text.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '-' {
            c
        } else {
            '_'
        };
        if !(c == '_' && (name.is_empty() || name.ends_with('_'))) {
            name.push(c);
        }
    }
    name.trim_end_matches('_').to_string()
}

/// One operation of the document, where it is.
struct Operation<'a> {
    name: &'a str,
    method: &'a str,
    path: &'a str,
    /// The path item's parameters.
    shared: &'a Value,
    operation: &'a Value,
}

fn operation_tool(
    doc: &Document,
    op: &Operation<'_>,
    typer: &mut Typer,
    tally: &mut Tally,
) -> Result<Tool, String> {
    let Operation {
        name,
        method,
        path,
        shared,
        operation,
    } = *op;
    let parameters = merged_parameters(doc, shared, operation)?;
    let (template, renamed) = route_template(path, typer);

    let Parameters {
        mut args,
        mut query,
        headers,
    } = parameter_fields(doc, &parameters, &renamed, typer, tally)?;

    // The JSON body's fields, when there is a JSON object body.
    let body = request_body(doc, operation, typer, tally)?;
    let body_streams = matches!(body, Body::Streams);
    let body_fields = match body {
        Body::Fields(fields) => Some(fields),
        Body::Unread | Body::Streams => None,
    };

    let method_upper = method.to_ascii_uppercase();
    let query_by_default = matches!(method_upper.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS");
    let mut arguments = None;
    if body_streams {
        args.clear();
        query.clear();
    }
    match body_fields {
        Some(fields) if query_by_default => {
            typer.skipped.push(format!(
                "a JSON body on {method_upper}: toolgate reads {method_upper} arguments from the query"
            ));
            let _ = fields;
            for field in query {
                add(&mut args, typer, field);
            }
        }
        Some(fields) => {
            for field in &query {
                typer.skipped.push(format!(
                    "query parameter `{}`: forwarded to the upstream but not seen by policies (this route reads its arguments from the JSON body)",
                    field.name
                ));
            }
            for field in fields {
                add(&mut args, typer, field);
            }
        }
        None => {
            if !query.is_empty() && !query_by_default {
                arguments = Some("query");
            }
            for field in query {
                add(&mut args, typer, field);
            }
        }
    }

    let header_arguments = headers.iter().map(|f| f.name.clone()).collect();
    for field in headers {
        add(&mut args, typer, field);
    }
    let summary = operation
        .get("summary")
        .or_else(|| operation.get("description"))
        .and_then(Value::as_str)
        .map(String::from);
    Ok(Tool {
        route: Route {
            tool: name.to_string(),
            method: method_upper,
            path: template,
            arguments,
            header_arguments,
        },
        summary,
        args,
    })
}

/// The path item's parameters and the operation's, an operation's replacing the path
/// item's of the same name and place.
fn merged_parameters(
    doc: &Document,
    shared: &Value,
    operation: &Value,
) -> Result<Vec<Value>, String> {
    let mut parameters: Vec<Value> = Vec::new();
    for list in [shared, operation.get("parameters").unwrap_or(&Value::Null)] {
        for parameter in list.as_array().into_iter().flatten() {
            let parameter = resolve(doc, parameter, 0)?;
            let key = |p: &Value| (p.get("name").cloned(), p.get("in").cloned());
            parameters.retain(|p| key(p) != key(&parameter));
            parameters.push(parameter);
        }
    }
    Ok(parameters)
}

/// toolgate's route template for a path, and the path parameters' names in it: toolgate's
/// are [A-Za-z0-9_], others are renamed (the upstream never sees them, only the segments).
fn route_template(path: &str, typer: &mut Typer) -> (String, BTreeMap<String, String>) {
    let mut template = String::new();
    let mut renamed = BTreeMap::new();
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        template.push('/');
        match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(param) => {
                let safe: String = param
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                if safe != param {
                    typer
                        .skipped
                        .push(format!("path parameter `{param}` is named `{safe}`"));
                }
                template.push_str(&format!("{{{safe}}}"));
                renamed.insert(param.to_string(), safe);
            }
            None => template.push_str(segment),
        }
    }
    if template.is_empty() {
        template.push('/');
    }
    (template, renamed)
}

/// An operation's parameters as arguments: the path's (in `args`), the query's, the headers'.
struct Parameters {
    args: Vec<Field>,
    query: Vec<Field>,
    headers: Vec<Field>,
}

fn parameter_fields(
    doc: &Document,
    parameters: &[Value],
    renamed: &BTreeMap<String, String>,
    typer: &mut Typer,
    tally: &mut Tally,
) -> Result<Parameters, String> {
    let mut args: Vec<Field> = Vec::new();
    let mut query = Vec::new();
    let mut headers = Vec::new();
    for parameter in parameters {
        let pname = parameter.get("name").and_then(Value::as_str).unwrap_or("");
        let place = parameter.get("in").and_then(Value::as_str).unwrap_or("");
        let schema = parameter
            .get("schema")
            .map(|s| inline_within(doc, s, 0, &mut tally.budget))
            .transpose()?
            .unwrap_or_else(|| serde_json::json!({"type": "string"}));
        if place == "header" && is_standard_header(pname) {
            tally.standard_headers += 1;
            continue;
        }
        let schema = parameter_schema(parameter, schema, typer);
        // `statuses[]` is the parameter `statuses`, as the gateway reads queries.
        let pname = pname.strip_suffix("[]").unwrap_or(pname);
        if schema.get("type").and_then(Value::as_str) == Some("object") {
            typer.skipped.push(format!(
                "{place} parameter `{pname}` is an object: not read from a path or query"
            ));
            continue;
        }
        match place {
            "path" => {
                let Some(safe) = renamed.get(pname) else {
                    typer
                        .skipped
                        .push(format!("path parameter `{pname}` is not in the path"));
                    continue;
                };
                if let Some(ty) = typer.cedar_type(&schema, pname, 1) {
                    let sensitive = looks_sensitive(pname, &schema);
                    add(
                        &mut args,
                        typer,
                        Field { name: safe.clone(), required: true, ty, sensitive },
                    );
                }
            }
            "header" if toolgate_gateway::config::header_argument_name(pname).is_err() => typer.skipped.push(format!(
                "header parameter `{pname}`: toolgate does not forward it as the agent's (the gateway sets or drops the headers it refuses, names with `_` among them)"
            )),
            "query" | "header" => {
                let required = parameter
                    .get("required")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if let Some(ty) = typer.cedar_type(&schema, pname, 1) {
                    let sensitive = looks_sensitive(pname, &schema);
                    let field = Field { name: pname.to_string(), required, ty, sensitive };
                    match place {
                        "query" => query.push(field),
                        _ => headers.push(field),
                    }
                }
            }
            "cookie" => typer.skipped.push(format!(
                "cookie parameter `{pname}`: toolgate never forwards cookies, so calls that need it fail"
            )),
            other => typer.skipped.push(format!(
                "{other} parameter `{pname}`: toolgate does not read it, so calls that need it fail"
            )),
        }
    }
    Ok(Parameters {
        args,
        query,
        headers,
    })
}

/// What an operation's request body gives its tool.
enum Body {
    /// No body, or a JSON one that is not an object.
    Unread,
    /// A JSON object: its fields are arguments.
    Fields(Vec<Field>),
    /// Another media type: it streams to the upstream unread.
    Streams,
}

fn request_body(
    doc: &Document,
    operation: &Value,
    typer: &mut Typer,
    tally: &mut Tally,
) -> Result<Body, String> {
    let Some(body) = operation.get("requestBody") else {
        return Ok(Body::Unread);
    };
    let body = resolve(doc, body, 0)?;
    let body_required = body
        .get("required")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let content = body.get("content").and_then(Value::as_object);
    let json = content.and_then(|c| {
        c.iter()
            .find(|(media, _)| *media == "application/json" || media.ends_with("+json"))
    });
    let Some((_, media)) = json else {
        let media: Vec<&str> = content
            .into_iter()
            .flat_map(|c| c.keys())
            .map(String::as_str)
            .collect();
        typer.skipped.push(format!(
            "a body of type {}: no arguments are declared, so it streams to the upstream unread (and its path and query parameters are not seen by policies)",
            media.join(" or ")
        ));
        return Ok(Body::Streams);
    };
    let schema = media
        .get("schema")
        .map(|s| inline_within(doc, s, 0, &mut tally.budget))
        .transpose()?
        .unwrap_or(Value::Null);
    let examples = request_examples(doc, media)?;
    let schema = examples::with_examples(schema, &examples, &mut typer.skipped);
    let is_object = schema.get("type").and_then(Value::as_str) == Some("object")
        || schema.get("properties").is_some()
        || schema.get("allOf").is_some();
    if !is_object {
        typer.skipped.push(
            "the JSON body is not an object: toolgate refuses a JSON body that is not an object (400), and streams a body of another type unread".into(),
        );
        return Ok(Body::Unread);
    }
    let fields = typer
        .fields(&schema, "body", 1)
        .into_iter()
        .map(|f| Field {
            required: f.required && body_required,
            ..f
        })
        .collect();
    Ok(Body::Fields(fields))
}

/// The media type's example requests: `example`, and the `value` of each of `examples`.
fn request_examples(doc: &Document, media: &Value) -> Result<Vec<Value>, String> {
    let mut found: Vec<Value> = media.get("example").cloned().into_iter().collect();
    for example in media
        .get("examples")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|e| e.values())
    {
        if let Some(value) = resolve(doc, example, 0)?.get("value") {
            found.push(value.clone());
        }
    }
    Ok(found)
}

/// A parameter's schema as the gateway reads the parameter: a query parameter given once per
/// value (`a=1&a=2`, `a[]=1&a[]=2`) is a set; a list in one value (`a,b`) is that one text.
fn parameter_schema(parameter: &Value, schema: Value, typer: &mut Typer) -> Value {
    let name = parameter.get("name").and_then(Value::as_str).unwrap_or("");
    let place = parameter.get("in").and_then(Value::as_str).unwrap_or("");
    let is_array = schema.get("type").and_then(Value::as_str) == Some("array");
    let explode = parameter.get("explode").and_then(Value::as_bool);
    let form = parameter
        .get("style")
        .and_then(Value::as_str)
        .is_none_or(|style| style == "form");
    // The gateway reads `a[]` as a list always. PagerDuty writes `statuses[]` with a scalar
    // schema and `explode: true` for one value per name; an array is exploded by default.
    let repeated = place == "query"
        && (name.ends_with("[]")
            || explode == Some(true)
            || (is_array && explode != Some(false) && form));
    match (is_array, repeated) {
        (false, true) => serde_json::json!({"type": "array", "items": schema}),
        (true, false) => {
            typer.skipped.push(format!(
                "{place} parameter `{name}` is an array the upstream splits from one value (`a,b`): declared as that one text, which policies read whole"
            ));
            serde_json::json!({"type": "string"})
        }
        _ => schema,
    }
}

/// A header OpenAPI ignores as a parameter: the agent's client and the gateway set it.
fn is_standard_header(name: &str) -> bool {
    ["accept", "content-type", "authorization"]
        .iter()
        .any(|standard| name.eq_ignore_ascii_case(standard))
}

/// Adds an argument, unless one of that name is there already (noted).
fn add(args: &mut Vec<Field>, typer: &mut Typer, field: Field) {
    if args.iter().any(|f| f.name == field.name) {
        typer.skipped.push(format!(
            "`{}` is both a path or query parameter and a body field: declared once (a call giving two different values is refused)",
            field.name
        ));
    } else {
        args.push(field);
    }
}

/// A value with its own `$ref` (if any) followed, siblings kept over the target's fields.
fn resolve(doc: &Document, value: &Value, depth: usize) -> Result<Value, String> {
    let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
        return Ok(value.clone());
    };
    if depth > MAX_REF_DEPTH {
        return Ok(Value::Object(Map::new()));
    }
    let target = doc.target(reference)?;
    let mut resolved = resolve(doc, &target, depth + 1)?;
    if let (Value::Object(resolved), Value::Object(siblings)) = (&mut resolved, value) {
        for (key, sibling) in siblings {
            if key != "$ref" {
                resolved.insert(key.clone(), sibling.clone());
            }
        }
    }
    Ok(resolved)
}

/// A schema with every `$ref` inside it followed (a recursive one stops at `MAX_REF_DEPTH`,
/// where Cedar could not follow it anyway), in at most `MAX_INLINED_NODES` values: references
/// that fan out at every level would otherwise multiply past any memory.
#[cfg(test)]
fn inline(doc: &Document, value: &Value, depth: usize) -> Result<Value, String> {
    let mut budget = MAX_INLINED_NODES;
    inline_within(doc, value, depth, &mut budget)
}

const MAX_INLINED_NODES: usize = 200_000;

/// The largest Cedar schema an import writes.
const MAX_SCHEMA_BYTES: usize = 4 << 20;

fn inline_within(
    doc: &Document,
    value: &Value,
    depth: usize,
    budget: &mut usize,
) -> Result<Value, String> {
    *budget = budget.checked_sub(1).ok_or_else(|| {
        format!("a schema expands past {MAX_INLINED_NODES} values through its $refs")
    })?;
    let value = resolve(doc, value, depth)?;
    if depth > MAX_REF_DEPTH {
        return Ok(Value::Object(Map::new()));
    }
    Ok(match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| Ok((k, inline_within(doc, &v, depth + 1, budget)?)))
                .collect::<Result<_, String>>()?,
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| inline_within(doc, v, depth + 1, budget))
                .collect::<Result<_, _>>()?,
        ),
        other => other,
    })
}

fn starter_policies(upstream: &str, tools: &[Tool]) -> String {
    let example = tools.first().map_or("TOOL", |t| t.route.tool.as_str());
    let mut text = format!(
        "// Policies for upstream `{upstream}` (made by `toolgate import openapi`). Nothing is\n\
         // permitted until a policy here says so: toolgate denies by default.\n\
         //\n\
         // To let the finance team's agents call one operation, for a user:\n\
         //\n\
         // @id(\"{upstream}-{example}\")\n\
         // permit (\n\
         //   principal in Toolgate::Team::\"finance-agents\",\n\
         //   action == Toolgate::Action::\"{upstream}/{example}\",\n\
         //   resource\n\
         // )\n\
         // when {{ context has user }};\n\
         //\n\
         // Each operation is an action, typed in {upstream}.cedarschema:\n"
    );
    for tool in tools {
        text.push_str(&format!(
            "//   {upstream}/{}  ({} {})\n",
            tool.route.tool,
            tool.route.method,
            one_line(&tool.route.path)
        ));
    }
    text
}

/// What changed since the files of a previous import (`None`: there were none).
fn changes_since(
    routes_path: &Path,
    schema_path: &Path,
    upstream: &str,
    tools: &[Tool],
    schema: &str,
) -> Result<Option<Vec<String>>, String> {
    let (Ok(old_routes), Ok(old_schema)) = (
        std::fs::read_to_string(routes_path),
        std::fs::read_to_string(schema_path),
    ) else {
        return Ok(None);
    };
    let old: Vec<Value> = serde_norway::from_str::<serde_norway::Value>(&old_routes)
        .map(yaml_to_json)
        .ok()
        .and_then(|v| v.pointer("/0/routes").cloned())
        .and_then(|r| r.as_array().cloned())
        .ok_or_else(|| {
            format!(
                "{}: not an earlier import's upstream list",
                routes_path.display()
            )
        })?;
    let actions = |text: &str, path: &Path| -> Result<BTreeMap<String, ActionContext>, String> {
        let (_, json) = toolgate_policy::parse_fragment(path, text).map_err(|e| e.to_string())?;
        Ok(SchemaInfo::from_fragment_json(&json)
            .actions
            .into_iter()
            .collect())
    };
    let before = actions(&old_schema, schema_path)?;
    let after = actions(schema, schema_path)?;
    let route_of = |tool: &str| {
        old.iter().find(|r| r["tool"] == tool).map(|r| {
            format!(
                "{} {}",
                r["method"].as_str().unwrap_or(""),
                r["path"].as_str().unwrap_or("")
            )
        })
    };
    let mut changes = Vec::new();
    for tool in tools {
        let action = format!("{upstream}/{}", tool.route.tool);
        let now = format!("{} {}", tool.route.method, tool.route.path);
        match route_of(&tool.route.tool) {
            None => changes.push(format!("added {action} ({now})")),
            Some(was) => {
                let mut what = Vec::new();
                if was != now {
                    what.push(format!("{was} is now {now}"));
                }
                if let (Some(before), Some(after)) = (before.get(&action), after.get(&action)) {
                    what.extend(argument_changes(before, after));
                }
                if !what.is_empty() {
                    changes.push(format!("changed {action}: {}", what.join("; ")));
                }
            }
        }
    }
    for route in &old {
        let tool = route["tool"].as_str().unwrap_or("");
        if !tools.iter().any(|t| t.route.tool == tool) {
            changes.push(format!(
                "removed {upstream}/{tool}: policies naming it no longer validate"
            ));
        }
    }
    if changes.is_empty() {
        changes.push("no operation added, removed or changed".to_string());
    }
    Ok(Some(changes))
}

/// How one action's arguments changed: added, removed, retyped (or made optional), or only
/// their `@sensitive`/`@json` annotations.
fn argument_changes(before: &ActionContext, after: &ActionContext) -> Vec<String> {
    let declared = |name: &str, (ty, required): &(AttrType, bool)| {
        let optional = if *required { "" } else { "?" };
        one_line(&format!("`{name}{optional}: {}`", cedar_text(ty)))
    };
    let mut changes = Vec::new();
    for (name, now) in &after.args {
        match before.args.get(name) {
            None => changes.push(format!("argument {} added", declared(name, now))),
            Some(was) if was != now => changes.push(format!(
                "argument {} is now {}",
                declared(name, was),
                declared(name, now)
            )),
            Some(_) => {}
        }
    }
    for name in before.args.keys().filter(|n| !after.args.contains_key(*n)) {
        changes.push(one_line(&format!("argument `{name}` removed")));
    }
    if changes.is_empty()
        && (before.sensitive != after.sensitive || before.free_form != after.free_form)
    {
        changes.push("@sensitive or @json annotations of its arguments changed".to_string());
    }
    changes
}

/// A declared type as the schema writes it.
fn cedar_text(ty: &AttrType) -> String {
    match ty {
        AttrType::Long => "Long".into(),
        AttrType::Bool => "Bool".into(),
        AttrType::String => "String".into(),
        AttrType::Set(item) => format!("Set<{}>", cedar_text(item)),
        AttrType::Record(fields) if fields.is_empty() => "{}".into(),
        AttrType::Record(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|(name, (ty, required))| {
                    let optional = if *required { "" } else { "?" };
                    format!("{}{optional}: {}", quote(name), cedar_text(ty))
                })
                .collect();
            format!("{{ {} }}", fields.join(", "))
        }
        AttrType::Entity(name) => name.to_string(),
        AttrType::Unreadable(name) | AttrType::Extension(name) => name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_are_stable_and_valid() {
        assert_eq!(tool_name("getPetById"), "getPetById");
        assert_eq!(tool_name("get/pet/{petId}"), "get_pet_petId");
        assert_eq!(tool_name("list pets (v2)"), "list_pets_v2");
        assert_eq!(tool_name("a.b-c"), "a_b-c");
    }

    #[test]
    fn refs_are_followed_with_their_siblings_and_external_ones_refused() {
        let doc = Document::in_memory(serde_json::json!({"components": {"schemas": {
            "Id": {"type": "integer"},
            "Node": {"type": "object", "properties": {"next": {"$ref": "#/components/schemas/Node"}}}
        }}}));
        let id = inline(
            &doc,
            &serde_json::json!({"$ref": "#/components/schemas/Id", "description": "x"}),
            0,
        )
        .unwrap();
        assert_eq!(
            id,
            serde_json::json!({"type": "integer", "description": "x"})
        );
        // A recursive schema ends (in an empty schema Cedar types as nothing).
        assert!(inline(
            &doc,
            &serde_json::json!({"$ref": "#/components/schemas/Node"}),
            0
        )
        .is_ok());
        assert!(inline(&doc, &serde_json::json!({"$ref": "other.yaml#/Id"}), 0).is_err());
        // Ten references per level, sixteen levels deep: refused, not expanded.
        let mut schemas = serde_json::Map::new();
        for level in 0..16 {
            let next: Vec<Value> = (0..10)
                .map(
                    |_| serde_json::json!({"$ref": format!("#/components/schemas/L{}", level + 1)}),
                )
                .collect();
            schemas.insert(format!("L{level}"), serde_json::json!({"allOf": next}));
        }
        schemas.insert("L16".into(), serde_json::json!({"type": "string"}));
        let fan = Document::in_memory(serde_json::json!({"components": {"schemas": schemas}}));
        let refused = inline(
            &fan,
            &serde_json::json!({"$ref": "#/components/schemas/L0"}),
            0,
        );
        assert!(refused.unwrap_err().contains("expands past"));
        assert!(inline(
            &doc,
            &serde_json::json!({"$ref": "#/components/schemas/Nope"}),
            0
        )
        .is_err());
    }
}

#[cfg(test)]
mod declaration_tests {
    use super::*;
    use serde_json::json;

    /// A name stays with its route: operations that share an operationId each get it with
    /// their method and path, so one added later never takes a name from another route.
    #[test]
    fn shared_operation_ids_never_move_a_name_to_another_route() {
        let names = |doc: serde_json::Value| -> Vec<(String, String, String)> {
            let tools = operations(&Document::in_memory(doc), &mut Vec::new()).unwrap();
            tools
                .iter()
                .map(|t| {
                    (
                        t.route.tool.clone(),
                        t.route.method.clone(),
                        t.route.path.clone(),
                    )
                })
                .collect()
        };
        let v1 = serde_json::json!({"paths": {"/users": {"get": {"operationId": "users_list"}}}});
        assert_eq!(names(v1)[0].0, "users_list");
        let v2 = serde_json::json!({"paths": {
            "/admin/users": {"delete": {"operationId": "users_list"}},
            "/users": {"get": {"operationId": "users_list"}}
        }});
        let v2 = names(v2);
        assert!(v2.iter().all(|(name, _, _)| name != "users_list"), "{v2:?}");
        assert_eq!(v2.len(), 2);
    }

    #[test]
    fn header_parameters_query_arrays_and_maps_are_declared() {
        let doc = json!({"paths": {"/incidents": {
            "get": {"operationId": "listIncidents", "parameters": [
                {"name": "service_ids[]", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}},
                {"name": "ids", "in": "query", "explode": false, "schema": {"type": "array", "items": {"type": "integer"}}},
                // PagerDuty's: one enum value per `statuses[]`.
                {"name": "statuses[]", "in": "query", "explode": true, "schema": {"type": "string", "enum": ["triggered", "resolved"]}},
                {"name": "urgency", "in": "query", "explode": true, "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                {"name": "Accept", "in": "header", "required": true, "schema": {"type": "string"}},
                {"name": "content-type", "in": "header", "schema": {"type": "string"}}
            ]},
            "post": {"operationId": "createIncident",
                "parameters": [
                    {"name": "From", "in": "header", "required": true, "schema": {"type": "string"}},
                    {"name": "Accept", "in": "header", "schema": {"type": "string"}}
                ],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["incident"], "properties": {"incident": {
                        "type": "object", "required": ["type", "body"], "properties": {
                            "type": {"type": "string"},
                            "body": {"type": "object", "required": ["type"]}
                        }}}}}}}}
        }}});
        let mut notes = Vec::new();
        let tools = operations(&Document::in_memory(doc), &mut notes).unwrap();
        let list = tools
            .iter()
            .find(|t| t.route.tool == "listIncidents")
            .unwrap();
        // Exploded (the default), a set; `explode: false`, the one text the upstream splits;
        // one value a name, written `name[]` or `explode: true`, a set.
        assert_eq!(
            render_record(&list.args),
            "{ service_ids?: Set<String>, ids?: String, statuses?: Set<String>, urgency?: Set<String>, limit?: Long }"
        );
        // Accept and Content-Type are counted in one line, not a note each.
        assert!(
            !notes
                .iter()
                .any(|n| n.contains("`Accept`") || n.contains("`content-type`")),
            "{notes:?}"
        );
        assert!(
            notes.contains(&"3 header parameters named Accept, Content-Type or Authorization: not arguments (OpenAPI ignores them; the agent's client and the gateway set these headers)".to_string()),
            "{notes:?}"
        );
        let create = tools
            .iter()
            .find(|t| t.route.tool == "createIncident")
            .unwrap();
        assert_eq!(create.route.header_arguments, ["From"]);
        assert_eq!(
            render_record(&create.args),
            "{ incident: { type: String, @json body: String }, From: String }"
        );
    }

    #[test]
    fn one_expansion_budget_bounds_the_whole_document() {
        // Each operation's body expands to some 5,000 values: under the budget alone, over it
        // across sixty operations.
        let wide: serde_json::Map<String, Value> = (0..5_000)
            .map(|i| (format!("f{i}"), json!({"type": "string"})))
            .collect();
        let mut paths = serde_json::Map::new();
        for n in 0..60 {
            paths.insert(
                format!("/op{n}"),
                json!({"post": {"requestBody": {"content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Wide"}}}}}}),
            );
        }
        let doc = json!({"paths": paths, "components": {"schemas": {
            "Wide": {"type": "object", "properties": wide}}}});
        let one = json!({"paths": {"/op": doc["paths"]["/op0"].clone()}, "components": doc["components"].clone()});
        let err = operations(&Document::in_memory(doc), &mut Vec::new())
            .err()
            .expect("refused");
        assert!(err.contains("expand"), "{err}");
        assert!(operations(&Document::in_memory(one), &mut Vec::new()).is_ok());
    }
}
