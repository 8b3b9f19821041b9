/**
 * The planner's stages one at a time (docs/architecture.md, "Where it is planned
 * (guest)"), each a small pure function with a table of cases, as kubelet tests its
 * eviction helpers. planner.test.ts tells the whole story through plan(); these say what
 * each stage decides on its own, so a change to one stage fails here, by name.
 */
import {
  PLAN_FLOORS,
  admitRestarts,
  admitRunning,
  budgetOf,
  changes,
  classify,
  cpusetAfter,
  executionOrder,
  explain,
  fill,
  measure,
  planCpuset,
  shortfall,
  summarize,
  type Admission,
  type Budget,
  type Decision,
  type Explained,
  type Measured,
  type PlanProject,
  type PlanUsage,
} from '../../../agent/guest/planner';
import type { ProjectAction, ProjectLimits, Resources } from '../../../agent/broker/types';

const Mi = 1024 ** 2;
const Gi = 1024 * Mi;

interface P {
  priority?: number;
  mem?: [number, number | 'max']; // bytes
  cpu?: [number, number | 'max'];
  state?: 'running' | 'stopped';
  restart?: boolean;
  forRoom?: boolean;
  limits?: Partial<ProjectLimits>;
}

function proj(name: string, o: P = {}): PlanProject {
  const [mmin, mmax] = o.mem ?? [64 * Mi, 512 * Mi];
  const [cmin, cmax] = o.cpu ?? [0.1, 1];
  return {
    name,
    priority: o.priority ?? 10,
    memory: { min: mmin, max: mmax },
    cpu: { min: cmin, max: cmax, weight: 100 },
    state: o.state ?? 'running',
    restartOnRestore: o.restart ?? true,
    stoppedForRoom: o.forRoom ?? false,
    limits: { memoryHigh: 'max', memoryMax: mmax, cpuMax: cmax, ...o.limits },
  };
}

const alloc = (memoryBytes: number, cpus: number): Resources => ({ memoryBytes, cpus });
const budget = (memoryBytes: number, cpuMilli: number): Budget => ({ memoryBytes, cpuMilli });
/** A project measured in a roomy allocation (8GiB, 8 CPUs) unless told otherwise. */
const m = (name: string, o: P = {}, u?: PlanUsage, a = alloc(8 * Gi, 8)): Measured =>
  measure(proj(name, o), u, a);

describe('budgetOf: the allocation in whole bytes and milli-CPUs, never above it', () => {
  test.each([
    { allocation: alloc(1 * Gi, 2), want: budget(1 * Gi, 2000) },
    { allocation: alloc(1000.9, 0.0019), want: budget(1000, 1) },
    { allocation: alloc(0, 0), want: budget(0, 0) },
    { allocation: alloc(5, 0.3), want: budget(5, 300) },
  ])('$allocation.memoryBytes bytes, $allocation.cpus CPUs', ({ allocation, want }) => {
    expect(budgetOf(allocation)).toEqual(want);
  });
});

