//! `toolgate audit why` and `toolgate audit report`: reading the audit log back. Both stream
//! the file (one line at a time, each parsed into only the fields they read).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use toolgate_gateway::Config;
use toolgate_policy::PolicyEngine;

use crate::audit_suggest::{suggestions, Allowed, Context as SuggestContext, Suggestion};
use crate::cedar_types::printable;

/// The fields of an audit line these commands read; the rest is skipped unparsed.
#[derive(Deserialize)]
struct Line {
    decision_id: String,
    time: String,
    agent: Option<String>,
    user: Option<String>,
    iss: Option<String>,
    action: Option<String>,
    args: Option<Map<String, Value>>,
    decision: String,
    #[serde(default)]
    policies: Vec<String>,
    #[serde(default)]
    policy_versions: BTreeMap<String, String>,
    #[serde(default)]
    errors: Vec<String>,
    task_id: Option<String>,
    intent: Option<String>,
    jti: Option<String>,
    credential_mode: Option<String>,
    credential_id: Option<String>,
    credential_exp: Option<u64>,
    upstream_status: Option<u16>,
    shadow_decision: Option<String>,
    #[serde(default)]
    shadow_policies: Vec<String>,
    #[serde(default)]
    method: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    status: u16,
    approval_id: Option<String>,
    approval_step: Option<String>,
    /// An operator's decision: who, and the note.
    approval: Option<Value>,
}

impl Line {
    /// A decision on a call to a tool (`<upstream>/<tool>`), not the gateway's own endpoints.
    fn is_tool_call(&self) -> bool {
        self.action
            .as_deref()
            .is_some_and(|a| a.contains('/') && !a.starts_with("mcp:"))
    }
}

/// Reads the audit file line by line; `visit` sees each line that parses (others are counted).
fn each_line(path: &Path, mut visit: impl FnMut(Line)) -> Result<usize, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut bytes = Vec::new();
    let mut unreadable = 0;
    loop {
        bytes.clear();
        // Bytes, not text: a torn or foreign line is counted, and the rest still read.
        let read = reader
            .read_until(b'\n', &mut bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if read == 0 {
            return Ok(unreadable);
        }
        match serde_json::from_slice::<Line>(&bytes) {
            Ok(line) => visit(line),
            Err(_) if bytes.trim_ascii().is_empty() => {}
            Err(_) => unreadable += 1,
        }
    }
}

/// What the audit says of a task: who started it, why, and when it ended.
#[derive(Default)]
struct TaskStory {
    started: Option<(String, String, Option<String>)>,
    ended: Option<(String, String)>,
}

