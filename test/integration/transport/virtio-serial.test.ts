/**
 * The guest side of virtio-serial against a real character device: a pseudo-terminal in
 * raw mode, whose master end a small python process (pty-chardev.py) bridges to a unix
 * socket as QEMU bridges a virtserialport to its chardev socket. The host side is
 * connectUnix, as in production.
 *
 * What this proves: the device is opened once by path (through a udev-like symlink that
 * appears late), read and written with fs.read/fs.write on a non-blocking descriptor;
 * messages cross both ways; invalid lines get error replies; a host that stops reading
 * makes writes fail EAGAIN without ever stalling the event loop, and the queue drains
 * when it reads again; EOF (the far end gone) is polled, not treated as the end; a new
 * host connection is recognised by its leading 0xFF and gets a fresh hello.
 *
 * What only the QEMU e2e test proves: a pty reads EAGAIN (not EOF) before any host
 * connects and cannot come back after EOF, so the EOF→EAGAIN reconnect transition,
 * exclusivity of the port (EBUSY on a second open), data held by QEMU before the guest
 * opens the port, and the latency figures need the real virtio_console driver.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { VirtioSerialChannel } from '../../../agent/transport/virtio-serial';
import { connectUnix } from '../../../agent/transport/unix';
import type { Channel } from '../../../agent/transport/channel';
import type { Message } from '../../../agent/protocol/messages';
import pino from 'pino';
import { nextEvent, nextMessage, sleep, waitFor } from './wait';

const HELPER = path.join(__dirname, 'pty-chardev.py');

let dir: string;
let chardev: ChildProcess;
let slave: string;
let hostSock: string;
let portLink: string;
const toClose: { close(): Promise<void> }[] = [];

async function startChardev(): Promise<void> {
  hostSock = path.join(dir, 'ch0.sock');
  chardev = spawn('python3', [HELPER, hostSock], { stdio: ['ignore', 'pipe', 'inherit'] });
  const rl = readline.createInterface({ input: chardev.stdout! });
  const lines: string[] = [];
  await waitFor<void>((done) => {
    rl.on('line', (l) => {
      lines.push(l);
      if (l === 'ready') done();
    });
  }, 'the pty chardev helper');
  slave = lines[0];
}

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nestbroker-vport-'));
  portLink = path.join(dir, 'virtio-ports', 'org.nestbroker.0');
  await startChardev();
});

afterEach(async () => {
  for (const c of toClose.splice(0)) await c.close();
  if (chardev.exitCode === null && chardev.signalCode === null) {
    chardev.kill('SIGCONT');
    chardev.kill('SIGTERM');
    await new Promise((r) => chardev.once('exit', r));
  }
  fs.rmSync(dir, { recursive: true, force: true });
});

/** udev's job: link the port name to the device. */
function linkPort(): void {
  fs.mkdirSync(path.dirname(portLink), { recursive: true });
  fs.symlinkSync(slave, portLink);
}

/** The guest channel's log lines, by message (its `log`, a pino logger writing here). */
const logged: string[] = [];
const recordingLog = pino(
  { level: 'debug' },
  { write: (line: string) => void logged.push(String(JSON.parse(line).msg)) },
);

function guest(): VirtioSerialChannel {
  const g = VirtioSerialChannel.open({
    log: recordingLog,
    path: portLink,
    eofPollMs: 50,
    reopenInitialMs: 20,
    reopenMaxMs: 100,
  });
  toClose.push(g);
  return g;
}

async function host(): Promise<Channel> {
  const h = await connectUnix(hostSock);
  toClose.push(h);
  return h;
}

const hello = (id: string): Message => ({
  type: 'hello',
  id,
  version: 1,
  guest: 'vm1',
  inventory: {
    cpus: 2,
    memoryBytes: 1 << 30,
    projects: [{ name: 'web', priority: 5, state: 'running' }],
  },
  lastSeq: 0,
});

test('the agent waits for the port to appear, opens it once, and talks to the host through it', async () => {
  const g = guest();
  let hellos = 0;
  g.on('open', () => g.send(hello(`h${++hellos}`)));
  // The port is not there yet: the agent retries (three failed opens), it does not crash.
  const failedOpens = (): number =>
    logged.filter((m) => m === 'cannot open the virtio-serial port yet').length;
  const from = failedOpens();
  await waitFor<void>(
    (done) => {
      const check = (): void => (failedOpens() >= from + 3 ? done() : void setTimeout(check, 10));
      check();
    },
    'three failed opens',
    10_000,
  );
  expect(g.deviceOpen).toBe(false);
  linkPort();
  await waitFor<void>((done) => (g.deviceOpen ? done() : g.once('open', () => done())), 'open');

  const h = await host();
  expect(await nextMessage(h, 'hello')).toMatchObject({ guest: 'vm1', id: 'h1' });
  h.send({ type: 'welcome', id: 'w1', replyTo: 'h1', version: 1, guest: 'vm1', heartbeatMs: 1000 });
  expect(await nextMessage(g, 'welcome')).toMatchObject({ replyTo: 'h1' });
  h.send({ type: 'ping', id: 'p1', t: 3 });
  expect(await nextMessage(h, 'pong')).toMatchObject({ replyTo: 'p1', t: 3 });

  // The device is open exactly once, by this process.
  const fds = fs.readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return fs.readlinkSync(`/proc/self/fd/${fd}`) === slave;
    } catch {
      return false;
    }
  });
  expect(fds).toHaveLength(1);
});

