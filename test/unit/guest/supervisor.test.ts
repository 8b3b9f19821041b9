/**
 * The restart policy as a table (agent/guest/supervisor.ts, systemd.service(5) Restart=):
 * which ends count as failures, and what each policy does with the starts in the window
 * and the restarts in a row. Time is a plain number (the supervisor's monotonic clock).
 */
import { decideRestart, isFailure } from '../../../agent/guest/supervisor';
import type { RestartConfig } from '../../../agent/guest/config';

const policy = (p: RestartConfig['policy'], more: Partial<RestartConfig> = {}): RestartConfig => ({
  policy: p,
  delayMs: 100,
  maxDelayMs: 1000,
  burst: 3,
  intervalMs: 10_000,
  ...more,
});

test.each<[string, { code: number | null; signal: string | null } | null, boolean]>([
  ['exit 0', { code: 0, signal: null }, false],
  ['exit 3', { code: 3, signal: null }, true],
  ['SIGTERM (clean)', { code: null, signal: 'SIGTERM' }, false],
  ['SIGHUP (clean)', { code: null, signal: 'SIGHUP' }, false],
  ['SIGINT (clean)', { code: null, signal: 'SIGINT' }, false],
  ['SIGPIPE (clean)', { code: null, signal: 'SIGPIPE' }, false],
  ['SIGKILL', { code: null, signal: 'SIGKILL' }, true],
  ['SIGSEGV', { code: null, signal: 'SIGSEGV' }, true],
  ['not seen (a re-adopted project)', null, true],
])('%s is a failure: %s', (_what, status, failure) => {
  expect(isFailure(status)).toBe(failure);
});

test.each<[string, RestartConfig, boolean, number[], number, number, unknown]>([
  ['no: stays down after a failure', policy('no'), true, [0], 500, 0, { action: 'stays-down' }],
  [
    'on-failure, clean end: stays down',
    policy('on-failure'),
    false,
    [0],
    500,
    0,
    { action: 'stays-down' },
  ],
  [
    'on-failure, failure: restart after delay',
    policy('on-failure'),
    true,
    [0],
    500,
    0,
    { action: 'restart', delayMs: 100 },
  ],
  [
    'always, clean end: restart',
    policy('always'),
    false,
    [0],
    500,
    0,
    { action: 'restart', delayMs: 100 },
  ],
  [
    'the second in a row waits twice as long',
    policy('always'),
    true,
    [0, 600],
    900,
    1,
    { action: 'restart', delayMs: 200 },
  ],
  [
    'the wait never passes maxDelay',
    policy('always'),
    true,
    [0],
    500,
    10,
    { action: 'restart', delayMs: 1000 },
  ],
  [
    'burst starts within the interval: gave up',
    policy('always'),
    true,
    [0, 300, 700],
    900,
    2,
    { action: 'gave-up' },
  ],
  [
    'starts older than the interval do not count',
    policy('always'),
    true,
    [0, 300, 700],
    10_500,
    2,
    { action: 'restart', delayMs: 400 },
  ],
])('%s', (_what, r, failure, starts, now, streak, expected) => {
  expect(decideRestart(r, failure, starts, now, streak)).toEqual(expected);
});
