/**
 * Actuation through libvirt (agent/host/libvirt/actuator.ts) against a recording stand-in
 * for virsh that answers with the recorded live XML of a real domain
 * (test/fixtures/libvirt/), the guest's behaviour chosen per test: the report says what
 * libvirt shows afterwards, a removal that shows only in part is `partial` with exactly
 * what went, one that never shows is `failed`; and through the host broker, such an
 * actuation is not `done` and the books count only what libvirt moved.
 */
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { silentLogger } from '../../../../agent/common/log';
import { validateHostConfig, type GuestConfig } from '../../../../agent/host/config';
import { HostBroker, type HostChannel } from '../../../../agent/host/host-broker';
import { bookedChange, type HostNoticeRecord } from '../../../../agent/host/notice-store';
import { LibvirtActuator } from '../../../../agent/host/libvirt/actuator';
import { LibvirtDomains, resolveAllocations } from '../../../../agent/host/libvirt/domains';
import { Virsh } from '../../../../agent/host/libvirt/virsh';
import type { GuestReported } from '../../../../agent/host/guest-connections';
import { FakeVirsh, MiB } from './fake-virsh';
import { failure } from '../../../helpers/failure';

const KiB = 1024;

function setup(modes: { cpuMode: 'unplug' | 'quota'; memoryMode: 'virtio-mem' | 'balloon' }) {
  return FakeVirsh.create().then((fake) => {
    const virsh = new Virsh({ runner: fake.runner });
    const cfg = validateHostConfig({
      hypervisor: 'libvirt',
      guests: [{ name: 'vm1', domain: 'nbfix', priority: 1, confirmTimeout: '10s', ...modes }],
    });
    const domains = new LibvirtDomains(virsh, cfg.guests);
    // A clock that moves only when the actuator waits: no test waits on real time.
    let t = 0;
    const actuator = new LibvirtActuator(domains, silentLogger(), {
      pollMs: 500,
      now: () => t,
      sleep: async (ms) => {
        t += ms;
      },
    });
    return { fake, virsh, cfg, domains, actuator, guest: cfg.guests[0] as GuestConfig };
  });
}

test('the allocation comes from the persistent XML: 2 vCPUs, boot memory + virtio-mem requested', async () => {
  const { cfg, virsh } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  expect(cfg.guests[0].allocationFromLibvirt).toBe(true);
  const resolved = await resolveAllocations(cfg, virsh);
  expect(resolved.guests[0].allocation).toEqual({ cpus: 2, memoryBytes: 256 * MiB });
});

test('virtio-mem: a guest that unplugs only part in time is partial, with exactly what went', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  // The guest unplugs 16 MiB of the 64 asked for, then can migrate nothing more.
  fake.guest.tick = (d) => {
    if (d.requestedKiB < d.currentKiB) d.currentKiB = Math.max(d.requestedKiB, 131072 - 16 * KiB);
  };
  const report = await actuator.apply(guest, { cpus: 2, memoryBytes: 192 * MiB }, 'down');
  expect(report.status).toBe('partial');
  expect(report.before).toEqual({ cpus: 2, memoryBytes: 256 * MiB });
  expect(report.actual).toEqual({ cpus: 2, memoryBytes: 240 * MiB });
  expect(report.steps).toEqual([
    expect.objectContaining({
      resource: 'memory',
      call: 'update-memory-device',
      from: 256 * MiB,
      want: 192 * MiB,
      got: 240 * MiB,
      confirmed: false,
    }),
  ]);
  expect(report.errors).toEqual([expect.objectContaining({ step: 'memory', code: 'TIMEOUT' })]);
  expect(fake.calls).toContainEqual([
    'update-memory-device',
    '--domain',
    'nbfix',
    '--alias',
    'virtiomem0',
    '--requested-size',
    `${64 * KiB}KiB`,
    '--live',
  ]);
});

