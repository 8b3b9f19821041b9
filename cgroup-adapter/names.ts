/**
 * Group names and the one function that turns a group path into a directory.
 *
 * Two modes:
 * - `strict` (projects, everything we create): `^[a-z0-9][a-z0-9_.-]{0,62}$` per segment
 *   (docs/config-guest.md), and never a name that could be read as a cgroup interface file.
 * - `systemd` (operator-configured groups that already exist, e.g. libvirt's
 *   `machine.slice/machine-qemu\x2d1\x2dvm1.scope`): segments of `[A-Za-z0-9:_.@\-]`,
 *   still never `.`/`..`, `/` inside a segment, NUL or an interface-file name.
 *
 * Whatever the mode, resolveBeneath proves with path.resolve + a prefix check that the
 * result is inside the root, so a bug in the rules above still cannot escape it.
 */
import * as path from 'node:path';
import { CgroupError, invalidValue } from './errors';

export type NameMode = 'strict' | 'systemd';

const STRICT_SEGMENT = /^[a-z0-9][a-z0-9_.-]{0,62}$/;
const SYSTEMD_SEGMENT = /^[A-Za-z0-9:_.@\\-]{1,255}$/;

/**
 * Prefixes of interface files: the kernel names its files `<controller>.<knob>` (v1 and v2,
 * Documentation/admin-guide/cgroup-v2.rst "Conventions"), so a group called `memory.max`
 * would sit beside (and be confused with) the file of that name.
 */
export const INTERFACE_PREFIXES = [
  'cgroup',
  'cpu',
  'cpuacct',
  'cpuset',
  'memory',
  'memsw',
  'io',
  'blkio',
  'pids',
  'hugetlb',
  'rdma',
  'misc',
  'freezer',
  'devices',
  'net_cls',
  'net_prio',
  'perf_event',
  'irq',
] as const;

/** v1 interface files without a controller prefix. */
export const INTERFACE_NAMES = ['tasks', 'notify_on_release', 'release_agent'] as const;

function looksLikeInterfaceFile(seg: string): boolean {
  const lower = seg.toLowerCase();
  if ((INTERFACE_NAMES as readonly string[]).includes(lower)) return true;
  return INTERFACE_PREFIXES.some((p) => lower.startsWith(`${p}.`));
}

/** Checks one segment; throws NAME_INVALID naming the field and the value. */
export function checkSegment(seg: string, mode: NameMode, field = 'group'): void {
  if (seg.includes('\0')) throw invalidValue('NAME_INVALID', field, seg, 'must not contain NUL');
  if (seg === '.' || seg === '..') {
    throw invalidValue('NAME_INVALID', field, seg, 'must not be "." or ".."');
  }
  if (mode === 'strict') {
    if (!STRICT_SEGMENT.test(seg)) {
      throw invalidValue('NAME_INVALID', field, seg, 'must match ^[a-z0-9][a-z0-9_.-]{0,62}$');
    }
  } else if (!SYSTEMD_SEGMENT.test(seg)) {
    throw invalidValue('NAME_INVALID', field, seg, 'must be 1-255 of [A-Za-z0-9:_.@\\-]');
  }
  if (looksLikeInterfaceFile(seg)) {
    throw invalidValue(
      'NAME_INVALID',
      field,
      seg,
      'must not look like a cgroup interface file (e.g. "cgroup.procs", "memory.max", "tasks")',
    );
  }
}

/**
 * Splits and checks a group path ("projects/web"). `""` is the root itself and is only
 * accepted when `allowRoot` (reads, kill, freeze); never for create/remove/move/limits.
 */
export function parseGroup(
  group: string,
  opts: { mode?: NameMode; allowRoot?: boolean; field?: string } = {},
): string[] {
  const field = opts.field ?? 'group';
  if (typeof group !== 'string') {
    throw invalidValue('NAME_INVALID', field, group, 'must be a string');
  }
  if (group === '') {
    if (opts.allowRoot) return [];
    throw invalidValue('NAME_INVALID', field, group, 'must not be empty');
  }
  if (group.includes('\0'))
    throw invalidValue('NAME_INVALID', field, group, 'must not contain NUL');
  if (group.startsWith('/') || group.endsWith('/') || group.includes('//')) {
    throw invalidValue(
      'NAME_INVALID',
      field,
      group,
      'must be a relative path of names joined by "/" (no leading, trailing or double "/")',
    );
  }
  const segs = group.split('/');
  if (segs.length === 1) {
    checkSegment(group, opts.mode ?? 'strict', field);
    return segs;
  }
  for (const seg of segs) {
    try {
      checkSegment(seg, opts.mode ?? 'strict', `${field} segment`);
    } catch (e) {
      // Name the whole value the caller gave, not only the offending segment.
      throw new CgroupError(
        'NAME_INVALID',
        `${field} ${JSON.stringify(group)}: ${(e as Error).message}`,
        {
          field,
          value: group,
          cause: e,
        },
      );
    }
  }
  return segs;
}

/** True when `child` is `parent` or inside it (both absolute, resolved). */
export function isBeneath(parent: string, child: string): boolean {
  const p = path.resolve(parent);
  const c = path.resolve(child);
  return c === p || c.startsWith(p.endsWith(path.sep) ? p : p + path.sep);
}

/**
 * The absolute directory of `group` beneath `rootAbs`. Checks the name, then proves
 * (path.resolve + prefix check) the result is inside the root: OUTSIDE_ROOT otherwise.
 */
export function resolveBeneath(
  rootAbs: string,
  group: string,
  opts: { mode?: NameMode; allowRoot?: boolean; field?: string } = {},
): string {
  if (!path.isAbsolute(rootAbs)) {
    throw new CgroupError('OUTSIDE_ROOT', `root must be absolute, got ${JSON.stringify(rootAbs)}`, {
      field: 'root',
      value: rootAbs,
    });
  }
  const segs = parseGroup(group, opts);
  const root = path.resolve(rootAbs);
  const abs = path.resolve(root, ...segs);
  if (!isBeneath(root, abs) || (segs.length > 0 && abs === root)) {
    throw invalidValue('OUTSIDE_ROOT', opts.field ?? 'group', group, `must stay beneath ${root}`);
  }
  return abs;
}
