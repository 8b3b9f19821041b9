/**
 * virsh, the command-line client of libvirt (Debian's libvirt-clients; virsh(1)), as the
 * host broker's only way to a libvirt host (docs/libvirt.md, "Why virsh and not a
 * binding"). Every call is `execFile('virsh', ['-c', uri, ...args])`: an argument array,
 * never a shell, so a domain name is never parsed as shell syntax; every call has its own
 * timeout (under load `virsh define` and `start` take tens of seconds: docs/libvirt.md,
 * "Figures"), and what virsh said on stderr is kept in the error.
 *
 * Errors (agent/common/errors.ts):
 *   PREREQUISITE_MISSING  virsh is not installed (execFile's ENOENT)
 *   DOMAIN_UNKNOWN        "failed to get domain" / "Domain not found" (no such domain)
 *   LIBVIRT_ERROR         any other non-zero exit, a signal, or the timeout
 */
import { execFile } from 'node:child_process';
import { NestError } from '../../common/errors';

export const DEFAULT_LIBVIRT_URI = 'qemu:///system';
/** One virsh call's bound: generous, `virsh define` took 51 s on a loaded machine. */
export const DEFAULT_VIRSH_TIMEOUT_MS = 60_000;

export interface VirshResult {
  stdout: string;
  stderr: string;
}

/**
 * What runs one virsh command: the real one spawns virsh; a test passes a recording fake
 * that answers from test/fixtures/libvirt/.
 */
export type VirshRunner = (args: readonly string[], timeoutMs: number) => Promise<VirshResult>;

export interface VirshOptions {
  uri?: string;
  timeoutMs?: number;
  /** The program (default `virsh` on PATH). */
  binary?: string;
  runner?: VirshRunner;
}

/** The real runner: execFile with an argument array and a timeout (SIGKILL on expiry). */
export function execVirsh(binary = 'virsh'): VirshRunner {
  return (args, timeoutMs) =>
    new Promise<VirshResult>((resolve, reject) => {
      execFile(
        binary,
        [...args],
        {
          timeout: timeoutMs,
          killSignal: 'SIGKILL',
          maxBuffer: 16 * 1024 * 1024,
          encoding: 'utf8',
          // virsh's messages in English whatever the host's locale: DOMAIN_UNKNOWN is
          // recognised by them.
          env: { ...process.env, LC_ALL: 'C' },
        },
        (err, stdout, stderr) => {
          if (!err) return resolve({ stdout, stderr });
          const e = err as NodeJS.ErrnoException & {
            killed?: boolean;
            signal?: string | null;
            code?: number | string;
          };
          if (e.code === 'ENOENT')
            return reject(
              new NestError(
                'PREREQUISITE_MISSING',
                `${binary} is not installed (Debian: apt-get install libvirt-clients)`,
                { cause: err },
              ),
            );
          const what = `${binary} ${args.join(' ')}`;
          const said = (stderr || '').trim();
          if (e.killed || e.signal)
            return reject(
              new NestError(
                'LIBVIRT_ERROR',
                `${what}: no answer within ${timeoutMs} ms (killed)${said ? `: ${said}` : ''}`,
                { cause: err },
              ),
            );
          if (/failed to get domain|Domain not found|no domain with matching/i.test(said))
            return reject(new NestError('DOMAIN_UNKNOWN', `${what}: ${said}`, { cause: err }));
          reject(
            new NestError(
              'LIBVIRT_ERROR',
              `${what}: exit ${String(e.code)}${said ? `: ${said}` : ' (nothing on stderr)'}`,
              { cause: err },
            ),
          );
        },
      );
    });
}

/** Domain states as `virsh domstate` prints them (virsh(1), "domstate"). */
export type DomainState =
  | 'running'
  | 'idle'
  | 'paused'
  | 'in shutdown'
  | 'shut off'
  | 'crashed'
  | 'pmsuspended'
  | 'no state';

export interface VcpuStats {
  current?: number;
  maximum?: number;
  /** vCPU id → `vcpu.N.state` (virVcpuState: 0 offline, 1 running, 2 blocked). */
  states: Map<number, number>;
  /**
   * vCPU id → `vcpu.N.time` and `vcpu.N.delay` (ns): the vCPU thread's CPU time and run
   * delay, both only ever growing while the thread lives. Measured under TCG
   * (docs/libvirt.md, "Figures"): a vCPU QEMU ejected after virsh's timeout stays listed,
   * `state=1`, with both at 0 (its thread gone; `virsh vcpuinfo` then fails "No such
   * process").
   */
  times: Map<number, number>;
  delays: Map<number, number>;
}

export interface VcpuCount {
  maximumConfig?: number;
  maximumLive?: number;
  currentConfig?: number;
  currentLive?: number;
}

export interface MemStat {
  /** The balloon's current size as the guest reports it (KiB → bytes). */
  actualBytes?: number;
  rssBytes?: number;
  /** Every key virsh printed, in KiB as printed (or plain numbers such as last_update). */
  raw: Record<string, number>;
}

/** `virsh schedinfo` fields, numbers where they are numbers. */
export type SchedInfo = Record<string, number | string>;

/** Binary sizes for virsh: it takes a scaled integer with a unit suffix (virsh(1)). */
const KiB = 1024;

