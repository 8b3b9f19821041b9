/**
 * A whole nestbroker stack on one machine, as separate processes: one host broker and
 * guest agents, each "VM" a cgroup (`<root>/vmN` in every hierarchy) whose limits play the
 * VM's allocation, each guest agent managing its projects beneath its VM cgroup. Used by
 * `make demo` (demo/demo.ts) and by the host integration tests (test/integration/host/),
 * which pass a per-run root (`nestbroker-test-<pid>-…`) instead of `nestbroker-demo`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { openCgroupAdapter, spawnInto, type CgroupDriver } from '../cgroup-adapter/index';
import type { CgroupAdapter } from '../cgroup-adapter/types';
import { rpcCall } from '../agent/common/rpc';
import { waitReady } from '../agent/cli/wait-ready';

/** The compiled tree: this file runs from dist/demo/, or from demo/ under ts-jest. */
export const DIST =
  path.basename(path.dirname(__dirname)) === 'dist'
    ? path.resolve(__dirname, '..')
    : path.resolve(__dirname, '..', 'dist');
export const NESTBROKER = path.join(DIST, 'agent', 'cli', 'nestbroker.js');
export const NESTCTL = path.join(DIST, 'agent', 'cli', 'nestctl.js');
/**
 * Node flags the daemons run with, as the installed `nestbroker` wrapper gives them
 * (Makefile NODE_DAEMON_FLAGS; docs/performance.md): V8's default young generation (16 MiB
 * semi-spaces on 64-bit) kept an idle guest agent with 200 projects at ~100 MiB RSS; 2 MiB
 * semi-spaces bring it to ~68 MiB, and the cascade is no slower (bench/footprint,
 * bench/cascade). Flags, not NODE_OPTIONS: the environment would reach the projects the
 * agent starts.
 */
export const AGENT_NODE_FLAGS: readonly string[] = ['--max-semi-space-size=2'];
export const PROJECT = path.join(DIST, 'demo', 'project.js');
/** taskset(1), util-linux: the daemons started on chosen CPUs (startDaemon's `cpus`). */
const TASKSET = 'taskset';

export interface ProjectSpec {
  name: string;
  priority: number;
  memoryMin: string;
  memoryMax: string;
  cpuMin: number;
  cpuMax: number;
  /** MiB the process allocates. */
  holdMiB: number;
  /** Share of one CPU it burns. */
  burn: number;
  gracePeriod?: string;
}

export interface GuestSpec {
  name: string;
  priority: number;
  memory: string;
  cpus: number;
  floor: { memory: string; cpus: number };
  projects: ProjectSpec[];
  /** Serve Prometheus metrics on 127.0.0.1:<port> (the guest config's `metrics`). */
  metricsPort?: number;
}

export interface TlsFiles {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
}

export interface StackOptions {
  /** cgroup root beneath each hierarchy's mount: `nestbroker-demo` or a per-run test root. */
  root: string;
  dir: string;
  guests: GuestSpec[];
  transport: 'unix' | 'tls';
  tls?: TlsFiles;
  /** Where each process's stdout/stderr go (a log file per process by default). */
  logDir?: string;
  heartbeat?: { interval: string; timeout: string };
  /** Serve the host broker's Prometheus metrics on 127.0.0.1:<port>. */
  hostMetricsPort?: number;
  /**
   * Run the daemons inside `<root>/<daemonGroup>` (make demo: "daemons"), so that whoever
   * removes the root (the next run's removeLeftoverRoot, after a `kill -9` of this one)
   * kills them through the cgroup too. Absent: they run in the caller's cgroup.
   */
  daemonGroup?: string;
  /** More top-level keys of the host's config (tests: the automatic `trigger`). */
  hostExtra?: Record<string, unknown>;
  /** The daemons' `limits` (docs/reliability.md); absent: their defaults. */
  limits?: {
    guest?: { messagesPerSecond?: number; messageBurst?: number; pendingNotices?: number };
    host?: { messagesPerSecond?: number; messageBurst?: number; pendingNoticesPerGuest?: number };
  };
}

