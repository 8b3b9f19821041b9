/**
 * Capabilities (docs/protocol.md, "Versions and capabilities"): the guest lists its own in
 * `hello` and splits an outcome over the line cap into `outcome-part` messages only for a
 * host whose `welcome` listed `outcome-parts`. A host that did not gets one `outcome` line
 * within the cap (projects acted on first, status and freed whole), never a part it would
 * refuse. A host older than capabilities, which refuses the field in `hello`, gets a second
 * hello without it. The client is real, on a real unix channel; the local broker is a
 * fake reporting 400 projects (a 400-project outcome is ~140 KiB as one line).
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client } from '../../../agent/client/client';
import { NoticeBook, type LocalBroker } from '../../../agent/client/notices';
import { silentLogger } from '../../../agent/common/log';
import type { Notice, Outcome, ProjectOutcome } from '../../../agent/broker/types';
import { encode } from '../../../agent/protocol/framing';
import { HelloSchema } from '../../../agent/protocol/schemas';
import {
  MAX_LINE_BYTES,
  type Hello,
  type Message,
  type OutcomeMsg,
} from '../../../agent/protocol/messages';
import { UnixChannelServer, connectUnix } from '../../../agent/transport/unix';
import type { SocketChannel } from '../../../agent/transport/channel';

const log = silentLogger();
const PROJECTS = 400;

class BigBroker implements LocalBroker {
  readonly name = 'vm1';
  async check() {
    return [];
  }
  async carryOut(n: Notice): Promise<Outcome> {
    // Unchanged projects first: a cut outcome must keep the acted-on ones, wherever they are.
    const projects: ProjectOutcome[] = Array.from({ length: PROJECTS }, (_, i) => ({
      name: `p${String(i).padStart(4, '0')}`,
      action: i >= PROJECTS - 10 ? 'stopped' : 'unchanged',
      before: { memoryHigh: 'max', memoryMax: 64 << 20, cpuMax: 0.1 },
      after: { memoryHigh: 'max', memoryMax: 64 << 20, cpuMax: 0.1 },
      exit: i >= PROJECTS - 10 ? 'graceful' : null,
      ms: 3,
      reason: 'a reason long enough to make this outcome far larger than one line',
    }));
    return {
      noticeId: n.id,
      guest: n.guest,
      status: 'complete',
      projects,
      freed: n.change,
      startedAt: new Date(0).toISOString(),
      finishedAt: new Date(1).toISOString(),
      ms: 1,
    };
  }
}

const notice = (id: string, seq: number): Notice => ({
  id,
  guest: 'vm1',
  seq,
  kind: 'reclaim',
  change: { cpus: 0, memoryBytes: 1 << 20 },
  allocation: { cpus: 2, memoryBytes: (1 << 30) - (1 << 20) },
  deadline: new Date(Date.now() + 30_000).toISOString(),
  reason: 'test',
  issuedAt: new Date().toISOString(),
});

let dir: string;
let server: UnixChannelServer;
let host: SocketChannel;
let inbox: Message[];

async function next(type: Message['type'], pred: (m: Message) => boolean = () => true) {
  const until = Date.now() + 10_000;
  for (;;) {
    const i = inbox.findIndex((m) => m.type === type && pred(m));
    if (i >= 0) return inbox.splice(i, 1)[0];
    if (Date.now() > until) throw new Error(`no ${type}; inbox: ${inbox.map((m) => m.type)}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Waits for the guest's outcome and returns every line it sent for it, in order. */
async function outcomeLines(): Promise<Message[]> {
  await next('outcome');
  return sent.filter((m) => m.type === 'outcome' || m.type === 'outcome-part');
}
let sent: Message[];

beforeEach(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-caps-'));
  const book = new NoticeBook(path.join(dir, 'state'), new BigBroker(), log);
  await book.init();
  server = await UnixChannelServer.listen(path.join(dir, 'ch.sock'), { answerPings: false });
  new Client({
    channel: server,
    book,
    log,
    inventory: async () => ({ cpus: 2, memoryBytes: 1 << 30, projects: [] }),
    facts: () => ({ onlineCpus: [0, 1], memTotal: 1 << 30 }),
  });
  inbox = [];
  sent = [];
  host = await connectUnix(path.join(dir, 'ch.sock'), { answerPings: false, log });
  host.on('message', (m) => {
    inbox.push(m);
    sent.push(m);
  });
});

afterEach(async () => {
  await host?.close();
  await server?.close();
  await fsp.rm(dir, { recursive: true, force: true });
});

const welcome = (hello: Message, capabilities?: string[]): Message => ({
  type: 'welcome',
  id: 'w1',
  replyTo: hello.id,
  version: 1,
  guest: 'vm1',
  heartbeatMs: 0,
  ...(capabilities ? { capabilities } : {}),
});

test('the guest lists outcome-parts in its hello', async () => {
  expect(await next('hello')).toMatchObject({
    version: 1,
    capabilities: ['outcome-parts', 'monotonic-clock', 'cpu-unplug'],
  });
});

