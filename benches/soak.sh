#!/usr/bin/env bash
# Soak: a few minutes of mixed load with hostile clients against one toolgate, sampling its
# memory (RSS), open file descriptors and the load's p99 every 10 s. Not a test: the figures go
# to docs/benchmarks.md. Hostile clients: slowloris headers, stalled bodies, silent and idle
# connections, a task flood and invalid tokens, all the while wrk runs allowed calls.
# Usage: benches/soak.sh [minutes] [connections]. Installs wrk and nginx if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-3}
connections=${2:-16}
command -v wrk >/dev/null && [ -x /usr/sbin/nginx ] || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx >/dev/null
}
cargo build --release -q
bin=$PWD/target/release/toolgate
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; /usr/sbin/nginx -c "$work/nginx.conf" -s stop 2>/dev/null; rm -rf "$work"' EXIT
source benches/lib.sh

cat > "$work/nginx.conf.in" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:@PORT@; location / { default_type application/json; return 200 '{"invoice_id":1}'; } } }
NGINX
start_nginx
mkdir -p "$work/policies" && cp policies/*.cedar policies/*.cedarschema policies/entities.json "$work/policies/"
bench_keys
{ config_head "$nginx_port"; cat <<YAML; } > "$work/soak.yaml"
      - { tool: refund, method: POST, path: /refunds }
tasks: { max_active_per_agent: 50 }
audit: { path: audit.jsonl }
reload: { watch: false }
limits: { header_read_seconds: 5, body_read_seconds: 5, idle_seconds: 10 }
YAML
serve_announced soak
port=$listen_port
pid=$(pgrep -f "serve --config $work/soak.yaml" | head -1)
token=$($bin token --config "$work/soak.yaml" --key "$work/idp.pem" --sub alice --act assistant)
printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$token" > "$work/req.lua"

# Hostile clients, for the whole run.
python3 - "$port" "$token" "$((minutes * 60))" > "$work/hostile.out" 2>&1 <<'PY' &
import json, socket, sys, threading, time
port, token, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
end = time.time() + seconds
def forever(what):
    def run():
        while time.time() < end:
            try:
                what()
            except OSError:
                time.sleep(0.05)
    threading.Thread(target=run, daemon=True).start()
def slowloris():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /billing/invoices/1 HTTP/1.1\r\nHost: x\r\nX-a: ")
    s.settimeout(30); s.recv(1)  # closed by the gateway
def stalled_body():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST /billing/refunds HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
    s.settimeout(30); s.recv(1024)
def silent():
    s = socket.create_connection(("127.0.0.1", port)); s.settimeout(30); s.recv(1)
def task_flood():
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"intent": "x" * 1000, "ttl_seconds": 3600})
    s.sendall(f"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
    s.settimeout(10); s.recv(4096); s.close()
def bad_tokens():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /billing/invoices/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer e30.e30.x\r\nConnection: close\r\n\r\n")
    s.settimeout(10); s.recv(4096); s.close()
for _ in range(20): forever(slowloris)
for _ in range(10): forever(stalled_body)
for _ in range(20): forever(silent)
forever(task_flood); forever(bad_tokens)
time.sleep(seconds)
PY

echo "| minute:second | RSS (MB) | open fds | wrk p99 over the last 10 s |"
echo "|---|---|---|---|"
start=$(date +%s)
while [ $(( $(date +%s) - start )) -lt $((minutes * 60)) ]; do
  p99=$(wrk -t1 -c"$connections" -d10s --latency -s "$work/req.lua" "http://127.0.0.1:$port/billing/invoices/1" \
        | awk '/ 99%/ {print $2} /Non-2xx|Socket errors/ {bad=1} END {if (bad) print "(errors)"}' | tr '\n' ' ')
  rss=$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$pid/status")
  fds=$(ls "/proc/$pid/fd" | wc -l)
  elapsed=$(( $(date +%s) - start ))
  printf '| %d:%02d | %s | %s | %s |\n' $((elapsed / 60)) $((elapsed % 60)) "$rss" "$fds" "$p99"
done
kill -0 "$pid" || { echo "toolgate died" >&2; exit 1; }
echo "audit lines: $(wc -l < "$work/audit.jsonl")"
