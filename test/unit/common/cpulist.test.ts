/**
 * CPU lists between the kernel's spelling ("0-3,8") and the protocol's (ascending numbers),
 * and the host's choice of which vCPUs to unplug: the highest-numbered online ones, never
 * the boot CPU.
 */
import { formatCpuList, parseCpuList, pickLeavingCpus } from '../../../agent/common/cpulist';
import { isNestError } from '../../../agent/common/errors';

test('the kernel lists parse to ascending CPU numbers and format back the same', () => {
  for (const [text, cpus] of [
    ['0-1\n', [0, 1]],
    ['0', [0]],
    ['0-3,8,10-11', [0, 1, 2, 3, 8, 10, 11]],
    ['', []],
  ] as const) {
    expect(parseCpuList(text)).toEqual(cpus);
    expect(formatCpuList(cpus)).toBe(text.trim());
  }
  // Any order, repeats: one canonical spelling.
  expect(formatCpuList([3, 1, 2, 2, 7])).toBe('1-3,7');
});

test('a list that is not one is refused with a code, naming the part', () => {
  for (const bad of ['1-0', 'a', '0,,1', '0-', '3-2,5']) {
    let err: unknown;
    try {
      parseCpuList(bad, 'online');
    } catch (e) {
      err = e;
    }
    expect(isNestError(err, 'INPUT_INVALID')).toBe(true);
    expect((err as Error).message).toMatch(/^online: /);
  }
});

test('the host takes the highest-numbered online CPUs, never CPU 0, and no more than there are', () => {
  expect(pickLeavingCpus([0, 1], 1)).toEqual([1]);
  expect(pickLeavingCpus([0, 1, 2, 3], 2)).toEqual([2, 3]);
  // Gaps (CPU 2 already unplugged): the next highest online ones.
  expect(pickLeavingCpus([0, 1, 3, 5], 2)).toEqual([3, 5]);
  expect(pickLeavingCpus([3, 0, 1], 1)).toEqual([3]);
  // Only the boot CPU left: nothing to take.
  expect(pickLeavingCpus([0], 1)).toEqual([]);
  expect(pickLeavingCpus([0, 1, 2], 5)).toEqual([1, 2]);
  expect(pickLeavingCpus([0, 1, 2], 0)).toEqual([]);
});
