#!/usr/bin/env node
// A `solc` executable for forge, backed by solc-js (WASM) from npm: no native
// compiler exists in any registry we can reach, and forge must not download one.
// Forge needs exactly two things from it: `--version` and `--standard-json`.
'use strict';
const solc = require('solc');

const args = process.argv.slice(2);
if (args.includes('--version')) {
  // forge parses the "Version: 0.8.x+commit.…" line.
  process.stdout.write(`solc, the solidity compiler commandline interface\nVersion: ${solc.version()}\n`);
  process.exit(0);
}
if (!args.includes('--standard-json')) {
  process.stderr.write('only --version and --standard-json are supported\n');
  process.exit(2);
}
const chunks = [];
process.stdin.on('data', (c) => chunks.push(c));
process.stdin.on('end', () => {
  const input = Buffer.concat(chunks).toString('utf8');
  // forge passes sources by path with their content inlined; imports that are
  // not inlined are read relative to the allowed base path.
  const fs = require('fs');
  const path = require('path');
  const base = args.includes('--base-path') ? args[args.indexOf('--base-path') + 1] : process.cwd();
  const findImports = (p) => {
    for (const candidate of [p, path.join(base, p)]) {
      try {
        return { contents: fs.readFileSync(candidate, 'utf8') };
      } catch (_) { /* try the next candidate */ }
    }
    return { error: `not found: ${p}` };
  };
  process.stdout.write(solc.compile(input, { import: findImports }));
});
