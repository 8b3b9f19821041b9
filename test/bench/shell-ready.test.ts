/**
 * The bench's shell project (bench/lib/stack.ts SHELL_PROJECT) and its readiness check: a
 * project the bench restarts and stops again straight away must leave no `sleep` behind.
 * Signalled between the fork of its `sleep` and the exec, the forked copy of the shell
 * catches the SIGTERM with the shell's trap, forgets it, and execs `sleep 3600`: the group
 * stays populated until the stop's grace (10 s in the benches) ends in SIGKILL.
 *
 * The story, on real processes in this run's own cgroup root: each start is followed, as in
 * the bench after a restore, by the readiness wait and then at once by the bench's stop
 * (SIGTERM to every pid of the group); every time, the group is empty within 2 s.
 */
import { spawnInto } from '../../cgroup-adapter/spawn';
import { openTestAdapter, type TestAdapter } from '../helpers/cgroup-root';
import { SHELL_PROJECT, waitShellsReady } from '../../bench/lib/stack';

jest.setTimeout(120_000);

let t: TestAdapter;
beforeAll(async () => {
  t = await openTestAdapter('shell-ready');
});
afterAll(async () => {
  await t?.dispose();
});

const ROUNDS = 40;

test(`${ROUNDS} times: start, wait until ready, SIGTERM every pid: the group empties at once`, async () => {
  await t.adapter.create('p');
  for (let i = 0; i < ROUNDS; i++) {
    const child = await spawnInto(t.driver, 'p', SHELL_PROJECT[0], SHELL_PROJECT.slice(1), {
      stdio: 'ignore',
    });
    const exited = new Promise((r) => child.once('exit', r));
    await waitShellsReady(t.driver, ['p'], 10_000);
    for (const pid of await t.adapter.pids('p')) process.kill(pid, 'SIGTERM');
    await t.adapter.waitEmpty('p', 2000);
    await exited;
    expect(child.exitCode).toBe(0); // the trap ran: `exit 0`
  }
  await t.adapter.remove('p');
});