export interface Proc {
  name: string;
  child: ChildProcess;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export interface GuestRun {
  spec: GuestSpec;
  config: string;
  channel: string;
  socket: string;
  port?: number;
  proc: Proc | null;
}

/**
 * Starts a daemon as a process (node, AGENT_NODE_FLAGS, `nodeArgs`, `argv`), its output
 * appended to `logFile`, and resolves once it answers on its operator `socket`: the same
 * readiness rule as the units' ExecStartPost (agent/cli/wait-ready.ts), so it fails at
 * once when the daemon exits first.
 */
export async function startDaemon(o: {
  name: string;
  argv: string[];
  logFile: string;
  socket: string;
  env?: Record<string, string>;
  nodeArgs?: string[];
  timeoutMs?: number;
  /** Start it inside this group (spawnInto: it never runs outside it). */
  into?: { adapter: CgroupAdapter; group: string };
  /**
   * Run it on these CPUs only (a cpu list, e.g. "1-3"): started through taskset(1), which
   * sets the affinity (sched_setaffinity(2)) and execs node, so the pid is node's; what the
   * daemon forks inherits it.
   */
  cpus?: string;
}): Promise<Proc> {
  const fh = await fs.open(o.logFile, 'a');
  const nodeArgv = [...AGENT_NODE_FLAGS, ...(o.nodeArgs ?? []), ...o.argv];
  const cmd = o.cpus !== undefined ? TASKSET : process.execPath;
  const args = o.cpus !== undefined ? ['-c', o.cpus, process.execPath, ...nodeArgv] : nodeArgv;
  const spawnOpts = {
    stdio: ['ignore', fh.fd, fh.fd] as ('ignore' | number)[],
    env: {
      ...process.env,
      NESTBROKER_LOG_LEVEL: process.env.NESTBROKER_LOG_LEVEL ?? 'info',
      ...o.env,
    },
  };
  const child = o.into
    ? await spawnInto(o.into.adapter, o.into.group, cmd, args, spawnOpts)
    : spawn(cmd, args, spawnOpts);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => {
      void fh.close();
      resolve({ code, signal });
    }),
  );
  try {
    await waitReady({ socket: o.socket, timeoutMs: o.timeoutMs ?? 20_000, pid: child.pid });
  } catch (err) {
    throw new Error(`${o.name} not ready: ${(err as Error).message}; see ${o.logFile}`);
  }
  return { name: o.name, child, exited };
}

export async function waitFor<T>(
  what: string,
  fn: () => Promise<T | undefined | null | false>,
  timeoutMs = 20_000,
  everyMs = 100,
): Promise<T> {
  const t0 = Date.now();
  let lastErr: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() - t0 > timeoutMs)
      throw new Error(
        `timed out after ${timeoutMs} ms waiting for ${what}${lastErr ? `: ${String(lastErr)}` : ''}`,
      );
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

