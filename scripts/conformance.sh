#!/usr/bin/env bash
# The generated Cedar corpus (about 7,800 tests, 62,000 requests) through toolgate's loading,
# validation and index; about a minute in release. The hand-written tests run in scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --locked --test conformance -- --ignored --nocapture
