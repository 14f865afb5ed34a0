#!/usr/bin/env bash
# MCP tools/call through toolgate vs direct, on loopback, and through a federated endpoint
# (`mcp_endpoints:`) over the same server: the added cost of the relay. nginx plays an MCP server that
# answers every POST with a fixed JSON-RPC result, so the figure is the gateway's overhead
# (authenticate, parse, authorize, mint, forward), not a tool's work.
# Usage: benches/mcp.sh [seconds] [connections]. Installs wrk and nginx if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
connections=${2:-16}
for tool in wrk nginx; do
  command -v $tool >/dev/null 2>&1 || command -v /usr/sbin/$tool >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx >/dev/null
  }
done
cargo build --release -q
bin=target/release/toolgate
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; /usr/sbin/nginx -c "$work/nginx.conf" -s stop 2>/dev/null; rm -rf "$work"' EXIT
source benches/lib.sh

cat > "$work/nginx.conf.in" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  server {
    listen 127.0.0.1:@PORT@;
    location /mcp {
      default_type application/json;
      return 200 '{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"5"}],"isError":false}}';
    }
  }
}
NGINX
start_nginx
up=$nginx_port

mkdir -p "$work/policies"
cp policies/*.cedar policies/*.cedarschema policies/entities.json "$work/policies/"
cat > "$work/tools.json" <<'JSON'
{"tools": [{"name": "add", "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}]}
JSON
$bin schema mcp --upstream tools --from "$work/tools.json" > "$work/policies/tools.cedarschema"
echo '@id("bench-add") permit (principal, action == Toolgate::Action::"tools/add", resource) when { context.args.a < 100 };' > "$work/policies/bench.cedar"
$bin keygen --private "$work/idp.pem" --jwks "$work/idp.jwks.json" >/dev/null
$bin keygen --private "$work/signing.pem" >/dev/null
cat > "$work/toolgate.yaml" <<YAML
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
issuer: https://toolgate.bench
policies: policies/
inbound:
  jwt:
    - issuer: https://idp.bench
      jwks_file: idp.jwks.json
      audiences: [toolgate]
credentials:
  signing_key: signing.pem
upstreams:
  - name: tools
    url: http://127.0.0.1:$up/mcp
    audience: https://tools.bench
    kind: mcp
mcp_endpoints:
  - name: all
    upstreams: [tools]
audit:
  path: audit.jsonl
YAML
token=$($bin token --config "$work/toolgate.yaml" --key "$work/idp.pem" --iss https://idp.bench --sub alice --act assistant)
serve_announced toolgate
gw=$listen_port

cat > "$work/call.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3}}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Authorization"] = "Bearer $token"
LUA
# Check the call is allowed through the gateway before measuring.
curl -sf -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3}}}' \
  "http://127.0.0.1:$gw/tools" | grep -q '"result"' || { echo "gateway did not allow the call" >&2; exit 1; }

# The federated endpoint's session (it holds the member's), and its call as `tools__add`.
session=$(curl -sf -D - -o /dev/null -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -H 'Accept: application/json, text/event-stream' \
  -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}' \
  "http://127.0.0.1:$gw/all" | tr -d '\r' | sed -n 's/^mcp-session-id: //Ip')
[ -n "$session" ] || { echo "the federated endpoint gave no session" >&2; exit 1; }
sed -e 's/"name":"add"/"name":"tools__add"/' "$work/call.lua" > "$work/federated.lua"
echo "wrk.headers[\"Mcp-Session-Id\"] = \"$session\"" >> "$work/federated.lua"

run() { wrk_run -t2 -c"$connections" -d"${seconds}s" --latency -s "${2:-$work/call.lua}" "$1"; }
echo "== direct: wrk -> nginx ($connections connections, ${seconds}s)"
run "http://127.0.0.1:$up/mcp"
echo "== through toolgate: wrk -> toolgate -> nginx"
run "http://127.0.0.1:$gw/tools"
echo "== federated: wrk -> toolgate /all -> toolgate /tools (in process) -> nginx"
run "http://127.0.0.1:$gw/all" "$work/federated.lua"
echo "audit lines written: $(wc -l < "$work/audit.jsonl")"
