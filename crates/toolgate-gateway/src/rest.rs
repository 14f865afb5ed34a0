//! A REST call's arguments, and the request forwarded for them.
//!
//! The forwarded request is rendered from the arguments as the policy read them (`args.rs`):
//! path segments, query pairs and header arguments from their typed values, re-encoded so that
//! every decoder reads them alike, and a JSON body serialised from its declared fields. What no
//! policy could see (an undeclared argument, a body the gateway did not parse) is refused, and
//! so is what an upstream may read another way (a method override, a name given in two forms).

use std::collections::HashMap;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{Map, Value};
use toolgate_mcp::json::{fold_key, number_texts, parse_strict, to_vec_with_numbers, JsonError};

use crate::answer::{full, Body, InternalError, Refusal};
use crate::args::{render, Origin, Rendered, Rules, Undeclared};
use crate::config::ArgumentsIn;
use crate::pipeline::BodyLimit;
use crate::routes::Classified;
use crate::upstream::{keep_standard_headers, Upstream};

/// Nesting allowed in a JSON body.
pub const MAX_JSON_DEPTH: usize = 32;

/// Query parameters allowed in one call: bounded work, and far below where frameworks stop
/// reading a query (qs and PHP at 1,000), so none reads less than the policy saw.
const MAX_QUERY_PAIRS: usize = 100;

/// Percent-encodes all but RFC 3986 unreserved characters: no decoder reads the result
/// differently (`+`, `;`, `%` and spaces are all escaped).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A route's literal segment as written in the config: RFC 3986 `pchar`s (sub-delims, `:`, `@`)
/// stay as they are (`/items:batchGet`, `/$metadata`, `/users/@me`), since routers match the
/// raw path.
const PATH_LITERAL: &AsciiSet = &COMPONENT
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@');

/// Names (after folding case and `-` to `_`) under which frameworks take an HTTP method
/// override from parameters or a JSON body (Laravel, Symfony, Express method-override, Rails).
const METHOD_OVERRIDES: [&str; 4] = [
    "_method",
    "x_http_method_override",
    "x_http_method",
    "x_method_override",
];

/// The action's declared arguments and how to read them.
pub(crate) struct Declared<'a> {
    pub args: &'a toolgate_policy::Record,
    pub rules: Rules<'a>,
}

/// Reads a REST call's arguments (path, query, header arguments, JSON body) and renders the
/// request forwarded for them. Returns it with the arguments as the policy reads them.
pub(crate) async fn read_call(
    request: Request<Body>,
    route: &Classified,
    upstream: &Upstream,
    declared: &Declared<'_>,
    max_body: BodyLimit,
) -> Result<(Request<Body>, Map<String, Value>), Refusal> {
    let (mut parts, body) = request.into_parts();
    // Header arguments are read (and set as decided) below.
    let listed = [
        &upstream.config.forward_headers,
        &route.forward_headers,
        &route.header_arguments,
    ];
    let kind = upstream.config.kind;
    keep_standard_headers(&mut parts.headers, &listed.map(Vec::as_slice), kind);
    let mut args = Map::new();
    let path = render_path(route, declared, &mut args)?;
    let query = render_query_arguments(parts.uri.query(), route, declared, &mut args)?;
    render_header_arguments(&mut parts.headers, route, declared, &mut args)?;
    parts.uri = upstream.uri(&path, query.as_deref())?;
    if route.retry && parts.method.is_idempotent() {
        // Only then: a request's extensions cost an allocation on every call.
        parts.extensions.insert(crate::endpoints::Dispatch {
            endpoint: None,
            retry_unavailable: true,
        });
    }

    let media = media_type(&parts.headers)?;
    let json = media.as_deref().is_some_and(is_json);
    if declared.rules.undeclared == Undeclared::Forward && declared.args.is_empty() && !json {
        // No policy can read an argument of this action, and its route forwards what it does
        // not declare: a body streams as sent, unless a framework could mine it for a method
        // override (a form, or one whose type it guesses).
        refuse_overridable_body(&body, media.as_deref())?;
        return Ok((Request::from_parts(parts, body), args));
    }
    let bytes = read_body(&parts.headers, body, max_body).await?;
    let body = render_body(&mut parts.headers, &bytes, route, declared, &mut args)?;
    Ok((Request::from_parts(parts, full(body)), args))
}

