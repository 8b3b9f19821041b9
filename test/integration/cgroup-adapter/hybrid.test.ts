/**
 * The adapter on this machine's real kernel (auto-detected: hybrid here), with real child
 * processes, asserting on what the kernel shows. Every group lives under a per-run root
 * `nestbroker-test-<pid>-*` in every hierarchy and is removed even when a test fails.
 */
import { existsSync, mkdtempSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isCgroupError } from '../../../cgroup-adapter/errors';
import { openCgroupAdapter } from '../../../cgroup-adapter';
import { spawnInto } from '../../../cgroup-adapter/spawn';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import { HOSTILE_NAMES } from '../../unit/cgroup-adapter/hostile-names';
import {
  BUSY_LOOP,
  Children,
  FORKER,
  MiB,
  cpuTicks,
  exited,
  kernelFile,
  output,
  whileControlRuns,
  until,
} from './util';

async function codeOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
  } catch (e) {
    return isCgroupError(e) ? e.code : `not a CgroupError: ${String(e)}`;
  }
  return undefined;
}

let t: TestAdapter;
const kids = new Children();

beforeAll(async () => {
  t = await openTestAdapter('hybrid');
});
afterEach(() => kids.killAll());
afterAll(async () => {
  kids.killAll();
  await t?.dispose();
});

