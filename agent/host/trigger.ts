/**
 * The automatic trigger's policy (docs/host-broker.md: when host available memory or memory
 * PSI crosses its threshold for a configured time, reclaim from the lowest-priority guests
 * first, never below a guest's configured floor). A pure function of the config, the
 * previous state, one observation (with its time: the clock is the caller's) and the
 * guests' books; the watcher does the observing and the broker the acting
 * (kubelet eviction: observe → thresholds → choose one victim → act → wait).
 */
import { givesFirst, keepsFirst, type Rankable } from '../broker/ranking';
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
  /**
   * The guest's agent is connected (said hello). One that is not cannot act on a notice
   * before its deadline, and the books would take from it what it never gave: skipped.
   */
  reachable: boolean;
}

export type TriggerDecision =
  | { fire: false; why: string; skippedUnreachable?: string[] }
  | { fire: true; guest: string; change: Resources; reason: string; skippedUnreachable?: string[] };

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
        why: `threshold crossed for ${Math.round(obs.now - breachSince)} ms of the ${cfg.forMs} ms required`,
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
  const skipped: string[] = [];
  for (const g of ranked) {
    const change = stepFor(cfg, g);
    // The thresholds are about memory: a guest with no memory left above its floor is
    // no help, whatever CPUs it could give (CPUs alone only when the step takes no memory).
    const helps = cfg.step.memoryBytes > 0 ? change.memoryBytes > 0 : change.cpus > 0;
    if (helps && !g.reachable) {
      skipped.push(g.name);
      continue;
    }
    if (helps)
      return {
        // The breach clock restarts: the next step needs another full `for` of pressure.
        state: { breachSince: null, lastFiredAt: obs.now },
        decision: {
          fire: true,
          guest: g.name,
          change,
          reason: `automatic: ${crossed.join(' and ')} for ${Math.round(obs.now - breachSince)} ms`,
          ...(skipped.length > 0 ? { skippedUnreachable: skipped } : {}),
        },
      };
  }
  if (skipped.length > 0)
    return {
      state: next,
      decision: {
        fire: false,
        why: `no reachable guest has anything above its floor (not connected: ${skipped.join(', ')})`,
        skippedUnreachable: skipped,
      },
    };
  return {
    state: next,
    decision: { fire: false, why: 'every guest is at its floor: nothing left to reclaim' },
  };
}

// ---------------------------------------------------------------------------------------
// Give-back (hysteresis): what the trigger took comes back once the pressure has cleared
// for a while, as Proxmox's auto-ballooning grows its guests back. "Cleared" is a second
// threshold further from the first (trigger.giveBack.memoryAvailableAbove above
// trigger.memoryAvailableBelow, memoryPsiBelow below memoryPsiAbove): without that band
// every give-back would bring the host straight back to the threshold and the trigger
// would take it again.
// ---------------------------------------------------------------------------------------

export interface GiveBackState {
  /** Since when the pressure has been clear (null: not clear now). */
  clearSince: number | null;
  lastGaveBackAt: number | null;
}

export const INITIAL_GIVE_BACK_STATE: GiveBackState = Object.freeze({
  clearSince: null,
  lastGaveBackAt: null,
});

export interface GiveBackCandidate extends Rankable {
  /** What the trigger's own reclaims took from this guest and has not given back yet. */
  taken: Resources;
  /** allocation − granted: more than this the books refuse to give. */
  room: Resources;
  busy: boolean;
  reachable: boolean;
}

export type GiveBackDecision =
  { give: false; why: string } | { give: true; guest: string; change: Resources; reason: string };

/** Why the pressure counts as cleared, or null when it does not. Missing data never clears. */
export function cleared(cfg: TriggerConfig, obs: HostObservation): string[] | null {
  const gb = cfg.giveBack;
  if (!gb || breaches(cfg, obs).length > 0) return null;
  const out: string[] = [];
  if (gb.memoryAvailableAboveBytes !== undefined) {
    if (
      obs.memoryAvailableBytes === undefined ||
      obs.memoryAvailableBytes < gb.memoryAvailableAboveBytes
    )
      return null;
    out.push(`host MemAvailable ${obs.memoryAvailableBytes} B ≥ ${gb.memoryAvailableAboveBytes} B`);
  }
  if (gb.memoryPsiBelow !== undefined) {
    if (obs.memoryPsiSomeAvg10 === undefined || obs.memoryPsiSomeAvg10 >= gb.memoryPsiBelow)
      return null;
    out.push(`host memory PSI some avg10 ${obs.memoryPsiSomeAvg10}% < ${gb.memoryPsiBelow}%`);
  }
  return out;
}

const minRes = (a: Resources, b: Resources): Resources => ({
  memoryBytes: Math.max(0, Math.min(a.memoryBytes, b.memoryBytes)),
  cpus: Math.max(0, Math.round(Math.min(a.cpus, b.cpus) * 1000) / 1000),
});

/**
 * One give-back step, or why not: the pressure clear for `giveBack.after` (the clock starts
 * again after each step, so steps are `after` apart), no notice in flight, then the
 * highest-priority reachable guest the trigger took from gets one `step` back (never more
 * than it took, nor than its books have room for).
 */
export function evaluateGiveBack(
  cfg: TriggerConfig,
  state: GiveBackState,
  obs: HostObservation,
  guests: GiveBackCandidate[],
): { state: GiveBackState; decision: GiveBackDecision } {
  if (!cfg.enabled || !cfg.giveBack)
    return { state, decision: { give: false, why: 'give-back not configured' } };
  const why = cleared(cfg, obs);
  if (why === null)
    return {
      state: { ...state, clearSince: null },
      decision: { give: false, why: 'pressure not cleared' },
    };
  const clearSince = state.clearSince ?? obs.now;
  const next: GiveBackState = { ...state, clearSince };
  if (obs.now - clearSince < cfg.giveBack.afterMs)
    return {
      state: next,
      decision: {
        give: false,
        why: `pressure cleared for ${Math.round(obs.now - clearSince)} ms of the ${cfg.giveBack.afterMs} ms required`,
      },
    };
  if (guests.some((g) => g.busy))
    return {
      state: next,
      decision: { give: false, why: 'a notice is still in flight; waiting for its outcome' },
    };
  // Highest priority first: the reverse of who gives first.
  const ranked = [...guests].sort(keepsFirst);
  for (const g of ranked) {
    if (!g.reachable) continue;
    const change = minRes(minRes(cfg.step, g.taken), g.room);
    if (change.memoryBytes > 0 || change.cpus > 0)
      return {
        state: { clearSince: null, lastGaveBackAt: obs.now },
        decision: {
          give: true,
          guest: g.name,
          change,
          reason: `automatic give-back: ${why.join(' and ')} for ${Math.round(obs.now - clearSince)} ms`,
        },
      };
  }
  return {
    state: next,
    decision: { give: false, why: 'nothing the trigger took is left to give back' },
  };
}
