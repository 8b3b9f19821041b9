/**
 * Host-side reconnects and heartbeats, over real unix sockets with short intervals; the
 * backoff schedule itself with an injected clock.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ReconnectingChannel, backoffDelay, type Clock } from '../../../agent/transport/reconnect';
import { UnixChannelServer, connectUnix } from '../../../agent/transport/unix';
import { nextEvent, nextMessage, waitFor } from './wait';

let dir: string;
let sockPath: string;
const toClose: { close(): Promise<void> }[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nestbroker-reconnect-'));
  sockPath = path.join(dir, 'ch0.sock');
});
afterEach(async () => {
  for (const c of toClose.splice(0).reverse()) await c.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A clock whose timers fire only when the test says so; it records every delay asked for. */
class StepClock implements Clock {
  t = 0;
  delays: number[] = [];
  private pending: { fn: () => void; ms: number }[] = [];
  constructor(private readonly r = 0.5) {}
  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): unknown {
    const h = { fn, ms };
    this.pending.push(h);
    this.delays.push(ms);
    return h;
  }
  clearTimeout(h: unknown): void {
    this.pending = this.pending.filter((p) => p !== h);
  }
  random(): number {
    return this.r;
  }
  fire(): void {
    const p = this.pending.shift();
    if (!p) throw new Error('no timer pending');
    this.t += p.ms;
    p.fn();
  }
}

test('backoff grows by the factor up to the cap, with jitter of ±20% by default', () => {
  const mid = () => 0.5;
  expect(
    [0, 1, 2, 3, 4, 10].map((n) => backoffDelay(n, { initialMs: 100, maxMs: 1000 }, mid)),
  ).toEqual([100, 200, 400, 800, 1000, 1000]);
  expect(backoffDelay(2, { initialMs: 100 }, () => 0)).toBe(320);
  expect(backoffDelay(2, { initialMs: 100 }, () => 0.999999)).toBe(480);
});

test('a host started before its guest retries with growing delays, then connects', async () => {
  const clock = new StepClock();
  const retries: number[] = [];
  const ch = new ReconnectingChannel({
    connect: () => connectUnix(sockPath),
    backoff: { initialMs: 100, maxMs: 500 },
    clock,
  });
  toClose.push(ch);
  ch.on('retry', (r) => retries.push(r.delayMs));
  ch.start();
  for (let i = 0; i < 4; i++) {
    await waitFor<void>((done) => ch.once('retry', () => done()), `retry ${i + 1}`);
    clock.fire();
  }
  await waitFor<void>((done) => ch.once('retry', () => done()), 'retry 5');
  expect(retries).toEqual([100, 200, 400, 500, 500]);
  expect(ch.connected).toBe(false);

  const guest = await UnixChannelServer.listen(sockPath);
  toClose.push(guest);
  const opened = nextEvent(ch, 'open');
  clock.fire();
  await opened;
  ch.send({ type: 'ping', id: 'p1', t: 1 });
  expect(await nextMessage(ch, 'pong')).toMatchObject({ replyTo: 'p1' });
});

test('when the guest agent restarts, the host reconnects by itself and the guest says hello again', async () => {
  let guest = await UnixChannelServer.listen(sockPath);
  let hellos = 0;
  // As the guest agent's upstream does: the host retries every 10–50 ms, so it may be
  // connected already when `listen` resolves (the socket's chmod is a tick after listen).
  const sayHello = (g: UnixChannelServer): void => {
    const hello = (): void =>
      void g.send({
        type: 'hello',
        id: `h${++hellos}`,
        version: 1,
        guest: 'vm1',
        inventory: { cpus: 1, memoryBytes: 1, projects: [] },
        lastSeq: 0,
      });
    g.on('open', hello);
    if (g.connected) hello();
  };
  sayHello(guest);
  const ch = new ReconnectingChannel({
    connect: () => connectUnix(sockPath),
    backoff: { initialMs: 10, maxMs: 50 },
  });
  toClose.push(ch);
  const first = nextMessage(ch, 'hello');
  ch.start();
  expect(await first).toMatchObject({ id: 'h1' });

  const closed = nextEvent(ch, 'close');
  await guest.close();
  await closed;
  // A few failed attempts while nobody listens (the channel's 'retry' events).
  await waitFor<void>(
    (done) => {
      let n = 0;
      ch.on('retry', () => ++n === 3 && done());
    },
    'three failed attempts',
    10_000,
  );
  guest = await UnixChannelServer.listen(sockPath);
  toClose.push(guest);
  sayHello(guest);
  expect(await nextMessage(ch, 'hello')).toMatchObject({ id: 'h2' });
  expect(ch.connected).toBe(true);
});

test('a peer that accepts but never answers pings is declared dead, closed, and reconnected', async () => {
  // A real socket that reads and never writes: a hung agent behind a live chardev.
  const accepted: net.Socket[] = [];
  const mute = net.createServer((s) => {
    accepted.push(s);
    s.resume();
  });
  await new Promise<void>((r) => mute.listen(sockPath, r));
  const ch = new ReconnectingChannel({
    connect: () => connectUnix(sockPath),
    backoff: { initialMs: 10 },
    heartbeat: { intervalMs: 20, missed: 2 },
  });
  toClose.push(ch);
  const dead = waitFor<{ missed: number }>((done) => ch.once('dead', done), 'dead');
  const t0 = Date.now();
  ch.start();
  expect(await dead).toEqual({ missed: 2 });
  const took = Date.now() - t0;
  expect(took).toBeGreaterThanOrEqual(55); // 3 intervals: ping, missed 1, missed 2
  expect(took).toBeLessThan(1000);
  await waitFor<void>((done) => {
    const check = (): void => (accepted.length >= 2 ? done() : void setTimeout(check, 5));
    check();
  }, 'a second connection');
  for (const s of accepted) s.destroy();
  await new Promise<void>((r) => mute.close(() => r()));
});

test('a live guest answers the heartbeats: no false alarms', async () => {
  const guest = await UnixChannelServer.listen(sockPath);
  toClose.push(guest);
  const ch = new ReconnectingChannel({
    connect: () => connectUnix(sockPath),
    heartbeat: { intervalMs: 10, missed: 2 },
  });
  toClose.push(ch);
  let deaths = 0;
  let pongs = 0;
  ch.on('dead', () => deaths++);
  ch.on('message', (m) => m.type === 'pong' && pongs++);
  ch.start();
  // Twenty heartbeats answered (ten times the two it may miss): never declared dead.
  await waitFor<void>(
    (done) => ch.on('message', (m) => m.type === 'pong' && pongs >= 20 && done()),
    'twenty pongs',
    10_000,
  );
  expect(deaths).toBe(0);
  expect(pongs).toBeGreaterThanOrEqual(20);
  expect(ch.connected).toBe(true);
});
