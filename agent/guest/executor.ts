/**
 * The guest's local broker: turns a notice into a plan (planner.ts, pure), the plan into
 * broker steps over the projects (broker.ts), and carries each project's step out on the
 * real cgroups:
 *
 *   stopped → the graceful stop (stopper.ts)
 *   shrunk  → memory.high = target first (reclaim without OOM), cpu.max and cpuset at once;
 *             memory.max = target only once memory.current is below it (a memory.max under
 *             usage is an instant OOM kill, cgroup-v2.rst "memory.max"); if usage does not
 *             come down within the project's grace (never past the deadline) it is stopped.
 *   grown   → the new limits (raising never hurts a running project)
 *   started → the new limits, then the project's command inside its cgroup
 *
 * Execution order (broker groups): stops one at a time, lowest rank first, so that what
 * one frees is freed before the next is touched; the shrinks together (independent);
 * the grows together; the starts one at a time, highest rank first.
 */
import type { CgroupAdapter } from '../../cgroup-adapter/types';
import type { Logger } from '../common/log';
import { isNestError, type Problem } from '../common/errors';
import { formatBytes } from '../common/units';
import type {
  Notice,
  Outcome,
  ProjectLimits,
  ProjectNotice,
  ProjectOutcome,
  Resources,
} from '../broker/types';
import {
  runBroker,
  summariseProjects,
  type BrokerStep,
  type ChildContext,
  type ChildHandle,
  type StepJournal,
} from '../broker/broker';
import type { CarryOutContext, LocalBroker } from '../client/notices';
import {
  plan as makePlan,
  type Decision,
  type Plan,
  type PlanProject,
  type PlanUsage,
} from './planner';
import type { GuestConfig } from './config';
import type { ProjectRegistry } from './projects';
import type { ProjectNoticeBoard } from './project-notices';
import { stopProject } from './stopper';
import type { UsageSampler } from './usage';

export interface AllocationBook {
  /** The guest's whole allocation now (before the reserve is taken off). */
  current(): Resources;
  set(r: Resources): Promise<void>;
}

const STOPPED_LIMITS: ProjectLimits = { memoryHigh: 0, memoryMax: 0, cpuMax: 0 };

export class GuestBroker implements LocalBroker {
  readonly name: string;

  constructor(
    private readonly cfg: GuestConfig,
    private readonly registry: ProjectRegistry,
    private readonly board: ProjectNoticeBoard,
    private readonly adapter: CgroupAdapter,
    private readonly usage: UsageSampler,
    private readonly allocation: AllocationBook,
    private readonly log: Logger,
  ) {
    this.name = cfg.guest;
  }

  /** The allocation the projects share: the guest's, less the reserve. */
  net(r: Resources): Resources {
    return {
      memoryBytes: Math.max(0, r.memoryBytes - this.cfg.reserve.memoryBytes),
      cpus: Math.max(0, Math.round((r.cpus - this.cfg.reserve.cpus) * 1000) / 1000),
    };
  }

  async planFor(allocation: Resources, now = new Date()): Promise<Plan> {
    const projects: PlanProject[] = [];
    for (const p of this.cfg.projects) {
      const state = await this.registry.stateOf(p.name);
      projects.push({
        name: p.name,
        priority: p.priority,
        memory: p.memory,
        cpu: p.cpu,
        state: state === 'stopped' || state === 'failed' ? 'stopped' : 'running',
        restartOnRestore: p.restartOnRestore,
        stoppedForRoom: this.registry.stoppedForRoom(p.name),
        limits: this.registry.limits(p.name),
      });
    }
    const usage: Record<string, PlanUsage> = {};
    for (const [name, u] of Object.entries(await this.usage.fresh())) {
      usage[name] = { memoryCurrent: u.memoryBytes, cpuUsageRate: u.cpus };
    }
    return makePlan(projects, usage, this.net(allocation), now, {
      onlineCpus: this.usage.onlineCpus,
    });
  }

  async check(notice: Notice): Promise<Problem[]> {
    const problems: Problem[] = [];
    const { memoryBytes, cpus } = notice.allocation;
    if (memoryBytes < this.cfg.reserve.memoryBytes)
      problems.push({
        field: 'allocation.memoryBytes',
        value: memoryBytes,
        message: `does not fit: ${formatBytes(memoryBytes)} is below the guest's own reserve of ${formatBytes(this.cfg.reserve.memoryBytes)}`,
      });
    if (cpus < this.cfg.reserve.cpus)
      problems.push({
        field: 'allocation.cpus',
        value: cpus,
        message: `does not fit: ${cpus} CPUs is below the guest's own reserve of ${this.cfg.reserve.cpus}`,
      });
    return problems;
  }

