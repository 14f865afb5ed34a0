//! The arguments as decided (docs/security.md, invariant 1). One typed reading of what the
//! agent sent gives both what the policy reads and what the upstream receives: the forwarded
//! arguments are rendered from that reading, never passed through minus what a check caught.
//! What no policy could see (an undeclared argument) is refused, and so is a value the upstream
//! may read as something else than the policy did (JSON text in a string where the tool takes
//! other types).

use serde_json::{Map, Value};
use toolgate_mcp::json::fold_key;
use toolgate_policy::{described, ArgReads, AttrType, Record};

/// Why an argument is refused (400; MCP: invalid params, or a tool error for `tools/call`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgProblem {
    /// No policy can read it: the schema does not declare it.
    Undeclared,
    /// Its text may be read by the upstream as another value than the policy saw.
    Ambiguous,
    /// A policy reads it, and Cedar cannot hold it exactly (a decimal with 5 fraction digits).
    NotRepresentable,
    /// Not of its declared type (or a required one is null).
    Invalid,
}

impl ArgProblem {
    pub fn code(self) -> &'static str {
        match self {
            ArgProblem::Undeclared => "undeclared_argument",
            ArgProblem::Ambiguous => "ambiguous_argument",
            ArgProblem::NotRepresentable => "argument_not_representable",
            ArgProblem::Invalid => "invalid_argument",
        }
    }
}

/// An argument refused, by its path (`incident.body.type`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("argument `{argument}`: {detail}")]
pub struct ArgRefusal {
    pub problem: ArgProblem,
    pub argument: String,
    pub detail: String,
}

impl ArgRefusal {
    fn new(problem: ArgProblem, argument: &str, detail: impl Into<String>) -> Self {
        ArgRefusal {
            problem,
            argument: argument.to_string(),
            detail: detail.into(),
        }
    }
}

/// Where values come from: text (a path segment, a query or header value), typed here, or
/// JSON, whose own types must be the declared ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Text,
    Json,
}

/// An upstream's (or route's) word on arguments the schema does not declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Undeclared {
    /// 400 `undeclared_argument` (the default).
    #[default]
    Refuse,
    /// Forwarded as sent, unseen by any policy.
    Forward,
}

/// What a reading needs besides the values.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    pub undeclared: Undeclared,
    /// The arguments the action's policies read.
    pub reads: &'a ArgReads,
    /// Arguments declared `@json` (free-form).
    pub free_form: &'a std::collections::BTreeSet<String>,
    /// Arguments declared `@path`: refused unless in normal form.
    pub paths: &'a std::collections::BTreeSet<String>,
    /// Whether strings that hold JSON text are checked (MCP tools, whose SDKs may decode them),
    /// and against which input schema (`None`: not known, any other type counts).
    pub json_text: Option<Option<&'a Value>>,
}

/// The arguments of one source as the policy reads them and as the upstream receives them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rendered {
    pub policy: Map<String, Value>,
    pub forward: Map<String, Value>,
}

/// Reads `raw` against the declared record: every value typed as declared, or refused.
pub fn render(
    raw: Map<String, Value>,
    declared: &Record,
    origin: Origin,
    rules: &Rules<'_>,
) -> Result<Rendered, ArgRefusal> {
    render_record(raw, declared, origin, rules, "")
}

fn render_record(
    raw: Map<String, Value>,
    declared: &Record,
    origin: Origin,
    rules: &Rules<'_>,
    prefix: &str,
) -> Result<Rendered, ArgRefusal> {
    let mut out = Rendered::default();
    for (name, value) in raw {
        let path = join(prefix, &name);
        let Some((ty, required)) = declared.get(&name) else {
            match rules.undeclared {
                Undeclared::Refuse => {
                    return Err(ArgRefusal::new(
                        ArgProblem::Undeclared,
                        &path,
                        "is not declared in the schema, so no policy can see it",
                    ))
                }
                Undeclared::Forward => {
                    if let Some(declared_name) = shadowed(&name, declared) {
                        return Err(ArgRefusal::new(
                            ArgProblem::Ambiguous,
                            &path,
                            format!("is not declared, and an upstream may read it as declared `{declared_name}`"),
                        ));
                    }
                    out.forward.insert(name, value);
                    continue;
                }
            }
        };
        if value.is_null() {
            // Absent to the policy, and so absent upstream: a server may read `null` otherwise
            // than a missing argument (no default applied, "clear", "unlimited").
            if *required {
                return Err(ArgRefusal::new(ArgProblem::Invalid, &path, "is required"));
            }
            continue;
        }
        let (policy, forward) = render_value(value, ty, origin, rules, &path)?;
        out.policy.insert(name.clone(), policy);
        out.forward.insert(name, forward);
    }
    Ok(out)
}

