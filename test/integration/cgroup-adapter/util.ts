/** Small helpers for the cgroup integration tests: real children, kernel files, clocks. */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { spawnInto } from '../../../cgroup-adapter/spawn';
import type { CgroupAdapter } from '../../../cgroup-adapter/types';

export const MiB = 2 ** 20;
export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Children started by a test file, so afterEach can end them by pid even on failure. */
export class Children {
  private readonly all = new Set<ChildProcess>();

  async start(
    adapter: CgroupAdapter,
    group: string,
    file: string,
    args: string[],
    env?: NodeJS.ProcessEnv,
  ): Promise<ChildProcess> {
    const c = await spawnInto(adapter, group, file, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env,
    });
    this.all.add(c);
    c.on('exit', () => this.all.delete(c));
    return c;
  }

  /** SIGKILL every child of ours still running (by pid; never by name). */
  killAll(): void {
    for (const c of this.all) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  }
}

export function exited(
  c: ChildProcess,
): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (c.exitCode !== null || c.signalCode !== null) {
    return Promise.resolve({ code: c.exitCode, signal: c.signalCode });
  }
  return new Promise((resolve) => c.once('exit', (code, signal) => resolve({ code, signal })));
}

export function output(c: ChildProcess): Promise<string> {
  let out = '';
  c.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  return exited(c).then(() => out);
}

/** utime + stime of a pid in clock ticks, from /proc/<pid>/stat (proc(5) fields 14, 15). */
export function cpuTicks(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

/** A kernel file of `group` in one hierarchy, as the kernel shows it (trimmed). */
export function kernelFile(paths: Record<string, string>, hierarchy: string, file: string): string {
  return readFileSync(path.join(paths[hierarchy], file), 'utf8').trim();
}

export async function until(
  what: string,
  pred: () => Promise<boolean> | boolean,
  timeoutMs = 5000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export const BUSY_LOOP = ['-c', 'while :; do :; done'];

/**
 * Until a control busy loop of our own (a plain child, in no cgroup of the test's) has had
 * `ticks` clock ticks of CPU (proc(5) utime + stime): the scheduler ran CPU-bound work for
 * that long, so a process that could run and got nothing was really held. Ended by pid.
 */
export async function whileControlRuns(ticks: number, timeoutMs = 30_000): Promise<void> {
  const control = spawn('/bin/sh', BUSY_LOOP, { stdio: 'ignore' });
  try {
    await until(
      `a control process to run ${ticks} ticks`,
      () => cpuTicks(control.pid!) >= ticks,
      timeoutMs,
    );
  } finally {
    control.kill('SIGKILL');
    await exited(control);
  }
}
/** A member that keeps forking: a new `sleep` every 10 ms. */
export const FORKER = ['-c', 'while :; do sleep 30 & sleep 0.01; done'];
