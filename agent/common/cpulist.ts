/**
 * CPU lists as the kernel prints them ("0-3,8": Documentation/admin-guide/cputopology.rst,
 * the `online` file; cpuset.cpus in Documentation/admin-guide/cgroup-v2.rst "Cpuset") and
 * as the protocol carries them (ascending CPU numbers, docs/protocol.md "Types of values").
 * Pure.
 */
import { NestError } from './errors';

/** "0-3,8" → [0, 1, 2, 3, 8], ascending, each once; "" → []. */
export function parseCpuList(text: string, what = 'CPU list'): number[] {
  const t = text.trim();
  const out = new Set<number>();
  if (t === '') return [];
  for (const part of t.split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    const a = m ? Number(m[1]) : NaN;
    const b = m && m[2] !== undefined ? Number(m[2]) : a;
    if (!m || b < a || b > 65535)
      throw new NestError('INPUT_INVALID', `${what}: ${JSON.stringify(part)} is not a CPU range`);
    for (let c = a; c <= b; c++) out.add(c);
  }
  return [...out].sort((x, y) => x - y);
}

/**
 * How many CPUs a cpuset.cpus value allows: "0-1,3" → 3. Unset or empty is every CPU
 * (Infinity): in cgroup v2 an empty cpuset.cpus means the parent's CPUs
 * (Documentation/admin-guide/cgroup-v2.rst, "Cpuset Interface Files"), and the agent never
 * writes one (CONTRIBUTING.md). A malformed list is refused as parseCpuList refuses it.
 */
export function cpusetSize(list: string | undefined, what = 'cpuset'): number {
  if (list === undefined || list.trim() === '') return Number.POSITIVE_INFINITY;
  return parseCpuList(list, what).length;
}

/** [0, 1, 2, 3, 8] → "0-3,8" (any order, repeats allowed); [] → "". */
export function formatCpuList(cpus: readonly number[]): string {
  const s = [...new Set(cpus)].sort((x, y) => x - y);
  const parts: string[] = [];
  for (let i = 0; i < s.length;) {
    let j = i;
    while (j + 1 < s.length && s[j + 1] === s[j] + 1) j++;
    parts.push(i === j ? `${s[i]}` : `${s[i]}-${s[j]}`);
    i = j + 1;
  }
  return parts.join(',');
}

/**
 * The host's choice of which guest CPUs to unplug: the `count` highest-numbered of those
 * online, never CPU 0 (on x86 the boot CPU usually cannot go offline:
 * Documentation/core-api/cpu_hotplug.rst). Fewer than `count` when the guest has fewer
 * than count + 1 online. Ascending, as `leavingCpus` carries them.
 */
export function pickLeavingCpus(online: readonly number[], count: number): number[] {
  const n = Math.max(0, Math.floor(count));
  const candidates = [...new Set(online)].filter((c) => c !== 0).sort((x, y) => y - x);
  return candidates.slice(0, n).sort((x, y) => x - y);
}
