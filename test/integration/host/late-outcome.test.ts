/**
 * A reclaim's outcome that arrives after the host gave up on it (docs/reliability.md, "A
 * deadline shorter than a grace period"): the host broker, its channel, the actuator and
 * the VM cgroup are real; the guest is a ScriptedGuest that acks the notice, lets the
 * deadline pass, and only then sends what it did. The books follow the guest: a complete
 * outcome makes the notice count again and lowers the VM; a failed one changes nothing.
 */
import { promises as fs, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { silentLogger } from '../../../agent/common/log';
import { HostBroker } from '../../../agent/host/host-broker';
import { waitFor } from '../../../demo/stack';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import { startOneGuestBroker } from './one-guest-broker';
import { ScriptedGuest } from './scripted-guest';

const MiB = 1024 * 1024;
const log = silentLogger();
let t: TestAdapter;
let dir: string;
let guest: ScriptedGuest;
let broker: HostBroker;

const vmMemory = (): number =>
  Number(
    readFileSync(
      path.join('/sys/fs/cgroup/memory', t.rootName, 'vm1', 'memory.limit_in_bytes'),
      'utf8',
    ).trim(),
  );
const VM_LIMITS = {
  memory: { max: 1024 * MiB },
  cpu: { max: { quotaUs: 200_000, periodUs: 100_000 } },
};

beforeAll(async () => {
  t = await openTestAdapter('late-outcome');
  await t.adapter.create('vm1', VM_LIMITS);
});
afterAll(async () => {
  await t?.dispose();
});

beforeEach(async () => {
  await t.adapter.setLimits('vm1', VM_LIMITS);
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-host-late-'));
  const channel = path.join(dir, 'vm1.sock');
  guest = await ScriptedGuest.listen('vm1', channel);
  broker = await startOneGuestBroker({
    dir,
    root: t.rootName,
    adapter: t.adapter,
    channel,
    log,
    heartbeatTimeout: '5s',
  });
  await waitFor('the guest to connect', async () => broker.status('vm1').connected, 5000, 20);
});

afterEach(async () => {
  await broker?.stop();
  await guest?.close();
  await fs.rm(dir, { recursive: true, force: true });
});

const granted = () => broker.status('vm1').books.granted;

/** A reclaim of 256 MiB the guest acks and then sits on until the host has given up. */
async function lateReclaim() {
  const { record, done } = await broker.issue('reclaim', {
    guest: 'vm1',
    change: { memoryBytes: 256 * MiB, cpus: 0.5 },
    deadlineMs: 800,
  });
  const msg = await guest.next('notice');
  guest.ack(msg.id, msg.notice.id, 'accepted');
  const r = await done;
  expect(r).toMatchObject({ state: 'late', late: true, error: { code: 'GUEST_LATE' } });
  // Given up: the books took it back and the VM was not touched.
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(vmMemory()).toBe(1024 * MiB);
  await guest.next('cancel'); // the host said it gave up
  return record.notice;
}

test('a complete outcome after the deadline: the notice counts again and the VM is lowered', async () => {
  const notice = await lateReclaim();
  guest.outcome(notice, 'complete');
  const rec = await waitFor(
    'the late outcome to be reconciled',
    async () => (broker.notice(notice.id)?.state === 'done' ? broker.notice(notice.id) : undefined),
    5000,
    20,
  );
  expect(rec).toMatchObject({ late: true, outcome: { status: 'complete' } });
  expect(rec!.reconciledAt).toBeDefined();
  expect(rec!.error).toBeUndefined();
  expect(rec!.actuation).toMatchObject({ direction: 'down', target: notice.allocation });
  expect(granted()).toEqual({ memoryBytes: 768 * MiB, cpus: 1.5 });
  expect(vmMemory()).toBe(768 * MiB);
  // A restore of what the books say is missing works, and gives it all back.
  const back = await broker.issue('restore', {
    guest: 'vm1',
    change: { memoryBytes: 0, cpus: 0 },
    deadlineMs: 5000,
  });
  const msg = await guest.next('restore');
  expect(msg.notice.change).toEqual({ memoryBytes: 256 * MiB, cpus: 0.5 });
  guest.ack(msg.id, msg.notice.id, 'accepted');
  guest.outcome(msg.notice, 'complete');
  const restored = await back.done;
  expect(restored).toMatchObject({ state: 'done', outcome: { status: 'complete' } });
  expect(restored.late).toBeUndefined();
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(vmMemory()).toBe(1024 * MiB);
});

test('a failed outcome after the deadline changes nothing: the guest kept its allocation too', async () => {
  const notice = await lateReclaim();
  guest.outcome(notice, 'failed', { memoryBytes: 0, cpus: 0 });
  await waitFor(
    'the late outcome to be recorded',
    async () => broker.notice(notice.id)?.outcome !== undefined,
    5000,
    20,
  );
  expect(broker.notice(notice.id)).toMatchObject({ state: 'late', outcome: { status: 'failed' } });
  expect(broker.notice(notice.id)!.reconciledAt).toBeUndefined();
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(vmMemory()).toBe(1024 * MiB);
});
