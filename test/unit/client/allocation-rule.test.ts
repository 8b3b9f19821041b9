/**
 * The allocation rule (docs/protocol.md, "Seq and duplicates"; agent/client/notices.ts
 * allocationProblems): a notice's allocation is the guest's allocation before it minus
 * (reclaim) or plus (restore) its change, or, for a reclaim, the allocation the guest has
 * already. The last is the reclaim a host re-applies after a libvirt domain started again
 * (docs/libvirt.md, "Books"): its books followed libvirt (768 MiB) while the guest kept the
 * 512 MiB of the reclaim in force across its reboot; the real-guest test saw it refused
 * with ALLOCATION_MISMATCH and the VM left at 768 MiB. A NoticeBook over a broker that
 * keeps an allocation, as the guest agent's does: the re-applied reclaim is accepted and
 * carried out, the allocation stays; anything else off the rule is still refused.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NoticeBook, allocationProblems, type LocalBroker } from '../../../agent/client/notices';
import { silentLogger } from '../../../agent/common/log';
import type { Notice, Outcome, Resources } from '../../../agent/broker/types';
import { emptyOutcome, testNotice } from '../../helpers/notices';

const MiB = 1024 * 1024;
const has = { memoryBytes: 512 * MiB, cpus: 2 };

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-allocation-rule-'));
});
afterEach(() => fs.rm(dir, { recursive: true, force: true }));

const n = (kind: Notice['kind'], change: Resources, allocation: Resources): Notice =>
  testNotice({ id: `${kind}-1`, seq: 1, guest: 'g', kind, change, allocation });

test.each([
  ['reclaim: before minus change', 'reclaim', [256, 0], [256, 2], []],
  [
    'reclaim: to the allocation the guest has (a re-applied reclaim)',
    'reclaim',
    [256, 0],
    [512, 2],
    [],
  ],
  [
    'reclaim: to the allocation it has, CPUs to the thousandth',
    'reclaim',
    [0, 1],
    [512, 2.0004],
    [],
  ],
  ['reclaim: above what the guest has', 'reclaim', [256, 0], [768, 2], ['allocation.memoryBytes']],
  ['reclaim: between', 'reclaim', [256, 0], [384, 2], ['allocation.memoryBytes']],
  ['reclaim: memory as it has, CPUs not', 'reclaim', [0, 1], [512, 1.5], ['allocation.cpus']],
  ['restore: before plus change', 'restore', [256, 0], [768, 2], []],
  ['restore: to the allocation it has', 'restore', [256, 0], [512, 2], ['allocation.memoryBytes']],
  ['restore: below it', 'restore', [256, 0], [256, 2], ['allocation.memoryBytes']],
] as const)('%s', (_label, kind, [chMiB, chCpus], [alMiB, alCpus], fields) => {
  const problems = allocationProblems(
    n(kind, { memoryBytes: chMiB * MiB, cpus: chCpus }, { memoryBytes: alMiB * MiB, cpus: alCpus }),
    has,
  );
  expect(problems.map((p) => p.field)).toEqual(fields);
});

test('the re-applied reclaim is accepted and carried out, the allocation stays; a reclaim between is refused', async () => {
  let allocation: Resources = { ...has };
  const carried: Notice[] = [];
  const broker: LocalBroker = {
    name: 'g',
    check: async () => [],
    allocation: () => allocation,
    carryOut: async (notice: Notice): Promise<Outcome> => {
      carried.push(notice);
      // As agent/guest/executor.ts: the allocation the notice carries is recorded.
      allocation = { ...notice.allocation };
      return emptyOutcome(notice);
    },
  };
  const book = new NoticeBook(dir, broker, silentLogger());
  await book.init();
  try {
    // The host's books at 768 MiB (libvirt's after the restart), 256 MiB re-applied.
    const reapplied = testNotice({
      id: 'vm1-2-reapplied',
      seq: 2,
      change: { memoryBytes: 256 * MiB, cpus: 0 },
      allocation: { memoryBytes: 512 * MiB, cpus: 2 },
    });
    const sub = await book.submit(reapplied, 'upstream');
    expect(sub.state).toBe('accepted');
    expect((await sub.outcome!).status).toBe('complete');
    expect(carried.map((c) => c.id)).toEqual(['vm1-2-reapplied']);
    expect(allocation).toEqual(has);

    // Still refused: a reclaim whose allocation is neither.
    const off = await book.submit(
      testNotice({
        id: 'vm1-3-off',
        seq: 3,
        change: { memoryBytes: 256 * MiB, cpus: 0 },
        allocation: { memoryBytes: 384 * MiB, cpus: 2 },
      }),
      'upstream',
    );
    expect(off).toMatchObject({ state: 'rejected', error: { code: 'ALLOCATION_MISMATCH' } });
    expect(carried).toHaveLength(1);
    expect(allocation).toEqual(has);
  } finally {
    book.close();
    await book.drain();
  }
});
