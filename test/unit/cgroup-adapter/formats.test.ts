/** Parser/printer tables on fixture text: what the kernel shows, what we write. */
import { isCgroupError } from '../../../cgroup-adapter/errors';
import {
  cpuMaxToCpus,
  normalizeCpuList,
  parseCgroupEvents,
  parseCpuList,
  parseCpuMax,
  parseCpuStatV2,
  parseCpuWeight,
  parseFlatKeyed,
  parseMax,
  parseMemoryEvents,
  parseMemoryStat,
  parsePressure,
  printCpuList,
  printCpuMax,
  printCpuWeight,
  printMax,
} from '../../../cgroup-adapter/formats';
import {
  cpuSharesToWeight,
  cpuWeightToShares,
  parseCfsQuota,
  parseCpuStatV1,
  parseCpuacctUsage,
  parseOomControl,
  parseV1Bytes,
  printCfsQuota,
  printV1Bytes,
} from '../../../cgroup-adapter/formats-v1';

function codeOf(f: () => unknown): string | undefined {
  try {
    f();
  } catch (e) {
    return isCgroupError(e) ? e.code : 'NOT_CGROUP_ERROR';
  }
  return undefined;
}

describe('the max token (memory.*, pids.max)', () => {
  it.each([
    ['max', 'max'],
    [0, '0'],
    [67108864, '67108864'],
  ] as const)('prints %p as %p', (v, text) => expect(printMax('memory.max', v)).toBe(text));

  it.each([-1, 1.5, NaN, '', '-1', '100', Infinity, 2 ** 60])('refuses %p: never -1 or ""', (v) =>
    expect(codeOf(() => printMax('memory.max', v as never))).toBe('LIMIT_INVALID'),
  );

  it('names the field and the value in the message', () => {
    expect(() => printMax('memory.max', -1)).toThrow(/memory\.max .*got "-1"/);
  });

  it.each([
    ['max\n', 'max'],
    ['1048576\n', 1048576],
  ] as const)('parses %p', (t, v) => expect(parseMax('memory.max', t)).toBe(v));

  it.each(['', '-1', 'unlimited', '1e6'])('does not parse %p', (t) =>
    expect(codeOf(() => parseMax('memory.max', t))).toBe('PARSE_FAILED'),
  );
});

describe('cpu.max "QUOTA PERIOD"', () => {
  it.each([
    [{ quotaUs: 'max', periodUs: 100000 }, 'max 100000'],
    [{ quotaUs: 50000, periodUs: 100000 }, '50000 100000'],
    [{ quotaUs: 1000, periodUs: 1000 }, '1000 1000'],
    [{ quotaUs: 200000, periodUs: 1000000 }, '200000 1000000'],
  ] as const)('prints %j as %p and parses it back', (v, text) => {
    expect(printCpuMax(v)).toBe(text);
    expect(parseCpuMax(`${text}\n`)).toEqual(v);
  });

  it.each([
    [{ quotaUs: 999, periodUs: 100000 }, 'quota below 1 ms'],
    [{ quotaUs: 50000, periodUs: 999 }, 'period below 1 ms'],
    [{ quotaUs: 50000, periodUs: 1000001 }, 'period above 1 s'],
    [{ quotaUs: -1, periodUs: 100000 }, 'quota -1 (v1 spelling)'],
    [{ quotaUs: 0, periodUs: 100000 }, 'zero quota'],
    [{ quotaUs: 1.5e4, periodUs: 100000.5 }, 'fractional period'],
    [{ quotaUs: 2 ** 44, periodUs: 100000 }, 'quota above MAX_BW'],
  ])('refuses %j (%s) as the kernel would', (v) =>
    expect(codeOf(() => printCpuMax(v as never))).toBe('LIMIT_INVALID'),
  );

  it.each(['', 'max', '50000', '-1 100000', '50000 100000 1'])('does not parse %p', (t) =>
    expect(codeOf(() => parseCpuMax(t))).toBe('PARSE_FAILED'),
  );

  it('says how many CPUs a cpu.max is worth', () => {
    expect(cpuMaxToCpus({ quotaUs: 150000, periodUs: 100000 })).toBe(1.5);
    expect(cpuMaxToCpus({ quotaUs: 'max', periodUs: 100000 })).toBe(Infinity);
  });
});

describe('cpu.weight and its v1 cpu.shares', () => {
  it.each([1, 100, 10000])('weight %p round-trips', (w) =>
    expect(parseCpuWeight(printCpuWeight(w))).toBe(w),
  );
  it.each([0, 10001, 1.5, -1])('refuses weight %p', (w) =>
    expect(codeOf(() => printCpuWeight(w))).toBe('LIMIT_INVALID'),
  );

  // systemd: shares = clamp(weight * 1024 / 100, 2, 262144); the defaults match.
  it.each([
    [1, 10],
    [100, 1024],
    [200, 2048],
    [10000, 102400],
  ])('weight %p → shares %p', (w, s) => expect(cpuWeightToShares(w)).toBe(s));

  it('every weight survives weight → shares → weight', () => {
    for (let w = 1; w <= 10000; w++) expect(cpuSharesToWeight(cpuWeightToShares(w))).toBe(w);
  });

  it.each([
    [2, 1],
    [1024, 100],
    [262144, 10000],
  ])('shares %p (kernel range 2..262144) → weight %p', (s, w) =>
    expect(cpuSharesToWeight(s)).toBe(w),
  );
  it.each([1, 262145])('refuses shares %p', (s) =>
    expect(codeOf(() => cpuSharesToWeight(s))).toBe('LIMIT_INVALID'),
  );
});

