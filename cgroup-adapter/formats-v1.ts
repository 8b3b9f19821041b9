/**
 * cgroup v1 file formats, used ONLY by the hybrid driver (hybrid.ts). v1 writes `-1` for
 * "unlimited" in memory.limit_in_bytes, memory.soft_limit_in_bytes and cpu.cfs_quota_us:
 * that is the v1 kernel's format (Documentation/admin-guide/cgroup-v1/memory.rst,
 * Documentation/scheduler/sched-bwc.rst) and must never leak into a v2 file.
 */
import { invalidValue } from './errors';
import {
  CPU_WEIGHT_DEFAULT,
  CPU_WEIGHT_MAX,
  CPU_WEIGHT_MIN,
  checkCpuWeight,
  checkMax,
  parseFailed,
  parseFlatKeyed,
  parseUint,
} from './formats';
import type { Max } from './types';

// ---------------------------------------------------------------------------- memory

/**
 * v1 reads "unlimited" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 with 4 KiB
 * pages, other values with other page sizes). Anything from 2^62 up is unlimited.
 */
const V1_UNLIMITED_FROM = 2n ** 62n;

/** memory.limit_in_bytes / memory.soft_limit_in_bytes / memory.max_usage_in_bytes reads. */
export function parseV1Bytes(field: string, text: string): Max {
  const t = text.trim();
  if (t === '-1') return 'max';
  if (!/^\d+$/.test(t)) throw parseFailed(field, text, 'a byte count');
  const big = BigInt(t);
  if (big >= V1_UNLIMITED_FROM) return 'max';
  return parseUint(field, t);
}

/** Writes: `max` → `-1` (v1's unlimited). The kernel rounds bytes down to a page. */
export function printV1Bytes(field: string, v: Max): string {
  const ok = checkMax(field, v);
  return ok === 'max' ? '-1' : String(ok);
}

export interface OomControl {
  oomKillDisable: boolean;
  underOom: boolean;
  oomKill: number;
}

/** memory.oom_control: `oom_kill_disable 0`, `under_oom 0`, `oom_kill N` (4.13+). */
export function parseOomControl(text: string): OomControl {
  const kv = parseFlatKeyed(text, 'memory.oom_control');
  if (kv.under_oom === undefined)
    throw parseFailed('memory.oom_control', text, 'an under_oom line');
  return {
    oomKillDisable: kv.oom_kill_disable === 1,
    underOom: kv.under_oom === 1,
    oomKill: kv.oom_kill ?? 0,
  };
}

// ---------------------------------------------------------------------------- cpu

/** cpu.cfs_quota_us: `-1` is unlimited. */
export function parseCfsQuota(text: string): Max {
  const t = text.trim();
  if (t === '-1') return 'max';
  return parseUint('cpu.cfs_quota_us', t);
}

export function printCfsQuota(v: Max): string {
  return v === 'max' ? '-1' : String(checkMax('cpu.cfs_quota_us', v));
}

export interface CpuStatV1 {
  nrPeriods: number;
  nrThrottled: number;
  throttledUs: number;
}

/** v1 cpu.stat: `nr_periods`, `nr_throttled`, `throttled_time` (NANOseconds). */
export function parseCpuStatV1(text: string): CpuStatV1 {
  const kv = parseFlatKeyed(text, 'cpu.stat');
  if (kv.nr_periods === undefined) throw parseFailed('cpu.stat', text, 'a nr_periods line');
  return {
    nrPeriods: kv.nr_periods,
    nrThrottled: kv.nr_throttled ?? 0,
    throttledUs: Math.floor((kv.throttled_time ?? 0) / 1000),
  };
}

/** cpuacct.usage: total CPU time in nanoseconds → µs. */
export function parseCpuacctUsage(text: string): number {
  return Math.floor(parseUint('cpuacct.usage', text) / 1000);
}

// ---------------------------------------------------------------------------- cpu.weight ↔ cpu.shares

/** Kernel bounds of cpu.shares (MIN_SHARES 2, MAX_SHARES 1 << 18). */
export const CPU_SHARES_MIN = 2;
export const CPU_SHARES_MAX = 262_144;
export const CPU_SHARES_DEFAULT = 1024;

/**
 * cpu.weight → cpu.shares, systemd's conversion (src/basic/cgroup-util.h
 * `cgroup_cpu_weight_to_shares`): shares = clamp(weight × 1024 / 100, 2, 262144).
 * It keeps the defaults equal (weight 100 ↔ shares 1024), so a group we never touched
 * and a group at the default weigh the same. (runc maps the other way with
 * 1 + (shares − 2) × 9999 / 262142, which sends 1024 to 39; we do not use it.)
 */
export function cpuWeightToShares(weight: number): number {
  const w = checkCpuWeight(weight);
  const shares = Math.floor((w * CPU_SHARES_DEFAULT) / CPU_WEIGHT_DEFAULT);
  return Math.min(CPU_SHARES_MAX, Math.max(CPU_SHARES_MIN, shares));
}

/** The inverse, rounded: every weight 1..10000 survives weight → shares → weight. */
export function cpuSharesToWeight(shares: number): number {
  if (!Number.isInteger(shares) || shares < CPU_SHARES_MIN || shares > CPU_SHARES_MAX) {
    throw invalidValue(
      'LIMIT_INVALID',
      'cpu.shares',
      shares,
      'must be an integer from 2 to 262144',
    );
  }
  const w = Math.round((shares * CPU_WEIGHT_DEFAULT) / CPU_SHARES_DEFAULT);
  return Math.min(CPU_WEIGHT_MAX, Math.max(CPU_WEIGHT_MIN, w));
}

export function parseCpuShares(text: string): number {
  return parseUint('cpu.shares', text);
}

// ---------------------------------------------------------------------------- pids

/** v1 pids.max has the same format as v2: a number or `max`. */
export { parseMax as parsePidsMax } from './formats';
