// Validates the AsyncAPI document with the official parser (@asyncapi/parser from npm), offline: the
// document references the JSON Schemas in events/schemas/ by relative path, and a broken reference, a
// schema error or a document error fails it. Run by scripts/contract.sh.
const { Parser, fromFile } = require('@asyncapi/parser');

async function main() {
  const path = process.argv[2];
  const { document, diagnostics } = await fromFile(new Parser(), path).parse();
  const errors = diagnostics.filter((d) => d.severity === 0);
  for (const d of errors) {
    console.log(`error ${d.code} ${d.path.join('.')}: ${d.message}`);
  }
  if (!document || errors.length > 0) {
    console.error(`asyncapi: ${errors.length} errors in ${path}`);
    process.exit(1);
  }
  const channels = document.channels().all().map((c) => c.address());
  const messages = document.allMessages().all().map((m) => m.name());
  console.log(`asyncapi: valid AsyncAPI ${document.version()}; channels ${channels.join(', ')}; messages ${messages.join(', ')}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
