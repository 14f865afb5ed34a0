// One session with a federated endpoint through the official TypeScript SDK 1.x client
// (protocol 2025-11-25), printing one JSON object. Usage: node ts_client.mjs URL TOKEN
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { McpError } from '@modelcontextprotocol/sdk/types.js';

const [url, token] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url),
  { requestInit: { headers: { Authorization: `Bearer ${token}` } } });
const client = new Client({ name: 'toolgate-fed-test', version: '1.0.0' });

async function call(name, args, options) {
  try {
    const result = await client.callTool({ name, arguments: args }, undefined, options);
    return { ok: true, is_error: Boolean(result.isError), text: result.content.filter((c) => c.type === 'text').map((c) => c.text) };
  } catch (e) {
    if (e instanceof McpError) return { ok: false, code: e.code, message: e.message };
    throw e;
  }
}

await client.connect(transport);
const out = { server: client.getServerVersion().name, protocol: transport.protocolVersion ?? null };
out.tools = (await client.listTools()).tools.map((t) => t.name).sort();
out.add = await call('tools__add', { a: 2, b: 3 });
out.pay_large = await call('tools__pay', { amount: 500, to: 'bob' });
out.echo = await call('every__echo', { message: 'hi' });
const progress = [];
out.long = await call('every__trigger-long-running-operation', { duration: 1, steps: 2 },
  { onprogress: (p) => progress.push(p.progress) });
out.progress = progress;
out.prompts = (await client.listPrompts()).prompts.map((p) => p.name).sort();
const resources = (await client.listResources()).resources;
out.read = (await client.readResource({ uri: resources[0].uri })).contents.length;
console.log(JSON.stringify(out));
await client.close();
