/**
 * The host's notice journal (agent/host/group-journal.ts) on a real temp dir: the records
 * put in one moment share their directory syncs, each in its own file as
 * agent/common/journal.ts writes it, every caller's promise resolving
 * only once its value or a newer one is on disk; a record that cannot be written fails
 * alone with JOURNAL_WRITE and leaves no temp file behind.
 */
import { promises as fsp, readdirSync, readFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { GroupJournal } from '../../../agent/host/group-journal';
import { Journal } from '../../../agent/common/journal';

let dir: string;
beforeEach(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-group-journal-'));
});
afterEach(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

/** Counts the directory syncs (each opens the directory) while `fn` runs. */
async function dirSyncs(fn: () => Promise<void>): Promise<number> {
  let n = 0;
  const open = fsp.open;
  const spy = jest.spyOn(fsp, 'open').mockImplementation(async (p, ...rest) => {
    if (p === dir) n++;
    return open(p, ...rest);
  });
  try {
    await fn();
  } finally {
    spy.mockRestore();
  }
  return n;
}

test('fifty records put at once: fifty files, far fewer directory syncs, each readable as Journal reads it', async () => {
  const j = new GroupJournal<{ n: number }>(dir);
  await j.init();
  const syncs = await dirSyncs(async () => {
    await Promise.all(Array.from({ length: 50 }, (_, n) => j.put(`notice.g${n}-1`, { n })));
  });
  // The renames done while one sync runs share the next: two when all the fdatasyncs end
  // together, a few more when they straggle on a busy disk, never one a record.
  expect(syncs).toBeGreaterThanOrEqual(1);
  expect(syncs).toBeLessThanOrEqual(25);
  const files = readdirSync(dir).sort();
  expect(files).toHaveLength(50);
  expect(files.every((f) => f.endsWith('.json'))).toBe(true);
  const plain = new Journal<{ n: number }>(dir);
  expect((await plain.all()).map((r) => r.value.n).sort((a, b) => a - b)).toEqual(
    Array.from({ length: 50 }, (_, n) => n),
  );
  expect(JSON.parse(readFileSync(path.join(dir, 'notice.g7-1.json'), 'utf8'))).toEqual({ n: 7 });
});

test('puts of a key while its write is on the disk merge into one next write; the newest value wins', async () => {
  const j = new GroupJournal<{ n: number }>(dir);
  await j.init();
  const first = j.put('a', { n: 1 });
  // After the first write has begun: one next write, merged.
  await new Promise<void>((r) => setImmediate(r));
  const later = [j.put('a', { n: 2 }), j.put('a', { n: 3 }), j.put('b', { n: 1 })];
  await first;
  await Promise.all(later);
  expect(await j.get('a')).toEqual({ n: 3 });
  expect(await j.get('b')).toEqual({ n: 1 });
  expect(readdirSync(dir).sort()).toEqual(['a.json', 'b.json']);
});

test('a record that cannot be written fails alone with JOURNAL_WRITE, no temp file left; the others of its batch are durable', async () => {
  const j = new GroupJournal<{ n: number }>(dir);
  await j.init();
  // A directory where one record's file must go: its rename fails (EISDIR).
  await fsp.mkdir(path.join(dir, 'b.json'));
  const [a, b, c] = [j.put('a', { n: 1 }), j.put('b', { n: 1 }), j.put('c', { n: 1 })];
  await expect(b).rejects.toMatchObject({ code: 'JOURNAL_WRITE' });
  await expect(a).resolves.toBeUndefined();
  await expect(c).resolves.toBeUndefined();
  expect(readdirSync(dir).sort()).toEqual(['a.json', 'b.json', 'c.json']);
  expect(await j.get('a')).toEqual({ n: 1 });
  await expect(j.put('d', { n: 1 })).resolves.toBeUndefined();
  expect(await j.get('d')).toEqual({ n: 1 });
});

test('an unsafe key is refused before anything is written', async () => {
  const j = new GroupJournal<{ n: number }>(dir);
  await j.init();
  await expect(j.put('../x', { n: 1 })).rejects.toMatchObject({ code: 'JOURNAL_WRITE' });
  await expect(j.put('x.tmp', { n: 1 })).rejects.toMatchObject({ code: 'JOURNAL_WRITE' });
  expect(readdirSync(dir)).toEqual([]);
});
