#!/usr/bin/env bash
# The rate at which `toolgate audit report` (and `audit why`) read an audit file: LINES lines
# shaped like a gateway's (tool calls of 200 agents over the example schema's actions, with
# args, policy versions and credentials; a tenth denied; task lines), timed end to end with the
# release binary. Usage: benches/audit_report.sh [LINES] (default 1000000).
set -euo pipefail
cd "$(dirname "$0")/.."
lines=${1:-1000000}
cargo build --release --locked -q
bin=target/release/toolgate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat > "$work/toolgate.yaml" <<EOF
issuer: https://toolgate.bench
policies: $(pwd)/policies
inbound:
  jwt:
    - issuer: https://idp.bench
      jwks_file: idp.jwks.json
      audiences: [toolgate]
credentials:
  signing_key: signing.pem
EOF

python3 - "$work/audit.jsonl" "$lines" <<'EOF'
import json, random, sys, uuid
path, n = sys.argv[1], int(sys.argv[2])
random.seed(7)
actions = [("billing/get_invoice", {"invoice_id": 42}, "billing-read"),
           ("billing/list_invoices", {"customer": "c-9", "limit": 10}, "billing-read"),
           ("billing/refund", {"invoice_id": 42, "amount": 90}, "billing-refund"),
           ("records/get_patient_record", {"patient_id": "p-100"}, "own-record-only")]
with open(path, "w") as out:
    for i in range(n):
        action, args, policy = actions[i % len(actions)]
        allowed = i % 10 != 0
        line = {"decision_id": str(uuid.UUID(int=random.getrandbits(128))),
                "time": "2026-12-05T%02d:%02d:%02d.%03dZ" % (i // 3600000 % 24, i // 60000 % 60, i // 1000 % 60, i % 1000),
                "agent": "agent-%d" % (i % 200), "user": "user-%d" % (i % 1000), "iss": "https://idp.bench",
                "action": action, "resource": action, "args": args,
                "decision": "allow" if allowed else "deny",
                "policies": [policy] if allowed else [], "policy_versions": {policy: "0a1b2c3d4e5f"} if allowed else {},
                "errors": [], "task_id": None, "approval": None,
                "jti": str(uuid.UUID(int=random.getrandbits(128))) if allowed else None,
                "credential_mode": "mint" if allowed else None, "credential_id": None,
                "credential_exp": 1796000000 if allowed else None,
                "upstream_status": 200 if allowed else None, "eval_us": 41, "source_ip": "10.0.0.7",
                "method": "GET", "path": "/" + action, "status": 200 if allowed else 403}
        out.write(json.dumps(line, separators=(",", ":")) + "\n")
EOF
size=$(du -m "$work/audit.jsonl" | cut -f1)
last_jti=$(tail -n 2 "$work/audit.jsonl" | python3 -c 'import json,sys; print([json.loads(l)["jti"] for l in sys.stdin if json.loads(l)["jti"]][-1])')

rate() { # label, command...
  local label=$1; shift
  local start end
  start=$(date +%s.%N)
  "$@" > /dev/null
  end=$(date +%s.%N)
  python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'{sys.argv[3]}: {int(sys.argv[4])} lines ({sys.argv[5]} MiB) in {s:.2f} s = {int(sys.argv[4])/s:,.0f} lines/s')" "$start" "$end" "$label" "$lines" "$size"
}
rate "audit report" "$bin" audit report --audit "$work/audit.jsonl" --config "$work/toolgate.yaml"
rate "audit why (last line)" "$bin" audit why "$last_jti" --audit "$work/audit.jsonl"
