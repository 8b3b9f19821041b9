/**
 * Usage sampling from the cgroup files, every `usageInterval`: memory in use
 * (memory.current, v1 memory.usage_in_bytes) and CPU time → CPUs in use over the interval.
 * The planner reads the latest sample when it is recent (recent()), or a fresh one.
 *
 * Cheap by design (docs/performance.md: 19 % of a core for 200 projects a second before): a
 * periodic sample reads two files a project through cgroup-adapter's GroupSampler, which
 * keeps them open and re-reads them with one pread each, synchronously (no thread pool, no
 * promise per file). The full picture (peaks, OOM events, pressure, pids) is the
 * adapter's usage(), read on demand by whoever needs it, never every tick. An adapter
 * without sampleFiles (a test fake) is sampled through usage().
 *
 * The periodic sample is the guest's one clock for "every usageInterval": after each one
 * (read or failed) the sampler emits `tick`, and supervision follows it (supervisor.ts)
 * rather than running a timer of its own.
 */
import { EventEmitter } from 'node:events';
import * as os from 'node:os';
import type { CgroupAdapter } from '../../cgroup-adapter/types';
import { GroupSampler } from '../../cgroup-adapter/sampler';
import type { Logger } from '../common/log';

export interface ProjectUsage {
  memoryBytes: number;
  /** CPUs in use over the last interval (undefined on the first sample). */
  cpus?: number;
  cpuUsageUs: number;
  /** Tasks in the group: only from the slow path (an adapter without sampleFiles). */
  pids?: number;
  at: number;
}

/** A sample older than this many intervals is not "recent" for a plan. */
const RECENT_INTERVALS = 2;

/** What follows the periodic sample: `tick` after each one, read or failed. */
export interface SampleTicks {
  on(event: 'tick', listener: () => void): unknown;
  off(event: 'tick', listener: () => void): unknown;
}

export class UsageSampler extends EventEmitter implements SampleTicks {
  private latest: Record<string, ProjectUsage> = {};
  private latestAt = 0;
  private timer: NodeJS.Timeout | null = null;
  private readonly cheap: GroupSampler;
  readonly onlineCpus = os.cpus().length;

  constructor(
    private readonly adapter: CgroupAdapter,
    private readonly groups: () => { name: string; group: string }[],
    private readonly intervalMs: number,
    private readonly log: Logger,
    private readonly now: () => number = () => performance.now(),
  ) {
    super();
    this.cheap = new GroupSampler(adapter);
  }

  start(): void {
    const tick = (): void => {
      void this.fresh()
        .catch((err: unknown) => this.log.warn({ err }, 'usage sample failed'))
        .finally(() => {
          if (!this.timer) return; // stopped meanwhile
          this.emit('tick');
          this.timer = setTimeout(tick, this.intervalMs).unref();
        });
    };
    this.timer = setTimeout(tick, 0).unref();
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.cheap.close();
  }

  last(): Record<string, ProjectUsage> {
    return this.latest;
  }

  /**
   * What a plan reads: a fresh sample through the cheap sampler (a project that just
   * allocated must be seen above its target). Without one (a fake adapter), the last
   * sample when it is at most RECENT_INTERVALS intervals (and 2 s) old and covers every
   * project; a fresh one otherwise.
   */
  async recent(): Promise<Record<string, ProjectUsage>> {
    // Two preads a project (~1 ms for 100): fresh costs less than a stale plan would.
    if (this.cheap.available) return this.fresh();
    const maxAge = Math.max(RECENT_INTERVALS * this.intervalMs, 2000);
    const groups = this.groups();
    const fresh = this.now() - this.latestAt <= maxAge;
    if (fresh && groups.every((g) => this.latest[g.name] !== undefined)) return this.latest;
    return this.fresh();
  }

  /** One group's memory in use now (a shrink waiting for it to come down). */
  async memoryNow(group: string): Promise<number> {
    const c = this.cheap.available ? this.cheap.read(group) : null;
    // A group that is gone: the adapter's read says so with its own error.
    return c ? c.memoryCurrent : (await this.adapter.usage(group)).memoryCurrent;
  }

  /** The group's processes now, without a thread-pool round trip when the sampler can. */
  pidsNow(group: string): number[] | null {
    return this.cheap.available ? this.cheap.pids(group) : null;
  }

  /** Samples every project now. A project whose group is missing is left out. */
  async fresh(): Promise<Record<string, ProjectUsage>> {
    const next: Record<string, ProjectUsage> = {};
    const useCheap = this.cheap.available;
    for (const { name, group } of this.groups()) {
      try {
        let memoryBytes: number;
        let cpuUsageUs: number;
        let pids: number | undefined;
        if (useCheap) {
          const c = this.cheap.read(group);
          if (c === null) continue; // the group is gone
          memoryBytes = c.memoryCurrent;
          cpuUsageUs = c.cpuUsageUs;
        } else {
          const u = await this.adapter.usage(group);
          memoryBytes = u.memoryCurrent;
          cpuUsageUs = u.cpuUsageUs;
          pids = u.pids;
        }
        const at = this.now();
        const prev = this.latest[name];
        const s: ProjectUsage = { memoryBytes, cpuUsageUs, at };
        if (pids !== undefined) s.pids = pids;
        // CPUs in use over at least 200 ms: two samples a moment apart say nothing.
        if (prev && at - prev.at >= 200 && cpuUsageUs >= prev.cpuUsageUs)
          s.cpus =
            Math.round(((cpuUsageUs - prev.cpuUsageUs) / ((at - prev.at) * 1000)) * 1000) / 1000;
        else if (prev && at - prev.at < 200) {
          // Keep the older sample as the base of the CPU rate until 200 ms have passed.
          s.at = prev.at;
          s.cpuUsageUs = prev.cpuUsageUs;
          if (prev.cpus !== undefined) s.cpus = prev.cpus;
        } else if (prev?.cpus !== undefined) s.cpus = prev.cpus;
        next[name] = s;
      } catch (err) {
        this.log.debug({ err, project: name }, 'no usage for project');
      }
    }
    this.latest = next;
    this.latestAt = this.now();
    return next;
  }
}
