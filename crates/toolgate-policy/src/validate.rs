//! Strict validation that stays fast at 10,000 policies over 1,000 actions.
//!
//! Cedar's validator typechecks every policy in every request environment of the schema
//! (one per action, principal type and resource type) and prunes the environments the
//! policy's scope excludes only after building them: the cost grows with policies × actions
//! (about 17 s for 10,000 × 1,000). Errors can only arise in environments the scope allows,
//! so validating a policy against a schema *slice* that holds just the actions its scope can
//! match gives the same errors. Policies whose scope is open (or names an action the schema
//! does not declare, whose "did you mean" hints come from the whole schema) are validated
//! against the whole schema. Groups of policies are validated on all cores.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use cedar_policy::{
    ActionConstraint, EntityUid, Policy, PolicySet, Schema, ValidationError, ValidationMode,
    Validator,
};
use serde_json::{Map, Value};

/// Which schema a policy is validated against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Slice {
    Whole,
    /// These actions and the groups above them.
    Actions(BTreeSet<EntityUid>),
}

pub struct SlicedValidator {
    whole: Arc<Validator>,
    /// Each declared action with the groups above it (transitively).
    ancestors: HashMap<EntityUid, HashSet<EntityUid>>,
    /// The schema's JSON with every namespace's `actions` emptied.
    base: Map<String, Value>,
    /// Each action's JSON declaration, by uid.
    declarations: HashMap<EntityUid, (String, String, Value)>,
    slices: Mutex<HashMap<Slice, Arc<Validator>>>,
}

impl SlicedValidator {
    /// `schema_json` is the merged JSON form of `schema` (as `load_schema` returns it).
    pub fn new(schema: &Schema, schema_json: &Value) -> Self {
        let action_entities = schema.action_entities().ok();
        let ancestors = schema
            .actions()
            .map(|a| {
                let up = action_entities
                    .as_ref()
                    .and_then(|e| e.ancestors(a).map(|it| it.cloned().collect()))
                    .unwrap_or_default();
                (a.clone(), up)
            })
            .collect();
        let mut base = Map::new();
        let mut declarations = HashMap::new();
        for (ns, body) in schema_json.as_object().into_iter().flatten() {
            let mut body = body.clone();
            if let Some(actions) = body.get_mut("actions").and_then(Value::as_object_mut) {
                for (id, declaration) in std::mem::take(actions) {
                    if let Some(uid) = action_uid(ns, &id) {
                        declarations.insert(uid, (ns.clone(), id, declaration));
                    }
                }
            }
            base.insert(ns.clone(), body);
        }
        SlicedValidator {
            whole: Arc::new(Validator::new(schema.clone())),
            ancestors,
            base,
            declarations,
            slices: Mutex::new(HashMap::new()),
        }
    }

    /// Strict validation errors of every policy in `policies` (as Cedar's validator reports
    /// them against the whole schema), on this thread.
    pub fn validate_serial(&self, policies: &PolicySet) -> Vec<ValidationError> {
        self.groups(policies)
            .iter()
            .flat_map(|(slice, set)| {
                let result = self.validator(slice).validate(set, ValidationMode::Strict);
                result.validation_errors().cloned().collect::<Vec<_>>()
            })
            .collect()
    }

    /// Policies grouped by the schema slice they are validated against.
    fn groups(&self, policies: &PolicySet) -> Vec<(Slice, PolicySet)> {
        let mut groups: HashMap<Slice, PolicySet> = HashMap::new();
        for policy in policies.policies() {
            // Ids are unique in `policies`, so adding cannot clash.
            let _ = groups
                .entry(self.slice_for(policy))
                .or_default()
                .add(policy.clone());
        }
        let mut groups: Vec<(Slice, PolicySet)> = groups.into_iter().collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        groups
    }

    /// The same, with groups of policies validated on all cores; a worker that panics fails.
    pub fn validate(&self, policies: &PolicySet) -> Result<Vec<ValidationError>, String> {
        let groups = self.groups(policies);
        let per_group = crate::load::on_all_cores(&groups, |(slice, set)| {
            let result = self.validator(slice).validate(set, ValidationMode::Strict);
            result.validation_errors().cloned().collect::<Vec<_>>()
        })?;
        Ok(per_group.into_iter().flatten().collect())
    }

    fn slice_for(&self, policy: &Policy) -> Slice {
        let targets: BTreeSet<EntityUid> = match policy.action_constraint() {
            ActionConstraint::Any => return Slice::Whole,
            ActionConstraint::Eq(action) => {
                if !self.ancestors.contains_key(&action) {
                    return Slice::Whole;
                }
                BTreeSet::from([action])
            }
            ActionConstraint::In(groups) => {
                if groups.iter().any(|g| !self.ancestors.contains_key(g)) {
                    return Slice::Whole;
                }
                self.ancestors
                    .iter()
                    .filter(|(action, up)| groups.iter().any(|g| g == *action || up.contains(g)))
                    .map(|(action, _)| action.clone())
                    .collect()
            }
        };
        // No target (`action in []`, or groups nothing is in): Cedar still reports what it finds
        // in the policy without an environment, so the whole schema decides. And a slice of most
        // of the schema saves little over the whole one.
        if targets.is_empty() || targets.len() * 2 > self.ancestors.len() {
            return Slice::Whole;
        }
        let mut with_groups = targets.clone();
        for action in &targets {
            with_groups.extend(self.ancestors[action].iter().cloned());
        }
        Slice::Actions(with_groups)
    }

