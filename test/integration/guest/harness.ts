/**
 * The guest agent as a REAL separate process for integration tests:
 * `node dist/agent/cli/nestbroker.js guest --config <tmp yaml>`, its operator socket in a
 * temp dir, its cgroups under the per-run test root (`<rootName>/guest`), real fixture
 * projects (test/fixtures/projects/project.js). `make test` builds dist first; run alone,
 * the harness builds it when a source is newer than the build.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, promises as fsp, readFileSync, statSync, readdirSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { waitReady as waitDaemonReady } from '../../../agent/cli/wait-ready';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';

export const REPO = path.resolve(__dirname, '../../..');
export const NESTBROKER = path.join(REPO, 'dist/agent/cli/nestbroker.js');
export const NESTCTL = path.join(REPO, 'dist/agent/cli/nestctl.js');
export const FIXTURE = path.join(REPO, 'test/fixtures/projects/project.js');

function newestMtime(dir: string): number {
  let newest = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) newest = Math.max(newest, newestMtime(p));
    else if (e.name.endsWith('.ts')) newest = Math.max(newest, statSync(p).mtimeMs);
  }
  return newest;
}

/** Builds dist when it is missing or older than agent/ and cgroup-adapter/ sources. */
export function ensureBuilt(): void {
  const built = existsSync(NESTBROKER) ? statSync(NESTBROKER).mtimeMs : 0;
  const src = Math.max(
    newestMtime(path.join(REPO, 'agent')),
    newestMtime(path.join(REPO, 'cgroup-adapter')),
  );
  if (built >= src) return;
  // tsc emits even when someone else's file in progress has a type error; the tests below
  // then prove whether what we run works.
  spawnSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: REPO, stdio: 'ignore' });
  if (!existsSync(NESTBROKER)) throw new Error(`build failed: ${NESTBROKER} is missing`);
}

export interface ProjectSpec {
  name: string;
  priority: number;
  mode: 'graceful' | 'stubborn' | 'forker' | 'done' | 'escape' | 'exit';
  memory?: { min: string; max: string };
  cpu?: { min: number; max: number };
  grace?: string;
  preStop?: { command: string[]; timeout: string };
  notify?: string;
  restartOnRestore?: boolean;
  /** The project's `restart` key as written in the config. */
  restart?: unknown;
  env?: Record<string, string>;
}

export interface Env {
  dir: string;
  socket: string;
  projectSocket: string;
  runDir: string;
  stateDir: string;
  configFile: string;
  marker(project: string): string;
  markerLines(project: string): string[];
}

export async function makeEnv(): Promise<Env> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'nb-guest-'));
  const runDir = path.join(dir, 'run');
  return {
    dir,
    socket: path.join(dir, 'guest.sock'),
    projectSocket: path.join(dir, 'projects.sock'),
    runDir,
    stateDir: path.join(dir, 'state'),
    configFile: path.join(dir, 'guest.yaml'),
    marker: (p) => path.join(dir, `${p}.marker`),
    markerLines(p) {
      try {
        return readFileSync(path.join(dir, `${p}.marker`), 'utf8')
          .split('\n')
          .filter(Boolean);
      } catch {
        return [];
      }
    },
  };
}

/** A guest.yaml for these projects (JSON is YAML). */
export async function writeConfig(
  env: Env,
  cgroupRoot: string,
  projects: ProjectSpec[],
  extra: Record<string, unknown> = {},
): Promise<void> {
  const cfg = {
    guest: 'vm-test',
    stateDir: env.stateDir,
    runDir: env.runDir,
    socket: env.socket,
    projectSocket: env.projectSocket,
    cgroup: { root: cgroupRoot },
    resources: { cpus: 2, memory: '4GiB' },
    reserve: { memory: '0', cpus: 0 },
    upstream: { transport: 'none' },
    usageInterval: '500ms',
    projects: projects.map((p) => ({
      name: p.name,
      priority: p.priority,
      memory: p.memory ?? { min: '256MiB', max: '1GiB' },
      cpu: p.cpu ?? { min: 0.1, max: 1 },
      stop: {
        signal: 'SIGTERM',
        gracePeriod: p.grace ?? '2s',
        ...(p.preStop ? { preStop: p.preStop } : {}),
      },
      ...(p.notify ? { notify: { signal: p.notify } } : {}),
      restartOnRestore: p.restartOnRestore ?? true,
      ...(p.restart !== undefined ? { restart: p.restart } : {}),
      command: {
        argv: [process.execPath, FIXTURE, p.mode],
        env: {
          MARKER: env.marker(p.name),
          ...(p.env ?? {}),
        },
      },
    })),
    ...extra,
  };
  await fsp.writeFile(env.configFile, JSON.stringify(cfg, null, 2));
}

