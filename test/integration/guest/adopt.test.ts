/**
 * Adopted projects: a pid the agent did not start is moved into `projects/<name>`; an
 * existing cgroup (`adopt.cgroup`) is taken over where it is, with the project's limits
 * written to it. Both are stopped like any other project, and nothing is started again.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import { spawnInto } from '../../../cgroup-adapter';
import type { TestAdapter } from '../../helpers/cgroup-root';
import { openTestAdapter as openRoot } from '../../helpers/cgroup-root';
import type { Outcome } from '../../../agent/broker/types';
import {
  ensureBuilt,
  gone,
  makeEnv,
  nestctl,
  startAgent,
  waitReady,
  type AgentProc,
  type Env,
} from './harness';

jest.setTimeout(40_000);

const MiB = 1024 ** 2;
let t: TestAdapter;
let env: Env;
let agent: AgentProc;
let loose: ChildProcess;
let legacy: ChildProcess;

beforeAll(async () => {
  ensureBuilt();
  t = await openRoot('guest-adopt');
  env = await makeEnv();
  // A process the agent did not start, and a group someone else made with a process in it.
  loose = spawn('/bin/sleep', ['1000'], { stdio: 'ignore' });
  await t.adapter.create('guest/legacy/metrics');
  legacy = await spawnInto(t.adapter, 'guest/legacy/metrics', '/bin/sleep', ['1000'], {
    stdio: 'ignore',
  });
  const common = {
    cpu: { min: 0.1, max: 0.5 },
    stop: { signal: 'SIGTERM', gracePeriod: '2s' },
  };
  await fsp.writeFile(
    env.configFile,
    JSON.stringify({
      guest: 'vm-test',
      stateDir: env.stateDir,
      runDir: env.runDir,
      socket: env.socket,
      projectSocket: env.projectSocket,
      cgroup: { root: `${t.rootName}/guest` },
      resources: { cpus: 2, memory: '2GiB' },
      reserve: { memory: '0', cpus: 0 },
      upstream: { transport: 'none' },
      projects: [
        {
          name: 'old',
          priority: 1,
          memory: { min: '1GiB', max: '1GiB' },
          adopt: { pids: [loose.pid] },
          ...common,
        },
        {
          name: 'metrics',
          priority: 2,
          memory: { min: '1GiB', max: '1GiB' },
          adopt: { cgroup: 'legacy/metrics' },
          ...common,
        },
      ],
    }),
  );
  agent = startAgent(env);
  await waitReady(env, agent);
});

afterAll(async () => {
  await agent?.stop();
  loose?.kill('SIGKILL');
  legacy?.kill('SIGKILL');
  await t?.dispose();
  if (env) await fsp.rm(env.dir, { recursive: true, force: true });
});

test('a loose pid is moved into its project group; an existing group is taken over with its limits', async () => {
  expect(await t.adapter.pids('guest/projects/old')).toEqual([loose.pid]);
  expect(await t.adapter.pids('guest/legacy/metrics')).toEqual([legacy.pid]);
  expect(await t.adapter.exists('guest/projects/metrics')).toBe(false);
  expect((await t.adapter.readLimits('guest/legacy/metrics')).memory?.max).toBe(1024 * MiB);
  const rows = JSON.parse((await nestctl(env, ['projects', '--json'])).stdout) as {
    name: string;
    state: string;
    group: string;
  }[];
  expect(rows.map((r) => [r.name, r.state, r.group])).toEqual([
    ['old', 'running', 'projects/old'],
    ['metrics', 'running', 'legacy/metrics'],
  ]);
});

test('adopted projects stop like the others, and a restore does not start them (nothing to start)', async () => {
  const r = await nestctl(env, ['reclaim', '--memory', '1.5GiB', '--deadline', '10s', '--json']);
  expect(r.code).toBe(0);
  const o = (JSON.parse(r.stdout) as { outcome: Outcome }).outcome;
  expect(o.projects.map((p) => [p.name, p.action, p.exit])).toEqual([
    ['old', 'stopped', 'graceful'],
    ['metrics', 'stopped', 'graceful'],
  ]);
  expect(gone(loose.pid!, t.rootName)).toBe(true);
  expect(gone(legacy.pid!, t.rootName)).toBe(true);
  const back = await nestctl(env, ['restore', '--memory', '1.5GiB', '--json']);
  expect(back.code).toBe(0);
  const ob = (JSON.parse(back.stdout) as { outcome: Outcome }).outcome;
  expect(ob.projects.every((p) => p.action !== 'started')).toBe(true);
});
