/**
 * The unix-socket channel: a guest agent listening where QEMU would, a host connecting.
 * Real sockets in a temp dir.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { UnixChannelServer, connectUnix } from '../../../agent/transport/unix';
import type { Channel } from '../../../agent/transport/channel';
import type { ErrorMsg, Message } from '../../../agent/protocol/messages';
import { MAX_LINE_BYTES } from '../../../agent/protocol/messages';
import { NestError } from '../../../agent/common/errors';
import { nextEvent, nextMessage, waitFor } from './wait';

let dir: string;
let sockPath: string;
const toClose: { close(): Promise<void> }[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nestbroker-unix-'));
  sockPath = path.join(dir, 'guest', 'ch0.sock');
});
afterEach(async () => {
  for (const c of toClose.splice(0)) await c.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function guest(): Promise<UnixChannelServer> {
  const g = await UnixChannelServer.listen(sockPath);
  toClose.push(g);
  return g;
}

async function host(): Promise<Channel> {
  const h = await connectUnix(sockPath);
  toClose.push(h);
  return h;
}

const hello: Message = {
  type: 'hello',
  id: 'h1',
  version: 1,
  guest: 'vm1',
  inventory: { cpus: 2, memoryBytes: 1 << 30, projects: [] },
  lastSeq: 0,
};

test('the host connects, the guest says hello, the host welcomes it; pings are answered by the channel', async () => {
  const g = await guest();
  g.on('open', () => g.send(hello));
  const h = await host();
  const got = await nextMessage(h, 'hello');
  expect(got).toEqual(hello);
  h.send({ type: 'welcome', id: 'w1', replyTo: 'h1', version: 1, guest: 'vm1', heartbeatMs: 500 });
  expect(await nextMessage(g, 'welcome')).toMatchObject({ replyTo: 'h1' });
  h.send({ type: 'ping', id: 'p1', t: 42 });
  expect(await nextMessage(h, 'pong')).toMatchObject({ replyTo: 'p1', t: 42 });
  expect(fs.statSync(sockPath).mode & 0o777).toBe(0o600);
});

test('garbage, an oversized line and 0xFF mid-line each get what they deserve; then a ping gets its pong', async () => {
  const g = await guest();
  const invalid: ErrorMsg[] = [];
  g.on('invalid', (e) => invalid.push(e));
  // A raw client: we want to send bytes no Channel would.
  const raw = net.connect(sockPath);
  await new Promise((r) => raw.once('connect', r));
  let text = '';
  raw.on('data', (d) => (text += d.toString('latin1')));
  raw.write('this is not json\n');
  raw.write(JSON.stringify({ type: 'notice', id: 'n1', notice: { id: 'x' } }) + '\n');
  raw.write('{"type":"ping","id":"big","t":1,"pad":"' + 'x'.repeat(MAX_LINE_BYTES) + '"}\n');
  raw.write(Buffer.concat([Buffer.from('{"type":"ping","id":"half'), Buffer.from([0xff])]));
  raw.write('{"type":"ping","id":"p-after","t":7}\n');
  const pong = await waitFor<Message>((done) => {
    const check = (): void => {
      const lines = text.split('\n');
      for (const l of lines) {
        const s = l.replace(/^\xff/, '');
        if (s.includes('"pong"')) return done(JSON.parse(s));
      }
      setTimeout(check, 5);
    };
    check();
  }, 'the pong');
  expect(pong).toMatchObject({ type: 'pong', replyTo: 'p-after', t: 7 });
  // The replies on the wire: the server's resync byte first, then three errors and the pong.
  expect(text.charCodeAt(0)).toBe(0xff);
  const replies = text
    .slice(1)
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Message);
  expect(replies.map((m) => (m.type === 'error' ? m.code : m.type))).toEqual([
    'PROTOCOL_INVALID',
    'PROTOCOL_INVALID',
    'PROTOCOL_OVERSIZE',
    'pong',
  ]);
  const [notJson, badNotice, oversize] = replies as ErrorMsg[];
  expect(notJson.message).toMatch(/not JSON.*"this is not json"/);
  expect(badNotice.replyTo).toBe('n1');
  expect(badNotice.problems?.map((p) => p.field)).toEqual(
    expect.arrayContaining(['notice.guest', 'notice.seq', 'notice.deadline']),
  );
  expect(oversize.message).toMatch(/over the 65536-byte cap/);
  expect(invalid).toHaveLength(3); // the half line before 0xFF is dropped silently, by design
  expect(g.connected).toBe(true);
  raw.destroy();
});

test('a second host connection replaces the first: the guest sees close then open, the old one is closed', async () => {
  const g = await guest();
  let opens = 0;
  g.on('open', () => opens++);
  const h1 = await host();
  await waitFor<void>(
    (done) => (opens === 1 ? done() : g.once('open', () => done())),
    'first open',
  );
  const h1Closed = nextEvent(h1, 'close');
  const gClosed = nextEvent(g, 'close');
  const h2 = await host();
  await h1Closed;
  await gClosed;
  await waitFor<void>(
    (done) => (opens === 2 ? done() : g.once('open', () => done())),
    'second open',
  );
  expect(h1.connected).toBe(false);
  expect(h1.send({ type: 'ping', id: 'lost', t: 1 })).toBe(false);
  h2.send({ type: 'ping', id: 'p2', t: 2 });
  expect(await nextMessage(h2, 'pong')).toMatchObject({ replyTo: 'p2' });
});

test('the guest drops what it sends while no host is connected, and says so', async () => {
  const g = await guest();
  expect(g.connected).toBe(false);
  expect(g.send({ type: 'ping', id: 'nobody', t: 1 })).toBe(false);
  const h = await host();
  const seen: Message[] = [];
  h.on('message', (m) => seen.push(m));
  h.send({ type: 'ping', id: 'p', t: 1 });
  await nextMessage(h, 'pong');
  expect(seen.map((m) => m.id)).not.toContain('nobody');
});

test('the host sees the guest go away; connecting to nothing is a TRANSPORT error', async () => {
  const g = await guest();
  const h = await host();
  const closed = nextEvent(h, 'close');
  await g.close();
  await closed;
  expect(h.connected).toBe(false);
  expect(fs.existsSync(sockPath)).toBe(false);
  const err = (await connectUnix(sockPath).catch((e) => e)) as NestError;
  expect(err).toBeInstanceOf(NestError);
  expect(err.code).toBe('TRANSPORT');
  expect(err.message).toMatch(/no guest channel listening/);
});

test('a restarted guest agent takes over the stale socket of one that died', async () => {
  const { execFileSync } = await import('node:child_process');
  fs.mkdirSync(path.dirname(sockPath), { recursive: true });
  execFileSync('python3', [
    '-c',
    'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])',
    sockPath,
  ]);
  const g = await guest();
  const h = await host();
  h.send({ type: 'ping', id: 'p', t: 1 });
  await nextMessage(h, 'pong');
  expect(g.connected).toBe(true);
});