describe('measure (stage 1): floors, effective maximums and usage above the minimum', () => {
  test.each<{
    case: string;
    p: P;
    usage?: PlanUsage;
    allocation: Resources;
    want: Partial<Measured>;
  }>([
    {
      case: 'a running project with usage: its max is cut to the allocation',
      p: { mem: [100 * Mi, 1 * Gi], cpu: [0.1, 4] },
      usage: { memoryCurrent: 300 * Mi, cpuUsageRate: 0.6 },
      allocation: alloc(512 * Mi, 2),
      want: {
        running: true,
        memCurrent: 300 * Mi,
        memFloor: 100 * Mi,
        memEffMax: 512 * Mi,
        cpuFloor: 100,
        cpuEffMax: 2000,
        // 200MiB of 512MiB above its minimum, plus 0.5 of 2 CPUs
        usageAboveMin: 200 / 512 + 0.5 / 2,
      },
    },
    {
      case: 'a minimum of zero is floored at PLAN_FLOORS (4MiB, 0.01 CPUs)',
      p: { mem: [0, 1 * Gi], cpu: [0, 1] },
      allocation: alloc(2 * Gi, 2),
      want: { memFloor: PLAN_FLOORS.memoryBytes, cpuFloor: 10, memEffMax: 1 * Gi },
    },
    {
      case: 'a maximum below PLAN_FLOORS is the floor itself',
      p: { mem: [0, 2 * Mi], cpu: [0, 0.005] },
      allocation: alloc(2 * Gi, 2),
      want: { memFloor: 2 * Mi, memEffMax: 2 * Mi, cpuFloor: 5, cpuEffMax: 5 },
    },
    {
      case: '"max" means the whole allocation',
      p: { mem: [64 * Mi, 'max'], cpu: [0.5, 'max'] },
      allocation: alloc(3 * Gi, 1.5),
      want: { memEffMax: 3 * Gi, cpuEffMax: 1500 },
    },
    {
      case: 'a maximum below the minimum counts as the minimum',
      p: { mem: [200 * Mi, 100 * Mi], cpu: [1, 0.5] },
      allocation: alloc(2 * Gi, 4),
      want: { memFloor: 200 * Mi, memEffMax: 200 * Mi, cpuFloor: 1000, cpuEffMax: 1000 },
    },
    {
      case: 'CPUs in thousandths: the minimum rounds up, the maximum down',
      p: { cpu: [0.3331, 0.6669] },
      allocation: alloc(2 * Gi, 4),
      want: { cpuFloor: 334, cpuEffMax: 666 },
    },
    {
      case: 'a running project with no usage ranks as using the most (undefined)',
      p: {},
      allocation: alloc(2 * Gi, 4),
      want: { running: true, usageAboveMin: undefined, memCurrent: undefined },
    },
    {
      case: 'a stopped project: no usage counts, whatever the sampler says',
      p: { state: 'stopped' },
      usage: { memoryCurrent: 900 * Mi, cpuUsageRate: 3 },
      allocation: alloc(2 * Gi, 4),
      want: { running: false, usageAboveMin: 0, memCurrent: undefined },
    },
  ])('$case', ({ p, usage, allocation, want }) => {
    const got = measure(proj('x', p), usage, allocation);
    expect(got).toMatchObject(want);
    for (const k of Object.keys(want)) expect(got).toHaveProperty(k, want[k as keyof Measured]);
  });
});

describe('shortfall: why the floors do not fit, in words', () => {
  const w = m('x', { mem: [256 * Mi, 1 * Gi], cpu: [0.5, 1] });
  test.each([
    { left: budget(256 * Mi, 500), want: undefined },
    { left: budget(255 * Mi, 500), want: /^its minimum memory 256MiB > 255MiB left$/ },
    { left: budget(1 * Gi, 499), want: /^its minimum CPU 0\.5 CPUs > 0\.499 CPUs left$/ },
    { left: budget(0, 0), want: /^its minimum memory .* left and its minimum CPU .* left$/ },
  ])('left $left.memoryBytes bytes, $left.cpuMilli milli-CPUs', ({ left, want }) => {
    const got = shortfall(w, left);
    if (want === undefined) expect(got).toBeUndefined();
    else expect(got).toMatch(want);
  });
});

