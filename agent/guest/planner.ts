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
 * Pipeline, as kubelet's eviction manager reads; each stage is an exported pure function
 * with its own table of cases (test/unit/guest/planner-stages.test.ts), and plan() at the
 * end of this file composes them:
 *   1. measure        each project's floor (its minimum) and effective max
 *                     (min(max, allocation))
 *   2. admitRunning   running projects, the highest-ranked first, while their floors fit;
 *                     one whose floor does not fit in what those above it left is stopped
 *   3. admitRestarts  stopped-for-room projects with restartOnRestore, highest priority
 *                     first, while their floors fit in what is left (a restart never
 *                     displaces a running project)
 *   4. fill           every admitted project starts at its floor; what is left is handed
 *                     out toward each effective max, highest-ranked first, so the
 *                     lowest-ranked project is the one shrunk toward its minimum
 *   5. explain        one decision per project (planCpuset, changes, classify), with the
 *                     reason in words; executionOrder puts them in order, summarize says
 *                     what the plan does as a whole
 *
 * Ranking (agent/broker/ranking.ts): lowest priority gives first; within a priority the
 * one using most above its minimum (share of the allocation, memory + CPU); then by name.
 */
import type { ProjectAction, ProjectLimits, Resources } from '../broker/types';
import { givesFirst, keepsFirst } from '../broker/ranking';
import { NestError } from '../common/errors';
import { formatBytes } from '../common/units';
import { cpusetSize, formatCpuList } from '../common/cpulist';

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

/** The first n online CPUs: by number when the online list is known, else 0 … n−1. */
function firstCpus(n: number, onlineList: readonly number[] | undefined): string {
  return onlineList !== undefined ? formatCpuList(onlineList.slice(0, n)) : cpusetOf(n);
}

function cmpLimit(before: number | 'max' | undefined, after: number | 'max' | undefined): number {
  const b = num(before);
  const a = num(after);
  return a === b ? 0 : a < b ? -1 : 1;
}

/**
 * What the stages share: the allocation as integer units, bytes and milli-CPUs (the
 * planner's arithmetic), and what is left of it as stages take from it.
 */
export interface Budget {
  memoryBytes: number;
  /** Thousandths of a CPU. */
  cpuMilli: number;
}

/** The allocation as a budget: whole bytes, milli-CPUs rounded down (never above it). */
export function budgetOf(allocation: Resources): Budget {
  return {
    memoryBytes: Math.floor(allocation.memoryBytes),
    cpuMilli: toMilliDown(allocation.cpus),
  };
}

/** One project as the planner sees it, measured against the allocation (stage 1). */
export interface Measured {
  p: PlanProject;
  name: string;
  priority: number;
  /** ranking.ts: share of the allocation held above the minimum; undefined = unknown. */
  usageAboveMin?: number;
  running: boolean;
  /** memory.current of a running project, when known. */
  memCurrent?: number;
  /** What it gets at least if it runs: its minimum, never below PLAN_FLOORS. */
  memFloor: number;
  /** What it may get at most: min(its max, the allocation). */
  memEffMax: number;
  /** Milli-CPUs. */
  cpuFloor: number;
  /** Milli-CPUs. */
  cpuEffMax: number;
}

/**
 * Stage 1, measure: a project's floor and effective maximum in this allocation, and how
 * much it holds above its minimum (for the ranking).
 */
export function measure(p: PlanProject, u: PlanUsage | undefined, allocation: Resources): Measured {
  const { memoryBytes: allocMem, cpuMilli: allocCpu } = budgetOf(allocation);
  const running = p.state === 'running';
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
  };
}

/** Why a project's floors do not fit in what is left, in words; undefined when they fit. */
export function shortfall(w: Measured, left: Budget): string | undefined {
  const parts = [];
  if (w.memFloor > left.memoryBytes)
    parts.push(
      `its minimum memory ${formatBytes(w.memFloor)} > ${formatBytes(left.memoryBytes)} left`,
    );
  if (w.cpuFloor > left.cpuMilli)
    parts.push(
      `its minimum CPU ${fmtCpus(fromMilli(w.cpuFloor))} > ${fmtCpus(fromMilli(left.cpuMilli))} left`,
    );
  return parts.length > 0 ? parts.join(' and ') : undefined;
}

/** Whether a project runs after the plan, and if not, why. */
export type Admission = { admitted: true; starting: boolean } | { admitted: false; why: string };

export interface Admitted {
  admissions: Map<string, Admission>;
  /** What is left once the admitted projects have their floors. */
  left: Budget;
}

