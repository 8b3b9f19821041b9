/**
 * A bench stack: one real host broker and real guest agents as separate processes over
 * unix sockets, each "VM" a real cgroup `<root>/<guest>` (every hierarchy), each guest's
 * projects real processes in `<root>/<guest>/projects/<name>`. Like demo/stack.ts, but
 * with many cheap projects (a shell that exits 0 on SIGTERM) and sizes chosen by the bench.
 *
 * Every project has memory {min 8MiB, max 16MiB} and cpu {min = max = 0.01}, a distinct
 * priority (p0000 highest), so that a reclaim to `keep` × 8MiB keeps the `keep` highest
 * at their minimum (shrunk: every limit file rewritten) and stops all the others
 * (stop signal, exit at once): every project of the guest is touched.
 */
import { promises as fs, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { openCgroupAdapter, type CgroupDriver } from '../../cgroup-adapter/index';
import { formatCpuList, parseCpuList } from '../../agent/common/cpulist';
import { rpcCall } from '../../agent/common/rpc';
import { NESTBROKER, startDaemon, waitFor, type Proc } from '../../demo/stack';

const MiB = 1024 * 1024;
export const PROJECT_MEMORY = { min: 8 * MiB, max: 16 * MiB };
export const PROJECT_CPU = 0.01;
export const RESERVE_MEMORY = 32 * MiB;

/**
 * The project: exits 0 at once on SIGTERM, its sleep with it. `sleep & wait` rather than a `sleep 1` loop:
 * 2 500 shells forking a sleep every second would load the machine we measure on. The
 * stop signal goes to every pid of the group (the sleep too), and `wait` returns at once
 * for a trapped signal, so the group empties within a millisecond or two.
 */
export const SHELL_PROJECT = [
  '/bin/sh',
  '-c',
  // `kill $!`: a signal that lands between the fork of the sleep and the read of
  // cgroup.procs would otherwise leave the sleep behind, holding the group for its grace.
  'trap "kill \\$! 2>/dev/null; exit 0" TERM; while :; do sleep 3600 & wait; done',
];

/**
 * How long the bench leaves projects restarted by a restore before the next timed reclaim.
 * Every project runs under a 1 % CPU quota (PROJECT_CPU: 1 ms a 100 ms period), and its
 * start (the gate shell, unshare, setpriv, sh, the fork of its sleep: cgroup-adapter/spawn.ts)
 * costs several ms of CPU, which the group pays back over the next periods
 * (Documentation/scheduler/sched-bwc.rst). Stopped in that time, its shell waits for its
 * quota to run the TERM trap and exit: measured on this machine, 66–300 ms from SIGTERM to
 * `populated 0` right after the start, 1.3–7 ms after 1 s. The floors' shells are restarted
 * a whole cascade before they are stopped; without a pause the cascade alone paid the
 * kernel's throttling of just-started projects (docs/performance.md, "Closing the gap to the kernel's floor").
 */
export const SETTLE_MS = 1000;

/**
 * A SHELL_PROJECT is ready for a stop signal once its `sleep` has been exec'd: two
 * processes in its group, one of them `sleep`. Before that the forked child is still a copy
 * of the shell with the shell's TERM trap: a SIGTERM landing there (the stop signals every
 * pid of the group) is caught and forgotten, the child execs `sleep 3600` anyway, and the
 * group stays populated until the 10 s grace ends in SIGKILL — a 10 s outlier in a run that
 * reclaims right after the restore that started it. After the exec the sleep has the default
 * action for SIGTERM and dies with the shell.
 */
export async function shellProjectReady(driver: CgroupDriver, group: string): Promise<boolean> {
  const pids = await driver.pids(group);
  if (pids.length !== 2) return false;
  for (const pid of pids) {
    const comm = await fs.readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '');
    if (comm.trim() === 'sleep') return true;
  }
  return false;
}