describe('admitRunning (stage 2): running projects, highest-ranked first, while floors fit', () => {
  test.each<{ case: string; work: Measured[]; budget: Budget; admitted: string[]; out: string[] }>([
    {
      case: 'the lowest priority is the one left out',
      work: [
        m('web', { priority: 100, mem: [300 * Mi, 1 * Gi] }),
        m('batch', { priority: 1, mem: [300 * Mi, 1 * Gi] }),
      ],
      budget: budget(500 * Mi, 4000),
      admitted: ['web'],
      out: ['batch'],
    },
    {
      case: 'one that does not fit is skipped, and a smaller one ranked below it still runs',
      work: [
        m('big', { priority: 100, mem: [600 * Mi, 1 * Gi] }),
        m('small', { priority: 1, mem: [100 * Mi, 1 * Gi] }),
      ],
      budget: budget(512 * Mi, 4000),
      admitted: ['small'],
      out: ['big'],
    },
    {
      case: 'same priority: the one using more above its minimum gives first',
      work: [
        m('lean', { mem: [300 * Mi, 1 * Gi] }, { memoryCurrent: 310 * Mi }),
        m('fat', { mem: [300 * Mi, 1 * Gi] }, { memoryCurrent: 900 * Mi }),
      ],
      budget: budget(500 * Mi, 4000),
      admitted: ['lean'],
      out: ['fat'],
    },
    {
      case: 'stopped projects are not this stage’s business',
      work: [m('a'), m('b', { state: 'stopped', forRoom: true })],
      budget: budget(1 * Gi, 4000),
      admitted: ['a'],
      out: [],
    },
  ])('$case', ({ work, budget: b, admitted, out }) => {
    const r = admitRunning(work, b);
    const names = (ok: boolean) =>
      [...r.admissions].filter(([, a]) => a.admitted === ok).map(([n]) => n);
    expect(names(true)).toEqual(admitted);
    expect(names(false)).toEqual(out);
    for (const n of admitted)
      expect(r.admissions.get(n)).toEqual({ admitted: true, starting: false });
    const taken = work.filter((w) => admitted.includes(w.name));
    expect(r.left).toEqual({
      memoryBytes: b.memoryBytes - taken.reduce((s, w) => s + w.memFloor, 0),
      cpuMilli: b.cpuMilli - taken.reduce((s, w) => s + w.cpuFloor, 0),
    });
  });

  test('the one left out says why', () => {
    const r = admitRunning([m('x', { mem: [600 * Mi, 1 * Gi] })], budget(512 * Mi, 4000));
    expect(r.admissions.get('x')).toEqual({
      admitted: false,
      why: 'its minimum memory 600MiB > 512MiB left',
    });
  });
});

describe('admitRestarts (stage 3): only stopped-for-room projects with restartOnRestore', () => {
  const left = budget(300 * Mi, 4000);
  test.each<{ case: string; p: P; want: Admission }>([
    {
      case: 'stopped for room, restartOnRestore, fits: it starts',
      p: { state: 'stopped', forRoom: true, mem: [200 * Mi, 1 * Gi] },
      want: { admitted: true, starting: true },
    },
    {
      case: 'stopped by an operator (or crashed): it stays stopped',
      p: { state: 'stopped', forRoom: false },
      want: { admitted: false, why: 'it was not stopped for lack of room' },
    },
    {
      case: 'restartOnRestore off',
      p: { state: 'stopped', forRoom: true, restart: false },
      want: { admitted: false, why: 'restartOnRestore is off' },
    },
    {
      case: 'its minimum does not fit in what the running ones left',
      p: { state: 'stopped', forRoom: true, mem: [400 * Mi, 1 * Gi] },
      want: { admitted: false, why: 'its minimum memory 400MiB > 300MiB left' },
    },
  ])('$case', ({ p, want }) => {
    const r = admitRestarts([m('x', p)], left);
    expect(r.admissions.get('x')).toEqual(want);
    expect(r.left).toEqual(
      want.admitted ? budget(100 * Mi, 4000 - 100) : left, // floors: 200MiB, 0.1 CPUs
    );
  });

  test('the highest-ranked gets the room; a running project is never displaced', () => {
    const work = [
      m('running', { mem: [900 * Mi, 1 * Gi] }),
      m('low', { priority: 1, state: 'stopped', forRoom: true, mem: [200 * Mi, 1 * Gi] }),
      m('high', { priority: 50, state: 'stopped', forRoom: true, mem: [200 * Mi, 1 * Gi] }),
    ];
    const r = admitRestarts(work, left);
    expect(r.admissions.has('running')).toBe(false);
    expect(r.admissions.get('high')).toEqual({ admitted: true, starting: true });
    expect(r.admissions.get('low')).toEqual({
      admitted: false,
      why: 'its minimum memory 200MiB > 100MiB left',
    });
  });
});