pub fn why(
    id: &str,
    audit: &Path,
    config: Option<&Path>,
    admin: Option<&str>,
) -> Result<ExitCode, String> {
    let mut found = Vec::new();
    let mut tasks: HashMap<String, TaskStory> = HashMap::new();
    let mut approvals: HashMap<String, Vec<String>> = HashMap::new();
    each_line(audit, |line| {
        if let (Some(approval), Some(step)) = (&line.approval_id, &line.approval_step) {
            approvals
                .entry(approval.clone())
                .or_default()
                .push(approval_step(&line, step));
        }
        if let Some(task) = &line.task_id {
            let ok = (200..300).contains(&line.status);
            match line.action.as_deref() {
                Some("start_task") if ok => {
                    tasks.entry(task.clone()).or_default().started = Some((
                        line.time.clone(),
                        line.agent.clone().unwrap_or_default(),
                        line.intent.clone(),
                    ));
                }
                Some(end @ ("complete_task" | "cancel_task")) if ok => {
                    let state = if end == "complete_task" {
                        "completed"
                    } else {
                        "cancelled"
                    };
                    tasks.entry(task.clone()).or_default().ended =
                        Some((line.time.clone(), state.to_string()));
                }
                _ => {}
            }
        }
        let named = line.decision_id == id
            || line.jti.as_deref() == Some(id)
            || line.credential_id.as_deref() == Some(id);
        if named {
            found.push(line);
        }
    })?;
    // A batch's credential covers each message's decision: those, not the request's line.
    if found.iter().any(Line::is_tool_call) {
        found.retain(Line::is_tool_call);
    }
    if found.is_empty() {
        return Err(format!(
            "{id}: no decision or credential with this id in {}",
            audit.display()
        ));
    }
    let current = match config {
        Some(path) => {
            let config = Config::load(path)?;
            let engine = PolicyEngine::load(&config.policies).map_err(|e| e.to_string())?;
            Some((config, engine))
        }
        None => None,
    };
    let now = Utc::now();
    for line in &found {
        let mut out = String::new();
        // Agents name tools and arguments: what is printed holds no terminal control.
        let mut say = |key: &str, value: String| {
            out.push_str(&format!("  {key:<11} {}\n", printable(&value)))
        };
        println!(
            "decision {} at {}",
            printable(&line.decision_id),
            printable(&line.time)
        );
        let mut who = format!(
            "agent {}",
            line.agent.as_deref().unwrap_or("(unauthenticated)")
        );
        if let Some(user) = &line.user {
            who.push_str(&format!(", on behalf of user {user}"));
        }
        if let Some(iss) = &line.iss {
            who.push_str(&format!(", token from {iss}"));
        }
        say("who:", who);
        say(
            "what:",
            format!(
                "{} ({} {})",
                line.action.as_deref().unwrap_or("-"),
                line.method,
                line.path
            ),
        );
        if let Some(args) = &line.args {
            say("arguments:", Value::Object(args.clone()).to_string());
        }
        let mut decided = format!("{}, answered {}", line.decision, line.status);
        if let Some(status) = line.upstream_status {
            decided.push_str(&format!(" (upstream {status})"));
        }
        say("decision:", decided);
        for (n, policy) in line.policies.iter().enumerate() {
            let recorded = line.policy_versions.get(policy);
            let place = match &current {
                None => "(give --config to locate it)".to_string(),
                Some((_, engine)) => match engine.source(policy) {
                    None => "no longer in the policy set".to_string(),
                    Some(source) => {
                        let note = match recorded {
                            Some(v) if *v == source.version => "unchanged since",
                            Some(_) => "CHANGED since this decision",
                            None => "no version recorded",
                        };
                        format!("{}:{} ({note})", source.file.display(), source.line)
                    }
                },
            };
            say(
                if n == 0 { "policies:" } else { "" },
                format!("{policy} at {place}"),
            );
        }
        if line.policies.is_empty() {
            let why = if line.decision == "deny" && line.errors.is_empty() {
                "none (no policy permits: default deny)".to_string()
            } else {
                "none".to_string()
            };
            say("policies:", why);
        }
        for error in &line.errors {
            say("error:", error.clone());
        }
        if let Some(shadow) = &line.shadow_decision {
            say(
                "shadow:",
                format!(
                    "would have been {shadow} by {}",
                    line.shadow_policies.join(", ")
                ),
            );
        }
        if let Some(approval) = &line.approval_id {
            let steps = approvals.get(approval).map(|s| s.join(", "));
            say(
                "approval:",
                format!("{approval}: {}", steps.unwrap_or_default()),
            );
        }
        let story = line.task_id.as_ref().and_then(|t| tasks.get(t));
        if let Some(task) = &line.task_id {
            let mut text = task.clone();
            if let Some((at, agent, intent)) = story.and_then(|s| s.started.as_ref()) {
                if let Some(intent) = intent {
                    text.push_str(&format!(", intent {intent:?}"));
                }
                text.push_str(&format!(", started {at} by {agent}"));
            }
            if let Some((at, state)) = story.and_then(|s| s.ended.as_ref()) {
                text.push_str(&format!(", {state} {at}"));
            }
            say("task:", text);
        }
        let ended_in_audit = story.and_then(|s| s.ended.clone());
        let has_credential = line.credential_exp.is_some();
        let ended_now = match (admin, &line.task_id, &current) {
            (Some(_), _, None) => {
                return Err("--admin needs --config (its admin_token_file)".into())
            }
            // One line's question failing does not stop the others.
            (Some(url), Some(task), Some((config, _))) if has_credential => {
                admin_task_ended(url, config, task)
                    .unwrap_or_else(|e| Some(format!("not known: {e}")))
            }
            _ => None,
        };
        say(
            "credential:",
            credential(line, now, ended_in_audit, ended_now, admin.is_some()),
        );
        print!("{out}");
    }
    Ok(ExitCode::SUCCESS)
}

