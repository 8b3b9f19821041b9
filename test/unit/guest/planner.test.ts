/**
 * The planner as a story in tables: a guest's allocation changes, and each table row says
 * which projects give, how much, which stop, and in which order. Then a property check
 * over random inputs (fixed seed) that the nesting invariant always holds.
 */
import { plan, PLAN_FLOORS, type PlanProject, type PlanUsage } from '../../../agent/guest/planner';
import type { ProjectAction, Resources } from '../../../agent/broker/types';

const Mi = 1024 ** 2;
const NOW = new Date('2025-01-01T00:00:00Z');

interface P {
  mem?: [number, number | 'max']; // MiB
  cpu?: [number, number | 'max'];
  state?: 'running' | 'stopped';
  restart?: boolean;
  forRoom?: boolean;
  /** Current limits, MiB and CPUs; default: at the configured max. */
  memoryMax?: number | 'max';
  cpuMax?: number | 'max';
  cpuset?: string;
}

function proj(name: string, priority: number, o: P = {}): PlanProject {
  const [mmin, mmax] = o.mem ?? [64, 512];
  const [cmin, cmax] = o.cpu ?? [0.1, 1];
  const memMaxBytes = mmax === 'max' ? 'max' : mmax * Mi;
  const cur = o.memoryMax ?? memMaxBytes;
  return {
    name,
    priority,
    memory: { min: mmin * Mi, max: memMaxBytes },
    cpu: { min: cmin, max: cmax, weight: 100 },
    state: o.state ?? 'running',
    restartOnRestore: o.restart ?? true,
    stoppedForRoom: o.forRoom ?? false,
    limits: {
      memoryHigh: 'max',
      memoryMax: typeof cur === 'number' && o.memoryMax !== undefined ? cur * Mi : cur,
      cpuMax: o.cpuMax ?? cmax,
      ...(o.cpuset ? { cpuset: o.cpuset } : {}),
    },
  };
}

const use = (mib: number, cpus?: number): PlanUsage => ({
  memoryCurrent: mib * Mi,
  ...(cpus !== undefined ? { cpuUsageRate: cpus } : {}),
});
const alloc = (mib: number, cpus: number): Resources => ({ memoryBytes: mib * Mi, cpus });

interface Want {
  action: ProjectAction;
  mem?: number; // MiB, after.memoryMax
  cpu?: number;
  comeDownFrom?: number; // MiB
  cpuset?: string;
  reason?: RegExp;
}

interface Case {
  case: string;
  projects: PlanProject[];
  usage?: Record<string, PlanUsage>;
  allocation: Resources;
  onlineCpus?: number;
  want: Record<string, Want>;
  order: string[];
  fits: boolean;
  planReason?: RegExp;
}