/// The query's arguments, typed, and the forwarded query rendered from them in the forms they
/// came in.
fn render_query_arguments(
    query: Option<&str>,
    route: &Classified,
    declared: &Declared<'_>,
    args: &mut Map<String, Value>,
) -> Result<Option<String>, Refusal> {
    let (query_args, forms) = read_query(query)?;
    let in_body = route.arguments == ArgumentsIn::Body;
    if let Some(name) = query_args
        .keys()
        .find(|name| in_body && declared.args.contains_key(*name))
    {
        // The policy would see it, and a handler reading the body would not.
        return Err(Refusal::BadRequest(format!(
            "argument `{name}` is read from the body on this route, not the query"
        )));
    }
    refuse_header_arguments_elsewhere(query_args.keys(), route, "the query")?;
    let query = render(query_args, declared.args, Origin::Text, &declared.rules)?;
    merge_args(args, query.policy)?;
    Ok(render_query(&query.forward, &forms))
}

/// A header argument comes from its header: given in the query or the body, the policy would
/// read it while the upstream, reading the header, sees none (and takes its default).
fn refuse_header_arguments_elsewhere<'a>(
    names: impl Iterator<Item = &'a String>,
    route: &Classified,
    place: &str,
) -> Result<(), Refusal> {
    for name in names {
        if route.header_arguments.contains(name) {
            return Err(Refusal::BadRequest(format!(
                "argument `{name}` is read from its header on this route, not {place}"
            )));
        }
    }
    Ok(())
}

/// The JSON body's arguments, typed, and the body forwarded: serialised from them, or none.
fn render_body(
    headers: &mut HeaderMap,
    bytes: &[u8],
    route: &Classified,
    declared: &Declared<'_>,
    args: &mut Map<String, Value>,
) -> Result<Bytes, Refusal> {
    if bytes.is_empty() {
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
            header::CONTENT_TYPE,
        ] {
            headers.remove(name);
        }
        return Ok(Bytes::new());
    }
    if route.arguments != ArgumentsIn::Body {
        return Err(Refusal::BadRequest(
            "this route reads its arguments from the path and query: a body is refused".into(),
        ));
    }
    check_json_body_headers(headers)?;
    for name in [header::CONTENT_LENGTH, header::CONTENT_ENCODING] {
        headers.remove(name);
    }
    let Value::Object(fields) = strict_json(bytes)? else {
        return Err(Refusal::BadRequest(
            "the body must be a JSON object of arguments".into(),
        ));
    };
    for name in fields.keys() {
        refuse_override(name)?;
    }
    refuse_header_arguments_elsewhere(fields.keys(), route, "the body")?;
    let Rendered { policy, forward } =
        render(fields, declared.args, Origin::Json, &declared.rules)?;
    // Numbers reach the upstream with the digits the agent sent, not as a double.
    let canonical = match number_texts(bytes) {
        Some(texts) => {
            to_vec_with_numbers(&Value::Object(forward), &texts, &crate::args::same_number)
        }
        None => {
            serde_json::to_vec(&forward).map_err(|e| InternalError::Serialise("the body", e))?
        }
    };
    merge_args(args, policy)?;
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(Bytes::from(canonical))
}

/// The path parameters, typed, and the forwarded path rendered from them.
fn render_path(
    route: &Classified,
    declared: &Declared<'_>,
    args: &mut Map<String, Value>,
) -> Result<String, Refusal> {
    let raw: Map<String, Value> = route
        .params
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect();
    let Rendered { policy, forward } = render(raw, declared.args, Origin::Text, &declared.rules)?;
    args.extend(policy);
    // A parameter is re-encoded from its rendered value (all but unreserved characters
    // escaped); a literal is the route's own text, escaped only where a path must be.
    let segment = |index: usize| -> String {
        let name = route.param_at.get(index).and_then(Option::as_ref);
        match name {
            Some(name) => {
                let text = match forward.get(name) {
                    Some(Value::String(text)) => text.as_str(),
                    _ => route.segments[index].as_str(),
                };
                format!("/{}", utf8_percent_encode(text, COMPONENT))
            }
            None => format!(
                "/{}",
                utf8_percent_encode(&route.segments[index], PATH_LITERAL)
            ),
        }
    };
    Ok((0..route.segments.len()).map(segment).collect())
}

