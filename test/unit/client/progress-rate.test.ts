/**
 * Progress is best effort, the outcome is not: a notice over a thousand
 * projects emits far more progress than the broker above accepts per second (its channel
 * rate limit). The client sends progress only within PROGRESS_RATE and the outcome
 * always: over a real unix channel whose receiving end applies the default rate limit,
 * the outcome arrives, whole, and nothing was dropped by the receiver.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client, PROGRESS_RATE } from '../../../agent/client/client';
import { NoticeBook, type CarryOutContext, type LocalBroker } from '../../../agent/client/notices';
import { silentLogger } from '../../../agent/common/log';
import type { Notice, Outcome } from '../../../agent/broker/types';
import type { Message, OutcomeMsg } from '../../../agent/protocol/messages';
import { DEFAULT_RATE_LIMIT, type SocketChannel } from '../../../agent/transport/channel';
import { UnixChannelServer, connectUnix } from '../../../agent/transport/unix';

const log = silentLogger();
const PROJECTS = 1000;

class ChattyBroker implements LocalBroker {
  readonly name = 'vm1';
  async check() {
    return [];
  }
  async carryOut(n: Notice, ctx: CarryOutContext): Promise<Outcome> {
    for (let i = 0; i < PROJECTS; i++) {
      const child = `p${i}`;
      ctx.onProgress({ child, phase: 'notified', action: 'stopped', ms: 0 });
      ctx.onProgress({ child, phase: 'stopping', action: 'stopped', ms: 0 });
      ctx.onProgress({ child, phase: 'stopped', action: 'stopped', exit: 'graceful', ms: 1 });
    }
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

let dir: string;
let server: UnixChannelServer;
let host: SocketChannel;

afterEach(async () => {
  await host?.close();
  await server?.close();
  await fsp.rm(dir, { recursive: true, force: true });
});

test('3 000 progress events: progress is cut to its rate, the outcome arrives, the receiver drops nothing', async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-progress-'));
  const book = new NoticeBook(path.join(dir, 'state'), new ChattyBroker(), log);
  await book.init();
  server = await UnixChannelServer.listen(path.join(dir, 'ch.sock'), { answerPings: false });
  const client = new Client({
    channel: server,
    book,
    log,
    inventory: async () => ({ cpus: 2, memoryBytes: 1 << 30, projects: [] }),
  });
  // The broker's end, with the broker's default rate limit on what it receives.
  host = await connectUnix(path.join(dir, 'ch.sock'), {
    answerPings: false,
    log,
    rateLimit: DEFAULT_RATE_LIMIT,
  });
  const inbox: Message[] = [];
  host.on('message', (m) => inbox.push(m));
  const now = Date.now();
  host.send({
    type: 'notice',
    id: 'm1',
    notice: {
      id: 'n1',
      guest: 'vm1',
      seq: 1,
      kind: 'reclaim',
      change: { cpus: 0, memoryBytes: 1024 },
      allocation: { cpus: 2, memoryBytes: 1 << 30 },
      deadline: new Date(now + 30_000).toISOString(),
      reason: 'test',
      issuedAt: new Date(now).toISOString(),
    },
  });
  const until = Date.now() + 5000;
  while (!inbox.some((m) => m.type === 'outcome') && Date.now() < until)
    await new Promise((r) => setTimeout(r, 10));
  const outcome = inbox.find((m): m is OutcomeMsg => m.type === 'outcome');
  expect(outcome?.outcome.noticeId).toBe('n1');
  const progress = inbox.filter((m) => m.type === 'progress').length;
  const elapsedS = (Date.now() - now) / 1000;
  expect(progress).toBeGreaterThan(0);
  expect(progress).toBeLessThanOrEqual(
    PROGRESS_RATE.burst + PROGRESS_RATE.perSecond * elapsedS + 1,
  );
  expect(client.progressDropped).toBe(3 * PROJECTS - progress);
  expect(host.rateLimited).toBe(0);
});
