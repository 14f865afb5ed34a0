//! A request body's schema completed from the document's own examples of it (the media
//! type's `example` and `examples`, and any schema's `example`): what the API's documented
//! request sends is declared, a field the schema leaves out typed from its example value
//! (DigitalOcean's NAT gateway example sends a `project_id` its schema does not describe).

use serde_json::{json, Map, Value};

/// Examples nested deeper than this are not read.
const MAX_DEPTH: usize = 16;

/// `schema` with every field of `examples` and of its own schemas' examples declared.
pub fn with_examples(schema: Value, examples: &[Value], notes: &mut Vec<String>) -> Value {
    let mut schema = match schema {
        // A body described by its example alone.
        Value::Null if examples.iter().any(Value::is_object) => json!({"type": "object"}),
        schema => schema,
    };
    for example in examples {
        describe(&mut schema, example, "body", 0, notes);
    }
    own_examples(&mut schema, "body", 0, notes);
    schema
}

/// Applies each schema's own `example` (3.0) or `examples` (3.1), innermost first.
fn own_examples(schema: &mut Value, at: &str, depth: usize, notes: &mut Vec<String>) {
    if depth > MAX_DEPTH {
        return;
    }
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        for (name, property) in properties.iter_mut() {
            own_examples(property, &format!("{at}.{name}"), depth + 1, notes);
        }
    }
    if let Some(items) = schema.get_mut("items") {
        own_examples(items, &format!("{at}[]"), depth + 1, notes);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for part in schema
            .get_mut(key)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            own_examples(part, at, depth + 1, notes);
        }
    }
    let mut examples: Vec<Value> = schema.get("example").cloned().into_iter().collect();
    if let Some(Value::Array(more)) = schema.get("examples") {
        examples.extend(more.iter().cloned());
    }
    for example in &examples {
        describe(schema, example, at, depth, notes);
    }
}

