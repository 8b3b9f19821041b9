/**
 * The few file operations on cgroupfs, each wrapping failures into a CgroupError that
 * keeps file, data and errno. Only the drivers call these.
 */
import * as fs from 'node:fs';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { CgroupError, fromFsError, isCgroupError } from './errors';
import { parseCgroupEvents } from './formats';
import type { GroupEvents } from './types';

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function readText(file: string): Promise<string> {
  try {
    return await fsp.readFile(file, 'utf8');
  } catch (e) {
    throw fromFsError('read', file, e);
  }
}

/** undefined when the file does not exist (controller not enabled / not this kernel). */
export async function readOptional(file: string): Promise<string | undefined> {
  try {
    return await fsp.readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fromFsError('read', file, e);
  }
}

/**
 * One write(2) of `data` (cgroupfs acts on each write; CONTRIBUTING.md: one pid per write).
 * O_WRONLY without O_CREAT: a missing interface file is ENOENT, never a new regular file.
 */
export async function writeText(file: string, data: string): Promise<void> {
  let fh: fsp.FileHandle | undefined;
  try {
    fh = await fsp.open(file, fs.constants.O_WRONLY);
    const buf = Buffer.from(data);
    const { bytesWritten } = await fh.write(buf, 0, buf.length);
    if (bytesWritten !== buf.length) {
      throw new CgroupError(
        'WRITE_FAILED',
        `short write to ${file}: ${bytesWritten} of ${buf.length}`,
        {
          file,
          data,
        },
      );
    }
  } catch (e) {
    if (isCgroupError(e)) throw e;
    throw fromFsError('write', file, e, data);
  } finally {
    await fh?.close().catch(() => undefined);
  }
}

/**
 * readText and writeText done synchronously (open, one read or write(2), close on this
 * thread), for the files whose write never waits inside the kernel: cpu.*, cpuset.*,
 * pids.max, the v1 soft limit. Three or four thread-pool round trips each through the
 * promises API, ~20 for one shrink's limits: a reclaim of 100 projects queued ~1 000 of
 * them on libuv's 4 threads, ahead of the journal's fsyncs and the stops' reads
 * (docs/performance.md, "Closing the gap: what was tried"). Memory limits that make the
 * kernel reclaim in the writer (memory.max, memory.high, memory.limit_in_bytes) stay on the
 * thread pool, so a slow reclaim cannot stall the event loop.
 */
export function readTextNow(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw fromFsError('read', file, e);
  }
}

export function writeTextNow(file: string, data: string): void {
  let fd: number | undefined;
  try {
    fd = fs.openSync(file, fs.constants.O_WRONLY);
    const buf = Buffer.from(data);
    const n = fs.writeSync(fd, buf, 0, buf.length);
    if (n !== buf.length)
      throw new CgroupError('WRITE_FAILED', `short write to ${file}: ${n} of ${buf.length}`, {
        file,
        data,
      });
  } catch (e) {
    if (isCgroupError(e)) throw e;
    throw fromFsError('write', file, e, data);
  } finally {
    if (fd !== undefined)
      try {
        fs.closeSync(fd);
      } catch {
        // a close error after a complete write changes nothing the kernel did
      }
  }
}

export async function pathExists(p: string): Promise<boolean> {
  try {
    await fsp.access(p);
    return true;
  } catch {
    return false;
  }
}

/** mkdir one level; true when we created it, false when it already existed. */
export async function mkdirOnce(dir: string): Promise<boolean> {
  try {
    await fsp.mkdir(dir);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw fromFsError('mkdir', dir, e);
  }
}

/** Child directories (= child groups) of a cgroup directory. ENOENT → []. */
export async function childDirs(dir: string): Promise<string[]> {
  try {
    const ents = await fsp.readdir(dir, { withFileTypes: true });
    return ents
      .filter((e) => e.isDirectory())
      .map((e) => e.name)
      .sort();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw fromFsError('readdir', dir, e);
  }
}

