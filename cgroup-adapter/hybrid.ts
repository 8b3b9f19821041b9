/**
 * Hybrid layout: cgroup2 (unified) for membership, freeze, kill, events and PSI; the v1
 * memory, cpu, cpuacct, cpuset and pids hierarchies for limits and usage. A group is a
 * directory in every one of them and a pid joins every one of them.
 *
 * The limit mapping (and what does not map) is documented in cgroup-adapter/README.md;
 * each method below cites the row it implements.
 */
import * as path from 'node:path';
import { BaseDriver, type DriverOptions, type Hierarchy } from './base-driver';
import { pathExists, readOptional, readProcs, readText, readTextNow, writeText } from './cgfs';
import { CgroupError, isCgroupError } from './errors';
import { HeldFiles } from './held';
import type { V1Controller } from './detect';
import {
  parseCpuList,
  parseCpuStatV2,
  parseMax,
  parsePressure,
  parseUint,
  printCpuList,
  printMax,
} from './formats';
import {
  cpuSharesToWeight,
  cpuWeightToShares,
  parseCfsQuota,
  parseCpuStatV1,
  parseCpuacctUsage,
  parseCpuShares,
  parseOomControl,
  parseV1Bytes,
  printCfsQuota,
  printV1Bytes,
} from './formats-v1';
import { validateLimits } from './limits';
import type { Capabilities, CpuMax, GroupUsage, Limits, Max, SampleFiles } from './types';

export class HybridDriver extends BaseDriver {
  readonly kind = 'hybrid' as const;
  readonly capabilities: Capabilities;
  /** v1 hierarchy holding each controller (cpu and cpuacct share one when comounted). */
  private readonly byController: Partial<Record<V1Controller, Hierarchy>>;
  /**
   * The limit files setLimits writes synchronously, and the two it reads first (the CFS
   * pair, the usage), kept open: held.ts.
   */
  private readonly held = new HeldFiles();

  private constructor(
    unifiedRoot: string,
    extra: Hierarchy[],
    byController: Partial<Record<V1Controller, Hierarchy>>,
    opts: DriverOptions,
    caps: Capabilities,
  ) {
    super(unifiedRoot, extra, opts);
    this.byController = byController;
    this.capabilities = caps;
  }

  /**
   * @param v1Roots the claimed root's absolute path in each v1 controller's hierarchy;
   *   controllers that share a mount must share a path (they are one hierarchy).
   */
  static async open(
    unifiedRoot: string,
    v1Roots: Partial<Record<V1Controller, string>>,
    opts: DriverOptions,
  ): Promise<HybridDriver> {
    const byPath = new Map<string, Hierarchy>();
    const byController: Partial<Record<V1Controller, Hierarchy>> = {};
    for (const [c, rootAbs] of Object.entries(v1Roots) as [V1Controller, string][]) {
      let h = byPath.get(rootAbs);
      if (h) h.name = `${h.name},${c}`;
      else byPath.set(rootAbs, (h = { name: c, rootAbs }));
      byController[c] = h;
    }
    const caps: Capabilities = {
      memoryProtection: false,
      memoryHighThrottles: false,
      cgroupKill: await pathExists(path.join(unifiedRoot, 'cgroup.kill')),
      freeze: await pathExists(path.join(unifiedRoot, 'cgroup.freeze')),
      controllers: {
        memory: !!byController.memory,
        cpu: !!byController.cpu,
        cpuset: !!byController.cpuset,
        pids: !!byController.pids,
      },
    };
    return new HybridDriver(unifiedRoot, [...byPath.values()], byController, opts, caps);
  }

  /** The directory of `group` in the hierarchy of `c`, or UNSUPPORTED naming the field. */
  private v1Dir(c: V1Controller, group: string, field: string, allowRoot = false): string {
    const h = this.byController[c];
    if (!h) {
      throw new CgroupError(
        'UNSUPPORTED',
        `${field}: the v1 ${c} controller is not mounted on this machine`,
        {
          field,
        },
      );
    }
    return this.paths(group, allowRoot)[h.name];
  }

