"""Calls a tool whose server closes the stream mid-call, with the official Python SDK 2.x client
(it resumes with Last-Event-ID), printing one JSON object. Usage: py_resume_client.py URL TOKEN
"""
import json
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url, token):
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(20.0)) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            with anyio.fail_after(20):
                result = await client.call_tool("slow_add", {"a": 2, "b": 3})
            text = [c.text for c in result.content if getattr(c, "type", "") == "text"]
            print(json.dumps({"text": text}))


anyio.run(main, sys.argv[1], sys.argv[2])