/// One step of a call's approval as the audit tells it: asked for, decided (by whom, with
/// which note), used.
fn approval_step(line: &Line, step: &str) -> String {
    let by = line
        .approval
        .as_ref()
        .and_then(|a| a.get("approver"))
        .and_then(Value::as_str);
    let note = line
        .approval
        .as_ref()
        .and_then(|a| a.get("note"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    let mut text = format!("{step} {}", line.time);
    if let Some(by) = by {
        text.push_str(&format!(" by {by}"));
    }
    if let Some(note) = note {
        text.push_str(&format!(" ({note:?})"));
    }
    text
}

/// What revocation means for a token an upstream verifies by itself.
const SIGNATURE_ONLY: &str =
    "; introspection says inactive, but an upstream that only checks its signature takes it until";

/// The credential's id and mode, and whether it is still live.
fn credential(
    line: &Line,
    now: DateTime<Utc>,
    ended_in_audit: Option<(String, String)>,
    ended_now: Option<String>,
    asked_admin: bool,
) -> String {
    let Some(id) = line.credential_id.as_deref().or(line.jti.as_deref()) else {
        return "none (nothing was forwarded)".to_string();
    };
    let mode = line.credential_mode.as_deref().unwrap_or("mint");
    let head = format!("{id} ({mode})");
    let Some(exp) = line.credential_exp else {
        return format!("{head}: its lifetime is its issuer's, not toolgate's");
    };
    let expires = DateTime::<Utc>::from_timestamp(exp as i64, 0)
        .map_or_else(|| exp.to_string(), |t| t.to_rfc3339());
    let live = if (exp as i64) <= now.timestamp() {
        format!("not live: expired {expires}")
    } else if let Some(state) = ended_now.as_deref().filter(|s| !s.starts_with("not known")) {
        format!("not live: revoked, its task is {state} (admin listener){SIGNATURE_ONLY} {expires}")
    } else if let Some((at, state)) = ended_in_audit {
        format!("not live: revoked when its task was {state} at {at}{SIGNATURE_ONLY} {expires}")
    } else if let Some(unknown) = ended_now {
        format!("live until {expires} unless its task has ended (the admin listener: {unknown})")
    } else if line.task_id.is_some() && !asked_admin {
        format!("live until {expires}, unless its task has ended since (--admin asks)")
    } else {
        format!("live until {expires}")
    };
    format!("{head}: {live}")
}

/// The task's state when the admin listener says it has ended, else `None`.
fn admin_task_ended(url: &str, config: &Config, task: &str) -> Result<Option<String>, String> {
    let token_file = config
        .admin_token_file
        .as_ref()
        .ok_or("--admin: the config has no admin_token_file")?;
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| format!("{}: {e}", token_file.display()))?;
    // The task id came from an agent's header: one path segment, encoded.
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let task = percent_encoding::utf8_percent_encode(task, SEGMENT);
    let asked = format!("{}/admin/tasks/{task}", url.trim_end_matches('/'));
    let (status, body) = crate::plain_get(
        &asked,
        Some(token.trim()),
        std::time::Duration::from_secs(5),
    )
    .map_err(|e| format!("--admin: {e}"))?;
    if status == http::StatusCode::NOT_FOUND {
        return Err("the admin listener does not know the task (another replica's memory?)".into());
    }
    if !status.is_success() {
        return Err(format!("--admin {url}: answered {status}"));
    }
    let task: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let state = task["state"].as_str().unwrap_or("unknown").to_string();
    Ok((state != "active").then_some(state))
}

/// `7d`, `12h`, `30m`, `90s`, `2w`, or several (`1d12h`).
pub fn parse_duration(text: &str) -> Result<chrono::Duration, String> {
    let bad = || format!("--since {text}: a duration like 7d, 12h, 30m (s, m, h, d, w)");
    let mut total = 0i64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: i64 = number.parse().map_err(|_| bad())?;
        number.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(bad)?;
    }
    if !number.is_empty() || total == 0 {
        return Err(bad());
    }
    chrono::Duration::try_seconds(total).ok_or_else(bad)
}