/** Waits until every group holds a SHELL_PROJECT that is ready (shellProjectReady). */
export async function waitShellsReady(
  driver: CgroupDriver,
  groups: readonly string[],
  timeoutMs = 120_000,
): Promise<void> {
  await waitFor(
    `${groups.length} shell projects to have their sleep`,
    async () => {
      for (const g of groups) if (!(await shellProjectReady(driver, g))) return false;
      return true;
    },
    timeoutMs,
    50,
  );
}

export interface BenchGuest {
  name: string;
  projects: number;
  /** argv of every project (SHELL_PROJECT by default); `{name}` is replaced. */
  argv?: string[];
  /** The VM's CPUs (guestCpus(projects) by default): more leaves room a reclaim can take. */
  cpus?: number;
}

export interface BenchStackOptions {
  /** cgroup root beneath each hierarchy's mount, e.g. `nestbroker-bench-<pid>`. */
  root: string;
  dir: string;
  guests: BenchGuest[];
  /** Guest usage sampling interval (the agent's default is 1s). */
  usageInterval?: string;
  /** Host heartbeat (the host's default, 5s/15s, when unset). */
  heartbeat?: { interval: string; timeout: string };
  /** Extra node options for the agents, e.g. ['--cpu-prof', '--cpu-prof-dir=…']. */
  nodeArgs?: { host?: string[]; guest?: string[] };
  /** NESTBROKER_LOG_LEVEL of the agents (their default, info, when unset). */
  logLevel?: string;
  /** How many guest agents start at once. */
  startConcurrency?: number;
  /** The nestbroker program the agents run (this build's by default; another build's to compare). */
  nestbroker?: string;
  /**
   * The CPUs each daemon runs on (cpu lists, taskset(1)); a guest agent's projects inherit
   * its affinity. Unset: every CPU.
   */
  cpus?: { host?: string; guest?: string };
}

export type AgentProc = Proc;

/** --pin-host: the CPU lists of the host broker and of the guest agents. */
export interface Pinning {
  host: string;
  guests: string;
}

/**
 * CPU 0 for the host broker, the other online CPUs (/sys/devices/system/cpu/online) for
 * the guest agents: the host's work apart from theirs (BenchStackOptions.cpus).
 */
export function pinning(): Pinning {
  const file = '/sys/devices/system/cpu/online';
  const online = readFileSync(file, 'utf8').trim();
  const cpus = parseCpuList(online, file);
  if (!cpus.includes(0) || cpus.length < 2)
    throw new Error(`--pin-host needs CPU 0 and another online CPU, online: ${online}`);
  return { host: '0', guests: formatCpuList(cpus.filter((c) => c !== 0)) };
}

export interface GuestRun {
  spec: BenchGuest;
  config: string;
  channel: string;
  socket: string;
  proc: AgentProc | null;
}

export function guestMemory(projects: number): number {
  return projects * PROJECT_MEMORY.max + RESERVE_MEMORY;
}
/**
 * At least every online CPU: a guest allocated fewer whole CPUs than the machine has gets
 * its projects pinned (cpuset) on a reclaim, a write the floor would not do.
 */
export function guestCpus(projects: number): number {
  return Math.max(os.cpus().length, Math.ceil(projects * PROJECT_CPU * 100) / 100);
}
const cpusOf = (g: BenchGuest): number => g.cpus ?? guestCpus(g.projects);
export const projectName = (i: number): string => `p${String(i).padStart(4, '0')}`;

export class BenchStack {
  readonly hostSocket: string;
  readonly hostConfig: string;
  readonly guests: GuestRun[] = [];
  readonly logDir: string;
  host: AgentProc | null = null;
  driver!: CgroupDriver;

  constructor(readonly opts: BenchStackOptions) {
    this.hostSocket = path.join(opts.dir, 'host.sock');
    this.hostConfig = path.join(opts.dir, 'host.yaml');
    this.logDir = path.join(opts.dir, 'logs');
  }

