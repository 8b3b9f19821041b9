/** Host totals from systeminformation, per-process usage from pidusage, on this machine. */
import { spawn } from 'node:child_process';
import * as os from 'node:os';
import { clearProcessUsage, hostUsage, processUsage } from '../../../cgroup-adapter/host-usage';
import { isCgroupError } from '../../../cgroup-adapter/errors';
import { exited } from './util';

afterAll(() => clearProcessUsage());

it('reports host memory, CPU count and load', async () => {
  const h = await hostUsage();
  expect(h.memTotal).toBe(os.totalmem());
  expect(h.memAvailable).toBeGreaterThan(0);
  expect(h.memAvailable).toBeLessThanOrEqual(h.memTotal);
  expect(h.cpuCount).toBe(os.cpus().length);
  expect(h.load).toHaveLength(3);
  // The busy share since the previous call (/proc/stat), after some work of our own.
  const until = Date.now() + 50;
  while (Date.now() < until);
  const again = await hostUsage();
  expect(again.currentLoadPct).toBeGreaterThan(0);
  expect(again.currentLoadPct).toBeLessThanOrEqual(100);
  expect(again.memAvailable).toBeGreaterThan(0);
});

it('reports a live process, and ESRCH for one that is gone', async () => {
  const me = await processUsage(process.pid);
  expect(me.rssBytes).toBeGreaterThan(10 * 2 ** 20);
  const c = spawn('/bin/true');
  await exited(c);
  const err = await processUsage(c.pid!).catch((e: unknown) => e);
  expect(isCgroupError(err, 'ESRCH')).toBe(true);
});
