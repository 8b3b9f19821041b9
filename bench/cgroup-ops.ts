/**
 * Per-operation cost of the cgroup adapter against this machine's kernel: create,
 * setLimits, movePid, kill + waitEmpty, remove. Prints a table and writes
 * bench/results/cgroup-ops.json with machine info.
 *
 *   make build && node dist/bench/cgroup-ops.js --iterations 200
 *
 * Runs as root; works under its own root `nestbroker-test-<pid>-bench` in every
 * hierarchy and removes it (and kills everything in it) even when interrupted by an error.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { openCgroupAdapter } from '../cgroup-adapter/index';
import type { Limits } from '../cgroup-adapter/types';

const OPS = ['create', 'setLimits', 'movePid', 'kill+waitEmpty', 'remove'] as const;
type Op = (typeof OPS)[number];

interface Stats {
  n: number;
  meanMs: number;
  p50Ms: number;
  p95Ms: number;
  maxMs: number;
}

function stats(xs: number[]): Stats {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))];
  const round = (x: number) => Math.round(x * 1000) / 1000;
  return {
    n: s.length,
    meanMs: round(s.reduce((a, b) => a + b, 0) / s.length),
    p50Ms: round(q(0.5)),
    p95Ms: round(q(0.95)),
    maxMs: round(s[s.length - 1]),
  };
}

function parseIterations(argv: string[]): number {
  const i = argv.indexOf('--iterations');
  const v = i >= 0 ? Number(argv[i + 1]) : 100;
  if (!Number.isInteger(v) || v < 1)
    throw new Error(`--iterations must be a positive integer, got ${argv[i + 1]}`);
  return v;
}

async function timed<T>(samples: number[], f: () => Promise<T>): Promise<T> {
  const t0 = process.hrtime.bigint();
  const r = await f();
  samples.push(Number(process.hrtime.bigint() - t0) / 1e6);
  return r;
}

export async function main(argv = process.argv.slice(2)): Promise<void> {
  const iterations = parseIterations(argv);
  const rootName = `nestbroker-test-${process.pid}-bench`;
  const adapter = await openCgroupAdapter({ root: rootName, create: true });
  const samples: Record<Op, number[]> = Object.fromEntries(OPS.map((o) => [o, []])) as never;
  const limits: Limits = {
    memory: { max: 256 * 2 ** 20, high: 192 * 2 ** 20 },
    cpu: { max: { quotaUs: 50000, periodUs: 100000 }, weight: 100 },
    pidsMax: 64,
  };
  let child: ChildProcess | undefined;
  try {
    for (let i = 0; i < iterations; i++) {
      const g = `b${i}`;
      await timed(samples.create, () => adapter.create(g));
      await timed(samples.setLimits, () => adapter.setLimits(g, limits));
      child = spawn('/bin/sleep', ['60'], { stdio: 'ignore' });
      const pid = child.pid!;
      await timed(samples.movePid, () => adapter.movePid(g, pid));
      await timed(samples['kill+waitEmpty'], () => adapter.kill(g, 10_000));
      await timed(samples.remove, () => adapter.remove(g));
    }
  } finally {
    child?.kill('SIGKILL');
    await adapter.removeRoot(10_000);
  }

  const results = Object.fromEntries(OPS.map((o) => [o, stats(samples[o])])) as Record<Op, Stats>;
  const cpus = os.cpus();
  const report = {
    bench: 'cgroup-ops',
    date: new Date().toISOString(),
    iterations,
    driver: adapter.kind,
    hierarchies: adapter.hierarchies.map((h) => h.name),
    killMethod: adapter.capabilities.cgroupKill ? 'cgroup.kill' : 'freeze-sigkill',
    machine: {
      kernel: os.release(),
      node: process.version,
      cpuModel: cpus[0]?.model,
      cpuCount: cpus.length,
      memTotalBytes: os.totalmem(),
    },
    results,
  };
  console.log(
    `cgroup-ops: ${iterations} iterations, driver ${adapter.kind} (${report.hierarchies.join(', ')}), kernel ${os.release()}`,
  );
  console.log(
    ['operation'.padEnd(16), 'mean ms', 'p50 ms', 'p95 ms', 'max ms']
      .map((h) => h.padStart(9))
      .join(' '),
  );
  for (const o of OPS) {
    const s = results[o];
    console.log(
      [o.padEnd(16), s.meanMs, s.p50Ms, s.p95Ms, s.maxMs]
        .map((v) => String(v).padStart(9))
        .join(' '),
    );
  }
  const out = path.join(__dirname, '..', '..', 'bench', 'results', 'cgroup-ops.json');
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(report, null, 2) + '\n');
  console.log(`wrote ${out}`);
}

if (require.main === module) {
  main().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
