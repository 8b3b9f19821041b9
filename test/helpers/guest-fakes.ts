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
import type { SendSignal, StopCgroup } from '../../agent/guest/stopper';

/** Milliseconds the test decides; nothing here waits on a timer. */
export class TestClock {
  constructor(public t = 1_000_000) {}
  now = (): number => this.t;
  advance(ms: number): void {
    this.t += ms;
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
      this.clock.advance(after);
      return;
    }
    this.clock.advance(timeoutMs);
    throw Object.assign(new Error(`${group} still populated after ${timeoutMs} ms`), {
      code: 'TIMEOUT',
    });
  }

  /** The project socket's `done` for this notice (ExecutorBoard.waitDone, one project). */
  waitDone(signal: AbortSignal): Promise<boolean> {
    const done = this.script.doneAfterMs;
    if (done !== undefined) {
      this.clock.advance(done);
      this.events.push('done');
      return Promise.resolve(true);
    }
    return new Promise((resolve) => {
      if (signal.aborted) return resolve(false);
      signal.addEventListener('abort', () => resolve(false), { once: true });
    });
  }

  async kill(group: string): Promise<KillResult> {
    this.events.push(`kill ${group}`);
    const ms = this.script.killMs ?? 3;
    this.clock.advance(ms);
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
