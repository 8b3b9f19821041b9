/**
 * Supervision of the projects (docs/guest-agent.md, "Supervision: restart and operator
 * stop"): a project whose processes all end on their own, neither stopped by a notice nor
 * by an operator, is a warning log line and a count in `nestbroker_guest_project_exits_total`,
 * and then follows its restart policy, as systemd.service(5) `Restart=` does:
 *
 *   no          stays down
 *   on-failure  started again after a non-zero exit or a signal other than SIGHUP, SIGINT,
 *               SIGTERM, SIGPIPE (systemd's "clean" signals); an end the agent did not
 *               see (a re-adopted project is not its child) counts as a failure
 *   always      started again after any end
 *
 * after `delay`, doubled for each restart in a row up to `maxDelay` (RestartSec=,
 * RestartMaxDelaySec=), and given up (`failed`, an error line) once more than `burst`
 * starts fell within `interval` (StartLimitBurst=, StartLimitIntervalSec=).
 *
 * "Ended" is the group emptied, never a pid that stopped answering (CONTRIBUTING.md: liveness
 * is cgroup membership): our own child's exit is a hint to look at once (and gives the exit
 * status), every `usageInterval` tick looks at all: the usage sampler's tick (usage.ts), so
 * the guest has one clock for it, and a round that is still looking when the next tick
 * comes lets that tick go. The operator's `stop` and `start`
 * live here too: a stop is recorded (stoppedByOperator, in the state dir) before it acts.
 */
import { EventEmitter } from 'node:events';
import type { CgroupAdapter } from '../../cgroup-adapter/types';
import { systemClock } from '../common/clock';
import { NestError } from '../common/errors';
import type { Logger } from '../common/log';
import type { ExitKind } from '../broker/types';
import type { GuestConfig, RestartConfig } from './config';
import type { ProjectRegistry } from './projects';
import { stopProject } from './stopper';
import type { SampleTicks } from './usage';

/** systemd's clean exit signals (systemd.service(5), SuccessExitStatus=). */
const CLEAN_SIGNALS = new Set(['SIGHUP', 'SIGINT', 'SIGTERM', 'SIGPIPE']);
/** An operator stop ends this long after the grace period and the hook at the latest. */
const OPERATOR_STOP_SLACK_MS = 10_000;

export interface ExitStatus {
  code: number | null;
  signal: string | null;
}

/** What one end on its own was, and what the policy made of it. */
export interface ProjectEnd {
  project: string;
  /** null: the agent did not see the exit (not its child). */
  status: ExitStatus | null;
  failure: boolean;
  action: 'stays-down' | 'restart' | 'gave-up';
  delayMs?: number;
  escaped: number[];
}

export interface OperatorStopResult {
  project: string;
  exit: ExitKind;
  ms: number;
  reason: string;
  escaped?: number[];
}

/** Whether an exit counts as a failure for `on-failure` (systemd's rule). */
export function isFailure(s: ExitStatus | null): boolean {
  if (s === null) return true;
  if (s.signal !== null) return !CLEAN_SIGNALS.has(s.signal);
  return s.code !== 0;
}

/**
 * The pure part: given the policy, the end, the monotonic times of the starts within the
 * window and the restarts in a row, what to do.
 */
export function decideRestart(
  r: RestartConfig,
  failure: boolean,
  recentStarts: readonly number[],
  now: number,
  streak: number,
): { action: ProjectEnd['action']; delayMs?: number } {
  if (r.policy === 'no' || (r.policy === 'on-failure' && !failure)) return { action: 'stays-down' };
  const inWindow = recentStarts.filter((t) => now - t < r.intervalMs).length;
  if (inWindow >= r.burst) return { action: 'gave-up' };
  const delayMs = Math.min(r.maxDelayMs, r.delayMs * 2 ** Math.min(streak, 30));
  return { action: 'restart', delayMs };
}

