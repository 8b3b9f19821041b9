/**
 * Memory flat under a long run of notices (issue 7, "Load held"): both daemons keep only
 * the last RETAIN_FINAL_NOTICES finished notices in memory (per guest on the host); the
 * rest stay on disk. What must not change while they are dropped:
 *
 *  - host: the books. Older notices are folded into a ledger base, so the allocation, the
 *    seq and the next check are exactly what a replay of every notice would give, before
 *    and after a restart (which loads the whole journal and folds it again);
 *  - guest: exactly-once. A replay of a notice long gone from memory is answered
 *    `duplicate` with its journaled outcome, not carried out again; lastSeq survives.
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NoticeBook, RETAIN_FINAL_NOTICES, type LocalBroker } from '../../agent/client/notices';
import { silentLogger } from '../../agent/common/log';
import type { Notice, Outcome } from '../../agent/broker/types';
import { CgroupQmpActuator } from '../../agent/host/actuator';
import { validateHostConfig } from '../../agent/host/config';
import { HostBroker, RETAIN_FINAL_NOTICES as HOST_RETAIN } from '../../agent/host/host-broker';
import { channelFactory } from '../../agent/host/main';
import { waitFor } from '../../demo/stack';
import { ScriptedGuest } from '../integration/host/scripted-guest';

jest.setTimeout(60_000);

const MiB = 1024 * 1024;
const log = silentLogger();
const N = 300; // beyond the 256 kept

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-retention-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

test(`host: ${N} notices, at most ${HOST_RETAIN} kept in memory, the books exact before and after a restart`, async () => {
  const channel = path.join(dir, 'vm1.sock');
  const guest = await ScriptedGuest.listen('vm1', channel);
  // The scripted guest carries out every notice at once.
  guest.channel.on('message', (m) => {
    if (m.type !== 'notice' && m.type !== 'restore') return;
    guest.ack(m.id, m.notice.id, 'accepted');
    guest.outcome(m.notice, 'complete');
  });
  const config = validateHostConfig({
    stateDir: path.join(dir, 'state'),
    socket: path.join(dir, 'host.sock'),
    heartbeat: { interval: '1s', timeout: '5s' },
    reconnect: { min: '50ms', max: '200ms' },
    guests: [
      {
        name: 'vm1',
        priority: 10,
        allocation: { cpus: 2, memory: '1GiB' },
        floor: { cpus: 0.5, memory: '256MiB' },
        channel: { transport: 'unix', path: channel },
      },
    ],
  });
  const make = () =>
    new HostBroker({
      config,
      actuator: new CgroupQmpActuator(null, log),
      connect: channelFactory(config, log),
      log,
    });
  let broker = make();
  try {
    await broker.start();
    await waitFor('vm1 connected', async () => broker.status('vm1').connected, 5000, 20);
    for (let i = 0; i < N; i++) {
      const kind = i % 2 === 0 ? 'reclaim' : 'restore';
      const { done } = await broker.issue(kind, {
        guest: 'vm1',
        change:
          kind === 'reclaim' ? { memoryBytes: 128 * MiB, cpus: 0.5 } : { memoryBytes: 0, cpus: 0 },
        deadlineMs: 10_000,
      });
      expect((await done).state).toBe('done');
    }
    const files = (await fs.readdir(path.join(dir, 'state', 'notices'))).filter((f) =>
      f.endsWith('.json'),
    );
    expect(files).toHaveLength(N); // all on disk
    expect(broker.notices('vm1').length).toBeLessThanOrEqual(HOST_RETAIN);
    const books = broker.status('vm1').books;
    expect(books).toMatchObject({ seq: N, granted: { cpus: 2, memoryBytes: 1024 * MiB } });
    // One more reclaim: checked against the folded books, numbered after all of them.
    const last = await broker.issue('reclaim', {
      guest: 'vm1',
      change: { memoryBytes: 128 * MiB, cpus: 0.5 },
      deadlineMs: 10_000,
    });
    expect(last.record.notice.seq).toBe(N + 1);
    expect((await last.done).state).toBe('done');
    const after = broker.status('vm1').books;
    expect(after.granted).toEqual({ cpus: 1.5, memoryBytes: 896 * MiB });
    // A restart loads the whole journal and folds it the same way.
    await broker.stop();
    broker = make();
    await broker.start();
    expect(broker.status('vm1').books).toEqual(after);
    expect(broker.notices('vm1').length).toBeLessThanOrEqual(HOST_RETAIN);
  } finally {
    await broker.stop();
    await guest.close();
  }
});

test(`guest: ${N} notices, at most ${RETAIN_FINAL_NOTICES} in memory, a replay of the first still answered from the journal`, async () => {
  let carried = 0;
  const broker: LocalBroker = {
    name: 'g',
    check: async () => [],
    carryOut: async (notice: Notice): Promise<Outcome> => {
      carried++;
      const now = new Date().toISOString();
      return {
        noticeId: notice.id,
        guest: 'g',
        status: 'complete',
        projects: [],
        freed: { memoryBytes: notice.seq, cpus: 0 },
        startedAt: now,
        finishedAt: now,
        ms: 0,
      };
    },
  };
  const notice = (seq: number): Notice => ({
    id: `n-${seq}`,
    guest: 'g',
    seq,
    kind: 'reclaim',
    change: { memoryBytes: 0, cpus: 0 },
    allocation: { memoryBytes: 1024 * MiB, cpus: 1 },
    deadline: new Date(Date.now() + 60_000).toISOString(),
    reason: 'retention',
    issuedAt: new Date().toISOString(),
  });
  let book = new NoticeBook(dir, broker, log);
  await book.init();
  for (let seq = 1; seq <= N; seq++) {
    const sub = await book.submit(notice(seq), 'upstream');
    expect(sub.state).toBe('accepted');
    await sub.outcome;
  }
  expect(carried).toBe(N);
  expect(book.list().length).toBeLessThanOrEqual(RETAIN_FINAL_NOTICES);
  expect(book.get('n-1')).toBeUndefined(); // gone from memory...
  const replay = await book.submit(notice(1), 'upstream');
  expect(replay.state).toBe('duplicate'); // ...answered from the journal
  expect((await replay.outcome)!.freed.memoryBytes).toBe(1);
  expect(await book.cancel('n-1')).toBe('not-cancellable');
  expect(carried).toBe(N);
  // Restart: lastSeq from every record, memory bounded again.
  book = new NoticeBook(dir, broker, log);
  await book.init();
  expect(book.lastSeq).toBe(N);
  expect(book.list().length).toBeLessThanOrEqual(RETAIN_FINAL_NOTICES);
  expect((await book.submit(notice(2), 'upstream')).state).toBe('duplicate');
  expect(carried).toBe(N);
});