const cases: Case[] = [
  // --- priorities -----------------------------------------------------------------------
  {
    case: 'priorities: the lowest priority gives first, the highest keeps its max',
    projects: [
      proj('web', 100, { mem: [256, 1024], cpu: [0.5, 2] }),
      proj('batch', 10, { mem: [64, 512], cpu: [0.1, 1] }),
    ],
    usage: { web: use(300), batch: use(200) },
    allocation: alloc(1280, 2.5),
    want: {
      web: { action: 'unchanged', mem: 1024, cpu: 2 },
      batch: { action: 'shrunk', mem: 256, cpu: 0.5, reason: /memory.max 512MiB → 256MiB/ },
    },
    order: ['batch', 'web'],
    fits: true,
  },
  {
    case: 'priorities: three levels, only the lowest is touched while the others fit',
    projects: [
      proj('a', 30, { mem: [0, 300] }),
      proj('b', 20, { mem: [0, 300] }),
      proj('c', 10, { mem: [0, 300] }),
    ],
    usage: { a: use(10), b: use(10), c: use(10) },
    allocation: alloc(700, 3),
    want: {
      a: { action: 'unchanged', mem: 300 },
      b: { action: 'unchanged', mem: 300 },
      c: { action: 'shrunk', mem: 100 },
    },
    order: ['c', 'a', 'b'],
    fits: true,
  },
  // --- ties -----------------------------------------------------------------------------
  {
    case: 'ties: within a priority the one using most above its minimum gives first',
    projects: [proj('a', 10), proj('b', 10)],
    usage: { a: use(400), b: use(100) },
    allocation: alloc(768, 2),
    want: {
      a: { action: 'shrunk', mem: 256, comeDownFrom: 400, reason: /uses 400MiB/ },
      b: { action: 'unchanged', mem: 512 },
    },
    order: ['a', 'b'],
    fits: true,
    planReason: /must bring memory down before memory.max is lowered: a/,
  },
  {
    case: 'ties: equal priority and usage are broken by name ("a" gives first)',
    projects: [proj('b', 10), proj('a', 10)],
    usage: { a: use(100), b: use(100) },
    allocation: alloc(768, 2),
    want: { a: { action: 'shrunk', mem: 256 }, b: { action: 'unchanged', mem: 512 } },
    order: ['a', 'b'],
    fits: true,
  },
  {
    case: 'ties: a project with no usage figures gives before one seen to be lean',
    projects: [proj('seen', 10), proj('unseen', 10)],
    usage: { seen: use(300) },
    allocation: alloc(768, 2),
    want: {
      seen: { action: 'unchanged', mem: 512 },
      unseen: { action: 'shrunk', mem: 256, reason: /usage is unknown/ },
    },
    order: ['unseen', 'seen'],
    fits: true,
  },
  // --- minimums -------------------------------------------------------------------------
  {
    case: 'minimums: everyone shrinks toward the minimum before the lowest is stopped',
    projects: [
      proj('web', 100, { mem: [256, 1024] }),
      proj('api', 50, { mem: [256, 512] }),
      proj('batch', 10, { mem: [256, 512] }),
    ],
    usage: { web: use(200), api: use(200), batch: use(200) },
    allocation: alloc(600, 4),
    want: {
      batch: { action: 'stopped', reason: /minimum memory 256MiB > 88MiB left/ },
      api: { action: 'shrunk', mem: 256 },
      web: { action: 'shrunk', mem: 344 },
    },
    order: ['batch', 'api', 'web'],
    fits: false,
  },
  {
    case: 'minimums: exactly the sum of minimums fits, nobody stops',
    projects: [proj('x', 20, { mem: [100, 200] }), proj('y', 10, { mem: [100, 200] })],
    usage: { x: use(50), y: use(50) },
    allocation: alloc(200, 1),
    want: { x: { action: 'shrunk', mem: 100 }, y: { action: 'shrunk', mem: 100 } },
    order: ['y', 'x'],
    fits: true,
  },
  {
    case: 'minimums: a project whose minimum alone exceeds the room stops; a lower one that fits runs',
    projects: [proj('big', 100, { mem: [900, 1024] }), proj('small', 10, { mem: [100, 200] })],
    usage: { big: use(500), small: use(50) },
    allocation: alloc(800, 2),
    want: {
      big: { action: 'stopped', reason: /minimum memory 900MiB > 800MiB left/ },
      small: { action: 'unchanged', mem: 200 },
    },
    order: ['big', 'small'],
    fits: false,
  },
  {
    case: 'minimums: a 0 minimum still gets a floor of a few MiB, never a limit of 0',
    projects: [proj('hog', 100, { mem: [0, 'max'] }), proj('tiny', 10, { mem: [0, 64] })],
    usage: { hog: use(10), tiny: use(1) },
    allocation: alloc(512, 1),
    want: {
      hog: { action: 'shrunk', mem: 512 - PLAN_FLOORS.memoryBytes / Mi },
      tiny: { action: 'shrunk', mem: PLAN_FLOORS.memoryBytes / Mi },
    },
    order: ['tiny', 'hog'],
    fits: true,
  },
  // --- usage above limits ---------------------------------------------------------------
  {
    case: 'usage above limits: memory.max is not set below usage; memory.high comes first',
    projects: [proj('web', 10, { mem: [64, 1024] })],
    usage: { web: use(1100) },
    allocation: alloc(512, 1),
    want: {
      web: {
        action: 'shrunk',
        mem: 512,
        comeDownFrom: 1100,
        reason: /memory.high is lowered first and memory.max follows/,
      },
    },
    order: ['web'],
    fits: true,
  },
  {
    case: 'usage above limits: a project already over its old limit that now fits gets no warning',
    projects: [proj('web', 10, { mem: [64, 1024], memoryMax: 256 })],
    usage: { web: use(300) },
    allocation: alloc(2048, 1),
    want: { web: { action: 'grown', mem: 1024 } },
    order: ['web'],
    fits: true,
  },
  // --- CPU and memory together ----------------------------------------------------------
  {
    case: 'CPU and memory: a CPU minimum that does not fit stops a project whose memory fits',
    projects: [
      proj('web', 100, { mem: [256, 512], cpu: [1, 2] }),
      proj('batch', 10, { mem: [64, 256], cpu: [0.5, 1] }),
    ],
    usage: { web: use(100, 1.5), batch: use(100, 0.5) },
    allocation: alloc(2048, 1),
    onlineCpus: 2,
    want: {
      batch: { action: 'stopped', reason: /minimum CPU 0.5 CPUs > 0 CPUs left/ },
      web: { action: 'shrunk', mem: 512, cpu: 1, cpuset: '0' },
    },
    order: ['batch', 'web'],
    fits: false,
    planReason: /whole CPUs go away \(1 CPU of 2 online\): running projects get cpuset 0/,
  },
  {
    case: 'CPU and memory: both shrink, quotas stay within [min, max]',
    projects: [
      proj('web', 100, { mem: [256, 1024], cpu: [1, 2] }),
      proj('batch', 10, { mem: [64, 512], cpu: [0.5, 1] }),
    ],
    usage: { web: use(500), batch: use(100) },
    allocation: alloc(1100, 1.6),
    onlineCpus: 2,
    want: {
      web: { action: 'shrunk', mem: 1024, cpu: 1.1, cpuset: '0-1' },
      batch: { action: 'shrunk', mem: 76, cpu: 0.5, cpuset: '0-1', comeDownFrom: 100 },
    },
    order: ['batch', 'web'],
    fits: true,
  },
  {
    case: 'CPU: "max" counts as the whole allocation, split by rank',
    projects: [
      proj('a', 20, { mem: [0, 64], cpu: [0, 'max'], cpuMax: 'max' }),
      proj('b', 10, { mem: [0, 64], cpu: [0.25, 'max'], cpuMax: 'max' }),
    ],
    allocation: alloc(1024, 2),
    usage: { a: use(1), b: use(1) },
    want: { a: { action: 'shrunk', cpu: 1.75 }, b: { action: 'shrunk', cpu: 0.25 } },
    order: ['b', 'a'],
    fits: true,
  },
  // --- an allocation too small for anything ---------------------------------------------
  {
    case: 'too small for anything: every project stops, lowest priority first',
    projects: [proj('web', 100, { mem: [256, 1024] }), proj('batch', 10, { mem: [64, 512] })],
    usage: { web: use(300), batch: use(100) },
    allocation: alloc(32, 0.05),
    want: { web: { action: 'stopped' }, batch: { action: 'stopped' } },
    order: ['batch', 'web'],
    fits: false,
    planReason: /too small for any project/,
  },
  {
    case: 'too small for anything: a zero allocation',
    projects: [proj('only', 1, { mem: [0, 64], cpu: [0, 1] })],
    allocation: alloc(0, 0),
    want: { only: { action: 'stopped' } },
    order: ['only'],
    fits: false,
  },
  // --- restore --------------------------------------------------------------------------
  {
    case: 'restore: limits raised to max, highest priority first; restartable projects start',
    projects: [
      proj('web', 100, { mem: [256, 1024], cpu: [0.1, 2], memoryMax: 344, cpuMax: 0.5 }),
      proj('api', 50, { mem: [256, 512], cpu: [0.1, 1], memoryMax: 256, cpuMax: 0.5 }),
      proj('batch', 10, { mem: [256, 512], state: 'stopped', forRoom: true }),
      proj('cron', 20, { mem: [64, 128], state: 'stopped', forRoom: true, restart: false }),
      proj('manual', 30, { mem: [64, 128], state: 'stopped', forRoom: false }),
    ],
    usage: { web: use(300), api: use(200) },
    allocation: alloc(2048, 4),
    want: {
      web: { action: 'grown', mem: 1024, cpu: 2 },
      api: { action: 'grown', mem: 512, cpu: 1 },
      batch: { action: 'started', mem: 512, cpu: 1, reason: /started again/ },
      cron: { action: 'unchanged', reason: /restartOnRestore is off/ },
      manual: { action: 'unchanged', reason: /not stopped for lack of room/ },
    },
    order: ['web', 'api', 'batch', 'cron', 'manual'],
    fits: true,
    planReason: /1 project\(s\) start again: batch/,
  },
  {
    case: 'restore: the highest-priority stopped project starts first while its minimum fits',
    projects: [
      proj('lo', 10, { mem: [256, 512], state: 'stopped', forRoom: true }),
      proj('hi', 50, { mem: [256, 512], state: 'stopped', forRoom: true }),
    ],
    allocation: alloc(400, 2),
    want: {
      hi: { action: 'started', mem: 400 },
      lo: { action: 'unchanged', reason: /minimum memory 256MiB > 144MiB left/ },
    },
    order: ['hi', 'lo'],
    fits: true,
  },
  {
    case: 'restore: two restarts, highest priority first in the execution order',
    projects: [
      proj('lo', 10, { mem: [100, 200], state: 'stopped', forRoom: true }),
      proj('hi', 50, { mem: [100, 200], state: 'stopped', forRoom: true }),
    ],
    allocation: alloc(400, 2),
    want: { hi: { action: 'started', mem: 200 }, lo: { action: 'started', mem: 200 } },
    order: ['hi', 'lo'],
    fits: true,
  },
  {
    case: 'restore: a restart never displaces a running project, even of lower priority',
    projects: [
      proj('low', 1, { mem: [300, 400] }),
      proj('high', 100, { mem: [300, 400], state: 'stopped', forRoom: true }),
    ],
    usage: { low: use(350) },
    allocation: alloc(500, 2),
    want: { low: { action: 'unchanged', mem: 400 }, high: { action: 'unchanged' } },
    order: ['high', 'low'],
    fits: true,
  },
  {
    case: 'restore: CPUs come back, a pinned project gets every online CPU again',
    projects: [proj('web', 10, { cpu: [0.5, 2], cpuMax: 1, cpuset: '0' })],
    usage: { web: use(100) },
    allocation: alloc(1024, 2),
    onlineCpus: 2,
    want: { web: { action: 'grown', cpu: 2, cpuset: '0-1', reason: /cpuset 0 → 0-1/ } },
    order: ['web'],
    fits: true,
  },
];

