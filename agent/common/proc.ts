/**
 * Processes as /proc shows them (proc(5)): a pid is only ever trusted together with its
 * start time (field 22 of /proc/<pid>/stat, clock ticks since boot), so a pid the kernel
 * has handed to another process is never taken for the one we knew. Liveness of a
 * project is still its cgroup's membership (CONTRIBUTING.md); this is for the processes
 * that are no longer in it.
 */
import { closeSync, openSync, readSync, readdirSync } from 'node:fs';
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
  /**
   * Field 9, the kernel's flags word: PF_EXITING (0x4, include/linux/sched.h as proc(5)
   * refers to it) is set when the process begins to exit, before it leaves its cgroups.
   */
  exiting: boolean;
  ppid: number;
  session: number;
  start: number;
}

/** PF_EXITING in /proc/<pid>/stat field 9 (proc(5); include/linux/sched.h). */
const PF_EXITING = 0x4;
/** One buffer for every stat read: a stat line is a few hundred bytes. */
const statBuf = Buffer.alloc(4096);

/**
 * Fields of /proc/<pid>/stat we use, or undefined when there is no such process. One
 * open, one read(2), one close: readFileSync adds an fstat and a second read to find
 * the end, and a scan of /proc reads this for every process on the machine (2 000 on a
 * busy host: 70–200 ms of the event loop; docs/performance.md, "Closing the gap to the kernel's floor").
 */