describe('flat keyed files', () => {
  it('memory.events (v2)', () => {
    expect(
      parseMemoryEvents('low 0\nhigh 12\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n'),
    ).toEqual({
      low: 0,
      high: 12,
      max: 3,
      oom: 2,
      oomKill: 1,
      oomGroupKill: 0,
    });
    // Before 5.17 there is no oom_group_kill; missing keys read 0.
    expect(parseMemoryEvents('low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n').oomGroupKill).toBe(0);
  });

  it('memory.stat', () => {
    const s = parseMemoryStat('anon 4096\nfile 8192\nkernel_stack 16384\npgfault 5\n');
    expect(s).toMatchObject({ anon: 4096, file: 8192, pgfault: 5 });
  });

  it('cpu.stat (v2, with and without the cpu controller)', () => {
    const full =
      'usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\nnr_throttled 4\nthrottled_usec 250\nnr_bursts 0\nburst_usec 0\n';
    expect(parseCpuStatV2(full)).toEqual({
      usageUs: 1500,
      userUs: 1000,
      systemUs: 500,
      nrPeriods: 10,
      nrThrottled: 4,
      throttledUs: 250,
    });
    const core = 'usage_usec 7\nuser_usec 5\nsystem_usec 2\nnice_usec 0\n';
    expect(parseCpuStatV2(core)).toMatchObject({ usageUs: 7, nrPeriods: 0, nrThrottled: 0 });
  });

  it('cpu.stat (v1: throttled_time in ns → µs)', () => {
    expect(
      parseCpuStatV1(
        'nr_periods 50\nnr_throttled 45\nthrottled_time 2250000000\nnr_bursts 0\nburst_time 0\n',
      ),
    ).toEqual({
      nrPeriods: 50,
      nrThrottled: 45,
      throttledUs: 2250000,
    });
  });

  it('cpuacct.usage (ns → µs)', () => expect(parseCpuacctUsage('1234567\n')).toBe(1234));

  it('cgroup.events', () => {
    expect(parseCgroupEvents('populated 1\nfrozen 0\n')).toEqual({
      populated: true,
      frozen: false,
    });
    expect(parseCgroupEvents('populated 0\nfrozen 1\n')).toEqual({
      populated: false,
      frozen: true,
    });
    expect(parseCgroupEvents('populated 0\n')).toEqual({ populated: false, frozen: false });
  });

  it('memory.oom_control (v1)', () => {
    expect(parseOomControl('oom_kill_disable 0\nunder_oom 0\noom_kill 3\n')).toEqual({
      oomKillDisable: false,
      underOom: false,
      oomKill: 3,
    });
    expect(parseOomControl('oom_kill_disable 1\nunder_oom 1\n')).toEqual({
      oomKillDisable: true,
      underOom: true,
      oomKill: 0,
    });
  });

  it.each(['key', 'key -1', 'a 1 2', 'populated yes'])('refuses line %p', (t) =>
    expect(codeOf(() => parseFlatKeyed(t, 'x'))).toBe('PARSE_FAILED'),
  );
});

describe('PSI', () => {
  it('parses some and full', () => {
    const p = parsePressure(
      'some avg10=1.50 avg60=0.25 avg300=0.00 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n',
    );
    expect(p).toEqual({
      some: { avg10: 1.5, avg60: 0.25, avg300: 0, totalUs: 123456 },
      full: { avg10: 0, avg60: 0, avg300: 0, totalUs: 0 },
    });
  });
  it('accepts a file without full (cpu.pressure before 5.13)', () => {
    expect(parsePressure('some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n').full).toBeUndefined();
  });
  it.each([
    '',
    'full avg10=0.00 avg60=0.00 avg300=0.00 total=0',
    'some avg10=x avg60=0 avg300=0 total=0',
  ])('refuses %p', (t) => expect(codeOf(() => parsePressure(t))).toBe('PARSE_FAILED'));
});

describe('cpuset lists', () => {
  it.each([
    ['0', [0]],
    ['0-3', [0, 1, 2, 3]],
    ['0-1,4,6-7\n', [0, 1, 4, 6, 7]],
    ['', []],
  ])('parses %p', (t, ids) => expect(parseCpuList(t)).toEqual(ids));
  it.each([
    [[0, 1, 2, 3], '0-3'],
    [[3, 1, 0, 2, 7], '0-3,7'],
    [[5], '5'],
  ])('prints %j as %p', (ids, t) => expect(printCpuList(ids)).toBe(t));
  it.each(['3-1', 'a', '0,,1', '-1', '0-99999'])('refuses %p', (t) =>
    expect(codeOf(() => parseCpuList(t))).toBe('LIMIT_INVALID'),
  );
  it('normalizes what we write and never writes ""', () => {
    expect(normalizeCpuList('1,0')).toBe('0-1');
    expect(codeOf(() => normalizeCpuList(''))).toBe('LIMIT_INVALID');
  });
});

describe('v1 formats (hybrid driver only)', () => {
  it.each([
    ['9223372036854771712\n', 'max'],
    ['-1', 'max'],
    ['67108864\n', 67108864],
  ] as const)('memory.limit_in_bytes %p reads %p', (t, v) =>
    expect(parseV1Bytes('memory.limit_in_bytes', t)).toBe(v),
  );
  it('writes unlimited as -1: the v1 kernel format, never used for v2 files', () => {
    expect(printV1Bytes('memory.max', 'max')).toBe('-1');
    expect(printV1Bytes('memory.max', 4096)).toBe('4096');
    expect(printCfsQuota('max')).toBe('-1');
    expect(printCfsQuota(50000)).toBe('50000');
    expect(parseCfsQuota('-1\n')).toBe('max');
    expect(parseCfsQuota('25000\n')).toBe(25000);
  });
  it('refuses negative bytes other than the v1 -1', () => {
    expect(codeOf(() => printV1Bytes('memory.max', -5 as never))).toBe('LIMIT_INVALID');
  });
});
