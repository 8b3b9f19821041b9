/**
 * agent/common/proc.ts on this machine's real /proc: a session's members are found, those
 * forked after an earlier scan too (the scan brought up to date from ns_last_pid), and one
 * that has exited since an earlier scan is not listed (docs/reliability.md, "Processes that
 * leave their project").
 */
import { spawn, type ChildProcess } from 'node:child_process';
import {
  knownNow,
  sessionMembers,
  stillAlive,
  type KnownProcess,
} from '../../../agent/common/proc';

let leader: ChildProcess | undefined;
const seen = new Set<number>();

afterAll(() => {
  for (const pid of seen)
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
});

/** The members as a scan begun now sees them (never an older scan). */
const membersNow = (k: KnownProcess): KnownProcess[] =>
  sessionMembers(k, performance.now(), performance.now());

async function until<T>(what: string, f: () => T | undefined, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('the members of a session, one forked after an earlier scan, and not one that exited', async () => {
  // Its own session (detached: setsid); on USR1 it forks one more sleep, which stays in it.
  leader = spawn('/bin/sh', ['-c', 'trap "sleep 30 &" USR1; sleep 30 & while :; do wait; done'], {
    detached: true,
    stdio: 'ignore',
  });
  const pid = leader.pid!;
  seen.add(pid);
  const k = await until('the leader in /proc', () => knownNow(pid));
  const two = await until('the leader and its first sleep', () => {
    const m = membersNow(k);
    return m.length === 2 ? m : undefined;
  });
  for (const m of two) seen.add(m.pid);
  expect(two.map((m) => m.pid)).toContain(pid);

  // A scan just made; then a fork after it: the next scan (brought up to date) finds it.
  process.kill(pid, 'SIGUSR1');
  const three = await until('the sleep forked after the last scan', () => {
    const m = membersNow(k);
    return m.length === 3 ? m : undefined;
  });
  for (const m of three) seen.add(m.pid);
  const forked = three.find((m) => !two.some((t) => t.pid === m.pid))!;
  expect(stillAlive(forked)).toBe(true);

  // One exits (the shell reaps it): no longer a member, though an earlier scan listed it.
  process.kill(forked.pid, 'SIGKILL');
  const after = await until('the killed sleep gone from the members', () => {
    const m = membersNow(k);
    return m.some((x) => x.pid === forked.pid) ? undefined : m;
  });
  expect(after.map((m) => m.pid).sort()).toEqual(two.map((m) => m.pid).sort());
});
