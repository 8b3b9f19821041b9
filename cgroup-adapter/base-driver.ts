/**
 * What both drivers share: the unified (cgroup2) hierarchy does membership, freeze, kill,
 * events and PSI in v2 and hybrid alike. Drivers add the limit/usage files and may add
 * more hierarchies (hybrid: v1 memory, cpu, cpuacct, cpuset, pids) that every group and
 * every pid must join too.
 */
import * as path from 'node:path';
import type { Logger } from 'pino';
import {
  childDirs,
  mkdirOnce,
  pathExists,
  readEvents,
  readProcs,
  readProcsRecursive,
  rmTree,
  rmdirRetry,
  sleep,
  waitForEvents,
  writeText,
} from './cgfs';
import { CgroupError, isCgroupError } from './errors';
import { type NameMode, resolveBeneath } from './names';
import { validateLimits } from './limits';
import type {
  Capabilities,
  CgroupAdapter,
  DriverKind,
  GroupEvents,
  GroupUsage,
  KillResult,
  Limits,
} from './types';

/** One hierarchy a group lives in: `unified`, or a v1 mount (`cpu` or `cpu,cpuacct`). */
export interface Hierarchy {
  name: string;
  /** Absolute path of the claimed root in this hierarchy. */
  rootAbs: string;
}

export interface DriverOptions {
  names: NameMode;
  log: Logger;
  /** How long remove() keeps retrying EBUSY (ms). */
  busyRetryMs: number;
  /** `freeze-sigkill` forces kill's fallback even where cgroup.kill exists (tests, old kernels). */
  killMethod: 'auto' | 'freeze-sigkill';
  /** Default timeout of freeze/thaw/kill (ms). */
  timeoutMs: number;
}

const EINVAL_RETRIES = 3;

/** Groups whose resolved directories BaseDriver.paths keeps. */
const MAX_RESOLVED = 4096;

export abstract class BaseDriver implements CgroupAdapter {
  abstract readonly kind: DriverKind;
  abstract readonly capabilities: Capabilities;
  readonly root: string;
  protected readonly opts: DriverOptions;
  protected readonly log: Logger;

  /** Every hierarchy, unified first; a group exists in all of them. */
  readonly hierarchies: readonly Hierarchy[];

  protected constructor(unifiedRoot: string, extra: Hierarchy[], opts: DriverOptions) {
    this.root = unifiedRoot;
    this.hierarchies = [{ name: 'unified', rootAbs: unifiedRoot }, ...extra];
    this.opts = opts;
    this.log = opts.log;
  }

  // ------------------------------------------------------------------ paths

  /** The unified directory of `group` (`""` = the root itself when allowRoot). */
  protected dir(group: string, allowRoot = false): string {
    return resolveBeneath(this.root, group, { mode: this.opts.names, allowRoot });
  }

  /**
   * Groups' directories already resolved (checked names only: a refused one throws and is
   * not kept), by allowRoot and group. Resolving a group in every hierarchy (name check,
   * path.resolve, the beneath check: ×6 on hybrid) cost as much of the guest agent's CPU
   * in setLimits as the kernel's reads and writes, and a shrink asks twice
   * (docs/performance.md, "Third round"). The result depends only on the name and the
   * roots, which never change; bounded by MAX_RESOLVED (emptied when full).
   */
  private readonly resolved = new Map<string, Readonly<Record<string, string>>>();

  /** The directory of `group` in every hierarchy, by hierarchy name (do not modify it). */
  paths(group: string, allowRoot = true): Readonly<Record<string, string>> {
    const key = `${allowRoot ? 1 : 0}${group}`;
    const known = this.resolved.get(key);
    if (known) return known;
    const out: Record<string, string> = {};
    for (const h of this.hierarchies) {
      out[h.name] = resolveBeneath(h.rootAbs, group, { mode: this.opts.names, allowRoot });
    }
    if (this.resolved.size >= MAX_RESOLVED) this.resolved.clear();
    this.resolved.set(key, Object.freeze(out));
    return out;
  }

  // ------------------------------------------------------------------ hooks for drivers

  /** Called after mkdir of `dir` in hierarchy `h` (hybrid: copy cpuset.cpus/mems). */
  protected async afterMkdir(_h: Hierarchy, _dir: string): Promise<void> {}
  /** Called before mkdir of a child under `parentDir` (v2: enable controllers). */
  protected async beforeChild(_h: Hierarchy, _parentDir: string): Promise<void> {}
  /** True while claimSelf makes the leaf: no beforeChild for it (see there). */
  private claiming = false;

  abstract setLimits(group: string, limits: Limits): Promise<void>;
  abstract readLimits(group: string): Promise<Limits>;
  abstract usage(group: string): Promise<GroupUsage>;

