//! Policy load and reload at scale, next to Cedar's whole-schema strict validation:
//! `cargo run --release -p toolgate-policy --example scale [MAX_POLICIES]`.
//! Sets of 10 policies per tool action (each scoped `action == ...`) in 10 files.
use std::time::{Duration, Instant};

use toolgate_policy::{load_schema, parse_policy_file, validate_whole, LoadCache, PolicyEngine};

fn main() {
    let max: usize = std::env::args()
        .nth(1)
        .map_or(10_000, |a| a.parse().unwrap());
    println!("| policies | actions | cold start | reload, one file changed | reload, schema changed | whole-schema validation alone |");
    println!("|---|---|---|---|---|---|");
    for policies in [100, 1_000, 10_000].into_iter().filter(|p| *p <= max) {
        let actions = policies / 10;
        let dir = std::env::temp_dir().join(format!("toolgate-scale-{policies}"));
        toolgate_policy::testing::write_scale_dir(&dir, actions, 10, 10).unwrap();

        let mut cache = LoadCache::default();
        let cold = time(|| PolicyEngine::load_cached(&dir, &mut cache).unwrap());

        let file = dir.join("policies003.cedar");
        let original = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{original}\npermit (principal, action == Toolgate::Action::\"up0/tool1\", resource);\n")).unwrap();
        let one_file = time(|| PolicyEngine::load_cached(&dir, &mut cache).unwrap());

        let schema = dir.join("schema.cedarschema");
        let text = std::fs::read_to_string(&schema).unwrap();
        std::fs::write(&schema, format!("// changed\n{text}")).unwrap();
        let schema_changed = time(|| PolicyEngine::load_cached(&dir, &mut cache).unwrap());

        let whole = time(|| {
            let (schema, _) = load_schema(&dir).unwrap();
            let mut set = cedar_policy::PolicySet::new();
            for n in 0..10 {
                let path = dir.join(format!("policies{n:03}.cedar"));
                let text = std::fs::read_to_string(&path).unwrap();
                for (p, _) in parse_policy_file(&path, &text).unwrap() {
                    set.add(p).unwrap();
                }
            }
            assert!(validate_whole(&schema, &set).is_empty());
        });
        println!(
            "| {policies} | {actions} | {} | {} | {} | {} |",
            ms(cold),
            ms(one_file),
            ms(schema_changed),
            ms(whole)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn time<T>(f: impl FnOnce() -> T) -> Duration {
    let started = Instant::now();
    let _ = std::hint::black_box(f());
    started.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}
