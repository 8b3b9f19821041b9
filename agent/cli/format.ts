/**
 * Output for people and for scripts: aligned tables by default, `--json` for scripts,
 * and exit codes that say what happened (documented in docs/guest-agent.md and in
 * `nestctl --help`). Host commands (agent/cli/host-commands.ts) use the same helpers.
 */
import { isNestError, type Problem } from '../common/errors';
import { formatBytes, formatMs } from '../common/units';
import type { Outcome, ProjectLimits } from '../broker/types';

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

export function exitForError(err: unknown): number {
  if (!isNestError(err)) return EXIT.ERROR;
  switch (err.code) {
    case 'INPUT_INVALID':
    case 'PROJECT_UNKNOWN':
    case 'NOTICE_UNKNOWN':
      return EXIT.USAGE;
    case 'NOTICE_REJECTED':
    case 'NOTICE_STALE':
    case 'JOURNAL_WRITE':
      return EXIT.REJECTED;
    case 'TIMEOUT':
      return EXIT.TIMEOUT;
    default:
      return EXIT.ERROR;
  }
}

/** An error for people: the message, then every problem on its own line. */
export function formatError(err: unknown): string {
  if (!isNestError(err)) return `error: ${err instanceof Error ? err.message : String(err)}`;
  const problems = err.problems as Problem[];
  const head =
    problems.length > 1
      ? `${problems.length} problems:`
      : err.message.split('\n')[0].replace(/:$/, '');
  const lines = [`error (${err.code}): ${head}`];
  for (const p of problems) lines.push(`  ${p.field}: ${p.message}`);
  return lines.join('\n');
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
    `notice ${o.noticeId}: ${o.status} in ${formatMs(o.ms)}; ${kind === 'restore' ? 'took back' : 'freed'} ${fmtBytes(o.freed.memoryBytes)} memory, ${fmtCpus(o.freed.cpus)} CPUs`,
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
    const e = err as { code?: string; message?: string; problems?: unknown };
    if (a.json)
      io.out(
        json({
          error: {
            code: e.code ?? 'INTERNAL',
            message: e.message ?? String(err),
            problems: e.problems ?? [],
          },
        }),
      );
    else io.err(formatError(err));
    process.exitCode = exitFor(err);
  }
}
