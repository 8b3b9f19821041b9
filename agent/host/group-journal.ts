/**
 * The host's notice journal with a group commit of the directory sync (docs/performance.md,
 * "The host broker's own share at 50 guests"): the same files as agent/common/journal.ts
 * (one JSON file a record, written atomically: temp file, fdatasync, rename, fsync of the
 * directory; docs/architecture.md, "Journals and exactly-once"), and the same order per
 * key (writes of one key never overlap; puts of a key that arrive while its previous
 * write is on the disk, or in the same turn of the event loop, merge into ONE next write of
 * the newest value). What differs: the temp file is written into the page cache on this
 * thread (a few µs) and only its fdatasync goes to the thread pool, and the records renamed
 * in one moment — 50 notices issued together, 50 outcomes arriving together — share ONE
 * directory fsync, which begins after every rename it covers. Per record that is one
 * thread-pool call instead of eight, and one directory sync for all that are ready
 * together instead of one each. Each record is still, on its own, either the old or the
 * new one after a crash at any point, and each put resolves only once a write that began
 * after it, holding its value or a newer one, is durable; a record that cannot be written
 * rejects its own puts with JOURNAL_WRITE (docs/errors.md), the others are not affected.
 */
import { closeSync, constants, fdatasync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { promises as fs } from 'node:fs';
import { promisify } from 'node:util';
import { Journal, KeyedWrites } from '../common/journal';
import { NestError } from '../common/errors';

const datasync = promisify(fdatasync);

export class GroupJournal<T> {
  /** Reads, deletes and the key check are Journal's own. */
  private readonly files: Journal<T>;
  /** Journal's own order per key. */
  private readonly writes = new KeyedWrites<T>();
  /** The directory sync running now (or the last one), and the next one, not yet begun. */
  private dirSyncing: Promise<void> = Promise.resolve();
  private nextDirSync: Promise<void> | undefined;

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
    let target: string;
    try {
      target = this.files.file(key);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.writes.put(key, value, (v) => this.write(target, v));
  }

  private async write(target: string, value: T): Promise<void> {
    const tmp = `${target}.${process.pid}.tmp`;
    try {
      const fd = openSync(tmp, constants.O_CREAT | constants.O_TRUNC | constants.O_WRONLY, 0o600);
      try {
        const buf = Buffer.from(JSON.stringify(value));
        for (let off = 0; off < buf.length;) off += writeSync(fd, buf, off);
        // fdatasync: the data and the size it needs; the rename below is what publishes it.
        await datasync(fd);
      } finally {
        closeSync(fd);
      }
      renameSync(tmp, target);
    } catch (cause) {
      rmSync(tmp, { force: true });
      throw this.failure(target, cause);
    }
    try {
      await this.syncDir();
    } catch (cause) {
      throw this.failure(target, cause);
    }
  }

  /** A directory sync that begins after this call: the one queued next, shared by all. */
  private syncDir(): Promise<void> {
    if (!this.nextDirSync) {
      const next = this.dirSyncing
        .catch(() => undefined)
        .then(async () => {
          if (this.nextDirSync === next) this.nextDirSync = undefined;
          const dh = await fs.open(this.dir, constants.O_RDONLY);
          try {
            await dh.sync();
          } finally {
            await dh.close();
          }
        });
      this.nextDirSync = next;
      this.dirSyncing = next;
    }
    return this.nextDirSync;
  }

  private failure(target: string, cause: unknown): NestError {
    return new NestError(
      'JOURNAL_WRITE',
      `could not write journal record ${target}: ${String(cause)}`,
      { cause },
    );
  }
}
