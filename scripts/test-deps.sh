#!/usr/bin/env bash
# Installs what the test suite talks to, if it is not there yet: promtool (Debian's prometheus),
# redis-server, node and npm, curl (the demo's printed lines are run as printed), jq (the
# audit filter docs/operations.md gives is run as given), the
# official MCP SDKs: Python 1.x (.toolgate-test/venv),
# Python 2.x (.toolgate-test/venv-mcp2) and TypeScript (.toolgate-test/node), and
# kubernetes-validate (.toolgate-test/venv-k8s: the Kubernetes schemas, offline, for deploy/),
# kubectl's built-in kustomize (renders deploy/kubernetes/ as `kubectl apply -k` would; kubectl
# comes with this machine kind, from the Google Cloud CLI packages, and is checked, not installed),
# and the upstream frameworks the gateway is proven against (tests/frameworks.rs): FastAPI with
# Pydantic 2 (.toolgate-test/venv-fastapi) and Express 5 with qs (.toolgate-test/node).
# Debian's Chromium with Playwright (.toolgate-test/venv-browser) for the operator console.
# Idempotent; needs root (or sudo) and the Debian package registry.
set -euo pipefail

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
# Debian's Chromium: the console is tested in a real browser (tests/console.rs, via Playwright).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)

if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "test-deps: installing ${need_apt[*]}"
  $sudo apt-get update -qq
  # The packages' services cannot (and need not) start here; the tests run their own.
  # A package's service failing to start in a container makes apt report an error although the
  # tools are installed: apt's own words are shown, and the check below decides.
  log=$(mktemp)
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    echo "test-deps: apt-get install ${need_apt[*]} reported an error (above)" >&2
  fi
  rm -f "$log"
fi
for tool in promtool redis-server node npm curl jq chromium; do
  command -v $tool >/dev/null 2>&1 || { echo "test-deps: $tool is still missing" >&2; exit 1; }
done
# Debian's kubernetes-client is too old (kustomize 2: no `patches`, no `components`).
kubectl kustomize --help >/dev/null 2>&1 \
  || { echo "test-deps: kubectl (with kustomize 5) is missing: install the Google Cloud CLI's kubectl" >&2; exit 1; }

# A Python package at an exact version in a virtualenv of the project's own, installed when
# missing; with a module name, that module must also import; more packages (pinned) may follow.
python_venv() { # dir package version [module [package==version ...]]
  local dir=$1 package=$2 version=$3 module=${4:-}
  shift 4 2>/dev/null || shift $#
  local check="import importlib.metadata as m; assert m.version('$package') == '$version'"
  [ -n "$module" ] && check="import $module; $check"
  if ! "$dir/bin/python" -c "$check" 2>/dev/null; then
    echo "test-deps: installing $package==$version $* into $dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$package==$version" "$@"
  fi
}

# The official MCP Python SDK 1.x (tests/mcp.rs uses it; PyJWT comes with it) and 2.x (the
# 2026-07-28 revision, for the SDK matrix in tests/sdk.rs).
python_venv .toolgate-test/venv mcp 1.30.0 mcp
python_venv .toolgate-test/venv-mcp2 mcp 2.3.0 mcp

# The TypeScript SDK (1.x speaks up to the 2025-11-25 revision), for the same matrix.
node_dir=".toolgate-test/node"
ts_version="1.32.2"
if [ "$(node -p "require('./$node_dir/node_modules/@modelcontextprotocol/sdk/package.json').version" 2>/dev/null)" != "$ts_version" ]; then
  echo "test-deps: installing @modelcontextprotocol/sdk@$ts_version into $node_dir"
  mkdir -p "$node_dir"
  [ -f "$node_dir/package.json" ] || echo '{"private": true}' > "$node_dir/package.json"
  (cd "$node_dir" && npm install --silent --no-audit --no-fund "@modelcontextprotocol/sdk@$ts_version")
fi

# Express 5 (its `extended` query parser is qs), beside the TypeScript SDK.
express_version="5.3.0"
if [ "$(node -p "require('./$node_dir/node_modules/express/package.json').version" 2>/dev/null)" != "$express_version" ]; then
  echo "test-deps: installing express@$express_version into $node_dir"
  (cd "$node_dir" && npm install --silent --no-audit --no-fund "express@$express_version")
fi

# MCP servers nobody here wrote, for the stdio and federation tests (tests/stdio.rs): the reference
# memory server (stdio only) and the everything server (stdio and streamable HTTP).
for server in "server-memory@2026.8.31" "server-everything@2026.8.31"; do
  name=${server%@*}
  version=${server#*@}
  if [ "$(node -p "require('./$node_dir/node_modules/@modelcontextprotocol/$name/package.json').version" 2>/dev/null)" != "$version" ]; then
    echo "test-deps: installing @modelcontextprotocol/$server into $node_dir"
    (cd "$node_dir" && npm install --silent --no-audit --no-fund "@modelcontextprotocol/$server")
  fi
done

# FastAPI on Pydantic 2, served by uvicorn (tests/frameworks.rs).
python_venv .toolgate-test/venv-fastapi fastapi 0.163.2 fastapi uvicorn==0.54.0

# Playwright drives Debian's Chromium (no browser is downloaded) for the console's browser test.
python_venv .toolgate-test/venv-browser playwright 1.57.0 playwright

# The Kubernetes schemas, offline, for the manifests under deploy/ (tests/deploy.rs); its
# jsonschema also checks the PodMonitors against the Prometheus Operator's CRD (tests/data).
python_venv .toolgate-test/venv-k8s kubernetes-validate 1.37.0 jsonschema
