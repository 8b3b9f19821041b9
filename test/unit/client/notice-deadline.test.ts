/**
 * A notice's deadline on this machine's monotonic clock is kept in one place, its record's
 * `deadlineMono` (agent/client/notices.ts; agent/common/clock.ts for the boot rule). A
 * record left `running` by an agent of an earlier boot is resumed against its wall
 * deadline converted now, and journaled with this boot's deadline from then on.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NoticeBook, noticeKey, type LocalBroker } from '../../../agent/client/notices';
import { bootId, systemClock } from '../../../agent/common/clock';
import { silentLogger } from '../../../agent/common/log';
import type { Notice, Outcome } from '../../../agent/broker/types';
import { emptyOutcome, testNotice } from '../../helpers/notices';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-notice-deadline-'));
});
afterEach(() => fs.rm(dir, { recursive: true, force: true }));

const file = (id: string): string => path.join(dir, 'notices', `${noticeKey(id)}.json`);
const onDisk = async (id: string): Promise<Record<string, unknown>> =>
  JSON.parse(await fs.readFile(file(id), 'utf8'));

test('a notice left running by an earlier boot resumes on its wall deadline, journaled with this boot’s', async () => {
  const deadlines: number[] = [];
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  let reached!: () => void;
  const started = new Promise<void>((r) => (reached = r));
  const broker: LocalBroker = {
    name: 'g',
    check: async () => [],
    carryOut: async (n: Notice, ctx): Promise<Outcome> => {
      deadlines.push(ctx.deadline);
      if (deadlines.length === 1) {
        reached();
        await held;
      }
      return emptyOutcome(n);
    },
  };
  const wallDeadline = Date.now() + 60_000;
  const book = new NoticeBook(dir, broker, silentLogger());
  await book.init();
  const sub = await book.submit(
    testNotice({ id: 'n-1', seq: 1, deadline: new Date(wallDeadline).toISOString() }),
    'upstream',
  );
  await started;
  book.close();
  release();
  await expect(sub.outcome).rejects.toMatchObject({ code: 'AGENT_STOPPING' });
  await book.drain();
  const first = await onDisk('n-1');
  expect(first).toMatchObject({ state: 'running', bootId: bootId() });

  // As if the machine had rebooted since: another boot's id, a monotonic time of its own.
  await fs.writeFile(
    file('n-1'),
    JSON.stringify({ ...first, bootId: 'an-earlier-boot', deadlineMono: 5 }),
  );
  const next = new NoticeBook(dir, broker, silentLogger());
  await next.init();
  const before = systemClock.monotonic();
  const [outcome] = await Promise.all(next.resume());
  expect(outcome.status).toBe('complete');
  // Carried out against the wall deadline converted now (never the earlier boot's 5 ms):
  // the steps' deadline is that, less the margins, so within the minute left.
  const leftMs = wallDeadline - Date.now();
  expect(deadlines[1]).toBeGreaterThan(before);
  expect(deadlines[1]).toBeLessThanOrEqual(systemClock.monotonic() + leftMs + 1000);
  const after = await onDisk('n-1');
  expect(after).toMatchObject({ state: 'done', bootId: bootId() });
  expect(after.deadlineMono).toBeGreaterThan(before + leftMs - 5000);
  expect(after.deadlineMono).toBeLessThan(systemClock.monotonic() + leftMs + 5000);
  next.close();
});