/**
 * Stage 2, admit: running projects, the highest-ranked first, while their floors fit; one
 * whose floor does not fit in what those above it left is out (it is stopped).
 */
export function admitRunning(work: readonly Measured[], budget: Budget): Admitted {
  const admissions = new Map<string, Admission>();
  let { memoryBytes, cpuMilli } = budget;
  for (const w of work.filter((x) => x.running).sort(keepsFirst)) {
    const short = shortfall(w, { memoryBytes, cpuMilli });
    if (short) {
      admissions.set(w.name, { admitted: false, why: short });
      continue;
    }
    admissions.set(w.name, { admitted: true, starting: false });
    memoryBytes -= w.memFloor;
    cpuMilli -= w.cpuFloor;
  }
  return { admissions, left: { memoryBytes, cpuMilli } };
}

/**
 * Stage 3, restart: stopped-for-room projects with restartOnRestore, highest-ranked first,
 * while their floors fit in what is left (a restart never displaces a running project).
 */
export function admitRestarts(work: readonly Measured[], left: Budget): Admitted {
  const admissions = new Map<string, Admission>();
  let { memoryBytes, cpuMilli } = left;
  for (const w of work.filter((x) => !x.running).sort(keepsFirst)) {
    if (!w.p.stoppedForRoom) {
      admissions.set(w.name, { admitted: false, why: 'it was not stopped for lack of room' });
      continue;
    }
    if (!w.p.restartOnRestore) {
      admissions.set(w.name, { admitted: false, why: 'restartOnRestore is off' });
      continue;
    }
    const short = shortfall(w, { memoryBytes, cpuMilli });
    if (short) {
      admissions.set(w.name, { admitted: false, why: short });
      continue;
    }
    admissions.set(w.name, { admitted: true, starting: true });
    memoryBytes -= w.memFloor;
    cpuMilli -= w.cpuFloor;
  }
  return { admissions, left: { memoryBytes, cpuMilli } };
}

/** What one admitted project is planned to get. */
export interface Target {
  memoryBytes: number;
  /** Milli-CPUs. */
  cpuMilli: number;
}

/**
 * Stage 4, fill: every admitted project starts at its floor (already taken from `left`);
 * what is left goes toward each effective max, highest-ranked first, so the lowest-ranked
 * project is the one shrunk toward its minimum.
 */
export function fill(kept: readonly Measured[], left: Budget): Map<string, Target> {
  const targets = new Map<string, Target>();
  const ranked = kept.slice().sort(keepsFirst);
  for (const w of ranked) targets.set(w.name, { memoryBytes: w.memFloor, cpuMilli: w.cpuFloor });
  let { memoryBytes: memLeft, cpuMilli: cpuLeft } = left;
  for (const w of ranked) {
    const t = targets.get(w.name) as Target;
    const m = Math.min(Math.max(0, w.memEffMax - t.memoryBytes), memLeft);
    t.memoryBytes += m;
    memLeft -= m;
    const c = Math.min(Math.max(0, w.cpuEffMax - t.cpuMilli), cpuLeft);
    t.cpuMilli += c;
    cpuLeft -= c;
  }
  return targets;
}

/** The cpuset running projects get: pinned when whole CPUs go away. */
export interface CpusetPlan {
  online?: number;
  /** The online CPUs by number, when known: what a cpuset grows back to. */
  onlineList?: readonly number[];
  /** The cpuset every running project gets, when CPUs go away as whole CPUs. */
  pinned?: string;
  /** The plan's reason for pinning, in words. */
  note?: string;
}

/**
 * CPUs going away as whole CPUs: pin to the first ceil(allocation) (cgroup-v2.rst
 * "Cpuset"). When they all come back, a project that was pinned gets every online CPU
 * again.
 */
export function planCpuset(
  allocationCpus: number,
  online: number | undefined,
  cpus: { onlineList?: readonly number[]; leaving?: readonly number[] } = {},
): CpusetPlan {
  const onlineList = cpus.onlineList;
  // The host names the CPUs it will unplug (docs/protocol.md, "notice (host → guest)"):
  // every running project moves onto the CPUs that stay, before the host takes them.
  if (onlineList !== undefined && cpus.leaving !== undefined && cpus.leaving.length > 0) {
    const leaving = new Set(cpus.leaving);
    const stay = onlineList.filter((c) => !leaving.has(c));
    const pinned = formatCpuList(stay);
    return {
      online: onlineList.length,
      onlineList,
      pinned,
      note: `CPUs ${formatCpuList(cpus.leaving)} will be unplugged: running projects get cpuset ${pinned}`,
    };
  }
  if (onlineList !== undefined) online = onlineList.length;
  const pinned =
    online !== undefined && online > 0 && allocationCpus < online
      ? firstCpus(Math.min(online, Math.max(1, Math.ceil(allocationCpus - EPS))), onlineList)
      : undefined;
  const note =
    pinned !== undefined
      ? `whole CPUs go away (${fmtCpus(allocationCpus)} of ${online} online): running projects get cpuset ${pinned}`
      : undefined;
  return { online, onlineList, pinned, note };
}

