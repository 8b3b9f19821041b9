#!/usr/bin/env node
/**
 * TEST-ONLY command runner inside the e2e guest (test/e2e). Never installed by
 * `make install`: the image's nestbroker-test-runner.service (test/e2e/build-image.sh)
 * starts it from the read-only 9p share.
 *
 * It reads newline-delimited JSON requests from its own virtio-serial port
 * (org.nestbroker.test, apart from the nestbroker channel) and answers each:
 *   host → guest  {"id": 7, "cmd": "cat /proc/meminfo", "timeoutMs": 10000}
 *   guest → host  {"id": 7, "code": 0, "signal": null, "stdout": "…", "stderr": "…", "ms": 12}
 * and announces itself once with {"ready": true, "bootId": "…"}.
 *
 * virtio-serial facts (measured under QEMU; docs/install.md): the port is a character
 * device, opened once; read() returns 0 at once while no host client is connected (poll, it
 * is not the end); data sent before the port is opened is held and delivered.
 */
/* global require, process, Buffer, setTimeout, clearTimeout */
// Plain CommonJS: the guest runs this file from the share with node alone, no build step.
/* eslint-disable @typescript-eslint/no-require-imports */
'use strict';
const fs = require('fs');
const { spawn } = require('child_process');

const PORT = process.argv[2] || '/dev/virtio-ports/org.nestbroker.test';
const MAX_OUTPUT = 4 * 1024 * 1024;

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

async function openPort() {
  for (;;) {
    try {
      return fs.openSync(PORT, 'r+');
    } catch (e) {
      process.stderr.write(`runner: waiting for ${PORT}: ${e.code}\n`);
      await sleep(200);
    }
  }
}

let writing = Promise.resolve();
function send(fd, obj) {
  const buf = Buffer.from(JSON.stringify(obj) + '\n');
  writing = writing.then(
    () =>
      new Promise((resolve) => {
        const writeFrom = (off) =>
          fs.write(fd, buf, off, buf.length - off, null, (err, n) => {
            if (err) {
              process.stderr.write(`runner: write: ${err.code}\n`);
              return setTimeout(() => writeFrom(off), 200);
            }
            if (off + n < buf.length) return writeFrom(off + n);
            resolve();
          });
        writeFrom(0);
      }),
  );
}

function run(fd, req) {
  const t0 = Date.now();
  const child = spawn('/bin/bash', ['-c', req.cmd], {
    detached: true, // own process group: a timeout kills everything it started
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' },
  });
  const out = { stdout: [], stderr: [], size: 0 };
  const collect = (which) => (chunk) => {
    if (out.size < MAX_OUTPUT) out[which].push(chunk);
    out.size += chunk.length;
  };
  child.stdout.on('data', collect('stdout'));
  child.stderr.on('data', collect('stderr'));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }, req.timeoutMs || 60000);
  child.on('error', (e) => {
    clearTimeout(timer);
    send(fd, {
      id: req.id,
      code: -1,
      signal: null,
      stdout: '',
      stderr: String(e),
      ms: Date.now() - t0,
    });
  });
  child.on('close', (code, signal) => {
    clearTimeout(timer);
    send(fd, {
      id: req.id,
      code,
      signal,
      timedOut,
      stdout: Buffer.concat(out.stdout).toString('utf8'),
      stderr: Buffer.concat(out.stderr).toString('utf8'),
      ms: Date.now() - t0,
    });
  });
}

async function main() {
  const fd = await openPort();
  const bootId = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  send(fd, { ready: true, bootId });
  const buf = Buffer.alloc(64 * 1024);
  let pending = '';
  for (;;) {
    let n;
    try {
      n = await new Promise((resolve, reject) =>
        fs.read(fd, buf, 0, buf.length, null, (err, bytes) => (err ? reject(err) : resolve(bytes))),
      );
    } catch (e) {
      process.stderr.write(`runner: read: ${e.code}\n`);
      await sleep(200);
      continue;
    }
    if (n === 0) {
      // No host connected: not the end of anything.
      await sleep(100);
      continue;
    }
    pending += buf.subarray(0, n).toString('utf8');
    let nl;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      if (line.trim() === '') continue;
      let req;
      try {
        req = JSON.parse(line);
      } catch {
        send(fd, { id: null, code: -1, stderr: `runner: not JSON: ${line.slice(0, 200)}` });
        continue;
      }
      if (req.ping) send(fd, { id: req.id, pong: true, bootId });
      else run(fd, req);
    }
  }
}

main();
