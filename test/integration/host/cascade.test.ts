/**
 * The host broker and two guest agents as real processes over unix sockets, each "VM" a
 * real cgroup under this run's root: what the outcome says must be what the kernel shows,
 * a guest that is down gets its notice on reconnect and acts once, and a host killed with
 * SIGKILL mid-notice finishes it from its journal.
 */
import { promises as fs, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { rpcCall } from '../../../agent/common/rpc';
import type { NoticeView } from '../../../agent/host/api';
import { Stack, waitFor, type GuestSpec } from '../../../demo/stack';

const MiB = 1024 * 1024;
const root = `nestbroker-test-${process.pid}-host`;
const proj = (name: string, priority: number) => ({
  name,
  priority,
  memoryMin: '128MiB',
  memoryMax: '256MiB',
  cpuMin: 0.2,
  cpuMax: 0.6,
  holdMiB: 16,
  burn: 0.02,
});
const guests: GuestSpec[] = ['vm1', 'vm2'].map((name, i) => ({
  name,
  priority: 10 * (i + 1),
  memory: '1GiB',
  cpus: 2,
  floor: { memory: '256MiB', cpus: 0.5 },
  projects: [proj('web', 100), proj('api', 50), proj('batch', 10)],
}));
const kernel = (ctrl: string, group: string, file: string): string =>
  readFileSync(path.join('/sys/fs/cgroup', ctrl, root, group, file), 'utf8').trim();

let dir: string;
let stack: Stack;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-host-it-'));
  stack = new Stack({ root, dir, guests, transport: 'unix' });
  await stack.createVms();
  await stack.writeConfigs();
  await stack.startGuest('vm1');
  await stack.startGuest('vm2');
  await stack.startHost();
  await stack.waitConnected();
}, 60_000);

afterAll(async () => {
  await stack?.teardown();
  await fs.rm(dir, { recursive: true, force: true });
}, 30_000);

const reclaim = (guest: string, memory: string, cpus: number, deadline = '20s') =>
  rpcCall(
    stack.hostSocket,
    'reclaim',
    { guest, memory, cpus, deadline },
    { timeoutMs: 60_000 },
  ) as Promise<NoticeView>;

test('a reclaim cascades to the projects, and the VM limits the kernel shows match the books, set after the outcome', async () => {
  const n = await reclaim('vm1', '768MiB', 1);
  expect(n.state).toBe('done');
  expect(n.outcome?.status).toBe('complete');
  expect(n.outcome?.projects.map((p) => [p.name, p.action])).toEqual([
    ['batch', 'stopped'],
    ['api', 'stopped'],
    ['web', 'shrunk'],
  ]);
  expect(n.allocation).toEqual({ memoryBytes: 256 * MiB, cpus: 1 });
  expect(kernel('memory', 'vm1', 'memory.limit_in_bytes')).toBe(String(256 * MiB));
  expect(kernel('cpu', 'vm1', 'cpu.cfs_quota_us')).toBe('100000');
  expect(Date.parse(n.actuatedAt!)).toBeGreaterThanOrEqual(Date.parse(n.outcomeAt!));
  // The projects' own limits, as the guest said.
  const web = n.outcome!.projects.find((p) => p.name === 'web')!;
  expect(kernel('memory', 'vm1/projects/web', 'memory.limit_in_bytes')).toBe(
    String(web.after.memoryMax),
  );
  // Below the floor is refused with the field and value named, and nothing changes.
  await expect(reclaim('vm1', '128MiB', 0)).rejects.toMatchObject({
    code: 'NOTICE_REJECTED',
    problems: [{ field: 'memory', value: 128 * MiB }],
  });
  // Restore: limits back first, then the guest restarts what it stopped.
  const r = (await rpcCall(
    stack.hostSocket,
    'restore',
    { guest: 'vm1', deadline: '20s' },
    { timeoutMs: 60_000 },
  )) as NoticeView;
  expect(r.state).toBe('done');
  expect(Date.parse(r.actuatedAt!)).toBeLessThanOrEqual(Date.parse(r.sentAt!));
  expect(kernel('memory', 'vm1', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));
  expect(
    r.outcome?.projects
      .filter((p) => p.action === 'started')
      .map((p) => p.name)
      .sort(),
  ).toEqual(['api', 'batch']);
}, 90_000);