/** A running project's cpuset after the plan, from the one it has. */
export function cpusetAfter(c: CpusetPlan, before: string | undefined): string | undefined {
  if (c.online === undefined || c.online <= 0) return before;
  if (c.pinned !== undefined) return c.pinned;
  if (before === undefined) return undefined;
  // Every online CPU again (a hot-plugged one included), by number when known.
  return c.onlineList !== undefined ? formatCpuList(c.onlineList) : cpusetOf(c.online);
}

/**
 * What a change of limits is: `shrunk` if anything goes down (memory.max, the effective
 * memory.high, cpu.max, the size of the cpuset), else `grown` if anything goes up, else
 * `unchanged`; a restart is `started` whatever the limits.
 */
export function classify(
  before: ProjectLimits,
  after: ProjectLimits,
  starting: boolean,
): ProjectAction {
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
  if (starting) return 'started';
  if (cmps.some((c) => c < 0) || cpusetShrinks) return 'shrunk';
  if (cmps.some((c) => c > 0) || cpusetGrows) return 'grown';
  return 'unchanged';
}

/** The limits that change, in words (`memory.max 1 GiB → 512 MiB`). */
export function changes(before: ProjectLimits, after: ProjectLimits): string[] {
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
  return words;
}

/** Which step of the execution order a decision belongs to. */
export type StepKind = 'stop' | 'shrink' | 'grow' | 'start' | 'same';

export interface Explained {
  decision: Omit<Decision, 'order'>;
  kind: StepKind;
}

const KIND_OF: Record<ProjectAction, StepKind> = {
  stopped: 'stop',
  shrunk: 'shrink',
  grown: 'grow',
  started: 'start',
  unchanged: 'same',
};

/**
 * Stage 5, explain: one project's decision, with its new limits and the reason in words.
 * An admitted project comes with its target (stage 4).
 */
export function explain(
  w: Measured,
  a: Admission,
  target: Target | undefined,
  cpuset: CpusetPlan,
): Explained {
  const p = w.p;
  const before = p.limits;
  if (!a.admitted) {
    const why = a.why;
    return {
      kind: w.running ? 'stop' : 'same',
      decision: {
        project: w.name,
        action: w.running ? 'stopped' : 'unchanged',
        before,
        after: before,
        memoryTarget: 0,
        reason: w.running
          ? `stopped: ${why}, after the projects ranked above it (priority ${p.priority})`
          : `stays stopped: ${why}`,
      },
    };
  }
  if (target === undefined)
    throw new NestError('INTERNAL', `plan: project "${w.name}" is admitted without a target`);
  const after: ProjectLimits = {
    memoryHigh: target.memoryBytes,
    memoryMax: target.memoryBytes,
    cpuMax: fromMilli(target.cpuMilli),
  };
  const cs = cpusetAfter(cpuset, before.cpuset);
  if (cs !== undefined) after.cpuset = cs;

  const mustComeDown =
    !a.starting && w.memCurrent !== undefined && w.memCurrent > target.memoryBytes
      ? w.memCurrent
      : undefined;
  const words = changes(before, after);
  const action = classify(before, after, a.starting);

  const atMin = target.memoryBytes === w.memFloor && target.cpuMilli === w.cpuFloor;
  const atMax = target.memoryBytes >= w.memEffMax && target.cpuMilli >= w.cpuEffMax;
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
    reason += `; uses ${formatBytes(mustComeDown)}, above its new memory.max ${formatBytes(target.memoryBytes)}: memory.high is lowered first and memory.max follows once usage is below it, or the project is stopped`;
  else if (w.running && w.memCurrent === undefined && action === 'shrunk')
    reason += '; its usage is unknown: memory.high is lowered first';

  const d: Omit<Decision, 'order'> = {
    project: w.name,
    action,
    before,
    // Nothing to write: keep the limits exactly as the cgroup shows them.
    after: action === 'unchanged' ? before : after,
    memoryTarget: target.memoryBytes,
    reason,
  };
  if (mustComeDown !== undefined) d.mustComeDownFrom = mustComeDown;
  return { kind: KIND_OF[action], decision: d };
}

