/**
 * Output for people and for scripts: aligned tables by default, `--json` for scripts,
 * and exit codes that say what happened (documented in docs/guest-agent.md and in
 * `nestctl --help`). Host commands (agent/cli/host-commands.ts) use the same helpers.
 */
import { isNestError, NestError, type Problem } from '../common/errors';
import { isCgroupError } from '../../cgroup-adapter/errors';
import { formatBytes, formatMs, parseCpus, parseDuration, parseSize } from '../common/units';
import type { Outcome, ProjectLimits } from '../broker/types';
import { byCodePoint } from '../common/order';

/** nestctl's exit codes. */
export const EXIT = {
  /** Done, and everything went as planned (outcome status complete). */
  OK: 0,
  /** nestctl itself failed: the daemon could not be reached, or it failed unexpectedly. */
  ERROR: 1,
  /** Bad input: an argument or option was refused (every problem is listed). */
  USAGE: 2,
  /** The notice was carried out in part (outcome status partial). */
  PARTIAL: 3,
  /** The notice failed (outcome status failed). */
  FAILED: 4,
  /** The notice was refused (does not fit, stale, journal write failed). */
  REJECTED: 5,
  /** The daemon did not answer in time. */
  TIMEOUT: 6,
} as const;

export function exitForOutcome(o: Pick<Outcome, 'status'>): number {
  return o.status === 'complete' ? EXIT.OK : o.status === 'partial' ? EXIT.PARTIAL : EXIT.FAILED;
}

/** The exit code for an error (docs/errors.md lists it for every code). */
export function exitForError(err: unknown): number {
  // A CgroupError (the daemon's cgroup layer or the kernel refused) is a failure of the
  // daemon, not of the caller's input: exit 1 with its own code printed.
  if (!isNestError(err)) return EXIT.ERROR;
  switch (err.code) {
    case 'INPUT_INVALID':
    case 'PROJECT_UNKNOWN':
    case 'NOTICE_UNKNOWN':
      return EXIT.USAGE;
    case 'NOTICE_REJECTED':
    case 'NOTICE_STALE':
    case 'JOURNAL_WRITE':
    case 'PROJECT_STATE':
    case 'DOMAIN_DOWN': // libvirt: refused before anything was journaled (docs/libvirt.md)
    case 'PREREQUISITE_MISSING':
      return EXIT.REJECTED;
    case 'TIMEOUT':
      return EXIT.TIMEOUT;
    default:
      return EXIT.ERROR;
  }
}

/**
 * An error for people, each thing said once: one problem on the error's own line
 * (`error (INPUT_INVALID): --memory: must not be negative, got "-5G"`), several as a count
 * and then one line each.
 */
export function formatError(err: unknown): string {
  if (!isNestError(err) && !isCgroupError(err))
    return `error: ${err instanceof Error ? err.message : String(err)}`;
  const problems = err.problems as Problem[];
  if (problems.length === 1)
    return `error (${err.code}): ${problems[0].field}: ${problems[0].message}`;
  if (problems.length === 0)
    return `error (${err.code}): ${err.message.split('\n')[0].replace(/:$/, '')}`;
  const lines = [`error (${err.code}): ${problems.length} problems:`];
  for (const p of problems) lines.push(`  ${p.field}: ${p.message}`);
  return lines.join('\n');
}

/** An error as `--json` prints it: `{"error": {code, message, problems}}` on stdout. */
export function jsonError(err: unknown): string {
  const e = err as { code?: string; message?: string; problems?: unknown };
  return json({
    error: {
      code: e.code ?? 'INTERNAL',
      message: e.message ?? String(err),
      problems: e.problems ?? [],
      // A CgroupError says so, with the errno and the file (docs/errors.md).
      ...(isCgroupError(err)
        ? {
            catalog: 'cgroup',
            ...(err.errno !== undefined ? { errno: err.errno } : {}),
            ...(err.file !== undefined ? { file: err.file } : {}),
          }
        : {}),
    },
  });
}

/**
 * `--memory`, `--cpus` and `--deadline` of reclaim/restore checked before anything is sent,
 * every problem at once (INPUT_INVALID, exit 2), each naming its flag.
 */