/// Header arguments (`header_arguments:`): each read as text, typed, and set upstream as the
/// policy read it.
fn render_header_arguments(
    headers: &mut HeaderMap,
    route: &Classified,
    declared: &Declared<'_>,
    args: &mut Map<String, Value>,
) -> Result<(), Refusal> {
    let mut raw = Map::new();
    for name in &route.header_arguments {
        let mut values = headers.get_all(name.as_str()).iter();
        let Some(value) = values.next() else {
            continue;
        };
        if values.next().is_some() {
            return Err(Refusal::BadRequest(format!(
                "header `{name}` is given twice"
            )));
        }
        let text = value
            .to_str()
            .map_err(|_| Refusal::BadRequest(format!("header `{name}` is not text")))?;
        raw.insert(name.clone(), Value::String(text.to_string()));
    }
    let Rendered { policy, forward } = render(raw, declared.args, Origin::Text, &declared.rules)?;
    for (name, value) in forward {
        let Value::String(text) = value else {
            continue;
        };
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Refusal::BadRequest(format!("`{name}` is not a header name")))?;
        let value = HeaderValue::from_str(&text)
            .map_err(|_| Refusal::BadRequest(format!("header `{name}` is not text")))?;
        headers.insert(header, value);
    }
    merge_args(args, policy)
}

/// A body on an action that declares no arguments, forwarded as sent: refused where a
/// framework could read it as a form (a method override) or has no type to go by.
fn refuse_overridable_body(body: &Body, media: Option<&str>) -> Result<(), Refusal> {
    if http_body::Body::is_end_stream(body) {
        return Ok(());
    }
    match media {
        None => Err(Refusal::UnsupportedMediaType(
            "a body needs a Content-Type".into(),
        )),
        // Rack reads any multipart as a form; Laravel reads any type naming `json`.
        Some(m)
            if m == "application/x-www-form-urlencoded"
                || m.starts_with("multipart/")
                || m.contains("json") =>
        {
            Err(Refusal::UnsupportedMediaType(
                "form, multipart and non-standard JSON bodies are not forwarded: send application/json".into(),
            ))
        }
        Some(_) => Ok(()),
    }
}

/// A JSON request body, read strictly (`toolgate_mcp::json`).
pub(crate) fn strict_json(bytes: &[u8]) -> Result<Value, Refusal> {
    parse_strict(bytes, MAX_JSON_DEPTH).map_err(|e| match e {
        JsonError::Syntax(e) => Refusal::BadRequest(format!("body is not valid JSON: {e}")),
        JsonError::Ambiguous(e) => Refusal::BadRequest(format!("body: {e}")),
    })
}

/// The media type, lower-cased, without parameters; refuses a header that is not one value.
fn media_type(headers: &HeaderMap) -> Result<Option<String>, Refusal> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Refusal::BadRequest("more than one Content-Type".into()));
    }
    let text = value
        .to_str()
        .map_err(|_| Refusal::UnsupportedMediaType("Content-Type is not ASCII".into()))?;
    // Rack reads the type up to `,` too: `application/x-www-form-urlencoded,x` is a form there.
    if text.contains(',') {
        return Err(Refusal::UnsupportedMediaType(
            "Content-Type must be one media type".into(),
        ));
    }
    let media = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&b))
    };
    match media.split_once('/') {
        Some((kind, sub)) if token(kind) && token(sub) => Ok(Some(media)),
        _ => Err(Refusal::UnsupportedMediaType(format!(
            "Content-Type {media:?} is not a media type"
        ))),
    }
}

fn is_json(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// A JSON body is read as UTF-8 JSON: the media type must say JSON, its only parameter may be
/// `charset=utf-8`, and nothing may encode it further.
pub(crate) fn check_json_body_headers(headers: &HeaderMap) -> Result<(), Refusal> {
    let refuse = |why: &str| Err(Refusal::UnsupportedMediaType(why.into()));
    if headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return refuse("encoded bodies are not read: send plain JSON");
    }
    let Some(media) = media_type(headers)? else {
        return refuse("a body needs Content-Type: application/json");
    };
    if !is_json(&media) {
        return refuse("the body must be application/json");
    }
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    for parameter in value.split(';').skip(1) {
        let (name, val) = parameter.split_once('=').unwrap_or((parameter, ""));
        let val = val.trim().trim_matches('"');
        if !(name.trim().eq_ignore_ascii_case("charset") && val.eq_ignore_ascii_case("utf-8")) {
            return refuse("the only Content-Type parameter read is charset=utf-8");
        }
    }
    Ok(())
}

async fn read_body(headers: &HeaderMap, body: Body, limit: BodyLimit) -> Result<Bytes, Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.bytes as u64) {
        return Err(Refusal::PayloadTooLarge);
    }
    crate::pipeline::read_limited(body, limit).await
}

