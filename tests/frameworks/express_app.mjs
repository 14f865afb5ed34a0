// An Express 5 app reading queries with qs (the `extended` query parser) that records what it
// executes, for tests/frameworks.rs. Usage: node express_app.mjs PORT.
// GET /executed returns (and clears) what the other routes ran with.
import express from 'express';

const app = express();
app.set('query parser', 'extended');
app.use(express.json());
const ran = [];

// Lists a customer's invoices; qs turns `customer[]=a&customer[]=b` or `customer[x]=y` into
// arrays and objects, which a handler may treat as "any customer".
app.get('/invoices', (req, res) => {
  ran.push({ invoices: { customer: req.query.customer ?? null, status: req.query.status ?? null } });
  res.json({ ok: true });
});

app.post('/refunds', (req, res) => {
  ran.push({ refund: req.body });
  res.json({ ok: true });
});

app.get('/executed', (req, res) => {
  res.json(ran.splice(0));
});

app.listen(Number(process.argv[2]), '127.0.0.1');