/// Declares in `schema` each field of `example` it does not describe.
fn describe(schema: &mut Value, example: &Value, at: &str, depth: usize, notes: &mut Vec<String>) {
    if depth > MAX_DEPTH {
        return;
    }
    let schema = concrete_mut(schema);
    match example {
        Value::Object(fields) if is_record(schema) || (depth == 0 && is_object(schema)) => {
            for (name, value) in fields {
                let at = format!("{at}.{name}");
                match property_mut(schema, name, 0) {
                    Some(property) => describe(property, value, &at, depth + 1, notes),
                    None => {
                        notes.push(format!(
                            "{at}: in the document's example request, not its schema: typed from the example"
                        ));
                        insert_property(schema, name, schema_of(value));
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get_mut("items") {
                for item in items {
                    describe(item_schema, item, &format!("{at}[]"), depth + 1, notes);
                }
            }
        }
        _ => {}
    }
}

/// An object with named fields: a schema that declares properties (a map, which declares
/// none, is left as it is: its example's keys are values, not names).
fn is_record(schema: &Value) -> bool {
    schema.get("properties").is_some() || schema.get("allOf").is_some()
}

fn is_object(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("object")
}

/// The one alternative of `anyOf: [T, null]` (how optional fields are written), else itself.
fn concrete_mut(schema: &mut Value) -> &mut Value {
    let only = ["anyOf", "oneOf"].into_iter().find(|key| {
        schema
            .get(*key)
            .and_then(Value::as_array)
            .is_some_and(|alternatives| concrete(alternatives).count() == 1)
    });
    match only {
        Some(key) => {
            let index = schema[key]
                .as_array()
                .and_then(|alternatives| {
                    alternatives
                        .iter()
                        .position(|a| a.get("type").and_then(Value::as_str) != Some("null"))
                })
                .unwrap_or(0);
            &mut schema[key][index]
        }
        None => schema,
    }
}

fn concrete(alternatives: &[Value]) -> impl Iterator<Item = &Value> {
    alternatives
        .iter()
        .filter(|a| a.get("type").and_then(Value::as_str) != Some("null"))
}

/// The schema of property `name`, in the schema's own properties or its `allOf` parts'.
fn property_mut<'a>(schema: &'a mut Value, name: &str, depth: usize) -> Option<&'a mut Value> {
    if depth > MAX_DEPTH {
        return None;
    }
    let own = schema
        .get("properties")
        .and_then(Value::as_object)
        .is_some_and(|p| p.contains_key(name));
    if own {
        return schema.get_mut("properties")?.get_mut(name);
    }
    schema
        .get_mut("allOf")?
        .as_array_mut()?
        .iter_mut()
        .find_map(|part| property_mut(part, name, depth + 1))
}

/// Adds a property to the schema's own `properties` (made when it has none, as a schema of
/// `allOf` alone has not).
fn insert_property(schema: &mut Value, name: &str, property: Value) {
    let Value::Object(object) = schema else {
        return;
    };
    if let Value::Object(properties) = object.entry("properties").or_insert_with(|| json!({})) {
        properties.insert(name.to_string(), property);
    }
}

/// A schema for an example value: its JSON type (an object's fields by name, a list's by
/// its first item; `null` says nothing, so it is read as JSON text).
fn schema_of(example: &Value) -> Value {
    match example {
        Value::Null => json!({}),
        Value::Bool(_) => json!({"type": "boolean"}),
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({"type": "integer"}),
        Value::Number(_) => json!({"type": "number"}),
        Value::String(_) => json!({"type": "string"}),
        Value::Array(items) => match items.iter().find(|i| !i.is_null()) {
            Some(item) => json!({"type": "array", "items": schema_of(item)}),
            None => json!({"type": "array"}),
        },
        Value::Object(fields) => {
            let properties: Map<String, Value> = fields
                .iter()
                .map(|(name, value)| (name.clone(), schema_of(value)))
                .collect();
            json!({"type": "object", "properties": properties})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cedar_types::{render_record, Typer};

    fn declared(schema: Value, examples: &[Value]) -> (String, Vec<String>) {
        let mut notes = Vec::new();
        let schema = with_examples(schema, examples, &mut notes);
        let mut typer = Typer::default();
        (render_record(&typer.fields(&schema, "body", 1)), notes)
    }

    #[test]
    fn example_fields_the_schema_leaves_out_are_declared_by_their_values() {
        // DigitalOcean's NAT gateway: `project_id` is in the example request only.
        let (record, notes) = declared(
            json!({"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"},
                "vpcs": {"type": "array", "items": {"type": "object", "properties": {"vpc_uuid": {"type": "string"}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}}
            }}),
            &[
                json!({"name": "n", "project_id": "p", "size": 1, "rate": 0.5, "on": true,
                "vpcs": [{"vpc_uuid": "v", "default_gateway": true}],
                "labels": {"env": "prod"}, "owner": {"id": "u"}, "nothing": null}),
            ],
        );
        assert_eq!(
            record,
            "{ name: String, vpcs?: Set<{ vpc_uuid?: String, default_gateway?: Bool }>, @json labels?: String, project_id?: String, size?: Long, rate?: decimal, on?: Bool, owner?: { id?: String }, @json nothing?: String }"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("body.project_id: in the document's example")),
            "{notes:?}"
        );
    }

    #[test]
    fn schema_examples_and_all_of_parts_are_read() {
        // PagerDuty's incident body requires a `type` it only shows in examples.
        let (record, _) = declared(
            json!({"type": "object", "properties": {"incident": {
                "allOf": [{"properties": {"title": {"type": "string"}}}],
                "properties": {"body": {"type": "object", "properties": {"details": {"type": "string"}},
                    "example": {"type": "incident_body", "details": "d"}}}
            }}}),
            &[json!({"incident": {"title": "t", "urgency": "high"}})],
        );
        assert_eq!(
            record,
            "{ incident?: { title?: String, body?: { details?: String, type?: String }, urgency?: String } }"
        );
        // A body with no schema, described by its example alone.
        let (record, _) = declared(Value::Null, &[json!({"a": 1})]);
        assert_eq!(record, "{ a?: Long }");
    }
}
