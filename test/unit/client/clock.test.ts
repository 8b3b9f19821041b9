/**
 * The wire deadline is converted once, on receipt, to the guest's monotonic clock, from the
 * host's monotonic clock (docs/reliability.md, "Time"): neither wall clock takes part. Over
 * a real unix channel with the host end played by the test, a FakeClock for the guest
 * (its wall clock a day off the host's) and a recording broker:
 *
 *  - a notice whose wall deadline the guest's wall clock says passed a day ago is accepted,
 *    because the host's clock says 10 s are left; the steps get those 10 s less the
 *    measured margin, and a wall step afterwards changes nothing;
 *  - a notice that waited 14 s on the way (the guest's clock moved 15 s since the welcome,
 *    the host's 1 s) with 10 s left when sent is refused as stale;
 *  - the welcome's ping is answered and timed: the margin's first round trip.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client } from '../../../agent/client/client';
import { NoticeBook, type CarryOutContext, type LocalBroker } from '../../../agent/client/notices';
import { silentLogger } from '../../../agent/common/log';
import type { Notice, Outcome } from '../../../agent/broker/types';
import type { Message } from '../../../agent/protocol/messages';
import { UnixChannelServer, connectUnix } from '../../../agent/transport/unix';
import type { SocketChannel } from '../../../agent/transport/channel';
import { FakeClock } from '../../helpers/fake-clock';

const log = silentLogger();
const DAY = 86_400_000;

class RecordingBroker implements LocalBroker {
  readonly name = 'vm1';
  seen: { id: string; deadline: number; killMs: number; at: number }[] = [];
  constructor(private readonly clock: FakeClock) {}
  async check() {
    return [];
  }
  allocation() {
    return { cpus: 2, memoryBytes: 1 << 30 };
  }
  async carryOut(n: Notice, ctx: CarryOutContext): Promise<Outcome> {
    this.seen.push({ id: n.id, deadline: ctx.deadline, killMs: ctx.killMs, at: this.clock.mono });
    return {
      noticeId: n.id,
      guest: n.guest,
      status: 'complete',
      projects: [],
      freed: n.change,
      startedAt: new Date(this.clock.now()).toISOString(),
      finishedAt: new Date(this.clock.now()).toISOString(),
      ms: 0,
    };
  }
}

let dir: string;
let server: UnixChannelServer;
let host: SocketChannel;
let inbox: Message[];
let clock: FakeClock;
let broker: RecordingBroker;
let book: NoticeBook;

async function next(type: Message['type']): Promise<Message> {
  for (let i = 0; i < 500; i++) {
    const k = inbox.findIndex((m) => m.type === type);
    if (k >= 0) return inbox.splice(k, 1)[0];
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`no ${type}; inbox: ${JSON.stringify(inbox)}`);
}

/** The host's own clocks: unrelated to the guest's. */
const HOST_MONO = 50_000;
const HOST_WALL = Date.parse('2026-01-01T00:00:00Z');

function notice(id: string, seq: number, hostWallNow: number): Notice {
  return {
    id,
    guest: 'vm1',
    seq,
    kind: 'reclaim',
    change: { cpus: 0, memoryBytes: 1024 },
    allocation: { cpus: 2, memoryBytes: (1 << 30) - 1024 * seq },
    deadline: new Date(hostWallNow + 10_000).toISOString(),
    reason: 'test',
    issuedAt: new Date(hostWallNow).toISOString(),
  };
}

