//! Hand changes that survive a re-import: `<upstream>.overrides.yaml` in the output folder,
//! read on every import and never written by it.
//!
//! ```yaml
//! tools:
//!   createIncident:                # the tool (operation) name
//!     add:                         # arguments the document does not declare
//!       "From?": String            # `name?`: optional
//!     replace:                     # arguments the document declares, typed as given
//!       incident: "{ title: String, service: { id: String } }"
//!     remove: [conference_bridge]  # arguments left out
//! ```
//!
//! A type is written as in the Cedar schema, `@sensitive` and `@json` before it. What no
//! longer fits the document (a tool or argument gone, or an override now equal to what is
//! imported) is reported, so stale overrides are seen and removed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::document::read_file;
use super::Tool;
use crate::cedar_types::{render_record, Field};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(default)]
    tools: BTreeMap<String, ToolOverrides>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ToolOverrides {
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    replace: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

impl Overrides {
    /// The overrides file at `path`, if there is one.
    pub fn read(path: &Path) -> Result<Option<Overrides>, String> {
        if !path.exists() {
            return Ok(None);
        }
        let text = read_file(path)?;
        if text.is_null() {
            return Ok(Some(Overrides::default()));
        }
        serde_json::from_value(text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Applies the overrides to the imported tools; what no longer fits the document.
    pub fn apply(&self, tools: &mut [Tool]) -> Result<Vec<String>, String> {
        let mut conflicts = Vec::new();
        for (name, changes) in &self.tools {
            let Some(tool) = tools.iter_mut().find(|t| t.route.tool == *name) else {
                conflicts.push(format!(
                    "tool `{name}` is not in the document: its overrides are not applied"
                ));
                continue;
            };
            changes.apply(name, &mut tool.args, &mut conflicts)?;
        }
        Ok(conflicts)
    }
}

impl ToolOverrides {
    fn apply(
        &self,
        tool: &str,
        args: &mut Vec<Field>,
        conflicts: &mut Vec<String>,
    ) -> Result<(), String> {
        for name in &self.remove {
            match args.iter().position(|a| a.name == *name) {
                Some(at) => {
                    args.remove(at);
                }
                None => conflicts.push(format!(
                    "{tool}: remove `{name}`: the document does not declare it: the override can go"
                )),
            }
        }
        for (key, ty) in &self.replace {
            let field = override_field(tool, key, ty)?;
            match args.iter().position(|a| a.name == field.name) {
                Some(at) => {
                    if same(&args[at], &field) {
                        conflicts.push(format!(
                            "{tool}: replace `{key}`: the document now declares it so: the override can go"
                        ));
                    }
                    args[at] = field;
                }
                None => conflicts.push(format!(
                    "{tool}: replace `{key}`: the document no longer declares it: not applied (under `add:` it would be)"
                )),
            }
        }
        for (key, ty) in &self.add {
            let field = override_field(tool, key, ty)?;
            match args.iter().position(|a| a.name == field.name) {
                Some(at) if same(&args[at], &field) => {
                    conflicts.push(format!(
                        "{tool}: add `{key}`: the document now declares it so: the override can go"
                    ));
                }
                Some(at) => {
                    conflicts.push(format!(
                        "{tool}: add `{key}`: the document now declares it as {}: the override's type is applied",
                        render_record(std::slice::from_ref(&args[at]))
                    ));
                    args[at] = field;
                }
                None => args.push(field),
            }
        }
        Ok(())
    }
}

/// An argument as an override writes it: `name` or `name?`, and a Cedar type, checked.
fn override_field(tool: &str, key: &str, ty: &str) -> Result<Field, String> {
    let (name, required) = match key.strip_suffix('?') {
        Some(name) => (name, false),
        None => (key, true),
    };
    let mut rest = ty.trim();
    let sensitive = match rest.strip_prefix("@sensitive") {
        Some(after) => {
            rest = after.trim_start();
            true
        }
        None => false,
    };
    let ty = match rest.strip_prefix("@json") {
        Some(after) => format!("@json {}", after.trim_start()),
        None => rest.to_string(),
    };
    let field = Field {
        name: name.to_string(),
        required,
        ty,
        sensitive,
    };
    let checked = format!(
        "namespace Toolgate {{ type Checked = {}; }}",
        render_record(std::slice::from_ref(&field))
    );
    // One type and nothing else: text that closes the record and declares more is refused.
    let one_type = toolgate_policy::parse_fragment(Path::new("override"), &checked)
        .ok()
        .and_then(|(_, json)| json.as_object().cloned())
        .is_some_and(|namespaces| {
            namespaces.len() == 1
                && namespaces.get("Toolgate").is_some_and(|ns| {
                    let count = |key: &str| {
                        ns.get(key)
                            .and_then(|v| v.as_object())
                            .map_or(0, |m| m.len())
                    };
                    // The record has exactly the one attribute: `String, other: Long` would
                    // declare another argument unseen by the conflict report.
                    let attributes = ns
                        .pointer("/commonTypes/Checked/attributes")
                        .and_then(|a| a.as_object());
                    count("commonTypes") == 1
                        && count("entityTypes") == 0
                        && count("actions") == 0
                        && attributes.is_some_and(|a| a.len() == 1 && a.contains_key(name))
                })
        });
    if !one_type {
        return Err(format!(
            "overrides: {tool}: `{key}: {}`: not a Cedar type (as the schema writes one)",
            field.ty
        ));
    }
    Ok(field)
}

fn same(a: &Field, b: &Field) -> bool {
    let spaceless = |t: &str| t.split_whitespace().collect::<String>();
    a.name == b.name
        && a.required == b.required
        && a.sensitive == b.sensitive
        && spaceless(&a.ty) == spaceless(&b.ty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openapi_cmd::Route;

    fn tool(name: &str, args: Vec<Field>) -> Tool {
        Tool {
            route: Route {
                tool: name.into(),
                method: "POST".into(),
                path: "/x".into(),
                arguments: None,
                header_arguments: Vec::new(),
            },
            summary: None,
            args,
        }
    }

    fn field(name: &str, required: bool, ty: &str) -> Field {
        Field {
            name: name.into(),
            required,
            ty: ty.into(),
            sensitive: false,
        }
    }

    #[test]
    fn overrides_apply_and_stale_ones_are_reported() {
        let overrides: Overrides = serde_json::from_value(serde_json::json!({"tools": {
            "create": {
                "add": {"From?": "String", "note": "@sensitive String", "size": "Long"},
                "replace": {"incident": "{ service: { id: String } }", "gone": "Long", "kind": "String"},
                "remove": ["bridge", "missing"]
            },
            "vanished": {"remove": ["x"]}
        }}))
        .unwrap();
        let mut tools = vec![tool(
            "create",
            vec![
                field("incident", false, "{ title?: String }"),
                field("bridge", false, "String"),
                field("kind", true, "String"),
                field("size", true, "String"),
            ],
        )];
        let conflicts = overrides.apply(&mut tools).unwrap();
        assert_eq!(
            render_record(&tools[0].args),
            "{ incident: { service: { id: String } }, kind: String, size: Long, From?: String, @sensitive note: String }"
        );
        assert_eq!(
            conflicts,
            [
                "create: remove `missing`: the document does not declare it: the override can go",
                "create: replace `gone`: the document no longer declares it: not applied (under `add:` it would be)",
                "create: replace `kind`: the document now declares it so: the override can go",
                "create: add `size`: the document now declares it as { size: String }: the override's type is applied",
                "tool `vanished` is not in the document: its overrides are not applied",
            ]
        );
        let bad: Overrides = serde_json::from_value(
            serde_json::json!({"tools": {"create": {"add": {"x": "Set<"}}}}),
        )
        .unwrap();
        let err = bad.apply(&mut tools).expect_err("refused");
        assert!(err.contains("not a Cedar type"), "{err}");
        let smuggled: Overrides = serde_json::from_value(serde_json::json!({"tools": {"create": {
            "add": {"x": "String }; entity Evil = { y: Long"}
        }}}))
        .unwrap();
        assert!(smuggled.apply(&mut tools).is_err());
        // A second attribute in the type's text: it would declare another argument.
        let another: Overrides = serde_json::from_value(serde_json::json!({"tools": {"create": {
            "replace": {"kind": "String, size: Long"}
        }}}))
        .unwrap();
        assert!(another.apply(&mut tools).is_err());
        assert!(serde_json::from_value::<Overrides>(
            serde_json::json!({"tools": {"create": {"rename": {}}}})
        )
        .is_err());
    }
}
