//! Cedar schema text from JSON Schema: an MCP tool's `inputSchema` (`toolgate schema mcp`) or
//! an OpenAPI operation's parameters and body (`toolgate import openapi`). One action per
//! tool, in group `call`, with `context.args` typed from the schema; what has no Cedar form is
//! declared `@json` (policies read its canonical JSON text) and said in `Typer::skipped`.

use serde_json::Value;

/// Nesting deeper than this is declared `@json`.
const MAX_DEPTH: usize = 8;

/// One attribute of a record: its name, whether it is required, its Cedar type.
pub struct Field {
    pub name: String,
    pub required: bool,
    pub ty: String,
    /// Annotated `@sensitive`: the audit keeps only a keyed hash of its value.
    pub sensitive: bool,
}

/// The Cedar type of a free-form object (a map, `{}`): its canonical JSON text, annotated.
pub const FREE_FORM: &str = "@json String";

/// A secret by its description: `format: password`, `writeOnly`, or a name saying so.
pub fn looks_sensitive(name: &str, schema: &Value) -> bool {
    let lower = name.to_ascii_lowercase().replace(['-', '_'], "");
    schema.get("format").and_then(Value::as_str) == Some("password")
        || schema.get("writeOnly").and_then(Value::as_bool) == Some(true)
        || [
            "password",
            "passwd",
            "secret",
            "token",
            "apikey",
            "privatekey",
        ]
        .iter()
        .any(|word| lower.contains(word))
}

/// Turns JSON Schema into Cedar types, noting each part it leaves out.
#[derive(Default)]
pub struct Typer {
    /// `<where>: <why>`, one per part declared `@json` or left out.
    pub skipped: Vec<String>,
}

impl Typer {
    /// The properties of an object schema as Cedar attributes (`allOf` parts merged, at any
    /// depth).
    pub fn fields(&mut self, schema: &Value, at: &str, depth: usize) -> Vec<Field> {
        let mut fields = Vec::new();
        let parts = all_of_parts(schema, 0);
        let required: Vec<&str> = parts
            .iter()
            .filter_map(|p| p.get("required").and_then(Value::as_array))
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for part in parts {
            let Some(properties) = part.get("properties").and_then(Value::as_object) else {
                continue;
            };
            for (name, prop) in properties {
                if fields.iter().any(|f: &Field| &f.name == name) {
                    continue;
                }
                // readOnly says the server sets it in its answers, not that a request never
                // carries it: a reference's readOnly `id` (PagerDuty's `service: {id, type}`,
                // Asana's `memberships[].section.gid`) is what the request sends to name the
                // object. Declared, then, and optional: OpenAPI applies `required` to it in
                // responses only.
                let read_only = prop.get("readOnly").and_then(Value::as_bool) == Some(true);
                if let Some(ty) = self.cedar_type(prop, &format!("{at}.{name}"), depth) {
                    fields.push(Field {
                        name: name.clone(),
                        required: required.contains(&name.as_str()) && !read_only,
                        ty,
                        sensitive: looks_sensitive(name, prop),
                    });
                }
            }
        }
        for name in required {
            if fields.iter().any(|f| f.name == name) {
                continue;
            }
            // The document disagrees with itself (Box's `lock` requires a `type` it never
            // describes): declared, so a call sending it is not refused, and optional, so one
            // leaving it out is not denied on the document's word.
            self.skipped.push(format!(
                "{at}.{name}: required but not described: declared as an optional String"
            ));
            fields.push(Field {
                name: name.to_string(),
                required: false,
                ty: "String".into(),
                sensitive: looks_sensitive(name, &Value::Null),
            });
        }
        fields
    }

