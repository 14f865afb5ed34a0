//! Any body: the JSON-RPC/MCP parser answers; an accepted message reads the same once
//! re-serialised, and its transport-header check answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolgate_mcp::{intent, parse, transport_headers_match, Payload};

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = parse(data) else {
        return;
    };
    let again = match &payload {
        Payload::Single(m) => serde_json::to_vec(m).unwrap(),
        Payload::Batch(ms) => serde_json::to_vec(ms).unwrap(),
    };
    let reparsed = parse(&again).expect("a re-serialised message parses");
    assert_eq!(reparsed, payload);
    for message in payload.messages() {
        let _ = intent(message);
    }
    let _ = transport_headers_match(&payload, Some("2026-07-28"), &["tools/call"], &["x"]);
});