    fn validator(&self, slice: &Slice) -> Arc<Validator> {
        let Slice::Actions(actions) = slice else {
            return self.whole.clone();
        };
        if let Some(v) = self
            .slices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(slice)
        {
            return v.clone();
        }
        let mut json = self.base.clone();
        for uid in actions {
            if let Some((ns, id, declaration)) = self.declarations.get(uid) {
                if let Some(actions) = json
                    .get_mut(ns)
                    .and_then(Value::as_object_mut)
                    .map(|body| {
                        body.entry("actions")
                            .or_insert_with(|| Value::Object(Map::new()))
                    })
                    .and_then(Value::as_object_mut)
                {
                    actions.insert(id.clone(), declaration.clone());
                }
            }
        }
        // A slice is a subset of a valid schema; should it still fail to build, the whole
        // schema gives the right answer, only slower.
        let validator = match Schema::from_json_value(Value::Object(json)) {
            Ok(schema) => Arc::new(Validator::new(schema)),
            Err(_) => self.whole.clone(),
        };
        self.slices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slice.clone(), validator.clone());
        validator
    }
}

fn action_uid(ns: &str, id: &str) -> Option<EntityUid> {
    let ty = if ns.is_empty() {
        "Action".to_string()
    } else {
        format!("{ns}::Action")
    };
    let ty = ty.parse().ok()?;
    Some(EntityUid::from_type_name_and_id(
        ty,
        cedar_policy::EntityId::new(id),
    ))
}

/// Cedar's own strict validation against the whole schema: the reference the fast path
/// must agree with.
pub fn validate_whole(schema: &Schema, policies: &PolicySet) -> Vec<ValidationError> {
    Validator::new(schema.clone())
        .validate(policies, ValidationMode::Strict)
        .validation_errors()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Policies of every scope shape, valid and not, each with an explicit id.
    fn generated(dir: &std::path::Path) -> (Schema, Value, PolicySet) {
        crate::testing::write_scale_dir(dir, 40, 4, 3).unwrap();
        let (schema, json) = crate::load_schema(dir).unwrap();
        let mut set = PolicySet::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cedar") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (policy, _) in crate::parse_policy_file(&path, &text).unwrap() {
                    set.add(policy).unwrap();
                }
            }
        }
        let injected = [
            // misspelled argument, in a single-action scope
            r#"permit (principal, action == Toolgate::Action::"up0/tool3", resource) when { context.args.amout > 1 };"#,
            // wrong type
            r#"forbid (principal, action == Toolgate::Action::"up0/tool7", resource) when { context.args.name > 1 };"#,
            // unknown action (its hints come from the whole schema)
            r#"permit (principal, action == Toolgate::Action::"up0/tool999", resource);"#,
            r#"permit (principal, action in [Toolgate::Action::"up0/tool1", Toolgate::Action::"nope"], resource);"#,
            // a group of two actions, one error in each environment
            r#"permit (principal, action in [Toolgate::Action::"up0/tool1", Toolgate::Action::"up0/tool2"], resource) when { context.args.amount == "x" };"#,
            // the whole `call` group, and an open scope
            r#"permit (principal, action in Toolgate::Action::"call", resource) when { principal.level > 1 };"#,
            r#"forbid (principal, action, resource) when { context.args.amount > 1 };"#, // valid: every tool has args
            // unknown entity type; a principal type the action does not apply to (only a warning)
            r#"permit (principal == Toolgate::Robot::"r", action == Toolgate::Action::"up0/tool4", resource);"#,
            r#"permit (principal == Toolgate::User::"u", action == Toolgate::Action::"up0/tool5", resource);"#,
            // valid ones of the same shapes
            r#"permit (principal, action in [Toolgate::Action::"up0/tool8", Toolgate::Action::"up0/tool9"], resource) when { context.args.amount < 5 };"#,
            r#"permit (principal, action, resource) when { context has user };"#,
        ];
        for (i, text) in injected.iter().enumerate() {
            set.add(
                Policy::parse(
                    Some(cedar_policy::PolicyId::new(format!("injected.{i}"))),
                    *text,
                )
                .unwrap(),
            )
            .unwrap();
        }
        (schema, json, set)
    }

    fn verdicts(errors: &[ValidationError]) -> BTreeSet<(String, String)> {
        errors
            .iter()
            .map(|e| (e.policy_id().to_string(), e.to_string()))
            .collect()
    }

    #[test]
    fn sliced_validation_agrees_with_whole_schema_validation() {
        let dir = std::env::temp_dir().join(format!("toolgate-validate-{}", std::process::id()));
        let (schema, json, set) = generated(&dir);
        let whole = verdicts(&validate_whole(&schema, &set));
        let sliced_validator = SlicedValidator::new(&schema, &json);
        let sliced = verdicts(&sliced_validator.validate(&set).unwrap());
        let serial = verdicts(&sliced_validator.validate_serial(&set));
        let _ = std::fs::remove_dir_all(&dir);

        assert_eq!(sliced, whole, "same policies rejected, same messages");
        assert_eq!(serial, whole);
        let rejected: BTreeSet<&str> = whole.iter().map(|(id, _)| id.as_str()).collect();
        for i in [0, 1, 2, 3, 4, 5, 7] {
            assert!(
                rejected.contains(format!("injected.{i}").as_str()),
                "injected.{i} must be rejected: {rejected:?}"
            );
        }
        for i in [6, 8, 9, 10] {
            assert!(
                !rejected.contains(format!("injected.{i}").as_str()),
                "injected.{i} is valid"
            );
        }
        assert!(
            rejected.iter().all(|id| id.starts_with("injected.")),
            "generated policies are valid: {rejected:?}"
        );
    }
}
