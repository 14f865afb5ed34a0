//! Which arguments policies read, per action: a value no policy reads may be forwarded in a
//! form Cedar cannot hold (a decimal with more than 4 fraction digits), since nothing decides
//! on it. Found in the policies' conditions (`context.args.<path>`, `has` included); a policy
//! naming `context` or `context.args` as a whole reads everything.

use std::collections::BTreeSet;

use serde_json::Value;

/// The argument paths (`amount`, `payment.card`; a set's elements by the set's path) that the
/// policies of one action read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ArgReads {
    /// Read as a whole (or not known): every argument counts as read.
    #[default]
    All,
    Paths(BTreeSet<String>),
}

impl ArgReads {
    pub fn none() -> ArgReads {
        ArgReads::Paths(BTreeSet::new())
    }

    /// Whether a policy reads the argument at `path`: the path itself, a record holding it, or
    /// a field inside it.
    pub fn reads(&self, path: &str) -> bool {
        let ArgReads::Paths(paths) = self else {
            return true;
        };
        let within = |outer: &str, inner: &str| {
            inner == outer
                || inner
                    .strip_prefix(outer)
                    .is_some_and(|rest| rest.starts_with('.'))
        };
        paths
            .iter()
            .any(|read| within(read, path) || within(path, read))
    }

    pub fn add(&mut self, other: &ArgReads) {
        match (&mut *self, other) {
            (ArgReads::All, _) => {}
            (_, ArgReads::All) => *self = ArgReads::All,
            (ArgReads::Paths(mine), ArgReads::Paths(theirs)) => mine.extend(theirs.iter().cloned()),
        }
    }

    /// The arguments one policy reads, from its JSON form (`Policy::to_json`).
    pub fn of_policy(policy: &Value) -> ArgReads {
        let mut reads = ArgReads::none();
        for condition in policy
            .get("conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            walk(condition.get("body").unwrap_or(&Value::Null), &mut reads, 0);
        }
        reads
    }
}

/// Deeper expressions than this are read as reading everything (bounded work).
const MAX_DEPTH: usize = 200;

fn walk(expr: &Value, reads: &mut ArgReads, depth: usize) {
    if depth > MAX_DEPTH {
        *reads = ArgReads::All;
        return;
    }
    match expr {
        Value::Object(fields) => {
            if fields.get("Var").and_then(Value::as_str) == Some("context") {
                *reads = ArgReads::All;
                return;
            }
            for op in [".", "has"] {
                if let Some(access) = fields.get(op) {
                    if let Some(chain) = context_chain(access, depth) {
                        note(chain, reads);
                        return;
                    }
                }
            }
            for value in fields.values() {
                walk(value, reads, depth + 1);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, reads, depth + 1);
            }
        }
        _ => {}
    }
}

/// `context.a.b.c` as `[a, b, c]`, when the access starts at `context`.
fn context_chain(access: &Value, depth: usize) -> Option<Vec<&str>> {
    let attr = access.get("attr")?.as_str()?;
    let left = access.get("left")?;
    if depth > MAX_DEPTH {
        return None;
    }
    if left.get("Var").and_then(Value::as_str) == Some("context") {
        return Some(vec![attr]);
    }
    let mut chain = context_chain(left.get(".")?, depth + 1)?;
    chain.push(attr);
    Some(chain)
}

fn note(chain: Vec<&str>, reads: &mut ArgReads) {
    match chain.split_first() {
        Some((&"args", [])) => *reads = ArgReads::All,
        Some((&"args", path)) => {
            if let ArgReads::Paths(paths) = reads {
                paths.insert(path.join("."));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads_of(text: &str) -> ArgReads {
        let policy: cedar_policy::Policy = text.parse().unwrap();
        ArgReads::of_policy(&policy.to_json().unwrap())
    }

    #[test]
    fn argument_paths_are_found_in_conditions() {
        let paths = |list: &[&str]| ArgReads::Paths(list.iter().map(|s| s.to_string()).collect());
        for (policy, want) in [
            ("permit(principal, action, resource);", paths(&[])),
            (
                "permit(principal, action, resource) when { context.args.amount < 5 };",
                paths(&["amount"]),
            ),
            (
                "permit(principal, action, resource) when { context.args has memo && context.args.memo.to == \"x\" };",
                paths(&["memo", "memo.to"]),
            ),
            (
                "permit(principal, action, resource) when { context[\"args\"][\"rate\"].lessThan(decimal(\"1.0\")) };",
                paths(&["rate"]),
            ),
            (
                "permit(principal, action, resource) when { context.env.hour < 5 && context.user == principal };",
                paths(&[]),
            ),
            (
                "permit(principal, action, resource) when { context.args == {} };",
                ArgReads::All,
            ),
            (
                "permit(principal, action, resource) when { context has args };",
                ArgReads::All,
            ),
            (
                "forbid(principal, action, resource) unless { context == {} };",
                ArgReads::All,
            ),
        ] {
            assert_eq!(reads_of(policy), want, "{policy}");
        }
    }

    #[test]
    fn a_read_covers_what_is_inside_and_around_it() {
        let reads = reads_of(
            "permit(principal, action, resource) when { context.args.payment.amount > 1 };",
        );
        assert!(reads.reads("payment.amount"));
        assert!(reads.reads("payment"));
        assert!(reads.reads("payment.amount.cents"));
        assert!(!reads.reads("payment.amounts"));
        assert!(!reads.reads("rate"));
        assert!(ArgReads::All.reads("anything"));
    }
}
