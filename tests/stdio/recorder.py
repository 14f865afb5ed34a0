"""A stand-in stdio MCP server that records what it is given, for tests/stdio.rs.

Plain Python (no SDK), so that it can misbehave on purpose. At start it appends its pid and
environment to $RECORD_DIR/starts.jsonl; every line it reads goes to $RECORD_DIR/input.jsonl.
Tools: echo {text}, pid {}, crash {} (exits without answering), slow {} (progress, then an
answer), later {} (answers, then says its tools changed), ask {} (asks the client to elicit a
name first, and answers with what the client said).
"""
import json
import os
import sys
import threading

record_dir = os.environ["RECORD_DIR"]
with open(os.path.join(record_dir, "starts.jsonl"), "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "env": dict(os.environ)}) + "\n")

TOOLS = [
    {"name": "echo", "description": "Echoes text.",
     "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
    {"name": "pid", "description": "The server's process id.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "crash", "description": "Exits at once.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "slow", "description": "Reports progress, then answers.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "later", "description": "Answers, then says its tools changed.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "ask", "description": "Asks the client first.", "inputSchema": {"type": "object", "properties": {}}},
]
writing = threading.Lock()
asking = None


def send(message):
    with writing:
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
        elif name == "later":
            text(request_id, "ok")
            threading.Timer(0.3, send, [{"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}]).start()
        elif name == "ask":
            asking = request_id
            send({"jsonrpc": "2.0", "id": "ask-1", "method": "elicitation/create", "params": {
                "message": "Your name?",
                "requestedSchema": {"type": "object", "properties": {"name": {"type": "string"}}}}})
    elif method is None and request_id == "ask-1" and asking is not None:
        text(asking, json.dumps(message.get("result")))
        asking = None
    elif request_id is not None and method is not None:
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "method not found"}})
