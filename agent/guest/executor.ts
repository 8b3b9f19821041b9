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
 * Execution order (broker groups): the stops together, but SIGNALLED one after another
 * in rank order, lowest first (SignalTurns: a project's stop signal goes only once every
 * lower-ranked one's has gone; their exits are awaited together, each with its own grace
 * capped by the deadline: waiting for each to exit before signalling the next
 * cost a grace's worth of latency a project), and the shrinks in the same group, beside
 * them (independent: each takes from its own project only); the grows together; the
 * starts one at a time, highest rank first.
 */
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
import { stopProject, type SendSignal, type StopCgroup } from './stopper';
import { faultPoint } from '../common/fault';
import type { UsageSampler } from './usage';
import { factPathsFromEnv, readGuestFacts, type GuestFacts } from './guest-facts';
import { formatCpuList } from '../common/cpulist';

export interface AllocationBook {
  /** The guest's whole allocation now (before the reserve is taken off). */
  current(): Resources;
  set(r: Resources): Promise<void>;
}

/**
 * What the executor uses of each part of the agent: one narrow interface per kind of act
 * (CONTRIBUTING.md, "Policy is pure; actuation is narrow"). The agent passes the real
 * ones (agent/guest/agent.ts); a test passes recording fakes.
 */
export type ExecutorRegistry = Pick<
  ProjectRegistry,
  | 'config'
  | 'group'
  | 'limits'
  | 'pids'
  | 'transientState'
  | 'setTransient'
  | 'stoppedForRoom'
  | 'stoppedByOperator'
  | 'killEscaped'
  | 'setRecord'
  | 'writeLimits'
  | 'applyMemoryMax'
  | 'applyLimits'
  | 'start'
  | 'spawnHook'
>;
export type ExecutorBoard = Pick<ProjectNoticeBoard, 'deliver' | 'waitDone'>;
export type ExecutorUsage = Pick<UsageSampler, 'recent' | 'onlineCpus' | 'memoryNow' | 'pidsNow'>;

const STOPPED_LIMITS: ProjectLimits = { memoryHigh: 0, memoryMax: 0, cpuMax: 0 };

export class GuestBroker implements LocalBroker {
  readonly name: string;
  /**
   * Where the guest kernel's online CPUs and MemTotal are read (guest-facts.ts) for each
   * plan and each notice naming leaving CPUs: the same files, NESTBROKER_SYSROOT included,
   * as the hello and the facts messages (agent/guest/upstream.ts), so a plan and what the
   * host is told agree.
   */
  private readonly factPaths = factPathsFromEnv();
  private readFacts(): Partial<GuestFacts> {
    return readGuestFacts(this.factPaths);
  }

  constructor(
    private cfg: GuestConfig,
    private readonly registry: ExecutorRegistry,
    private readonly board: ExecutorBoard,
    private readonly adapter: StopCgroup,
    private readonly usage: ExecutorUsage,
    private readonly allocationBook: AllocationBook,
    private readonly log: Logger,
    /** kill(2) for the stop signals; a test records them instead. */
    private readonly sendSignal?: SendSignal,
  ) {
    this.name = cfg.guest;
  }

  /** A reload's new config (agent/guest/reload.ts): the projects and the reserve plans use. */
  setConfig(cfg: GuestConfig): void {
    this.cfg = cfg;
  }

  /** The guest's whole allocation now: every notice is checked against it (NoticeBook). */
  allocation(): Resources {
    return this.allocationBook.current();
  }

  /** The allocation the projects share: the guest's, less the reserve. */
  net(r: Resources): Resources {
    return {
      memoryBytes: Math.max(0, r.memoryBytes - this.cfg.reserve.memoryBytes),
      cpus: Math.max(0, Math.round((r.cpus - this.cfg.reserve.cpus) * 1000) / 1000),
    };
  }

  async planFor(allocation: Resources, now = new Date()): Promise<Plan> {
    return (await this.snapshot(allocation, now)).plan;
  }

  /**
   * The plan and the projects running now. Every project's state is read at once (they
   * are independent files), and usage comes from the sampler's last sample when it is
   * recent: re-reading every project's usage files one after the other was most of the
   * time from notice to plan (163 ms at 100 projects, docs/performance.md).
   */
  private async snapshot(
    allocation: Resources,
    now = new Date(),
    leavingCpus?: readonly number[],
  ): Promise<{ plan: Plan; running: string[] }> {
    const facts = this.readFacts();
    const states = await Promise.all(
      this.cfg.projects.map(async (p) => {
        // registry.pids reads through the sampler's open descriptors (one pread each; 100
        // thread-pool reads cost several ms before a plan).
        const pids = await this.registry.pids(p.name).catch(() => []);
        const transient = this.registry.transientState(p.name);
        return { transient, hasPids: pids.length > 0 };
      }),
    );
    const projects: PlanProject[] = [];
    const running: string[] = [];
    this.cfg.projects.forEach((p, i) => {
      const { transient, hasPids } = states[i];
      if (hasPids) running.push(p.name);
      const state = transient ?? (hasPids ? 'running' : 'stopped');
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
    });
    const usage: Record<string, PlanUsage> = {};
    for (const [name, u] of Object.entries(await this.usage.recent())) {
      usage[name] = { memoryCurrent: u.memoryBytes, cpuUsageRate: u.cpus };
    }
    const plan = makePlan(projects, usage, this.net(allocation), now, {
      onlineCpus: this.usage.onlineCpus,
      onlineList: facts.onlineCpus,
      leavingCpus,
    });
    return { plan, running };
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
    if (notice.leavingCpus !== undefined && notice.leavingCpus.length > 0)
      problems.push(...(await this.leavingProblems(notice.leavingCpus, cpus)));
    return problems;
  }

  /**
   * A reclaim's leaving CPUs must be online here, and what stays must hold the new
   * allocation: else the cpusets could not be moved off them, and the notice is refused
   * before anything is done (docs/protocol.md, "notice (host → guest)").
   */
  private async leavingProblems(leaving: readonly number[], cpus: number): Promise<Problem[]> {
    const facts = this.readFacts();
    const online = facts.onlineCpus;
    if (online === undefined)
      return [
        {
          field: 'leavingCpus',
          value: formatCpuList(leaving),
          message: 'the guest cannot read its online CPUs (/sys/devices/system/cpu/online)',
        },
      ];
    const have = new Set(online);
    const absent = leaving.filter((c) => !have.has(c));
    if (absent.length > 0)
      return [
        {
          field: 'leavingCpus',
          value: formatCpuList(leaving),
          message: `names CPU(s) ${formatCpuList(absent)} that are not online in this guest (online: ${formatCpuList(online)})`,
        },
      ];
    const stay = online.filter((c) => !leaving.includes(c));
    if (stay.length === 0 || stay.length < Math.ceil(cpus - 1e-6))
      return [
        {
          field: 'leavingCpus',
          value: formatCpuList(leaving),
          message: `would leave ${stay.length === 0 ? 'no CPU' : `CPUs ${formatCpuList(stay)}`} for an allocation of ${cpus} CPUs: the projects would be pinned to leaving CPUs only`,
        },
      ];
    return [];
  }

  async carryOut(notice: Notice, ctx: CarryOutContext): Promise<Outcome> {
    const clock = ctx.clock;
    // Wall time for the record only; the duration is on the monotonic clock.
    const startedAt = new Date(clock.now());
    const t0 = clock.monotonic();
    const log = ctx.log;
    const deadline = new Date(notice.deadline);
    // The plan is made once and journaled with the steps, so a run resumed after a
    // restart carries out the same decisions (re-planning would see the projects the
    // first run already stopped, and decide differently).
    const planJournal = ctx.steps as StepJournal<unknown>;
    const saved = (await planJournal.get('_plan'))?.outcome as
      { plan: Plan; previous: Resources; running: string[] } | undefined;
    const previous = saved?.previous ?? this.allocationBook.current();
    const fresh = saved
      ? undefined
      : await this.snapshot(
          notice.allocation,
          startedAt,
          notice.kind === 'reclaim' ? notice.leavingCpus : undefined,
        );
    const thePlan = saved?.plan ?? fresh!.plan;
    const running = new Set(saved?.running ?? fresh!.running);
    // The plan is written while the notices are delivered, and is on disk before any step
    // acts (runBroker's `ready`): in the same step record, by the same group commit.
    const planSaved = saved
      ? Promise.resolve()
      : planJournal.put('_plan', { outcome: { plan: thePlan, previous, running: [...running] } });
    planSaved.catch(() => undefined); // awaited by runBroker; not an unhandled rejection here
    log.info({ fits: thePlan.fits, reasons: thePlan.reasons }, 'plan');

    const decisions = new Map(thePlan.decisions.map((d) => [d.project, d]));
    const steps = toSteps(
      thePlan.decisions,
      notice,
      (name) => this.registry.config(name).stop.gracePeriodMs,
      Math.max(0, ctx.deadline - ctx.killMs - clock.monotonic()),
    );
    // Stop signals go in plan order (lowest rank first); a stop already done before a
    // restart has no turn to take.
    const stopSteps = steps.filter((s) => s.notice.action === 'stopped').map((s) => s.child);
    const turns = new SignalTurns(stopSteps);
    for (const child of stopSteps)
      if ((await planJournal.get(child))?.outcome !== undefined) turns.release(child);
    const children = new Map<string, ChildHandle<ProjectNotice, ProjectOutcome>>();
    for (const s of steps) children.set(s.child, this.handle(decisions.get(s.child)!, turns, ctx));

    const results = await runBroker(steps, children, {
      noticeId: notice.id,
      deadline,
      deadlineMono: ctx.deadline,
      clock,
      signal: ctx.signal,
      journal: ctx.steps as StepJournal<ProjectOutcome>,
      ready: planSaved,
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
    const outcome = summariseProjects(
      notice,
      projects,
      this.net(previous),
      startedAt,
      new Date(clock.now()),
      this.net(notice.allocation),
      clock.monotonic() - t0,
    );
    // The allocation the host's books will hold after this outcome (host-broker.ts): a
    // reclaim that failed outright is refused there and given back, so it is not recorded
    // here either; anything else (complete, partial; late or not) the host counts.
    if (notice.kind === 'restore' || outcome.status !== 'failed')
      await this.allocationBook.set(notice.allocation);
    return outcome;
  }

  /** The child handle of one project for one notice. */
  private handle(
    d: Decision,
    turns: SignalTurns,
    notice: CarryOutContext,
  ): ChildHandle<ProjectNotice, ProjectOutcome> {
    const name = d.project;
    const clock = notice.clock;
    const since = (t: number): number => Math.round(clock.monotonic() - t);
    const p = this.registry.config(name);
    return {
      name,
      deliver: async (pn) => {
        const pids = p.notify ? await this.registry.pids(name) : [];
        await this.board.deliver(pn, { signal: p.notify?.signal, pids });
      },
      apply: async (pn, ctx) => {
        const t0 = clock.monotonic();
        const base = { name, before: d.before, reason: d.reason };
        switch (d.action) {
          case 'stopped': {
            const r = await this.stop(name, pn, ctx, notice, turns);
            return {
              ...base,
              action: 'stopped',
              after: STOPPED_LIMITS,
              exit: r.exit,
              // From its turn: the wait for lower-ranked projects' signals is theirs.
              ms: r.ms,
              reason: `${d.reason}; ${r.reason}`,
              ...(r.escaped ? { escaped: r.escaped } : {}),
            };
          }
          case 'shrunk': {
            const came = await this.shrink(d, pn, ctx, notice);
            if (came.ok) {
              ctx.progress({ phase: 'shrunk', action: 'shrunk', ms: since(t0) });
              return { ...base, action: 'shrunk', after: d.after, exit: null, ms: since(t0) };
            }
            const r = await this.stop(name, pn, ctx, notice);
            return {
              ...base,
              action: 'stopped',
              after: STOPPED_LIMITS,
              exit: r.exit,
              ms: since(t0),
              ...(r.escaped ? { escaped: r.escaped } : {}),
              reason: `${d.reason}; memory stayed at ${formatBytes(came.usage)}, above ${formatBytes(d.memoryTarget)}, until its grace ran out: stopped (${r.reason})`,
            };
          }
          case 'grown': {
            await this.registry.applyLimits(name, d.after);
            ctx.progress({ phase: 'grown', action: 'grown', ms: since(t0) });
            return { ...base, action: 'grown', after: d.after, exit: null, ms: since(t0) };
          }
          case 'started': {
            await this.registry.applyLimits(name, d.after);
            // Idempotent after a restart: a project already running is not started twice;
            // one an operator stopped stays stopped (nestctl --guest start is its way back).
            if (
              (await this.registry.pids(name)).length === 0 &&
              !this.registry.stoppedByOperator(name)
            )
              await this.registry.start(name, ctx.log);
            ctx.progress({ phase: 'started', action: 'started', ms: since(t0) });
            return { ...base, action: 'started', after: d.after, exit: null, ms: since(t0) };
          }
          default:
            return { ...base, action: 'unchanged', after: d.before, exit: null, ms: 0 };
        }
      },
    };
  }

  private async stop(
    name: string,
    pn: ProjectNotice,
    ctx: ChildContext,
    notice: CarryOutContext,
    turns?: SignalTurns,
  ) {
    const p = this.registry.config(name);
    const group = this.registry.group(name);
    this.registry.setTransient(name, 'stopping');
    try {
      // Recorded BEFORE the stop: an agent killed mid-stop must not start it again on
      // restart. (All the stops' records go in one write: projects.ts, save.)
      await this.registry.setRecord(name, { stoppedForRoom: true });
      const r = await stopProject(
        group,
        { signal: p.stop.signal, gracePeriodMs: p.stop.gracePeriodMs, preStop: p.stop.preStop },
        // The steps' end (the notice's deadline less the measured margin of its end), on
        // the monotonic clock: the project's wall deadline is for the project to read.
        ctx.deadlineMono,
        {
          clock: notice.clock,
          killMs: notice.killMs,
          onKilled: (ms) => notice.margin.record('kill', ms),
          adapter: this.adapter,
          spawnHook: (g, argv) => this.registry.spawnHook(name, g, argv),
          waitDone: (signal) => this.board.waitDone(name, pn.notice.id, signal),
          // Its turn: every lower-ranked project has had its stop signal (or is done).
          turn: async () => {
            if (turns) await turns.wait(name, ctx.signal);
            ctx.progress({ phase: 'stopping', action: 'stopped', ms: 0 });
          },
          onSignalled: () => turns?.release(name),
          readPids: () => this.usage.pidsNow(group),
          sendSignal: this.sendSignal,
          log: ctx.log,
        },
      );
      // The group is empty now; what the project started and is still alive lives outside
      // it, beyond every limit: found, killed, and the stop reported `escaped`
      // (docs/reliability.md, "Processes that leave their project").
      const escaped = await this.registry.killEscaped(name, ctx.log);
      if (escaped.length > 0) {
        r.exit = 'escaped';
        r.escaped = escaped.map((e) => e.pid);
        r.reason = `${r.reason}; ${escaped.length} of its processes had left its cgroup (pids ${r.escaped.join(', ')}, outside in ${[...new Set(escaped.flatMap((e) => e.hierarchies))].join(', ')}): killed`;
      }
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
      turns?.release(name);
      this.registry.setTransient(name, undefined);
    }
  }

  /** memory.high and CPU first; memory.max once usage is below the target. */
  private async shrink(
    d: Decision,
    pn: ProjectNotice,
    ctx: ChildContext,
    notice: CarryOutContext,
  ): Promise<{ ok: true } | { ok: false; usage: number }> {
    const clock = notice.clock;
    const name = d.project;
    const group = this.registry.group(name);
    const target = d.memoryTarget;
    const first: ProjectLimits = { ...d.after, memoryMax: d.before.memoryMax };
    // Kernel only, memory.max left as it is: the record is written once, with the final
    // limits, and memory.max alone after usage came down (docs/performance.md).
    await this.registry.writeLimits(name, first, 'but-memory-max');
    // memory.high and CPU are set, memory.max not yet: the half-limited state
    // (test/faults/).
    faultPoint('mid-shrink');
    // The wait for usage to come down leaves room for the stop's kill if it does not.
    const until = Math.min(clock.monotonic() + pn.gracePeriodMs, ctx.deadlineMono - notice.killMs);
    let current = await this.usage.memoryNow(group);
    // Polled soon, then less often (2, 4, … 100 ms): usage that comes down at once (most
    // of the time) is seen at once, not a fixed 100 ms later; the read is cheap.
    let pause = 2;
    while (current > target && clock.monotonic() < until && !ctx.signal.aborted) {
      await clock.sleep(Math.min(pause, Math.max(1, until - clock.monotonic())), ctx.signal);
      pause = Math.min(100, pause * 2);
      current = await this.usage.memoryNow(group);
    }
    if (current > target) return { ok: false, usage: current };
    await this.registry.applyMemoryMax(name, d.after);
    return { ok: true };
  }
}

/** Plan decisions → broker steps (see the file comment for the grouping). */
export function toSteps(
  decisions: Decision[],
  notice: Notice,
  graceOf: (name: string) => number,
  /** Time left for the graces (monotonic: the steps' end less the kill), capping each. */
  deadlineLeft: number,
): BrokerStep<ProjectNotice>[] {
  // Steps of one class run as one broker group. Stops and shrinks are one class: each
  // takes only from its own project, the plan already made them fit together, and the
  // stop signals keep their rank order through SignalTurns; run one after the other they
  // cost the sum of both phases (~15 ms of a 1×10 cascade's ~60 in the guest).
  const classOf = (action: string): string | undefined =>
    action === 'stopped' || action === 'shrunk' ? 'take' : action === 'grown' ? 'grown' : undefined;
  const firstOf = (cls: string): number =>
    Math.min(...decisions.filter((d) => classOf(d.action) === cls).map((d) => d.order));
  const steps: BrokerStep<ProjectNotice>[] = [];
  for (const d of decisions) {
    if (d.action === 'unchanged') continue;
    const cls = classOf(d.action);
    const order = cls ? firstOf(cls) : d.order;
    steps.push({
      child: d.project,
      order,
      notice: {
        notice,
        project: d.project,
        action: d.action,
        limits: d.action === 'stopped' ? STOPPED_LIMITS : d.after,
        gracePeriodMs: Math.min(graceOf(d.project), Math.floor(deadlineLeft)),
        deadline: notice.deadline,
        reason: d.reason,
      },
    });
  }
  return steps;
}

/**
 * The order of stop signals within the stops group: `wait(name)` resolves once the
 * project before it in rank order has been signalled (`release`d) — which it was only
 * after the one before it, and so on. A stop that ends without signalling (nothing ran,
 * a failure) releases its turn too. An abort (the deadline) ends every wait.
 */
export class SignalTurns {
  private readonly gates = new Map<string, { done: Promise<void>; open: () => void }>();

  constructor(private readonly order: readonly string[]) {
    for (const name of order) {
      let open!: () => void;
      const done = new Promise<void>((r) => (open = r));
      this.gates.set(name, { done, open });
    }
  }

  wait(name: string, signal?: AbortSignal): Promise<void> {
    const i = this.order.indexOf(name);
    if (i <= 0) return Promise.resolve();
    const before = this.gates.get(this.order[i - 1])!.done;
    if (!signal) return before;
    if (signal.aborted) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const onAbort = (): void => resolve();
      signal.addEventListener('abort', onAbort, { once: true });
      void before.then(() => {
        signal.removeEventListener('abort', onAbort);
        resolve();
      });
    });
  }

  release(name: string): void {
    this.gates.get(name)?.open();
  }
}
