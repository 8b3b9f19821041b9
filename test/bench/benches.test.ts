/**
 * The benchmarks run (docs/performance.md): each compiled bench, as `make bench` would
 * start it, on a tiny size, under this run's own cgroup root, writing its JSON to a temp
 * file. Not timed: the figures are only checked to be there, to be real measurements
 * (positive, counted from the kernel's files and the agents' outcomes) and the roots to be
 * gone afterwards. Needs `make build` first (make test builds).
 */
import { spawn } from 'node:child_process';
import { existsSync, promises as fs, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const DIST_BENCH = path.resolve(__dirname, '..', '..', 'dist', 'bench');
let dir: string;

beforeAll(async () => {
  if (!existsSync(path.join(DIST_BENCH, 'run-all.js')))
    throw new Error(`${DIST_BENCH}/run-all.js is missing: run "make build" first`);
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-bench-smoke-'));
});

afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

function run(bench: string, args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(DIST_BENCH, `${bench}.js`), ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr.on('data', (b: Buffer) => (out += b.toString()));
    child.on('exit', (code) => resolve({ code, out }));
  });
}

/** The root, in every hierarchy: gone after the bench. */
function leftovers(root: string): string[] {
  return readdirSync('/sys/fs/cgroup').filter((h) =>
    existsSync(path.join('/sys/fs/cgroup', h, root)),
  );
}

// The JSON a bench wrote, read back; its shape is what the assertions check.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
async function readResult(file: string): Promise<Record<string, any>> {
  const doc = JSON.parse(await fs.readFile(file, 'utf8'));
  expect(doc.machine).toMatchObject({
    os: expect.any(String),
    kernel: os.release(),
    cpus: os.cpus().length,
    memoryBytes: os.totalmem(),
    node: process.version,
  });
  expect(doc).toHaveProperty('commit'); // a hash, or null outside git
  expect(Date.parse(doc.date)).not.toBeNaN();
  return doc;
}

