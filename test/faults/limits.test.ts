/**
 * Per-connection rate limits and caps on pending notices (docs/reliability.md), on the real
 * daemons:
 *
 *  - a guest agent's upstream channel (limits.messagesPerSecond 50, limits.messageBurst
 *    100): a flood of 1 000 pings in one write gets about a burst of pongs, one `error`
 *    RATE_LIMITED, the excess is dropped unread; the connection stays and, a second
 *    later, a ping is answered again;
 *  - the guest's cap on pending notices (limits.pendingNotices 2): while two notices are in
 *    flight, more are refused with NOTICE_BACKLOG (nothing journaled, nothing done); later
 *    ones are accepted again;
 *  - the host broker's channel to a guest (same limits): a guest that floods it is told
 *    RATE_LIMITED and keeps its connection (the host does not reconnect);
 *  - the host's cap per guest (limits.pendingNoticesPerGuest 2): a third pending notice for
 *    a guest that is away is refused with NOTICE_BACKLOG and never journaled or booked;
 *  - the config keys are validated like every other (field named).
 */
import { promises as fs } from 'node:fs';
import net from 'node:net';
import { TokenBucket } from '../../agent/transport/channel';
import { validateGuestConfig } from '../../agent/guest/config';
import { validateHostConfig } from '../../agent/host/config';
import { rpcCall } from '../../agent/common/rpc';
import type { Message } from '../../agent/protocol/messages';
import { FaultStack, MiB, waitFor } from './stack';
import { Peer } from './peer';

jest.setTimeout(60_000);

const LIMITS = { messagesPerSecond: 50, messageBurst: 100 };
let s: FaultStack;
let fakeVm2: net.Server;
const fakeConns: net.Socket[] = [];

beforeAll(async () => {
  s = await FaultStack.create(
    'limits',
    [
      {
        name: 'vm1',
        projects: [
          { name: 'web', priority: 100, mode: 'graceful' },
          { name: 'batch', priority: 10, mode: 'stubborn', grace: '1s' },
        ],
      },
      { name: 'vm2', projects: [{ name: 'x', priority: 1, mode: 'graceful' }] },
    ],
    {
      limits: {
        guest: { ...LIMITS, pendingNotices: 2 },
        host: { ...LIMITS, pendingNoticesPerGuest: 2 },
      },
    },
  );
  // vm2 is played by the test: it listens where the host dials.
  fakeVm2 = net.createServer((c) => fakeConns.push(c));
  await new Promise<void>((r) => fakeVm2.listen(s.run('vm2').channel, r));
  await s.stack.startGuest('vm1');
});

afterAll(async () => {
  for (const c of fakeConns) c.destroy();
  await new Promise((r) => fakeVm2?.close(r));
  await s?.teardown();
});

const pings = (n: number, tag: string) =>
  Array.from({ length: n }, (_, i) => ({ type: 'ping', id: `${tag}-${i}`, t: i }));
const isPong = (m: Message) => m.type === 'pong';
const isLimited = (m: Message) => m.type === 'error' && m.code === 'RATE_LIMITED';

test('the token bucket: a burst at once, then the rate', () => {
  let now = 0;
  const b = new TokenBucket({ perSecond: 10, burst: 5 }, () => now);
  expect(Array.from({ length: 8 }, () => b.take())).toEqual([
    ...Array(5).fill(true),
    ...Array(3).fill(false),
  ]);
  now = 100; // 1 token back
  expect([b.take(), b.take()]).toEqual([true, false]);
  now = 10_000; // never more than the burst
  expect(Array.from({ length: 7 }, () => b.take()).filter(Boolean)).toHaveLength(5);
});

let peer: Peer;