export function readStat(pid: number): Stat | undefined {
  let text: string;
  let fd: number | undefined;
  try {
    fd = openSync(`/proc/${pid}/stat`, 'r');
    const n = readSync(fd, statBuf, 0, statBuf.length, 0);
    text = statBuf.toString('latin1', 0, n);
  } catch {
    return undefined;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
  // comm (field 2) is in parentheses and may hold spaces or ')': count from the last ')'.
  // What follows starts at field 3 (state): ppid is field 4, session 6, flags 9,
  // starttime 22.
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const ppid = Number(f[4 - 3]);
  const session = Number(f[6 - 3]);
  const flags = Number(f[9 - 3]);
  const start = Number(f[22 - 3]);
  if (!Number.isFinite(start)) return undefined;
  return { state: f[0], exiting: (flags & PF_EXITING) !== 0, ppid, session, start };
}

/** The process now behind a pid, or undefined when none runs. */
export function knownNow(pid: number): KnownProcess | undefined {
  const s = readStat(pid);
  return s ? { pid, start: s.start } : undefined;
}

/**
 * True while this very process (same pid AND start time) runs. A zombie does not: it has
 * exited and left its cgroup (the kernel lists it in no cgroup.procs), and only waits for
 * its parent to reap it. Nor does one already exiting (PF_EXITING): it leaves cgroup.procs
 * before it is a zombie, and never runs user code again. A stopped project's shell whose
 * group is at its CPU quota can sit in that state until the next CFS period (up to
 * 100 ms, Documentation/scheduler/sched-bwc.rst), which the escape check took for a
 * process outside its group (docs/reliability.md, "Processes that leave their project").
 */
export function stillAlive(p: KnownProcess): boolean {
  const s = readStat(p.pid);
  return s !== undefined && s.start === p.start && live(s);
}

const live = (s: Stat): boolean => s.state !== 'Z' && s.state !== 'X' && !s.exiting;

/** A number from a /proc/sys file, or undefined (no such file here, unreadable). */
function sysNumber(file: string): number | undefined {
  let fd: number | undefined;
  try {
    fd = openSync(file, 'r');
    const n = readSync(fd, statBuf, 0, 64, 0);
    const v = Number(statBuf.toString('latin1', 0, n).trim());
    return Number.isInteger(v) ? v : undefined;
  } catch {
    return undefined;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

/** proc(5): the last pid the kernel handed out in this pid namespace, and the ceiling. */
const LAST_PID = '/proc/sys/kernel/ns_last_pid';
let pidMax: number | undefined;

interface Scan {
  /** performance.now() when it began. */
  at: number;
  /** ns_last_pid read before /proc was listed: every process made after it has a later pid. */
  last: number | undefined;
  procs: Map<number, Stat>;
}

/**
 * How old a scan may be and still be brought up to date rather than made afresh. Within it
 * the kernel would have to hand out more than half of pid_max (proc(5); 16 384 of the
 * default 32 768) for a pid to come round again unseen: over 8 000 forks a second.
 */
const REFRESH_MAX_AGE_MS = 2_000;

/**
 * The pids the kernel may have handed out since `l0` (up to `l1`, ns_last_pid then and
 * now; pids are given out in order, wrapping at pid_max), or undefined when that cannot
 * be told (too many, or the numbers are missing).
 */
function madeSince(l0: number, l1: number): ((pid: number) => boolean) | undefined {
  pidMax ??= sysNumber('/proc/sys/kernel/pid_max');
  if (pidMax === undefined) return undefined;
  const span = l1 >= l0 ? l1 - l0 : pidMax - l0 + l1;
  if (span > pidMax / 2) return undefined;
  return l1 >= l0 ? (p) => p > l0 && p <= l1 : (p) => p > l0 || p <= l1;
}

/**
 * Every process /proc lists now (zombies and exiting ones left out), by pid. With a recent
 * `prev`, only the pids made since it (and those it had not seen alive) have their stat
 * read: a process whose pid has not been handed out again since is the one `prev` read,
 * and no process can join a session other than by being forked into it (setsid(2) only
 * makes a session of its own), so its session is still known. Its state may have changed:
 * the members a caller is given are read again (sessionMembers). A scan of every
 * process is ~10 µs a process here (a guest agent beside 3 500 processes: 40–60 ms of the
 * event loop); brought up to date it is one listing of /proc and the new pids' stat.
 */
function scan(prev?: Scan): Scan {
  const at = performance.now();
  const last = sysNumber(LAST_PID);
  const out = new Map<number, Stat>();
  let names: string[];
  try {
    names = readdirSync('/proc');
  } catch {
    return { at, last, procs: out };
  }
  const made =
    prev?.last !== undefined && last !== undefined && at - prev.at <= REFRESH_MAX_AGE_MS
      ? madeSince(prev.last, last)
      : undefined;
  for (const n of names) {
    if (!/^[0-9]+$/.test(n)) continue;
    const pid = Number(n);
    const known = made && !made(pid) ? prev!.procs.get(pid) : undefined;
    const s = known ?? readStat(pid);
    if (s && live(s)) out.set(pid, s);
  }
  return { at, last, procs: out };
}

let cached: Scan | undefined;
/** A scan of /proc is shared by the stops of one notice that run together. */
const SCAN_MAX_AGE_MS = 50;

/**
 * Every live process of the session `leader` began (setsid: the session id is the
 * leader's pid), the leader itself included if alive. A project is started in its own
 * session (agent/guest/projects.ts), so its forks carry that id unless they call setsid
 * themselves. Only processes started no earlier than the leader count: an older process
 * in a session with that number belongs to an earlier owner of the pid.
 *
 * One scan of /proc serves every call that accepts it: with `notBefore` (performance.now()
 * time), any scan begun at or after it (the caller needs a view of the processes taken
 * after some moment, e.g. after its group was seen empty); without, any scan begun within
 * SCAN_MAX_AGE_MS. The scan's age runs from its start: a scan that took longer than the
 * window (thousands of processes) no longer served even the next call. A new scan brings
 * the last one up to date where it can (scan).
 */
export function sessionMembers(
  leader: KnownProcess,
  now = performance.now(),
  notBefore?: number,
): KnownProcess[] {
  const fresh =
    cached !== undefined &&
    (notBefore !== undefined ? cached.at >= notBefore : now - cached.at <= SCAN_MAX_AGE_MS);
  if (!fresh) cached = scan(cached);
  const procs = cached!.procs;
  const out: KnownProcess[] = [];
  // A live process with the leader's pid that is not the leader began a session of its
  // own with that number: the leader's descendants can no longer be told from its.
  const holder = procs.get(leader.pid);
  if (holder && holder.start !== leader.start) return out;
  for (const [pid, s] of procs)
    if (s.session === leader.pid && s.start >= leader.start) {
      // Read again: an entry carried over from an earlier scan may have exited since.
      const k = { pid, start: s.start };
      if (stillAlive(k)) out.push(k);
    }
  return out;
}
