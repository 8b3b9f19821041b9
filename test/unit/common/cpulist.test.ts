/**
 * CPU lists between the kernel's spelling ("0-3,8") and the protocol's (ascending numbers),
 * and the host's choice of which vCPUs to unplug: the highest-numbered online ones, never
 * the boot CPU.
 */
import {
  cpusetSize,
  formatCpuList,
  parseCpuList,
  pickLeavingCpus,
} from '../../../agent/common/cpulist';
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

// What the planner compares to call a cpuset change shrunk or grown (agent/guest/planner.ts).
test.each<[string | undefined, number]>([
  ['0-3,5', 5],
  ['7', 1],
  ['0-1,3-4', 4],
  ['0-1,1-2', 3], // overlapping ranges count each CPU once
  ['0-3\n', 4], // as the kernel prints it
  ['', Infinity], // empty: the parent's CPUs, all of them
  ['  ', Infinity],
  [undefined, Infinity], // unset: all CPUs
])('cpuset %p allows %p CPUs', (list, n) => {
  expect(cpusetSize(list)).toBe(n);
});

test('a malformed cpuset is refused with a code, not counted', () => {
  for (const bad of ['3-1', '0-', 'a', '0,,1']) {
    let err: unknown;
    try {
      cpusetSize(bad);
    } catch (e) {
      err = e;
    }
    expect({ bad, code: isNestError(err, 'INPUT_INVALID') }).toEqual({ bad, code: true });
  }
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
