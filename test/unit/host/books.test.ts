import {
  checkReclaim,
  checkRestore,
  creditedByOutcome,
  missing,
  newBooks,
} from '../../../agent/host/books';

const GiB = 1024 ** 3;
const books = () => ({
  ...newBooks('vm1', { memoryBytes: 8 * GiB, cpus: 4 }, { memoryBytes: 2 * GiB, cpus: 1 }),
});

test('a reclaim within the books leaves the new allocation', () => {
  expect(checkReclaim(books(), { memoryBytes: 2 * GiB, cpus: 1.5 })).toEqual({
    ok: true,
    allocation: { memoryBytes: 6 * GiB, cpus: 2.5 },
  });
});

test('never more than the guest has, never below its floor: every problem named with field and value', () => {
  const r = checkReclaim(books(), { memoryBytes: 7 * GiB, cpus: 5 });
  expect(r.ok).toBe(false);
  if (r.ok) return;
  expect(r.problems).toEqual([
    { field: 'memory', value: 7 * GiB, message: expect.stringContaining('below its floor') },
    { field: 'cpus', value: 5, message: expect.stringContaining('cannot take 5') },
  ]);
});

test('CPUs add up in thousandths (0.1 + 0.2 = 0.3 exactly)', () => {
  const b = books();
  b.granted.cpus = 1.3;
  expect(checkReclaim(b, { memoryBytes: 0, cpus: 0.3 }).ok).toBe(true);
  expect(checkReclaim(b, { memoryBytes: 0, cpus: 0.301 }).ok).toBe(false);
});

test('a restore never goes above the configured allocation', () => {
  const b = books();
  b.granted = { memoryBytes: 6 * GiB, cpus: 3 };
  expect(missing(b)).toEqual({ memoryBytes: 2 * GiB, cpus: 1 });
  expect(checkRestore(b, { memoryBytes: 2 * GiB, cpus: 1 })).toEqual({
    ok: true,
    allocation: { memoryBytes: 8 * GiB, cpus: 4 },
  });
  const r = checkRestore(b, { memoryBytes: 3 * GiB, cpus: 0 });
  expect(r).toMatchObject({ ok: false, problems: [{ field: 'memory', value: 3 * GiB }] });
});

test('a guest claiming to free more than the notice asked is credited only the notice', () => {
  expect(
    creditedByOutcome({ memoryBytes: GiB, cpus: 1 }, { memoryBytes: 100 * GiB, cpus: 64 }),
  ).toEqual({
    memoryBytes: GiB,
    cpus: 1,
  });
});
