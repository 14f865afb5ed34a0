#!/usr/bin/env bash
# What tasks cost: REST calls through toolgate without a task, in a task with the memory
# store, and in a task with the Redis store (wrk, loopback, nginx as the tool API); then the
# time from `complete` on replica A to the first refusal on replica B (two gateways, one Redis).
# Usage: benches/tasks.sh [seconds] [connections]. Installs wrk, nginx and redis-server if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-16}
command -v wrk >/dev/null && [ -x /usr/sbin/nginx ] && command -v redis-server >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx redis-server >/dev/null
}
cargo build --release -q
bin=$PWD/target/release/toolgate
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; /usr/sbin/nginx -c "$work/nginx.conf" -s stop 2>/dev/null; rm -rf "$work"' EXIT
source benches/lib.sh

start_backend
up=$nginx_port
start_redis
cp -r policies "$work/policies"
bench_keys

config() { # name store
  { config_head "$up"; cat <<YAML; } > "$work/$1.yaml"
tasks: { store: "$2" }
audit: { path: $1-audit.jsonl }
reload: { watch: false }
YAML
}
config memory memory; serve_announced memory; mem=$listen_port
config redis "redis://127.0.0.1:$redis_port"; serve_announced redis; red=$listen_port
config redis-b "redis://127.0.0.1:$redis_port"; serve_announced redis-b; red_b=$listen_port
token=$($bin token --config "$work/memory.yaml" --key "$work/idp.pem" --sub alice --act assistant --claim patient_id=p-100)
start() { curl -sf -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"intent":"bench","ttl_seconds":3600}' "http://127.0.0.1:$1/v1/tasks" | python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])'; }
task_mem=$(start "$mem"); task_red=$(start "$red")

run() { # label url [task]
  local header=""
  [ -n "${3:-}" ] && header="wrk.headers[\"Toolgate-Task\"] = \"$3\""
  printf 'wrk.headers["Authorization"] = "Bearer %s"\n%s\n' "$token" "$header" > "$work/req.lua"
  curl -sf -o /dev/null -H "Authorization: Bearer $token" ${3:+-H "Toolgate-Task: $3"} "$2" || { echo "$1: call refused" >&2; exit 1; }
  echo "== $1"
  wrk_run -t2 -c"$connections" -d"${seconds}s" --latency -s "$work/req.lua" "$2"
}
run "no task (memory store)" "http://127.0.0.1:$mem/billing/invoices/1"
run "in a task, memory store" "http://127.0.0.1:$mem/billing/invoices/1" "$task_mem"
run "no task (redis store)" "http://127.0.0.1:$red/billing/invoices/1"
run "in a task, redis store" "http://127.0.0.1:$red/billing/invoices/1" "$task_red"

echo "== complete on replica A -> first refusal on replica B (redis store, 50 tasks)"
python3 - "$red" "$red_b" "$token" <<'PY'
import http.client, json, sys, time
a, b, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
auth = {"Authorization": f"Bearer {token}"}
ca, cb = http.client.HTTPConnection("127.0.0.1", a), http.client.HTTPConnection("127.0.0.1", b)
def call(conn, method, path, headers=None, body=None):
    conn.request(method, path, body=body, headers={**auth, **(headers or {})})
    r = conn.getresponse(); data = r.read(); return r.status, data
gaps = []
for _ in range(50):
    _, body = call(ca, "POST", "/v1/tasks", {"Content-Type": "application/json"}, json.dumps({"intent": "bench", "ttl_seconds": 600}))
    task = json.loads(body)["task_id"]
    assert call(cb, "GET", "/billing/invoices/1", {"Toolgate-Task": task})[0] == 200
    status, _ = call(ca, "POST", f"/v1/tasks/{task}/complete")
    done = time.perf_counter()
    assert status == 200
    # Bounded: at most 10 s (or 100,000 calls) for the refusal to show on B.
    for attempt in range(100_000):
        if call(cb, "GET", "/billing/invoices/1", {"Toolgate-Task": task})[0] == 403:
            break
        assert time.perf_counter() - done < 10, "replica B never refused the ended task"
    else:
        raise SystemExit("replica B never refused the ended task")
    gaps.append((time.perf_counter() - done) * 1000)
gaps.sort()
print(f"complete -> refusal on the other replica: p50 {gaps[len(gaps)//2]:.2f} ms, max {gaps[-1]:.2f} ms (includes one HTTP round trip to B)")
PY
