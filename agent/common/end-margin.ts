/**
 * The time a notice's END takes, measured (docs/reliability.md, "A deadline shorter than
 * a grace period"). A guest that kills its last project AT the deadline is late: after
 * the kill come the durable writes (the step record, the allocation, the notice's
 * outcome: each an fsync'd journal write, agent/common/journal.ts) and the outcome's trip
 * up the channel. So the guest ends its work earlier, by a margin made of what these took
 * recently on this machine:
 *
 *   kill     cgroup.kill until the group is empty (the stopper reports each one)
 *   journal  one fsync'd notice-journal write (the notice book times each one)
 *   send     a round trip on the channel to the broker above (the client's ping → pong)
 *
 *   killMs()  = SAFETY × worst recent kill
 *   afterMs() = SAFETY × (WRITES × worst recent journal write + worst recent round trip) + FLOOR
 *
 * The steps are bounded by `deadline − afterMs()`, and a stop's grace ends `killMs()`
 * before that. Until a kind has been measured once it counts its prior (PRIORS), which is
 * only there for the first notice after a start: the client pings on every welcome and
 * the book writes the notice before carrying it out, so only the kill can be unmeasured.
 * The margin never takes more than MAX_SHARE of what the notice had left on arrival.
 */
export type MarginKind = 'kill' | 'journal' | 'send';

/** Samples kept per kind: the worst of the recent ones counts (a slow disk is not averaged away). */
const KEEP = 8;
/** Durable writes between the last kill and the outcome leaving (step, allocation, notice). */
export const WRITES = 3;
/** Each measured figure is doubled: the next one may be slower than the worst seen. */
export const SAFETY = 2;
/** Added once: the event-loop turns between the steps (timers, promise jobs). */
export const FLOOR_MS = 10;
/** The margin's cap, as a share of the time left when the notice arrived. */
export const MAX_SHARE = 0.5;
/** Used for a kind not measured yet. */
export const PRIORS: Readonly<Record<MarginKind, number>> = { kill: 100, journal: 20, send: 10 };

export interface MarginSnapshot {
  killMs: number;
  afterMs: number;
  worst: Record<MarginKind, number | null>;
  samples: Record<MarginKind, number>;
}

export class EndMargin {
  private readonly samples: Record<MarginKind, number[]> = { kill: [], journal: [], send: [] };

  record(kind: MarginKind, ms: number): void {
    if (!Number.isFinite(ms) || ms < 0) return;
    const list = this.samples[kind];
    list.push(ms);
    if (list.length > KEEP) list.shift();
  }

  private worst(kind: MarginKind): number {
    const list = this.samples[kind];
    return list.length === 0 ? PRIORS[kind] : Math.max(...list);
  }

  /** How long before the steps' end a stop's grace must end, for the kill to be done by then. */
  killMs(): number {
    return Math.ceil(SAFETY * this.worst('kill'));
  }

  /** How long before the deadline the steps must be done, for the outcome to arrive in time. */
  afterMs(): number {
    return Math.ceil(SAFETY * (WRITES * this.worst('journal') + this.worst('send')) + FLOOR_MS);
  }

  /**
   * The two margins for a notice that had `budgetMs` left on arrival, capped together at
   * MAX_SHARE of it (a margin that ate the whole budget would stop everything at once).
   */
  forBudget(budgetMs: number): { killMs: number; afterMs: number } {
    let killMs = this.killMs();
    let afterMs = this.afterMs();
    const cap = Math.max(0, budgetMs) * MAX_SHARE;
    if (killMs + afterMs > cap) {
      const f = cap / (killMs + afterMs);
      killMs = Math.floor(killMs * f);
      afterMs = Math.floor(afterMs * f);
    }
    return { killMs, afterMs };
  }

  snapshot(): MarginSnapshot {
    const w = (k: MarginKind): number | null =>
      this.samples[k].length === 0 ? null : Math.max(...this.samples[k]);
    return {
      killMs: this.killMs(),
      afterMs: this.afterMs(),
      worst: { kill: w('kill'), journal: w('journal'), send: w('send') },
      samples: {
        kill: this.samples.kill.length,
        journal: this.samples.journal.length,
        send: this.samples.send.length,
      },
    };
  }
}
