/**
 * The per-connection rate limit never drops the replies that finish an exchange (RATE_EXEMPT
 * in channel.ts): a peer that floods its channel beyond the limit and then sends an
 * `outcome` (or an `ack`, a `pong`, a `welcome`, a `cancel`) gets it delivered, while the
 * flood itself — pings, progress, garbage, a ping dressed up as an ack — is still cut to the
 * burst and answered with one RATE_LIMITED.
 *
 * Real unix sockets; the flooding peer is a raw socket (it sends what no Channel would, all
 * in one write). The clock is frozen, so the bucket never refills: exactly `burst` lines
 * get through on their own merits, whatever the machine's load.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { UnixChannelServer, connectUnix } from '../../../agent/transport/unix';
import type { Channel, RateLimit } from '../../../agent/transport/channel';
import type { ErrorMsg, Message } from '../../../agent/protocol/messages';
import type { Outcome } from '../../../agent/broker/types';

/** Polls `pred` until it gives a value; fails (and stops polling) after `ms`. */
async function poll<T>(what: string, pred: () => T | undefined, ms = 3000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = pred();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const LIMIT: RateLimit = { perSecond: 10, burst: 10 };
const frozen = (): number => 0;

let dir: string;
let sockPath: string;
const cleanup: (() => unknown)[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nestbroker-ratelimit-'));
  sockPath = path.join(dir, 'ch0.sock');
});
afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
  fs.rmSync(dir, { recursive: true, force: true });
});

const outcome: Outcome = {
  noticeId: 'n-1',
  guest: 'vm1',
  status: 'complete',
  projects: [],
  freed: { cpus: 0, memoryBytes: 1024 ** 2 },
  startedAt: '2025-01-01T00:00:00.000Z',
  finishedAt: '2025-01-01T00:00:01.000Z',
  ms: 1000,
};
const part = {
  name: 'batch',
  action: 'stopped',
  before: { memoryHigh: 'max', memoryMax: 268435456, cpuMax: 1 },
  after: { memoryHigh: 'max', memoryMax: 'max', cpuMax: 'max' },
  exit: 'graceful',
  ms: 800,
  reason: 'lowest priority',
};

/** The flood: 45 lines that must be limited (after the burst of 10 first pings). */
function flood(): string[] {
  const lines: string[] = [];
  for (let i = 0; i < 30; i++) lines.push(JSON.stringify({ type: 'ping', id: `p-${i}`, t: i }));
  for (let i = 0; i < 10; i++) lines.push(`garbage ${i}`);
  // A ping in disguise: the cheap look sees "ack", the parse (last key wins) sees a ping.
  for (let i = 0; i < 5; i++) lines.push(`{"type":"ack","type":"ping","id":"d-${i}","t":1}`);
  for (let i = 0; i < 10; i++)
    lines.push(
      JSON.stringify({
        type: 'progress',
        id: `pr-${i}`,
        noticeId: 'n-1',
        project: 'batch',
        phase: 'stopping',
        action: 'stopped',
        ms: i,
      }),
    );
  return lines;
}

/** What a raw socket got back, one message a line (the 0xFF resync bytes stripped). */
function received(sock: net.Socket): () => Message[] {
  let text = '';
  sock.on('data', (d: Buffer) => (text += d.toString('latin1')));
  return () =>
    text
      .replace(/\xff/g, '')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Message);
}

function collect(ch: Channel): Message[] {
  const got: Message[] = [];
  ch.on('message', (m) => got.push(m));
  return got;
}

