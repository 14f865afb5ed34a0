//! Any token: the verifier answers, and nothing without a trusted key's signature passes.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use toolgate_identity::{
    Authenticator, ClaimNames, IssuerConfig, KeySource, LEEWAY_SECONDS, REFETCH_INTERVAL,
};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
});

static AUTHENTICATOR: LazyLock<Authenticator> = LazyLock::new(|| {
    let jwks = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/idp-extra.jwks.json");
    RUNTIME
        .block_on(Authenticator::new(vec![IssuerConfig {
            issuer: "https://idp.test".into(),
            audiences: vec!["toolgate".into()],
            keys: KeySource::File(jwks),
            id_prefix: String::new(),
            refetch_interval: REFETCH_INTERVAL,
            names: ClaimNames::default(),
            leeway_seconds: LEEWAY_SECONDS,
        }]))
        .unwrap()
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let verified = RUNTIME.block_on(AUTHENTICATOR.verify_uncached(token));
    assert!(verified.is_err(), "an unsigned token was accepted: {token}");
});
