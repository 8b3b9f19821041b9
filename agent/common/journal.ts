/**
 * Durable state: one JSON file per record, written atomically (write to a temp file,
 * fsync it, rename over the target, fsync the directory) so that a crash at any point
 * leaves either the old or the new record, never a torn one. A write that fails
 * raises JOURNAL_WRITE: callers refuse to act without a record (issue 7).
 */
import { promises as fs, constants } from 'node:fs';
import * as path from 'node:path';
import { NestError } from './errors';

const SAFE_KEY = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

export class Journal<T> {
  constructor(readonly dir: string) {}

  async init(): Promise<void> {
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
  }

  private file(key: string): string {
    if (!SAFE_KEY.test(key) || key.endsWith('.tmp'))
      throw new NestError(
        'JOURNAL_WRITE',
        `journal key ${JSON.stringify(key)} is not a safe file name`,
      );
    return path.join(this.dir, `${key}.json`);
  }

  async put(key: string, value: T): Promise<void> {
    const target = this.file(key);
    const tmp = `${target}.${process.pid}.tmp`;
    try {
      const fh = await fs.open(
        tmp,
        constants.O_CREAT | constants.O_TRUNC | constants.O_WRONLY,
        0o600,
      );
      try {
        await fh.writeFile(JSON.stringify(value));
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fs.rename(tmp, target);
      const dh = await fs.open(this.dir, constants.O_RDONLY);
      try {
        await dh.sync();
      } finally {
        await dh.close();
      }
    } catch (cause) {
      await fs.rm(tmp, { force: true }).catch(() => undefined);
      throw new NestError(
        'JOURNAL_WRITE',
        `could not write journal record ${target}: ${String(cause)}`,
        {
          cause,
        },
      );
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
