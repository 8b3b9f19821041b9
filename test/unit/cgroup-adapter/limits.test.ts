/** Limits are checked before anything touches the disk, every problem reported at once. */
import { isCgroupError } from '../../../cgroup-adapter/errors';
import { validateLimits } from '../../../cgroup-adapter/limits';

describe('validateLimits', () => {
  it('passes good limits through, cpus in canonical form', () => {
    expect(
      validateLimits({
        memory: { min: 0, low: 1024, high: 'max', max: 4096 },
        cpu: { max: { quotaUs: 50000, periodUs: 100000 }, weight: 100 },
        cpus: '1,0',
        pidsMax: 'max',
      }),
    ).toEqual({
      memory: { min: 0, low: 1024, high: 'max', max: 4096 },
      cpu: { max: { quotaUs: 50000, periodUs: 100000 }, weight: 100 },
      cpus: '0-1',
      pidsMax: 'max',
    });
  });

  it('reports every problem at once, each naming its field and value', () => {
    try {
      validateLimits({
        memory: { max: -1, min: 'max' as never },
        cpu: { max: { quotaUs: 10, periodUs: 100000 }, weight: 0 },
        cpus: '',
        pidsMax: -1,
        swap: 1,
      } as never);
      throw new Error('expected LIMIT_INVALID');
    } catch (e) {
      expect(isCgroupError(e, 'LIMIT_INVALID')).toBe(true);
      if (!isCgroupError(e)) return;
      expect(e.problems.map((p) => p.field).sort()).toEqual(
        [
          'limits.swap',
          'limits.memory.max',
          'limits.memory.min',
          'limits.cpu.max',
          'limits.cpu.weight',
          'limits.cpus',
          'limits.pidsMax',
        ].sort(),
      );
      expect(e.message).toContain('got "-1"');
    }
  });
});
