"""Calls an MCP server through toolgate with the official MCP Python SDK's streamable-HTTP
client, and prints what happened as one JSON object.

Usage: client.py URL TOKEN
"""
import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError


async def call(session, name, arguments):
    try:
        result = await session.call_tool(name, arguments)
        text = [c.text for c in result.content if getattr(c, "type", "") == "text"]
        return {"ok": True, "is_error": result.isError, "text": text}
    except McpError as e:
        return {"ok": False, "code": e.error.code, "message": e.error.message, "data": e.error.data}


async def main(url, token):
    out = {}
    headers = {"Authorization": f"Bearer {token}"}
    async with streamablehttp_client(url, headers=headers) as (read, write, _session_id):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out["server"] = init.serverInfo.name
            out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
            out["add"] = await call(session, "add", {"a": 2, "b": 3})
            out["pay_small"] = await call(session, "pay", {"amount": 50, "to": "bob"})
            out["pay_large"] = await call(session, "pay", {"amount": 500, "to": "bob"})
            out["admin_reset"] = await call(session, "admin_reset", {})
            out["unknown"] = await call(session, "no_such_tool", {})
            out["whoami"] = await call(session, "whoami", {})
            out["count"] = await call(session, "count", {"n": 3})
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