interface Watch {
  /** Monotonic times of the starts (for the start limit). */
  starts: number[];
  /** When the current run started (monotonic). */
  runningSince?: number;
  /** Automatic restarts in a row (the backoff's exponent). */
  streak: number;
  lastExit?: ExitStatus;
  /** Set once an end was handled, until the next start: nothing to report twice. */
  down?: 'stays-down' | 'restart-pending' | 'gave-up';
  timer?: NodeJS.Timeout;
}

export class Supervisor extends EventEmitter {
  private readonly watches = new Map<string, Watch>();
  private ticks: SampleTicks | null = null;
  private readonly onTick = (): void => this.round();
  private inRound = false;
  private rounds = 0;
  private readonly checking = new Set<string>();

  constructor(
    private cfg: GuestConfig,
    private readonly registry: ProjectRegistry,
    private readonly adapter: CgroupAdapter,
    private readonly log: Logger,
    private readonly now: () => number = () => systemClock.monotonic(),
  ) {
    super();
    for (const p of cfg.projects) this.watches.set(p.name, { starts: [], streak: 0 });
    registry.hooks = {
      started: (name) => this.started(name),
      exited: (name, code, signal) => {
        const w = this.watches.get(name);
        if (w) w.lastExit = { code, signal };
        void this.check(name);
      },
    };
  }

  /**
   * Starts the periodic look, on each of the sampler's ticks (every usageInterval).
   * Projects running already (re-adopted after an agent restart, adopted, started by init)
   * are supervised from now.
   */
  async start(ticks: SampleTicks): Promise<void> {
    for (const p of this.cfg.projects) {
      const w = this.watches.get(p.name)!;
      const pids = await this.registry.pids(p.name).catch(() => []);
      if (pids.length > 0) w.runningSince ??= this.now();
    }
    this.ticks = ticks;
    ticks.on('tick', this.onTick);
  }

  /**
   * One look at every project; a tick that comes while one is still looking is let go.
   * Each round ends with its debug line and a `round` event (its number).
   */
  private round(): void {
    if (this.inRound) return;
    this.inRound = true;
    void Promise.all(this.cfg.projects.map((p) => this.check(p.name))).finally(() => {
      this.inRound = false;
      this.log.debug({ tick: ++this.rounds }, 'supervision: every project looked at');
      this.emit('round', this.rounds);
    });
  }

  /**
   * The config a reload put in force (agent/guest/reload.ts): a project it added is
   * watched from now (before it is started, so its start is seen), one it removed is
   * forgotten, its pending restart cancelled.
   */
  setConfig(cfg: GuestConfig): void {
    this.cfg = cfg;
    const names = new Set(cfg.projects.map((p) => p.name));
    for (const [name, w] of this.watches)
      if (!names.has(name)) {
        if (w.timer) clearTimeout(w.timer);
        this.watches.delete(name);
      }
    for (const name of names)
      if (!this.watches.has(name)) this.watches.set(name, { starts: [], streak: 0 });
  }

  stop(): void {
    this.ticks?.off('tick', this.onTick);
    this.ticks = null;
    for (const w of this.watches.values()) if (w.timer) clearTimeout(w.timer);
  }

  /** `failed` while given up; undefined otherwise (the registry's state applies). */
  stateOf(name: string): 'failed' | undefined {
    return this.watches.get(name)?.down === 'gave-up' ? 'failed' : undefined;
  }

  private started(name: string): void {
    const w = this.watches.get(name);
    if (!w) return;
    const now = this.now();
    w.starts = [...w.starts.filter((t) => now - t < this.intervalOf(name)), now];
    w.runningSince = now;
    w.lastExit = undefined;
    w.down = undefined;
    if (w.timer) clearTimeout(w.timer);
    w.timer = undefined;
    if (this.registry.transientState(name) === 'failed')
      this.registry.setTransient(name, undefined);
  }

  private intervalOf(name: string): number {
    return this.registry.config(name).restart.intervalMs;
  }

