/**
 * A reclaim the operator made stays in force across a domain restart (docs/libvirt.md,
 * "Books", `libvirt.afterRestart: reapply`): when the recorded `Started` event arrives
 * (test/fixtures/libvirt/events.txt, printed by a stand-in for `virsh event`), the books
 * follow what libvirt reports (its persistent vCPUs and memory again) and one reclaim of
 * the difference is journaled (`source: restart`); it reaches the guest once it says hello
 * again (a guest agent that kept the reclaimed allocation across its reboot accepts it:
 * agent/client/notices.ts allocationProblems), and the VM is lowered only after the
 * guest's outcome. A restart while the broker was down is caught up at its start; a
 * domain libvirt shows as the books say is left alone; `follow` only follows.
 *
 * virsh is the recording stand-in (fake-virsh.ts) whose live XML names this test's socket as
 * the channel; the guest is a ScriptedGuest on it (a real unix channel).
 */
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { allocationProblems } from '../../../../agent/client/notices';
import { silentLogger } from '../../../../agent/common/log';
import { validateHostConfig, type HostConfig } from '../../../../agent/host/config';
import { HostBroker } from '../../../../agent/host/host-broker';
import { LibvirtActuator } from '../../../../agent/host/libvirt/actuator';
import { LibvirtDomains, resolveAllocations } from '../../../../agent/host/libvirt/domains';
import { followRestarts } from '../../../../agent/host/libvirt/restart-books';
import { Virsh } from '../../../../agent/host/libvirt/virsh';
import { channelFactory } from '../../../../agent/host/main';
import { ScriptedGuest } from '../../../integration/host/scripted-guest';
import { FakeVirsh, MiB, recordedEventsBinary } from './fake-virsh';

const RECORDED_PATH = '/var/lib/libvirt/qemu/channel/target/domain-1-nbfix/org.nestbroker.0';
/** The domain as its persistent XML starts it (test/fixtures/libvirt/inactive.xml). */
const PERSISTENT = { vcpus: 2, requestedKiB: 131072, currentKiB: 131072 };
let dir: string;
let socketPath: string;

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-lv-reapply-'));
  socketPath = path.join(dir, 'org.nestbroker.0');
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

async function scene(afterRestart: 'reapply' | 'follow') {
  const fake = await FakeVirsh.create();
  fake.edit = (xml) => xml.replace(RECORDED_PATH, socketPath);
  // A guest that gives what is asked: the vCPU goes, virtio-mem reaches its request.
  fake.guest.setvcpus = (want, d) => {
    d.vcpus = want;
    return {};
  };
  fake.guest.tick = (d) => {
    d.currentKiB = d.requestedKiB;
  };
  const virsh = new Virsh({ runner: fake.runner });
  const cfg = await resolveAllocations(
    validateHostConfig({
      hypervisor: 'libvirt',
      libvirt: { afterRestart, reapplyDeadline: '60s' },
      stateDir: path.join(dir, 'state'),
      reconnect: { min: '10ms', max: '50ms' },
      guests: [{ name: 'vm1', domain: 'nbfix', priority: 1, confirmTimeout: '10s' }],
    }),
    virsh,
  );
  return { fake, virsh, cfg };
}

function brokerOn(cfg: HostConfig, domains: LibvirtDomains): HostBroker {
  return new HostBroker({
    config: cfg,
    actuator: new LibvirtActuator(domains, silentLogger(), { pollMs: 5 }),
    connect: channelFactory(cfg, silentLogger(), undefined, domains),
    log: silentLogger(),
  });
}

function policy(cfg: HostConfig) {
  if (cfg.hypervisor.type !== 'libvirt') throw new Error('libvirt config expected');
  return {
    afterRestart: cfg.hypervisor.afterRestart,
    reapplyDeadlineMs: cfg.hypervisor.reapplyDeadlineMs,
  };
}

/** The operator's reclaim of 1 vCPU and 64 MiB, answered by the guest: done. */
async function operatorReclaim(broker: HostBroker, guest: ScriptedGuest) {
  const { done } = await broker.issue('reclaim', {
    guest: 'vm1',
    change: { cpus: 1, memoryBytes: 64 * MiB },
    deadlineMs: 30_000,
  });
  const msg = await guest.next('notice');
  guest.ack(msg.id, msg.notice.id, 'accepted');
  guest.outcome(msg.notice, 'complete');
  expect((await done).state).toBe('done');
  expect(broker.booksFor('vm1').granted).toEqual({ cpus: 1, memoryBytes: 192 * MiB });
}

