/**
 * A deadline shorter than a project's grace period (docs/reliability.md, "A deadline
 * shorter than a grace period"), on real processes: a host broker and a guest agent
 * (test/faults/stack.ts), the project `batch` ignores SIGTERM and has a 30 s grace; the
 * operator reclaims with a 3 s deadline.
 *
 *  1. The guest plans its own end: the grace is cut so that the kill, the journal writes
 *     and the outcome's send are over BEFORE the deadline, by a margin it measured (its
 *     status shows the samples). nestctl exits 0, the VM is lowered, and the host's books,
 *     the guest's recorded allocation and the kernel's VM limit are one figure.
 *  2. The guest agent is SIGSTOPped in the middle of the grace, past the deadline: the
 *     host marks the notice late (exit 7) and gives the books back. On SIGCONT the guest
 *     kills, journals and sends the outcome late; the host reconciles with what the guest
 *     did: the notice counts again, the VM is lowered, books = guest = kernel.
 *
 * In both, `nestctl restore` works afterwards and puts everything back.
 */
import { spawn } from 'node:child_process';
import { rpcCall } from '../../agent/common/rpc';
import type { NoticeView } from '../../agent/host/api';
import { NESTCTL } from '../../demo/stack';
import { FaultStack, MiB, waitFor, type FaultGuest } from './stack';

jest.setTimeout(120_000);

const VM1: FaultGuest = {
  name: 'vm1',
  projects: [
    { name: 'web', priority: 100, mode: 'graceful' },
    { name: 'batch', priority: 10, mode: 'stubborn', grace: '30s' },
  ],
};

/** The reclaim every story here starts with: batch's 30 s grace cannot fit in its 3 s. */
const RECLAIM_768_MIB_IN_3S = [
  'reclaim',
  'vm1',
  '--memory',
  '768MiB',
  '--cpus',
  '1',
  '--deadline',
  '3s',
];

interface Ctl {
  code: number | null;
  stdout: string;
  stderr: string;
}

