//! Writes a policy directory at scale and times loading it:
//! `cargo run --release -p toolgate-policy --example scale -- DIR ACTIONS POLICIES_PER_ACTION`.
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let actions: usize = args[2].parse().unwrap();
    let per: usize = args[3].parse().unwrap();
    toolgate_policy::testing::write_scale_dir(&dir, actions, per, 10).unwrap();
    let started = Instant::now();
    let engine = toolgate_policy::PolicyEngine::load(&dir).unwrap();
    println!(
        "loaded {} policies in {:?}",
        engine.policy_count(),
        started.elapsed()
    );
}