/** A stand-in for `virsh event --loop --all` printing the recorded events, then waiting. */
test('reapply: after destroy + start the reclaim in force is sent again at hello and the VM lowered after the outcome', async () => {
  const { fake, virsh, cfg } = await scene('reapply');
  const domains = new LibvirtDomains(virsh, cfg.guests);
  const broker = brokerOn(cfg, domains);
  let guest = await ScriptedGuest.listen('vm1', socketPath);
  await broker.start();
  const follower = followRestarts(domains, broker, () => cfg.guests, silentLogger(), policy(cfg));
  try {
    await operatorReclaim(broker, guest);
    expect(fake.d).toMatchObject({ vcpus: 1, requestedKiB: 65536 });

    // destroy: the guest's end goes; start: the persistent XML's vCPUs and memory again.
    await guest.close();
    Object.assign(fake.d, PERSISTENT);
    const issued = new Promise<{ id: string }>((resolve) =>
      broker.on('progress', (p: { noticeId: string; phase: string }) => {
        if (p.phase === 'issued') resolve({ id: p.noticeId });
      }),
    );
    domains.follow({ binary: await recordedEventsBinary(dir) });
    const { id } = await issued;
    await follower.done();
    const rec = broker.notice(id)!;
    expect(rec).toMatchObject({
      source: 'restart',
      state: 'issued',
      notice: {
        kind: 'reclaim',
        change: { cpus: 1, memoryBytes: 64 * MiB },
        allocation: { cpus: 1, memoryBytes: 192 * MiB },
        reason: expect.stringMatching(
          /re-applies the reclaims in force: domain "nbfix" started \(Booted\)/,
        ),
      },
    });
    // The books followed libvirt, journaled, and count the re-applied reclaim already.
    expect(broker.booksFor('vm1')).toMatchObject({
      granted: { cpus: 1, memoryBytes: 192 * MiB },
      actuated: { cpus: 2, memoryBytes: 256 * MiB },
    });
    // Nothing is taken before the guest has answered: it is not even up yet.
    expect(fake.d).toMatchObject(PERSISTENT);
    expect(fake.calls.filter((c) => c[0] === 'setvcpus')).toHaveLength(1);

    // The guest's agent comes up and says hello: the notice reaches it, then the VM goes down.
    guest = await ScriptedGuest.listen('vm1', socketPath);
    const msg = await guest.next('notice', 10_000);
    expect(msg.notice.id).toBe(id);
    expect(fake.d).toMatchObject(PERSISTENT);
    // A real guest agent kept the operator reclaim's allocation across its reboot (its
    // journal): the re-applied notice passes its allocation rule.
    expect(allocationProblems(msg.notice, { cpus: 1, memoryBytes: 192 * MiB })).toEqual([]);
    guest.ack(msg.id, msg.notice.id, 'accepted');
    guest.outcome(msg.notice, 'complete');
    expect((await broker.wait(id)).state).toBe('done');
    expect(fake.d).toMatchObject({ vcpus: 1, requestedKiB: 65536 });
    expect(broker.booksFor('vm1')).toMatchObject({
      granted: { cpus: 1, memoryBytes: 192 * MiB },
      actuated: { cpus: 1, memoryBytes: 192 * MiB },
    });
  } finally {
    follower.stop();
    await domains.stop();
    await broker.stop();
    await guest.close();
  }
});

test('a restart while the broker was down is caught up at its start; no restart, nothing issued', async () => {
  const { fake, virsh, cfg } = await scene('reapply');
  let domains = new LibvirtDomains(virsh, cfg.guests);
  let broker = brokerOn(cfg, domains);
  let guest = await ScriptedGuest.listen('vm1', socketPath);
  await broker.start();
  try {
    await operatorReclaim(broker, guest);
  } finally {
    await broker.stop();
    await guest.close();
  }

  // The broker starts again with libvirt as the books say: nothing to catch up.
  domains = new LibvirtDomains(virsh, cfg.guests);
  broker = brokerOn(cfg, domains);
  await broker.start();
  let follower = followRestarts(domains, broker, () => cfg.guests, silentLogger(), policy(cfg));
  follower.catchUp();
  await follower.done();
  follower.stop();
  expect(broker.notices('vm1')).toHaveLength(1);
  await broker.stop();

  // The domain restarted while no broker ran: at the next start, followed and re-applied.
  Object.assign(fake.d, PERSISTENT);
  domains = new LibvirtDomains(virsh, cfg.guests);
  broker = brokerOn(cfg, domains);
  await broker.start();
  follower = followRestarts(domains, broker, () => cfg.guests, silentLogger(), policy(cfg));
  try {
    follower.catchUp();
    await follower.done();
    const again = broker.notices('vm1').filter((r) => r.source === 'restart');
    expect(again).toHaveLength(1);
    expect(again[0].notice).toMatchObject({
      change: { cpus: 1, memoryBytes: 64 * MiB },
      reason: expect.stringMatching(/found at the broker's start/),
    });
    expect(broker.booksFor('vm1').actuated).toEqual({ cpus: 2, memoryBytes: 256 * MiB });
    guest = await ScriptedGuest.listen('vm1', socketPath);
    const msg = await guest.next('notice', 10_000);
    guest.ack(msg.id, msg.notice.id, 'accepted');
    guest.outcome(msg.notice, 'complete');
    expect((await broker.wait(again[0].notice.id)).state).toBe('done');
    expect(fake.d).toMatchObject({ vcpus: 1, requestedKiB: 65536 });
  } finally {
    follower.stop();
    await broker.stop();
    await guest.close();
  }
});

test('follow: the books follow libvirt after the restart and nothing is re-applied', async () => {
  const { fake, virsh, cfg } = await scene('follow');
  const domains = new LibvirtDomains(virsh, cfg.guests);
  const broker = brokerOn(cfg, domains);
  const guest = await ScriptedGuest.listen('vm1', socketPath);
  await broker.start();
  const follower = followRestarts(domains, broker, () => cfg.guests, silentLogger(), policy(cfg));
  try {
    await operatorReclaim(broker, guest);
    Object.assign(fake.d, PERSISTENT);
    const resynced = new Promise((resolve) => broker.once('books-resync', resolve));
    domains.follow({ binary: await recordedEventsBinary(dir) });
    await resynced;
    await follower.done();
    expect(broker.booksFor('vm1').granted).toEqual({ cpus: 2, memoryBytes: 256 * MiB });
    expect(broker.notices('vm1')).toHaveLength(1);
    expect(fake.d.requestedKiB).toBe(PERSISTENT.requestedKiB);
  } finally {
    follower.stop();
    await domains.stop();
    await broker.stop();
    await guest.close();
  }
});