export class Virsh {
  readonly uri: string;
  readonly timeoutMs: number;
  private readonly runner: VirshRunner;

  constructor(opts: VirshOptions = {}) {
    this.uri = opts.uri ?? DEFAULT_LIBVIRT_URI;
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_VIRSH_TIMEOUT_MS;
    this.runner = opts.runner ?? execVirsh(opts.binary);
  }

  /** One call: `virsh -c <uri> <args…>`; stdout on success, a NestError otherwise. */
  async run(args: readonly string[], timeoutMs = this.timeoutMs): Promise<string> {
    const { stdout } = await this.runner(['-c', this.uri, ...args], timeoutMs);
    return stdout;
  }

  async domstate(domain: string): Promise<DomainState> {
    return (await this.run(['domstate', '--', domain])).trim() as DomainState;
  }

  /** The names of the running domains (`virsh list --name`), one a line. */
  async listRunning(): Promise<string[]> {
    return (await this.run(['list', '--name']))
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l !== '');
  }

  /** The live XML of a running domain, the persistent one of a stopped domain. */
  async dumpxml(domain: string, opts: { inactive?: boolean } = {}): Promise<string> {
    return this.run(['dumpxml', ...(opts.inactive ? ['--inactive'] : []), '--', domain]);
  }

  async vcpucount(domain: string): Promise<VcpuCount> {
    const out = await this.run(['vcpucount', '--', domain]);
    const r: VcpuCount = {};
    for (const line of out.split('\n')) {
      const m = /^\s*(maximum|current)\s+(config|live)\s+(\d+)\s*$/.exec(line);
      if (!m) continue;
      const key = `${m[1]}${m[2] === 'config' ? 'Config' : 'Live'}` as keyof VcpuCount;
      r[key] = Number(m[3]);
    }
    return r;
  }

  /**
   * `virsh domstats --vcpu`: per vCPU, libvirt's `vcpu.N.state` (1 running) as it refreshes
   * it from QEMU, by vCPU id. A vCPU not listed is not one libvirt counts as present.
   */
  async domstatsVcpu(domain: string): Promise<VcpuStats> {
    return parseDomstatsVcpu(await this.run(['domstats', '--vcpu', '--', domain]));
  }

  /** `virsh setvcpus --live`: hot-plug or hot-unplug vCPUs of a running domain. */
  async setvcpus(domain: string, count: number): Promise<void> {
    await this.run(['setvcpus', '--domain', domain, '--count', String(count), '--live']);
  }

  async schedinfo(domain: string, set?: Record<string, number>): Promise<SchedInfo> {
    const args = ['schedinfo', '--domain', domain, '--live'];
    if (set) {
      args.push('--set');
      args.push(...Object.entries(set).map(([k, v]) => `${k}=${v}`));
    }
    return parseSchedinfo(await this.run(args));
  }

  /** `virsh update-memory-device --requested-size`: ask the guest's virtio-mem driver. */
  async updateMemoryDevice(domain: string, alias: string, requestedBytes: number): Promise<void> {
    await this.run([
      'update-memory-device',
      '--domain',
      domain,
      '--alias',
      alias,
      '--requested-size',
      `${Math.floor(requestedBytes / KiB)}KiB`,
      '--live',
    ]);
  }

  /** `virsh setmem --live`: the balloon's target. */
  async setmem(domain: string, bytes: number): Promise<void> {
    await this.run([
      'setmem',
      '--domain',
      domain,
      '--size',
      `${Math.floor(bytes / KiB)}KiB`,
      '--live',
    ]);
  }

  async dommemstat(domain: string): Promise<MemStat> {
    return parseDommemstat(await this.run(['dommemstat', '--domain', domain]));
  }
}

export function parseDommemstat(out: string): MemStat {
  const raw: Record<string, number> = {};
  for (const line of out.split('\n')) {
    const m = /^\s*([a-z_-]+)\s+(\d+)\s*$/.exec(line);
    if (m) raw[m[1]] = Number(m[2]);
  }
  return {
    raw,
    actualBytes: raw.actual === undefined ? undefined : raw.actual * KiB,
    rssBytes: raw.rss === undefined ? undefined : raw.rss * KiB,
  };
}

export function parseSchedinfo(out: string): SchedInfo {
  const r: SchedInfo = {};
  for (const line of out.split('\n')) {
    const m = /^\s*([A-Za-z_]+)\s*:\s*(\S.*?)\s*$/.exec(line);
    if (!m) continue;
    r[m[1]] = /^-?\d+$/.test(m[2]) ? Number(m[2]) : m[2];
  }
  return r;
}

/** `virsh domstats --vcpu` output (test/fixtures/libvirt/domstats.txt). */
export function parseDomstatsVcpu(out: string): VcpuStats {
  const r: VcpuStats = { states: new Map(), times: new Map(), delays: new Map() };
  const per = { state: r.states, time: r.times, delay: r.delays } as const;
  for (const line of out.split('\n')) {
    const m = /^\s*vcpu\.(current|maximum|(\d+)\.(state|time|delay))=(\d+)\s*$/.exec(line);
    if (!m) continue;
    if (m[2] !== undefined) per[m[3] as keyof typeof per].set(Number(m[2]), Number(m[4]));
    else if (m[1] === 'current') r.current = Number(m[4]);
    else r.maximum = Number(m[4]);
  }
  return r;
}
