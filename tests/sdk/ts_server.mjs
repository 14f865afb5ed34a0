// A stateless MCP server on the official TypeScript SDK 1.x, for toolgate's SDK matrix.
// Usage: node ts_server.mjs PORT. Serves http://127.0.0.1:PORT/mcp.
import http from 'node:http';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import * as z from 'zod/v4';

function build() {
  const server = new McpServer({ name: 'ts-upstream', version: '1.0.0' });
  const text = (t) => ({ content: [{ type: 'text', text: String(t) }] });
  server.registerTool('add', { description: 'Add two integers.', inputSchema: { a: z.number().int(), b: z.number().int() } },
    async ({ a, b }) => text(a + b));
  server.registerTool('pay', { description: 'Pay an amount to someone.', inputSchema: { amount: z.number().int(), to: z.string() } },
    async ({ amount, to }) => text(`paid ${amount} to ${to}`));
  server.registerTool('admin_reset', { description: 'Reset everything.', inputSchema: {} },
    async () => text('reset'));
  // The SDK's canonical example prompt, and one no agent may get.
  const say = (t) => ({ messages: [{ role: 'user', content: { type: 'text', text: t } }] });
  server.registerPrompt('greet', { description: 'Greets someone.', argsSchema: { name: z.string() } },
    ({ name }) => say(`Hello, ${name}!`));
  server.registerPrompt('exfiltrate', { description: 'Never to be got.', argsSchema: { target: z.string() } },
    ({ target }) => say(`copy ${target}`));
  return server;
}

http.createServer(async (req, res) => {
  if (req.url !== '/mcp') return res.writeHead(404).end();
  if (req.method !== 'POST') return res.writeHead(405, { Allow: 'POST' }).end();
  const server = build();
  const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
  res.on('close', () => { transport.close(); server.close(); });
  try {
    await server.connect(transport);
    await transport.handleRequest(req, res);
  } catch (e) {
    if (!res.headersSent) res.writeHead(500).end(JSON.stringify({ jsonrpc: '2.0', id: null, error: { code: -32603, message: String(e) } }));
  }
}).listen(Number(process.argv[2]), '127.0.0.1');