  // ------------------------------------------------------------------ groups

  /**
   * Creates the group (and missing parents) in every hierarchy, then applies limits. If a
   * later step fails, removes every directory this call made (CONTRIBUTING.md, runc).
   */
  async create(group: string, limits?: Limits): Promise<void> {
    const checked = validateLimits(limits);
    const segs = group === '' ? [] : group.split('/');
    this.dir(group); // name check before anything touches the disk
    const made: string[] = [];
    try {
      for (const h of this.hierarchies) {
        let cur = h.rootAbs;
        for (const seg of segs) {
          if (!this.claiming) await this.beforeChild(h, cur);
          const next = resolveBeneath(cur, seg, { mode: this.opts.names });
          if (await mkdirOnce(next)) {
            made.push(next);
            await this.afterMkdir(h, next);
          }
          cur = next;
        }
      }
      if (Object.keys(checked).length > 0) await this.setLimits(group, checked);
      this.log.debug({ group, limits: checked, made: made.length }, 'cgroup created');
    } catch (e) {
      for (const d of made.reverse()) {
        await rmdirRetry(d, this.opts.busyRetryMs).catch((err) =>
          this.log.warn({ dir: d, err }, 'cleanup after failed create could not rmdir'),
        );
      }
      throw e;
    }
  }

  /** Removes the group and its children (deepest first) in every hierarchy. */
  async remove(group: string): Promise<void> {
    const dirs = this.paths(group, false);
    // Unified first: it refuses (EBUSY) while populated, before any v1 dir is gone.
    for (const h of this.hierarchies) await rmTree(dirs[h.name], this.opts.busyRetryMs);
    this.log.debug({ group }, 'cgroup removed');
  }

  async exists(group: string): Promise<boolean> {
    return pathExists(this.dir(group, true));
  }

  async children(group: string): Promise<string[]> {
    return childDirs(this.dir(group, true));
  }

  // ------------------------------------------------------------------ membership

  /**
   * Moves one pid into the group in every hierarchy, unified first (so freeze and kill
   * reach it at once). One pid per write; ESRCH → code ESRCH; EINVAL is retried a few
   * times (a task in the middle of exec/exit can be refused transiently).
   */
  async movePid(group: string, pid: number): Promise<void> {
    if (!Number.isSafeInteger(pid) || pid <= 0) {
      throw new CgroupError(
        'EINVAL',
        `pid must be a positive integer, got ${JSON.stringify(pid)}`,
        {
          field: 'pid',
          value: pid,
        },
      );
    }
    const dirs = this.paths(group, false);
    for (const h of this.hierarchies) {
      const file = path.join(dirs[h.name], 'cgroup.procs');
      for (let attempt = 0; ; attempt++) {
        try {
          await writeText(file, String(pid));
          break;
        } catch (e) {
          if (isCgroupError(e, 'EINVAL') && attempt < EINVAL_RETRIES) {
            await sleep(5 * (attempt + 1));
            continue;
          }
          throw e;
        }
      }
    }
  }

  async pids(group: string): Promise<number[]> {
    return readProcs(this.dir(group, true));
  }

  /**
   * Which of `pids` are not in `group` or beneath it, and in which hierarchies: a process
   * that wrote itself into another group's cgroup.procs (root may, in any hierarchy it
   * can write) is outside in that one. Read from each hierarchy's cgroup.procs, so a pid
   * that has exited is reported outside everywhere: the caller tells the dead from the
   * escaped by their start time (docs/reliability.md, "Processes that leave their project").
   */
  async outside(group: string, pids: readonly number[]): Promise<Map<number, string[]>> {
    const dirs = this.paths(group, true);
    const out = new Map<number, string[]>();
    for (const h of this.hierarchies) {
      const inside = new Set(await readProcsRecursive(dirs[h.name]));
      for (const pid of pids) if (!inside.has(pid)) out.set(pid, [...(out.get(pid) ?? []), h.name]);
    }
    return out;
  }

  async events(group: string): Promise<GroupEvents> {
    return readEvents(this.dir(group, true));
  }

  // ------------------------------------------------------------------ freeze, kill

  async freeze(group: string, timeoutMs = this.opts.timeoutMs): Promise<void> {
    await this.setFrozen(group, true, timeoutMs);
  }

  async thaw(group: string, timeoutMs = this.opts.timeoutMs): Promise<void> {
    await this.setFrozen(group, false, timeoutMs);
  }

