/**
 * The guest agent as the client of a broker above, over a real unix channel: the test
 * plays the host. hello carries the inventory and lastSeq; a notice is acked, the
 * projects get theirs, the outcome comes back; after the agent restarts, the same notice
 * replayed gets the journaled outcome again and nothing is stopped twice.
 */
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import type { Notice } from '../../../agent/broker/types';
import type { Hello, Message, OutcomeMsg } from '../../../agent/protocol/messages';
import { connectUnix } from '../../../agent/transport/unix';
import type { SocketChannel } from '../../../agent/transport/channel';
import { GuestUnderTest, waitFor, type Env } from './harness';

jest.setTimeout(40_000);

let g: GuestUnderTest;
let env: Env;
/** Where the agent listens for its host (the test plays the host). */
const upstreamOf = (e: Env): string => path.join(e.dir, 'upstream.sock');

async function host(): Promise<{ ch: SocketChannel; inbox: Message[] }> {
  const inbox: Message[] = [];
  // The operator socket answers before the upstream channel listens (agent.ts start order).
  await waitFor('the upstream socket', () => existsSync(upstreamOf(env)));
  const ch = await connectUnix(upstreamOf(env));
  ch.on('message', (m) => inbox.push(m));
  return { ch, inbox };
}

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-upstream',
    [
      { name: 'web', priority: 100, mode: 'graceful', memory: { min: '256MiB', max: '1GiB' } },
      { name: 'batch', priority: 1, mode: 'graceful', memory: { min: '1GiB', max: '1GiB' } },
    ],
    {
      extra: (e) => ({
        upstream: { transport: 'unix', path: upstreamOf(e) },
      }),
      ready: { what: 'projects to run', until: (e) => e.markerLines('batch').length > 0 },
    },
  );
  ({ env } = g);
});

afterAll(() => g?.dispose());

const notice: Notice = {
  id: 'host-n1',
  guest: 'vm-test',
  seq: 1,
  kind: 'reclaim',
  change: { cpus: 0, memoryBytes: 3.5 * 1024 ** 3 },
  allocation: { cpus: 2, memoryBytes: 0.5 * 1024 ** 3 },
  deadline: new Date(Date.now() + 30_000).toISOString(),
  reason: 'host maintenance',
  issuedAt: new Date().toISOString(),
};

test('hello → notice → ack → progress → outcome; a replay after a restart is answered from the journal', async () => {
  let h = await host();
  await waitFor('hello', () => h.inbox.some((m) => m.type === 'hello'));
  const hello = h.inbox.find((m) => m.type === 'hello') as Hello;
  expect(hello).toMatchObject({
    guest: 'vm-test',
    lastSeq: 0,
    inventory: { cpus: 2, memoryBytes: 4 * 1024 ** 3 },
  });
  expect(hello.inventory.projects.map((p) => [p.name, p.state])).toEqual([
    ['web', 'running'],
    ['batch', 'running'],
  ]);

  h.ch.send({ type: 'notice', id: 'm1', notice });
  await waitFor('the outcome', () => h.inbox.some((m) => m.type === 'outcome'));
  expect(h.inbox.find((m) => m.type === 'ack')).toMatchObject({ replyTo: 'm1', state: 'accepted' });
  const phases = h.inbox
    .filter((m) => m.type === 'progress')
    .map((m) => `${(m as { project: string }).project} ${(m as { phase: string }).phase}`);
  expect(phases).toEqual(
    expect.arrayContaining(['batch notified', 'batch stopping', 'batch stopped']),
  );
  const first = (h.inbox.find((m) => m.type === 'outcome') as OutcomeMsg).outcome;
  expect(first.projects.find((p) => p.name === 'batch')).toMatchObject({
    action: 'stopped',
    exit: 'graceful',
  });
  await h.ch.close();

  // The agent restarts; the host replays the notice (it never saw the outcome, say).
  await g.restart();
  h = await host();
  await waitFor('hello', () => h.inbox.some((m) => m.type === 'hello'));
  expect((h.inbox.find((m) => m.type === 'hello') as Hello).lastSeq).toBe(1);
  h.ch.send({ type: 'notice', id: 'm2', notice });
  await waitFor('the outcome again', () => h.inbox.some((m) => m.type === 'outcome'));
  expect(h.inbox.find((m) => m.type === 'ack')).toMatchObject({
    replyTo: 'm2',
    state: 'duplicate',
  });
  expect((h.inbox.find((m) => m.type === 'outcome') as OutcomeMsg).outcome).toEqual(first);
  expect(env.markerLines('batch').filter((l) => l.startsWith('term '))).toHaveLength(1);
  expect(env.markerLines('batch').filter((l) => l.startsWith('start '))).toHaveLength(1);

  // A new notice with an old seq is stale.
  h.ch.send({ type: 'notice', id: 'm3', notice: { ...notice, id: 'host-n0', seq: 1 } });
  await waitFor('the stale ack', () => h.inbox.some((m) => m.type === 'ack' && m.replyTo === 'm3'));
  expect(h.inbox.find((m) => m.type === 'ack' && m.replyTo === 'm3')).toMatchObject({
    state: 'rejected',
    error: { code: 'NOTICE_STALE' },
  });
  await h.ch.close();
});
