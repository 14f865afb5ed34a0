//! Differential property test: for generated REST and MCP requests, whatever the gateway
//! forwards parses, with a strict parser and with a case-insensitive, last-key-wins one (as Go,
//! Jackson or .NET may be set to read it), to exactly the arguments the policy was given: the
//! strict parse of what the agent sent. What it cannot forward that way it refuses, and then
//! the upstream receives nothing.

mod common;

use common::*;
use proptest::prelude::*;
use serde_json::{Map, Value};
use toolgate_mcp::json::{fold_key, parse_strict};

const MCP_SCHEMA: &str = r#"namespace Toolgate {
  action "tools/add" in [call] appliesTo { principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { a: Long, b: Long } } };
}"#;
const MCP_POLICY: &str =
    r#"permit (principal, action == Toolgate::Action::"tools/add", resource);"#;

/// Keys that collide with each other under case folding, and some that do not.
const KEYS: [&str; 10] = [
    "amount",
    "Amount",
    "reason",
    "REASON",
    "rea\u{17f}on",
    "note",
    "Note",
    "k",
    "\u{212a}",
    "extra",
];

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..500).prop_map(|n| n.to_string()),
        "[a-z ;&+%=\"\\\\é]{0,6}".prop_map(|s| Value::String(s).to_string()),
        (0i64..9).prop_map(|n| format!("{{\"x\": {n}, \"X\": {n}}}")),
        (0i64..9).prop_map(|n| format!("{{\"y\":[{n}, \"\\u00e9\"]}}")),
    ]
}

/// A JSON object written by hand, so it may hold duplicate and case-folded keys, with
/// arbitrary white space.
fn object(fixed: &'static str) -> impl Strategy<Value = String> {
    (
        prop::collection::vec((prop::sample::select(&KEYS[..]), value()), 0..4),
        prop::sample::select(vec!["", " ", "\n  ", "\t"]),
    )
        .prop_map(move |(pairs, ws)| {
            let mut members = vec![fixed.to_string()];
            members.extend(
                pairs
                    .iter()
                    .map(|(k, v)| format!("{ws}{}{ws}:{ws}{v}", Value::String(k.to_string()))),
            );
            format!("{{{}{ws}}}", members.join(","))
        })
}

/// Reads JSON as a lenient upstream may: duplicate keys resolved last-wins, keys matched
/// without regard to case.
fn lax(bytes: &[u8]) -> Value {
    fn fold(v: Value) -> Value {
        match v {
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    out.insert(fold_key(&k), fold(v));
                }
                Value::Object(out)
            }
            Value::Array(items) => Value::Array(items.into_iter().map(fold).collect()),
            other => other,
        }
    }
    fold(serde_json::from_slice(bytes).expect("the upstream can parse it"))
}

/// What a case-insensitive reader must find for the policy's arguments: every key under its
/// folded form, holding the very value the policy read. Two keys of one fold cannot both be
/// read so: that is a differential, and it never compares equal.
fn folded(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                if out.insert(fold_key(k), folded(v)).is_some() {
                    return Value::String(format!("keys that fold together: {k}"));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(folded).collect()),
        other => other.clone(),
    }
}

/// Query pairs as three common decoders read them: forms (`+` is a space), RFC 3986 (`+` is a
/// plus), and with `;` as a second separator (older Python, some Java containers).
fn query_readings(query: &str) -> Vec<Vec<(String, String)>> {
    let form: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let rfc3986 = query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let d = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .unwrap()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect();
    let semicolons = query
        .split(['&', ';'])
        .flat_map(|p| {
            form_urlencoded::parse(p.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    vec![form, rfc3986, semicolons]
}

fn query_pair() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["customer", "Customer", "limit", "note", "tag"]),
        "[a-z0-9 +;%/=é]{0,5}",
    )
        .prop_map(|(k, v)| {
            // Encode some characters, leave others raw, as agents do.
            let v: String = v
                .chars()
                .map(|c| match c {
                    ' ' => "+".to_string(),
                    '%' => "%25".to_string(),
                    'é' => "%C3%A9".to_string(),
                    '/' => "%2F".to_string(),
                    other => other.to_string(),
                })
                .collect();
            format!("{k}={v}")
        })
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    upstream: Upstream,
    gw: Gateway,
    token: String,
}