test('unplug: virsh gives up waiting (TCG) but the guest ejects the vCPU later: confirmed, done', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  let reads = 0;
  let wanted = 0;
  fake.guest.setvcpus = (want) => {
    wanted = want;
    return { timedOut: true };
  };
  fake.guest.tick = (d) => {
    if (wanted && ++reads > 3) d.vcpus = wanted;
  };
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 256 * MiB }, 'down');
  expect(report.status).toBe('done');
  expect(report.actual).toEqual({ cpus: 1, memoryBytes: 256 * MiB });
  expect(report.steps).toEqual([
    expect.objectContaining({ call: 'setvcpus', from: 2, want: 1, got: 1, confirmed: true }),
  ]);
  expect(report.errors).toEqual([]);
});

test('unplug: virsh gives up and libvirt never shows the vCPU gone (as measured under TCG): failed, not done', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  fake.guest.setvcpus = () => ({ timedOut: true });
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 256 * MiB }, 'down');
  expect(report.status).toBe('failed');
  expect(report.actual?.cpus).toBe(2);
  expect(report.steps).toEqual([
    expect.objectContaining({ call: 'setvcpus', want: 1, got: 2, confirmed: false }),
  ]);
  expect(report.errors[0].message).toMatch(/virsh timed out waiting for the guest/);
});

/** The guest's reports as the host broker holds them: a new object per report. */
function reports(first: number[]) {
  let current: GuestReported = { onlineCpus: first, at: 'hello', from: 'hello' };
  return {
    ctx: { guestReport: () => current },
    /** A report arriving now (an outcome, hello or facts message after the unplug). */
    arrive(onlineCpus: number[], from: GuestReported['from'] = 'outcome') {
      current = { onlineCpus, at: 'later', from };
    },
  };
}

test('unplug under TCG: libvirt keeps listing the vCPU, QEMU and the guest do not: done, confirmed by the guest', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  const r = reports([0, 1]);
  let asked = false;
  fake.guest.setvcpus = () => {
    asked = true;
    return { timedOut: true };
  };
  let reads = 0;
  fake.guest.tick = (d) => {
    // After a few reads the guest has offlined CPU 1 and QEMU ejected it; libvirt's XML
    // still says 2 (as measured under TCG) and the guest says so in a new report.
    if (asked && ++reads === 3) {
      d.qemuVcpus = 1;
      r.arrive([0]);
    }
  };
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 256 * MiB }, 'down', r.ctx);
  expect(report.status).toBe('done');
  expect(report.actual).toEqual({ cpus: 1, memoryBytes: 256 * MiB });
  expect(report.steps).toEqual([
    expect.objectContaining({
      call: 'setvcpus',
      want: 1,
      got: 1,
      confirmed: true,
      confirmedBy: 'guest',
    }),
  ]);
  expect(report.errors).toEqual([]);
  expect(fake.calls.some((c) => c[0] === 'domstats' && c.includes('--vcpu'))).toBe(true);
});

test('unplug under TCG: the guest says CPU 1 is offline but QEMU still runs it: failed', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  const r = reports([0, 1]);
  fake.guest.setvcpus = () => {
    r.arrive([0]);
    return { timedOut: true };
  };
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 256 * MiB }, 'down', r.ctx);
  expect(report.status).toBe('failed');
  expect(report.actual?.cpus).toBe(2);
  expect(report.steps?.[0]).not.toHaveProperty('confirmedBy');
});

test('unplug under TCG: QEMU ejected the vCPU but no report came from the guest since: failed', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  // The only report is the outcome's, sent before the unplug: it still lists CPU 1.
  const r = reports([0, 1]);
  fake.guest.setvcpus = (_want, d) => {
    d.qemuVcpus = 1;
    return { timedOut: true };
  };
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 256 * MiB }, 'down', r.ctx);
  expect(report.status).toBe('failed');
  expect(report.actual?.cpus).toBe(2);
  expect(report.errors[0].message).toMatch(/virsh timed out waiting for the guest/);
});

