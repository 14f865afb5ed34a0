// Calls a tool whose server closes the stream mid-call, with the official TypeScript SDK 1.x
// client (it resumes with Last-Event-ID), printing one JSON object. Usage: node
// ts_resume_client.mjs URL TOKEN
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const [url, token] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
  reconnectionOptions: { initialReconnectionDelay: 50, maxReconnectionDelay: 500, reconnectionDelayGrowFactor: 1.5, maxRetries: 5 },
});
const client = new Client({ name: 'toolgate-test', version: '1.0.0' });
await client.connect(transport);
const result = await client.callTool({ name: 'slow_add', arguments: { a: 2, b: 3 } }, undefined, { timeout: 20000 });
console.log(JSON.stringify({ text: result.content.filter((c) => c.type === 'text').map((c) => c.text) }));
await client.close();
