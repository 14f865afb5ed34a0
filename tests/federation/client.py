"""One session with a federated endpoint, through the official Python SDK 1.x client.
Prints a JSON line, waits for a line on stdin (the test stops a member meanwhile), then prints
a second JSON line from the same session. Usage: client.py URL TOKEN
"""
import json
import sys

import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError


async def call(session, name, arguments, **kwargs):
    try:
        result = await session.call_tool(name, arguments, **kwargs)
        text = [c.text for c in result.content if getattr(c, "type", "") == "text"]
        return {"ok": True, "is_error": result.isError, "text": text}
    except McpError as e:
        return {"ok": False, "code": e.error.code, "message": e.error.message}


async def main(url, token):
    headers = {"Authorization": f"Bearer {token}"}
    async with streamablehttp_client(url, headers=headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out = {"server": init.serverInfo.name, "protocol": init.protocolVersion}
            out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
            out["add"] = await call(session, "tools__add", {"a": 2, "b": 3})
            out["pay_large"] = await call(session, "tools__pay", {"amount": 500, "to": "bob"})
            out["echo"] = await call(session, "every__echo", {"message": "hi"})
            out["sum"] = await call(session, "every__get-sum", {"a": 1, "b": 2})
            out["graph"] = await call(session, "memory__read_graph", {})
            progress = []

            async def on_progress(value, total, message):
                progress.append(value)

            out["long"] = await call(session, "every__trigger-long-running-operation",
                                     {"duration": 1, "steps": 2}, progress_callback=on_progress)
            out["progress"] = progress
            out["prompts"] = sorted(p.name for p in (await session.list_prompts()).prompts)
            prompt = await session.get_prompt("every__simple-prompt")
            out["prompt"] = [m.content.text for m in prompt.messages]
            resources = (await session.list_resources()).resources
            out["resources"] = len(resources)
            first = str(resources[0].uri)
            read = await session.read_resource(first)
            out["read"] = {"uri": first, "contents": len(read.contents)}
            print(json.dumps(out), flush=True)

            await anyio.to_thread.run_sync(sys.stdin.readline)
            after = {"tools": sorted(t.name for t in (await session.list_tools()).tools)}
            after["add"] = await call(session, "tools__add", {"a": 2, "b": 3})
            after["echo"] = await call(session, "every__echo", {"message": "still"})
            print(json.dumps(after), flush=True)


anyio.run(main, sys.argv[1], sys.argv[2])
