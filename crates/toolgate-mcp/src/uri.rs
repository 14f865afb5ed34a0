//! Resource URIs as the policy and the server both read them, and RFC 6570 templates expanded
//! the way a server matches them.

use serde_json::{Map, Value};

/// Escapes refused: once a server decodes them (the Python SDK's URI templates `unquote` every
/// variable), they change the URI's structure (`/`, `.` for dot segments, `?`, `#`, `\` read
/// as `/` by WHATWG parsers), stand for a delimiter written literally elsewhere (`%40` for `@`,
/// the other RFC 3986 reserved characters), escape an escape (`%25`), or are control bytes. The
/// policy and the server then read one text for one resource.
fn refused_escape(byte: u8) -> bool {
    byte.is_ascii_control() || b"/.?#\\:[]@!$&'()*+,;=%".contains(&byte)
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// A resource URI in its one canonical form (RFC 3986 §6.2.2): escapes of unreserved
/// characters decoded, other escapes in upper-case hex. Refused: an escape that changes the
/// structure (`%2F`, `%2E`, `%3F`, `%23`, `%5C`), a malformed escape, a `.` or `..` segment, and
/// a URI that a WHATWG parser (the Python SDK's `AnyUrl`) would rewrite (`FILE:`, `a/b/../c`).
pub fn canonical_uri(uri: &str) -> Result<String, String> {
    let bytes = uri.as_bytes();
    let mut out = String::with_capacity(uri.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            let c = uri[i..].chars().next().unwrap_or_default();
            out.push(c);
            i += c.len_utf8().max(1);
            continue;
        }
        let hex = uri
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .filter(|_| bytes[i + 1].is_ascii_hexdigit() && bytes[i + 2].is_ascii_hexdigit());
        let Some(byte) = hex else {
            return Err("resource uri has a `%` that is not an escape".into());
        };
        if refused_escape(byte) {
            return Err(format!(
                "resource uri escapes %{byte:02X}, which a server reads as another uri once decoded: write the character itself, or leave it out"
            ));
        }
        if unreserved(byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
        i += 3;
    }
    let path = out.split(['?', '#']).next().unwrap_or_default();
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err("resource uri has a `.` or `..` segment".into());
    }
    match url::Url::parse(&out) {
        Ok(parsed) if parsed.as_str() == out => Ok(out),
        Ok(parsed) => Err(format!(
            "resource uri is not in normal form: send `{}`",
            parsed.as_str()
        )),
        Err(e) => Err(format!("resource uri is not an absolute URI: {e}")),
    }
}

/// Expands an RFC 6570 template (levels 1 to 3, with `*` and `:n` read as plain) with `vars`;
/// a variable without a value expands to nothing.
pub fn expand_template(template: &str, vars: &Map<String, Value>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or("uri template has an unclosed `{`")?
            + open;
        out.push_str(&expression(&rest[open + 1..close], vars));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err("uri template has an unopened `}`".into());
    }
    out.push_str(rest);
    Ok(out)
}

fn expression(expr: &str, vars: &Map<String, Value>) -> String {
    let (op, names) = match expr.chars().next() {
        Some(c @ ('+' | '#' | '.' | '/' | ';' | '?' | '&')) => (Some(c), &expr[1..]),
        _ => (None, expr),
    };
    let (first, separator, named, reserved) = match op {
        None => ("", ",", false, false),
        Some('+') => ("", ",", false, true),
        Some('#') => ("#", ",", false, true),
        Some('.') => (".", ".", false, false),
        Some('/') => ("/", "/", false, false),
        Some(';') => (";", ";", true, false),
        Some('?') => ("?", "&", true, false),
        _ => ("&", "&", true, false),
    };
    let mut parts = Vec::new();
    for name in names.split(',') {
        let name = name.trim_end_matches('*');
        let name = name.split(':').next().unwrap_or_default();
        let text = match vars.get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => continue,
            Some(other) => other.to_string(),
        };
        let encoded = encode(&text, reserved);
        parts.push(if named && op == Some(';') && text.is_empty() {
            name.to_string()
        } else if named {
            format!("{name}={encoded}")
        } else {
            encoded
        });
    }
    if parts.is_empty() {
        return String::new();
    }
    format!("{first}{}", parts.join(separator))
}

fn encode(text: &str, reserved: bool) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        let keep = unreserved(b) || (reserved && b":/?#[]@!$&'()*+,;=".contains(&b));
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn uris_are_canonical_or_refused() {
        for (uri, want) in [
            ("notes://bo%62/salary", Ok("notes://bob/salary")),
            (
                "file:///public/%69nternal/keys.txt",
                Ok("file:///public/internal/keys.txt"),
            ),
            ("file:///a%c3%a9%7e", Ok("file:///a%C3%A9~")),
            ("file:///a%20b", Ok("file:///a%20b")),
            ("mail://ceo%40corp.example/inbox", Err(())),
            ("notes://a/b%2a", Err(())),
            ("notes://a/b%25", Err(())),
            ("notes://a/b%00", Err(())),
            ("notes://a/b%0A", Err(())),
            ("memo://insights", Ok("memo://insights")),
            ("https://example.com/a?b=c", Ok("https://example.com/a?b=c")),
            ("file:///public/x%2F..%2Finternal%2Fkeys.txt", Err(())),
            ("file:///public/%2e%2e/secret", Err(())),
            ("file:///public/../secret", Err(())),
            ("file:///public/./x", Err(())),
            ("notes://a/b%3Fx", Err(())),
            ("notes://a/b%23x", Err(())),
            ("notes://a/b%5Cx", Err(())),
            ("notes://a/b%4", Err(())),
            ("notes://a/b%zz", Err(())),
            ("FILE:///secret", Err(())),
            ("https://example.com", Err(())),
            ("notes/1", Err(())),
        ] {
            assert_eq!(
                canonical_uri(uri).map_err(|_| ()),
                want.map(String::from),
                "{uri}"
            );
        }
    }

    #[test]
    fn templates_expand_as_rfc_6570_says() {
        let vars = json!({"user": "bob", "x": "a b/c", "empty": "", "n": 5});
        let vars = vars.as_object().unwrap();
        for (template, want) in [
            ("notes://{user}/salary", "notes://bob/salary"),
            ("notes://{user}/{missing}", "notes://bob/"),
            ("file:///{x}", "file:///a%20b%2Fc"),
            ("file:///{+x}", "file:///a%20b/c"),
            ("files{/user,n}", "files/bob/5"),
            ("find{?user,n,missing}", "find?user=bob&n=5"),
            ("find?a=1{&user}", "find?a=1&user=bob"),
            ("x{.user}", "x.bob"),
            ("x{;user,empty}", "x;user=bob;empty"),
            ("x{#user}", "x#bob"),
        ] {
            assert_eq!(expand_template(template, vars).unwrap(), want, "{template}");
        }
        assert!(expand_template("a{b", vars).is_err());
    }
}
