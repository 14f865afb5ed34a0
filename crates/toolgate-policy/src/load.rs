//! Reading a policy directory: schema, `*.cedar` files, optional `entities.json`.
//! Every problem is reported as `file:line: message`, all of them at once.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{Policy, PolicyId, PolicySet, Schema, SchemaFragment, ValidationError};
use miette::Diagnostic;

use crate::validate::SlicedValidator;

pub const SCHEMA_FILE: &str = "schema.cedarschema";
pub const ENTITIES_FILE: &str = "entities.json";

/// One problem found while loading, at a place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Everything that was wrong with a policy directory.
#[derive(Debug, Clone, thiserror::Error)]
pub struct LoadError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl LoadError {
    fn one(file: &Path, line: usize, message: impl Into<String>) -> Self {
        LoadError {
            problems: vec![Problem {
                file: file.to_path_buf(),
                line,
                message: message.into(),
            }],
        }
    }
}

/// Where a policy came from, and what it grants when it determines an allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    pub file: PathBuf,
    pub line: usize,
    /// `@grants("a b")` annotation values, split on whitespace.
    pub grants: Vec<String>,
    /// `@mode("shadow")`: evaluated beside the enforced policies, never deciding.
    pub shadow: bool,
    /// `@reason("...")`: told to the agent when this policy determines a deny.
    pub reason: Option<String>,
    /// `@approval("...")` on a forbid: a person may lift its deny for one call.
    pub approval: Option<String>,
    /// `@rate_limit`: its deny is a limit reached (429, `Retry-After`), not a refusal.
    pub rate_limit: bool,
    /// The policy reads `context.approval` (which only `@approval` forbids are given).
    pub reads_approval: bool,
    /// A fingerprint of what the policy says (its Cedar text, annotations included): the audit
    /// records it, so a later reader can tell whether the policy changed since.
    pub version: String,
    /// Annotations toolgate does not read (a typo, or a feature it lacks): `check` says so.
    pub unread_annotations: Vec<String>,
}

/// The parsed (and, once validated, trusted) content of a policy directory.
pub struct Loaded {
    pub schema: Schema,
    pub schema_json: serde_json::Value,
    pub policies: PolicySet,
    pub sources: HashMap<PolicyId, PolicySource>,
    pub entities_json: Option<serde_json::Value>,
    pub entities_path: PathBuf,
}

/// Reads and strictly validates `dir`. Nothing partial is returned: any problem fails the load.
pub fn load_dir(dir: &Path) -> Result<Loaded, LoadError> {
    load_dir_cached(dir, &mut LoadCache::default())
}

/// What a previous load learned, so the next one only parses and validates what changed:
/// the schema (and its validation slices) by the hash of the schema files, each policy file
/// by the hash of its text. A schema change drops every cached file verdict.
#[derive(Default)]
pub struct LoadCache {
    schema: Option<CachedSchema>,
    files: HashMap<PathBuf, CachedFile>,
}

struct CachedSchema {
    hash: u64,
    schema: Schema,
    json: serde_json::Value,
    validator: Arc<SlicedValidator>,
}

#[derive(Clone)]
struct CachedFile {
    hash: u64,
    parsed: Vec<(Policy, PolicySource)>,
    problems: Vec<Problem>,
}

impl LoadCache {
    /// How many policy files the cache holds (for tests and metrics).
    pub fn cached_files(&self) -> usize {
        self.files.len()
    }
}

