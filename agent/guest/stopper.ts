/**
 * The graceful stop of one project (docs/architecture.md, "A notice, end to end"):
 *
 *   pre-stop hook (local config only, run INSIDE the project's cgroup, its own timeout)
 *   → stop signal to every process of the group (cgroup.procs read at that moment)
 *   → wait up to the grace period, never past the notice deadline; a project that answers
 *     `done` on the project socket ends its grace early
 *   → kill the whole group (cgroup.kill, forks included) → wait until it is empty.
 *
 * How it ended is a named fact, never a bool (CONTRIBUTING.md on kubelet): `already-gone`
 * (nothing ran when we came), `graceful` (the group emptied before the grace ran out, or
 * the project said it was done and only then was the rest killed), `killed`.
 */
import type { ChildProcess } from 'node:child_process';
import type { CgroupAdapter } from '../../cgroup-adapter/types';
import type { Logger } from '../common/log';
import type { ExitKind } from '../broker/types';
import { faultPoint } from '../common/fault';
import { systemClock, type Clock } from '../common/clock';

export interface StopSpec {
  signal: string;
  gracePeriodMs: number;
  preStop?: { command: string[]; timeoutMs: number };
}

/**
 * What a stop does to a project's group, and nothing more (CONTRIBUTING.md, "Policy is
 * pure; actuation is narrow"): read `cgroup.procs`, wait for `cgroup.events` to say
 * `populated 0`, write `cgroup.kill` (cgroup-adapter/ has them; a test records them).
 */
export type StopCgroup = Pick<CgroupAdapter, 'pids' | 'waitEmpty' | 'kill'>;

/** Sends a signal to one process (kill(2)); throws ESRCH when it has already exited. */
export type SendSignal = (pid: number, signal: NodeJS.Signals) => void;

const sendSignalReal: SendSignal = (pid, signal) => {
  process.kill(pid, signal);
};

export interface StopDeps {
  adapter: StopCgroup;
  /** Starts argv inside `group` (spawnInto); the hook's stdio goes wherever the caller says. */
  spawnHook(group: string, argv: string[]): Promise<ChildProcess>;
  /** Resolves true when the project answers `done` for this notice. */
  waitDone(signal: AbortSignal): Promise<boolean>;
  /**
   * Awaited before the pre-stop hook and the signal: this project's turn (executor.ts
   * SignalTurns: the stop signals of a notice go out in rank order).
   */
  turn?: () => Promise<void>;
  /** Called once the stop signal has gone to the group (the next project's turn). */
  onSignalled?: () => void;
  /**
   * cgroup.procs read synchronously (cgroup-adapter GroupSampler), so that the signals
   * of many stops in turn do not each wait for the thread pool; null: use the adapter.
   */
  readPids?: () => number[] | null;
  /** kill(2) by default; a test records the signals instead. */
  sendSignal?: SendSignal;
  log: Logger;
  /** Every wait and every reported duration is on clock.monotonic() (docs/reliability.md, "Time"). */
  clock?: Clock;
  /**
   * Milliseconds the kill itself is expected to take (EndMargin: measured): the grace
   * ends that long before the deadline, so the group is empty AT the deadline, not after.
   */
  killMs?: number;
  /** Called with how long cgroup.kill took to empty the group (feeds EndMargin). */
  onKilled?: (ms: number) => void;
}

export interface StopResult {
  exit: ExitKind;
  ms: number;
  reason: string;
  /** Milliseconds into the stop at which each phase began (for the outcome and tests). */
  phases: { preStop?: number; signalled?: number; killed?: number; empty: number };
  hook?: 'ok' | 'failed' | 'timed-out';
  signalled: number;
  /** Set by the caller: pids found alive outside the group after it emptied. */
  escaped?: number[];
}

/** Kill grace: cgroup.kill empties a group in milliseconds; this only bounds a stuck kernel. */
const KILL_TIMEOUT_MS = 10_000;

