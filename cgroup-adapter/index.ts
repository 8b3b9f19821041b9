/**
 * Opens the cgroup adapter: detects the layout (or takes the driver asked for), claims
 * the root in every hierarchy, and returns the driver. See README.md in this directory.
 */
import * as path from 'node:path';
import pino, { type Logger } from 'pino';
import { BaseDriver, type DriverOptions } from './base-driver';
import { mkdirOnce, pathExists, readText, rmdirRetry, writeText } from './cgfs';
import {
  type Layout,
  type V1Controller,
  detectLayout,
  parseProcCgroup,
  pathRelativeToMount,
  readMountinfo,
} from './detect';
import { CgroupError } from './errors';
import { HybridDriver } from './hybrid';
import { type NameMode, parseGroup, resolveBeneath } from './names';
import type { CgroupAdapter, DriverKind } from './types';
import { V2Driver } from './v2';
import { promises as fsp } from 'node:fs';

export * from './types';
export { CgroupError, isCgroupError, type CgroupErrorCode } from './errors';
export { spawnInto } from './spawn';
export type { BaseDriver } from './base-driver';

export interface OpenOptions {
  /**
   * The root, relative to each hierarchy's mount (`nestbroker-test-123`,
   * `nestbroker-demo/vm1`), or `{self: true}` for systemd delegation: our own cgroup from
   * /proc/self/cgroup, after moving this process into `leaf` (default `agent`).
   */
  root: string | { self: true; leaf?: string };
  driver?: 'auto' | DriverKind;
  /** Name rules for groups beneath the root (default strict). */
  names?: NameMode;
  /** /proc/self/mountinfo text (tests); read from /proc by default. */
  mountinfo?: string;
  /** /proc/self/cgroup text (tests); read from /proc by default. */
  procCgroup?: string;
  /** Create the root in every hierarchy when missing (each level; undone if a later step fails). */
  create?: boolean;
  log?: Logger;
  /** How long remove() retries EBUSY, ms (default 2000). */
  busyRetryMs?: number;
  /** Force kill's freeze + SIGKILL fallback (tests; kernels without cgroup.kill). */
  killMethod?: 'auto' | 'freeze-sigkill';
  /** Default timeout of freeze/thaw/kill, ms (default 10000). */
  timeoutMs?: number;
}

/** The adapter plus what tests, the bench and the host's own tooling need. */
export type CgroupDriver = CgroupAdapter &
  BaseDriver & {
    /** Directories openCgroupAdapter made (create: true), in order; removeCreated undoes them. */
    readonly createdDirs: readonly string[];
  };

export async function openCgroupAdapter(opts: OpenOptions): Promise<CgroupDriver> {
  const log = opts.log ?? pino({ level: 'silent' });
  const layout = detectLayout(opts.mountinfo ?? (await readMountinfo()));
  const kind: DriverKind = !opts.driver || opts.driver === 'auto' ? layout.kind : opts.driver;
  if (kind === 'hybrid' && Object.keys(layout.v1).length === 0) {
    throw new CgroupError(
      'NOT_DETECTED',
      'driver "hybrid" asked for, but no v1 controller is mounted',
      {
        field: 'driver',
        value: opts.driver,
      },
    );
  }
  const dopts: DriverOptions = {
    names: opts.names ?? 'strict',
    log,
    busyRetryMs: opts.busyRetryMs ?? 2000,
    killMethod: opts.killMethod ?? 'auto',
    timeoutMs: opts.timeoutMs ?? 10_000,
  };
  const self = typeof opts.root === 'object' && opts.root !== null && opts.root.self === true;
  const roots = self
    ? selfRoots(
        layout,
        kind,
        parseProcCgroup(opts.procCgroup ?? (await fsp.readFile('/proc/self/cgroup', 'utf8'))),
      )
    : namedRoots(layout, kind, opts.root as string);

  // Every directory made here, in order: a later step that fails (another hierarchy
  // read-only, a cpuset copy, enabling controllers) removes them again, deepest first, so
  // a refused start leaves no root behind in any hierarchy (style.md, "clean the directory
  // you created if a later step of creation fails").
  const made: string[] = [];
  try {
    for (const [name, abs] of Object.entries(roots)) {
      if (await pathExists(abs)) continue;
      if (!opts.create || self) {
        throw new CgroupError(
          'ENOENT',
          `root ${abs} (${name} hierarchy) does not exist; pass create: true to make it`,
          {
            file: abs,
          },
        );
      }
      // One level at a time (not mkdir -p): the kernel's errno for the level that failed is
      // kept (a recursive mkdir on a read-only mount reported ENOENT for EROFS), and each
      // level made is known for the undo.
      const mount =
        name === 'unified'
          ? layout.unified.mountPoint
          : layout.v1[name as V1Controller]!.mountPoint;
      let cur = mount;
      for (const seg of path.relative(mount, abs).split(path.sep)) {
        cur = path.join(cur, seg);
        if (await mkdirOnce(cur)) made.push(cur);
      }
      if (name === 'cpuset') await copyCpusetDown(layout.v1.cpuset!.mountPoint, abs);
    }

    const { unified, ...v1 } = roots;
    const driver =
      kind === 'v2'
        ? await V2Driver.open(unified, dopts)
        : await HybridDriver.open(unified, v1 as Partial<Record<V1Controller, string>>, dopts);
    if (self) {
      const leaf = (opts.root as { leaf?: string }).leaf ?? 'agent';
      parseGroup(leaf, { field: 'root.leaf' });
      await driver.claimSelf(leaf);
    } else if (opts.create) {
      await driver.enableControllers();
    }
    log.info({ kind, root: driver.root, hierarchies: driver.hierarchies }, 'cgroup adapter open');
    return Object.assign(driver, { createdDirs: Object.freeze([...made]) }) as CgroupDriver;
  } catch (err) {
    await removeCreated(made, dopts.busyRetryMs, log);
    throw err;
  }
}