const PHASE: Record<StepKind, number> = { stop: 0, shrink: 1, grow: 2, start: 3, same: 4 };

/**
 * Execution order: free first (stops, then shrinks, lowest-ranked first), then give
 * (grows, then starts, highest-ranked first), then the untouched ones by name.
 */
export function executionOrder(
  explained: readonly Explained[],
  work: readonly Measured[],
): Decision[] {
  const byWork = new Map(work.map((w) => [w.name, w]));
  const ordered = explained.slice().sort((a, b) => {
    if (a.kind !== b.kind) return PHASE[a.kind] - PHASE[b.kind];
    const wa = byWork.get(a.decision.project) as Measured;
    const wb = byWork.get(b.decision.project) as Measured;
    if (a.kind === 'stop' || a.kind === 'shrink') return givesFirst(wa, wb);
    if (a.kind === 'grow' || a.kind === 'start') return keepsFirst(wa, wb);
    return wa.name < wb.name ? -1 : wa.name > wb.name ? 1 : 0;
  });
  return ordered.map((e, i) => ({ ...e.decision, order: i + 1 }));
}

/**
 * The plan as a whole: the totals of what runs after it (`kept`: the targets of the
 * projects that run), and its reasons in words.
 */
export function summarize(
  decisions: readonly Decision[],
  kept: readonly Target[],
  budget: Budget,
  opts: { cpusetNote?: string; anyRunning: boolean },
): Pick<Plan, 'totals' | 'fits' | 'reasons'> {
  const totals = {
    memoryMax: kept.reduce((s, t) => s + t.memoryBytes, 0),
    cpus: fromMilli(kept.reduce((s, t) => s + t.cpuMilli, 0)),
  };
  const stopped = decisions.filter((d) => d.action === 'stopped').map((d) => d.project);
  const started = decisions.filter((d) => d.action === 'started').map((d) => d.project);
  const comeDown = decisions.filter((d) => d.mustComeDownFrom !== undefined).map((d) => d.project);
  const reasons = [
    `allocation ${formatBytes(budget.memoryBytes)} memory and ${fmtCpus(fromMilli(budget.cpuMilli))} (net of the guest's reserve); planned limits add up to ${formatBytes(totals.memoryMax)} and ${fmtCpus(totals.cpus)}`,
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
  if (opts.cpusetNote) reasons.push(opts.cpusetNote);
  if (kept.length === 0 && opts.anyRunning)
    reasons.push('the allocation is too small for any project');
  return { totals, fits: stopped.length === 0, reasons };
}

/** The planner: the stages above, composed (numbered as in the pipeline at the top). */
export function plan(
  projects: PlanProject[],
  usage: Record<string, PlanUsage>,
  allocation: Resources,
  now: Date,
  opts: {
    onlineCpus?: number;
    /** The online CPUs by number (the guest kernel's `online` list); wins over the count. */
    onlineList?: readonly number[];
    /** The CPUs the notice says will be unplugged: no running project keeps them. */
    leavingCpus?: readonly number[];
  } = {},
): Plan {
  checkInput(projects, allocation);
  const budget = budgetOf(allocation);
  const usageOf = (name: string): PlanUsage | undefined =>
    Object.prototype.hasOwnProperty.call(usage, name) ? usage[name] : undefined;

  const work = projects.map((p) => measure(p, usageOf(p.name), allocation)); // 1
  const running = admitRunning(work, budget); // 2
  const restarts = admitRestarts(work, running.left); // 3
  const admissions = new Map([...running.admissions, ...restarts.admissions]);
  const kept = work.filter((w) => admissions.get(w.name)?.admitted === true);
  const targets = fill(kept, restarts.left); // 4
  const cpuset = planCpuset(allocation.cpus, opts.onlineCpus, {
    onlineList: opts.onlineList,
    leaving: opts.leavingCpus,
  });
  const explained = work.map((w) =>
    explain(w, admissions.get(w.name) as Admission, targets.get(w.name), cpuset),
  ); // 5
  const decisions = executionOrder(explained, work);
  const whole = summarize(
    decisions,
    kept.map((w) => targets.get(w.name) as Target),
    budget,
    { cpusetNote: cpuset.note, anyRunning: work.some((w) => w.running) },
  );
  return {
    decisions,
    allocation: { cpus: allocation.cpus, memoryBytes: allocation.memoryBytes },
    totals: whole.totals,
    fits: whole.fits,
    reasons: whole.reasons,
    plannedAt: now.toISOString(),
  };
}
