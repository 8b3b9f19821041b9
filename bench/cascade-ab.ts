#!/usr/bin/env node
/**
 * Two builds (or two sets of node flags) of the cascade side by side, in ONE run: two bench
 * stacks of the same size (bench/lib/stack.ts), A and B, and timed reclaims alternating
 * between them in ABBA order, each followed by an untimed restore. On a shared machine
 * whose load swings from run to run, a change is only visible as the ratio of pairs measured
 * moments apart (docs/performance.md, "Closing the gap: what was tried").
 *
 *   make build && node dist/bench/cascade-ab.js --b /tmp/old/dist [--size 1x100] [--runs 10]
 *   node dist/bench/cascade-ab.js --b-args '--lite-mode'        (this build, with and without)
 *
 * Options: --a DIST / --b DIST (a build's dist/, default this one), --a-args / --b-args
 * (node flags of that stack's agents), --size GxP, --runs N, --warmup N, --deadline D,
 * --root NAME, --out FILE, --settle MS, --pin-host (both host brokers on CPU 0, every guest
 * agent on the others). Beside each reclaim's time, the CPU time (utime + stime,
 * /proc/<pid>/stat) its host broker and its guest agents spent from request to answer.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { rpcCall } from '../agent/common/rpc';
import type { NoticeView } from '../agent/host/api';
import { removeLeftoverRoot } from '../demo/stack';
import {
  intArg,
  nowMs,
  parseArgs,
  r3,
  requireRoot,
  say,
  sleep,
  summarise,
  table,
  writeResult,
} from './lib/common';
import { cpuTimeMs } from './lib/procstat';
import { BenchStack, guestMemory, pinning, PROJECT_MEMORY, SETTLE_MS } from './lib/stack';

const OPTIONS = {
  a: "build A's dist/ (default this build)",
  b: "build B's dist/ (default this build)",
  'a-args': "node flags of A's agents",
  'b-args': "node flags of B's agents",
  size: 'guests×projects of each stack (default 1x100)',
  runs: 'timed reclaims per stack (default 10)',
  warmup: 'untimed reclaims per stack first (default 1)',
  deadline: 'notice deadline (default 120s)',
  root: 'cgroup root (default nestbroker-bench-<pid>)',
  out: 'JSON file (default bench/results/cascade-ab.json)',
  settle: `ms every project restarted by a restore is left before the next timed reclaim (default ${SETTLE_MS})`,
  'pin-host': 'both host brokers on CPU 0, every guest agent (and its projects) on the other CPUs',
};

const flags = (s: string | undefined): string[] => (s ?? '').split(' ').filter((x) => x !== '');

export async function main(argv = process.argv.slice(2)): Promise<number> {
  const a = parseArgs(argv, OPTIONS);
  requireRoot('bench/cascade-ab');
  const m = /^(\d+)x(\d+)$/.exec(a.size ?? '1x100');
  if (!m || Number(m[2]) < 2) throw new Error(`--size: "${a.size}" is not GUESTSxPROJECTS`);
  const guests = Number(m[1]);
  const projects = Number(m[2]);
  const runs = intArg(a.runs, 'runs', 10);
  const warmup = intArg(a.warmup, 'warmup', 1, 0);
  const deadline = a.deadline ?? '120s';
  const settleMs = intArg(a.settle, 'settle', SETTLE_MS, 0);
  const base = a.root ?? `nestbroker-bench-${process.pid}`;
  const pin = a['pin-host'] === 'true' ? pinning() : null;
  const kept = Math.ceil(projects / 2);
  const bytes = guestMemory(projects) - (guestMemory(0) + kept * PROJECT_MEMORY.min);
  const variants = (['a', 'b'] as const).map((k) => ({
    label: k.toUpperCase(),
    dist: a[k] ? path.resolve(a[k]!) : null,
    nodeArgs: flags(a[`${k}-args`]),
  }));
  const dirs: string[] = [];
  const stacks: BenchStack[] = [];
  const samples: number[][] = [[], []];
  /** per reclaim: the host broker's and the guest agents' CPU time, ms */
  const hostCpu: number[][] = [[], []];
  const guestsCpu: number[][] = [[], []];
  const onSignal = (): void => {
    void Promise.all(stacks.map((s) => s.teardown().catch(() => undefined)))
      .then(() => removeLeftoverRoot(base))
      .finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  say(
    `cascade A/B: ${guests}×${projects} each, ${runs} runs, ABBA; A ${variants[0].dist ?? 'this build'} ${variants[0].nodeArgs.join(' ')}; B ${variants[1].dist ?? 'this build'} ${variants[1].nodeArgs.join(' ')}`,
  );
  try {
    for (const [i, v] of variants.entries()) {
      const dir = await fs.mkdtemp(path.join(os.tmpdir(), `nestbroker-bench-ab-${v.label}-`));
      dirs.push(dir);
      const stack = new BenchStack({
        root: `${base}/${v.label.toLowerCase()}`,
        dir,
        guests: Array.from({ length: guests }, (_, g) => ({
          name: `${v.label.toLowerCase()}${String(g).padStart(2, '0')}`,
          projects,
        })),
        nestbroker: v.dist ? path.join(v.dist, 'agent', 'cli', 'nestbroker.js') : undefined,
        nodeArgs: { host: v.nodeArgs, guest: v.nodeArgs },
        ...(pin ? { cpus: { host: pin.host, guest: pin.guests } } : {}),
      });
      stacks[i] = stack;
      await stack.prepare();
      await stack.startGuests();
      await stack.startHost();
      await stack.waitConnected();
      await stack.waitProjectsRunning();
    }
    const once = async (stack: BenchStack): Promise<[number, number, number]> => {
      const pids = stack.agentPids();
      const guestPids = Object.values(pids.guests).map((p) => p!);
      const cpu = (): [number, number] => [
        cpuTimeMs(pids.host!),
        guestPids.reduce((s, p) => s + cpuTimeMs(p), 0),
      ];
      const cpu0 = cpu();
      const t = nowMs();
      const views = (await Promise.all(
        stack.guests.map((g) =>
          rpcCall(
            stack.hostSocket,
            'reclaim',
            { guest: g.spec.name, memory: bytes, deadline, reason: 'bench ab' },
            { timeoutMs: 0 },
          ),
        ),
      )) as NoticeView[];
      const ms = nowMs() - t;
      const cpu1 = cpu();
      for (const v of views)
        if (v.state !== 'done' || v.outcome?.status !== 'complete')
          throw new Error(`reclaim of ${v.guest} ended ${v.state}/${v.outcome?.status}`);
      const back = (await Promise.all(
        stack.guests.map((g) =>
          rpcCall(stack.hostSocket, 'restore', { guest: g.spec.name, deadline }, { timeoutMs: 0 }),
        ),
      )) as NoticeView[];
      for (const v of back)
        if (v.state !== 'done') throw new Error(`restore of ${v.guest} ended ${v.state}`);
      await stack.waitProjectsRunning();
      // Its restarted projects pay their start's CPU against their quota first
      // (SETTLE_MS, bench/lib/stack.ts).
      await sleep(settleMs);
      return [ms, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]];
    };
    for (let run = -warmup; run < runs; run++) {
      // ABBA: neither side always goes first, after the other's restore.
      const order = run % 2 === 0 ? [0, 1] : [1, 0];
      for (const i of order) {
        const [ms, host, gs] = await once(stacks[i]);
        if (run >= 0) {
          samples[i].push(ms);
          hostCpu[i].push(host);
          guestsCpu[i].push(gs);
        }
      }
    }
  } finally {
    await Promise.all(stacks.map((s) => s.teardown().catch(() => undefined)));
    await removeLeftoverRoot(base).catch(() => undefined);
    for (const d of dirs) await fs.rm(d, { recursive: true, force: true });
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  const sums = samples.map(summarise);
  const hostSums = hostCpu.map(summarise);
  const guestsSums = guestsCpu.map(summarise);
  const pairRatios = samples[1].map((b, i) => b / samples[0][i]);
  const pr = summarise(pairRatios);
  say(
    table([
      [
        'variant',
        'build',
        'node flags',
        'runs',
        'p50 ms',
        'p99 ms',
        'min',
        'max',
        'host CPU p50 / p99 ms',
        'guests CPU p50 / p99 ms',
      ],
      ...variants.map((v, i) => [
        v.label,
        v.dist ?? 'this build',
        v.nodeArgs.join(' ') || '-',
        sums[i].n,
        sums[i].p50,
        sums[i].p99,
        sums[i].min,
        sums[i].max,
        `${hostSums[i].p50} / ${hostSums[i].p99}`,
        `${guestsSums[i].p50} / ${guestsSums[i].p99}`,
      ]),
    ]),
  );
  say(
    `host CPU B / A: p50 ${r3(hostSums[1].p50 / hostSums[0].p50)}, mean ${r3(hostSums[1].mean / hostSums[0].mean)}`,
  );
  say(
    `B / A: p50 ${r3(sums[1].p50 / sums[0].p50)}, p99 ${r3(sums[1].p99 / sums[0].p99)}; per pair: median ${pr.p50} (min ${pr.min}, max ${pr.max}); B faster in ${pairRatios.filter((x) => x < 1).length} of ${pairRatios.length} pairs`,
  );
  const out = writeResult(
    'cascade-ab',
    {
      size: `${guests}x${projects}`,
      runs,
      settleMs,
      warmup,
      pinned: pin,
      variants: variants.map((v, i) => ({
        ...v,
        latencyMs: sums[i],
        samples: samples[i].map(r3),
        hostCpuMs: hostSums[i],
        guestsCpuMs: guestsSums[i],
        hostCpuSamples: hostCpu[i],
        guestsCpuSamples: guestsCpu[i],
      })),
      ratio: {
        p50: r3(sums[1].p50 / sums[0].p50),
        p99: r3(sums[1].p99 / sums[0].p99),
        pairs: pr,
        bFasterPairs: pairRatios.filter((x) => x < 1).length,
        hostCpuMean: r3(hostSums[1].mean / hostSums[0].mean),
      },
    },
    a.out,
  );
  say(`wrote ${out}`);
  return 0;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err instanceof Error ? err.stack : String(err));
      process.exit(1);
    },
  );
}
