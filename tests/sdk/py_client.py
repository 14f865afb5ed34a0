"""Lists and calls tools with the official Python SDK 2.x client (protocol negotiated: the
2026-07-28 revision where the server speaks it), printing one JSON object.
Usage: py_client.py URL TOKEN
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
        return {"ok": False, "code": e.code, "message": e.message, "data": e.data}


async def main(url, token):
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(20.0)) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            out = {"protocol": client.protocol_version}
            out["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
            out["add"] = await call(client, "add", {"a": 2, "b": 3})
            out["pay_small"] = await call(client, "pay", {"amount": 50, "to": "bob"})
            out["pay_large"] = await call(client, "pay", {"amount": 500, "to": "bob"})
            out["pay_undeclared"] = await call(client, "pay", {"amount": 5, "to": "bob", "memo": "x"})
            out["prompts"] = sorted(p.name for p in (await client.list_prompts()).prompts)
            greeting = await client.get_prompt("greet", {"name": "Ada"})
            out["greet"] = [m.content.text for m in greeting.messages]
            try:
                await client.get_prompt("exfiltrate", {"target": "db"})
                out["exfiltrate"] = {"ok": True}
            except MCPError as e:
                out["exfiltrate"] = {"ok": False, "code": e.code}
            print(json.dumps(out))


anyio.run(main, sys.argv[1], sys.argv[2])
