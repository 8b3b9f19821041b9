/**
 * Watches the host (MemAvailable from /proc/meminfo; memory PSI from /proc/pressure/memory)
 * and feeds the trigger policy (trigger.ts). The loop is a pipeline: observe → evaluate
 * (pure) → issue at most one reclaim → wait for the next tick. The clock is injected so
 * the loop can be driven step by step.
 *
 * Cost (docs/performance.md): the loop runs only when the automatic trigger is on, and a
 * tick reads only what the policy looks at — host MemAvailable and PSI and the books. Each
 * VM's cgroup (usage, limits) is read on demand, for `status` (observe()): reading usage
 * and limits of 50 VM cgroups every tick was a 15 % CPU spike every 5 s on an idle host.
 */
import { systemClock } from '../common/clock';
import { promises as fs } from 'node:fs';
import { hostUsage, processRows, type ProcessRow } from '../../cgroup-adapter/host-usage';
import type { CgroupAdapter, GroupUsage, Limits } from '../../cgroup-adapter/types';
import type { Logger } from '../common/log';
import type { Resources } from '../broker/types';
import { missing } from './books';
import type { HostConfig } from './config';
import type { HostBroker } from './host-broker';
import {
  breaches,
  evaluateGiveBack,
  evaluateTrigger,
  INITIAL_GIVE_BACK_STATE,
  INITIAL_TRIGGER_STATE,
  type GiveBackCandidate,
  type GiveBackDecision,
  type GiveBackState,
  type GuestCandidate,
  type HostObservation,
  type TriggerDecision,
  type TriggerState,
} from './trigger';

/** The trigger as `status` shows it (triggerView). */
export interface TriggerView {
  enabled: boolean;
  thresholds: {
    memoryAvailableBelowBytes: number | null;
    memoryPsiAbove: number | null;
    forMs: number;
    cooldownMs: number;
    intervalMs: number;
    deadlineMs: number;
    step: Resources;
  };
  /** When the current breach started (null: none now), and how long it has lasted. */
  breachSince: string | null;
  breachForMs: number | null;
  /** How much of it counts toward the next step (the count starts again at each fire). */
  breachCountedMs: number | null;
  lastFire: { at: string; agoMs: number; guest: string; change: Resources; reason: string } | null;
  cooldownLeftMs: number;
  /** The last tick's decision, and when it was made. */
  decision: TriggerDecision;
  decidedAt: string | null;
  /** Times each guest was passed over for not being connected. */
  skippedUnreachable: Record<string, number>;
  /** The give-back (hysteresis), when configured. */
  giveBack: {
    memoryAvailableAboveBytes: number | null;
    memoryPsiBelow: number | null;
    afterMs: number;
    clearSince: string | null;
    clearForMs: number | null;
    last: { at: string; agoMs: number; guest: string; change: Resources; reason: string } | null;
    decision: GiveBackDecision | null;
  } | null;
}

export interface VmSample {
  guest: string;
  group?: string;
  usage?: GroupUsage;
  limits?: Limits;
  error?: string;
}

/** A VM's processes (its QEMU under libvirt) in `nestctl status --processes`. */
export interface VmProcesses {
  guest: string;
  group?: string;
  /** Every process in the VM's cgroup and the groups beneath it, largest RSS first. */
  processes: ProcessRow[];
  error?: string;
}

/** How deep below a VM's cgroup processes are looked for (libvirt: `emulator`, `vcpuN`). */
const VM_PROCESS_DEPTH = 3;

export interface WatchSample {
  at: string;
  host: HostObservation & { memoryTotalBytes?: number; cpuCount?: number };
  /** Every VM's cgroup in an on-demand sample (observe()); empty in a trigger tick's. */
  vms: VmSample[];
  decision: TriggerDecision;
  /** The give-back's decision of that tick (absent: not configured, or the trigger fired). */
  giveBack?: GiveBackDecision;
}

