/**
 * Recording fakes of what the guest's stopper and executor act on (their narrow
 * interfaces: agent/guest/stopper.ts StopCgroup and SendSignal, agent/guest/executor.ts
 * ExecutorRegistry, ExecutorBoard, ExecutorUsage). Each fake writes what it was asked to
 * do, in order, into one shared `events` list, and moves the test's clock by the time the
 * real act would take, so a test reads as the sequence of acts and the durations reported.
 * The real ones are tested on the kernel (test/integration/guest/).
 */
import { EventEmitter } from 'node:events';
import type { ChildProcess } from 'node:child_process';
import type { KillResult } from '../../cgroup-adapter/types';
import type { Clock } from '../../agent/common/clock';
import type { SendSignal, StopCgroup } from '../../agent/guest/stopper';
import type {
  AllocationBook,
  ExecutorBoard,
  ExecutorRegistry,
  ExecutorUsage,
} from '../../agent/guest/executor';
import type { GuestConfig } from '../../agent/guest/config';
import type { ProjectRecord, ProjectState } from '../../agent/guest/projects';
import type { StepJournal, StepJournalRecord } from '../../agent/broker/broker';
import type { ProjectLimits, Resources } from '../../agent/broker/types';

/**
 * A Clock (agent/common/clock.ts) on virtual time: nothing waits on a real timer. A sleep
 * resolves when the test's time reaches it; `run` carries a promise to its end, moving time
 * to the next sleeper whenever nothing else is left to run, so timers fire in their order
 * and at their instant, however loaded the machine. Every sleep asked for is recorded.
 */
export class TestClock implements Clock {
  readonly sleeps: number[] = [];
  private sleepers: { at: number; wake: () => void }[] = [];

  constructor(
    public t = 1_000_000,
    private readonly wallOffset = Date.parse('2026-01-01T00:00:00Z') - 1_000_000,
  ) {}

  monotonic = (): number => this.t;
  now = (): number => this.t + this.wallOffset;

  sleep = (ms: number, signal?: AbortSignal): Promise<void> => {
    this.sleeps.push(ms);
    return new Promise((resolve) => {
      if (signal?.aborted) return resolve();
      const entry = { at: this.t + Math.max(0, ms), wake: resolve };
      this.sleepers.push(entry);
      signal?.addEventListener(
        'abort',
        () => {
          this.sleepers = this.sleepers.filter((x) => x !== entry);
          resolve();
        },
        { once: true },
      );
    });
  };

  /** Moves time on by `ms`, waking every sleeper due by then, in order. */
  advance(ms: number): void {
    const until = this.t + ms;
    for (;;) {
      const next = this.sleepers.filter((x) => x.at <= until).sort((a, b) => a.at - b.at)[0];
      if (!next) break;
      this.t = Math.max(this.t, next.at);
      this.sleepers = this.sleepers.filter((x) => x !== next);
      next.wake();
    }
    this.t = until;
  }

  /** Runs `p` to its end on virtual time (see the class comment). */
  async run<T>(p: Promise<T>): Promise<T> {
    let settled = false;
    void p.then(
      () => (settled = true),
      () => (settled = true),
    );
    for (;;) {
      // Let everything that can run without time passing run (promises, fake I/O).
      for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
      if (settled) return p;
      const next = this.sleepers.reduce((m, x) => Math.min(m, x.at), Infinity);
      if (next === Infinity) throw new Error('nothing left to run and nothing asleep: stuck');
      this.advance(next - this.t);
    }
  }
}

export interface GroupScript {
  /** What cgroup.procs lists, read after read; the last entry repeats. */
  pids: number[][];
  /** The group empties this long after the stop signal; undefined: never on its own. */
  exitsAfterMs?: number;
  /** cgroup.kill empties the group in this long. */
  killMs?: number;
  /**
   * The project answers `done` on its socket this long after the signal; its processes
   * stay until killed (the group does not empty on its own while it is waited for).
   */
  doneAfterMs?: number;
}

/** One project group's cgroup files as the stopper sees them. */
export class FakeGroup implements StopCgroup {
  private reads = 0;

  constructor(
    private readonly script: GroupScript,
    private readonly clock: TestClock,
    readonly events: string[],
  ) {}

  async pids(group: string): Promise<number[]> {
    const list = this.script.pids[Math.min(this.reads++, this.script.pids.length - 1)] ?? [];
    this.events.push(`pids ${group} → [${list.join(',')}]`);
    return list;
  }

