/**
 * The schema check at the channel's boundary: good messages pass unchanged, bad ones are
 * refused with every problem named by its field and the value received.
 */
import {
  parseMessage,
  errorReply,
  isParsedMessage,
  MESSAGE_TYPES,
} from '../../../agent/protocol/schemas';
import type { Message } from '../../../agent/protocol/messages';
import type { Notice, Outcome } from '../../../agent/broker/types';

const notice: Notice = {
  id: 'n-1',
  guest: 'vm1',
  seq: 3,
  kind: 'reclaim',
  change: { cpus: 0.5, memoryBytes: 512 * 1024 ** 2 },
  allocation: { cpus: 1.5, memoryBytes: 1024 ** 3 },
  deadline: '2025-01-01T00:00:30.000Z',
  reason: 'host memory pressure',
  issuedAt: '2025-01-01T00:00:00.000Z',
};

const outcome: Outcome = {
  noticeId: 'n-1',
  guest: 'vm1',
  status: 'complete',
  projects: [
    {
      name: 'batch',
      action: 'stopped',
      before: { memoryHigh: 'max', memoryMax: 268435456, cpuMax: 1, cpuset: '0-1' },
      after: { memoryHigh: 'max', memoryMax: 'max', cpuMax: 'max' },
      exit: 'graceful',
      ms: 812,
      reason: 'lowest priority',
    },
  ],
  freed: { cpus: 0.5, memoryBytes: 536870912 },
  startedAt: '2025-01-01T00:00:00.100Z',
  finishedAt: '2025-01-01T00:00:01.000+01:00',
  ms: 900,
};

const good: Message[] = [
  {
    type: 'hello',
    id: 'h1',
    version: 1,
    guest: 'vm1',
    inventory: {
      cpus: 2,
      memoryBytes: 2 * 1024 ** 3,
      projects: [{ name: 'web', priority: 10, state: 'running' }],
    },
    lastSeq: 0,
  },
  { type: 'welcome', id: 'w1', replyTo: 'h1', version: 1, guest: 'vm1', heartbeatMs: 1000 },
  { type: 'notice', id: 'm1', notice },
  { type: 'restore', id: 'm2', notice: { ...notice, kind: 'restore', seq: 4 } },
  { type: 'ack', id: 'a1', replyTo: 'm1', noticeId: 'n-1', state: 'accepted' },
  {
    type: 'ack',
    id: 'a2',
    replyTo: 'm1',
    noticeId: 'n-1',
    state: 'rejected',
    error: { code: 'NOTICE_REJECTED', message: 'takes more than the guest has' },
  },
  {
    type: 'progress',
    id: 'p1',
    noticeId: 'n-1',
    project: 'batch',
    phase: 'stopped',
    action: 'stopped',
    exit: 'graceful',
    ms: 800,
  },
  { type: 'outcome', id: 'o1', outcome },
  { type: 'outcome', id: 'o2', outcome: { ...outcome, projects: [] }, parts: 2 },
  {
    type: 'outcome-part',
    id: 'op1',
    noticeId: outcome.noticeId,
    index: 1,
    count: 2,
    projects: outcome.projects,
  },
  { type: 'facts', id: 'f1', onlineCpus: [0], memTotal: 2 ** 31 },
  { type: 'cancel', id: 'c1', noticeId: 'n-1' },
  { type: 'plan', id: 'pl1', kind: 'reclaim', allocation: { cpus: 1, memoryBytes: 2 ** 30 } },
  {
    type: 'plan-result',
    id: 'pr1',
    replyTo: 'pl1',
    allocation: { cpus: 1, memoryBytes: 2 ** 30 },
    projectAllocation: { cpus: 1, memoryBytes: 2 ** 30 - 2 ** 26 },
    fits: false,
    reasons: ['batch stops: its minimum does not fit'],
    projects: [
      {
        project: 'batch',
        priority: 10,
        action: 'stopped',
        before: { memoryHigh: 2 ** 28, memoryMax: 2 ** 28, cpuMax: 'max' },
        after: { memoryHigh: 2 ** 28, memoryMax: 2 ** 28, cpuMax: 'max' },
        reason: 'its minimum does not fit',
      },
    ],
    omitted: 2,
  },
  { type: 'ping', id: 'pi', t: Date.now() },
  { type: 'pong', id: 'po', replyTo: 'pi', t: 5 },
  {
    type: 'error',
    id: 'e1',
    replyTo: 'x',
    code: 'PROTOCOL_INVALID',
    message: 'bad',
    problems: [{ field: 'notice.seq', message: 'must be an integer' }],
  },
];

test('every message type has a valid example here', () => {
  expect(new Set(good.map((m) => m.type))).toEqual(new Set(MESSAGE_TYPES));
});

test.each(good.map((m) => [m.type, m] as const))('a valid %s passes unchanged', (_t, m) => {
  expect(parseMessage(JSON.stringify(m))).toEqual({ ok: true, msg: m });
});