export interface AgentProc {
  child: ChildProcess;
  pid: number;
  stdout(): string;
  stderr(): string;
  exited: Promise<number | null>;
  /** SIGTERM and wait (projects keep running, as under KillMode=process). */
  stop(): Promise<void>;
}

export function startAgent(env: Env, agentEnv: Record<string, string> = {}): AgentProc {
  const child = spawn(process.execPath, [NESTBROKER, 'guest', '--config', env.configFile], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, NESTBROKER_LOG_LEVEL: 'debug', ...agentEnv },
  });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return {
    child,
    pid: child.pid!,
    stdout: () => out,
    stderr: () => err,
    exited,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

/** Waits until the agent answers `status` on its socket (as the unit's ExecStartPost= does). */
export async function waitReady(env: Env, agent: AgentProc, timeoutMs = 15_000): Promise<void> {
  try {
    await waitDaemonReady({ socket: env.socket, timeoutMs, pid: agent.pid });
  } catch (err) {
    throw new Error(
      `agent not ready (exit ${agent.child.exitCode}): ${(err as Error).message}\n${agent.stderr()}\n${agent.stdout()}`,
    );
  }
}

export interface CtlResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export function nestctl(env: Env, args: string[]): Promise<CtlResult> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [NESTCTL, '--guest', '--socket', env.socket, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    c.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function waitFor(
  what: string,
  cond: () => boolean | Promise<boolean>,
  timeoutMs = 10_000,
): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (await cond()) return;
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** True when /proc shows no process with this pid (or one that is not ours any more). */
export function gone(pid: number, cgroupHint: string): boolean {
  try {
    return !readFileSync(`/proc/${pid}/cgroup`, 'utf8').includes(cgroupHint);
  } catch {
    return true;
  }
}

export interface GuestUnderTestOptions {
  /** More top-level config keys (a function of the env when they name files in it). */
  extra?: Record<string, unknown> | ((env: Env) => Record<string, unknown>);
  /** After the config is written, before the agent starts (rewrite the config, mount…). */
  prepare?: (env: Env, t: TestAdapter) => Promise<void> | void;
  /** Waited for once the agent answers (the projects up, a project connected…). */
  ready?: { what: string; until: (env: Env) => boolean | Promise<boolean> };
  /** After every agent has stopped, before the root and the env go (an unmount…). */
  cleanup?: (env: Env) => Promise<void> | void;
  /** More environment for the agent process (LD_PRELOAD of libfaketime…), a function of the env. */
  agentEnv?: (env: Env) => Record<string, string>;
}

/**
 * The set-up most guest tests share: a per-run cgroup root (`<rootName>/guest` for the
 * agent), a fresh env, the config, the agent as a real process, ready. `dispose` stops
 * the agent (and any other the test started), removes the root and the env; a set-up that
 * fails half-way undoes what it made before it rethrows, so nothing is left behind.
 */
export class GuestUnderTest {
  private constructor(
    readonly t: TestAdapter,
    readonly env: Env,
    /** The running agent; a test that starts another one replaces it (see restart). */
    public agent: AgentProc | undefined,
    private readonly cleanup?: (env: Env) => Promise<void> | void,
    private readonly agentEnv: (env: Env) => Record<string, string> = () => ({}),
  ) {}

  static async start(
    tag: string,
    projects: ProjectSpec[],
    opts: GuestUnderTestOptions = {},
  ): Promise<GuestUnderTest> {
    ensureBuilt();
    const t = await openTestAdapter(tag);
    const g = new GuestUnderTest(t, await makeEnv(), undefined, opts.cleanup, opts.agentEnv);
    try {
      const extra = typeof opts.extra === 'function' ? opts.extra(g.env) : opts.extra;
      await writeConfig(g.env, `${t.rootName}/guest`, projects, extra);
      await opts.prepare?.(g.env, t);
      g.agent = startAgent(g.env, g.agentEnv(g.env));
      await waitReady(g.env, g.agent);
      if (opts.ready) await waitFor(opts.ready.what, () => opts.ready!.until(g.env));
      return g;
    } catch (err) {
      await g.dispose();
      throw err;
    }
  }

  /** Stops the agent and starts a new one on the same config and state. */
  async restart(): Promise<AgentProc> {
    await this.agent?.stop();
    this.agent = startAgent(this.env, this.agentEnv(this.env));
    await waitReady(this.env, this.agent);
    return this.agent;
  }

  async dispose(others: (AgentProc | undefined)[] = []): Promise<void> {
    for (const a of [this.agent, ...others]) await a?.stop();
    try {
      await this.cleanup?.(this.env);
    } finally {
      await this.t.dispose();
      await fsp.rm(this.env.dir, { recursive: true, force: true });
    }
  }
}
