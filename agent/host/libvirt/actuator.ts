/**
 * Actuation through libvirt only (docs/libvirt.md, "Removal modes"): nothing written under
 * machine.slice by us, no extra QMP socket. Per guest:
 *
 *   cpuMode unplug       `virsh setvcpus --live N`. Asynchronous: the guest must offline
 *                        the vCPU and eject it through ACPI; under TCG virsh gives up after
 *                        5 s ("vcpu unplug request timed out") although the unplug then
 *                        completes. So the command's return is not the answer: the live
 *                        XML's enabled vCPUs are re-read until they are N, or the guest's
 *                        confirmTimeout passes.
 *   cpuMode quota        `virsh schedinfo --live --set global_quota=… global_period=100000`
 *                        (libvirt sets the domain's cpu.max itself), read back.
 *   memoryMode virtio-mem `virsh update-memory-device --requested-size`, then the live XML
 *                        until the device's <current> equals <requested>; a guest that
 *                        cannot unplug in time leaves <current> above: partial, and the
 *                        report says exactly how much went.
 *   memoryMode balloon   `virsh setmem --live`, then `virsh dommemstat` until `actual` is
 *                        the target.
 *
 * The report's `actual` is what libvirt says after all this, and the books take it
 * (agent/host/host-broker.ts): a failed or partial actuation is never recorded done.
 */
import type { Resources } from '../../broker/types';
import { NestError, isNestError, type Problem } from '../../common/errors';
import type { Logger } from '../../common/log';
import type { ActuationReport, ApplyContext, LibvirtStep, VmActuator } from '../actuator';
import { CPU_PERIOD_US, codeOf } from '../actuator';
import type { GuestConfig, LibvirtGuestConfig } from '../config';
import { LibvirtDomains, quotaCpus, resourcesOf, type DomainView } from './domains';
import type { VcpuStats } from './virsh';

/** A balloon's `actual` within this of the target counts as reached. */
export const BALLOON_TOLERANCE_BYTES = 1024 * 1024;
/** virsh's message when QEMU did not confirm a vCPU unplug within its own 5 s. */
const UNPLUG_TIMED_OUT = /unplug request timed out/i;

export interface LibvirtActuatorOptions {
  /** Re-read every this often while confirming. */
  pollMs?: number;
  now?: () => number;
  sleep?: (ms: number) => Promise<void>;
}

export class LibvirtActuator implements VmActuator {
  private readonly pollMs: number;
  private readonly now: () => number;
  private readonly sleep: (ms: number) => Promise<void>;

  constructor(
    private readonly domains: LibvirtDomains,
    private readonly log: Logger,
    opts: LibvirtActuatorOptions = {},
  ) {
    this.pollMs = opts.pollMs ?? 250;
    this.now = opts.now ?? Date.now;
    this.sleep = opts.sleep ?? ((ms) => new Promise((r) => setTimeout(r, ms)));
  }

  async precheck(guest: GuestConfig, kind: 'reclaim' | 'restore', target: Resources) {
    const lv = libvirtOf(guest);
    const info = await this.domains.running(lv.domain);
    // Every lack and every bound this change would cross, in one refusal (docs/errors.md,
    // PREREQUISITE_MISSING): an operator fixes the domain once, not one error at a time.
    const problems: Problem[] = LibvirtDomains.prerequisiteProblems(lv, info);
    const lacks = problems.length;
    if (lv.cpuMode === 'unplug' && !problems.some((p) => p.field === 'domain.hotpluggable-vcpus')) {
      if (!Number.isInteger(target.cpus))
        problems.push({
          field: 'cpus',
          value: target.cpus,
          message: `cpuMode unplug removes whole vCPUs: the ${kind} would leave ${target.cpus}`,
        });
      else if (target.cpus < info.vcpus.minLive)
        problems.push({
          field: 'cpus',
          value: target.cpus,
          message: `the ${kind} would leave ${target.cpus} vCPUs; ${info.vcpus.minLive} of "${lv.domain}" are not hotpluggable`,
        });
      else if (target.cpus > info.vcpus.max)
        problems.push({
          field: 'cpus',
          value: target.cpus,
          message: `the ${kind} would give ${target.cpus} vCPUs; "${lv.domain}" has at most ${info.vcpus.max}`,
        });
    }
    if (lv.memoryMode === 'virtio-mem' && info.virtioMem) {
      const lo = info.memory.baseBytes;
      const hi = info.memory.baseBytes + info.virtioMem.sizeBytes;
      if (target.memoryBytes < lo || target.memoryBytes > hi)
        problems.push({
          field: 'memory',
          value: target.memoryBytes,
          message: `the ${kind} would leave ${target.memoryBytes} bytes; virtio-mem on "${lv.domain}" reaches ${lo}..${hi} (boot memory .. plus the device's size)`,
        });
    }
    if (lv.memoryMode === 'balloon' && target.memoryBytes > info.memory.totalBytes)
      problems.push({
        field: 'memory',
        value: target.memoryBytes,
        message: `the ${kind} would give ${target.memoryBytes} bytes; "${lv.domain}" has at most ${info.memory.totalBytes}`,
      });
    if (problems.length > 0)
      throw new NestError(
        'PREREQUISITE_MISSING',
        `libvirt domain "${lv.domain}" ${lacks > 0 ? `lacks ${lacks} prerequisite(s) and ` : ''}cannot carry out this ${kind}: ${problems.map((p) => p.message).join('; ')}; refused, nothing done`,
        { problems },
      );
  }

