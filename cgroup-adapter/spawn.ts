/**
 * Starting a process INSIDE a group, with no window in which it (or anything it forks)
 * runs outside. Node cannot place a child in a cgroup at fork time (no clone3
 * CLONE_INTO_CGROUP binding), so we spawn a gate: `/bin/sh` blocks reading a pipe, we
 * move its pid into the group (every hierarchy), then release the gate and the shell
 * `exec`s the real program, which therefore starts (and forks) inside the group.
 *
 * With `cgroupNamespace`, the shell execs `unshare --cgroup` (util-linux, unshare(1))
 * once it is inside the group, so the program starts in its own cgroup namespace whose
 * root is that group in every hierarchy (cgroup_namespaces(7)): it sees itself at `/` in
 * /proc/self/cgroup, and a cgroupfs it mounts shows only its group. unshare then execs
 * setpriv(1), which drops CAP_SYS_ADMIN and CAP_SETPCAP from the bounding set (so not
 * even a root program can setns(2) back out or unshare again) and, for a project with a
 * user, sets gid, clears the supplementary groups and sets uid, as Node's own uid/gid
 * option does: unsharing needs CAP_SYS_ADMIN, which the project's user does not have, so
 * the drop comes after it. What the namespace holds and what it does not, per
 * hierarchy: docs/reliability.md, "Processes that leave their project".
 */
import { accessSync, constants as fsConstants } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { type ChildProcess, spawn, type StdioOptions } from 'node:child_process';
import type { Writable } from 'node:stream';
import { CgroupError } from './errors';
import type { CgroupAdapter } from './types';

export interface SpawnIntoOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  uid?: number;
  gid?: number;
  /** As child_process.spawn; the gate takes the next fd after these (3 by default). */
  stdio?: StdioOptions;
  /** New process group / session (so it can outlive us); see child_process.spawn. */
  detached?: boolean;
  /** Start the program in a new cgroup namespace rooted at `group` (unshare --cgroup). */
  cgroupNamespace?: boolean;
}

/** util-linux's programs, where Debian (and most distributions) install them. */
function findProgram(name: string): string | undefined {
  for (const dir of ['/usr/bin', '/bin']) {
    const p = `${dir}/${name}`;
    try {
      accessSync(p, fsConstants.X_OK);
      return p;
    } catch {
      // next candidate
    }
  }
  return undefined;
}

/** Capabilities a program started in its own cgroup namespace never gets back. */
const DROPPED_CAPS = '-sys_admin,-setpcap';

/**
 * The programs that give a child its cgroup namespace, or why it cannot have one here:
 * unshare and setpriv missing, or this process may not create a cgroup namespace (no
 * CAP_SYS_ADMIN, as under a unit whose CapabilityBoundingSet lacks it) or not drop a
 * capability (no CAP_SETPCAP). Tried once per process with /bin/true, the same chain a
 * child runs: the agent's start-up asks (agent/guest/projects.ts) and every spawnInto with
 * cgroupNamespace after it gets the same answer, without a second spawnSync.
 */
export function cgroupNamespaceSupport(): NamespaceSupport {
  support ??= probeCgroupNamespace();
  return support;
}

type NamespaceSupport =
  { ok: true; unshare: string; setpriv: string } | { ok: false; reason: string };

let support: NamespaceSupport | undefined;

function probeCgroupNamespace(): NamespaceSupport {
  const unshare = findProgram('unshare');
  const setpriv = findProgram('setpriv');
  if (!unshare || !setpriv)
    return {
      ok: false,
      reason: 'unshare(1) or setpriv(1) (util-linux) not found in /usr/bin or /bin',
    };
  const r = spawnSync(
    unshare,
    ['--cgroup', '--', setpriv, `--bounding-set=${DROPPED_CAPS}`, '--', '/bin/true'],
    { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 },
  );
  if (r.status !== 0)
    return {
      ok: false,
      reason: `${unshare} --cgroup … setpriv --bounding-set=${DROPPED_CAPS} failed (${r.error?.message ?? `exit ${r.status}`}): ${String(r.stderr ?? '').trim()}`,
    };
  return { ok: true, unshare, setpriv };
}

/** Exit code of the gate shell when the gate closes without the go-ahead. */
export const GATE_CLOSED_EXIT = 125;

export async function spawnInto(
  adapter: CgroupAdapter,
  group: string,
  file: string,
  args: readonly string[],
  opts: SpawnIntoOptions = {},
): Promise<ChildProcess> {
  if (typeof file !== 'string' || file === '' || file.includes('\0')) {
    throw new CgroupError(
      'EINVAL',
      `file must be a non-empty program name, got ${JSON.stringify(file)}`,
      {
        field: 'file',
        value: file,
      },
    );
  }
  const base: unknown[] =
    opts.stdio === undefined
      ? ['pipe', 'pipe', 'pipe']
      : typeof opts.stdio === 'string'
        ? [opts.stdio, opts.stdio, opts.stdio]
        : [...opts.stdio];
  while (base.length < 3) base.push('pipe');
  const gateFd = base.length;
  // The program and its arguments after the gate: itself, or unshare(1) running it in a
  // new cgroup namespace (and dropping to its user there).
  let argv = [file, ...args];
  let uid = opts.uid;
  let gid = opts.gid;
  if (opts.cgroupNamespace) {
    const support = cgroupNamespaceSupport();
    if (!support.ok)
      throw new CgroupError(
        'UNSUPPORTED',
        `cannot start ${file} in its own cgroup namespace: ${support.reason}`,
        { field: 'cgroupNamespace', value: true },
      );
    const drop: string[] = [];
    if (gid !== undefined) drop.push(`--regid=${gid}`, '--clear-groups');
    if (uid !== undefined) drop.push(`--reuid=${uid}`);
    argv = [
      support.unshare,
      '--cgroup',
      '--',
      support.setpriv,
      `--bounding-set=${DROPPED_CAPS}`,
      ...drop,
      '--',
      ...argv,
    ];
    uid = undefined;
    gid = undefined;
  }
  // `read` fails at EOF: if we close the gate without "go" (move failed), never exec.
  const script = `IFS= read -r _ <&${gateFd} || exit ${GATE_CLOSED_EXIT}; exec ${gateFd}<&-; exec "$@"`;
  const child = spawn('/bin/sh', ['-c', script, 'sh', ...argv], {
    env: opts.env,
    cwd: opts.cwd,
    uid,
    gid,
    detached: opts.detached,
    stdio: [...base, 'pipe'] as StdioOptions,
  });
  const gate = child.stdio[gateFd] as Writable | null;
  if (child.pid === undefined || !gate) {
    const err = await new Promise<unknown>((resolve) => {
      child.once('error', resolve);
      setImmediate(() => resolve(undefined));
    });
    throw new CgroupError(
      'WRITE_FAILED',
      `could not start /bin/sh to run ${file}: ${String(err)}`,
      {
        field: 'file',
        value: file,
        cause: err,
      },
    );
  }
  gate.on('error', () => undefined); // EPIPE if the shell died: surfaced by 'exit'
  try {
    await adapter.movePid(group, child.pid);
  } catch (e) {
    child.kill('SIGKILL');
    gate.destroy();
    throw e;
  }
  gate.end('go\n');
  return child;
}
