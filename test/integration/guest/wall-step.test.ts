/**
 * A wall-clock step does not touch a grace period or a reported duration
 * (docs/reliability.md, "Time"). The guest agent runs as a real process under libfaketime
 * (faketime(1)'s preload library) with FAKETIME_DONT_FAKE_MONOTONIC=1: its wall clock
 * (Date.now, CLOCK_REALTIME) is this machine's plus the offset in a file the test
 * rewrites, its monotonic clock is the kernel's. The machine's own clock is never touched.
 *
 * The project `batch` ignores SIGTERM and has a 2 s grace; its pre-stop hook steps the
 * agent's wall clock forward by an hour (it writes the offset file), and once batch has
 * ignored its SIGTERM the test steps it forward by two hours more, inside the grace.
 * Timed on the wall clock, the first step left a grace of 0 ms (the deadline had "passed")
 * and the second reported the stop as taking hours. On the monotonic clock: the full 2 s
 * grace, then the kill; every reported duration is seconds. The guest's own journal shows
 * that its wall clock did jump (the notice's wall timestamps are hours apart).
 */
import { spawnSync } from 'node:child_process';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import type { Outcome } from '../../../agent/broker/types';
import { GuestUnderTest, nestctl, waitFor } from './harness';

jest.setTimeout(90_000);

/** Debian's libfaketime (the `libfaketime` package; `make test` installs it). */
const LIBFAKETIME = '/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1';
const HOUR = 3_600_000;

let g: GuestUnderTest;
let offsetFile: string;

beforeAll(async () => {
  if (!existsSync(LIBFAKETIME)) {
    // As `make test-deps` does: the test needs the real library, not a stand-in.
    const r = spawnSync('apt-get', ['install', '-y', '-qq', 'libfaketime'], {
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
      stdio: 'ignore',
    });
    if (r.status !== 0 || !existsSync(LIBFAKETIME))
      throw new Error(
        `libfaketime is missing and apt-get install libfaketime failed (${r.status})`,
      );
  }
  g = await GuestUnderTest.start(
    'guest-wall-step',
    [
      { name: 'web', priority: 100, mode: 'graceful', memory: { min: '256MiB', max: '1GiB' } },
      {
        name: 'batch',
        priority: 10,
        mode: 'stubborn',
        grace: '2s',
        memory: { min: '1GiB', max: '1GiB' },
        preStop: {
          // Steps the agent's wall clock forward an hour, then takes a moment (the file's
          // path is filled in by `prepare`, once the env exists).
          command: ['/bin/sh', '-c', 'echo +1h > OFFSET_FILE; sleep 0.3'],
          timeout: '5s',
        },
      },
    ],
    {
      prepare: async (env) => {
        offsetFile = path.join(env.dir, 'faketime.rc');
        await fsp.writeFile(offsetFile, '+0\n');
        const cfg = await fsp.readFile(env.configFile, 'utf8');
        await fsp.writeFile(
          env.configFile,
          cfg.replace('OFFSET_FILE', JSON.stringify(offsetFile).slice(1, -1)),
        );
      },
      agentEnv: () => ({
        LD_PRELOAD: LIBFAKETIME,
        FAKETIME_TIMESTAMP_FILE: offsetFile,
        FAKETIME_NO_CACHE: '1',
        FAKETIME_DONT_FAKE_MONOTONIC: '1',
      }),
      ready: {
        what: 'both projects to start',
        until: (env) =>
          ['web', 'batch'].every((p) => env.markerLines(p).some((l) => l.startsWith('start '))),
      },
    },
  );
});

afterAll(() => g?.dispose());

test('a wall-clock step before and inside a grace period changes neither the grace nor the durations', async () => {
  const { env } = g;
  const pending = nestctl(env, ['reclaim', '--memory', '3GiB', '--deadline', '20s', '--json']);
  // Inside batch's grace (after the hook's step): two more hours.
  await waitFor('batch to ignore its SIGTERM', () =>
    env.markerLines('batch').some((l) => l.startsWith('ignored ')),
  );
  await fsp.writeFile(offsetFile, '+3h\n');
  const r = await pending;
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const notices = JSON.parse((await nestctl(env, ['notices', '--json'])).stdout) as {
    receivedAt: string;
    finishedAt: string;
    outcome: Outcome;
  }[];
  expect(notices).toHaveLength(1);
  const { outcome } = notices[0];
  const batch = outcome.projects.find((p) => p.name === 'batch')!;
  // The whole grace, not 0 ms: the deadline was 20 s away on the monotonic clock.
  expect(batch).toMatchObject({ action: 'stopped', exit: 'killed' });
  expect(batch.reason).toMatch(/still running after its 2000 ms grace period; killed/);
  // Seconds, not hours: hook (0.3 s) + grace (2 s) + kill.
  expect(batch.ms).toBeGreaterThanOrEqual(2_300);
  expect(batch.ms).toBeLessThan(15_000);
  expect(outcome.ms).toBeGreaterThanOrEqual(2_300);
  expect(outcome.ms).toBeLessThan(20_000);

  // The agent's wall clock did step: its notice journal's wall timestamps are hours apart
  // (display only), while what it measured above was seconds.
  const rec = notices[0];
  expect(Date.parse(rec.finishedAt) - Date.parse(rec.receivedAt)).toBeGreaterThan(2.9 * HOUR);
  expect(Date.parse(outcome.finishedAt) - Date.parse(outcome.startedAt)).toBeGreaterThan(
    2.9 * HOUR,
  );
});
