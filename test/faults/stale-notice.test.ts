/**
 * A bug found by docs/reliability.md: a guest that wakes up after the host has given up on
 * a notice must not carry it out. The guest agent (a real process) is frozen with SIGSTOP;
 * the host issues a reclaim with a 2 s deadline, marks it `late` at the deadline, gives the
 * resources back in its books and sends `cancel`. The notice and the cancel wait in the
 * socket. On SIGCONT the guest reads both: the notice is refused on arrival (deadline
 * already past: NOTICE_STALE, journaled as rejected), the cancel is answered about that
 * notice, and no project is stopped or shrunk. A fresh notice afterwards is carried out as
 * usual.
 *
 * The second test shows the other half of the fix in the NoticeBook itself: a cancel that
 * arrives while its notice is still being admitted (checked, journaled) waits for the
 * admission and is answered about that notice, never "unknown notice".
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NoticeBook, type LocalBroker } from '../../agent/client/notices';
import { silentLogger } from '../../agent/common/log';
import type { Notice, Outcome } from '../../agent/broker/types';
import { FaultStack, MiB, VM1_WEB_BATCH, waitFor } from './stack';
import { emptyOutcome, testNotice } from '../helpers/notices';

jest.setTimeout(60_000);

let s: FaultStack;

beforeAll(async () => {
  s = await FaultStack.started('stale', [VM1_WEB_BATCH]);
});

afterAll(async () => {
  await s?.teardown(); // SIGCONTs the agent first, whatever happened
});

test('a notice whose deadline passed while the guest was stopped is refused on arrival; nothing is done', async () => {
  const agent = s.run('vm1').proc!.child;
  const batchPids = s.procs('vm1', 'batch');
  expect(batchPids.length).toBeGreaterThan(0);
  agent.kill('SIGSTOP');
  let n;
  try {
    n = await s.reclaim('vm1', '768MiB', 1, '2s');
  } finally {
    // The host has answered the operator: the notice is late and its cancel is sent.
    agent.kill('SIGCONT');
  }
  expect(n).toMatchObject({ state: 'late', late: true, error: { code: 'GUEST_LATE' } });
  // The host's books took it back at once.
  const gs = (await import('../../agent/common/rpc')).rpcCall(s.stack.hostSocket, 'guests');
  const vm1 = ((await gs) as { name: string; books: { granted: { memoryBytes: number } } }[]).find(
    (g) => g.name === 'vm1',
  )!;
  expect(vm1.books.granted.memoryBytes).toBe(1024 * MiB);

  // The guest woke up, read the notice and the cancel: refused as stale, journaled so.
  const rec = await waitFor('the guest to answer the stale notice', async () =>
    (await s.guestNotices('vm1')).find((r) => r.id === n.id),
  );
  expect(rec).toMatchObject({ state: 'rejected', runs: 0, error: { code: 'NOTICE_STALE' } });
  expect(rec.error!.message).toMatch(/deadline passed .* before the notice arrived/);
  // Give a wrongly accepted notice every chance to act: 1.5 s (a graceful stop takes 50 ms).
  await new Promise((r) => setTimeout(r, 1500));
  expect(s.count('vm1', 'batch', 'term')).toBe(0);
  expect(s.count('vm1', 'web', 'term')).toBe(0);
  expect(s.procs('vm1', 'batch')).toEqual(batchPids);
  expect(s.projectLimits('vm1', 'web').memoryMax).toBe(256 * MiB);
  expect(s.projectLimits('vm1', 'batch').memoryMax).toBe(256 * MiB);
  expect(s.vmMemory('vm1')).toBe(1024 * MiB);
  const host = (await s.hostNotices('vm1')).find((x) => x.id === n.id)!;
  expect(host.state).toBe('late'); // the operator sees the true end: nothing was taken

  // A fresh notice is carried out as usual (the refused one did not move lastSeq).
  const ok = await s.reclaim('vm1', '768MiB', 1, '20s');
  expect(ok).toMatchObject({ state: 'done', outcome: { status: 'complete' } });
  expect(ok.outcome!.projects.map((p) => [p.name, p.action])).toEqual([
    ['batch', 'stopped'],
    ['web', 'shrunk'],
  ]);
  expect(s.count('vm1', 'batch', 'term')).toBe(1);
  expect(s.vmMemory('vm1')).toBe(256 * MiB);
});

test('a cancel that arrives while its notice is being admitted is answered about that notice', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-cancel-'));
  try {
    let carried = 0;
    let release!: () => void;
    const admitted = new Promise<void>((r) => (release = r));
    const broker: LocalBroker = {
      name: 'g',
      // A slow check: the cancel comes in the middle of the admission.
      check: async () => {
        await admitted;
        return [];
      },
      carryOut: async (notice: Notice): Promise<Outcome> => {
        carried++;
        return emptyOutcome(notice);
      },
    };
    const book = new NoticeBook(dir, broker, silentLogger());
    await book.init();
    const notice = testNotice({
      id: 'n-1',
      seq: 1,
      deadline: new Date(Date.now() + 10_000).toISOString(),
    });
    const sub = book.submit(notice, 'upstream');
    const cancel = book.cancel('n-1'); // before the admission has finished
    release();
    expect((await sub).state).toBe('accepted');
    // Not NOTICE_UNKNOWN: the cancel saw the notice. Its work had begun, so it is honest
    // about that; the book did what it said.
    const answer = await cancel;
    expect(['cancelled', 'not-cancellable']).toContain(answer);
    await book.idle();
    expect(carried).toBe(answer === 'cancelled' ? 0 : 1);
    // A cancel for a notice refused as stale: as good as cancelled (nothing done, ever).
    const stale = {
      ...notice,
      id: 'n-2',
      seq: 2,
      deadline: new Date(Date.now() - 1).toISOString(),
    };
    expect(await book.submit(stale, 'upstream')).toMatchObject({
      state: 'rejected',
      error: { code: 'NOTICE_STALE' },
    });
    expect(await book.cancel('n-2')).toBe('cancelled');
    await expect(book.cancel('nope')).rejects.toMatchObject({ code: 'NOTICE_UNKNOWN' });
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});
