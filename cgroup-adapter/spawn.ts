/**
 * Starting a process INSIDE a group, with no window in which it (or anything it forks)
 * runs outside. Node cannot place a child in a cgroup at fork time (no clone3
 * CLONE_INTO_CGROUP binding), so we spawn a gate: `/bin/sh` blocks reading a pipe, we
 * move its pid into the group (every hierarchy), then release the gate and the shell
 * `exec`s the real program, which therefore starts (and forks) inside the group.
 */
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
  // `read` fails at EOF: if we close the gate without "go" (move failed), never exec.
  const script = `IFS= read -r _ <&${gateFd} || exit ${GATE_CLOSED_EXIT}; exec ${gateFd}<&-; exec "$@"`;
  const child = spawn('/bin/sh', ['-c', script, 'sh', file, ...args], {
    env: opts.env,
    cwd: opts.cwd,
    uid: opts.uid,
    gid: opts.gid,
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