/// How a query parameter was written: `a=1&a=2` or `a[]=1&a[]=2`. A set is forwarded in the
/// form the agent used, the one its API documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueryForm {
    Plain,
    Brackets,
}

/// How each query parameter was written.
type QueryForms = HashMap<String, QueryForm>;

/// Query pairs (`+` is a space, as in forms), by name: one value, or a list where the name
/// repeats or ends in `[]`.
fn read_query(query: Option<&str>) -> Result<(Map<String, Value>, QueryForms), Refusal> {
    let mut args: Map<String, Value> = Map::new();
    let mut forms = QueryForms::new();
    let mut folded: HashMap<String, String> = HashMap::new();
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok((args, forms));
    };
    for (n, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
        if n == MAX_QUERY_PAIRS {
            return Err(Refusal::BadRequest(format!(
                "more than {MAX_QUERY_PAIRS} query parameters"
            )));
        }
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let written = decode_query_part(raw_name)?;
        let value = Value::String(decode_query_part(raw_value)?);
        let (name, form) = match written.strip_suffix("[]") {
            Some(root) => (root.to_string(), QueryForm::Brackets),
            None => (written.clone(), QueryForm::Plain),
        };
        if !is_plain_query_name(&name) {
            return Err(Refusal::BadRequest(format!(
                "query parameter name {written:?} is not read alike by every framework"
            )));
        }
        if fold_key(&name) == "access_token" {
            return Err(Refusal::BadRequest(
                "credentials in the query are refused: use the Authorization header".into(),
            ));
        }
        refuse_override(&name)?;
        // Names that case-insensitive or PHP-style binders read as one: refused.
        let key = fold_key(&name).replace(['.', ' '], "_");
        match folded.get(&key) {
            Some(other) if *other != name => {
                return Err(Refusal::BadRequest(format!(
                    "query parameters `{other}` and `{name}` may be read as one by the upstream"
                )))
            }
            Some(_) => {}
            None => {
                folded.insert(key, name.clone());
            }
        }
        if forms.insert(name.clone(), form).is_some_and(|f| f != form) {
            return Err(Refusal::BadRequest(format!(
                "query parameter `{name}` is given both as `{name}` and `{name}[]`"
            )));
        }
        match args.get_mut(&name) {
            Some(Value::Array(items)) => items.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
            None if form == QueryForm::Brackets => {
                args.insert(name, Value::Array(vec![value]));
            }
            None => {
                args.insert(name, value);
            }
        }
    }
    Ok((args, forms))
}

/// The forwarded query: each rendered argument re-encoded, a list repeated in its form.
fn render_query(
    forward: &Map<String, Value>,
    forms: &HashMap<String, QueryForm>,
) -> Option<String> {
    let mut pairs = Vec::new();
    for (name, value) in forward {
        let written = match forms.get(name) {
            Some(QueryForm::Brackets) => format!("{name}[]"),
            _ => name.clone(),
        };
        let encoded = utf8_percent_encode(&written, COMPONENT).to_string();
        let texts: Vec<&str> = match value {
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            Value::String(text) => vec![text.as_str()],
            _ => Vec::new(),
        };
        for text in texts {
            pairs.push(format!(
                "{encoded}={}",
                utf8_percent_encode(text, COMPONENT)
            ));
        }
    }
    (!pairs.is_empty()).then(|| pairs.join("&"))
}

fn decode_query_part(raw: &str) -> Result<String, Refusal> {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Refusal::BadRequest("query is not UTF-8".into()))
}

/// `/seg/seg`, each decoded segment re-encoded.
#[cfg(test)]
pub(crate) fn canonical_path(segments: &[String]) -> String {
    segments
        .iter()
        .map(|s| format!("/{}", utf8_percent_encode(s, COMPONENT)))
        .collect()
}

/// Refuses a name under which a framework takes a method override: in any case, with `-`,
/// and as PHP files it (`.` and space read as `_`: `?.method=` is `$_GET['_method']`), or as
/// the root of a structured name.
fn refuse_override(name: &str) -> Result<(), Refusal> {
    let folded = fold_key(name).replace(['-', '.', ' '], "_");
    let root = folded.split('[').next().unwrap_or_default();
    if METHOD_OVERRIDES.contains(&root) {
        return Err(Refusal::BadRequest(format!(
            "`{name}` would override the method after the decision"
        )));
    }
    Ok(())
}

