//! What toolgate needs to know of the schema beyond what `cedar_policy::Schema` exposes:
//! the declared attribute types of entities and of each action's `context.args`, so that
//! claims and untyped request values (path and query strings) can be typed before Cedar sees them.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// A declared Cedar type, as far as toolgate needs to coerce values into it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrType {
    Long,
    Bool,
    String,
    Set(Box<AttrType>),
    Record(Record),
    /// Parsed once, with the schema: Cedar's name parser is too slow for every call.
    Entity(cedar_policy::EntityTypeName),
    /// A type toolgate cannot read (a name that does not parse as an entity type): any value
    /// given for it is refused, so the call is denied rather than its value dropped unseen.
    Unreadable(String),
    Extension(String),
}

/// A record type: attribute name → (type, required).
pub type Record = BTreeMap<String, (AttrType, bool)>;

/// The context of one action: which top-level keys it declares, and the `args` record.
#[derive(Debug, Clone, Default)]
pub struct ActionContext {
    pub keys: Record,
    pub args: Record,
    /// Arguments annotated `@sensitive` in the schema, by path (`ssn`, `payment.card`; an
    /// element of a set by the set's path): the audit keeps only their hash.
    pub sensitive: std::collections::BTreeSet<String>,
    /// Arguments annotated `@json` (declared `String`): free-form JSON, which the policy reads
    /// as its canonical text and the upstream receives as that same JSON value.
    pub free_form: std::collections::BTreeSet<String>,
    /// Arguments annotated `@path` (file or URL paths): refused unless in normal form.
    pub paths: std::collections::BTreeSet<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SchemaInfo {
    /// Fully qualified entity type name → declared attributes.
    pub entity_attrs: HashMap<String, Record>,
    /// Action id (the `id` part of `NS::Action::"id"`) → its context.
    pub actions: HashMap<String, ActionContext>,
}

const EXTENSIONS: [&str; 4] = ["ipaddr", "decimal", "datetime", "duration"];

impl SchemaInfo {
    /// Reads the JSON form of a schema fragment (as `SchemaFragment::to_json_value` gives it).
    pub fn from_fragment_json(fragment: &Value) -> Self {
        let mut info = SchemaInfo::default();
        let Some(namespaces) = fragment.as_object() else {
            return info;
        };
        for (ns, body) in namespaces {
            let resolver = Resolver {
                ns,
                common: body.get("commonTypes").and_then(Value::as_object),
            };
            if let Some(types) = body.get("entityTypes").and_then(Value::as_object) {
                for (name, def) in types {
                    let attrs = def
                        .get("shape")
                        .map(|shape| resolver.record(shape))
                        .unwrap_or_default();
                    info.entity_attrs.insert(qualify(ns, name), attrs);
                }
            }
            if let Some(actions) = body.get("actions").and_then(Value::as_object) {
                for (name, def) in actions {
                    let keys = def
                        .pointer("/appliesTo/context")
                        .map(|ctx| resolver.record(ctx))
                        .unwrap_or_default();
                    let args = match keys.get("args") {
                        Some((AttrType::Record(args), _)) => args.clone(),
                        _ => Record::new(),
                    };
                    let mut sensitive = std::collections::BTreeSet::new();
                    let mut free_form = std::collections::BTreeSet::new();
                    let mut paths = std::collections::BTreeSet::new();
                    if let Some(args) = def
                        .pointer("/appliesTo/context")
                        .and_then(|ctx| resolver.attributes(ctx, 0))
                        .and_then(|ctx| ctx.get("args"))
                        .and_then(|args| resolver.attributes(args, 0))
                    {
                        resolver.annotated_paths("sensitive", args, "", 0, &mut sensitive);
                        resolver.annotated_paths("json", args, "", 0, &mut free_form);
                        resolver.annotated_paths("path", args, "", 0, &mut paths);
                    }
                    info.actions.insert(
                        name.clone(),
                        ActionContext {
                            keys,
                            args,
                            sensitive,
                            free_form,
                            paths,
                        },
                    );
                }
            }
        }
        info
    }
}

fn qualify(ns: &str, name: &str) -> String {
    if ns.is_empty() || name.contains("::") {
        name.to_string()
    } else {
        format!("{ns}::{name}")
    }
}

struct Resolver<'a> {
    ns: &'a str,
    common: Option<&'a serde_json::Map<String, Value>>,
}

