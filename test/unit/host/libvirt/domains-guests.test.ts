/**
 * LibvirtDomains names the guest of a domain event from the guests in force at that event
 * (agent/host/libvirt/domains.ts), not from the list it was built with: a guest a reload
 * adds is followed through its domain's restarts (its channel woken, its books resynced,
 * docs/libvirt.md "Life-cycle"), and one a reload removes is no longer told. The events are
 * the lines recorded from the real libvirtd (test/fixtures/libvirt/events.txt), printed
 * by a stand-in for `virsh event --loop --all`.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { validateHostConfig, type GuestConfig } from '../../../../agent/host/config';
import { LibvirtDomains } from '../../../../agent/host/libvirt/domains';
import { Virsh } from '../../../../agent/host/libvirt/virsh';
import { FakeVirsh, recordedEventsBinary } from './fake-virsh';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-lv-guests-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

function guests(...names: [string, string][]): readonly GuestConfig[] {
  return validateHostConfig({
    hypervisor: 'libvirt',
    stateDir: path.join(dir, 'state'),
    guests: names.map(([name, domain], i) => ({
      name,
      domain,
      priority: i + 1,
      allocation: { cpus: 2, memory: '256MiB' },
    })),
  }).guests;
}

test('a guest added after the start is told its domain events; one removed is not', async () => {
  const fake = await FakeVirsh.create();
  // At the start only vm1 (domain nbfix); then, as a reload would, vm2 (nbbare) is added
  // and vm1 removed, before the first event arrives.
  let inForce = guests(['vm1', 'nbfix']);
  const domains = new LibvirtDomains(new Virsh({ runner: fake.runner }), () => inForce);
  inForce = guests(['vm2', 'nbbare']);
  const told: string[] = [];
  domains.on('lifecycle', (e: { guest: string; domain: string; event: string }) =>
    told.push(`${e.guest} ${e.domain} ${e.event}`),
  );
  // The recorded stream ends with nbbare's `Undefined`: every line before it has been told.
  const last = new Promise<void>((resolve) =>
    domains.on('domain-event', (e: { domain: string; detail: string }) => {
      if (e.domain === 'nbbare' && e.detail.startsWith('Undefined')) resolve();
    }),
  );
  domains.follow({ binary: await recordedEventsBinary(dir) });
  try {
    await last;
    // nbfix's Shutdown, Stopped, Resumed and Started came first: vm1 is gone, nobody is told.
    expect(told).toEqual([
      'vm2 nbbare Defined',
      'vm2 nbbare Resumed',
      'vm2 nbbare Started',
      'vm2 nbbare Shutdown',
      'vm2 nbbare Stopped',
      'vm2 nbbare Undefined',
    ]);
  } finally {
    await domains.stop();
  }
});