  async carryOut(notice: Notice, ctx: CarryOutContext): Promise<Outcome> {
    const startedAt = new Date();
    const log = ctx.log;
    const deadline = new Date(notice.deadline);
    // The plan is made once and journaled with the steps, so a run resumed after a
    // restart carries out the same decisions (re-planning would see the projects the
    // first run already stopped, and decide differently).
    const planJournal = ctx.steps as StepJournal<unknown>;
    const saved = (await planJournal.get('_plan'))?.outcome as
      { plan: Plan; previous: Resources; running: string[] } | undefined;
    const previous = saved?.previous ?? this.allocation.current();
    const thePlan = saved?.plan ?? (await this.planFor(notice.allocation, startedAt));
    const running = new Set(saved?.running ?? (await this.runningProjects()));
    if (!saved)
      await planJournal.put('_plan', {
        outcome: { plan: thePlan, previous, running: [...running] },
      });
    log.info({ fits: thePlan.fits, reasons: thePlan.reasons }, 'plan');

    const decisions = new Map(thePlan.decisions.map((d) => [d.project, d]));
    const steps = toSteps(
      thePlan.decisions,
      notice,
      (name) => this.registry.config(name).stop.gracePeriodMs,
    );
    const children = new Map<string, ChildHandle<ProjectNotice, ProjectOutcome>>();
    for (const s of steps) children.set(s.child, this.handle(decisions.get(s.child)!));

    const results = await runBroker(steps, children, {
      noticeId: notice.id,
      deadline,
      signal: ctx.signal,
      journal: ctx.steps as StepJournal<ProjectOutcome>,
      log,
      onProgress: ctx.onProgress,
      failed: (step, err, ms) => {
        const d = decisions.get(step.child)!;
        return {
          name: step.child,
          action: d.action,
          before: d.before,
          after: d.before,
          exit: null,
          ms,
          reason: `failed: ${err instanceof Error ? err.message : String(err)}`,
          error: {
            code: isNestError(err) ? err.code : ((err as { code?: string }).code ?? 'INTERNAL'),
            message: err instanceof Error ? err.message : String(err),
          },
        };
      },
    });
    const byName = new Map(results.map((r) => [r.child, r.outcome]));
    const projects: ProjectOutcome[] = thePlan.decisions.map(
      (d) =>
        byName.get(d.project) ?? {
          name: d.project,
          action: 'unchanged',
          // A project that is not running holds nothing, whatever limits its group keeps.
          before: running.has(d.project) ? d.before : STOPPED_LIMITS,
          after: running.has(d.project) ? d.before : STOPPED_LIMITS,
          exit: null,
          ms: 0,
          reason: d.reason,
        },
    );
    await this.allocation.set(notice.allocation);
    return summariseProjects(
      notice,
      projects,
      this.net(previous),
      startedAt,
      new Date(),
      this.net(notice.allocation),
    );
  }

  private async runningProjects(): Promise<string[]> {
    const out: string[] = [];
    for (const p of this.cfg.projects)
      if ((await this.registry.pids(p.name).catch(() => [])).length > 0) out.push(p.name);
    return out;
  }

  /** The child handle of one project for one notice. */
  private handle(d: Decision): ChildHandle<ProjectNotice, ProjectOutcome> {
    const name = d.project;
    const p = this.registry.config(name);
    const group = this.registry.group(name);
    return {
      name,
      deliver: async (pn) => {
        const pids = p.notify ? await this.adapter.pids(group) : [];
        await this.board.deliver(pn, { signal: p.notify?.signal, pids });
      },
      apply: async (pn, ctx) => {
        const t0 = Date.now();
        const base = { name, before: d.before, reason: d.reason };
        switch (d.action) {
          case 'stopped': {
            const r = await this.stop(name, pn, ctx);
            return {
              ...base,
              action: 'stopped',
              after: STOPPED_LIMITS,
              exit: r.exit,
              ms: Date.now() - t0,
              reason: `${d.reason}; ${r.reason}`,
            };
          }
          case 'shrunk': {
            const came = await this.shrink(d, pn, ctx);
            if (came.ok) {
              ctx.progress({ phase: 'shrunk', action: 'shrunk', ms: Date.now() - t0 });
              return { ...base, action: 'shrunk', after: d.after, exit: null, ms: Date.now() - t0 };
            }
            const r = await this.stop(name, pn, ctx);
            return {
              ...base,
              action: 'stopped',
              after: STOPPED_LIMITS,
              exit: r.exit,
              ms: Date.now() - t0,
              reason: `${d.reason}; memory stayed at ${formatBytes(came.usage)}, above ${formatBytes(d.memoryTarget)}, until its grace ran out: stopped (${r.reason})`,
            };
          }
          case 'grown': {
            await this.registry.applyLimits(name, d.after);
            ctx.progress({ phase: 'grown', action: 'grown', ms: Date.now() - t0 });
            return { ...base, action: 'grown', after: d.after, exit: null, ms: Date.now() - t0 };
          }
          case 'started': {
            await this.registry.applyLimits(name, d.after);
            // Idempotent after a restart: a project already running is not started twice.
            if ((await this.registry.pids(name)).length === 0)
              await this.registry.start(name, ctx.log);
            ctx.progress({ phase: 'started', action: 'started', ms: Date.now() - t0 });
            return { ...base, action: 'started', after: d.after, exit: null, ms: Date.now() - t0 };
          }
          default:
            return { ...base, action: 'unchanged', after: d.before, exit: null, ms: 0 };
        }
      },
    };
  }