impl<'a> Resolver<'a> {
    /// The declared attributes (as written, annotations and all) of a record type or of the
    /// common type naming one.
    fn attributes(
        &self,
        ty: &'a Value,
        depth: usize,
    ) -> Option<&'a serde_json::Map<String, Value>> {
        if depth > 32 {
            return None;
        }
        let kind = ty.get("type")?.as_str()?;
        let name = match kind {
            "Record" => return ty.get("attributes")?.as_object(),
            "EntityOrCommon" => ty.get("name")?.as_str()?,
            other => other,
        };
        let local = name
            .strip_prefix(self.ns)
            .and_then(|rest| rest.strip_prefix("::"))
            .unwrap_or(name);
        self.attributes(self.common?.get(local)?, depth + 1)
    }

    /// The paths of the attributes annotated `@<annotation>`, at any depth.
    fn annotated_paths(
        &self,
        annotation: &str,
        attributes: &'a serde_json::Map<String, Value>,
        prefix: &str,
        depth: usize,
        out: &mut std::collections::BTreeSet<String>,
    ) {
        if depth > 32 {
            return;
        }
        for (name, attr) in attributes {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            if attr
                .get("annotations")
                .is_some_and(|a| a.get(annotation).is_some())
            {
                out.insert(path.clone());
            }
            let inner = match attr.get("type").and_then(Value::as_str) {
                Some("Set") => attr.get("element"),
                _ => Some(attr),
            };
            if let Some(fields) = inner.and_then(|t| self.attributes(t, 0)) {
                self.annotated_paths(annotation, fields, &path, depth + 1, out);
            }
        }
    }

    /// The attributes of a record type (or of a common type naming one); empty otherwise.
    fn record(&self, ty: &Value) -> Record {
        match self.resolve(ty, 0) {
            Some(AttrType::Record(r)) => r,
            _ => Record::new(),
        }
    }

    fn resolve(&self, ty: &Value, depth: usize) -> Option<AttrType> {
        // Common types may refer to each other; a cycle is a schema error Cedar reports anyway.
        if depth > 32 {
            return None;
        }
        let kind = ty.get("type")?.as_str()?;
        Some(match kind {
            "Long" => AttrType::Long,
            "String" => AttrType::String,
            "Boolean" | "Bool" => AttrType::Bool,
            "Set" => AttrType::Set(Box::new(self.resolve(ty.get("element")?, depth + 1)?)),
            "Record" => {
                let mut record = Record::new();
                if let Some(attrs) = ty.get("attributes").and_then(Value::as_object) {
                    for (name, attr) in attrs {
                        let required = attr
                            .get("required")
                            .and_then(Value::as_bool)
                            .unwrap_or(true);
                        if let Some(t) = self.resolve(attr, depth + 1) {
                            record.insert(name.clone(), (t, required));
                        }
                    }
                }
                AttrType::Record(record)
            }
            "Entity" => entity_type(qualify(self.ns, ty.get("name")?.as_str()?)),
            "Extension" => AttrType::Extension(ty.get("name")?.as_str()?.to_string()),
            "EntityOrCommon" => self.named(ty.get("name")?.as_str()?, depth)?,
            other => self.named(other, depth)?,
        })
    }

    /// A bare type name: a common type, a primitive, an extension, or else an entity type.
    fn named(&self, name: &str, depth: usize) -> Option<AttrType> {
        // `__cedar::String` names the built-in type even where the schema defines its own.
        if let Some(builtin) = name.strip_prefix("__cedar::") {
            return Some(match builtin {
                "Long" => AttrType::Long,
                "String" => AttrType::String,
                "Bool" | "Boolean" => AttrType::Bool,
                ext if EXTENSIONS.contains(&ext) => AttrType::Extension(ext.to_string()),
                other => AttrType::Unreadable(format!("__cedar::{other}")),
            });
        }
        let local = name
            .strip_prefix(self.ns)
            .and_then(|rest| rest.strip_prefix("::"))
            .unwrap_or(name);
        if let Some(def) = self.common.and_then(|c| c.get(local)) {
            return self.resolve(def, depth + 1);
        }
        Some(match local {
            "Long" => AttrType::Long,
            "String" => AttrType::String,
            "Bool" | "Boolean" => AttrType::Bool,
            ext if EXTENSIONS.contains(&ext) => AttrType::Extension(ext.to_string()),
            _ => entity_type(qualify(self.ns, name)),
        })
    }
}

/// An entity type, parsed; a name that does not parse is kept as unreadable (fail closed).
fn entity_type(name: String) -> AttrType {
    match name.parse() {
        Ok(parsed) => AttrType::Entity(parsed),
        Err(_) => AttrType::Unreadable(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_arguments_are_read_from_schema_annotations() {
        let text = r#"namespace Toolgate {
            type Payment = { amount: Long, @sensitive card: String, holder: { @sensitive name: String } };
            entity A; entity T;
            action "pay/direct" appliesTo { principal: A, resource: T, context: { args: { @sensitive("hash it") ssn: String, name: String } } };
            action "pay/typed" appliesTo { principal: A, resource: T, context: { args: Payment } };
        }"#;
        let (fragment, _) = cedar_policy::SchemaFragment::from_cedarschema_str(text).unwrap();
        let info = SchemaInfo::from_fragment_json(&fragment.to_json_value().unwrap());
        let names = |action: &str| -> Vec<&str> {
            info.actions[action]
                .sensitive
                .iter()
                .map(String::as_str)
                .collect()
        };
        assert_eq!(names("pay/direct"), ["ssn"]);
        assert_eq!(names("pay/typed"), ["card", "holder.name"]);
    }

    #[test]
    fn builtin_and_unreadable_names_are_never_dropped() {
        let attr =
            |ty: &str| serde_json::json!({"type": "EntityOrCommon", "name": ty, "required": false});
        let schema = serde_json::json!({"Toolgate": {"entityTypes": {}, "actions": {"a": {
            "appliesTo": {"context": {"type": "Record", "attributes": {"args": {
                "type": "Record",
                "attributes": {"to": attr("__cedar::String"), "odd": attr("__cedar::Nope")}
            }}}}
        }}}});
        let info = SchemaInfo::from_fragment_json(&schema);
        let args = &info.actions["a"].args;
        // Dropped, an agent's value would go upstream unseen by the policy.
        assert_eq!(args["to"].0, AttrType::String);
        assert_eq!(args["odd"].0, AttrType::Unreadable("__cedar::Nope".into()));
    }
}
