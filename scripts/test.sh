#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh
cargo test --workspace --all-targets --locked