  /**
   * A new v1 cpuset group starts with empty cpuset.cpus and cpuset.mems, and the kernel
   * refuses to attach a task to it (ENOSPC) until both are set: copy the parent's
   * (Documentation/admin-guide/cgroup-v1/cpusets.rst 1.9).
   */
  protected override async afterMkdir(h: Hierarchy, dir: string): Promise<void> {
    if (h !== this.byController.cpuset) return;
    const parent = path.dirname(dir);
    for (const f of ['cpuset.mems', 'cpuset.cpus']) {
      const v = (await readText(path.join(parent, f))).trim();
      if (v !== '') await writeText(path.join(dir, f), v);
    }
  }

  async setLimits(group: string, limits: Limits): Promise<void> {
    const l = validateLimits(limits);
    const m = l.memory ?? {};
    // Check everything that cannot be mapped before writing anything.
    for (const k of ['min', 'low'] as const) {
      if (m[k] !== undefined && m[k] !== 0) {
        throw new CgroupError(
          'UNSUPPORTED',
          `memory.${k} has no cgroup v1 equivalent (no memory protection in v1), got ${m[k]}; check capabilities.memoryProtection`,
          { field: `limits.memory.${k}`, value: m[k] },
        );
      }
    }
    const memDir =
      m.max !== undefined || m.high !== undefined
        ? this.v1Dir('memory', group, 'limits.memory')
        : '';
    const cpuDir =
      l.cpu?.max || l.cpu?.weight !== undefined ? this.v1Dir('cpu', group, 'limits.cpu') : '';
    const cpusetDir = l.cpus !== undefined ? this.v1Dir('cpuset', group, 'limits.cpus') : '';
    const pidsDir = l.pidsMax !== undefined ? this.v1Dir('pids', group, 'limits.pidsMax') : '';

    // memory.max → memory.limit_in_bytes (hard limit; OOM inside the group beyond it).
    // The kernel reclaims in the writer only when the new limit is below the usage
    // (cgroup-v1/memory.rst 2.5: it tries to reclaim down to it, else EBUSY): a limit at or
    // above the usage read just now is written synchronously, without a thread-pool round
    // trip (the shrinks write memory.max only once their usage came down, executor.ts);
    // one below it stays on the thread pool, so a slow reclaim cannot stall the event loop.
    if (m.max !== undefined) {
      const file = path.join(memDir, 'memory.limit_in_bytes');
      const text = printV1Bytes('memory.max', m.max);
      if (this.fitsNow(memDir, m.max)) this.held.write(file, text);
      else await writeText(file, text);
    }
    // memory.high → memory.soft_limit_in_bytes: ADVISORY, only reclaimed toward under
    // global memory pressure; it never throttles (README "What does not map").
    // It never reclaims (the kernel only records it), nor do the cpu, cpuset and pids files:
    // written synchronously on held descriptors, no thread-pool round trip, no open
    // (held.ts).
    if (m.high !== undefined) {
      this.held.write(
        path.join(memDir, 'memory.soft_limit_in_bytes'),
        printV1Bytes('memory.high', m.high),
      );
    }
    if (l.cpu?.max) this.writeCfs(cpuDir, l.cpu.max);
    // cpu.weight → cpu.shares (systemd's formula, formats-v1.ts cpuWeightToShares).
    if (l.cpu?.weight !== undefined) {
      this.held.write(path.join(cpuDir, 'cpu.shares'), String(cpuWeightToShares(l.cpu.weight)));
    }
    if (l.cpus !== undefined) this.held.write(path.join(cpusetDir, 'cpuset.cpus'), l.cpus);
    if (l.pidsMax !== undefined)
      this.held.write(path.join(pidsDir, 'pids.max'), printMax('pids.max', l.pidsMax));
  }

