/**
 * The guest agent: the client of the host broker and the broker of this guest's projects
 * (docs/architecture.md, "Two roles at every level"). This file only wires the parts
 * together:
 *
 *   config ─► cgroup adapter ─► project registry (groups, limits, start / re-adopt)
 *                 │                   │
 *   upstream channel ─► Client ─► NoticeBook (journal, exactly once) ─► GuestBroker
 *   operator socket  ─► operator API ───┘                     (plan → runBroker → outcome)
 *
 * Start order matters: projects are re-adopted before any notice is resumed, and the
 * notice book is loaded before the upstream channel says hello (its lastSeq).
 */
import * as os from 'node:os';
import * as path from 'node:path';
import { promises as fsp } from 'node:fs';
import { openCgroupAdapter, removeCreated } from '../../cgroup-adapter';
import { processRows } from '../../cgroup-adapter/host-usage';
import type { CgroupAdapter } from '../../cgroup-adapter/types';
import { isNestError } from '../common/errors';
import { lookupGroup } from '../common/nss';
import { Journal } from '../common/journal';
import { StateLock } from '../common/state-lock';
import type { Logger } from '../common/log';
import { RpcServer } from '../common/rpc';
import type { MetricsServer } from '../common/metrics';
import type { Resources } from '../broker/types';
import type { Hello, PlanResult } from '../protocol/messages';
import { planResultBody } from './plan-view';
import { underSysroot } from './guest-facts';
import { NoticeBook } from '../client/notices';
import { minimumsAbove, type GuestConfig } from './config';
import { GuestBroker, type AllocationBook } from './executor';
import { registerOperatorApi } from './operator';
import type { OperatorTarget, TopRow, TopView } from './operator-target';
import { ProjectNoticeBoard } from './project-notices';
import { ProjectRegistry } from './projects';
import { Supervisor } from './supervisor';
import { UsageSampler } from './usage';
import { openUpstream, type Upstream } from './upstream';
import {
  DEFAULT_PREREQUISITE_PATHS,
  missingPrerequisites,
  type PrerequisitePaths,
} from './prerequisites';

export interface GuestAgentOptions {
  log: Logger;
  /** A ready adapter (tests); opened from cfg.cgroup otherwise. */
  adapter?: CgroupAdapter;
  /** Where the prerequisites for real removal are read (tests: fake files). */
  prerequisites?: PrerequisitePaths;
}

class JournaledAllocation implements AllocationBook {
  private value: Resources;
  constructor(
    private readonly journal: Journal<Resources>,
    initial: Resources,
  ) {
    this.value = initial;
  }
  current(): Resources {
    return this.value;
  }
  async set(r: Resources): Promise<void> {
    await this.journal.put('allocation', r);
    this.value = { ...r };
  }
}

export class GuestAgent implements OperatorTarget {
  readonly startedAt = new Date();
  private upstream: Upstream | null = null;
  private metrics: MetricsServer | null = null;
  private lock: StateLock | null = null;
  /** Set by the daemon (agent/guest/main.ts): re-reads its config file (`nestctl --guest reload`). */
  reload?: (trigger: string) => Promise<unknown>;

  private constructor(
    /** Replaced by a reload (agent/guest/reload.ts); read it anew, never keep it. */
    public cfg: GuestConfig,
    readonly adapter: CgroupAdapter,
    readonly registry: ProjectRegistry,
    readonly board: ProjectNoticeBoard,
    readonly usage: UsageSampler,
    readonly allocation: JournaledAllocation,
    readonly broker: GuestBroker,
    readonly book: NoticeBook,
    readonly rpc: RpcServer,
    readonly supervisor: Supervisor,
    private readonly log: Logger,
  ) {}

  /**
   * Starts the agent, or undoes every step already taken and rethrows: a start refused
   * half-way leaves no cgroup root, state or run directory, socket or lock it made
   * (docs/reliability.md, "nothing half-made").
   */
  static async start(cfg: GuestConfig, opts: GuestAgentOptions): Promise<GuestAgent> {
    const log = opts.log.child({ guest: cfg.guest });
    const undo: (() => Promise<unknown>)[] = [];
    try {
      return await GuestAgent.startSteps(cfg, opts, log, undo);
    } catch (err) {
      for (const step of undo.reverse())
        await step().catch((e: unknown) =>
          log.warn({ err: e }, 'undoing a failed start: a step could not be undone'),
        );
      throw err;
    }
  }

