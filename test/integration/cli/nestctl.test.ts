/**
 * nestctl's rough edges, through the real binary (dist/agent/cli/nestctl.js) against a real
 * guest agent (test/integration/guest/harness.ts): negative sizes refused by flag name,
 * each error said once, JSON errors with --json, a closed pipe, singular "CPU", what a
 * restore's summary says, the notice list's order and times, bash completion.
 */
import { spawn } from 'node:child_process';
import { GuestUnderTest, NESTCTL, nestctl } from '../guest/harness';

jest.setTimeout(60_000);

let g: GuestUnderTest;

beforeAll(async () => {
  // web may use the whole guest (4 GiB, 2 CPUs), so a reclaim frees exactly what it takes.
  g = await GuestUnderTest.start('cli', [
    {
      name: 'web',
      priority: 100,
      mode: 'graceful',
      memory: { min: '256MiB', max: '4GiB' },
      cpu: { min: 0.1, max: 2 },
    },
  ]);
});

afterAll(() => g?.dispose());

const ctl = (args: string[]) => nestctl(g.env, args);

test('--memory -5G: a validation error naming the flag, said once, exit 2, nothing sent', async () => {
  const r = await ctl(['reclaim', '--memory', '-5G', '--cpus', '-1']);
  expect(r.code).toBe(2);
  expect(r.stdout).toBe('');
  expect(r.stderr).toBe(
    'error (INPUT_INVALID): 2 problems:\n' +
      '  --memory: must not be negative, got "-5G"\n' +
      '  --cpus: must not be negative, got "-1"\n',
  );
  const one = await ctl(['reclaim', '--memory', '5X']);
  expect(one.code).toBe(2);
  expect(one.stderr).toBe(
    'error (INPUT_INVALID): --memory: has an unknown unit "X" in "5X" (use B, KiB, MiB, GiB, TiB)\n',
  );
  const n = await ctl(['notices', '--json']);
  expect(JSON.parse(n.stdout)).toEqual([]);
});

test('with --json, argument errors are a JSON error object on stdout', async () => {
  const bad = await ctl(['reclaim', '--memory', '-5G', '--json']);
  expect(bad.code).toBe(2);
  expect(JSON.parse(bad.stdout)).toEqual({
    error: {
      code: 'INPUT_INVALID',
      message: expect.stringContaining('--memory'),
      problems: [{ field: '--memory', value: '-5G', message: 'must not be negative, got "-5G"' }],
    },
  });
  const unknown = await ctl(['frobnicate', '--json']);
  expect(unknown.code).toBe(2);
  expect(unknown.stderr).toBe('');
  expect(JSON.parse(unknown.stdout).error).toMatchObject({
    code: 'INPUT_INVALID',
    message: 'Unknown argument: frobnicate',
  });
});

test('a reader that closes the pipe early (`| head`): nestctl exits 0, no stack trace', async () => {
  const c = spawn(process.execPath, [NESTCTL, '--guest', '--socket', g.env.socket, 'projects'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  c.stdout.destroy(); // the reader is gone before nestctl writes its table
  let err = '';
  c.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const code = await new Promise<number | null>((r) => c.on('close', (n) => r(n)));
  expect({ code, err }).toEqual({ code: 0, err: '' });
});

test('reclaim says "1 CPU"; the restore says what it returned; notices newest first, times as the host prints them', async () => {
  const r = await ctl(['reclaim', '--memory', '256MiB', '--cpus', '1', '--deadline', '20s']);
  expect(r.code).toBe(0);
  expect(r.stdout).toMatch(/; freed 256MiB memory, 1 CPU$/m);
  const back = await ctl(['restore', '--memory', '256MiB', '--cpus', '0.5']);
  expect(back.code).toBe(0);
  expect(back.stdout).toMatch(/; returned 256MiB memory, 0\.5 CPUs$/m);
  expect(back.stdout).not.toMatch(/freed/);

  const list = await ctl(['notices']);
  expect(list.code).toBe(0);
  const rows = list.stdout.trim().split('\n').slice(1);
  expect(rows).toHaveLength(2);
  expect(rows[0]).toMatch(/ restore .* 256MiB, 0\.5 CPUs +\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ /);
  expect(rows[1]).toMatch(/ reclaim .* 256MiB, 1 CPU +\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ /);
});

test('`nestctl completion` prints a bash completion script that completes the commands', async () => {
  const script = await ctl(['completion']);
  expect(script.code).toBe(0);
  expect(script.stdout).toContain(
    'complete -o bashdefault -o default -F _nestctl_yargs_completions',
  );
  const words = await ctl(['--get-yargs-completions', '--guest', '']);
  expect(words.stdout.split('\n')).toEqual(
    expect.arrayContaining(['reclaim', 'restore', 'notices']),
  );
});
