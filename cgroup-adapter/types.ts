/**
 * The one interface to cgroupfs. Two drivers implement it (`v2`, `hybrid`), chosen by
 * detection at start (see detect.ts). Nothing outside cgroup-adapter/ writes cgroupfs.
 *
 * Groups are named by a relative path of checked names beneath the claimed root,
 * e.g. "projects/web". Every path is resolved beneath the root (see names.ts).
 */

/** `"max"` is an explicit value; `undefined` means "don't write". */
export type Max = number | 'max';

export interface MemoryLimits {
  min?: number; // bytes
  low?: number;
  high?: Max;
  max?: Max;
}

/** cpu.max: quota and period in µs; quota "max" means no limit. */
export interface CpuMax {
  quotaUs: Max;
  periodUs: number;
}

export interface CpuLimits {
  max?: CpuMax;
  weight?: number; // 1..10000 (v2 cpu.weight); mapped to cpu.shares on v1
}

export interface Limits {
  memory?: MemoryLimits;
  cpu?: CpuLimits;
  /** cpuset.cpus list, e.g. "0-1" or "0,2". */
  cpus?: string;
  pidsMax?: Max;
}

export interface Psi {
  avg10: number;
  avg60: number;
  avg300: number;
  totalUs: number;
}

export interface PressureStat {
  some: Psi;
  full?: Psi;
}

export interface GroupUsage {
  memoryCurrent: number;
  /** memory.peak (v2, 5.19+) or memory.max_usage_in_bytes (v1); undefined if neither. */
  memoryPeak?: number;
  /** memory.events (v2) or memory.oom_control + memory.failcnt (v1). */
  memoryEvents: { oom: number; oomKill: number; high?: number; max?: number };
  cpuUsageUs: number;
  cpuNrPeriods: number;
  cpuNrThrottled: number;
  cpuThrottledUs: number;
  memoryPressure?: PressureStat;
  cpuPressure?: PressureStat;
  pids: number;
  /**
   * Interface files that were absent, so the numbers they feed read 0 (e.g. the v2
   * driver on a hierarchy where the memory controller is not enabled). Absent or empty
   * when everything was read.
   */
  unavailable?: string[];
}

export interface GroupEvents {
  populated: boolean;
  frozen: boolean;
}

/**
 * The few files a periodic sampler re-reads (sampler.ts): memory in use and CPU time.
 * Absolute paths; a file the layout lacks is left out (it then reads as 0).
 */
export interface SampleFiles {
  /** memory.current (v2) or memory.usage_in_bytes (v1): bytes. */
  memory?: string;
  /** cpuacct.usage (v1, ns) or cpu.stat (v2, its usage_usec line). */
  cpu?: { path: string; format: 'cpuacct.usage' | 'cpu.stat' };
  /** cgroup.procs of the membership hierarchy (for a read at the moment of signalling). */
  procs?: string;
}

export type DriverKind = 'v2' | 'hybrid';

export interface KillResult {
  /** How the group was emptied: `cgroup.kill`, or freeze + SIGKILL each + thaw. */
  method: 'cgroup.kill' | 'freeze-sigkill';
  ms: number;
}

/** What a driver can honestly do here; callers check before relying on a limit. */
export interface Capabilities {
  /** memory.min / memory.low protection exists (v2 only). */
  memoryProtection: boolean;
  /** memory.high throttles and reclaims (v2); on v1 it maps to an advisory soft limit. */
  memoryHighThrottles: boolean;
  /** cgroup.kill exists (5.14+); otherwise kill uses freeze + SIGKILL each + thaw. */
  cgroupKill: boolean;
  /** cgroup.freeze exists (5.2+). */
  freeze: boolean;
  /** Limit controllers available for setLimits. */
  controllers: { memory: boolean; cpu: boolean; cpuset: boolean; pids: boolean };
}

export interface CgroupAdapter {
  readonly kind: DriverKind;
  /** Optional so fakes need not provide it; both real drivers do. */
  readonly capabilities?: Capabilities;
  /** Absolute path of the claimed root in the unified (membership) hierarchy. */
  readonly root: string;

  create(group: string, limits?: Limits): Promise<void>;
  /** Removes the group and its children, deepest first; retries EBUSY with backoff. */
  remove(group: string): Promise<void>;
  exists(group: string): Promise<boolean>;
  /** Child group names directly beneath `group` ("" for the root). */
  children(group: string): Promise<string[]>;

  /** Moves one pid (one write per pid). A vanished pid raises code ESRCH. */
  movePid(group: string, pid: number): Promise<void>;
  pids(group: string): Promise<number[]>;
  /**
   * Of `pids`, those not in the group's subtree, with the hierarchies (`unified`, or a v1
   * mount such as `memory`) they are missing from. Optional so fakes need not provide it.
   */
  outside?(group: string, pids: readonly number[]): Promise<Map<number, string[]>>;

  setLimits(group: string, limits: Limits): Promise<void>;
  readLimits(group: string): Promise<Limits>;
  usage(group: string): Promise<GroupUsage>;
  /** The files for a cheap sampler (sampler.ts); optional so fakes need not provide it. */
  sampleFiles?(group: string): SampleFiles;
  events(group: string): Promise<GroupEvents>;

  freeze(group: string, timeoutMs?: number): Promise<void>;
  thaw(group: string, timeoutMs?: number): Promise<void>;
  /** Kills every process of the group (forks included) and waits for `populated 0`. */
  kill(group: string, timeoutMs?: number): Promise<KillResult>;
  /** Resolves when `populated 0`, rejects with code TIMEOUT. */
  waitEmpty(group: string, timeoutMs: number): Promise<void>;
}
