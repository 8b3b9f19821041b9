/**
 * The broker role with recording fake children: every child hears of the notice before
 * anything is taken; groups run in order, a group's steps together; the deadline aborts
 * a child and a child that overruns it is recorded as failed; a journaled step is never
 * run again, a started one is resumed. The same role serves projects (guest) and guests
 * (host): the fake children here use plain strings as notices and outcomes.
 */
import {
  runBroker,
  summariseProjects,
  type BrokerStep,
  type ChildHandle,
  type StepJournalRecord,
} from '../../../agent/broker/broker';
import { silentLogger } from '../../../agent/common/log';
import type { Notice, ProjectOutcome } from '../../../agent/broker/types';

type Event = string;

function recorder() {
  const events: Event[] = [];
  const child = (
    name: string,
    opts: { applyMs?: number; fail?: boolean; honourAbort?: boolean } = {},
  ): ChildHandle<string, string> => ({
    name,
    async deliver(n) {
      events.push(`deliver ${name} ${n}`);
    },
    apply(n, ctx) {
      events.push(`start ${name}${ctx.resumed ? ' (resumed)' : ''}`);
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => {
          events.push(`end ${name}`);
          if (opts.fail) reject(new Error(`${name} broke`));
          else resolve(`${name} did ${n}`);
        }, opts.applyMs ?? 5);
        t.unref();
        if (opts.honourAbort)
          ctx.signal.addEventListener('abort', () => {
            clearTimeout(t);
            events.push(`aborted ${name}`);
            resolve(`${name} cut short`);
          });
      });
    },
  });
  return { events, child };
}

const failed = (s: BrokerStep<string>, err: unknown) =>
  `${s.child} failed: ${(err as Error).message}`;
const base = { noticeId: 'n1', log: silentLogger(), failed };
const soon = (ms: number) => new Date(Date.now() + ms);

test('every child gets its notice before any child is acted on', async () => {
  const { events, child } = recorder();
  const children = new Map([
    ['a', child('a')],
    ['b', child('b')],
    ['c', child('c')],
  ]);
  const steps = [
    { child: 'a', order: 1, notice: 'stop' },
    { child: 'b', order: 2, notice: 'shrink' },
    { child: 'c', order: 3, notice: 'tell', act: false },
  ];
  const results = await runBroker(steps, children, { ...base, deadline: soon(5000) });
  const firstStart = events.findIndex((e) => e.startsWith('start'));
  expect(events.slice(0, firstStart).sort()).toEqual([
    'deliver a stop',
    'deliver b shrink',
    'deliver c tell',
  ]);
  // c is only told: it is never acted on and has no result.
  expect(events).not.toContain('start c');
  expect(results.map((r) => r.outcome)).toEqual(['a did stop', 'b did shrink']);
});

test('groups run one after another; the steps of one group run together', async () => {
  const { events, child } = recorder();
  const children = new Map([
    ['low', child('low', { applyMs: 30 })],
    ['mid1', child('mid1', { applyMs: 30 })],
    ['mid2', child('mid2', { applyMs: 30 })],
  ]);
  await runBroker(
    [
      { child: 'mid2', order: 2, notice: 'x' },
      { child: 'low', order: 1, notice: 'x' },
      { child: 'mid1', order: 2, notice: 'x' },
    ],
    children,
    { ...base, deadline: soon(5000) },
  );
  const acts = events.filter((e) => !e.startsWith('deliver'));
  expect(acts.slice(0, 2)).toEqual(['start low', 'end low']);
  expect(acts.slice(2, 4).sort()).toEqual(['start mid1', 'start mid2']);
});

test('the deadline aborts what runs; a child that ignores it is recorded failed after the overrun', async () => {
  const { events, child } = recorder();
  const children = new Map([
    ['polite', child('polite', { applyMs: 10_000, honourAbort: true })],
    ['deaf', child('deaf', { applyMs: 10_000 })],
  ]);
  const t0 = Date.now();
  const results = await runBroker(
    [
      { child: 'polite', order: 1, notice: 'x' },
      { child: 'deaf', order: 1, notice: 'x' },
    ],
    children,
    { ...base, deadline: soon(100), overrunMs: 100 },
  );
  expect(Date.now() - t0).toBeLessThan(1000);
  expect(events).toContain('aborted polite');
  expect(results.map((r) => r.outcome)).toEqual([
    'polite cut short',
    expect.stringMatching(/^deaf failed: .*did not finish in time/),
  ]);
});

test('a child that throws is recorded failed; the others still run', async () => {
  const { child } = recorder();
  const children = new Map([
    ['bad', child('bad', { fail: true })],
    ['good', child('good')],
  ]);
  const results = await runBroker(
    [
      { child: 'bad', order: 1, notice: 'x' },
      { child: 'good', order: 2, notice: 'x' },
    ],
    children,
    { ...base, deadline: soon(5000) },
  );
  expect(results.map((r) => r.outcome)).toEqual(['bad failed: bad broke', 'good did x']);
});

