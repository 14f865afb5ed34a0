//! JSON as toolgate reads it. Parsers disagree on duplicate keys (first or last wins) and
//! some match keys without regard to case (Go's `encoding/json`, Jackson, System.Text.Json):
//! a document that two parsers may read differently is refused, so the policy and every
//! upstream read the same values.

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all (syntax, encoding, trailing data).
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// Valid JSON that parsers may read differently, or nested too deeply.
    #[error("{0}")]
    Ambiguous(String),
}

/// Parses `bytes` as one JSON document, refusing duplicate keys, keys that differ only in
/// letter case (as parsers that ignore case fold them), and nesting deeper than `max_depth`.
pub fn parse_strict(bytes: &[u8], max_depth: usize) -> Result<Value, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict {
        depth: 1,
        max_depth,
    }
    .deserialize(&mut de)
    .map_err(classify)?;
    de.end().map_err(classify)?;
    Ok(value)
}

/// Our own refusals are raised as serde custom errors; tell them from syntax errors.
const AMBIGUOUS: &str = "ambiguous JSON: ";

fn classify(e: serde_json::Error) -> JsonError {
    let text = e.to_string();
    match text.strip_prefix(AMBIGUOUS) {
        Some(rest) => JsonError::Ambiguous(rest.to_string()),
        None => JsonError::Syntax(text),
    }
}

/// The form under which a case-insensitive parser compares a key. Each character is
/// upper-cased then lower-cased (full mappings), so every member of a Unicode simple case-fold
/// orbit (`K`, `k` and the Kelvin sign; `s`, `S` and `ſ`) and every full-folding pair (`ß`,
/// `ss`) lands on one form; repeated until stable, so `ẞ` (lower-cased to `ß`) lands on `ss`
/// too. `İ` is first lower-cased simply, as Go does (`i`), not to `i` and a combining dot.
pub fn fold_key(key: &str) -> String {
    if key.is_ascii() {
        return key.to_ascii_lowercase();
    }
    let mut folded = fold_once(key);
    for _ in 0..3 {
        let again = fold_once(&folded);
        if again == folded {
            break;
        }
        folded = again;
    }
    folded
}

fn fold_once(key: &str) -> String {
    key.chars()
        .map(|c| if c == '\u{130}' { 'i' } else { c })
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// A key of `object` that a case-insensitive parser reads as one of `known` but that is spelled
/// otherwise: the reader that matches exactly would not see the value such a parser uses.
pub fn misspelled<'a, I>(object: &'a Map<String, Value>, known: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str> + Clone,
{
    object.keys().map(String::as_str).find(|key| {
        let folded = fold_key(key);
        known
            .clone()
            .into_iter()
            .any(|k| k != *key && fold_key(k) == folded)
    })
}

struct Strict {
    depth: usize,
    max_depth: usize,
}

impl Strict {
    /// The reader of the values inside a container at this depth.
    fn inner(&self) -> Strict {
        Strict {
            depth: self.depth + 1,
            max_depth: self.max_depth,
        }
    }

    /// Entering a container: the top-level one is at depth 1, and `max_depth` may be reached.
    fn enter<E: serde::de::Error>(&self) -> Result<(), E> {
        if self.depth > self.max_depth {
            return Err(E::custom(format!(
                "{AMBIGUOUS}nested deeper than {} levels",
                self.max_depth
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("{AMBIGUOUS}number out of range")))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.inner())? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut out = Map::new();
        let mut folded = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(A::Error::custom(format!(
                    "{AMBIGUOUS}duplicate key `{key}`"
                )));
            }
            if !folded.insert(fold_key(&key)) {
                let other = out
                    .keys()
                    .find(|k| fold_key(k) == fold_key(&key))
                    .cloned()
                    .unwrap_or_default();
                return Err(A::Error::custom(format!(
                    "{AMBIGUOUS}keys `{other}` and `{key}` differ only in letter case"
                )));
            }
            let value = map.next_value_seed(self.inner())?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// The number literals of a JSON document as written, in document order (a JSON value is
/// parsed to `f64` where it is not an integer, so its digits beyond a double's are otherwise
/// lost). `None` when every one is a plain integer, which the parsed value writes back alike.
pub fn number_texts(bytes: &[u8]) -> Option<Vec<&str>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut out = Vec::new();
    let mut plain = true;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => {
                // Skip the string, escapes and all.
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '-' | '0'..='9' => {
                let mut end = at + c.len_utf8();
                while let Some(&(next, c)) = chars.peek() {
                    if !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) {
                        break;
                    }
                    end = next + c.len_utf8();
                    chars.next();
                }
                let literal = &text[at..end];
                plain &= literal.len() <= 15 && !literal.contains(['.', 'e', 'E']);
                out.push(literal);
            }
            _ => {}
        }
    }
    (!plain).then_some(out)
}