  private async setFrozen(group: string, frozen: boolean, timeoutMs: number): Promise<void> {
    const dir = this.dir(group, true);
    if (!this.capabilities.freeze) {
      throw new CgroupError('UNSUPPORTED', `cgroup.freeze is not available under ${this.root}`, {
        file: path.join(dir, 'cgroup.freeze'),
      });
    }
    await writeText(path.join(dir, 'cgroup.freeze'), frozen ? '1' : '0');
    // Writing returns before every task has stopped: wait for `frozen 1` (cgroup-v2.rst).
    await waitForEvents(dir, (ev) => ev.frozen === frozen, timeoutMs, frozen ? 'freeze' : 'thaw');
  }

  /**
   * Kills every process of the group and its descendants, forks included, and waits for
   * `populated 0`. cgroup.kill (5.14+) does it in one write; without it (or when forced),
   * freeze so nothing can fork or exit-and-be-reused, SIGKILL each pid, thaw, repeat.
   */
  async kill(group: string, timeoutMs = this.opts.timeoutMs): Promise<KillResult> {
    const dir = this.dir(group, true);
    const start = performance.now();
    if (this.capabilities.cgroupKill && this.opts.killMethod === 'auto') {
      await writeText(path.join(dir, 'cgroup.kill'), '1');
      await this.waitEmpty(group, timeoutMs);
      return { method: 'cgroup.kill', ms: Math.round(performance.now() - start) };
    }
    const deadline = start + timeoutMs;
    for (let round = 0; ; round++) {
      const ev = await readEvents(dir).catch((e) => {
        if (isCgroupError(e, 'ENOENT')) return { populated: false, frozen: false };
        throw e;
      });
      if (!ev.populated) break;
      const left = deadline - performance.now();
      if (left <= 0) {
        throw new CgroupError('TIMEOUT', `kill ${dir}: still populated after ${timeoutMs} ms`, {
          file: path.join(dir, 'cgroup.events'),
        });
      }
      let frozen = false;
      if (this.capabilities.freeze) {
        try {
          await this.freeze(group, Math.min(left, 2000));
          frozen = true;
        } catch (e) {
          // A task stuck in D state can delay `frozen 1`; kill what we see anyway.
          this.log.warn({ group, err: e }, 'freeze before SIGKILL did not complete');
        }
      }
      for (const pid of await readProcsRecursive(dir)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e;
        }
      }
      if (frozen || this.capabilities.freeze) {
        await this.thaw(group, Math.max(100, deadline - performance.now())).catch((e) => {
          if (!isCgroupError(e, 'ENOENT')) throw e;
        });
      }
      try {
        await waitForEvents(
          dir,
          (x) => !x.populated,
          Math.min(200 * (round + 1), Math.max(1, deadline - performance.now())),
          'kill',
          {
            goneIsDone: true,
          },
        );
        break;
      } catch (e) {
        if (!isCgroupError(e, 'TIMEOUT')) throw e;
      }
    }
    return { method: 'freeze-sigkill', ms: Math.round(performance.now() - start) };
  }

  async waitEmpty(group: string, timeoutMs: number): Promise<void> {
    await waitForEvents(this.dir(group, true), (ev) => !ev.populated, timeoutMs, 'waitEmpty', {
      goneIsDone: true,
    });
  }

  // ------------------------------------------------------------------ root claim

  /**
   * Systemd delegation: move this process into `leaf` of the root before enabling
   * controllers, because a group with processes cannot delegate controllers to children
   * ("no internal processes", cgroup-v2.rst).
   */
  async claimSelf(leaf: string): Promise<void> {
    // The leaf is made WITHOUT beforeChild: v2 would enable controllers in the root while
    // this process is still in it. cpuset and cpu (threaded controllers) are then accepted
    // and turn the root into a thread root, and `+memory` fails with EOPNOTSUPP
    // (cgroup-v2.rst "Threads"; seen in the real-guest test).
    this.claiming = true;
    try {
      await this.create(leaf);
    } finally {
      this.claiming = false;
    }
    await this.movePid(leaf, process.pid);
    await this.enableControllers();
  }

  /** v2: enable the limit controllers for the root's children. Hybrid: nothing to do. */
  async enableControllers(): Promise<void> {}

  /**
   * Kills whatever is left in the root (by cgroup) and removes the root itself from every
   * hierarchy. For roots we created (tests, bench); never for a delegated systemd cgroup.
   */
  async removeRoot(timeoutMs = this.opts.timeoutMs): Promise<void> {
    if (await pathExists(this.root)) await this.kill('', timeoutMs);
    // A pid placed only in a v1 group (by a test) is not in the unified root: kill it too.
    for (const h of this.hierarchies.slice(1)) {
      for (const pid of await readProcsRecursive(h.rootAbs)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    }
    for (const h of this.hierarchies)
      await rmTree(h.rootAbs, Math.max(this.opts.busyRetryMs, 2000));
  }
}