test('after a restart: a done step is not repeated, a started one is resumed, a delivered one not re-delivered', async () => {
  const { events, child } = recorder();
  const stored = new Map<string, StepJournalRecord<string>>([
    ['a', { deliveredAt: 'x', startedAt: 'x', outcome: 'a did stop (first run)' }],
    ['b', { deliveredAt: 'x', startedAt: 'x' }],
  ]);
  const journal = {
    get: async (c: string) => stored.get(c),
    put: async (c: string, r: StepJournalRecord<string>) => void stored.set(c, r),
  };
  const children = new Map([
    ['a', child('a')],
    ['b', child('b')],
    ['c', child('c')],
  ]);
  const results = await runBroker(
    [
      { child: 'a', order: 1, notice: 'stop' },
      { child: 'b', order: 2, notice: 'stop' },
      { child: 'c', order: 3, notice: 'stop' },
    ],
    children,
    { ...base, deadline: soon(5000), journal },
  );
  expect(events).toEqual(['deliver c stop', 'start b (resumed)', 'end b', 'start c', 'end c']);
  expect(results.map((r) => [r.child, r.fromJournal])).toEqual([
    ['a', true],
    ['b', false],
    ['c', false],
  ]);
  expect(results[0].outcome).toBe('a did stop (first run)');
  expect(stored.get('c')?.outcome).toBe('c did stop');
});

test('the outcome of a level of projects: totals freed and status', () => {
  const lim = (m: number, c: number) => ({ memoryHigh: m, memoryMax: m, cpuMax: c });
  const notice = { id: 'n', guest: 'vm1', kind: 'reclaim' } as Notice;
  const projects: ProjectOutcome[] = [
    {
      name: 'a',
      action: 'stopped',
      before: lim(100, 1),
      after: lim(0, 0),
      exit: 'graceful',
      ms: 5,
      reason: '',
    },
    {
      name: 'b',
      action: 'shrunk',
      before: lim(100, 1),
      after: lim(60, 0.5),
      exit: null,
      ms: 5,
      reason: '',
    },
  ];
  const o = summariseProjects(
    notice,
    projects,
    { memoryBytes: 1000, cpus: 2 },
    new Date(0),
    new Date(10),
  );
  expect(o).toMatchObject({ status: 'complete', freed: { memoryBytes: 140, cpus: 1.5 }, ms: 10 });
  projects[1].error = { code: 'TIMEOUT', message: 'late' };
  expect(
    summariseProjects(notice, projects, { memoryBytes: 1000, cpus: 2 }, new Date(0), new Date(1))
      .status,
  ).toBe('partial');
});

test('the same roles nest: a broker whose child is an agent (client + broker) one level deeper', async () => {
  // Level 2: an agent whose children are projects, behind the client's notice book.
  const { NoticeBook } = await import('../../../agent/client/notices');
  const os = await import('node:os');
  const fsp = (await import('node:fs')).promises;
  const path = await import('node:path');
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-nest-'));
  const events: string[] = [];
  const project = (name: string): ChildHandle<string, ProjectOutcome> => ({
    name,
    deliver: async (n) => void events.push(`project ${name} told: ${n}`),
    apply: async () => {
      events.push(`project ${name} stopped`);
      const l = { memoryHigh: 10, memoryMax: 10, cpuMax: 1 };
      return {
        name,
        action: 'stopped',
        before: l,
        after: { ...l, memoryMax: 0, memoryHigh: 0, cpuMax: 0 },
        exit: 'graceful',
        ms: 1,
        reason: '',
      };
    },
  });
  const inner = new NoticeBook(
    dir,
    {
      name: 'vm1',
      check: async () => [],
      carryOut: async (n, ctx) => {
        const results = await runBroker(
          [{ child: 'p1', order: 1, notice: `inside ${n.id}` }],
          new Map([['p1', project('p1')]]),
          {
            noticeId: n.id,
            deadline: new Date(n.deadline),
            log: silentLogger(),
            journal: ctx.steps as never,
            failed: () => {
              throw new Error('no');
            },
          },
        );
        return summariseProjects(
          n,
          results.map((r) => r.outcome),
          n.allocation,
          new Date(),
          new Date(),
        );
      },
    },
    silentLogger(),
  );
  await inner.init();

  // Level 1: a broker whose child is that agent (notice = Notice, outcome = Outcome).
  const n: Notice = {
    id: 'top',
    guest: 'vm1',
    seq: 1,
    kind: 'reclaim',
    change: { cpus: 1, memoryBytes: 10 },
    allocation: { cpus: 1, memoryBytes: 100 },
    deadline: soon(5000).toISOString(),
    reason: 'r',
    issuedAt: new Date().toISOString(),
  };
  let pending: Promise<import('../../../agent/broker/types').Outcome> | undefined;
  const agent: ChildHandle<Notice, import('../../../agent/broker/types').Outcome> = {
    name: 'vm1',
    deliver: async (notice) => {
      events.push(`agent vm1 told: ${notice.id}`);
      pending = (await inner.submit(notice, 'upstream')).outcome;
    },
    apply: async () => pending!,
  };
  const [r] = await runBroker([{ child: 'vm1', order: 1, notice: n }], new Map([['vm1', agent]]), {
    noticeId: 'top',
    deadline: soon(5000),
    log: silentLogger(),
    failed: () => {
      throw new Error('no');
    },
  });
  expect(events).toEqual([
    'agent vm1 told: top',
    'project p1 told: inside top',
    'project p1 stopped',
  ]);
  expect(r.outcome).toMatchObject({
    noticeId: 'top',
    status: 'complete',
    projects: [{ name: 'p1', exit: 'graceful' }],
  });
  await fsp.rm(dir, { recursive: true, force: true });
});
