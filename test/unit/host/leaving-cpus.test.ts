/**
 * The host's `leavingCpus` for a reclaim: whole CPUs from a guest that takes the field and
 * reported its online CPUs name the highest-numbered ones; anything else names none (the
 * reclaim is then a quota, as before).
 */
import { leavingCpusFor } from '../../../agent/host/leaving-cpus';

const caps = ['outcome-parts', 'cpu-unplug'];

test('one whole CPU from a guest with 0-1 online: CPU 1', () => {
  expect(leavingCpusFor({ changeCpus: 1, guestCapabilities: caps, onlineCpus: [0, 1] })).toEqual([
    1,
  ]);
  expect(
    leavingCpusFor({ changeCpus: 2, guestCapabilities: caps, onlineCpus: [0, 1, 2, 3] }),
  ).toEqual([2, 3]);
  // Within the protocol's thousandth.
  expect(
    leavingCpusFor({ changeCpus: 1.0004, guestCapabilities: caps, onlineCpus: [0, 1] }),
  ).toEqual([1]);
});

test('no leaving CPUs for a fraction, an old guest, an unknown CPU list, or too few CPUs', () => {
  const cases = [
    { changeCpus: 0.5, guestCapabilities: caps, onlineCpus: [0, 1] },
    { changeCpus: 1.5, guestCapabilities: caps, onlineCpus: [0, 1, 2] },
    { changeCpus: 0, guestCapabilities: caps, onlineCpus: [0, 1] },
    { changeCpus: 1, guestCapabilities: ['outcome-parts'], onlineCpus: [0, 1] },
    { changeCpus: 1, guestCapabilities: caps },
    { changeCpus: 2, guestCapabilities: caps, onlineCpus: [0, 1] },
    { changeCpus: 1, guestCapabilities: caps, onlineCpus: [0] },
  ];
  for (const c of cases) expect({ c, got: leavingCpusFor(c) }).toEqual({ c, got: undefined });
});
