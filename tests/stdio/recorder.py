"""A stand-in stdio MCP server that records what it is given, for tests/stdio.rs.

Plain Python (no SDK), so that it can misbehave on purpose. At start it appends its pid and
environment to $RECORD_DIR/starts.jsonl; every line it reads goes to $RECORD_DIR/input.jsonl.
Tools: echo {text}, pid {}, crash {} (exits without answering), slow {} (progress, then an
answer), ask {} (asks the client for its roots first).
"""
import json
import os
import sys

record_dir = os.environ["RECORD_DIR"]
with open(os.path.join(record_dir, "starts.jsonl"), "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "env": dict(os.environ)}) + "\n")

TOOLS = [
    {"name": "echo", "description": "Echoes text.",
     "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
    {"name": "pid", "description": "The server's process id.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "crash", "description": "Exits at once.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "slow", "description": "Reports progress, then answers.", "inputSchema": {"type": "object", "properties": {}}},
]


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def text(request_id, value):
    send({"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": value}]}})


for line in sys.stdin:
    with open(os.path.join(record_dir, "input.jsonl"), "a") as f:
        f.write(line)
    message = json.loads(line)
    method, request_id = message.get("method"), message.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": request_id, "result": {
            "protocolVersion": message["params"].get("protocolVersion", "2025-06-18"),
            "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": "recorder", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": TOOLS}})
    elif method == "tools/call":
        name = message["params"]["name"]
        if name == "echo":
            text(request_id, message["params"]["arguments"]["text"])
        elif name == "pid":
            text(request_id, str(os.getpid()))
        elif name == "crash":
            os._exit(3)
        elif name == "slow":
            token = message["params"].get("_meta", {}).get("progressToken")
            if token is not None:
                for step in (1, 2):
                    send({"jsonrpc": "2.0", "method": "notifications/progress",
                          "params": {"progressToken": token, "progress": step, "total": 2}})
            text(request_id, "done")
    elif request_id is not None and method is not None:
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "method not found"}})
