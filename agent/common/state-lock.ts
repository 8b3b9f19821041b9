/**
 * One daemon per state directory. Two agents on one stateDir would both re-adopt the
 * same projects and both resume the same journaled notices, so the second refuses to
 * start (STATE_LOCKED, naming the holder's pid) before it has touched anything.
 *
 * Node has no flock(2), so the lock is a file created with O_EXCL (open(2): "if pathname
 * already exists, then open() fails with EEXIST") holding the holder's pid and its start
 * time (field 22 of /proc/<pid>/stat, in clock ticks since boot: proc(5)). A lock whose
 * pid is gone, or whose pid now belongs to a process that started at another time (pid
 * reuse), is stale and taken over; kill(pid, 0) alone would take a reused pid for the
 * holder. The lock is removed when the daemon stops; after a SIGKILL the next start
 * finds it stale.
 *
 * One window is left: two starters that find the same stale lock at the same instant both
 * remove it; O_EXCL lets only one create the new one, but the slower one's removal can
 * come after the winner's create (microseconds apart). flock(2) would close it; Node does
 * not have it.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { NestError } from './errors';
import { knownNow } from './proc';

export const LOCK_FILE = 'lock';

interface Holder {
  pid: number;
  /** Start time of the pid, in clock ticks since boot (proc(5), /proc/<pid>/stat field 22). */
  start: number;
}

/**
 * The start time of a live pid, or undefined when /proc has no such process. One reader
 * of /proc/<pid>/stat serves the lock and the project processes (agent/common/proc.ts).
 */
export function processStart(pid: number): number | undefined {
  return knownNow(pid)?.start;
}

function parseHolder(text: string): Holder | undefined {
  try {
    const v = JSON.parse(text) as Partial<Holder>;
    if (Number.isInteger(v.pid) && Number.isInteger(v.start))
      return { pid: v.pid!, start: v.start! };
  } catch {
    // A torn or foreign file: treated as stale below.
  }
  return undefined;
}

export class StateLock {
  private released = false;
  private constructor(
    readonly file: string,
    private readonly ino: number,
  ) {}

  /**
   * Takes the lock of `dir` (which must exist) for this process, or throws STATE_LOCKED
   * naming the live holder. `what` names the daemon in the message.
   */
  static async acquire(dir: string, what: string): Promise<StateLock> {
    const file = path.join(dir, LOCK_FILE);
    const start = processStart(process.pid);
    if (start === undefined) throw new NestError('INTERNAL', 'cannot read /proc/self/stat');
    const me = JSON.stringify({ pid: process.pid, start }) + '\n';
    // A few tries: each after a stale lock was removed (another starter may win the race).
    for (let attempt = 0; ; attempt++) {
      try {
        const fh = await fsp.open(file, 'wx', 0o600);
        try {
          await fh.writeFile(me);
          await fh.sync();
          return new StateLock(file, (await fh.stat()).ino);
        } finally {
          await fh.close();
        }
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt >= 3)
          throw lockError(err, file, what);
      }
      const text = await fsp.readFile(file, 'utf8').catch(() => '');
      const holder = parseHolder(text);
      if (holder && processStart(holder.pid) === holder.start)
        throw new NestError(
          'STATE_LOCKED',
          `${what}: the state directory ${dir} is held by pid ${holder.pid} (${file}); refused, nothing done`,
          { problems: [{ field: 'stateDir', value: dir, message: `locked by pid ${holder.pid}` }] },
        );
      // Stale (holder gone, or its pid reused by a process started at another time).
      await fsp.rm(file, { force: true });
    }
  }

  /** Removes the lock file, if it is still the one this process created. */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    const st = await fsp.stat(this.file).catch(() => undefined);
    if (st?.ino === this.ino) await fsp.rm(this.file, { force: true });
  }
}

function lockError(err: unknown, file: string, what: string): NestError {
  const e = err as NodeJS.ErrnoException;
  return new NestError(
    'START_FAILED',
    `${what}: cannot create the lock ${file}: ${e.code ?? String(err)}`,
    {
      cause: err,
    },
  );
}