describe('plan: who gives, how much, and in which order', () => {
  test.each(cases)('$case', (c) => {
    const p = plan(c.projects, c.usage ?? {}, c.allocation, NOW, { onlineCpus: c.onlineCpus });
    for (const [name, w] of Object.entries(c.want)) {
      const d = p.decisions.find((x) => x.project === name);
      expect({ project: name, action: d?.action }).toEqual({ project: name, action: w.action });
      if (!d) continue;
      if (w.mem !== undefined) {
        expect(d.after.memoryMax).toBe(w.mem * Mi);
        expect(d.memoryTarget).toBe(w.mem * Mi);
        // memory.high follows memory.max, except where nothing is written at all.
        if (d.action !== 'unchanged') expect(d.after.memoryHigh).toBe(w.mem * Mi);
      }
      if (w.cpu !== undefined) expect(d.after.cpuMax).toBeCloseTo(w.cpu, 6);
      expect(d.mustComeDownFrom).toBe(
        w.comeDownFrom === undefined ? undefined : w.comeDownFrom * Mi,
      );
      if (w.cpuset !== undefined) expect(d.after.cpuset).toBe(w.cpuset);
      if (w.reason) expect(d.reason).toMatch(w.reason);
      if (d.action === 'stopped' || (d.action === 'unchanged' && w.mem === undefined))
        expect(d.after).toEqual(d.before);
    }
    expect(p.decisions.map((d) => d.project)).toEqual(c.order);
    expect(p.decisions.map((d) => d.order)).toEqual(c.order.map((_, i) => i + 1));
    expect(p.fits).toBe(c.fits);
    if (c.planReason) expect(p.reasons.join('\n')).toMatch(c.planReason);
    // Every plan keeps the nesting invariant.
    expect(p.totals.memoryMax).toBeLessThanOrEqual(c.allocation.memoryBytes);
    expect(Math.round(p.totals.cpus * 1000)).toBeLessThanOrEqual(
      Math.round(c.allocation.cpus * 1000),
    );
  });
});

