/**
 * Which cgroup layout this machine has, from /proc/self/mountinfo (proc(5)), and where
 * this process sits, from /proc/self/cgroup (cgroups(7)). Both texts can be injected so
 * the parsing is tested on fixture text.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { CgroupError } from './errors';
import type { DriverKind } from './types';

/** v1 controllers the hybrid driver uses for limits and usage. */
export const V1_CONTROLLERS = ['memory', 'cpu', 'cpuacct', 'cpuset', 'pids'] as const;
export type V1Controller = (typeof V1_CONTROLLERS)[number];

export interface CgroupMount {
  mountPoint: string;
  /** The mount's root inside its hierarchy (not "/" inside cgroup namespaces/bind mounts). */
  root: string;
  fstype: 'cgroup' | 'cgroup2';
  /** v1 controllers of this hierarchy (e.g. ["cpu","cpuacct"] when comounted). */
  controllers: string[];
}

export interface Layout {
  kind: DriverKind;
  /** cgroup2 mount point (e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified). */
  unified: CgroupMount;
  /** v1 mounts by controller; cpu and cpuacct point at the same mount when comounted. */
  v1: Partial<Record<V1Controller, CgroupMount>>;
}

/** Undoes mountinfo's octal escapes (`\040` for space, `\011`, `\012`, `\134`). */
function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Every cgroup/cgroup2 mount in a mountinfo text. */
export function parseMountinfo(text: string): CgroupMount[] {
  const out: CgroupMount[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const pre = line.slice(0, sep).split(' ');
    const post = line.slice(sep + 3).split(' ');
    const fstype = post[0];
    if (fstype !== 'cgroup' && fstype !== 'cgroup2') continue;
    if (pre.length < 5) continue;
    const superOpts = (post[2] ?? '').split(',');
    const controllers =
      fstype === 'cgroup'
        ? superOpts.filter(
            (o) => o !== 'rw' && o !== 'ro' && !o.includes('=') && /^[a-z_]+$/.test(o),
          )
        : [];
    out.push({
      mountPoint: unescapeMountinfo(pre[4]),
      root: unescapeMountinfo(pre[3]),
      fstype,
      controllers: controllers.filter(
        (c) =>
          ![
            'noprefix',
            'xattr',
            'clone_children',
            'cpuset_v2_mode',
            'favordynmods',
            'nsdelegate',
            'memory_recursiveprot',
            'memory_localevents',
          ].includes(c),
      ),
    });
  }
  return out;
}

/** Prefer mounts under /sys/fs/cgroup when a hierarchy is mounted twice. */
function preferred(mounts: CgroupMount[]): CgroupMount | undefined {
  return mounts.find((m) => m.mountPoint.startsWith('/sys/fs/cgroup')) ?? mounts[0];
}

/**
 * `v2` when cgroup2 is mounted and none of the v1 controllers we use is; `hybrid` when
 * cgroup2 (for membership, freeze, kill, events, PSI) sits beside v1 controllers.
 * Pure v1 (no cgroup2 at all) is not supported: NOT_DETECTED.
 */
export function detectLayout(mountinfo: string): Layout {
  const mounts = parseMountinfo(mountinfo);
  const unified = preferred(mounts.filter((m) => m.fstype === 'cgroup2'));
  if (!unified) {
    throw new CgroupError(
      'NOT_DETECTED',
      'no cgroup2 mount in /proc/self/mountinfo: pure cgroup v1 is not supported (need the unified hierarchy for membership, freeze and kill)',
      { file: '/proc/self/mountinfo' },
    );
  }
  const v1: Partial<Record<V1Controller, CgroupMount>> = {};
  for (const c of V1_CONTROLLERS) {
    const m = preferred(mounts.filter((x) => x.fstype === 'cgroup' && x.controllers.includes(c)));
    if (m) v1[c] = m;
  }
  return { kind: Object.keys(v1).length > 0 ? 'hybrid' : 'v2', unified, v1 };
}

export interface ProcCgroup {
  /** Path in the unified hierarchy (the `0::` line), if any. */
  unified?: string;
  /** Path per v1 controller (`4:memory:/x` → memory: "/x"; `1:cpu,cpuacct:/y` → both). */
  v1: Record<string, string>;
}

/** Parses /proc/<pid>/cgroup (cgroups(7): `hierarchy-ID:controller-list:cgroup-path`). */
export function parseProcCgroup(text: string): ProcCgroup {
  const out: ProcCgroup = { v1: {} };
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    const a = line.indexOf(':');
    const b = line.indexOf(':', a + 1);
    if (a < 0 || b < 0) {
      throw new CgroupError(
        'PARSE_FAILED',
        `/proc/self/cgroup line must be "ID:CONTROLLERS:PATH", got ${JSON.stringify(line)}`,
        {
          field: '/proc/self/cgroup',
          value: line,
        },
      );
    }
    const id = line.slice(0, a);
    const ctrls = line.slice(a + 1, b);
    const p = line.slice(b + 1);
    if (id === '0' && ctrls === '') out.unified = p;
    else for (const c of ctrls.split(',')) if (c && !c.startsWith('name=')) out.v1[c] = p;
  }
  return out;
}

/**
 * The group path relative to a mount: /proc/self/cgroup paths are relative to the
 * hierarchy's root, and a mount may expose only a subtree (`mount.root`).
 */
export function pathRelativeToMount(mount: CgroupMount, cgPath: string): string {
  const rel = path.posix.relative(mount.root, cgPath);
  if (rel.startsWith('..')) {
    throw new CgroupError(
      'NOT_DETECTED',
      `cgroup ${JSON.stringify(cgPath)} is not visible under the mount ${mount.mountPoint} (root ${mount.root})`,
      { file: mount.mountPoint },
    );
  }
  return rel;
}

export async function readMountinfo(): Promise<string> {
  return fsp.readFile('/proc/self/mountinfo', 'utf8');
}

export async function readProcCgroup(pid: number | 'self' = 'self'): Promise<ProcCgroup> {
  return parseProcCgroup(await fsp.readFile(`/proc/${pid}/cgroup`, 'utf8'));
}