/// `load_dir`, reusing and refreshing `cache`.
pub fn load_dir_cached(dir: &Path, cache: &mut LoadCache) -> Result<Loaded, LoadError> {
    let schema_files = files_with_extension(dir, "cedarschema")?;
    let schema_texts: Vec<(PathBuf, String)> = schema_files
        .iter()
        .map(|p| read(p).map(|t| (p.clone(), t)))
        .collect::<Result<_, _>>()?;
    let schema_hash = hash_of(&schema_texts);
    if cache.schema.as_ref().map(|c| c.hash) != Some(schema_hash) {
        let (schema, json) = load_schema_texts(dir, &schema_texts)?;
        let validator = Arc::new(SlicedValidator::new(&schema, &json));
        cache.schema = Some(CachedSchema {
            hash: schema_hash,
            schema,
            json,
            validator,
        });
        cache.files.clear();
    }
    let cached_schema = cache.schema.as_ref().expect("set above");
    let (schema, schema_json) = (cached_schema.schema.clone(), cached_schema.json.clone());
    let validator = cached_schema.validator.clone();

    let mut problems = Vec::new();
    let mut texts = Vec::new();
    for path in files_with_extension(dir, "cedar")? {
        match read(&path) {
            Ok(text) => texts.push((path, text)),
            Err(e) => problems.extend(e.problems),
        }
    }
    let stale: Vec<&(PathBuf, String)> = texts
        .iter()
        .filter(|(path, text)| cache.files.get(path).map(|c| c.hash) != Some(hash_of(text)))
        .collect();
    let checked = check_files(&validator, &stale).map_err(|e| LoadError::one(dir, 0, e))?;
    for (path, file) in checked {
        cache.files.insert(path, file);
    }
    cache
        .files
        .retain(|path, _| texts.iter().any(|(p, _)| p == path));

    let mut policies = PolicySet::new();
    let mut sources = HashMap::new();
    for (path, _) in &texts {
        let Some(file) = cache.files.get(path) else {
            // Never a silent skip: a file without a verdict fails the load.
            problems.push(Problem {
                file: path.clone(),
                line: 0,
                message: "the file was not checked".into(),
            });
            continue;
        };
        problems.extend(file.problems.iter().cloned());
        for (policy, source) in &file.parsed {
            if sources.contains_key(policy.id()) {
                problems.push(Problem {
                    file: path.clone(),
                    line: source.line,
                    message: format!("duplicate policy id `{}`", policy.id()),
                });
                continue;
            }
            sources.insert(policy.id().clone(), source.clone());
            if let Err(e) = policies.add(policy.clone()) {
                problems.push(Problem {
                    file: path.clone(),
                    line: source.line,
                    message: e.to_string(),
                });
            }
        }
    }

    let entities_path = dir.join(ENTITIES_FILE);
    let entities_json = if entities_path.exists() {
        let text = read(&entities_path)?;
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => {
                if let Err(e) = cedar_policy::Entities::from_json_value(v.clone(), Some(&schema)) {
                    problems.push(Problem {
                        file: entities_path.clone(),
                        line: 1,
                        message: error_chain(&e),
                    });
                }
                Some(v)
            }
            Err(e) => {
                problems.push(Problem {
                    file: entities_path.clone(),
                    line: e.line(),
                    message: e.to_string(),
                });
                None
            }
        }
    } else {
        None
    };

    if !problems.is_empty() {
        return Err(LoadError { problems });
    }
    Ok(Loaded {
        schema,
        schema_json,
        policies,
        sources,
        entities_json,
        entities_path,
    })
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| LoadError::one(path, 0, format!("cannot read: {e}")))
}

fn files_with_extension(dir: &Path, extension: &str) -> Result<Vec<PathBuf>, LoadError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::one(dir, 0, format!("cannot read directory: {e}")))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == extension))
        .collect();
    files.sort();
    Ok(files)
}

/// Every `*.cedarschema` in the directory (`schema.cedarschema` and, say, fragments generated
/// by `toolgate schema mcp`), merged into one schema. Also returns the merged JSON form.
pub fn load_schema(dir: &Path) -> Result<(Schema, serde_json::Value), LoadError> {
    let texts: Vec<(PathBuf, String)> = files_with_extension(dir, "cedarschema")?
        .into_iter()
        .map(|p| read(&p).map(|t| (p, t)))
        .collect::<Result<_, _>>()?;
    load_schema_texts(dir, &texts)
}

