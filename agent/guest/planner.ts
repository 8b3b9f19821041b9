/**
 * The planner (docs/architecture.md, "A notice, end to end"): for a new guest allocation,
 * each project's new limits and which projects stop or start again. PURE: no I/O, no clock
 * (`now` is passed in), the same input gives the same plan (every ordering ends with the
 * name).
 *
 * The nesting invariant (US 8,181,182: an inner container's resources are a subset of the
 * outer's): the sum of the running projects' limits (memory.max, CPU quota) never exceeds
 * the allocation it is given, which the caller passes already net of the guest's reserve.
 *
 * Pipeline, as kubelet's eviction manager reads:
 *   1. measure   each project's floor (its minimum) and effective max (min(max, allocation))
 *   2. admit     running projects, the highest-ranked first, while their floors fit;
 *                a project whose floor does not fit in what those above it left is stopped
 *   3. restart   stopped-for-room projects with restartOnRestore, highest priority first,
 *                while their floors fit in what is left (a restart never displaces a
 *                running project)
 *   4. fill      every admitted project starts at its floor; what is left is handed out
 *                toward each effective max, highest-ranked first, so the lowest-ranked
 *                project is the one shrunk toward its minimum
 *   5. explain   one decision per project, with the reason in words, in execution order
 *
 * Ranking (agent/broker/ranking.ts): lowest priority gives first; within a priority the
 * one using most above its minimum (share of the allocation, memory + CPU); then by name.
 */
import type { ProjectAction, ProjectLimits, Resources } from '../broker/types';
import { givesFirst, keepsFirst } from '../broker/ranking';
import { NestError } from '../common/errors';
import { formatBytes } from '../common/units';

export interface PlanProject {
  name: string;
  /** Higher keeps longer. */
  priority: number;
  memory: { min: number; max: number | 'max' };
  /** CPUs. `max` 'max' (no bound in the config) counts as the whole allocation. */
  cpu: { min: number; max: number | 'max'; weight: number };
  state: 'running' | 'stopped';
  restartOnRestore: boolean;
  /** Stopped by a plan for lack of room (not by an operator, not crashed). */
  stoppedForRoom: boolean;
  /** Current limits, as the cgroup shows them. */
  limits: ProjectLimits;
}

export interface PlanUsage {
  memoryCurrent: number;
  /** CPUs in use, recent (e.g. the last usage interval). */
  cpuUsageRate?: number;
}

export interface Decision {
  project: string;
  action: ProjectAction;
  before: ProjectLimits;
  /**
   * The limits once the decision is carried out. For a project that must come down first
   * (`mustComeDownFrom`), `after.memoryMax` is the final value: the executor writes
   * memory.high = target at once, and memory.max = target only once memory.current is
   * below it (a memory.max under current usage is an instant OOM kill, cgroup-v2.rst
   * "memory.max"); if usage does not come down in time it stops the project.
   * For stopped (and not started) projects `after` is `before`: nothing is written.
   */
  after: ProjectLimits;
  /** The memory.max this plan wants (bytes); 0 for a project that does not run. */
  memoryTarget: number;
  /** Set when current usage is above memoryTarget: the usage (bytes) that must come down. */
  mustComeDownFrom?: number;
  /** Execution order, 1-based: stops (lowest rank first), shrinks, grows, starts, unchanged. */
  order: number;
  /** In words, for people (nestctl plan, logs, project notices). */
  reason: string;
}

export interface Plan {
  /** Sorted by `order`. */
  decisions: Decision[];
  /** The allocation planned for (net of reserve), as given. */
  allocation: Resources;
  /** Sum of the after-limits of the projects that run after the plan. */
  totals: { memoryMax: number; cpus: number };
  /**
   * True when every running project keeps running (none is stopped). Some may still have
   * to bring their memory down first: see each decision's `mustComeDownFrom`.
   */
  fits: boolean;
  /** The plan as a whole, in words. */
  reasons: string[];
  plannedAt: string;
}