  /** Should this project be running now, as far as supervision goes? */
  private supervised(name: string): boolean {
    const w = this.watches.get(name);
    return (
      w !== undefined &&
      w.down === undefined &&
      w.runningSince !== undefined &&
      this.registry.transientState(name) === undefined &&
      !this.registry.stoppedForRoom(name) &&
      !this.registry.stoppedByOperator(name)
    );
  }

  /** Looks at one project: if its group emptied on its own, handles the end once. */
  async check(name: string): Promise<void> {
    if (!this.supervised(name) || this.checking.has(name)) return;
    this.checking.add(name);
    try {
      const pids = await this.registry.pids(name).catch(() => null);
      // Re-read: a notice or an operator may have begun a stop while we read.
      if (pids === null || pids.length > 0 || !this.supervised(name)) return;
      await this.ended(name);
    } finally {
      this.checking.delete(name);
    }
  }

  private async ended(name: string): Promise<void> {
    const w = this.watches.get(name)!;
    const p = this.registry.config(name);
    const now = this.now();
    const status = w.lastExit ?? null;
    const failure = isFailure(status);
    // Ran long enough: the next restart is not "in a row" (the backoff starts again).
    if (w.runningSince !== undefined && now - w.runningSince >= p.restart.intervalMs) w.streak = 0;
    // A project that moved everything out of its group looks ended: those are killed too.
    const escaped = (await this.registry.killEscaped(name, this.log)).map((e) => e.pid);
    const d = p.command
      ? decideRestart(p.restart, failure, w.starts, now, w.streak)
      : { action: 'stays-down' as const };
    const end: ProjectEnd = { project: name, status, failure, action: d.action, escaped };
    if (d.delayMs !== undefined) end.delayMs = d.delayMs;
    const fields = {
      project: name,
      code: status?.code ?? null,
      signal: status?.signal ?? null,
      failure,
      restart: p.restart.policy,
      action: d.action,
      ...(d.delayMs !== undefined ? { delayMs: d.delayMs } : {}),
      ...(escaped.length > 0 ? { escaped } : {}),
    };
    this.emit('ended', end);
    if (d.action === 'gave-up') {
      w.down = 'gave-up';
      this.registry.setTransient(name, 'failed');
      this.log.error(
        fields,
        `project ended on its own, and was started ${p.restart.burst} times within ${p.restart.intervalMs} ms: gave up (failed until nestctl --guest start)`,
      );
      return;
    }
    if (d.action === 'stays-down') {
      w.down = 'stays-down';
      this.log.warn(fields, 'project ended on its own; stays down (its restart policy)');
      return;
    }
    w.down = 'restart-pending';
    w.streak++;
    this.log.warn(fields, `project ended on its own; restarting in ${d.delayMs} ms`);
    w.timer = setTimeout(() => void this.restart(name), d.delayMs).unref();
  }

  private async restart(name: string): Promise<void> {
    const w = this.watches.get(name)!;
    w.timer = undefined;
    // An operator stop or a notice in the meantime wins.
    if (
      w.down !== 'restart-pending' ||
      this.registry.stoppedByOperator(name) ||
      this.registry.stoppedForRoom(name) ||
      this.registry.transientState(name) !== undefined
    )
      return;
    try {
      if ((await this.registry.pids(name)).length === 0) await this.registry.start(name);
      this.emit('restarted', name);
    } catch (err) {
      w.down = 'gave-up';
      this.registry.setTransient(name, 'failed');
      this.log.error({ project: name, err }, 'project could not be started again: failed');
    }
  }