/// A query parameter name every framework reads alike: a root of letters, digits and
/// `_ . ~ - $`, then `[...]` groups of the same characters. Leading spaces and NULs (PHP),
/// a bracketed root (Rack), nested or unbalanced brackets are refused.
fn is_plain_query_name(name: &str) -> bool {
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.~-$".contains(&b))
    };
    let (root, mut rest) = name.split_at(name.find('[').unwrap_or(name.len()));
    if root.is_empty() || !plain(root) {
        return false;
    }
    while let Some(inner) = rest.strip_prefix('[') {
        let Some(end) = inner.find(']') else {
            return false;
        };
        if !plain(&inner[..end]) {
            return false;
        }
        rest = &inner[end + 1..];
    }
    rest.is_empty()
}

/// Adds `more` to `args`; the same name from two sources must carry the same value.
fn merge_args(args: &mut Map<String, Value>, more: Map<String, Value>) -> Result<(), Refusal> {
    for (name, value) in more {
        match args.get(&name) {
            Some(prior) if as_text(prior) != as_text(&value) => {
                return Err(Refusal::BadRequest(format!(
                    "argument `{name}` is given twice with different values"
                )))
            }
            Some(_) => {}
            None => {
                args.insert(name, value);
            }
        }
    }
    Ok(())
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_argument_with_the_same_value_merges_and_a_conflict_is_refused() {
        let mut args = json!({"invoice_id": "42"}).as_object().unwrap().clone();
        merge_args(
            &mut args,
            json!({"invoice_id": 42, "amount": 5})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap();
        assert_eq!(args.get("amount"), Some(&json!(5)));
        assert_eq!(args.get("invoice_id"), Some(&json!("42")));
        let err = merge_args(
            &mut args,
            json!({"invoice_id": 43}).as_object().unwrap().clone(),
        )
        .unwrap_err();
        assert!(matches!(err, Refusal::BadRequest(_)));
    }

    #[test]
    fn json_body_headers() {
        for (ct, ok) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/json; charset=\"UTF-8\"", true),
            ("application/merge-patch+json", true),
            ("application/json; charset=utf-16", false),
            ("application/json; charset=utf-8; boundary=x", false),
            ("text/plain", false),
            ("text/json", false),
            ("application/json, application/x-www-form-urlencoded", false),
            ("application/json x", false),
            ("application/json/x", false),
            ("", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(check_json_body_headers(&h).is_ok(), ok, "{ct}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert!(check_json_body_headers(&h).is_err());
        assert!(check_json_body_headers(&HeaderMap::new()).is_err());
    }

    #[test]
    fn query_is_decoded_once_and_re_encoded_in_the_form_it_came() {
        let (args, forms) = read_query(Some(
            "customer=a+b%3Bc&limit=2;x=1&tag=1&tag=2&s[]=x&s[]=y&one[]=z",
        ))
        .unwrap();
        assert_eq!(args["customer"], json!("a b;c"));
        assert_eq!(args["limit"], json!("2;x=1"));
        assert_eq!(args["tag"], json!(["1", "2"]));
        assert_eq!(args["s"], json!(["x", "y"]));
        assert_eq!(args["one"], json!(["z"]));
        assert_eq!(
            render_query(&args, &forms).unwrap(),
            "customer=a%20b%3Bc&limit=2%3Bx%3D1&tag=1&tag=2&s%5B%5D=x&s%5B%5D=y&one%5B%5D=z"
        );
    }

    #[test]
    fn names_frameworks_conflate_are_refused() {
        for query in [
            "customer=a&Customer=b",
            "customer=a&customer[]=b",
            "cus.tomer=a&cus_tomer=b",
            "cus+tomer=a&cus_tomer=b",
            "_method=DELETE",
            "X-HTTP-Method-Override=DELETE",
            ".method=DELETE",
            "_method[]=DELETE",
            "access_token=abc",
            "=x",
            "a=%ff",
            // PHP drops leading spaces and cuts at NUL; Rack 2 files `[amount]` under amount.
            "%20customer=a",
            "customer%00x=a",
            "[customer]=a",
            "customer[a[b]]=1",
            "customer]=1",
            "customer[=1",
        ] {
            assert!(read_query(Some(query)).is_err(), "{query}");
        }
        let many = vec!["x=1"; MAX_QUERY_PAIRS + 1].join("&");
        assert!(read_query(Some(&many)).is_err());
    }

    #[test]
    fn paths_are_re_encoded_from_their_decoded_segments() {
        assert_eq!(
            canonical_path(&["a b".into(), "x;y".into(), "%2e".into(), "é".into()]),
            "/a%20b/x%3By/%252e/%C3%A9"
        );
    }
}
