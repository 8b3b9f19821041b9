/**
 * Single-value checks of the guest config (docs/config-guest.md): each returns a
 * ParseResult whose message names what it received, so the schema
 * (agent/guest/config-schema.ts) and the cross-field checks (agent/guest/config-cross.ts)
 * report a bad value the same way.
 */
import { constants as osConstants } from 'os';
import * as path from 'path';
import { describe, parseCpus, parseDuration, parseSize, type ParseResult } from '../common/units';
import { checkInt } from '../common/config-check';
import { MAX_SOCKET_PATH_BYTES, MIN_CPU_MAX, PID_MAX_LIMIT } from './config-defaults';
import type { RestartPolicy } from './config-types';

// ---------------------------------------------------------------------------------------
// Single-value checks: each returns a ParseResult whose message names what it received
// ---------------------------------------------------------------------------------------

export const NAME_RE = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

/**
 * Names that would collide with interface files in a cgroup directory (cgroup-v2.rst
 * "Interface Files" and the v1 controllers' files: `cgroup.procs`, `memory.max`, `tasks`).
 */
const RESERVED_NAME_RE =
  /^(cgroup|memory|cpu|cpuset|cpuacct|io|blkio|pids|rdma|hugetlb|misc|freezer|devices|net_cls|net_prio|perf_event)(\.|$)|^(tasks|notify_on_release|release_agent)$/;

function firstNonAscii(s: string): string | undefined {
  for (const ch of s) {
    const cp = ch.codePointAt(0) ?? 0;
    if (cp < 0x20 || cp > 0x7e) return `U+${cp.toString(16).toUpperCase().padStart(4, '0')}`;
  }
  return undefined;
}

/** Project and guest names: the name of a cgroup directory and of a run directory. */
export function checkName(v: unknown): ParseResult<string> {
  if (typeof v !== 'string') return { ok: false, message: `must be a name, got ${describe(v)}` };
  const odd = firstNonAscii(v);
  if (odd)
    return {
      ok: false,
      message: `must be plain lowercase ASCII (a-z 0-9 _ . -), got ${describe(v)} which contains ${odd}`,
    };
  if (v.length > 63)
    return { ok: false, message: `must be at most 63 characters, got ${v.length}: ${describe(v)}` };
  if (!NAME_RE.test(v))
    return {
      ok: false,
      message: `must match ${NAME_RE.source} (start with a letter or digit; no "/"), got ${describe(v)}`,
    };
  if (RESERVED_NAME_RE.test(v))
    return {
      ok: false,
      message: `would collide with a cgroup interface file, got ${describe(v)}`,
    };
  return { ok: true, value: v };
}

/** A cgroup segment made by others (systemd units: `nestbroker-guest.service`, `user@0.service`). */
const CGROUP_SEGMENT_RE = /^[A-Za-z0-9_.@:\\-]{1,255}$/;

/** A path of cgroup directories, relative, that cannot climb out of where it is resolved. */
export function checkRelativeCgroupPath(v: unknown): ParseResult<string> {
  if (typeof v !== 'string')
    return { ok: false, message: `must be a relative cgroup path, got ${describe(v)}` };
  const odd = firstNonAscii(v);
  if (odd) return { ok: false, message: `must be ASCII, got ${describe(v)} which contains ${odd}` };
  if (v.startsWith('/'))
    return { ok: false, message: `must be relative (no leading "/"), got ${describe(v)}` };
  const segs = v.split('/');
  if (v === '' || segs.some((s) => s === ''))
    return { ok: false, message: `must not have empty segments, got ${describe(v)}` };
  for (const s of segs) {
    if (s === '.' || s === '..')
      return { ok: false, message: `must not contain "." or "..", got ${describe(v)}` };
    if (!CGROUP_SEGMENT_RE.test(s))
      return {
        ok: false,
        message: `has a segment ${describe(s)} with characters a cgroup name cannot have`,
      };
    if (RESERVED_NAME_RE.test(s))
      return {
        ok: false,
        message: `has a segment ${describe(s)} that is a cgroup interface file name`,
      };
  }
  return { ok: true, value: v };
}

export function checkCgroupRoot(v: unknown): ParseResult<string> {
  return v === 'self' ? { ok: true, value: 'self' } : checkRelativeCgroupPath(v);
}

export function checkAbsolutePath(v: unknown): ParseResult<string> {
  if (typeof v !== 'string')
    return { ok: false, message: `must be an absolute path, got ${describe(v)}` };
  if ([...v].some((ch) => ch.charCodeAt(0) < 0x20 || ch.charCodeAt(0) === 0x7f))
    return { ok: false, message: `must not contain control characters or NUL, got ${describe(v)}` };
  if (!v.startsWith('/')) return { ok: false, message: `must be absolute, got ${describe(v)}` };
  if (v.split('/').includes('..'))
    return { ok: false, message: `must not contain "..", got ${describe(v)}` };
  if (v.length > 4095) return { ok: false, message: `is longer than 4095 bytes` };
  const n = path.posix.normalize(v);
  return { ok: true, value: n.length > 1 && n.endsWith('/') ? n.slice(0, -1) : n };
}