/// The declared argument an undeclared name may stand for to some binder: the same name in
/// another case, or one structured under it (`a[0]`, `a[x]`, `a.b`: qs, Rails, PHP, Spring).
fn shadowed<'a>(name: &str, declared: &'a Record) -> Option<&'a str> {
    let root = fold_key(name.split(['[', '.']).next().unwrap_or_default());
    declared
        .keys()
        .find(|d| fold_key(d) == root)
        .map(String::as_str)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// One value: (as the policy reads it, as it is forwarded).
fn render_value(
    value: Value,
    ty: &AttrType,
    origin: Origin,
    rules: &Rules<'_>,
    path: &str,
) -> Result<(Value, Value), ArgRefusal> {
    if rules.free_form.contains(path) {
        return render_free_form(value, origin, rules, path);
    }
    match (ty, value) {
        (AttrType::Long, value) => render_long(value, origin, path),
        (AttrType::Bool, Value::Bool(b)) => Ok((Value::Bool(b), Value::Bool(b))),
        (AttrType::Bool, Value::String(s))
            if origin == Origin::Text && (s == "true" || s == "false") =>
        {
            Ok((Value::Bool(s == "true"), Value::String(s)))
        }
        (AttrType::String | AttrType::Entity(_), Value::String(s)) => {
            if origin == Origin::Json {
                check_json_text(&s, path, rules)?;
            }
            if rules.paths.contains(path) {
                check_normal_path(&s, path)?;
            }
            Ok((Value::String(s.clone()), Value::String(s)))
        }
        (AttrType::Set(element), value) if value.is_array() || origin == Origin::Text => {
            render_set(value, element, origin, rules, path)
        }
        (AttrType::Record(fields), Value::Object(raw)) if origin == Origin::Json => {
            // SDKs decode JSON text in a tool's own arguments, not in fields within them.
            let fields_rules = Rules {
                json_text: None,
                ..*rules
            };
            let inner = render_record(raw, fields, origin, &fields_rules, path)?;
            Ok((Value::Object(inner.policy), Value::Object(inner.forward)))
        }
        (AttrType::Extension(name), value) if name == "decimal" => {
            render_decimal(value, origin, rules, path)
        }
        (AttrType::Extension(_), Value::String(s)) => {
            Ok((Value::String(s.clone()), Value::String(s)))
        }
        (AttrType::Unreadable(name), _) => Err(ArgRefusal::new(
            ArgProblem::NotRepresentable,
            path,
            format!("its declared type {name} cannot be read by toolgate"),
        )),
        (ty, value) => {
            if let (Origin::Json, Value::String(text)) = (origin, &value) {
                // A list or number sent as its JSON text: say so, it is the likelier mistake.
                check_json_text(text, path, rules)?;
            }
            Err(invalid(path, type_name(ty), &value))
        }
    }
}

/// A free-form (`@json`) argument: the policy reads its canonical JSON text (keys sorted, no
/// spaces). From JSON the upstream gets the value as sent; from text (a query) the text must be
/// JSON, and the upstream gets the canonical text the policy read.
fn render_free_form(
    value: Value,
    origin: Origin,
    rules: &Rules<'_>,
    path: &str,
) -> Result<(Value, Value), ArgRefusal> {
    match (origin, value) {
        (Origin::Json, value) => {
            if let Value::String(text) = &value {
                // A free-form argument takes any type: JSON text in a string is ambiguous.
                check_json_text(text, path, rules)?;
            }
            Ok((Value::String(sorted(&value).to_string()), value))
        }
        (Origin::Text, Value::String(text)) => {
            let parsed: Value = serde_json::from_str(&text)
                .map_err(|_| invalid(path, "JSON text", &Value::String(text)))?;
            let canonical = Value::String(sorted(&parsed).to_string());
            Ok((canonical.clone(), canonical))
        }
        (Origin::Text, other) => Err(invalid(path, "JSON text", &other)),
    }
}

fn invalid(path: &str, want: &str, got: &Value) -> ArgRefusal {
    let detail = format!("expected {want}, got {}", described(got));
    ArgRefusal::new(ArgProblem::Invalid, path, detail)
}

