#!/usr/bin/env bash
# Two toolgate binaries side by side in one run: saturation throughput of the full REST pipeline
# (cached token, nginx `return 200` backend), alternating A and B each round, pinned like
# compare.sh (oha on core 0; backend and gateway on core 1). For "did this change help":
#   git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release)
#   benches/ab.sh /tmp/base/target/release/toolgate target/release/toolgate [rounds] [seconds]
# Prints each run and the median of each binary; fails on any non-2xx answer.
set -euo pipefail
ulimit -n 65536 2>/dev/null || true
cd "$(dirname "$0")/.."
a=$(realpath "$1"); b=$(realpath "$2"); rounds=${3:-3}; seconds=${4:-8}
oha=$PWD/target/bench-tools/bin/oha
source benches/lib.sh
need_nginx_and_oha
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; /usr/sbin/nginx -c "$work/nginx.conf" -s stop 2>/dev/null; rm -rf "$work"' EXIT
if [ "$(nproc)" -ge 2 ]; then load_cpu=0; sut_cpu=1; else load_cpu=0; sut_cpu=0; fi
launch="taskset -c $sut_cpu"
start_backend
cp -r policies "$work/policies"
bin=$b
bench_keys
{ config_head "$nginx_port"; echo "audit: { path: audit.jsonl }"; echo "reload: { watch: false }"; } > "$work/ab.yaml"
token=$("$bin" token --config "$work/ab.yaml" --key "$work/idp.pem" --iss https://idp.bench --sub alice --act assistant)
declare -A runs
for round in $(seq "$rounds"); do
  for which in A B; do
    bin=$a; [ "$which" = B ] && bin=$b
    serve_announced ab
    pid=$!
    out=$(taskset -c "$load_cpu" "$oha" -z "${seconds}s" -c 32 --no-tui -H "Authorization: Bearer $token" \
      "http://127.0.0.1:$listen_port/billing/invoices/1")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$out" | grep -q "Success rate:.*100.00%" || { echo "$which: not every answer was a success" >&2; echo "$out" >&2; exit 1; }
    if echo "$out" | grep -qE "^\s+\[[^2][0-9]{2}\]"; then echo "$which: non-2xx answers" >&2; exit 1; fi
    rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%d", $2}')
    echo "round $round $which: $rps requests/s"
    runs[$which]="${runs[$which]:-} $rps"
  done
done
for which in A B; do
  median=$(printf '%s\n' ${runs[$which]} | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
  echo "$which median: $median requests/s ($([ "$which" = A ] && echo "$a" || echo "$b"))"
done
