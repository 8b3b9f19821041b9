/**
 * The host broker's lifecycle branches that a real guest agent cannot be made to take on
 * demand: the host broker (in this process), its reconnecting unix channel, the actuator
 * and the VM cgroup are all real; the guest is a ScriptedGuest on a real socket that
 * answers as each story needs (rejects, fails, agrees to a cancel, stops answering pings).
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { newMessageId } from '../../../agent/protocol/messages';
import { waitFor } from '../../../demo/stack';
import { scriptedGuestScene } from './one-guest-broker';

const MiB = 1024 * 1024;
const scene = scriptedGuestScene('branches', { heartbeatTimeout: '300ms', cancelTimeoutMs: 2000 });

const kernel = (ctrl: string, file: string): string =>
  readFileSync(path.join('/sys/fs/cgroup', ctrl, scene.t.rootName, 'vm1', file), 'utf8').trim();

const reclaim = (force = false, deadlineMs = 5000) =>
  scene.broker.issue('reclaim', {
    guest: 'vm1',
    change: { memoryBytes: 256 * MiB, cpus: 0.5 },
    deadlineMs,
    force,
  });
const granted = () => scene.broker.status('vm1').books.granted;

test('one ping from the guest gets exactly one pong (the channel answers; the broker does not answer again)', async () => {
  const id = newMessageId();
  scene.guest.send({ type: 'ping', id, t: 42 });
  await scene.guest.next('pong', 2000, (p) => p.replyTo === id);
  // A second ping's pong: the host answers in order, so a second pong to the first would
  // have come before it.
  const later = newMessageId();
  scene.guest.send({ type: 'ping', id: later, t: 43 });
  await scene.guest.next('pong', 10_000, (p) => p.replyTo === later);
  const pongs = scene.guest.received.filter((m) => m.type === 'pong' && m.replyTo === id);
  expect(pongs).toHaveLength(1);
  expect(pongs[0]).toMatchObject({ t: 42 });
});

test('a guest that stops answering pings is dropped by the heartbeat and reconnected with backoff', async () => {
  expect(scene.guest.opens).toBe(1);
  scene.guest.answerPings = false; // a hung agent behind a live socket: only the heartbeat sees it
  await waitFor(
    'the host to drop the silent guest',
    async () => !scene.broker.status('vm1').connected,
    3000,
    20,
  );
  scene.guest.answerPings = true;
  await waitFor(
    'the host to reconnect',
    async () => scene.guest.opens >= 2 && scene.broker.status('vm1').connected,
    3000,
    20,
  );
  // Each connection was greeted: hello → welcome again.
  expect(scene.guest.received.filter((m) => m.type === 'welcome').length).toBeGreaterThanOrEqual(2);
});

test('a guest that rejects the notice: refused with its code, the books give it back, the VM is untouched', async () => {
  const { record, done } = await reclaim();
  expect(granted()).toEqual({ memoryBytes: 768 * MiB, cpus: 1.5 }); // booked at issue
  const msg = await scene.guest.next('notice');
  expect(msg.notice.id).toBe(record.notice.id);
  scene.guest.ack(msg.id, msg.notice.id, 'rejected', {
    code: 'NOTICE_STALE',
    message: 'seq: stale: notice seq 1 is not after 7, already applied',
  });
  const r = await done;
  expect(r).toMatchObject({ state: 'refused', error: { code: 'NOTICE_STALE' } });
  expect(r.actuation).toBeUndefined();
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));
  expect(kernel('cpu', 'cpu.cfs_quota_us')).toBe('200000');
});

test('a guest outcome with status failed: refused without --force (nothing taken), carried out with it', async () => {
  const first = await reclaim();
  let msg = await scene.guest.next('notice');
  scene.guest.ack(msg.id, msg.notice.id, 'accepted');
  scene.guest.outcome(msg.notice, 'failed', { memoryBytes: 0, cpus: 0 });
  const r = await first.done;
  expect(r).toMatchObject({ state: 'refused', error: { code: 'NOTICE_REJECTED' } });
  expect(r.outcome?.status).toBe('failed');
  expect(r.actuation).toBeUndefined();
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));

  const forced = await reclaim(true);
  msg = await scene.guest.next('notice', 5000, (m) => m.notice.id === forced.record.notice.id);
  scene.guest.ack(msg.id, msg.notice.id, 'accepted');
  scene.guest.outcome(msg.notice, 'failed', { memoryBytes: 0, cpus: 0 });
  const f = await forced.done;
  expect(f.state).toBe('done');
  expect(f.actuation?.errors).toEqual([]);
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(768 * MiB));
  expect(kernel('cpu', 'cpu.cfs_quota_us')).toBe('150000');
  expect(granted()).toEqual({ memoryBytes: 768 * MiB, cpus: 1.5 });
});

test('cancel before the deadline: the guest agrees, the books give it back, the VM is untouched', async () => {
  const { record, done } = await reclaim();
  const msg = await scene.guest.next('notice');
  scene.guest.ack(msg.id, msg.notice.id, 'accepted');
  await waitFor(
    'acked',
    async () => scene.broker.notice(record.notice.id)?.state === 'acked',
    2000,
    10,
  );
  const cancelled = scene.broker.cancel(record.notice.id);
  const c = await scene.guest.next('cancel');
  expect(c.noticeId).toBe(record.notice.id);
  scene.guest.ack(c.id, c.noticeId, 'cancelled');
  expect(await cancelled).toMatchObject({ state: 'cancelled' });
  expect((await done).state).toBe('cancelled');
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));
  // A guest that sends an outcome anyway changes nothing: the notice stays cancelled.
  scene.guest.outcome(msg.notice, 'complete');
  await new Promise((r) => setTimeout(r, 200));
  expect(scene.broker.notice(record.notice.id)?.state).toBe('cancelled');
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));
});

test('cancel refused when the guest has already started (not-cancellable): the reclaim goes on to its outcome', async () => {
  const { record, done } = await reclaim();
  const msg = await scene.guest.next('notice');
  scene.guest.ack(msg.id, msg.notice.id, 'accepted');
  await waitFor(
    'acked',
    async () => scene.broker.notice(record.notice.id)?.state === 'acked',
    2000,
    10,
  );
  const cancelled = scene.broker.cancel(record.notice.id).catch((e: unknown) => e);
  const c = await scene.guest.next('cancel');
  scene.guest.ack(c.id, c.noticeId, 'not-cancellable');
  expect(await cancelled).toMatchObject({ code: 'NOTICE_REJECTED' });
  scene.guest.outcome(msg.notice, 'complete');
  expect((await done).state).toBe('done');
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(768 * MiB));
});

test('cancel after the deadline is refused, and a late guest without --force costs it nothing', async () => {
  const { record, done } = await reclaim(false, 300);
  const msg = await scene.guest.next('notice');
  scene.guest.ack(msg.id, msg.notice.id, 'accepted'); // …and then never an outcome
  const r = await done;
  expect(r).toMatchObject({ state: 'late', late: true, error: { code: 'GUEST_LATE' } });
  // The host told the guest it gave up.
  expect((await scene.guest.next('cancel')).noticeId).toBe(record.notice.id);
  await expect(scene.broker.cancel(record.notice.id)).rejects.toMatchObject({
    code: 'NOTICE_REJECTED',
    problems: [{ field: 'id', message: expect.stringContaining('late') }],
  });
  expect(granted()).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));
});

test("a guest whose hello lists no 'plan' capability is never sent a plan: the host says why", async () => {
  await waitFor('vm1 connected', async () => scene.broker.status('vm1').connected);
  const err = (await scene.broker
    .askPlan('vm1', 'reclaim', { memoryBytes: 512 * MiB, cpus: 1 })
    .catch((e: unknown) => e)) as Error & { code: string };
  expect(err.code).toBe('PROTOCOL_VERSION');
  expect(err.message).toContain('does not offer a dry run');
  // The host pings every heartbeat interval on the same ordered socket: once a ping sent
  // after the refusal has arrived, a plan sent with it would have arrived before it.
  await scene.guest.next('ping');
  expect(scene.guest.received.filter((m) => m.type === 'plan')).toEqual([]);
});