  async apply(
    guest: GuestConfig,
    target: Resources,
    direction: 'down' | 'up',
    ctx: ApplyContext = {},
  ): Promise<ActuationReport> {
    const lv = libvirtOf(guest);
    const log = this.log.child({ guest: guest.name, domain: lv.domain, direction });
    const report: ActuationReport = {
      direction,
      target,
      startedAt: new Date().toISOString(),
      finishedAt: '',
      errors: [],
      steps: [],
    };
    const finish = (status: ActuationReport['status']): ActuationReport => {
      report.status = status;
      report.finishedAt = new Date().toISOString();
      log.info({ report }, 'VM actuated through libvirt');
      return report;
    };
    // A domain libvirt cannot show us (down, virsh failing) fails the whole actuation.
    const view = async (step: 'cpus' | 'memory'): Promise<DomainView | null> => {
      try {
        return await this.domains.view(lv);
      } catch (err) {
        report.errors.push({ step, ...codeOf(err) });
        return null;
      }
    };
    const before = await view('cpus');
    if (!before) return finish('failed');
    report.before = before.resources;
    // Down: memory first (as the raw path: the larger, slower step); up: CPUs first.
    const order: ('cpus' | 'memory')[] =
      direction === 'down' ? ['memory', 'cpus'] : ['cpus', 'memory'];
    for (const resource of order) {
      try {
        const step =
          resource === 'cpus'
            ? await this.cpus(lv, before, target.cpus, ctx)
            : await this.memory(lv, before, target.memoryBytes);
        if (step) {
          report.steps!.push(step);
          if (!step.confirmed && step.ejected)
            // Nothing was asked of libvirt: the vCPUs it would need are not there.
            report.errors.push({
              step: resource,
              code: 'PREREQUISITE_MISSING',
              message: `setvcpus: ${step.note}`,
            });
          else if (!step.confirmed)
            report.errors.push({
              step: resource,
              code: 'TIMEOUT',
              message: `${step.call}: libvirt shows ${step.got}, not ${step.want}, after ${step.confirmMs} ms${step.note ? ` (${step.note})` : ''}`,
            });
        }
      } catch (err) {
        report.errors.push({ step: resource, ...codeOf(err) });
        log.error({ err, resource }, 'libvirt actuation step failed');
      }
    }
    const after = await view('memory');
    if (!after) return finish('failed');
    report.actual = { ...after.resources };
    // A vCPU unplug confirmed by QEMU and the guest while libvirt's XML lags: the books
    // take what is really gone (docs/libvirt.md, "Removal modes").
    const byGuest = report.steps!.find((s) => s.resource === 'cpus' && s.confirmedBy === 'guest');
    if (byGuest) report.actual.cpus = byGuest.got;
    // vCPUs already ejected behind libvirt's back: they are not there, before or after.
    const ejected = report.steps!.find((s) => s.resource === 'cpus' && s.ejected);
    if (ejected) {
      report.before = { ...report.before!, cpus: ejected.from };
      report.actual.cpus = ejected.got;
      return finish(statusOf(report.before, target, report.actual, lv));
    }
    return finish(statusOf(before.resources, target, report.actual, lv));
  }

