/**
 * The units' ExecStartPost=: `nestbroker wait-ready guest --config … --pid $MAINPID`. It must
 * hold `systemctl start|restart` until the agent is ready, and no longer: the CI run of
 * stop 8 read /proc/$MAINPID/cgroup right after `systemctl restart` (Type=exec returned at
 * exec) and found the agent not yet in its leaf cgroup.
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import { GuestUnderTest, NESTBROKER, nestctl, startAgent, type AgentProc } from './harness';

jest.setTimeout(60_000);

let g: GuestUnderTest;
let next: AgentProc | undefined;

beforeAll(async () => {
  g = await GuestUnderTest.start('wait-ready', [{ name: 'web', priority: 100, mode: 'graceful' }]);
});

afterAll(() => g?.dispose([next]));

interface Run {
  code: Promise<number | null>;
  stderr(): string;
  exitedAt(): number | undefined;
  running(): boolean;
}

function waitReadyCmd(args: string[]): Run {
  const c = spawn(process.execPath, [NESTBROKER, 'wait-ready', ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  let at: number | undefined;
  c.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const code = new Promise<number | null>((r) =>
    c.on('exit', (n) => {
      at = Date.now();
      r(n);
    }),
  );
  return { code, stderr: () => err, exitedAt: () => at, running: () => at === undefined };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('it waits through a stale socket while the agent is down, and returns once the agent answers', async () => {
  await g.agent!.stop();
  // What a killed agent leaves behind: its socket file with nobody listening (ECONNREFUSED).
  await fsp.rm(g.env.socket, { force: true });
  const crashed = spawn(process.execPath, [
    '-e',
    `require('net').createServer().listen(${JSON.stringify(g.env.socket)}, () => process.kill(process.pid, 'SIGKILL'))`,
  ]);
  await new Promise((r) => crashed.on('exit', r));
  expect((await fsp.stat(g.env.socket)).isSocket()).toBe(true);

  const w = waitReadyCmd(['guest', '--config', g.env.configFile, '--timeout', '40s']);
  await sleep(1500);
  expect(w.running()).toBe(true);

  const startedAt = Date.now();
  next = startAgent(g.env);
  expect(await w.code).toBe(0);
  expect(w.exitedAt()!).toBeGreaterThan(startedAt);
  // At that moment the agent answers at once and has its project adopted, running.
  const t0 = Date.now();
  const rows = await nestctl(g.env, ['projects', '--json']);
  expect(Date.now() - t0).toBeLessThan(5_000);
  expect(rows.code).toBe(0);
  expect(JSON.parse(rows.stdout)).toEqual([
    expect.objectContaining({ name: 'web', state: 'running' }),
  ]);
});

test('it gives up at once when the daemon exits before it is ready (exit 1)', async () => {
  // A "daemon" that dies during start: the unit must fail now, not after the timeout.
  const doomed = spawn(process.execPath, ['-e', 'setTimeout(() => process.exit(3), 800)']);
  const w = waitReadyCmd([
    'guest',
    '--config',
    g.env.configFile.replace('guest.yaml', 'nobody-here.yaml'),
    '--pid',
    String(doomed.pid),
  ]);
  // A missing config is a config error (exit 2), before any waiting.
  expect(await w.code).toBe(2);
  expect(w.stderr()).toMatch(/nobody-here\.yaml/);

  const other = { ...g.env, socket: `${g.env.dir}/nobody.sock` };
  const cfg = (await fsp.readFile(g.env.configFile, 'utf8')).replace(g.env.socket, other.socket);
  const cfgFile = `${g.env.dir}/other.yaml`;
  await fsp.writeFile(cfgFile, cfg);
  const t0 = Date.now();
  const w2 = waitReadyCmd(['guest', '--config', cfgFile, '--pid', String(doomed.pid)]);
  expect(await w2.code).toBe(1);
  expect(w2.stderr()).toMatch(`the daemon (pid ${doomed.pid}) exited before it was ready`);
  expect(Date.now() - t0).toBeLessThan(10_000);
});

test('it gives up after --timeout with a message saying so (exit 1)', async () => {
  const cfg = (await fsp.readFile(g.env.configFile, 'utf8')).replace(
    g.env.socket,
    `${g.env.dir}/silent.sock`,
  );
  const cfgFile = `${g.env.dir}/silent.yaml`;
  await fsp.writeFile(cfgFile, cfg);
  const t0 = Date.now();
  const w = waitReadyCmd(['guest', '--config', cfgFile, '--timeout', '1s']);
  expect(await w.code).toBe(1);
  const took = Date.now() - t0;
  expect(w.stderr()).toMatch(/silent\.sock was not ready within 1000 ms/);
  expect(took).toBeGreaterThanOrEqual(1000);
  expect(took).toBeLessThan(8_000);
});

test('bad arguments are refused together, each named (exit 2)', async () => {
  const w = waitReadyCmd([
    'guest',
    '--config',
    g.env.configFile,
    '--timeout',
    'soon',
    '--pid',
    '0',
  ]);
  expect(await w.code).toBe(2);
  expect(w.stderr()).toMatch(
    /--timeout must be a duration like "30s", "2m" or "500ms", got "soon"/,
  );
  expect(w.stderr()).toMatch(/--pid: 0 is not a process id/);
});
