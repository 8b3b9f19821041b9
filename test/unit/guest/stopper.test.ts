/**
 * The graceful stop, one act at a time (docs/architecture.md, "Where it is acted on
 * (guest)"): with recording fakes of the group (cgroup.procs, cgroup.events, cgroup.kill)
 * and of kill(2), and a clock the test moves, each case says what the stopper did, in
 * which order, how the stop ended and what it reported. The same stop on real processes
 * and cgroups: test/integration/guest/reclaim.test.ts and test/faults/projects.test.ts.
 */
import { silentLogger } from '../../../agent/common/log';
import { stopProject, type StopDeps, type StopSpec } from '../../../agent/guest/stopper';
import {
  FakeGroup,
  TestClock,
  fakeHook,
  recordingSignals,
  type GroupScript,
} from '../../helpers/guest-fakes';

const G = 'projects/web';

interface Run {
  script: GroupScript;
  spec?: Partial<StopSpec>;
  /** The notice's deadline, from the start of the stop. */
  deadlineInMs?: number;
  deps?: Partial<StopDeps>;
  gone?: number[];
  denied?: number[];
}

function stop(r: Run) {
  const clock = new TestClock();
  const events: string[] = [];
  const group = new FakeGroup(r.script, clock, events);
  const spec: StopSpec = { signal: 'SIGTERM', gracePeriodMs: 5_000, ...r.spec };
  const deadline = clock.monotonic() + (r.deadlineInMs ?? 60_000);
  const result = stopProject(G, spec, deadline, {
    adapter: group,
    sendSignal: recordingSignals(events, { gone: r.gone, denied: r.denied }),
    spawnHook: async (g, argv) => {
      events.push(`hook ${g} ${argv.join(' ')}`);
      return fakeHook(events, 0);
    },
    waitDone: (signal) => group.waitDone(signal),
    log: silentLogger(),
    clock,
    ...r.deps,
  });
  return { result: clock.run(result), events, clock };
}

describe('how a stop ends, and what it did on the way', () => {
  test.each<{
    case: string;
    run: Run;
    exit: string;
    events: string[];
    ms: number;
    reason: RegExp;
    signalled: number;
  }>([
    {
      case: 'nothing runs: already-gone, no signal, no kill',
      run: { script: { pids: [[]] } },
      exit: 'already-gone',
      events: [`pids ${G} → []`],
      ms: 0,
      reason: /^no process was running$/,
      signalled: 0,
    },
    {
      case: 'nothing runs as readPids reads it: already-gone, not even an adapter read',
      run: { script: { pids: [[101]] }, deps: { readPids: () => [] } },
      exit: 'already-gone',
      events: [],
      ms: 0,
      reason: /^no process was running$/,
      signalled: 0,
    },
    {
      case: 'it exits within its grace: graceful, never killed',
      run: { script: { pids: [[101, 102]], exitsAfterMs: 1_200 } },
      exit: 'graceful',
      events: [
        `pids ${G} → [101,102]`,
        `pids ${G} → [101,102]`,
        'signal 101 SIGTERM',
        'signal 102 SIGTERM',
        `waitEmpty ${G} 5000`,
      ],
      ms: 1_200,
      reason: /^exited 1200 ms after SIGTERM \(grace 5000 ms\)$/,
      signalled: 2,
    },
    {
      case: 'still running when its grace runs out: killed, the whole group at once',
      run: { script: { pids: [[101]], killMs: 7 } },
      exit: 'killed',
      events: [
        `pids ${G} → [101]`,
        `pids ${G} → [101]`,
        'signal 101 SIGTERM',
        `waitEmpty ${G} 5000`,
        `kill ${G}`,
      ],
      ms: 5_007,
      reason: /^still running after its 5000 ms grace period; killed$/,
      signalled: 1,
    },
    {
      case: 'a deadline nearer than the grace caps it, and the reason says so',
      run: { script: { pids: [[101]] }, deadlineInMs: 800 },
      exit: 'killed',
      events: [
        `pids ${G} → [101]`,
        `pids ${G} → [101]`,
        'signal 101 SIGTERM',
        `waitEmpty ${G} 800`,
        `kill ${G}`,
      ],
      ms: 803,
      reason:
        /^still running when the notice deadline capped its grace at 800 ms \(configured 5000 ms\); killed$/,
      signalled: 1,
    },
    {
      case: 'the project answers done: its grace ends early, what is left is killed',
      run: { script: { pids: [[101]], doneAfterMs: 300 } },
      exit: 'graceful',
      events: [
        `pids ${G} → [101]`,
        `pids ${G} → [101]`,
        'signal 101 SIGTERM',
        `waitEmpty ${G} 5000`,
        'done',
        `kill ${G}`,
      ],
      ms: 303,
      reason: /^answered done 300 ms after SIGTERM; what was left was killed$/,
      signalled: 1,
    },
    {
      case: 'the configured stop signal is the one sent',
      run: { script: { pids: [[101]], exitsAfterMs: 10 }, spec: { signal: 'SIGINT' } },
      exit: 'graceful',
      events: [
        `pids ${G} → [101]`,
        `pids ${G} → [101]`,
        'signal 101 SIGINT',
        `waitEmpty ${G} 5000`,
      ],
      ms: 10,
      reason: /after SIGINT/,
      signalled: 1,
    },
    {
      case: 'a process gone between the read and the signal (ESRCH) is not counted',
      run: { script: { pids: [[101, 102]], exitsAfterMs: 5 }, gone: [101] },
      exit: 'graceful',
      events: [
        `pids ${G} → [101,102]`,
        `pids ${G} → [101,102]`,
        'signal 102 SIGTERM',
        `waitEmpty ${G} 5000`,
      ],
      ms: 5,
      reason: /^exited 5 ms/,
      signalled: 1,
    },
    {
      // Both reads of cgroup.procs (is anything running? what to signal) go through
      // readPids: no thread-pool read through the adapter at all.
      case: 'cgroup.procs read synchronously (readPids) is the list signalled',
      run: {
        script: { pids: [[101]], exitsAfterMs: 5 },
        deps: { readPids: () => [101, 103] },
      },
      exit: 'graceful',
      events: ['signal 101 SIGTERM', 'signal 103 SIGTERM', `waitEmpty ${G} 5000`],
      ms: 5,
      reason: /^exited/,
      signalled: 2,
    },
  ])('$case', async ({ run, exit, events, ms, reason, signalled }) => {
    const s = stop(run);
    const r = await s.result;
    expect(r.exit).toBe(exit);
    expect(s.events).toEqual(events);
    expect(r.ms).toBe(ms);
    expect(r.reason).toMatch(reason);
    expect(r.signalled).toBe(signalled);
  });
});

