/**
 * A local reclaim on the real kernel, with the guest agent as a real process and real
 * fixture projects: the right projects stop, lowest priority first; graceful ones end
 * `graceful` with their SIGTERM marker written; the stubborn one is killed at its grace;
 * the one whose grace is longer than the deadline is killed at the deadline; a hanging
 * pre-stop hook is cut at its timeout; nothing outlives the kill; the kernel's limit files
 * match the plan; a restore starts the stopped projects again.
 */
import { promises as fsp } from 'node:fs';
import { type TestAdapter } from '../../helpers/cgroup-root';
import type { Outcome, ProjectOutcome } from '../../../agent/broker/types';
import { gone, GuestUnderTest, nestctl, waitFor, type Env } from './harness';

jest.setTimeout(50_000);

const MiB = 1024 ** 2;
let g: GuestUnderTest;
let t: TestAdapter;
let env: Env;

beforeAll(async () => {
  g = await GuestUnderTest.start('guest-reclaim', [
    { name: 'web', priority: 100, mode: 'graceful', memory: { min: '256MiB', max: '1GiB' } },
    {
      name: 'slow',
      priority: 8,
      mode: 'stubborn',
      grace: '30s',
      memory: { min: '512MiB', max: '1GiB' },
    },
    { name: 'batch', priority: 7, mode: 'graceful', memory: { min: '512MiB', max: '1GiB' } },
    {
      name: 'stubborn',
      priority: 5,
      mode: 'stubborn',
      grace: '1s',
      memory: { min: '512MiB', max: '1GiB' },
    },
    {
      name: 'hook',
      priority: 3,
      mode: 'graceful',
      memory: { min: '512MiB', max: '1GiB' },
      // openTestAdapter's root name (test/helpers/cgroup-root.ts) for the tag below.
      env: { GROUP: `nestbroker-test-${process.pid}-guest-reclaim/guest/projects/hook` },
      preStop: {
        command: [
          '/bin/sh',
          '-c',
          // In its cgroup namespace it sees itself at "0::/"; that it is in the project's
          // group is read from the group's cgroup.procs (v2 or hybrid mount point).
          'echo "hook $(grep ^0:: /proc/self/cgroup) $(cat /sys/fs/cgroup/unified/$GROUP/cgroup.procs /sys/fs/cgroup/$GROUP/cgroup.procs 2>/dev/null | grep -cx $$)" >> "$MARKER"; exec sleep 1000',
        ],
        timeout: '500ms',
      },
    },
    {
      name: 'forker',
      priority: 1,
      mode: 'forker',
      grace: '1s',
      memory: { min: '512MiB', max: '1GiB' },
    },
  ]);
  ({ t, env } = g);
});

afterAll(() => g?.dispose());

const group = (p: string): string => `guest/projects/${p}`;

test('every project runs inside its own cgroup under the agent root', async () => {
  const r = await nestctl(env, ['projects', '--json']);
  expect(r.code).toBe(0);
  const rows = JSON.parse(r.stdout) as { name: string; state: string; pids: number }[];
  expect(rows.map((x) => [x.name, x.state])).toEqual([
    ['web', 'running'],
    ['slow', 'running'],
    ['batch', 'running'],
    ['stubborn', 'running'],
    ['hook', 'running'],
    ['forker', 'running'],
  ]);
  // The forker's two children (and their `sleep`s) were forked inside the group too.
  await waitFor('the forker to fork', () => env.markerLines('forker').length === 3);
  const pids = await t.adapter.pids(group('forker'));
  expect(pids.length).toBeGreaterThanOrEqual(3);
  for (const l of env.markerLines('forker').filter((x) => x.startsWith('child ')))
    expect(pids).toContain(Number(l.split(' ')[1]));
});

test('plan is a dry run: decisions with reasons, and the kernel files do not move', async () => {
  const before = await t.adapter.readLimits(group('web'));
  const r = await nestctl(env, ['plan', '--memory', '3.5GiB', '--cpus', '0.5', '--json']);
  expect(r.code).toBe(0);
  const { plan } = JSON.parse(r.stdout) as {
    plan: { decisions: { project: string; action: string; reason: string }[] };
  };
  expect(plan.decisions.map((d) => [d.project, d.action])).toEqual([
    ['forker', 'stopped'],
    ['hook', 'stopped'],
    ['stubborn', 'stopped'],
    ['batch', 'stopped'],
    ['slow', 'stopped'],
    ['web', 'shrunk'],
  ]);
  for (const d of plan.decisions) expect(d.reason.length).toBeGreaterThan(10);
  expect(await t.adapter.readLimits(group('web'))).toEqual(before);
  const human = await nestctl(env, ['plan', '--memory', '3.5GiB', '--cpus', '0.5']);
  expect(human.stdout).toMatch(/ORDER\s+PROJECT\s+ACTION/);
  expect(human.stdout).toContain('dry run: nothing was changed');
});

