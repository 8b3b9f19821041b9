/**
 * The guest's side of a real CPU removal, on the real kernel (this machine: CPUs 0-1). The
 * test plays the host over the agent's unix channel. Its hello carries the online CPUs and
 * MemTotal the kernel shows; a reclaim naming CPU 1 as leaving moves every running
 * project's cpuset (the kernel's cpuset.cpus, read back) off CPU 1 before the outcome
 * arrives; a reclaim naming a CPU this guest does not have is refused with
 * LEAVING_CPUS_INVALID and changes nothing; the restore grows the cpusets back to 0-1.
 * Then the start-up warnings for missing prerequisites of real removal: the real ones
 * of this machine, and a fake /proc and /sys lacking each.
 */
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import type { Notice } from '../../../agent/broker/types';
import type { Ack, Hello, Message, OutcomeMsg } from '../../../agent/protocol/messages';
import { connectUnix } from '../../../agent/transport/unix';
import type { SocketChannel } from '../../../agent/transport/channel';
import { parseCpuList } from '../../../agent/common/cpulist';
import { memTotalOf } from '../../../agent/guest/guest-facts';
import { missingPrerequisites } from '../../../agent/guest/prerequisites';
import { GuestUnderTest, nestctl, waitFor, type Env } from './harness';

jest.setTimeout(90_000);

const GiB = 1024 ** 3;
const PROJECTS = ['web', 'batch'];
let g: GuestUnderTest;
let env: Env;
const upstreamOf = (e: Env): string => path.join(e.dir, 'upstream.sock');

/** The cpuset.cpus file the kernel shows for a project (v1 cpuset hierarchy or cgroup2). */
function cpusetFile(project: string): string {
  const dirs = g.t.driver.paths(`guest/projects/${project}`);
  const f = Object.values(dirs)
    .map((d) => path.join(d, 'cpuset.cpus'))
    .find((p) => existsSync(p));
  if (!f) throw new Error(`no cpuset.cpus for ${project} in ${JSON.stringify(dirs)}`);
  return f;
}
const cpusets = (): Record<string, string> =>
  Object.fromEntries(PROJECTS.map((p) => [p, readFileSync(cpusetFile(p), 'utf8').trim()]));

interface Host {
  ch: SocketChannel;
  inbox: Message[];
  /** The kernel's cpusets as they were at the moment each outcome arrived, by notice id. */
  atOutcome: Map<string, Record<string, string>>;
}

async function host(): Promise<Host> {
  await waitFor('the upstream socket', () => existsSync(upstreamOf(env)));
  const ch = await connectUnix(upstreamOf(env));
  const h: Host = { ch, inbox: [], atOutcome: new Map() };
  ch.on('message', (m: Message) => {
    // Read synchronously as the outcome arrives: what the kernel had when it was sent.
    if (m.type === 'outcome') h.atOutcome.set(m.outcome.noticeId, cpusets());
    h.inbox.push(m);
  });
  return h;
}

const online = (): number[] => parseCpuList(readFileSync('/sys/devices/system/cpu/online', 'utf8'));

function notice(
  o: Partial<Notice> & Pick<Notice, 'id' | 'seq' | 'kind' | 'change' | 'allocation'>,
): Notice {
  return {
    guest: 'vm-test',
    deadline: new Date(Date.now() + 60_000).toISOString(),
    reason: 'vCPU unplug',
    issuedAt: new Date().toISOString(),
    ...o,
  };
}

/**
 * Sends notice `cpu-n<seq>` (message `m<seq>`): the reclaim of one CPU, `leaving`, down to
 * an allocation of 1 CPU; resolves once its outcome has arrived.
 */
