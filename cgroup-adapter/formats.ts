/**
 * Pure parsers and printers of cgroup v2 file formats (and the flat-keyed stat format v1
 * shares). No I/O here: tests feed fixture text (test/unit/cgroup-adapter/formats.test.ts).
 *
 * v2 printers never produce `-1` or `""`: unlimited is the token `max`
 * (Documentation/admin-guide/cgroup-v2.rst "Conventions"). v1's own formats (`-1` for
 * unlimited) live only in formats-v1.ts, used only by the hybrid driver.
 */
import { CgroupError, invalidValue } from './errors';
import type { CpuMax, GroupEvents, Max, PressureStat, Psi } from './types';

// ---------------------------------------------------------------------------- max token

/** A byte count or count limit: a non-negative safe integer, or `max`. */
export function checkMax(field: string, v: unknown): Max {
  if (v === 'max') return 'max';
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return v;
  throw invalidValue('LIMIT_INVALID', field, v, 'must be a non-negative integer or "max"');
}

export function printMax(field: string, v: Max): string {
  const ok = checkMax(field, v);
  return ok === 'max' ? 'max' : String(ok);
}

export function parseMax(field: string, text: string): Max {
  const t = text.trim();
  if (t === 'max') return 'max';
  return parseUint(field, t);
}

export function parseUint(field: string, text: string): number {
  const t = text.trim();
  if (!/^\d+$/.test(t)) throw parseFailed(field, text, 'an unsigned integer');
  const n = Number(t);
  if (!Number.isSafeInteger(n)) throw parseFailed(field, text, 'an integer below 2^53');
  return n;
}

export function parseFailed(field: string, text: string, expected: string): CgroupError {
  return new CgroupError(
    'PARSE_FAILED',
    `${field} must hold ${expected}, got ${JSON.stringify(text.length > 200 ? text.slice(0, 200) + '…' : text)}`,
    { field, value: text },
  );
}

// ---------------------------------------------------------------------------- cpu.max

/** Kernel bounds (kernel/sched/core.c: min_cfs_quota_period 1ms, max_cfs_quota_period 1s). */
export const CPU_PERIOD_MIN_US = 1000;
export const CPU_PERIOD_MAX_US = 1_000_000;
export const CPU_QUOTA_MIN_US = 1000;
/** max_cfs_runtime = MAX_BW µs (2^44 - 1, kernel/sched/sched.h BW_SHIFT 20). */
export const CPU_QUOTA_MAX_US = 2 ** 44 - 1;
export const CPU_PERIOD_DEFAULT_US = 100_000;

/** Rejects what the kernel rejects (EINVAL), naming the field. */
export function checkCpuMax(v: CpuMax, field = 'cpu.max'): CpuMax {
  if (typeof v !== 'object' || v === null) {
    throw invalidValue('LIMIT_INVALID', field, v, 'must be {quotaUs, periodUs}');
  }
  const { quotaUs, periodUs } = v;
  if (
    !Number.isSafeInteger(periodUs) ||
    periodUs < CPU_PERIOD_MIN_US ||
    periodUs > CPU_PERIOD_MAX_US
  ) {
    throw invalidValue(
      'LIMIT_INVALID',
      `${field}.periodUs`,
      periodUs,
      `must be an integer from ${CPU_PERIOD_MIN_US} to ${CPU_PERIOD_MAX_US} µs`,
    );
  }
  if (quotaUs !== 'max') {
    if (
      typeof quotaUs !== 'number' ||
      !Number.isSafeInteger(quotaUs) ||
      quotaUs < CPU_QUOTA_MIN_US ||
      quotaUs > CPU_QUOTA_MAX_US
    ) {
      throw invalidValue(
        'LIMIT_INVALID',
        `${field}.quotaUs`,
        quotaUs,
        `must be "max" or an integer from ${CPU_QUOTA_MIN_US} to ${CPU_QUOTA_MAX_US} µs`,
      );
    }
  }
  return { quotaUs, periodUs };
}