test('invalid lines from the host get error replies through the port; the channel stays', async () => {
  linkPort();
  const g = guest();
  await nextEvent(g, 'open');
  const h = await host();
  const errors: Message[] = [];
  h.on('message', (m) => m.type === 'error' && errors.push(m));
  // Raw bytes the host's own Channel would never send, written under it.
  const raw = (h as unknown as { sock: import('node:net').Socket }).sock;
  raw.write('garbage\n');
  raw.write('{"type":"ping","id":"x","t":1,"pad":"' + 'y'.repeat(70_000) + '"}\n');
  raw.write(Buffer.concat([Buffer.from('{"type":"pi'), Buffer.from([0xff])]));
  h.send({ type: 'ping', id: 'after', t: 9 });
  expect(await nextMessage(h, 'pong')).toMatchObject({ replyTo: 'after' });
  expect(errors.map((e) => (e.type === 'error' ? e.code : ''))).toEqual([
    'PROTOCOL_INVALID',
    'PROTOCOL_OVERSIZE',
  ]);
  expect(g.connected).toBe(true);
});

test('a host that stops reading never stalls the event loop; what was queued arrives when it reads again', async () => {
  linkPort();
  const g = guest();
  await nextEvent(g, 'open');
  const h = await host();
  const got: string[] = [];
  h.on('message', (m) => m.type === 'progress' && got.push(m.id));

  chardev.kill('SIGSTOP'); // the "host" side stops draining the port
  let ticks = 0;
  let maxGap = 0;
  let last = Date.now();
  const ticker = setInterval(() => {
    const now = Date.now();
    maxGap = Math.max(maxGap, now - last);
    last = now;
    ticks++;
  }, 10);
  const N = 400; // ~400 × 150 B: more than a pty's buffer, so writes hit EAGAIN
  for (let i = 0; i < N; i++) {
    g.send({
      type: 'progress',
      id: `m${i}`,
      noticeId: 'n1',
      project: 'web',
      phase: 'notified',
      action: 'unchanged',
      exit: null,
      ms: i,
    });
  }
  // A write that blocked in the kernel would block here for as long as the helper is
  // stopped, and SIGCONT below would never be sent: the test would hang.
  await sleep(300);
  clearInterval(ticker);
  expect(g.pendingWrites).toBeGreaterThan(0); // the kernel refused more: EAGAIN, queued
  expect(got.length).toBeLessThan(N);
  expect(ticks).toBeGreaterThanOrEqual(10); // timers kept firing while the port was full
  expect(maxGap).toBeLessThan(250); // loose: this 2-core machine is shared

  chardev.kill('SIGCONT');
  await waitFor<void>(
    (done) => {
      const check = (): void => (got.length === N ? done() : void setTimeout(check, 10));
      check();
    },
    'all queued messages',
    5000,
  );
  expect(got).toEqual(Array.from({ length: N }, (_, i) => `m${i}`));
});

test('a new host connection is recognised by its leading 0xFF: the guest says hello again', async () => {
  linkPort();
  const g = guest();
  let n = 0;
  g.on('open', () => g.send(hello(`h${++n}`)));
  await nextEvent(g, 'open');
  const h1 = await host();
  expect(await nextMessage(h1, 'hello')).toMatchObject({ id: 'h1' });
  h1.send({ type: 'ping', id: 'p1', t: 1 });
  await nextMessage(h1, 'pong');
  await h1.close();
  const h2 = await host();
  const pong = nextMessage(h2, 'pong');
  const hello2 = nextMessage(h2, 'hello');
  h2.send({ type: 'ping', id: 'p2', t: 2 });
  expect(await hello2).toMatchObject({ id: 'h2' });
  expect(await pong).toMatchObject({ replyTo: 'p2' });
});

test('the far end going away (EOF) is polled, not the end: the agent keeps the port and drops what it sends', async () => {
  linkPort();
  const g = guest();
  await nextEvent(g, 'open');
  const closed = nextEvent(g, 'close');
  chardev.kill('SIGTERM');
  await closed;
  expect(g.connected).toBe(false);
  expect(g.deviceOpen).toBe(true);
  expect(g.send({ type: 'ping', id: 'lost', t: 1 })).toBe(false);
  await sleep(150); // several EOF polls later: still open, still quiet
  expect(g.deviceOpen).toBe(true);
  await g.close();
  expect(g.deviceOpen).toBe(false);
});
