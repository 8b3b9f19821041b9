/**
 * A domain restarted (`virsh destroy` + `virsh start`) comes back with its persistent
 * vCPUs and memory, while the books still hold the last reclaim: when the events follower
 * sees `Started`, the books follow what libvirt reports then, journaled (a broker started
 * again on the same state has the same books) and the notices kept. virsh is the recording
 * stand-in (fake-virsh.ts); the events come from the recorded `virsh event --loop --all`
 * output (test/fixtures/libvirt/events.txt) printed by a stand-in binary.
 */
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { silentLogger } from '../../../../agent/common/log';
import { validateHostConfig, type HostConfig } from '../../../../agent/host/config';
import { HostBroker, type HostChannel } from '../../../../agent/host/host-broker';
import { LibvirtActuator } from '../../../../agent/host/libvirt/actuator';
import { LibvirtDomains, resolveAllocations } from '../../../../agent/host/libvirt/domains';
import { followRestarts, startedResources } from '../../../../agent/host/libvirt/restart-books';
import { Virsh } from '../../../../agent/host/libvirt/virsh';
import { FakeVirsh, MiB, recordedEventsBinary } from './fake-virsh';

const KiB = 1024;
/** The books follow libvirt and nothing is re-applied (`libvirt.afterRestart: follow`). */
const FOLLOW = { afterRestart: 'follow', reapplyDeadlineMs: 60_000 } as const;
let dir: string;

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-lv-restart-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

function silentChannel(): HostChannel {
  return { send: () => true, on: () => undefined, close: () => undefined };
}

