/**
 * A reclaim's outcome that arrives after the host gave up on it (docs/reliability.md, "A
 * deadline shorter than a grace period"): the host broker, its channel, the actuator and
 * the VM cgroup are real; the guest is a ScriptedGuest that acks the notice, lets the
 * deadline pass, and only then sends what it did. The books follow the guest: a complete
 * outcome makes the notice count again and lowers the VM; a failed one changes nothing.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { waitFor } from '../../../demo/stack';
import { scriptedGuestScene } from './one-guest-broker';

const MiB = 1024 * 1024;
const scene = scriptedGuestScene('late-outcome', { heartbeatTimeout: '5s' });

const vmMemory = (): number =>
  Number(
    readFileSync(
      path.join('/sys/fs/cgroup/memory', scene.t.rootName, 'vm1', 'memory.limit_in_bytes'),
      'utf8',
    ).trim(),
  );

const granted = () => scene.broker.status('vm1').books.granted;

/** A reclaim of 256 MiB the guest acks and then sits on until the host has given up. */
async function lateReclaim() {
  const { record, done } = await scene.broker.issue('reclaim', {
    guest: 'vm1',
    change: { memoryBytes: 256 * MiB, cpus: 0.5 },
    deadlineMs: 800,
  });
  const msg = await scene.guest.next('notice');
  scene.guest.ack(msg.id, msg.notice.id, 'accepted');
  const r = await done;
  expect(r).toMatchObject({ state: 'late', late: true, error: { code: 'GUEST_LATE' } });
  // Given up: the books took it back and the VM was not touched.
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(vmMemory()).toBe(1024 * MiB);
  await scene.guest.next('cancel'); // the host said it gave up
  return record.notice;
}

test('a complete outcome after the deadline: the notice counts again and the VM is lowered', async () => {
  const notice = await lateReclaim();
  scene.guest.outcome(notice, 'complete');
  const rec = await waitFor(
    'the late outcome to be reconciled',
    async () =>
      scene.broker.notice(notice.id)?.state === 'done' ? scene.broker.notice(notice.id) : undefined,
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
  const back = await scene.broker.issue('restore', {
    guest: 'vm1',
    change: { memoryBytes: 0, cpus: 0 },
    deadlineMs: 5000,
  });
  const msg = await scene.guest.next('restore');
  expect(msg.notice.change).toEqual({ memoryBytes: 256 * MiB, cpus: 0.5 });
  scene.guest.ack(msg.id, msg.notice.id, 'accepted');
  scene.guest.outcome(msg.notice, 'complete');
  const restored = await back.done;
  expect(restored).toMatchObject({ state: 'done', outcome: { status: 'complete' } });
  expect(restored.late).toBeUndefined();
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(vmMemory()).toBe(1024 * MiB);
});

test('a failed outcome after the deadline changes nothing: the guest kept its allocation too', async () => {
  const notice = await lateReclaim();
  scene.guest.outcome(notice, 'failed', { memoryBytes: 0, cpus: 0 });
  await waitFor(
    'the late outcome to be recorded',
    async () => scene.broker.notice(notice.id)?.outcome !== undefined,
    5000,
    20,
  );
  expect(scene.broker.notice(notice.id)).toMatchObject({
    state: 'late',
    outcome: { status: 'failed' },
  });
  expect(scene.broker.notice(notice.id)!.reconciledAt).toBeUndefined();
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(vmMemory()).toBe(1024 * MiB);
});