export function checkChangeFlags(a: Record<string, unknown>): void {
  const problems: Problem[] = [];
  const neg = (v: unknown) => typeof v === 'string' && /^-\s*\d/.test(v);
  const check = (flag: string, v: unknown, r: { ok: boolean; message?: string }) => {
    if (v === undefined) return;
    if (neg(v))
      problems.push({
        field: `--${flag}`,
        value: v,
        message: `must not be negative, got ${JSON.stringify(v)}`,
      });
    else if (!r.ok)
      problems.push({ field: `--${flag}`, value: v, message: r.message ?? 'invalid' });
  };
  check('memory', a.memory, a.memory === undefined ? { ok: true } : parseSize(a.memory));
  check('cpus', a.cpus, a.cpus === undefined ? { ok: true } : parseCpus(a.cpus));
  check(
    'deadline',
    a.deadline,
    a.deadline === undefined ? { ok: true } : parseDuration(a.deadline),
  );
  if (problems.length > 0)
    throw new NestError(
      'INPUT_INVALID',
      problems.map((p) => `${p.field}: ${p.message}`).join('; '),
      { problems },
    );
}

/** `1 CPU`, `0.5 CPUs`, `2 CPUs`. */
export function cpusText(v: number | 'max' | undefined): string {
  return `${fmtCpus(v)} ${v === 1 ? 'CPU' : 'CPUs'}`;
}

/** A time as both notice lists print it: `2026-12-02 00:05:12Z` (UTC, seconds). */
export function fmtTime(iso: string | undefined | null): string {
  if (!iso) return '-';
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return iso;
  return `${new Date(t).toISOString().slice(0, 19).replace('T', ' ')}Z`;
}

/** Both notice lists: newest first by that time, then by id. */
export function newestFirst<T>(
  rows: T[],
  at: (r: T) => string | undefined,
  id: (r: T) => string,
): T[] {
  const ms = (r: T) => Date.parse(at(r) ?? '') || 0;
  return [...rows].sort((a, b) => ms(b) - ms(a) || byCodePoint(id(b), id(a)));
}

/** Aligned columns; numbers right-aligned. */
export function table(headers: string[], rows: (string | number)[][]): string {
  const cells = rows.map((r) => r.map((c) => String(c)));
  const widths = headers.map((h, i) =>
    Math.max(h.length, ...cells.map((r) => (r[i] ?? '').length)),
  );
  const numeric = headers.map(
    (_, i) => rows.length > 0 && rows.every((r) => typeof r[i] === 'number'),
  );
  const line = (r: string[]): string =>
    r
      .map((c, i) => (numeric[i] ? c.padStart(widths[i]) : c.padEnd(widths[i])))
      .join('  ')
      .trimEnd();
  return [line(headers.map((h) => h.toUpperCase())), ...cells.map(line)].join('\n');
}

export function json(value: unknown): string {
  return JSON.stringify(value, null, 2);
}

export function fmtCpus(v: number | 'max' | undefined): string {
  if (v === undefined) return '-';
  return v === 'max' ? 'max' : `${Number(v.toFixed(3))}`;
}

export function fmtBytes(v: number | 'max' | undefined | null): string {
  if (v === undefined || v === null) return '-';
  return formatBytes(v);
}

/** One process's cells in a `top` or `status` table: pid, CPU share, RSS, running, command. */
export function processCells(p: {
  pid: number;
  cpuPct: number;
  rssBytes: number;
  elapsedMs: number;
  cmdline: string;
  comm: string;
}): (string | number)[] {
  return [
    p.pid,
    `${p.cpuPct.toFixed(1)}%`,
    fmtBytes(p.rssBytes),
    formatMs(p.elapsedMs),
    p.cmdline || p.comm,
  ];
}

export function fmtLimits(l: ProjectLimits | undefined): string {
  if (!l) return '-';
  const mem =
    l.memoryHigh === l.memoryMax
      ? fmtBytes(l.memoryMax)
      : `${fmtBytes(l.memoryHigh)}/${fmtBytes(l.memoryMax)}`;
  return `mem ${mem}, cpu ${fmtCpus(l.cpuMax)}${l.cpuset !== undefined ? `, cpuset ${l.cpuset}` : ''}`;
}

