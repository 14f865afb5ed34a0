//! `toolgate audit report --suggest`: for each agent, the permits that allowed its calls,
//! each narrowed to that agent and the actions it was allowed through it, with its resource
//! scope, conditions and annotations kept. Scopes are rewritten on Cedar's own policy JSON
//! (EST), never on policy text.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use cedar_policy::{Effect, EntityUid, Policy, PolicyId};
use serde_json::{json, Value};
use toolgate_policy::{error_chain, PolicyEngine, NAMESPACE};

/// How one agent was allowed to call its (declared) actions, as the audit lines say.
#[derive(Default)]
pub struct Allowed {
    /// Action → the distinct sets of determining permits of its allowed calls (an audit line
    /// names every permit that was satisfied).
    pub through: BTreeMap<String, BTreeSet<Vec<String>>>,
}

impl Allowed {
    pub fn record(&mut self, action: &str, policies: &[String]) {
        let mut set = policies.to_vec();
        set.sort();
        set.dedup();
        if let Some(sets) = self.through.get_mut(action) {
            sets.insert(set);
        } else {
            self.through
                .insert(action.to_string(), BTreeSet::from([set]));
        }
    }
}

/// What the reader of the audit knows besides the lines of one agent.
pub struct Context<'a> {
    pub engine: &'a PolicyEngine,
    /// The report's window, in words (`the last 7d`).
    pub window: &'a str,
    /// Permits whose version now differs from the one some allowed call recorded.
    pub changed: &'a BTreeSet<String>,
    /// Ids given to suggestions so far (each is fresh: in no policy, in no other suggestion).
    pub taken: &'a mut HashSet<String>,
}

/// One suggested policy: the comment lines that say what it is (without `//`), and its
/// Cedar text.
pub struct Suggestion {
    pub comment: Vec<String>,
    pub policy: String,
    /// Printed commented out: nothing in force may come of it without a person's edit.
    pub disabled: bool,
}

/// A permit of the audit lines that the current policy set still has, and how far it still
/// serves the agent.
struct Narrowable<'a> {
    policy: &'a Policy,
    /// Actions the agent was allowed through it whose scope still admits the agent.
    actions: Vec<String>,
}

/// The suggestions for `agent`: a narrowed copy of each permit that allowed its calls and can
/// be narrowed, then, when some allowed call has no such permit, one permit without
/// conditions for those actions, saying so.
pub fn suggestions(
    cx: &mut Context<'_>,
    agent: &str,
    allowed: &Allowed,
) -> Result<Vec<Suggestion>, String> {
    let (narrowable, mut why_not) = narrowable(cx.engine, agent, allowed)?;
    let mut out = Vec::new();
    let mut covered: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (id, permit) in &narrowable {
        match narrowed_copy(cx, agent, id, permit) {
            Ok(suggestion) => {
                out.push(suggestion);
                covered.extend(permit.actions.iter().map(|a| (id.as_str(), a.as_str())));
            }
            Err(reason) => {
                for action in &permit.actions {
                    why_not.insert((id.clone(), action.clone()), reason.clone());
                }
            }
        }
    }
    // An action needs the wide permit when one of its allowed calls had no permit narrowed.
    let mut uncovered: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (action, sets) in &allowed.through {
        for set in sets {
            if set
                .iter()
                .any(|id| covered.contains(&(id.as_str(), action)))
            {
                continue;
            }
            let reasons = uncovered.entry(action).or_default();
            if set.is_empty() {
                reasons.insert("an allowed call's audit line names no permit".to_string());
            }
            for id in set {
                let reason = why_not
                    .get(&(id.clone(), action.clone()))
                    .cloned()
                    .unwrap_or_else(|| "cannot be narrowed".to_string());
                reasons.insert(format!("{id} {reason}"));
            }
        }
    }
    if !uncovered.is_empty() {
        out.push(unconditioned(cx, agent, &uncovered)?);
    }
    Ok(out)
}

type WhyNot = BTreeMap<(String, String), String>;

