#!/usr/bin/env node
/**
 * A balloon for the "VM" cgroup of bench/graceful-vs-oom: a process inside the VM that the
 * OOM killer may not pick (oom_score_adj -1000, as the balloon driver's pages are the
 * kernel's), and that, told `inflate N` on stdin, takes N MiB (every page written) and
 * answers `inflated N <ms>` on stdout. So "the VM's memory shrinks by N MiB" whatever the
 * cgroup version: a v1 memory.limit_in_bytes write below usage fails with EBUSY instead
 * of calling the OOM killer (cgroup-v1/memory.rst 2.5), the balloon really takes the room.
 */
import { writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

try {
  writeFileSync('/proc/self/oom_score_adj', '-1000');
} catch {
  process.stdout.write('warning: could not set oom_score_adj\n');
}

const held: Buffer[] = [];
createInterface({ input: process.stdin }).on('line', (line) => {
  const m = /^inflate (\d+)$/.exec(line.trim());
  if (!m) return;
  const t0 = performance.now();
  for (let i = 0; i < Number(m[1]); i++) held.push(Buffer.alloc(1024 * 1024, 1));
  process.stdout.write(`inflated ${m[1]} ${Math.round(performance.now() - t0)}\n`);
});
process.stdout.write('ready\n');
