/**
 * Interface files kept open for their next read or write: one pread(2) or pwrite(2) at
 * offset 0 on a held descriptor, where open + write + close (or open + fstat + read +
 * close) walked the path in kernfs every time (docs/performance.md, "Third round": the
 * open was most of a limit write's cost, and a reclaim of 100 projects writes ~250 of
 * them in one turn of the event loop). For the files whose write never waits inside the
 * kernel (cpu.*, cpuset.cpus, pids.max, the v1 soft limit, and a v1 hard limit at or
 * above the usage): synchronous, like cgfs.ts writeTextNow, which they replace.
 *
 * Each write(2) to a cgroup interface file is one command to the kernel whatever the file
 * offset (cgroup-v2.rst, "Interface Files": a write is parsed as a whole), and a read from
 * offset 0 regenerates the file (kernfs seq files), so a held descriptor stays current:
 * the usage sampler reads the same way (sampler.ts).
 *
 * A group removed under us: its held files fail with ENODEV (kernfs deactivates them);
 * the descriptor is dropped and the file opened afresh once, which finds a group made
 * again with the same name, or fails ENOENT as writeTextNow did. The drivers drop a
 * group's descriptors before they remove it (`forget`). At most MAX_HELD are held: past
 * that the longest unused is closed.
 */
import * as fs from 'node:fs';
import { CgroupError, fromFsError, isCgroupError } from './errors';

/** Descriptors held at most (~8 limit files a project: 500 projects in hybrid). */
export const MAX_HELD = 4096;

export class HeldFiles {
  /** Path → descriptor, in order of last use (a Map keeps insertion order). */
  private readonly fds = new Map<string, number>();
  private buf = Buffer.alloc(4096);

  constructor(private readonly max = MAX_HELD) {}

  /** Descriptors held now. */
  get size(): number {
    return this.fds.size;
  }

  /** One pwrite(2) of `data` at offset 0; O_WRONLY without O_CREAT, as writeTextNow. */
  write(file: string, data: string): void {
    const buf = Buffer.from(data);
    this.io(file, fs.constants.O_WRONLY, 'write', data, (fd) => {
      const n = fs.writeSync(fd, buf, 0, buf.length, 0);
      if (n !== buf.length)
        throw new CgroupError('WRITE_FAILED', `short write to ${file}: ${n} of ${buf.length}`, {
          file,
          data,
        });
    });
  }

  /** The file's contents now: pread(2) from offset 0 (the kernel regenerates it). */
  read(file: string): string {
    let text = '';
    this.io(file, fs.constants.O_RDONLY, 'read', undefined, (fd) => {
      let n = fs.readSync(fd, this.buf, 0, this.buf.length, 0);
      while (n === this.buf.length) {
        this.buf = Buffer.alloc(this.buf.length * 2);
        n = fs.readSync(fd, this.buf, 0, this.buf.length, 0);
      }
      text = this.buf.toString('utf8', 0, n);
    });
    return text;
  }

  /** Closes the descriptors of the files under each of `dirs` (a group about to go). */
  forget(dirs: readonly string[]): void {
    const prefixes = dirs.map((d) => (d.endsWith('/') ? d : `${d}/`));
    for (const key of [...this.fds.keys()]) {
      if (prefixes.some((p) => key.startsWith(p))) this.drop(key);
    }
  }

  /** Closes every descriptor. */
  close(): void {
    for (const key of [...this.fds.keys()]) this.drop(key);
  }

  private io(
    file: string,
    mode: number,
    op: 'read' | 'write',
    data: string | undefined,
    act: (fd: number) => void,
  ): void {
    // One key a file and mode: a file read and written (cpu.cfs_quota_us) has two.
    const key = mode === fs.constants.O_RDONLY ? `${file}\0r` : file;
    for (let attempt = 0; ; attempt++) {
      let fd = this.fds.get(key);
      const held = fd !== undefined;
      try {
        if (fd === undefined) fd = fs.openSync(file, mode);
        else this.fds.delete(key); // re-set below: most recently used last
        this.fds.set(key, fd);
        if (this.fds.size > this.max) this.drop(this.fds.keys().next().value as string);
        act(fd);
        return;
      } catch (e) {
        if (isCgroupError(e)) throw e;
        const code = (e as NodeJS.ErrnoException).code;
        // The group this descriptor was opened in is gone; the path may name a new one.
        if (held && code === 'ENODEV' && attempt === 0) {
          this.drop(key);
          continue;
        }
        // A refused value (EINVAL, EBUSY, ERANGE) leaves the descriptor good; any other failure
        // does not keep it.
        if (code !== 'EINVAL' && code !== 'EBUSY' && code !== 'ERANGE') this.drop(key);
        throw fromFsError(op, file, e, data);
      }
    }
  }

  private drop(key: string): void {
    const fd = this.fds.get(key);
    if (fd === undefined) return;
    this.fds.delete(key);
    try {
      fs.closeSync(fd);
    } catch {
      // already closed: nothing to release
    }
  }
}