test('unplug under TCG: the guest’s facts message arrives seconds into the confirm wait: done, confirmed by the guest', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  // The outcome (before the unplug) still lists CPU 1; QEMU ejects the vCPU at the call.
  const r = reports([0, 1]);
  let asked = false;
  fake.guest.setvcpus = (_want, d) => {
    asked = true;
    d.qemuVcpus = 1;
    return { timedOut: true };
  };
  let reads = 0;
  fake.guest.tick = () => {
    // The guest's once-a-second check sees CPU 1 offline only on the 6th re-read: the
    // actuator must read the broker's latest report on every re-read, not once.
    if (asked && ++reads === 6) r.arrive([0], 'facts');
  };
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 256 * MiB }, 'down', r.ctx);
  expect(report.status).toBe('done');
  expect(report.actual?.cpus).toBe(1);
  const step = report.steps?.[0];
  expect(step).toMatchObject({ call: 'setvcpus', got: 1, confirmed: true, confirmedBy: 'guest' });
  // Confirmed by that report, seconds (of the injected clock) into the wait, before the
  // 10 s confirmTimeout.
  expect(step?.confirmMs).toBeGreaterThanOrEqual(1000);
  expect(step?.confirmMs).toBeLessThan(10_000);
  expect(report.errors).toEqual([]);
});

test('unplug under TCG, as measured: domstats keeps listing the vCPU running with its thread time and delay 0, the guest’s facts lack it: done, confirmed by the guest', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  fake.d.ejectedListed = true;
  const r = reports([0, 1]);
  let asked = false;
  fake.guest.setvcpus = (_want, d) => {
    asked = true;
    d.qemuVcpus = 1; // ejected, yet listed (test/fixtures/libvirt/domstats-tcg-ejected.txt)
    return { timedOut: true };
  };
  let reads = 0;
  fake.guest.tick = () => {
    if (asked && ++reads === 4) r.arrive([0], 'facts');
  };
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 256 * MiB }, 'down', r.ctx);
  expect(report.status).toBe('done');
  expect(report.actual?.cpus).toBe(1);
  const step = report.steps?.[0];
  expect(step).toMatchObject({ call: 'setvcpus', got: 1, confirmed: true, confirmedBy: 'guest' });
  expect(step?.witness).toMatch(/time and delay fell to 0/);
  // domstats read before the call (the thread had run) and while confirming.
  const domstats = fake.calls.filter((c) => c[0] === 'domstats');
  expect(domstats.length).toBeGreaterThanOrEqual(2);
  expect(fake.calls.findIndex((c) => c[0] === 'domstats')).toBeLessThan(
    fake.calls.findIndex((c) => c[0] === 'setvcpus'),
  );
});

test('unplug under TCG: a vCPU whose thread showed no time and no delay before the call too is not taken as ejected: failed', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  fake.d.ejectedListed = true;
  fake.d.qemuVcpus = 1; // vCPU 1 shows 0/0 already before the call: no proof it went
  const r = reports([0, 1]);
  fake.guest.setvcpus = () => {
    r.arrive([0], 'facts');
    return { timedOut: true };
  };
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 256 * MiB }, 'down', r.ctx);
  expect(report.status).toBe('failed');
  expect(report.steps?.[0]).not.toHaveProperty('confirmedBy');
});

test('after such an unplug, a restore of the vCPU is failed and virsh setvcpus is not called (libvirt thinks it is there)', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  // libvirt's XML: 2 enabled; QEMU ejected vCPU 1 (listed 0/0); the guest has CPU 0 only.
  fake.d.ejectedListed = true;
  fake.d.qemuVcpus = 1;
  const r = reports([0]);
  const report = await actuator.apply(guest, { cpus: 2, memoryBytes: 256 * MiB }, 'up', r.ctx);
  expect(report.status).toBe('failed');
  expect(report.before?.cpus).toBe(1);
  expect(report.actual?.cpus).toBe(1);
  expect(report.steps?.[0]).toMatchObject({
    call: 'setvcpus',
    from: 1,
    want: 2,
    got: 1,
    confirmed: false,
    ejected: [1],
  });
  expect(report.steps?.[0].note).toMatch(/virsh destroy \+ virsh start/);
  expect(report.errors).toEqual([
    expect.objectContaining({ step: 'cpus', code: 'PREREQUISITE_MISSING' }),
  ]);
  expect(fake.calls.some((c) => c[0] === 'setvcpus')).toBe(false);
});

