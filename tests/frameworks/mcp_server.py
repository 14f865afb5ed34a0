"""An MCP server on the official Python SDK 2.x (MCPServer) that records what it executes,
for tests/frameworks.rs. Usage: mcp_server.py PORT. Serves http://127.0.0.1:PORT/mcp; the tool
`executed` returns (and clears) what the other tools and resources ran with.
"""
import json
import sys

import uvicorn
from mcp.server import MCPServer
from mcp_types import Completion, PromptReference, ResourceTemplateReference

server = MCPServer("frameworks-upstream")
ran: list = []

NOTES = {"alice": ["alice's note"], "bob": ["bob's note"]}


@server.tool()
def send_mail(to: list[str], subject: str) -> str:
    """Send a mail to every recipient."""
    ran.append({"send_mail": {"to": to, "subject": subject}})
    return f"sent to {', '.join(to)}"


@server.tool()
def list_notes(owner: str | None = None) -> str:
    """The notes of one owner, or of every owner when none is named."""
    ran.append({"list_notes": {"owner": owner}})
    chosen = NOTES if owner is None else {owner: NOTES.get(owner, [])}
    return json.dumps(chosen, sort_keys=True)


@server.tool()
def wait(duration: float) -> str:
    """Waits (not really), echoing the duration it read."""
    ran.append({"wait": {"duration": repr(duration)}})
    return repr(duration)


@server.tool()
def executed() -> str:
    """What ran since the last call (then forgotten)."""
    out = json.dumps(ran)
    ran.clear()
    return out


@server.resource("notes://{user}/salary")
def salary(user: str) -> str:
    ran.append({"salary": {"user": user}})
    return f"salary of {user}"


@server.resource("file:///public/{folder}/{name}")
def public_file(folder: str, name: str) -> str:
    ran.append({"public_file": {"folder": folder, "name": name}})
    return f"file {folder}/{name}"


@server.prompt()
def greet(name: str) -> str:
    """Greets someone."""
    return f"Hello, {name}!"


@server.prompt()
def secret_plan(topic: str) -> str:
    """What no agent may read."""
    return f"the secret plan for {topic}"


@server.completion()
async def complete(ref, argument, context):
    ran.append({"complete": {"ref": ref.model_dump(mode="json", exclude_none=True), "argument": argument.name}})
    if isinstance(ref, PromptReference):
        return Completion(values=["launch codes", "layoffs"])
    if isinstance(ref, ResourceTemplateReference):
        return Completion(values=["bob", "alice"])
    return None


app = server.streamable_http_app(stateless_http=True, json_response=True)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
