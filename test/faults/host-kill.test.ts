/**
 * kill -9 of the host broker at every step of a notice (docs/reliability.md), with the
 * test-only NESTBROKER_FAULT=<step> (agent/common/fault.ts) placing each crash exactly:
 *
 *   after-journal     the notice is journaled and booked; nothing sent
 *   after-send        the notice is on the channel; the host dies before any answer
 *                     (the guest carries it out while the host is down)
 *   before-actuation  the guest's outcome is journaled; the VM's limits not yet lowered
 *
 * The host is started again without the fault and resumes from its journal: the notice
 * completes exactly once (the guest journal holds it once, run once; the stopped project
 * ran its SIGTERM handler once), the VM's cgroup limit is the new allocation, and the
 * operator sees `done` with the guest's true outcome.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { rpcCall } from '../../agent/common/rpc';
import { FaultStack, MiB, VM1_WEB_BATCH, waitFor } from './stack';

jest.setTimeout(60_000);

let s: FaultStack;

beforeAll(async () => {
  s = await FaultStack.started('hkill', [VM1_WEB_BATCH]);
});

afterAll(async () => {
  await s?.teardown();
});

async function hostJournal(): Promise<
  { notice: { id: string }; state: string; sentAt?: string; outcome?: unknown }[]
> {
  const d = path.join(s.dir, 'host-state', 'notices');
  const out = [];
  for (const f of await fs.readdir(d))
    if (f.endsWith('.json')) out.push(JSON.parse(await fs.readFile(path.join(d, f), 'utf8')));
  return out;
}

const STEPS = ['after-journal', 'after-send', 'before-actuation'] as const;

test.each(STEPS)(
  'host kill -9 at %s: on restart the notice completes exactly once',
  async (step) => {
    await s.stack.stopProc(s.stack.host);
    const host = await s.stack.startHost({ NESTBROKER_FAULT: step });
    await s.stack.waitConnected(['vm1']);
    const terms = s.count('vm1', 'batch', 'term');
    const starts = s.count('vm1', 'batch', 'start');

    // The operator's connection dies with the host.
    const err = await s.reclaim('vm1', '768MiB', 1, '30s').catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'TRANSPORT' });
    expect((await host.exited).signal).toBe('SIGKILL');
    expect(await fs.readFile(path.join(s.dir, 'logs', 'host.log'), 'utf8')).toContain(
      `NESTBROKER_FAULT=${step}: killing pid ${host.child.pid}`,
    );

    const open = (await hostJournal()).filter(
      (r) => !['done', 'late', 'refused', 'cancelled'].includes(r.state),
    );
    expect(open).toHaveLength(1);
    const id = open[0].notice.id;
    if (step === 'after-journal') {
      expect(open[0].state).toBe('issued');
      expect(open[0].sentAt).toBeUndefined();
      await new Promise((r) => setTimeout(r, 300));
      expect((await s.guestNotices('vm1')).find((r) => r.id === id)).toBeUndefined(); // never sent
    } else if (step === 'after-send') {
      expect(open[0].state).toBe('issued');
      // The guest got it and carries it out with no host there; its outcome is owed.
      await waitFor('the guest to finish the notice alone', async () => {
        const g = (await s.guestNotices('vm1')).find((r) => r.id === id);
        return g?.state === 'done' ? g : undefined;
      });
      expect(s.vmMemory('vm1')).toBe(1024 * MiB); // the host has not lowered anything
    } else {
      expect(open[0].state).toBe('reported');
      expect(open[0].outcome).toBeDefined();
      expect(s.count('vm1', 'batch', 'term')).toBe(terms + 1);
      expect(s.vmMemory('vm1')).toBe(1024 * MiB); // not actuated yet
    }

    await s.stack.startHost();
    const n = await waitFor(
      'the resumed notice done',
      async () => {
        const x = (await s.hostNotices('vm1')).find((r) => r.id === id);
        return x?.state === 'done' ? x : undefined;
      },
      30_000,
    );
    expect(n.outcome?.status).toBe('complete');
    expect(n.outcome!.projects.map((p) => [p.name, p.action])).toEqual([
      ['batch', 'stopped'],
      ['web', 'shrunk'],
    ]);
    expect(n.actuation?.errors).toEqual([]);
    expect(s.vmMemory('vm1')).toBe(256 * MiB);
    expect(s.count('vm1', 'batch', 'term')).toBe(terms + 1);
    expect(s.count('vm1', 'batch', 'start')).toBe(starts);
    const web = n.outcome!.projects.find((p) => p.name === 'web')!;
    expect(s.projectLimits('vm1', 'web')).toEqual({
      memoryMax: web.after.memoryMax,
      cpuMax: web.after.cpuMax,
    });
    const g = (await s.guestNotices('vm1')).filter((r) => r.id === id);
    expect(g).toHaveLength(1);
    expect(g[0]).toMatchObject({ state: 'done', runs: 1 });
    const books = (
      (await rpcCall(s.stack.hostSocket, 'guests')) as {
        name: string;
        books: { granted: { memoryBytes: number } };
      }[]
    ).find((x) => x.name === 'vm1')!.books;
    expect(books.granted.memoryBytes).toBe(256 * MiB);

    const r = await s.restore('vm1');
    expect(r).toMatchObject({ state: 'done', outcome: { status: 'complete' } });
    await waitFor('batch to start again', async () =>
      s.count('vm1', 'batch', 'start') === starts + 1 ? true : undefined,
    );
    expect(s.vmMemory('vm1')).toBe(1024 * MiB);
  },
);