  /**
   * `nestctl --guest stop PROJECT`: recorded first (it stays stopped across agent
   * restarts, restores and its restart policy), then the project's own graceful stop
   * (pre-stop hook, stop signal, grace, kill), then the escape check.
   */
  async operatorStop(name: string): Promise<OperatorStopResult> {
    const p = this.registry.config(name);
    this.refuseBusy(name, 'stop');
    const w = this.watches.get(name)!;
    if (w.timer) clearTimeout(w.timer);
    w.timer = undefined;
    await this.registry.setRecord(name, { stoppedByOperator: true, stoppedForRoom: false });
    w.down = undefined;
    if (this.registry.transientState(name) === 'failed')
      this.registry.setTransient(name, undefined);
    const log = this.log.child({ project: name });
    log.info('stopped by an operator: recorded; stopping');
    this.registry.setTransient(name, 'stopping');
    try {
      const hookMs = p.stop.preStop?.timeoutMs ?? 0;
      // On the monotonic clock, as stopProject takes it (docs/reliability.md, "Time").
      const deadline =
        systemClock.monotonic() + hookMs + p.stop.gracePeriodMs + OPERATOR_STOP_SLACK_MS;
      const r = await stopProject(
        this.registry.group(name),
        { signal: p.stop.signal, gracePeriodMs: p.stop.gracePeriodMs, preStop: p.stop.preStop },
        deadline,
        {
          adapter: this.adapter,
          spawnHook: (g, argv) => this.registry.spawnHook(name, g, argv),
          // No notice to answer `done` to: the grace runs until the group empties.
          waitDone: (signal) =>
            new Promise<boolean>((resolve) =>
              signal.addEventListener('abort', () => resolve(false), { once: true }),
            ),
          log,
        },
      );
      const escaped = await this.registry.killEscaped(name, log);
      const out: OperatorStopResult = { project: name, exit: r.exit, ms: r.ms, reason: r.reason };
      if (escaped.length > 0) {
        out.exit = 'escaped';
        out.escaped = escaped.map((e) => e.pid);
        out.reason = `${r.reason}; ${escaped.length} of its processes had left its cgroup (pids ${out.escaped.join(', ')}): killed`;
      }
      log.info({ exit: out.exit, ms: out.ms, escaped: out.escaped }, 'stopped by an operator');
      return out;
    } finally {
      this.registry.setTransient(name, undefined);
    }
  }

  /**
   * `nestctl --guest start PROJECT`: clears an operator stop and a given-up restart (the
   * start limit starts again, as systemctl start after a failure) and starts the project.
   */
  async operatorStart(name: string): Promise<{ project: string; started: boolean; state: string }> {
    const p = this.registry.config(name);
    if (!p.command)
      throw new NestError(
        'PROJECT_STATE',
        `project ${name} is adopted, not started by the agent: nothing to start`,
        { problems: [{ field: 'project', value: name, message: 'is adopted' }] },
      );
    this.refuseBusy(name, 'start');
    if (this.registry.stoppedForRoom(name))
      throw new NestError(
        'PROJECT_STATE',
        `project ${name} was stopped for lack of room: the next restore starts it (or a reclaim's room was never given back)`,
        { problems: [{ field: 'project', value: name, message: 'stopped for lack of room' }] },
      );
    const w = this.watches.get(name)!;
    if (w.timer) clearTimeout(w.timer);
    w.timer = undefined;
    w.starts = [];
    w.streak = 0;
    w.down = undefined;
    if (this.registry.transientState(name) === 'failed')
      this.registry.setTransient(name, undefined);
    await this.registry.setRecord(name, { stoppedByOperator: false });
    if ((await this.registry.pids(name)).length > 0) {
      this.log.info({ project: name }, 'started by an operator: it was running');
      return { project: name, started: false, state: 'running' };
    }
    await this.registry.start(name);
    this.log.info({ project: name }, 'started by an operator');
    return { project: name, started: true, state: 'running' };
  }

  private refuseBusy(name: string, what: string): void {
    const t = this.registry.transientState(name);
    if (t !== undefined && t !== 'failed')
      throw new NestError(
        'PROJECT_STATE',
        `project ${name} is ${t} (a notice or another command acts on it): ${what} refused, nothing done`,
        { problems: [{ field: 'project', value: name, message: `is ${t}` }] },
      );
  }
}