impl Harness {
    fn new() -> Harness {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (upstream, gw) = runtime.block_on(async {
            let upstream = Upstream::start().await;
            let gw = Gateway::start(GatewayOptions {
                upstream: upstream.addr,
                extra_policies: &[("tools.cedarschema", MCP_SCHEMA), ("mcp.cedar", MCP_POLICY)],
                inbound: None,
                mcp: Some(format!("http://{}/mcp", upstream.addr)),
                extra_config: "",
            })
            .await;
            (upstream, gw)
        });
        let token = gw.idp.delegated();
        Harness {
            runtime,
            upstream,
            gw,
            token,
        }
    }

    /// Sends; returns the status and what the upstream received (if anything).
    fn send(&self, method: &str, path: &str, body: &str) -> (u16, Option<Recorded>) {
        let before = self.upstream.requests().len();
        let auth = format!("Bearer {}", self.token);
        let answer = self.runtime.block_on(send(
            method,
            &self.gw.url(path),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
        ));
        let seen = self.upstream.requests();
        assert!(seen.len() <= before + 1);
        (answer.status.as_u16(), seen.get(before).cloned())
    }
}

/// What the upstream must read, given what the agent sent: `Some(args)` when the gateway's
/// strict parser accepts it, or `None` when it must be refused.
fn forwarded_must_equal(sent: &str) -> Option<Value> {
    parse_strict(sent.as_bytes(), 32).ok()
}

#[test]
fn forwarded_arguments_parse_the_same_for_every_parser() {
    let h = Harness::new();
    let config = ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        refund in object("\"invoice_id\": 42"),
        mcp_args in object("\"a\": 1, \"b\": 2"),
        query in prop::collection::vec(query_pair(), 1..4),
    )| {
        // REST body
        let (status, seen) = h.send("POST", "/billing/refunds", &refund);
        match forwarded_must_equal(&refund) {
            None => {
                prop_assert_eq!(status, 400, "{}", refund);
                prop_assert!(seen.is_none());
            }
            Some(policy_args) => {
                // Allowed or denied by policy; what is forwarded is what the policy read.
                if let Some(seen) = seen {
                    let strict = parse_strict(&seen.body, 32).expect("the canonical form is strict JSON");
                    prop_assert_eq!(&strict, &policy_args);
                    prop_assert_eq!(lax(&seen.body), folded(&policy_args));
                } else {
                    prop_assert!(status == 403 || status == 400, "{} {}", status, refund);
                }
            }
        }

        // MCP arguments
        let message = format!(r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"add","arguments":{mcp_args}}}}}"#);
        let (status, seen) = h.send("POST", "/tools", &message);
        match forwarded_must_equal(&mcp_args) {
            None => {
                prop_assert_eq!(status, 400, "{}", mcp_args);
                prop_assert!(seen.is_none());
            }
            Some(policy_args) => {
                if let Some(seen) = seen {
                    let strict = parse_strict(&seen.body, 32).unwrap();
                    prop_assert_eq!(&strict["params"]["arguments"], &policy_args);
                    prop_assert_eq!(&lax(&seen.body)["params"]["arguments"], &folded(&policy_args));
                } else {
                    // Only a type the schema refuses (a: Long) denies here.
                    prop_assert_eq!(status, 200);
                }
            }
        }

        // REST query: every decoder reads the forwarded query as the policy read the original.
        let raw = query.join("&");
        let (status, seen) = h.send("GET", &format!("/billing/invoices?{raw}"), "");
        let policy_pairs = query_readings(&raw).remove(0);
        if let Some(seen) = seen {
            prop_assert_eq!(status, 200);
            let forwarded = seen.uri.split_once('?').map(|(_, q)| q.to_string()).unwrap_or_default();
            for reading in query_readings(&forwarded) {
                prop_assert_eq!(&reading, &policy_pairs, "{} -> {}", raw, forwarded);
            }
        } else {
            prop_assert!(status == 400 || status == 403, "{} {}", status, raw);
        }
    });
}
