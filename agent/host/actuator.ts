/**
 * The host's one narrow actuation interface (CONTRIBUTING.md, kubelet's PodTerminator): set
 * a VM to an allocation. Lowering happens only after the guest's outcome (or a forced
 * deadline); raising happens before the guest is told (docs/architecture.md, "A notice, end
 * to end").
 *
 *   down: balloon first (the guest hands pages back, QEMU's RSS falls), then the VM
 *         cgroup's memory limit, then its cpu.max
 *   up:   the cgroup limits first, then let the balloon go
 *
 * The cgroup writes go through cgroup-adapter (the only code touching cgroupfs). On a
 * hybrid host the memory limit is v1 memory.limit_in_bytes and cpu.max the CFS quota and
 * period (cgroup-v1/memory.rst, scheduler/sched-bwc.rst); on v2 memory.max and cpu.max.
 */
import type { CgroupAdapter, Limits } from '../../cgroup-adapter/types';
import type { Resources } from '../broker/types';
import { isNestError } from '../common/errors';
import type { Logger } from '../common/log';
import type { GuestConfig } from './config';
import { withQmp, type BalloonResult } from './qmp';

/** CFS period for a VM's cpu.max: the kernel default, 100 ms. */
export const CPU_PERIOD_US = 100_000;

export interface ActuationReport {
  direction: 'down' | 'up';
  target: Resources;
  startedAt: string;
  finishedAt: string;
  cgroup?: { group: string; before: Limits; after: Limits };
  balloon?: BalloonResult;
  /**
   * With `hypervisor: libvirt` (agent/host/libvirt/actuator.ts): `done` when libvirt reports
   * the target, `partial` when it moved only part of the way (`actual` says how far),
   * `failed` when nothing moved. Absent for the raw QEMU path, whose errors say it.
   */
  status?: 'done' | 'partial' | 'failed';
  /** What libvirt reported before and after (the books take `actual`). */
  before?: Resources;
  actual?: Resources;
  /** Each libvirt call and its confirmation. */
  steps?: LibvirtStep[];
  /** Each failed step, with its code (the rest still ran). */
  errors: { step: 'cgroup' | 'balloon' | 'cpus' | 'memory'; code: string; message: string }[];
}

export interface LibvirtStep {
  resource: 'cpus' | 'memory';
  /** `setvcpus`, `schedinfo`, `update-memory-device`, `setmem`. */
  call: string;
  from: number;
  want: number;
  got: number;
  /**
   * When the virsh call that changes the domain was made (wall clock, as the notice's other
   * timestamps): what a removal's time in the guest is counted from (bench/libvirt-removal.ts).
   * Absent when no call was made (vCPUs already ejected).
   */
  calledAt?: string;
  /** The call's own return, and until libvirt showed the result (or the timeout). */
  callMs: number;
  confirmMs: number;
  confirmed: boolean;
  /** What else is known when it was not confirmed (virsh's own timeout, say). */
  note?: string;
  /**
   * `guest`: libvirt's live XML still listed the vCPU, but QEMU's vCPU list (virsh domstats
   * --vcpu) and the guest's own report after the call no longer did (docs/libvirt.md,
   * "Removal modes").
   */
  confirmedBy?: 'libvirt' | 'guest';
  /** With `confirmedBy: guest`: what each witness showed, in words, for the report. */
  witness?: string;
  /**
   * vCPU ids libvirt's live XML still lists as enabled that QEMU ejected (their threads
   * gone) and the guest no longer has: an unplug libvirt never saw (TCG). `from` and `got`
   * then count without them; libvirt cannot plug them again live.
   */
  ejected?: number[];
}

/** What the host broker knows of the guest beyond the hypervisor, for confirming a removal. */
export interface ApplyContext {
  /**
   * The guest kernel's online CPUs and MemTotal as it last reported them (hello, outcome
   * or facts); a new object whenever a new report arrives (agent/host/guest-connections.ts).
   * Given for reclaims and restores alike.
   */
  guestReport?: () => { onlineCpus?: readonly number[]; memTotal?: number } | undefined;
}

export interface VmActuator {
  apply(
    guest: GuestConfig,
    target: Resources,
    direction: 'down' | 'up',
    ctx?: ApplyContext,
  ): Promise<ActuationReport>;
  /**
   * Refuses a notice before anything is journaled (DOMAIN_DOWN, PREREQUISITE_MISSING, …):
   * with libvirt, the domain must be running and have what the guest's modes need.
   */
  precheck?(guest: GuestConfig, kind: 'reclaim' | 'restore', target: Resources): Promise<void>;
}

export function cgroupLimitsFor(target: Resources, memoryOverheadBytes = 0): Limits {
  const quotaUs = Math.max(1000, Math.round(target.cpus * CPU_PERIOD_US));
  return {
    memory: { max: target.memoryBytes + memoryOverheadBytes },
    cpu: { max: { quotaUs, periodUs: CPU_PERIOD_US } },
  };
}

export class CgroupQmpActuator implements VmActuator {
  constructor(
    private readonly adapter: CgroupAdapter | null,
    private readonly log: Logger,
  ) {}

  async apply(
    guest: GuestConfig,
    target: Resources,
    direction: 'down' | 'up',
  ): Promise<ActuationReport> {
    const report: ActuationReport = {
      direction,
      target,
      startedAt: new Date().toISOString(),
      finishedAt: '',
      errors: [],
    };
    const log = this.log.child({ guest: guest.name, direction });
    const balloon = async (): Promise<void> => {
      if (!guest.qmp) return;
      try {
        report.balloon = await withQmp(guest.qmp, (q) =>
          q.balloonTo(target.memoryBytes, { timeoutMs: guest.balloonTimeoutMs }),
        );
        if (!report.balloon.reached)
          log.warn({ balloon: report.balloon }, 'balloon did not reach its target in time');
      } catch (err) {
        report.errors.push({ step: 'balloon', ...codeOf(err) });
        log.error({ err }, 'QMP balloon failed');
      }
    };
    const cgroup = async (): Promise<void> => {
      if (!guest.cgroup || !this.adapter) return;
      const group = guest.cgroup;
      try {
        const before = await this.adapter.readLimits(group);
        const limits = cgroupLimitsFor(target, guest.memoryOverheadBytes);
        if (direction === 'down') {
          // Memory before CPU: a memory write the kernel refuses (usage above the new
          // limit) leaves the CPUs as they were, and the report says which step failed.
          await this.adapter.setLimits(group, { memory: limits.memory });
          await this.adapter.setLimits(group, { cpu: limits.cpu });
        } else {
          await this.adapter.setLimits(group, { cpu: limits.cpu });
          await this.adapter.setLimits(group, { memory: limits.memory });
        }
        report.cgroup = { group, before, after: await this.adapter.readLimits(group) };
      } catch (err) {
        report.errors.push({ step: 'cgroup', ...codeOf(err) });
        log.error({ err, group }, 'VM cgroup limits could not be set');
      }
    };
    if (direction === 'down') {
      await balloon();
      await cgroup();
    } else {
      await cgroup();
      await balloon();
    }
    report.finishedAt = new Date().toISOString();
    log.info({ report }, 'VM actuated');
    return report;
  }
}

/** The code and message of a failed step, for an ActuationReport's errors. */
export function codeOf(err: unknown): { code: string; message: string } {
  if (isNestError(err)) return { code: err.code, message: err.message };
  const e = err as { code?: unknown; message?: unknown };
  return {
    code: typeof e?.code === 'string' ? e.code : 'INTERNAL',
    message: typeof e?.message === 'string' ? e.message : String(err),
  };
}
