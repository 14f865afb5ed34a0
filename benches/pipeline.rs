//! Micro-benchmarks of the per-call steps: authenticate (cached / uncached), authorize
//! (indexed / whole set) and mint. Figures are in docs/benchmarks.md.

use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::{json, Map, Value};
use toolgate_credential::{Grant, Minter, SigningKey};
use toolgate_identity::{Authenticator, IssuerConfig, KeySource};
use toolgate_policy::{AuthzRequest, Env, PolicyEngine, Principal, Resource};

fn authorize(c: &mut Criterion) {
    let engine =
        PolicyEngine::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap();
    let agent = Map::new();
    let user: Map<String, Value> = json!({"patient_id": "p-100"}).as_object().unwrap().clone();
    let request = AuthzRequest {
        agent: Principal {
            id: "assistant",
            claims: &agent,
        },
        user: Some(Principal {
            id: "alice",
            claims: &user,
        }),
        action: "records/get_patient_record",
        resource: Resource::Tool {
            upstream: "records",
            tool: "get_patient_record",
        },
        args: json!({"patient_id": "p-100"}).as_object().unwrap().clone(),
        env: Env {
            source_ip: "10.1.2.3".parse().unwrap(),
            time: chrono::Utc::now(),
        },
        task: None,
        issuer: "",
        approval: None,
        usage: None,
    };
    assert!(engine.authorize(&request).allowed);
    let mut group = c.benchmark_group("authorize");
    group.bench_function("indexed", |b| {
        b.iter(|| black_box(engine.authorize(black_box(&request))))
    });
    group.bench_function("whole_set", |b| {
        b.iter(|| black_box(engine.authorize_unindexed(black_box(&request))))
    });
    group.finish();
}

fn mint(c: &mut Criterion) {
    let (key, _) = SigningKey::generate().unwrap();
    let minter = Minter::new(key, "https://toolgate.bench", 60);
    let grant = Grant {
        user: Some("alice"),
        agent: "assistant",
        audience: "https://records.internal",
        scope: vec!["records/get_patient_record".into()],
        decision_id: "0190c0de-0000-7000-8000-000000000000",
        task_id: None,
        not_after: None,
    };
    c.bench_function("mint/es256", |b| {
        b.iter(|| black_box(minter.mint(black_box(&grant), 1_800_000_000).unwrap()))
    });
}

fn authenticate(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (idp, _) = SigningKey::generate().unwrap();
    let dir = std::env::temp_dir().join(format!("toolgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("idp.jwks.json");
    std::fs::write(&jwks, json!({"keys": [idp.public_jwk()]}).to_string()).unwrap();
    let auth = runtime
        .block_on(Authenticator::new(vec![IssuerConfig {
            issuer: "https://idp.bench".into(),
            audiences: vec!["toolgate".into()],
            keys: KeySource::File(jwks),
            id_prefix: String::new(),
            refetch_interval: toolgate_identity::REFETCH_INTERVAL,
            names: Default::default(),
            leeway_seconds: toolgate_identity::LEEWAY_SECONDS,
        }]))
        .unwrap();
    let now = toolgate_identity::unix_now();
    let cached = idp
        .sign(
            "JWT",
            &json!({"iss": "https://idp.bench", "aud": "toolgate", "sub": "alice",
                             "act": {"sub": "assistant"}, "exp": now + 3600}),
        )
        .unwrap();
    runtime.block_on(auth.authenticate(&cached)).unwrap();
    let mut group = c.benchmark_group("authenticate");
    group.bench_function("cached", |b| {
        b.iter(|| {
            runtime
                .block_on(auth.authenticate(black_box(&cached)))
                .unwrap()
        })
    });
    group.bench_function("uncached_es256", |b| {
        b.iter(|| {
            runtime
                .block_on(auth.verify_uncached(black_box(&cached)))
                .unwrap()
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, authorize, mint, authenticate);
criterion_main!(benches);