test('guest agent: a flood is cut to the rate, told RATE_LIMITED once, and the connection stays', async () => {
  peer = await Peer.connect(s.run('vm1').channel);
  await peer.wait('hello', (m) => m.type === 'hello');
  peer.send({ type: 'welcome', id: 'w1', replyTo: 'h', version: 1, guest: 'vm1', heartbeatMs: 0 });
  await new Promise((r) => setTimeout(r, 1000)); // a full bucket
  const t0 = Date.now();
  peer.flood(pings(1000, 'flood'));
  await peer.wait('RATE_LIMITED', isLimited);
  await new Promise((r) => setTimeout(r, 500));
  const elapsed = (Date.now() - t0) / 1000;
  const pongs = peer.count(isPong);
  expect(pongs).toBeGreaterThanOrEqual(LIMITS.messageBurst);
  expect(pongs).toBeLessThanOrEqual(
    LIMITS.messageBurst + Math.ceil(elapsed * LIMITS.messagesPerSecond) + 1,
  );
  // Not one error per dropped line (~900 were dropped): at most one a second, so a flood
  // whose reading spans a second boundary on a loaded machine may get a second one.
  expect(peer.count(isLimited)).toBeGreaterThanOrEqual(1);
  expect(peer.count(isLimited)).toBeLessThanOrEqual(1 + Math.floor(elapsed));
  const err = peer.got.find(isLimited) as Extract<Message, { type: 'error' }>;
  expect(err.message).toMatch(/over 50 messages\/s \(burst 100\)/);
  expect(peer.closed).toBe(false);
  await new Promise((r) => setTimeout(r, 1100));
  peer.send({ type: 'ping', id: 'after', t: 1 });
  await peer.wait(
    'the ping after the flood answered',
    (m) => m.type === 'pong' && m.replyTo === 'after',
  );
});

test('guest agent: beyond limits.pendingNotices, notices are refused NOTICE_BACKLOG; nothing journaled', async () => {
  // A chain the guest's allocation check accepts (1 GiB / 2 CPUs at the start): each
  // accepted notice's allocation is the previous one's minus its change.
  const chain: Record<number, { change: [number, number]; allocation: [number, number] }> = {
    1: { change: [1, 768 * MiB], allocation: [1, 256 * MiB] },
    2: { change: [0.25, 64 * MiB], allocation: [0.75, 192 * MiB] },
    3: { change: [0.25, 32 * MiB], allocation: [0.5, 160 * MiB] },
    4: { change: [0.25, 32 * MiB], allocation: [0.5, 160 * MiB] },
    5: { change: [0.25, 32 * MiB], allocation: [0.5, 160 * MiB] },
  };
  const notice = (seq: number) => ({
    type: 'notice',
    id: `m-${seq}`,
    notice: {
      id: `n-${seq}`,
      guest: 'vm1',
      seq,
      kind: 'reclaim',
      change: { cpus: chain[seq].change[0], memoryBytes: chain[seq].change[1] },
      allocation: { cpus: chain[seq].allocation[0], memoryBytes: chain[seq].allocation[1] },
      deadline: new Date(Date.now() + 20_000).toISOString(),
      reason: 'backlog test',
      issuedAt: new Date().toISOString(),
    },
  });
  // n-1 stops the stubborn batch (1 s grace); n-2 waits behind it; n-3, n-4 are over the cap.
  peer.flood([1, 2, 3, 4].map(notice));
  const ack = (id: string) =>
    peer.wait<Extract<Message, { type: 'ack' }>>(
      `ack ${id}`,
      (m) => m.type === 'ack' && m.noticeId === id,
    );
  expect((await ack('n-1')).state).toBe('accepted');
  expect((await ack('n-2')).state).toBe('accepted');
  for (const id of ['n-3', 'n-4'])
    expect(await ack(id)).toMatchObject({ state: 'rejected', error: { code: 'NOTICE_BACKLOG' } });
  for (const id of ['n-1', 'n-2'])
    await peer.wait(`outcome ${id}`, (m) => m.type === 'outcome' && m.outcome.noticeId === id);
  const journal = await s.guestJournal('vm1', 'notices');
  expect(journal.map((r) => r.file).sort()).toEqual(['n-1.json', 'n-2.json']);
  expect(s.count('vm1', 'batch', 'ignored')).toBe(1); // stopped once
  // Room again: the next one is accepted and carried out.
  peer.send(notice(5));
  expect((await ack('n-5')).state).toBe('accepted');
  await peer.wait('outcome n-5', (m) => m.type === 'outcome' && m.outcome.noticeId === 'n-5');
  peer.sock.destroy();
});

