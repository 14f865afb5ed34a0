//! A decision at 10, 1,000 and 10,000 policies spread over 1,000 tool actions: indexed
//! (only the policies of the request's action) vs the whole set. Criterion gives the
//! medians; a plain timing pass then prints p50 and p99 of each. Figures in docs/benchmarks.md.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::{json, Map};
use toolgate_policy::{AuthzRequest, Env, PolicyEngine, Principal, Resource};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

fn engine(policies: usize) -> PolicyEngine {
    let dir = std::env::temp_dir().join(format!(
        "toolgate-decision-{policies}-{}",
        std::process::id()
    ));
    toolgate_policy::testing::write_policy_dir(&dir, 1_000, policies, 10).unwrap();
    let engine = PolicyEngine::load(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    engine
}

fn request(claims: &Map<String, serde_json::Value>) -> AuthzRequest<'_> {
    AuthzRequest {
        agent: Principal {
            id: "agent2",
            claims,
        },
        user: Some(Principal {
            id: "alice",
            claims,
        }),
        action: "up0/tool0",
        resource: Resource::Tool {
            upstream: "up0",
            tool: "tool0",
        },
        args: json!({"amount": 50, "name": "x"})
            .as_object()
            .unwrap()
            .clone(),
        env: Env {
            source_ip: "10.0.0.1".parse().unwrap(),
            time: chrono::Utc::now(),
        },
        task: None,
        issuer: "",
        approval: None,
        usage: None,
    }
}

fn percentiles(mut f: impl FnMut(), iterations: usize) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn decisions(c: &mut Criterion) {
    // `cargo test` runs each benchmark once to prove it works; the percentile table is for
    // `cargo bench` (in a debug build, 2,000 whole-set decisions over 10,000 policies take minutes).
    let samples = |n: usize| {
        if std::env::args().any(|a| a == "--bench") {
            n
        } else {
            10
        }
    };
    let claims = Map::new();
    let mut table = Vec::new();
    for size in SIZES {
        let engine = engine(size);
        let req = request(&claims);
        assert_eq!(engine.authorize(&req), engine.authorize_unindexed(&req));
        let mut group = c.benchmark_group(format!("decision/{size}"));
        group.bench_function("indexed", |b| {
            b.iter(|| black_box(engine.authorize(black_box(&req))))
        });
        group.bench_function("whole_set", |b| {
            b.iter(|| black_box(engine.authorize_unindexed(black_box(&req))))
        });
        group.finish();
        let iterations = samples(if size >= 10_000 { 2_000 } else { 20_000 });
        let indexed = percentiles(|| drop(black_box(engine.authorize(&req))), samples(20_000));
        let whole = percentiles(
            || drop(black_box(engine.authorize_unindexed(&req))),
            iterations,
        );
        table.push((size.to_string(), indexed, whole));
    }

    // 10,000 policies on one action, each for one agent (`principal == ...`).
    let dir = std::env::temp_dir().join(format!(
        "toolgate-decision-principal-{}",
        std::process::id()
    ));
    toolgate_policy::testing::write_policy_dir(&dir, 1_000, 0, 1).unwrap();
    let text: String = (0..10_000)
        .map(|k| format!("permit (principal == Toolgate::Agent::\"agent{k}\", action == Toolgate::Action::\"up0/tool0\", resource) when {{ context.args.amount < 100 }};\n"))
        .collect();
    std::fs::write(dir.join("per-agent.cedar"), text).unwrap();
    let engine = PolicyEngine::load(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let req = request(&claims);
    assert!(engine.authorize(&req).allowed);
    let mut group = c.benchmark_group("decision/10000-one-action-per-agent");
    group.bench_function("indexed", |b| {
        b.iter(|| black_box(engine.authorize(black_box(&req))))
    });
    group.finish();
    let indexed = percentiles(|| drop(black_box(engine.authorize(&req))), samples(20_000));
    let whole = percentiles(
        || drop(black_box(engine.authorize_unindexed(&req))),
        samples(1_000),
    );
    table.push((
        "10000 on one action, one per agent".to_string(),
        indexed,
        whole,
    ));
    println!("\n| policies | indexed p50 | indexed p99 | whole set p50 | whole set p99 |");
    println!("|---|---|---|---|---|");
    for (size, (ip50, ip99), (wp50, wp99)) in table {
        println!("| {size} | {ip50:.1?} | {ip99:.1?} | {wp50:.1?} | {wp99:.1?} |");
    }
}

criterion_group!(benches, decisions);
criterion_main!(benches);
