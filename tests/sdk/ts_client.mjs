// Lists and calls tools with the official TypeScript SDK 1.x client (protocol 2025-11-25),
// printing one JSON object. Usage: node ts_client.mjs URL TOKEN
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { McpError } from '@modelcontextprotocol/sdk/types.js';

const [url, token] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url),
  { requestInit: { headers: { Authorization: `Bearer ${token}` } } });
const client = new Client({ name: 'toolgate-test', version: '1.0.0' });

async function call(name, args) {
  try {
    const result = await client.callTool({ name, arguments: args });
    return { ok: true, is_error: Boolean(result.isError), text: result.content.filter((c) => c.type === 'text').map((c) => c.text) };
  } catch (e) {
    if (e instanceof McpError) return { ok: false, code: e.code, message: e.message, data: e.data ?? null };
    throw e;
  }
}

await client.connect(transport);
const out = { protocol: transport.protocolVersion ?? null };
out.tools = (await client.listTools()).tools.map((t) => t.name).sort();
out.add = await call('add', { a: 2, b: 3 });
out.pay_small = await call('pay', { amount: 50, to: 'bob' });
out.pay_large = await call('pay', { amount: 500, to: 'bob' });
out.pay_undeclared = await call('pay', { amount: 5, to: 'bob', memo: 'x' });
out.prompts = (await client.listPrompts()).prompts.map((p) => p.name).sort();
out.greet = (await client.getPrompt({ name: 'greet', arguments: { name: 'Ada' } })).messages.map((m) => m.content.text);
try {
  await client.getPrompt({ name: 'exfiltrate', arguments: { target: 'db' } });
  out.exfiltrate = { ok: true };
} catch (e) {
  if (!(e instanceof McpError)) throw e;
  out.exfiltrate = { ok: false, code: e.code };
}
console.log(JSON.stringify(out));
await client.close();
