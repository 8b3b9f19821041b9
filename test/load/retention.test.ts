/**
 * Memory and disk flat under a long run of notices (docs/reliability.md, "Load held"): both
 * daemons keep only the last RETAIN_FINAL_NOTICES finished notices in memory (per guest on
 * the host). What must not change while they are dropped:
 *
 *  - host: the books. Older notices are folded into a ledger base, written to disk before
 *    their files are deleted, so the allocation, the seq and the next check are exactly
 *    what a replay of every notice would give, before and after a restart (which loads
 *    the base and the notices left);
 *  - guest: exactly-once. A replay of a notice long gone from memory is answered
 *    `duplicate` with its journaled outcome, not carried out again; lastSeq survives; past
 *    retainOnDisk the oldest records leave the disk and a replay is refused by its seq.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NoticeBook, RETAIN_FINAL_NOTICES, type LocalBroker } from '../../agent/client/notices';
import { silentLogger } from '../../agent/common/log';
import type { Notice, Outcome } from '../../agent/broker/types';
import { RETAIN_FINAL_NOTICES as HOST_RETAIN } from '../../agent/host/host-broker';
import { startOneGuestBroker } from '../integration/host/one-guest-broker';
import { ScriptedGuest } from '../integration/host/scripted-guest';
import { emptyOutcome, testNotice } from '../helpers/notices';

jest.setTimeout(60_000);

const MiB = 1024 * 1024;
const log = silentLogger();
const N = 300; // beyond the 256 kept

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-retention-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

test(`host: ${N} notices, at most ${HOST_RETAIN} kept in memory, the books exact before and after a restart`, async () => {
  const channel = path.join(dir, 'vm1.sock');
  const guest = await ScriptedGuest.listen('vm1', channel);
  // The scripted guest carries out every notice at once.
  guest.channel.on('message', (m) => {
    if (m.type !== 'notice' && m.type !== 'restore') return;
    guest.ack(m.id, m.notice.id, 'accepted');
    guest.outcome(m.notice, 'complete');
  });
  const make = () =>
    startOneGuestBroker({ dir, adapter: null, channel, log, heartbeatTimeout: '5s' });
  let broker = await make();
  try {
    for (let i = 0; i < N; i++) {
      const kind = i % 2 === 0 ? 'reclaim' : 'restore';
      const { done } = await broker.issue(kind, {
        guest: 'vm1',
        change:
          kind === 'reclaim' ? { memoryBytes: 128 * MiB, cpus: 0.5 } : { memoryBytes: 0, cpus: 0 },
        deadlineMs: 10_000,
      });
      expect((await done).state).toBe('done');
    }
    // What was folded is off the disk too, once its base is: as many files as in memory.
    await broker.pruned();
    const noticeFiles = async (): Promise<string[]> =>
      (await fs.readdir(path.join(dir, 'host-state', 'notices'))).filter((f) =>
        f.endsWith('.json'),
      );
    expect(broker.notices('vm1').length).toBeLessThanOrEqual(HOST_RETAIN);
    expect((await noticeFiles()).length).toBe(broker.notices('vm1').length);
    const base = JSON.parse(
      await fs.readFile(path.join(dir, 'host-state', 'ledger', 'base.vm1.json'), 'utf8'),
    ) as { seq: number; folded: number };
    expect(base.seq + broker.notices('vm1').length).toBe(N);
    expect(base.folded).toBe(base.seq);
    const books = broker.status('vm1').books;
    expect(books).toMatchObject({ seq: N, granted: { cpus: 2, memoryBytes: 1024 * MiB } });
    // One more reclaim: checked against the folded books, numbered after all of them.
    const last = await broker.issue('reclaim', {
      guest: 'vm1',
      change: { memoryBytes: 128 * MiB, cpus: 0.5 },
      deadlineMs: 10_000,
    });
    expect(last.record.notice.seq).toBe(N + 1);
    expect((await last.done).state).toBe('done');
    const after = broker.status('vm1').books;
    expect(after.granted).toEqual({ cpus: 1.5, memoryBytes: 896 * MiB });
    // A restart loads the base and the notices left, and folds them the same way.
    await broker.stop();
    broker = await make();
    expect(broker.status('vm1').books).toEqual(after);
    expect(broker.notices('vm1').length).toBeLessThanOrEqual(HOST_RETAIN);
    // A crash after a base was written and before the notices it folded were deleted:
    // such a notice, still on disk, is not counted twice, and is deleted at the start.
    await broker.stop();
    const stale = path.join(dir, 'host-state', 'notices', 'notice.vm1-1-stale.json');
    // A reclaim that was done: on the books it would take 128 MiB and 0.5 CPU again.
    const reclaim = broker.notices('vm1').find((r) => r.notice.kind === 'reclaim')!;
    expect(reclaim.state).toBe('done');
    const first = { ...reclaim, notice: { ...reclaim.notice, id: 'vm1-1-stale', seq: 1 } };
    await fs.writeFile(stale, JSON.stringify(first));
    broker = await make();
    expect(broker.status('vm1').books).toEqual(after);
    await broker.pruned();
    await expect(fs.stat(stale)).rejects.toMatchObject({ code: 'ENOENT' });
  } finally {
    await broker.stop();
    await guest.close();
  }
});

test(`guest: ${N} notices, at most ${RETAIN_FINAL_NOTICES} in memory, a replay of the first still answered from the journal`, async () => {
  let carried = 0;
  const broker: LocalBroker = {
    name: 'g',
    check: async () => [],
    carryOut: async (notice: Notice): Promise<Outcome> => {
      carried++;
      return emptyOutcome(notice, { memoryBytes: notice.seq, cpus: 0 });
    },
  };
  const notice = (seq: number): Notice => testNotice({ id: `n-${seq}`, seq });
  let book = new NoticeBook(dir, broker, log);
  await book.init();
  for (let seq = 1; seq <= N; seq++) {
    const sub = await book.submit(notice(seq), 'upstream');
    expect(sub.state).toBe('accepted');
    await sub.outcome;
  }
  expect(carried).toBe(N);
  expect(book.list().length).toBeLessThanOrEqual(RETAIN_FINAL_NOTICES);
  expect(book.get('n-1')).toBeUndefined(); // gone from memory...
  const replay = await book.submit(notice(1), 'upstream');
  expect(replay.state).toBe('duplicate'); // ...answered from the journal
  expect((await replay.outcome)!.freed.memoryBytes).toBe(1);
  expect(await book.cancel('n-1')).toBe('not-cancellable');
  expect(carried).toBe(N);
  // Restart: lastSeq from every record, memory bounded again.
  book = new NoticeBook(dir, broker, log);
  await book.init();
  expect(book.lastSeq).toBe(N);
  expect(book.list().length).toBeLessThanOrEqual(RETAIN_FINAL_NOTICES);
  expect((await book.submit(notice(2), 'upstream')).state).toBe('duplicate');
  expect(carried).toBe(N);
});

test('guest: beyond retainOnDisk the oldest finished records leave the disk; a replay of one is refused as stale, lastSeq kept', async () => {
  let carried = 0;
  const broker: LocalBroker = {
    name: 'g',
    check: async () => [],
    carryOut: async (notice: Notice, ctx): Promise<Outcome> => {
      carried++;
      await ctx.steps.put('_plan', { outcome: { seq: notice.seq } }); // a step record, as the guest's
      return emptyOutcome(notice);
    },
  };
  const notice = (id: string, seq: number): Notice => testNotice({ id, seq });
  const RETAIN = 50;
  const files = async (sub: string): Promise<string[]> =>
    (await fs.readdir(path.join(dir, sub))).filter((f) => f.endsWith('.json')).sort();
  let book = new NoticeBook(dir, broker, log, { retainOnDisk: RETAIN });
  await book.init();
  for (let seq = 1; seq <= 120; seq++) {
    const sub = await book.submit(notice(`u-${seq}`, seq), 'upstream');
    await sub.outcome;
  }
  // Then local notices (nestctl on the guest: no seq order), more than RETAIN of them:
  // the newest upstream record must stay, or a restart would forget lastSeq.
  for (let i = 1; i <= 80; i++) await (await book.submit(notice(`l-${i}`, 0), 'local')).outcome;
  await book.pruned();
  const kept = await files('notices');
  expect(kept).toHaveLength(RETAIN);
  expect(kept).toContain('u-120.json');
  expect(kept).not.toContain('u-119.json');
  expect(kept).not.toContain('l-1.json'); // the oldest local ones went
  expect(kept).toContain('l-80.json');
  // Step records go with their notices.
  expect((await files('steps')).map((f) => f.replace('--steps', ''))).toEqual(kept);
  // A replay of a deleted notice: refused as stale (its seq), not carried out again.
  expect(await book.submit(notice('u-3', 3), 'upstream')).toMatchObject({
    state: 'rejected',
    error: { code: 'NOTICE_STALE' },
  });
  expect(carried).toBe(200);
  // After a restart: lastSeq from the record kept for it, and the replay still refused.
  book = new NoticeBook(dir, broker, log, { retainOnDisk: RETAIN });
  await book.init();
  expect(book.lastSeq).toBe(120);
  expect((await book.submit(notice('u-7', 7), 'upstream')).state).toBe('rejected');
  expect((await book.submit(notice('u-121', 121), 'upstream')).state).toBe('accepted');
  await book.idle();
  expect(carried).toBe(201);
  await book.pruned();
  expect((await files('notices')).length).toBeLessThanOrEqual(RETAIN);
});
