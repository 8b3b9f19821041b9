/**
 * Limits after an agent restart: while no agent runs, the projects can lose their limits
 * (on a v2 guest, systemd's ExecStopPost nestbroker-guest-release turns the controllers off
 * down the unit's tree, and turned on again they start at "max"; docs/install.md). The
 * restarted agent re-adopts the running project without restarting or signalling it and
 * writes its RECORDED limits (those of the last notice, not the config's) to the kernel
 * again.
 *
 * Here the release script is played by the test: with the agent stopped, it writes "max"
 * to the project's limits through the adapter, and checks the kernel files show unlimited.
 */
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { type TestAdapter } from '../../helpers/cgroup-root';
import type { Outcome, ProjectLimits } from '../../../agent/broker/types';
import {
  GuestUnderTest,
  nestctl,
  startAgent,
  waitReady,
  type AgentProc,
  type Env,
} from './harness';

jest.setTimeout(40_000);

const MiB = 1024 ** 2;
const GROUP = 'guest/projects/web';
let g: GuestUnderTest;
let t: TestAdapter;
let env: Env;
let first: AgentProc | undefined;
let second: AgentProc | undefined;

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-readopt-limits',
    [
      {
        name: 'web',
        priority: 100,
        mode: 'graceful',
        memory: { min: '256MiB', max: '1GiB' },
        cpu: { min: 0.2, max: 1 },
      },
    ],
    { ready: { what: 'web to run', until: (e) => e.markerLines('web').length > 0 } },
  );
  ({ t, env } = g);
  first = g.agent;
});

afterAll(() => g?.dispose([second]));

/** The project's limit files as this (hybrid) kernel shows them: v1 memory and cpu. */
function kernelLimits(): { memoryMax: string; memoryHigh: string; cpuQuotaUs: string } {
  const dirs = t.driver.paths(GROUP);
  const read = (h: string, f: string) => readFileSync(path.join(dirs[h], f), 'utf8').trim();
  return {
    memoryMax: read('memory', 'memory.limit_in_bytes'),
    memoryHigh: read('memory', 'memory.soft_limit_in_bytes'),
    cpuQuotaUs: read('cpu', 'cpu.cfs_quota_us'),
  };
}

const expected = (l: ProjectLimits) => ({
  memoryMax: String(l.memoryMax),
  memoryHigh: String(l.memoryHigh),
  cpuQuotaUs: String(Math.round((l.cpuMax as number) * 100_000)),
});

test('after a restart, a re-adopted project gets its recorded limits back, and is not restarted', async () => {
  const webPid = Number(env.markerLines('web')[0].split(' ')[2]);

  // A reclaim shrinks web: its recorded limits are now the notice's, below the config's.
  const r = await nestctl(env, [
    'reclaim',
    '--memory',
    '3.5GiB',
    '--cpus',
    '1.5',
    '--deadline',
    '10s',
    '--json',
  ]);
  expect(r.code).toBe(0);
  const o = (JSON.parse(r.stdout) as { outcome: Outcome }).outcome;
  const web = o.projects.find((p) => p.name === 'web')!;
  expect(web.action).toBe('shrunk');
  const recorded = web.after;
  expect(recorded.memoryMax).toBeLessThan(1024 * MiB);
  expect(recorded.cpuMax).toBeLessThan(1);
  expect(kernelLimits()).toEqual(expected(recorded));

  // The agent stops (projects keep running); the release script leaves them unlimited.
  await first!.stop();
  await t.adapter.setLimits(GROUP, {
    memory: { high: 'max', max: 'max' },
    cpu: { max: { quotaUs: 'max', periodUs: 100_000 } },
  });
  const unlimited = kernelLimits();
  expect(BigInt(unlimited.memoryMax)).toBeGreaterThan(BigInt(2) ** BigInt(62)); // v1's "max"
  expect(BigInt(unlimited.memoryHigh)).toBeGreaterThan(BigInt(2) ** BigInt(62));
  expect(unlimited.cpuQuotaUs).toBe('-1');
  expect(await t.adapter.pids(GROUP)).toEqual([webPid]);

  second = startAgent(env);
  await waitReady(env, second);

  // The recorded limits are in the kernel again…
  expect(kernelLimits()).toEqual(expected(recorded));
  expect(second.stdout()).toContain('re-adopted a running project; its recorded limits re-applied');
  // …and the project is the same process: not restarted, not signalled.
  expect(await t.adapter.pids(GROUP)).toEqual([webPid]);
  expect(env.markerLines('web')).toEqual([`start graceful ${webPid}`]);
  // The agent reports them as the project's limits too (the `before` of the next notice).
  const rows = JSON.parse((await nestctl(env, ['projects', '--json'])).stdout) as {
    name: string;
    limits: ProjectLimits;
  }[];
  expect(rows.find((p) => p.name === 'web')?.limits).toMatchObject({
    memoryMax: recorded.memoryMax,
    memoryHigh: recorded.memoryHigh,
    cpuMax: recorded.cpuMax,
  });
});
