/**
 * Usage sampling from the cgroup files (through the adapter), every `usageInterval`:
 * memory.current (v1: memory.usage_in_bytes), CPU time → CPUs in use over the interval,
 * and the number of pids. The planner reads the latest sample (or a fresh one).
 */
import * as os from 'node:os';
import type { CgroupAdapter } from '../../cgroup-adapter/types';
import type { Logger } from '../common/log';

export interface ProjectUsage {
  memoryBytes: number;
  /** CPUs in use over the last interval (undefined on the first sample). */
  cpus?: number;
  cpuUsageUs: number;
  pids: number;
  at: number;
}

export class UsageSampler {
  private latest: Record<string, ProjectUsage> = {};
  private timer: NodeJS.Timeout | null = null;
  readonly onlineCpus = os.cpus().length;

  constructor(
    private readonly adapter: CgroupAdapter,
    private readonly groups: () => { name: string; group: string }[],
    private readonly intervalMs: number,
    private readonly log: Logger,
  ) {}

  start(): void {
    const tick = (): void => {
      void this.fresh()
        .catch((err: unknown) => this.log.warn({ err }, 'usage sample failed'))
        .finally(() => {
          if (this.timer) this.timer = setTimeout(tick, this.intervalMs).unref();
        });
    };
    this.timer = setTimeout(tick, 0).unref();
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  last(): Record<string, ProjectUsage> {
    return this.latest;
  }

  /** Samples every project now. A project whose group is missing is left out. */
  async fresh(): Promise<Record<string, ProjectUsage>> {
    const next: Record<string, ProjectUsage> = {};
    for (const { name, group } of this.groups()) {
      try {
        const u = await this.adapter.usage(group);
        const at = Date.now();
        const prev = this.latest[name];
        const s: ProjectUsage = {
          memoryBytes: u.memoryCurrent,
          cpuUsageUs: u.cpuUsageUs,
          pids: u.pids,
          at,
        };
        // CPUs in use over at least 200 ms: two samples a moment apart say nothing.
        if (prev && at - prev.at >= 200 && u.cpuUsageUs >= prev.cpuUsageUs)
          s.cpus =
            Math.round(((u.cpuUsageUs - prev.cpuUsageUs) / ((at - prev.at) * 1000)) * 1000) / 1000;
        else if (prev?.cpus !== undefined) s.cpus = prev.cpus;
        next[name] = s;
      } catch (err) {
        this.log.debug({ err, project: name }, 'no usage for project');
      }
    }
    // Keep the older sample as the base of the CPU rate until 200 ms have passed.
    for (const [name, s] of Object.entries(next)) {
      const prev = this.latest[name];
      if (prev && s.at - prev.at < 200) {
        next[name] = { ...s, at: prev.at, cpuUsageUs: prev.cpuUsageUs, cpus: prev.cpus };
      }
    }
    this.latest = next;
    return next;
  }
}