describe('fill (stage 4): floors, then toward each maximum, highest-ranked first', () => {
  const web = m('web', { priority: 100, mem: [100 * Mi, 400 * Mi], cpu: [0.1, 1] });
  const batch = m('batch', { priority: 1, mem: [100 * Mi, 400 * Mi], cpu: [0.1, 1] });
  // `left` is what remains once both floors (100MiB, 0.1 CPUs each) are taken.
  test.each([
    {
      case: 'room for both maximums: both at their maximum',
      left: budget(1 * Gi, 4000),
      want: { web: [400 * Mi, 1000], batch: [400 * Mi, 1000] },
    },
    {
      case: 'room for one: the higher-ranked gets its maximum, the lower what is left',
      left: budget(400 * Mi, 1000),
      want: { web: [400 * Mi, 1000], batch: [200 * Mi, 200] },
    },
    {
      case: 'nothing left: both at their floors',
      left: budget(0, 0),
      want: { web: [100 * Mi, 100], batch: [100 * Mi, 100] },
    },
  ])('$case', ({ left, want }) => {
    for (const kept of [
      [web, batch],
      [batch, web],
    ]) {
      const t = fill(kept, left);
      expect(Object.fromEntries([...t].map(([n, x]) => [n, [x.memoryBytes, x.cpuMilli]]))).toEqual(
        want,
      );
    }
  });
});

describe('planCpuset and cpusetAfter: pin when whole CPUs go away, unpin when they are back', () => {
  test.each([
    { cpus: 1.5, online: 4, pinned: '0-1', note: /1\.5 CPUs of 4 online.*cpuset 0-1/ },
    { cpus: 0.2, online: 4, pinned: '0', note: /cpuset 0$/ },
    { cpus: 3.0000001, online: 4, pinned: '0-2', note: /cpuset 0-2/ },
    { cpus: 4, online: 4, pinned: undefined, note: undefined },
    { cpus: 1, online: undefined, pinned: undefined, note: undefined },
    { cpus: 1, online: 0, pinned: undefined, note: undefined },
  ])('$cpus of $online online CPUs', ({ cpus, online, pinned, note }) => {
    const c = planCpuset(cpus, online);
    expect(c.pinned).toBe(pinned);
    if (note === undefined) expect(c.note).toBeUndefined();
    else expect(c.note).toMatch(note);
  });

  test.each([
    { cpus: 1.5, online: 4, before: undefined, after: '0-1' },
    { cpus: 1.5, online: 4, before: '0-3', after: '0-1' },
    { cpus: 4, online: 4, before: '0', after: '0-3' },
    { cpus: 4, online: 4, before: undefined, after: undefined },
    { cpus: 1, online: undefined, before: '0', after: '0' },
    { cpus: 1, online: 0, before: '1,3', after: '1,3' },
  ])('$cpus of $online online, cpuset $before → $after', ({ cpus, online, before, after }) => {
    expect(cpusetAfter(planCpuset(cpus, online), before)).toBe(after);
  });
});