  private async cpus(
    lv: LibvirtGuestConfig,
    before: DomainView,
    want: number,
    ctx: ApplyContext = {},
  ): Promise<LibvirtStep | null> {
    const from = before.resources.cpus;
    if (lv.cpuMode === 'unplug') {
      // An unplug libvirt never saw (TCG): count without those vCPUs, never call for them.
      const ejected = await this.ejectedVcpus(lv, before, ctx);
      if (ejected.length > 0) return ejectedStep(lv, from - ejected.length, want, ejected);
    }
    if (sameCpus(from, want)) return null;
    const t0 = this.now();
    if (lv.cpuMode === 'quota') {
      const quota = Math.max(1000, Math.round(want * CPU_PERIOD_US));
      const calledAt = new Date().toISOString();
      const sched = await this.domains.virsh.schedinfo(lv.domain, {
        global_period: CPU_PERIOD_US,
        global_quota: quota,
      });
      const callMs = this.now() - t0;
      const q = sched.global_quota;
      const got = quotaCpus(sched, before.info.vcpus.current) ?? before.info.vcpus.current;
      return {
        resource: 'cpus',
        call: 'schedinfo',
        from,
        want,
        got,
        calledAt,
        callMs,
        confirmMs: 0,
        confirmed: q === quota,
      };
    }
    let pendingErr: unknown = null;
    // The guest's report as it stands before the call: only a later one can say the vCPU
    // went (its outcome came before the unplug, so it still lists every vCPU).
    const priorReport = ctx.guestReport?.();
    // QEMU's vCPU threads before the call: a thread that ran and then shows no time at all
    // is gone (VcpuStats.times).
    const statsBefore =
      priorReport && want < from
        ? await this.domains.virsh.domstatsVcpu(lv.domain).catch(() => undefined)
        : undefined;
    // The call's time from here: the readings above are the broker's, not libvirt's.
    const callT0 = this.now();
    const calledAt = new Date().toISOString();
    try {
      await this.domains.virsh.setvcpus(lv.domain, want);
    } catch (err) {
      // QEMU's own wait for the guest ran out; the unplug may still complete: confirm.
      if (!(isNestError(err) && UNPLUG_TIMED_OUT.test(err.message))) throw err;
      pendingErr = err;
      this.log.info({ domain: lv.domain }, 'virsh setvcpus timed out waiting; confirming');
    }
    const callMs = this.now() - callT0;
    // libvirt unplugs the highest enabled hotpluggable vCPUs first (the ones the notice's
    // leavingCpus named: agent/common/cpulist.ts pickLeavingCpus).
    const leaving = before.info.vcpus.enabled
      .filter((id) => before.info.vcpus.hotpluggable.includes(id))
      .sort((a, b) => b - a)
      .slice(0, Math.max(0, from - want));
    let byGuest = false;
    const { got, confirmed, ms } = await this.confirm(
      lv.confirmTimeoutMs,
      async () => {
        // The live XML alone: a view() would also ask dommemstat every poll (balloon).
        const seen = (await this.domains.running(lv.domain)).vcpus.enabled.length;
        if (seen <= want || !pendingErr || want > from) return seen;
        const gone = await this.goneByGuest(lv, leaving, priorReport, ctx, statsBefore);
        byGuest = gone > from - seen;
        return byGuest ? from - gone : seen;
      },
      (got) => got === want,
    );
    // Measured under TCG (docs/libvirt.md, "Figures"): after virsh's own timeout the guest
    // did offline and QEMU eject the vCPU, yet libvirt kept listing it: not confirmed by
    // libvirt, so not done; the guest's online CPUs would say more.
    if (byGuest)
      this.log.info(
        { domain: lv.domain, leaving, got },
        'vCPU unplug confirmed by QEMU and the guest; libvirt still lists it',
      );
    const note =
      !confirmed && pendingErr
        ? 'virsh timed out waiting for the guest; libvirt may not see an unplug that completes after that'
        : undefined;
    if (note) this.log.warn({ err: pendingErr }, 'vCPU unplug not confirmed by libvirt');
    return {
      resource: 'cpus',
      call: 'setvcpus',
      from,
      want,
      got,
      calledAt,
      callMs,
      confirmMs: ms,
      confirmed,
      ...(note ? { note } : {}),
      ...(byGuest
        ? {
            confirmedBy: 'guest' as const,
            witness: `the guest's report after the call lacks CPU ${leaving.join(',')}; virsh domstats --vcpu: not running, or its thread's time and delay fell to 0 (QEMU ejected it); libvirt's live XML still lists it`,
          }
        : confirmed
          ? { confirmedBy: 'libvirt' as const }
          : {}),
    };
  }

