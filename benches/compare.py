"""The measuring half of benches/compare.sh: runs oha against each system, checks every answer,
and writes results.json, results.md and a chart. Started by compare.sh with the systems'
addresses; not meant to be run alone."""

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import time
import urllib.request

CONNECTIONS = 32
MCP_BODY = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3}}}'


def targets(a):
    auth = {"Authorization": f"Bearer {a.token}"}
    rest = "/billing/invoices/1"
    mcp = {**auth, "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    return [
        ("direct", a.direct + rest, "GET", {}, None),
        ("nginx proxy", a.nginx + rest, "GET", {}, None),
        ("Envoy proxy", a.envoy + rest, "GET", {}, None),
        ("Envoy jwt_authn+rbac", a.envoy_authz + rest, "GET", auth, None),
        ("toolgate REST", a.toolgate + rest, "GET", auth, None),
        ("toolgate MCP tools/call", a.toolgate + "/tools", "POST", mcp, MCP_BODY),
        ("toolgate REST in a task", a.toolgate + rest, "GET", {**auth, "Toolgate-Task": a.task}, None),
    ]


def fetch(url, method="GET", headers=None, body=None):
    request = urllib.request.Request(url, method=method, headers=headers or {},
                                     data=body.encode() if body else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def preflight(a, systems):
    """Each system answers 200 before it is measured, and the authorizing ones refuse without a
    token: a figure must be the pipeline's, not a refusal's."""
    deadline = time.time() + 20
    for name, url, method, headers, body in systems:
        while True:
            try:
                status, answer = fetch(url, method, headers, body)
            except OSError:
                status, answer = None, b""
            if status == 200:
                break
            if time.time() > deadline:
                raise SystemExit(f"{name}: {status} {answer[:200]!r} before measuring")
            time.sleep(0.2)
        if name.startswith(("Envoy jwt", "toolgate")):
            status, _ = fetch(url, method, {k: v for k, v in headers.items() if k != "Authorization"}, body)
            assert status == 401, f"{name} answered {status} without a token"


def oha(a, url, method, headers, body, rate=None):
    cmd = ["taskset", "-c", str(a.load_cpu), a.oha, "-z", f"{a.seconds}s", "-c", str(CONNECTIONS),
           "--no-tui", "--output-format", "json", "-m", method]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    if body:
        cmd += ["-d", body]
    if rate:
        cmd += ["-q", str(rate), "--latency-correction"]
    out = json.loads(subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout)
    codes = out.get("statusCodeDistribution", {})
    errors = out.get("errorDistribution", {})
    bad = {k: v for k, v in codes.items() if not k.startswith("2")}
    # oha ends its last in-flight requests at the deadline; those are not the system's errors.
    errors = {k: v for k, v in errors.items() if "aborted due to deadline" not in k}
    if bad or errors:
        raise SystemExit(f"{url}: refused or failed requests {bad} {errors}: no valid figure")
    lat = out["latencyPercentiles"]
    ms = lambda key: (lat.get(key) or 0) * 1000
    return {"rps": out["summary"]["requestsPerSec"], "p50": ms("p50"), "p99": ms("p99"),
            "p99.9": ms("p99.9"), "ok": sum(codes.values())}


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")


def idle_connections_rss(a):
    """RSS of a gateway with 10,000 policies, before and with 1,000 idle keep-alive connections
    (each made one authenticated call, then stays open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    host, port = a.many.split("//")[1].split(":")
    request = (f"GET /billing/invoices/1 HTTP/1.1\r\nHost: {host}\r\n"
               f"Authorization: Bearer {a.token}\r\n\r\n").encode()
    before = rss_kib(a.many_pid)
    sockets = []
    for _ in range(1000):
        s = socket.create_connection((host, int(port)))
        s.sendall(request)
        sockets.append(s)
    for s in sockets:
        s.settimeout(10)
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
    time.sleep(1)
    with_idle = rss_kib(a.many_pid)
    for s in sockets:
        s.close()
    return {"policies_loaded_kib": before, "with_1000_idle_kib": with_idle}


def main():
    p = argparse.ArgumentParser()
    for name in ["oha", "token", "task", "direct", "nginx", "envoy", "envoy-authz", "toolgate",
                 "many", "audit", "versions", "out", "chart"]:
        p.add_argument(f"--{name}", required=True)
    for name in ["load-cpu", "seconds", "rounds", "toolgate-pid", "many-pid"]:
        p.add_argument(f"--{name}", type=int, required=True)
    a = p.parse_args()
    systems = targets(a)
    preflight(a, systems)

    saturation = {name: [] for name, *_ in systems}
    for round_ in range(a.rounds):
        for name, url, method, headers, body in systems:
            r = oha(a, url, method, headers, body)
            saturation[name].append(r["rps"])
            print(f"round {round_ + 1} {name}: {r['rps']:.0f} rps", flush=True)
    median = {name: statistics.median(v) for name, v in saturation.items()}

    rates = [2000, int(median["toolgate REST"] / 2)]
    latency = {}
    for rate in rates:
        for name, url, method, headers, body in systems:
            r = oha(a, url, method, headers, body, rate=rate)
            latency[f"{name} @ {rate}"] = r
            print(f"{name} at {rate} rps: p50 {r['p50']:.3f} p99 {r['p99']:.3f} p99.9 {r['p99.9']:.3f} ms", flush=True)

    memory = idle_connections_rss(a)
    print(f"RSS with 10,000 policies: {memory['policies_loaded_kib'] / 1024:.1f} MiB; "
          f"with 1,000 idle connections: {memory['with_1000_idle_kib'] / 1024:.1f} MiB", flush=True)
    gateway_rss = rss_kib(a.toolgate_pid)
    with open(a.audit) as f:
        audit_lines = sum(1 for _ in f)

    machine = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"],
                             capture_output=True, text=True).stdout.strip()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{machine}, {os.cpu_count()} cores, {platform.release()}",
               "versions": a.versions, "seconds": a.seconds, "rounds": a.rounds, "connections": CONNECTIONS,
               "saturation_rounds": saturation, "saturation_median": median, "rates": rates,
               "latency": latency, "memory": memory, "toolgate_rss_after_load_kib": gateway_rss,
               "toolgate_audit_lines": audit_lines}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(report(results, systems))
    chart(results, systems, a.chart)
    print(open(os.path.join(a.out, "results.md")).read())


def report(r, systems):
    med = r["saturation_median"]
    lines = [f"Measured {r['date']} on {r['machine']}; {r['versions']}.",
             f"{r['connections']} connections, {r['seconds']} s per run, median of {r['rounds']} alternating rounds.", "",
             "| system | requests/s (median) | rounds | vs direct | vs nginx proxy |", "|---|---|---|---|---|"]
    for name, *_ in systems:
        rounds = ", ".join(f"{v:,.0f}" for v in r["saturation_rounds"][name])
        lines.append(f"| {name} | {med[name]:,.0f} | {rounds} | {med[name] / med['direct']:.3f} | "
                     f"{med[name] / med['nginx proxy']:.3f} |")
    for rate in r["rates"]:
        base = r["latency"][f"direct @ {rate}"]
        lines += ["", f"At {rate:,} requests/s (latency corrected), added to direct "
                      f"(direct: p50 {base['p50']:.3f}, p99 {base['p99']:.3f}, p99.9 {base['p99.9']:.3f} ms):", "",
                  "| system | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 |", "|---|---|---|---|---|---|---|"]
        for name, *_ in systems:
            x = r["latency"][f"{name} @ {rate}"]
            lines.append(f"| {name} | {x['p50']:.3f} | {x['p99']:.3f} | {x['p99.9']:.3f} | "
                         f"{x['p50'] - base['p50']:+.3f} | {x['p99'] - base['p99']:+.3f} | {x['p99.9'] - base['p99.9']:+.3f} |")
    m = r["memory"]
    lines += ["", f"toolgate RSS with 10,000 policies loaded: {m['policies_loaded_kib'] / 1024:.1f} MiB; "
                  f"with 1,000 idle keep-alive connections as well: {m['with_1000_idle_kib'] / 1024:.1f} MiB. "
                  f"The measured gateway after all runs: {r['toolgate_rss_after_load_kib'] / 1024:.1f} MiB; "
                  f"{r['toolgate_audit_lines']:,} audit lines written.", ""]
    return "\n".join(lines)


def chart(r, systems, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [name for name, *_ in systems]
    med = r["saturation_median"]
    rate = r["rates"][0]
    base = r["latency"][f"direct @ {rate}"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.barh(names, [med[n] / med["nginx proxy"] for n in names], color="#4c72b0")
    left.axvline(1.0, color="grey", lw=0.8)
    left.set_xlabel("throughput at saturation, relative to nginx proxy")
    left.invert_yaxis()
    y = range(len(names))
    right.barh([i - 0.2 for i in y], [r["latency"][f"{n} @ {rate}"]["p50"] - base["p50"] for n in names], 0.4, label="p50")
    right.barh([i + 0.2 for i in y], [r["latency"][f"{n} @ {rate}"]["p99"] - base["p99"] for n in names], 0.4, label="p99")
    right.set_yticks(list(y), names)
    right.invert_yaxis()
    right.set_xlabel(f"added latency vs direct at {rate:,} req/s (ms)")
    right.legend()
    fig.suptitle(f"toolgate vs nginx and Envoy, one core each ({r['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