  async waitEmpty(group: string, timeoutMs: number): Promise<void> {
    this.events.push(`waitEmpty ${group} ${timeoutMs}`);
    const done = this.script.doneAfterMs;
    if (done !== undefined && done <= timeoutMs) return new Promise<void>(() => undefined);
    const after = this.script.exitsAfterMs;
    if (after !== undefined && after <= timeoutMs) {
      await this.clock.sleep(after);
      return;
    }
    await this.clock.sleep(timeoutMs);
    throw Object.assign(new Error(`${group} still populated after ${timeoutMs} ms`), {
      code: 'TIMEOUT',
    });
  }

  /** The project socket's `done` for this notice (ExecutorBoard.waitDone, one project). */
  waitDone(signal: AbortSignal): Promise<boolean> {
    const done = this.script.doneAfterMs;
    if (done !== undefined)
      return this.clock.sleep(done).then(() => {
        this.events.push('done');
        return true;
      });
    return new Promise((resolve) => {
      if (signal.aborted) return resolve(false);
      signal.addEventListener('abort', () => resolve(false), { once: true });
    });
  }

  async kill(group: string): Promise<KillResult> {
    this.events.push(`kill ${group}`);
    const ms = this.script.killMs ?? 3;
    await this.clock.sleep(ms);
    return { method: 'cgroup.kill', ms };
  }
}

/** kill(2), recorded; a pid in `gone` has exited (ESRCH), one in `denied` is not ours. */
export function recordingSignals(
  events: string[],
  o: { gone?: number[]; denied?: number[] } = {},
): SendSignal {
  return (pid, signal) => {
    if (o.gone?.includes(pid))
      throw Object.assign(new Error('kill ESRCH'), { code: 'ESRCH', errno: -3 });
    if (o.denied?.includes(pid))
      throw Object.assign(new Error('kill EPERM'), { code: 'EPERM', errno: -1 });
    events.push(`signal ${pid} ${signal}`);
  };
}

/** A pre-stop hook process that exits with `code` once it is watched (next tick). */
export function fakeHook(events: string[], code: number): ChildProcess {
  const child = new EventEmitter() as ChildProcess;
  Object.assign(child, { exitCode: null, kill: () => true });
  setImmediate(() => {
    events.push(`hook exit ${code}`);
    Object.assign(child, { exitCode: code });
    child.emit('exit', code);
  });
  return child;
}

// ---------------------------------------------------------------------------------------
// The executor's parts (agent/guest/executor.ts ExecutorRegistry, ExecutorBoard,
// ExecutorUsage, AllocationBook)
// ---------------------------------------------------------------------------------------

/** One project as the fakes hold it: its processes, limits and usage script. */
export interface FakeProject {
  pids: number[];
  limits: ProjectLimits;
  stoppedForRoom?: boolean;
  /** memory.current, read after read (the last repeats); absent: 0. */
  memory?: number[];
  /** The group empties this long after the stop signal; undefined: only when killed. */
  exitsAfterMs?: number;
}

/**
 * The registry, the notice board, the usage sampler and the cgroup acts of the stopper,
 * over one table of projects. Every act is recorded in `events`, in order.
 */
export class FakeGuest {
  readonly events: string[] = [];
  readonly records = new Map<string, Partial<ProjectRecord>>();
  private readonly transient = new Map<string, ProjectState | undefined>();
  private readonly memReads = new Map<string, number>();
  allocationNow: Resources;

  constructor(
    readonly cfg: GuestConfig,
    readonly projects: Record<string, FakeProject>,
    readonly clock: TestClock,
    allocation: Resources,
  ) {
    this.allocationNow = allocation;
  }

  private nameOf(group: string): string {
    return group.slice('projects/'.length);
  }

  private p(name: string): FakeProject {
    const p = this.projects[name];
    if (!p) throw new Error(`no fake project ${name}`);
    return p;
  }

