/**
 * A reload of a running host broker (docs/host-broker.md, "Reload"), with real daemons:
 * the host and two guest agents as processes (test/faults/stack.ts). The host's config
 * file is rewritten and the broker gets SIGHUP, as `systemctl reload` sends it (the
 * unit's ExecReload=). What must follow is read from the other side where there is one:
 *
 *  - vm2 removed → the vm2 agent sees its upstream channel close; the host lists vm1 and
 *    vm3 only; vm1's new priority and floor are on its books; vm3 (no agent) is known
 *    and not connected;
 *  - vm2 added again → it reconnects and says hello;
 *  - vm2 removed while a notice to it is in flight → refused, naming the guest and the
 *    notice; vm2 stays;
 *  - a file with two problems → both logged, the guests unchanged;
 *  - the broker outlives every SIGHUP and exits 0 on SIGTERM (not 129).
 */
import { spawnSync } from 'node:child_process';
import { promises as fs, readFileSync } from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { rpcCall } from '../../../agent/common/rpc';
import type { GuestStatus } from '../../../agent/host/host-broker';
import { NESTCTL } from '../../../demo/stack';
import { FaultStack, MiB, waitFor } from '../../faults/stack';

jest.setTimeout(90_000);

let s: FaultStack;

type HostYaml = {
  guests: { name: string; priority: number; floor: { memory: string; cpus: number } }[];
  [k: string]: unknown;
};
let original: HostYaml;

beforeAll(async () => {
  s = await FaultStack.started('host-reload', [
    { name: 'vm1', projects: [{ name: 'web', priority: 100, mode: 'graceful' }] },
    { name: 'vm2', projects: [{ name: 'db', priority: 100, mode: 'graceful' }] },
  ]);
  original = YAML.parse(await fs.readFile(s.stack.hostConfig, 'utf8')) as HostYaml;
});

afterAll(() => s?.teardown());

function hostLog(msg: string | RegExp): Record<string, unknown>[] {
  const text = readFileSync(path.join(s.dir, 'logs', 'host.log'), 'utf8');
  return text
    .split('\n')
    .filter(Boolean)
    .map((l) => {
      try {
        return JSON.parse(l) as Record<string, unknown>;
      } catch {
        return {};
      }
    })
    .filter((o) => (typeof msg === 'string' ? o.msg === msg : msg.test(String(o.msg ?? ''))));
}

const ends = (): number =>
  hostLog('reload: config applied').length +
  hostLog('reload refused: the config has problems; the config in force stays').length;

async function hup(cfg: HostYaml): Promise<void> {
  await fs.writeFile(s.stack.hostConfig, YAML.stringify(cfg));
  const before = ends();
  process.kill(s.stack.host!.child.pid!, 'SIGHUP');
  await waitFor('the reload to end', async () => ends() > before, 30_000);
}

const guests = async (): Promise<GuestStatus[]> =>
  (await rpcCall(s.stack.hostSocket, 'guests')) as GuestStatus[];
const upstreamOf = async (g: string): Promise<boolean> =>
  ((await rpcCall(s.run(g).socket, 'status')) as { upstream: { connected: boolean } }).upstream
    .connected;

test('SIGHUP: a guest removed, one changed, one added; the removed guest sees its channel close', async () => {
  expect(await upstreamOf('vm2')).toBe(true);
  const cfg = structuredClone(original);
  const vm1 = cfg.guests.find((g) => g.name === 'vm1')!;
  vm1.priority = 99;
  vm1.floor = { memory: '128MiB', cpus: 0.2 };
  cfg.guests = [
    vm1,
    {
      ...structuredClone(vm1),
      name: 'vm3',
      channel: { transport: 'unix', path: path.join(s.dir, 'vm3.sock') },
      cgroup: undefined,
    } as unknown as HostYaml['guests'][number],
  ];
  await hup(cfg);

  const gs = await guests();
  expect(gs.map((g) => g.name)).toEqual(['vm1', 'vm3']);
  const g1 = gs.find((g) => g.name === 'vm1')!;
  expect(g1.priority).toBe(99);
  expect(g1.books.floor).toEqual({ memoryBytes: 128 * MiB, cpus: 0.2 });
  expect(g1.connected).toBe(true);
  expect(gs.find((g) => g.name === 'vm3')!.connected).toBe(false);
  // The other side: vm2's agent lost its host.
  await waitFor('vm2 to see its upstream close', async () => (await upstreamOf('vm2')) === false);
  expect(hostLog('reload: guest removed (channel closed)')).toMatchObject([{ guest: 'vm2' }]);
  expect(hostLog('reload: guest added')).toMatchObject([{ guest: 'vm3' }]);
  expect(hostLog('reload: guest changed')[0]).toMatchObject({
    guest: 'vm1',
    fields: ['priority', 'floor'],
  });
  expect(s.stack.host!.child.exitCode).toBeNull();
});

