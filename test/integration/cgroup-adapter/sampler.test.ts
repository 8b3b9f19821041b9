/**
 * The cheap sampler (cgroup-adapter/sampler.ts) on the real kernel: it agrees
 * with the adapter's full usage() read, its held descriptors follow the kernel's numbers
 * as they change (cgroup files re-read from offset 0), and a group removed under it is
 * reported gone, its descriptors dropped, and a group made again under the same name is
 * read afresh.
 */
import { GroupSampler } from '../../../cgroup-adapter/sampler';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import { BUSY_LOOP, Children, exited, until } from './util';

let t: TestAdapter;
const kids = new Children();

beforeAll(async () => {
  t = await openTestAdapter('sampler');
});
afterAll(async () => {
  kids.killAll();
  await t?.dispose();
});

test('memory and CPU time as usage() reads them, and they move as the group works', async () => {
  await t.adapter.create('busy');
  const s = new GroupSampler(t.adapter);
  try {
    expect(s.available).toBe(true);
    const idle = s.read('busy')!;
    const full = await t.adapter.usage('busy');
    expect(idle.memoryCurrent).toBe(full.memoryCurrent);
    expect(idle.cpuUsageUs).toBe(full.cpuUsageUs);
    expect(s.open).toBe(2); // memory and CPU, kept open

    const c = await kids.start(t.adapter, 'busy', '/bin/sh', BUSY_LOOP);
    // The same descriptors, read again from offset 0, see the CPU time grow.
    await until('CPU time to grow', () => s.read('busy')!.cpuUsageUs > idle.cpuUsageUs + 50_000);
    const busy = s.read('busy')!;
    expect(busy.memoryCurrent).toBeGreaterThan(0);
    expect(s.open).toBe(2);
    c.kill('SIGKILL');
    await exited(c);
  } finally {
    s.close();
  }
  expect(s.open).toBe(0);
});

test('a group removed under the sampler reads as gone and its descriptors are dropped; made again, it is read afresh', async () => {
  await t.adapter.create('gone');
  const s = new GroupSampler(t.adapter);
  try {
    expect(s.read('gone')).not.toBeNull();
    expect(s.open).toBe(2);
    await t.adapter.remove('gone');
    expect(s.read('gone')).toBeNull();
    expect(s.open).toBe(0);
    expect(s.read('gone')).toBeNull(); // still gone: ENOENT on open, nothing held
    await t.adapter.create('gone');
    const again = s.read('gone');
    expect(again).not.toBeNull();
    expect(again!.cpuUsageUs).toBe((await t.adapter.usage('gone')).cpuUsageUs);
  } finally {
    s.close();
  }
});