test('after such an unplug, a memory-only notice counts the vCPUs really there: done, no setvcpus', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  fake.d.ejectedListed = true;
  fake.d.qemuVcpus = 1;
  fake.guest.tick = (d) => {
    if (d.requestedKiB < d.currentKiB) d.currentKiB = d.requestedKiB;
  };
  const r = reports([0]);
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 192 * MiB }, 'down', r.ctx);
  expect(report.status).toBe('done');
  expect(report.actual).toEqual({ cpus: 1, memoryBytes: 192 * MiB });
  expect(fake.calls.some((c) => c[0] === 'setvcpus')).toBe(false);
});

test('unplug refused by QEMU: failed, its stderr in the error, nothing moved', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  fake.guest.setvcpus = () => ({
    error:
      "error: internal error: unable to execute QEMU command 'device_del': acpi: device unplug request for not supported device type: qemu64-x86_64-cpu",
  });
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 256 * MiB }, 'down');
  expect(report.status).toBe('failed');
  expect(report.actual).toEqual(report.before);
  expect(report.errors).toEqual([
    expect.objectContaining({
      step: 'cpus',
      code: 'LIBVIRT_ERROR',
      message: expect.stringContaining('device unplug request'),
    }),
  ]);
});

test('balloon without a driver in the guest: setmem is asked, actual never moves: failed', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'quota', memoryMode: 'balloon' });
  const report = await actuator.apply(guest, { cpus: 2, memoryBytes: 100 * MiB }, 'down');
  expect(fake.calls).toContainEqual([
    'setmem',
    '--domain',
    'nbfix',
    '--size',
    `${100 * KiB}KiB`,
    '--live',
  ]);
  expect(report.status).toBe('failed');
  expect(report.actual?.memoryBytes).toBe(128 * MiB);
});

test('quota: schedinfo sets the global quota; libvirt’s quota is the books’ CPUs', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'quota', memoryMode: 'balloon' });
  fake.guest.setmem = (kib, d) => {
    d.balloonKiB = kib;
  };
  const report = await actuator.apply(guest, { cpus: 1.5, memoryBytes: 100 * MiB }, 'down');
  expect(report.status).toBe('done');
  expect(report.actual).toEqual({ cpus: 1.5, memoryBytes: 100 * MiB });
  expect(fake.calls).toContainEqual([
    'schedinfo',
    '--domain',
    'nbfix',
    '--live',
    '--set',
    'global_period=100000',
    'global_quota=150000',
  ]);
});

test('precheck: a domain that is down is DOMAIN_DOWN; what a mode cannot do is named', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  fake.d.state = 'shut off';
  expect(
    (await failure(actuator.precheck(guest, 'reclaim', { cpus: 1, memoryBytes: 256 * MiB }))).code,
  ).toBe('DOMAIN_DOWN');
  fake.d.state = 'running';
  const err = await failure(
    actuator.precheck(guest, 'reclaim', { cpus: 0.5, memoryBytes: 64 * MiB }),
  );
  expect(err.code).toBe('PREREQUISITE_MISSING');
  expect(err.problems.map((p) => p.field)).toEqual(['cpus', 'memory']);
  expect(err.problems[0].message).toMatch(/whole vCPUs/);
  expect(err.problems[1].message).toMatch(/virtio-mem on "nbfix" reaches/);
  await expect(
    actuator.precheck(guest, 'reclaim', { cpus: 1, memoryBytes: 192 * MiB }),
  ).resolves.toBeUndefined();
});

