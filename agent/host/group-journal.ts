/**
 * The host's notice journal with a group commit across records (docs/performance.md, "The
 * host broker's own share at 50 guests"): the same files as agent/common/journal.ts (one
 * JSON file a record, written atomically: temp file, fdatasync, rename, fsync of the
 * directory; docs/architecture.md, "Journals and exactly-once"), but the records put in
 * one moment — 50 notices issued together, 50 outcomes arriving together — are written as
 * ONE batch: every temp file written and fdatasync'd together, renamed, then the directory
 * fsync'd once for all of them. Per record that is one thread-pool call (its fdatasync)
 * instead of eight, and one directory sync per batch instead of one per record; each
 * record is still on its own either the old or the new one after a crash at any point.
 *
 * Order and durability as Journal.put: one batch on the disk at a time; a put made while
 * a batch is on the disk goes into the next one (a newer value of a key waiting there
 * replaces the older), and every caller's promise resolves only once a batch that began
 * after its put, so holding its value or a newer one, is durable. A record that cannot be
 * written rejects its own puts with JOURNAL_WRITE (docs/errors.md), as Journal.put does;
 * the others of its batch are not affected.
 */
import { closeSync, constants, fdatasync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { Journal } from '../common/journal';
import { NestError } from '../common/errors';

const datasync = promisify(fdatasync);

interface Entry<T> {
  value: T;
  done: Promise<void>;
  settle: (err?: unknown) => void;
}

function entry<T>(value: T): Entry<T> {
  let settle!: (err?: unknown) => void;
  const done = new Promise<void>((resolve, reject) => {
    settle = (err) => (err === undefined ? resolve() : reject(err));
  });
  return { value, done, settle };
}

export class GroupJournal<T> {
  /** Reads, deletes and the key check are Journal's own. */
  private readonly files: Journal<T>;
  /** The batch collecting puts (not yet begun), per key, if any. */
  private next: Map<string, Entry<T>> | undefined;
  /** The batch on the disk now (or the last one). */
  private writing: Promise<void> = Promise.resolve();

  constructor(readonly dir: string) {
    this.files = new Journal<T>(dir);
  }

  init(): Promise<void> {
    return this.files.init();
  }

  get(key: string): Promise<T | undefined> {
    return this.files.get(key);
  }

  delete(key: string): Promise<void> {
    return this.files.delete(key);
  }

  all(): Promise<{ key: string; value: T }[]> {
    return this.files.all();
  }

  /** Durable once it resolves (see the file comment). */
  put(key: string, value: T): Promise<void> {
    // The same safe-name rule as Journal (its get throws on a bad key before any read).
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/.test(key) || key.endsWith('.tmp'))
      return Promise.reject(
        new NestError(
          'JOURNAL_WRITE',
          `journal key ${JSON.stringify(key)} is not a safe file name`,
        ),
      );
    if (!this.next) {
      const batch = new Map<string, Entry<T>>();
      this.next = batch;
      // After the batch on the disk, and one turn of the event loop: the puts of one
      // moment share this batch instead of the first going alone.
      this.writing = this.writing
        .then(() => new Promise<void>((r) => setImmediate(r)))
        .then(async () => {
          if (this.next === batch) this.next = undefined;
          await this.write(batch);
        });
    }
    const waiting = this.next.get(key);
    if (waiting) {
      // Not yet begun: it will write this newer value, for every caller waiting on it.
      waiting.value = value;
      return waiting.done;
    }
    const e = entry(value);
    this.next.set(key, e);
    return e.done;
  }

  /**
   * Writes a batch; each record's callers learn that record's own fate, as with one
   * Journal.put each: a record that could not be written fails alone (its old file
   * stands), and a failed directory sync fails every record renamed before it.
   */
  private async write(batch: Map<string, Entry<T>>): Promise<void> {
    const fail = (e: Entry<T>, target: string, cause: unknown): void =>
      e.settle(
        new NestError(
          'JOURNAL_WRITE',
          `could not write journal record ${target}: ${String(cause)}`,
          {
            cause,
          },
        ),
      );
    const temps: { e: Entry<T>; tmp: string; target: string; fd: number }[] = [];
    // Into the page cache on this thread (a few µs a file); the syncs below are the slow
    // part, all of them in flight together.
    for (const [key, e] of batch) {
      const target = path.join(this.dir, `${key}.json`);
      const tmp = `${target}.${process.pid}.tmp`;
      let fd = -1;
      try {
        fd = openSync(tmp, constants.O_CREAT | constants.O_TRUNC | constants.O_WRONLY, 0o600);
        const buf = Buffer.from(JSON.stringify(e.value));
        for (let off = 0; off < buf.length;) off += writeSync(fd, buf, off);
        temps.push({ e, tmp, target, fd });
      } catch (cause) {
        if (fd >= 0) closeQuietly(fd);
        rmSync(tmp, { force: true });
        fail(e, target, cause);
      }
    }
    // fdatasync: the data and the size it needs; the rename below is what publishes it.
    const synced = await Promise.allSettled(temps.map((t) => datasync(t.fd)));
    const renamed: typeof temps = [];
    temps.forEach((t, i) => {
      closeQuietly(t.fd);
      const s = synced[i];
      try {
        if (s.status === 'rejected') throw s.reason;
        renameSync(t.tmp, t.target);
        renamed.push(t);
      } catch (cause) {
        rmSync(t.tmp, { force: true });
        fail(t.e, t.target, cause);
      }
    });
    if (renamed.length === 0) return;
    try {
      const dh = await fs.open(this.dir, constants.O_RDONLY);
      try {
        await dh.sync();
      } finally {
        await dh.close();
      }
    } catch (cause) {
      for (const t of renamed) fail(t.e, t.target, cause);
      return;
    }
    for (const t of renamed) t.e.settle();
  }
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // closing is all that is left to do with it
  }
}