    /// A JSON Schema value's Cedar type, or `None` (noted) when it has none.
    pub fn cedar_type(&mut self, prop: &Value, at: &str, depth: usize) -> Option<String> {
        // What Cedar has no type for is read by policies as its canonical JSON text (`@json`).
        let mut free_form = |why: &str| {
            self.skipped.push(format!(
                "{at}: {why}: policies read it as its JSON text (@json)"
            ));
            Some(FREE_FORM.to_string())
        };
        if depth > MAX_DEPTH {
            return free_form("nested too deep");
        }
        // `anyOf: [{type: T}, {type: null}]` (an optional argument) is T.
        for key in ["anyOf", "oneOf"] {
            if let Some(alternatives) = prop.get(key).and_then(Value::as_array) {
                let concrete: Vec<&Value> = alternatives
                    .iter()
                    .filter(|a| a.get("type").and_then(Value::as_str) != Some("null"))
                    .collect();
                return match concrete.as_slice() {
                    [only] => self.cedar_type(only, at, depth),
                    _ => free_form(&format!("{key} of several types")),
                };
            }
        }
        // OpenAPI 3.1 writes a nullable type as `[T, "null"]`.
        let kind: &str = match prop.get("type") {
            Some(Value::String(kind)) => kind,
            Some(Value::Array(kinds)) => {
                let mut concrete = kinds
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|k| *k != "null");
                match (concrete.next(), concrete.next()) {
                    (Some(only), None) => only,
                    _ => return free_form("a value of several types"),
                }
            }
            _ if prop.get("properties").is_some() || prop.get("allOf").is_some() => "object",
            _ => return free_form("no type"),
        };
        Some(match kind {
            "integer" => "Long".into(),
            "boolean" => "Bool".into(),
            // Cedar's decimal: up to 4 digits after the point; a value it cannot hold denies.
            "number" => "decimal".into(),
            "string" => match prop.get("format").and_then(Value::as_str) {
                Some("ipv4" | "ipv6") => "ipaddr".into(),
                Some("date-time") => "datetime".into(),
                _ => "String".into(),
            },
            "array" => match prop.get("items") {
                // A list of maps is free-form as a whole.
                Some(items) => match self.cedar_type(items, &format!("{at}[]"), depth + 1)? {
                    item if item == FREE_FORM => FREE_FORM.into(),
                    item => format!("Set<{item}>"),
                },
                None => return Some(FREE_FORM.into()),
            },
            "object" => {
                let declared = prop.get("properties").is_some() || prop.get("allOf").is_some();
                if !declared {
                    // A map: policies read its canonical JSON text (`@json`).
                    return Some(FREE_FORM.into());
                }
                render_record(&self.fields(prop, at, depth + 1))
            }
            other => {
                // Named only if it reads as a type name: a document's text is not echoed.
                let named = other.len() <= 24
                    && other.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
                let other = if named { other } else { "(not a type name)" };
                self.skipped.push(format!(
                    "{at}: type {other}: policies read it as its JSON text (@json)"
                ));
                FREE_FORM.into()
            }
        })
    }
}

/// An object schema's parts: those of its `allOf`, theirs at any depth, then its own (in
/// that order, the first to name a property declares it).
pub fn all_of_parts(schema: &Value, depth: usize) -> Vec<&Value> {
    let mut parts = Vec::new();
    if depth <= MAX_DEPTH {
        for part in schema
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            parts.extend(all_of_parts(part, depth + 1));
        }
    }
    parts.push(schema);
    parts
}

/// `{ a: Long, b?: String }`.
pub fn render_record(fields: &[Field]) -> String {
    if fields.is_empty() {
        return "{}".to_string();
    }
    let fields: Vec<String> = fields
        .iter()
        .map(|f| {
            let optional = if f.required { "" } else { "?" };
            let sensitive = if f.sensitive { "@sensitive " } else { "" };
            // An annotation goes before the name, not in the type.
            let (annotation, ty) = match f.ty.strip_prefix("@json ") {
                Some(ty) => ("@json ", ty),
                None => ("", f.ty.as_str()),
            };
            format!("{sensitive}{annotation}{}{optional}: {ty}", quote(&f.name))
        })
        .collect();
    format!("{{ {} }}", fields.join(", "))
}

/// One tool's action declaration, using the main schema's `Agent`, `Tool`, `User`, `Env`,
/// `TaskInfo` and action `call`.
pub fn action_declaration(action: &str, summary: Option<&str>, args: &str) -> String {
    let comment = summary
        .and_then(|s| s.lines().next())
        .map(|first| format!("  // {}\n", one_line(first)))
        .unwrap_or_default();
    format!(
        "{comment}  action {} in [call] appliesTo {{\n    principal: Agent, resource: Tool,\n    context: {{ user?: User, env: Env, task?: TaskInfo, args: {args} }}\n  }};\n",
        quote(action)
    )
}

/// What an MCP server offers, as its listings say: `None` where it offers no resources or
/// no prompts.
pub struct McpServer {
    pub tools: Vec<Value>,
    pub templates: Option<Vec<Value>>,
    pub prompts: Option<Vec<Value>>,
}

/// The fragment, in the Cedar schema syntax, for namespace `Toolgate`, of an MCP server: an
/// action per tool, and `resources/read` and `prompts/get` where it offers them.
pub fn cedar_schema_for_server(upstream: &str, server: &McpServer) -> String {
    let mut out = format!(
        "// Generated by `toolgate schema mcp` for upstream `{upstream}`: one action per tool.\nnamespace Toolgate {{\n"
    );
    let mut typer = Typer::default();
    for tool in &server.tools {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            continue;
        };
        let args = tool
            .get("inputSchema")
            .map(|s| render_record(&typer.fields(s, name, 2)))
            .unwrap_or_else(|| "{}".to_string());
        let description = tool.get("description").and_then(Value::as_str);
        out.push_str(&action_declaration(
            &format!("{upstream}/{name}"),
            description,
            &args,
        ));
    }
    if let Some(templates) = &server.templates {
        out.push_str(&resources_read(upstream, templates));
    }
    if let Some(prompts) = &server.prompts {
        out.push_str(&prompts_get(upstream, prompts));
    }
    out.push_str("}\n");
    for skipped in &typer.skipped {
        out.push_str(&format!("// note: {}\n", one_line(skipped)));
    }
    out
}

