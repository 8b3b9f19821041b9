/**
 * An in-process host broker with one guest, `vm1`, on a unix channel, driving the VM
 * cgroup `vm1` beneath a test adapter's root: the set-up that tests which play the guest
 * side themselves (a scripted peer, or a Client on a real channel) share.
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
  root: string;
  adapter: CgroupAdapter;
  channel: string;
  log: Logger;
  heartbeatTimeout: string;
  cancelTimeoutMs?: number;
}): Promise<HostBroker> {
  const config = validateHostConfig({
    stateDir: path.join(opts.dir, 'host-state'),
    socket: path.join(opts.dir, 'host.sock'),
    cgroup: { root: opts.root },
    heartbeat: { interval: '100ms', timeout: opts.heartbeatTimeout },
    reconnect: { min: '50ms', max: '200ms' },
    guests: [
      {
        name: 'vm1',
        priority: 10,
        allocation: { cpus: 2, memory: '1GiB' },
        floor: { cpus: 0.5, memory: '256MiB' },
        cgroup: 'vm1',
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
