/**
 * An in-process host broker with one guest, `vm1`, on a unix channel, driving the VM
 * cgroup `vm1` beneath a test adapter's root (or no VM cgroup at all, `adapter: null`):
 * the set-up that tests which play the guest side themselves (a scripted peer, or a
 * Client on a real channel) share. Its state is `<dir>/host-state`; called again on the
 * same dir it is the same broker restarted.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { CgroupAdapter } from '../../../cgroup-adapter/types';
import { CgroupQmpActuator } from '../../../agent/host/actuator';
import { validateHostConfig } from '../../../agent/host/config';
import { HostBroker } from '../../../agent/host/host-broker';
import { channelFactory } from '../../../agent/host/main';
import { silentLogger, type Logger } from '../../../agent/common/log';
import { waitFor } from '../../../demo/stack';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import { ScriptedGuest } from './scripted-guest';

const MiB = 1024 * 1024;
/** The VM cgroup's limits at the start of each scripted-guest story: 1 GiB, 2 CPUs. */
export const VM_LIMITS = {
  memory: { max: 1024 * MiB },
  cpu: { max: { quotaUs: 200_000, periodUs: 100_000 } },
};

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

/**
 * The scene the scripted-guest stories share (one jest file each): a test adapter whose
 * VM cgroup `vm1` has VM_LIMITS again before every test, a fresh temp dir, a
 * ScriptedGuest listening on `<dir>/vm1.sock` and the one-guest broker connected to it;
 * all of it stopped and removed after each test. Registers the jest hooks; read the
 * parts through the returned object (they change from test to test).
 */
export function scriptedGuestScene(
  name: string,
  broker: Pick<Parameters<typeof startOneGuestBroker>[0], 'heartbeatTimeout' | 'cancelTimeoutMs'>,
) {
  const log = silentLogger();
  const s = {} as { t: TestAdapter; dir: string; guest: ScriptedGuest; broker: HostBroker };
  beforeAll(async () => {
    s.t = await openTestAdapter(name);
    await s.t.adapter.create('vm1', VM_LIMITS);
  });
  afterAll(async () => {
    await s.t?.dispose();
  });
  beforeEach(async () => {
    await s.t.adapter.setLimits('vm1', VM_LIMITS);
    s.dir = await fs.mkdtemp(path.join(os.tmpdir(), `nb-host-${name}-`));
    const channel = path.join(s.dir, 'vm1.sock');
    s.guest = await ScriptedGuest.listen('vm1', channel);
    s.broker = await startOneGuestBroker({
      dir: s.dir,
      root: s.t.rootName,
      adapter: s.t.adapter,
      channel,
      log,
      ...broker,
    });
  });
  afterEach(async () => {
    await s.broker?.stop();
    await s.guest?.close();
    await fs.rm(s.dir, { recursive: true, force: true });
  });
  return s;
}
