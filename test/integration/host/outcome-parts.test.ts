/**
 * An outcome too large for one line. Before, a guest with ~190+ projects in one
 * notice could not send its outcome (PROTOCOL_OVERSIZE); the host never heard it and the
 * notice ended `late` although the projects had been stopped.
 *
 * Here the whole path is real except the guest's local broker: the host broker (in this
 * process) with its reconnecting unix channel, actuator and VM cgroup; the guest's real
 * Client and NoticeBook (journal in a temp dir) on a real UnixChannelServer. The local
 * broker is a recording fake that reports 500 projects, as a guest agent with 500 would.
 */
import { promises as fs, readFileSync } from 'node:fs';
import type * as net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Client } from '../../../agent/client/client';
import { NoticeBook, type LocalBroker } from '../../../agent/client/notices';
import type { Notice, Outcome, ProjectOutcome } from '../../../agent/broker/types';
import { silentLogger } from '../../../agent/common/log';
import { HostBroker } from '../../../agent/host/host-broker';
import { MAX_LINE_BYTES, type Message } from '../../../agent/protocol/messages';
import { UnixChannelServer } from '../../../agent/transport/unix';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import { startOneGuestBroker } from './one-guest-broker';

const MiB = 1024 * 1024;
const PROJECTS = 500;
const log = silentLogger();
let t: TestAdapter;
let dir: string;
let server: UnixChannelServer;
let broker: HostBroker;
let guestBroker: ReportingBroker;
/** Every line the guest sent, as bytes on the wire. */
let sentLines: { type: string; bytes: number }[];
/** When set, decides per message whether the guest's connection drops instead of sending it. */
let cutBefore: ((m: Message) => boolean) | undefined;
/** Connections the guest has had from the host. */
let opens: number;

const kernel = (ctrl: string, file: string): string =>
  readFileSync(path.join('/sys/fs/cgroup', ctrl, t.rootName, 'vm1', file), 'utf8').trim();
const VM_LIMITS = {
  memory: { max: 1024 * MiB },
  cpu: { max: { quotaUs: 200_000, periodUs: 100_000 } },
};

/** The guest's local broker: 500 projects, the lower half stopped, as a real plan does. */
class ReportingBroker implements LocalBroker {
  readonly name = 'vm1';
  carried: string[] = [];
  async check() {
    return [];
  }
  async carryOut(n: Notice): Promise<Outcome> {
    this.carried.push(n.id);
    const projects: ProjectOutcome[] = Array.from({ length: PROJECTS }, (_, i) => ({
      name: `p${String(i).padStart(4, '0')}`,
      action: i < PROJECTS / 2 ? 'stopped' : 'shrunk',
      before: { memoryHigh: 'max', memoryMax: 64 * MiB, cpuMax: 0.01 },
      after:
        i < PROJECTS / 2
          ? { memoryHigh: 0, memoryMax: 0, cpuMax: 0 }
          : { memoryHigh: 32 * MiB, memoryMax: 32 * MiB, cpuMax: 0.005 },
      exit: i < PROJECTS / 2 ? 'graceful' : null,
      ms: 3,
      reason: `priority ${i}: lowest ranks go first; exited 2 ms after SIGTERM (grace 10000 ms)`,
    }));
    const now = new Date().toISOString();
    return {
      noticeId: n.id,
      guest: 'vm1',
      status: 'complete',
      projects,
      freed: n.change,
      startedAt: now,
      finishedAt: now,
      ms: 1,
    };
  }
}

beforeAll(async () => {
  t = await openTestAdapter('outparts');
  await t.adapter.create('vm1', VM_LIMITS);
});
afterAll(async () => {
  await t?.dispose();
});

