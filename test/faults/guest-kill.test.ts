/**
 * kill -9 of the guest agent at every step of a notice (docs/reliability.md). The agent is
 * started with the test-only NESTBROKER_FAULT=<step> (agent/common/fault.ts), which makes
 * it SIGKILL itself the first time it reaches that step, so each crash lands exactly there:
 *
 *   after-ack       the notice is journaled and acknowledged; nothing acted on yet
 *   mid-shrink      a project's memory.high (v1 soft limit) and CPU are set, memory.max not
 *   mid-stop        a project has had its SIGTERM, the agent dies in its grace period
 *   before-outcome  the outcome is journaled, never sent
 *
 * Each time the host broker (a real process, not killed) waits; the agent is started
 * again without the fault and the notice completes exactly once: the operator's reclaim
 * returns `done` with the true outcome, the stopped project ran its SIGTERM handler once
 * and was not started again, the shrunk project's kernel limits are the plan's final
 * ones (not the half-applied ones), the VM's limit is the new allocation, and the
 * guest's journal holds the notice once. A restore puts everything back for the next step.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { rpcCall } from '../../agent/common/rpc';
import { FaultStack, MiB, VM1_WEB_BATCH, waitFor } from './stack';

jest.setTimeout(60_000);

let s: FaultStack;

beforeAll(async () => {
  s = await FaultStack.started('gkill', [VM1_WEB_BATCH]);
});

afterAll(async () => {
  await s?.teardown();
});

const STEPS = ['after-ack', 'mid-shrink', 'mid-stop', 'before-outcome'] as const;

test.each(STEPS)('kill -9 at %s: on restart the notice completes exactly once', async (step) => {
  const run = s.run('vm1');
  await s.stack.stopProc(run.proc); // SIGTERM: the projects keep running
  const faulty = (await s.stack.startGuest('vm1', { NESTBROKER_FAULT: step })).proc!;
  await s.stack.waitConnected(['vm1']);
  const terms = s.count('vm1', 'batch', 'term');
  const starts = s.count('vm1', 'batch', 'start');
  const webStarts = s.count('vm1', 'web', 'start');

  const reclaim = s.reclaim('vm1', '768MiB', 1, '30s');
  reclaim.catch(() => undefined);
  const how = await faulty.exited;
  expect(how.signal).toBe('SIGKILL');
  expect(await fs.readFile(path.join(s.dir, 'logs', 'guest-vm1.log'), 'utf8')).toContain(
    `NESTBROKER_FAULT=${step}: killing pid ${faulty.child.pid}`,
  );

  // What the crash left, step by step.
  const [rec] = await waitFor('the notice in the host journal', async () => {
    const ns = (await s.hostNotices('vm1')).filter((n) => n.state !== 'done');
    return ns.length === 1 && ns[0].state !== 'issued' ? ns : undefined;
  });
  const key = rec.id;
  const notices = await s.guestJournal('vm1', 'notices');
  const mine = notices.filter((r) => r.file === `${key}.json`);
  expect(mine).toHaveLength(1);
  const steps = await s.guestJournal('vm1', 'steps');
  // One step record per notice (agent/broker/broker.ts NoticeStepJournal), one entry a child.
  const all = steps.find((r) => r.file === `${key}--steps.json`) as
    Record<string, Record<string, unknown>> | undefined;
  const stepOf = (child: string) => all?.[child];
  const plan = stepOf('_plan') as
    | { outcome: { plan: { decisions: { project: string; after: { memoryHigh: number } }[] } } }
    | undefined;
  if (step === 'after-ack') {
    expect(rec.state).toBe('acked'); // the host has the ack
    expect(['accepted', 'running']).toContain(mine[0].state);
    expect(stepOf('batch')?.startedAt).toBeUndefined(); // nothing acted on
    expect(s.count('vm1', 'batch', 'term')).toBe(terms);
  } else if (step === 'mid-shrink') {
    expect(mine[0].state).toBe('running');
    // The stop runs beside the shrink (one broker group: agent/guest/executor.ts): begun,
    // perhaps not finished.
    expect(stepOf('batch')?.startedAt).toBeDefined();
    expect(stepOf('web')?.startedAt).toBeDefined();
    expect(stepOf('web')?.outcome).toBeUndefined();
    // Half-limited: memory.high (the v1 soft limit) is at the target, memory.max is not.
    const web = plan!.outcome.plan.decisions.find((d) => d.project === 'web')!;
    expect(Number(s.kernel('memory', 'vm1/projects/web', 'memory.soft_limit_in_bytes'))).toBe(
      web.after.memoryHigh,
    );
    expect(s.projectLimits('vm1', 'web').memoryMax).toBe(256 * MiB);
  } else if (step === 'mid-stop') {
    expect(mine[0].state).toBe('running');
    expect(stepOf('batch')?.startedAt).toBeDefined();
    expect(stepOf('batch')?.outcome).toBeUndefined();
    await waitFor('batch to run its SIGTERM handler', async () =>
      s.count('vm1', 'batch', 'term') === terms + 1 ? true : undefined,
    );
  } else {
    expect(mine[0].state).toBe('done');
    expect(mine[0].outcome).toBeDefined();
    expect(rec.outcome).toBeUndefined(); // never sent
    expect(rec.state).toBe('acked');
  }

  // Restart without the fault: the notice completes, once.
  await s.stack.startGuest('vm1');
  const n = await reclaim;
  expect(n).toMatchObject({ id: key, state: 'done', outcome: { status: 'complete' } });
  expect(n.outcome!.projects.map((p) => [p.name, p.action])).toEqual([
    ['batch', 'stopped'],
    ['web', 'shrunk'],
  ]);
  // Stopped once, never started again; the healthy project never restarted.
  expect(s.count('vm1', 'batch', 'term')).toBe(terms + 1);
  expect(s.count('vm1', 'batch', 'start')).toBe(starts);
  expect(s.count('vm1', 'web', 'start')).toBe(webStarts);
  expect(s.count('vm1', 'web', 'term')).toBe(0);
  expect(s.procs('vm1', 'batch')).toEqual([]);
  // The kernel shows the plan's final limits, not the half-applied ones.
  const web = n.outcome!.projects.find((p) => p.name === 'web')!;
  expect(s.projectLimits('vm1', 'web')).toEqual({
    memoryMax: web.after.memoryMax,
    cpuMax: web.after.cpuMax,
  });
  expect(Number(s.kernel('memory', 'vm1/projects/web', 'memory.soft_limit_in_bytes'))).toBe(
    web.after.memoryHigh,
  );
  expect(s.vmMemory('vm1')).toBe(256 * MiB);
  // The operator sees the true outcome on both sides; the guest holds the notice once.
  const g = (await s.guestNotices('vm1')).filter((r) => r.id === key);
  expect(g).toHaveLength(1);
  expect(g[0]).toMatchObject({ state: 'done', outcome: { status: 'complete' } });
  // after-ack: 1 if the agent died before marking it running, 2 if after; the others exact.
  if (step === 'after-ack') expect([1, 2]).toContain(g[0].runs);
  else expect(g[0].runs).toBe(step === 'before-outcome' ? 1 : 2);
  const books = (
    (await rpcCall(s.stack.hostSocket, 'guests')) as {
      name: string;
      books: { granted: { memoryBytes: number } };
    }[]
  ).find((x) => x.name === 'vm1')!.books;
  expect(books.granted.memoryBytes).toBe(256 * MiB);

  // Put it back for the next step: the restore starts batch again, once.
  const r = await s.restore('vm1');
  expect(r).toMatchObject({ state: 'done', outcome: { status: 'complete' } });
  await waitFor('batch to start again', async () =>
    s.count('vm1', 'batch', 'start') === starts + 1 ? true : undefined,
  );
  expect(s.vmMemory('vm1')).toBe(1024 * MiB);
});
