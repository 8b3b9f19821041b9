/**
 * The guest's executor with recording fakes of what it acts on (docs/architecture.md,
 * "Where it is acted on (guest)"): the registry's limit writes, the project notices, the
 * usage reads, the stopper's cgroup acts and signals, the allocation. Each story says
 * which acts happen in which order: every affected project is told before anything is
 * taken from any; memory.high before memory.max, and memory.max only once usage is below
 * it; a project whose memory does not come down is stopped; stop signals lowest rank
 * first; a restore raises limits and starts again what was stopped for room. The same on
 * real cgroups: test/integration/guest/shrink.test.ts and reclaim.test.ts.
 */
import { silentLogger } from '../../../agent/common/log';
import { validateGuestConfig } from '../../../agent/guest/config';
import { GuestBroker } from '../../../agent/guest/executor';
import { EndMargin } from '../../../agent/common/end-margin';
import type { Notice, Outcome, Resources } from '../../../agent/broker/types';
import type { ChildProgress } from '../../../agent/broker/broker';
import {
  FakeGuest,
  MemoryStepJournal,
  TestClock,
  type FakeProject,
} from '../../helpers/guest-fakes';

const Mi = 1024 ** 2;
const Gi = 1024 * Mi;
/** Above pid_max (PID_MAX_LIMIT, 2^22): no real process can have these pids. */
const PID = { web: 4_200_001, batch: 4_200_002, cache: 4_200_003 };

/** A project of the config: its memory and CPU ranges and its stop grace period. */
const project = (
  name: keyof typeof PID,
  priority: number,
  memory: [string, string],
  cpu: [number, number],
  gracePeriod: string,
) => ({
  name,
  priority,
  memory: { min: memory[0], max: memory[1] },
  cpu: { min: cpu[0], max: cpu[1] },
  stop: { gracePeriod },
  command: { argv: ['/bin/true'] },
});

const cfg = validateGuestConfig(
  {
    guest: 'g1',
    reserve: { memory: 0, cpus: 0 },
    projects: [
      project('web', 100, ['256MiB', '1GiB'], [0.5, 2], '2s'),
      project('batch', 10, ['64MiB', '512MiB'], [0.1, 1], '150ms'),
      project('cache', 5, ['64MiB', '256MiB'], [0.1, 1], '1s'),
    ],
  },
  'executor test',
);

/** Each project running at its configured maximum, using `mem` (MiB). */
function running(name: keyof typeof PID, memMiB: number[], more: Partial<FakeProject> = {}) {
  const c = cfg.projects.find((p) => p.name === name)!;
  return {
    pids: [PID[name]],
    limits: { memoryHigh: 'max' as const, memoryMax: c.memory.max, cpuMax: c.cpu.max },
    memory: memMiB.map((m) => m * Mi),
    exitsAfterMs: 10,
    ...more,
  };
}

let seq = 0;
function notice(
  kind: 'reclaim' | 'restore',
  allocation: Resources,
  from: Resources,
  clock: TestClock,
): Notice {
  seq++;
  return {
    id: `g1-${seq}`,
    guest: 'g1',
    seq,
    kind,
    change: {
      memoryBytes: Math.abs(from.memoryBytes - allocation.memoryBytes),
      cpus: Math.abs(from.cpus - allocation.cpus),
    },
    allocation,
    deadline: new Date(clock.now() + 60_000).toISOString(),
    reason: 'test',
    issuedAt: new Date(clock.now()).toISOString(),
  };
}

async function carryOut(
  projects: Record<string, FakeProject>,
  kind: 'reclaim' | 'restore',
  to: Resources,
  from: Resources = { memoryBytes: 2 * Gi, cpus: 4 },
): Promise<{ guest: FakeGuest; outcome: Outcome; progress: ChildProgress[]; clock: TestClock }> {
  const clock = new TestClock();
  const guest = new FakeGuest(cfg, projects, clock, from);
  const broker = new GuestBroker(
    cfg,
    guest.registry,
    guest.board,
    guest.cgroup,
    guest.usage,
    guest.allocationBook,
    silentLogger(),
    guest.sendSignal,
  );
  const progress: ChildProgress[] = [];
  const outcome = await clock.run(
    broker.carryOut(notice(kind, to, from, clock), {
      signal: new AbortController().signal,
      deadline: clock.monotonic() + 60_000,
      killMs: 0,
      clock,
      margin: new EndMargin(),
      log: silentLogger(),
      resumed: false,
      steps: new MemoryStepJournal(),
      onProgress: (ev) => progress.push(ev),
    }),
  );
  return { guest, outcome, progress, clock };
}