  readonly registry: ExecutorRegistry = {
    config: (name) => {
      const c = this.cfg.projects.find((x) => x.name === name);
      if (!c) throw new Error(`no project ${name} in the config`);
      return c;
    },
    group: (name) => `projects/${name}`,
    limits: (name) => this.p(name).limits,
    pids: async (name) => this.p(name).pids,
    transientState: (name) => this.transient.get(name),
    setTransient: (name, s) => void this.transient.set(name, s),
    stoppedForRoom: (name) => this.p(name).stoppedForRoom ?? false,
    stoppedByOperator: (name) => this.records.get(name)?.stoppedByOperator === true,
    // These fakes' processes never leave their group: nothing escapes (the real search is
    // tested on the kernel, test/integration/guest/escape.test.ts).
    killEscaped: async (name) => {
      this.events.push(`escape-check ${name}`);
      return [];
    },
    setRecord: async (name, patch) => {
      this.events.push(`record ${name} ${JSON.stringify(patch)}`);
      this.records.set(name, { ...this.records.get(name), ...patch });
    },
    writeLimits: async (name, limits, which = 'all') => {
      this.events.push(`write ${name} ${which} ${fmt(limits)}`);
      const p = this.p(name);
      p.limits = which === 'all' ? limits : { ...limits, memoryMax: p.limits.memoryMax };
    },
    applyMemoryMax: async (name, limits) => {
      this.events.push(`write ${name} memory.max ${limits.memoryMax}`);
      this.p(name).limits = { ...this.p(name).limits, memoryMax: limits.memoryMax };
    },
    applyLimits: async (name, limits) => {
      this.events.push(`write ${name} all ${fmt(limits)}`);
      this.p(name).limits = limits;
    },
    start: async (name) => {
      this.events.push(`start ${name}`);
      this.p(name).pids = [900];
    },
    spawnHook: async () => {
      throw new Error('no hook in these tests');
    },
  };

  readonly board: ExecutorBoard = {
    deliver: async (pn) => {
      this.events.push(`notify ${pn.project} ${pn.action}`);
    },
    waitDone: (_project, _id, signal) =>
      new Promise((resolve) => {
        if (signal.aborted) return resolve(false);
        signal.addEventListener('abort', () => resolve(false), { once: true });
      }),
  };

  readonly usage: ExecutorUsage = {
    onlineCpus: 4,
    recent: async () =>
      Object.fromEntries(
        Object.entries(this.projects)
          .filter(([, p]) => p.pids.length > 0)
          .map(([name, p]) => [name, { memoryBytes: p.memory?.[0] ?? 0, cpus: 0 }]),
      ) as Awaited<ReturnType<ExecutorUsage['recent']>>,
    memoryNow: async (group) => {
      const name = this.nameOf(group);
      const seq = this.p(name).memory ?? [0];
      const i = this.memReads.get(name) ?? 0;
      this.memReads.set(name, i + 1);
      const v = seq[Math.min(i, seq.length - 1)];
      this.events.push(`read ${name} memory.current ${v}`);
      return v;
    },
    pidsNow: () => null,
  };

  /** The stopper's acts on a project's group: cgroup.procs, cgroup.events, cgroup.kill. */
  readonly cgroup: StopCgroup = {
    pids: async (group) => this.p(this.nameOf(group)).pids,
    waitEmpty: async (group, timeoutMs) => {
      const p = this.p(this.nameOf(group));
      this.events.push(`wait ${this.nameOf(group)} empty ${timeoutMs}`);
      if (p.exitsAfterMs !== undefined && p.exitsAfterMs <= timeoutMs) {
        await this.clock.sleep(p.exitsAfterMs);
        p.pids = [];
        return;
      }
      await this.clock.sleep(timeoutMs);
      throw Object.assign(new Error('still populated'), { code: 'TIMEOUT' });
    },
    kill: async (group) => {
      this.events.push(`kill ${this.nameOf(group)}`);
      this.p(this.nameOf(group)).pids = [];
      return { method: 'cgroup.kill', ms: 1 };
    },
  };

  readonly allocationBook: AllocationBook = {
    current: () => this.allocationNow,
    set: async (r) => {
      this.events.push(`allocation ${r.memoryBytes} ${r.cpus}`);
      this.allocationNow = r;
    },
  };

  /** Stop signals, recorded by pid and project. */
  readonly sendSignal: SendSignal = (pid, signal) => {
    const name = Object.entries(this.projects).find(([, p]) => p.pids.includes(pid))?.[0];
    this.events.push(`signal ${name ?? '?'} ${pid} ${signal}`);
  };
}

function fmt(l: ProjectLimits): string {
  return `high=${l.memoryHigh} max=${l.memoryMax} cpu=${l.cpuMax}${l.cpuset ? ` cpuset=${l.cpuset}` : ''}`;
}

/** An in-memory step journal (the broker's per-child record of one notice). */
export class MemoryStepJournal<CO> implements StepJournal<CO> {
  readonly recs = new Map<string, StepJournalRecord<CO>>();
  async get(child: string): Promise<StepJournalRecord<CO> | undefined> {
    return this.recs.get(child);
  }
  async put(child: string, rec: StepJournalRecord<CO>): Promise<void> {
    this.recs.set(child, rec);
  }
}