/// A Long: a JSON integer, or an integer's text (forwarded as its canonical text).
fn render_long(value: Value, origin: Origin, path: &str) -> Result<(Value, Value), ArgRefusal> {
    let beyond = || {
        ArgRefusal::new(
            ArgProblem::NotRepresentable,
            path,
            "is beyond a Long's range",
        )
    };
    match value {
        Value::Number(n) if n.is_i64() => Ok((Value::Number(n.clone()), Value::Number(n))),
        // Beyond i64: a u64, or an integer literal too long for one (read as a double).
        Value::Number(n)
            if n.is_u64()
                || n.as_f64()
                    .is_some_and(|f| f.fract() == 0.0 && f.abs() >= 9.2e18) =>
        {
            Err(beyond())
        }
        Value::String(s) if origin == Origin::Text => match parse_long(&s) {
            Some(Ok(n)) => Ok((Value::from(n), Value::String(n.to_string()))),
            Some(Err(())) => Err(beyond()),
            None => Err(invalid(path, "an integer", &Value::String(s))),
        },
        other => Err(invalid(path, "an integer", &other)),
    }
}

/// A set: a JSON array, or from text a list (a repeated query name) or one value, a set of
/// one. In JSON a lone value is the upstream's to read (as a list of one, or not): refused.
fn render_set(
    value: Value,
    element: &AttrType,
    origin: Origin,
    rules: &Rules<'_>,
    path: &str,
) -> Result<(Value, Value), ArgRefusal> {
    let Value::Array(items) = value else {
        refuse_split_item(&value, origin, path)?;
        let (p, f) = render_value(value, element, origin, rules, path)?;
        return Ok((Value::Array(vec![p]), f));
    };
    // SDKs decode JSON text in an argument's own value, not in a list's items.
    let items_rules = Rules {
        json_text: None,
        ..*rules
    };
    let mut policy = Vec::with_capacity(items.len());
    let mut forward = Vec::with_capacity(items.len());
    for item in items {
        refuse_split_item(&item, origin, path)?;
        let (p, f) = render_value(item, element, origin, &items_rules, path)?;
        policy.push(p);
        forward.push(f);
    }
    Ok((Value::Array(policy), Value::Array(forward)))
}

/// A JSON value with every object's keys in sorted order.
pub(crate) fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), sorted(&fields[k])))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// An item of a list read from text (a query) holding a comma: Spring, and any API whose list
/// parameters are not exploded (`style: form, explode: false`), split it into several items the
/// policy never saw.
fn refuse_split_item(item: &Value, origin: Origin, path: &str) -> Result<(), ArgRefusal> {
    match item {
        Value::String(text) if origin == Origin::Text && text.contains(',') => Err(ArgRefusal::new(
            ArgProblem::Ambiguous,
            path,
            "is a list item holding a comma, which some servers split into several: repeat the parameter instead",
        )),
        _ => Ok(()),
    }
}

/// A decimal: Cedar holds 4 fraction digits. A value with more is refused where a policy reads
/// it; where none does, it is forwarded as sent and the policy's context holds it rounded to 4
/// digits (clamped to Cedar's range), which nothing compares.
fn render_decimal(
    value: Value,
    origin: Origin,
    rules: &Rules<'_>,
    path: &str,
) -> Result<(Value, Value), ArgRefusal> {
    let text = match &value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => {
            return Err(ArgRefusal::new(
                ArgProblem::Invalid,
                path,
                format!("expected a decimal number, got {}", described(other)),
            ))
        }
    };
    if origin == Origin::Json && value.is_string() {
        check_json_text(&text, path, rules)?;
    }
    let forward = match (&value, origin) {
        (Value::String(s), Origin::Text) => match Decimal::parse(s) {
            Some(d) => Value::String(d.plain()),
            None => value.clone(),
        },
        _ => value.clone(),
    };
    let Some(decimal) = Decimal::parse(&text) else {
        return Err(ArgRefusal::new(
            ArgProblem::Invalid,
            path,
            "expected a decimal number",
        ));
    };
    match decimal.cedar() {
        // The number as sent where Cedar reads its text alike (the audit shows it so).
        Some(_) if value.is_number() && !text.contains(['e', 'E']) => Ok((value, forward)),
        Some(exact) => Ok((Value::String(exact), forward)),
        None if rules.reads.reads(path) => Err(ArgRefusal::new(
            ArgProblem::NotRepresentable,
            path,
            "a policy compares it, and Cedar's decimal holds 4 fraction digits within ±922337203685477",
        )),
        None => Ok((Value::String(decimal.cedar_rounded()), forward)),
    }
}