  /** The group's held descriptors go first: a removed group's files are dead (held.ts). */
  override async remove(group: string): Promise<void> {
    this.held.forget(Object.values(this.paths(group, false)));
    await super.remove(group);
  }

  override async removeRoot(timeoutMs?: number): Promise<void> {
    this.held.close();
    await super.removeRoot(timeoutMs);
  }

  /**
   * True when `max` is at or above the group's memory usage now (memory.usage_in_bytes, one
   * synchronous read): setting it makes the kernel reclaim nothing. Unreadable: false.
   */
  private fitsNow(memDir: string, max: Max): boolean {
    if (max === 'max') return true;
    try {
      return (
        parseUint(
          'memory.usage_in_bytes',
          this.held.read(path.join(memDir, 'memory.usage_in_bytes')),
        ) <= max
      );
    } catch {
      return false;
    }
  }

  /**
   * cpu.max → cpu.cfs_period_us + cpu.cfs_quota_us: two writes, and the kernel checks the
   * bandwidth (quota/period) against the hierarchy after EACH write
   * (Documentation/scheduler/sched-bwc.rst "Hierarchical considerations"). So write first
   * whichever leaves the lower bandwidth in between — e.g. when the period shrinks with the
   * quota, the quota goes first — and retry the other order once on EINVAL.
   */
  private writeCfs(dir: string, next: CpuMax): void {
    const qFile = path.join(dir, 'cpu.cfs_quota_us');
    const pFile = path.join(dir, 'cpu.cfs_period_us');
    const curQ = parseCfsQuota(this.held.read(qFile));
    const curP = parseUint('cpu.cfs_period_us', this.held.read(pFile));
    const bw = (q: Max, p: number) => (q === 'max' ? Infinity : q / p);
    const writeQ = () => this.held.write(qFile, printCfsQuota(next.quotaUs));
    const writeP = () => {
      if (curP !== next.periodUs) this.held.write(pFile, String(next.periodUs));
    };
    const quotaFirst = bw(next.quotaUs, curP) <= bw(curQ, next.periodUs);
    const order = quotaFirst ? [writeQ, writeP] : [writeP, writeQ];
    try {
      for (const w of order) w();
    } catch (e) {
      if (!isCgroupError(e, 'EINVAL')) throw e;
      for (const w of order.reverse()) w();
    }
  }

  /**
   * Read synchronously (readTextNow): limit files are generated by the kernel on read and
   * never wait, and the host reads them before every actuation (agent/host/actuator.ts),
   * where seven thread-pool round trips stood between a guest's outcome and the answer.
   */
  async readLimits(group: string): Promise<Limits> {
    const out: Limits = {};
    const d = this.paths(group, false);
    const mem = this.byController.memory;
    if (mem) {
      out.memory = {
        max: parseV1Bytes(
          'memory.limit_in_bytes',
          readTextNow(path.join(d[mem.name], 'memory.limit_in_bytes')),
        ),
        high: parseV1Bytes(
          'memory.soft_limit_in_bytes',
          readTextNow(path.join(d[mem.name], 'memory.soft_limit_in_bytes')),
        ),
      };
    }
    const cpu = this.byController.cpu;
    if (cpu) {
      const dir = d[cpu.name];
      out.cpu = {
        max: {
          quotaUs: parseCfsQuota(readTextNow(path.join(dir, 'cpu.cfs_quota_us'))),
          periodUs: parseUint(
            'cpu.cfs_period_us',
            readTextNow(path.join(dir, 'cpu.cfs_period_us')),
          ),
        },
        weight: cpuSharesToWeight(parseCpuShares(readTextNow(path.join(dir, 'cpu.shares')))),
      };
    }
    const cpuset = this.byController.cpuset;
    if (cpuset) {
      const t = readTextNow(path.join(d[cpuset.name], 'cpuset.cpus'));
      if (t.trim() !== '') out.cpus = printCpuList(parseCpuList(t));
    }
    const pids = this.byController.pids;
    if (pids) out.pidsMax = parseMax('pids.max', readTextNow(path.join(d[pids.name], 'pids.max')));
    return out;
  }

