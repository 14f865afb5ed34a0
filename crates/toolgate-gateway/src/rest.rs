//! A REST call's arguments, and the one form of the request that carries them upstream.
//!
//! Whatever the policy reads must mean the same to the upstream. So the request is rebuilt
//! from what was parsed: path segments and query pairs re-encoded so that every decoder reads
//! them alike, a JSON body re-serialised from the parsed value under the content type it was
//! parsed as. What could be read two ways (a key that differs only in case, a name that
//! frameworks file under another, a body the gateway did not parse, an override of the
//! method) is refused instead.

use std::collections::HashMap;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{Map, Value};
use toolgate_mcp::json::{fold_key, parse_strict, JsonError};
use toolgate_policy::Record;

use crate::answer::{full, Body, InternalError, Refusal};
use crate::config::ArgumentsIn;
use crate::pipeline::BodyLimit;
use crate::routes::Classified;
use crate::upstream::Upstream;

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

/// Names (after folding case and `-` to `_`) under which frameworks take an HTTP method
/// override from parameters or a JSON body (Laravel, Symfony, Express method-override, Rails).
const METHOD_OVERRIDES: [&str; 4] = [
    "_method",
    "x_http_method_override",
    "x_http_method",
    "x_method_override",
];

/// Reads a REST call's arguments (path, query, JSON body) and rebuilds the request in the one
/// form forwarded upstream. `declared`: the action's declared `args` (None: it declares none).
pub(crate) async fn read_call(
    request: Request<Incoming>,
    route: &Classified,
    upstream: &Upstream,
    declared: Option<&Record>,
    max_body: BodyLimit,
) -> Result<(Request<Body>, Map<String, Value>), Refusal> {
    let (mut parts, body) = request.into_parts();
    let mut names = Names::default();
    for name in declared.into_iter().flat_map(|d| d.keys()) {
        names.declare(name)?;
    }
    let mut args = Map::new();
    for (name, value) in &route.params {
        names.claim(name)?;
        args.insert(name.clone(), Value::String(value.clone()));
    }
    let (query_args, query) = read_query(parts.uri.query(), &mut names)?;
    // An argument the upstream reads from the body must not come in the query, where the
    // policy would see it and a handler reading the body would not.
    let in_body = route.arguments == ArgumentsIn::Body;
    if let Some(name) = query_args
        .keys()
        .find(|name| in_body && declared.is_some_and(|d| d.contains_key(*name)))
    {
        return Err(Refusal::BadRequest(format!(
            "argument `{name}` is read from the body on this route, not the query"
        )));
    }
    merge_args(&mut args, query_args)?;
    parts.uri = upstream.uri(&canonical_path(&route.segments), query.as_deref())?;

    let media = media_type(&parts.headers)?;
    let json = media.as_deref().is_some_and(is_json);
    if declared.is_none_or(|d| d.is_empty()) && !json {
        // No policy can read an argument of this action: a body streams as sent, unless a
        // framework could mine it for a method override (a form, or one whose type it guesses).
        if !http_body::Body::is_end_stream(&body) {
            match media.as_deref() {
                None => {
                    return Err(Refusal::UnsupportedMediaType(
                        "a body needs a Content-Type".into(),
                    ))
                }
                // Rack reads any multipart as a form; Laravel reads any type naming `json`.
                Some(m)
                    if m == "application/x-www-form-urlencoded"
                        || m.starts_with("multipart/")
                        || m.contains("json") =>
                {
                    return Err(Refusal::UnsupportedMediaType(
                        "form, multipart and non-standard JSON bodies are not forwarded: send application/json".into(),
                    ))
                }
                Some(_) => {}
            }
        }
        return Ok((
            Request::from_parts(parts, body.map_err(Into::into).boxed()),
            args,
        ));
    }

    let bytes = read_body(&parts.headers, body, max_body).await?;
    if !bytes.is_empty() && !in_body {
        return Err(Refusal::BadRequest(
            "this route reads its arguments from the path and query: a body is refused".into(),
        ));
    }
    if bytes.is_empty() {
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
            header::CONTENT_TYPE,
        ] {
            parts.headers.remove(name);
        }
        return Ok((Request::from_parts(parts, full(Bytes::new())), args));
    }
    check_json_body_headers(&parts.headers)?;
    for name in [header::CONTENT_LENGTH, header::CONTENT_ENCODING] {
        parts.headers.remove(name);
    }
    let Value::Object(fields) = strict_json(&bytes)? else {
        return Err(Refusal::BadRequest(
            "the body must be a JSON object of arguments".into(),
        ));
    };
    for name in fields.keys() {
        refuse_override(name)?;
        names.claim(name)?;
    }
    let canonical =
        serde_json::to_vec(&fields).map_err(|e| InternalError::Serialise("the body", e))?;
    merge_args(&mut args, fields)?;
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok((Request::from_parts(parts, full(canonical)), args))
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

async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    limit: BodyLimit,
) -> Result<Bytes, Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.bytes as u64) {
        return Err(Refusal::PayloadTooLarge);
    }
    crate::pipeline::read_limited(body, limit).await
}

