/**
 * Watches the host (MemAvailable through systeminformation; memory PSI from
 * /proc/pressure/memory) and each VM's cgroup (usage, limits, PSI through
 * cgroup-adapter), and feeds the trigger policy (trigger.ts). The loop is a pipeline:
 * observe → evaluate (pure) → issue at most one reclaim → wait for the next tick.
 * The clock is injected so the loop can be driven step by step.
 */
import { promises as fs } from 'node:fs';
import { hostUsage } from '../../cgroup-adapter/host-usage';
import type { CgroupAdapter, GroupUsage, Limits } from '../../cgroup-adapter/types';
import type { Logger } from '../common/log';
import type { HostConfig } from './config';
import type { HostBroker } from './host-broker';
import {
  evaluateTrigger,
  INITIAL_TRIGGER_STATE,
  type GuestCandidate,
  type HostObservation,
  type TriggerDecision,
  type TriggerState,
} from './trigger';

export interface VmSample {
  guest: string;
  group?: string;
  usage?: GroupUsage;
  limits?: Limits;
  error?: string;
}

export interface WatchSample {
  at: string;
  host: HostObservation & { memoryTotalBytes?: number; cpuCount?: number };
  vms: VmSample[];
  decision: TriggerDecision;
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

/** The loop's time: `now` for the policy, timers for the ticks (injected in tests). */
export interface WatcherClock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const realWatcherClock: WatcherClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (h) => clearTimeout(h as NodeJS.Timeout),
};

export interface WatcherOptions {
  source?: HostSource;
  clock?: WatcherClock;
}

export class Watcher {
  private state: TriggerState = INITIAL_TRIGGER_STATE;
  private sample: WatchSample | null = null;
  private timer: unknown = null;
  private running = false;
  private readonly source: HostSource;
  private readonly clock: WatcherClock;

  constructor(
    private readonly cfg: Readonly<HostConfig>,
    private readonly broker: Pick<HostBroker, 'status' | 'issue'>,
    private readonly adapter: CgroupAdapter | null,
    private readonly log: Logger,
    opts: WatcherOptions = {},
  ) {
    this.source = opts.source ?? realHostSource;
    this.clock = opts.clock ?? realWatcherClock;
  }

  /** Samples at once, then every trigger.interval after the previous step ended. */
  start(): void {
    if (this.running) return;
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

  stop(): void {
    this.running = false;
    if (this.timer !== null) this.clock.clearTimeout(this.timer);
    this.timer = null;
  }

  last(): WatchSample | null {
    return this.sample;
  }

  triggerState(): TriggerState & { enabled: boolean } {
    return { ...this.state, enabled: this.cfg.trigger.enabled };
  }

  /** One observe → evaluate → act step. */
  async step(): Promise<WatchSample> {
    const now = this.clock.now();
    const host: WatchSample['host'] = { now };
    try {
      const u = await this.source.usage();
      host.memoryAvailableBytes = u.memAvailable;
      host.memoryTotalBytes = u.memTotal;
      host.cpuCount = u.cpuCount;
    } catch (err) {
      this.log.warn({ err }, 'host usage unreadable');
    }
    host.memoryPsiSomeAvg10 = await this.source.memoryPsi().catch(() => undefined);
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
    const candidates: GuestCandidate[] = this.cfg.guests.map((g) => {
      const st = this.broker.status(g.name);
      return {
        name: g.name,
        priority: g.priority,
        granted: st.books.granted,
        floor: st.books.floor,
        busy: st.pending.length > 0,
      };
    });
    const r = evaluateTrigger(this.cfg.trigger, this.state, host, candidates);
    this.state = r.state;
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
      } catch (err) {
        this.log.error({ err }, 'automatic reclaim could not be issued');
      }
    }
    this.sample = { at: new Date(now).toISOString(), host, vms, decision: r.decision };
    return this.sample;
  }
}
