#!/usr/bin/env node
/**
 * A project for the real-guest test: holds MIB mebibytes of touched memory and
 * burns a little CPU, like a service with a working set. On SIGTERM it "saves its work":
 * writes MARKER_DIR/NAME.graceful and exits 0, which is what a graceful stop must reach.
 *   node workload.js NAME MIB MARKER_DIR
 */
/* global require, process, Buffer, setInterval */
// Plain CommonJS: the guest runs this file from the share with node alone, no build step.
/* eslint-disable @typescript-eslint/no-require-imports */
'use strict';
const fs = require('fs');
const path = require('path');

const [name, mib, markerDir] = process.argv.slice(2);
const chunks = [];
for (let i = 0; i < Number(mib); i++) chunks.push(Buffer.alloc(1024 * 1024, i & 0xff));
fs.mkdirSync(markerDir, { recursive: true });
fs.writeFileSync(path.join(markerDir, `${name}.started`), `${process.pid} ${Date.now()}\n`);
// One line per start: the test counts them (a notice applied twice would start twice).
fs.appendFileSync(path.join(markerDir, `${name}.starts`), `${process.pid} ${Date.now()}\n`);
process.on('SIGTERM', () => {
  fs.writeFileSync(
    path.join(markerDir, `${name}.graceful`),
    `${process.pid} ${Date.now()} ${chunks.length}\n`,
  );
  process.exit(0);
});
// Touch a page of every chunk now and then: the memory stays in the working set.
// Touch a page of every chunk now and then: the memory stays in the working set.
let k = 0;
setInterval(() => {
  for (let i = 0; i < chunks.length; i += 1) chunks[i][k % 4096] ^= 1;
  k += 1;
}, 500);