export async function stopProject(
  group: string,
  spec: StopSpec,
  /** On deps.clock.monotonic(): the instant by which the group must be empty. */
  deadline: number,
  deps: StopDeps,
): Promise<StopResult> {
  const clock = deps.clock ?? systemClock;
  const now = (): number => clock.monotonic();
  let t0 = now();
  const at = (): number => Math.round(now() - t0);
  const killMs = Math.max(0, deps.killMs ?? 0);
  // The grace must leave room for the kill: it ends killMs before the deadline.
  const graceLeft = (): number => Math.max(0, Math.floor(deadline - killMs - now()));
  const phases: StopResult['phases'] = { empty: 0 };
  const log = deps.log;

  // Read as the signal reads it (readPids: a pread on the sampler's held descriptor): through
  // the adapter this was a thread-pool round trip per stop, queued behind the shrinks'
  // limit writes of the same notice, before the first signal could go out
  // (docs/performance.md, "Closing the gap: what was tried").
  if ((deps.readPids?.() ?? (await deps.adapter.pids(group))).length === 0) {
    phases.empty = at();
    return {
      exit: 'already-gone',
      ms: at(),
      reason: 'no process was running',
      phases,
      signalled: 0,
    };
  }

  if (deps.turn) {
    await deps.turn();
    t0 = now(); // the stop is timed from its turn: the wait for others' signals is theirs
  }

  // 1. Pre-stop hook: its own timeout, and never past the deadline.
  let hook: StopResult['hook'];
  if (spec.preStop && spec.preStop.command.length > 0) {
    phases.preStop = at();
    hook = await runHook(
      group,
      spec.preStop,
      Math.min(spec.preStop.timeoutMs, graceLeft()),
      deps,
      clock,
    );
    log.info({ hook, ms: at() - phases.preStop }, 'pre-stop hook finished');
  }

  // 2. The stop signal to every process in the group as the kernel lists it now.
  const graceMs = Math.min(spec.gracePeriodMs, graceLeft());
  phases.signalled = at();
  const signalled = await signalGroup(
    deps.adapter,
    group,
    spec.signal,
    deps.readPids,
    deps.sendSignal,
  );
  deps.onSignalled?.();
  faultPoint('mid-stop');
  log.info({ signal: spec.signal, pids: signalled, graceMs }, 'stop signal sent');

  // 3. Wait for the group to empty, for the project's `done`, or for the grace to run out.
  const ac = new AbortController();
  const waited = await Promise.race([
    deps.adapter.waitEmpty(group, graceMs).then(
      () => 'empty' as const,
      () => 'grace-over' as const,
    ),
    deps.waitDone(ac.signal).then((d) => (d ? ('done' as const) : ('grace-over' as const))),
  ]);
  ac.abort();
  const graceUsed = at() - phases.signalled;
  if (waited === 'empty') {
    phases.empty = at();
    return {
      exit: 'graceful',
      ms: at(),
      reason: `exited ${graceUsed} ms after ${spec.signal} (grace ${graceMs} ms)`,
      phases,
      hook,
      signalled,
    };
  }

  // 4. Kill the whole group, forks included, and wait until it is empty.
  phases.killed = at();
  const capped = graceMs < spec.gracePeriodMs;
  const k0 = now();
  await deps.adapter.kill(group, KILL_TIMEOUT_MS);
  deps.onKilled?.(now() - k0);
  phases.empty = at();
  if (waited === 'done') {
    return {
      exit: 'graceful',
      ms: at(),
      reason: `answered done ${graceUsed} ms after ${spec.signal}; what was left was killed`,
      phases,
      hook,
      signalled,
    };
  }
  return {
    exit: 'killed',
    ms: at(),
    reason: capped
      ? `still running when the notice deadline capped its grace at ${graceMs} ms (configured ${spec.gracePeriodMs} ms); killed`
      : `still running after its ${graceMs} ms grace period; killed`,
    phases,
    hook,
    signalled,
  };
}

/** Sends `signal` to each pid in the group's cgroup.procs now; returns how many got it. */
export async function signalGroup(
  adapter: Pick<StopCgroup, 'pids'>,
  group: string,
  signal: string,
  readPids?: () => number[] | null,
  send: SendSignal = sendSignalReal,
): Promise<number> {
  let n = 0;
  const now = readPids?.() ?? (await adapter.pids(group));
  for (const pid of now) {
    try {
      send(pid, signal as NodeJS.Signals);
      n++;
    } catch (err) {
      // ESRCH: it exited after cgroup.procs was read: nothing left to signal.
      if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
    }
  }
  return n;
}

async function runHook(
  group: string,
  preStop: { command: string[] },
  timeoutMs: number,
  deps: StopDeps,
  clock: Clock,
): Promise<StopResult['hook']> {
  let child: ChildProcess;
  try {
    child = await deps.spawnHook(group, preStop.command);
  } catch (err) {
    deps.log.warn({ err, command: preStop.command }, 'pre-stop hook could not start');
    return 'failed';
  }
  return new Promise((resolve) => {
    let settled = false;
    const timerOff = new AbortController();
    void clock.sleep(timeoutMs, timerOff.signal).then(() => {
      if (settled) return;
      settled = true;
      // The hook is our own child (not yet reaped), so its pid cannot have been reused.
      child.kill('SIGKILL');
      deps.log.warn({ timeoutMs, command: preStop.command }, 'pre-stop hook timed out; killed');
      resolve('timed-out');
    });
    const done = (code: number | null): void => {
      if (settled) return;
      settled = true;
      timerOff.abort();
      resolve(code === 0 ? 'ok' : 'failed');
    };
    if (child.exitCode !== null) done(child.exitCode);
    child.once('exit', (code) => done(code));
    child.once('error', () => done(-1));
  });
}