beforeEach(async () => {
  await t.adapter.setLimits('vm1', VM_LIMITS);
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-outparts-'));
  sentLines = [];
  cutBefore = undefined;
  const socket = path.join(dir, 'vm1.sock');
  // The guest side: a real client and notice book on a real channel server.
  guestBroker = new ReportingBroker();
  const book = new NoticeBook(path.join(dir, 'guest-state'), guestBroker, log);
  await book.init();
  server = await UnixChannelServer.listen(socket, { answerPings: false });
  opens = 0;
  server.on('open', () => opens++);
  const send = server.send.bind(server);
  server.send = (m: Message): boolean => {
    if (cutBefore?.(m)) {
      cutBefore = undefined;
      // The connection drops under this line: it and whatever follows it are lost.
      (server as unknown as { sock: net.Socket | null }).sock?.destroy();
      return false;
    }
    const ok = send(m);
    if (ok) sentLines.push({ type: m.type, bytes: Buffer.byteLength(JSON.stringify(m)) + 1 });
    return ok;
  };
  new Client({
    channel: server,
    book,
    log,
    inventory: async () => ({ cpus: 2, memoryBytes: 1024 * MiB, projects: [] }),
  });
  broker = await startOneGuestBroker({
    dir,
    root: t.rootName,
    adapter: t.adapter,
    channel: socket,
    log,
    heartbeatTimeout: '1s',
  });
});

afterEach(async () => {
  await broker?.stop();
  await server?.close();
  await fs.rm(dir, { recursive: true, force: true });
});

const reclaim = () =>
  broker.issue('reclaim', {
    guest: 'vm1',
    change: { memoryBytes: 256 * MiB, cpus: 0.5 },
    deadlineMs: 10_000,
  });

test('a 500-project outcome crosses the unix channel in parts, is assembled whole, and the VM is lowered', async () => {
  const { record, done } = await reclaim();
  const rec = await done;
  expect(rec.state).toBe('done');
  expect(rec.late).toBeUndefined();
  // Every project, in order, exactly as the guest reported it.
  expect(rec.outcome!.projects).toHaveLength(PROJECTS);
  expect(rec.outcome!.projects.map((p) => p.name)).toEqual(
    Array.from({ length: PROJECTS }, (_, i) => `p${String(i).padStart(4, '0')}`),
  );
  expect(rec.outcome!.projects.filter((p) => p.action === 'stopped')).toHaveLength(PROJECTS / 2);
  // It went as several parts and a summary, each line within the cap.
  const parts = sentLines.filter((l) => l.type === 'outcome-part');
  expect(parts.length).toBeGreaterThan(1);
  expect(sentLines.filter((l) => l.type === 'outcome')).toHaveLength(1);
  for (const l of sentLines) expect(l.bytes).toBeLessThanOrEqual(MAX_LINE_BYTES);
  // The host journaled the whole outcome and took the memory away.
  const onDisk = JSON.parse(
    await fs.readFile(
      path.join(dir, 'host-state/notices', `notice.${record.notice.id}.json`),
      'utf8',
    ),
  );
  expect(onDisk.outcome.projects).toHaveLength(PROJECTS);
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(768 * MiB));
  expect(guestBroker.carried).toEqual([record.notice.id]);
}, 20_000);

test('a part lost by a reconnect is sent again from the journal: the outcome arrives whole, carried out once', async () => {
  // The connection drops just before the second part goes out.
  cutBefore = (m) => m.type === 'outcome-part' && m.index === 1;
  const { record, done } = await reclaim();
  const rec = await done;
  expect(rec.state).toBe('done');
  expect(rec.outcome!.projects).toHaveLength(PROJECTS);
  expect(opens).toBeGreaterThanOrEqual(2);
  // After the reconnect the whole sequence went again, part 1 included.
  const parts = sentLines.filter((l) => l.type === 'outcome-part').length;
  expect(parts).toBeGreaterThan(2);
  expect(kernel('memory', 'memory.limit_in_bytes')).toBe(String(768 * MiB));
  // The projects were acted on once: the resend came from the guest's journal.
  expect(guestBroker.carried).toEqual([record.notice.id]);
}, 20_000);
