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
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // rest[0] is field 3 (state); utime is field 14, stime field 15.
  const utime = Number(rest[14 - 3]);
  const stime = Number(rest[15 - 3]);
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  return {
    cpuMs: ((utime + stime) * 1000) / ticksPerSecond(),
    rssBytes: m ? Number(m[1]) * 1024 : 0,
    at: performance.now(),
  };
}

/** CPU % of one core between two samples. */
export function cpuPercent(a: ProcSample, b: ProcSample): number {
  return b.at > a.at ? ((b.cpuMs - a.cpuMs) / (b.at - a.at)) * 100 : 0;
}