/// The permits named by `allowed` that can be narrowed for `agent`, with the actions each
/// still serves; and, per (permit, action) that cannot, why.
fn narrowable<'e>(
    engine: &'e PolicyEngine,
    agent: &str,
    allowed: &Allowed,
) -> Result<(BTreeMap<String, Narrowable<'e>>, WhyNot), String> {
    // Permit → the actions the agent was allowed through it.
    let mut through: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (action, sets) in &allowed.through {
        for id in sets.iter().flatten() {
            through.entry(id).or_default().push(action);
        }
    }
    let mut why_not = WhyNot::new();
    let mut permits = BTreeMap::new();
    for (id, actions) in &through {
        let gone = match engine.policy(id) {
            None => "is no longer in the policy set",
            Some(p) if p.effect() != Effect::Permit => "is now a forbid",
            Some(policy) => {
                let actions = Vec::new();
                permits.insert(id.to_string(), Narrowable { policy, actions });
                continue;
            }
        };
        for action in actions {
            why_not.insert((id.to_string(), action.to_string()), gone.into());
        }
    }
    let ids: Vec<&str> = through
        .keys()
        .copied()
        .filter(|id| permits.contains_key(*id))
        .collect();
    let actions: Vec<&str> = allowed.through.keys().map(String::as_str).collect();
    for (action, admitting) in engine.scopes_admitting(&ids, agent, &actions)? {
        for id in ids
            .iter()
            .filter(|id| through[**id].contains(&action.as_str()))
        {
            if admitting.iter().any(|a| a == id) {
                if let Some(permit) = permits.get_mut(*id) {
                    permit.actions.push(action.clone());
                }
            } else {
                why_not.insert(
                    (id.to_string(), action.clone()),
                    "no longer admits this agent calling it (its scope or the entities changed)"
                        .into(),
                );
            }
        }
    }
    permits.retain(|_, p| !p.actions.is_empty());
    Ok((permits, why_not))
}

/// The copy of `permit` narrowed to `agent` and its actions, with its comment.
fn narrowed_copy(
    cx: &mut Context<'_>,
    agent: &str,
    permit_id: &str,
    permit: &Narrowable<'_>,
) -> Result<Suggestion, String> {
    let id = fresh_id(cx, agent, Some(permit_id));
    let est = permit.policy.to_json().map_err(|e| error_chain(&e))?;
    let actions: Vec<&str> = permit.actions.iter().map(String::as_str).collect();
    let (est, membership) = narrow(est, &id, agent, &actions)?;
    let policy = Policy::from_json(Some(PolicyId::new(&id)), est)
        .map_err(|e| format!("its narrowed copy: {}", error_chain(&e)))?;
    let place = match cx.engine.source(permit_id) {
        Some(s) => format!(" ({}:{})", s.file.display(), s.line),
        None => String::new(),
    };
    let mut comment = vec![
        format!("Suggested for agent {agent:?}: permit {permit_id}, narrowed."),
        format!("It narrows permit {permit_id}{place} to this agent and to the actions"),
        format!("it was allowed through it in {}:", cx.window),
    ];
    comment.extend(permit.actions.iter().map(|a| format!("  {a}")));
    comment
        .push("Its resource scope, when/unless conditions and other annotations are kept.".into());
    if let Some(membership) = membership {
        comment.push(format!(
            "Its principal scope becomes a condition: {membership}."
        ));
    }
    comment.push(format!("It permits nothing that {permit_id} does not."));
    if cx.changed.contains(permit_id) {
        comment.push(format!(
            "{permit_id} changed since some of these calls: its conditions are kept as they are now."
        ));
    }
    if cx.engine.source(permit_id).is_some_and(|s| s.shadow) {
        comment.push(format!(
            "Like {permit_id} now, it is @mode(\"shadow\"): it decides nothing until that is dropped."
        ));
    }
    Ok(Suggestion {
        comment,
        policy: pretty(&policy),
        disabled: false,
    })
}

