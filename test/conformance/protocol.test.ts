/**
 * Conformance: the example sessions of docs/protocol.md and docs/project-protocol.md,
 * read from the documents themselves, played against a live guest agent (a real
 * `nestbroker guest` process, its projects real processes in cgroups under this run's own
 * root). The test is the host (and a project): it writes the documents' `H>` (`P>`) lines
 * as bytes on the guest's unix sockets and checks that what comes back is the documents'
 * `G>` (`A>`) lines, byte for byte, except the values the documents list as variable.
 * So the documents cannot drift from the code: change either, and this fails.
 *
 * The host here is written from docs/protocol.md alone (test/conformance/session.ts
 * imports nothing from agent/): that a host following only the document gets through a
 * whole session with the real agent is what this shows.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, promises as fsp, readFileSync } from 'node:fs';
import path from 'node:path';
import Ajv from 'ajv';
import { GuestUnderTest, REPO, gone, waitFor } from '../integration/guest/harness';
import { parseMessage } from '../../agent/protocol/schemas';
import {
  SessionPlayer,
  connect,
  section,
  sessionBlocks,
  type SessionLine,
  type VariablePaths,
} from './session';

jest.setTimeout(180_000);

const PROTOCOL = readFileSync(path.join(REPO, 'docs/protocol.md'), 'utf8');
const PROJECT = readFileSync(path.join(REPO, 'docs/project-protocol.md'), 'utf8');
const [hostSession] = sessionBlocks(PROTOCOL, 'nestbroker-session');
const [projectSession] = sessionBlocks(PROJECT, 'nestbroker-project-session');

/** docs/protocol.md, "What varies": the guest's values that differ from run to run. */
const GUEST_VARIABLE: VariablePaths = {
  '*': ['id'],
  hello: ['onlineCpus', 'memTotal'],
  progress: ['ms'],
  outcome: [
    'outcome.startedAt',
    'outcome.finishedAt',
    'outcome.ms',
    'outcome.projects[].ms',
    'outcome.projects[].reason',
  ],
};
/** The host's values the documents say a player sets: the example's times → now. */
const DOC_ISSUED = '2026-12-02T14:00:00.000Z';
const DOC_DEADLINE = '2026-12-02T14:02:00.000Z';
/** docs/project-protocol.md: the token in the example stands for the file's contents. */
const DOC_TOKEN = 'CEGttmF2otb5YvjUVid_xSOH';

test('the documents have their example sessions, in canonical JSON, and name what varies', () => {
  expect(hostSession.length).toBeGreaterThan(10);
  expect(projectSession.length).toBeGreaterThan(3);
  for (const l of [...hostSession, ...projectSession]) {
    if (l.text === '<FF>') continue;
    // Byte for byte: each line is exactly what JSON.stringify writes for it.
    expect({ at: l.at, text: JSON.stringify(JSON.parse(l.text)) }).toEqual({
      at: l.at,
      text: l.text,
    });
  }
  const varies = section(PROTOCOL, 'What varies');
  for (const p of Object.values(GUEST_VARIABLE).flat()) expect(varies).toContain(`\`${p}\``);
  for (const v of [DOC_ISSUED, DOC_DEADLINE, '`notice.issuedAt`', '`notice.deadline`'])
    expect(varies).toContain(v);
  expect(section(PROJECT, 'What varies')).toContain(DOC_TOKEN);
});

test('every host↔guest line of the example is a valid message by the agents’ own schemas', () => {
  for (const l of hostSession) {
    if (l.text === '<FF>') continue;
    const r = parseMessage(l.text);
    // The one invalid line is the example's deliberate one (answered by an error).
    if (!r.ok)
      expect({ at: l.at, type: JSON.parse(l.text).type, id: JSON.parse(l.text).id }).toEqual({
        at: l.at,
        type: 'notice',
        id: 'h-8',
      });
  }
});

