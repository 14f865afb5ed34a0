//! `toolgate test PATH`: policy test files, like `opa test` for Rego. A file (or every
//! `*.yaml`/`*.yml` below a directory) names a policy directory and a list of requests with
//! the decision each must get and, optionally, the policies that must determine it.
//!
//! ```yaml
//! policies: ..                 # relative to this file
//! tests:
//!   - name: a finance agent reads an invoice for a user
//!     request: { agent: assistant, user: alice, action: billing/get_invoice, args: { invoice_id: 42 } }
//!     expect: allow
//!     policies: [billing-read]   # optional
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Deserialize;
use toolgate_policy::PolicyEngine;

use crate::authorize::RequestFile;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    policies: PathBuf,
    tests: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    request: RequestFile,
    expect: Expect,
    #[serde(default)]
    policies: Option<Vec<String>>,
}

#[derive(Deserialize, PartialEq, Eq, Clone, Copy, Debug)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

pub fn run(path: &Path) -> Result<ExitCode, String> {
    let files = test_files(path)?;
    if files.is_empty() {
        return Err(format!("{}: no *.yaml test files", path.display()));
    }
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let spec: TestFile = serde_norway::from_str(&text).map_err(|e| {
            let line = e.location().map_or(1, |l| l.line());
            format!("{}:{line}: {e}", file.display())
        })?;
        let dir = file.parent().unwrap_or(Path::new(".")).join(&spec.policies);
        let engine = PolicyEngine::load(&dir).map_err(|e| e.to_string())?;
        for case in &spec.tests {
            match check(&engine, case) {
                Ok(()) => {
                    passed += 1;
                    println!("ok   {}: {}", file.display(), case.name);
                }
                Err(why) => {
                    failed += 1;
                    println!("FAIL {}: {}: {why}", file.display(), case.name);
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check(engine: &PolicyEngine, case: &Case) -> Result<(), String> {
    let decision = case.request.decide(engine)?;
    let got = if decision.allowed {
        Expect::Allow
    } else {
        Expect::Deny
    };
    if got != case.expect {
        return Err(format!(
            "expected {:?}, got {got:?} (policies {:?}, errors {:?})",
            case.expect, decision.policies, decision.errors
        ));
    }
    if let Some(expected) = &case.policies {
        let mut expected = expected.clone();
        expected.sort();
        if expected != decision.policies {
            return Err(format!(
                "expected determining policies {expected:?}, got {:?}",
                decision.policies
            ));
        }
    }
    Ok(())
}

fn test_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut found = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let p = entry.map_err(|e| e.to_string())?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                found.push(p);
            }
        }
    }
    found.sort();
    Ok(found)
}
