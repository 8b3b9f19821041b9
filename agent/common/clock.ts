/**
 * Time, in two kinds that are never mixed (docs/reliability.md, "Time"):
 *
 *   monotonic()  CLOCK_MONOTONIC in milliseconds (process.hrtime: since boot, never steps,
 *                clock_gettime(2)). Every duration, deadline and timer is on this clock.
 *   now()        the wall clock (CLOCK_REALTIME), milliseconds since the epoch: only for
 *                what a person reads (journal and log timestamps, `startedAt`), never for
 *                arithmetic. An NTP step or an operator's `date -s` moves it by any amount.
 *
 * A deadline that crosses a wire or a restart is converted ONCE to the local monotonic
 * clock where it arrives (fromWall, or the peer's own clock: agent/client/client.ts), and
 * only the monotonic value is used afterwards. The clock is injected (a `Clock`), so a test
 * can drive it (test/helpers/fake-clock.ts) or step the wall clock under libfaketime.
 */
import { readFileSync } from 'node:fs';

export interface Clock {
  /** Milliseconds on CLOCK_MONOTONIC: durations, deadlines, timers. */
  monotonic(): number;
  /** Wall time, milliseconds since the epoch: display and journal timestamps only. */
  now(): number;
  /** Resolves after `ms` on the monotonic clock, or at once when `signal` aborts. */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/** Node's timers run on libuv's monotonic loop time (uv_now), so setTimeout never steps. */
function sleepReal(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const onAbort = (): void => {
      clearTimeout(t);
      resolve();
    };
    const t = setTimeout(
      () => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      },
      Math.max(0, ms),
    );
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

export const systemClock: Clock = {
  monotonic: () => Number(process.hrtime.bigint() / 1000n) / 1000,
  now: () => Date.now(),
  sleep: sleepReal,
};

/**
 * A wall-clock instant (a wire deadline, an ISO string) on the local monotonic clock: read
 * both clocks once and carry the difference over. Call it once, on receipt; afterwards
 * only the monotonic value counts, whatever the wall clock does.
 */
export function fromWall(wall: string | number | Date, clock: Clock = systemClock): number {
  const t = typeof wall === 'number' ? wall : new Date(wall).getTime();
  return clock.monotonic() + (t - clock.now());
}

let bootIdCache: string | undefined;

/**
 * The kernel's id of this boot (proc(5), /proc/sys/kernel/random/boot_id). A monotonic
 * instant journaled with it stays valid across a restart of the agent in the same boot
 * (CLOCK_MONOTONIC counts from boot); after a reboot the wall form is converted instead.
 */
export function bootId(): string {
  if (bootIdCache === undefined) {
    try {
      bootIdCache = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    } catch {
      bootIdCache = '';
    }
  }
  return bootIdCache;
}

/** A deadline as journaled: the monotonic instant, the boot it belongs to, and the wall form. */
export interface StoredDeadline {
  deadlineMono?: number;
  bootId?: string;
}

/**
 * The monotonic deadline of a journaled record: its own monotonic value when written in
 * this boot, else its wall form converted now (once: the caller keeps the result).
 */
export function restoreDeadline(
  stored: StoredDeadline,
  wall: string,
  clock: Clock = systemClock,
  boot: string = bootId(),
): number {
  if (typeof stored.deadlineMono === 'number' && boot !== '' && stored.bootId === boot)
    return stored.deadlineMono;
  return fromWall(wall, clock);
}
