/**
 * Sizes and durations as people write them. Every parser says which field it was
 * parsing and what it received (Node core style), and never guesses.
 */

const SIZE_UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  kb: 1000,
  kib: 1024,
  m: 1024 ** 2,
  mb: 1000 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gb: 1000 ** 3,
  gib: 1024 ** 3,
  t: 1024 ** 4,
  tb: 1000 ** 4,
  tib: 1024 ** 4,
};

/** Largest size we accept: what a cgroup limit file can hold (2^63 - 1, page-rounded down). */
export const MAX_BYTES = Number.MAX_SAFE_INTEGER;

export type ParseResult<T> = { ok: true; value: T } | { ok: false; message: string };

/**
 * `512MiB`, `2G`, `1.5GiB`, `1048576`. Single-letter units are binary (as systemd and
 * Kubernetes' `Mi`/`Gi` readers expect); `MB`/`GB` are decimal.
 */
export function parseSize(input: unknown): ParseResult<number> {
  if (typeof input === 'number') {
    if (!Number.isSafeInteger(input) || input < 0)
      return { ok: false, message: `must be a whole number of bytes ≥ 0, got ${input}` };
    return { ok: true, value: input };
  }
  if (typeof input !== 'string')
    return { ok: false, message: `must be bytes or a size like "512MiB", got ${describe(input)}` };
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(input);
  if (!m) return { ok: false, message: `must be bytes or a size like "512MiB", got "${input}"` };
  const unit = SIZE_UNITS[m[2].toLowerCase()];
  if (unit === undefined)
    return {
      ok: false,
      message: `has an unknown unit "${m[2]}" in "${input}" (use B, KiB, MiB, GiB, TiB)`,
    };
  const value = Math.floor(Number(m[1]) * unit);
  if (!Number.isSafeInteger(value)) return { ok: false, message: `is too large: "${input}"` };
  return { ok: true, value };
}

const DURATION_UNITS: Record<string, number> = {
  ms: 1,
  s: 1000,
  m: 60_000,
  h: 3_600_000,
};

/** `30s`, `2m`, `1500ms`, `1h`; a bare number is milliseconds. Returns milliseconds. */
export function parseDuration(input: unknown): ParseResult<number> {
  if (typeof input === 'number') {
    if (!Number.isFinite(input) || input < 0 || !Number.isSafeInteger(Math.round(input)))
      return { ok: false, message: `must be a duration ≥ 0 in ms, got ${input}` };
    return { ok: true, value: Math.round(input) };
  }
  if (typeof input !== 'string')
    return { ok: false, message: `must be a duration like "30s", got ${describe(input)}` };
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(input);
  if (!m)
    return { ok: false, message: `must be a duration like "30s", "2m" or "500ms", got "${input}"` };
  const value = Math.round(Number(m[1]) * DURATION_UNITS[m[2] ?? 'ms']);
  if (!Number.isSafeInteger(value) || value > 7 * 24 * 3_600_000)
    return { ok: false, message: `is longer than a week: "${input}"` };
  return { ok: true, value };
}

/** CPUs as a positive decimal (`0.5`, `2`). */
export function parseCpus(input: unknown): ParseResult<number> {
  const n = typeof input === 'string' && /^\s*\d+(\.\d+)?\s*$/.test(input) ? Number(input) : input;
  if (typeof n !== 'number' || !Number.isFinite(n) || n < 0 || n > 4096)
    return {
      ok: false,
      message: `must be a number of CPUs from 0 to 4096 (e.g. 0.5), got ${describe(input)}`,
    };
  return { ok: true, value: n };
}

export function formatBytes(n: number | 'max'): string {
  if (n === 'max') return 'max';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n}B` : `${Number(v.toFixed(v >= 100 ? 0 : 1))}${units[i]}`;
}

export function formatMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)}ms` : `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)}s`;
}

export function describe(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (v === undefined) return 'nothing';
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    // Both JSON.stringify and String() recurse: a value nested thousands deep overflows
    // the stack (found by test/fuzz); say what it is instead.
    return `(${Array.isArray(v) ? 'a list' : typeof v} too deeply nested to show)`;
  }
}