describe('classify: what a change of limits is', () => {
  const L = (
    memoryMax: number | 'max',
    cpuMax: number | 'max',
    more: Partial<ProjectLimits> = {},
  ) => ({ memoryHigh: 'max', memoryMax, cpuMax, ...more }) as ProjectLimits;
  test.each<{
    case: string;
    before: ProjectLimits;
    after: ProjectLimits;
    starting?: boolean;
    want: ProjectAction;
  }>([
    { case: 'memory.max down', before: L(1 * Gi, 1), after: L(512 * Mi, 1), want: 'shrunk' },
    { case: 'cpu up', before: L(1 * Gi, 1), after: L(1 * Gi, 2), want: 'grown' },
    { case: '"max" → a number is down', before: L('max', 1), after: L(1 * Gi, 1), want: 'shrunk' },
    {
      case: 'memory down and cpu up: anything down makes it a shrink',
      before: L(1 * Gi, 1),
      after: L(512 * Mi, 2),
      want: 'shrunk',
    },
    {
      case: 'memory.high "max" → memory.max is no change (the effective high is the same)',
      before: L(1 * Gi, 1),
      after: L(1 * Gi, 1, { memoryHigh: 1 * Gi }),
      want: 'unchanged',
    },
    {
      case: 'memory.high below memory.max raised to it is a grow',
      before: L(1 * Gi, 1, { memoryHigh: 512 * Mi }),
      after: L(1 * Gi, 1, { memoryHigh: 1 * Gi }),
      want: 'grown',
    },
    {
      case: 'a smaller cpuset',
      before: L(1 * Gi, 1, { cpuset: '0-3' }),
      after: L(1 * Gi, 1, { cpuset: '0-1' }),
      want: 'shrunk',
    },
    {
      case: 'a larger cpuset',
      before: L(1 * Gi, 1, { cpuset: '0' }),
      after: L(1 * Gi, 1, { cpuset: '0-3' }),
      want: 'grown',
    },
    {
      case: 'a pinned cpuset where there was none (all CPUs)',
      before: L(1 * Gi, 1),
      after: L(1 * Gi, 1, { cpuset: '0' }),
      want: 'shrunk',
    },
    {
      case: 'a restart is started whatever the limits',
      before: L(1 * Gi, 1),
      after: L(512 * Mi, 1),
      starting: true,
      want: 'started',
    },
    { case: 'the same limits', before: L(1 * Gi, 1), after: L(1 * Gi, 1), want: 'unchanged' },
  ])('$case: $want', ({ before, after, starting, want }) => {
    expect(classify(before, after, starting ?? false)).toBe(want);
  });
});

describe('changes: the limits that change, in words', () => {
  test.each<{ before: ProjectLimits; after: ProjectLimits; want: string[] }>([
    {
      before: { memoryHigh: 'max', memoryMax: 1 * Gi, cpuMax: 2 },
      after: { memoryHigh: 512 * Mi, memoryMax: 512 * Mi, cpuMax: 1 },
      want: ['memory.max 1GiB → 512MiB', 'cpu 2 CPUs → 1 CPU'],
    },
    {
      // memory.high is named only when memory.max stays
      before: { memoryHigh: 256 * Mi, memoryMax: 1 * Gi, cpuMax: 'max' },
      after: { memoryHigh: 1 * Gi, memoryMax: 1 * Gi, cpuMax: 'max' },
      want: ['memory.high 256MiB → 1GiB'],
    },
    {
      before: { memoryHigh: 'max', memoryMax: 'max', cpuMax: 1, cpuset: '0-3' },
      after: { memoryHigh: 'max', memoryMax: 'max', cpuMax: 1 },
      want: ['cpuset 0-3 → all'],
    },
    {
      before: { memoryHigh: 'max', memoryMax: 'max', cpuMax: 0.5 },
      after: { memoryHigh: 'max', memoryMax: 'max', cpuMax: 0.5 },
      want: [],
    },
  ])('$want', ({ before, after, want }) => {
    expect(changes(before, after)).toEqual(want);
  });
});