describe('plan is pure', () => {
  const projects = cases[5].projects;
  const usage = cases[5].usage ?? {};

  test('same input, same plan, whatever the input order; inputs are not touched', () => {
    const frozen = JSON.parse(JSON.stringify(projects)) as PlanProject[];
    const deepFreeze = (o: unknown): void => {
      if (o && typeof o === 'object') {
        Object.freeze(o);
        Object.values(o).forEach(deepFreeze);
      }
    };
    deepFreeze(frozen);
    deepFreeze(usage);
    const a = plan(frozen, usage, alloc(600, 4), NOW);
    const b = plan(frozen.slice().reverse(), usage, alloc(600, 4), NOW);
    expect(b).toEqual(a);
    expect(a.plannedAt).toBe('2025-01-01T00:00:00.000Z');
  });

  test('an impossible input is refused with every problem named', () => {
    expect(() =>
      plan([proj('x', 1), proj('x', 2)], {}, { memoryBytes: -1, cpus: Number.NaN }, NOW),
    ).toThrow(
      expect.objectContaining({
        code: 'INPUT_INVALID',
        problems: [
          expect.objectContaining({ field: 'allocation.memoryBytes' }),
          expect.objectContaining({ field: 'allocation.cpus' }),
          expect.objectContaining({ field: 'projects[1].name' }),
        ],
      }),
    );
  });
});