test('the published JSON Schemas take every documented line and refuse the invalid one', () => {
  // What a third party would do: validate with a JSON Schema validator, not our zod.
  const ajv = new Ajv({ strict: false, allErrors: true });
  // Each file's $id is its name: compiled once, then looked up.
  const validator = (name: string) =>
    ajv.getSchema(name) ??
    ajv.compile(JSON.parse(readFileSync(path.join(REPO, 'docs/schemas', name), 'utf8')));
  const message = validator('message.json');
  const refused: string[] = [];
  for (const l of hostSession) {
    if (l.text === '<FF>') continue;
    const m = JSON.parse(l.text);
    if (!message(m)) refused.push(m.id);
    // The schema of its own type agrees.
    expect(validator(`${m.type}.json`)(m)).toBe(message(m));
  }
  expect(refused).toEqual(['h-8']);
  // Closed objects: the documented hello with one field more is refused.
  const hello = JSON.parse(hostSession.find((l) => l.text.startsWith('{"type":"hello"'))!.text);
  expect(message(hello)).toBe(true);
  expect(message({ ...hello, extra: 1 })).toBe(false);
  const outbound = validator('project-outbound.json');
  const inbound = validator('project-inbound.json');
  const notice = validator('project-notice.json');
  for (const l of projectSession) {
    const m = JSON.parse(l.text);
    expect({ at: l.at, ok: (l.from === 'P' ? inbound : outbound)(m) }).toEqual({
      at: l.at,
      ok: true,
    });
    if (m.type === 'notice') expect(notice(m.notice)).toBe(true);
  }
});

