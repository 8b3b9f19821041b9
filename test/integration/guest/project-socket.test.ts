/**
 * The project side of a notice: a project process connects to the agent's project socket
 * (with its token), reads its notice as a JSON line, and answers `done`, which ends its
 * grace period early (the fixture ignores SIGTERM: only `done` can end it before 20 s).
 * A project with `notify.signal` gets that signal before anything is taken.
 */
import { promises as fsp } from 'node:fs';
import { type TestAdapter } from '../../helpers/cgroup-root';
import type { Outcome } from '../../../agent/broker/types';
import { GuestUnderTest, nestctl, waitFor, type Env } from './harness';

jest.setTimeout(40_000);

let g: GuestUnderTest;
let t: TestAdapter;
let env: Env;

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-psock',
    [
      {
        name: 'web',
        priority: 100,
        mode: 'graceful',
        memory: { min: '256MiB', max: '1GiB' },
        notify: 'SIGUSR2',
      },
      {
        name: 'saver',
        priority: 1,
        mode: 'done',
        grace: '20s',
        memory: { min: '1GiB', max: '1GiB' },
        env: { DONE_AFTER_MS: '400' },
      },
    ],
    {
      ready: {
        what: 'the project to connect',
        until: (e) => e.markerLines('saver').includes('welcome'),
      },
    },
  );
  ({ t, env } = g);
});

afterAll(() => g?.dispose());

test('a project that answers done ends its 20 s grace early', async () => {
  const t0 = Date.now();
  const r = await nestctl(env, ['reclaim', '--memory', '3.5GiB', '--deadline', '30s', '--json']);
  expect(r.code).toBe(0);
  const o = (JSON.parse(r.stdout) as { outcome: Outcome }).outcome;
  const saver = o.projects.find((p) => p.name === 'saver')!;
  expect(saver.action).toBe('stopped');
  expect(saver.exit).toBe('graceful');
  expect(saver.reason).toMatch(/answered done/);
  expect(saver.ms).toBeGreaterThanOrEqual(300);
  expect(saver.ms).toBeLessThan(3000);
  expect(Date.now() - t0).toBeLessThan(6000);

  // The project read the notice (the original notice inside) and answered for that id.
  const lines = env.markerLines('saver');
  expect(lines).toContain(`notice ${o.noticeId} stopped`);
  expect(lines).toContain(`done-sent ${o.noticeId}`);
  expect(await t.adapter.pids('guest/projects/saver')).toEqual([]);
});

test('the project with notify.signal got it, and its notice file, before its limits moved', async () => {
  await waitFor('web to note the signal', () =>
    env.markerLines('web').some((l) => l.startsWith('notified ')),
  );
  expect(env.markerLines('web').filter((l) => l.startsWith('notified '))).toHaveLength(1);
  expect((await t.adapter.pids('guest/projects/web')).length).toBe(1);
  const pn = JSON.parse(await fsp.readFile(`${env.runDir}/projects/web/notice.json`, 'utf8'));
  expect(pn.action).toBe('shrunk');
  expect(pn.notice.kind).toBe('reclaim');
  expect(pn.limits.memoryMax).toBeGreaterThan(0);
});
