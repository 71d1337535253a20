#!/usr/bin/env node
// Copies the ABI and creation bytecode of each deployable contract from forge's build output
// into artifacts/, the only thing the Rust build reads (so it needs neither Node nor solc).
'use strict';
const fs = require('fs');
const path = require('path');

const [out, dest] = process.argv.slice(2);
const CONTRACTS = ['LAIToken', 'UserRegistry', 'NodeRegistry', 'NetworkStatus', 'Tokenomics'];
fs.mkdirSync(dest, { recursive: true });
for (const name of CONTRACTS) {
  const built = JSON.parse(fs.readFileSync(path.join(out, `${name}.sol`, `${name}.json`), 'utf8'));
  const artifact = { abi: built.abi, bytecode: { object: built.bytecode.object } };
  fs.writeFileSync(path.join(dest, `${name}.json`), JSON.stringify(artifact, null, 1) + '\n');
}