/// A path in normal form: no `.` or `..` segment, no empty one but a leading or trailing `/`'s,
/// no backslash (a separator on Windows and to WHATWG parsers) and no NUL. Otherwise a policy's
/// `like "/public/*"` would admit `/public/../private`.
fn check_normal_path(text: &str, path: &str) -> Result<(), ArgRefusal> {
    let refuse = |why: &str| {
        Err(ArgRefusal::new(
            ArgProblem::Invalid,
            path,
            format!("is a path {why}: send it in normal form"),
        ))
    };
    if text.contains(['\\', '\0']) {
        return refuse("with a backslash or NUL");
    }
    // Servers that decode before normalising (nginx, Express static, WHATWG URLs) read `%2e%2e`
    // as `..`.
    let lower = text.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e)) {
        return refuse("with an escaped `.`, `/` or `\\`");
    }
    let segments: Vec<&str> = text.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        // Tomcat and Spring read `..;x` as `..`.
        match segment.split(';').next().unwrap_or_default() {
            "." | ".." => return refuse("with a `.` or `..` segment"),
            "" if i != 0 && i != last => return refuse("with an empty segment"),
            _ => {}
        }
    }
    Ok(())
}

/// A string whose text is JSON of another type the tool accepts at `path`: an SDK that decodes
/// such text (the Python SDK's `pre_parse_json`) would act on a value the policy never saw.
fn check_json_text(text: &str, path: &str, rules: &Rules<'_>) -> Result<(), ArgRefusal> {
    let Some(schema) = rules.json_text else {
        return Ok(());
    };
    let Some(kind) = json_kind_of_text(text) else {
        return Ok(());
    };
    let accepted = match schema {
        Some(schema) => schema_at(schema, path).is_none_or(|s| accepts(s, kind, 0)),
        None => true,
    };
    if accepted {
        return Err(ArgRefusal::new(
            ArgProblem::Ambiguous,
            path,
            format!("is a string holding JSON text of type {kind}, which the tool also accepts: send the {kind} itself, or text that is not JSON"),
        ));
    }
    Ok(())
}

/// The JSON type other than string that a decoder may read a string's text as. A list or an
/// object is told by its brackets, not by parsing: decoders differ on what they accept inside
/// (Python's takes lone surrogates, `NaN`, deeper nesting). A number or a boolean as JSON
/// reads it.
fn json_kind_of_text(text: &str) -> Option<&'static str> {
    // The white space JSON (and Python's `json.loads`) skips around a value.
    let trimmed = text.trim_matches([' ', '\t', '\n', '\r']);
    let kind = match (trimmed.chars().next()?, trimmed.chars().last()?) {
        ('[', ']') => "array",
        ('{', '}') => "object",
        _ if trimmed == "null" => "null",
        (first, _) if first == '-' || first.is_ascii_digit() || first == 't' || first == 'f' => {
            json_type(&serde_json::from_str::<Value>(trimmed).ok()?)
        }
        _ => return None,
    };
    (kind != "string").then_some(kind)
}

/// The JSON Schema of the property at `path` (`a.b`; a list on the way is stepped through to
/// its `items`).
fn schema_at<'a>(schema: &'a Value, path: &str) -> Option<&'a Value> {
    let mut here = schema;
    for name in path.split('.') {
        here = through_items(here);
        here = here.get("properties")?.get(name)?;
    }
    Some(here)
}

fn through_items(schema: &Value) -> &Value {
    let mut here = schema;
    for _ in 0..8 {
        match here.get("items") {
            Some(items) if here.get("type").and_then(Value::as_str) == Some("array") => {
                here = items
            }
            _ => break,
        }
    }
    here
}