/// Query pairs (`+` is a space, as in forms) and their canonical re-encoding.
fn read_query(
    query: Option<&str>,
    names: &mut Names,
) -> Result<(Map<String, Value>, Option<String>), Refusal> {
    let mut args: Map<String, Value> = Map::new();
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok((args, None));
    };
    let mut canonical = Vec::new();
    for (n, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
        if n == MAX_QUERY_PAIRS {
            return Err(Refusal::BadRequest(format!(
                "more than {MAX_QUERY_PAIRS} query parameters"
            )));
        }
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode_query_part(raw_name)?;
        let value = decode_query_part(raw_value)?;
        if !is_plain_query_name(&name) {
            return Err(Refusal::BadRequest(format!(
                "query parameter name {name:?} is not read alike by every framework"
            )));
        }
        if fold_key(&name) == "access_token" {
            return Err(Refusal::BadRequest(
                "credentials in the query are refused: use the Authorization header".into(),
            ));
        }
        refuse_override(&name)?;
        names.claim(&name)?;
        canonical.push(format!(
            "{}={}",
            utf8_percent_encode(&name, COMPONENT),
            utf8_percent_encode(&value, COMPONENT)
        ));
        let value = Value::String(value);
        match args.get_mut(&name) {
            Some(Value::Array(items)) => items.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
            None => {
                args.insert(name, value);
            }
        }
    }
    Ok((args, Some(canonical.join("&"))))
}

fn decode_query_part(raw: &str) -> Result<String, Refusal> {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| Refusal::BadRequest("query is not UTF-8".into()))
}

/// `/seg/seg`, each decoded segment re-encoded.
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

/// Every argument name of one call, by each form a framework may file it under: folded case,
/// and PHP's (`.` and space read as `_`). A structured name (`a[b]`, `a[]`, `a.b`) is filed by
/// qs, Rails and Spring under its root `a`, by PHP under the root of its mangled form
/// (`a.b[]` under `a_b`), and ASP.NET binds any of its parts to a model property. Two
/// different names that share a form, a root that is also a name of its own, or a part that
/// names a declared argument could reach the upstream as an argument the policy saw under
/// another name (or not at all): refused.
#[derive(Default)]
struct Names {
    by_form: HashMap<String, String>,
    roots: HashMap<String, String>,
    declared: HashMap<String, String>,
}

impl Names {
    /// An argument the schema declares: claimed before any name the request brings.
    fn declare(&mut self, name: &str) -> Result<(), Refusal> {
        self.declared.insert(fold_key(name), name.to_string());
        self.claim(name)
    }

    fn claim(&mut self, name: &str) -> Result<(), Refusal> {
        let conflict = |other: &str| {
            Err(Refusal::BadRequest(format!(
                "arguments `{other}` and `{name}` may be read as one by the upstream"
            )))
        };
        let folded = fold_key(name);
        let php = folded.replace(['.', ' '], "_");
        for form in [&folded, &php] {
            match self.by_form.get(form) {
                Some(other) if other != name => return conflict(other),
                Some(_) => {}
                None => {
                    self.by_form.insert(form.clone(), name.to_string());
                }
            }
        }
        if !folded.contains(['[', '.']) {
            return match self.roots.get(&folded) {
                Some(other) => conflict(other),
                None => Ok(()),
            };
        }
        let roots = [
            folded.split(['[', '.']).next().unwrap_or_default(),
            php.split('[').next().unwrap_or_default(),
        ];
        for root in roots {
            if let Some(other) = self.by_form.get(root).filter(|other| *other != name) {
                return conflict(other);
            }
            self.roots
                .entry(root.to_string())
                .or_insert_with(|| name.to_string());
        }
        let mut parts = folded.split(['[', ']', '.']).skip(1);
        if let Some(declared) = parts.find_map(|part| self.declared.get(part)) {
            return conflict(declared);
        }
        Ok(())
    }
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
    fn query_is_decoded_once_and_re_encoded_unambiguously() {
        let mut names = Names::default();
        let (args, canonical) =
            read_query(Some("customer=a+b%3Bc&limit=2;x=1&tag=1&tag=2"), &mut names).unwrap();
        assert_eq!(args["customer"], json!("a b;c"));
        assert_eq!(args["limit"], json!("2;x=1"));
        assert_eq!(args["tag"], json!(["1", "2"]));
        assert_eq!(
            canonical.unwrap(),
            "customer=a%20b%3Bc&limit=2%3Bx%3D1&tag=1&tag=2"
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
            // A structured name beside its own root: qs, Rails, PHP merge the two.
            "customer[]=b&customer=a",
            "customer.x=b&customer=a",
        ] {
            assert!(
                read_query(Some(query), &mut Names::default()).is_err(),
                "{query}"
            );
        }
        // A declared name claims its forms before the query is read.
        let mut names = Names::default();
        names.declare("amount").unwrap();
        names.declare("to_account").unwrap();
        assert!(read_query(Some("Amount=900"), &mut names).is_err());
        assert!(read_query(Some("amount[]=900"), &mut names).is_err());
        // PHP files `to.account[]` under `to_account`; ASP.NET binds `request.amount` to amount.
        assert!(read_query(Some("to.account[]=victim"), &mut names).is_err());
        assert!(read_query(Some("request.amount=900"), &mut names).is_err());
        assert!(read_query(Some("meta[Amount]=900"), &mut names).is_err());
        assert!(read_query(Some(".method=DELETE"), &mut Names::default()).is_err());
        assert!(read_query(Some("_method[]=DELETE"), &mut Names::default()).is_err());
        assert!(read_query(Some("amount=900"), &mut names).is_ok());
        // Structured names under one root are one map to every framework: read alike.
        let (args, _) = read_query(
            Some("filter[status]=open&filter[kind]=x&$top=5&a.b=1&a.c=2"),
            &mut Names::default(),
        )
        .unwrap();
        assert_eq!(args.len(), 5);
        let many = vec!["x=1"; MAX_QUERY_PAIRS + 1].join("&");
        assert!(read_query(Some(&many), &mut Names::default()).is_err());
    }

    #[test]
    fn paths_are_re_encoded_from_their_decoded_segments() {
        assert_eq!(
            canonical_path(&["a b".into(), "x;y".into(), "%2e".into(), "é".into()]),
            "/a%20b/x%3By/%252e/%C3%A9"
        );
    }
}