  /** VM cgroups with the VMs' allocations as their limits; then the agents' configs. */
  async prepare(): Promise<void> {
    this.driver = await openCgroupAdapter({ root: this.opts.root, create: true });
    await fs.mkdir(this.logDir, { recursive: true });
    for (const g of this.opts.guests) {
      await this.driver.create(g.name, {
        memory: { max: guestMemory(g.projects) },
        cpu: { max: { quotaUs: Math.round(cpusOf(g) * 100_000), periodUs: 100_000 } },
      });
      const gdir = path.join(this.opts.dir, g.name);
      await fs.mkdir(gdir, { recursive: true });
      const run: GuestRun = {
        spec: g,
        config: path.join(gdir, 'guest.yaml'),
        channel: path.join(gdir, 'channel.sock'),
        socket: path.join(gdir, 'guest.sock'),
        proc: null,
      };
      const argv = g.argv ?? SHELL_PROJECT;
      const guestYaml = {
        guest: g.name,
        stateDir: path.join(gdir, 'state'),
        runDir: path.join(await this.runBase(), g.name),
        socket: run.socket,
        projectSocket: path.join(gdir, 'projects.sock'),
        cgroup: { root: `${this.opts.root}/${g.name}` },
        resources: { cpus: cpusOf(g), memory: guestMemory(g.projects) },
        reserve: { memory: RESERVE_MEMORY, cpus: 0 },
        upstream: { transport: 'unix', path: run.channel },
        ...(this.opts.usageInterval ? { usageInterval: this.opts.usageInterval } : {}),
        projects: Array.from({ length: g.projects }, (_, i) => ({
          name: projectName(i),
          priority: g.projects - i,
          memory: { min: PROJECT_MEMORY.min, max: PROJECT_MEMORY.max },
          cpu: { min: PROJECT_CPU, max: PROJECT_CPU },
          stop: { signal: 'SIGTERM', gracePeriod: '10s' },
          restartOnRestore: true,
          command: { argv: argv.map((a) => a.replace('{name}', projectName(i))) },
        })),
      };
      await fs.writeFile(run.config, YAML.stringify(guestYaml));
      this.guests.push(run);
    }
    const hostYaml = {
      stateDir: path.join(this.opts.dir, 'host-state'),
      socket: this.hostSocket,
      cgroup: { root: this.opts.root },
      ...(this.opts.heartbeat ? { heartbeat: this.opts.heartbeat } : {}),
      reconnect: { min: '100ms', max: '1s' },
      guests: this.guests.map((r) => ({
        name: r.spec.name,
        priority: 10,
        allocation: { cpus: cpusOf(r.spec), memory: guestMemory(r.spec.projects) },
        floor: { memory: RESERVE_MEMORY, cpus: 0.01 },
        cgroup: r.spec.name,
        channel: { transport: 'unix', path: r.channel },
      })),
    };
    await fs.writeFile(this.hostConfig, YAML.stringify(hostYaml));
  }

  private env(): Record<string, string> {
    return this.opts.logLevel ? { NESTBROKER_LOG_LEVEL: this.opts.logLevel } : {};
  }

  async startGuests(): Promise<void> {
    const queue = [...this.guests];
    const worker = async (): Promise<void> => {
      for (let run = queue.shift(); run; run = queue.shift()) await this.startGuest(run);
    };
    await Promise.all(Array.from({ length: this.opts.startConcurrency ?? 4 }, worker));
  }

  async startGuest(run: GuestRun): Promise<void> {
    run.proc = await startDaemon({
      name: `guest ${run.spec.name}`,
      argv: [this.opts.nestbroker ?? NESTBROKER, 'guest', '--config', run.config],
      logFile: path.join(this.logDir, `guest-${run.spec.name}.log`),
      socket: run.socket,
      env: this.env(),
      nodeArgs: this.opts.nodeArgs?.guest,
      cpus: this.opts.cpus?.guest,
      timeoutMs: 120_000,
    });
  }