/// What one agent did in the window.
#[derive(Default)]
struct Usage {
    /// Action → (allowed calls, denied calls, last time).
    actions: BTreeMap<String, (u64, u64, String)>,
    /// The permits behind its allowed calls to declared actions (for `--suggest`).
    allowed: Allowed,
}

/// The report's reading of the audit file.
#[derive(Default)]
struct Usages {
    agents: BTreeMap<String, Usage>,
    lines: u64,
    unreadable: usize,
    /// Permits whose version now differs from the one some allowed call recorded.
    changed: BTreeSet<String>,
}

/// Reads the tool calls of the window (`from` on) per agent.
fn read_usage(
    audit: &Path,
    engine: &PolicyEngine,
    from: Option<DateTime<Utc>>,
) -> Result<Usages, String> {
    let mut read = Usages::default();
    read.unreadable = each_line(audit, |line| {
        read.lines += 1;
        let (Some(agent), true) = (&line.agent, line.is_tool_call()) else {
            return;
        };
        if let Some(from) = from {
            match DateTime::parse_from_rfc3339(&line.time) {
                Ok(at) if at >= from => {}
                _ => return,
            }
        }
        // An undeclared name is an agent's word (an unknown MCP tool): one bucket for all.
        let declared = line.action.as_deref().filter(|a| engine.has_action(a));
        let usage = read.agents.entry(agent.clone()).or_default();
        let action = declared.unwrap_or("(undeclared tools)");
        let entry = usage.actions.entry(action.to_string()).or_default();
        if line.decision == "allow" {
            entry.0 += 1;
            if let Some(action) = declared {
                usage.allowed.record(action, &line.policies);
            }
            for (id, version) in &line.policy_versions {
                if engine.source(id).is_none_or(|s| s.version != *version) {
                    read.changed.insert(id.clone());
                }
            }
        } else {
            entry.1 += 1;
        }
        if line.time > entry.2 {
            entry.2 = line.time.clone();
        }
    })?;
    Ok(read)
}

/// Where the report goes: plain text, or (`--suggest`) a Cedar policy file in which every
/// report line is a `//` comment. Every line is printable (control characters, line breaks
/// among them, escaped): a name can neither drive a terminal nor end a comment.
struct Out {
    comments: bool,
    text: String,
}

impl Out {
    fn line(&mut self, text: &str) {
        if self.comments {
            self.text.push_str("// ");
        }
        self.text.push_str(&printable(text));
        self.text.push('\n');
    }

    fn blank(&mut self) {
        self.text.push('\n');
    }

    /// A suggested policy: its comment, then its Cedar text, line by line (Cedar prints line
    /// breaks in strings escaped, and what `printable` escapes can only be in a string
    /// literal, where Cedar reads its `\u{..}` escapes back).
    fn policy(&mut self, suggestion: &Suggestion) {
        for line in &suggestion.comment {
            self.line(line);
        }
        for line in suggestion.policy.lines() {
            if suggestion.disabled {
                self.text.push_str("// ");
            }
            self.text.push_str(&printable(line));
            self.text.push('\n');
        }
    }

    fn take(&mut self) -> String {
        std::mem::take(&mut self.text)
    }
}

/// What the `--suggest` file says first.
const SUGGEST_HEADER: &[&str] = &[
    "toolgate audit report --suggest: the report as comments, then per agent the suggested",
    "permits. Each narrowed copy keeps the conditions of the permit it narrows: enforce the",
    "copies and remove the permits they narrow (an agent no copy names then loses what those",
    "permits allowed it). A permit WITHOUT CONDITIONS is suggested only where no permit that",
    "allowed the calls can be narrowed any more, and its comment says so.",
];

