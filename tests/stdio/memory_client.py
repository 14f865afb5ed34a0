"""Uses the reference memory server through the gateway with the official Python SDK 1.x
client, printing one JSON object. Usage: memory_client.py URL TOKEN ENTITY
"""
import json
import sys

import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError


async def call(session, name, arguments):
    try:
        result = await session.call_tool(name, arguments)
        text = [c.text for c in result.content if getattr(c, "type", "") == "text"]
        return {"ok": True, "is_error": result.isError, "text": text}
    except McpError as e:
        return {"ok": False, "code": e.error.code, "message": e.error.message}


async def main(url, token, entity):
    headers = {"Authorization": f"Bearer {token}"}
    async with streamablehttp_client(url, headers=headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out = {"server": init.serverInfo.name}
            out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
            entities = [{"name": entity, "entityType": "person", "observations": ["likes tea"]},
                        {"name": "protected", "entityType": "note", "observations": []},
                        {"name": "temp", "entityType": "note", "observations": []}]
            out["create"] = await call(session, "create_entities", {"entities": entities})
            out["delete_protected"] = await call(session, "delete_entities", {"entityNames": ["protected"]})
            out["delete_temp"] = await call(session, "delete_entities", {"entityNames": ["temp"]})
            graph = await call(session, "read_graph", {})
            out["graph"] = sorted(e["name"] for e in json.loads(graph["text"][0])["entities"])
            print(json.dumps(out))


anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3])
