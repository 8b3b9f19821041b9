/**
 * Projects are supervised (docs/guest-agent.md, "Supervision: restart and operator stop"),
 * with the guest agent as a real process and real fixture projects:
 *
 *   - `flaky` exits 3 by itself each time: `restart: on-failure` starts it again, the
 *     waits doubling, until the start limit (3 in a minute) gives up: `failed`;
 *   - `oneshot` exits 0: `on-failure` leaves it down; `web` (no policy) killed with
 *     SIGKILL from outside stays down; each end is a warning line and a metric;
 *   - `nestctl --guest stop web2` stops it gracefully and it stays stopped across an agent
 *     restart and a restore; `start` brings it (and the given-up `flaky`) back.
 */
import * as http from 'node:http';
import type { GuestUnderTest as G } from './harness';
import { GuestUnderTest, nestctl, waitFor } from './harness';

jest.setTimeout(90_000);

let g: G;

const starts = (name: string): string[] =>
  g.env.markerLines(name).filter((l) => l.startsWith('start '));

interface Row {
  name: string;
  state: string;
  stoppedByOperator: boolean;
  pids: number;
}
async function rows(): Promise<Record<string, Row>> {
  const r = await nestctl(g.env, ['projects', '--json']);
  expect(r.code).toBe(0);
  return Object.fromEntries((JSON.parse(r.stdout) as Row[]).map((x) => [x.name, x]));
}

interface LogLine {
  level: number;
  msg: string;
  project?: string;
  action?: string;
  code?: number | null;
  signal?: string | null;
  delayMs?: number;
}
function logLines(match: string): LogLine[] {
  return g
    .agent!.stdout()
    .split('\n')
    .filter((l) => l.includes(match))
    .map((l) => JSON.parse(l) as LogLine);
}

function scrape(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: '/metrics' }, (res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => resolve(body));
      })
      .on('error', reject);
  });
}

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-supervise',
    [
      { name: 'web', priority: 100, mode: 'graceful', memory: { min: '128MiB', max: '512MiB' } },
      { name: 'web2', priority: 90, mode: 'graceful', memory: { min: '128MiB', max: '512MiB' } },
      {
        name: 'flaky',
        priority: 50,
        mode: 'exit',
        memory: { min: '64MiB', max: '256MiB' },
        env: { EXIT_CODE: '3', EXIT_AFTER_MS: '100' },
        restart: { policy: 'on-failure', delay: '200ms', maxDelay: '1s', burst: 3, interval: '1m' },
      },
      {
        name: 'oneshot',
        priority: 40,
        mode: 'exit',
        memory: { min: '64MiB', max: '256MiB' },
        env: { EXIT_CODE: '0', EXIT_AFTER_MS: '100' },
        restart: 'on-failure',
      },
      // Stopped for room by the reclaim below, and started again by the restore.
      { name: 'batch', priority: 1, mode: 'graceful', memory: { min: '1GiB', max: '2GiB' } },
    ],
    { extra: { metrics: { host: '127.0.0.1', port: 0 } } },
  );
});

afterAll(() => g?.dispose());

describe('a project that ends on its own', () => {
  test('on-failure: started again, the waits doubling, until the start limit gives up', async () => {
    await waitFor(
      'flaky to be given up',
      async () => (await rows()).flaky.state === 'failed',
      30_000,
    );
    // Three starts in the minute (burst 3): the first by the agent, two restarts.
    expect(starts('flaky')).toHaveLength(3);
    expect(
      g.env.markerLines('flaky').filter((l) => / 3$/.test(l) && l.startsWith('exit ')),
    ).toHaveLength(3);
    const ends = logLines('project ended on its own').filter((l) => l.project === 'flaky');
    expect(ends.map((l) => [l.level, l.action, l.code])).toEqual([
      [40, 'restart', 3],
      [40, 'restart', 3],
      [50, 'gave-up', 3],
    ]);
    expect(ends.map((l) => l.delayMs)).toEqual([200, 400, undefined]);
  });

  test('on-failure after exit 0: stays down, one warning', async () => {
    await waitFor(
      'oneshot to be seen ending',
      () => logLines('project ended on its own').some((l) => l.project === 'oneshot'),
      30_000,
    );
    const ends = logLines('project ended on its own').filter((l) => l.project === 'oneshot');
    expect(ends.map((l) => [l.level, l.action, l.code])).toEqual([[40, 'stays-down', 0]]);
    expect(starts('oneshot')).toHaveLength(1);
    expect((await rows()).oneshot.state).toBe('stopped');
  });

  test('no policy, killed from outside with SIGKILL: stays down, one warning', async () => {
    const pid = Number(starts('web')[0].split(' ')[2]);
    process.kill(pid, 'SIGKILL');
    await waitFor('web to be seen ending', () =>
      logLines('project ended on its own').some((l) => l.project === 'web'),
    );
    const ends = logLines('project ended on its own').filter((l) => l.project === 'web');
    expect(ends.map((l) => [l.level, l.action, l.signal])).toEqual([[40, 'stays-down', 'SIGKILL']]);
    expect((await rows()).web.state).toBe('stopped');
    expect(starts('web')).toHaveLength(1);
  });

  test('each end is counted in nestbroker_guest_project_exits_total, each restart too', async () => {
    const status = JSON.parse((await nestctl(g.env, ['status', '--json'])).stdout) as {
      metrics: { port: number };
    };
    const text = await scrape(status.metrics.port);
    const value = (re: RegExp): number => Number(re.exec(text)?.[1] ?? NaN);
    expect(
      value(
        /nestbroker_guest_project_exits_total\{project="flaky",failure="true",action="restart"[^}]*\} (\d+)/,
      ),
    ).toBe(2);
    expect(
      value(
        /nestbroker_guest_project_exits_total\{project="flaky",failure="true",action="gave-up"[^}]*\} (\d+)/,
      ),
    ).toBe(1);
    expect(
      value(
        /nestbroker_guest_project_exits_total\{project="oneshot",failure="false",action="stays-down"[^}]*\} (\d+)/,
      ),
    ).toBe(1);
    expect(
      value(
        /nestbroker_guest_project_exits_total\{project="web",failure="true",action="stays-down"[^}]*\} (\d+)/,
      ),
    ).toBe(1);
    expect(value(/nestbroker_guest_project_restarts_total\{project="flaky"[^}]*\} (\d+)/)).toBe(2);
  });
});

