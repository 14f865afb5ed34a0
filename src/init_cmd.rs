//! `toolgate init [DIR]`: a project that works as it is written. The config, the base schema
//! that `import openapi` and `schema mcp` fragments build on, one example tool with its policy
//! and policy tests, an example request, and development keys (an identity provider's, to mint
//! test tokens with `toolgate token`, and the gateway's signing key). Nothing is overwritten.

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;
use toolgate_credential::SigningKey;

const CONFIG: &str = r#"# toolgate: written by `toolgate init`. README.md's configuration reference says every field.
listen: 127.0.0.1:8080          # agents call http://127.0.0.1:8080/<upstream>/...
admin_listen: 127.0.0.1:9090    # /metrics /healthz /readyz
issuer: https://toolgate.local  # `iss` of the credentials minted for each call
policies: policies/             # every *.cedarschema and *.cedar there
inbound:
  jwt:
    # Development only: tokens from `toolgate token --key idp.pem` (`toolgate keygen --private
    # idp.pem --jwks idp.jwks.json` makes a new pair). Put your identity provider here
    # (jwks_url: or discovery_url:) before any real use.
    - issuer: https://idp.example
      jwks_file: idp.jwks.json
      audiences: [toolgate]
credentials:
  signing_key: keys/toolgate-signing.pem   # the gateway's own ES256 key
  ttl_seconds: 60
upstreams:
  # One REST tool API. `toolgate import openapi` writes these entries from an API's document.
  - name: example
    url: http://127.0.0.1:9001
    audience: https://example.internal
    routes:
      - { tool: get_item, method: GET, path: "/items/{item_id}" }
audit:
  path: audit.jsonl
"#;

/// The types and actions every toolgate schema builds on.
const BASE_SCHEMA: &str = r#"// toolgate's base schema: the types every tool's action uses. Fragments written by
// `toolgate import openapi` and `toolgate schema mcp` sit beside this file.
namespace Toolgate {
  type Env = { source_ip: ipaddr, hour: Long, time: datetime };
  type TaskInfo = { id: String, intent: String, approved?: Bool, approved_by?: String };

  entity Upstream;
  entity Tool in [Upstream];
  entity Task;
  entity Team;
  // Attributes declared here are filled from token claims of the same name.
  entity Agent in [Team] { name?: String };
  entity User { department?: String };

  // Every tool action is `in [call]`; `list` decides what MCP listings show.
  action call;
  action list appliesTo {
    principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo }
  };
  action start_task appliesTo {
    principal: Agent, resource: Task,
    context: { user?: User, env: Env, task: TaskInfo }
  };
}
"#;

const EXAMPLE_SCHEMA: &str = r#"// The example tool: GET /example/items/{item_id}.
namespace Toolgate {
  action "example/get_item" in [call] appliesTo {
    principal: Agent, resource: Tool,
    context: { user?: User, env: Env, task?: TaskInfo, args: { item_id: Long } }
  };
}
"#;

const EXAMPLE_POLICY: &str = r#"// An agent may read an item when it acts for a user (the token's `act` claim).
@id("example-read")
permit (principal, action == Toolgate::Action::"example/get_item", resource)
when { context has user };
"#;

const EXAMPLE_TESTS: &str = r#"# `toolgate test policies/tests`: each request, and the decision it must get.
policies: ..
tests:
  - name: an agent acting for a user reads an item
    request: { agent: assistant, user: alice, action: example/get_item, args: { item_id: 42 } }
    expect: allow
    policies: [example-read]
  - name: an agent on its own may not
    request: { agent: assistant, action: example/get_item, args: { item_id: 42 } }
    expect: deny
"#;

const EXAMPLE_REQUEST: &str = r#"# `toolgate authorize --config toolgate.yaml --request req.yaml`
agent: assistant
user: alice
action: example/get_item
args: { item_id: 42 }
"#;

const FILES: [(&str, &str); 6] = [
    ("toolgate.yaml", CONFIG),
    ("policies/schema.cedarschema", BASE_SCHEMA),
    ("policies/example.cedarschema", EXAMPLE_SCHEMA),
    ("policies/example.cedar", EXAMPLE_POLICY),
    ("policies/tests/example.yaml", EXAMPLE_TESTS),
    ("req.yaml", EXAMPLE_REQUEST),
];

/// Where README.md's offline tour looks for them, run in the project as printed.
const KEYS: [&str; 3] = ["idp.pem", "idp.jwks.json", "keys/toolgate-signing.pem"];

pub fn run(dir: &Path) -> Result<ExitCode, String> {
    let names = FILES.iter().map(|(name, _)| *name).chain(KEYS);
    if let Some(taken) = names.map(|name| dir.join(name)).find(|path| path.exists()) {
        return Err(format!(
            "{}: exists already; init writes a new project and overwrites nothing",
            taken.display()
        ));
    }
    for (name, text) in FILES {
        write(&dir.join(name), text)?;
    }
    let (idp, idp_pem) = SigningKey::generate().map_err(|e| e.to_string())?;
    let (_, signing_pem) = SigningKey::generate().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir.join("keys")).map_err(|e| format!("{}: {e}", dir.display()))?;
    crate::write_private(&dir.join("idp.pem"), &idp_pem)?;
    crate::write_private(&dir.join("keys/toolgate-signing.pem"), &signing_pem)?;
    let jwks = json!({"keys": [idp.public_jwk()]});
    write(
        &dir.join("idp.jwks.json"),
        &serde_json::to_string_pretty(&jwks).unwrap_or_default(),
    )?;
    println!("wrote a toolgate project in {}", dir.display());
    println!("next, from there:");
    println!("  toolgate check --config toolgate.yaml");
    println!("  toolgate test policies/tests");
    println!("  toolgate authorize --config toolgate.yaml --request req.yaml");
    println!("  toolgate token --config toolgate.yaml --key idp.pem --sub alice --act assistant");
    println!("  toolgate serve --config toolgate.yaml");
    Ok(ExitCode::SUCCESS)
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