  /** start()'s steps; each pushes its undo onto `undo` once it is done. */
  private static async startSteps(
    cfg: GuestConfig,
    opts: GuestAgentOptions,
    log: Logger,
    undo: (() => Promise<unknown>)[],
  ): Promise<GuestAgent> {
    for (const w of cfg.warnings) log.warn({ field: w.field, value: w.value }, w.message);
    // docs/guest-agent.md, "Prerequisites for real removal": one line each that is missing.
    for (const m of missingPrerequisites(
      opts.prerequisites ?? underSysroot(DEFAULT_PREREQUISITE_PATHS),
    ))
      log.warn({ prerequisite: m.name }, `prerequisite missing: ${m.message}`);
    // mkdir -p returns the first directory it made: everything under it is this start's.
    const madeState = await fsp.mkdir(cfg.stateDir, { recursive: true, mode: 0o700 });
    if (madeState) undo.push(() => fsp.rm(madeState, { recursive: true, force: true }));
    // One agent per state directory, before anything else is touched (agent/common/state-lock.ts).
    const lock = await StateLock.acquire(cfg.stateDir, 'nestbroker guest');
    undo.push(() => lock.release());
    const madeRun = await fsp.mkdir(cfg.runDir, { recursive: true, mode: 0o755 });
    if (madeRun) undo.push(() => fsp.rm(madeRun, { recursive: true, force: true }));

    let adapter: CgroupAdapter;
    if (opts.adapter) adapter = opts.adapter;
    else {
      const driver = await openCgroupAdapter({
        root: cfg.cgroup.root === 'self' ? { self: true, leaf: 'agent' } : cfg.cgroup.root,
        driver: cfg.cgroup.driver,
        create: cfg.cgroup.root !== 'self',
        log: log.child({ part: 'cgroup' }),
      });
      adapter = driver;
      undo.push(() => removeCreated(driver.createdDirs, 2000, log));
    }

    const agentJournal = new Journal<Resources>(path.join(cfg.stateDir, 'agent'));
    await agentJournal.init();
    const initial = (await agentJournal.get('allocation')) ??
      cfg.resources ?? { memoryBytes: os.totalmem(), cpus: os.cpus().length };
    for (const w of minimumsAbove(cfg, initial))
      log.warn({ field: w.field, value: w.value }, w.message);
    const allocation = new JournaledAllocation(agentJournal, initial);

    const board = new ProjectNoticeBoard(
      cfg.runDir,
      cfg.projectSocket,
      log.child({ part: 'project-socket' }),
    );
    const registry = new ProjectRegistry(cfg, adapter, board, log.child({ part: 'projects' }));
    // Through the agent (set below): a reload replaces agent.cfg and its projects.
    let current = (): GuestConfig => cfg;
    const usage = new UsageSampler(
      adapter,
      () => current().projects.map((p) => ({ name: p.name, group: registry.group(p.name) })),
      cfg.usageIntervalMs,
      log.child({ part: 'usage' }),
    );
    registry.fastPids = (group) => usage.pidsNow(group);
    const broker = new GuestBroker(
      cfg,
      registry,
      board,
      adapter,
      usage,
      allocation,
      log.child({ part: 'broker' }),
    );
    const book = new NoticeBook(cfg.stateDir, broker, log.child({ part: 'notices' }), {
      maxPending: cfg.limits.pendingNotices,
    });
    const rpc = new RpcServer(log.child({ part: 'operator' }));
    const supervisor = new Supervisor(cfg, registry, adapter, log.child({ part: 'supervisor' }));
    const agent = new GuestAgent(
      cfg,
      adapter,
      registry,
      board,
      usage,
      allocation,
      broker,
      book,
      rpc,
      supervisor,
      log,
    );
    current = () => agent.cfg;

    // The operator socket first: a second agent on the same config fails here, before it
    // has started or adopted anything. Commands wait until the projects are up.
    let ready!: () => void;
    const isReady = new Promise<void>((resolve) => (ready = resolve));
    agent.lock = lock;
    registerOperatorApi(rpc, agent, isReady);
    await rpc.listen(cfg.socket, { mode: 0o660, group: await groupId(cfg.socketGroup) });
    undo.push(() => rpc.close());
    // Bound early too: a port in use fails the start before anything is adopted.
    // prom-client and the metrics code are loaded only when metrics are on: ~12 MiB of an
    // idle agent's RSS otherwise (docs/performance.md, "Footprint: what each step saved").
    if (cfg.metrics) {
      const { MetricsServer } = await import('../common/metrics');
      const { guestMetrics } = await import('./metrics');
      agent.metrics = await MetricsServer.listen(
        guestMetrics({
          get cfg() {
            return agent.cfg;
          },
          book,
          registry,
          usage,
          supervisor,
          allocation: () => allocation.current(),
        }),
        cfg.metrics,
        log.child({ part: 'metrics' }),
      );
    }
    undo.push(async () => agent.metrics?.close());
    await board.listen();
    undo.push(() => board.close());
    await book.init();
    await registry.init();
    ready();
    usage.start();
    await supervisor.start(usage);
    undo.push(async () => {
      usage.stop();
      supervisor.stop();
      book.close();
    });
    for (const p of book.resume())
      p.catch((err: unknown) => {
        if (!isNestError(err, 'AGENT_STOPPING'))
          log.error({ err }, 'a resumed notice ended without an outcome');
      });
    agent.upstream = await openUpstream(
      cfg,
      book,
      () => agent.inventory(),
      log.child({ part: 'upstream' }),
      (req) => agent.planFor(req.allocation),
    );
    log.info(
      {
        socket: cfg.socket,
        projects: cfg.projects.length,
        allocation: initial,
        upstream: cfg.upstream.transport,
      },
      'guest agent ready',
    );
    return agent;
  }

