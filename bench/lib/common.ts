/**
 * What every benchmark shares: its arguments, the machine it ran on, the commit, simple
 * statistics, a table for people and the JSON file for machines (bench/results/<name>.json).
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/** The repository: this file runs from dist/bench/lib/, or from bench/lib/ under ts-jest. */
export const REPO =
  path.basename(path.resolve(__dirname, '..', '..')) === 'dist'
    ? path.resolve(__dirname, '..', '..', '..')
    : path.resolve(__dirname, '..', '..');

export const RESULTS_DIR = path.join(REPO, 'bench', 'results');

// ---------------------------------------------------------------- arguments

/** `--name value` options; `--flag` alone is "true". Unknown options are refused. */
export function parseArgs(
  argv: string[],
  known: Record<string, string>,
): Record<string, string | undefined> {
  const out: Record<string, string | undefined> = {};
  const problems: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) {
      problems.push(`unexpected argument "${a}"`);
      continue;
    }
    // At the first '=' only: `--node-args=--max-old-space-size=512` keeps its value whole
    // (split('=', 2) dropped everything after the second '=').
    const eq = a.indexOf('=');
    const k = eq < 0 ? a.slice(2) : a.slice(2, eq);
    const inline = eq < 0 ? undefined : a.slice(eq + 1);
    if (!(k in known)) {
      problems.push(`unknown option --${k}`);
      continue;
    }
    if (inline !== undefined) out[k] = inline;
    else if (argv[i + 1] !== undefined && !argv[i + 1].startsWith('--')) out[k] = argv[++i];
    else out[k] = 'true';
  }
  if (problems.length) {
    const help = Object.entries(known)
      .map(([k, v]) => `  --${k.padEnd(12)} ${v}`)
      .join('\n');
    throw new Error(`${problems.join('; ')}\noptions:\n${help}`);
  }
  return out;
}

export function intArg(v: string | undefined, name: string, dflt: number, min = 1): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min)
    throw new Error(`--${name} must be a whole number ≥ ${min}, got "${v}"`);
  return n;
}

export function numArg(v: string | undefined, name: string, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a number > 0, got "${v}"`);
  return n;
}

// ---------------------------------------------------------------- machine and commit

export interface MachineInfo {
  os: string;
  kernel: string;
  arch: string;
  cpus: number;
  cpuModel: string | undefined;
  memoryBytes: number;
  node: string;
  /** 1, 5 and 15 minute load averages when the bench started: a shared machine is noisy. */
  loadavg: number[];
}

export function machineInfo(): MachineInfo {
  let osName = `${os.type()} ${os.release()}`;
  try {
    const rel = readFileSync('/etc/os-release', 'utf8');
    const m = /^PRETTY_NAME="?([^"\n]*)"?/m.exec(rel);
    if (m) osName = m[1];
  } catch {
    // no os-release: the kernel's name will do
  }
  return {
    os: osName,
    kernel: os.release(),
    arch: os.arch(),
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model,
    memoryBytes: os.totalmem(),
    node: process.version,
    loadavg: os.loadavg().map((x) => Math.round(x * 100) / 100),
  };
}

/** `git rev-parse HEAD`, or null outside a git checkout (a tarball, no git installed). */
export function gitCommit(): { commit: string | null; dirty: boolean | null } {
  try {
    const commit = execFileSync('git', ['rev-parse', 'HEAD'], {
      cwd: REPO,
      stdio: ['ignore', 'pipe', 'ignore'],
    })
      .toString()
      .trim();
    let dirty: boolean | null = null;
    try {
      dirty =
        execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], {
          cwd: REPO,
          stdio: ['ignore', 'pipe', 'ignore'],
        })
          .toString()
          .trim() !== '';
    } catch {
      dirty = null;
    }
    return { commit, dirty };
  } catch {
    return { commit: null, dirty: null };
  }
}

/** Writes bench/results/<name>.json (or `out`) with machine and commit; returns the path. */
export function writeResult(
  name: string,
  body: Record<string, unknown>,
  out = path.join(RESULTS_DIR, `${name}.json`),
): string {
  const doc = {
    bench: name,
    date: new Date().toISOString(),
    ...gitCommit(),
    machine: machineInfo(),
    ...body,
  };
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(doc, null, 2) + '\n');
  return out;
}

// ---------------------------------------------------------------- statistics

export interface Summary {
  n: number;
  min: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

/** Nearest-rank percentiles (p99 of 30 runs is the largest but none: ceil(0.99·30) = 30th). */
export function summarise(xs: number[]): Summary {
  const s = [...xs].sort((a, b) => a - b);
  const rank = (p: number): number =>
    s[Math.min(s.length - 1, Math.max(0, Math.ceil(p * s.length) - 1))];
  return {
    n: s.length,
    min: r3(s[0] ?? NaN),
    p50: r3(rank(0.5)),
    p90: r3(rank(0.9)),
    p99: r3(rank(0.99)),
    max: r3(s[s.length - 1] ?? NaN),
    mean: r3(s.reduce((a, b) => a + b, 0) / Math.max(1, s.length)),
  };
}

export const r3 = (x: number): number => Math.round(x * 1000) / 1000;
export const r1 = (x: number): number => Math.round(x * 10) / 10;

/** Least-squares line y = a + b·x, and R². */
export function fitLine(xs: number[], ys: number[]): { a: number; b: number; r2: number } {
  const n = xs.length;
  const mx = xs.reduce((s, x) => s + x, 0) / n;
  const my = ys.reduce((s, y) => s + y, 0) / n;
  let sxy = 0;
  let sxx = 0;
  let syy = 0;
  for (let i = 0; i < n; i++) {
    sxy += (xs[i] - mx) * (ys[i] - my);
    sxx += (xs[i] - mx) ** 2;
    syy += (ys[i] - my) ** 2;
  }
  const b = sxx === 0 ? 0 : sxy / sxx;
  const a = my - b * mx;
  const r2 = sxx === 0 || syy === 0 ? 1 : (sxy * sxy) / (sxx * syy);
  return { a, b, r2 };
}

export function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- output

/** A plain table: the first row is the header; numbers are right-aligned. */
export function table(rows: (string | number | null | undefined)[][]): string {
  const cells = rows.map((r) => r.map((c) => (c === null || c === undefined ? '-' : String(c))));
  const widths = cells[0].map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  const line = (r: string[], i: number): string =>
    r
      .map((c, j) =>
        j === 0 || i === 0 || typeof rows[i][j] === 'string'
          ? c.padEnd(widths[j])
          : c.padStart(widths[j]),
      )
      .join('  ')
      .trimEnd();
  const out = [line(cells[0], 0), widths.map((w) => '-'.repeat(w)).join('  ')];
  for (let i = 1; i < cells.length; i++) out.push(line(cells[i], i));
  return out.join('\n');
}

export const say = (s = ''): void => {
  process.stdout.write(`${s}\n`);
};

export function requireRoot(name: string): void {
  if (process.getuid?.() !== 0)
    throw new Error(`${name} must run as root: it creates cgroups and moves processes`);
}
