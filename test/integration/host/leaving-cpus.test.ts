/**
 * Which notices name the vCPUs that will go (docs/libvirt.md, "Removal modes"): under
 * `hypervisor: libvirt`, a reclaim of whole CPUs for a guest with `cpuMode: unplug` that
 * said hello with `cpu-unplug` and its online CPUs carries `leavingCpus`, the highest ones
 * besides CPU 0; a `quota` guest, or one without the capability, gets none (it would
 * refuse the field). The host broker, its config validation and its unix channels are
 * real; the guests are ScriptedGuests; the actuator is a recording fake (no libvirtd).
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Resources } from '../../../agent/broker/types';
import { silentLogger } from '../../../agent/common/log';
import type { ActuationReport, ApplyContext, VmActuator } from '../../../agent/host/actuator';
import { validateHostConfig, type GuestConfig } from '../../../agent/host/config';
import { HostBroker } from '../../../agent/host/host-broker';
import { channelFactory } from '../../../agent/host/main';
import { CAP_CPU_UNPLUG } from '../../../agent/protocol/messages';
import { waitFor } from '../../../demo/stack';
import { ScriptedGuest } from './scripted-guest';

const MiB = 1024 * 1024;
const log = silentLogger();
let dir: string;
let broker: HostBroker;
const guests = new Map<string, ScriptedGuest>();

/** Records what it was asked and reports it done, as libvirt would after a confirmed step. */
class RecordingActuator implements VmActuator {
  readonly applied: {
    guest: string;
    target: Resources;
    direction: string;
    report?: { onlineCpus?: readonly number[] };
  }[] = [];
  async apply(g: GuestConfig, target: Resources, direction: 'down' | 'up', ctx?: ApplyContext) {
    this.applied.push({ guest: g.name, target, direction, report: ctx?.guestReport?.() });
    const now = new Date().toISOString();
    const r: ActuationReport = {
      direction,
      target,
      startedAt: now,
      finishedAt: now,
      status: 'done',
      actual: target,
      errors: [],
    };
    return r;
  }
}

const actuator = new RecordingActuator();

const GUESTS = [
  { name: 'unplug', cpuMode: 'unplug', caps: [CAP_CPU_UNPLUG] },
  { name: 'quota', cpuMode: 'quota', caps: [CAP_CPU_UNPLUG] },
  { name: 'nocap', cpuMode: 'unplug', caps: [] as string[] },
] as const;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-leaving-'));
  for (const g of GUESTS) {
    const sg = await ScriptedGuest.listen(g.name, path.join(dir, `${g.name}.sock`));
    sg.helloExtra = {
      capabilities: [...g.caps],
      onlineCpus: [0, 1, 2, 3],
      memTotal: 1024 * MiB,
    };
    guests.set(g.name, sg);
  }
  const config = validateHostConfig({
    stateDir: path.join(dir, 'host-state'),
    socket: path.join(dir, 'host.sock'),
    hypervisor: 'libvirt',
    heartbeat: { interval: '100ms', timeout: '5s' },
    reconnect: { min: '50ms', max: '200ms' },
    guests: GUESTS.map((g) => ({
      name: g.name,
      priority: 10,
      allocation: { cpus: 4, memory: '1GiB' },
      floor: { cpus: 1, memory: '256MiB' },
      cpuMode: g.cpuMode,
      memoryMode: 'balloon',
    })),
  });
  // libvirt would give each domain's channel path from its live XML; here each guest's
  // socket is the ScriptedGuest's, through the same unix channel the broker uses.
  const unix = channelFactory(config, log);
  broker = new HostBroker({
    config,
    actuator,
    connect: (g) =>
      unix({ ...g, channel: { transport: 'unix', path: path.join(dir, `${g.name}.sock`) } }),
    log,
  });
  await broker.start();
  for (const g of GUESTS)
    await waitFor(`${g.name} connected`, async () => broker.status(g.name).connected, 10_000, 20);
});

afterAll(async () => {
  await broker?.stop();
  for (const g of guests.values()) await g.close();
  await fs.rm(dir, { recursive: true, force: true });
});

/** Issues a reclaim, returns the notice as the guest received it, and ends it complete. */
async function reclaimSeen(name: string, change: Resources) {
  const sg = guests.get(name)!;
  const { record, done } = await broker.issue('reclaim', {
    guest: name,
    change,
    deadlineMs: 20_000,
  });
  const msg = await sg.next('notice', 10_000, (m) => m.notice.id === record.notice.id);
  sg.ack(msg.id, msg.notice.id, 'accepted');
  sg.outcome(msg.notice, 'complete');
  const end = await done;
  return { sent: msg.notice, journaled: record.notice, end };
}

test('an unplug guest with cpu-unplug is told which vCPUs go: the highest, never CPU 0', async () => {
  const { sent, journaled, end } = await reclaimSeen('unplug', { cpus: 2, memoryBytes: 0 });
  expect(sent.leavingCpus).toEqual([2, 3]);
  // The journal holds what was sent (a notice resent after a reconnect says the same).
  expect(journaled.leavingCpus).toEqual([2, 3]);
  expect(end.state).toBe('done');
  // The actuator is handed the guest's own report, to confirm an unplug libvirt misses.
  expect(actuator.applied.at(-1)).toMatchObject({
    guest: 'unplug',
    direction: 'down',
    report: { onlineCpus: [0, 1, 2, 3] },
  });
});

test('a fractional CPU reclaim of an unplug guest names none (it stays a quota)', async () => {
  const { sent } = await reclaimSeen('unplug', { cpus: 0.5, memoryBytes: 0 });
  expect(sent).not.toHaveProperty('leavingCpus');
});

test('a quota guest is never told of leaving CPUs', async () => {
  const { sent, end } = await reclaimSeen('quota', { cpus: 2, memoryBytes: 0 });
  expect(sent).not.toHaveProperty('leavingCpus');
  expect(end.state).toBe('done');
});

test('an unplug guest without the cpu-unplug capability gets none (it would refuse it)', async () => {
  const { sent, end } = await reclaimSeen('nocap', { cpus: 1, memoryBytes: 0 });
  expect(sent).not.toHaveProperty('leavingCpus');
  expect(end.state).toBe('done');
});
