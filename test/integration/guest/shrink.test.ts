/**
 * Shrinking memory without an OOM kill: memory.max is never written below what a project
 * uses. The executor lowers memory.high first and waits (within the project's grace) for
 * usage to come down; a project that stays above its new target is stopped gracefully
 * instead. On this hybrid machine memory.high is the v1 soft limit, which does not
 * throttle, so the project holding 96 MiB stays above a 16 MiB target and is stopped;
 * the lean one is shrunk and its memory.max is the plan's.
 */
import { type TestAdapter } from '../../helpers/cgroup-root';
import type { Outcome, ProjectOutcome } from '../../../agent/broker/types';
import { GuestUnderTest, nestctl, type Env } from './harness';

jest.setTimeout(40_000);

const MiB = 1024 ** 2;
let g: GuestUnderTest;
let t: TestAdapter;
let env: Env;

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-shrink',
    [
      { name: 'lean', priority: 20, mode: 'graceful', memory: { min: '64MiB', max: '1GiB' } },
      {
        name: 'hog',
        priority: 10,
        mode: 'graceful',
        grace: '1s',
        memory: { min: '16MiB', max: '1GiB' },
        env: { HOLD_MB: '96' },
      },
    ],
    {
      extra: { resources: { cpus: 2, memory: '1GiB' } },
      ready: {
        what: 'the hog to hold its memory',
        until: (e) => e.markerLines('hog').some((l) => l.includes('holding')),
      },
    },
  );
  ({ t, env } = g);
});

afterAll(() => g?.dispose());

test('a project above its new target is stopped after its grace; memory.max never goes below usage', async () => {
  const hogUsage = (await t.adapter.usage('guest/projects/hog')).memoryCurrent;
  expect(hogUsage).toBeGreaterThan(96 * MiB);

  const plan = JSON.parse(
    (await nestctl(env, ['plan', '--memory', `${1024 - 200}MiB`, '--json'])).stdout,
  ) as {
    plan: { decisions: { project: string; memoryTarget: number; mustComeDownFrom?: number }[] };
  };
  const hogPlan = plan.plan.decisions.find((d) => d.project === 'hog')!;
  expect(hogPlan.mustComeDownFrom).toBeGreaterThan(hogPlan.memoryTarget);

  const r = await nestctl(env, [
    'reclaim',
    '--memory',
    `${1024 - 200}MiB`,
    '--deadline',
    '10s',
    '--json',
  ]);
  expect(r.code).toBe(0);
  const o = (JSON.parse(r.stdout) as { outcome: Outcome }).outcome;
  const of = (n: string): ProjectOutcome => o.projects.find((p) => p.name === n)!;

  expect(of('hog')).toMatchObject({ action: 'stopped', exit: 'graceful' });
  expect(of('hog').reason).toMatch(/memory stayed at .* above .* until its grace ran out/);
  expect(of('hog').ms).toBeGreaterThanOrEqual(1000);
  expect(env.markerLines('hog').filter((l) => l.startsWith('term '))).toHaveLength(1);
  // Its memory.max was never lowered (only memory.high, the v1 soft limit here).
  const hogLimits = await t.adapter.readLimits('guest/projects/hog');
  expect(hogLimits.memory?.max).toBe(1024 * MiB);

  expect(of('lean').action).toBe('shrunk');
  const lean = await t.adapter.readLimits('guest/projects/lean');
  expect(lean.memory?.max).toBe(of('lean').after.memoryMax);
  expect(of('lean').after.memoryMax).toBeLessThan(1024 * MiB);
});
