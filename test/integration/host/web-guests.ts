import type { GuestSpec } from '../../../demo/stack';

/**
 * Guests for a host stack story, in priority order (the first is the lowest, so the one a
 * reclaim or the trigger picks first), each with 1 GiB and 2 CPUs above a 256 MiB / 0.5
 * CPU floor and one small `web` project that holds 8 MiB and burns 1 % of a CPU.
 */
export const webGuests = (names: string[]): GuestSpec[] =>
  names.map((name, i) => ({
    name,
    priority: 10 * (i + 1),
    memory: '1GiB',
    cpus: 2,
    floor: { memory: '256MiB', cpus: 0.5 },
    projects: [
      {
        name: 'web',
        priority: 100,
        memoryMin: '64MiB',
        memoryMax: '256MiB',
        cpuMin: 0.1,
        cpuMax: 0.5,
        holdMiB: 8,
        burn: 0.01,
      },
    ],
  }));