/// `resources/read` (and subscribing) is decided on the canonical `uri` alone; the server's
/// templates are listed above it, for policies to match with `like`.
fn resources_read(upstream: &str, templates: &[Value]) -> String {
    let mut comment = String::from(
        "  // Reading a resource (subscribing too), decided on context.args.uri (RFC 3986 normal form).\n",
    );
    for template in templates {
        if let Some(uri) = template.get("uriTemplate").and_then(Value::as_str) {
            comment.push_str(&format!("  //   template: {}\n", one_line(uri)));
        }
    }
    comment
        + &action_declaration(
            &format!("{upstream}/resources/read"),
            None,
            "{ uri: String }",
        )
}

/// `prompts/get`: the prompt's `name`, and its `arguments` (strings in MCP), every prompt's
/// arguments optional, since each prompt asks for its own.
fn prompts_get(upstream: &str, prompts: &[Value]) -> String {
    let mut names = Vec::new();
    let mut arguments = std::collections::BTreeSet::new();
    for prompt in prompts {
        if let Some(name) = prompt.get("name").and_then(Value::as_str) {
            names.push(one_line(name));
        }
        for argument in prompt
            .get("arguments")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = argument.get("name").and_then(Value::as_str) {
                arguments.insert(name.to_string());
            }
        }
    }
    let fields: Vec<String> = arguments
        .iter()
        .map(|a| format!("{}?: String", quote(a)))
        .collect();
    let args = match fields.is_empty() {
        true => "{ name: String }".to_string(),
        false => format!(
            "{{ name: String, arguments?: {{ {} }} }}",
            fields.join(", ")
        ),
    };
    let comment = format!(
        "  // Getting a prompt; the server's prompts: {}\n",
        names.join(", ")
    );
    comment + &action_declaration(&format!("{upstream}/prompts/get"), None, &args)
}

/// Text from a document, safe inside a `//` or `#` comment: control characters (a `\r` ends
/// a Cedar comment, a `\n` any) become spaces.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if unprintable(c) { ' ' } else { c })
        .collect()
}