/** `"max 100000"`, `"50000 100000"`. */
export function printCpuMax(v: CpuMax): string {
  const c = checkCpuMax(v);
  return `${c.quotaUs === 'max' ? 'max' : c.quotaUs} ${c.periodUs}`;
}

export function parseCpuMax(text: string): CpuMax {
  const m = /^(max|\d+) (\d+)$/.exec(text.trim());
  if (!m) throw parseFailed('cpu.max', text, '"QUOTA PERIOD" (QUOTA a number or "max")');
  return {
    quotaUs: m[1] === 'max' ? 'max' : parseUint('cpu.max', m[1]),
    periodUs: parseUint('cpu.max', m[2]),
  };
}

/** CPUs' worth of bandwidth a cpu.max grants (`Infinity` for `max`). */
export function cpuMaxToCpus(v: CpuMax): number {
  return v.quotaUs === 'max' ? Infinity : v.quotaUs / v.periodUs;
}

// ---------------------------------------------------------------------------- cpu.weight

export const CPU_WEIGHT_MIN = 1;
export const CPU_WEIGHT_MAX = 10_000;
export const CPU_WEIGHT_DEFAULT = 100;

export function checkCpuWeight(v: unknown, field = 'cpu.weight'): number {
  if (typeof v === 'number' && Number.isInteger(v) && v >= CPU_WEIGHT_MIN && v <= CPU_WEIGHT_MAX) {
    return v;
  }
  throw invalidValue('LIMIT_INVALID', field, v, `must be an integer from 1 to 10000`);
}

export function printCpuWeight(v: number): string {
  return String(checkCpuWeight(v));
}

export function parseCpuWeight(text: string): number {
  return checkCpuWeight(parseUint('cpu.weight', text));
}

// ---------------------------------------------------------------------------- flat keyed

/**
 * `key value` per line: memory.events, memory.stat, cpu.stat, cgroup.events, pids.events,
 * and v1's memory.oom_control and cpu.stat. Values must be unsigned integers.
 */
export function parseFlatKeyed(text: string, field: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '') continue;
    const m = /^(\S+)\s+(\d+)$/.exec(line);
    if (!m) throw parseFailed(field, line, '"KEY VALUE" lines');
    const n = Number(m[2]);
    // memory.stat may hold values above 2^53 in theory; clamp rather than lie about type.
    out[m[1]] = Number.isSafeInteger(n) ? n : Number.MAX_SAFE_INTEGER;
  }
  return out;
}

export interface MemoryEvents {
  low: number;
  high: number;
  max: number;
  oom: number;
  oomKill: number;
  oomGroupKill: number;
}

/** memory.events (cgroup-v2.rst "memory.events"); missing keys (older kernels) read 0. */
export function parseMemoryEvents(text: string): MemoryEvents {
  const kv = parseFlatKeyed(text, 'memory.events');
  return {
    low: kv.low ?? 0,
    high: kv.high ?? 0,
    max: kv.max ?? 0,
    oom: kv.oom ?? 0,
    oomKill: kv.oom_kill ?? 0,
    oomGroupKill: kv.oom_group_kill ?? 0,
  };
}

export function parseMemoryStat(text: string): Record<string, number> {
  return parseFlatKeyed(text, 'memory.stat');
}

export interface CpuStat {
  usageUs: number;
  userUs: number;
  systemUs: number;
  nrPeriods: number;
  nrThrottled: number;
  throttledUs: number;
}

/**
 * v2 cpu.stat. Without the cpu controller enabled only usage_usec/user_usec/system_usec
 * appear (the core part); the bandwidth keys then read 0.
 */
export function parseCpuStatV2(text: string): CpuStat {
  const kv = parseFlatKeyed(text, 'cpu.stat');
  if (kv.usage_usec === undefined) throw parseFailed('cpu.stat', text, 'a usage_usec line');
  return {
    usageUs: kv.usage_usec,
    userUs: kv.user_usec ?? 0,
    systemUs: kv.system_usec ?? 0,
    nrPeriods: kv.nr_periods ?? 0,
    nrThrottled: kv.nr_throttled ?? 0,
    throttledUs: kv.throttled_usec ?? 0,
  };
}

