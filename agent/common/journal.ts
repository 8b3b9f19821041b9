/**
 * Durable state: one JSON file per record, written atomically (write to a temp file,
 * fsync it, rename over the target, fsync the directory) so that a crash at any point
 * leaves either the old or the new record, never a torn one. A write that fails
 * raises JOURNAL_WRITE: callers refuse to act without a record (docs/reliability.md).
 *
 * Group commit (docs/performance.md: ~10 fsync'd writes a project made a cascade cost ~17
 * ms a project): writes of one key never overlap (they would share the temp file), and puts
 * of a key that arrive while its previous write is on the disk, or in the same turn of
 * the event loop, are merged into ONE next write of the newest value. Every caller's promise resolves only once a write that
 * began after its put — so holding its value or a newer one — is durable.
 */
import {
  closeSync,
  constants,
  fdatasync,
  fsync,
  openSync,
  promises as fs,
  renameSync,
  writeSync,
} from 'node:fs';
import * as path from 'node:path';
import { NestError } from './errors';

/** fdatasync(2) / fsync(2) on the thread pool, as a promise. */
function flush(
  fn: (fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => void,
  fd: number,
): Promise<void> {
  return new Promise((resolve, reject) => fn(fd, (err) => (err ? reject(err) : resolve())));
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // nothing more to release
  }
}

const SAFE_KEY = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

interface QueuedWrite<T> {
  value: T;
  done: Promise<void>;
}

/**
 * The order of a journal's writes, per key: writes of one key never overlap, and puts of
 * a key that arrive while its previous write is on the disk, or in the same turn of the
 * event loop, merge into ONE next write of the newest value; each put resolves once a
 * write that began after it, holding its value or a newer one, is done. Shared by Journal
 * and the host's GroupJournal (agent/host/group-journal.ts), which differ only in how a
 * record reaches the disk.
 */
export class KeyedWrites<T> {
  /** Per key: the write on the disk now (or last), and the one queued behind it. */
  private readonly inFlight = new Map<string, Promise<void>>();
  private readonly queued = new Map<string, QueuedWrite<T>>();

  put(key: string, value: T, write: (value: T) => Promise<void>): Promise<void> {
    const waiting = this.queued.get(key);
    if (waiting) {
      // Not yet begun: it will write this newer value, for every caller waiting on it.
      waiting.value = value;
      return waiting.done;
    }
    const before = this.inFlight.get(key) ?? Promise.resolve();
    const q: QueuedWrite<T> = { value, done: Promise.resolve() };
    q.done = before
      .catch(() => undefined)
      // One turn of the event loop first, so the puts of one moment (a hundred steps
      // settling together) share this write instead of the first going alone.
      .then(() => new Promise<void>((r) => setImmediate(r)))
      .then(() => {
        this.queued.delete(key);
        return write(q.value);
      });
    this.queued.set(key, q);
    this.inFlight.set(key, q.done);
    const forget = (): void => {
      if (this.inFlight.get(key) === q.done) this.inFlight.delete(key);
    };
    q.done.then(forget, forget);
    return q.done;
  }
}

export class Journal<T> {
  private readonly writes = new KeyedWrites<T>();

  constructor(readonly dir: string) {}

  async init(): Promise<void> {
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
  }

  /** The record's file; a key that is not a safe file name is JOURNAL_WRITE. */
  file(key: string): string {
    if (!SAFE_KEY.test(key) || key.endsWith('.tmp'))
      throw new NestError(
        'JOURNAL_WRITE',
        `journal key ${JSON.stringify(key)} is not a safe file name`,
      );
    return path.join(this.dir, `${key}.json`);
  }

  /** Durable once it resolves (see the group commit in the file comment). */
  put(key: string, value: T): Promise<void> {
    let target: string;
    try {
      target = this.file(key);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.writes.put(key, value, (v) => this.write(target, v));
  }

  /**
   * The atomic write. Only the two flushes wait on the disk, so only they go to the thread
   * pool (fdatasync of the file, fsync of the directory); the open, write, close and rename
   * are done on this thread: they touch the page cache and the directory in memory.
   * Through the promises API each of the eight steps was a thread-pool round trip, queued
   * behind every other file operation of the moment (a notice's limit writes, its
   * project notices, the other journal's flushes), and a journal write sits between
   * every two phases of a cascade (docs/performance.md, "Closing the gap to the kernel's floor").
   */
  private async write(target: string, value: T): Promise<void> {
    const tmp = `${target}.${process.pid}.tmp`;
    let fd: number | undefined;
    let dir: number | undefined;
    try {
      fd = openSync(tmp, constants.O_CREAT | constants.O_TRUNC | constants.O_WRONLY, 0o600);
      const buf = Buffer.from(JSON.stringify(value));
      for (let off = 0; off < buf.length;) off += writeSync(fd, buf, off, buf.length - off);
      // fdatasync: the data and the size it needs; the rename below is what publishes it.
      await flush(fdatasync, fd);
      closeSync(fd);
      fd = undefined;
      renameSync(tmp, target);
      dir = openSync(this.dir, constants.O_RDONLY);
      await flush(fsync, dir);
    } catch (cause) {
      if (fd !== undefined) closeQuietly(fd);
      await fs.rm(tmp, { force: true }).catch(() => undefined);
      throw new NestError(
        'JOURNAL_WRITE',
        `could not write journal record ${target}: ${String(cause)}`,
        {
          cause,
        },
      );
    } finally {
      if (dir !== undefined) closeQuietly(dir);
    }
  }

  async get(key: string): Promise<T | undefined> {
    try {
      return JSON.parse(await fs.readFile(this.file(key), 'utf8')) as T;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw e;
    }
  }

  async delete(key: string): Promise<void> {
    await fs.rm(this.file(key), { force: true });
  }

  /** Every record, in key order. Leftover temp files of a crashed write are ignored. */
  async all(): Promise<{ key: string; value: T }[]> {
    let names: string[];
    try {
      names = await fs.readdir(this.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw e;
    }
    const out: { key: string; value: T }[] = [];
    for (const n of names.sort()) {
      if (!n.endsWith('.json')) continue;
      const key = n.slice(0, -'.json'.length);
      const value = await this.get(key);
      if (value !== undefined) out.push({ key, value });
    }
    return out;
  }
}