/** The events of one project, in order. */
const of = (events: string[], name: string) =>
  events.filter((e) => e.split(' ')[1] === name).map((e) => e.replace(` ${name}`, ''));

const actionOf = (o: Outcome, name: string) => o.projects?.find((p) => p.name === name)?.action;

test('a reclaim that shrinks: told first, memory.high first, memory.max once usage is below', async () => {
  const { guest, outcome } = await carryOut(
    { web: running('web', [300]), batch: running('batch', [50]), cache: running('cache', [40]) },
    'reclaim',
    { memoryBytes: 768 * Mi, cpus: 4 },
  );
  const e = guest.events;
  const firstAct = e.findIndex((x) => !x.startsWith('notify'));
  // Every affected project's notice went out before anything was taken from any.
  expect(e.slice(0, firstAct).sort()).toEqual(
    ['notify batch shrunk', 'notify cache shrunk', 'notify web shrunk'].sort(),
  );
  expect(e.slice(firstAct).some((x) => x.startsWith('notify'))).toBe(false);
  // web keeps the most (highest priority): 768 − 64 − 64 MiB = 640 MiB. The first write
  // is memory.high and CPU, memory.max left where it was.
  expect(of(e, 'web')).toEqual([
    'notify shrunk',
    `write but-memory-max high=${640 * Mi} max=${1 * Gi} cpu=2`,
    `read memory.current ${300 * Mi}`,
    `write memory.max ${640 * Mi}`,
  ]);
  expect(of(e, 'batch')).toEqual([
    'notify shrunk',
    `write but-memory-max high=${64 * Mi} max=${512 * Mi} cpu=1`,
    `read memory.current ${50 * Mi}`,
    `write memory.max ${64 * Mi}`,
  ]);
  // The allocation is recorded once the projects are done.
  expect(e[e.length - 1]).toBe(`allocation ${768 * Mi} 4`);
  expect(outcome.status).toBe('complete');
  expect(['web', 'batch', 'cache'].map((n) => actionOf(outcome, n))).toEqual([
    'shrunk',
    'shrunk',
    'shrunk',
  ]);
  expect(e.some((x) => x.startsWith('signal'))).toBe(false);
});

test('usage that comes down after a while: memory.max waits for it, polled until below', async () => {
  const { guest, outcome, clock } = await carryOut(
    {
      web: running('web', [300]),
      batch: running('batch', [100, 90, 60]),
      cache: running('cache', [40]),
    },
    'reclaim',
    { memoryBytes: 768 * Mi, cpus: 4 },
  );
  expect(of(guest.events, 'batch')).toEqual([
    'notify shrunk',
    `write but-memory-max high=${64 * Mi} max=${512 * Mi} cpu=1`,
    `read memory.current ${100 * Mi}`,
    `read memory.current ${90 * Mi}`,
    `read memory.current ${60 * Mi}`,
    `write memory.max ${64 * Mi}`,
  ]);
  // Polled soon, then less often, on the injected clock: 2 ms, then 4 ms.
  expect(clock.sleeps.filter((ms) => ms <= 100)).toEqual([2, 4]);
  expect(actionOf(outcome, 'batch')).toBe('shrunk');
  expect(outcome.projects?.find((x) => x.name === 'batch')?.ms).toBe(6);
});

