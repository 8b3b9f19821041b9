/**
 * The client role over a real unix channel (agent/transport): the "host" end is a plain
 * connected channel in the test, the local broker a recording fake. The story: hello with
 * lastSeq on connect; a notice is acked, journaled before anything is done, carried out
 * once and its outcome sent; a duplicate id gets the same outcome and is never carried out
 * again; stale, foreign and unjournalable notices are rejected with nothing done; after a
 * restart an unfinished notice is resumed exactly once; cancel, ping and bad input.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client } from '../../../agent/client/client';
import {
  NoticeBook,
  noticeKey,
  type CarryOutContext,
  type LocalBroker,
} from '../../../agent/client/notices';
import { silentLogger } from '../../../agent/common/log';
import type { Notice, Outcome } from '../../../agent/broker/types';
import type { Message } from '../../../agent/protocol/messages';
import { UnixChannelServer, connectUnix } from '../../../agent/transport/unix';
import type { SocketChannel } from '../../../agent/transport/channel';

const log = silentLogger();

class FakeBroker implements LocalBroker {
  readonly name = 'vm1';
  calls: { id: string; resumed: boolean }[] = [];
  gate: Promise<void> = Promise.resolve();
  problems: { field: string; value: unknown; message: string }[] = [];
  async check() {
    return this.problems;
  }
  async carryOut(n: Notice, ctx: CarryOutContext): Promise<Outcome> {
    this.calls.push({ id: n.id, resumed: ctx.resumed });
    ctx.onProgress({ child: 'web', phase: 'stopping', action: 'stopped', ms: 0 });
    await this.gate;
    return {
      noticeId: n.id,
      guest: n.guest,
      status: 'complete',
      projects: [],
      freed: n.change,
      startedAt: new Date(0).toISOString(),
      finishedAt: new Date(1).toISOString(),
      ms: 1,
    };
  }
}

function notice(id: string, seq: number, over: Partial<Notice> = {}): Notice {
  return {
    id,
    guest: 'vm1',
    seq,
    kind: 'reclaim',
    change: { cpus: 0, memoryBytes: 1024 },
    allocation: { cpus: 2, memoryBytes: 1 << 30 },
    deadline: new Date(Date.now() + 30_000).toISOString(),
    reason: 'test',
    issuedAt: new Date().toISOString(),
    ...over,
  };
}

let dir: string;
let server: UnixChannelServer;
let host: SocketChannel;
let inbox: Message[];
let broker: FakeBroker;
let book: NoticeBook;

async function connect(): Promise<void> {
  inbox = [];
  host = await connectUnix(path.join(dir, 'ch.sock'), { answerPings: false, log });
  host.on('message', (m) => inbox.push(m));
}

async function next(
  type: Message['type'],
  pred: (m: Message) => boolean = () => true,
): Promise<Message> {
  const until = Date.now() + 5000;
  for (;;) {
    const i = inbox.findIndex((m) => m.type === type && pred(m));
    if (i >= 0) return inbox.splice(i, 1)[0];
    if (Date.now() > until) throw new Error(`no ${type} message; inbox: ${JSON.stringify(inbox)}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function startGuest(): Promise<void> {
  broker = new FakeBroker();
  book = new NoticeBook(path.join(dir, 'state'), broker, log);
  await book.init();
  server = await UnixChannelServer.listen(path.join(dir, 'ch.sock'), { answerPings: false });
  new Client({
    channel: server,
    book,
    log,
    inventory: async () => ({ cpus: 2, memoryBytes: 1 << 30, projects: [] }),
  });
}

beforeEach(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-client-'));
  await startGuest();
  await connect();
});

afterEach(async () => {
  await host?.close();
  await server?.close();
  await fsp.rm(dir, { recursive: true, force: true });
});

test('says hello with its inventory and the last seq it applied', async () => {
  const hello = await next('hello');
  expect(hello).toMatchObject({ guest: 'vm1', version: 1, lastSeq: 0, inventory: { cpus: 2 } });
});

test('a notice: ack accepted, journaled before acting, carried out once, outcome sent', async () => {
  let release!: () => void;
  broker.gate = new Promise((r) => (release = r));
  host.send({ type: 'notice', id: 'm1', notice: notice('n1', 1) });
  const ack = await next('ack');
  expect(ack).toMatchObject({ replyTo: 'm1', noticeId: 'n1', state: 'accepted' });
  // Journaled by the time it is acked, and still in progress.
  const rec = JSON.parse(await fsp.readFile(path.join(dir, 'state/notices/n1.json'), 'utf8'));
  expect(['accepted', 'running']).toContain(rec.state);
  expect(await next('progress')).toMatchObject({
    noticeId: 'n1',
    project: 'web',
    phase: 'stopping',
  });

  // The same id again while it runs: a duplicate, not a second run.
  host.send({ type: 'notice', id: 'm2', notice: notice('n1', 1) });
  expect(await next('ack', (m) => (m as { replyTo: string }).replyTo === 'm2')).toMatchObject({
    state: 'duplicate',
  });
  release();
  const outcomes = [await next('outcome'), await next('outcome')];
  for (const o of outcomes)
    expect(o).toMatchObject({ outcome: { noticeId: 'n1', status: 'complete' } });
  expect(broker.calls).toEqual([{ id: 'n1', resumed: false }]);

  // Once more after it is done: the journaled outcome, and still one run.
  host.send({ type: 'notice', id: 'm3', notice: notice('n1', 1) });
  expect(await next('ack')).toMatchObject({ state: 'duplicate' });
  expect(await next('outcome')).toMatchObject({ outcome: { noticeId: 'n1' } });
  expect(broker.calls).toHaveLength(1);
  expect(
    JSON.parse(await fsp.readFile(path.join(dir, 'state/notices/n1.json'), 'utf8')).state,
  ).toBe('done');
});

test('stale, foreign and unfit notices are rejected with the reason, and nothing is done', async () => {
  host.send({ type: 'notice', id: 'm1', notice: notice('n5', 5) });
  await next('outcome');
  host.send({ type: 'notice', id: 'm2', notice: notice('n4', 4) });
  expect(await next('ack', (m) => (m as { replyTo: string }).replyTo === 'm2')).toMatchObject({
    state: 'rejected',
    error: { code: 'NOTICE_STALE' },
  });
  host.send({ type: 'notice', id: 'm3', notice: notice('n6', 6, { guest: 'vm2' }) });
  expect(await next('ack', (m) => (m as { replyTo: string }).replyTo === 'm3')).toMatchObject({
    state: 'rejected',
    error: { code: 'NOTICE_REJECTED', message: expect.stringMatching(/guest: this is "vm1"/) },
  });
  broker.problems = [{ field: 'allocation.memoryBytes', value: 1, message: 'does not fit' }];
  host.send({ type: 'notice', id: 'm4', notice: notice('n7', 7) });
  expect(await next('ack', (m) => (m as { replyTo: string }).replyTo === 'm4')).toMatchObject({
    state: 'rejected',
    error: { code: 'NOTICE_REJECTED', message: expect.stringMatching(/does not fit/) },
  });
  // A restore message carrying a reclaim: refused at the schema, never reaches the book.
  host.send({ type: 'restore', id: 'm5', notice: notice('n8', 8) });
  expect(await next('error', (m) => (m as { replyTo: string }).replyTo === 'm5')).toMatchObject({
    code: 'PROTOCOL_INVALID',
  });
  expect(broker.calls.map((c) => c.id)).toEqual(['n5']);
});

test('a deadline more than a day away is refused: a timer that long fires at once (docs/protocol.md, "Deadlines")', async () => {
  // 2099: Node's setTimeout caps at 2^31-1 ms (24.8 days) and fires in 1 ms beyond it;
  // such a notice once had every step "time out" in its first millisecond.
  host.send({
    type: 'notice',
    id: 'm1',
    notice: notice('n1', 1, { deadline: '2099-01-01T00:00:00.000Z' }),
  });
  expect(await next('ack')).toMatchObject({
    state: 'rejected',
    error: {
      code: 'NOTICE_REJECTED',
      message: expect.stringMatching(/deadline: more than 24 h away/),
    },
  });
  // 23 hours ahead is fine; the refused one did not move lastSeq.
  host.send({
    type: 'notice',
    id: 'm2',
    notice: notice('n2', 1, { deadline: new Date(Date.now() + 23 * 3_600_000).toISOString() }),
  });
  expect(await next('ack')).toMatchObject({ state: 'accepted' });
  await next('outcome');
  expect(broker.calls.map((c) => c.id)).toEqual(['n2']);
});

test('a journal that cannot be written: rejected with JOURNAL_WRITE, nothing done', async () => {
  // The notices directory replaced by a file: every record write fails (even as root).
  await fsp.rm(path.join(dir, 'state/notices'), { recursive: true });
  await fsp.writeFile(path.join(dir, 'state/notices'), 'not a directory');
  host.send({ type: 'notice', id: 'm1', notice: notice('n1', 1) });
  expect(await next('ack')).toMatchObject({ state: 'rejected', error: { code: 'JOURNAL_WRITE' } });
  expect(broker.calls).toEqual([]);
  // Nor later: with the directory back, the next notice goes through the same
  // one-at-a-time queue, and by its outcome the refused one has still not been carried out.
  await fsp.rm(path.join(dir, 'state/notices'));
  await fsp.mkdir(path.join(dir, 'state/notices'));
  host.send({ type: 'notice', id: 'm2', notice: notice('n2', 1) });
  expect(await next('ack')).toMatchObject({ state: 'accepted' });
  await next('outcome');
  expect(broker.calls.map((c) => c.id)).toEqual(['n2']);
});

test('after a restart mid-notice the notice is resumed once, and a replay gets its outcome', async () => {
  // The first run never finishes: it is the run that "crashed".
  broker.gate = new Promise(() => undefined);
  host.send({ type: 'notice', id: 'm1', notice: notice('n1', 3) });
  await next('progress');
  // The "crash": the journal says running; a new book on the same state dir resumes it.
  expect(
    JSON.parse(await fsp.readFile(path.join(dir, 'state/notices/n1.json'), 'utf8')).state,
  ).toBe('running');
  await host.close();
  await server.close();
  await startGuest();
  expect(book.lastSeq).toBe(3);
  await Promise.all(book.resume());
  expect(broker.calls).toEqual([{ id: 'n1', resumed: true }]);
  expect(book.resume()).toEqual([]); // nothing left to resume

  await connect();
  expect(await next('hello')).toMatchObject({ lastSeq: 3 });
  host.send({ type: 'notice', id: 'm2', notice: notice('n1', 3) });
  expect(await next('ack')).toMatchObject({ state: 'duplicate' });
  expect(await next('outcome')).toMatchObject({ outcome: { noticeId: 'n1' } });
  expect(broker.calls).toHaveLength(1);
  const rec = JSON.parse(
    await fsp.readFile(path.join(dir, 'state/notices', `${noticeKey('n1')}.json`), 'utf8'),
  );
  expect(rec).toMatchObject({ state: 'done', runs: 2 });
});

test('cancel before work started; not after', async () => {
  let release!: () => void;
  broker.gate = new Promise((r) => (release = r));
  host.send({ type: 'notice', id: 'm1', notice: notice('n1', 1) });
  host.send({ type: 'notice', id: 'm2', notice: notice('n2', 2) });
  await next('progress');
  // n2 is journaled and queued behind n1 once it is acked.
  expect(await next('ack', (m) => (m as { replyTo: string }).replyTo === 'm2')).toMatchObject({
    state: 'accepted',
  });
  host.send({ type: 'cancel', id: 'c1', noticeId: 'n2' });
  expect(await next('ack', (m) => (m as { replyTo: string }).replyTo === 'c1')).toMatchObject({
    state: 'cancelled',
  });
  host.send({ type: 'cancel', id: 'c2', noticeId: 'n1' });
  expect(await next('ack', (m) => (m as { replyTo: string }).replyTo === 'c2')).toMatchObject({
    state: 'not-cancellable',
  });
  host.send({ type: 'cancel', id: 'c3', noticeId: 'nope' });
  expect(await next('ack', (m) => (m as { replyTo: string }).replyTo === 'c3')).toMatchObject({
    state: 'rejected',
    error: { code: 'NOTICE_UNKNOWN' },
  });
  release();
  await next('outcome');
  await book.idle();
  expect(broker.calls.map((c) => c.id)).toEqual(['n1']);
});

test('ping → pong; a bad message → error, and the connection stays', async () => {
  host.send({ type: 'ping', id: 'p1', t: 42 });
  expect(await next('pong')).toMatchObject({ replyTo: 'p1', t: 42 });
  // A line no schema accepts, written raw on the socket underneath.
  (host as unknown as { sock: { write(s: string): void } }).sock?.write(
    '{"type":"notice","id":"x"}\n',
  );
  expect(await next('error')).toMatchObject({ code: 'PROTOCOL_INVALID' });
  host.send({ type: 'ping', id: 'p2', t: 43 });
  expect(await next('pong')).toMatchObject({ replyTo: 'p2' });
});

test('any protocol id (up to 128 characters, with colons) has a journal key that fits', async () => {
  const long = `host:${'a'.repeat(120)}:7`;
  expect(noticeKey(long)).toMatch(/^h-[0-9a-f]{40}$/);
  expect(`${noticeKey(long)}--${'p'.repeat(63)}`.length).toBeLessThanOrEqual(128);
  expect(noticeKey('n1')).toBe('n1');
  host.send({ type: 'notice', id: 'm1', notice: notice(long, 1) });
  expect(await next('ack')).toMatchObject({ noticeId: long, state: 'accepted' });
  expect(await next('outcome')).toMatchObject({ outcome: { noticeId: long } });
});