export function parseCgroupEvents(text: string): GroupEvents {
  const kv = parseFlatKeyed(text, 'cgroup.events');
  if (kv.populated === undefined) throw parseFailed('cgroup.events', text, 'a populated line');
  // `frozen` appears from 5.2; absent means the group cannot be frozen, so it is not.
  return { populated: kv.populated === 1, frozen: kv.frozen === 1 };
}

// ---------------------------------------------------------------------------- PSI

function parsePsiLine(field: string, line: string): Psi {
  const m =
    /^(?:some|full) avg10=(\d+(?:\.\d+)?) avg60=(\d+(?:\.\d+)?) avg300=(\d+(?:\.\d+)?) total=(\d+)$/.exec(
      line.trim(),
    );
  if (!m) throw parseFailed(field, line, '"some|full avg10=F avg60=F avg300=F total=N"');
  return {
    avg10: Number(m[1]),
    avg60: Number(m[2]),
    avg300: Number(m[3]),
    totalUs: parseUint(field, m[4]),
  };
}

/**
 * memory.pressure, cpu.pressure, io.pressure (Documentation/accounting/psi.rst). `full`
 * is absent for cpu on kernels before 5.13 (and at the system level it reads all zero).
 */
export function parsePressure(text: string, field = 'pressure'): PressureStat {
  let some: Psi | undefined;
  let full: Psi | undefined;
  for (const line of text.split('\n')) {
    if (line.trim() === '') continue;
    if (line.startsWith('some ')) some = parsePsiLine(field, line);
    else if (line.startsWith('full ')) full = parsePsiLine(field, line);
    else throw parseFailed(field, line, '"some ..." or "full ..." lines');
  }
  if (!some) throw parseFailed(field, text, 'a "some" line');
  return full ? { some, full } : { some };
}

// ---------------------------------------------------------------------------- cpuset lists

/** Highest CPU or node number we accept in a list (NR_CPUS is at most 8192 in practice). */
export const CPUSET_MAX_ID = 8191;

/** "0-3,5,7-8" → [0,1,2,3,5,7,8]. `""` (an empty set) is allowed here: reads may show it. */
export function parseCpuList(text: string, field = 'cpuset.cpus'): number[] {
  const t = text.trim();
  if (t === '') return [];
  const out = new Set<number>();
  for (const part of t.split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!m) throw invalidValue('LIMIT_INVALID', field, text, 'must be a list like "0-3,5"');
    const a = Number(m[1]);
    const b = m[2] === undefined ? a : Number(m[2]);
    if (b < a || b > CPUSET_MAX_ID) {
      throw invalidValue(
        'LIMIT_INVALID',
        field,
        text,
        `must have ranges low-high up to ${CPUSET_MAX_ID}`,
      );
    }
    for (let i = a; i <= b; i++) out.add(i);
  }
  return [...out].sort((x, y) => x - y);
}

/** [0,1,2,3,5] → "0-3,5" (the kernel's own canonical form). */
export function printCpuList(ids: readonly number[]): string {
  const sorted = [...new Set(ids)].sort((x, y) => x - y);
  const parts: string[] = [];
  for (let i = 0; i < sorted.length;) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
    parts.push(i === j ? `${sorted[i]}` : `${sorted[i]}-${sorted[j]}`);
    i = j + 1;
  }
  return parts.join(',');
}

/**
 * A cpuset.cpus value to write: a non-empty list, printed canonically. An empty list is
 * refused for writes: in v2 it means "inherit" and in v1 it empties the set, neither of
 * which is a limit (and CONTRIBUTING.md: never write `""`).
 */
export function normalizeCpuList(v: unknown, field = 'cpus'): string {
  if (typeof v !== 'string')
    throw invalidValue('LIMIT_INVALID', field, v, 'must be a string like "0-1"');
  const ids = parseCpuList(v, field);
  if (ids.length === 0) throw invalidValue('LIMIT_INVALID', field, v, 'must name at least one CPU');
  return printCpuList(ids);
}
