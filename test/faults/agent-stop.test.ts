/**
 * The agent told to stop (SIGTERM: `systemctl restart`, a package upgrade) in the middle of
 * its notices. A notice being carried out must not be recorded `done` with whatever its
 * steps said once the abort reached them (that outcome would have gone upstream as the
 * answer); it stays `running` for the next start, which resumes it. A notice queued behind
 * it is not begun. And an outcome that was complete before the stop is journaled, logged
 * and handed upstream before the agent exits (drain): a CI run of the real-guest test
 * caught an agent exiting between the journal write and the rest.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NoticeBook, noticeKey, type LocalBroker } from '../../agent/client/notices';
import { silentLogger } from '../../agent/common/log';
import type { Notice, Outcome } from '../../agent/broker/types';
import { emptyOutcome, testNotice } from '../helpers/notices';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-agent-stop-'));
});
afterEach(() => fs.rm(dir, { recursive: true, force: true }));

const soon = () => new Date(Date.now() + 30_000).toISOString();

/** The record of a notice as the journal holds it on disk. */
async function onDisk(id: string): Promise<{ state: string; runs: number; outcome?: Outcome }> {
  return JSON.parse(await fs.readFile(path.join(dir, 'notices', `${noticeKey(id)}.json`), 'utf8'));
}

function gate(): { wait: Promise<void>; open: () => void } {
  let open!: () => void;
  const wait = new Promise<void>((r) => (open = r));
  return { wait, open };
}

test('stopped mid-notice: not recorded done, the queued one not begun; the next start resumes both', async () => {
  const calls: { id: string; resumed: boolean }[] = [];
  const first = gate();
  const broker: LocalBroker = {
    name: 'g',
    check: async () => [],
    carryOut: async (n: Notice, ctx): Promise<Outcome> => {
      calls.push({ id: n.id, resumed: ctx.resumed });
      if (calls.length === 1) {
        await first.wait;
        // What the steps report once the abort reached them: nothing done as planned.
        return { ...emptyOutcome(n), status: 'failed' };
      }
      return emptyOutcome(n);
    },
  };
  const book = new NoticeBook(dir, broker, silentLogger());
  await book.init();
  const a = await book.submit(testNotice({ id: 'n-1', seq: 1, deadline: soon() }), 'upstream');
  const b = await book.submit(testNotice({ id: 'n-2', seq: 2, deadline: soon() }), 'upstream');
  expect([a.state, b.state]).toEqual(['accepted', 'accepted']);
  while (calls.length === 0) await new Promise((r) => setTimeout(r, 5));

  book.close();
  first.open();
  await expect(a.outcome).rejects.toMatchObject({ code: 'AGENT_STOPPING' });
  await expect(b.outcome).rejects.toMatchObject({ code: 'AGENT_STOPPING' });
  await book.drain();
  // n-1 was begun and stays running, its "failed" never journaled; n-2 was never begun.
  expect(calls).toEqual([{ id: 'n-1', resumed: false }]);
  expect(await onDisk('n-1')).toMatchObject({ state: 'running', runs: 1 });
  expect((await onDisk('n-1')).outcome).toBeUndefined();
  expect(await onDisk('n-2')).toMatchObject({ state: 'accepted', runs: 0 });

  // The next start: both carried out, n-1 as a resumed run.
  const next = new NoticeBook(dir, broker, silentLogger());
  await next.init();
  const outcomes = await Promise.all(next.resume());
  expect(outcomes.map((o) => [o.noticeId, o.status])).toEqual([
    ['n-1', 'complete'],
    ['n-2', 'complete'],
  ]);
  expect(calls.slice(1)).toEqual([
    { id: 'n-1', resumed: true },
    { id: 'n-2', resumed: false },
  ]);
  expect(await onDisk('n-1')).toMatchObject({ state: 'done', runs: 2 });
  next.close();
});

/**
 * A book whose notices complete at once, with its final journal write (the record with
 * state done) held at `hold` — the window a SIGTERM can land in. The journal underneath is
 * the real one; `started` resolves when the final write is reached.
 */
async function bookWithFinalWriteHeld(
  hold: Promise<void>,
): Promise<{ book: NoticeBook; started: Promise<void> }> {
  const broker: LocalBroker = {
    name: 'g',
    check: async () => [],
    carryOut: async (n: Notice) => emptyOutcome(n),
  };
  const book = new NoticeBook(dir, broker, silentLogger());
  await book.init();
  const journal = (book as unknown as { notices: { put(k: string, v: unknown): Promise<void> } })
    .notices;
  const put = journal.put.bind(journal);
  const reached = gate();
  journal.put = async (k, v) => {
    if ((v as { state?: string }).state === 'done') {
      reached.open();
      await hold;
    }
    return put(k, v);
  };
  return { book, started: reached.wait };
}

test('stopped while a complete outcome is being journaled: drain waits until it is written and handed on', async () => {
  const finalWrite = gate();
  const { book, started } = await bookWithFinalWriteHeld(finalWrite.wait);
  const emitted: string[] = [];
  book.on('outcome', (o: Outcome) => emitted.push(o.noticeId));

  const sub = await book.submit(testNotice({ id: 'n-1', seq: 1, deadline: soon() }), 'upstream');
  await started;
  book.close();
  let drained = false;
  const draining = book.drain().then(() => (drained = true));
  await new Promise((r) => setTimeout(r, 50));
  expect(drained).toBe(false);
  expect(emitted).toEqual([]);

  finalWrite.open();
  await draining;
  expect(emitted).toEqual(['n-1']);
  expect((await sub.outcome!).status).toBe('complete');
  expect(await onDisk('n-1')).toMatchObject({ state: 'done', runs: 1 });
});

test('drain gives up after its timeout rather than hold the stop forever', async () => {
  // A disk that never answers the final write.
  const { book, started } = await bookWithFinalWriteHeld(new Promise<void>(() => undefined));
  await book.submit(testNotice({ id: 'n-1', seq: 1, deadline: soon() }), 'upstream');
  await started;
  book.close();
  const t0 = Date.now();
  await book.drain(200);
  const took = Date.now() - t0;
  expect(took).toBeGreaterThanOrEqual(190);
  expect(took).toBeLessThan(2_000);
});