/// Text from a document or a log, safe to print to a terminal or a CI log: what would act
/// rather than show (controls, line and paragraph separators, bidi overrides) escaped.
pub fn printable(text: &str) -> String {
    if !text.chars().any(unprintable) {
        return text.to_string();
    }
    text.chars()
        .map(|c| match unprintable(c) {
            true => c.escape_unicode().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// Controls, and the format characters that move or hide text (YAML and terminals take
/// U+2028 for a line break; bidi overrides reorder what is shown).
pub fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{00ad}' | '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Words Cedar reserves: written as string literals where a name is expected.
const RESERVED: [&str; 10] = [
    "true", "false", "if", "then", "else", "in", "is", "like", "has", "__cedar",
];

/// A Cedar identifier as is, anything else (a reserved word too) as a string literal.
pub fn quote(s: &str) -> String {
    let identifier = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !RESERVED.contains(&s);
    match identifier {
        true => s.to_string(),
        false => cedar_string(s),
    }
}

/// A Cedar string literal, with Cedar's own escapes (`\u{..}`, not JSON's `\u00..`).
pub fn cedar_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Names from a document stay names: a reserved word or a control character is quoted
    /// with Cedar's escapes, and a line or paragraph separator never ends a comment.
    #[test]
    fn document_text_stays_what_it_is() {
        assert_eq!(quote("amount"), "amount");
        assert_eq!(quote("in"), "\"in\"");
        assert_eq!(quote("a\u{1}b\"c"), "\"a\\u{1}b\\\"c\"");
        assert_eq!(
            one_line("API\u{2028}url: https://evil\u{202e}"),
            "API url: https://evil "
        );
        assert_eq!(printable("a\u{2029}b"), "a\\u{2029}b");
    }

    fn tools_only(tools: Vec<Value>) -> McpServer {
        McpServer {
            tools,
            templates: None,
            prompts: None,
        }
    }

    /// Resources and prompts, where the server offers them: `resources/read` on the `uri`
    /// (its templates as comments), `prompts/get` with every prompt's arguments as optional
    /// strings; a name that is no Cedar identifier is quoted, a control character never
    /// ends a comment.
    #[test]
    fn resources_and_prompts_are_declared_where_offered() {
        let server = McpServer {
            tools: vec![],
            templates: Some(vec![
                json!({"uriTemplate": "notes://{user}/salary\npermit"}),
            ]),
            prompts: Some(vec![
                json!({"name": "greet", "arguments": [{"name": "name", "required": true}]}),
                json!({"name": "plan", "arguments": [{"name": "the topic"}]}),
            ]),
        };
        let text = cedar_schema_for_server("n", &server);
        assert!(
            text.contains("//   template: notes://{user}/salary permit\n"),
            "{text}"
        );
        assert!(
            text.contains("action \"n/resources/read\" in [call]"),
            "{text}"
        );
        assert!(text.contains("args: { uri: String }"), "{text}");
        assert!(text.contains("prompts: greet, plan"), "{text}");
        assert!(
            text.contains(
                "args: { name: String, arguments?: { name?: String, \"the topic\"?: String } }"
            ),
            "{text}"
        );
        let none = cedar_schema_for_server("n", &tools_only(vec![]));
        assert!(
            !none.contains("resources/read") && !none.contains("prompts/get"),
            "{none}"
        );
    }

    #[test]
    fn types_follow_input_schema() {
        let tools = vec![json!({
            "name": "pay",
            "description": "Pay someone.\nMore.",
            "inputSchema": {"type": "object", "required": ["amount", "to"], "properties": {
                "amount": {"type": "integer"},
                "to": {"type": "string"},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "rate": {"type": "number"},
                "meta": {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"}}},
                "blob": {}
            }}
        })];
        let text = cedar_schema_for_server("wallet", &tools_only(tools));
        assert!(text.contains("action \"wallet/pay\" in [call]"), "{text}");
        assert!(text.contains("// Pay someone."), "{text}");
        for field in [
            "amount: Long",
            "to: String",
            "note?: String",
            "tags?: Set<String>",
            "rate?: decimal",
            "meta?: { ip?: ipaddr }",
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
        // A value of any type is declared, as its JSON text.
        assert!(text.contains("@json blob?: String"), "{text}");
        let secret = cedar_schema_for_server(
            "s",
            &tools_only(vec![
                json!({"name": "login\rx", "description": "a\rpermit", "inputSchema": {"properties": {
                    "password": {"type": "string"}, "key": {"type": "string", "format": "password"}
                }}}),
            ]),
        );
        assert!(secret.contains("@sensitive password?: String"), "{secret}");
        assert!(secret.contains("@sensitive key?: String"), "{secret}");
        assert!(secret.contains("// a permit\n"), "{secret}");
        assert!(
            text.contains("pay.blob: no type: policies read it as its JSON text (@json)"),
            "{text}"
        );
    }

    #[test]
    fn all_of_merges_and_what_cedar_cannot_say_is_reported() {
        let mut typer = Typer::default();
        let schema = json!({"type": "object", "allOf": [
            {"type": "object", "required": ["email"], "properties": {"email": {"type": "string"}}},
            {"type": "object", "required": ["kind"], "properties": {
                "kind": {"type": "string", "enum": ["a", "b"]},
                "maybe": {"type": ["integer", "null"]},
                "either": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                "map": {"type": "object", "additionalProperties": {"type": "integer"}}
            }}
        ]});
        let record = render_record(&typer.fields(&schema, "op", 0));
        assert_eq!(
            record,
            "{ email: String, kind: String, maybe?: Long, @json either?: String, @json map?: String }"
        );
        assert_eq!(
            typer.skipped,
            ["op.either: oneOf of several types: policies read it as its JSON text (@json)"]
        );
    }

    #[test]
    fn references_keep_their_read_only_ids_and_undescribed_required_names() {
        // PagerDuty's ServiceReference: allOf [Reference (allOf [Tag's part, required]), type].
        let reference = json!({"allOf": [
            {"allOf": [
                {"type": "object", "properties": {
                    "id": {"type": "string", "readOnly": true},
                    "summary": {"type": "string", "readOnly": true}
                }},
                {"type": "object", "required": ["type", "id"]}
            ]},
            {"type": "object", "properties": {"type": {"type": "string"}}}
        ]});
        let body = json!({"type": "object", "required": ["service", "kind"], "properties": {
            "service": reference,
            "title": {"type": "string"}
        }});
        let mut typer = Typer::default();
        assert_eq!(
            render_record(&typer.fields(&body, "body", 0)),
            "{ service: { id?: String, summary?: String, type: String }, title?: String, kind?: String }"
        );
        assert_eq!(
            typer.skipped,
            ["body.kind: required but not described: declared as an optional String"]
        );
    }
}
