/**
 * Usage of the host as a whole (systeminformation) and of single processes (pidusage).
 * Per-group usage comes from the cgroup files (CgroupAdapter.usage).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import pidusage from 'pidusage';
import * as si from 'systeminformation';
import { CgroupError } from './errors';

export interface HostUsage {
  memTotal: number;
  /** MemAvailable: what can be used without swapping (proc(5)). */
  memAvailable: number;
  cpuCount: number;
  /** 1, 5 and 15 minute load averages. */
  load: [number, number, number];
  /** Current CPU busy share of the whole host, 0..100 (since the previous call). */
  currentLoadPct: number;
}

export async function hostUsage(): Promise<HostUsage> {
  const [mem, cpu, load] = await Promise.all([si.mem(), si.cpu(), si.currentLoad()]);
  const [l1, l5, l15] = os.loadavg();
  return {
    memTotal: mem.total,
    memAvailable: mem.available,
    cpuCount: cpu.cores,
    load: [l1, l5, l15],
    currentLoadPct: load.currentLoad,
  };
}

export interface ProcessUsage {
  pid: number;
  /** CPU share since the previous sample of this pid (100 = one full CPU). */
  cpuPct: number;
  rssBytes: number;
  elapsedMs: number;
}

/** One process's usage; code ESRCH when it is gone. */
export async function processUsage(pid: number): Promise<ProcessUsage> {
  try {
    const s = await pidusage(pid);
    return { pid, cpuPct: s.cpu, rssBytes: s.memory, elapsedMs: s.elapsed };
  } catch (e) {
    const gone = !fs.existsSync(`/proc/${pid}`);
    throw new CgroupError(gone ? 'ESRCH' : 'READ_FAILED', `usage of process ${pid}: ${String(e)}`, {
      field: 'pid',
      value: pid,
      cause: e,
    });
  }
}

/** Drops pidusage's per-pid history (call when done sampling). */
export function clearProcessUsage(): void {
  pidusage.clear();
}