describe('nestctl --guest stop / start', () => {
  test('stop: graceful, recorded, and no end-on-its-own is reported for it', async () => {
    const r = await nestctl(g.env, ['stop', 'web2', '--json']);
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as { exit: string };
    expect(out.exit).toBe('graceful');
    expect(g.env.markerLines('web2').filter((l) => l.startsWith('term '))).toHaveLength(1);
    const row = (await rows()).web2;
    expect([row.state, row.stoppedByOperator, row.pids]).toEqual(['stopped', true, 0]);
    // Two supervision rounds later still nothing: it leaves an operator's stop alone.
    const ticksNow = logLines('supervision: every project looked at').length;
    await waitFor(
      'two more supervision rounds',
      () => logLines('supervision: every project looked at').length >= ticksNow + 2,
    );
    expect(logLines('project ended on its own').filter((l) => l.project === 'web2')).toEqual([]);
  });

  test('a stopped-by-operator project stays stopped across an agent restart', async () => {
    await g.restart();
    expect(starts('web2')).toHaveLength(1);
    expect(
      logLines('stays stopped until nestctl --guest start').map((l) => l.project ?? ''),
    ).toEqual(expect.arrayContaining(['web2']));
    const row = (await rows()).web2;
    expect([row.state, row.stoppedByOperator]).toEqual(['stopped', true]);
  });

  test('a reclaim and a restore leave it stopped (the restore starts only batch)', async () => {
    const before = starts('batch').length;
    const rec = await nestctl(g.env, ['reclaim', '--memory', '3GiB', '--deadline', '20s']);
    expect(rec.code).toBe(0);
    expect((await rows()).batch.state).toBe('stopped');
    const res = await nestctl(g.env, ['restore', '--memory', '3GiB', '--deadline', '20s']);
    expect(res.code).toBe(0);
    await waitFor('batch to start again', () => starts('batch').length === before + 1);
    expect(starts('web2')).toHaveLength(1);
    expect((await rows()).web2.state).toBe('stopped');
  });

  test('start brings it back, and resets a given-up restart', async () => {
    const r = await nestctl(g.env, ['start', 'web2']);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('project web2: started');
    await waitFor('web2 to start', () => starts('web2').length === 2);
    const row = (await rows()).web2;
    expect([row.state, row.stoppedByOperator]).toEqual(['running', false]);
    // flaky was failed before the agent restart; the new agent started it again (a start is
    // a boot) and its policy gave up again; an operator's start gives it a fresh limit.
    await waitFor(
      'flaky to fail again',
      async () => (await rows()).flaky.state === 'failed',
      30_000,
    );
    const n = starts('flaky').length;
    expect((await nestctl(g.env, ['start', 'flaky'])).code).toBe(0);
    await waitFor('flaky to start', () => starts('flaky').length > n);
  });

  test('an unknown project is exit 2; one stopped for room is refused, exit 5', async () => {
    const r = await nestctl(g.env, ['stop', 'nope']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('PROJECT_UNKNOWN');
    // batch, stopped for lack of room, waits for a restore: an operator's start is refused.
    expect((await nestctl(g.env, ['reclaim', '--memory', '3GiB', '--deadline', '20s'])).code).toBe(
      0,
    );
    const s = await nestctl(g.env, ['start', 'batch']);
    expect(s.code).toBe(5);
    expect(s.stderr).toContain('PROJECT_STATE');
    expect(s.stderr).toMatch(/stopped for lack of room/);
  });
});
