/**
 * A root project that moves itself out of its cgroup (docs/reliability.md, "Processes
 * that leave their project"). It runs without `command.user` (so the agent warns), in a
 * cgroup namespace of its own rooted at its group; it leaves a sleeper in its group,
 * writes its own pid into another group of the test's root in every hierarchy, and forks
 * a second sleeper from there. Where the kernel refuses the move (cgroup2 mounted with
 * nsdelegate) it "cannot"; where it allows it (this build machine: no nsdelegate, and v1
 * hierarchies never check namespaces), the stop that follows must catch it, even by an
 * agent started after the escape (it knows the processes from the state dir): the outcome
 * says `escaped` with the pids, and those processes (with their start times) are gone.
 */
import { readFileSync, readlinkSync } from 'node:fs';
import * as path from 'node:path';
import type { Outcome, ProjectOutcome } from '../../../agent/broker/types';
import { stillAlive, knownNow, type KnownProcess } from '../../../agent/common/proc';
import { GuestUnderTest, nestctl, waitFor } from './harness';

jest.setTimeout(60_000);

let g: GuestUnderTest;
let escaper: KnownProcess;
let outsideSleeper: KnownProcess;
let insideSleeper: KnownProcess;
let refused: string[] = [];

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-escape',
    [
      { name: 'web', priority: 100, mode: 'graceful', memory: { min: '256MiB', max: '1GiB' } },
      {
        name: 'runaway',
        priority: 1,
        mode: 'escape',
        grace: '1s',
        memory: { min: '512MiB', max: '1GiB' },
      },
    ],
    {
      // The group it flees to: beside the agent's, inside the test's own root.
      prepare: async (env, t) => {
        await t.adapter.create('outside');
        const procs = Object.values(t.driver.paths('outside')).map((d) =>
          path.join(d, 'cgroup.procs'),
        );
        const cfg = JSON.parse(readFileSync(env.configFile, 'utf8')) as {
          projects: { name: string; command: { env: Record<string, string> } }[];
        };
        cfg.projects.find((p) => p.name === 'runaway')!.command.env.ESCAPE_TO = procs.join(':');
        const { writeFileSync } = await import('node:fs');
        writeFileSync(env.configFile, JSON.stringify(cfg));
      },
      ready: {
        what: 'the runaway to have tried to leave',
        until: (env) => env.markerLines('runaway').some((l) => l.startsWith('escaped ')),
      },
    },
  );
  const lines = g.env.markerLines('runaway');
  const [, pid, sleeper] = lines.find((l) => l.startsWith('escaped '))!.split(' ');
  escaper = knownNow(Number(pid))!;
  outsideSleeper = knownNow(Number(sleeper))!;
  insideSleeper = knownNow(Number(lines.find((l) => l.startsWith('inside '))!.split(' ')[1]))!;
  refused = lines.filter((l) => l.startsWith('refused '));
});

afterAll(() => g?.dispose());

test('a project without command.user is warned about at start', () => {
  const warn = g
    .agent!.stdout()
    .split('\n')
    .filter((l) => l.includes('no command.user'))
    .map((l) => JSON.parse(l) as { level: number; project: string; msg: string });
  expect(warn.map((w) => [w.project, w.level])).toEqual([
    ['web', 40],
    ['runaway', 40],
  ]);
  expect(warn[0].msg).toMatch(/runs as root/);
});

test('the project runs in a cgroup namespace of its own, rooted at its group', () => {
  const lines = g.env.markerLines('runaway');
  // What it saw of itself before it moved: the root of its namespace.
  expect(lines).toContain('cgroup 0::/');
  expect(readlinkSync(`/proc/${insideSleeper.pid}/ns/cgroup`)).not.toBe(
    readlinkSync('/proc/self/ns/cgroup'),
  );
  // Its sleeper stayed in the group, in the agent's view.
  expect(readFileSync(`/proc/${insideSleeper.pid}/cgroup`, 'utf8')).toContain(
    `0::/${g.t.rootName}/guest/projects/runaway\n`,
  );
});

describe('an agent restart, then a reclaim that stops it', () => {
  let code: number | null;
  let outcome: Outcome;
  const of = (name: string): ProjectOutcome => outcome.projects.find((p) => p.name === name)!;

  beforeAll(async () => {
    expect(escaper && outsideSleeper && insideSleeper).toBeTruthy();
    // The new agent knows the processes its predecessor started only from the state dir.
    await g.restart();
    code = (await nestctl(g.env, ['reclaim', '--memory', '3.5GiB', '--deadline', '20s'])).code;
    const notices = JSON.parse((await nestctl(g.env, ['notices', '--json'])).stdout) as {
      outcome: Outcome;
    }[];
    outcome = notices[0].outcome;
  });

  test('the new agent re-adopted the project (its sleeper still in the group)', () => {
    expect(g.agent!.stdout()).toMatch(/"project":"runaway".*re-adopted a running project/);
  });

  test('the kernel refused the move, or the stop caught it: escaped, with its pids', () => {
    expect(code).toBe(0);
    expect(of('runaway').action).toBe('stopped');
    if (refused.length === g.t.driver.hierarchies.length) {
      // Every move refused (nsdelegate on a v2-only machine): a plain stop.
      expect(of('runaway').exit).toMatch(/^(graceful|killed)$/);
      return;
    }
    expect(of('runaway').exit).toBe('escaped');
    expect(of('runaway').escaped).toEqual(
      expect.arrayContaining([escaper.pid, outsideSleeper.pid]),
    );
    expect(of('runaway').escaped).not.toContain(insideSleeper.pid);
    expect(of('runaway').reason).toMatch(/had left its cgroup .*: killed/);
    expect(of('web').action).not.toBe('stopped');
  });

  test('nothing of it is left: the escaped processes and the one in the group are gone', async () => {
    for (const p of [escaper, outsideSleeper, insideSleeper]) expect(stillAlive(p)).toBe(false);
    expect(await g.t.adapter.pids('outside')).toEqual([]);
    expect(await g.t.adapter.pids('guest/projects/runaway')).toEqual([]);
  });

  test('the agent logged the escape as a warning, naming the pids', async () => {
    if (refused.length === g.t.driver.hierarchies.length) return;
    await waitFor('the warning', () => g.agent!.stdout().includes('had left the project'));
    const line = g
      .agent!.stdout()
      .split('\n')
      .find((l) => l.includes('had left the project'))!;
    const w = JSON.parse(line) as { level: number; escaped: { pid: number }[] };
    expect(w.level).toBe(40);
    expect(w.escaped.map((e) => e.pid)).toEqual(
      expect.arrayContaining([escaper.pid, outsideSleeper.pid]),
    );
  });
});