fn load_schema_texts(
    dir: &Path,
    files: &[(PathBuf, String)],
) -> Result<(Schema, serde_json::Value), LoadError> {
    if files.is_empty() {
        return Err(LoadError::one(
            &dir.join(SCHEMA_FILE),
            0,
            "no schema: a policy directory needs *.cedarschema",
        ));
    }
    let mut fragments = Vec::new();
    let mut merged = serde_json::Map::new();
    let mut problems = Vec::new();
    for (path, text) in files {
        match parse_fragment(path, text) {
            Ok((fragment, json)) => {
                merge_namespaces(&mut merged, json);
                fragments.push(fragment);
            }
            Err(e) => problems.extend(e.problems),
        }
    }
    if !problems.is_empty() {
        return Err(LoadError { problems });
    }
    let schema = Schema::from_schema_fragments(fragments).map_err(|e| {
        LoadError::one(
            &files[0].0,
            1,
            format!("schema files do not fit together: {}", error_chain(&e)),
        )
    })?;
    Ok((schema, serde_json::Value::Object(merged)))
}

/// Parses and validates policy files on all cores; each file's verdict stands on its own
/// (validation is per policy), which is what makes it cacheable.
fn check_files(
    validator: &SlicedValidator,
    files: &[&(PathBuf, String)],
) -> Result<Vec<(PathBuf, CachedFile)>, String> {
    on_all_cores(files, |(path, text)| {
        (path.clone(), check_file(validator, path, text))
    })
}

