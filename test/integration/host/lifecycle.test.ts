/**
 * A late guest and a cancel, with the real thing: the host broker and two guest agents as
 * processes over unix sockets, each VM a cgroup under this run's root, driven through the
 * real `nestctl`. A guest is made late by SIGSTOPping its agent (SIGCONT after, always).
 */
import { spawn } from 'node:child_process';
import { promises as fs, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { rpcCall } from '../../../agent/common/rpc';
import type { NoticeView } from '../../../agent/host/api';
import { HOST_EXIT } from '../../../agent/cli/host-commands';
import { EXIT } from '../../../agent/cli/format';
import { NESTBROKER, NESTCTL, Stack, waitFor, type GuestRun } from '../../../demo/stack';
import { webGuests } from './web-guests';

const MiB = 1024 * 1024;
const root = `nestbroker-test-${process.pid}-life`;
const guests = webGuests(['vm1', 'vm2']);
const kernel = (ctrl: string, group: string, file: string): string =>
  readFileSync(path.join('/sys/fs/cgroup', ctrl, root, group, file), 'utf8').trim();

let dir: string;
let stack: Stack;
let waitedReady: Promise<number | null>;
const run = (name: string): GuestRun => stack.guests.find((g) => g.spec.name === name)!;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-host-life-'));
  stack = new Stack({ root, dir, guests, transport: 'unix' });
  await stack.createVms();
  await stack.writeConfigs();
  await stack.startGuest('vm1');
  await stack.startGuest('vm2');
  // The unit's ExecStartPost, started before the broker as systemd does right after exec.
  const waiting = spawn(process.execPath, [
    NESTBROKER,
    'wait-ready',
    'host',
    '--config',
    stack.hostConfig,
    '--timeout',
    '30s',
  ]);
  waitedReady = new Promise((r) => waiting.on('exit', (code) => r(code)));
  await stack.startHost();
  await stack.waitConnected();
}, 60_000);

afterAll(async () => {
  for (const g of stack?.guests ?? []) g.proc?.child.kill('SIGCONT');
  await stack?.teardown();
  await fs.rm(dir, { recursive: true, force: true });
}, 30_000);

/** Runs the real nestctl; resolves with its exit code and output. */
function nestctl(...args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [NESTCTL, '--socket', stack.hostSocket, ...args]);
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('close', (code) => resolve({ code, out, err }));
  });
}

const books = async (name: string) => {
  const gs = (await rpcCall(stack.hostSocket, 'guests')) as {
    name: string;
    connected: boolean;
    books: { granted: { memoryBytes: number; cpus: number } };
  }[];
  return gs.find((g) => g.name === name)!;
};

/** SIGSTOP the guest's agent for the length of `fn`, and SIGCONT it whatever happens. */
async function whileStopped<T>(name: string, fn: () => Promise<T>): Promise<T> {
  const child = run(name).proc!.child;
  child.kill('SIGSTOP');
  try {
    return await fn();
  } finally {
    child.kill('SIGCONT');
  }
}

test('nestbroker wait-ready host (the unit ExecStartPost) returned 0: the broker answered on the socket its config names', async () => {
  // 1 when it gave up (timeout, the socket never answered), 2 for a config it could not read.
  expect(await waitedReady).toBe(0);
  expect((await nestctl('guests')).code).toBe(0);
});

test('nestctl top: the host status refreshed, --json one line a refresh, both guests connected', async () => {
  const r = await nestctl('top', '--json', '--count', '2', '--interval', '200ms');
  expect(r.code).toBe(0);
  const views = r.out
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { guests: { name: string; connected: boolean }[] });
  expect(views).toHaveLength(2);
  for (const v of views)
    expect(v.guests.map((g) => [g.name, g.connected])).toEqual([
      ['vm1', true],
      ['vm2', true],
    ]);
  const text = await nestctl('top', '--count', '1');
  expect(text.code).toBe(0);
  // The watcher's first host sample may still be on its way.
  expect(text.out).toMatch(/^host: (.* available of .*|not sampled yet); trigger (on|off)\n/);
  expect(text.out).toMatch(/\nvm1\s+10\s+yes\s/);
});

