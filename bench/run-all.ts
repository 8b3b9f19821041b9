#!/usr/bin/env node
/**
 * `make bench`: every benchmark in sequence, each as its own process with its default
 * sizes, each writing bench/results/<name>.json. Names on the command line run only those
 * (`node dist/bench/run-all.js cascade footprint`); `make bench-<name>` runs one alone.
 *
 * Runs as root (cgroups). Takes a while on a 2-core machine: the cascade's five sizes ×
 * 30 runs are most of it, then the real-guest comparison (a QEMU guest under software
 * emulation, its image built once: ~10 min) and the removal through libvirt (the same
 * image as a libvirt domain: ~15 min); docs/performance.md has the times seen.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { nowMs, say, table } from './lib/common';

/** In order: the cheap, machine-independent ones first. */
export const BENCHES = [
  'cgroup-ops',
  'planner-scale',
  'graceful-vs-oom',
  'graceful-vs-oom-real-guest',
  'libvirt-removal',
  'footprint',
  'cascade',
];

/**
 * A bench that is another one's script with arguments (docs/performance.md, part 3: the
 * QEMU guest).
 */
const VARIANTS: Record<string, { script: string; args: string[] }> = {
  'graceful-vs-oom-real-guest': {
    script: 'graceful-vs-oom',
    args: ['--real-guest', '--runs', '3'],
  },
};

function scriptOf(name: string): string {
  return path.join(__dirname, `${VARIANTS[name]?.script ?? name}.js`);
}

function runOne(name: string): Promise<{ code: number | null; ms: number }> {
  const file = scriptOf(name);
  const t0 = nowMs();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [file, ...(VARIANTS[name]?.args ?? [])], {
      stdio: 'inherit',
    });
    child.once('exit', (code, signal) => resolve({ code: signal ? 128 : code, ms: nowMs() - t0 }));
  });
}

export async function main(argv = process.argv.slice(2)): Promise<number> {
  const unknown = argv.filter((a) => !BENCHES.includes(a));
  if (unknown.length) {
    process.stderr.write(`unknown bench ${unknown.join(', ')}; known: ${BENCHES.join(', ')}\n`);
    return 2;
  }
  const chosen = argv.length ? BENCHES.filter((b) => argv.includes(b)) : BENCHES;
  const rows: (string | number)[][] = [];
  let failed = 0;
  for (const name of chosen) {
    if (!existsSync(scriptOf(name))) {
      say(`\n### ${name}: not built (dist/bench/${name}.js missing): skipped`);
      rows.push([name, 'missing', '-']);
      failed++;
      continue;
    }
    say(`\n### ${name}`);
    const r = await runOne(name);
    rows.push([name, r.code === 0 ? 'ok' : `exit ${r.code}`, Math.round(r.ms / 1000)]);
    if (r.code !== 0) failed++;
  }
  say('\n### summary');
  say(table([['bench', 'result', 'seconds'], ...rows]));
  say(`results in ${path.resolve(__dirname, '..', '..', 'bench', 'results')}`);
  return failed ? 1 : 0;
}

if (require.main === module) {
  main().then((code) => process.exit(code));
}