function refuse(raw: unknown): {
  message: string;
  problems: { field: string; message: string }[];
  replyTo?: string;
} {
  const r = parseMessage(typeof raw === 'string' ? raw : JSON.stringify(raw));
  expect(r.ok).toBe(false);
  if (r.ok) throw new Error('accepted');
  expect(r.error.code).toBe('PROTOCOL_INVALID');
  return r.error;
}

const fieldsOf = (e: { problems: { field: string }[] }): string[] => e.problems.map((p) => p.field);

test('not JSON: the line is named and shown', () => {
  const e = refuse('hello there');
  expect(e.message).toMatch(/not JSON.*got "hello there"/);
});

test('an unknown type lists the known ones and shows what was received', () => {
  const e = refuse({ type: 'exec', id: 'x1', cmd: 'rm -rf /' });
  expect(e.problems[0].field).toBe('type');
  expect(e.problems[0].message).toMatch(/must be one of hello, welcome, .*got "exec"/);
  expect(e.replyTo).toBe('x1');
});

test('unknown fields are refused, not dropped (strict), at every depth', () => {
  const e = refuse({ type: 'notice', id: 'm1', notice: { ...notice, command: 'sh' }, extra: 1 });
  expect(e.problems.map((p) => `${p.field}: ${p.message}`).sort()).toEqual([
    '(message): unknown field(s) "extra"',
    'notice: unknown field(s) "command"',
  ]);
});

test('every wrong field is reported at once, each with its path and the value received', () => {
  const bad = {
    ...notice,
    seq: 1.5,
    change: { cpus: 5000, memoryBytes: -1 },
    allocation: { cpus: Infinity, memoryBytes: 2 ** 60 },
    deadline: 'tomorrow',
    guest: '../etc',
  };
  const e = refuse({ type: 'notice', id: 'm1', notice: bad });
  expect(fieldsOf(e).sort()).toEqual(
    [
      'notice.allocation.cpus',
      'notice.allocation.memoryBytes',
      'notice.change.cpus',
      'notice.change.memoryBytes',
      'notice.deadline',
      'notice.guest',
      'notice.seq',
    ].sort(),
  );
  const byField = Object.fromEntries(e.problems.map((p) => [p.field, p.message]));
  expect(byField['notice.seq']).toMatch(/integer.*got 1.5/);
  expect(byField['notice.change.cpus']).toMatch(/4096.*got 5000/);
  expect(byField['notice.change.memoryBytes']).toMatch(/got -1/);
  expect(byField['notice.allocation.cpus']).toMatch(/got null/); // JSON turns Infinity into null
  expect(byField['notice.allocation.memoryBytes']).toMatch(
    /9007199254740991, got 1152921504606847000/,
  );
  expect(byField['notice.deadline']).toMatch(/datetime.*got "tomorrow"/);
  expect(byField['notice.guest']).toMatch(/got "\.\.\/etc"/);
  expect(e.message).toMatch(/^invalid "notice" message: /);
});

test('a missing field says so', () => {
  const e = refuse({ type: 'ping', id: 'p' });
  expect(e.problems).toEqual([{ field: 't', message: 'required, missing' }]);
});

test('ids are bounded and plain', () => {
  for (const id of ['', '-lead', 'a'.repeat(129), 'a b', 'ä', 7]) {
    const e = refuse({ type: 'ping', id, t: 1 });
    expect(fieldsOf(e)).toEqual(['id']);
  }
  expect(parseMessage(JSON.stringify({ type: 'ping', id: 'a'.repeat(128), t: 1 })).ok).toBe(true);
});

test('a notice message must carry a reclaim, a restore message a restore', () => {
  const e = refuse({ type: 'notice', id: 'm', notice: { ...notice, kind: 'restore' } });
  expect(e.problems).toEqual([
    { field: 'notice.kind', message: 'a notice message must carry kind "reclaim", got "restore"' },
  ]);
  expect(refuse({ type: 'restore', id: 'm', notice }).problems[0].field).toBe('notice.kind');
});

test('arrays are bounded: more than 10000 projects is refused', () => {
  const projects = Array.from({ length: 10_001 }, (_, i) => ({
    name: `p${i}`,
    priority: 0,
    state: 'running',
  }));
  const e = refuse({
    type: 'hello',
    id: 'h',
    version: 1,
    guest: 'g',
    inventory: { cpus: 1, memoryBytes: 1, projects },
    lastSeq: 0,
  });
  expect(fieldsOf(e)).toEqual(['inventory.projects']);
});

test('many problems are capped in the reply and the rest are counted', () => {
  const projects = Array.from({ length: 50 }, () => ({ name: '', priority: 0, state: 'running' }));
  const e = refuse({
    type: 'hello',
    id: 'h',
    version: 1,
    guest: 'g',
    inventory: { cpus: 1, memoryBytes: 1, projects },
    lastSeq: 0,
  });
  expect(e.problems).toHaveLength(20);
  expect(e.message).toMatch(/and 30 more/);
});

