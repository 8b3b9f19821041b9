/**
 * What the guest kernel says it has now: the online CPUs (/sys/devices/system/cpu/online,
 * Documentation/admin-guide/cputopology.rst) and MemTotal (/proc/meminfo, proc(5)). Sent
 * in hello and with every outcome (docs/protocol.md, "hello (guest → host)") so the host
 * can confirm that a removal took place. Paths injectable for tests.
 */
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { parseCpuList } from '../common/cpulist';

export interface GuestFacts {
  onlineCpus: number[];
  memTotal: number;
}

export interface FactPaths {
  cpuOnline: string;
  meminfo: string;
}

export const DEFAULT_FACT_PATHS: FactPaths = Object.freeze({
  cpuOnline: '/sys/devices/system/cpu/online',
  meminfo: '/proc/meminfo',
});

/**
 * Each of `paths` under NESTBROKER_SYSROOT when it is set (a directory standing for `/`, for
 * tests of the real daemon with fake files), the paths as given otherwise. One rule for
 * every set of kernel files the guest reads: these facts and the prerequisites
 * (agent/guest/prerequisites.ts).
 */
export function underSysroot<T extends object>(paths: T, env: NodeJS.ProcessEnv = process.env): T {
  const root = env.NESTBROKER_SYSROOT;
  if (!root) return paths;
  return Object.fromEntries(
    Object.entries(paths).map(([k, v]) => [k, path.join(root, v as string)]),
  ) as T;
}

/** The fact files under NESTBROKER_SYSROOT when it is set, the real ones otherwise. */
export function factPathsFromEnv(env: NodeJS.ProcessEnv = process.env): FactPaths {
  return underSysroot(DEFAULT_FACT_PATHS, env);
}

/** MemTotal in bytes from /proc/meminfo's text ("MemTotal:  2030456 kB"); undefined if absent. */
export function memTotalOf(meminfo: string): number | undefined {
  const m = /^MemTotal:\s+(\d+)\s*kB\s*$/m.exec(meminfo);
  return m ? Number(m[1]) * 1024 : undefined;
}

/**
 * The facts, or only those that could be read (a file missing leaves its field out).
 * Synchronous: two small kernel files, read as a hello or outcome is sent and once a
 * second for the `facts` message (a few µs each).
 */
export function readGuestFacts(paths: FactPaths = DEFAULT_FACT_PATHS): Partial<GuestFacts> {
  const read = (f: string): string | null => {
    try {
      return readFileSync(f, 'utf8');
    } catch {
      return null;
    }
  };
  const out: Partial<GuestFacts> = {};
  const online = read(paths.cpuOnline);
  if (online !== null) {
    try {
      out.onlineCpus = parseCpuList(online, paths.cpuOnline);
    } catch {
      // an unreadable list is left out rather than guessed
    }
  }
  const meminfo = read(paths.meminfo);
  const mt = meminfo === null ? undefined : memTotalOf(meminfo);
  if (mt !== undefined) out.memTotal = mt;
  return out;
}