beforeEach(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-clock-'));
  // The guest's wall clock is a day ahead of the host's.
  clock = new FakeClock(7_000_000, HOST_WALL + DAY);
  broker = new RecordingBroker(clock);
  book = new NoticeBook(path.join(dir, 'state'), broker, log, { clock });
  await book.init();
  server = await UnixChannelServer.listen(path.join(dir, 'ch.sock'), { answerPings: false });
  new Client({
    channel: server,
    book,
    log,
    clock,
    inventory: async () => ({ cpus: 2, memoryBytes: 1 << 30, projects: [] }),
  });
  inbox = [];
  host = await connectUnix(path.join(dir, 'ch.sock'), { answerPings: false, log });
  host.on('message', (m) => inbox.push(m));
  const hello = await next('hello');
  host.send({
    type: 'welcome',
    id: 'w-1',
    replyTo: hello.id,
    version: 1,
    guest: 'vm1',
    heartbeatMs: 5000,
    capabilities: ['monotonic-clock'],
    clock: HOST_MONO,
  });
  // The guest times a round trip at once: the host answers its ping (as its channel does).
  const ping = (await next('ping')) as Extract<Message, { type: 'ping' }>;
  clock.advance(3);
  host.send({ type: 'pong', id: 'p-1', replyTo: ping.id, t: ping.t });
  for (let i = 0; i < 200 && book.margin.snapshot().samples.send === 0; i++)
    await new Promise((r) => setTimeout(r, 10));
});

afterEach(async () => {
  await host?.close();
  await server?.close();
  await fsp.rm(dir, { recursive: true, force: true });
});

test('the deadline comes from the host clock: a day of wall-clock disagreement changes nothing', async () => {
  expect(book.margin.snapshot()).toMatchObject({ samples: { send: 1 }, worst: { send: 3 } });
  // A second on both monotonic clocks (and the pong's 3 ms): the host sends with 10 s left.
  clock.advance(1000);
  const n = notice('n-1', 1, HOST_WALL + 1003);
  const receivedAt = clock.mono;
  host.send({
    type: 'notice',
    id: 'm-1',
    notice: n,
    clock: { sent: HOST_MONO + 1003, deadline: HOST_MONO + 11_003 },
  });
  expect(await next('ack')).toMatchObject({ noticeId: 'n-1', state: 'accepted' });
  expect(await next('outcome')).toMatchObject({ outcome: { noticeId: 'n-1' } });
  const [seen] = broker.seen;
  // 10 s after receipt, less the margin for the end (journal writes, the round trip).
  const { afterMs, killMs } = book.margin.forBudget(10_000);
  expect(seen.deadline).toBe(receivedAt + 10_000 - afterMs);
  expect(seen.killMs).toBe(killMs);
  expect(afterMs).toBeGreaterThan(0);
  expect(afterMs).toBeLessThan(5_000);
  // Journaled with the monotonic deadline and the boot it belongs to.
  const rec = book.get('n-1')!;
  expect(rec.deadlineMono).toBe(receivedAt + 10_000);
  expect(rec.bootId).toMatch(/^[0-9a-f-]{36}$/);
  // The guest's wall time is in the record, a day after the notice's own wall deadline.
  expect(Date.parse(rec.receivedAt) - Date.parse(n.deadline)).toBeGreaterThan(DAY - 20_000);
});

test('a notice that waited past its deadline on the way is stale, whatever the wall clocks say', async () => {
  // 15 s on the guest's monotonic clock since the welcome, 1 s on the host's when it sent:
  // the message took 14 s to be read (a guest stopped, a VM paused).
  clock.advance(15_000);
  clock.stepWall(-DAY); // and the guest's wall clock now agrees with the host's
  const n = notice('n-2', 1, HOST_WALL + 1000);
  host.send({
    type: 'notice',
    id: 'm-2',
    notice: n,
    clock: { sent: HOST_MONO + 1000, deadline: HOST_MONO + 11_000 },
  });
  const ack = await next('ack');
  expect(ack).toMatchObject({
    noticeId: 'n-2',
    state: 'rejected',
    error: { code: 'NOTICE_STALE' },
  });
  expect((ack as { error: { message: string } }).error.message).toMatch(
    /deadline passed 40\d\d ms before the notice arrived/,
  );
  expect(broker.seen).toEqual([]);
});