function brokerOn(cfg: HostConfig, domains: LibvirtDomains): HostBroker {
  let t = 0;
  return new HostBroker({
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
}

/** The recorded domain `nbfix` behind a fake virsh, and a started broker on it. */
async function started() {
  const fake = await FakeVirsh.create();
  const virsh = new Virsh({ runner: fake.runner });
  const cfg = await resolveAllocations(
    validateHostConfig({
      hypervisor: 'libvirt',
      stateDir: path.join(dir, 'state'),
      guests: [{ name: 'vm1', domain: 'nbfix', priority: 1, confirmTimeout: '10s' }],
    }),
    virsh,
  );
  const domains = new LibvirtDomains(virsh, cfg.guests);
  const broker = brokerOn(cfg, domains);
  await broker.start();
  return { fake, virsh, cfg, domains, broker };
}

test('after destroy + start the books follow libvirt: full vCPUs and memory again, journaled', async () => {
  const { fake, virsh, cfg, domains, broker } = await started();
  // A guest that gives what is asked: the vCPU goes, virtio-mem reaches its request.
  fake.guest.setvcpus = (want, d) => {
    d.vcpus = want;
    return {};
  };
  fake.guest.tick = (d) => {
    d.currentKiB = d.requestedKiB;
  };
  const { done } = await broker.issue('reclaim', {
    guest: 'vm1',
    change: { cpus: 1, memoryBytes: 64 * MiB },
    deadlineMs: 1,
    force: true,
  });
  const rec = await done;
  expect(rec.state).toBe('done');
  expect(broker.booksFor('vm1').granted).toEqual({ cpus: 1, memoryBytes: 192 * MiB });

  // destroy + start: the persistent XML's 2 vCPUs and the device's 128 MiB again.
  Object.assign(fake.d, { vcpus: 2, requestedKiB: 131072, currentKiB: 131072 });
  const bin = await recordedEventsBinary(dir);
  const follower = followRestarts(domains, broker, () => cfg.guests, silentLogger(), FOLLOW);
  const resynced = new Promise<Record<string, unknown>>((resolve) =>
    broker.once('books-resync', resolve),
  );
  domains.follow({ binary: bin });
  try {
    const r = await resynced;
    await follower.done();
    expect(r).toMatchObject({
      guest: 'vm1',
      before: { cpus: 1, memoryBytes: 192 * MiB },
      reported: { cpus: 2, memoryBytes: 256 * MiB },
      reason: 'domain "nbfix" started (Booted)',
    });
    const books = broker.booksFor('vm1');
    expect(books.granted).toEqual({ cpus: 2, memoryBytes: 256 * MiB });
    expect(books.actuated).toEqual({ cpus: 2, memoryBytes: 256 * MiB });
    // The notice stays as it ended; it just no longer counts.
    expect(broker.notice(rec.notice.id)?.state).toBe('done');
  } finally {
    follower.stop();
    await domains.stop();
    await broker.stop();
  }

  // Journaled: the broker started again on the same state has the same books, and the
  // next reclaim goes on from them.
  const again = brokerOn(cfg, new LibvirtDomains(virsh, cfg.guests));
  await again.start();
  try {
    expect(again.booksFor('vm1').granted).toEqual({ cpus: 2, memoryBytes: 256 * MiB });
    const next = await again.issue('reclaim', {
      guest: 'vm1',
      change: { cpus: 0, memoryBytes: 32 * MiB },
      deadlineMs: 1,
      force: true,
    });
    expect((await next.done).state).toBe('done');
    expect(again.booksFor('vm1').granted).toEqual({ cpus: 2, memoryBytes: 224 * MiB });
    expect(fake.d.requestedKiB).toBe(131072 - 32 * KiB);
  } finally {
    await again.stop();
  }
});

test('virtio-mem right after Started: <current> still 0, the books take boot memory + <requested> (what the guest plugs by itself)', async () => {
  const { fake, cfg, domains, broker } = await started();
  // Measured on the real guest (libvirt.e2e.test.ts): just started, nothing plugged yet.
  Object.assign(fake.d, { vcpus: 2, requestedKiB: 131072, currentKiB: 0 });
  const view = await domains.view(cfg.guests[0].libvirt!);
  expect(view.resources.memoryBytes).toBe(128 * MiB);
  expect(startedResources(view, 'virtio-mem')).toEqual({ cpus: 2, memoryBytes: 256 * MiB });
  expect(startedResources(view, 'balloon')).toEqual(view.resources);
  const bin = await recordedEventsBinary(dir);
  const follower = followRestarts(domains, broker, () => cfg.guests, silentLogger(), FOLLOW);
  const resynced = new Promise<Record<string, unknown>>((resolve) =>
    broker.once('books-resync', resolve),
  );
  domains.follow({ binary: bin });
  try {
    expect(await resynced).toMatchObject({ reported: { cpus: 2, memoryBytes: 256 * MiB } });
    await follower.done();
    expect(broker.booksFor('vm1').granted).toEqual({ cpus: 2, memoryBytes: 256 * MiB });
  } finally {
    follower.stop();
    await domains.stop();
    await broker.stop();
  }
});

test('a notice issued while libvirt is read: that reading is not used, libvirt is read again', async () => {
  const fake = await FakeVirsh.create();
  const virsh = new Virsh({ runner: fake.runner });
  const cfg = validateHostConfig({
    hypervisor: 'libvirt',
    guests: [
      { name: 'vm1', domain: 'nbfix', priority: 1, allocation: { cpus: 2, memory: '256MiB' } },
    ],
  });
  const domains = new LibvirtDomains(virsh, cfg.guests);
  // Books whose seq moves on during the first reading (an operator's reclaim journaled).
  let seq = 4;
  let dumps = 0;
  fake.guest.tick = () => {
    if (fake.calls.at(-1)?.[0] === 'dumpxml' && ++dumps === 1) seq = 5;
  };
  const calls: { seenSeq?: number; applied: boolean }[] = [];
  const books = {
    booksFor: () => ({ seq, granted: { cpus: 2, memoryBytes: 256 * MiB } }),
    async resyncBooks(_g: string, _r: unknown, _why: string, seenSeq?: number) {
      const applied = seenSeq === seq;
      calls.push({ seenSeq, applied });
      return applied ? { granted: { cpus: 2, memoryBytes: 256 * MiB } } : ('stale' as const);
    },
  };
  const follower = followRestarts(domains, books, () => cfg.guests, silentLogger(), FOLLOW);
  domains.emit('lifecycle', { guest: 'vm1', domain: 'nbfix', event: 'Started', detail: 'Booted' });
  await follower.done();
  follower.stop();
  expect(calls).toEqual([
    { seenSeq: 4, applied: false },
    { seenSeq: 5, applied: true },
  ]);
});
