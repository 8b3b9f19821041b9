/**
 * An in-process host broker with one guest, `vm1`, on a unix channel, driving the VM
 * cgroup `vm1` beneath a test adapter's root (or no VM cgroup at all, `adapter: null`):
 * the set-up that tests which play the guest side themselves (a scripted peer, or a
 * Client on a real channel) share. Its state is `<dir>/host-state`; called again on the
 * same dir it is the same broker restarted.
 */
import path from 'node:path';
import type { CgroupAdapter } from '../../../cgroup-adapter/types';
import type { Logger } from '../../../agent/common/log';
import { CgroupQmpActuator } from '../../../agent/host/actuator';
import { validateHostConfig } from '../../../agent/host/config';
import { HostBroker } from '../../../agent/host/host-broker';
import { channelFactory } from '../../../agent/host/main';
import { waitFor } from '../../../demo/stack';

export async function startOneGuestBroker(opts: {
  dir: string;
  /** The VM cgroup `vm1` under `root`; null: the broker touches no cgroup. */
  adapter: CgroupAdapter | null;
  root?: string;
  channel: string;
  log: Logger;
  heartbeatTimeout: string;
  cancelTimeoutMs?: number;
}): Promise<HostBroker> {
  const config = validateHostConfig({
    stateDir: path.join(opts.dir, 'host-state'),
    socket: path.join(opts.dir, 'host.sock'),
    ...(opts.adapter && opts.root ? { cgroup: { root: opts.root } } : {}),
    heartbeat: { interval: '100ms', timeout: opts.heartbeatTimeout },
    reconnect: { min: '50ms', max: '200ms' },
    guests: [
      {
        name: 'vm1',
        priority: 10,
        allocation: { cpus: 2, memory: '1GiB' },
        floor: { cpus: 0.5, memory: '256MiB' },
        ...(opts.adapter ? { cgroup: 'vm1' } : {}),
        channel: { transport: 'unix', path: opts.channel },
      },
    ],
  });
  const broker = new HostBroker({
    config,
    actuator: new CgroupQmpActuator(opts.adapter, opts.log),
    connect: channelFactory(config, opts.log),
    log: opts.log,
    ...(opts.cancelTimeoutMs === undefined ? {} : { cancelTimeoutMs: opts.cancelTimeoutMs }),
  });
  await broker.start();
  await waitFor('vm1 connected', async () => broker.status('vm1').connected, 5000, 20);
  return broker;
}