/// `est` (a permit's policy JSON) narrowed: principal `== agent`, action `in actions`, `@id`
/// replaced; resource, conditions and other annotations kept. A principal scope `in E` (or
/// `is T in E`) becomes a leading `when { principal in E }`, so the copy never outlives the
/// membership; its text is returned for the comment. A template slot is refused.
fn narrow(
    mut est: Value,
    id: &str,
    agent: &str,
    actions: &[&str],
) -> Result<(Value, Option<String>), String> {
    let template = || "is a template (a slot in its scope): not narrowed".to_string();
    if est["principal"].get("slot").is_some()
        || est["principal"]["in"].get("slot").is_some()
        || est["resource"].get("slot").is_some()
        || est["resource"]["in"].get("slot").is_some()
    {
        return Err(template());
    }
    let group = match est["principal"]["op"].as_str() {
        Some("in") => Some(est["principal"]["entity"].clone()),
        Some("is") => est["principal"]["in"].get("entity").cloned(),
        _ => None,
    };
    let membership = match &group {
        Some(entity) => {
            let uid = EntityUid::from_json(entity.clone()).map_err(|e| error_chain(&e))?;
            Some(format!("principal in {uid}"))
        }
        None => None,
    };
    est["principal"] = json!({"op": "==", "entity": entity_json("Agent", agent)});
    // `action in [A]` would also admit A's member actions: only these actions, exactly.
    est["action"] = match actions {
        [one] => json!({"op": "==", "entity": entity_json("Action", one)}),
        _ => json!({
            "op": "in",
            "entities": actions.iter().map(|a| entity_json("Action", a)).collect::<Vec<_>>(),
        }),
    };
    let exactly = actions
        .iter()
        .map(|a| json!({"==": {"left": {"Var": "action"}, "right": {"Value": {"__entity": entity_json("Action", a)}}}}))
        .reduce(|left, right| json!({"||": {"left": left, "right": right}}));
    if !est["annotations"].is_object() {
        est["annotations"] = json!({});
    }
    est["annotations"]["id"] = json!(id);
    let mut conditions = Vec::new();
    if let Some(entity) = group {
        conditions.push(json!({"kind": "when", "body": {"in": {
            "left": {"Var": "principal"},
            "right": {"Value": {"__entity": entity}},
        }}}));
    }
    if let (Some(exactly), true) = (exactly, actions.len() > 1) {
        conditions.push(json!({"kind": "when", "body": exactly}));
    }
    conditions.extend(est["conditions"].as_array().cloned().unwrap_or_default());
    est["conditions"] = Value::Array(conditions);
    Ok((est, membership))
}

/// The permit without conditions for the actions no narrowed copy covers, saying why each.
fn unconditioned(
    cx: &mut Context<'_>,
    agent: &str,
    uncovered: &BTreeMap<&str, BTreeSet<String>>,
) -> Result<Suggestion, String> {
    let id = fresh_id(cx, agent, None);
    let est = json!({
        "effect": "permit",
        "principal": {"op": "==", "entity": entity_json("Agent", agent)},
        "action": {
            "op": "in",
            "entities": uncovered.keys().map(|a| entity_json("Action", a)).collect::<Vec<_>>(),
        },
        "resource": {"op": "All"},
        "conditions": [],
        "annotations": {"id": id},
    });
    let policy = Policy::from_json(Some(PolicyId::new(&id)), est).map_err(|e| error_chain(&e))?;
    let mut comment = vec![
        format!("Suggested for agent {agent:?}: a permit WITHOUT CONDITIONS."),
        format!(
            "Some calls to these actions in {} were allowed only through permits that",
            cx.window
        ),
        "cannot be narrowed now:".to_string(),
    ];
    for (action, reasons) in uncovered {
        let reasons: Vec<&str> = reasons.iter().map(String::as_str).collect();
        comment.push(format!("  {action}: {}", reasons.join("; ")));
    }
    comment.extend([
        "It is wider than whatever allowed those calls: any arguments, with or without a"
            .to_string(),
        "user or a task; and the permits behind them are gone or no longer admit the agent"
            .to_string(),
        "(perhaps on purpose), or the audit lines name none. So it is commented out: narrow it"
            .to_string(),
        "by hand, and enforce it only if the access is still meant.".to_string(),
    ]);
    Ok(Suggestion {
        comment,
        policy: pretty(&policy),
        disabled: true,
    })
}

/// The policy's Cedar text, laid out by Cedar's formatter (which checks that it keeps the
/// policy's meaning), or as Cedar prints it where the formatter fails.
fn pretty(policy: &Policy) -> String {
    let text = policy.to_string();
    let config = cedar_policy_formatter::Config {
        line_width: 100,
        indent_width: 2,
    };
    match cedar_policy_formatter::policies_str_to_pretty(&text, &config) {
        Ok(pretty) => pretty.trim_end().to_string(),
        Err(_) => text,
    }
}

/// `{"type": "Toolgate::<kind>", "id": id}`, an entity as Cedar's policy JSON names it.
fn entity_json(kind: &str, id: &str) -> Value {
    json!({"type": format!("{NAMESPACE}::{kind}"), "id": id})
}

