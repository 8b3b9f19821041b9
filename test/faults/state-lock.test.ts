/**
 * One daemon per state directory (agent/common/state-lock.ts, docs/reliability.md): a
 * second `nestbroker guest` on the same stateDir with other sockets, and a second
 * `nestbroker host` on the same host stateDir, refuse to start with STATE_LOCKED naming
 * the holder's pid, exit non-zero and touch nothing (no socket, no project started or
 * re-adopted twice). After the holder is SIGKILLed its lock is stale and the next start
 * takes it over; a lock whose pid is alive but started at another time (pid reuse) is
 * stale too.
 */
import { spawn } from 'node:child_process';
import { existsSync, promises as fs, readFileSync, watch } from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { NESTBROKER } from '../integration/guest/harness';
import { processStart } from '../../agent/common/state-lock';
import { FaultStack } from './stack';

jest.setTimeout(90_000);

let s: FaultStack;

beforeAll(async () => {
  s = await FaultStack.started('state-lock', [
    { name: 'vm1', projects: [{ name: 'web', priority: 100, mode: 'graceful' }] },
  ]);
});

afterAll(() => s?.teardown());

function run(argv: string[]): Promise<{ code: number | null; err: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [NESTBROKER, ...argv], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    c.stderr.on('data', (d: Buffer) => (err += d.toString()));
    c.on('exit', (code) => resolve({ code, err }));
  });
}

/** A copy of a config with its sockets moved, so only the state directory is shared. */
async function copyConfig(
  file: string,
  edit: (cfg: Record<string, unknown>) => void,
): Promise<string> {
  const cfg = YAML.parse(await fs.readFile(file, 'utf8')) as Record<string, unknown>;
  edit(cfg);
  const out = `${file}.second.yaml`;
  await fs.writeFile(out, YAML.stringify(cfg));
  return out;
}

test('a second guest agent on the same state directory refuses, naming the holder, touching nothing', async () => {
  const g = s.run('vm1');
  const dir = path.dirname(g.config);
  const second = {
    socket: path.join(dir, 'second.sock'),
    projectSocket: path.join(dir, 'second-projects.sock'),
    channel: path.join(dir, 'second-channel.sock'),
  };
  const cfg = await copyConfig(g.config, (c) => {
    c.socket = second.socket;
    c.projectSocket = second.projectSocket;
    c.upstream = { transport: 'unix', path: second.channel };
  });
  const r = await run(['guest', '--config', cfg]);
  expect(r.code).toBe(1);
  expect(r.err).toContain('STATE_LOCKED');
  expect(r.err).toContain(`pid ${g.proc!.child.pid}`);
  for (const f of Object.values(second)) expect([f, existsSync(f)]).toEqual([f, false]);
  // web was started once, by the first agent, and is still running under it.
  expect(s.count('vm1', 'web', 'start')).toBe(1);
  expect(s.procs('vm1', 'web').length).toBeGreaterThan(0);
});

test('a second host broker on the same state directory refuses, naming the holder', async () => {
  const hostCfg = s.stack.hostConfig;
  const socket = path.join(path.dirname(hostCfg), 'second-host.sock');
  const cfg = await copyConfig(hostCfg, (c) => (c.socket = socket));
  const r = await run(['host', '--config', cfg]);
  expect(r.code).toBe(1);
  expect(r.err).toContain('STATE_LOCKED');
  expect(r.err).toContain(`pid ${s.stack.host!.child.pid}`);
  expect(existsSync(socket)).toBe(false);
});

test('a lock left by a SIGKILLed agent, or naming a live pid that started at another time, is stale', async () => {
  const g = s.run('vm1');
  const lock = path.join(path.dirname(g.config), 'state', 'lock');
  const holder = JSON.parse(readFileSync(lock, 'utf8')) as { pid: number; start: number };
  expect(holder).toEqual({ pid: g.proc!.child.pid, start: processStart(g.proc!.child.pid!) });
  g.proc!.child.kill('SIGKILL');
  await g.proc!.exited;
  expect(existsSync(lock)).toBe(true); // left behind: nothing ran to remove it
  await s.stack.startGuest('vm1');
  expect(JSON.parse(readFileSync(lock, 'utf8'))).toMatchObject({ pid: g.proc!.child.pid });
  // Re-adopted, not started again.
  expect(s.count('vm1', 'web', 'start')).toBe(1);

  // Stopped cleanly: the lock goes with it.
  await s.stack.stopProc(g.proc);
  expect(existsSync(lock)).toBe(false);
  // A live pid (this test's) with another start time: a reused pid, not the holder.
  await fs.writeFile(
    lock,
    JSON.stringify({ pid: process.pid, start: processStart(process.pid)! + 1 }),
  );
  await s.stack.startGuest('vm1');
  expect(JSON.parse(readFileSync(lock, 'utf8'))).toMatchObject({ pid: g.proc!.child.pid });
  expect(s.count('vm1', 'web', 'start')).toBe(1);
});

test('a SIGTERM while the agent is still starting stops it cleanly: exit 0, the lock removed', async () => {
  const g = s.run('vm1');
  const state = path.join(path.dirname(g.config), 'state');
  const lock = path.join(state, 'lock');
  await s.stack.stopProc(g.proc);
  expect(existsSync(lock)).toBe(false);
  // The lock is the start's first step (agent/common/state-lock.ts); the stop signal goes the
  // moment inotify shows it, while the sockets, the projects and the channel are still to come.
  const taken = new Promise<void>((resolve) => {
    const w = watch(state, (_ev, name) => {
      if (name === 'lock' && existsSync(lock)) {
        w.close();
        resolve();
      }
    });
  });
  const c = spawn(process.execPath, [NESTBROKER, 'guest', '--config', g.config], {
    stdio: ['ignore', 'ignore', 'ignore'],
  });
  const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) =>
    c.on('exit', (code, signal) => resolve({ code, signal })),
  );
  await taken;
  c.kill('SIGTERM');
  expect(await exited).toEqual({ code: 0, signal: null });
  expect(existsSync(lock)).toBe(false);
  // The project kept running, and the next start re-adopts it.
  await s.stack.startGuest('vm1');
  expect(s.count('vm1', 'web', 'start')).toBe(1);
});