async function reclaimOneCpu(h: Host, seq: number, leaving: number): Promise<void> {
  const n = notice({
    id: `cpu-n${seq}`,
    seq,
    kind: 'reclaim',
    change: { cpus: 1, memoryBytes: 0 },
    allocation: { cpus: 1, memoryBytes: 4 * GiB },
    leavingCpus: [leaving],
  });
  h.ch.send({ type: 'notice', id: `m${seq}`, notice: n });
  await waitFor(`the outcome of ${n.id}`, () => h.atOutcome.has(n.id));
}

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-leaving',
    PROJECTS.map((name, i) => ({
      name,
      priority: 100 - i * 90,
      mode: 'graceful' as const,
      memory: { min: '64MiB', max: '256MiB' },
      cpu: { min: 0.1, max: 1 },
    })),
    {
      extra: (e) => ({ upstream: { transport: 'unix', path: upstreamOf(e) } }),
      ready: {
        what: 'projects to run',
        until: (e) => PROJECTS.every((p) => e.markerLines(p).length > 0),
      },
    },
  );
  ({ env } = g);
});

afterAll(() => g?.dispose());

test('a reclaim naming CPU 1 moves the cpusets off it before its outcome; a CPU not online is refused; the restore grows them back', async () => {
  expect(online()).toEqual([0, 1]);
  const h = await host();
  await waitFor('hello', () => h.inbox.some((m) => m.type === 'hello'));
  const hello = h.inbox.find((m) => m.type === 'hello') as Hello;
  // What the kernel says, not the allocation.
  expect(hello.onlineCpus).toEqual(online());
  expect(hello.memTotal).toBe(memTotalOf(readFileSync('/proc/meminfo', 'utf8')));
  expect(hello.capabilities).toContain('cpu-unplug');
  h.ch.send({
    type: 'welcome',
    id: 'w1',
    replyTo: hello.id,
    version: 1,
    guest: 'vm-test',
    heartbeatMs: 0,
    capabilities: ['cpu-unplug'],
  });
  expect(cpusets()).toEqual({ web: '0-1', batch: '0-1' });

  // 1. The reclaim of CPU 1.
  await reclaimOneCpu(h, 1, 1);
  expect(h.inbox.find((m) => m.type === 'ack' && m.replyTo === 'm1')).toMatchObject({
    state: 'accepted',
  });
  // Off CPU 1 when the outcome came, i.e. before the host would unplug it.
  expect(h.atOutcome.get('cpu-n1')).toEqual({ web: '0', batch: '0' });
  const out1 = h.inbox.find(
    (m) => m.type === 'outcome' && m.outcome.noticeId === 'cpu-n1',
  ) as OutcomeMsg;
  expect(out1.outcome.status).toBe('complete');
  for (const p of out1.outcome.projects)
    expect({ name: p.name, action: p.action, cpuset: p.after.cpuset }).toEqual({
      name: p.name,
      action: 'shrunk',
      cpuset: '0',
    });
  // Each project's `shrunk` progress came before the outcome.
  const i1 = h.inbox.indexOf(out1);
  for (const p of PROJECTS)
    expect(
      h.inbox.findIndex(
        (m) =>
          m.type === 'progress' &&
          m.noticeId === 'cpu-n1' &&
          m.project === p &&
          m.phase === 'shrunk',
      ),
    ).toBeLessThan(i1);
  // The host listed cpu-unplug: the outcome says what the guest has now.
  expect(out1.onlineCpus).toEqual(online());
  expect(out1.memTotal).toBe(hello.memTotal);

  // 2. A reclaim naming a CPU this guest does not have: refused, nothing changed.
  const before = cpusets();
  const n2 = notice({
    id: 'cpu-n2',
    seq: 2,
    kind: 'reclaim',
    change: { cpus: 0.5, memoryBytes: 0 },
    allocation: { cpus: 0.5, memoryBytes: 4 * GiB },
    leavingCpus: [7],
  });
  h.ch.send({ type: 'notice', id: 'm2', notice: n2 });
  await waitFor('the refusal', () => h.inbox.some((m) => m.type === 'ack' && m.replyTo === 'm2'));
  const ack2 = h.inbox.find((m) => m.type === 'ack' && m.replyTo === 'm2') as Ack;
  expect(ack2).toMatchObject({ state: 'rejected', error: { code: 'LEAVING_CPUS_INVALID' } });
  expect(ack2.error?.message).toContain('CPU(s) 7 that are not online in this guest (online: 0-1)');
  expect(cpusets()).toEqual(before);
  const status = JSON.parse((await nestctl(env, ['--json', 'status'])).stdout);
  expect(status.allocation).toEqual({ cpus: 1, memoryBytes: 4 * GiB });

  // 3. The restore (the CPU is back, as after a hot-plug): every online CPU again.
  const n3 = notice({
    id: 'cpu-n3',
    seq: 3,
    kind: 'restore',
    change: { cpus: 1, memoryBytes: 0 },
    allocation: { cpus: 2, memoryBytes: 4 * GiB },
  });
  h.ch.send({ type: 'restore', id: 'm3', notice: n3 });
  await waitFor('the restore outcome', () => h.atOutcome.has('cpu-n3'));
  expect(h.atOutcome.get('cpu-n3')).toEqual({ web: '0-1', batch: '0-1' });
  expect(cpusets()).toEqual({ web: '0-1', batch: '0-1' });

  // 4. The set is the host's, not "the last ones": CPU 0 leaving pins to CPU 1 (a plan
  // that only counted CPUs would have kept 0).
  await reclaimOneCpu(h, 4, 0);
  expect(h.atOutcome.get('cpu-n4')).toEqual({ web: '1', batch: '1' });
  await h.ch.close();
});

