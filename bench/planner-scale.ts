/**
 * Scale of the plan (docs/performance.md, part 4): how long the pure planner
 * (agent/guest/planner.ts) takes for 10, 100, 1 000 and 10 000 projects. Inputs are random
 * but seeded, so every run plans the same guests: mixed priorities, minimums and maximums,
 * usage above and below the minimums, some projects stopped for room, and an allocation cut
 * to 45 % of what the projects hold, so each plan really shrinks, stops and restarts
 * projects.
 *
 *   make build && node dist/bench/planner-scale.js [--sizes 10,100,1000,10000] [--runs 50]
 *
 * Prints a table (p50 and p99 over the runs, the cost per project, what the plans did) and
 * writes bench/results/planner-scale.json (or --out) with the machine and the commit.
 */
import { plan, type PlanProject, type PlanUsage } from '../agent/guest/planner';
import type { Resources } from '../agent/broker/types';
import {
  intArg,
  parseArgs,
  r3,
  say,
  summarise,
  table,
  writeResult,
  type Summary,
} from './lib/common';

const MiB = 1024 * 1024;
const NOW = new Date('2025-01-01T00:00:00Z');
/** Distinct random guests per size; runs cycle through them. */
const VARIANTS = 5;
const SEED = 0x91a4;

/** mulberry32: seeded, no dependency (the same generator as test/helpers/fuzz.ts). */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface Guest {
  projects: PlanProject[];
  usage: Record<string, PlanUsage>;
  allocation: Resources;
}

/** A random guest of `n` projects whose allocation is cut to 45 % of what they now hold. */
export function randomGuest(n: number, seed: number): Guest {
  const r = rng(seed);
  const int = (lo: number, hi: number): number => lo + Math.floor(r() * (hi - lo + 1));
  const projects: PlanProject[] = [];
  const usage: Record<string, PlanUsage> = {};
  let heldMem = 0;
  let heldCpu = 0;
  for (let i = 0; i < n; i++) {
    const name = `p${i.toString().padStart(5, '0')}`;
    const memMin = int(16, 256) * MiB;
    const memMax = r() < 0.2 ? 'max' : memMin + int(16, 256) * MiB;
    const cpuMin = int(0, 20) / 100;
    const cpuMax = r() < 0.2 ? 'max' : cpuMin + int(5, 100) / 100;
    const running = r() < 0.9;
    const memLimit = memMax === 'max' ? memMin + 256 * MiB : memMax;
    const cpuLimit = cpuMax === 'max' ? 1 : cpuMax;
    projects.push({
      name,
      priority: int(-10, 100),
      memory: { min: memMin, max: memMax },
      cpu: { min: cpuMin, max: cpuMax, weight: int(1, 10_000) },
      state: running ? 'running' : 'stopped',
      restartOnRestore: r() < 0.7,
      stoppedForRoom: !running && r() < 0.8,
      limits: { memoryHigh: 'max', memoryMax: memLimit, cpuMax: cpuLimit },
    });
    if (running) {
      heldMem += memLimit;
      heldCpu += cpuLimit;
      // Missing data for some: the planner's rule for it is part of what is measured.
      if (r() < 0.95)
        usage[name] = {
          memoryCurrent: Math.floor(memLimit * r()),
          cpuUsageRate: r() * cpuLimit,
        };
    }
  }
  return {
    projects,
    usage,
    allocation: { memoryBytes: Math.floor(heldMem * 0.45), cpus: Math.max(0.01, heldCpu * 0.45) },
  };
}

export interface SizeResult {
  projects: number;
  runs: number;
  ms: Summary;
  usPerProjectP50: number;
  /** What the last plan of the first variant did, to show the work is real. */
  actions: Record<string, number>;
}

export function measure(size: number, runs: number): SizeResult {
  const guests = Array.from({ length: VARIANTS }, (_, v) =>
    randomGuest(size, SEED + size * 31 + v),
  );
  // Warm-up: let the JIT settle before timing (a daemon plans many times).
  for (let i = 0; i < Math.max(3, Math.min(20, runs)); i++) {
    const g = guests[i % VARIANTS];
    plan(g.projects, g.usage, g.allocation, NOW);
  }
  const samples: number[] = [];
  for (let i = 0; i < runs; i++) {
    const g = guests[i % VARIANTS];
    const t0 = process.hrtime.bigint();
    plan(g.projects, g.usage, g.allocation, NOW);
    samples.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  const g = guests[0];
  const actions: Record<string, number> = {};
  for (const d of plan(g.projects, g.usage, g.allocation, NOW).decisions)
    actions[d.action] = (actions[d.action] ?? 0) + 1;
  const ms = summarise(samples);
  return { projects: size, runs, ms, usPerProjectP50: r3((ms.p50 * 1000) / size), actions };
}

export function main(argv = process.argv.slice(2)): SizeResult[] {
  const a = parseArgs(argv, {
    sizes: 'comma-separated project counts (default 10,100,1000,10000)',
    runs: 'timed plans per size (default 50)',
    out: 'JSON file to write (default bench/results/planner-scale.json)',
  });
  const sizes = (a.sizes ?? '10,100,1000,10000')
    .split(',')
    .map((s) => intArg(s.trim(), 'sizes', 0, 1));
  const runs = intArg(a.runs, 'runs', 50);
  const results = sizes.map((n) => measure(n, runs));
  say(`planner scale: ${runs} runs per size, ${VARIANTS} seeded guests each (seed ${SEED})`);
  say(
    table([
      [
        'projects',
        'p50 ms',
        'p99 ms',
        'max ms',
        'µs/project (p50)',
        'stopped',
        'shrunk',
        'started',
        'unchanged',
      ],
      ...results.map((r) => [
        r.projects,
        r.ms.p50,
        r.ms.p99,
        r.ms.max,
        r.usPerProjectP50,
        r.actions.stopped ?? 0,
        r.actions.shrunk ?? 0,
        r.actions.started ?? 0,
        r.actions.unchanged ?? 0,
      ]),
    ]),
  );
  const out = writeResult(
    'planner-scale',
    { seed: SEED, variants: VARIANTS, runs, sizes: results },
    a.out,
  );
  say(`written: ${out}`);
  return results;
}

if (require.main === module) {
  try {
    main();
  } catch (err) {
    process.stderr.write(`planner-scale: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  }
}