  private async stop(name: string, pn: ProjectNotice, ctx: ChildContext) {
    const p = this.registry.config(name);
    const group = this.registry.group(name);
    this.registry.setTransient(name, 'stopping');
    // Recorded BEFORE the stop: an agent killed mid-stop must not start it again on restart.
    await this.registry.setRecord(name, { stoppedForRoom: true });
    ctx.progress({ phase: 'stopping', action: 'stopped', ms: 0 });
    try {
      const r = await stopProject(
        group,
        { signal: p.stop.signal, gracePeriodMs: p.stop.gracePeriodMs, preStop: p.stop.preStop },
        new Date(pn.deadline),
        {
          adapter: this.adapter,
          spawnHook: (g, argv) => this.registry.spawnHook(name, g, argv),
          waitDone: (signal) => this.board.waitDone(name, pn.notice.id, signal),
          log: ctx.log,
        },
      );
      ctx.log.info({ exit: r.exit, ms: r.ms, phases: r.phases }, 'project stopped');
      ctx.progress({
        phase: 'stopped',
        action: 'stopped',
        exit: r.exit,
        ms: r.ms,
        reason: r.reason,
      });
      return r;
    } finally {
      this.registry.setTransient(name, undefined);
    }
  }

  /** memory.high and CPU first; memory.max once usage is below the target. */
  private async shrink(
    d: Decision,
    pn: ProjectNotice,
    ctx: ChildContext,
  ): Promise<{ ok: true } | { ok: false; usage: number }> {
    const name = d.project;
    const group = this.registry.group(name);
    const target = d.memoryTarget;
    const first: ProjectLimits = { ...d.after, memoryMax: d.before.memoryMax };
    await this.registry.applyLimits(name, first);
    const until = Math.min(Date.now() + pn.gracePeriodMs, new Date(pn.deadline).getTime());
    let current = (await this.adapter.usage(group)).memoryCurrent;
    while (current > target && Date.now() < until && !ctx.signal.aborted) {
      await sleep(Math.min(100, Math.max(1, until - Date.now())));
      current = (await this.adapter.usage(group)).memoryCurrent;
    }
    if (current > target) return { ok: false, usage: current };
    await this.registry.applyLimits(name, d.after);
    return { ok: true };
  }
}

/** Plan decisions → broker steps (see the file comment for the grouping). */
export function toSteps(
  decisions: Decision[],
  notice: Notice,
  graceOf: (name: string) => number,
): BrokerStep<ProjectNotice>[] {
  const deadlineLeft = Math.max(0, Date.parse(notice.deadline) - Date.now());
  const firstOf = (action: string): number =>
    Math.min(...decisions.filter((d) => d.action === action).map((d) => d.order));
  const steps: BrokerStep<ProjectNotice>[] = [];
  for (const d of decisions) {
    if (d.action === 'unchanged') continue;
    const order = d.action === 'shrunk' || d.action === 'grown' ? firstOf(d.action) : d.order;
    steps.push({
      child: d.project,
      order,
      notice: {
        notice,
        project: d.project,
        action: d.action,
        limits: d.action === 'stopped' ? STOPPED_LIMITS : d.after,
        gracePeriodMs: Math.min(graceOf(d.project), deadlineLeft),
        deadline: notice.deadline,
        reason: d.reason,
      },
    });
  }
  return steps;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
