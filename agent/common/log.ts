/**
 * pino logs to stdout, in the form whoever reads stdout can use (docs/install.md "Logs"):
 *
 * - `journal`: under systemd, stdout is a journald stream (systemd.exec(5) sets
 *   JOURNAL_STREAM to its "device:inode"). Each line starts with its syslog priority,
 *   `<3>` error … `<7>` debug (sd-daemon(3)), which journald strips and stores as PRIORITY,
 *   so `journalctl -p err` finds the errors; the rest of the line stays one JSON object.
 * - `pretty`: on a terminal, one readable line per event: time, level, logger, message,
 *   then `key=value` for the fields.
 * - `json`: pino's JSON lines, everywhere else (a pipe, a file, a log shipper).
 *
 * `auto` (the default) picks among them; NESTBROKER_LOG_FORMAT or `nestbroker --log-format`
 * names one. Every line about a notice carries `noticeId`: use `log.child({ noticeId })`.
 */
import { fstatSync } from 'node:fs';
import pino, { type DestinationStream, type Logger } from 'pino';

export type { Logger };

export const LOG_FORMATS = ['auto', 'json', 'journal', 'pretty'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** sd-daemon(3) priorities for pino's levels (trace and debug both debug, fatal crit). */
export function syslogPriority(level: number): number {
  if (level >= 60) return 2;
  if (level >= 50) return 3;
  if (level >= 40) return 4;
  if (level >= 30) return 6;
  return 7;
}

/**
 * Whether stdout is the journald stream systemd connected. JOURNAL_STREAM alone is not
 * enough: it is inherited by children whose stdout was redirected, so systemd.exec(5) says
 * to compare it with stdout's device and inode.
 */
export function stdoutIsJournal(env: NodeJS.ProcessEnv = process.env, fd = 1): boolean {
  const m = /^(\d+):(\d+)$/.exec(env.JOURNAL_STREAM ?? '');
  if (!m) return false;
  try {
    const st = fstatSync(fd, { bigint: true });
    return st.dev === BigInt(m[1]) && st.ino === BigInt(m[2]);
  } catch {
    return false;
  }
}

/** The form `auto` resolves to: journal, else pretty on a TTY, else JSON. */
export function resolveLogFormat(
  requested: string | undefined = process.env.NESTBROKER_LOG_FORMAT,
): Exclude<LogFormat, 'auto'> {
  if (requested === 'json' || requested === 'journal' || requested === 'pretty') return requested;
  if (stdoutIsJournal()) return 'journal';
  if (process.stdout.isTTY) return 'pretty';
  return 'json';
}

const LEVEL_NAMES: Record<number, string> = {
  10: 'TRACE',
  20: 'DEBUG',
  30: 'INFO',
  40: 'WARN',
  50: 'ERROR',
  60: 'FATAL',
};
const LEVEL_COLOURS: Record<number, string> = { 40: '33', 50: '31', 60: '1;31', 20: '2', 10: '2' };
// Fields every line has, shown in the line's head or not at all on a terminal.
const HEAD_KEYS = new Set(['level', 'time', 'pid', 'hostname', 'name', 'msg']);

function pad(n: number, w = 2): string {
  return String(n).padStart(w, '0');
}

function fieldValue(v: unknown): string {
  if (typeof v === 'string') return /^[^\s"=]+$/.test(v) ? v : JSON.stringify(v);
  return JSON.stringify(v) ?? String(v);
}

/**
 * One pino JSON line as one readable line:
 * `12:03:04.567 WARN  nestbroker-guest: message guest=vm1 field=x`. An error field shows
 * its type, code and message (the stack is in the JSON form; a terminal wants the gist).
 */
export function prettyLine(json: string, colour = false): string {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(json) as Record<string, unknown>;
  } catch {
    return json.endsWith('\n') ? json : `${json}\n`;
  }
  const level = typeof o.level === 'number' ? o.level : 30;
  const t = new Date(typeof o.time === 'number' ? o.time : Date.now());
  const time = `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}.${pad(t.getMilliseconds(), 3)}`;
  let name = (LEVEL_NAMES[level] ?? `L${level}`).padEnd(5);
  if (colour && LEVEL_COLOURS[level]) name = `\x1b[${LEVEL_COLOURS[level]}m${name}\x1b[0m`;
  const parts = [time, name, `${typeof o.name === 'string' ? o.name : ''}:`];
  if (o.msg !== undefined) parts.push(String(o.msg));
  for (const [k, v] of Object.entries(o)) {
    if (HEAD_KEYS.has(k) || v === undefined) continue;
    if ((k === 'err' || k === 'error') && v && typeof v === 'object') {
      const e = v as { type?: string; code?: string; message?: string };
      const what = [e.type, e.code].filter(Boolean).join(' ');
      parts.push(`${k}=${fieldValue(what ? `${what}: ${e.message ?? ''}` : e.message)}`);
      continue;
    }
    parts.push(`${k}=${fieldValue(v)}`);
  }
  return `${parts.join(' ').replace(/\n/g, '\\n')}\n`;
}

/** The destination for a format: stdout, each line transformed on its way. */
function destination(format: Exclude<LogFormat, 'auto'>): DestinationStream {
  const out = pino.destination({ fd: 1, sync: true });
  if (format === 'json') return out;
  if (format === 'pretty') {
    const colour = process.stdout.isTTY === true && !process.env.NO_COLOR;
    return { write: (line: string) => out.write(prettyLine(line, colour)) };
  }
  // pino sets lastLevel on a stream that asks for metadata, before each write (pino's
  // docs, "Metadata"): the priority without parsing the line again.
  const journal = {
    [Symbol.for('pino.metadata')]: true,
    lastLevel: 30,
    write(line: string) {
      out.write(`<${syslogPriority(this.lastLevel)}>${line}`);
    },
  };
  return journal;
}

export function createLogger(
  name: string,
  level = process.env.NESTBROKER_LOG_LEVEL ?? 'info',
  format: string | undefined = process.env.NESTBROKER_LOG_FORMAT,
): Logger {
  return pino(
    { name, level, base: { pid: process.pid, name } },
    destination(resolveLogFormat(format)),
  );
}

/** A logger that drops everything, for tests that assert on effects, not logs. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
