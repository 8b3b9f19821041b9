/**
 * Outcomes larger than one line: the sender's split keeps every line within
 * the 64 KiB cap up to the protocol's 10 000 projects, each message passes the strict
 * schemas, and the receiver rebuilds exactly the outcome that was sent — in any order of
 * parts, never from an incomplete set.
 */
import type { Outcome, ProjectOutcome } from '../../../agent/broker/types';
import { encode } from '../../../agent/protocol/framing';
import {
  MAX_LINE_BYTES,
  type OutcomeMsg,
  type OutcomePart,
} from '../../../agent/protocol/messages';
import { OutcomeAssembler, outcomeMessages } from '../../../agent/protocol/outcome-parts';
import { parseMessage } from '../../../agent/protocol/schemas';

function project(i: number, reason = 'lowest priority: stopped to make room'): ProjectOutcome {
  return {
    name: `project-${String(i).padStart(5, '0')}`,
    action: i % 2 ? 'stopped' : 'shrunk',
    before: { memoryHigh: 'max', memoryMax: 268435456, cpuMax: 0.5 },
    after: { memoryHigh: 67108864, memoryMax: 67108864, cpuMax: 0.1 },
    exit: i % 2 ? 'graceful' : null,
    ms: i,
    reason,
  };
}

function outcome(n: number, reason?: string): Outcome {
  return {
    noticeId: 'vm1-7-abcd',
    guest: 'vm1',
    status: 'complete',
    projects: Array.from({ length: n }, (_, i) => project(i, reason)),
    freed: { memoryBytes: 1 << 30, cpus: 1 },
    startedAt: new Date(0).toISOString(),
    finishedAt: new Date(5).toISOString(),
    ms: 5,
  };
}

/** Every message as the wire would carry it: encoded (throws over the cap), then parsed. */
function overTheWire(msgs: (OutcomeMsg | OutcomePart)[]): (OutcomeMsg | OutcomePart)[] {
  return msgs.map((m) => {
    const line = encode(m);
    expect(line.length).toBeLessThanOrEqual(MAX_LINE_BYTES);
    const r = parseMessage(line.toString('utf8').trimEnd());
    if (!r.ok) throw new Error(r.error.message);
    return r.msg as OutcomeMsg | OutcomePart;
  });
}

test('an outcome that fits one line is sent as it always was: one outcome message, no parts', () => {
  const o = outcome(10);
  const msgs = overTheWire(outcomeMessages(o));
  expect(msgs).toHaveLength(1);
  expect(msgs[0]).toMatchObject({ type: 'outcome', outcome: o });
  expect(msgs[0]).not.toHaveProperty('parts');
});

test.each([300, 500, 10_000])(
  '%i projects: parts then a summary, every line within 64 KiB, reassembled exactly',
  (n) => {
    const o = outcome(n);
    // The bug: as one line this is far over the cap.
    expect(() => encode({ type: 'outcome', id: 'x', outcome: o })).toThrow(/PROTOCOL_OVERSIZE|cap/);
    const msgs = overTheWire(outcomeMessages(o));
    const parts = msgs.filter((m): m is OutcomePart => m.type === 'outcome-part');
    const summary = msgs[msgs.length - 1] as OutcomeMsg;
    expect(summary.type).toBe('outcome');
    expect(summary.parts).toBe(parts.length);
    expect(summary.outcome.projects).toEqual([]);
    expect(parts.length).toBeGreaterThan(1);
    expect(parts.map((p) => p.index)).toEqual(parts.map((_, i) => i));
    const asm = new OutcomeAssembler();
    // Order of parts does not matter: reversed here.
    for (const p of [...parts].reverse()) asm.add(p);
    expect(asm.complete(summary)).toEqual({ ok: true, outcome: o });
    expect(asm.holding).toBe(0);
  },
);