test('host side: a guest floods beyond the limit, then sends outcome parts, the outcome, an ack and a pong: all delivered', async () => {
  // The guest, played raw: it floods as soon as the host says "go".
  let guestSock: net.Socket | undefined;
  const server = net.createServer((s) => {
    guestSock = s;
    let buf = '';
    s.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      if (!buf.includes('"id":"go"')) return;
      buf = '';
      const tail = [
        { type: 'outcome-part', id: 'op-0', noticeId: 'n-1', index: 0, count: 1, projects: [part] },
        { type: 'outcome', id: 'o-1', outcome, parts: 1 },
        { type: 'ack', id: 'a-1', replyTo: 'm-1', noticeId: 'n-1', state: 'accepted' },
        { type: 'pong', id: 'po-1', replyTo: 'go', t: 0 },
      ].map((m) => JSON.stringify(m));
      s.write([...flood(), ...tail].join('\n') + '\n');
    });
  });
  await new Promise<void>((r) => server.listen(sockPath, r));
  cleanup.push(() => new Promise((r) => server.close(r)));
  cleanup.push(() => guestSock?.destroy());

  const host = await connectUnix(sockPath, { rateLimit: LIMIT, now: frozen });
  cleanup.push(() => host.close());
  const got = collect(host);
  const back = received(await poll('the host to connect', () => guestSock));
  host.send({ type: 'ping', id: 'go', t: 0 });

  const theOutcome = await poll('the outcome and the pong after the flood', () =>
    got.some((m) => m.type === 'pong') ? got.find((m) => m.type === 'outcome') : undefined,
  );

  // Every reply that finishes the notice came through, in order, whole.
  expect(theOutcome).toMatchObject({ id: 'o-1', parts: 1, outcome: { noticeId: 'n-1' } });
  expect(got.filter((m) => m.type !== 'ping').map((m) => m.id)).toEqual([
    'op-0',
    'o-1',
    'a-1',
    'po-1',
  ]);
  // The flood was limited: only the burst of pings got in (and were answered); the other 20
  // pings, the garbage, the disguised pings and the progress lines were dropped unread.
  expect(got.filter((m) => m.type === 'ping').map((m) => m.id)).toEqual(
    Array.from({ length: 10 }, (_, i) => `p-${i}`),
  );
  expect(host.rateLimited).toBe(20 + 10 + 5 + 10);
  // The host's answers: the ten pongs and the error, whenever they arrive.
  const answers = await poll(
    'the answers to the pings that got in',
    () => {
      const a = back();
      return a.filter((m) => m.type === 'pong').length >= 10 && a.some((m) => m.type === 'error')
        ? a
        : undefined;
    },
    10_000,
  );
  expect(answers.filter((m) => m.type === 'pong').map((m) => m.replyTo)).toEqual(
    Array.from({ length: 10 }, (_, i) => `p-${i}`),
  );
  const errors = answers.filter((m): m is ErrorMsg => m.type === 'error');
  expect(errors.map((e) => e.code)).toEqual(['RATE_LIMITED']); // one, and no garbage answered
  expect(host.connected).toBe(true);
});

test('guest side: a host floods beyond the limit, then sends welcome and cancel: both delivered', async () => {
  const guest = await UnixChannelServer.listen(sockPath, { rateLimit: LIMIT, now: frozen });
  cleanup.push(() => guest.close());
  const got = collect(guest);
  const raw = net.connect(sockPath);
  cleanup.push(() => raw.destroy());
  await new Promise((r) => raw.once('connect', r));
  const back = received(raw);
  const tail = [
    { type: 'welcome', id: 'w-1', replyTo: 'h-1', version: 1, guest: 'vm1', heartbeatMs: 0 },
    { type: 'cancel', id: 'c-1', noticeId: 'n-1' },
    { type: 'ping', id: 'late', t: 0 }, // not exempt: the bucket is still empty
  ].map((m) => JSON.stringify(m));
  raw.write([...flood(), ...tail].join('\n') + '\n');

  await poll('the cancel after the flood', () => got.find((m) => m.type === 'cancel'));
  expect(got.filter((m) => m.type !== 'ping').map((m) => m.id)).toEqual(['w-1', 'c-1']);
  expect(got.filter((m) => m.type === 'ping')).toHaveLength(10);
  expect(guest.rateLimited).toBe(45 + 1);
  await poll(
    'the pongs to the pings that got in',
    () => (back().filter((m) => m.type === 'pong').length >= 10 ? true : undefined),
    10_000,
  );
  expect(back().filter((m) => m.type === 'pong')).toHaveLength(10);
  expect(guest.connected).toBe(true);
});
