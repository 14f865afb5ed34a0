//! `toolgate pin`: asks each MCP upstream for its tools and writes their definitions into the
//! lock file the config names (`tool_pins:`), for people to review in version control.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use toolgate_gateway::config::UpstreamKind;
use toolgate_gateway::pins::{Pin, PinFile};
use toolgate_gateway::Config;

pub async fn run(
    config_path: &Path,
    only: Option<&str>,
    headers: &[String],
) -> Result<ExitCode, String> {
    let config = Config::load(config_path)?;
    let lock = config
        .tool_pins
        .as_deref()
        .ok_or("the config names no tool_pins: file to write")?;
    let mut file = match lock.exists() {
        true => PinFile::read(lock)?,
        false => PinFile::default(),
    };
    let upstreams: Vec<_> = config
        .upstreams
        .iter()
        .filter(|u| u.kind == UpstreamKind::Mcp && only.is_none_or(|name| u.name == name))
        .collect();
    if upstreams.is_empty() {
        return Err(match only {
            Some(name) => format!("no MCP upstream named {name}"),
            None => "the config has no MCP upstream".into(),
        });
    }
    let mut unreachable = 0;
    for upstream in upstreams {
        match crate::schema_cmd::fetch_upstream(upstream, headers).await {
            Ok(server) => {
                let pins: BTreeMap<String, Pin> = server
                    .tools
                    .iter()
                    .filter_map(|tool| {
                        let name = tool.get("name")?.as_str()?;
                        Some((name.to_string(), Pin::of(tool)))
                    })
                    .collect();
                let before = file.upstreams.get(&upstream.name);
                println!("{}: {} tools pinned", upstream.name, pins.len());
                for line in changes(before, &pins) {
                    println!("  {line}");
                }
                file.upstreams.insert(upstream.name.clone(), pins);
            }
            Err(e) => {
                // Its pins stay as they were: an outage must not unpin (or repin) anything.
                eprintln!(
                    "warning: {}: not reached, its pins kept: {e}",
                    upstream.name
                );
                unreachable += 1;
            }
        }
    }
    file.write(lock)?;
    println!("wrote {}", lock.display());
    Ok(match unreachable {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// What a review must look at: the tools added, changed and removed since the last pin.
fn changes(before: Option<&BTreeMap<String, Pin>>, now: &BTreeMap<String, Pin>) -> Vec<String> {
    let empty = BTreeMap::new();
    let before = before.unwrap_or(&empty);
    let mut lines = Vec::new();
    for (name, pin) in now {
        match before.get(name) {
            None => lines.push(format!("added: {name}")),
            Some(old) if old.sha256 != pin.sha256 => lines.push(format!("changed: {name}")),
            Some(_) => {}
        }
    }
    for name in before.keys().filter(|name| !now.contains_key(*name)) {
        lines.push(format!("removed: {name}"));
    }
    lines
}