test('an error reply built from a failure is itself a valid error message', () => {
  const r = parseMessage(JSON.stringify({ type: 'ping', id: 'p9', t: -1, x: 'y'.repeat(5000) }));
  if (r.ok) throw new Error('accepted');
  const reply = errorReply(r.error, 'e-1');
  expect(reply).toMatchObject({
    type: 'error',
    id: 'e-1',
    replyTo: 'p9',
    code: 'PROTOCOL_INVALID',
  });
  expect(parseMessage(JSON.stringify(reply))).toEqual({ ok: true, msg: reply });
});

test('non-objects are refused without a crash', () => {
  for (const raw of ['null', '[]', '42', '"ping"', '{"type":null}']) {
    expect(parseMessage(raw).ok).toBe(false);
  }
});

test('a bad value is shown by its first 80 characters, however large or deep it is', () => {
  const wide = Object.fromEntries(Array.from({ length: 5000 }, (_, i) => [`k${i}`, i]));
  const deep = '['.repeat(20_000) + ']'.repeat(20_000);
  for (const id of [wide, 'x'.repeat(60_000)]) {
    const r = parseMessage(JSON.stringify({ type: 'ping', id, t: 1 }));
    expect(r.ok).toBe(false);
    const msg = (r as { error: { message: string } }).error.message;
    const shown = /got (.*)$/.exec(msg)![1];
    expect(shown.length).toBeLessThanOrEqual(80);
    expect(shown.endsWith('…')).toBe(true);
  }
  const r = parseMessage(`{"type":"ping","id":${deep},"t":1}`);
  expect(r.ok).toBe(false);
  expect((r as { error: { message: string } }).error.message).toMatch(/got \[\[\[\[/);
});

describe('leaving and online CPUs (docs/protocol.md, "Types of values": cpu list)', () => {
  const notice = {
    id: 'n-1',
    guest: 'vm1',
    seq: 1,
    kind: 'reclaim',
    change: { cpus: 1, memoryBytes: 0 },
    allocation: { cpus: 1, memoryBytes: 1024 },
    deadline: '2026-12-02T14:02:00.000Z',
    reason: 'r',
    issuedAt: '2026-12-02T14:00:00.000Z',
  };
  const line = (m: object): string => JSON.stringify(m);

  test('a reclaim may name the CPUs that go; a restore may not', () => {
    expect(
      parseMessage(line({ type: 'notice', id: 'm', notice: { ...notice, leavingCpus: [1] } })).ok,
    ).toBe(true);
    const r = parseMessage(
      line({ type: 'restore', id: 'm', notice: { ...notice, kind: 'restore', leavingCpus: [1] } }),
    );
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.error.problems.map((p) => p.field)).toEqual(['notice.leavingCpus']);
  });

  test('out of bounds, repeated or unordered CPU numbers are refused, naming the field', () => {
    for (const bad of [[4096], [-1], [1.5], [1, 1], [2, 1]]) {
      const r = parseMessage(
        line({ type: 'notice', id: 'm', notice: { ...notice, leavingCpus: bad } }),
      );
      expect({ bad, ok: r.ok }).toEqual({ bad, ok: false });
      if (!r.ok) expect(r.error.problems[0].field).toMatch(/^notice\.leavingCpus/);
    }
  });

  test('hello and outcome carry the online CPUs and MemTotal', () => {
    const hello = {
      type: 'hello',
      id: 'h',
      version: 1,
      guest: 'vm1',
      inventory: { cpus: 2, memoryBytes: 1024, projects: [] },
      lastSeq: 0,
      onlineCpus: [0, 1],
      memTotal: 4116692992,
    };
    expect(parseMessage(line(hello)).ok).toBe(true);
    expect(parseMessage(line({ ...hello, memTotal: -1 })).ok).toBe(false);
    expect(parseMessage(line({ ...hello, onlineCpus: '0-1' })).ok).toBe(false);
  });
});

test('a message parseMessage returned is known as validated; an equal object from elsewhere is not', () => {
  const line = JSON.stringify({ type: 'ping', id: 'p-1', t: 5 });
  const r = parseMessage(line);
  expect(r.ok).toBe(true);
  if (!r.ok) return;
  expect(isParsedMessage(r.msg)).toBe(true);
  // A receiver handed this (a test's fake channel, a copy) validates it itself.
  expect(isParsedMessage(JSON.parse(line))).toBe(false);
  expect(isParsedMessage({ ...r.msg })).toBe(false);
  expect(isParsedMessage(line)).toBe(false);
  expect(isParsedMessage(null)).toBe(false);
  expect(parseMessage('{"type":"ping"}').ok).toBe(false);
});