function hostctl(s: FaultStack, args: string[]): Promise<Ctl> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [NESTCTL, '--socket', s.stack.hostSocket, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    c.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

interface GuestStatus {
  allocation: { memoryBytes: number; cpus: number };
  endMargin: { killMs: number; afterMs: number; samples: Record<string, number> };
}

/** The host's books, the guest's recorded allocation and the VM's limit in the kernel. */
async function threeViews(s: FaultStack) {
  const guests = (await rpcCall(s.stack.hostSocket, 'guests')) as {
    name: string;
    books: { granted: { memoryBytes: number; cpus: number } };
  }[];
  const books = guests.find((g) => g.name === 'vm1')!.books.granted;
  const guest = (await rpcCall(s.run('vm1').socket, 'status')) as GuestStatus;
  return { books, guest: guest.allocation, vmMemory: s.vmMemory('vm1'), status: guest };
}

async function restoreWorks(s: FaultStack): Promise<void> {
  const r = await hostctl(s, ['restore', 'vm1', '--deadline', '20s', '--json']);
  expect(r).toMatchObject({ code: 0 });
  const n = JSON.parse(r.stdout) as NoticeView;
  expect(n).toMatchObject({ state: 'done', late: false });
  const v = await threeViews(s);
  expect(v.books).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
  expect(v.guest).toEqual(v.books);
  expect(v.vmMemory).toBe(1024 * MiB);
}

describe('a 3 s deadline against a 30 s grace period', () => {
  let s: FaultStack;
  beforeAll(async () => {
    s = await FaultStack.started('short-deadline', [VM1]);
  });
  afterAll(async () => {
    await s?.teardown();
  });

  test('the guest kills in time: kill, journal and outcome before the deadline; exit 0, books consistent', async () => {
    const r = await hostctl(s, [...RECLAIM_768_MIB_IN_3S, '--json']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const n = JSON.parse(r.stdout) as NoticeView;
    expect(n).toMatchObject({ state: 'done', late: false, outcome: { status: 'complete' } });
    // The outcome was on the host before the deadline (both the host's own wall readings,
    // nothing stepped them here).
    expect(Date.parse(n.outcomeAt!)).toBeLessThan(Date.parse(n.deadline));
    const batch = n.outcome!.projects.find((p) => p.name === 'batch')!;
    expect(batch).toMatchObject({ action: 'stopped', exit: 'killed' });
    expect(batch.reason).toMatch(/deadline capped its grace at \d+ ms \(configured 30000 ms\)/);
    // The stubborn project had its SIGTERM (and ignored it), then was killed: gone.
    expect(s.count('vm1', 'batch', 'ignored')).toBe(1);
    expect(s.procs('vm1', 'batch')).toEqual([]);

    const v = await threeViews(s);
    expect(v.books).toEqual({ memoryBytes: 256 * MiB, cpus: 1 });
    expect(v.guest).toEqual(v.books);
    expect(v.vmMemory).toBe(256 * MiB);
    // The margin came from what the guest measured: a kill, journal writes, a round trip.
    expect(v.status.endMargin.samples.kill).toBeGreaterThanOrEqual(1);
    expect(v.status.endMargin.samples.journal).toBeGreaterThanOrEqual(2);
    expect(v.status.endMargin.samples.send).toBeGreaterThanOrEqual(1);

    await restoreWorks(s);
  });
});

describe('a guest agent stopped past the deadline', () => {
  let s: FaultStack;
  beforeAll(async () => {
    s = await FaultStack.started('late-outcome', [VM1]);
  });
  afterAll(async () => {
    await s?.teardown(); // SIGCONTs the agent first, whatever happened
  });

  test('its late outcome is reconciled: the books follow what the guest did, the VM is lowered', async () => {
    const agent = s.run('vm1').proc!.child;
    const pending = hostctl(s, [...RECLAIM_768_MIB_IN_3S, '--json']);
    // In the middle of batch's grace: it has had its SIGTERM (and ignored it).
    await waitFor('batch to ignore its SIGTERM', async () =>
      s.count('vm1', 'batch', 'ignored') > 0 ? true : undefined,
    );
    agent.kill('SIGSTOP');
    let r: Ctl;
    try {
      r = await pending;
    } finally {
      agent.kill('SIGCONT');
    }
    // The host gave up at the deadline: late, nothing removed, the books took it back.
    expect(r.code).toBe(7);
    const late = JSON.parse(r.stdout) as NoticeView;
    expect(late).toMatchObject({ state: 'late', late: true, error: { code: 'GUEST_LATE' } });

    // The guest wakes, kills, journals and sends its outcome: the host follows it.
    const n = await s.waitHostNotice(
      (x) => x.id === late.id && x.state === 'done',
      'the late outcome to be reconciled',
      60_000,
    );
    expect(n).toMatchObject({ late: true, outcome: { status: 'complete' } });
    expect(n.reconciledAt).toBeDefined();
    expect(n.error).toBeUndefined();
    expect(Date.parse(n.outcomeAt!)).toBeGreaterThan(Date.parse(n.deadline));
    expect(n.outcome!.projects.find((p) => p.name === 'batch')).toMatchObject({
      action: 'stopped',
      exit: 'killed',
    });
    expect(s.procs('vm1', 'batch')).toEqual([]);
    const guestRec = (await s.guestNotices('vm1')).find((x) => x.id === late.id)!;
    expect(guestRec).toMatchObject({ state: 'done', runs: 1 });

    const v = await threeViews(s);
    expect(v.books).toEqual({ memoryBytes: 256 * MiB, cpus: 1 });
    expect(v.guest).toEqual(v.books);
    expect(v.vmMemory).toBe(256 * MiB);

    await restoreWorks(s);
  });

  test('a restore that reaches it after its deadline is carried out when it wakes: books = guest', async () => {
    const agent = s.run('vm1').proc!.child;
    const down = await hostctl(s, RECLAIM_768_MIB_IN_3S);
    expect(down.code).toBe(0);
    agent.kill('SIGSTOP');
    let r: Ctl;
    try {
      r = await hostctl(s, ['restore', 'vm1', '--deadline', '2s', '--json']);
    } finally {
      agent.kill('SIGCONT');
    }
    // The host raised the VM first and keeps the restore on its books; the guest was away.
    expect(r.code).toBe(7);
    const late = JSON.parse(r.stdout) as NoticeView;
    expect(late).toMatchObject({ kind: 'restore', state: 'done', late: true });
    expect(s.vmMemory('vm1')).toBe(1024 * MiB);
    // Awake, the guest carries it out although its deadline has passed: the books hold it.
    const n = await s.waitHostNotice(
      (x) => x.id === late.id && x.outcome !== undefined,
      'the late restore to be carried out',
      60_000,
    );
    expect(n.outcome).toMatchObject({ status: 'complete' });
    const v = await threeViews(s);
    expect(v.books).toEqual({ memoryBytes: 1024 * MiB, cpus: 2 });
    expect(v.guest).toEqual(v.books);
    await waitFor('batch to run again', async () =>
      s.procs('vm1', 'batch').length > 0 ? true : undefined,
    );
  });
});