/**
 * Removes directories made by openCgroupAdapter, deepest first (for a start-up that fails
 * after the adapter opened: agent/guest/agent.ts). A directory that still has groups or
 * processes stays (rmdir refuses it: EBUSY / ENOTEMPTY), and is logged.
 */
export async function removeCreated(
  dirs: readonly string[],
  busyRetryMs: number,
  log: Logger,
): Promise<void> {
  for (const d of [...dirs].reverse())
    await rmdirRetry(d, busyRetryMs).then(
      () => log.info({ dir: d }, 'undoing a failed start: removed a directory it made'),
      (err: unknown) =>
        log.warn({ dir: d, err }, 'undoing a failed start: could not remove a directory it made'),
    );
}

/** `root` below each hierarchy's mount point, checked with the systemd name rules. */
function namedRoots(layout: Layout, kind: DriverKind, root: string): Record<string, string> {
  parseGroup(root, { mode: 'systemd', field: 'root' });
  const out: Record<string, string> = {
    unified: resolveBeneath(layout.unified.mountPoint, root, { mode: 'systemd', field: 'root' }),
  };
  if (kind === 'hybrid') {
    for (const [c, m] of Object.entries(layout.v1)) {
      out[c] = resolveBeneath(m.mountPoint, root, { mode: 'systemd', field: 'root' });
    }
  }
  return out;
}

/** Our own cgroup in each hierarchy (they may differ under hybrid). */
function selfRoots(
  layout: Layout,
  kind: DriverKind,
  pc: ReturnType<typeof parseProcCgroup>,
): Record<string, string> {
  if (pc.unified === undefined) {
    throw new CgroupError(
      'NOT_DETECTED',
      '/proc/self/cgroup has no "0::" line (not in a cgroup2 hierarchy)',
      {
        file: '/proc/self/cgroup',
      },
    );
  }
  const at = (mountPoint: string, rel: string) =>
    rel === '' ? mountPoint : resolveBeneath(mountPoint, rel, { mode: 'systemd', field: 'root' });
  const out: Record<string, string> = {
    unified: at(layout.unified.mountPoint, pathRelativeToMount(layout.unified, pc.unified)),
  };
  if (kind === 'hybrid') {
    for (const [c, m] of Object.entries(layout.v1)) {
      const p = pc.v1[c];
      if (p !== undefined) out[c] = at(m.mountPoint, pathRelativeToMount(m, p));
    }
  }
  return out;
}

/** v1 cpuset: every new level needs cpus and mems before anything can join below it. */
async function copyCpusetDown(mount: string, leaf: string): Promise<void> {
  const rel = path.relative(mount, leaf).split(path.sep);
  let cur = mount;
  for (const seg of rel) {
    const next = path.join(cur, seg);
    for (const f of ['cpuset.mems', 'cpuset.cpus']) {
      const mine = (await readText(path.join(next, f))).trim();
      if (mine === '')
        await writeText(path.join(next, f), (await readText(path.join(cur, f))).trim());
    }
    cur = next;
  }
}
