/**
 * Reads the `.cpuprofile` files `node --cpu-prof` writes at exit and sums self time per
 * function (and per file), so a report can say where an agent's time goes.
 */
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface HotSpot {
  what: string;
  selfMs: number;
  share: number;
}

export interface ProfileSummary {
  files: string[];
  totalMs: number;
  idleMs: number;
  byFunction: HotSpot[];
  byFile: HotSpot[];
}

const shortUrl = (url: string): string => {
  if (!url) return '(native)';
  const u = url.replace(/^file:\/\//, '');
  const i = u.indexOf('/dist/');
  if (i >= 0) return u.slice(i + 6);
  const n = u.indexOf('node_modules/');
  if (n >= 0) return u.slice(n);
  return u.startsWith('node:') ? u : path.basename(u);
};

/** Sums every profile in `dir` whose name matches `filter` (all when absent). */
export function summariseProfiles(dir: string, top = 15, filter?: RegExp): ProfileSummary {
  const files = readdirSync(dir)
    .filter((f) => f.endsWith('.cpuprofile') && (!filter || filter.test(f)))
    .map((f) => path.join(dir, f));
  const fn = new Map<string, number>();
  const file = new Map<string, number>();
  let total = 0;
  let idle = 0;
  for (const f of files) {
    const p = JSON.parse(readFileSync(f, 'utf8')) as CpuProfile;
    const byId = new Map(p.nodes.map((n) => [n.id, n]));
    for (let i = 0; i < p.samples.length; i++) {
      const n = byId.get(p.samples[i]);
      const ms = (p.timeDeltas[i] ?? 0) / 1000;
      if (!n) continue;
      const name = n.callFrame.functionName || '(anonymous)';
      if (name === '(idle)') {
        idle += ms;
        continue;
      }
      total += ms;
      const url = shortUrl(n.callFrame.url);
      const key = `${name} ${url}${n.callFrame.url ? `:${n.callFrame.lineNumber + 1}` : ''}`;
      fn.set(key, (fn.get(key) ?? 0) + ms);
      file.set(url, (file.get(url) ?? 0) + ms);
    }
  }
  const rank = (m: Map<string, number>): HotSpot[] =>
    [...m.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([what, ms]) => ({
        what,
        selfMs: Math.round(ms),
        share: total ? Math.round((ms / total) * 1000) / 10 : 0,
      }));
  return {
    files: files.map((f) => path.basename(f)),
    totalMs: Math.round(total),
    idleMs: Math.round(idle),
    byFunction: rank(fn),
    byFile: rank(file),
  };
}