/** `some avg10=1.23 ...` → 1.23 (Documentation/accounting/psi.rst). */
export function parsePsiSomeAvg10(text: string): number | undefined {
  const m = /^some\s+avg10=([\d.]+)/m.exec(text);
  return m ? Number(m[1]) : undefined;
}

/** Where the host's own figures come from (the real host by default; a recording fake in tests). */
export interface HostSource {
  /** MemAvailable / MemTotal / CPUs (systeminformation through cgroup-adapter/host-usage). */
  usage(): Promise<{ memAvailable: number; memTotal: number; cpuCount: number }>;
  /** `some avg10` of host memory PSI, percent; undefined without PSI. */
  memoryPsi(): Promise<number | undefined>;
}

export const realHostSource: HostSource = {
  usage: () => hostUsage(),
  memoryPsi: async () => {
    try {
      return parsePsiSomeAvg10(await fs.readFile('/proc/pressure/memory', 'utf8'));
    } catch {
      // No PSI on this kernel: the PSI threshold never crosses (missing data rule).
      return undefined;
    }
  },
};

/**
 * The loop's time: `now` for the policy (breach and cooldown durations: monotonic in the
 * daemon, docs/reliability.md "Time"), `wall` for the timestamps people read, timers for
 * the ticks (injected in tests; without `wall`, `now` is shown as it is).
 */
