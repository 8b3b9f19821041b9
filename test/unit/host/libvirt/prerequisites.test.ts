/**
 * A domain lacking what the guest's removal modes need is refused at plan and reclaim time
 * (docs/libvirt.md, "What is read from libvirt"; docs/errors.md, PREREQUISITE_MISSING):
 * every lack named at once, before any notice is journaled or sent and before libvirt is
 * asked to change anything. virsh is the recording stand-in (fake-virsh.ts) serving the
 * recorded live XML with prerequisites taken out (LACKS).
 */
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { silentLogger } from '../../../../agent/common/log';
import { validateHostConfig } from '../../../../agent/host/config';
import { HostBroker, type HostChannel } from '../../../../agent/host/host-broker';
import { LibvirtActuator } from '../../../../agent/host/libvirt/actuator';
import { LibvirtDomains, resolveAllocations } from '../../../../agent/host/libvirt/domains';
import { Virsh } from '../../../../agent/host/libvirt/virsh';
import { FakeVirsh, LACKS, MiB } from './fake-virsh';
import { failure } from '../../../helpers/failure';

type Modes = { cpuMode: 'unplug' | 'quota'; memoryMode: 'virtio-mem' | 'balloon' };
let dir: string;

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-lv-prereq-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

/** virsh subcommands that only read. */
const READS = new Set(['domstate', 'dumpxml', 'schedinfo', 'dommemstat', 'domstats']);

async function brokerWith(modes: Modes, edit: (xml: string) => string) {
  const fake = await FakeVirsh.create();
  const virsh = new Virsh({ runner: fake.runner });
  const cfg = await resolveAllocations(
    validateHostConfig({
      hypervisor: 'libvirt',
      stateDir: path.join(dir, 'state'),
      guests: [{ name: 'vm1', domain: 'nbfix', priority: 1, ...modes }],
    }),
    virsh,
  );
  fake.edit = edit;
  const sent: unknown[] = [];
  const channel: HostChannel = {
    send: (m) => {
      sent.push(m);
      return true;
    },
    on: () => undefined,
    close: () => undefined,
  };
  const domains = new LibvirtDomains(virsh, cfg.guests);
  const broker = new HostBroker({
    config: cfg,
    actuator: new LibvirtActuator(domains, silentLogger()),
    connect: () => channel,
    log: silentLogger(),
  });
  await broker.start();
  return { fake, broker, sent };
}

/** Asserts the refusal names exactly `lacks` and that nothing was journaled, sent or changed. */
async function expectRefused(modes: Modes, lacks: (keyof typeof LACKS)[]) {
  const edit = (xml: string) => lacks.reduce((x, l) => LACKS[l](x), xml);
  const { fake, broker, sent } = await brokerWith(modes, edit);
  try {
    // 1 CPU and 64 MiB: whole, within the device, above the floor: only the lacks refuse it.
    const change = { cpus: 1, memoryBytes: 64 * MiB };
    const allocation = broker.check('reclaim', 'vm1', change);
    expect(allocation.ok).toBe(true);
    const plan = await failure(
      broker.precheck(
        'reclaim',
        'vm1',
        (allocation as { allocation: { cpus: number; memoryBytes: number } }).allocation,
      ),
    );
    const reclaim = await failure(
      broker.issue('reclaim', { guest: 'vm1', change, deadlineMs: 60_000 }),
    );
    for (const err of [plan, reclaim]) {
      expect(err.code).toBe('PREREQUISITE_MISSING');
      expect(err.problems.map((p) => p.field)).toEqual(lacks.map((l) => `domain.${l}`));
      expect(err.problems.every((p) => p.value === 'nbfix')).toBe(true);
      expect(err.message).toContain(`lacks ${lacks.length} prerequisite(s)`);
    }
    expect(broker.notices('vm1')).toEqual([]);
    expect(await fs.readdir(path.join(dir, 'state', 'notices')).catch(() => [])).toEqual([]);
    expect(sent.filter((m) => (m as { type: string }).type === 'notice')).toEqual([]);
    expect(fake.calls.filter((c) => !READS.has(c[0]))).toEqual([]);
  } finally {
    await broker.stop();
  }
}

test.each([
  ['channel', { cpuMode: 'quota', memoryMode: 'balloon' }],
  ['acpi', { cpuMode: 'unplug', memoryMode: 'balloon' }],
  ['hotpluggable-vcpus', { cpuMode: 'unplug', memoryMode: 'virtio-mem' }],
  ['virtio-mem', { cpuMode: 'quota', memoryMode: 'virtio-mem' }],
  ['balloon', { cpuMode: 'quota', memoryMode: 'balloon' }],
] as [keyof typeof LACKS, Modes][])(
  'a domain without %s: plan and reclaim refused naming it, nothing journaled, sent or actuated',
  (lack, modes) => expectRefused(modes, [lack]),
);

test('a domain lacking everything: each lack named in one refusal', async () => {
  await expectRefused({ cpuMode: 'unplug', memoryMode: 'virtio-mem' }, [
    'channel',
    'acpi',
    'hotpluggable-vcpus',
    'virtio-mem',
  ]);
  await expectRefused({ cpuMode: 'unplug', memoryMode: 'balloon' }, [
    'channel',
    'acpi',
    'hotpluggable-vcpus',
    'balloon',
  ]);
});

test('a lack and a change the domain cannot carry: both in the one refusal', async () => {
  const { broker } = await brokerWith({ cpuMode: 'unplug', memoryMode: 'virtio-mem' }, LACKS.acpi);
  try {
    const err = await failure(
      broker.issue('reclaim', {
        guest: 'vm1',
        change: { cpus: 0.5, memoryBytes: 0 },
        deadlineMs: 60_000,
      }),
    );
    expect(err.problems.map((p) => p.field)).toEqual(['domain.acpi', 'cpus']);
    expect(err.problems[1].message).toMatch(/whole vCPUs/);
  } finally {
    await broker.stop();
  }
});