describe('explain (stage 5): one decision, its new limits and its reason', () => {
  const none = planCpuset(8, undefined);
  const admitted: Admission = { admitted: true, starting: false };
  test.each<{
    case: string;
    w: Measured;
    a: Admission;
    target?: { memoryBytes: number; cpuMilli: number };
    want: Partial<Decision>;
    kind: Explained['kind'];
    reason: RegExp;
  }>([
    {
      case: 'a running project left out is stopped, limits untouched',
      w: m('x', { priority: 3 }),
      a: { admitted: false, why: 'its minimum memory 64MiB > 0B left' },
      want: { action: 'stopped', memoryTarget: 0 },
      kind: 'stop',
      reason: /^stopped: its minimum memory 64MiB > 0B left, after .* \(priority 3\)$/,
    },
    {
      case: 'a stopped project left out stays stopped',
      w: m('x', { state: 'stopped' }),
      a: { admitted: false, why: 'restartOnRestore is off' },
      want: { action: 'unchanged', memoryTarget: 0 },
      kind: 'same',
      reason: /^stays stopped: restartOnRestore is off$/,
    },
    {
      case: 'usage above the new memory.max must come down first',
      w: m('x', { mem: [64 * Mi, 512 * Mi] }, { memoryCurrent: 400 * Mi }),
      a: admitted,
      target: { memoryBytes: 256 * Mi, cpuMilli: 1000 },
      want: { action: 'shrunk', memoryTarget: 256 * Mi, mustComeDownFrom: 400 * Mi },
      kind: 'shrink',
      reason:
        /^shrunk: memory\.max 512MiB → 256MiB; between .*; uses 400MiB, above its new memory\.max 256MiB: memory\.high is lowered first/,
    },
    {
      case: 'a shrink with unknown usage says memory.high goes first',
      w: m('x', { mem: [64 * Mi, 512 * Mi] }),
      a: admitted,
      target: { memoryBytes: 64 * Mi, cpuMilli: 100 },
      want: { action: 'shrunk', memoryTarget: 64 * Mi },
      kind: 'shrink',
      reason: /down to its minimum.*; its usage is unknown: memory\.high is lowered first$/,
    },
    {
      case: 'nothing changes: after is exactly before',
      w: m(
        'x',
        { mem: [64 * Mi, 512 * Mi], limits: { memoryHigh: 512 * Mi } },
        {
          memoryCurrent: 100 * Mi,
        },
      ),
      a: admitted,
      target: { memoryBytes: 512 * Mi, cpuMilli: 1000 },
      want: { action: 'unchanged', memoryTarget: 512 * Mi },
      kind: 'same',
      reason: /^unchanged: at its maximum$/,
    },
    {
      case: 'a restart, above usage it no longer has',
      w: m('x', { state: 'stopped', forRoom: true }),
      a: { admitted: true, starting: true },
      target: { memoryBytes: 512 * Mi, cpuMilli: 1000 },
      want: { action: 'started', memoryTarget: 512 * Mi },
      kind: 'start',
      reason:
        /^started again \(stopped for room, restartOnRestore\): its minimum fits; memory\.high max → 512MiB, at its maximum$/,
    },
  ])('$case', ({ w, a, target, want, kind, reason }) => {
    const e = explain(w, a, target, none);
    expect(e.kind).toBe(kind);
    expect(e.decision).toMatchObject({ project: 'x', ...want });
    expect(e.decision.reason).toMatch(reason);
    if (want.mustComeDownFrom === undefined) expect(e.decision.mustComeDownFrom).toBeUndefined();
    if (e.decision.action === 'unchanged' || e.decision.action === 'stopped')
      expect(e.decision.after).toBe(w.p.limits);
  });

  test('an admitted project gets its target as memory.high, memory.max and cpu.max', () => {
    const e = explain(m('x'), admitted, { memoryBytes: 300 * Mi, cpuMilli: 250 }, none);
    expect(e.decision.after).toEqual({ memoryHigh: 300 * Mi, memoryMax: 300 * Mi, cpuMax: 0.25 });
  });

  test('a pinned cpuset is written with the limits', () => {
    const e = explain(
      m('x'),
      admitted,
      { memoryBytes: 512 * Mi, cpuMilli: 1000 },
      planCpuset(1, 4),
    );
    expect(e.decision.after.cpuset).toBe('0');
    expect(e.decision.action).toBe('shrunk');
  });

  test('an admitted project without a target is a bug, not a plan', () => {
    expect(() => explain(m('x'), admitted, undefined, none)).toThrow(
      expect.objectContaining({ code: 'INTERNAL' }),
    );
  });
});

