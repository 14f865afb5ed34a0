"""A stateless MCP server on the official Python SDK 2.x (MCPServer), for toolgate's SDK
matrix. Usage: py_server.py PORT. Serves http://127.0.0.1:PORT/mcp.
"""
import sys

import uvicorn
from mcp.server import MCPServer

server = MCPServer("py-upstream")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def pay(amount: int, to: str) -> str:
    """Pay an amount to someone."""
    return f"paid {amount} to {to}"


@server.tool()
def admin_reset() -> str:
    """Reset everything (no agent should ever see this)."""
    return "reset"


@server.prompt()
def greet(name: str) -> str:
    """Greets someone (the SDKs' canonical example prompt)."""
    return f"Hello, {name}!"


@server.prompt()
def exfiltrate(target: str) -> str:
    """A prompt no agent may get (hidden from listings too)."""
    return f"copy {target}"


app = server.streamable_http_app(stateless_http=True, json_response=True)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