// ---------------------------------------------------------------------------------------
// Property check: random guests, fixed seed
// ---------------------------------------------------------------------------------------

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('property: the nesting invariant holds for any input (seed 20250101, 2000 guests)', () => {
  const rnd = mulberry32(20250101);
  const int = (n: number) => Math.floor(rnd() * n);
  const pick = <T>(xs: T[]): T => xs[int(xs.length)];

  function randomGuest() {
    const n = 1 + int(8);
    const projects: PlanProject[] = [];
    const usage: Record<string, PlanUsage> = {};
    for (let i = 0; i < n; i++) {
      const memMin = int(513) * Mi;
      const memMax = rnd() < 0.2 ? 'max' : memMin + int(1024) * Mi + (memMin === 0 ? Mi : 0);
      const cpuMin = int(21) * 0.05;
      const cpuMax = rnd() < 0.2 ? 'max' : Math.max(0.01, cpuMin + int(41) * 0.05);
      const state = rnd() < 0.75 ? 'running' : 'stopped';
      const name = `p${i}`;
      projects.push({
        name,
        priority: pick([1, 5, 5, 10]),
        memory: { min: memMin, max: memMax },
        cpu: { min: cpuMin, max: cpuMax, weight: 100 },
        state,
        restartOnRestore: rnd() < 0.5,
        stoppedForRoom: rnd() < 0.5,
        limits: {
          memoryHigh: 'max',
          memoryMax: rnd() < 0.3 ? 'max' : int(2048) * Mi,
          cpuMax: rnd() < 0.3 ? 'max' : int(400) / 100,
          ...(rnd() < 0.2 ? { cpuset: '0' } : {}),
        },
      });
      if (state === 'running' && rnd() < 0.9)
        usage[name] = { memoryCurrent: int(1536) * Mi, cpuUsageRate: int(300) / 100 };
    }
    const allocation = { memoryBytes: int(3072) * Mi + int(Mi), cpus: int(41) / 10 };
    return { projects, usage, allocation };
  }

  const floorMem = (p: PlanProject) =>
    Math.max(
      p.memory.min,
      Math.min(PLAN_FLOORS.memoryBytes, p.memory.max === 'max' ? Infinity : p.memory.max),
    );
  const milli = (c: number) => Math.round(c * 1000);
  const floorCpu = (p: PlanProject) =>
    Math.max(milli(p.cpu.min), Math.min(10, p.cpu.max === 'max' ? Infinity : milli(p.cpu.max)));

  test('sums, bounds, usage, restarts, stops and order', () => {
    let stops = 0;
    let comeDowns = 0;
    let starts = 0;
    for (let iter = 0; iter < 2000; iter++) {
      const { projects, usage, allocation } = randomGuest();
      const p = plan(projects, usage, allocation, NOW, { onlineCpus: 4 });
      const byName = new Map(projects.map((x) => [x.name, x]));
      const runsAfter = p.decisions.filter(
        (d) =>
          d.action === 'started' ||
          (d.action !== 'stopped' && byName.get(d.project)?.state === 'running'),
      );
      const ctx = JSON.stringify({ iter, allocation });

      // 1. The sum of the after-limits of the projects that run never exceeds the allocation.
      const memSum = runsAfter.reduce((s, d) => s + (d.after.memoryMax as number), 0);
      const cpuSum = runsAfter.reduce((s, d) => s + milli(d.after.cpuMax as number), 0);
      expect({ ctx, over: memSum > allocation.memoryBytes }).toEqual({ ctx, over: false });
      expect({ ctx, over: cpuSum > milli(allocation.cpus) }).toEqual({ ctx, over: false });

      for (const d of p.decisions) {
        const cfg = byName.get(d.project) as PlanProject;
        const u = usage[d.project];
        if (runsAfter.includes(d)) {
          // 2. Every running project stays within its own [min, max].
          const m = d.after.memoryMax as number;
          expect(m).toBeGreaterThanOrEqual(floorMem(cfg));
          if (cfg.memory.max !== 'max') expect(m).toBeLessThanOrEqual(cfg.memory.max);
          const c = milli(d.after.cpuMax as number);
          expect(c).toBeGreaterThanOrEqual(floorCpu(cfg));
          if (cfg.cpu.max !== 'max') expect(c).toBeLessThanOrEqual(milli(cfg.cpu.max));
          // 3. No memory.max below current usage, unless it is said how far it must come down.
          if (d.action !== 'started' && u && m < u.memoryCurrent) {
            expect(d.mustComeDownFrom).toBe(u.memoryCurrent);
            comeDowns++;
          } else expect(d.mustComeDownFrom).toBeUndefined();
          // 4. CPUs went away (fewer than the 4 online): pinned to the first ceil(allocation).
          if (allocation.cpus < 4)
            expect(d.after.cpuset).toBe(
              Math.ceil(allocation.cpus) <= 1 ? '0' : `0-${Math.ceil(allocation.cpus) - 1}`,
            );
        }
        // 5. Only projects stopped for room with restartOnRestore start again.
        if (d.action === 'started') {
          starts++;
          expect(cfg.state === 'stopped' && cfg.restartOnRestore && cfg.stoppedForRoom).toBe(true);
        }
        // 6. A stop is justified: even with only the projects of equal or higher priority
        //    that keep running at their floors, this one's floor does not fit.
        if (d.action === 'stopped') {
          stops++;
          expect(cfg.state).toBe('running');
          const above = runsAfter
            .map((x) => byName.get(x.project) as PlanProject)
            .filter((x) => x.priority >= cfg.priority);
          const memNeed = above.reduce((s, x) => s + floorMem(x), 0) + floorMem(cfg);
          const cpuNeed = above.reduce((s, x) => s + floorCpu(x), 0) + floorCpu(cfg);
          expect(memNeed > allocation.memoryBytes || cpuNeed > milli(allocation.cpus)).toBe(true);
        }
      }

      // 7. Execution order: stops, shrinks, grows, starts, unchanged.
      const phase = { stopped: 0, shrunk: 1, grown: 2, started: 3, unchanged: 4 };
      const phases = p.decisions.map((d) => phase[d.action]);
      expect(phases).toEqual(phases.slice().sort((a, b) => a - b));
      // Stops go lowest priority first.
      const stopPrios = p.decisions
        .filter((d) => d.action === 'stopped')
        .map((d) => byName.get(d.project)?.priority as number);
      expect(stopPrios).toEqual(stopPrios.slice().sort((a, b) => a - b));
      expect(p.fits).toBe(stopPrios.length === 0);
    }
    // The random guests really exercised every path.
    expect(stops).toBeGreaterThan(100);
    expect(comeDowns).toBeGreaterThan(100);
    expect(starts).toBeGreaterThan(50);
  });
});
