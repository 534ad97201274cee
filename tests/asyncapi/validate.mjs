// Validates AsyncAPI documents with the official parser (@asyncapi/parser, the one the
// AsyncAPI CLI and Studio use). Prints every diagnostic; exits 1 when a document has an error.
//   node tests/asyncapi/validate.mjs DOC.json...
import { Parser } from '@asyncapi/parser';
import { readFileSync } from 'node:fs';

const parser = new Parser();
const severities = ['error', 'warning', 'info', 'hint'];
let failed = false;
for (const file of process.argv.slice(2)) {
  const { document, diagnostics } = await parser.parse(readFileSync(file, 'utf8'));
  for (const d of diagnostics) {
    const severity = severities[d.severity] ?? String(d.severity);
    console.log(`${file}: ${severity}: ${d.code}: ${d.message} at ${JSON.stringify(d.path)}`);
  }
  if (!document || diagnostics.some((d) => d.severity === 0)) {
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
