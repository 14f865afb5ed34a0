//! Reading a policy directory: schema, `*.cedar` files, optional `entities.json`.
//! Every problem is reported as `file:line: message`, all of them at once.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Policy, PolicyId, PolicySet, Schema, SchemaFragment, ValidationMode, Validator,
};
use miette::Diagnostic;

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
    let (schema, schema_json) = load_schema(dir)?;
    let files = files_with_extension(dir, "cedar")?;

    let mut problems = Vec::new();
    let mut policies = PolicySet::new();
    let mut sources = HashMap::new();
    let validator = Validator::new(schema.clone());
    for path in &files {
        let text = match read(path) {
            Ok(t) => t,
            Err(e) => {
                problems.extend(e.problems);
                continue;
            }
        };
        match parse_policy_file(path, &text) {
            Ok(parsed) => {
                problems.extend(validate_file(&validator, path, &text, &parsed));
                for (policy, source) in parsed {
                    let line = source.line;
                    if sources.contains_key(policy.id()) {
                        problems.push(Problem {
                            file: path.clone(),
                            line,
                            message: format!("duplicate policy id `{}`", policy.id()),
                        });
                        continue;
                    }
                    sources.insert(policy.id().clone(), source);
                    if let Err(e) = policies.add(policy) {
                        problems.push(Problem {
                            file: path.clone(),
                            line,
                            message: e.to_string(),
                        });
                    }
                }
            }
            Err(e) => problems.extend(e.problems),
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
    let files = files_with_extension(dir, "cedarschema")?;
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
    for path in &files {
        let parsed = read(path).and_then(|text| parse_fragment(path, &text));
        match parsed {
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
            &files[0],
            1,
            format!("schema files do not fit together: {}", error_chain(&e)),
        )
    })?;
    Ok((schema, serde_json::Value::Object(merged)))
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
    let mut cursor = 0;
    let mut out = Vec::with_capacity(parsed.len());
    for (index, (_, policy)) in parsed.into_iter().enumerate() {
        let offset = policy
            .to_cedar()
            .and_then(|src| text[cursor..].find(&src).map(|at| cursor + at))
            .unwrap_or(cursor);
        cursor = offset;
        let id = match policy.annotation("id") {
            Some(id) => id.to_string(),
            None => format!("{stem}.{index}"),
        };
        let grants = policy
            .annotation("grants")
            .map(|g| g.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        out.push((
            policy.new_id(PolicyId::new(id)),
            PolicySource {
                file: path.to_path_buf(),
                line: line_of(text, offset),
                grants,
            },
        ));
    }
    Ok(out)
}

/// Strict validation of one file's policies against the schema.
pub fn validate_file(
    validator: &Validator,
    path: &Path,
    text: &str,
    parsed: &[(Policy, PolicySource)],
) -> Vec<Problem> {
    let mut set = PolicySet::new();
    let mut lines = HashMap::new();
    for (policy, source) in parsed {
        lines.insert(policy.id().clone(), source.line);
        // A duplicate id is reported by the caller; validate the first one.
        let _ = set.add(policy.clone());
    }
    let result = validator.validate(&set, ValidationMode::Strict);
    // Cedar reports one error per request environment (action); one per kind and place reads better.
    let mut seen = std::collections::HashSet::new();
    result
        .validation_errors()
        .filter(|e| {
            seen.insert((
                e.policy_id().clone(),
                std::mem::discriminant(*e),
                first_label_offset(*e),
            ))
        })
        .map(|e| Problem {
            file: path.to_path_buf(),
            line: first_label_offset(e)
                .filter(|&o| o <= text.len())
                .map(|o| line_of(text, o))
                .or_else(|| lines.get(e.policy_id()).copied())
                .unwrap_or(1),
            message: format!("policy `{}`: {}", e.policy_id(), error_chain(e)),
        })
        .collect()
}

fn diagnostic_error(
    path: &Path,
    text: &str,
    e: &(dyn Diagnostic + Send + Sync + 'static),
) -> LoadError {
    let mut problems: Vec<Problem> = Vec::new();
    let mut push = |d: &dyn Diagnostic, fallback: String| {
        let line = first_label_offset(d).map_or(1, |o| line_of(text, o.min(text.len())));
        let mut message = fallback;
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
