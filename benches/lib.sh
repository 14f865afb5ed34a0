# Shared by the bench scripts (sourced, not run). Every helper fails the script, loudly, rather
# than let a figure stand on refused requests, a server that never started or a port race.

# nginx-light (Debian) and oha (crates.io, under target/bench-tools), installed when missing.
need_nginx_and_oha() {
  [ -x /usr/sbin/nginx ] || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
  }
  [ -x target/bench-tools/bin/oha ] || cargo install oha --locked --root target/bench-tools -q
}

# A port free now (a server started on it may still lose a race: callers retry).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Servers are started through $launch when a script sets it (e.g. `taskset -c 1`).
launch=${launch:-}

# Starts `toolgate serve --config $work/$1.yaml` (whose listeners are on port 0) and sets
# $listen_port and $admin_port from its announcement; fails with its stderr if it does not start.
serve_announced() { # name
  $launch "$bin" serve --config "$work/$1.yaml" > "$work/$1.out" 2> "$work/$1.err" &
  local line=""
  for _ in $(seq 100); do
    line=$(grep -m1 '"listening"' "$work/$1.out" 2>/dev/null || true)
    [ -n "$line" ] && break
    sleep 0.1
  done
  [ -n "$line" ] || { echo "$1 did not start: $(cat "$work/$1.err")" >&2; exit 1; }
  listen_port=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["listen"].rsplit(":",1)[1])' "$line")
  admin_port=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["admin"].rsplit(":",1)[1])' "$line")
}

# The backend every comparison proxies to: nginx, one worker, a fixed JSON answer for REST and
# an MCP tools/call result under /mcp; started through $launch; sets $nginx_port.
start_backend() {
  cat > "$work/nginx.conf.in" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:@PORT@;
    location /mcp {
      default_type application/json;
      return 200 '{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"5"}],"isError":false}}';
    }
    location / { default_type application/json; return 200 '{"invoice_id":1,"amount":120}'; }
  }
}
NGINX
  start_nginx
}

# Starts nginx with $work/nginx.conf on a free port (substituted for @PORT@), trying again on
# another port if the one found free was taken meanwhile; sets $nginx_port.
start_nginx() {
  for _ in 1 2 3 4 5; do
    nginx_port=$(free_port)
    sed "s/@PORT@/$nginx_port/g" "$work/nginx.conf.in" > "$work/nginx.conf"
    $launch /usr/sbin/nginx -c "$work/nginx.conf" 2>"$work/nginx.start" && return
  done
  cat "$work/nginx.start" >&2; echo "nginx did not start" >&2; exit 1
}

# Runs wrk and prints its throughput and latency; fails if any answer was not 2xx or any socket
# error occurred (the figure would not be the pipeline's).
wrk_run() { # wrk arguments...
  local out
  out=$(wrk "$@")
  echo "$out" | grep -E "Requests/sec|requests in|^ +(50|99)%|Non-2xx|errors" || true
  if echo "$out" | grep -qE "Non-2xx|Socket errors"; then
    echo "wrk saw refused requests or socket errors: the figure above is not valid" >&2
    exit 1
  fi
}

# Keys for a bench in $work: the bench IdP's (idp.pem, idp.jwks.json) and the gateway's.
bench_keys() {
  "$bin" keygen --private "$work/idp.pem" --jwks "$work/idp.jwks.json" >/dev/null
  "$bin" keygen --private "$work/signing.pem" >/dev/null
}

# Prints what every bench config starts with: listeners on port 0, the bench IdP, the signing
# key, and a `billing` upstream at 127.0.0.1:$1 with its get_invoice route, last, so a caller
# can append more routes, then more upstreams and sections.
config_head() { # upstream-port [policies-dir]
  cat <<YAML
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
issuer: https://toolgate.bench
policies: ${2:-policies}/
inbound:
  jwt:
    - { issuer: https://idp.bench, jwks_file: idp.jwks.json, audiences: [toolgate] }
credentials: { signing_key: signing.pem }
upstreams:
  - name: billing
    url: http://127.0.0.1:$1
    audience: https://billing.bench
    routes:
      - { tool: get_invoice, method: GET, path: "/invoices/{invoice_id}" }
YAML
}

# Starts redis-server on a free port (again elsewhere if that port was taken meanwhile); sets
# $redis_port. Installed with `apt-get install redis-server` when missing.
start_redis() {
  command -v redis-server >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  }
  local pid
  for _ in 1 2 3 4 5; do
    redis_port=$(free_port)
    redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no >"$work/redis.out" 2>&1 &
    pid=$!
    for _ in $(seq 50); do
      python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2)' "$redis_port" 2>/dev/null && break
      kill -0 $pid 2>/dev/null || break
      sleep 0.1
    done
    kill -0 $pid 2>/dev/null && return
  done
  cat "$work/redis.out" >&2; echo "redis-server did not start" >&2; exit 1
}