/**
 * rmdir, retrying EBUSY with exponential backoff (10 ms doubling, capped at 200 ms) for
 * up to `budgetMs`: the kernel keeps a group busy briefly after its last task exits (v1
 * memory charges, a dying css). ENOENT means already gone: fine.
 */
export async function rmdirRetry(dir: string, budgetMs: number): Promise<void> {
  const deadline = performance.now() + budgetMs;
  let delay = 10;
  for (;;) {
    try {
      await fsp.rmdir(dir);
      return;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code !== 'EBUSY' || performance.now() >= deadline) throw fromFsError('rmdir', dir, e);
    }
    await sleep(Math.min(delay, Math.max(1, deadline - performance.now())));
    delay = Math.min(delay * 2, 200);
  }
}

/** Removes a group directory and its children, deepest first. */
export async function rmTree(dir: string, budgetMs: number): Promise<void> {
  for (const c of await childDirs(dir)) await rmTree(path.join(dir, c), budgetMs);
  await rmdirRetry(dir, budgetMs);
}

export async function readEvents(dir: string): Promise<GroupEvents> {
  return parseCgroupEvents(await readText(path.join(dir, 'cgroup.events')));
}

/**
 * Waits until cgroup.events satisfies `pred`. The kernel sends a file-modified event on
 * cgroup.events when populated/frozen change (cgroup-v2.rst "cgroup.events"), so we
 * watch it (inotify) and also poll, in case an event is missed. TIMEOUT when late.
 */
export function waitForEvents(
  dir: string,
  pred: (ev: GroupEvents) => boolean,
  timeoutMs: number,
  what: string,
  opts: { goneIsDone?: boolean; pollMs?: number } = {},
): Promise<GroupEvents> {
  const file = path.join(dir, 'cgroup.events');
  return new Promise<GroupEvents>((resolve, reject) => {
    let done = false;
    let last: GroupEvents | undefined;
    let watcher: fs.FSWatcher | undefined;
    const finish = (err: unknown, ev?: GroupEvents): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      clearInterval(poll);
      watcher?.close();
      if (err) reject(err);
      else resolve(ev as GroupEvents);
    };
    // Read synchronously: cgroup.events is generated by the kernel on read and never waits
    // (kernfs), and through the thread pool each check of a stop queued behind the
    // journal's fsyncs and the limit writes of the same notice, so a group seen empty by
    // inotify was reported tens of ms later (docs/performance.md, "Closing the gap to the
    // kernel's floor").
    const check = (): void => {
      if (done) return;
      let text: string;
      try {
        text = fs.readFileSync(file, 'utf8');
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT' && opts.goneIsDone)
          finish(null, { populated: false, frozen: false });
        else finish(fromFsError('read', file, e));
        return;
      }
      try {
        last = parseCgroupEvents(text);
        if (pred(last)) finish(null, last);
      } catch (e) {
        finish(e);
      }
    };
    const timer = setTimeout(
      () =>
        finish(
          new CgroupError(
            'TIMEOUT',
            `${what}: ${file} did not reach the awaited state within ${timeoutMs} ms (last: ${JSON.stringify(last)})`,
            { file },
          ),
        ),
      timeoutMs,
    );
    const poll = setInterval(check, opts.pollMs ?? 50);
    try {
      watcher = fs.watch(file, { persistent: false }, check);
      watcher.on('error', () => undefined);
    } catch {
      // No inotify here (or the file vanished): the poll still works.
    }
    check();
  });
}

/** Pids listed in a cgroup.procs file (this group only, not descendants). */
export async function readProcs(dir: string): Promise<number[]> {
  const text = await readText(path.join(dir, 'cgroup.procs'));
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => Number(l.trim()));
}

/** Pids of a group and all its descendants. */
export async function readProcsRecursive(dir: string): Promise<number[]> {
  const out: number[] = [];
  try {
    out.push(...(await readProcs(dir)));
  } catch (e) {
    if (isCgroupError(e, 'ENOENT')) return out;
    throw e;
  }
  for (const c of await childDirs(dir)) out.push(...(await readProcsRecursive(path.join(dir, c))));
  return out;
}