  sampleFiles(group: string): SampleFiles {
    const d = this.paths(group, true);
    const out: SampleFiles = {};
    const mem = this.byController.memory;
    if (mem) out.memory = path.join(d[mem.name], 'memory.usage_in_bytes');
    const acct = this.byController.cpuacct;
    out.cpu = acct
      ? { path: path.join(d[acct.name], 'cpuacct.usage'), format: 'cpuacct.usage' }
      : { path: path.join(d.unified, 'cpu.stat'), format: 'cpu.stat' };
    out.procs = path.join(d.unified, 'cgroup.procs');
    return out;
  }

  async usage(group: string): Promise<GroupUsage> {
    const d = this.paths(group, true);
    const unified = d.unified;
    const unavailable: string[] = [];
    const u: GroupUsage = {
      memoryCurrent: 0,
      memoryEvents: { oom: 0, oomKill: 0 },
      cpuUsageUs: 0,
      cpuNrPeriods: 0,
      cpuNrThrottled: 0,
      cpuThrottledUs: 0,
      pids: 0,
    };
    const mem = this.byController.memory;
    if (mem) {
      const dir = d[mem.name];
      u.memoryCurrent = parseUint(
        'memory.usage_in_bytes',
        await readText(path.join(dir, 'memory.usage_in_bytes')),
      );
      const peak = parseV1Bytes(
        'memory.max_usage_in_bytes',
        await readText(path.join(dir, 'memory.max_usage_in_bytes')),
      );
      if (peak !== 'max') u.memoryPeak = peak;
      // v1 has no OOM counter of its own: each oom_kill followed an OOM, and under_oom 1
      // is one in progress (OOM killer disabled). failcnt counts hits of the hard limit,
      // the nearest thing to v2's `max` event.
      const oom = parseOomControl(await readText(path.join(dir, 'memory.oom_control')));
      const failcnt = parseUint('memory.failcnt', await readText(path.join(dir, 'memory.failcnt')));
      u.memoryEvents = {
        oom: oom.oomKill + (oom.underOom ? 1 : 0),
        oomKill: oom.oomKill,
        max: failcnt,
      };
    } else unavailable.push('memory.usage_in_bytes', 'memory.oom_control');
    const acct = this.byController.cpuacct;
    if (acct)
      u.cpuUsageUs = parseCpuacctUsage(await readText(path.join(d[acct.name], 'cpuacct.usage')));
    else u.cpuUsageUs = parseCpuStatV2(await readText(path.join(unified, 'cpu.stat'))).usageUs;
    const cpu = this.byController.cpu;
    if (cpu) {
      const s = parseCpuStatV1(await readText(path.join(d[cpu.name], 'cpu.stat')));
      u.cpuNrPeriods = s.nrPeriods;
      u.cpuNrThrottled = s.nrThrottled;
      u.cpuThrottledUs = s.throttledUs;
    } else unavailable.push('cpu.stat');
    const memP = await readOptional(path.join(unified, 'memory.pressure'));
    const cpuP = await readOptional(path.join(unified, 'cpu.pressure'));
    if (memP !== undefined) u.memoryPressure = parsePressure(memP, 'memory.pressure');
    if (cpuP !== undefined) u.cpuPressure = parsePressure(cpuP, 'cpu.pressure');
    const pids = this.byController.pids;
    u.pids = pids
      ? parseUint('pids.current', await readText(path.join(d[pids.name], 'pids.current')))
      : (await readProcs(unified)).length;
    if (unavailable.length > 0) u.unavailable = unavailable;
    return u;
  }
}
