#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets) for a while: the route classifier, the
# JSON-RPC/MCP parser, the SSE rewriter and the JWT verifier. Needs a nightly toolchain; where
# there is none it says so and does nothing (the same parsers have proptest properties in the
# normal suite). cargo-fuzz is installed from crates.io under target/fuzz-tools when missing.
# Usage: scripts/fuzz.sh [seconds per target]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain here; skipped (the proptest properties ran in scripts/test.sh)"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  tools=$PWD/target/fuzz-tools
  [ -x "$tools/bin/cargo-fuzz" ] || cargo install cargo-fuzz --locked --root "$tools" -q
  export PATH="$tools/bin:$PATH"
fi
for target in route_classifier jsonrpc sse_rewrite jwt; do
  echo "fuzz: $target for ${seconds}s"
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
