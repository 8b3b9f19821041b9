/**
 * `nestbroker wait-ready guest|host --config FILE [--pid PID] [--timeout 90s]`: returns once
 * the daemon answers `status` on its operator socket, which it does only when it is ready
 * (the guest agent: in its leaf cgroup, projects adopted or started; the host broker:
 * journals read, socket bound).
 *
 * Why: node cannot send sd_notify datagrams (no AF_UNIX SOCK_DGRAM), so the units are
 * Type=exec, and `systemctl start|restart` returned as soon as node was exec'd, seconds
 * before the agent had even moved itself into its leaf cgroup (the CI failure of stop 8:
 * `systemctl restart` then `cat /proc/$MAINPID/cgroup` showed the unit's cgroup, not
 * `agent/`). As the units' ExecStartPost= it keeps the unit "activating" until the daemon
 * is ready, so `systemctl start` and units ordered After= it wait for that, as with
 * Type=notify (systemd.service(5), ExecStartPost=; $MAINPID is set for it).
 */
import { isNestError, NestError } from '../common/errors';
import { rpcCall } from '../common/rpc';

export interface WaitReadyOptions {
  socket: string;
  timeoutMs: number;
  /** The daemon's pid: stop waiting at once if it is gone (it failed to start). */
  pid?: number;
  /** Between connection attempts while nothing listens yet. */
  pollMs?: number;
  now?: () => number;
  sleep?: (ms: number) => Promise<void>;
  alive?: (pid: number) => boolean;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists, we may not signal it.
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Nothing listens yet (no socket file, or the last run's file with nobody behind it). */
function notListening(err: unknown): boolean {
  if (!isNestError(err, 'TRANSPORT')) return false;
  const code = (err.cause as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOENT' || code === 'ECONNREFUSED';
}

/** Resolves with the daemon's status once it answers; rejects TIMEOUT or TRANSPORT. */
export async function waitReady(o: WaitReadyOptions): Promise<unknown> {
  // Monotonic: a wall-clock step while a unit starts is not a timeout (docs/reliability.md, "Time").
  const now = o.now ?? (() => performance.now());
  const sleep = o.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
  const alive = o.alive ?? pidAlive;
  const pollMs = o.pollMs ?? 100;
  const deadline = now() + o.timeoutMs;
  let attempts = 0;
  for (;;) {
    if (o.pid !== undefined && !alive(o.pid))
      throw new NestError('TRANSPORT', `the daemon (pid ${o.pid}) exited before it was ready`);
    const left = deadline - now();
    if (left <= 0) break;
    attempts++;
    try {
      // The daemon holds `status` until it is ready: one call may wait most of the time.
      return await rpcCall(o.socket, 'status', {}, { timeoutMs: left });
    } catch (err) {
      if (isNestError(err, 'TIMEOUT')) break;
      if (!notListening(err)) throw err;
    }
    await sleep(Math.min(pollMs, Math.max(0, deadline - now())));
  }
  throw new NestError(
    'TIMEOUT',
    `the daemon at ${o.socket} was not ready within ${o.timeoutMs} ms (${attempts} attempts)`,
  );
}