/**
 * Floors below the configured minimum: a running project never gets less than this, and is
 * stopped instead (a memory.max of a few pages is an OOM kill by another name; the kernel's
 * smallest cpu.max quota is 1000µs per 100000µs period, i.e. 0.01 CPUs).
 */
export const PLAN_FLOORS = Object.freeze({ memoryBytes: 4 * 1024 * 1024, cpus: 0.01 });

/** CPUs are planned in integer thousandths so that sums never drift above the allocation. */
const MILLI = 1000;
const EPS = 1e-6;
const toMilliDown = (c: number): number => Math.floor(c * MILLI + EPS);
const toMilliUp = (c: number): number => Math.ceil(c * MILLI - EPS);
const fromMilli = (m: number): number => m / MILLI;

interface Work {
  p: PlanProject;
  name: string;
  priority: number;
  /** ranking.ts: share of the allocation held above the minimum; undefined = unknown. */
  usageAboveMin?: number;
  running: boolean;
  memCurrent?: number;
  memFloor: number;
  memEffMax: number;
  cpuFloor: number; // milli-CPUs
  cpuEffMax: number; // milli-CPUs
  admitted: boolean;
  starting: boolean;
  memTarget: number;
  cpuTarget: number; // milli-CPUs
  whyOut?: string;
}

function num(v: number | 'max' | undefined): number {
  return v === undefined || v === 'max' ? Number.POSITIVE_INFINITY : v;
}

function fmtCpus(c: number): string {
  return `${Number(c.toFixed(3))} CPU${c === 1 ? '' : 's'}`;
}

function fmtLimit(v: number | 'max', unit: 'bytes' | 'cpus'): string {
  if (v === 'max') return 'max';
  return unit === 'bytes' ? formatBytes(v) : fmtCpus(v);
}

function checkInput(projects: PlanProject[], allocation: Resources): void {
  const problems = [];
  if (!Number.isFinite(allocation.memoryBytes) || allocation.memoryBytes < 0)
    problems.push({
      field: 'allocation.memoryBytes',
      value: allocation.memoryBytes,
      message: 'must be bytes ≥ 0',
    });
  if (!Number.isFinite(allocation.cpus) || allocation.cpus < 0)
    problems.push({
      field: 'allocation.cpus',
      value: allocation.cpus,
      message: 'must be CPUs ≥ 0',
    });
  const seen = new Set<string>();
  projects.forEach((p, i) => {
    if (seen.has(p.name))
      problems.push({ field: `projects[${i}].name`, value: p.name, message: 'is not unique' });
    seen.add(p.name);
  });
  if (problems.length > 0)
    throw new NestError('INPUT_INVALID', `plan: ${problems.length} problem(s) in the input`, {
      problems,
    });
}

function cpusetOf(n: number): string {
  return n <= 1 ? '0' : `0-${n - 1}`;
}

function cmpLimit(before: number | 'max' | undefined, after: number | 'max' | undefined): number {
  const b = num(before);
  const a = num(after);
  return a === b ? 0 : a < b ? -1 : 1;
}

/** Count of CPUs in a cpuset list like "0-1,3"; Infinity when unset (all CPUs). */
function cpusetSize(s: string | undefined): number {
  if (s === undefined || s.trim() === '') return Number.POSITIVE_INFINITY;
  let n = 0;
  for (const part of s.split(',')) {
    const [a, b] = part.split('-').map((x) => Number(x));
    n += b === undefined ? 1 : b - a + 1;
  }
  return n;
}

