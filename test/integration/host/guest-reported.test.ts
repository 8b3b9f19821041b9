/**
 * The host keeps what each guest's kernel reports it has (online CPUs, MemTotal): from the
 * hello, then from each outcome, and shows it per guest (`nestctl guests --json` is
 * broker.guests()). The guest side is the real Client and NoticeBook on a real unix
 * channel; its kernel facts are scripted so that the outcome can say a CPU went away,
 * as it would after the host unplugged it. A change after the outcome (the unplug comes
 * after it) reaches the host unasked, in a `facts` message (docs/protocol.md, "facts
 * (guest → host)").
 */
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Client } from '../../../agent/client/client';
import { NoticeBook, type LocalBroker } from '../../../agent/client/notices';
import type { Notice, Outcome } from '../../../agent/broker/types';
import { silentLogger } from '../../../agent/common/log';
import type { HostBroker } from '../../../agent/host/host-broker';
import { UnixChannelServer } from '../../../agent/transport/unix';
import { waitFor } from '../../../demo/stack';
import { startOneGuestBroker } from './one-guest-broker';

const MiB = 1024 * 1024;
const log = silentLogger();
let dir: string;
let server: UnixChannelServer;
let broker: HostBroker;
/** What the guest's kernel "has": the outcome of a reclaim takes CPU 1 and 256 MiB away. */
let facts = { onlineCpus: [0, 1], memTotal: 1024 * MiB };

class UnplugBroker implements LocalBroker {
  readonly name = 'vm1';
  async check() {
    return [];
  }
  async carryOut(n: Notice): Promise<Outcome> {
    facts = { onlineCpus: [0], memTotal: 768 * MiB };
    const now = new Date().toISOString();
    return {
      noticeId: n.id,
      guest: 'vm1',
      status: 'complete',
      projects: [],
      freed: n.change,
      startedAt: now,
      finishedAt: now,
      ms: 1,
    };
  }
}

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-reported-'));
  const socket = path.join(dir, 'vm1.sock');
  const book = new NoticeBook(path.join(dir, 'guest-state'), new UnplugBroker(), log);
  await book.init();
  server = await UnixChannelServer.listen(socket, { answerPings: false });
  new Client({
    channel: server,
    book,
    log,
    inventory: async () => ({ cpus: 2, memoryBytes: 1024 * MiB, projects: [] }),
    facts: () => facts,
    // Read often so the test need not wait a second; what is sent does not depend on it.
    factsIntervalMs: 50,
  });
  broker = await startOneGuestBroker({
    dir,
    adapter: null,
    channel: socket,
    log,
    heartbeatTimeout: '5s',
  });
});

afterAll(async () => {
  await broker?.stop();
  await server?.close();
  await fs.rm(dir, { recursive: true, force: true });
});

test('the hello reports the guest kernel’s CPUs and memory; the outcome reports them after', async () => {
  const [first] = broker.guests();
  expect(first.reported).toMatchObject({
    onlineCpus: [0, 1],
    memTotal: 1024 * MiB,
    from: 'hello',
  });
  // What nestctl guests --json prints: the status rows as JSON.
  expect(JSON.parse(JSON.stringify(broker.guests()))[0].reported.onlineCpus).toEqual([0, 1]);

  const { done } = await broker.issue('reclaim', {
    guest: 'vm1',
    change: { memoryBytes: 256 * MiB, cpus: 1 },
    deadlineMs: 10_000,
  });
  const rec = await done;
  expect(rec.outcome?.status).toBe('complete');
  await waitFor(
    'the outcome’s report',
    async () => broker.status('vm1').reported?.from === 'outcome',
    5000,
    20,
  );
  expect(broker.status('vm1').reported).toMatchObject({
    onlineCpus: [0],
    memTotal: 768 * MiB,
    from: 'outcome',
  });
});

test('a change after the outcome reaches the host in a facts message, which it keeps as reported', async () => {
  const afterOutcome = broker.status('vm1').reported!;
  expect(afterOutcome.from).toBe('outcome');
  // The kernel changes with no notice in flight (a vCPU ejected after the outcome).
  facts = { onlineCpus: [0], memTotal: 512 * MiB };
  await waitFor(
    'the facts report',
    async () => broker.status('vm1').reported?.from === 'facts',
    10_000,
    20,
  );
  const r = broker.status('vm1').reported!;
  expect(r).toMatchObject({ onlineCpus: [0], memTotal: 512 * MiB, from: 'facts' });
  expect(Date.parse(r.at)).toBeGreaterThanOrEqual(Date.parse(afterOutcome.at));
  expect(JSON.parse(JSON.stringify(broker.guests()))[0].reported.from).toBe('facts');
});