test.each([300, 10_000])(
  '%i projects to a peer without outcome-parts: one outcome line within 64 KiB, acted-on projects first, the rest whole',
  (n) => {
    // Acted-on projects at the end: the cut must keep them wherever they are.
    const o = outcome(n);
    o.projects = o.projects.map((p, i) =>
      i < n - 20 ? { ...p, action: 'unchanged', exit: null } : p,
    );
    const msgs = overTheWire(outcomeMessages(o, { parts: false }));
    expect(msgs.map((m) => m.type)).toEqual(['outcome']);
    const got = (msgs[0] as OutcomeMsg).outcome;
    expect(msgs[0]).not.toHaveProperty('parts');
    expect({ ...got, projects: [] }).toEqual({ ...o, projects: [] });
    expect(got.projects.length).toBeLessThan(n);
    expect(got.projects.length).toBeGreaterThan(20);
    const names = new Set(got.projects.map((p) => p.name));
    for (const p of o.projects.slice(n - 20)) expect(names.has(p.name)).toBe(true);
    // Kept in their original order.
    const order = o.projects.filter((p) => names.has(p.name)).map((p) => p.name);
    expect(got.projects.map((p) => p.name)).toEqual(order);
  },
);

test('projects with the longest reasons the schema allows still fit, one or more a part', () => {
  const o = outcome(300, 'x'.repeat(1024));
  const msgs = overTheWire(outcomeMessages(o));
  const asm = new OutcomeAssembler();
  for (const m of msgs.slice(0, -1)) asm.add(m as OutcomePart);
  expect(asm.complete(msgs[msgs.length - 1] as OutcomeMsg)).toEqual({ ok: true, outcome: o });
});

test('a summary whose parts did not all arrive is refused, naming what is missing; a resend completes it', () => {
  const o = outcome(500);
  const first = outcomeMessages(o);
  const asm = new OutcomeAssembler();
  const parts = first.slice(0, -1) as OutcomePart[];
  for (const p of parts) if (p.index !== 1) asm.add(p); // part 1 lost
  expect(asm.complete(first[first.length - 1] as OutcomeMsg)).toEqual({
    ok: false,
    missing: [1],
    count: parts.length,
  });
  // The sender's resend: the whole sequence again.
  const again = outcomeMessages(o);
  for (const p of again.slice(0, -1)) asm.add(p as OutcomePart);
  expect(asm.complete(again[again.length - 1] as OutcomeMsg)).toEqual({ ok: true, outcome: o });
});

test('the schemas refuse a part whose index is not below its count, and a summary with parts that also carries projects', () => {
  const bad = parseMessage(
    JSON.stringify({
      type: 'outcome-part',
      id: 'p1',
      noticeId: 'n1',
      index: 3,
      count: 3,
      projects: [project(1)],
    }),
  );
  expect(bad.ok).toBe(false);
  if (!bad.ok) expect(bad.error.problems).toEqual([expect.objectContaining({ field: 'index' })]);
  const both = parseMessage(
    JSON.stringify({ type: 'outcome', id: 'o1', outcome: outcome(2), parts: 1 }),
  );
  expect(both.ok).toBe(false);
  if (!both.ok) expect(both.error.problems[0].field).toBe('outcome.projects');
  const unknown = parseMessage(
    JSON.stringify({
      type: 'outcome-part',
      id: 'p1',
      noticeId: 'n1',
      index: 0,
      count: 1,
      projects: [project(1)],
      extra: 1,
    }),
  );
  expect(unknown.ok).toBe(false);
});

test('the assembler holds a bounded number of notices: the oldest is dropped for a new one', () => {
  const asm = new OutcomeAssembler(2);
  const part = (noticeId: string): OutcomePart => ({
    type: 'outcome-part',
    id: 'x',
    noticeId,
    index: 0,
    count: 2,
    projects: [project(0)],
  });
  asm.add(part('a'));
  asm.add(part('b'));
  asm.add(part('c'));
  expect(asm.holding).toBe(2);
  const summary = (id: string): OutcomeMsg => ({
    type: 'outcome',
    id: 'y',
    outcome: { ...outcome(0), noticeId: id },
    parts: 2,
  });
  expect(asm.complete(summary('a'))).toMatchObject({ ok: false, missing: [0, 1] });
  expect(asm.complete(summary('c'))).toMatchObject({ ok: false, missing: [1] });
});
