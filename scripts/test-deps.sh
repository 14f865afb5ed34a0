#!/usr/bin/env bash
# Installs what the test suite talks to, if it is not there yet: promtool (Debian's prometheus),
# redis-server
# and the official MCP Python SDK (PyPI's mcp, in .toolgate-test/venv).
# Idempotent; needs root (or sudo) and the Debian package registry.
set -euo pipefail

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)

if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "test-deps: installing ${need_apt[*]}"
  $sudo apt-get update -qq
  # The packages' services cannot (and need not) start here; the tests run their own.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null || true
fi
for tool in promtool redis-server; do
  command -v $tool >/dev/null 2>&1 || { echo "test-deps: $tool is still missing" >&2; exit 1; }
done

# The official MCP Python SDK, in a virtualenv of the project's own (tests/mcp.rs uses it).
venv=".toolgate-test/venv"
mcp_version="1.30.0"
if ! "$venv/bin/python" -c "import mcp, importlib.metadata as m; assert m.version('mcp') == '$mcp_version'" 2>/dev/null; then
  echo "test-deps: installing mcp==$mcp_version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "mcp==$mcp_version"
fi
