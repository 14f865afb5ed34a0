//! Generated policy directories at scale, for benchmarks and tests (not for production use).

use std::fmt::Write as _;
use std::path::Path;

/// The action id of generated tool `i`: 100 tools per upstream.
pub fn scale_action(i: usize) -> String {
    format!("up{}/tool{i}", i / 100)
}

/// Writes `schema.cedarschema` with `actions` tool actions (args `amount: Long, name: String`)
/// and `actions * per_action` policies, each scoped `action == ...`, spread over `files` files.
pub fn write_scale_dir(
    dir: &Path,
    actions: usize,
    per_action: usize,
    files: usize,
) -> std::io::Result<()> {
    write_policy_dir(dir, actions, actions * per_action, files)
}

/// The same with `policies` policies in all: policy `k` is on action `k % actions`.
pub fn write_policy_dir(
    dir: &Path,
    actions: usize,
    policies: usize,
    files: usize,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path
            .extension()
            .is_some_and(|e| e == "cedar" || e == "cedarschema")
        {
            std::fs::remove_file(path)?;
        }
    }
    let mut schema = String::from(
        "namespace Toolgate {\n  type Env = { source_ip: ipaddr, hour: Long, time: datetime };\n  entity Upstream;\n  entity Tool in [Upstream];\n  entity Team;\n  entity Agent in [Team] { level?: Long };\n  entity User;\n  action call;\n",
    );
    for i in 0..actions {
        let _ = writeln!(
            schema,
            "  action \"{}\" in [call] appliesTo {{ principal: Agent, resource: Tool, context: {{ user?: User, env: Env, args: {{ amount: Long, name: String }} }} }};",
            scale_action(i)
        );
    }
    schema.push_str("}\n");
    std::fs::write(dir.join("schema.cedarschema"), schema)?;

    let files = files.max(1);
    let mut texts = vec![String::new(); files];
    for k in 0..policies {
        let (i, p) = (k % actions.max(1), k / actions.max(1));
        let action = scale_action(i);
        let text = &mut texts[k % files];
        let _ = match p % 4 {
            0 => writeln!(
                text,
                "permit (principal in Toolgate::Team::\"team{}\", action == Toolgate::Action::\"{action}\", resource)\nwhen {{ context.args.amount < {} }};",
                p % 7,
                100 * (p + 1)
            ),
            1 => writeln!(
                text,
                "forbid (principal, action == Toolgate::Action::\"{action}\", resource)\nwhen {{ context.args.name == \"blocked{p}\" }};"
            ),
            2 => writeln!(
                text,
                "permit (principal == Toolgate::Agent::\"agent{p}\", action == Toolgate::Action::\"{action}\", resource)\nwhen {{ context.env.hour >= {} && principal has level && principal.level > 2 }};",
                p % 24
            ),
            _ => writeln!(
                text,
                "forbid (principal, action == Toolgate::Action::\"{action}\", resource in Toolgate::Upstream::\"up{}\")\nunless {{ context has user }};",
                i / 100
            ),
        };
    }
    for (n, text) in texts.iter().enumerate() {
        std::fs::write(dir.join(format!("policies{n:03}.cedar")), text)?;
    }
    Ok(())
}
