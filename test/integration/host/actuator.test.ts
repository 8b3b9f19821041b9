/**
 * The actuator (agent/host/actuator.ts) with QMP inside it: a recorded QEMU conversation
 * replayed on a real unix socket (test/unit/host/qmp-replay.ts) and a real VM cgroup under
 * this run's root. Lowering balloons first, then sets the cgroup; a VM without a balloon
 * device is reported as a failed balloon step while the cgroup is still lowered.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { CgroupAdapter } from '../../../cgroup-adapter/types';
import { silentLogger } from '../../../agent/common/log';
import { CgroupQmpActuator } from '../../../agent/host/actuator';
import { validateHostConfig, type GuestConfig } from '../../../agent/host/config';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import { startQmpReplay, type QmpReplay } from '../../unit/host/qmp-replay';

const MiB = 1024 * 1024;
let t: TestAdapter;
let replay: QmpReplay | null = null;

beforeAll(async () => {
  t = await openTestAdapter('actuator');
});
afterAll(async () => {
  await t?.dispose();
});
afterEach(async () => {
  await replay?.close();
  replay = null;
});

const kernel = (ctrl: string, file: string): string =>
  readFileSync(path.join('/sys/fs/cgroup', ctrl, t.rootName, 'vm1', file), 'utf8').trim();

function guestWith(qmp: string): GuestConfig {
  return validateHostConfig({
    stateDir: '/tmp/unused',
    guests: [
      {
        name: 'vm1',
        priority: 1,
        allocation: { cpus: 2, memory: '1GiB' },
        channel: { transport: 'unix', path: '/tmp/unused.sock' },
        cgroup: 'vm1',
        qmp,
        balloonTimeout: '5s',
      },
    ],
  }).guests[0];
}

/** The real adapter, recording how many QMP commands QEMU had seen at each limit write. */
function recording(adapter: CgroupAdapter, seen: () => string[]) {
  const writes: { limits: unknown; qmpSoFar: string[] }[] = [];
  const wrapped = Object.create(adapter) as CgroupAdapter;
  wrapped.setLimits = async (group, limits) => {
    writes.push({ limits, qmpSoFar: [...seen()] });
    return adapter.setLimits(group, limits);
  };
  return { wrapped, writes };
}

test('lowering a VM: QMP balloon to the target and query-balloon until it is reached, THEN the cgroup limits', async () => {
  await t.adapter.create('vm1', {
    memory: { max: 1024 * MiB },
    cpu: { max: { quotaUs: 200_000, periodUs: 100_000 } },
  });
  replay = await startQmpReplay('balloon-shrink.jsonl');
  const r = replay;
  const { wrapped, writes } = recording(t.adapter, () => r.received.map((c) => String(c.execute)));
  const actuator = new CgroupQmpActuator(wrapped, silentLogger());
  const report = await actuator.apply(
    guestWith(r.socketPath),
    { memoryBytes: 512 * MiB, cpus: 1 },
    'down',
  );
  expect(report.errors).toEqual([]);
  expect(report.balloon).toMatchObject({
    targetBytes: 512 * MiB,
    actualBytes: 512 * MiB,
    reached: true,
    polls: 3,
  });
  expect(r.mismatches).toEqual([]);
  expect(r.received).toContainEqual({ execute: 'balloon', arguments: { value: 512 * MiB } });
  // The cgroup was written only once the balloon had been confirmed (all 3 polls seen).
  expect(writes.length).toBe(2);
  for (const w of writes) expect(w.qmpSoFar.filter((c) => c === 'query-balloon')).toHaveLength(3);
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(512 * MiB));
  expect(kernel('cpu', 'cpu.cfs_quota_us')).toBe('100000');
  expect(report.cgroup?.after.memory?.max).toBe(512 * MiB);
}, 20_000);

test('a VM without a balloon device: the balloon step fails with QMP_ERROR, the cgroup is still lowered', async () => {
  await t.adapter.setLimits('vm1', {
    memory: { max: 1024 * MiB },
    cpu: { max: { quotaUs: 200_000, periodUs: 100_000 } },
  });
  replay = await startQmpReplay('no-balloon-device.jsonl');
  const actuator = new CgroupQmpActuator(t.adapter, silentLogger());
  const report = await actuator.apply(
    guestWith(replay.socketPath),
    { memoryBytes: 512 * MiB, cpus: 1.5 },
    'down',
  );
  expect(replay.mismatches).toEqual([]);
  expect(report.errors).toEqual([
    { step: 'balloon', code: 'QMP_ERROR', message: expect.stringContaining('DeviceNotActive') },
  ]);
  expect(report.balloon).toBeUndefined();
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(512 * MiB));
  expect(kernel('cpu', 'cpu.cfs_quota_us')).toBe('150000');
}, 20_000);

test('raising a VM: cgroup limits first, then the balloon is let go and confirmed', async () => {
  await t.adapter.setLimits('vm1', {
    memory: { max: 512 * MiB },
    cpu: { max: { quotaUs: 100_000, periodUs: 100_000 } },
  });
  replay = await startQmpReplay('balloon-grow.jsonl');
  const r = replay;
  const { wrapped, writes } = recording(t.adapter, () => r.received.map((c) => String(c.execute)));
  const report = await new CgroupQmpActuator(wrapped, silentLogger()).apply(
    guestWith(r.socketPath),
    { memoryBytes: 1024 * MiB, cpus: 2 },
    'up',
  );
  expect(report.errors).toEqual([]);
  expect(writes.map((w) => w.qmpSoFar)).toEqual([[], []]); // QEMU not yet asked
  expect(report.balloon).toMatchObject({ actualBytes: 1024 * MiB, reached: true });
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));
  expect(kernel('cpu', 'cpu.cfs_quota_us')).toBe('200000');
}, 20_000);
