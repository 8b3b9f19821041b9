/**
 * The v2 (pure unified) driver, opened explicitly on this machine's cgroup2 mount. Here
 * (hybrid) the unified hierarchy has no controllers, so this proves what it does offer:
 * membership, events, freeze, kill (both methods), waitEmpty and PSI. Where a limit
 * controller is missing, the driver must say UNSUPPORTED rather than pretend; on a machine
 * where it is present, the limit must reach the file. The real-guest test of a later issue
 * covers v2 limits end to end.
 */
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { isCgroupError } from '../../../cgroup-adapter/errors';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import {
  BUSY_LOOP,
  Children,
  FORKER,
  MiB,
  cpuTicks,
  exited,
  output,
  until,
  whileControlRuns,
} from './util';

let t: TestAdapter;
/** /proc/<pid>/comm: the program a pid runs now ('' once it is gone). */
const comm = (pid: number): string => {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
};
const kids = new Children();

beforeAll(async () => {
  t = await openTestAdapter('v2', { driver: 'v2' });
});
afterEach(() => kids.killAll());
afterAll(async () => {
  kids.killAll();
  await t?.dispose();
});

describe('the v2 driver on the unified hierarchy of this kernel', () => {
  it('lives only in the unified hierarchy', () => {
    expect(t.adapter.kind).toBe('v2');
    expect(t.driver.hierarchies.map((h) => h.name)).toEqual(['unified']);
    expect(t.adapter.capabilities).toMatchObject({ cgroupKill: true, freeze: true });
  });

  it('moves a child in (membership) and reports populated through cgroup.events', async () => {
    await t.adapter.create('members');
    expect(await t.adapter.events('members')).toEqual({ populated: false, frozen: false });
    const c = await kids.start(t.adapter, 'members', '/bin/sh', [
      '-c',
      'cat /proc/self/cgroup; exec sleep 30',
    ]);
    const out = output(c); // read from the start: the cat's line is the proof of membership
    await until('populated', async () => (await t.adapter.events('members')).populated);
    // Wait for STATES, not a pid count: right after start the group already holds one pid
    // (the spawn gate, before the shell forks its `cat`), so "one member" alone says
    // nothing. Only once the shell has exec'd `sleep` has the `cat` fork been and gone
    // (the shell waited for it); under load that can take seconds.
    await until('the shell to exec sleep', () => comm(c.pid!) === 'sleep', 20_000);
    // The `cat` fork was a member too; now only the shell (exec'd sleep) is left.
    expect(await t.adapter.pids('members')).toEqual([c.pid]);
    const cg = readFileSync(`/proc/${c.pid}/cgroup`, 'utf8');
    expect(cg).toContain(`0::/${t.rootName}/members\n`);
    c.kill('SIGKILL');
    expect(await out).toContain(`0::/${t.rootName}/members`);
    await t.adapter.waitEmpty('members', 5000);
    expect((await t.adapter.events('members')).populated).toBe(false);
    await t.adapter.remove('members');
  });

  it('waitEmpty rejects with TIMEOUT while a member lives', async () => {
    await t.adapter.create('wait');
    await kids.start(t.adapter, 'wait', '/bin/sleep', ['30']);
    await expect(t.adapter.waitEmpty('wait', 150)).rejects.toMatchObject({ code: 'TIMEOUT' });
    await t.adapter.kill('wait');
    await t.adapter.remove('wait');
  });

  it('freezes a busy child (CPU time stops) and thaws it', async () => {
    await t.adapter.create('freeze');
    const busy = await kids.start(t.adapter, 'freeze', '/bin/sh', BUSY_LOOP);
    await until('the child to run', () => cpuTicks(busy.pid!) > 0);
    await t.adapter.freeze('freeze');
    expect((await t.adapter.events('freeze')).frozen).toBe(true);
    const ticks = cpuTicks(busy.pid!);
    // 20 ticks (200 ms at 100 Hz) of CPU for a control loop; the frozen one gets none.
    await whileControlRuns(20);
    expect(cpuTicks(busy.pid!)).toBe(ticks);
    await t.adapter.thaw('freeze');
    await until('CPU time to grow again', () => cpuTicks(busy.pid!) > ticks + 5);
    await t.adapter.kill('freeze');
    await exited(busy);
    await t.adapter.remove('freeze');
  });

  for (const method of ['cgroup.kill', 'freeze-sigkill'] as const) {
    it(`kills a forking group with ${method}`, async () => {
      const a =
        method === 'cgroup.kill'
          ? t
          : await openTestAdapter('v2killfb', { driver: 'v2', killMethod: method });
      try {
        await a.adapter.create('forker');
        await kids.start(a.adapter, 'forker', '/bin/sh', FORKER);
        await until('forks', async () => (await a.adapter.pids('forker')).length >= 5);
        expect((await a.adapter.kill('forker')).method).toBe(method);
        expect(await a.adapter.events('forker')).toEqual({ populated: false, frozen: false });
        await a.adapter.remove('forker');
      } finally {
        if (a !== t) await a.dispose();
      }
    });
  }

  it('reads CPU usage and PSI from the unified files', async () => {
    await t.adapter.create('psi');
    const busy = await kids.start(t.adapter, 'psi', '/bin/sh', BUSY_LOOP);
    // The machine is shared: wait for CPU time to show rather than assume a rate.
    await until('CPU time', async () => (await t.adapter.usage('psi')).cpuUsageUs > 50_000);
    const u = await t.adapter.usage('psi');
    expect(u.cpuPressure).toBeDefined();
    expect(u.memoryPressure).toBeDefined();
    expect(u.cpuPressure!.some.totalUs).toBeGreaterThanOrEqual(0);
    expect(u.pids).toBe(1);
    if (!t.adapter.capabilities!.controllers.memory) {
      // Honest about what is missing rather than silently zero.
      expect(u.unavailable).toEqual(expect.arrayContaining(['memory.current', 'memory.events']));
    }
    busy.kill('SIGKILL');
    await t.adapter.waitEmpty('psi', 5000);
    await t.adapter.remove('psi');
  });

  it('writes limits to the v2 files where the controller exists, UNSUPPORTED where not', async () => {
    await t.adapter.create('limits');
    const dir = t.driver.paths('limits').unified;
    const caps = t.adapter.capabilities!.controllers;
    const tryIt = async (limits: Parameters<typeof t.adapter.setLimits>[1]) => {
      try {
        await t.adapter.setLimits('limits', limits);
        return 'ok';
      } catch (e) {
        return isCgroupError(e) ? e.code : String(e);
      }
    };
    expect(await tryIt({ memory: { max: 64 * MiB } })).toBe(caps.memory ? 'ok' : 'UNSUPPORTED');
    if (caps.memory)
      expect(readFileSync(path.join(dir, 'memory.max'), 'utf8').trim()).toBe(String(64 * MiB));
    expect(await tryIt({ cpu: { max: { quotaUs: 50000, periodUs: 100000 } } })).toBe(
      caps.cpu ? 'ok' : 'UNSUPPORTED',
    );
    if (caps.cpu)
      expect(readFileSync(path.join(dir, 'cpu.max'), 'utf8').trim()).toBe('50000 100000');
    expect(await tryIt({ pidsMax: 10 })).toBe(caps.pids ? 'ok' : 'UNSUPPORTED');
    await t.adapter.remove('limits');
  });
});