/** The outcome of a notice as a table and a summary line. */
export function formatOutcome(o: Outcome, kind: 'reclaim' | 'restore' = 'reclaim'): string {
  const rows = o.projects.map((p) => [
    p.name,
    p.action,
    p.exit ?? '-',
    formatMs(p.ms),
    fmtLimits(p.before),
    p.action === 'stopped' ? 'stopped' : fmtLimits(p.after),
    p.error ? `${p.error.code}: ${p.error.message}` : p.reason,
  ]);
  return [
    table(['project', 'action', 'exit', 'took', 'before', 'after', 'why'], rows),
    '',
    `notice ${o.noticeId}: ${o.status} in ${formatMs(o.ms)}; ${kind === 'restore' ? 'returned' : 'freed'} ${fmtBytes(o.freed.memoryBytes)} memory, ${cpusText(o.freed.cpus)}`,
  ].join('\n');
}

/** One progress line while a notice is carried out. */
export function formatProgress(ev: Record<string, unknown>): string | null {
  const t = new Date().toISOString().slice(11, 23);
  if (ev.phase === 'accepted')
    return `${t}  notice ${String(ev.noticeId)} accepted; deadline ${String(ev.deadline)}`;
  if (typeof ev.child !== 'string') return null;
  const ms = typeof ev.ms === 'number' ? ` (${formatMs(ev.ms)})` : '';
  switch (ev.phase) {
    case 'notified':
      return `${t}  ${ev.child}: notice delivered`;
    case 'stopping':
      return `${t}  ${ev.child}: stopping…`;
    case 'stopped':
      return `${t}  ${ev.child}: stopped, ${String(ev.exit)}${ms}`;
    default:
      return `${t}  ${ev.child}: ${String(ev.phase)}${ms}`;
  }
}

/** Where a command prints (stdout/stderr; tests pass a recorder). */
export interface Io {
  out(s: string): void;
  err(s: string): void;
}

export const stdio: Io = {
  out: (s) => process.stdout.write(`${s}\n`),
  err: (s) => process.stderr.write(`${s}\n`),
};

/**
 * Runs one nestctl command: its exit code, or for an error the error printed (as
 * `{"error": {code, message, problems}}` with --json) and `exitFor(err)`.
 */
export async function runCommand(
  a: { json?: boolean },
  io: Io,
  fn: () => Promise<number>,
  exitFor: (err: unknown) => number = exitForError,
): Promise<void> {
  try {
    process.exitCode = await fn();
  } catch (err) {
    if (a.json) io.out(jsonError(err));
    else io.err(formatError(err));
    process.exitCode = exitFor(err);
  }
}

/** A daemon's answer to `reload` (agent/guest/reload.ts, agent/host/reload.ts). */
export interface ReloadAnswer {
  ok: boolean;
  source?: string;
  code?: string;
  problems?: { field: string; message: string }[];
  report?: {
    source?: string;
    added: string[];
    removed: (string | { name: string; exit?: string })[];
    changed: { name: string; fields: string[]; error?: string }[];
    live: string[];
    restartNeeded: string[];
    errors: { field: string; message: string }[];
  };
}

/** `nestctl reload`: what was applied, or why the file was refused; with its exit code. */
export function formatReload(r: ReloadAnswer): { text: string; code: number } {
  if (!r.ok || !r.report) {
    const lines = [`reload refused (${r.code ?? 'CONFIG_INVALID'}): the config in force stays`];
    for (const p of r.problems ?? []) lines.push(`  ${p.field}: ${p.message}`);
    return { text: lines.join('\n'), code: EXIT.USAGE };
  }
  const rep = r.report;
  const names = (xs: (string | { name: string; exit?: string })[]): string =>
    xs
      .map((x) => (typeof x === 'string' ? x : x.exit ? `${x.name} (${x.exit})` : x.name))
      .join(', ');
  const lines = [`reloaded ${rep.source ?? ''}`.trimEnd()];
  if (rep.added.length) lines.push(`  added:    ${names(rep.added)}`);
  if (rep.removed.length) lines.push(`  removed:  ${names(rep.removed)}`);
  for (const c of rep.changed) lines.push(`  changed:  ${c.name}: ${c.fields.join(', ')}`);
  if (rep.live.length) lines.push(`  applied:  ${rep.live.join(', ')}`);
  if (rep.restartNeeded.length)
    lines.push(`  not live: ${rep.restartNeeded.join(', ')} (the old values stay until a restart)`);
  if (lines.length === 1) lines.push('  nothing changed');
  for (const e of rep.errors) lines.push(`  failed:   ${e.field}: ${e.message}`);
  return { text: lines.join('\n'), code: rep.errors.length ? EXIT.PARTIAL : EXIT.OK };
}