/// Whether a JSON Schema admits a value of JSON type `kind`. A schema that says nothing of
/// types admits every type.
fn accepts(schema: &Value, kind: &str, depth: usize) -> bool {
    if depth > 16 {
        return true;
    }
    let Some(fields) = schema.as_object() else {
        return schema.as_bool().unwrap_or(true);
    };
    let mut said = false;
    let mut admits = false;
    if let Some(ty) = fields.get("type") {
        said = true;
        let names: Vec<&str> = match ty {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        admits |= names
            .iter()
            .any(|t| *t == kind || (*t == "number" && kind == "integer"));
    }
    for values in ["enum"].iter().filter_map(|k| fields.get(*k)?.as_array()) {
        said = true;
        admits |= values.iter().any(|v| json_type(v) == kind);
    }
    if let Some(constant) = fields.get("const") {
        said = true;
        admits |= json_type(constant) == kind;
    }
    for any in ["anyOf", "oneOf"] {
        if let Some(options) = fields.get(any).and_then(Value::as_array) {
            said = true;
            admits |= options.iter().any(|o| accepts(o, kind, depth + 1));
        }
    }
    !said || admits
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_name(ty: &AttrType) -> &'static str {
    match ty {
        AttrType::Long => "an integer",
        AttrType::Bool => "a boolean",
        AttrType::String => "a string",
        AttrType::Set(_) => "a JSON array",
        AttrType::Record(_) => "a JSON object",
        AttrType::Entity(_) => "an entity id (a string)",
        AttrType::Extension(_) => "a string",
        AttrType::Unreadable(_) => "a readable type",
    }
}

/// An integer as text: optional `-`, then digits. `None`: not one; `Some(Err)`: out of range.
fn parse_long(text: &str) -> Option<Result<i64, ()>> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse::<i64>().map_err(|_| ()))
}

/// Whether a number's text (as the agent wrote it) denotes exactly the number parsed from it:
/// then it may be forwarded as written (`1.50`, `2e-7`). A text with more digits than a double
/// holds is not: the policy read the double, and so must the upstream.
pub(crate) fn same_number(text: &str, parsed: &serde_json::Number) -> bool {
    match (Decimal::parse(text), Decimal::parse(&parsed.to_string())) {
        (Some(written), Some(read)) => written == read,
        _ => false,
    }
}

/// The largest decimal exponent read (a double's is 308), and the longest mantissa.
const MAX_EXPONENT: i64 = 400;
const MAX_MANTISSA: usize = 400;

/// A decimal number's exact value: sign, digits, and the position of the point.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    /// Significant digits, no leading zeros (empty for zero).
    digits: String,
    /// The value is `digits × 10^exponent`.
    exponent: i64,
}

