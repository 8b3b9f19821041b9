#!/usr/bin/env node
// A minimal host for the nestbroker guest agent, written from docs/protocol.md alone
// ("Writing a host"): Node's net and JSON, nothing of this repository. It connects to a
// guest's channel socket, takes the hello, welcomes, reclaims memory, waits for the
// outcome, restores it, and prints what happened as one JSON line. It journals nothing and
// touches no VM: it shows the protocol, not a host broker.
//
//   node examples/minimal-host.mjs SOCKET GUEST MEMORY_BYTES [DEADLINE_MS]
//
// Exit 0 when both notices were carried out, 1 when the guest refused one, 2 on a
// protocol or connection problem.
import net from 'node:net';
import { randomUUID } from 'node:crypto';

const [socketPath, guest, memoryArg, deadlineArg] = process.argv.slice(2);
if (!socketPath || !guest || !memoryArg) {
  console.error('usage: minimal-host.mjs SOCKET GUEST MEMORY_BYTES [DEADLINE_MS]');
  process.exit(2);
}
const memoryBytes = Number(memoryArg);
const deadlineMs = Number(deadlineArg ?? 60_000);

const sock = net.connect(socketPath);
const waiters = []; // { match(msg) → boolean, resolve }
let partial = [];

function send(msg) {
  sock.write(JSON.stringify(msg) + '\n');
}

function onMessage(msg) {
  // Answer pings whenever they come (docs/protocol.md, "ping, pong").
  if (msg.type === 'ping') send({ type: 'pong', id: randomUUID(), replyTo: msg.id, t: msg.t });
  if (msg.type === 'error') console.error(`guest error ${msg.code}: ${msg.message}`);
  const i = waiters.findIndex((w) => w.match(msg));
  if (i >= 0) waiters.splice(i, 1)[0].resolve(msg);
}

// Framing: lines end at '\n'; a 0xFF byte discards the partial line ("Framing").
sock.on('data', (chunk) => {
  let start = 0;
  for (let i = 0; i < chunk.length; i++) {
    if (chunk[i] !== 0x0a && chunk[i] !== 0xff) continue;
    partial.push(chunk.subarray(start, i));
    const line = Buffer.concat(partial).toString('utf8').replace(/\r$/, '');
    partial = [];
    start = i + 1;
    if (chunk[i] === 0xff || line === '') continue;
    onMessage(JSON.parse(line));
  }
  if (start < chunk.length) partial.push(Buffer.from(chunk.subarray(start)));
});
sock.on('error', (err) => fail(2, `connection: ${err.message}`));

function next(match, what, ms = deadlineMs + 5_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms);
    waiters.push({
      match,
      resolve: (m) => {
        clearTimeout(timer);
        resolve(m);
      },
    });
  });
}

function fail(code, message) {
  console.error(message);
  process.exit(code);
}

/** Sends a notice or restore; resolves with its ack and outcome. */
async function issue(kind, seq, change, allocation) {
  const now = Date.now();
  const notice = {
    id: `${guest}-${seq}-${randomUUID().slice(0, 8)}`,
    guest,
    seq,
    kind,
    change,
    allocation,
    deadline: new Date(now + deadlineMs).toISOString(),
    reason: 'minimal-host example',
    issuedAt: new Date(now).toISOString(),
  };
  const msg = { type: kind === 'reclaim' ? 'notice' : 'restore', id: randomUUID(), notice };
  const ack = next((m) => m.type === 'ack' && m.replyTo === msg.id, 'ack', 5_000);
  const outcome = next((m) => m.type === 'outcome' && m.outcome.noticeId === notice.id, 'outcome');
  send(msg);
  const a = await ack;
  if (a.state === 'rejected') fail(1, `${kind} rejected: ${a.error.code}: ${a.error.message}`);
  return { ack: a.state, outcome: (await outcome).outcome };
}

async function main() {
  await new Promise((resolve) => sock.once('connect', resolve));
  sock.write(Buffer.from([0xff])); // each side starts a connection with 0xFF
  const hello = await next((m) => m.type === 'hello', 'hello', 10_000);
  if (hello.guest !== guest) fail(2, `the guest says it is ${hello.guest}, not ${guest}`);
  if (hello.version !== 1) fail(2, `protocol version ${hello.version}, this host speaks 1`);
  // No capabilities: this host does not assemble outcome parts.
  send({
    type: 'welcome',
    id: randomUUID(),
    replyTo: hello.id,
    version: 1,
    guest,
    heartbeatMs: 0,
  });
  const before = { cpus: hello.inventory.cpus, memoryBytes: hello.inventory.memoryBytes };
  const change = { cpus: 0, memoryBytes };
  // allocation = before − change (reclaim), then + change (restore): "Seq and duplicates".
  const reclaimed = { cpus: before.cpus, memoryBytes: before.memoryBytes - memoryBytes };
  const seq = hello.lastSeq + 1;
  const reclaim = await issue('reclaim', seq, change, reclaimed);
  const restore = await issue('restore', seq + 1, change, before);
  const summary = (r) => ({
    ack: r.ack,
    status: r.outcome.status,
    freed: r.outcome.freed,
    actions: Object.fromEntries(r.outcome.projects.map((p) => [p.name, p.action])),
  });
  console.log(JSON.stringify({ reclaim: summary(reclaim), restore: summary(restore) }));
  sock.end();
}

main().catch((err) => fail(2, err.message));