describe(`the adapter on this kernel (driver detected here)`, () => {
  it('detects the layout of this machine and claims the root in every hierarchy', () => {
    // This build machine is hybrid (CONTRIBUTING.md); a v2-only CI machine would say v2.
    expect(['v2', 'hybrid']).toContain(t.adapter.kind);
    for (const dir of Object.values(t.driver.paths(''))) expect(existsSync(dir)).toBe(true);
  });

  it('writes each limit to the file the kernel shows, and reads it back', async () => {
    const g = 'limits';
    await t.adapter.create(g, {
      memory: { max: 64 * MiB, high: 48 * MiB },
      cpu: { max: { quotaUs: 20000, periodUs: 50000 }, weight: 200 },
      cpus: '0',
      pidsMax: 32,
    });
    const p = t.driver.paths(g);
    if (t.adapter.kind === 'hybrid') {
      expect(kernelFile(p, 'memory', 'memory.limit_in_bytes')).toBe(String(64 * MiB));
      expect(kernelFile(p, 'memory', 'memory.soft_limit_in_bytes')).toBe(String(48 * MiB));
      expect(kernelFile(p, 'cpu', 'cpu.cfs_quota_us')).toBe('20000');
      expect(kernelFile(p, 'cpu', 'cpu.cfs_period_us')).toBe('50000');
      expect(kernelFile(p, 'cpu', 'cpu.shares')).toBe('2048');
      expect(kernelFile(p, 'cpuset', 'cpuset.cpus')).toBe('0');
      expect(kernelFile(p, 'pids', 'pids.max')).toBe('32');
    } else {
      expect(kernelFile(p, 'unified', 'memory.max')).toBe(String(64 * MiB));
      expect(kernelFile(p, 'unified', 'cpu.max')).toBe('20000 50000');
    }
    expect(await t.adapter.readLimits(g)).toMatchObject({
      memory: { max: 64 * MiB, high: 48 * MiB },
      cpu: { max: { quotaUs: 20000, periodUs: 50000 }, weight: 200 },
      cpus: '0',
      pidsMax: 32,
    });

    // Unlimited again: `max` in our API; v1's own spelling (-1) only inside the v1 file.
    await t.adapter.setLimits(g, {
      memory: { max: 'max' },
      cpu: { max: { quotaUs: 'max', periodUs: 100000 } },
      pidsMax: 'max',
    });
    expect(await t.adapter.readLimits(g)).toMatchObject({
      memory: { max: 'max' },
      cpu: { max: { quotaUs: 'max', periodUs: 100000 } },
      pidsMax: 'max',
    });
    if (t.adapter.kind === 'hybrid') expect(kernelFile(p, 'cpu', 'cpu.cfs_quota_us')).toBe('-1');

    // Period and quota shrinking together (the kernel checks each of the two writes).
    await t.adapter.setLimits(g, { cpu: { max: { quotaUs: 50000, periodUs: 100000 } } });
    await t.adapter.setLimits(g, { cpu: { max: { quotaUs: 5000, periodUs: 10000 } } });
    expect((await t.adapter.readLimits(g)).cpu?.max).toEqual({ quotaUs: 5000, periodUs: 10000 });
    await t.adapter.remove(g);
  });

  it('refuses what it cannot map, and removes a half-made group when the kernel refuses a limit', async () => {
    if (t.adapter.kind === 'hybrid') {
      expect(await codeOf(t.adapter.create('prot', { memory: { min: 16 * MiB } }))).toBe(
        'UNSUPPORTED',
      );
      expect(await t.adapter.exists('prot')).toBe(false);
    }
    // CPU 63 does not exist on this machine: the kernel refuses the cpuset write (ERANGE).
    expect(
      await codeOf(t.adapter.create('badcpu', { memory: { max: 64 * MiB }, cpus: '63' })),
    ).toBe('EINVAL');
    for (const dir of Object.values(t.driver.paths('badcpu'))) expect(existsSync(dir)).toBe(false);
  });

  it('(1) enforces a memory limit: a child allocating past it is OOM-killed and oom_kill counts it', async () => {
    const g = 'oom';
    await t.adapter.create(g, { memory: { max: 96 * MiB } });
    const before = await t.adapter.usage(g);
    expect(before.memoryEvents.oomKill).toBe(0);
    const hog = await kids.start(t.adapter, g, process.execPath, [
      '-e',
      'const a=[]; for(;;){ const b=Buffer.alloc(8<<20); b.fill(7); a.push(b); }',
    ]);
    const { signal } = await exited(hog);
    expect(signal).toBe('SIGKILL');
    const u = await t.adapter.usage(g);
    expect(u.memoryEvents.oomKill).toBeGreaterThanOrEqual(1);
    expect(u.memoryEvents.oom).toBeGreaterThanOrEqual(1);
    expect(u.memoryPeak).toBeGreaterThan(80 * MiB);
    expect(u.memoryPeak).toBeLessThanOrEqual(96 * MiB);
    await t.adapter.remove(g);
  });

  it('memory.max above the usage is set at once (no reclaim); below it the kernel reclaims or refuses it (EBUSY)', async () => {
    if (t.adapter.kind !== 'hybrid') return; // the v1 memory.limit_in_bytes path
    const g = 'memfit';
    await t.adapter.create(g, { memory: { max: 128 * MiB } });
    const holder = await kids.start(t.adapter, g, process.execPath, [
      '-e',
      'const b = Buffer.alloc(32 << 20); b.fill(7); setInterval(() => b[0]++, 1e6);',
    ]);
    await until(
      'the child to hold its 32 MiB',
      async () => (await t.adapter.usage(g)).memoryCurrent > 30 * MiB,
      20_000,
    );
    const p = t.driver.paths(g);
    // At or above the usage: written synchronously (hybrid.ts fitsNow), the kernel shows it.
    await t.adapter.setLimits(g, { memory: { max: 96 * MiB } });
    expect(kernelFile(p, 'memory', 'memory.limit_in_bytes')).toBe(String(96 * MiB));
    await t.adapter.setLimits(g, { memory: { max: 'max' } });
    expect(Number(kernelFile(p, 'memory', 'memory.limit_in_bytes'))).toBeGreaterThan(2 ** 40);
    // Below the usage (through the thread pool): the kernel reclaims to it (swap) or
    // refuses with EBUSY and keeps the old limit (cgroup-v1/memory.rst 2.5).
    await t.adapter.setLimits(g, { memory: { max: 96 * MiB } });
    const code = await codeOf(t.adapter.setLimits(g, { memory: { max: 4 * MiB } }));
    if (code === undefined) {
      expect(kernelFile(p, 'memory', 'memory.limit_in_bytes')).toBe(String(4 * MiB));
      expect((await t.adapter.usage(g)).memoryCurrent).toBeLessThanOrEqual(4 * MiB);
    } else {
      expect(code).toBe('EBUSY');
      expect(kernelFile(p, 'memory', 'memory.limit_in_bytes')).toBe(String(96 * MiB));
    }
    holder.kill('SIGKILL');
    await exited(holder);
    await t.adapter.remove(g);
  });

  it('limit files on held descriptors: a group made again elsewhere gets the next write; remove closes them', async () => {
    if (t.adapter.kind !== 'hybrid') return; // cgroup-adapter/held.ts serves the v1 files
    const g = 'held';
    await t.adapter.create(g, { cpu: { max: { quotaUs: 20000, periodUs: 100000 } } });
    const p = t.driver.paths(g);
    // This process's descriptors open on a file of the group (/proc/self/fd, proc(5)).
    const heldIn = (): number =>
      readdirSync('/proc/self/fd').filter((fd) => {
        try {
          const to = readlinkSync(`/proc/self/fd/${fd}`);
          return Object.values(p).some((dir) => to.startsWith(`${dir}/`));
        } catch {
          return false; // closed since the listing
        }
      }).length;
    await t.adapter.setLimits(g, {
      memory: { high: 32 * MiB },
      cpu: { max: { quotaUs: 30000, periodUs: 100000 }, weight: 100 },
    });
    expect(kernelFile(p, 'cpu', 'cpu.cfs_quota_us')).toBe('30000');
    expect(heldIn()).toBeGreaterThan(0);
    // Removed and made again by another adapter on the same root: the held descriptors
    // name the old group (ENODEV); the next write reaches the new one.
    const other = await openCgroupAdapter({ root: t.rootName });
    await other.remove(g);
    await other.create(g);
    await t.adapter.setLimits(g, {
      memory: { high: 16 * MiB },
      cpu: { max: { quotaUs: 40000, periodUs: 100000 }, weight: 200 },
    });
    expect(kernelFile(p, 'cpu', 'cpu.cfs_quota_us')).toBe('40000');
    expect(kernelFile(p, 'cpu', 'cpu.shares')).toBe('2048');
    expect(kernelFile(p, 'memory', 'memory.soft_limit_in_bytes')).toBe(String(16 * MiB));
    // A value the kernel refuses is its coded error; the file keeps its value and the
    // next write still lands.
    expect(await codeOf(t.adapter.setLimits(g, { cpus: '4000' }))).toBe('EINVAL');
    await t.adapter.setLimits(g, { cpus: '0' });
    expect(kernelFile(p, 'cpuset', 'cpuset.cpus')).toBe('0');
    await t.adapter.remove(g);
    expect(heldIn()).toBe(0);
  });

  it('(2) throttles a busy child under a CPU quota: nr_throttled > 0', async () => {
    const g = 'cpuq';
    await t.adapter.create(g, { cpu: { max: { quotaUs: 10000, periodUs: 100000 } } });
    const busy = await kids.start(t.adapter, g, '/bin/sh', BUSY_LOOP);
    const u0 = await t.adapter.usage(g);
    // Eight enforcement periods by the kernel's own count (cpu.stat nr_periods), throttled.
    let u1 = u0;
    await until(
      'eight periods, throttled',
      async () => {
        u1 = await t.adapter.usage(g);
        return u1.cpuNrPeriods - u0.cpuNrPeriods >= 8 && u1.cpuNrThrottled > 0;
      },
      30_000,
    );
    expect(u1.cpuThrottledUs).toBeGreaterThan(0);
    // At most the 10 ms quota in each of those periods; a period or two of slack.
    const periods = u1.cpuNrPeriods - u0.cpuNrPeriods;
    expect(u1.cpuUsageUs - u0.cpuUsageUs).toBeLessThan((periods + 2) * 10_000);
    await t.adapter.kill(g);
    await exited(busy);
    await t.adapter.remove(g);
  });

  for (const method of ['cgroup.kill', 'freeze-sigkill'] as const) {
    it(`(3) kills a group whose members keep forking (${method}); populated drops to 0`, async () => {
      const a =
        method === 'cgroup.kill'
          ? t
          : await openTestAdapter('killfb', { killMethod: 'freeze-sigkill' });
      try {
        const g = 'forker';
        await a.adapter.create(g, { pidsMax: 256 });
        await kids.start(a.adapter, g, '/bin/sh', FORKER);
        await until('the forker to have forked', async () => (await a.adapter.pids(g)).length >= 5);
        expect((await a.adapter.events(g)).populated).toBe(true);
        const r = await a.adapter.kill(g, 10_000);
        expect(r.method).toBe(method);
        expect((await a.adapter.events(g)).populated).toBe(false);
        expect(await a.adapter.pids(g)).toEqual([]);
        // ... and in every other hierarchy too.
        for (const dir of Object.values(a.driver.paths(g)))
          expect(kernelFile({ x: dir }, 'x', 'cgroup.procs')).toBe('');
        await a.adapter.remove(g);
      } finally {
        if (a !== t) await a.dispose();
      }
    });
  }

  it('(4) freeze stops a busy child (its CPU time stops growing); thaw resumes it', async () => {
    const g = 'freeze';
    await t.adapter.create(g);
    const busy = await kids.start(t.adapter, g, '/bin/sh', BUSY_LOOP);
    await until('the child to run', () => cpuTicks(busy.pid!) > 0);
    await t.adapter.freeze(g);
    expect(await t.adapter.events(g)).toEqual({ populated: true, frozen: true });
    const ticks0 = cpuTicks(busy.pid!);
    const use0 = (await t.adapter.usage(g)).cpuUsageUs;
    // 20 ticks (200 ms at 100 Hz) of CPU for a control loop; the frozen one gets none.
    await whileControlRuns(20);
    expect(cpuTicks(busy.pid!)).toBe(ticks0);
    expect((await t.adapter.usage(g)).cpuUsageUs - use0).toBeLessThan(2000);
    await t.adapter.thaw(g);
    expect((await t.adapter.events(g)).frozen).toBe(false);
    await until('CPU time to grow again', () => cpuTicks(busy.pid!) > ticks0 + 5); // 50 ms at 100 Hz
    await until(
      'group CPU time to grow again',
      async () => (await t.adapter.usage(g)).cpuUsageUs - use0 > 50_000,
    );
    await t.adapter.kill(g);
    await t.adapter.remove(g);
  });

  it('(5) removes a group only once it is empty: EBUSY while populated, waits for it to empty', async () => {
    const r = await openTestAdapter('remove', { busyRetryMs: 800 });
    try {
      await r.adapter.create('busy/inner');
      const sleeper = await kids.start(r.adapter, 'busy/inner', '/bin/sleep', ['30']);
      expect(await codeOf(r.adapter.remove('busy'))).toBe('EBUSY');
      for (const dir of Object.values(r.driver.paths('busy/inner')))
        expect(existsSync(dir)).toBe(true);
      expect(await r.adapter.pids('busy/inner')).toEqual([sleeper.pid]);

      // remove() keeps retrying EBUSY: the group empties within its budget, so it succeeds.
      const removing = r.adapter.remove('busy');
      setTimeout(() => sleeper.kill('SIGKILL'), 200);
      await removing;
      for (const dir of Object.values(r.driver.paths('busy'))) expect(existsSync(dir)).toBe(false);
    } finally {
      await r.dispose();
    }
  });

  it('(6) refuses hostile names with a coded error, and nothing is created outside the root', async () => {
    const mounts = t.driver.hierarchies.map((h) => path.dirname(h.rootAbs));
    const listing = () =>
      mounts.map((m) =>
        readdirSync(m)
          .filter((n) => !n.startsWith('nestbroker-test-'))
          .sort(),
      );
    const before = listing();
    for (const name of HOSTILE_NAMES) {
      for (const op of [
        () => t.adapter.create(name, { memory: { max: 64 * MiB } }),
        () => t.adapter.remove(name),
        () => t.adapter.movePid(name, process.pid),
        () => t.adapter.setLimits(name, { pidsMax: 1 }),
        // kill("") is the root itself (allowed: dispose uses it), so not a hostile case.
        ...(name === '' ? [] : [() => t.adapter.kill(name, 100)]),
      ]) {
        const code = await codeOf(op());
        expect({ name, code }).toEqual({
          name,
          code: expect.stringMatching(/^(NAME_INVALID|OUTSIDE_ROOT)$/),
        });
      }
    }
    expect(listing()).toEqual(before);
    for (const h of t.driver.hierarchies)
      expect(
        readdirSync(h.rootAbs).filter(
          (n) =>
            !n.includes('.') && n !== 'tasks' && n !== 'notify_on_release' && n !== 'release_agent',
        ),
      ).toEqual([]);
    // And the refusal names the value.
    await expect(t.adapter.create('../../etc')).rejects.toMatchObject({
      code: 'NAME_INVALID',
      field: 'group',
      value: '../../etc',
    });
  });

  it('moves one pid at a time, and a vanished pid is ESRCH', async () => {
    await t.adapter.create('move');
    const gone = await kids.start(t.adapter, 'move', '/bin/true', []);
    await exited(gone);
    expect(await codeOf(t.adapter.movePid('move', gone.pid!))).toBe('ESRCH');
    await t.adapter.remove('move');
  });

  it('spawnInto starts the program inside the group: it and its forks see the group in /proc/self/cgroup', async () => {
    await t.adapter.create('spawn');
    const c = await kids.start(t.adapter, 'spawn', '/bin/sh', ['-c', 'cat /proc/self/cgroup']);
    const out = await output(c);
    expect(out).toContain(`0::/${t.rootName}/spawn\n`);
    if (t.adapter.kind === 'hybrid') {
      for (const ctl of ['memory', 'cpu', 'cpuacct', 'cpuset', 'pids']) {
        expect(out).toMatch(new RegExp(`^\\d+:${ctl}:/${t.rootName}/spawn$`, 'm'));
      }
    }
    await t.adapter.remove('spawn');
  });

  it('spawnInto never runs the program when the move fails', async () => {
    const tmp = mkdtempSync(path.join(os.tmpdir(), 'nb-spawn-'));
    try {
      const marker = path.join(tmp, 'ran');
      const err = await spawnInto(t.adapter, 'no-such-group', '/usr/bin/touch', [marker]).catch(
        (e: unknown) => e,
      );
      expect(isCgroupError(err, 'ENOENT')).toBe(true);
      // The gate shell was killed before "go" (cgroup-adapter/spawn.ts): a control loop's
      // 10 ticks of CPU later, touch has still not run.
      await whileControlRuns(10);
      expect(existsSync(marker)).toBe(false);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  });

  it('reports usage with PSI where the kernel has it', async () => {
    await t.adapter.create('usage');
    const busy = await kids.start(t.adapter, 'usage', '/bin/sh', BUSY_LOOP);
    // The machine is shared: wait for CPU time to show rather than assume a rate.
    await until('CPU time', async () => (await t.adapter.usage('usage')).cpuUsageUs > 50_000);
    const u = await t.adapter.usage('usage');
    expect(u.memoryCurrent).toBeGreaterThan(0);
    expect(u.pids).toBeGreaterThanOrEqual(1);
    expect(u.cpuPressure?.some.avg10).toBeGreaterThanOrEqual(0);
    expect(u.memoryPressure?.some.totalUs).toBeGreaterThanOrEqual(0);
    busy.kill('SIGKILL');
    await t.adapter.waitEmpty('usage', 5000);
    await t.adapter.remove('usage');
  });
});