test('a signal refused for another reason than ESRCH fails the stop (it is not ours to judge)', async () => {
  const s = stop({ script: { pids: [[101]] }, denied: [101] });
  await expect(s.result).rejects.toMatchObject({ code: 'EPERM' });
  expect(s.events).not.toContain(`kill ${G}`);
});

test('the grace leaves room for the kill: it ends killMs before the deadline, and the kill is timed', async () => {
  const killed: number[] = [];
  const s = stop({
    script: { pids: [[101]], killMs: 40 },
    deadlineInMs: 1_000,
    deps: { killMs: 50, onKilled: (ms) => killed.push(ms) },
  });
  const r = await s.result;
  expect(s.events).toContain(`waitEmpty ${G} 950`);
  expect(r).toMatchObject({ exit: 'killed', ms: 990 });
  expect(r.ms).toBeLessThanOrEqual(1_000); // empty by the deadline
  expect(killed).toEqual([40]);
});

test('phases: signalled, killed and empty, in ms into the stop', async () => {
  const s = stop({ script: { pids: [[101]], killMs: 4 }, spec: { gracePeriodMs: 2_000 } });
  const r = await s.result;
  expect(r.phases).toEqual({ signalled: 0, killed: 2_000, empty: 2_004 });
});

describe('the turn: stop signals go out in rank order', () => {
  test('the hook and the signal wait for the turn; the stop is timed from it', async () => {
    const events: string[] = [];
    let open!: () => void;
    const turn = new Promise<void>((r) => (open = r));
    const clock = new TestClock();
    const group = new FakeGroup({ pids: [[101]], exitsAfterMs: 50 }, clock, events);
    const result = stopProject(
      G,
      {
        signal: 'SIGTERM',
        gracePeriodMs: 5_000,
        preStop: { command: ['/bin/drain'], timeoutMs: 1_000 },
      },
      clock.monotonic() + 60_000,
      {
        adapter: group,
        sendSignal: recordingSignals(events),
        spawnHook: async (g, argv) => {
          events.push(`hook ${g} ${argv.join(' ')}`);
          return fakeHook(events, 0);
        },
        waitDone: (signal) => group.waitDone(signal),
        turn: async () => {
          events.push('waiting for the turn');
          await turn;
          events.push('turn');
        },
        onSignalled: () => events.push('signalled: next one’s turn'),
        log: silentLogger(),
        clock,
      },
    );
    await new Promise((r) => setImmediate(r));
    expect(events).toEqual([`pids ${G} → [101]`, 'waiting for the turn']);
    clock.advance(9_000); // the lower-ranked projects' signals took this long
    open();
    const r = await clock.run(result);
    expect(events).toEqual([
      `pids ${G} → [101]`,
      'waiting for the turn',
      'turn',
      `hook ${G} /bin/drain`,
      'hook exit 0',
      `pids ${G} → [101]`,
      'signal 101 SIGTERM',
      'signalled: next one’s turn',
      `waitEmpty ${G} 5000`,
    ]);
    expect(r).toMatchObject({ exit: 'graceful', hook: 'ok', ms: 50 });
  });
});

describe('the pre-stop hook: before the signal, inside the group, its end named', () => {
  test.each([
    { case: 'exits 0', spawn: 'exit 0', hook: 'ok' },
    { case: 'exits non-zero: the stop goes on', spawn: 'exit 3', hook: 'failed' },
    { case: 'cannot be started: the stop goes on', spawn: 'throw', hook: 'failed' },
  ])('$case → $hook', async ({ spawn, hook }) => {
    const s = stop({
      script: { pids: [[101]], exitsAfterMs: 20 },
      spec: { preStop: { command: ['/bin/true'], timeoutMs: 1_000 } },
      deps: {
        spawnHook: async () => {
          if (spawn === 'throw') throw new Error('ENOENT');
          return fakeHook([], Number(spawn.split(' ')[1]));
        },
      },
    });
    const r = await s.result;
    expect(r.hook).toBe(hook);
    expect(r.exit).toBe('graceful');
    expect(s.events).toContain('signal 101 SIGTERM');
  });

  test('no hook configured: none run, and none reported', async () => {
    const r = await stop({ script: { pids: [[101]], exitsAfterMs: 1 } }).result;
    expect(r.hook).toBeUndefined();
    expect(r.phases.preStop).toBeUndefined();
  });
});
