import { parseCpus, parseDuration, parseSize, formatBytes } from '../../../agent/common/units';

describe('sizes as operators write them', () => {
  test.each([
    ['1048576', 1048576],
    [4096, 4096],
    ['512MiB', 512 * 1024 ** 2],
    ['512M', 512 * 1024 ** 2],
    ['2G', 2 * 1024 ** 3],
    ['1.5GiB', 1.5 * 1024 ** 3],
    ['1GB', 1e9],
    ['64 KiB', 65536],
  ])('%p is %p bytes', (input, bytes) => {
    expect(parseSize(input)).toEqual({ ok: true, value: bytes });
  });

  test.each([['-1'], [-1], [''], ['max'], ['12XB'], ['1e9'], [null], [1.5], ['99999999999999TiB']])(
    '%p is refused with the value named',
    (input) => {
      const r = parseSize(input);
      expect(r.ok).toBe(false);
      if (!r.ok) expect(r.message).toMatch(/got|unit|too large/);
    },
  );
});

describe('durations', () => {
  test.each([
    ['30s', 30000],
    ['2m', 120000],
    ['500ms', 500],
    ['1h', 3600000],
    [250, 250],
  ])('%p is %p ms', (input, ms) => {
    expect(parseDuration(input)).toEqual({ ok: true, value: ms });
  });
  test.each([['-5s'], ['5 days'], ['8760h'], [NaN], [{}]])('%p is refused', (input) => {
    expect(parseDuration(input).ok).toBe(false);
  });
});

describe('cpus', () => {
  test('fractions are fine, negatives and words are not', () => {
    expect(parseCpus('0.5')).toEqual({ ok: true, value: 0.5 });
    expect(parseCpus(2)).toEqual({ ok: true, value: 2 });
    expect(parseCpus(-1).ok).toBe(false);
    expect(parseCpus('two').ok).toBe(false);
    expect(parseCpus(Infinity).ok).toBe(false);
  });
});

test('formatBytes picks the largest binary unit', () => {
  expect(formatBytes(512 * 1024 ** 2)).toBe('512MiB');
  expect(formatBytes(1536)).toBe('1.5KiB');
  expect(formatBytes('max')).toBe('max');
});