test('the start warns once for each prerequisite of real removal this machine lacks, naming it', () => {
  const log = g.agent!.stdout() + g.agent!.stderr();
  const lines = log.split('\n').filter((l) => l.includes('prerequisite missing'));
  const want = missingPrerequisites().map((m) => m.name);
  // This machine's kernel command line and auto_online_blocks ("offline") lack the memory one.
  expect(want).toContain('memory-online-movable');
  expect(lines.map((l) => JSON.parse(l).prerequisite)).toEqual(want);
});

test('with a fake /proc and /sys lacking everything, one warning each', async () => {
  const root = path.join(env.dir, 'sysroot');
  mkdirSync(path.join(root, 'proc'), { recursive: true });
  writeFileSync(path.join(root, 'proc/cmdline'), 'console=ttyS0 quiet\n');
  mkdirSync(path.join(root, 'sys/devices/system/memory'), { recursive: true });
  writeFileSync(path.join(root, 'sys/devices/system/memory/auto_online_blocks'), 'online\n');
  for (const c of ['cpu0', 'cpu1'])
    mkdirSync(path.join(root, 'sys/devices/system/cpu', c), { recursive: true });
  // no sys/firmware/acpi, and cpu1 has no `online` file
  const saved = process.env.NESTBROKER_SYSROOT;
  process.env.NESTBROKER_SYSROOT = root;
  try {
    await g.agent!.stop();
    const agent = await g.restart();
    await waitFor('the warnings', () => (agent.stdout() + agent.stderr()).includes('cpu-hotplug'));
    const lines = (agent.stdout() + agent.stderr())
      .split('\n')
      .filter((l) => l.includes('prerequisite missing'))
      .map((l) => JSON.parse(l) as { prerequisite: string; msg: string });
    expect(lines.map((l) => l.prerequisite)).toEqual([
      'memory-online-movable',
      'acpi',
      'cpu-hotplug',
    ]);
    expect(lines[0].msg).toContain('"online", not "online_movable"');
    expect(lines[2].msg).toContain('cpu1 has no');
    expect(readdirSync(path.join(root, 'sys/devices/system/cpu'))).toEqual(['cpu0', 'cpu1']);
  } finally {
    if (saved === undefined) delete process.env.NESTBROKER_SYSROOT;
    else process.env.NESTBROKER_SYSROOT = saved;
  }
});