test('vm2 added again reconnects and says hello', async () => {
  await hup(original);
  await s.stack.waitConnected(['vm1', 'vm2']);
  expect((await guests()).map((g) => g.name)).toEqual(['vm1', 'vm2']);
  expect(await upstreamOf('vm2')).toBe(true);
});

test('a guest with a notice in flight cannot be removed: refused, it stays', async () => {
  // vm2's agent stopped: a reclaim to it waits, in flight, for its hello.
  await s.stack.stopProc(s.run('vm2').proc);
  await waitFor('vm2 to be away', async () => !(await guests())[1].connected);
  const n = (await rpcCall(s.stack.hostSocket, 'reclaim', {
    guest: 'vm2',
    memory: '64MiB',
    deadline: '60s',
    wait: false,
  })) as { id: string; state: string };
  expect(n.state).toBe('issued');
  const cfg = structuredClone(original);
  cfg.guests = cfg.guests.filter((g) => g.name !== 'vm2');
  await hup(cfg);
  const refused = hostLog(/^reload refused: guests\[name=vm2\]/);
  expect(refused).toHaveLength(1);
  expect(String(refused[0].msg)).toContain(n.id);
  expect((await guests()).map((g) => g.name)).toEqual(['vm1', 'vm2']);
  // Withdrawn (the guest is told at its next hello); then the removal goes through.
  await rpcCall(s.stack.hostSocket, 'cancel', { id: n.id });
  await hup(cfg);
  expect((await guests()).map((g) => g.name)).toEqual(['vm1']);
  await hup(original);
});

test('an invalid file is refused with every problem logged; the guests stay as they were', async () => {
  const before = await guests();
  const cfg = structuredClone(original) as HostYaml & { heartbeet?: unknown };
  cfg.heartbeet = { interval: '1s' };
  cfg.guests[0].priority = -5;
  await hup(cfg);
  const fields = hostLog(/^reload refused: (?!the config)/).map((o) => o.field);
  expect(fields).toEqual(expect.arrayContaining(['heartbeet', 'guests[0].priority']));
  const after = await guests();
  expect(after.map((g) => [g.name, g.priority])).toEqual(before.map((g) => [g.name, g.priority]));
  // nestctl reload on the same file: refused, exit 2, each problem on its own line.
  const r = spawnSync(process.execPath, [NESTCTL, '--socket', s.stack.hostSocket, 'reload'], {
    encoding: 'utf8',
  });
  expect(r.status).toBe(2);
  expect(r.stdout).toMatch(/^ {2}heartbeet: /m);
  expect(r.stdout).toMatch(/^ {2}guests\[0\]\.priority: /m);
  expect(s.stack.host!.child.exitCode).toBeNull();
});

test('nestctl reload answers what it applied; the broker exits 0 on SIGTERM', async () => {
  await fs.writeFile(s.stack.hostConfig, YAML.stringify({ ...original, logLevel: 'warn' }));
  const r = (await rpcCall(s.stack.hostSocket, 'reload', {})) as {
    ok: boolean;
    report: { live: string[]; restartNeeded: string[] };
  };
  expect(r).toMatchObject({ ok: true, report: { live: ['logLevel'], restartNeeded: [] } });
  const host = s.stack.host!;
  host.child.kill('SIGTERM');
  expect(await host.exited).toEqual({ code: 0, signal: null });
});