  /**
   * How many of the `leaving` vCPUs are gone by both other witnesses: QEMU (libvirt's
   * `domstats --vcpu` lists it no more, or not running) and the guest (a report that
   * arrived after the call, whose online CPUs lack it). Guest CPU numbers are libvirt's
   * vCPU ids (one vCPU per guest CPU, in order: docs/libvirt.md, "Removal modes").
   */
  private async goneByGuest(
    lv: LibvirtGuestConfig,
    leaving: readonly number[],
    prior: ReturnType<NonNullable<ApplyContext['guestReport']>>,
    ctx: ApplyContext,
    statsBefore: VcpuStats | undefined,
  ): Promise<number> {
    const report = ctx.guestReport?.();
    if (!report || report === prior || !report.onlineCpus) return 0;
    const stats = await this.domains.virsh.domstatsVcpu(lv.domain);
    const online = new Set(report.onlineCpus);
    return leaving.filter((id) => !online.has(id) && qemuLost(stats, id, statsBefore)).length;
  }

  /**
   * The vCPUs libvirt lists as enabled that are gone by both other witnesses: the guest's
   * latest report lacks them and QEMU no longer runs them (qemuLost, with no earlier
   * reading: time and delay both 0). Left by an unplug confirmed by the guest under TCG.
   */
  private async ejectedVcpus(
    lv: LibvirtGuestConfig,
    before: DomainView,
    ctx: ApplyContext,
  ): Promise<number[]> {
    const online = ctx.guestReport?.()?.onlineCpus;
    if (!online) return [];
    const missing = before.info.vcpus.enabled.filter((id) => !online.includes(id));
    if (missing.length === 0) return [];
    const stats = await this.domains.virsh.domstatsVcpu(lv.domain).catch(() => undefined);
    return stats ? missing.filter((id) => qemuLost(stats, id, undefined)) : [];
  }

  private async memory(
    lv: LibvirtGuestConfig,
    before: DomainView,
    want: number,
  ): Promise<LibvirtStep | null> {
    const from = before.resources.memoryBytes;
    const t0 = this.now();
    if (lv.memoryMode === 'virtio-mem') {
      const vm = before.info.virtioMem;
      if (!vm)
        throw new NestError('PREREQUISITE_MISSING', `"${lv.domain}" has no virtio-mem device`);
      if (!vm.alias)
        throw new NestError(
          'LIBVIRT_ERROR',
          `"${lv.domain}": the virtio-mem device has no alias in the live XML`,
        );
      // The device's requested size in whole blocks, rounded up: never more taken than
      // the guest planned for.
      const block = vm.blockBytes;
      const requested = Math.min(
        vm.sizeBytes,
        Math.max(0, Math.ceil((want - before.info.memory.baseBytes) / block) * block),
      );
      const wantTotal = before.info.memory.baseBytes + requested;
      if (wantTotal === from && vm.requestedBytes === requested) return null;
      const calledAt = new Date().toISOString();
      await this.domains.virsh.updateMemoryDevice(lv.domain, vm.alias, requested);
      const callMs = this.now() - t0;
      const { got, confirmed, ms } = await this.confirm(
        lv.confirmTimeoutMs,
        // virtio-mem's size is in the live XML alone (resourcesOf): no schedinfo per poll.
        async () => resourcesOf(await this.domains.running(lv.domain), lv).memoryBytes,
        (got) => got === wantTotal,
      );
      return {
        resource: 'memory',
        call: 'update-memory-device',
        from,
        want: wantTotal,
        got,
        calledAt,
        callMs,
        confirmMs: ms,
        confirmed,
      };
    }
    if (Math.abs(from - want) <= BALLOON_TOLERANCE_BYTES) return null;
    const calledAt = new Date().toISOString();
    await this.domains.virsh.setmem(lv.domain, want);
    const callMs = this.now() - t0;
    const { got, confirmed, ms } = await this.confirm(
      lv.confirmTimeoutMs,
      async () => (await this.domains.virsh.dommemstat(lv.domain)).actualBytes ?? from,
      (got) => Math.abs(got - want) <= BALLOON_TOLERANCE_BYTES,
    );
    return {
      resource: 'memory',
      call: 'setmem',
      from,
      want,
      got,
      calledAt,
      callMs,
      confirmMs: ms,
      confirmed,
    };
  }