describe('a live guest agent', () => {
  let g: GuestUnderTest;
  const upstream = (dir: string): string => path.join(dir, 'upstream.sock');

  beforeAll(async () => {
    // docs/protocol.md, "Example session": the guest the example was made with.
    g = await GuestUnderTest.start(
      'conformance',
      [
        { name: 'web', priority: 100, mode: 'graceful', memory: { min: '256MiB', max: '1GiB' } },
        { name: 'batch', priority: 10, mode: 'graceful', memory: { min: '1GiB', max: '1GiB' } },
      ],
      {
        extra: (e) => ({ guest: 'vm1', upstream: { transport: 'unix', path: upstream(e.dir) } }),
        ready: {
          what: 'both projects running',
          until: (e) => e.markerLines('web').length > 0 && e.markerLines('batch').length > 0,
        },
      },
    );
  });

  afterAll(() => g?.dispose());

  test('answers the example sessions of both documents line for line', async () => {
    const env = g.env;
    await waitFor('the upstream socket', () => existsSync(upstream(env.dir)));
    const now = Date.now();
    const times = new Map([
      [DOC_ISSUED, new Date(now).toISOString()],
      [DOC_DEADLINE, new Date(now + 120_000).toISOString()],
    ]);

    // The project first: connected and welcomed before the host's first notice.
    const token = (
      await fsp.readFile(path.join(env.runDir, 'projects/batch/token'), 'utf8')
    ).trim();
    const p = await connect(env.projectSocket);
    const project = new SessionPlayer(
      p.sock,
      p.reader,
      'P',
      {},
      new Map([[DOC_TOKEN, token], ...times]),
      60_000,
    );
    for (const [doc, real] of times) project.ids.set(doc, real);
    const firstNotice = projectSession.findIndex(
      (l) => l.from === 'A' && l.text.includes('"notice"'),
    );
    await project.play(projectSession.slice(0, firstNotice));

    // notice.json holds the latest notice, as docs/project-protocol.md says, when it comes.
    const noticeFile = path.join(env.runDir, 'projects/batch/notice.json');
    const fileChecks: string[] = [];
    const beforeDone = async (l: SessionLine): Promise<void> => {
      if (!l.text.includes('"done"')) return;
      const last = [...project.transcript]
        .reverse()
        .find((t) => t.startsWith('A> {"type":"notice"'))!;
      const pn = JSON.parse(last.slice(3)).notice;
      expect(await fsp.readFile(noticeFile, 'utf8')).toBe(`${JSON.stringify(pn, null, 2)}\n`);
      fileChecks.push(pn.notice.id);
    };

    const h = await connect(upstream(env.dir));
    const host = new SessionPlayer(h.sock, h.reader, 'H', GUEST_VARIABLE, times);
    for (const [doc, real] of times) host.ids.set(doc, real);
    try {
      await Promise.all([
        host.play(hostSession),
        project.play(projectSession.slice(firstNotice), { before: beforeDone }),
      ]);
      // Nothing more than the documents show (the last lines were a ping and its pong): one
      // more round trip on each socket, and its answer is the next line there. The agent
      // answers in order, so a line it sent before the probe would come first. On the host
      // socket a ping (docs/protocol.md, "ping"); on the project's a `done` for a notice it
      // does not know, which is acked and changes nothing (docs/project-protocol.md).
      h.sock.write(`${JSON.stringify({ type: 'ping', id: 'h-probe', t: 1 })}\n`);
      p.sock.write(`${JSON.stringify({ type: 'done', noticeId: 'probe' })}\n`);
      const [hNext] = await h.reader.take(1, 30_000);
      const [pNext] = await p.reader.take(1, 30_000);
      expect(JSON.parse(hNext)).toEqual({
        type: 'pong',
        id: expect.any(String),
        replyTo: 'h-probe',
        t: 1,
      });
      expect(JSON.parse(pNext)).toEqual({ type: 'ack', noticeId: 'probe' });
      expect(h.reader.pending).toEqual([]);
      expect(p.reader.pending).toEqual([]);
      expect(fileChecks).toEqual(['vm1-1-5f2a9c01', 'vm1-2-77e1d4b3']);
    } finally {
      h.sock.destroy();
      p.sock.destroy();
    }
    // The real effects the session describes: batch stopped (its first process is gone;
    // having answered done, it may have been killed before its SIGTERM handler ran) and
    // started again once (its marker comes once Node is up, maybe after the outcome); web
    // untouched.
    const batchStarts = (): string[] =>
      env.markerLines('batch').filter((l) => l.startsWith('start '));
    await waitFor('batch started again', () => batchStarts().length >= 2);
    const starts = batchStarts();
    expect(starts).toHaveLength(2);
    const firstPid = Number(starts[0].split(' ')[2]);
    expect(gone(firstPid, g.t.rootName)).toBe(true);
    expect(gone(Number(starts[1].split(' ')[2]), g.t.rootName)).toBe(false);
    expect(env.markerLines('web').filter((l) => l.startsWith('start '))).toHaveLength(1);
  });

  test('a host written from "Writing a host" alone (examples/minimal-host.mjs) reclaims and restores', async () => {
    // After the session: lastSeq 2, the whole 4 GiB back. The example picks seq 3, computes
    // the allocations from the hello, lists no capabilities, answers pings.
    const r = spawnSync(
      process.execPath,
      [
        path.join(REPO, 'examples/minimal-host.mjs'),
        upstream(g.env.dir),
        'vm1',
        String(3 * 1024 ** 3),
      ],
      { encoding: 'utf8', timeout: 120_000 },
    );
    expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' });
    expect(JSON.parse(r.stdout)).toEqual({
      reclaim: {
        ack: 'accepted',
        status: 'complete',
        freed: { memoryBytes: 1024 ** 3, cpus: 1 },
        actions: { batch: 'stopped', web: 'unchanged' },
      },
      restore: {
        ack: 'accepted',
        status: 'complete',
        freed: { memoryBytes: 1024 ** 3, cpus: 1 },
        actions: { batch: 'started', web: 'unchanged' },
      },
    });
    // Started by the restore: its process writes its marker once Node is up, which may be
    // after the outcome.
    await waitFor(
      'batch started a third time',
      () => g.env.markerLines('batch').filter((l) => l.startsWith('start ')).length === 3,
    );
  });
});