test('a host that listed outcome-parts gets the large outcome in parts, then the summary', async () => {
  host.send(welcome(await next('hello'), ['outcome-parts', 'some-future-feature']));
  host.send({ type: 'notice', id: 'm1', notice: notice('n1', 1) });
  expect(await next('ack')).toMatchObject({ state: 'accepted' });
  const lines = await outcomeLines();
  expect(lines.length).toBeGreaterThan(2);
  expect(lines.slice(0, -1).every((m) => m.type === 'outcome-part')).toBe(true);
  const summary = lines[lines.length - 1] as OutcomeMsg;
  expect(summary.parts).toBe(lines.length - 1);
  const projects = lines.flatMap((m) => (m.type === 'outcome-part' ? m.projects : []));
  expect(projects).toHaveLength(PROJECTS);
});

test('a host that did not list it gets one outcome line within the cap: acted-on projects kept, freed whole', async () => {
  host.send(welcome(await next('hello')));
  host.send({ type: 'notice', id: 'm1', notice: notice('n1', 1) });
  const lines = await outcomeLines();
  expect(lines.map((m) => m.type)).toEqual(['outcome']);
  const msg = lines[0] as OutcomeMsg;
  expect(msg.parts).toBeUndefined();
  expect(encode(msg).length).toBeLessThanOrEqual(MAX_LINE_BYTES);
  expect(msg.outcome).toMatchObject({ status: 'complete', freed: { memoryBytes: 1 << 20 } });
  const names = msg.outcome.projects.map((p) => p.name);
  // Some had to go, and the ten stopped ones were kept.
  expect(names.length).toBeLessThan(PROJECTS);
  for (let i = PROJECTS - 10; i < PROJECTS; i++)
    expect(names).toContain(`p${String(i).padStart(4, '0')}`);
});

test('a host older than capabilities refuses the field: the guest says hello again without it', async () => {
  const first = (await next('hello')) as Hello;
  // What a host whose hello schema has no `capabilities` answers (strict: unknown field).
  const old = HelloSchema.omit({ capabilities: true }).strict().safeParse(first);
  expect(old.success).toBe(false);
  host.send({
    type: 'error',
    id: 'e1',
    replyTo: first.id,
    code: 'PROTOCOL_INVALID',
    message: 'invalid "hello" message: (message): unknown field(s) "capabilities"',
    problems: [{ field: '(message)', message: 'unknown field(s) "capabilities"' }],
  });
  const second = (await next('hello')) as Hello;
  expect(second.capabilities).toBeUndefined();
  expect(HelloSchema.omit({ capabilities: true }).strict().safeParse(second).success).toBe(true);
  // And that connection runs without parts.
  host.send(welcome(second));
  host.send({ type: 'notice', id: 'm1', notice: notice('n1', 1) });
  expect((await outcomeLines()).map((m) => m.type)).toEqual(['outcome']);
});

test('any other error about the hello does not make the guest repeat it', async () => {
  const first = await next('hello');
  host.send({
    type: 'error',
    id: 'e1',
    replyTo: first.id,
    code: 'PROTOCOL_VERSION',
    message: 'protocol version 1 is not 2',
  });
  // A ping answered proves the error was handled before it; no second hello came.
  host.send({ type: 'ping', id: 'p1', t: 1 });
  await next('pong');
  expect(inbox.filter((m) => m.type === 'hello')).toEqual([]);
});

test('hello carries the online CPUs and MemTotal; an outcome does only for a host that listed cpu-unplug', async () => {
  const hello = (await next('hello')) as Hello;
  expect(hello).toMatchObject({ onlineCpus: [0, 1], memTotal: 1 << 30 });
  host.send(welcome(hello, ['cpu-unplug']));
  host.send({ type: 'notice', id: 'm1', notice: notice('n1', 1) });
  const [withFacts] = await outcomeLines();
  expect(withFacts).toMatchObject({ type: 'outcome', onlineCpus: [0, 1], memTotal: 1 << 30 });
});

test('a host that takes no cpu-unplug gets outcomes without the facts', async () => {
  const hello = (await next('hello')) as Hello;
  host.send(welcome(hello, ['outcome-parts']));
  host.send({ type: 'notice', id: 'm1', notice: notice('n1', 1) });
  const [plain] = await outcomeLines();
  expect(plain).not.toHaveProperty('onlineCpus');
  expect(plain).not.toHaveProperty('memTotal');
});

test('a host older than onlineCpus and memTotal refuses them: the guest says hello again without them', async () => {
  const first = (await next('hello')) as Hello;
  const old = HelloSchema.omit({ onlineCpus: true, memTotal: true }).strict().safeParse(first);
  expect(old.success).toBe(false);
  host.send({
    type: 'error',
    id: 'e1',
    replyTo: first.id,
    code: 'PROTOCOL_INVALID',
    message: 'invalid "hello" message: (message): unknown field(s) "onlineCpus", "memTotal"',
    problems: [{ field: '(message)', message: 'unknown field(s) "onlineCpus", "memTotal"' }],
  });
  const second = (await next('hello')) as Hello;
  expect(second).not.toHaveProperty('onlineCpus');
  expect(second).not.toHaveProperty('memTotal');
  expect(
    HelloSchema.omit({ onlineCpus: true, memTotal: true }).strict().safeParse(second).success,
  ).toBe(true);
});
