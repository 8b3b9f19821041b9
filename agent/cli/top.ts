/**
 * `nestctl top` and `nestctl --guest top`: a view that refreshes every `--interval` until
 * Ctrl-C, or `--count` times (docs/architecture.md, "Observability"). On a terminal each
 * refresh redraws the screen; piped, each is printed after the last; with --json each is
 * one JSON line (NDJSON), for scripts that follow usage over time.
 */
import type { Argv } from 'yargs';
import { NestError, type Problem } from '../common/errors';
import { parseDuration } from '../common/units';
import { EXIT, type Io } from './format';

export interface TopArgs {
  interval?: string;
  count?: number;
}

/** Below this a refresh would mostly measure itself (each reads every project's files). */
export const TOP_MIN_INTERVAL_MS = 200;

export function topOptions<T>(y: Argv<T>): Argv<T & TopArgs> {
  return y
    .option('interval', { type: 'string', describe: 'between refreshes (default 2s)' })
    .option('count', { type: 'number', describe: 'refresh this many times, then exit' });
}

/** The interval and count, or every problem with them at once (INPUT_INVALID). */
export function parseTopArgs(a: TopArgs): { intervalMs: number; count: number | null } {
  const problems: Problem[] = [];
  let intervalMs = 2000;
  if (a.interval !== undefined) {
    const d = parseDuration(a.interval);
    if (!d.ok) problems.push({ field: '--interval', value: a.interval, message: d.message });
    else if (d.value < TOP_MIN_INTERVAL_MS)
      problems.push({
        field: '--interval',
        value: a.interval,
        message: `must be at least ${TOP_MIN_INTERVAL_MS}ms, got "${a.interval}"`,
      });
    else intervalMs = d.value;
  }
  if (a.count !== undefined && !(Number.isSafeInteger(a.count) && a.count >= 1))
    problems.push({
      field: '--count',
      value: a.count,
      message: `must be a whole number ≥ 1, got ${a.count}`,
    });
  if (problems.length > 0)
    throw new NestError(
      'INPUT_INVALID',
      problems.map((p) => `${p.field} ${JSON.stringify(p.value)}: ${p.message}`).join('; '),
      { problems },
    );
  return { intervalMs, count: a.count ?? null };
}

/** Clear the screen and home the cursor (ECMA-48 ED 2 + CUP). */
const CLEAR = '\x1b[H\x1b[2J';

export async function topLoop<V>(
  io: Io,
  opts: { intervalMs: number; count: number | null; json: boolean; tty: boolean },
  read: () => Promise<V>,
  render: (v: V) => string,
): Promise<number> {
  let stop = false;
  let wake: () => void = () => undefined;
  const onInt = (): void => {
    stop = true;
    wake();
  };
  process.once('SIGINT', onInt);
  try {
    for (let n = 1; !stop; n++) {
      const v = await read();
      if (opts.json) io.out(JSON.stringify(v));
      else if (opts.tty) io.out(CLEAR + render(v));
      else io.out(`${render(v)}\n`);
      if (opts.count !== null && n >= opts.count) break;
      await new Promise<void>((r) => {
        const t = setTimeout(r, opts.intervalMs);
        wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
    return EXIT.OK;
  } finally {
    process.off('SIGINT', onInt);
  }
}
