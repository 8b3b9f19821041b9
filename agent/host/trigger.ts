/**
 * The automatic trigger's policy (docs/host-broker.md: when host available memory or memory
 * PSI crosses its threshold for a configured time, reclaim from the lowest-priority guests
 * first, never below a guest's configured floor). A pure function of the config, the
 * previous state, one observation (with its time: the clock is the caller's) and the
 * guests' books; the watcher does the observing and the broker the acting
 * (kubelet eviction: observe → thresholds → choose one victim → act → wait).
 */
import { givesFirst, type Rankable } from '../broker/ranking';
import type { Resources } from '../broker/types';
import type { TriggerConfig } from './config';
import { addCpus } from './books';

export interface HostObservation {
  /** ms since the epoch (or any monotonic origin: only differences matter). */
  now: number;
  /** MemAvailable (bytes); undefined when it could not be read. */
  memoryAvailableBytes?: number;
  /** Host memory PSI `some avg10`, percent; undefined without PSI. */
  memoryPsiSomeAvg10?: number;
}

export interface TriggerState {
  /** When the current breach started (null: no breach now). */
  breachSince: number | null;
  lastFiredAt: number | null;
}

export const INITIAL_TRIGGER_STATE: TriggerState = Object.freeze({
  breachSince: null,
  lastFiredAt: null,
});

export interface GuestCandidate extends Rankable {
  granted: Resources;
  floor: Resources;
  /** An unfinished notice for this guest: never pile a second one on. */
  busy: boolean;
}

export type TriggerDecision =
  { fire: false; why: string } | { fire: true; guest: string; change: Resources; reason: string };

/** Which thresholds the observation crosses (empty: none). Missing data never crosses. */
export function breaches(cfg: TriggerConfig, obs: HostObservation): string[] {
  const out: string[] = [];
  if (
    cfg.memoryAvailableBelowBytes !== undefined &&
    obs.memoryAvailableBytes !== undefined &&
    obs.memoryAvailableBytes < cfg.memoryAvailableBelowBytes
  )
    out.push(
      `host MemAvailable ${obs.memoryAvailableBytes} B < ${cfg.memoryAvailableBelowBytes} B`,
    );
  if (
    cfg.memoryPsiAbove !== undefined &&
    obs.memoryPsiSomeAvg10 !== undefined &&
    obs.memoryPsiSomeAvg10 > cfg.memoryPsiAbove
  )
    out.push(`host memory PSI some avg10 ${obs.memoryPsiSomeAvg10}% > ${cfg.memoryPsiAbove}%`);
  return out;
}

/** What one step may take from a guest without going below its floor. */
export function stepFor(cfg: TriggerConfig, g: GuestCandidate): Resources {
  return {
    memoryBytes: Math.max(
      0,
      Math.min(cfg.step.memoryBytes, g.granted.memoryBytes - g.floor.memoryBytes),
    ),
    cpus: Math.max(0, Math.min(cfg.step.cpus, addCpus(g.granted.cpus, -g.floor.cpus))),
  };
}

export function evaluateTrigger(
  cfg: TriggerConfig,
  state: TriggerState,
  obs: HostObservation,
  guests: GuestCandidate[],
): { state: TriggerState; decision: TriggerDecision } {
  if (!cfg.enabled) return { state, decision: { fire: false, why: 'trigger disabled' } };
  const crossed = breaches(cfg, obs);
  if (crossed.length === 0)
    return {
      state: { ...state, breachSince: null },
      decision: { fire: false, why: 'no threshold crossed' },
    };
  const breachSince = state.breachSince ?? obs.now;
  const next: TriggerState = { ...state, breachSince };
  if (obs.now - breachSince < cfg.forMs)
    return {
      state: next,
      decision: {
        fire: false,
        why: `threshold crossed for ${obs.now - breachSince} ms of the ${cfg.forMs} ms required`,
      },
    };
  if (state.lastFiredAt !== null && obs.now - state.lastFiredAt < cfg.cooldownMs)
    return { state: next, decision: { fire: false, why: 'cooling down after the last reclaim' } };
  if (guests.some((g) => g.busy))
    return {
      state: next,
      decision: { fire: false, why: 'a notice is still in flight; waiting for its outcome' },
    };
  const ranked = [...guests].sort(givesFirst);
  for (const g of ranked) {
    const change = stepFor(cfg, g);
    // The thresholds are about memory: a guest with no memory left above its floor is
    // no help, whatever CPUs it could give (CPUs alone only when the step takes no memory).
    const helps = cfg.step.memoryBytes > 0 ? change.memoryBytes > 0 : change.cpus > 0;
    if (helps)
      return {
        // The breach clock restarts: the next step needs another full `for` of pressure.
        state: { breachSince: null, lastFiredAt: obs.now },
        decision: {
          fire: true,
          guest: g.name,
          change,
          reason: `automatic: ${crossed.join(' and ')} for ${obs.now - breachSince} ms`,
        },
      };
  }
  return {
    state: next,
    decision: { fire: false, why: 'every guest is at its floor: nothing left to reclaim' },
  };
}