export function checkSocketPath(v: unknown): ParseResult<string> {
  const r = checkAbsolutePath(v);
  if (!r.ok) return r;
  const bytes = Buffer.byteLength(r.value);
  if (bytes > MAX_SOCKET_PATH_BYTES)
    return {
      ok: false,
      message: `is ${bytes} bytes; a unix socket path holds at most ${MAX_SOCKET_PATH_BYTES}`,
    };
  return r;
}

const SIGNALS = Object.keys(osConstants.signals);

/** `SIGTERM` or `TERM` → `SIGTERM`; only names this kernel has (os.constants.signals). */
export function checkSignal(v: unknown, refuse: readonly string[] = []): ParseResult<string> {
  if (typeof v !== 'string')
    return { ok: false, message: `must be a signal name like "SIGTERM", got ${describe(v)}` };
  const name = v.toUpperCase().startsWith('SIG') ? v.toUpperCase() : `SIG${v.toUpperCase()}`;
  if (!SIGNALS.includes(name) || v !== v.trim())
    return {
      ok: false,
      message: `is not a signal name (e.g. SIGTERM, SIGINT), got ${describe(v)}`,
    };
  if (refuse.includes(name))
    return { ok: false, message: `cannot be ${name} here (refused: ${refuse.join(', ')})` };
  return { ok: true, value: name };
}

/** Stop signals whose default action does not end a process (signal(7)). */
export const NOT_STOPPING = [
  'SIGSTOP',
  'SIGTSTP',
  'SIGTTIN',
  'SIGTTOU',
  'SIGCONT',
  'SIGCHLD',
  'SIGURG',
  'SIGWINCH',
];
/** A notice signal must be one the project can catch. */
export const UNCATCHABLE = ['SIGKILL', 'SIGSTOP'];

export function checkMemoryMax(v: unknown): ParseResult<number | 'max'> {
  if (v === 'max') return { ok: true, value: 'max' };
  const r = parseSize(v);
  if (!r.ok)
    return {
      ok: false,
      message: `must be bytes, a size like "1GiB", or "max", got ${describe(v)}`,
    };
  if (r.value === 0) return { ok: false, message: `must be above 0 (a limit of 0 is an OOM kill)` };
  return r;
}

export function checkCpuMax(v: unknown): ParseResult<number | 'max'> {
  if (v === 'max') return { ok: true, value: 'max' };
  const r = parseCpus(v);
  if (!r.ok)
    return {
      ok: false,
      message: `must be a number of CPUs (e.g. 0.5) or "max", got ${describe(v)}`,
    };
  if (r.value < MIN_CPU_MAX)
    return {
      ok: false,
      message: `must be at least ${MIN_CPU_MAX} CPUs (cpu.max quota ≥ 1000µs), got ${describe(v)}`,
    };
  return r;
}

export function checkPidsMax(v: unknown): ParseResult<number | 'max'> {
  return v === 'max' ? { ok: true, value: 'max' } : checkInt(1, PID_MAX_LIMIT, 'a count')(v);
}

export function checkPositiveDuration(v: unknown): ParseResult<number> {
  const r = parseDuration(v);
  if (!r.ok) return r;
  if (r.value <= 0) return { ok: false, message: `must be above 0, got ${describe(v)}` };
  return r;
}

export function checkRestartPolicy(v: unknown): ParseResult<RestartPolicy> {
  // YAML 1.1 readers turn a bare `no` into false: taken as the policy it meant.
  if (v === false) return { ok: true, value: 'no' };
  if (v === 'no' || v === 'on-failure' || v === 'always') return { ok: true, value: v };
  return { ok: false, message: `must be no, on-failure or always, got ${describe(v)}` };
}

export function checkUsageInterval(v: unknown): ParseResult<number> {
  const r = parseDuration(v);
  if (!r.ok) return r;
  if (r.value < 100 || r.value > 3_600_000)
    return { ok: false, message: `must be from 100ms to 1h, got ${describe(v)}` };
  return r;
}

const USER_RE = /^[a-z_][a-z0-9_-]{0,31}\$?$/;
export function checkUser(v: unknown): ParseResult<string | number> {
  if (typeof v === 'number') return checkInt(0, 0xfffffffe, 'a uid')(v);
  if (typeof v === 'string' && USER_RE.test(v)) return { ok: true, value: v };
  return { ok: false, message: `must be a user name or a uid, got ${describe(v)}` };
}

export function checkGroup(v: unknown): ParseResult<string | number> {
  if (typeof v === 'number') return checkInt(0, 0xfffffffe, 'a gid')(v);
  if (typeof v === 'string' && USER_RE.test(v)) return { ok: true, value: v };
  return { ok: false, message: `must be a group name or a gid, got ${describe(v)}` };
}

export function checkArg(v: unknown): ParseResult<string> {
  if (typeof v !== 'string') return { ok: false, message: `must be a string, got ${describe(v)}` };
  if (v.includes('\0')) return { ok: false, message: `must not contain NUL, got ${describe(v)}` };
  return { ok: true, value: v };
}

export const ENV_KEY_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;
export function checkEnvValue(v: unknown): ParseResult<string> {
  // YAML reads `PORT: 8080` as a number; the environment only holds strings.
  if (typeof v === 'number' && Number.isFinite(v)) return { ok: true, value: String(v) };
  if (typeof v === 'boolean') return { ok: true, value: String(v) };
  return checkArg(v);
}

// Shared with the host config (agent/common/config-check.ts).
export { checkBool, checkHost, checkInt, rec, val } from '../common/config-check';