export function plan(
  projects: PlanProject[],
  usage: Record<string, PlanUsage>,
  allocation: Resources,
  now: Date,
  opts: { onlineCpus?: number } = {},
): Plan {
  checkInput(projects, allocation);
  const allocMem = Math.floor(allocation.memoryBytes);
  const allocCpu = toMilliDown(allocation.cpus);

  // 1. measure
  const work: Work[] = projects.map((p) => {
    const running = p.state === 'running';
    const u = Object.prototype.hasOwnProperty.call(usage, p.name) ? usage[p.name] : undefined;
    const cfgMemMax = Math.max(num(p.memory.max), p.memory.min);
    const memFloor = Math.max(p.memory.min, Math.min(PLAN_FLOORS.memoryBytes, cfgMemMax));
    const cpuMinM = toMilliUp(p.cpu.min);
    const cpuMaxM = Math.max(
      p.cpu.max === 'max' ? Number.POSITIVE_INFINITY : toMilliDown(p.cpu.max),
      cpuMinM,
    );
    const cpuFloor = Math.max(cpuMinM, Math.min(toMilliUp(PLAN_FLOORS.cpus), cpuMaxM));
    let usageAboveMin: number | undefined = 0;
    if (running) {
      // Missing data rule: a running project we have no usage for ranks as using the most.
      usageAboveMin = u
        ? Math.max(0, u.memoryCurrent - p.memory.min) / Math.max(allocMem, 1) +
          Math.max(0, (u.cpuUsageRate ?? 0) - p.cpu.min) / Math.max(allocation.cpus, 0.001)
        : undefined;
    }
    return {
      p,
      name: p.name,
      priority: p.priority,
      usageAboveMin,
      running,
      memCurrent: running ? u?.memoryCurrent : undefined,
      memFloor,
      memEffMax: Math.min(cfgMemMax, allocMem),
      cpuFloor,
      cpuEffMax: Math.min(cpuMaxM, allocCpu),
      admitted: false,
      starting: false,
      memTarget: 0,
      cpuTarget: 0,
    };
  });

  // 2. admit running projects, highest-ranked first, while their floors fit
  let memLeft = allocMem;
  let cpuLeft = allocCpu;
  const shortOf = (w: Work): string | undefined => {
    const parts = [];
    if (w.memFloor > memLeft)
      parts.push(`its minimum memory ${formatBytes(w.memFloor)} > ${formatBytes(memLeft)} left`);
    if (w.cpuFloor > cpuLeft)
      parts.push(
        `its minimum CPU ${fmtCpus(fromMilli(w.cpuFloor))} > ${fmtCpus(fromMilli(cpuLeft))} left`,
      );
    return parts.length > 0 ? parts.join(' and ') : undefined;
  };
  for (const w of work.filter((x) => x.running).sort(keepsFirst)) {
    const short = shortOf(w);
    if (short) {
      w.whyOut = short;
      continue;
    }
    w.admitted = true;
    memLeft -= w.memFloor;
    cpuLeft -= w.cpuFloor;
  }

  // 3. restart those stopped for room, highest priority first, in what is left
  for (const w of work.filter((x) => !x.running).sort(keepsFirst)) {
    if (!w.p.stoppedForRoom) {
      w.whyOut = 'it was not stopped for lack of room';
      continue;
    }
    if (!w.p.restartOnRestore) {
      w.whyOut = 'restartOnRestore is off';
      continue;
    }
    const short = shortOf(w);
    if (short) {
      w.whyOut = short;
      continue;
    }
    w.admitted = true;
    w.starting = true;
    memLeft -= w.memFloor;
    cpuLeft -= w.cpuFloor;
  }

  // 4. fill: floors first (already taken), then toward each effective max, highest-ranked first
  const kept = work.filter((w) => w.admitted).sort(keepsFirst);
  for (const w of kept) {
    w.memTarget = w.memFloor;
    w.cpuTarget = w.cpuFloor;
  }
  for (const w of kept) {
    const m = Math.min(Math.max(0, w.memEffMax - w.memTarget), memLeft);
    w.memTarget += m;
    memLeft -= m;
    const c = Math.min(Math.max(0, w.cpuEffMax - w.cpuTarget), cpuLeft);
    w.cpuTarget += c;
    cpuLeft -= c;
  }

  // CPUs going away as whole CPUs: pin to the first ceil(allocation) (cgroup-v2.rst "Cpuset").
  // When they all come back, a project that was pinned gets every online CPU again.
  const online = opts.onlineCpus;
  const pinned =
    online !== undefined && online > 0 && allocation.cpus < online
      ? cpusetOf(Math.min(online, Math.max(1, Math.ceil(allocation.cpus - EPS))))
      : undefined;
  const cpusetNote =
    pinned !== undefined
      ? `whole CPUs go away (${fmtCpus(allocation.cpus)} of ${online} online): running projects get cpuset ${pinned}`
      : undefined;
  const cpusetFor = (before: string | undefined): string | undefined => {
    if (online === undefined || online <= 0) return before;
    if (pinned !== undefined) return pinned;
    return before === undefined ? undefined : cpusetOf(online);
  };

  // 5. explain
  const decisions: Omit<Decision, 'order'>[] = [];
  const kindOf = new Map<string, 'stop' | 'shrink' | 'grow' | 'start' | 'same'>();
  for (const w of work) {
    const p = w.p;
    const before = p.limits;
    if (!w.admitted) {
      const action: ProjectAction = w.running ? 'stopped' : 'unchanged';
      kindOf.set(w.name, w.running ? 'stop' : 'same');
      decisions.push({
        project: w.name,
        action,
        before,
        after: before,
        memoryTarget: 0,
        reason: w.running
          ? `stopped: ${w.whyOut}, after the projects ranked above it (priority ${p.priority})`
          : `stays stopped: ${w.whyOut}`,
      });
      continue;
    }
    const after: ProjectLimits = {
      memoryHigh: w.memTarget,
      memoryMax: w.memTarget,
      cpuMax: fromMilli(w.cpuTarget),
    };
    const cs = cpusetFor(before.cpuset);
    if (cs !== undefined) after.cpuset = cs;

    const mustComeDown =
      !w.starting && w.memCurrent !== undefined && w.memCurrent > w.memTarget
        ? w.memCurrent
        : undefined;
    const words: string[] = [];
    const diff = (label: string, b: number | 'max', a: number | 'max', unit: 'bytes' | 'cpus') => {
      if (cmpLimit(b, a) !== 0) words.push(`${label} ${fmtLimit(b, unit)} → ${fmtLimit(a, unit)}`);
    };
    diff('memory.max', before.memoryMax, after.memoryMax, 'bytes');
    if (
      cmpLimit(before.memoryHigh, after.memoryHigh) !== 0 &&
      cmpLimit(before.memoryMax, after.memoryMax) === 0
    )
      diff('memory.high', before.memoryHigh, after.memoryHigh, 'bytes');
    diff('cpu', before.cpuMax, after.cpuMax, 'cpus');
    if ((before.cpuset ?? '') !== (after.cpuset ?? ''))
      words.push(`cpuset ${before.cpuset ?? 'all'} → ${after.cpuset ?? 'all'}`);

    // memory.high above memory.max has no effect (cgroup-v2.rst "memory.high"): compare
    // the effective one, so that high 'max' with max 1GiB → both 1GiB is not a change.
    const effHigh = (l: ProjectLimits) => Math.min(num(l.memoryHigh), num(l.memoryMax));
    const cmps = [
      cmpLimit(before.memoryMax, after.memoryMax),
      cmpLimit(effHigh(before), effHigh(after)),
      cmpLimit(before.cpuMax, after.cpuMax),
    ];
    const cpusetShrinks = cpusetSize(after.cpuset) < cpusetSize(before.cpuset);
    const cpusetGrows = cpusetSize(after.cpuset) > cpusetSize(before.cpuset);
    let action: ProjectAction;
    if (w.starting) action = 'started';
    else if (cmps.some((c) => c < 0) || cpusetShrinks) action = 'shrunk';
    else if (cmps.some((c) => c > 0) || cpusetGrows) action = 'grown';
    else action = 'unchanged';
    kindOf.set(
      w.name,
      action === 'started'
        ? 'start'
        : action === 'shrunk'
          ? 'shrink'
          : action === 'grown'
            ? 'grow'
            : 'same',
    );

    const atMin = w.memTarget === w.memFloor && w.cpuTarget === w.cpuFloor;
    const atMax = w.memTarget >= w.memEffMax && w.cpuTarget >= w.cpuEffMax;
    const where = atMax
      ? 'at its maximum'
      : atMin
        ? 'down to its minimum: once every running project has its minimum, those ranked above it take the rest'
        : 'between its minimum and maximum: what is left once every running project has its minimum and those ranked above it their maximum';
    let reason: string;
    if (action === 'started')
      reason = `started again (stopped for room, restartOnRestore): its minimum fits; ${words.join(', ') || 'limits as before'}, ${where}`;
    else if (action === 'unchanged') reason = `unchanged: ${where}`;
    else reason = `${action}: ${words.join(', ')}; ${where} (priority ${p.priority})`;
    if (mustComeDown !== undefined)
      reason += `; uses ${formatBytes(mustComeDown)}, above its new memory.max ${formatBytes(w.memTarget)}: memory.high is lowered first and memory.max follows once usage is below it, or the project is stopped`;
    else if (w.running && w.memCurrent === undefined && action === 'shrunk')
      reason += '; its usage is unknown: memory.high is lowered first';

    const d: Omit<Decision, 'order'> = {
      project: w.name,
      action,
      before,
      // Nothing to write: keep the limits exactly as the cgroup shows them.
      after: action === 'unchanged' ? before : after,
      memoryTarget: w.memTarget,
      reason,
    };
    if (mustComeDown !== undefined) d.mustComeDownFrom = mustComeDown;
    decisions.push(d);
  }

  // Execution order: free first (stops, then shrinks, lowest-ranked first), then give
  // (grows, then starts, highest-ranked first), then the untouched ones by name.
  const byWork = new Map(work.map((w) => [w.name, w]));
  const phase = { stop: 0, shrink: 1, grow: 2, start: 3, same: 4 } as const;
  const ordered = decisions.slice().sort((a, b) => {
    const ka = kindOf.get(a.project) ?? 'same';
    const kb = kindOf.get(b.project) ?? 'same';
    if (ka !== kb) return phase[ka] - phase[kb];
    const wa = byWork.get(a.project) as Work;
    const wb = byWork.get(b.project) as Work;
    if (ka === 'stop' || ka === 'shrink') return givesFirst(wa, wb);
    if (ka === 'grow' || ka === 'start') return keepsFirst(wa, wb);
    return wa.name < wb.name ? -1 : wa.name > wb.name ? 1 : 0;
  });
  const out: Decision[] = ordered.map((d, i) => ({ ...d, order: i + 1 }));

  // The plan as a whole
  const runningAfter = work.filter((w) => w.admitted);
  const totals = {
    memoryMax: runningAfter.reduce((s, w) => s + w.memTarget, 0),
    cpus: fromMilli(runningAfter.reduce((s, w) => s + w.cpuTarget, 0)),
  };
  const stopped = out.filter((d) => d.action === 'stopped').map((d) => d.project);
  const started = out.filter((d) => d.action === 'started').map((d) => d.project);
  const comeDown = out.filter((d) => d.mustComeDownFrom !== undefined).map((d) => d.project);
  const reasons = [
    `allocation ${formatBytes(allocMem)} memory and ${fmtCpus(fromMilli(allocCpu))} (net of the guest's reserve); planned limits add up to ${formatBytes(totals.memoryMax)} and ${fmtCpus(totals.cpus)}`,
  ];
  if (stopped.length > 0)
    reasons.push(
      `${stopped.length} project(s) stop because their minimum does not fit: ${stopped.join(', ')}`,
    );
  if (started.length > 0)
    reasons.push(`${started.length} project(s) start again: ${started.join(', ')}`);
  if (comeDown.length > 0)
    reasons.push(
      `${comeDown.length} project(s) must bring memory down before memory.max is lowered: ${comeDown.join(', ')}`,
    );
  if (cpusetNote) reasons.push(cpusetNote);
  if (runningAfter.length === 0 && work.some((w) => w.running))
    reasons.push('the allocation is too small for any project');

  return {
    decisions: out,
    allocation: { cpus: allocation.cpus, memoryBytes: allocation.memoryBytes },
    totals,
    fits: stopped.length === 0,
    reasons,
    plannedAt: now.toISOString(),
  };
}