  async stop(): Promise<void> {
    this.usage.stop();
    this.supervisor.stop();
    this.book.close();
    // Outcomes complete before the stop are journaled and sent upstream before the channel
    // closes; notices still running are left to the next start (NoticeBook.close).
    await this.book.drain();
    await this.upstream?.close();
    await this.metrics?.close();
    await this.rpc.close();
    await this.board.close();
    await this.lock?.release();
  }

  /** The host's dry run (`plan` over the channel): this guest's plan at `allocation`. */
  async planFor(allocation: Resources): Promise<Omit<PlanResult, 'type' | 'id' | 'replyTo'>> {
    const plan = await this.broker.planFor(allocation);
    const prio = new Map(this.cfg.projects.map((p) => [p.name, p.priority]));
    return planResultBody(plan, allocation, (name) => prio.get(name) ?? 0);
  }

  async inventory(): Promise<Hello['inventory']> {
    const a = this.allocation.current();
    const projects: Hello['inventory']['projects'] = [];
    for (const p of this.cfg.projects)
      projects.push({
        name: p.name,
        priority: p.priority,
        state: await this.registry.stateOf(p.name),
      });
    return { cpus: a.cpus, memoryBytes: a.memoryBytes, projects };
  }

  status(): object {
    const all = this.book.list();
    return {
      guest: this.cfg.guest,
      pid: process.pid,
      startedAt: this.startedAt.toISOString(),
      allocation: this.allocation.current(),
      reserve: this.cfg.reserve,
      projectAllocation: this.broker.net(this.allocation.current()),
      cgroup: { driver: this.adapter.kind, root: this.adapter.root },
      upstream: {
        transport: this.cfg.upstream.transport,
        connected: this.upstream?.connected() ?? false,
      },
      projects: this.cfg.projects.length,
      metrics: this.metrics ? this.metrics.address : null,
      // What a notice's end takes here, measured (agent/common/end-margin.ts).
      endMargin: this.book.margin.snapshot(),
      notices: {
        total: all.length,
        running: all.filter((r) => r.state === 'running' || r.state === 'accepted').length,
        lastSeq: this.book.lastSeq,
      },
    };
  }

  /**
   * `nestctl --guest top`: every project's usage as the kernel shows it now (the adapter's
   * full read: memory in use and its peak, OOM kills, pressure, throttling, processes),
   * with CPUs in use from the sampler. Read on demand, never on the sampler's tick (usage.ts).
   * With `processes`, each project's processes too (pidusage: CPU share since the previous
   * `top`, RSS; cgroup-adapter/host-usage.ts).
   */
  async top(opts: { processes?: boolean } = {}): Promise<TopView> {
    const usage = await this.usage.fresh();
    const projects: TopRow[] = [];
    for (const p of this.cfg.projects) {
      const group = this.registry.group(p.name);
      const u = await this.adapter.usage(group).catch(() => null);
      // Processes (cgroup.procs), as `projects` counts them; the kernel's pids.current
      // counts tasks, and a Node project has a dozen threads.
      const pids = await this.registry.pids(p.name).catch(() => []);
      projects.push({
        name: p.name,
        priority: p.priority,
        state: this.registry.stateFrom(p.name, pids),
        limits: this.registry.limits(p.name),
        memoryBytes: u?.memoryCurrent ?? null,
        memoryPeakBytes: u?.memoryPeak ?? null,
        oomKills: u?.memoryEvents.oomKill ?? null,
        memoryPressure10: u?.memoryPressure?.some.avg10 ?? null,
        cpuPressure10: u?.cpuPressure?.some.avg10 ?? null,
        cpus: usage[p.name]?.cpus ?? null,
        throttledUs: u?.cpuThrottledUs ?? null,
        pids: u ? pids.length : null,
        ...(opts.processes ? { processes: await processRows(pids) } : {}),
      });
    }
    return {
      guest: this.cfg.guest,
      at: new Date().toISOString(),
      allocation: this.allocation.current(),
      projectAllocation: this.broker.net(this.allocation.current()),
      projects,
    };
  }

  async projectRows(): Promise<object[]> {
    const usage = await this.usage.fresh();
    const rows: object[] = [];
    for (const p of this.cfg.projects) {
      const group = this.registry.group(p.name);
      const kernel = await this.adapter.readLimits(group).catch(() => null);
      const pids = await this.registry.pids(p.name).catch(() => []);
      rows.push({
        name: p.name,
        priority: p.priority,
        state: this.registry.stateFrom(p.name, pids),
        stoppedForRoom: this.registry.stoppedForRoom(p.name),
        stoppedByOperator: this.registry.stoppedByOperator(p.name),
        restart: p.restart.policy,
        group,
        limits: this.registry.limits(p.name),
        kernel,
        usage: usage[p.name] ?? null,
        // Processes (cgroup.procs), not tasks: a Node project has a dozen threads.
        pids: pids.length,
      });
    }
    return rows;
  }
}

/** The operator socket's group → gid, through NSS (agent/common/nss.ts). */
async function groupId(g: string | number): Promise<number> {
  if (typeof g === 'number') return g;
  return lookupGroup(g, 'socketGroup').gid;
}
