/**
 * Every notice's allocation is checked against the guest's own (docs/reliability.md,
 * "host and guest agree"): it must be the allocation before it minus (reclaim) or plus
 * (restore) its change. A real guest agent over its real unix channel, the test playing
 * the host: a restore that would LOWER the guest, a reclaim whose allocation is off, are
 * refused with ALLOCATION_MISMATCH and nothing is done (allocation, limits, projects as
 * they were); two correct reclaims sent back to back are both accepted (the second is
 * checked against the first one's allocation, not the one before it ran).
 */
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import type { Notice } from '../../../agent/broker/types';
import type { Ack, Message, OutcomeMsg } from '../../../agent/protocol/messages';
import { connectUnix } from '../../../agent/transport/unix';
import { GuestUnderTest, nestctl, waitFor, type Env } from './harness';

jest.setTimeout(40_000);

const GiB = 1024 ** 3;
let g: GuestUnderTest;
let env: Env;
const upstreamOf = (e: Env): string => path.join(e.dir, 'upstream.sock');

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-alloc',
    [
      { name: 'web', priority: 100, mode: 'graceful', memory: { min: '256MiB', max: '1GiB' } },
      { name: 'batch', priority: 1, mode: 'graceful', memory: { min: '1GiB', max: '1GiB' } },
    ],
    {
      extra: (e) => ({ upstream: { transport: 'unix', path: upstreamOf(e) } }),
      ready: { what: 'projects to run', until: (e) => e.markerLines('batch').length > 0 },
    },
  );
  ({ env } = g);
});

afterAll(() => g?.dispose());

let seq = 0;
function notice(
  kind: Notice['kind'],
  change: Notice['change'],
  allocation: Notice['allocation'],
): Notice {
  seq++;
  return {
    id: `alloc-${seq}`,
    guest: 'vm-test',
    seq,
    kind,
    change,
    allocation,
    deadline: new Date(Date.now() + 30_000).toISOString(),
    reason: 'allocation check',
    issuedAt: new Date().toISOString(),
  };
}

async function status(): Promise<{ allocation: { memoryBytes: number; cpus: number } }> {
  const r = await nestctl(env, ['status', '--json']);
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout) as { allocation: { memoryBytes: number; cpus: number } };
}

async function limits(): Promise<unknown> {
  const r = await nestctl(env, ['projects', '--json']);
  return (JSON.parse(r.stdout) as { name: string; kernel: unknown; state: string }[]).map((p) => [
    p.name,
    p.state,
    p.kernel,
  ]);
}

test('a notice whose allocation is not before ± change is refused, nothing done; a correct one goes', async () => {
  const inbox: Message[] = [];
  // The operator socket answers before the upstream channel listens (agent.ts start order).
  await waitFor('the upstream socket', () => existsSync(upstreamOf(env)));
  const ch = await connectUnix(upstreamOf(env));
  ch.on('message', (m) => inbox.push(m));
  await waitFor('hello', () => inbox.some((m) => m.type === 'hello'));
  const ackOf = async (msgId: string): Promise<Ack> => {
    await waitFor(`the ack of ${msgId}`, () =>
      inbox.some((m) => m.type === 'ack' && m.replyTo === msgId),
    );
    return inbox.find((m) => m.type === 'ack' && m.replyTo === msgId) as Ack;
  };
  expect((await status()).allocation).toEqual({ memoryBytes: 4 * GiB, cpus: 2 });
  const kernelBefore = await limits();

  // A restore of 0.5 GiB whose allocation (3 GiB) is below the guest's 4 GiB: today's code
  // lowered the guest to 3 GiB.
  ch.send({
    type: 'restore',
    id: 'm-low',
    notice: notice(
      'restore',
      { memoryBytes: 0.5 * GiB, cpus: 0 },
      { memoryBytes: 3 * GiB, cpus: 2 },
    ),
  });
  // A reclaim of 1 GiB and 0.5 CPU whose allocation says 3.5 GiB and 2 CPUs.
  ch.send({
    type: 'notice',
    id: 'm-off',
    notice: notice('reclaim', { memoryBytes: GiB, cpus: 0.5 }, { memoryBytes: 3.5 * GiB, cpus: 2 }),
  });
  const low = await ackOf('m-low');
  expect(low).toMatchObject({ state: 'rejected', error: { code: 'ALLOCATION_MISMATCH' } });
  expect(low.error!.message).toMatch(/allocation\.memoryBytes/);
  const off = await ackOf('m-off');
  expect(off).toMatchObject({ state: 'rejected', error: { code: 'ALLOCATION_MISMATCH' } });
  // Both fields named at once.
  expect(off.error!.message).toMatch(/allocation\.memoryBytes.*allocation\.cpus/);

  // Nothing was done: allocation, kernel limits and projects as they were.
  expect((await status()).allocation).toEqual({ memoryBytes: 4 * GiB, cpus: 2 });
  expect(await limits()).toEqual(kernelBefore);
  expect(env.markerLines('batch').filter((l) => l.startsWith('term '))).toHaveLength(0);
  const rows = JSON.parse((await nestctl(env, ['notices', '--json'])).stdout) as {
    id: string;
    state: string;
    error: { code: string } | null;
  }[];
  expect(rows.filter((r) => r.id === 'alloc-1' || r.id === 'alloc-2')).toEqual([
    expect.objectContaining({
      state: 'rejected',
      error: expect.objectContaining({ code: 'ALLOCATION_MISMATCH' }),
    }),
    expect.objectContaining({
      state: 'rejected',
      error: expect.objectContaining({ code: 'ALLOCATION_MISMATCH' }),
    }),
  ]);

  // Two correct reclaims back to back: the second is checked against the first's 3.5 GiB
  // (it is still queued or running when the second arrives), not the 4 GiB of now.
  ch.send({
    type: 'notice',
    id: 'm-a',
    notice: notice(
      'reclaim',
      { memoryBytes: 0.5 * GiB, cpus: 0 },
      { memoryBytes: 3.5 * GiB, cpus: 2 },
    ),
  });
  ch.send({
    type: 'notice',
    id: 'm-b',
    notice: notice(
      'reclaim',
      { memoryBytes: 0.5 * GiB, cpus: 0.5 },
      { memoryBytes: 3 * GiB, cpus: 1.5 },
    ),
  });
  expect(await ackOf('m-a')).toMatchObject({ state: 'accepted' });
  expect(await ackOf('m-b')).toMatchObject({ state: 'accepted' });
  await waitFor(
    'both outcomes',
    () => inbox.filter((m) => m.type === 'outcome').length >= 2,
    20_000,
  );
  const outcomes = inbox.filter((m) => m.type === 'outcome') as OutcomeMsg[];
  expect(outcomes.map((o) => o.outcome.noticeId).sort()).toEqual(['alloc-3', 'alloc-4']);
  expect((await status()).allocation).toEqual({ memoryBytes: 3 * GiB, cpus: 1.5 });

  // The operator's path is checked the same way: a local restore is computed from the
  // allocation now, and is accepted.
  const r = await nestctl(env, ['restore', '--memory', '1GiB', '--cpus', '0.5', '--json']);
  expect(r.code).toBe(0);
  expect((await status()).allocation).toEqual({ memoryBytes: 4 * GiB, cpus: 2 });
  await ch.close();
});