test('host broker: a guest that floods it is told RATE_LIMITED and keeps its connection', async () => {
  await s.stack.startHost();
  const sock = await waitFor('the host to dial vm2', async () => fakeConns[0]);
  const vm2 = new Peer(sock);
  vm2.send({
    type: 'hello',
    id: 'h2',
    version: 1,
    guest: 'vm2',
    inventory: { cpus: 2, memoryBytes: 1024 * MiB, projects: [] },
    lastSeq: 0,
  });
  await vm2.wait('welcome', (m) => m.type === 'welcome');
  await new Promise((r) => setTimeout(r, 1000));
  vm2.flood(pings(1000, 'hflood'));
  await vm2.wait('RATE_LIMITED from the host', isLimited);
  await new Promise((r) => setTimeout(r, 500));
  const answered = vm2.count((m) => m.type === 'pong' && m.replyTo.startsWith('hflood'));
  // The bucket also pays for this peer's other lines (its pongs to the host's heartbeat
  // pings): one of those just before the flood leaves burst − 1 for it (seen in a run).
  expect(answered).toBeGreaterThanOrEqual(LIMITS.messageBurst - 3);
  expect(answered).toBeLessThan(300);
  expect(vm2.closed).toBe(false);
  await new Promise((r) => setTimeout(r, 1100));
  vm2.send({ type: 'ping', id: 'hafter', t: 1 });
  await vm2.wait('the host answers again', (m) => m.type === 'pong' && m.replyTo === 'hafter');
  expect(fakeConns).toHaveLength(1); // never dropped and redialled
  const gs = (await rpcCall(s.stack.hostSocket, 'guests')) as {
    name: string;
    connected: boolean;
  }[];
  expect(gs.find((g) => g.name === 'vm2')!.connected).toBe(true);
});

test('host broker: a third pending notice for one guest is refused NOTICE_BACKLOG, never journaled', async () => {
  // vm2 (the test) is connected and says nothing to notices: they stay pending till late.
  const first = [s.reclaim('vm2', '64MiB', 0, '3s'), s.reclaim('vm2', '64MiB', 0, '3s')];
  await waitFor('two notices pending', async () => (await s.hostNotices('vm2')).length === 2);
  await expect(s.reclaim('vm2', '64MiB', 0, '3s')).rejects.toMatchObject({
    code: 'NOTICE_BACKLOG',
    message: expect.stringMatching(/2 notices pending \(cap limits.pendingNoticesPerGuest = 2\)/),
  });
  expect(await s.hostNotices('vm2')).toHaveLength(2);
  const d = await fs.readdir(`${s.dir}/host-state/notices`);
  expect(d.filter((f) => f.includes('vm2-'))).toHaveLength(2);
  // They end (late: the guest never answered), and the cap frees up.
  for (const n of await Promise.all(first)) expect(n.state).toBe('late');
  const later = await s.reclaim('vm2', '64MiB', 0, '1s');
  expect(later.state).toBe('late'); // journaled and issued, not refused
  expect(await s.hostNotices('vm2')).toHaveLength(3);
});

test('the limits keys are validated like every other key', () => {
  const g = { guest: 'g', projects: [] };
  expect(() =>
    validateGuestConfig(
      { ...g, limits: { messagesPerSecond: 0, pendingNotices: -1, nope: 1 } },
      't',
    ),
  ).toThrow(
    expect.objectContaining({
      code: 'CONFIG_INVALID',
      problems: expect.arrayContaining([
        expect.objectContaining({ field: 'limits.messagesPerSecond' }),
        expect.objectContaining({ field: 'limits.pendingNotices' }),
      ]),
    }),
  );
  expect(validateGuestConfig(g, 't').limits).toEqual({
    messagesPerSecond: 200,
    messageBurst: 400,
    pendingNotices: 64,
  });
  const h = { guests: [] };
  expect(() => validateHostConfig({ ...h, limits: { messageBurst: 1.5 } })).toThrow(
    expect.objectContaining({
      problems: expect.arrayContaining([expect.objectContaining({ field: 'limits.messageBurst' })]),
    }),
  );
  expect(validateHostConfig(h).limits).toEqual({
    messagesPerSecond: 200,
    messageBurst: 400,
    pendingNoticesPerGuest: 16,
  });
});
