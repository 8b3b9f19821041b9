/** Notices and outcomes for tests of the notice book and the client (no cgroups involved). */
import type { Notice, Outcome } from '../../agent/broker/types';

const MiB = 1024 * 1024;

/** A reclaim of nothing for guest `g` (1 GiB, 1 CPU), due in a minute; override any field. */
export function testNotice(over: Partial<Notice> & Pick<Notice, 'id' | 'seq'>): Notice {
  return {
    guest: 'g',
    kind: 'reclaim',
    change: { memoryBytes: 0, cpus: 0 },
    allocation: { memoryBytes: 1024 * MiB, cpus: 1 },
    deadline: new Date(Date.now() + 60_000).toISOString(),
    reason: 'test',
    issuedAt: new Date().toISOString(),
    ...over,
  };
}

/** The outcome of a notice that touched no project: complete, freed as given. */
export function emptyOutcome(notice: Notice, freed = { memoryBytes: 0, cpus: 0 }): Outcome {
  const now = new Date().toISOString();
  return {
    noticeId: notice.id,
    guest: notice.guest,
    status: 'complete',
    projects: [],
    freed,
    startedAt: now,
    finishedAt: now,
    ms: 0,
  };
}