/// `suggested-<agent>[-<permit>]-<digest>`: readable, and unique where the readable part is
/// not (agents or permits whose ids read alike, `a.b` and `a_b`, differ in the digest);
/// `-2`, `-3`, ... where it is already some policy's or suggestion's id.
fn fresh_id(cx: &mut Context<'_>, agent: &str, permit: Option<&str>) -> String {
    use sha2::Digest as _;
    let readable = |text: &str| -> String {
        text.chars()
            .take(40)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut hasher = sha2::Sha256::new();
    hasher.update(agent.as_bytes());
    let mut base = format!("suggested-{}", readable(agent));
    if let Some(permit) = permit {
        // The agent's length first: ("a", "bc") and ("ab", "c") hash apart.
        hasher = sha2::Sha256::new();
        hasher.update((agent.len() as u64).to_be_bytes());
        hasher.update(agent.as_bytes());
        hasher.update(permit.as_bytes());
        base.push('-');
        base.push_str(&readable(permit));
    }
    let d = hasher.finalize();
    let base = format!("{base}-{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3]);
    let mut id = base.clone();
    let mut n = 1;
    while cx.taken.contains(&id) || cx.engine.source(&id).is_some() {
        n += 1;
        id = format!("{base}-{n}");
    }
    cx.taken.insert(id.clone());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn narrowed(src: &str) -> Result<(Policy, Option<String>), String> {
        let est = Policy::parse(None, src).unwrap().to_json().unwrap();
        let (est, membership) = narrow(est, "new-id", "bot", &["billing/refund"])?;
        let policy = Policy::from_json(Some(PolicyId::new("new-id")), est).unwrap();
        Ok((policy, membership))
    }

    #[test]
    fn narrowing_keeps_resource_conditions_and_annotations() {
        let (policy, membership) = narrowed(
            "@id(\"old\") @grants(\"refunds:write\") @reason(\"too much\")\n\
             permit (principal is Toolgate::Agent in Toolgate::Team::\"t\", action, resource in Toolgate::Upstream::\"billing\")\n\
             when { context has user } unless { context.args.amount > 100 };",
        )
        .unwrap();
        assert_eq!(
            membership.as_deref(),
            Some("principal in Toolgate::Team::\"t\"")
        );
        let text = pretty(&policy);
        for expected in [
            "@id(\"new-id\")",
            "@grants(\"refunds:write\")",
            "@reason(\"too much\")",
            "principal == Toolgate::Agent::\"bot\"",
            "action == Toolgate::Action::\"billing/refund\"",
            "resource in Toolgate::Upstream::\"billing\"",
            "when { principal in Toolgate::Team::\"t\" }",
            "when { context has user }",
            "unless { context.args.amount > 100 }",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("\"old\""), "{text}");
        // Any principal, `is` alone, or this agent already: no membership to keep.
        for scope in [
            "principal",
            "principal is Toolgate::Agent",
            "principal == Toolgate::Agent::\"bot\"",
        ] {
            let src = format!("permit ({scope}, action, resource) when {{ context has user }};");
            let (policy, membership) = narrowed(&src).unwrap();
            assert_eq!(membership, None, "{scope}");
            assert_eq!(
                policy.to_json().unwrap()["conditions"]
                    .as_array()
                    .unwrap()
                    .len(),
                1
            );
        }
    }

    #[test]
    fn a_template_is_not_narrowed() {
        for src in [
            "permit (principal == ?principal, action, resource);",
            "permit (principal in ?principal, action, resource);",
            "permit (principal, action, resource in ?resource);",
        ] {
            let est = cedar_policy::Template::parse(None, src)
                .unwrap()
                .to_json()
                .unwrap();
            let refused = narrow(est, "x", "bot", &["billing/refund"]).unwrap_err();
            assert!(refused.contains("template"), "{src}: {refused}");
        }
    }

    #[test]
    fn suggested_ids_are_fresh() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let engine = PolicyEngine::load(&dir).unwrap();
        let (changed, mut taken) = (BTreeSet::new(), HashSet::new());
        let mut cx = Context {
            engine: &engine,
            window: "",
            changed: &changed,
            taken: &mut taken,
        };
        let a = fresh_id(&mut cx, "a.b", None);
        let b = fresh_id(&mut cx, "a_b", None);
        assert!(a.starts_with("suggested-a_b-") && b.starts_with("suggested-a_b-"));
        assert_ne!(a, b);
        assert_eq!(fresh_id(&mut cx, "a.b", None), format!("{a}-2"));
        let p = fresh_id(&mut cx, "a", Some("bc"));
        let q = fresh_id(&mut cx, "ab", Some("c"));
        assert!(p.starts_with("suggested-a-bc-") && q.starts_with("suggested-ab-c-"));
        assert_ne!(p[p.len() - 8..], q[q.len() - 8..]);
    }
}
