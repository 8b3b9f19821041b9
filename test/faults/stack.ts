/**
 * A host broker and guest agents as real processes (demo/stack.ts) whose projects are the
 * test fixture (test/fixtures/projects/project.js): every SIGTERM handler run and every
 * start APPENDS a line to the project's marker file, so "stopped once" and "started once"
 * are counts of lines, not guesses. Also: reading what the kernel shows for a project or
 * a VM, the agents' journals, and the operator API of both daemons.
 */
import { promises as fs, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { rpcCall } from '../../agent/common/rpc';
import type { NoticeView } from '../../agent/host/api';
import { Stack, waitFor, type GuestSpec, type StackOptions } from '../../demo/stack';
import { ensureBuilt, FIXTURE } from '../integration/guest/harness';

export { waitFor };
export const MiB = 1024 * 1024;

export interface FaultProject {
  name: string;
  priority: number;
  mode: 'graceful' | 'stubborn' | 'forker';
  memory?: [string, string];
  cpu?: [number, number];
  grace?: string;
  holdMb?: number;
}

export interface FaultGuest {
  name: string;
  memory?: string;
  cpus?: number;
  projects: FaultProject[];
  /** Serve the guest agent's metrics on 127.0.0.1:<port>. */
  metricsPort?: number;
}

export interface GuestNotice {
  id: string;
  kind: string;
  state: string;
  runs: number;
  outcome?: NoticeView['outcome'];
  error?: { code: string; message: string };
}

/** The guest most fault tests use: web (priority 100) and batch (10), both graceful. */
export const VM1_WEB_BATCH: FaultGuest = {
  name: 'vm1',
  projects: [
    { name: 'web', priority: 100, mode: 'graceful' },
    { name: 'batch', priority: 10, mode: 'graceful' },
  ],
};

export class FaultStack {
  readonly stack: Stack;
  readonly root: string;

  private constructor(
    readonly dir: string,
    root: string,
    opts: Omit<StackOptions, 'root' | 'dir' | 'guests' | 'transport'>,
    specs: GuestSpec[],
  ) {
    this.root = root;
    this.stack = new Stack({ root, dir, guests: specs, transport: 'unix', ...opts });
  }

  /** Creates the VM cgroups and writes the configs (nothing started yet). */
  static async create(
    tag: string,
    guests: FaultGuest[],
    opts: Omit<StackOptions, 'root' | 'dir' | 'guests' | 'transport'> = {},
  ): Promise<FaultStack> {
    ensureBuilt();
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), `nb-${tag}-`));
    const root = `nestbroker-test-${process.pid}-${tag}`;
    const specs: GuestSpec[] = guests.map((g, i) => ({
      name: g.name,
      priority: 10 * (i + 1),
      memory: g.memory ?? '1GiB',
      cpus: g.cpus ?? 2,
      floor: { memory: '64MiB', cpus: 0.1 },
      ...(g.metricsPort !== undefined ? { metricsPort: g.metricsPort } : {}),
      projects: g.projects.map((p) => ({
        name: p.name,
        priority: p.priority,
        memoryMin: p.memory?.[0] ?? '128MiB',
        memoryMax: p.memory?.[1] ?? '256MiB',
        cpuMin: p.cpu?.[0] ?? 0.1,
        cpuMax: p.cpu?.[1] ?? 0.5,
        holdMiB: 0,
        burn: 0,
        gracePeriod: p.grace ?? '2s',
      })),
    }));
    const fsk = new FaultStack(dir, root, opts, specs);
    await fsk.stack.createVms();
    await fsk.stack.writeConfigs();
    // The projects become the fixture, with its marker lines.
    for (const g of guests) {
      const run = fsk.run(g.name);
      const cfg = YAML.parse(await fs.readFile(run.config, 'utf8')) as {
        projects: { name: string; command: unknown }[];
      };
      for (const p of cfg.projects) {
        const spec = g.projects.find((x) => x.name === p.name)!;
        p.command = {
          argv: [process.execPath, FIXTURE, spec.mode],
          env: {
            MARKER: fsk.markerFile(g.name, p.name),
            ...(spec.holdMb ? { HOLD_MB: String(spec.holdMb) } : {}),
          },
        };
      }
      await fs.writeFile(run.config, YAML.stringify(cfg));
    }
    return fsk;
  }

  /** create, then every daemon started and every project running; torn down if that fails. */
  static async started(
    tag: string,
    guests: FaultGuest[],
    opts: Omit<StackOptions, 'root' | 'dir' | 'guests' | 'transport'> = {},
  ): Promise<FaultStack> {
    const s = await FaultStack.create(tag, guests, opts);
    try {
      await s.startAll();
    } catch (err) {
      await s.teardown();
      throw err;
    }
    return s;
  }

  run(guest: string) {
    return this.stack.guests.find((g) => g.spec.name === guest)!;
  }

  markerFile(guest: string, project: string): string {
    return path.join(this.dir, guest, `${project}.marker`);
  }

  markers(guest: string, project: string): string[] {
    try {
      return readFileSync(this.markerFile(guest, project), 'utf8').split('\n').filter(Boolean);
    } catch {
      return [];
    }
  }

  /** How many marker lines start with `word` (start, term, ignored). */
  count(guest: string, project: string, word: string): number {
    return this.markers(guest, project).filter((l) => l.startsWith(`${word} `)).length;
  }

  /** A cgroup file of `<root>/<rel>` in the v1 hierarchy `ctrl` (this host is hybrid). */
  kernel(ctrl: string, rel: string, file: string): string {
    return readFileSync(path.join('/sys/fs/cgroup', ctrl, this.root, rel, file), 'utf8').trim();
  }

  /** cgroup.procs of a project, as the kernel lists it (v2 membership). */
  procs(guest: string, project: string): number[] {
    return this.kernel('unified', `${guest}/projects/${project}`, 'cgroup.procs')
      .split('\n')
      .filter(Boolean)
      .map(Number);
  }

  /** The project's limits in the kernel, in the outcome's terms. */
  projectLimits(guest: string, project: string): { memoryMax: number; cpuMax: number } {
    const rel = `${guest}/projects/${project}`;
    return {
      memoryMax: Number(this.kernel('memory', rel, 'memory.limit_in_bytes')),
      cpuMax: Number(this.kernel('cpu', rel, 'cpu.cfs_quota_us')) / 100_000,
    };
  }

  vmMemory(guest: string): number {
    return Number(this.kernel('memory', guest, 'memory.limit_in_bytes'));
  }

  async startAll(): Promise<void> {
    for (const g of this.stack.guests) await this.stack.startGuest(g.spec.name);
    await this.stack.startHost();
    await this.stack.waitConnected();
    for (const g of this.stack.guests)
      for (const p of g.spec.projects)
        await waitFor(`${g.spec.name}/${p.name} to start`, async () =>
          this.count(g.spec.name, p.name, 'start') > 0 ? true : undefined,
        );
  }

  /** Sends an operator reclaim to the host; settles with the record or the error. */
  reclaim(guest: string, memory: string, cpus: number, deadline = '20s') {
    return rpcCall(
      this.stack.hostSocket,
      'reclaim',
      { guest, memory, cpus, deadline },
      { timeoutMs: 60_000 },
    ) as Promise<NoticeView>;
  }

  restore(guest: string, deadline = '20s') {
    return rpcCall(
      this.stack.hostSocket,
      'restore',
      { guest, deadline },
      { timeoutMs: 60_000 },
    ) as Promise<NoticeView>;
  }

  async hostNotices(guest?: string): Promise<NoticeView[]> {
    return (await rpcCall(
      this.stack.hostSocket,
      'notices',
      guest ? { guest } : {},
    )) as NoticeView[];
  }

  async guestNotices(guest: string): Promise<GuestNotice[]> {
    return (await rpcCall(this.run(guest).socket, 'notices', {})) as GuestNotice[];
  }

  async waitHostNotice(
    pred: (n: NoticeView) => boolean,
    what: string,
    timeoutMs = 30_000,
  ): Promise<NoticeView> {
    return waitFor(what, async () => (await this.hostNotices()).find(pred), timeoutMs);
  }

  /** A file of the guest's state directory (journal records). */
  async guestJournal(guest: string, sub: string): Promise<Record<string, unknown>[]> {
    const d = path.join(this.dir, guest, 'state', sub);
    const out: Record<string, unknown>[] = [];
    for (const f of (await fs.readdir(d).catch(() => [])).sort())
      if (f.endsWith('.json'))
        out.push({
          file: f,
          ...(JSON.parse(await fs.readFile(path.join(d, f), 'utf8')) as object),
        });
    return out;
  }

  /** Every process by pid (SIGCONT first: a stopped agent cannot take its SIGTERM), then the cgroups. */
  async teardown(): Promise<void> {
    for (const g of this.stack.guests) g.proc?.child.kill('SIGCONT');
    await this.stack.teardown().catch(() => undefined);
    await fs.rm(this.dir, { recursive: true, force: true });
  }
}

/** Waits for a process started by the stack to die; returns how. */
export async function died(p: { exited: Promise<{ code: number | null; signal: string | null }> }) {
  return p.exited;
}
