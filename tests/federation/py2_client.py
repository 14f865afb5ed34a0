"""A federated endpoint through the official Python SDK 2.x client (which asks for the
2026-07-28 revision first, and falls back to the handshake). Prints one JSON object.
Usage: py2_client.py URL TOKEN
"""
import json
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


async def call(client, name, arguments):
    try:
        result = await client.call_tool(name, arguments)
        text = [c.text for c in result.content if getattr(c, "type", "") == "text"]
        return {"ok": True, "is_error": result.is_error, "text": text}
    except MCPError as e:
        return {"ok": False, "code": e.code, "message": e.message}


async def main(url, token):
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(20.0)) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            out = {"protocol": client.protocol_version}
            out["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
            out["add"] = await call(client, "tools__add", {"a": 2, "b": 3})
            out["pay_large"] = await call(client, "tools__pay", {"amount": 500, "to": "bob"})
            out["echo"] = await call(client, "every__echo", {"message": "hi"})
            out["prompts"] = sorted(p.name for p in (await client.list_prompts()).prompts)
            print(json.dumps(out))


anyio.run(main, sys.argv[1], sys.argv[2])
