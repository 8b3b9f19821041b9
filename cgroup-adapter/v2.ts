/**
 * Pure unified hierarchy (cgroup v2): every limit, usage figure and action is a file in
 * the group's one directory (Documentation/admin-guide/cgroup-v2.rst).
 */
import * as path from 'node:path';
import { BaseDriver, type DriverOptions, type Hierarchy } from './base-driver';
import { pathExists, readOptional, readProcs, readText, writeText } from './cgfs';
import { CgroupError } from './errors';
import {
  parseCpuList,
  parseCpuMax,
  parseCpuStatV2,
  parseCpuWeight,
  parseMax,
  parseMemoryEvents,
  parsePressure,
  parseUint,
  printCpuList,
  printCpuMax,
  printCpuWeight,
  printMax,
} from './formats';
import { validateLimits } from './limits';
import type { Capabilities, GroupUsage, Limits, SampleFiles } from './types';

/** Controllers we enable for children, in the order cgroup-v2.rst lists them. */
export const V2_CONTROLLERS = ['cpuset', 'cpu', 'memory', 'pids'] as const;

export class V2Driver extends BaseDriver {
  readonly kind = 'v2' as const;
  readonly capabilities: Capabilities;

  private constructor(root: string, opts: DriverOptions, caps: Capabilities) {
    super(root, [], opts);
    this.capabilities = caps;
  }

  /** Probes the root for what this kernel and delegation offer. */
  static async open(root: string, opts: DriverOptions): Promise<V2Driver> {
    const controllers = (await readOptional(path.join(root, 'cgroup.controllers'))) ?? '';
    const have = new Set(controllers.trim().split(/\s+/).filter(Boolean));
    const caps: Capabilities = {
      memoryProtection: have.has('memory'),
      memoryHighThrottles: have.has('memory'),
      cgroupKill: await pathExists(path.join(root, 'cgroup.kill')),
      freeze: await pathExists(path.join(root, 'cgroup.freeze')),
      controllers: {
        memory: have.has('memory'),
        cpu: have.has('cpu'),
        cpuset: have.has('cpuset'),
        pids: have.has('pids'),
      },
    };
    return new V2Driver(root, opts, caps);
  }

  /**
   * Writes `+ctrl` into `dir`'s cgroup.subtree_control for each limit controller the dir
   * has and has not yet enabled, one controller per write (a refused one names itself).
   * EBUSY here means `dir` holds processes: the "no internal processes" rule.
   */
  private async enableIn(dir: string): Promise<void> {
    const avail = new Set(
      ((await readOptional(path.join(dir, 'cgroup.controllers'))) ?? '').trim().split(/\s+/),
    );
    const enabled = new Set(
      ((await readOptional(path.join(dir, 'cgroup.subtree_control'))) ?? '').trim().split(/\s+/),
    );
    for (const c of V2_CONTROLLERS) {
      if (avail.has(c) && !enabled.has(c))
        await writeText(path.join(dir, 'cgroup.subtree_control'), `+${c}`);
    }
  }

  protected override async beforeChild(_h: Hierarchy, parentDir: string): Promise<void> {
    await this.enableIn(parentDir);
  }

  override async enableControllers(): Promise<void> {
    await this.enableIn(this.root);
  }

  /**
   * Enables the controllers again on every level above `group` where they are off. They
   * are turned off while the guest agent is away: systemd < 254 can only start the next
   * agent in its unit's cgroup when that cgroup's subtree_control is empty, so the unit's
   * ExecStopPost clears it down the tree (systemd/nestbroker-guest-release,
   * docs/install.md).
   */
  private async enablePath(group: string): Promise<void> {
    let cur = this.root;
    for (const seg of group.split('/').filter(Boolean)) {
      await this.enableIn(cur);
      cur = path.join(cur, seg);
    }
  }

  private async need(dir: string, file: string, controller: string): Promise<string> {
    const f = path.join(dir, file);
    if ((await readOptional(f)) === undefined) {
      throw new CgroupError(
        'UNSUPPORTED',
        `${file} is missing in ${dir}: the ${controller} controller is not enabled for this group (parent's cgroup.subtree_control)`,
        { file: f, field: file },
      );
    }
    return f;
  }