pub fn report(
    audit: &Path,
    config: &Path,
    since: Option<&str>,
    suggest: bool,
) -> Result<ExitCode, String> {
    let config = Config::load(config)?;
    let engine = PolicyEngine::load(&config.policies).map_err(|e| e.to_string())?;
    // A window longer than the calendar reaches back covers everything.
    let from = since
        .map(parse_duration)
        .transpose()?
        .and_then(|window| Utc::now().checked_sub_signed(window));
    let read = read_usage(audit, &engine, from)?;
    let window = since.map_or_else(|| "the whole file".to_string(), |s| format!("the last {s}"));
    let mut out = Out {
        comments: suggest,
        text: String::new(),
    };
    if suggest {
        SUGGEST_HEADER.iter().for_each(|l| out.line(l));
    }
    out.line(&format!(
        "# {} lines read from {} ({} unreadable); window: {window}",
        read.lines,
        audit.display(),
        read.unreadable,
    ));
    print!("{}", out.take());
    let mut taken = HashSet::new();
    let mut cx = SuggestContext {
        engine: &engine,
        window: &window,
        changed: &read.changed,
        taken: &mut taken,
    };
    for (agent, usage) in &read.agents {
        agent_report(&mut out, &engine, agent, usage)?;
        if suggest {
            suggest_for(&mut out, &mut cx, agent, usage)?;
        }
        print!("{}", out.take());
    }
    Ok(ExitCode::SUCCESS)
}

/// The suggested policies for one agent, each after its comment.
fn suggest_for(
    out: &mut Out,
    cx: &mut SuggestContext<'_>,
    agent: &str,
    usage: &Usage,
) -> Result<(), String> {
    for suggestion in suggestions(cx, agent, &usage.allowed)? {
        out.blank();
        out.policy(&suggestion);
    }
    Ok(())
}

