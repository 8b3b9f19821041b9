/**
 * The libvirt channel path leaves nothing behind (agent/host/main.ts channelFactory,
 * agent/transport/reconnect.ts `wake`): each guest channel listens to the long-lived
 * LibvirtDomains emitter for its domain's `Started` and virsh event's restart, and must stop
 * listening when it is closed. A reload that reconnects a guest closes its channel and makes
 * a new one; a dropped connection is made again inside the same channel. After N of each,
 * the domains' listener counts are what they were after the first connection, and the
 * guest's socket has exactly one connection open: the old ones were closed.
 *
 * virsh is the recording stand-in (fake-virsh.ts) whose live XML names a socket of this
 * test as the channel's path; the guest end is a plain unix server on it.
 */
import { EventEmitter, once } from 'node:events';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { silentLogger } from '../../../../agent/common/log';
import { validateHostConfig } from '../../../../agent/host/config';
import { HostBroker } from '../../../../agent/host/host-broker';
import { LibvirtActuator } from '../../../../agent/host/libvirt/actuator';
import { LibvirtDomains } from '../../../../agent/host/libvirt/domains';
import { Virsh } from '../../../../agent/host/libvirt/virsh';
import { channelFactory } from '../../../../agent/host/main';
import { FakeVirsh } from './fake-virsh';

const N = 25;
const RECORDED_PATH = '/var/lib/libvirt/qemu/channel/target/domain-1-nbfix/org.nestbroker.0';
let dir: string;

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-lv-listeners-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

/** The guest's end: counts connections; `until` waits for a state of them, event by event. */
async function guestEnd(socketPath: string) {
  const open = new Set<net.Socket>();
  const changed = new EventEmitter();
  let total = 0;
  const server = net.createServer((sock) => {
    total++;
    open.add(sock);
    // Read (and drop) what the host sends, so its FIN is seen and the socket closes.
    sock.resume();
    sock.on('error', () => undefined);
    sock.on('close', () => {
      open.delete(sock);
      changed.emit('change');
    });
    changed.emit('change');
  });
  await new Promise<void>((r) => server.listen(socketPath, r));
  const until = async (ok: () => boolean): Promise<void> => {
    while (!ok()) await once(changed, 'change');
  };
  return {
    open,
    get total() {
      return total;
    },
    /** `n` connections made in all, exactly one of them open (the old ones closed). */
    settled: (n: number) => until(() => total >= n && open.size === 1),
    close: () =>
      new Promise<void>((r) => {
        for (const s of open) s.destroy();
        server.close(() => r());
      }),
  };
}

test(`${N} reloads that reconnect the guest and ${N} dropped connections: the listener counts stay flat`, async () => {
  const socketPath = path.join(dir, 'org.nestbroker.0');
  const guest = await guestEnd(socketPath);
  const fake = await FakeVirsh.create();
  fake.edit = (xml) => xml.replace(RECORDED_PATH, socketPath);
  const virsh = new Virsh({ runner: fake.runner });
  const cfg = validateHostConfig({
    hypervisor: 'libvirt',
    stateDir: path.join(dir, 'state'),
    reconnect: { min: '10ms', max: '50ms' },
    guests: [
      { name: 'vm1', domain: 'nbfix', priority: 1, allocation: { cpus: 2, memory: '256MiB' } },
    ],
  });
  const domains = new LibvirtDomains(virsh, cfg.guests);
  const broker = new HostBroker({
    config: cfg,
    actuator: new LibvirtActuator(domains, silentLogger()),
    connect: channelFactory(cfg, silentLogger(), undefined, domains),
    log: silentLogger(),
  });
  const counts = () => ({
    lifecycle: domains.listenerCount('lifecycle'),
    resync: domains.listenerCount('resync'),
  });
  await broker.start();
  try {
    await guest.settled(1);
    const first = counts();
    expect(first).toEqual({ lifecycle: 1, resync: 1 });

    // A reload whose diff reconnects vm1 (agent/host/reload.ts): a new channel each time.
    for (let i = 1; i <= N; i++) {
      broker.reconfigure(cfg, ['vm1']);
      await guest.settled(1 + i);
      expect({ i, ...counts() }).toEqual({ i, ...first });
    }
    // The guest end drops the connection: the same channel connects again.
    for (let i = 1; i <= N; i++) {
      const before = guest.total;
      for (const s of guest.open) s.destroy();
      await guest.settled(before + 1);
      expect({ i, ...counts() }).toEqual({ i, ...first });
    }
    // A `Started` still reaches the one live channel (and only it).
    expect(domains.emit('lifecycle', { guest: 'vm1', domain: 'nbfix', event: 'Started' })).toBe(
      true,
    );
  } finally {
    await broker.stop();
    await guest.close();
  }
  // Closed: nothing of the guest's channel listens any more.
  expect(counts()).toEqual({ lifecycle: 0, resync: 0 });
});
