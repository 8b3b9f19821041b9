/**
 * The journal's group commit on a real temp dir: puts of one key that arrive
 * together share a write, every caller's promise resolves only once its value (or a newer
 * one) is on disk, and a notice's steps go in one record holding every child.
 */
import { promises as fsp, readdirSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Journal } from '../../../agent/common/journal';
import { NoticeStepJournal, type StepStore } from '../../../agent/broker/broker';

let dir: string;
beforeEach(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-journal-'));
});
afterEach(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

test('a hundred puts of one key at once: far fewer writes, each caller sees its value or a newer one on disk', async () => {
  const j = new Journal<{ n: number }>(dir);
  await j.init();
  let writes = 0;
  const rename = fsp.rename;
  const spy = jest.spyOn(fsp, 'rename').mockImplementation(async (a, b) => {
    writes++;
    return rename(a, b);
  });
  try {
    const seen: number[] = [];
    await Promise.all(
      Array.from({ length: 100 }, (_, n) =>
        j.put('rec', { n }).then(async () => seen.push((await j.get('rec'))!.n)),
      ),
    );
    for (const n of seen) expect(n).toBe(99);
    expect(writes).toBeLessThanOrEqual(2);
  } finally {
    spy.mockRestore();
  }
  expect(await j.get('rec')).toEqual({ n: 99 });
  expect(readdirSync(dir)).toEqual(['rec.json']); // no temp file left
});

test('a put after a write began waits for the next write, which holds it', async () => {
  const j = new Journal<{ n: number }>(dir);
  await j.init();
  const first = j.put('rec', { n: 1 });
  await new Promise((r) => setImmediate(r)); // the first write is under way
  const second = j.put('rec', { n: 2 });
  await first;
  await second;
  expect(await j.get('rec')).toEqual({ n: 2 });
});

test('a bad key is refused with JOURNAL_WRITE, nothing written', async () => {
  const j = new Journal<object>(dir);
  await j.init();
  await expect(j.put('../escape', {})).rejects.toMatchObject({ code: 'JOURNAL_WRITE' });
  expect(readdirSync(dir)).toEqual([]);
});

test("a notice's steps: one record with every child, read back by a new journal (a restart)", async () => {
  const store = new Journal(dir) as unknown as StepStore<string>;
  await (store as unknown as Journal<unknown>).init();
  const steps = new NoticeStepJournal<string>(store, 'n-1--steps');
  await Promise.all(
    Array.from({ length: 100 }, (_, i) =>
      steps.put(`p${i}`, { startedAt: 'then', outcome: `done ${i}` }),
    ),
  );
  expect(readdirSync(dir)).toEqual(['n-1--steps.json']);
  const again = new NoticeStepJournal<string>(store, 'n-1--steps');
  expect(await again.get('p42')).toEqual({ startedAt: 'then', outcome: 'done 42' });
  expect(await again.get('p100')).toBeUndefined();
});
