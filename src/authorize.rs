//! `toolgate authorize`: one offline decision from a request file, through the same
//! engine (and index) that `serve` uses.

use std::path::Path;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use toolgate_gateway::Config;
use toolgate_policy::{
    AuthzRequest, Decision, Env, PolicyEngine, Principal, Resource, TaskContext,
};

/// A decision request as written by people: JSON or YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFile {
    pub agent: String,
    #[serde(default)]
    pub agent_claims: Map<String, Value>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub user_claims: Map<String, Value>,
    /// `<upstream>/<tool>`, `list` or `start_task`.
    pub action: String,
    /// `<upstream>/<tool>` or `task:<id>`; by default the tool the action names.
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub args: Map<String, Value>,
    #[serde(default)]
    pub env: EnvFile,
    #[serde(default)]
    pub task: Option<TaskFile>,
    /// The issuer of the caller's token (`context.issuer` where the schema declares it).
    #[serde(default)]
    pub issuer: String,
    /// Usage counters' values before the call (`context.usage` where the schema declares it),
    /// to test limits offline.
    #[serde(default)]
    pub usage: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvFile {
    #[serde(default)]
    pub source_ip: Option<std::net::IpAddr>,
    #[serde(default)]
    pub time: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    pub id: String,
    #[serde(default)]
    pub intent: String,
    #[serde(default)]
    pub approved: bool,
    #[serde(default)]
    pub approved_by: Option<String>,
    /// The task's owner (default: the calling agent) and its user (default: the caller's).
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub owner_user: Option<String>,
}

impl RequestFile {
    pub fn decide(&self, engine: &PolicyEngine) -> Result<Decision, String> {
        let resource_name = self.resource.clone().unwrap_or_else(|| self.action.clone());
        let resource = match resource_name.strip_prefix("task:") {
            Some(id) => Resource::Task { id },
            None => {
                let (upstream, tool) = resource_name.split_once('/').ok_or_else(|| {
                    format!("resource `{resource_name}`: expected <upstream>/<tool> or task:<id>")
                })?;
                Resource::Tool { upstream, tool }
            }
        };
        let request = AuthzRequest {
            agent: Principal {
                id: &self.agent,
                claims: &self.agent_claims,
            },
            user: self.user.as_deref().map(|id| Principal {
                id,
                claims: &self.user_claims,
            }),
            action: &self.action,
            resource,
            args: self.args.clone(),
            env: Env {
                source_ip: self.env.source_ip.unwrap_or([127, 0, 0, 1].into()),
                time: self.env.time.unwrap_or_else(Utc::now),
            },
            task: self.task.as_ref().map(|t| TaskContext {
                id: t.id.clone(),
                intent: t.intent.clone(),
                approved: t.approved,
                approved_by: t.approved_by.clone(),
                owner: t.owner.clone().unwrap_or_else(|| self.agent.clone()),
                owner_user: t.owner_user.clone().or_else(|| self.user.clone()),
            }),
            issuer: &self.issuer,
            approval: None,
            usage: self.usage.clone(),
        };
        Ok(engine.authorize(&request))
    }
}

pub fn run(config_path: &Path, request_path: &Path, explain: bool) -> Result<ExitCode, String> {
    let config = Config::load(config_path)?;
    let engine = PolicyEngine::load(&config.policies).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(request_path)
        .map_err(|e| format!("{}: {e}", request_path.display()))?;
    let request: RequestFile =
        serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", request_path.display()))?;
    let decision = request.decide(&engine)?;
    let mut out = json!({
        "decision": if decision.allowed { "allow" } else { "deny" },
        "policies": decision.policies,
        "errors": decision.errors,
    });
    if let Some(shadow) = &decision.shadow {
        out["shadow"] = json!({
            "decision": if shadow.allowed { "allow" } else { "deny" },
            "policies": shadow.policies,
            "errors": shadow.errors,
            "flipped_by": shadow.flipped_by,
        });
    }
    if explain {
        // Where each determining policy is written.
        out["policies"] = decision
            .policies
            .iter()
            .map(|id| match engine.source(id) {
                Some(s) => json!({"id": id, "file": s.file.display().to_string(), "line": s.line}),
                None => json!({"id": id}),
            })
            .collect();
        out["grants"] = json!(decision.grants);
    }
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}