/** A channel to a guest that never answers: a forced reclaim is actuated at its deadline. */
function silentChannel(): HostChannel {
  return { send: () => true, on: () => undefined, close: () => undefined };
}

test('through the host broker: a partial actuation is recorded partial, the books count what libvirt moved', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-lv-books-'));
  try {
    const { fake, virsh } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
    const cfg = await resolveAllocations(
      validateHostConfig({
        hypervisor: 'libvirt',
        stateDir: path.join(dir, 'state'),
        guests: [{ name: 'vm1', domain: 'nbfix', priority: 1, confirmTimeout: '10s' }],
      }),
      virsh,
    );
    let t = 0;
    const domains = new LibvirtDomains(virsh, cfg.guests);
    const broker = new HostBroker({
      config: cfg,
      actuator: new LibvirtActuator(domains, silentLogger(), {
        now: () => t,
        sleep: async (ms) => {
          t += ms;
        },
      }),
      connect: silentChannel,
      log: silentLogger(),
    });
    await broker.start();
    fake.guest.tick = (d) => {
      if (d.requestedKiB < d.currentKiB) d.currentKiB = Math.max(d.requestedKiB, 131072 - 16 * KiB);
    };
    // Refused while the domain is down: nothing journaled.
    fake.d.state = 'shut off';
    const down = await failure(
      broker.issue('reclaim', {
        guest: 'vm1',
        change: { cpus: 0, memoryBytes: 64 * MiB },
        deadlineMs: 1,
      }),
    );
    expect(down.code).toBe('DOMAIN_DOWN');
    expect(broker.notices('vm1')).toEqual([]);
    fake.d.state = 'running';
    const { done } = await broker.issue('reclaim', {
      guest: 'vm1',
      change: { cpus: 0, memoryBytes: 64 * MiB },
      deadlineMs: 1,
      force: true,
    });
    const rec = await done;
    expect(rec.state).toBe('partial');
    expect(rec.error?.message).toMatch(/actuation partial/);
    const books = broker.booksFor('vm1');
    expect(books.granted).toEqual({ cpus: 2, memoryBytes: 240 * MiB });
    expect(books.actuated).toEqual({ cpus: 2, memoryBytes: 240 * MiB });
    await broker.stop();
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

test('a domain gone down before the actuation: failed, and the books count nothing of it', async () => {
  const { fake, actuator, guest } = await setup({ cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  fake.d.state = 'shut off';
  const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 192 * MiB }, 'down');
  expect(report.status).toBe('failed');
  expect([report.before, report.actual]).toEqual([undefined, undefined]);
  expect(report.errors[0].code).toBe('DOMAIN_DOWN');
  const rec = {
    notice: { kind: 'reclaim', change: { cpus: 1, memoryBytes: 64 * MiB } },
    actuation: report,
  } as unknown as HostNoticeRecord;
  expect(bookedChange(rec)).toEqual({ cpus: 0, memoryBytes: 0 });
});

test('each step says when its virsh call was made, inside the actuation (what the removal bench counts from)', async () => {
  for (const modes of [
    { cpuMode: 'quota', memoryMode: 'balloon' },
    { cpuMode: 'unplug', memoryMode: 'virtio-mem' },
  ] as const) {
    const { actuator, guest } = await setup(modes);
    const report = await actuator.apply(guest, { cpus: 1, memoryBytes: 192 * MiB }, 'down');
    expect(report.steps?.map((s) => s.call)).toEqual(
      modes.cpuMode === 'quota' ? ['setmem', 'schedinfo'] : ['update-memory-device', 'setvcpus'],
    );
    for (const s of report.steps!) {
      const at = Date.parse(s.calledAt!);
      expect(at).toBeGreaterThanOrEqual(Date.parse(report.startedAt));
      expect(at).toBeLessThanOrEqual(Date.parse(report.finishedAt));
    }
  }
});