test('a guest that is down when the notice is issued gets it on reconnect and acts once', async () => {
  const run = stack.guests.find((g) => g.spec.name === 'vm2')!;
  await stack.stopProc(run.proc); // the agent stops; its projects keep running
  await waitFor('vm2 seen as disconnected', async () => {
    const gs = (await rpcCall(stack.hostSocket, 'guests')) as {
      name: string;
      connected: boolean;
    }[];
    return !gs.find((g) => g.name === 'vm2')!.connected;
  });
  const pending = rpcCall(
    stack.hostSocket,
    'reclaim',
    { guest: 'vm2', memory: '256MiB', cpus: 0.5, deadline: '30s' },
    { timeoutMs: 60_000 },
  ) as Promise<NoticeView>;
  const issued = await waitFor('the reclaim in the host journal', async () => {
    const [n] = (await rpcCall(stack.hostSocket, 'notices', { guest: 'vm2' })) as NoticeView[];
    return n;
  });
  expect(issued.state).toBe('issued'); // journaled and booked, not delivered
  expect(kernel('memory', 'vm2', 'memory.limit_in_bytes')).toBe(String(1024 * MiB));
  await stack.startGuest('vm2');
  const n = await pending;
  expect(n).toMatchObject({ state: 'done', outcome: { status: 'complete' } });
  expect(kernel('memory', 'vm2', 'memory.limit_in_bytes')).toBe(String(768 * MiB));
  // The guest's own journal has the notice once, carried out once.
  const gn = (await rpcCall(run.socket, 'notices', {})) as {
    id?: string;
    notice?: { id: string };
  }[];
  expect(gn.filter((x) => (x.notice?.id ?? x.id) === n.id)).toHaveLength(1);
}, 90_000);

test('a host broker killed (SIGKILL) mid-notice resumes from its journal and actuates once the outcome comes', async () => {
  const run = stack.guests.find((g) => g.spec.name === 'vm2')!;
  // Freeze the guest agent so the notice stays unanswered while the host dies.
  run.proc!.child.kill('SIGSTOP');
  const issued = rpcCall(
    stack.hostSocket,
    'reclaim',
    { guest: 'vm2', memory: '256MiB', cpus: 0.5, deadline: '30s' },
    { timeoutMs: 60_000 },
  ).catch((e: unknown) => e);
  let id = '';
  await waitFor('the notice journaled and sent', async () => {
    const ns = (await rpcCall(stack.hostSocket, 'notices', { guest: 'vm2' })) as NoticeView[];
    const n = ns.find((x) => x.seq === 2);
    if (n) id = n.id;
    return n?.sentAt;
  });
  await stack.stopProc(stack.host, 'SIGKILL');
  expect(await issued).toMatchObject({ code: 'TRANSPORT' }); // the operator's connection died with it
  const journal = JSON.parse(
    await fs.readFile(path.join(dir, 'host-state', 'notices', `notice.${id}.json`), 'utf8'),
  );
  expect(journal.state).toMatch(/issued|acked/);
  run.proc!.child.kill('SIGCONT');
  await stack.startHost();
  const n = await waitFor(
    'the resumed notice done',
    async () => {
      const x = (await rpcCall(stack.hostSocket, 'notices', { guest: 'vm2' })) as NoticeView[];
      const r = x.find((y) => y.id === id);
      return r?.state === 'done' ? r : undefined;
    },
    40_000,
  );
  expect(n.outcome?.status).toBe('complete');
  expect(kernel('memory', 'vm2', 'memory.limit_in_bytes')).toBe(String(512 * MiB));
  const gs = (await rpcCall(stack.hostSocket, 'guests')) as {
    name: string;
    books: { granted: { memoryBytes: number } };
  }[];
  expect(gs.find((g) => g.name === 'vm2')!.books.granted.memoryBytes).toBe(512 * MiB);
}, 90_000);