  /** Re-reads until `ok`, or the timeout; the last reading either way. */
  private async confirm(
    timeoutMs: number,
    read: () => Promise<number>,
    ok: (v: number) => boolean,
  ): Promise<{ got: number; confirmed: boolean; ms: number }> {
    const t0 = this.now();
    for (;;) {
      const got = await read();
      const ms = this.now() - t0;
      if (ok(got)) return { got, confirmed: true, ms };
      if (ms >= timeoutMs) return { got, confirmed: false, ms };
      await this.sleep(Math.min(this.pollMs, Math.max(1, timeoutMs - ms)));
    }
  }
}

/**
 * QEMU no longer runs vCPU `id`, as `virsh domstats --vcpu` shows it: not listed, not
 * running, or listed with its thread's time and delay both 0 (measured under TCG after an
 * unplug that outlived virsh's timeout: docs/libvirt.md, "Figures"). With an earlier
 * reading, that reading must show the thread had run (both only grow while it lives).
 */
export function qemuLost(stats: VcpuStats, id: number, before: VcpuStats | undefined): boolean {
  if (!stats.states.has(id) || stats.states.get(id) !== 1) return true;
  if (stats.times.get(id) !== 0 || stats.delays.get(id) !== 0) return false;
  if (!before) return true;
  return (before.times.get(id) ?? 0) + (before.delays.get(id) ?? 0) > 0;
}

/**
 * The vCPU step when libvirt lists vCPUs QEMU ejected: nothing is called. Confirmed when
 * the vCPUs really there are the ones wanted (a memory-only notice after such an unplug);
 * otherwise not (a restore: libvirt cannot plug back a vCPU it thinks is there).
 */
function ejectedStep(
  lv: LibvirtGuestConfig,
  real: number,
  want: number,
  ejected: number[],
): LibvirtStep {
  const ids = ejected.join(',');
  const confirmed = sameCpus(real, want);
  return {
    resource: 'cpus',
    call: 'setvcpus',
    from: real,
    want,
    got: real,
    callMs: 0,
    confirmMs: 0,
    confirmed,
    ejected,
    note: confirmed
      ? `not called: ${real} vCPUs are there (libvirt still lists vCPU ${ids}, which QEMU ejected)`
      : `not called: libvirt still lists vCPU ${ids} of "${lv.domain}" as enabled, but QEMU ejected it and the guest does not have it (an unplug libvirt never saw), and libvirt cannot plug it again live (a hot-plug of another made QEMU 7.2 crash); virsh destroy + virsh start gives the domain its vCPUs back`,
  };
}

function libvirtOf(guest: GuestConfig): LibvirtGuestConfig {
  if (!guest.libvirt)
    throw new NestError('INTERNAL', `guest "${guest.name}" has no libvirt settings`);
  return guest.libvirt;
}

const sameCpus = (a: number, b: number): boolean => Math.round(a * 1000) === Math.round(b * 1000);

/**
 * done: every resource that was to move shows its target; failed: none moved at all;
 * partial: anything between (the report's `actual` says how far).
 */
export function statusOf(
  before: Resources,
  target: Resources,
  after: Resources,
  lv: Pick<LibvirtGuestConfig, 'memoryMode'>,
  blockBytes = 2 * 1024 * 1024,
): 'done' | 'partial' | 'failed' {
  const memTol = lv.memoryMode === 'balloon' ? BALLOON_TOLERANCE_BYTES : blockBytes - 1;
  const parts: ('done' | 'moved' | 'stuck')[] = [];
  if (!sameCpus(before.cpus, target.cpus))
    parts.push(
      sameCpus(after.cpus, target.cpus)
        ? 'done'
        : Math.abs(after.cpus - target.cpus) < Math.abs(before.cpus - target.cpus)
          ? 'moved'
          : 'stuck',
    );
  if (Math.abs(before.memoryBytes - target.memoryBytes) > memTol)
    parts.push(
      Math.abs(after.memoryBytes - target.memoryBytes) <= memTol
        ? 'done'
        : Math.abs(after.memoryBytes - target.memoryBytes) <
            Math.abs(before.memoryBytes - target.memoryBytes)
          ? 'moved'
          : 'stuck',
    );
  if (parts.every((p) => p === 'done')) return 'done';
  if (parts.every((p) => p === 'stuck')) return 'failed';
  return 'partial';
}