test('memory that does not come down within the grace: memory.max is never written, the project is stopped', async () => {
  const { guest, outcome, clock } = await carryOut(
    { web: running('web', [300]), batch: running('batch', [100]), cache: running('cache', [40]) },
    'reclaim',
    { memoryBytes: 768 * Mi, cpus: 4 },
  );
  const b = of(guest.events, 'batch');
  expect(b.slice(0, 3)).toEqual([
    'notify shrunk',
    `write but-memory-max high=${64 * Mi} max=${512 * Mi} cpu=1`,
    `read memory.current ${100 * Mi}`,
  ]);
  expect(b).not.toContain(`write memory.max ${64 * Mi}`);
  // Recorded stopped-for-room before the signal: a restart mid-stop does not start it.
  const tail = b.filter((x) => !x.startsWith('read'));
  expect(tail.slice(2)).toEqual([
    'record {"stoppedForRoom":true}',
    `signal ${PID.batch} SIGTERM`,
    'wait empty 150',
    // Once the group is empty: anything of it alive outside (docs/reliability.md).
    'escape-check',
  ]);
  // Polled for exactly its 150 ms grace (2 + 4 + … + 64, then the 24 left), then the
  // stop's wait for the group (it exits 10 ms after the signal).
  expect(clock.sleeps.filter((ms) => ms <= 100)).toEqual([2, 4, 8, 16, 32, 64, 24, 10]);
  const p = outcome.projects?.find((x) => x.name === 'batch');
  expect(p).toMatchObject({ action: 'stopped', exit: 'graceful', ms: 160 });
  expect(p?.reason).toMatch(
    /memory stayed at 100MiB, above 64MiB, until its grace ran out: stopped/,
  );
});

test('a reclaim that stops two: both told first, then stop signals lowest rank first', async () => {
  const { guest, outcome } = await carryOut(
    {
      web: running('web', [200]),
      batch: running('batch', [50], { exitsAfterMs: undefined }),
      cache: running('cache', [40]),
    },
    'reclaim',
    { memoryBytes: 300 * Mi, cpus: 4 },
  );
  const e = guest.events;
  const notified = e.filter((x) => x.startsWith('notify'));
  expect(notified.sort()).toEqual([
    'notify batch stopped',
    'notify cache stopped',
    'notify web shrunk',
  ]);
  const lastNotify = Math.max(...notified.map((x) => e.indexOf(x)));
  const firstTake = e.findIndex((x) => /^(write|record|signal)/.test(x));
  expect(lastNotify).toBeLessThan(firstTake);
  // cache (priority 5) is signalled before batch (priority 10).
  expect(e.filter((x) => x.startsWith('signal'))).toEqual([
    `signal cache ${PID.cache} SIGTERM`,
    `signal batch ${PID.batch} SIGTERM`,
  ]);
  // batch does not exit on its own: killed after its grace; cache exits in time.
  expect(of(e, 'batch').slice(-3)).toEqual(['wait empty 150', 'kill', 'escape-check']);
  expect(outcome.projects?.find((x) => x.name === 'batch')).toMatchObject({
    action: 'stopped',
    exit: 'killed',
  });
  expect(outcome.projects?.find((x) => x.name === 'cache')).toMatchObject({
    action: 'stopped',
    exit: 'graceful',
  });
  expect(actionOf(outcome, 'web')).toBe('shrunk');
});

test('a restore: limits raised, and a project stopped for room started again inside them', async () => {
  const { guest, outcome } = await carryOut(
    {
      web: running('web', [200], {
        limits: { memoryHigh: 236 * Mi, memoryMax: 236 * Mi, cpuMax: 2 },
      }),
      batch: { ...running('batch', [0]), pids: [], stoppedForRoom: true },
      cache: running('cache', [40], {
        limits: { memoryHigh: 64 * Mi, memoryMax: 64 * Mi, cpuMax: 1 },
      }),
    },
    'restore',
    { memoryBytes: 2 * Gi, cpus: 4 },
    { memoryBytes: 364 * Mi, cpus: 4 },
  );
  expect(of(guest.events, 'batch')).toEqual([
    'notify started',
    `write all high=${512 * Mi} max=${512 * Mi} cpu=1`,
    'start',
  ]);
  expect(of(guest.events, 'web')).toEqual([
    'notify grown',
    `write all high=${1 * Gi} max=${1 * Gi} cpu=2`,
  ]);
  expect(actionOf(outcome, 'batch')).toBe('started');
  expect(actionOf(outcome, 'web')).toBe('grown');
  expect(actionOf(outcome, 'cache')).toBe('grown');
});