test('cascade: 1 guest × 5 projects, 3 runs: every stop graceful, the latency and its floor measured', async () => {
  const root = `nestbroker-test-${process.pid}-bench-cascade`;
  const out = path.join(dir, 'cascade.json');
  const r = await run('cascade', [
    '--sizes',
    '1x5',
    '--runs',
    '3',
    '--warmup',
    '0',
    '--root',
    root,
    '--out',
    out,
    '--phases',
  ]);
  expect({ code: r.code, out: r.code === 0 ? '' : r.out }).toEqual({ code: 0, out: '' });
  expect(r.out).toMatch(/cascade latency/);
  expect(r.out).toMatch(/where the time goes, 1x5 \(3 notices/);
  const doc = await readResult(out);
  const [s] = doc.sizes;
  expect(s).toMatchObject({ size: '1x5', projects: 5, kept: 3, stopped: 2, runs: 3 });
  expect(s.latencyMs.n).toBe(3);
  expect(s.latencyMs.p50).toBeGreaterThan(0);
  expect(s.floorMs.p50).toBeGreaterThan(0);
  // The kernel floor (bench/kernel-floor.c, built with cc) ran on its own groups, every run,
  // and the disk's fsync was sampled beside it.
  expect(s.kernelFloorMs.n).toBe(3);
  expect(s.kernelFloorMs.p50).toBeGreaterThan(0);
  expect(s.kernelFloorSignalledMs.p50).toBeLessThanOrEqual(s.kernelFloorMs.p50);
  expect(s.kernelRatioP50).toBeCloseTo(s.latencyMs.p50 / s.kernelFloorMs.p50, 2);
  expect(s.fsyncMs.n).toBe(3 * 5);
  expect(s.atomicWriteMs.p50).toBeGreaterThan(0);
  expect(r.out).toMatch(/kernel floor/);
  // 2 stopped projects × 3 runs, each ended by its SIGTERM handler within its grace.
  expect(s.exits).toEqual({ graceful: 6 });
  // Every run's CPU time of the host broker and of the guest agents, from /proc/<pid>/stat
  // (10 ms ticks: a tiny run may read 0).
  expect(s.hostCpuMs.n).toBe(3);
  expect(s.samples.hostCpuMs.every((x: number) => x >= 0)).toBe(true);
  expect(s.guestsCpuMs.n).toBe(3);
  expect(s.hostSystemCpuMs.p50).toBeLessThanOrEqual(s.hostCpuMs.max);
  expect(r.out).toMatch(/CPU time per run/);
  // The phases, read from the agents' logs, add up to the latency (means are additive;
  // the bench's monotonic clock and the logs' wall clock differ by a ms or so).
  expect(s.phases.notices).toBe(3);
  expect(s.phases.phases).toHaveLength(10);
  const sum = s.phases.phases.reduce((a: number, p: { ms: { mean: number } }) => a + p.ms.mean, 0);
  expect(Math.abs(sum - s.latencyMs.mean)).toBeLessThan(5);
  expect(leftovers(root)).toEqual([]);
}, 60_000);

// --pin-host needs a CPU besides CPU 0 for the guests.
(os.cpus().length >= 2 ? test : test.skip)(
  'cascade --pin-host: the host broker on CPU 0, the guest agent and its projects on the others, as /proc says',
  async () => {
    const root = `nestbroker-test-${process.pid}-bench-cascade-pin`;
    const out = path.join(dir, 'cascade-pin.json');
    const r = await run('cascade', [
      ...['--sizes', '1x3', '--runs', '1', '--warmup', '0', '--floors', 'none'],
      ...['--fsync-samples', '0', '--pin-host', '--root', root, '--out', out],
    ]);
    expect({ code: r.code, out: r.code === 0 ? '' : r.out }).toEqual({ code: 0, out: '' });
    const [s] = (await readResult(out)).sizes;
    const others = s.pinned.guests;
    expect(s.pinned.host).toBe('0');
    // Every project process (a shell and its sleep each) inherited its agent's CPUs, after the
    // start and after the restore that restarted the stopped ones.
    for (const when of ['afterStart', 'afterRuns'])
      expect(s.cpusAllowed[when]).toEqual({
        host: '0',
        guests: { [others]: 1 },
        projects: { [others]: 6 },
      });
    expect(s.runs).toBe(1);
    expect(leftovers(root)).toEqual([]);
  },
  60_000,
);

test('footprint: 3 s idle with 2 guests, then 20 notices: CPU and RSS read from /proc', async () => {
  const root = `nestbroker-test-${process.pid}-bench-footprint`;
  const out = path.join(dir, 'footprint.json');
  const r = await run('footprint', [
    '--seconds',
    '3',
    '--guests',
    '2',
    '--projects',
    '5',
    '--notices',
    '20',
    '--notice-seconds',
    '20',
    '--root',
    root,
    '--out',
    out,
  ]);
  expect({ code: r.code, out: r.code === 0 ? '' : r.out }).toEqual({ code: 0, out: '' });
  const doc = await readResult(out);
  for (const who of ['host', 'guest'])
    expect(doc.idle[who]).toMatchObject({
      cpuPercent: expect.any(Number),
      rssBytes: { max: expect.any(Number) },
    });
  expect(doc.idle.guest.rssBytes.max).toBeGreaterThan(10 * 2 ** 20); // a node process
  expect(doc.idle.host.samples).toHaveLength(3);
  // A bare node idled beside them in the same window: the guest's RSS goal is relative to it.
  expect(doc.idle.bareNode.rssBytes.max).toBeGreaterThan(10 * 2 ** 20);
  expect(doc.idle.bareNodeAgentFlags.rssBytes.max).toBeGreaterThan(10 * 2 ** 20);
  expect(doc.notices.hostNotices).toBeGreaterThanOrEqual(20);
  expect(doc.notices.host.rssAfter).toBeGreaterThan(0);
  expect(doc.goals).toHaveLength(4);
  expect(leftovers(root)).toEqual([]);
}, 60_000);

test('graceful-vs-oom: one run each: the kernel OOM-kills when nothing acts, nestbroker stops the lowest priority gracefully', async () => {
  const root = `nestbroker-test-${process.pid}-bench-oom`;
  const out = path.join(dir, 'graceful-vs-oom.json');
  const r = await run('graceful-vs-oom', ['--runs', '1', '--root', root, '--out', out]);
  expect({ code: r.code, out: r.code === 0 ? '' : r.out }).toEqual({ code: 0, out: '' });
  const doc = await readResult(out);
  const nothing = doc.results.find((x: { variant: string }) => x.variant === 'nothing');
  const nb = doc.results.find((x: { variant: string }) => x.variant === 'nestbroker');
  // Nothing acting: the kernel's OOM killer ended someone with SIGKILL; its work is lost.
  expect(nothing.oomKills).toBeGreaterThanOrEqual(1);
  expect(nothing.killedBySigkill).toBeGreaterThanOrEqual(1);
  expect(nothing.workLost).toBeGreaterThanOrEqual(1);
  // nestbroker: batch (priority 10) stopped by its SIGTERM handler, marker written, no OOM.
  expect(nb).toMatchObject({
    oomKills: 0,
    ended: [{ name: 'batch', how: 'graceful', marker: true }],
    workLost: 0,
    lowestPriorityWasTheOneStopped: true,
  });
  expect(nb.msUntilFree).toBeGreaterThan(0);
  expect(leftovers(root)).toEqual([]);
}, 60_000);