describe('executionOrder: free first (lowest-ranked first), then give (highest first)', () => {
  test('stops, shrinks, grows, starts, then the untouched by name', () => {
    const w = (name: string, priority: number) => m(name, { priority });
    const work = [
      w('same-b', 5),
      w('grow-lo', 1),
      w('stop-hi', 9),
      w('start', 5),
      w('shrink', 5),
      w('same-a', 5),
      w('grow-hi', 9),
      w('stop-lo', 1),
    ];
    const kindOf = (n: string): Explained['kind'] =>
      n.startsWith('same') ? 'same' : (n.split('-')[0] as Explained['kind']);
    const explained: Explained[] = work.map((x) => ({
      kind: kindOf(x.name),
      decision: {
        project: x.name,
        action: 'unchanged',
        before: x.p.limits,
        after: x.p.limits,
        memoryTarget: 0,
        reason: '',
      },
    }));
    const out = executionOrder(explained, work);
    expect(out.map((d) => d.project)).toEqual([
      'stop-lo',
      'stop-hi',
      'shrink',
      'grow-hi',
      'grow-lo',
      'start',
      'same-a',
      'same-b',
    ]);
    expect(out.map((d) => d.order)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
  });
});

describe('summarize: the plan as a whole', () => {
  const d = (project: string, action: ProjectAction, more: Partial<Decision> = {}): Decision => {
    const l: ProjectLimits = { memoryHigh: 'max', memoryMax: 'max', cpuMax: 'max' };
    return { project, action, before: l, after: l, memoryTarget: 0, order: 1, reason: '', ...more };
  };
  test.each([
    {
      case: 'everyone fits',
      decisions: [d('a', 'shrunk'), d('b', 'grown')],
      kept: [
        { memoryBytes: 300 * Mi, cpuMilli: 500 },
        { memoryBytes: 200 * Mi, cpuMilli: 1500 },
      ],
      anyRunning: true,
      cpusetNote: undefined,
      totals: { memoryMax: 500 * Mi, cpus: 2 },
      fits: true,
      reasons: [/^allocation 1GiB memory and 4 CPUs .* add up to 500MiB and 2 CPUs$/],
    },
    {
      case: 'a stop, a restart, one to come down, and pinned CPUs',
      decisions: [
        d('a', 'stopped'),
        d('b', 'started'),
        d('c', 'shrunk', { mustComeDownFrom: 900 * Mi }),
      ],
      kept: [{ memoryBytes: 100 * Mi, cpuMilli: 100 }],
      anyRunning: true,
      cpusetNote: 'pinned',
      totals: { memoryMax: 100 * Mi, cpus: 0.1 },
      fits: false,
      reasons: [
        /^allocation/,
        /^1 project\(s\) stop because their minimum does not fit: a$/,
        /^1 project\(s\) start again: b$/,
        /^1 project\(s\) must bring memory down before memory\.max is lowered: c$/,
        /^pinned$/,
      ],
    },
    {
      case: 'nothing runs any more',
      decisions: [d('a', 'stopped')],
      kept: [],
      anyRunning: true,
      cpusetNote: undefined,
      totals: { memoryMax: 0, cpus: 0 },
      fits: false,
      reasons: [/^allocation/, /stop because/, /^the allocation is too small for any project$/],
    },
  ])('$case', ({ decisions, kept, anyRunning, cpusetNote, totals, fits, reasons }) => {
    const s = summarize(decisions, kept, budget(1 * Gi, 4000), { cpusetNote, anyRunning });
    expect(s.totals).toEqual(totals);
    expect(s.fits).toBe(fits);
    expect(s.reasons).toHaveLength(reasons.length);
    s.reasons.forEach((r, i) => expect(r).toMatch(reasons[i]));
  });
});
