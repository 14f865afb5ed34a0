#!/usr/bin/env bash
# Two toolgate binaries side by side in one run: saturation throughput of the full REST pipeline
# (cached token, nginx `return 200` backend), alternating A and B each round, pinned like
# compare.sh (oha on core 0; backend and gateway on core 1). For "did this change help":
#   git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release)
#   benches/ab.sh /tmp/base/target/release/toolgate target/release/toolgate [rounds] [seconds]
# Prints each run and the median of each binary; fails on any non-2xx answer.
# AB_KIND=mcp measures an MCP tools/call instead (the backend answers a fixed result).
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
kind=${AB_KIND:-rest}
echo '{"tools": [{"name": "add", "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}]}' > "$work/tools.json"
"$bin" schema mcp --upstream tools --from "$work/tools.json" > "$work/policies/tools.cedarschema"
echo '@id("bench-add") permit (principal, action == Toolgate::Action::"tools/add", resource) when { context.args.a < 100 };' > "$work/policies/bench.cedar"
{
  config_head "$nginx_port"
  printf '  - { name: tools, url: "http://127.0.0.1:%s/mcp", audience: https://tools.bench, kind: mcp }\n' "$nginx_port"
  echo "audit: { path: audit.jsonl }"; echo "reload: { watch: false }"
} > "$work/ab.yaml"
if [ "$kind" = mcp ]; then
  target=(-m POST -H "Content-Type: application/json" -H "Accept: application/json, text/event-stream"
    -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3}}}' /tools)
else
  target=(/billing/invoices/1)
fi
token=$("$bin" token --config "$work/ab.yaml" --key "$work/idp.pem" --iss https://idp.bench --sub alice --act assistant)
declare -A runs
for round in $(seq "$rounds"); do
  for which in A B; do
    bin=$a; [ "$which" = B ] && bin=$b
    serve_announced ab
    pid=$!
    url="http://127.0.0.1:$listen_port${target[-1]}"
    out=$(taskset -c "$load_cpu" "$oha" -z "${seconds}s" -c 32 --no-tui -H "Authorization: Bearer $token" \
      "${target[@]:0:${#target[@]}-1}" "$url")
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