async function freePort(): Promise<number> {
  const net = await import('node:net');
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

export class Stack {
  readonly hostSocket: string;
  readonly hostConfig: string;
  readonly guests: GuestRun[] = [];
  host: Proc | null = null;
  driver!: CgroupDriver;
  private readonly logDir: string;

  constructor(readonly opts: StackOptions) {
    this.hostSocket = path.join(opts.dir, 'host.sock');
    this.hostConfig = path.join(opts.dir, 'host.yaml');
    this.logDir = opts.logDir ?? path.join(opts.dir, 'logs');
  }

  /** The VM cgroups, with the VMs' allocations as their limits. */
  async createVms(): Promise<void> {
    this.driver = await openCgroupAdapter({ root: this.opts.root, create: true });
    for (const g of this.opts.guests) {
      const { parseSize } = await import('../agent/common/units');
      const mem = parseSize(g.memory);
      if (!mem.ok) throw new Error(`guest ${g.name} memory ${mem.message}`);
      await this.driver.create(g.name, {
        memory: { max: mem.value },
        cpu: { max: { quotaUs: Math.round(g.cpus * 100_000), periodUs: 100_000 } },
      });
    }
    if (this.opts.daemonGroup) await this.driver.create(this.opts.daemonGroup);
  }

  private into(): { adapter: CgroupAdapter; group: string } | undefined {
    return this.opts.daemonGroup
      ? { adapter: this.driver, group: this.opts.daemonGroup }
      : undefined;
  }

  async writeConfigs(): Promise<void> {
    await fs.mkdir(this.logDir, { recursive: true });
    const tls = this.opts.tls;
    for (const g of this.opts.guests) {
      const gdir = path.join(this.opts.dir, g.name);
      await fs.mkdir(gdir, { recursive: true });
      const run: GuestRun = {
        spec: g,
        config: path.join(gdir, 'guest.yaml'),
        channel: path.join(gdir, 'channel.sock'),
        socket: path.join(gdir, 'guest.sock'),
        proc: null,
      };
      if (this.opts.transport === 'tls') run.port = await freePort();
      const guestYaml = {
        guest: g.name,
        stateDir: path.join(gdir, 'state'),
        runDir: path.join(gdir, 'run'),
        socket: run.socket,
        projectSocket: path.join(gdir, 'projects.sock'),
        cgroup: { root: `${this.opts.root}/${g.name}` },
        resources: { cpus: g.cpus, memory: g.memory },
        reserve: { memory: '32MiB', cpus: 0 },
        upstream:
          this.opts.transport === 'unix'
            ? { transport: 'unix', path: run.channel }
            : {
                transport: 'tls',
                listen: { host: '127.0.0.1', port: run.port },
                tls: { cert: tls!.serverCert, key: tls!.serverKey, ca: tls!.ca },
              },
        usageInterval: '500ms',
        ...(this.opts.limits?.guest ? { limits: this.opts.limits.guest } : {}),
        ...(g.metricsPort !== undefined
          ? { metrics: { host: '127.0.0.1', port: g.metricsPort } }
          : {}),
        projects: g.projects.map((p) => ({
          name: p.name,
          priority: p.priority,
          memory: { min: p.memoryMin, max: p.memoryMax },
          cpu: { min: p.cpuMin, max: p.cpuMax },
          stop: { signal: 'SIGTERM', gracePeriod: p.gracePeriod ?? '5s' },
          restartOnRestore: true,
          command: {
            argv: [
              process.execPath,
              PROJECT,
              '--name',
              p.name,
              '--memory',
              String(p.holdMiB),
              '--cpu',
              String(p.burn),
              '--marker',
              this.markerOf(g.name, p.name),
            ],
          },
        })),
      };
      await fs.writeFile(run.config, YAML.stringify(guestYaml));
      this.guests.push(run);
    }
    const hostYaml = {
      stateDir: path.join(this.opts.dir, 'host-state'),
      socket: this.hostSocket,
      cgroup: { root: this.opts.root },
      heartbeat: this.opts.heartbeat ?? { interval: '1s', timeout: '4s' },
      reconnect: { min: '100ms', max: '1s' },
      ...(this.opts.limits?.host ? { limits: this.opts.limits.host } : {}),
      ...(this.opts.hostMetricsPort !== undefined
        ? { metrics: { host: '127.0.0.1', port: this.opts.hostMetricsPort } }
        : {}),
      ...(this.opts.hostExtra ?? {}),
      guests: this.guests.map((r) => ({
        name: r.spec.name,
        priority: r.spec.priority,
        allocation: { cpus: r.spec.cpus, memory: r.spec.memory },
        floor: r.spec.floor,
        cgroup: r.spec.name,
        channel:
          this.opts.transport === 'unix'
            ? { transport: 'unix', path: r.channel }
            : {
                transport: 'tls',
                host: '127.0.0.1',
                port: r.port,
                cert: tls!.clientCert,
                key: tls!.clientKey,
                ca: tls!.ca,
                servername: 'localhost',
              },
      })),
    };
    await fs.writeFile(this.hostConfig, YAML.stringify(hostYaml));
  }

  markerOf(guest: string, project: string): string {
    return path.join(this.opts.dir, guest, `${project}.saved`);
  }

  /** `env` adds to the agent's environment (test/faults: NESTBROKER_FAULT). */
  async startGuest(name: string, env: Record<string, string> = {}): Promise<GuestRun> {
    const run = this.guests.find((g) => g.spec.name === name)!;
    run.proc = await startDaemon({
      name: `guest ${name}`,
      argv: [NESTBROKER, 'guest', '--config', run.config],
      logFile: path.join(this.logDir, `guest-${name}.log`),
      socket: run.socket,
      env,
      into: this.into(),
    });
    // The operator socket answers before the upstream channel listens (agent.ts start
    // order): a caller that connects to the channel next must not race it.
    if (this.opts.transport === 'unix')
      await waitFor(`guest ${name}'s channel socket`, async () =>
        (await fs.stat(run.channel)).isSocket(),
      );
    return run;
  }

  async startHost(env: Record<string, string> = {}): Promise<Proc> {
    this.host = await startDaemon({
      name: 'host',
      argv: [NESTBROKER, 'host', '--config', this.hostConfig],
      logFile: path.join(this.logDir, 'host.log'),
      socket: this.hostSocket,
      env,
      into: this.into(),
    });
    return this.host;
  }

  /** Waits until the host sees every running guest connected (hello received). */
  async waitConnected(
    names = this.guests.filter((g) => g.proc).map((g) => g.spec.name),
  ): Promise<void> {
    await waitFor(
      `guests ${names.join(', ')} connected to the host`,
      async () => {
        const gs = (await rpcCall(this.hostSocket, 'guests')) as {
          name: string;
          connected: boolean;
          inventory?: { projects: { state: string }[] };
        }[];
        return names.every((n) => gs.find((g) => g.name === n)?.connected);
      },
      30_000,
    );
  }

  async stopProc(
    p: Proc | null,
    signal: NodeJS.Signals = 'SIGTERM',
    timeoutMs = 10_000,
  ): Promise<void> {
    if (!p || p.child.exitCode !== null || p.child.signalCode !== null) return;
    p.child.kill(signal);
    const t = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs);
    await p.exited;
    clearTimeout(t);
  }

  /** Stops every process by pid, then kills whatever is left in the cgroups and removes them. */
  async teardown(): Promise<void> {
    await this.stopProc(this.host);
    for (const g of this.guests) await this.stopProc(g.proc);
    if (this.driver) await this.driver.removeRoot(10_000);
  }
}

/** Removes a root left behind by an interrupted run: kills its members via the cgroup. */
export async function removeLeftoverRoot(root: string): Promise<boolean> {
  const mounts = await fs.readdir('/sys/fs/cgroup');
  const present = await Promise.all(
    mounts.map((m) =>
      fs.stat(path.join('/sys/fs/cgroup', m, root)).then(
        () => true,
        () => false,
      ),
    ),
  );
  if (!present.some(Boolean)) return false;
  // Opened with create so that a root left in only some hierarchies is still found whole.
  const d = await openCgroupAdapter({ root, create: true });
  await d.removeRoot(10_000);
  return true;
}