  async startHost(): Promise<void> {
    this.host = await startDaemon({
      name: 'host',
      argv: [this.opts.nestbroker ?? NESTBROKER, 'host', '--config', this.hostConfig],
      logFile: path.join(this.logDir, 'host.log'),
      socket: this.hostSocket,
      env: this.env(),
      nodeArgs: this.opts.nodeArgs?.host,
      cpus: this.opts.cpus?.host,
    });
  }

  async waitConnected(): Promise<void> {
    const names = this.guests.map((g) => g.spec.name);
    await waitFor(
      'every guest connected to the host',
      async () => {
        const gs = (await rpcCall(this.hostSocket, 'guests', {}, { timeoutMs: 10_000 })) as {
          name: string;
          connected: boolean;
        }[];
        return names.every((n) => gs.find((g) => g.name === n)?.connected);
      },
      120_000,
      200,
    );
  }

  /**
   * Waits until every project of every guest (or of `guests`) is running; for the default
   * SHELL_PROJECT, until it is ready for the next stop signal (shellProjectReady), so that
   * a timed reclaim right after a restore never catches a shell between fork and exec.
   * Projects with their own argv: until they have a process.
   */
  async waitProjectsRunning(guests = this.guests, timeoutMs = 120_000): Promise<void> {
    await waitFor(
      'every project running',
      async () => {
        for (const g of guests)
          for (let i = 0; i < g.spec.projects; i++) {
            const group = `${g.spec.name}/projects/${projectName(i)}`;
            const up = g.spec.argv
              ? (await this.driver.pids(group)).length > 0
              : await shellProjectReady(this.driver, group);
            if (!up) return false;
          }
        return true;
      },
      timeoutMs,
      100,
    );
  }

  agentPids(): { host: number | undefined; guests: Record<string, number | undefined> } {
    return {
      host: this.host?.child.pid,
      guests: Object.fromEntries(this.guests.map((g) => [g.spec.name, g.proc?.child.pid])),
    };
  }

  async stopAgent(p: AgentProc | null, timeoutMs = 15_000): Promise<void> {
    if (!p || p.child.exitCode !== null || p.child.signalCode !== null) return;
    p.child.kill('SIGTERM');
    const t = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs);
    await p.exited;
    clearTimeout(t);
  }

  private runDirBase: string | undefined;

  /**
   * Where the guests' runDirs go (the project notices, docs/guest-agent.md): a directory of
   * this stack's own on tmpfs (/dev/shm) where there is one, as the agent's default
   * `/run/nestbroker/guest` is on a systemd machine (/run is a tmpfs there). On ext4 each
   * notice's rename over the last one also starts the writeback of the new file
   * (`auto_da_alloc`, Documentation/admin-guide/ext4.rst): measured here, 30–43 ms for
   * 100 notices against 3 ms on tmpfs (docs/performance.md, "Closing the gap to the kernel's floor"). The journals stay in `dir`.
   */
  private async runBase(): Promise<string> {
    if (this.runDirBase) return this.runDirBase;
    let base = path.join(this.opts.dir, 'run');
    try {
      if ((await fs.stat('/dev/shm')).isDirectory())
        base = await fs.mkdtemp(path.join('/dev/shm', 'nestbroker-bench-run-'));
    } catch {
      // no /dev/shm: the runDirs stay beside the journals
    }
    this.runDirBase = base;
    return base;
  }

  /** Stops every agent by pid, kills what is left through the cgroups, removes the root. */
  async teardown(): Promise<void> {
    await this.stopAgent(this.host);
    await Promise.all(this.guests.map((g) => this.stopAgent(g.proc)));
    if (this.driver) await this.driver.removeRoot(20_000);
    if (this.runDirBase?.startsWith('/dev/shm/'))
      await fs.rm(this.runDirBase, { recursive: true, force: true });
  }
}
