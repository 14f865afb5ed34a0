//! The per-action index never changes a decision: on generated policy sets and requests,
//! `authorize` (indexed) and `authorize_unindexed` (the whole set) agree exactly, including
//! determining policies, errors and grants.

use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::{json, Map};
use toolgate_policy::{
    parse_fragment, AuthzRequest, Env, Loaded, PolicyEngine, Principal, Resource,
};

const SCHEMA: &str = r#"
namespace Toolgate {
  type Env = { source_ip: ipaddr, hour: Long, time: datetime };
  entity Upstream;
  entity Tool in [Upstream];
  entity Team;
  entity Agent in [Team];
  entity User;
  action call;
  action g0 in [call];
  action g1 in [call];
  action "u0/a0" in [g0] appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env, args: { n: Long } } };
  action "u0/a1" in [g0] appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env, args: { n: Long } } };
  action "u0/a2" in [g0, g1] appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env, args: { n: Long } } };
  action "u1/a3" in [g1] appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env, args: { n: Long } } };
  action "u1/a4" in [call] appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env, args: { n: Long } } };
  action "u1/a5" appliesTo { principal: Agent, resource: Tool, context: { user?: User, env: Env, args: { n: Long } } };
}
"#;

const ACTIONS: [&str; 6] = ["u0/a0", "u0/a1", "u0/a2", "u1/a3", "u1/a4", "u1/a5"];

fn principal_scope() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("principal".to_string()),
        (0..3usize).prop_map(|i| format!("principal == Toolgate::Agent::\"p{i}\"")),
        (0..2usize).prop_map(|i| format!("principal in Toolgate::Team::\"t{i}\"")),
    ]
}

fn action_scope() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("action".to_string()),
        (0..6usize).prop_map(|i| format!("action == Toolgate::Action::\"{}\"", ACTIONS[i])),
        Just("action in Toolgate::Action::\"g0\"".to_string()),
        Just("action in [Toolgate::Action::\"g1\", Toolgate::Action::\"u1/a4\"]".to_string()),
        Just("action in Toolgate::Action::\"call\"".to_string()),
        (0..6usize, 0..6usize).prop_map(|(a, b)| format!(
            "action in [Toolgate::Action::\"{}\", Toolgate::Action::\"{}\"]",
            ACTIONS[a], ACTIONS[b]
        )),
    ]
}

fn resource_scope() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("resource".to_string()),
        (0..2usize).prop_map(|i| format!("resource in Toolgate::Upstream::\"u{i}\"")),
    ]
}

fn condition() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (-5i64..5).prop_map(|k| format!(" when {{ context.args.n > {k} }}")),
        (-5i64..5).prop_map(|k| format!(" unless {{ context.args.n == {k} }}")),
        Just(" when { context has user }".to_string()),
        Just(" when { principal in Toolgate::Team::\"t1\" }".to_string()),
        // Errs (overflow) whenever n > 0.
        Just(" when { context.args.n + 9223372036854775807 > 0 }".to_string()),
    ]
}

fn policy() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        principal_scope(),
        action_scope(),
        resource_scope(),
        condition(),
        any::<bool>(),
    )
        .prop_map(|(permit, p, a, r, c, grants)| {
            let annotation = if grants { "@grants(\"g:x\")\n" } else { "" };
            let effect = if permit { "permit" } else { "forbid" };
            format!("{annotation}{effect} ({p}, {a}, {r}){c};")
        })
}

fn engine(policies: &[String]) -> PolicyEngine {
    let path = PathBuf::from("generated.cedarschema");
    let (fragment, schema_json) = parse_fragment(&path, SCHEMA).unwrap();
    let schema = cedar_policy::Schema::from_schema_fragments([fragment]).unwrap();
    let text = policies.join("\n");
    let parsed =
        toolgate_policy::parse_policy_file(&PathBuf::from("generated.cedar"), &text).unwrap();
    let mut set = cedar_policy::PolicySet::new();
    let mut sources = std::collections::HashMap::new();
    for (policy, source) in parsed {
        sources.insert(policy.id().clone(), source);
        set.add(policy).unwrap();
    }
    PolicyEngine::from_loaded(Loaded {
        schema,
        schema_json,
        policies: set,
        sources,
        entities_json: Some(json!([
            {"uid": {"type": "Toolgate::Team", "id": "t0"}, "attrs": {}, "parents": []},
            {"uid": {"type": "Toolgate::Team", "id": "t1"}, "attrs": {}, "parents": []},
            {"uid": {"type": "Toolgate::Agent", "id": "p0"}, "attrs": {}, "parents": [{"type": "Toolgate::Team", "id": "t0"}]},
            {"uid": {"type": "Toolgate::Agent", "id": "p1"}, "attrs": {}, "parents": [{"type": "Toolgate::Team", "id": "t1"}]},
            {"uid": {"type": "Toolgate::Agent", "id": "p2"}, "attrs": {}, "parents": []}
        ])),
        entities_path: PathBuf::from("entities.json"),
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn indexed_decisions_equal_whole_set_decisions(
        policies in prop::collection::vec(policy(), 0..24),
        requests in prop::collection::vec((0..3usize, 0..6usize, -3i64..4, any::<bool>()), 1..12),
    ) {
        let engine = engine(&policies);
        let empty = Map::new();
        for (agent, action, n, delegated) in requests {
            let agent = format!("p{agent}");
            let (upstream, tool) = ACTIONS[action].split_once('/').unwrap();
            let request = AuthzRequest {
                agent: Principal { id: &agent, claims: &empty },
                user: delegated.then_some(Principal { id: "alice", claims: &empty }),
                action: ACTIONS[action],
                resource: Resource::Tool { upstream, tool },
                args: json!({"n": n}).as_object().unwrap().clone(),
                env: Env { source_ip: "10.0.0.1".parse().unwrap(), time: "2026-11-23T10:00:00Z".parse().unwrap() },
                task: None,
                issuer: "",
                approval: None,
                usage: None,
            };
            prop_assert_eq!(engine.authorize(&request), engine.authorize_unindexed(&request), "{:?}", policies);
        }
    }
}