/// Writes `value` as JSON with its numbers spelled as `texts` says, in order, where `same` says
/// a text denotes exactly the number the value holds (`1.50` for 1.5, `2e-7`); any other number
/// is written as parsed. Exactly: a text that only rounds to the same double (more digits than
/// a double holds, another message's literal) would send a number nobody decided on.
pub fn to_vec_with_numbers(
    value: &Value,
    texts: &[&str],
    same: &dyn Fn(&str, &Number) -> bool,
) -> Vec<u8> {
    let mut out = String::new();
    let mut next = 0;
    write_value(value, texts, same, &mut next, &mut out);
    out.into_bytes()
}

fn write_value(
    value: &Value,
    texts: &[&str],
    same: &dyn Fn(&str, &Number) -> bool,
    next: &mut usize,
    out: &mut String,
) {
    match value {
        Value::Number(n) => {
            let text = texts.get(*next).copied();
            *next += 1;
            match text {
                Some(t) if same(t, n) && serde_json::from_str::<Number>(t).is_ok() => {
                    out.push_str(t)
                }
                _ => out.push_str(&n.to_string()),
            }
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, texts, same, next, out);
            }
            out.push(']');
        }
        Value::Object(fields) => {
            out.push('{');
            for (i, (key, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_value(item, texts, same, next, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_back_with_their_digits() {
        let body = br#"{"a": 0.123456789012345678901, "s": "1.50 \" 2", "n": [1, -2.50e3, 7]}"#;
        let texts = number_texts(body).expect("not all plain integers");
        assert_eq!(texts, ["0.123456789012345678901", "1", "-2.50e3", "7"]);
        let value = parse_strict(body, 8).unwrap();
        // As the caller judges: here, a text whose double is the value's.
        let same = |t: &str, n: &Number| t.parse::<f64>().ok() == n.as_f64();
        let out = String::from_utf8(to_vec_with_numbers(&value, &texts, &same)).unwrap();
        assert_eq!(
            out,
            r#"{"a":0.123456789012345678901,"s":"1.50 \" 2","n":[1,-2.50e3,7]}"#
        );
        // A text that reads as another number is not used (a value rendered otherwise).
        let other = parse_strict(br#"{"a": 5.5}"#, 8).unwrap();
        assert_eq!(
            to_vec_with_numbers(&other, &["7.25"], &same),
            br#"{"a":5.5}"#
        );
        assert!(number_texts(br#"{"a": 1, "b": [2, 3]}"#).is_none());
    }
    use serde_json::json;

    #[test]
    fn plain_documents_parse_as_serde_json_does() {
        for doc in [
            r#"{"a":1,"b":[true,null,"x",-2,1.5],"c":{"d":{}}}"#,
            "[]",
            "\"\\u00e9\"",
            "18446744073709551615",
        ] {
            let want: Value = serde_json::from_str(doc).unwrap();
            assert_eq!(parse_strict(doc.as_bytes(), 32).unwrap(), want, "{doc}");
        }
    }

    #[test]
    fn ambiguous_documents_are_refused() {
        for doc in [
            r#"{"amount":1,"amount":900}"#,
            r#"{"amount":1,"Amount":900}"#,
            r#"{"a":{"x":1,"X":2}}"#,
            r#"[{"k":1,"K":2}]"#,
            // Kelvin sign, long s, sharp s: folded by Go/Jackson/.NET as k, s, ss.
            "{\"k\":1,\"\u{212a}\":2}",
            "{\"status\":1,\"\u{17f}tatus\":2}",
            "{\"stra\u{df}e\":1,\"strasse\":2}",
            r#"{"a":1,"\u0061":2}"#,
        ] {
            assert!(
                matches!(
                    parse_strict(doc.as_bytes(), 32),
                    Err(JsonError::Ambiguous(_))
                ),
                "{doc}"
            );
        }
    }

    #[test]
    fn syntax_errors_and_depth() {
        for doc in [
            "{",
            "{\"a\":1} x",
            "\u{feff}{}",
            r#"{"a":"\ud800"}"#,
            "{'a':1}",
            "[1,]",
            "NaN",
        ] {
            assert!(
                matches!(parse_strict(doc.as_bytes(), 32), Err(JsonError::Syntax(_))),
                "{doc}"
            );
        }
        // Exactly `max_depth` containers are read; one more is refused.
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(parse_strict(nested(32).as_bytes(), 32).is_ok());
        assert!(parse_strict(nested(33).as_bytes(), 32).is_err());
        assert!(parse_strict(b"[[]]", 2).is_ok());
        assert!(parse_strict(b"[[[]]]", 2).is_err());
        assert!(parse_strict(nested(100_000).as_bytes(), 32).is_err());
        assert_eq!(
            parse_strict(br#"{"a":{"b":1}}"#, 3).unwrap(),
            json!({"a":{"b":1}})
        );
    }

    #[test]
    fn folding_matches_case_insensitive_parsers() {
        assert_eq!(fold_key("Amount"), fold_key("amount"));
        assert_eq!(fold_key("\u{212a}ey"), fold_key("key"));
        assert_eq!(fold_key("\u{3c2}"), fold_key("\u{3a3}")); // final sigma, capital sigma
        assert_ne!(fold_key("amount"), fold_key("amounts"));
        // Go folds İ to i (ToUpper(ToLower)), and ẞ with ß.
        assert_eq!(fold_key("ur\u{130}"), fold_key("uri"));
        assert_eq!(fold_key("\u{1e9e}"), fold_key("ss"));
        // Simple upper-casing the test below approximates: ᾀ's is ᾈ.
        assert_eq!(fold_key("\u{1f80}"), fold_key("\u{1f88}"));
    }

    /// Every character, folded as Go's `encoding/json` matches keys (simple upper-casing of the
    /// simple lower-casing, per character), lands where `fold_key` puts the character itself.
    #[test]
    fn fold_key_joins_everything_go_joins() {
        let single = |mut it: std::iter::Peekable<std::vec::IntoIter<char>>, c: char| {
            let first = it.next().unwrap_or(c);
            if it.peek().is_none() {
                first
            } else {
                c
            }
        };
        let simple_lower = |c: char| match c {
            '\u{130}' => 'i',
            c => single(
                c.to_lowercase().collect::<Vec<_>>().into_iter().peekable(),
                c,
            ),
        };
        let simple_upper = |c: char| {
            single(
                c.to_uppercase().collect::<Vec<_>>().into_iter().peekable(),
                c,
            )
        };
        for c in (0..=0x10ffff_u32).filter_map(char::from_u32) {
            let go = simple_upper(simple_lower(c));
            assert_eq!(
                fold_key(&c.to_string()),
                fold_key(&go.to_string()),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn misspelled_keys_are_found() {
        let object = json!({"Amount": 1, "note": "x"});
        let object = object.as_object().unwrap();
        assert_eq!(misspelled(object, ["amount", "note"]), Some("Amount"));
        assert_eq!(misspelled(object, ["note", "other"]), None);
    }
}