test('a late guest without --force: notice `late`, the books give it back, VM limits untouched, nestctl exits 7', async () => {
  const r = await whileStopped('vm1', () =>
    nestctl('reclaim', 'vm1', '--memory', '256MiB', '--cpus', '0.5', '--deadline', '1s'),
  );
  expect(r.code).toBe(HOST_EXIT.LATE);
  expect(r.out).toContain(': late (guest late)');
  expect(r.out).toContain('GUEST_LATE');
  const [n] = (await rpcCall(stack.hostSocket, 'notices', { guest: 'vm1' })) as NoticeView[];
  expect(n).toMatchObject({ state: 'late', late: true, error: { code: 'GUEST_LATE' } });
  // Reported at the deadline, not a delivery timeout after it.
  expect(Date.parse(n.finishedAt!) - Date.parse(n.deadline)).toBeLessThan(1000);
  expect(n.actuation).toBeUndefined();
  expect((await books('vm1')).books.granted).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(kernel('memory', 'vm1', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));
  expect(kernel('cpu', 'vm1', 'cpu.cfs_quota_us')).toBe('200000');
  // Cancel after the deadline is refused (the notice is over), nestctl says so by its code.
  const c = await nestctl('cancel', n.id);
  expect(c.code).toBe(EXIT.REJECTED);
  expect(c.err).toContain('it is late');
  // The agent comes back and is seen connected again (its heartbeat answers resume).
  await stack.waitConnected(['vm1']);
}, 60_000);

test('a late guest with --force: the VM limits are lowered anyway at the deadline', async () => {
  const r = await whileStopped('vm2', () =>
    nestctl(
      'reclaim',
      'vm2',
      '--memory',
      '256MiB',
      '--cpus',
      '0.5',
      '--deadline',
      '1s',
      '--force',
      '--json',
    ),
  );
  expect(r.code).toBe(HOST_EXIT.LATE); // late is still what happened
  const n = JSON.parse(r.out) as NoticeView;
  expect(n).toMatchObject({ state: 'done', late: true, force: true });
  expect(n.outcome).toBeUndefined(); // removed without the guest's word
  expect(n.actuation?.errors).toEqual([]);
  expect(kernel('memory', 'vm2', 'memory.limit_in_bytes')).toBe(String(768 * MiB));
  expect(kernel('cpu', 'vm2', 'cpu.cfs_quota_us')).toBe('150000');
  expect((await books('vm2')).books.granted).toEqual({ memoryBytes: 768 * MiB, cpus: 1.5 });
  await stack.waitConnected(['vm2']);
}, 60_000);

test('cancel before the deadline while the guest is away: accepted, the guest is told on its hello and never acts', async () => {
  await stack.stopProc(run('vm1').proc);
  await waitFor('vm1 seen as disconnected', async () => !(await books('vm1')).connected);
  const issued = (await rpcCall(stack.hostSocket, 'reclaim', {
    guest: 'vm1',
    memory: '256MiB',
    deadline: '30s',
    wait: false,
  })) as NoticeView;
  expect(issued.state).toBe('issued');
  expect((await books('vm1')).books.granted.memoryBytes).toBe(768 * MiB);
  const c = await nestctl('cancel', issued.id, '--json');
  expect(c.code).toBe(EXIT.OK);
  expect(JSON.parse(c.out)).toMatchObject({ id: issued.id, state: 'cancelled' });
  expect((await books('vm1')).books.granted.memoryBytes).toBe(1024 * MiB);
  await stack.startGuest('vm1');
  await stack.waitConnected(['vm1']);
  // A round trip to the guest after its hello, instead of a pause: a plan (read-only). The
  // host sends what it owes (the cancel; the notice, were it wrongly sent) as it answers the
  // hello, and the guest handles messages in order, journaling a notice before it reads
  // the next: by the plan's answer such a notice would be in the guest's journal.
  const plan = (await rpcCall(stack.hostSocket, 'plan', { guest: 'vm1', memory: '256MiB' })) as {
    guestPlan: unknown;
  };
  expect(plan.guestPlan).not.toBeNull();
  // The guest never journaled it as work to do; the VM and its project are untouched.
  const gn = (await rpcCall(run('vm1').socket, 'notices', {})) as {
    notice?: { id: string };
    id?: string;
    state?: string;
  }[];
  expect(gn.filter((x) => (x.notice?.id ?? x.id) === issued.id && x.state !== 'rejected')).toEqual(
    [],
  );
  expect(kernel('memory', 'vm1', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));
  const all = (await rpcCall(stack.hostSocket, 'notices', { guest: 'vm1' })) as NoticeView[];
  const after = all.find((x) => x.id === issued.id)!;
  expect(after.state).toBe('cancelled');
}, 60_000);

test('a deadline more than 24 h away is refused by the API before anything is journaled (docs/protocol.md, "Deadlines")', async () => {
  const before = ((await rpcCall(stack.hostSocket, 'notices', { guest: 'vm1' })) as NoticeView[])
    .length;
  // A guest would refuse it: Node fires a timer over 24.8 days at once.
  await expect(
    rpcCall(stack.hostSocket, 'reclaim', { guest: 'vm1', memory: '64MiB', deadline: '25h' }),
  ).rejects.toMatchObject({
    code: 'INPUT_INVALID',
    message: expect.stringContaining('at most 24h'),
  });
  const after = (await rpcCall(stack.hostSocket, 'notices', { guest: 'vm1' })) as NoticeView[];
  expect(after).toHaveLength(before);
});