export interface WatcherClock {
  now(): number;
  wall?(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const realWatcherClock: WatcherClock = {
  now: () => systemClock.monotonic(),
  wall: () => systemClock.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
};

export interface WatcherOptions {
  source?: HostSource;
  clock?: WatcherClock;
}

export class Watcher {
  private state: TriggerState = INITIAL_TRIGGER_STATE;
  private giveBackState: GiveBackState = INITIAL_GIVE_BACK_STATE;
  /**
   * Since when the host has been past a threshold without a break, on the loop's clock: the
   * breach as the operator sees it. The policy's own breachSince starts again at each fire
   * (each step needs a full `for`), so it cannot say this.
   */
  private pressureSince: number | null = null;
  private lastGiveBack: { at: number; guest: string; change: Resources; reason: string } | null =
    null;
  private sample: WatchSample | null = null;
  private timer: unknown = null;
  private observing: Promise<WatchSample> | null = null;
  private running = false;
  /** Guests passed over by the trigger because their agent was not connected (a metric). */
  skippedUnreachable = 0;
  /** The same, per guest (`nestbroker_host_trigger_skipped_unreachable_total{guest}`). */
  readonly skippedByGuest = new Map<string, number>();
  /** The last time the trigger fired (a notice went out): guest, change, reason. */
  private lastFire: { at: number; guest: string; change: Resources; reason: string } | null = null;
  private readonly source: HostSource;
  private readonly clock: WatcherClock;

  constructor(
    private cfg: Readonly<HostConfig>,
    private readonly broker: Pick<HostBroker, 'status' | 'issue' | 'notices'>,
    private readonly adapter: CgroupAdapter | null,
    private readonly log: Logger,
    opts: WatcherOptions = {},
  ) {
    this.source = opts.source ?? realHostSource;
    this.clock = opts.clock ?? realWatcherClock;
  }

  /**
   * Samples at once, then every trigger.interval after the previous step ended. With the
   * trigger off there is nothing to decide: no loop (status reads on demand, observe()).
   */
  start(): void {
    if (this.running || !this.cfg.trigger.enabled) return;
    this.running = true;
    const tick = (): void => {
      this.timer = null;
      void this.step()
        .catch((err: unknown) => this.log.warn({ err }, 'watcher step failed'))
        .finally(() => {
          if (this.running) this.timer = this.clock.setTimeout(tick, this.cfg.trigger.intervalMs);
        });
    };
    this.timer = this.clock.setTimeout(tick, 0);
  }

  /**
   * A reload's new config (agent/host/reload.ts): the guests and the trigger. A trigger
   * turned on starts the loop, turned off stops it; its state (breach, cooldown) stays.
   */
  setConfig(cfg: Readonly<HostConfig>): void {
    this.cfg = cfg;
    if (cfg.trigger.enabled) this.start();
    else this.stop();
  }

  stop(): void {
    this.running = false;
    if (this.timer !== null) this.clock.clearTimeout(this.timer);
    this.timer = null;
  }

  last(): WatchSample | null {
    return this.sample;
  }

  /** The trigger's state with its instants as wall time (ms since the epoch), for display. */
  triggerState(): TriggerState & { enabled: boolean } {
    return {
      breachSince: this.wallOf(this.state.breachSince),
      lastFiredAt: this.wallOf(this.state.lastFiredAt),
      enabled: this.cfg.trigger.enabled,
    };
  }

  /** An instant of the policy clock as wall time, for display only. */
  private wallOf(t: number | null): number | null {
    if (t === null || !this.clock.wall) return t;
    return Math.round(this.clock.wall() + (t - this.clock.now()));
  }

  private stamp(now: number): string {
    return new Date(this.wallOf(now) ?? now).toISOString();
  }

  /**
   * The trigger for `status`: its thresholds, when the current breach started and for how
   * long, the last fire, the last decision and the guests skipped. Times the loop keeps on
   * its own clock are given as ages (ms before now) and as wall-clock times derived from
   * them, so the view is right whatever origin that clock has.
   */
  triggerView(): TriggerView {
    const t = this.cfg.trigger;
    const now = this.clock.now();
    const wall = (at: number | null): string | null => (at === null ? null : this.stamp(at));
    const since = this.pressureSince;
    const counted = this.state.breachSince;
    return {
      enabled: t.enabled,
      thresholds: {
        memoryAvailableBelowBytes: t.memoryAvailableBelowBytes ?? null,
        memoryPsiAbove: t.memoryPsiAbove ?? null,
        forMs: t.forMs,
        cooldownMs: t.cooldownMs,
        intervalMs: t.intervalMs,
        deadlineMs: t.deadlineMs,
        step: { memoryBytes: t.step.memoryBytes, cpus: t.step.cpus },
      },
      breachSince: wall(since),
      breachForMs: since === null ? null : Math.round(now - since),
      breachCountedMs: counted === null ? null : Math.round(now - counted),
      lastFire: this.lastFire
        ? {
            at: wall(this.lastFire.at)!,
            agoMs: Math.round(now - this.lastFire.at),
            guest: this.lastFire.guest,
            change: this.lastFire.change,
            reason: this.lastFire.reason,
          }
        : null,
      cooldownLeftMs:
        this.state.lastFiredAt === null
          ? 0
          : Math.max(0, Math.round(t.cooldownMs - (now - this.state.lastFiredAt))),
      decision: this.sample?.decision ?? {
        fire: false,
        why: t.enabled ? 'not evaluated yet' : 'trigger disabled',
      },
      decidedAt: this.sample?.at ?? null,
      skippedUnreachable: Object.fromEntries(this.skippedByGuest),
      giveBack: t.giveBack
        ? {
            memoryAvailableAboveBytes: t.giveBack.memoryAvailableAboveBytes ?? null,
            memoryPsiBelow: t.giveBack.memoryPsiBelow ?? null,
            afterMs: t.giveBack.afterMs,
            clearSince: wall(this.giveBackState.clearSince),
            clearForMs:
              this.giveBackState.clearSince === null
                ? null
                : Math.round(now - this.giveBackState.clearSince),
            last: this.lastGiveBack
              ? {
                  at: wall(this.lastGiveBack.at)!,
                  agoMs: Math.round(now - this.lastGiveBack.at),
                  guest: this.lastGiveBack.guest,
                  change: this.lastGiveBack.change,
                  reason: this.lastGiveBack.reason,
                }
              : null,
            decision: this.sample?.giveBack ?? null,
          }
        : null,
    };
  }

  /**
   * What the trigger's own reclaims took from a guest and its give-backs have not returned
   * (from the notices the broker holds: done ones whose source is the trigger), at most what
   * the books lack (an operator's restore may have given it back already).
   */
  private takenByTrigger(guest: string, room: Resources): Resources {
    let mem = 0;
    let cpus = 0;
    for (const n of this.broker.notices(guest)) {
      if (n.source !== 'trigger' || n.state !== 'done') continue;
      const sign = n.notice.kind === 'reclaim' ? 1 : -1;
      mem += sign * n.notice.change.memoryBytes;
      cpus += sign * n.notice.change.cpus;
    }
    return {
      memoryBytes: Math.max(0, Math.min(mem, room.memoryBytes)),
      cpus: Math.max(0, Math.min(Math.round(cpus * 1000) / 1000, room.cpus)),
    };
  }

  /**
   * Each VM's processes, with pidusage's CPU share and RSS (cgroup-adapter/host-usage.ts):
   * the pids of the VM's cgroup and of the groups beneath it (libvirt puts QEMU in the
   * VM scope's `emulator` group, its vCPU threads in `vcpuN`). On demand only, never on a tick.
   */
  async vmProcesses(): Promise<VmProcesses[]> {
    const out: VmProcesses[] = [];
    for (const g of this.cfg.guests) {
      const v: VmProcesses = { guest: g.name, group: g.cgroup, processes: [] };
      out.push(v);
      if (!g.cgroup || !this.adapter) continue;
      try {
        v.processes = await processRows(await this.subtreePids(g.cgroup, VM_PROCESS_DEPTH));
      } catch (err) {
        v.error = err instanceof Error ? err.message : String(err);
      }
    }
    return out;
  }

  private async subtreePids(group: string, depth: number): Promise<number[]> {
    const adapter = this.adapter!;
    const pids = await adapter.pids(group);
    if (depth > 0)
      for (const c of await adapter.children(group).catch(() => []))
        pids.push(...(await this.subtreePids(`${group}/${c}`, depth - 1).catch(() => [])));
    return pids;
  }

  /**
   * The host and every VM's cgroup (usage and limits) now, with the trigger's last
   * decision; for `status`. Reads on demand and changes no trigger state; concurrent
   * callers share one read.
   */
  observe(): Promise<WatchSample> {
    if (this.observing) return this.observing;
    const p = (async (): Promise<WatchSample> => {
      const now = this.clock.now();
      const host = await this.observeHost(now);
      const vms: VmSample[] = [];
      for (const g of this.cfg.guests) {
        const s: VmSample = { guest: g.name, group: g.cgroup };
        if (g.cgroup && this.adapter) {
          try {
            s.usage = await this.adapter.usage(g.cgroup);
            s.limits = await this.adapter.readLimits(g.cgroup);
          } catch (err) {
            s.error = err instanceof Error ? err.message : String(err);
          }
        }
        vms.push(s);
      }
      const decision: TriggerDecision = this.sample?.decision ?? {
        fire: false,
        why: this.cfg.trigger.enabled ? 'not evaluated yet' : 'trigger disabled',
      };
      return { at: this.stamp(now), host, vms, decision };
    })();
    this.observing = p;
    const clear = (): void => {
      if (this.observing === p) this.observing = null;
    };
    p.then(clear, clear);
    return p;
  }

  private async observeHost(now: number): Promise<WatchSample['host']> {
    // Shown as wall time; the policy gets the monotonic reading (step).
    const host: WatchSample['host'] = { now: this.wallOf(now) ?? now };
    try {
      const u = await this.source.usage();
      host.memoryAvailableBytes = u.memAvailable;
      host.memoryTotalBytes = u.memTotal;
      host.cpuCount = u.cpuCount;
    } catch (err) {
      this.log.warn({ err }, 'host usage unreadable');
    }
    host.memoryPsiSomeAvg10 = await this.source.memoryPsi().catch(() => undefined);
    return host;
  }

  /**
   * One observe → evaluate → act step. Reads the host only: the policy decides on host
   * MemAvailable / PSI and the books, never on a VM's cgroup figures (trigger.ts).
   */
  async step(): Promise<WatchSample> {
    const now = this.clock.now();
    const host = await this.observeHost(now);
    const candidates: GuestCandidate[] = this.cfg.guests.map((g) => {
      const st = this.broker.status(g.name);
      return {
        name: g.name,
        priority: g.priority,
        granted: st.books.granted,
        floor: st.books.floor,
        busy: st.pending.length > 0,
        reachable: st.connected,
      };
    });
    const before = this.state;
    const crossed = breaches(this.cfg.trigger, host).length > 0;
    this.pressureSince = crossed ? (this.pressureSince ?? now) : null;
    const r = evaluateTrigger(this.cfg.trigger, this.state, { ...host, now }, candidates);
    this.state = r.state;
    this.skippedUnreachable += r.decision.skippedUnreachable?.length ?? 0;
    for (const g of r.decision.skippedUnreachable ?? [])
      this.skippedByGuest.set(g, (this.skippedByGuest.get(g) ?? 0) + 1);
    if (r.decision.fire) {
      this.log.warn({ decision: r.decision }, 'automatic trigger: reclaiming');
      try {
        await this.broker.issue('reclaim', {
          guest: r.decision.guest,
          change: r.decision.change,
          deadlineMs: this.cfg.trigger.deadlineMs,
          reason: r.decision.reason,
          source: 'trigger',
        });
        this.lastFire = {
          at: now,
          guest: r.decision.guest,
          change: r.decision.change,
          reason: r.decision.reason,
        };
      } catch (err) {
        // Refused: no notice went out, so no cooldown (it starts only when one did) and the
        // breach keeps its clock: the next tick may try again.
        this.state = { breachSince: before.breachSince ?? now, lastFiredAt: before.lastFiredAt };
        this.log.error({ err }, 'automatic reclaim could not be issued');
      }
    }
    let giveBack: GiveBackDecision | undefined;
    // The policy gets the monotonic reading; `host.now` is the wall time shown.
    if (!r.decision.fire && this.cfg.trigger.giveBack)
      giveBack = await this.giveBackStep(now, { ...host, now });
    this.sample = {
      at: this.stamp(now),
      host,
      vms: [],
      decision: r.decision,
      ...(giveBack ? { giveBack } : {}),
    };
    return this.sample;
  }

  /** The give-back half of a step: evaluate (pure), and issue at most one restore. */
  private async giveBackStep(now: number, host: HostObservation): Promise<GiveBackDecision> {
    const candidates: GiveBackCandidate[] = this.cfg.guests.map((g) => {
      const st = this.broker.status(g.name);
      // allocation − granted, as the books compute it (agent/host/books.ts), never below 0.
      const gap = missing(st.books);
      const room = { memoryBytes: Math.max(0, gap.memoryBytes), cpus: Math.max(0, gap.cpus) };
      return {
        name: g.name,
        priority: g.priority,
        taken: this.takenByTrigger(g.name, room),
        room,
        busy: st.pending.length > 0,
        reachable: st.connected,
      };
    });
    const before = this.giveBackState;
    const r = evaluateGiveBack(this.cfg.trigger, this.giveBackState, host, candidates);
    this.giveBackState = r.state;
    if (!r.decision.give) return r.decision;
    this.log.info({ decision: r.decision }, 'automatic give-back: restoring');
    try {
      await this.broker.issue('restore', {
        guest: r.decision.guest,
        change: r.decision.change,
        deadlineMs: this.cfg.trigger.deadlineMs,
        reason: r.decision.reason,
        source: 'trigger',
      });
      this.lastGiveBack = {
        at: now,
        guest: r.decision.guest,
        change: r.decision.change,
        reason: r.decision.reason,
      };
    } catch (err) {
      // Refused: nothing went out; the clear clock keeps running, the next tick may retry.
      this.giveBackState = { ...before, clearSince: before.clearSince ?? now };
      this.log.error({ err }, 'automatic give-back could not be issued');
    }
    return r.decision;
  }
}
