/**
 * A cheap periodic usage sampler (docs/performance.md: an idle guest agent with 200
 * projects used 19 % of a core reading nine cgroup files per project per second, each
 * open/fstat/read/close on the thread pool). This one reads only what a periodic sample
 * needs — memory in use and CPU time, two files a group (SampleFiles from the driver) — and
 * keeps each file open, re-reading it from offset 0 with one pread(2): cgroup interface
 * files are regenerated on every read from the start (kernfs seq files), so an open
 * descriptor stays current. Two syscalls a group a sample, no thread pool, no garbage but a
 * number.
 *
 * A group removed under us: the read of its open file fails with ENODEV (or the open with
 * ENOENT): the descriptor is dropped and the group reported as gone (null); a group made
 * again with the same name is opened afresh on the next sample.
 */
import * as fs from 'node:fs';
import { parseCpuacctUsage } from './formats-v1';
import { parseCpuStatV2, parseUint } from './formats';
import type { CgroupAdapter, SampleFiles } from './types';

export interface CheapSample {
  memoryCurrent: number;
  cpuUsageUs: number;
}

const GONE = new Set(['ENODEV', 'ENOENT', 'ESTALE']);

export class GroupSampler {
  private readonly fds = new Map<string, number>();
  private readonly files = new Map<string, SampleFiles>();
  private buf = Buffer.alloc(4096);

  constructor(private readonly adapter: Pick<CgroupAdapter, 'sampleFiles'>) {}

  /** Whether the adapter can be sampled this way (both real drivers can; fakes may not). */
  get available(): boolean {
    return typeof this.adapter.sampleFiles === 'function';
  }

  /** Memory and CPU time of `group` now; null when the group does not exist (any more). */
  read(group: string): CheapSample | null {
    let files = this.files.get(group);
    if (!files) {
      files = this.adapter.sampleFiles!(group);
      this.files.set(group, files);
    }
    const mem = files.memory === undefined ? '0' : this.text(files.memory);
    if (mem === null) return this.gone(group);
    let cpuUsageUs = 0;
    if (files.cpu) {
      const t = this.text(files.cpu.path);
      if (t === null) return this.gone(group);
      cpuUsageUs =
        files.cpu.format === 'cpuacct.usage' ? parseCpuacctUsage(t) : parseCpuStatV2(t).usageUs;
    }
    return { memoryCurrent: parseUint('memory', mem), cpuUsageUs };
  }

  /**
   * The group's processes as cgroup.procs lists them now (one pread of a held file), or
   * null when the group is gone or the layout has no procs file. For a signal that must
   * go to the processes of this moment without a thread-pool round trip.
   */
  pids(group: string): number[] | null {
    let files = this.files.get(group);
    if (!files) {
      files = this.adapter.sampleFiles!(group);
      this.files.set(group, files);
    }
    if (files.procs === undefined) return null;
    const t = this.text(files.procs);
    if (t === null) return this.gone(group);
    const out: number[] = [];
    for (const line of t.split('\n')) if (line !== '') out.push(Number(line));
    return out;
  }

  /** A group gone: none of its descriptors is kept (one file may fail before the other). */
  private gone(group: string): null {
    this.close(group);
    return null;
  }

  /** Descriptors held now (for tests: bounded by groups × 2). */
  get open(): number {
    return this.fds.size;
  }

  /** Closes the descriptors of one group, or of all. */
  close(group?: string): void {
    if (group === undefined) {
      for (const fd of this.fds.values()) fs.closeSync(fd);
      this.fds.clear();
      this.files.clear();
      return;
    }
    const files = this.files.get(group);
    this.files.delete(group);
    for (const p of [files?.memory, files?.cpu?.path, files?.procs])
      if (p !== undefined) this.drop(p);
  }

  /** The file's contents now, or null when its group is gone. */
  private text(file: string): string | null {
    for (let attempt = 0; attempt < 2; attempt++) {
      let fd = this.fds.get(file);
      try {
        if (fd === undefined) {
          fd = fs.openSync(file, fs.constants.O_RDONLY);
          this.fds.set(file, fd);
        }
        let n = fs.readSync(fd, this.buf, 0, this.buf.length, 0);
        while (n === this.buf.length) {
          // Larger than the buffer (a cpu.stat with many keys): grow and read again.
          this.buf = Buffer.alloc(this.buf.length * 2);
          n = fs.readSync(fd, this.buf, 0, this.buf.length, 0);
        }
        return this.buf.toString('utf8', 0, n);
      } catch (err) {
        this.drop(file);
        const code = (err as NodeJS.ErrnoException).code ?? '';
        // ENODEV on a held descriptor: that group was removed; a new one of the same
        // name may exist: open again once.
        if (code === 'ENODEV' && fd !== undefined && attempt === 0) continue;
        if (GONE.has(code)) return null;
        throw err;
      }
    }
    return null;
  }

  private drop(file: string): void {
    const fd = this.fds.get(file);
    if (fd === undefined) return;
    this.fds.delete(file);
    try {
      fs.closeSync(fd);
    } catch {
      // already closed: nothing to release
    }
  }
}