describe('reclaim 3.5GiB and 0.5 CPU with a 6 s deadline', () => {
  let r: { code: number | null; stdout: string; stderr: string };
  let outcome: Outcome;
  let started: number;
  let forkerChildren: number[];
  const of = (name: string): ProjectOutcome => outcome.projects.find((p) => p.name === name)!;

  beforeAll(async () => {
    forkerChildren = env
      .markerLines('forker')
      .filter((l) => l.startsWith('child '))
      .map((l) => Number(l.split(' ')[1]));
    started = Date.now();
    r = await nestctl(env, [
      'reclaim',
      '--memory',
      '3.5GiB',
      '--cpus',
      '0.5',
      '--deadline',
      '6s',
      '--reason',
      'maintenance',
    ]);
    const notices = JSON.parse((await nestctl(env, ['notices', '--json'])).stdout) as {
      outcome: Outcome;
    }[];
    outcome = notices[0].outcome;
  });

  test('nestctl shows progress, then the outcome table, and exits 0 for a complete outcome', () => {
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/PROJECT\s+ACTION\s+EXIT/);
    expect(r.stdout).toMatch(/complete in/);
    expect(r.stderr).toMatch(/forker: stopping/);
    expect(outcome.status).toBe('complete');
  });

  test('stop signals go lowest priority first; the exits are awaited together', () => {
    const events = r.stderr
      .split('\n')
      .map((l) => /\s(\w+): (stopping|stopped)/.exec(l))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => `${m[2]} ${m[1]}`);
    // `stopping` is each project's turn to be signalled (after its pre-stop hook), in rank order.
    expect(events.filter((e) => e.startsWith('stopping '))).toEqual([
      'stopping forker',
      'stopping hook',
      'stopping stubborn',
      'stopping batch',
      'stopping slow',
    ]);
    for (const p of ['forker', 'hook', 'stubborn', 'batch', 'slow'])
      expect(events.indexOf(`stopping ${p}`)).toBeLessThan(events.indexOf(`stopped ${p}`));
    // Not one at a time: the stubborn project's 1 s grace had not run out when `batch`
    // (which exits at once on SIGTERM) was signalled.
    expect(events.indexOf('stopping batch')).toBeLessThan(events.indexOf('stopped stubborn'));
  });

  test('every affected project got its notice before anything was taken', async () => {
    const lines = r.stderr.split('\n');
    const firstTake = lines.findIndex((l) => /stopping|shrunk/.test(l));
    for (const p of ['forker', 'hook', 'stubborn', 'batch', 'slow', 'web']) {
      const i = lines.findIndex((l) => l.includes(`${p}: notice delivered`));
      expect(i).toBeGreaterThanOrEqual(0);
      expect(i).toBeLessThan(firstTake);
      const pn = JSON.parse(await fsp.readFile(`${env.runDir}/projects/${p}/notice.json`, 'utf8'));
      expect(pn.notice.id).toBe(outcome.noticeId);
      expect(pn.project).toBe(p);
    }
  });

  test('graceful projects end graceful, with the marker their SIGTERM handler wrote', () => {
    expect(of('batch').exit).toBe('graceful');
    expect(env.markerLines('batch').filter((l) => l.startsWith('term '))).toHaveLength(1);
  });

  test('the stubborn project is killed when its 1 s grace runs out', () => {
    expect(of('stubborn').exit).toBe('killed');
    expect(of('stubborn').ms).toBeGreaterThanOrEqual(1000);
    expect(of('stubborn').ms).toBeLessThan(1800);
    expect(env.markerLines('stubborn').filter((l) => l.startsWith('ignored '))).toHaveLength(1);
  });

  test('the notice deadline caps a 30 s grace', () => {
    expect(of('slow').exit).toBe('killed');
    expect(of('slow').reason).toMatch(/deadline capped its grace/);
    const finished = Date.parse(outcome.finishedAt);
    expect(finished).toBeLessThan(started + 6000 + 1000);
    expect(Date.now() - started).toBeLessThan(10_000);
  });

  test('a hanging pre-stop hook runs inside the project cgroup and is cut at its timeout', () => {
    const hookLine = env.markerLines('hook').find((l) => l.startsWith('hook '));
    // At the root of its own cgroup namespace, and listed in the project's group.
    expect(t.rootName).toBe(`nestbroker-test-${process.pid}-guest-reclaim`);
    expect(hookLine).toBe('hook 0::/ 1');
    expect(of('hook').exit).toBe('graceful');
    expect(env.markerLines('hook').filter((l) => l.startsWith('term '))).toHaveLength(1);
    // ~500 ms of hook, then the graceful exit on SIGTERM.
    expect(of('hook').ms).toBeGreaterThanOrEqual(500);
    expect(of('hook').ms).toBeLessThan(1500);
  });

  test('nothing outlives the kill: groups empty, forked children gone', async () => {
    expect(of('forker').exit).toBe('killed');
    expect(forkerChildren).toHaveLength(2);
    for (const p of ['forker', 'hook', 'stubborn', 'batch', 'slow']) {
      expect(await t.adapter.pids(group(p))).toEqual([]);
      expect((await t.adapter.events(group(p))).populated).toBe(false);
    }
    for (const pid of forkerChildren) expect(gone(pid, t.rootName)).toBe(true);
  });

  test("the kernel's limit files match the plan", async () => {
    const web = of('web');
    expect(web.action).toBe('shrunk');
    const k = await t.adapter.readLimits(group('web'));
    expect(k.memory?.max).toBe(web.after.memoryMax);
    expect(web.after.memoryMax).toBe(512 * MiB);
    expect(k.cpu?.max?.quotaUs).toBe(Math.round((web.after.cpuMax as number) * 100_000));
    expect(k.cpu?.max?.periodUs).toBe(100_000);
    expect(outcome.freed.memoryBytes).toBeGreaterThan(0);
  });

  test('a restore starts the projects stopped for room again, and raises limits', async () => {
    const res = await nestctl(env, ['restore', '--memory', '3.5GiB', '--cpus', '0.5', '--json']);
    expect(res.code).toBe(0);
    const o = (JSON.parse(res.stdout) as { outcome: Outcome }).outcome;
    const started = o.projects.filter((p) => p.action === 'started').map((p) => p.name);
    expect(started.length).toBeGreaterThan(0);
    for (const p of started) {
      expect((await t.adapter.pids(group(p))).length).toBeGreaterThan(0);
      // Its second life: the fixture writes `start` once it runs.
      await waitFor(
        `${p} to start again`,
        () => env.markerLines(p).filter((l) => l.startsWith('start ')).length === 2,
      );
    }
  });
});
