/**
 * `nestctl --guest top`: what an operator watches before taking memory from a guest. Two
 * real projects, one holding 96 MiB of touched memory; every figure top prints must be the
 * kernel's own (the memory file of the project's cgroup), refreshed, largest first.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { type TestAdapter } from '../../helpers/cgroup-root';
import { GuestUnderTest, NESTCTL, nestctl, type Env } from './harness';

jest.setTimeout(60_000);

const MiB = 1024 * 1024;
let g: GuestUnderTest;
let t: TestAdapter;
let env: Env;

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-top',
    [
      { name: 'small', priority: 100, mode: 'graceful' },
      { name: 'big', priority: 10, mode: 'graceful', env: { HOLD_MB: '96' } },
    ],
    {
      ready: {
        what: 'big to hold its memory',
        until: (e) => e.markerLines('big').some((l) => l.includes('holding')),
      },
    },
  );
  ({ t, env } = g);
});

afterAll(() => g?.dispose());

/** The memory in use of a project's cgroup, as the kernel shows it (v2 or v1 file). */
function kernelMemory(project: string): number {
  const group = `${t.rootName}/guest/projects/${project}`;
  for (const f of [`/sys/fs/cgroup/${group}/memory.current`]) {
    try {
      return Number(readFileSync(f, 'utf8'));
    } catch {
      // not v2 here
    }
  }
  return Number(readFileSync(`/sys/fs/cgroup/memory/${group}/memory.usage_in_bytes`, 'utf8'));
}

interface Row {
  name: string;
  state: string;
  memoryBytes: number;
  memoryPeakBytes: number | null;
  oomKills: number | null;
  pids: number;
  cpus: number | null;
  limits: { memoryMax: number };
}

test('--json --count 3: three refreshes, one JSON line each, figures from the kernel', async () => {
  const t0 = Date.now();
  const r = await nestctl(env, ['top', '--json', '--count', '3', '--interval', '300ms']);
  const took = Date.now() - t0;
  expect(r.code).toBe(0);
  const views = r.stdout
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { guest: string; at: string; projects: Row[] });
  expect(views).toHaveLength(3);
  // Two waits of 300 ms between three refreshes.
  expect(took).toBeGreaterThanOrEqual(600);
  const ats = views.map((v) => Date.parse(v.at));
  expect(ats[1] - ats[0]).toBeGreaterThanOrEqual(300);
  expect(ats[2] - ats[1]).toBeGreaterThanOrEqual(300);

  const last = views[2];
  expect(last.guest).toBe('vm-test');
  const big = last.projects.find((p) => p.name === 'big')!;
  const small = last.projects.find((p) => p.name === 'small')!;
  expect(big).toMatchObject({ state: 'running', oomKills: 0, pids: 1 });
  // CPUs in use: a rate over the refreshes 300 ms apart (an idle node process: near 0).
  expect(big.cpus).toBeGreaterThanOrEqual(0);
  expect(big.cpus).toBeLessThan(1);
  // The 96 MiB it holds (touched), plus node itself.
  expect(big.memoryBytes).toBeGreaterThan(96 * MiB);
  expect(big.memoryBytes).toBeGreaterThan(small.memoryBytes + 80 * MiB);
  // The kernel's file now, within what a running node process moves in a moment.
  expect(Math.abs(big.memoryBytes - kernelMemory('big'))).toBeLessThan(16 * MiB);
  expect(big.memoryPeakBytes ?? Infinity).toBeGreaterThanOrEqual(big.memoryBytes - 16 * MiB);
  expect(big.limits.memoryMax).toBe(1024 * MiB);
});

test('for people: the allocation, then one row a project, the largest memory first', async () => {
  const r = await nestctl(env, ['top', '--count', '1']);
  expect(r.code).toBe(0);
  const lines = r.stdout.split('\n');
  expect(lines[0]).toMatch(/^guest vm-test at \S+: allocation 4GiB, 2 CPUs; for projects /);
  expect(lines[2]).toMatch(/^PROJECT\s+PRIO\s+STATE\s+MEMORY\s+MAX\s+PEAK\s+MEM PSI10/);
  const rows = lines.filter((l) => /^(big|small)\s/.test(l)).map((l) => l.split(/\s+/)[0]);
  expect(rows).toEqual(['big', 'small']);
  // Piped (not a terminal): no screen-clearing escape codes.
  expect(r.stdout).not.toContain('\x1b[');
});

test('without --count it refreshes until Ctrl-C (SIGINT), then exits 0', async () => {
  const c = spawn(process.execPath, [
    NESTCTL,
    '--guest',
    '--socket',
    env.socket,
    'top',
    '--json',
    '--interval',
    '200ms',
  ]);
  let out = '';
  const lines = (): number => out.split('\n').filter(Boolean).length;
  const exited = new Promise<number | null>((r) => c.on('exit', (code) => r(code)));
  const twoRefreshes = new Promise<void>((r) =>
    c.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (lines() >= 2) r();
    }),
  );
  await twoRefreshes;
  c.kill('SIGINT');
  expect(await exited).toBe(0);
  expect(lines()).toBeGreaterThanOrEqual(2);
});

test('bad --interval and --count are refused together, each named (exit 2)', async () => {
  const r = await nestctl(env, ['top', '--interval', '10ms', '--count', '0']);
  expect(r.code).toBe(2);
  expect(r.stderr).toContain('--interval: must be at least 200ms, got "10ms"');
  expect(r.stderr).toContain('--count: must be a whole number ≥ 1, got 0');
  expect(r.stdout).toBe('');
});

test("--processes: each project's processes through pidusage, the kernel's pids, real RSS", async () => {
  const procs = (project: string): number[] =>
    readFileSync(t.driver.paths(`guest/projects/${project}`).unified + '/cgroup.procs', 'utf8')
      .split('\n')
      .filter(Boolean)
      .map(Number)
      .sort();
  const r = await nestctl(env, ['top', '--processes', '--json', '--count', '1']);
  expect(r.code).toBe(0);
  const view = JSON.parse(r.stdout.trim()) as {
    projects: {
      name: string;
      processes: { pid: number; rssBytes: number; cpuPct: number; comm: string; cmdline: string }[];
    }[];
  };
  for (const name of ['big', 'small']) {
    const p = view.projects.find((x) => x.name === name)!;
    expect(p.processes.map((x) => x.pid).sort()).toEqual(procs(name));
    for (const x of p.processes) {
      expect(x.comm).toBe('node');
      expect(x.cmdline).toContain('project.js');
      expect(x.cpuPct).toBeGreaterThanOrEqual(0);
    }
  }
  // big holds 96 MiB of touched memory: its process's RSS says so; small's is a bare node.
  const big = view.projects.find((x) => x.name === 'big')!.processes[0];
  const small = view.projects.find((x) => x.name === 'small')!.processes[0];
  expect(big.rssBytes).toBeGreaterThan(96 * MiB);
  expect(small.rssBytes).toBeGreaterThan(10 * MiB);
  expect(small.rssBytes).toBeLessThan(big.rssBytes);

  const human = await nestctl(env, ['top', '--processes', '--count', '1']);
  expect(human.stdout).toMatch(new RegExp(`^big\\s+${big.pid}\\s+\\d+\\.\\d%\\s+\\d`, 'm'));
});