impl Decimal {
    /// JSON number syntax (`-1.25e3`), as text.
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => {
                // JSON's exponent: an optional sign, then digits (`1e+-5` is no number).
                let exp = &rest[at + 1..];
                let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                (&rest[..at], exp.parse::<i64>().ok()?)
            }
            None => (rest, 0),
        };
        // Bounded, so the plain form (written out digit by digit) stays small; `checked_abs`:
        // `i64::MIN` has no absolute value.
        if exponent.checked_abs().is_none_or(|e| e > MAX_EXPONENT) || mantissa.len() > MAX_MANTISSA
        {
            return None;
        }
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digit = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digit(whole) || !digit(fraction) || mantissa.ends_with('.') {
            return None;
        }
        let all = format!("{whole}{fraction}");
        let trimmed = all.trim_start_matches('0');
        let mut digits = trimmed.trim_end_matches('0').to_string();
        let mut exponent = exponent - fraction.len() as i64 + (trimmed.len() - digits.len()) as i64;
        if digits.is_empty() {
            exponent = 0;
            digits.clear();
        }
        Some(Decimal {
            negative: negative && !digits.is_empty(),
            digits,
            exponent,
        })
    }

    /// The value written without an exponent.
    fn plain(&self) -> String {
        if self.digits.is_empty() {
            return "0".into();
        }
        let sign = if self.negative { "-" } else { "" };
        if self.exponent >= 0 {
            return format!(
                "{sign}{}{}",
                self.digits,
                "0".repeat(self.exponent as usize)
            );
        }
        let point = self.digits.len() as i64 + self.exponent;
        if point > 0 {
            let (whole, fraction) = self.digits.split_at(point as usize);
            format!("{sign}{whole}.{fraction}")
        } else {
            format!("{sign}0.{}{}", "0".repeat((-point) as usize), self.digits)
        }
    }

    /// Cedar's `decimal` text, when it holds this value exactly.
    fn cedar(&self) -> Option<String> {
        if self.exponent < -4 {
            return None;
        }
        self.within_range().then(|| self.cedar_text())
    }

    fn within_range(&self) -> bool {
        // Cedar stores value × 10^4 in an i64.
        let whole_digits = self.digits.len() as i64 + self.exponent;
        if whole_digits > 15 {
            return false;
        }
        let plain = self.plain();
        let whole = plain
            .trim_start_matches('-')
            .split('.')
            .next()
            .unwrap_or("0");
        whole.parse::<i64>().is_ok_and(|w| w <= 922_337_203_685_476)
    }

    fn cedar_text(&self) -> String {
        let plain = self.plain();
        if plain.contains('.') {
            plain
        } else {
            format!("{plain}.0")
        }
    }

    /// Rounded half away from zero to 4 digits, and clamped to Cedar's range: the stand-in for
    /// a value no policy reads.
    fn cedar_rounded(&self) -> String {
        if !self.within_range() {
            let sign = if self.negative { "-" } else { "" };
            return format!("{sign}922337203685476.0");
        }
        if self.exponent >= -4 {
            return self.cedar_text();
        }
        let cut = (self.digits.len() as i64 + self.exponent + 4).max(0) as usize;
        let kept: String = self.digits.chars().take(cut).collect();
        let round_up = self.digits.as_bytes().get(cut).is_some_and(|d| *d >= b'5');
        let mut scaled: u128 = if kept.is_empty() {
            0
        } else {
            kept.parse().unwrap_or(0)
        };
        if round_up {
            scaled += 1;
        }
        let sign = if self.negative && scaled > 0 { "-" } else { "" };
        format!("{sign}{}.{:04}", scaled / 10_000, scaled % 10_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeSet;

    fn record(fields: &[(&str, AttrType, bool)]) -> Record {
        fields
            .iter()
            .map(|(n, t, r)| (n.to_string(), (t.clone(), *r)))
            .collect()
    }

    fn rules<'a>(reads: &'a ArgReads, free: &'a BTreeSet<String>) -> Rules<'a> {
        Rules {
            undeclared: Undeclared::Refuse,
            reads,
            free_form: free,
            paths: free,
            json_text: None,
        }
    }

    #[test]
    fn paths_must_be_in_normal_form() {
        let declared = record(&[("file", AttrType::String, true)]);
        let reads = ArgReads::All;
        let marked = BTreeSet::from(["file".to_string()]);
        let rules = Rules {
            free_form: &NO_NAMES,
            ..rules(&reads, &marked)
        };
        for (file, ok) in [
            ("/public/a.txt", true),
            ("public/a.txt", true),
            ("/public/dir/", true),
            ("/public/../private/s.txt", false),
            ("public/../private", false),
            ("./x", false),
            ("/public//x", false),
            ("/public/..", false),
            ("c:\\x", false),
            ("/public/%2e%2e/private/s.txt", false),
            ("/public/%2E./private", false),
            ("/public/..;/private", false),
            ("/public/a;v=1/b", true),
        ] {
            let raw = obj(json!({ "file": file }));
            assert_eq!(
                render(raw, &declared, Origin::Json, &rules).is_ok(),
                ok,
                "{file}"
            );
        }
    }

    static NO_NAMES: BTreeSet<String> = BTreeSet::new();

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn undeclared_arguments_are_refused_at_any_depth_unless_forwarded() {
        let declared = record(&[
            ("amount", AttrType::Long, true),
            (
                "incident",
                AttrType::Record(record(&[("title", AttrType::String, true)])),
                true,
            ),
        ]);
        let (reads, free) = (ArgReads::All, BTreeSet::new());
        for (raw, name) in [
            (json!({"amount": 1, "dest": "x"}), "dest"),
            (json!({"amount": 1, "Amount": 2}), "Amount"),
            (
                json!({"amount": 1, "incident": {"title": "t", "type": "x"}}),
                "incident.type",
            ),
        ] {
            let err = render(obj(raw), &declared, Origin::Json, &rules(&reads, &free)).unwrap_err();
            assert_eq!(
                (err.problem, err.argument.as_str()),
                (ArgProblem::Undeclared, name)
            );
        }
        let forward = Rules {
            undeclared: Undeclared::Forward,
            ..rules(&reads, &free)
        };
        let out = render(
            obj(json!({"amount": 1, "dest": "x"})),
            &declared,
            Origin::Json,
            &forward,
        )
        .unwrap();
        // Forwarded unseen, but never as a name a binder reads as a declared one.
        for shadow in ["Amount", "amount[0]", "amount.x"] {
            let raw = obj(json!({"amount": 1, shadow: 900}));
            let err = render(raw, &declared, Origin::Json, &forward).unwrap_err();
            assert_eq!(
                (err.problem, err.argument.as_str()),
                (ArgProblem::Ambiguous, shadow)
            );
        }
        assert_eq!(out.policy, obj(json!({"amount": 1})));
        assert_eq!(out.forward, obj(json!({"amount": 1, "dest": "x"})));
    }

    #[test]
    fn values_are_typed_from_text_and_rendered_back_canonically() {
        let declared = record(&[
            ("id", AttrType::Long, true),
            ("tags", AttrType::Set(Box::new(AttrType::String)), false),
            ("on", AttrType::Bool, false),
            ("rate", AttrType::Extension("decimal".into()), false),
        ]);
        let (reads, free) = (ArgReads::All, BTreeSet::new());
        let out = render(
            obj(json!({"id": "042", "tags": "a", "on": "true", "rate": "1.50"})),
            &declared,
            Origin::Text,
            &rules(&reads, &free),
        )
        .unwrap();
        assert_eq!(
            out.policy,
            obj(json!({"id": 42, "tags": ["a"], "on": true, "rate": "1.5"}))
        );
        assert_eq!(
            out.forward,
            obj(json!({"id": "42", "tags": "a", "on": "true", "rate": "1.5"}))
        );
        for (raw, problem) in [
            (json!({"tags": "open,deleted"}), ArgProblem::Ambiguous),
            (json!({"tags": ["open", "a,b"]}), ArgProblem::Ambiguous),
            (json!({"id": "4 2"}), ArgProblem::Invalid),
            (json!({"id": "+42"}), ArgProblem::Invalid),
            (
                json!({"id": "99999999999999999999"}),
                ArgProblem::NotRepresentable,
            ),
        ] {
            let err = render(obj(raw), &declared, Origin::Text, &rules(&reads, &free)).unwrap_err();
            assert_eq!(err.problem, problem);
        }
    }

    #[test]
    fn json_values_must_have_their_declared_json_types() {
        let declared = record(&[
            ("to", AttrType::Set(Box::new(AttrType::String)), true),
            ("n", AttrType::Long, false),
            ("owner", AttrType::String, false),
        ]);
        let (reads, free) = (ArgReads::All, BTreeSet::new());
        for raw in [
            json!({"to": "ceo@corp.example"}),
            json!({"to": ["a"], "n": "5"}),
            json!({"to": ["a"], "n": 1.5}),
            json!({"to": ["a"], "owner": 5}),
            json!({"to": null}),
        ] {
            let err = render(
                obj(raw.clone()),
                &declared,
                Origin::Json,
                &rules(&reads, &free),
            )
            .unwrap_err();
            assert_eq!(err.problem, ArgProblem::Invalid, "{raw}");
        }
        let out = render(
            obj(json!({"to": ["a"], "owner": null})),
            &declared,
            Origin::Json,
            &rules(&reads, &free),
        )
        .unwrap();
        assert_eq!(out.policy, obj(json!({"to": ["a"]})));
        assert_eq!(out.forward, obj(json!({"to": ["a"]})));
    }

    #[test]
    fn json_text_in_a_string_is_ambiguous_where_the_tool_takes_that_type() {
        let declared = record(&[
            ("to", AttrType::Set(Box::new(AttrType::String)), false),
            ("owner", AttrType::String, false),
            ("zip", AttrType::String, false),
        ]);
        let (reads, free) = (ArgReads::All, BTreeSet::new());
        let schema = json!({"type": "object", "properties": {
            "to": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]},
            "owner": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "zip": {"type": "string"},
        }});
        let known = Rules {
            json_text: Some(Some(&schema)),
            ..rules(&reads, &free)
        };
        let unknown = Rules {
            json_text: Some(None),
            ..rules(&reads, &free)
        };
        for (raw, rules, refused) in [
            (json!({"to": "[\"ceo@corp.example\"]"}), &known, true),
            (json!({"owner": "null"}), &known, true),
            (json!({"zip": "12345"}), &known, false),
            (json!({"zip": "12345"}), &unknown, true),
            (json!({"owner": "alice"}), &unknown, false),
            (json!({"owner": "[not json"}), &unknown, false),
            (json!({"to": ["[1]"]}), &known, false),
            // Python reads a lone surrogate or NaN in a list that serde refuses.
            (
                json!({"to": " [\"ceo@corp.example\", \"\\ud800\"] "}),
                &known,
                true,
            ),
            (json!({"to": "[NaN]"}), &unknown, true),
            (json!({"owner": "[WIP] draft"}), &unknown, false),
            (json!({"owner": "{name}"}), &known, false),
            (json!({"owner": "true"}), &unknown, true),
        ] {
            let result = render(obj(raw.clone()), &declared, Origin::Json, rules);
            assert_eq!(
                result
                    .err()
                    .map(|e| e.problem == ArgProblem::Ambiguous)
                    .unwrap_or(false),
                refused,
                "{raw}"
            );
        }
    }

    #[test]
    fn decimals_beyond_cedar_are_refused_only_where_a_policy_reads_them() {
        let declared = record(&[
            ("duration", AttrType::Extension("decimal".into()), true),
            ("rate", AttrType::Extension("decimal".into()), false),
        ]);
        let reads = ArgReads::Paths(BTreeSet::from(["rate".to_string()]));
        let free = BTreeSet::new();
        let out = render(
            obj(json!({"duration": 0.12345, "rate": 1.5})),
            &declared,
            Origin::Json,
            &rules(&reads, &free),
        )
        .unwrap();
        assert_eq!(out.forward["duration"], json!(0.12345));
        assert_eq!(out.policy["duration"], json!("0.1235"));
        assert_eq!(out.policy["rate"], json!(1.5));
        let err = render(
            obj(json!({"duration": 1, "rate": 0.00001})),
            &declared,
            Origin::Json,
            &rules(&reads, &free),
        )
        .unwrap_err();
        assert_eq!(
            (err.problem, err.argument.as_str()),
            (ArgProblem::NotRepresentable, "rate")
        );
    }

    #[test]
    fn a_number_goes_as_written_only_where_it_is_exactly_the_value_read() {
        let number = |text: &str| serde_json::from_str::<serde_json::Number>(text).unwrap();
        for (written, parsed, same) in [
            ("1.50", "1.5", true),
            ("2e-7", "2e-7", true),
            ("-2.50e3", "-2500.0", true),
            ("1500000000000000100", "1500000000000000000", false),
            ("-1e-330", "-0.0", false),
            ("0.99999999999999999999", "1.0", false),
            ("0.123456789012345678901", "0.12345678901234568", false),
        ] {
            assert_eq!(same_number(written, &number(parsed)), same, "{written}");
        }
    }

    #[test]
    fn decimal_text_is_read_exactly() {
        for (text, plain, cedar, rounded) in [
            ("1", "1", Some("1.0"), "1.0"),
            ("-0.5", "-0.5", Some("-0.5"), "-0.5"),
            ("1.50", "1.5", Some("1.5"), "1.5"),
            ("1e2", "100", Some("100.0"), "100.0"),
            ("1.5E-3", "0.0015", Some("0.0015"), "0.0015"),
            ("0.12345", "0.12345", None, "0.1235"),
            ("-0.00004", "-0.00004", None, "0.0000"),
            ("9.99995", "9.99995", None, "10.0000"),
            ("1e20", "100000000000000000000", None, "922337203685476.0"),
        ] {
            let d = Decimal::parse(text).unwrap();
            assert_eq!(d.plain(), plain, "{text}");
            assert_eq!(d.cedar().as_deref(), cedar, "{text}");
            assert_eq!(d.cedar_rounded(), rounded, "{text}");
        }
        let long = "1".repeat(MAX_MANTISSA + 1);
        for bad in [
            "",
            "-",
            "1.",
            ".5",
            "1e",
            "0x1",
            "1.2.3",
            "1e99999",
            "1e-9223372036854775808",
            "1.5e-9223372036854775808",
            "1e+-5",
            "1e++5",
            &long,
        ] {
            assert!(Decimal::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn free_form_objects_are_read_as_their_canonical_text() {
        let declared = record(&[("metadata", AttrType::String, false)]);
        let reads = ArgReads::All;
        let free = BTreeSet::from(["metadata".to_string()]);
        let out = render(
            obj(json!({"metadata": {"b": [1, {"d": 1, "c": 2}], "a": "x"}})),
            &declared,
            Origin::Json,
            &rules(&reads, &free),
        )
        .unwrap();
        assert_eq!(
            out.policy["metadata"],
            json!("{\"a\":\"x\",\"b\":[1,{\"c\":2,\"d\":1}]}")
        );
        assert_eq!(
            out.forward["metadata"],
            json!({"b": [1, {"d": 1, "c": 2}], "a": "x"})
        );
        // From a query: the text must be JSON, and is forwarded as the canonical text.
        let text = obj(json!({"metadata": "{\"env\" : \"prod\"}"}));
        let out = render(text, &declared, Origin::Text, &rules(&reads, &free)).unwrap();
        assert_eq!(out.policy["metadata"], json!("{\"env\":\"prod\"}"));
        assert_eq!(out.forward["metadata"], json!("{\"env\":\"prod\"}"));
        let bad = obj(json!({"metadata": "{oops"}));
        assert!(render(bad, &declared, Origin::Text, &rules(&reads, &free)).is_err());
    }
}
