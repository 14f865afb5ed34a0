#!/usr/bin/env bash
# The generated Cedar corpus (7,809 tests, 62,472 requests, vendored in tests/data) through toolgate's loading,
# validation, index and decision; about a minute in release. The hand-written tests run in scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --locked --test conformance -- --ignored --nocapture
