"""A FastMCP server (official MCP Python SDK) for toolgate's end-to-end tests.

Usage: server.py PORT. Serves streamable HTTP at http://127.0.0.1:PORT/mcp (SSE answers).
"""
import sys

from mcp.server.fastmcp import Context, FastMCP

server = FastMCP("toolgate-test", host="127.0.0.1", port=int(sys.argv[1]), log_level="WARNING")


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


@server.tool()
async def whoami(ctx: Context) -> str:
    """The Authorization header this server received."""
    request = ctx.request_context.request
    return request.headers.get("authorization", "") if request is not None else ""


@server.tool()
async def count(n: int, ctx: Context) -> str:
    """Counts to n, reporting progress (several SSE events)."""
    for i in range(n):
        await ctx.report_progress(i + 1, n)
    return f"counted to {n}"


if __name__ == "__main__":
    server.run(transport="streamable-http")
