/**
 * Reading a domain from `virsh dumpxml` as recorded from a real libvirtd
 * (test/fixtures/libvirt/README.md): the channel's socket path, vCPUs, memory devices,
 * the balloon and ACPI, and what a domain lacks for each removal mode.
 */
import { isNestError } from '../../../../agent/common/errors';
import {
  missingPrerequisites,
  parseDomainXml,
  virtioMemGuestBytes,
} from '../../../../agent/host/libvirt/domain-xml';
import { fixture, LACKS, MiB } from './fake-virsh';

test('a running domain: channel path under libvirt’s own directory, vCPUs, virtio-mem, balloon, ACPI', async () => {
  const info = parseDomainXml(await fixture('live-running.xml'));
  expect(info).toMatchObject({
    name: 'nbfix',
    id: 1,
    type: 'qemu',
    acpi: true,
    channel: {
      path: '/var/lib/libvirt/qemu/channel/target/domain-1-nbfix/org.nestbroker.0',
      state: 'disconnected',
      alias: 'channel0',
    },
    vcpus: { max: 4, current: 2, enabled: [0, 1], hotpluggable: [1, 2, 3], minLive: 1 },
    memory: {
      totalBytes: 384 * MiB, // boot memory + the device's whole size
      currentBytes: 128 * MiB,
      maxBytes: 1024 * MiB,
      baseBytes: 128 * MiB,
    },
    virtioMem: {
      alias: 'virtiomem0',
      node: 0,
      sizeBytes: 256 * MiB,
      blockBytes: 2 * MiB,
      requestedBytes: 128 * MiB,
      currentBytes: 0, // no guest OS plugged anything
    },
    balloon: { model: 'virtio', alias: 'balloon0' },
  });
  expect(virtioMemGuestBytes(info)).toBe(128 * MiB);
  expect(missingPrerequisites(info, { cpuMode: 'unplug', memoryMode: 'virtio-mem' })).toEqual([]);
  expect(missingPrerequisites(info, { cpuMode: 'quota', memoryMode: 'balloon' })).toEqual([]);
});

test('after setvcpus 3 and update-memory-device 64MiB the live XML says so', async () => {
  const info = parseDomainXml(await fixture('live-after.xml'));
  expect(info.vcpus).toMatchObject({ current: 3, enabled: [0, 1, 2] });
  expect(info.virtioMem).toMatchObject({ requestedBytes: 64 * MiB, currentBytes: 0 });
});

test('a stopped domain has no id and its channel no path (libvirt picks one at start)', async () => {
  const info = parseDomainXml(await fixture('shutoff.xml'));
  expect(info.id).toBeUndefined();
  expect(info.channel).toEqual({ path: undefined, state: undefined, alias: undefined });
});

test('a domain without ACPI, hotpluggable vCPUs, virtio-mem, balloon or channel: each lack named', async () => {
  const info = parseDomainXml(await fixture('bare-running.xml'));
  expect(info).toMatchObject({ acpi: false, channel: undefined, balloon: undefined });
  expect(info.vcpus).toMatchObject({ max: 2, current: 2, hotpluggable: [], minLive: 2 });
  const unplug = missingPrerequisites(info, { cpuMode: 'unplug', memoryMode: 'virtio-mem' });
  expect(unplug.map((m) => m.prerequisite)).toEqual([
    'channel',
    'acpi',
    'hotpluggable-vcpus',
    'virtio-mem',
  ]);
  expect(unplug[0].message).toMatch(/org\.nestbroker\.0/);
  expect(unplug[1].message).toMatch(/<acpi\/>/);
  expect(unplug[2].message).toMatch(/hotpluggable='yes'/);
  expect(unplug[3].message).toMatch(/virtio-mem/);
  const quota = missingPrerequisites(info, { cpuMode: 'quota', memoryMode: 'balloon' });
  expect(quota.map((m) => m.prerequisite)).toEqual(['channel', 'balloon']);
  expect(quota[1].message).toMatch(/memballoon model='virtio'/);
});

// Each prerequisite alone: the recorded live XML of a domain that has them all, with just
// that one taken out, is refused for exactly that one, and only in the modes that need it.
type Modes = { cpuMode: 'unplug' | 'quota'; memoryMode: 'virtio-mem' | 'balloon' };
const NEEDED_BY: Record<keyof typeof LACKS, (m: Modes) => boolean> = {
  channel: () => true,
  acpi: (m) => m.cpuMode === 'unplug',
  'hotpluggable-vcpus': (m) => m.cpuMode === 'unplug',
  'virtio-mem': (m) => m.memoryMode === 'virtio-mem',
  balloon: (m) => m.memoryMode === 'balloon',
};
const ALL_MODES: Modes[] = [
  { cpuMode: 'unplug', memoryMode: 'virtio-mem' },
  { cpuMode: 'unplug', memoryMode: 'balloon' },
  { cpuMode: 'quota', memoryMode: 'virtio-mem' },
  { cpuMode: 'quota', memoryMode: 'balloon' },
];

test.each(Object.keys(LACKS) as (keyof typeof LACKS)[])(
  'only %s missing: named alone, and only in the modes that need it',
  async (lack) => {
    const info = parseDomainXml(LACKS[lack](await fixture('live-running.xml')));
    for (const modes of ALL_MODES)
      expect({
        modes,
        missing: missingPrerequisites(info, modes).map((m) => m.prerequisite),
      }).toEqual({ modes, missing: NEEDED_BY[lack](modes) ? [lack] : [] });
  },
);

test('attribute order, quotes, units and comments do not matter: it is parsed, not matched', () => {
  const xml = `<?xml version="1.0"?>
<!-- <channel type='unix'><target name='org.nestbroker.0'/></channel> in a comment -->
<domain id="7" type="kvm">
  <name>odd</name>
  <memory unit="GiB">1</memory>
  <vcpu current="1" placement="static">2</vcpu>
  <features><apic/><acpi/></features>
  <devices>
    <channel type="pty"><target name="org.nestbroker.0" type="virtio"/></channel>
    <channel type="unix">
      <target state="connected" name="org.nestbroker.0" type="virtio"/>
      <source path="/var/lib/libvirt/qemu/channel/target/domain-7-odd/org.nestbroker.0" mode="bind"/>
    </channel>
  </devices>
</domain>`;
  const info = parseDomainXml(xml);
  expect(info).toMatchObject({
    id: 7,
    acpi: true,
    channel: {
      path: '/var/lib/libvirt/qemu/channel/target/domain-7-odd/org.nestbroker.0',
      state: 'connected',
    },
    vcpus: { max: 2, current: 1, minLive: 1 },
    memory: { totalBytes: 1024 * MiB, currentBytes: 1024 * MiB },
  });
});

test('what is not a domain XML is LIBVIRT_ERROR, naming what is wrong', () => {
  for (const [xml, why] of [
    ['<network><name>x</name></network>', /no <domain>/],
    ['<domain><memory>1</memory></domain>', /<name> is missing/],
    ["<domain><name>x</name><memory unit='parsecs'>1</memory></domain>", /not a size/],
  ] as const) {
    let err: unknown;
    try {
      parseDomainXml(xml);
    } catch (e) {
      err = e;
    }
    expect(isNestError(err, 'LIBVIRT_ERROR')).toBe(true);
    expect((err as Error).message).toMatch(why);
  }
});
