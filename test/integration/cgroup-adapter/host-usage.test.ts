/** Host totals from systeminformation, per-process usage from pidusage, on this machine. */
import { spawn } from 'node:child_process';
import * as os from 'node:os';
import { readFileSync } from 'node:fs';
import {
  clearProcessUsage,
  hostInventory,
  hostUsage,
  processRows,
  processUsage,
} from '../../../cgroup-adapter/host-usage';
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

it("the host's inventory through systeminformation: this machine's CPUs, memory, kernel", async () => {
  const inv = await hostInventory();
  expect(inv.cpus).toBe(os.cpus().length);
  expect(inv.memTotalBytes).toBe(os.totalmem());
  expect(inv.kernel).toBe(os.release());
  expect(inv.physicalCores).toBeGreaterThanOrEqual(1);
  expect(inv.physicalCores).toBeLessThanOrEqual(inv.cpus);
  // systeminformation tidies /proc/cpuinfo's "model name" (drops "(R)", "CPU @ …"): every
  // word it keeps is one of the kernel's.
  const model = /^model name\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? '';
  const words = inv.cpuModel.split(/\s+/).filter((w) => /^[A-Za-z]{3,}$/.test(w));
  expect(words.length).toBeGreaterThan(0);
  for (const w of words) expect(model.toLowerCase()).toContain(w.toLowerCase());
  // Read once: the second call is the same object, at no cost.
  expect(await hostInventory()).toBe(inv);
});

it('process rows: this test process with its own RSS, a child, and nothing for a gone pid', async () => {
  const child = spawn('/bin/sleep', ['30']);
  const gone = spawn('/bin/true');
  await exited(gone);
  try {
    const rows = await processRows([process.pid, child.pid!, gone.pid!, process.pid]);
    expect(rows.map((r) => r.pid).sort()).toEqual([process.pid, child.pid!].sort());
    const me = rows.find((r) => r.pid === process.pid)!;
    const rss =
      Number(/^VmRSS:\s+(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]) * 1024;
    // Our RSS as the kernel reports it, within what a moment of allocation can move it.
    expect(Math.abs(me.rssBytes - rss)).toBeLessThan(64 * 2 ** 20);
    expect(me.rssBytes).toBeGreaterThan(20 * 2 ** 20);
    expect(me.comm).toBe(readFileSync('/proc/self/comm', 'utf8').trim());
    const sleeper = rows.find((r) => r.pid === child.pid)!;
    expect(sleeper).toMatchObject({ comm: 'sleep', cmdline: '/bin/sleep 30' });
    expect(sleeper.rssBytes).toBeLessThan(me.rssBytes);
    // Largest RSS first.
    expect(rows[0].pid).toBe(process.pid);
  } finally {
    child.kill('SIGKILL');
    await exited(child);
  }
});
