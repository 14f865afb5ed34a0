// A stateful MCP server on the official TypeScript SDK 1.x with an event store, whose tool
// closes its SSE stream mid-call (SEP-1699, `closeSSEStream`) before sending anything but the
// priming event: the client must resume with that event's id (`Last-Event-ID`) to get the
// answer. Usage: node ts_resume_server.mjs PORT.
import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { InMemoryEventStore } from '@modelcontextprotocol/sdk/examples/shared/inMemoryEventStore.js';
import * as z from 'zod/v4';

const transports = new Map();

function build() {
  const server = new McpServer({ name: 'ts-resume', version: '1.0.0' });
  server.registerTool('slow_add', { description: 'Adds, after closing its stream once.', inputSchema: { a: z.number().int(), b: z.number().int() } },
    async ({ a, b }, extra) => {
      extra.closeSSEStream?.();
      await new Promise((resolve) => setTimeout(resolve, 300));
      return { content: [{ type: 'text', text: String(a + b) }] };
    });
  return server;
}

http.createServer(async (req, res) => {
  if (req.url !== '/mcp') return res.writeHead(404).end();
  const id = req.headers['mcp-session-id'];
  let transport = id ? transports.get(id) : undefined;
  if (id && !transport) return res.writeHead(404).end();
  if (!transport) {
    if (req.method !== 'POST') return res.writeHead(400).end();
    transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      eventStore: new InMemoryEventStore(),
      retryInterval: 50,
      onsessioninitialized: (sid) => transports.set(sid, transport),
    });
    await build().connect(transport);
  }
  try {
    await transport.handleRequest(req, res);
  } catch (e) {
    if (!res.headersSent) res.writeHead(500).end(String(e));
  }
}).listen(Number(process.argv[2]), '127.0.0.1');
