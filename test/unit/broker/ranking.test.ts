import {
  byName,
  byPriorityAsc,
  byUsageAboveMinDesc,
  givesFirst,
  keepsFirst,
  orderedBy,
  reversed,
  type Rankable,
} from '../../../agent/broker/ranking';

const names = (xs: Rankable[]) => xs.map((x) => x.name);

describe('comparators compose into a ranking of who gives first', () => {
  const pool: Rankable[] = [
    { name: 'web', priority: 100, usageAboveMin: 0.5 },
    { name: 'batch-b', priority: 10, usageAboveMin: 0.1 },
    { name: 'batch-a', priority: 10, usageAboveMin: 0.1 },
    { name: 'batch-fat', priority: 10, usageAboveMin: 0.4 },
    { name: 'cache', priority: 50, usageAboveMin: 0 },
  ];

  test.each([
    {
      case: 'lowest priority first, then most above its minimum, then by name',
      cmp: givesFirst,
      want: ['batch-fat', 'batch-a', 'batch-b', 'cache', 'web'],
    },
    {
      case: 'keepsFirst is exactly the reverse (so ties by name mirror too)',
      cmp: keepsFirst,
      want: ['web', 'cache', 'batch-b', 'batch-a', 'batch-fat'],
    },
    {
      case: 'priority alone keeps the input order of equals (stable sort)',
      cmp: orderedBy<Rankable>(byPriorityAsc),
      want: ['batch-b', 'batch-a', 'batch-fat', 'cache', 'web'],
    },
    {
      case: 'name alone',
      cmp: byName,
      want: ['batch-a', 'batch-b', 'batch-fat', 'cache', 'web'],
    },
    {
      case: 'reversed name',
      cmp: reversed(byName),
      want: ['web', 'cache', 'batch-fat', 'batch-b', 'batch-a'],
    },
  ])('$case', ({ cmp, want }) => {
    expect(names(pool.slice().sort(cmp))).toEqual(want);
    // The input order does not matter for a ranking that ends with byName.
    if (cmp === givesFirst || cmp === keepsFirst)
      expect(names(pool.slice().reverse().sort(cmp))).toEqual(want);
  });

  test('a child with unknown usage gives before one we can see is lean (missing data rule)', () => {
    const xs: Rankable[] = [
      { name: 'seen', priority: 1, usageAboveMin: 0.9 },
      { name: 'unseen', priority: 1 },
      { name: 'nan', priority: 1, usageAboveMin: Number.NaN },
    ];
    expect(names(xs.sort(orderedBy<Rankable>(byUsageAboveMinDesc, byName)))).toEqual([
      'nan',
      'unseen',
      'seen',
    ]);
  });

  test('byName compares code units, not the locale (uppercase before lowercase)', () => {
    expect(byName({ name: 'B' }, { name: 'a' })).toBeLessThan(0);
    expect(byName({ name: 'a' }, { name: 'a' })).toBe(0);
  });

  test('the host can rank guests with the same comparators', () => {
    const guests = [
      { name: 'vm2', priority: 5, usageAboveMin: 0.2, memoryBytes: 1 },
      { name: 'vm1', priority: 5, usageAboveMin: 0.3, memoryBytes: 2 },
      { name: 'vm3', priority: 9, usageAboveMin: 0.9, memoryBytes: 3 },
    ];
    expect(guests.sort(givesFirst).map((g) => g.name)).toEqual(['vm1', 'vm2', 'vm3']);
  });
});
