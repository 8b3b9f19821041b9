/**
 * Processes as /proc shows them (proc(5)): a pid is only ever trusted together with its
 * start time (field 22 of /proc/<pid>/stat, clock ticks since boot), so a pid the kernel
 * has handed to another process is never taken for the one we knew. Liveness of a
 * project is still its cgroup's membership (CONTRIBUTING.md); this is for the processes
 * that are no longer in it.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';

/** A process as we knew it: the pid and the start time that make it that process. */
export interface KnownProcess {
  pid: number;
  /** /proc/<pid>/stat field 22 (clock ticks since boot). */
  start: number;
}

interface Stat {
  /** Field 3: R, S, D, … Z (zombie: exited, not yet reaped), X (dead). */
  state: string;
  ppid: number;
  session: number;
  start: number;
}

/** Fields of /proc/<pid>/stat we use, or undefined when there is no such process. */
export function readStat(pid: number): Stat | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined;
  }
  // comm (field 2) is in parentheses and may hold spaces or ')': count from the last ')'.
  // What follows starts at field 3 (state): ppid is field 4, session 6, starttime 22.
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const ppid = Number(f[4 - 3]);
  const session = Number(f[6 - 3]);
  const start = Number(f[22 - 3]);
  if (!Number.isFinite(start)) return undefined;
  return { state: f[0], ppid, session, start };
}

/** The process now behind a pid, or undefined when none runs. */
export function knownNow(pid: number): KnownProcess | undefined {
  const s = readStat(pid);
  return s ? { pid, start: s.start } : undefined;
}

/**
 * True while this very process (same pid AND start time) runs. A zombie does not: it has
 * exited and left its cgroup (the kernel lists it in no cgroup.procs), and only waits for
 * its parent to reap it.
 */
export function stillAlive(p: KnownProcess): boolean {
  const s = readStat(p.pid);
  return s !== undefined && s.start === p.start && s.state !== 'Z' && s.state !== 'X';
}

/** Every process /proc lists now (zombies left out), by pid. */
function scan(): Map<number, Stat> {
  const out = new Map<number, Stat>();
  let names: string[];
  try {
    names = readdirSync('/proc');
  } catch {
    return out;
  }
  for (const n of names) {
    if (!/^[0-9]+$/.test(n)) continue;
    const s = readStat(Number(n));
    if (s && s.state !== 'Z' && s.state !== 'X') out.set(Number(n), s);
  }
  return out;
}

let cached: { at: number; procs: Map<number, Stat> } | undefined;
/** A scan of /proc is shared by the stops of one notice that run together. */
const SCAN_MAX_AGE_MS = 50;

/**
 * Every live process of the session `leader` began (setsid: the session id is the
 * leader's pid), the leader itself included if alive. A project is started in its own
 * session (agent/guest/projects.ts), so its forks carry that id unless they call setsid
 * themselves. Only processes started no earlier than the leader count: an older process
 * in a session with that number belongs to an earlier owner of the pid. One scan of /proc
 * serves every call within SCAN_MAX_AGE_MS.
 */
export function sessionMembers(leader: KnownProcess, now = performance.now()): KnownProcess[] {
  if (!cached || now - cached.at > SCAN_MAX_AGE_MS) cached = { at: now, procs: scan() };
  const out: KnownProcess[] = [];
  // A live process with the leader's pid that is not the leader began a session of its
  // own with that number: the leader's descendants can no longer be told from its.
  const holder = cached.procs.get(leader.pid);
  if (holder && holder.start !== leader.start) return out;
  for (const [pid, s] of cached.procs)
    if (s.session === leader.pid && s.start >= leader.start) out.push({ pid, start: s.start });
  return out;
}