/// One agent's part of the report: what it called, and what it may call but never did.
fn agent_report(
    out: &mut Out,
    engine: &PolicyEngine,
    agent: &str,
    usage: &Usage,
) -> Result<(), String> {
    out.blank();
    out.line(&format!("agent {agent}"));
    out.line("  called:");
    for (action, (allowed, denied, last)) in &usage.actions {
        let denied = if *denied > 0 {
            format!(", {denied} denied")
        } else {
            String::new()
        };
        out.line(&format!(
            "    {action}: {allowed} allowed{denied}, last {last}"
        ));
    }
    let mut tools: Vec<&str> = engine
        .schema_info()
        .actions
        .keys()
        .map(String::as_str)
        .filter(|a| a.contains('/'))
        .collect();
    tools.sort();
    let permitted = engine.permits_in_scope(agent, &tools)?;
    let unused: Vec<_> = permitted
        .iter()
        .filter(|(action, permits)| {
            !permits.is_empty()
                && usage
                    .actions
                    .get(action)
                    .is_none_or(|(allowed, _, _)| *allowed == 0)
        })
        .collect();
    if unused.is_empty() {
        out.line("  permitted but never called: none");
        return Ok(());
    }
    out.line("  permitted but never called:");
    for (action, permits) in unused {
        let by: Vec<String> = permits
            .iter()
            .map(|id| match engine.source(id) {
                Some(s) => format!("{id} ({}:{})", s.file.display(), s.line),
                None => id.clone(),
            })
            .collect();
        out.line(&format!("    {action}: by {}", by.join(", ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cedar_types::unprintable;
    use serde_json::json;

    #[test]
    fn control_characters_are_never_printed() {
        assert_eq!(printable("tools/add"), "tools/add");
        assert_eq!(printable("x\u{1b}[2Jy\n"), "x\\u{1b}[2Jy\\u{a}");
        assert_eq!(printable("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(printable("a\u{2028}b"), "a\\u{2028}b");
    }

    /// The `--suggest` output for one agent's usage, against the repository's example
    /// policies (`gone` names a permit they do not have).
    fn suggested(agent: &str, calls: &[(&str, &[&str])]) -> String {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        suggested_by(&PolicyEngine::load(&dir).unwrap(), agent, calls)
    }

    /// `suggested`, with these policy files beside the examples.
    fn suggested_with(extra: &[(&str, &str)], agent: &str, calls: &[(&str, &[&str])]) -> String {
        let dir = std::env::temp_dir().join(format!("toolgate-suggest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        for entry in std::fs::read_dir(examples).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
            }
        }
        for (name, text) in extra {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let engine = PolicyEngine::load(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        suggested_by(&engine.unwrap(), agent, calls)
    }

    fn suggested_by(engine: &PolicyEngine, agent: &str, calls: &[(&str, &[&str])]) -> String {
        let mut usage = Usage::default();
        for (action, policies) in calls {
            usage.actions.insert(action.to_string(), (1, 0, "t".into()));
            let policies: Vec<String> = policies.iter().map(|p| p.to_string()).collect();
            usage.allowed.record(action, &policies);
        }
        let mut out = Out {
            comments: true,
            text: String::new(),
        };
        let (changed, mut taken) = (BTreeSet::new(), HashSet::new());
        let mut cx = SuggestContext {
            engine,
            window: "the last 1h",
            changed: &changed,
            taken: &mut taken,
        };
        agent_report(&mut out, engine, agent, &usage).unwrap();
        suggest_for(&mut out, &mut cx, agent, &usage).unwrap();
        out.take()
    }

    /// The policies of a `--suggest` output, parsed as `toolgate check` parses a file.
    fn parsed(text: &str) -> Vec<cedar_policy::Policy> {
        toolgate_policy::parse_policy_file(Path::new("suggested.cedar"), text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
            .into_iter()
            .map(|(policy, _)| policy)
            .collect()
    }

    #[test]
    fn suggested_copies_keep_the_conditions_of_the_permits_they_narrow() {
        let text = suggested(
            "assistant",
            &[
                ("billing/get_invoice", &["billing-read"]),
                ("billing/refund", &["billing-refund"]),
                ("billing/list_invoices", &["billing-read"]),
                ("billing/list_invoices", &["gone"]),
            ],
        );
        assert!(!text.contains("nothing more"), "{text}");
        // The wide permit comes commented out; enabled, it is the third policy.
        assert_eq!(parsed(&text).len(), 2, "{text}");
        let policies = parsed(&enabled(&text));
        let ids: Vec<String> = policies.iter().map(|p| p.id().to_string()).collect();
        assert_eq!(ids.len(), 3, "{text}");
        let original = |id: &str| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
            let engine = PolicyEngine::load(&dir).unwrap();
            engine.policy(id).unwrap().to_json().unwrap()
        };
        let copy = policies[0].to_json().unwrap();
        assert!(
            ids[0].starts_with("suggested-assistant-billing-read-"),
            "{ids:?}"
        );
        assert_eq!(
            copy["principal"],
            json!({"op": "==", "entity": {"type": "Toolgate::Agent", "id": "assistant"}})
        );
        let actions = ["billing/get_invoice", "billing/list_invoices"]
            .map(|a| json!({"type": "Toolgate::Action", "id": a}));
        assert_eq!(copy["action"], json!({"op": "in", "entities": actions}));
        let read = original("billing-read");
        assert_eq!(copy["resource"], read["resource"]);
        // The team scope as a condition, these actions exactly (not their member actions),
        // then the permit's own.
        let conditions = copy["conditions"].as_array().unwrap();
        assert_eq!(conditions[2..], read["conditions"].as_array().unwrap()[..]);
        assert!(
            conditions[1].to_string().contains("billing/list_invoices"),
            "{text}"
        );
        assert_eq!(
            policies[0].annotation("grants"),
            Some("invoices:read"),
            "{text}"
        );
        assert_eq!(policies[0].annotation("id"), Some(ids[0].as_str()));
        assert!(text.contains("It narrows permit billing-read ("), "{text}");
        assert!(text.contains("principal in Toolgate::Team::\"finance-agents\""));
        assert!(ids[1].starts_with("suggested-assistant-billing-refund-"));
        // A call allowed only through a permit gone since: the wide permit, said plainly.
        assert_eq!(ids[2], "suggested-assistant-a39a7ffa");
        let wide = policies[2].to_json().unwrap();
        assert_eq!(wide["conditions"], json!([]));
        // (Cedar reads a one-entity list as `in` that entity.)
        assert_eq!(wide["action"]["entity"], actions[1], "{wide}");
        for expected in [
            "a permit WITHOUT CONDITIONS",
            "billing/list_invoices: gone is no longer in the policy set",
            "wider than whatever allowed those calls",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn a_permit_now_in_shadow_is_narrowed_in_shadow_and_one_now_a_forbid_is_not() {
        // The examples' billing.cedar replaced: `billing-read` is now a shadow permit, and
        // `billing-refund` names a forbid.
        let text = suggested_with(
            &[(
                "billing.cedar",
                "@id(\"billing-read\")\n@mode(\"shadow\")\npermit (principal in Toolgate::Team::\"finance-agents\", action, resource) when { context has user };\n\
                 @id(\"billing-refund\")\nforbid (principal, action == Toolgate::Action::\"billing/refund\", resource) when { context.args.amount > 500 };\n",
            )],
            "assistant",
            &[
                ("billing/get_invoice", &["billing-read"]),
                ("billing/refund", &["billing-refund"]),
            ],
        );
        // The refund's permit is now a forbid: its suggestion is commented out.
        let policies = parsed(&text);
        assert_eq!(policies.len(), 1, "{text}");
        assert_eq!(policies[0].annotation("mode"), Some("shadow"), "{text}");
        assert!(
            text.contains("Like billing-read now, it is @mode(\"shadow\")"),
            "{text}"
        );
        assert!(
            text.contains("billing/refund: billing-refund is now a forbid"),
            "{text}"
        );
        assert_eq!(parsed(&enabled(&text)).len(), 2, "{text}");
    }

    /// The file with its commented-out suggestions enabled, as a person would.
    fn enabled(text: &str) -> String {
        let mut out = String::new();
        let mut policy = false;
        for line in text.lines() {
            let body = line.strip_prefix("// ");
            policy |= body.is_some_and(|b| b.starts_with("@id(\"suggested-"));
            match body {
                Some(body) if policy => out.push_str(body),
                _ => out.push_str(line),
            }
            if policy && line.ends_with(';') {
                policy = false;
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn a_name_never_leaves_its_comment() {
        let agent =
            "evil\n@id(\"x\")\npermit (principal, action, resource);\r\u{2028}\u{202e}\u{1b}[2J";
        let text = suggested(agent, &[("billing/get_invoice", &["billing-read"])]);
        assert!(
            !text.chars().any(|c| unprintable(c) && c != '\n'),
            "{text:?}"
        );
        // The agent's permit no longer admits it: the one suggestion is commented out, and
        // enabled it is one policy, for exactly this agent.
        assert!(parsed(&text).is_empty(), "{text}");
        let text = enabled(&text);
        let policies = parsed(&text);
        assert_eq!(policies.len(), 1, "{text}");
        let principal = policies[0].to_json().unwrap()["principal"].clone();
        assert_eq!(principal["entity"]["id"], agent, "{text}");
        // Every other line is a comment (or empty).
        let policy_lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("@id("))
            .collect();
        assert!(policy_lines.last().unwrap().ends_with(';'), "{text}");
        for line in text.lines().take(text.lines().count() - policy_lines.len()) {
            assert!(line.is_empty() || line.starts_with("// "), "{line:?}");
        }
        assert!(
            text.contains(r#"// agent evil\u{a}@id("x")\u{a}permit"#),
            "{text}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap().num_seconds(), 7 * 86_400);
        assert_eq!(parse_duration("1d12h").unwrap().num_seconds(), 36 * 3600);
        assert_eq!(parse_duration("90s").unwrap().num_seconds(), 90);
        for bad in [
            "",
            "7",
            "d",
            "7x",
            "0h",
            "99999999999999999999d",
            "9999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