  async setLimits(group: string, limits: Limits): Promise<void> {
    const l = validateLimits(limits);
    const dir = this.dir(group);
    await this.enablePath(group);
    const m = l.memory ?? {};
    for (const k of ['min', 'low', 'high', 'max'] as const) {
      const v = m[k];
      if (v === undefined) continue;
      await writeText(await this.need(dir, `memory.${k}`, 'memory'), printMax(`memory.${k}`, v));
    }
    if (l.cpu?.max) await writeText(await this.need(dir, 'cpu.max', 'cpu'), printCpuMax(l.cpu.max));
    if (l.cpu?.weight !== undefined) {
      await writeText(await this.need(dir, 'cpu.weight', 'cpu'), printCpuWeight(l.cpu.weight));
    }
    if (l.cpus !== undefined)
      await writeText(await this.need(dir, 'cpuset.cpus', 'cpuset'), l.cpus);
    if (l.pidsMax !== undefined) {
      await writeText(await this.need(dir, 'pids.max', 'pids'), printMax('pids.max', l.pidsMax));
    }
  }

  async readLimits(group: string): Promise<Limits> {
    const dir = this.dir(group);
    const rd = (f: string) => readOptional(path.join(dir, f));
    const out: Limits = {};
    const mem: NonNullable<Limits['memory']> = {};
    for (const k of ['min', 'low'] as const) {
      const t = await rd(`memory.${k}`);
      if (t !== undefined) mem[k] = parseUint(`memory.${k}`, t);
    }
    for (const k of ['high', 'max'] as const) {
      const t = await rd(`memory.${k}`);
      if (t !== undefined) mem[k] = parseMax(`memory.${k}`, t);
    }
    if (Object.keys(mem).length > 0) out.memory = mem;
    const cpuMax = await rd('cpu.max');
    const weight = await rd('cpu.weight');
    if (cpuMax !== undefined || weight !== undefined) {
      out.cpu = {};
      if (cpuMax !== undefined) out.cpu.max = parseCpuMax(cpuMax);
      if (weight !== undefined) out.cpu.weight = parseCpuWeight(weight);
    }
    const cpus = await rd('cpuset.cpus');
    // An empty cpuset.cpus in v2 means "inherit the parent's": no limit of our own.
    if (cpus !== undefined && cpus.trim() !== '') out.cpus = printCpuList(parseCpuList(cpus));
    const pidsMax = await rd('pids.max');
    if (pidsMax !== undefined) out.pidsMax = parseMax('pids.max', pidsMax);
    return out;
  }

  sampleFiles(group: string): SampleFiles {
    const dir = this.dir(group, true);
    return {
      memory: path.join(dir, 'memory.current'),
      cpu: { path: path.join(dir, 'cpu.stat'), format: 'cpu.stat' },
      procs: path.join(dir, 'cgroup.procs'),
    };
  }

  async usage(group: string): Promise<GroupUsage> {
    const dir = this.dir(group, true);
    const unavailable: string[] = [];
    const rd = async (f: string) => {
      const t = await readOptional(path.join(dir, f));
      if (t === undefined) unavailable.push(f);
      return t;
    };
    const current = await rd('memory.current');
    const peak = await readOptional(path.join(dir, 'memory.peak')); // 5.19+; optional by type
    const events = await rd('memory.events');
    const cpu = parseCpuStatV2(await readText(path.join(dir, 'cpu.stat')));
    const memP = await readOptional(path.join(dir, 'memory.pressure'));
    const cpuP = await readOptional(path.join(dir, 'cpu.pressure'));
    const pidsCurrent = await readOptional(path.join(dir, 'pids.current'));
    const ev = events === undefined ? undefined : parseMemoryEvents(events);
    const u: GroupUsage = {
      memoryCurrent: current === undefined ? 0 : parseUint('memory.current', current),
      memoryEvents: { oom: ev?.oom ?? 0, oomKill: ev?.oomKill ?? 0, high: ev?.high, max: ev?.max },
      cpuUsageUs: cpu.usageUs,
      cpuNrPeriods: cpu.nrPeriods,
      cpuNrThrottled: cpu.nrThrottled,
      cpuThrottledUs: cpu.throttledUs,
      // pids.current counts tasks of the whole subtree (what pids.max limits); without
      // the pids controller we count this group's processes.
      pids:
        pidsCurrent !== undefined
          ? parseUint('pids.current', pidsCurrent)
          : (await readProcs(dir)).length,
    };
    if (peak !== undefined) u.memoryPeak = parseUint('memory.peak', peak);
    if (memP !== undefined) u.memoryPressure = parsePressure(memP, 'memory.pressure');
    if (cpuP !== undefined) u.cpuPressure = parsePressure(cpuP, 'cpu.pressure');
    if (unavailable.length > 0) u.unavailable = unavailable;
    return u;
  }
}
