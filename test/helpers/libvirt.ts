/**
 * The real libvirtd for tests (docs/libvirt.md, "Tests"): these machines have no systemd
 * as PID 1, so `virtlogd -d` and `libvirtd -d` are started here when they are not running,
 * and exactly those, by the pid each writes to /run/<name>.pid, are stopped at the end.
 * A daemon that was already running (an operator's, another test's) is left alone.
 * The packages come from `make test-deps` (apt-get).
 */
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);

export const LIBVIRT_DEBS = [
  'libvirt-daemon-system',
  'libvirt-daemon-driver-qemu',
  'libvirt-clients',
  'libxml2-utils',
  'qemu-system-x86',
];

export interface StartedDaemon {
  name: string;
  pid: number;
}

async function pidOf(name: string): Promise<number | null> {
  let text: string;
  try {
    text = await fs.readFile(`/run/${name}.pid`, 'utf8');
  } catch {
    return null;
  }
  const pid = Number(text.trim());
  if (!Number.isInteger(pid) || pid <= 0) return null;
  try {
    // The pid file may be stale: the process must exist and be that program.
    const comm = (await fs.readFile(`/proc/${pid}/comm`, 'utf8')).trim();
    return comm === name ? pid : null;
  } catch {
    return null;
  }
}

/** Fails naming the packages when virsh or the daemons are not installed. */
export async function requireLibvirt(): Promise<void> {
  const missing: string[] = [];
  for (const bin of ['/usr/bin/virsh', '/usr/sbin/libvirtd', '/usr/sbin/virtlogd'])
    await fs.access(bin).catch(() => missing.push(bin));
  if (missing.length > 0)
    throw new Error(
      `libvirt is not installed (${missing.join(', ')} missing): run 'make test-deps' (apt-get install ${LIBVIRT_DEBS.join(' ')})`,
    );
}

/** Starts virtlogd and libvirtd unless running; returns those it started. */
export async function ensureLibvirtd(timeoutMs = 60_000): Promise<StartedDaemon[]> {
  await requireLibvirt();
  const started: StartedDaemon[] = [];
  for (const name of ['virtlogd', 'libvirtd']) {
    if ((await pidOf(name)) !== null) continue;
    await run(`/usr/sbin/${name}`, ['-d'], { timeout: timeoutMs });
    const t0 = Date.now();
    let pid: number | null = null;
    while ((pid = await pidOf(name)) === null) {
      if (Date.now() - t0 > timeoutMs) throw new Error(`${name} -d wrote no pid file`);
      await new Promise((r) => setTimeout(r, 100));
    }
    started.push({ name, pid });
  }
  // libvirtd answers once its socket is up.
  const t0 = Date.now();
  for (;;) {
    try {
      await run('virsh', ['-c', 'qemu:///system', 'version'], { timeout: timeoutMs });
      break;
    } catch (err) {
      if (Date.now() - t0 > timeoutMs) throw err;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  return started;
}

/** Stops the daemons a test started, by pid, newest first, and waits for each to go. */
export async function stopStarted(started: StartedDaemon[], timeoutMs = 30_000): Promise<void> {
  for (const d of [...started].reverse()) {
    try {
      process.kill(d.pid, 'SIGTERM');
    } catch {
      continue;
    }
    const t0 = Date.now();
    while (Date.now() - t0 < timeoutMs) {
      try {
        process.kill(d.pid, 0);
      } catch {
        break;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}
