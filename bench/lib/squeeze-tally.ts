/**
 * The tally of a graceful-vs-OOM comparison (docs/performance.md, part 3), shared by the
 * run on this machine (bench/graceful-vs-oom.ts) and the one in a real guest
 * (bench/lib/real-guest.ts): per variant the sums over its runs, the table people read, and
 * the goal.
 */
import { r1, summarise, table } from './common';

/** What each run of either bench counts. */
export interface SqueezeRun {
  variant: string;
  oomKills: number;
  gracefulEnds: number;
  killedBySigkill: number;
  lowestPriorityWasTheOneStopped: boolean;
  workLost: number;
  /** ms until the memory was actually free; null: never, within the bench's bound */
  msUntilFree: number | null;
}

export function tallyVariants(results: SqueezeRun[], variants: readonly string[]) {
  return variants.map((variant) => {
    const rs = results.filter((r) => r.variant === variant);
    const free = rs.map((r) => r.msUntilFree).filter((x): x is number => x !== null);
    const sum = (f: (r: SqueezeRun) => number): number => rs.reduce((s, r) => s + f(r), 0);
    return {
      variant,
      runs: rs.length,
      oomKills: sum((r) => r.oomKills),
      killedBySigkill: sum((r) => r.killedBySigkill),
      gracefulEnds: sum((r) => r.gracefulEnds),
      lowestPriorityStoppedRuns: rs.filter((r) => r.lowestPriorityWasTheOneStopped).length,
      workLost: sum((r) => r.workLost),
      freedRuns: free.length,
      msUntilFree: free.length ? summarise(free) : null,
    };
  });
}

export function totalsTable(totals: ReturnType<typeof tallyVariants>): string {
  return table([
    [
      'variant',
      'runs',
      'OOM kills',
      'SIGKILLed',
      'graceful',
      'lowest stopped (runs)',
      'work lost',
      'freed (runs)',
      'ms until free p50',
      'max',
    ],
    ...totals.map((t) => [
      t.variant,
      t.runs,
      t.oomKills,
      t.killedBySigkill,
      t.gracefulEnds,
      `${t.lowestPriorityStoppedRuns}/${t.runs}`,
      t.workLost,
      `${t.freedRuns}/${t.runs}`,
      t.msUntilFree ? r1(t.msUntilFree.p50) : '-',
      t.msUntilFree ? r1(t.msUntilFree.max) : '-',
    ]),
  ]);
}

/**
 * The goal of docs/performance.md, judged on the nestbroker runs: there must be some, and
 * every one clean.
 */
export function nestbrokerGoal(results: SqueezeRun[]): { goal: string; met: boolean } {
  const nb = results.filter((r) => r.variant === 'nestbroker');
  return {
    goal: 'nestbroker: 0 OOM kills, every stop graceful and in priority order, in every run',
    met:
      nb.length > 0 &&
      nb.every(
        (r) =>
          r.oomKills === 0 &&
          r.killedBySigkill === 0 &&
          r.workLost === 0 &&
          r.lowestPriorityWasTheOneStopped &&
          r.msUntilFree !== null,
      ),
  };
}
