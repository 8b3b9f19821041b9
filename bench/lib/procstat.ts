/**
 * CPU time and RSS of a process from /proc/<pid>/stat and /proc/<pid>/status (proc(5)):
 * utime + stime (fields 14 and 15, in clock ticks) and VmRSS. No dependency, no child.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

let clkTck: number | undefined;

/** Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux we know when absent). */
export function ticksPerSecond(): number {
  if (clkTck === undefined) {
    try {
      clkTck = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
    } catch {
      clkTck = 100;
    }
  }
  return clkTck;
}

export interface ProcSample {
  /** user + system CPU time, ms */
  cpuMs: number;
  rssBytes: number;
  /** when sampled (performance clock, ms) */
  at: number;
}

export function sampleProc(pid: number): ProcSample {
  const cpuMs = cpuTimeMs(pid);
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  return {
    cpuMs,
    rssBytes: m ? Number(m[1]) * 1024 : 0,
    at: performance.now(),
  };
}

/** CPU % of one core between two samples. */
export function cpuPercent(a: ProcSample, b: ProcSample): number {
  return b.at > a.at ? ((b.cpuMs - a.cpuMs) / (b.at - a.at)) * 100 : 0;
}

/**
 * The CPUs a task may run on: `Cpus_allowed_list` of /proc/<pid>/status (proc(5)), e.g.
 * "1" or "0-1"; undefined when the process is gone.
 */
export function cpusAllowed(pid: number): string | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    return /^Cpus_allowed_list:\s+(\S+)/m.exec(status)?.[1];
  } catch {
    return undefined;
  }
}

/**
 * user and system CPU time of a process (every thread), ms: /proc/<pid>/stat fields 14
 * (utime) and 15 (stime), proc(5), in clock ticks (10 ms at CLK_TCK 100).
 */
export function cpuTimes(pid: number): { userMs: number; systemMs: number } {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
  // rest[0] is field 3 (state); utime is field 14, stime field 15.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ms = (field: number): number => (Number(rest[field - 3]) * 1000) / ticksPerSecond();
  return { userMs: ms(14), systemMs: ms(15) };
}

/** user + system CPU time of a process (every thread), ms (cpuTimes). */
export function cpuTimeMs(pid: number): number {
  const t = cpuTimes(pid);
  return t.userMs + t.systemMs;
}
