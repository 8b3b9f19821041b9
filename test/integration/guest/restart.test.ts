/**
 * Exactly once across a crash: the agent is killed with SIGKILL in the middle of a notice
 * (one project already stopped, the next one in its grace period). Projects survive the
 * agent; the restarted agent re-adopts the running ones without touching them, resumes
 * the journaled notice, does not repeat the step that was done, and finishes the rest.
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import { type TestAdapter } from '../../helpers/cgroup-root';
import type { Outcome } from '../../../agent/broker/types';
import {
  GuestUnderTest,
  NESTCTL,
  nestctl,
  startAgent,
  waitFor,
  waitReady,
  type AgentProc,
  type Env,
} from './harness';

jest.setTimeout(50_000);

let g: GuestUnderTest;
let t: TestAdapter;
let env: Env;
let first: AgentProc;
let second: AgentProc | undefined;

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-restart',
    [
      { name: 'web', priority: 100, mode: 'graceful', memory: { min: '256MiB', max: '1GiB' } },
      { name: 'c', priority: 3, mode: 'graceful', memory: { min: '512MiB', max: '1GiB' } },
      {
        name: 'b',
        priority: 2,
        mode: 'stubborn',
        grace: '3s',
        memory: { min: '512MiB', max: '1GiB' },
      },
      { name: 'a', priority: 1, mode: 'graceful', memory: { min: '512MiB', max: '1GiB' } },
    ],
    {
      ready: {
        what: 'every project to run',
        until: (e) => ['web', 'a', 'b', 'c'].every((p) => e.markerLines(p).length > 0),
      },
    },
  );
  ({ t, env } = g);
  first = g.agent!;
});

afterAll(() => g?.dispose([second]));

test('kill -9 mid-notice, restart: the notice finishes and each project is stopped once', async () => {
  const webPid = Number(env.markerLines('web')[0].split(' ')[2]);

  // The operator's reclaim; its nestctl loses the agent half-way.
  const ctl = spawn(
    process.execPath,
    [
      NESTCTL,
      '--guest',
      '--socket',
      env.socket,
      'reclaim',
      '--memory',
      '3.5GiB',
      '--deadline',
      '20s',
    ],
    { stdio: 'ignore' },
  );
  const ctlExit = new Promise<number | null>((r) => ctl.on('exit', (code) => r(code)));

  // The stop signals go lowest priority first without waiting for each exit:
  // `a` and `c` exit at once on SIGTERM and their steps are journaled done, while the
  // stubborn `b` has had its SIGTERM and is in its 3 s grace period. Then the crash.
  await waitFor('b to get its SIGTERM', () =>
    env.markerLines('b').some((l) => l.startsWith('ignored ')),
  );
  await waitFor('the stops of a and c journaled as done', async () => {
    const dir = `${env.stateDir}/steps`;
    const file = (await fsp.readdir(dir)).find((f) => f.endsWith('--steps.json'));
    if (!file) return false;
    const steps = JSON.parse(await fsp.readFile(`${dir}/${file}`, 'utf8')) as Record<
      string,
      { outcome?: unknown }
    >;
    return steps.a?.outcome !== undefined && steps.c?.outcome !== undefined;
  });
  expect(env.markerLines('a').filter((l) => l.startsWith('term '))).toHaveLength(1);
  process.kill(first.pid, 'SIGKILL');
  await first.exited;
  expect(await ctlExit).toBe(1); // nestctl: the daemon went away (EXIT.ERROR)

  // The projects outlived the agent (KillMode=process): b is still there, a is gone.
  expect((await t.adapter.pids('guest/projects/b')).length).toBeGreaterThan(0);
  expect(await t.adapter.pids('guest/projects/a')).toEqual([]);
  const records = (await fsp.readdir(`${env.stateDir}/notices`)).filter((f) => f.endsWith('.json'));
  expect(records).toHaveLength(1);
  const journal = JSON.parse(
    await fsp.readFile(`${env.stateDir}/notices/${records[0]}`, 'utf8'),
  ) as { state: string };
  expect(journal.state).toBe('running');

  second = startAgent(env);
  await waitReady(env, second);
  await waitFor(
    'the resumed notice to finish',
    async () => {
      const rows = JSON.parse((await nestctl(env, ['notices', '--json'])).stdout) as {
        state: string;
      }[];
      return rows[0]?.state === 'done';
    },
    15_000,
  );
  const rows = JSON.parse((await nestctl(env, ['notices', '--json'])).stdout) as {
    state: string;
    runs: number;
    outcome: Outcome;
  }[];
  expect(rows).toHaveLength(1);
  expect(rows[0].runs).toBe(2);
  const o = rows[0].outcome;
  expect(o.projects.map((p) => [p.name, p.action, p.exit])).toEqual([
    ['a', 'stopped', 'graceful'],
    ['b', 'stopped', 'killed'],
    ['c', 'stopped', 'graceful'],
    ['web', 'shrunk', null],
  ]);

  // Each project was stopped once: one SIGTERM handler run for a and c, one start for all.
  expect(env.markerLines('a').filter((l) => l.startsWith('term '))).toHaveLength(1);
  expect(env.markerLines('c').filter((l) => l.startsWith('term '))).toHaveLength(1);
  for (const p of ['web', 'a', 'b', 'c'])
    expect(env.markerLines(p).filter((l) => l.startsWith('start '))).toHaveLength(1);
  expect(second.stdout()).toContain('step already done before a restart; not repeated');

  // The healthy project was re-adopted, not restarted: the same process, still in its group.
  expect(await t.adapter.pids('guest/projects/web')).toContain(webPid);
  for (const p of ['a', 'b', 'c']) expect(await t.adapter.pids(`guest/projects/${p}`)).toEqual([]);
});
