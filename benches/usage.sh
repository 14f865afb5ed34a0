#!/usr/bin/env bash
# What usage counters cost: REST calls through toolgate with no counters, with three counters
# (per agent, per user, per agent and tool) in memory, and the same three in Redis (one script
# per call), side by side in one run (wrk, loopback, nginx as the tool API).
# Usage: benches/usage.sh [seconds] [connections]. Installs wrk, nginx and redis-server if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-16}
command -v wrk >/dev/null && [ -x /usr/sbin/nginx ] || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx >/dev/null
}
cargo build --release -q
bin=$PWD/target/release/toolgate
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; /usr/sbin/nginx -c "$work/nginx.conf" -s stop 2>/dev/null; rm -rf "$work"' EXIT
source benches/lib.sh
declare -A pid

start_backend
up=$nginx_port
start_redis
cp -r policies "$work/policies"
# get_invoice reads three counters; a limit no bench reaches keeps every call allowed (and
# still evaluated).
sed -i 's/args: { invoice_id: Long } }/args: { invoice_id: Long }, usage?: { per_agent?: Long, per_user?: Long, per_tool?: Long } }/' \
  "$work/policies/schema.cedarschema"
grep -q 'per_tool?: Long' "$work/policies/schema.cedarschema" || { echo "schema not as expected" >&2; exit 1; }
cat > "$work/policies/limits.cedar" <<'CEDAR'
@id("bench-limit") @rate_limit
forbid (principal, action == Toolgate::Action::"billing/get_invoice", resource)
when { context has usage && context.usage has per_agent && context.usage.per_agent >= 1000000000 };
CEDAR
bench_keys

config() { # name store counters?
  { config_head "$up"; cat <<YAML; } > "$work/$1.yaml"
tasks: { store: "$2" }
audit: { path: $1-audit.jsonl }
reload: { watch: false }
YAML
  [ -z "${3:-}" ] || cat >> "$work/$1.yaml" <<YAML
usage:
  counters:
    - { name: per_agent, per: [agent], window_seconds: 60 }
    - { name: per_user, per: [user], window_seconds: 3600 }
    - { name: per_tool, per: [agent, tool], window_seconds: 60 }
YAML
}
config none memory; serve_announced none; none=$listen_port; pid[$none]=$!
config memory memory counters; serve_announced memory; mem=$listen_port; pid[$mem]=$!
config redis "redis://127.0.0.1:$redis_port" counters; serve_announced redis; red=$listen_port; pid[$red]=$!
token=$($bin token --config "$work/none.yaml" --key "$work/idp.pem" --sub alice --act assistant --claim patient_id=p-100)
printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$token" > "$work/req.lua"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, in 1/100 s

run() { # label port; also prints the gateway's CPU time per call
  local url="http://127.0.0.1:$2/billing/invoices/1" before out calls
  curl -sf -o /dev/null -H "Authorization: Bearer $token" "$url" || { echo "$1: call refused" >&2; exit 1; }
  echo "== $1"
  before=$(cpu_ticks "${pid[$2]}")
  out=$(wrk_run -t2 -c"$connections" -d"${seconds}s" --latency -s "$work/req.lua" "$url")
  echo "$out"
  calls=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "gateway CPU per call: $(( ($(cpu_ticks "${pid[$2]}") - before) * 10000 / calls )) us"
}
# Three rounds, each in another order: what runs first or last gains nothing.
systems=("no counters:$none" "three counters, memory store:$mem" "three counters, redis store:$red")
for round in 0 1 2; do
  echo "# round $((round + 1))"
  for k in 0 1 2; do
    system=${systems[$(((k + round) % 3))]}
    run "${system%:*}" "${system##*:}"
  done
done
# The counters did count: the audit lines of the Redis gateway carry their values.
grep -m1 -o '"usage":{[^}]*}' "$work/redis-audit.jsonl" || { echo "no usage in the audit" >&2; exit 1; }