/// `work` on every item, the items split across all cores, results in item order. A worker
/// that panics fails the whole run: a verdict that was never computed is never taken as clean.
pub(crate) fn on_all_cores<T: Sync, R: Send>(
    items: &[T],
    work: impl Fn(&T) -> R + Sync,
) -> Result<Vec<R>, String> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len().max(1));
    let chunk = items.len().div_ceil(workers).max(1);
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|chunk| scope.spawn(move || chunk.iter().map(work).collect::<Vec<R>>()))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for handle in handles {
            match handle.join() {
                Ok(results) => out.extend(results),
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    return Err(format!("a policy check worker failed: {why}"));
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
pub(crate) static PANIC_ON_FILE: std::sync::Mutex<Option<&'static str>> =
    std::sync::Mutex::new(None);

fn check_file(validator: &SlicedValidator, path: &Path, text: &str) -> CachedFile {
    #[cfg(test)]
    {
        let inject = *PANIC_ON_FILE.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            !inject.is_some_and(|name| path.ends_with(name)),
            "injected worker panic"
        );
    }
    let hash = hash_of(text);
    let parsed = match parse_policy_file(path, text) {
        Ok(parsed) => parsed,
        Err(e) => {
            return CachedFile {
                hash,
                parsed: Vec::new(),
                problems: e.problems,
            }
        }
    };
    let mut set = PolicySet::new();
    let mut sources = HashMap::new();
    for (policy, source) in &parsed {
        // A duplicate id inside the file is reported when the files are put together.
        if set.add(policy.clone()).is_ok() {
            sources.insert(policy.id().clone(), source.clone());
        }
    }
    let errors = validator.validate_serial(&set);
    let texts = HashMap::from([(path.to_path_buf(), text.to_string())]);
    CachedFile {
        hash,
        problems: validation_problems(&errors, &sources, &texts),
        parsed,
    }
}

fn hash_of<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Parses one file of the Cedar schema syntax, with its JSON form.
pub fn parse_fragment(
    path: &Path,
    text: &str,
) -> Result<(SchemaFragment, serde_json::Value), LoadError> {
    let fragment = SchemaFragment::from_cedarschema_str(text)
        .map(|(fragment, _warnings)| fragment)
        .map_err(|e| diagnostic_error(path, text, &e))?;
    let json = fragment
        .clone()
        .to_json_value()
        .map_err(|e| LoadError::one(path, 1, e.to_string()))?;
    Ok((fragment, json))
}

/// Adds one fragment's namespaces to `into`: entity types, actions and common types of the
/// same namespace go together, as Cedar merges them.
fn merge_namespaces(
    into: &mut serde_json::Map<String, serde_json::Value>,
    fragment: serde_json::Value,
) {
    let serde_json::Value::Object(namespaces) = fragment else {
        return;
    };
    for (ns, body) in namespaces {
        let target = into.entry(ns).or_insert_with(|| serde_json::json!({}));
        let (Some(target), serde_json::Value::Object(body)) = (target.as_object_mut(), body) else {
            continue;
        };
        for (section, items) in body {
            match (target.get_mut(&section), items) {
                (Some(serde_json::Value::Object(existing)), serde_json::Value::Object(items)) => {
                    existing.extend(items)
                }
                (_, items) => {
                    target.insert(section, items);
                }
            }
        }
    }
}

/// Splits one file into policies with stable ids: `@id("...")` or `<file stem>.<n>` (n from 0).
pub fn parse_policy_file(
    path: &Path,
    text: &str,
) -> Result<Vec<(Policy, PolicySource)>, LoadError> {
    let set = PolicySet::from_str(text).map_err(|e| diagnostic_error(path, text, &e))?;
    if let Some(template) = set.templates().next() {
        let line = text
            .find(&template.to_cedar())
            .map_or(1, |offset| line_of(text, offset));
        return Err(LoadError::one(
            path,
            line,
            "policy templates are not supported",
        ));
    }
    // `from_str` names policies policy0, policy1, ... in source order.
    let mut parsed: Vec<(usize, &Policy)> = set
        .policies()
        .map(|p| {
            let n = p
                .id()
                .to_string()
                .trim_start_matches("policy")
                .parse()
                .unwrap_or(usize::MAX);
            (n, p)
        })
        .collect();
    parsed.sort_by_key(|(n, _)| *n);

    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Walk the file once: each policy's text is found after the previous one, and lines are
    // counted only over the stretch between them.
    let (mut cursor, mut line) = (0, 1);
    let mut out = Vec::with_capacity(parsed.len());
    for (index, (_, policy)) in parsed.into_iter().enumerate() {
        let offset = policy
            .to_cedar()
            .and_then(|src| text[cursor..].find(&src).map(|at| cursor + at))
            .unwrap_or(cursor);
        line += text.as_bytes()[cursor..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        cursor = offset;
        // `annotation(key)` parses the key with Cedar's grammar on every call; iterate instead.
        let (mut id, mut grants, mut shadow, mut reason) = (None, Vec::new(), false, None);
        let mut approval = None;
        let mut rate_limit = false;
        let mut unread_annotations = Vec::new();
        for (key, value) in policy.annotations() {
            match key {
                "id" => id = Some(value.to_string()),
                "grants" => grants = value.split_whitespace().map(String::from).collect(),
                "reason" => reason = Some(value.to_string()),
                "approval" => approval = Some(value.to_string()),
                "rate_limit" => rate_limit = true,
                // A mistyped mode must not quietly enforce (or quietly not).
                "mode" => match value {
                    "enforce" => shadow = false,
                    "shadow" => shadow = true,
                    other => {
                        return Err(LoadError::one(
                            path,
                            line,
                            format!("@mode(\"{other}\"): a policy's mode is \"enforce\" (the default) or \"shadow\""),
                        ))
                    }
                },
                "doc" => {}
                other => unread_annotations.push(other.to_string()),
            }
        }
        let id = id.unwrap_or_else(|| format!("{stem}.{index}"));
        out.push((
            policy.new_id(PolicyId::new(id)),
            PolicySource {
                file: path.to_path_buf(),
                line,
                grants,
                shadow,
                reason,
                rate_limit,
                reads_approval: {
                    let text = policy.to_string();
                    text.contains("context.approval") || text.contains("has approval")
                },
                approval,
                version: policy_version(policy),
                unread_annotations,
            },
        ));
    }
    Ok(out)
}

/// The first 12 hex digits of the SHA-256 of the policy's Cedar text (as Cedar prints it, so
/// comments and spacing do not count).
pub fn policy_version(policy: &Policy) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(policy.to_string().as_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Validation errors as `file:line: message`, one per policy, kind and place: Cedar reports
/// one error per request environment (action), which reads as noise.
pub fn validation_problems(
    errors: &[ValidationError],
    sources: &HashMap<PolicyId, PolicySource>,
    texts: &HashMap<PathBuf, String>,
) -> Vec<Problem> {
    let mut seen = std::collections::HashSet::new();
    let mut problems: Vec<Problem> = errors
        .iter()
        .filter(|e| {
            seen.insert((
                e.policy_id().clone(),
                std::mem::discriminant(*e),
                first_label_offset(*e),
            ))
        })
        .map(|e| {
            let source = sources.get(e.policy_id());
            let text = source
                .and_then(|s| texts.get(&s.file))
                .map_or("", String::as_str);
            Problem {
                file: source.map(|s| s.file.clone()).unwrap_or_default(),
                line: first_label_offset(e)
                    .filter(|&o| o <= text.len() && !text.is_empty())
                    .map(|o| line_of(text, o))
                    .or_else(|| source.map(|s| s.line))
                    .unwrap_or(1),
                message: policy_message(e.policy_id(), &error_chain(e)),
            }
        })
        .collect();
    problems.sort_by(|a, b| (&a.file, a.line, &a.message).cmp(&(&b.file, b.line, &b.message)));
    problems
}

/// `policy `x`: …`, without the validator's own `for policy `x`, ` opening.
fn policy_message(id: &PolicyId, message: &str) -> String {
    let own = format!("for policy `{id}`, ");
    let message = message.strip_prefix(&own).unwrap_or(message);
    format!("policy `{id}`: {message}")
}

fn diagnostic_error(
    path: &Path,
    text: &str,
    e: &(dyn Diagnostic + Send + Sync + 'static),
) -> LoadError {
    let mut problems: Vec<Problem> = Vec::new();
    let mut push = |d: &dyn Diagnostic, fallback: String| {
        let offset = first_label_offset(d).map(|o| o.min(text.len()));
        let mut line = offset.map_or(1, |o| line_of(text, o));
        let mut message = fallback;
        if let Some(end) = offset.and_then(|o| unended_policy(text, o)) {
            message =
                format!("missing `;` at the end of this policy (the next starts on line {line})");
            line = end;
        }
        if let Some(help) = d.help() {
            message = format!("{message} ({help})");
        }
        problems.push(Problem {
            file: path.to_path_buf(),
            line,
            message,
        });
    };
    match e.related() {
        Some(related) => {
            let related: Vec<&dyn Diagnostic> = related.collect();
            if related.is_empty() {
                push(e, e.to_string());
            }
            for d in related {
                push(d, d.to_string());
            }
        }
        None => push(e, error_chain(e)),
    }
    LoadError { problems }
}

/// The line of a policy left without its `;`, when the parser stumbled on the start of the
/// next one (`@`, `permit`, `forbid`) at `offset`: the last line of code before it.
fn unended_policy(text: &str, offset: usize) -> Option<usize> {
    let mut start = offset;
    if text[offset..].starts_with('(') {
        // `permit (`: the parser reads the effect as a name and stumbles on the `(`.
        let word = text[..offset].trim_end();
        if word.ends_with("permit") || word.ends_with("forbid") {
            start = word.len() - "permit".len();
        }
    }
    let rest = &text[start..];
    if !["@", "permit", "forbid"]
        .iter()
        .any(|s| rest.starts_with(s))
    {
        return None;
    }
    let (index, last) = text[..start]
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let code = l.trim();
            !code.is_empty() && !code.starts_with("//")
        })
        .last()?;
    (!without_comment(last).trim_end().ends_with(';')).then_some(index + 1)
}

/// A line without its `//` comment (a `//` inside a string is kept).
fn without_comment(line: &str) -> &str {
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '/' if !in_string && line[i..].starts_with("//") => return &line[..i],
            _ => {}
        }
    }
    line
}

fn first_label_offset(d: &dyn Diagnostic) -> Option<usize> {
    d.labels()?.next().map(|l| l.offset())
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
