/**
 * examples/host.yaml is a valid config, and docs/host-broker.md keeps step with the config
 * code: every default in HOST_DEFAULTS and every key of the schema appears in its reference.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { HOST_DEFAULTS, hostConfigKeys, loadHostConfig } from '../../../agent/host/config';

const ROOT = path.resolve(__dirname, '../../..');
const MiB = 1024 * 1024;

test('examples/host.yaml validates, with the values it spells out', async () => {
  const cfg = await loadHostConfig(path.join(ROOT, 'examples', 'host.yaml'));
  expect(cfg.guests.map((g) => [g.name, g.channel.transport])).toEqual([
    ['vm1', 'unix'],
    ['db1', 'tls'],
  ]);
  expect(cfg.guests[0]).toMatchObject({
    allocation: { cpus: 4, memoryBytes: 8192 * MiB },
    floor: { cpus: 1, memoryBytes: 2048 * MiB },
    cgroup: 'qemu-vm1.scope',
    qmp: '/run/qemu-vm1/qmp.sock',
    memoryOverheadBytes: 256 * MiB,
  });
  expect(cfg.trigger).toMatchObject({ enabled: true, forMs: 30_000, cooldownMs: 120_000 });
  expect(cfg.socketMode).toBe(0o660);
});

test('examples/host-libvirt.yaml validates: domains named, nothing libvirt gives typed again', async () => {
  const cfg = await loadHostConfig(path.join(ROOT, 'examples', 'host-libvirt.yaml'));
  expect(cfg.hypervisor).toEqual({
    type: 'libvirt',
    uri: 'qemu:///system',
    timeoutMs: 60_000,
    afterRestart: 'reapply',
    reapplyDeadlineMs: 600_000,
  });
  expect(cfg.guests.map((g) => [g.name, g.channel, g.libvirt, g.allocationFromLibvirt])).toEqual([
    [
      'vm1',
      { transport: 'libvirt', domain: 'vm1' },
      { domain: 'vm1', cpuMode: 'unplug', memoryMode: 'virtio-mem', confirmTimeoutMs: 60_000 },
      true,
    ],
    [
      'db1',
      { transport: 'libvirt', domain: 'db1-production' },
      {
        domain: 'db1-production',
        cpuMode: 'quota',
        memoryMode: 'balloon',
        confirmTimeoutMs: 60_000,
      },
      true,
    ],
  ]);
  // No socket of QEMU's in the broker's runtime directory, in either example.
  for (const f of ['host.yaml', 'host-libvirt.yaml']) {
    const text = await fs.readFile(path.join(ROOT, 'examples', f), 'utf8');
    expect(text.match(/\/run\/nestbroker\/[^\s]*/g) ?? []).toEqual(['/run/nestbroker/host.sock']);
  }
});

test('docs/host-broker.md names every default and every key of the config', async () => {
  const doc = await fs.readFile(path.join(ROOT, 'docs', 'host-broker.md'), 'utf8');
  for (const [k, v] of Object.entries(HOST_DEFAULTS)) {
    const shown = typeof v === 'number' ? `0${v.toString(8)}` : v;
    expect({ k, found: doc.includes(`\`${shown}\``) }).toEqual({ k, found: true });
  }
  // Every key the schema knows that holds a value (not a mapping of further keys).
  const keys = hostConfigKeys();
  const leaves = keys.filter(
    (k) => !keys.some((o) => o.startsWith(`${k}.`) || o.startsWith(`${k}[`)),
  );
  expect(leaves.length).toBeGreaterThan(30);
  for (const key of leaves)
    expect({ key, found: doc.includes(`| \`${key}\``) }).toEqual({ key, found: true });
  expect(doc).toContain("<target type='virtio' name='org.nestbroker.0'/>");
});
