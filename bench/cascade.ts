#!/usr/bin/env node
/**
 * Cascade latency (docs/performance.md, part 1): an operator `reclaim` on the host's
 * operator socket (rpcCall, as nestctl does) → the host journals and sends the notice →
 * each guest agent plans, writes every project's new limits and sends the stop signals →
 * the projects exit (at once: no grace time) → the outcome is back at the host, the VM
 * cgroup lowered, and the operator answered. Timed from the request to that answer, p50/p99
 * over --runs runs; a `restore` after each run (not timed) puts every project back.
 *
 * Real host broker and guest agents (separate processes, unix sockets), real cgroups under
 * `nestbroker-bench-<pid>/<size>`, real project processes (a shell each). Every project is
 * touched: the higher-priority half is shrunk to its minimum (limit files rewritten), the
 * lower half is stopped (SIGTERM, exit 0). With several guests, all are reclaimed at once
 * and the run ends when the last answers.
 *
 * Three floors, in the same run and interleaved with it (docs/performance.md, "The three
 * floors"), each on an equal set of groups and shells of its own:
 * - the kernel floor: the same final limit writes, the same signals and the same wait for
 *   the stopped groups to empty, in raw system calls by a small C program built now with
 *   the system's cc (bench/kernel-floor.c, bench/lib/kernel-floor.ts);
 * - the adapter floor: the same work by this process through cgroup-adapter, one awaited
 *   call after another (what the adapter's way of doing it costs, beside the kernel's);
 * - the fsync floor: a small write + fsync, and the journal's atomic write, in g00's
 *   journal directory (every journal write pays it).
 *
 *   make build && node dist/bench/cascade.js [--sizes 1x10,1x100,1x500,10x50,50x50] [--runs 30]
 *
 * Options: --warmup N (untimed runs first, default 2), --profile (node --cpu-prof in every
 * agent; the hot spots go in the JSON), --phases (each phase's time, from the agents' debug
 * logs), --floors adapter,kernel, --held-fds (the kernel floor on descriptors held open),
 * --fsync-samples N, --pin-host (the host broker alone on CPU 0, the guest agents and their
 * projects on the others), --root NAME, --out FILE, --log-level LEVEL.
 *
 * Beside the times, every run's CPU time (utime + stime, /proc/<pid>/stat, proc(5)) of the
 * host broker and of the guest agents together, read just before the reclaim and after
 * the operator's answer: what the host costs per guest whether or not it waited for a CPU.
 */
import { type ChildProcess } from 'node:child_process';
import { promises as fs, readFileSync, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openCgroupAdapter, spawnInto, type CgroupDriver } from '../cgroup-adapter/index';
import { cpuWeightToShares } from '../cgroup-adapter/formats-v1';
import type { Limits } from '../cgroup-adapter/types';
import { rpcCall } from '../agent/common/rpc';
import type { NoticeView } from '../agent/host/api';
import { removeLeftoverRoot } from '../demo/stack';
import {
  fitLine,
  intArg,
  nowMs,
  parseArgs,
  r3,
  RESULTS_DIR,
  requireRoot,
  say,
  sleep,
  summarise,
  table,
  writeResult,
  type Summary,
} from './lib/common';
import { summariseProfiles, type ProfileSummary } from './lib/cpuprofile';
import { compileKernelFloor, fsyncFloor, KernelFloor, type FloorAction } from './lib/kernel-floor';
import { phasesFromLogs, type TracedRun } from './lib/phases';
import { cpusAllowed, cpuTimeMs, cpuTimes } from './lib/procstat';
import {
  BenchStack,
  PROJECT_CPU,
  PROJECT_MEMORY,
  SETTLE_MS,
  SHELL_PROJECT,
  guestMemory,
  pinning,
  type Pinning,
  projectName,
  waitShellsReady,
} from './lib/stack';

const OPTIONS = {
  sizes: 'guests×projects list, e.g. 1x10,1x100,1x500,10x50,50x50',
  runs: 'timed runs per size (default 30)',
  warmup: 'untimed runs per size first (default 2)',
  profile: 'run the agents under node --cpu-prof and summarise where the time goes',
  root: 'cgroup root (default nestbroker-bench-<pid>)',
  out: 'JSON file (default bench/results/cascade.json)',
  'log-level': "the agents' log level (default: theirs, info)",
  budget:
    'seconds per size after which no new run starts (default 300; fewer runs are reported as such)',
  deadline: 'notice deadline (default 600s: a slow cascade is measured, not cut off)',
  resume: 'a cascade JSON of an earlier run: its measured sizes are kept, the others run',
  'keep-logs': "keep the agents' configs, journals and logs (the directory is printed)",
  phases:
    "where the time goes: the agents log at debug level and every phase's p50/p99 is read from their logs (bench/lib/phases.ts)",
  floors:
    'which floors run beside the cascade: adapter,kernel (default), one of them, or none (50x50 with both needs 3 × 5 000 processes)',
  'held-fds':
    'the kernel floor writes and reads on descriptors opened once (pwrite/pread) instead of open/write/close each run',
  'node-args': "extra node flags of the agents, e.g. '--lite-mode' (A/B runs)",
  'fsync-samples':
    "write + fsync samples of the disk per run, in g00's journal directory (default 5)",
  'pin-host':
    'the host broker alone on CPU 0, every guest agent (and its projects) on the other CPUs (taskset); checked in /proc/<pid>/status',
  settle: `ms every project restarted by the restore is left before the next timed reclaim (default ${SETTLE_MS}; see SETTLE_MS in bench/lib/stack.ts)`,
};

export const DEFAULT_SIZES = '1x10,1x100,1x500,10x50,50x50';

interface Size {
  guests: number;
  projects: number;
  label: string;
}

function parseSizes(s: string): Size[] {
  return s.split(',').map((x) => {
    const m = /^(\d+)x(\d+)$/.exec(x.trim());
    if (!m || Number(m[1]) < 1 || Number(m[2]) < 2)
      throw new Error(`--sizes: "${x}" is not GUESTSxPROJECTS (at least 1 guest, 2 projects)`);
    return { guests: Number(m[1]), projects: Number(m[2]), label: `${m[1]}x${m[2]}` };
  });
}

/** Projects kept (shrunk to their minimum) by the reclaim; the rest are stopped. */
const keptOf = (projects: number): number => Math.ceil(projects / 2);
/** What one reclaim takes from a guest: all but `kept` × the minimum (plus the reserve). */
const reclaimBytes = (projects: number): number =>
  guestMemory(projects) - (guestMemory(0) + keptOf(projects) * PROJECT_MEMORY.min);

// ---------------------------------------------------------------- feasibility

interface Feasibility {
  ok: boolean;
  why: string[];
  needTasks: number;
  freeTasks: number;
  needMemoryBytes: number;
  availableMemoryBytes: number;
}

/** Each project is 2 tasks (sh + sleep); an agent ~12 threads and ~90 MiB at most. */
function feasibility(size: Size, floors: number): Feasibility {
  const projects = size.guests * size.projects;
  const sets = 1 + floors; // the cascade's projects and each floor's own set
  const needTasks = projects * 2 * sets + size.guests * 12 + 200;
  const pidMax = Number(readFileSync('/proc/sys/kernel/pid_max', 'utf8'));
  const used = readdirSync('/proc').filter((d) => /^\d+$/.test(d)).length;
  const freeTasks = pidMax - used * 4; // threads are not listed in /proc: be generous
  const meminfo = readFileSync('/proc/meminfo', 'utf8');
  const avail = Number(/^MemAvailable:\s+(\d+)/m.exec(meminfo)?.[1] ?? 0) * 1024;
  const needMemoryBytes = size.guests * 90 * 2 ** 20 + projects * sets * 1.5 * 2 ** 20;
  const why: string[] = [];
  if (needTasks > freeTasks)
    why.push(`needs ~${needTasks} tasks, pid_max ${pidMax} leaves ~${freeTasks}`);
  if (needMemoryBytes > avail * 0.8)
    why.push(
      `needs ~${Math.round(needMemoryBytes / 2 ** 20)} MiB, ${Math.round(avail / 2 ** 20)} MiB available`,
    );
  return {
    ok: why.length === 0,
    why,
    needTasks,
    freeTasks,
    needMemoryBytes,
    availableMemoryBytes: avail,
  };
}

// ---------------------------------------------------------------- the floor

/**
 * The same work as the cascade, minus everything but the kernel calls: one loop over the
 * projects writing the kept ones' final limits and signalling the stopped ones, then
 * waiting until every stopped group is empty.
 */
class Floor {
  private readonly children = new Set<ChildProcess>();
  readonly groups: string[] = [];
  constructor(
    private readonly driver: CgroupDriver,
    private readonly size: Size,
    prefix = 'floor',
  ) {
    for (let g = 0; g < size.guests; g++)
      for (let i = 0; i < size.projects; i++) this.groups.push(`${prefix}/g${g}/${projectName(i)}`);
  }

  /**
   * What run() does, as the kernel floor's actions (bench/kernel-floor.c): the files
   * setLimits(shrunk()) writes, in its order (hybrid: memory.limit_in_bytes,
   * memory.soft_limit_in_bytes, cpu.cfs_quota_us, cpu.shares; v2: memory.max, memory.high,
   * cpu.max, cpu.weight), and for a stopped group its cgroup.procs and cgroup.events.
   */
  actions(): FloorAction[] {
    const s = Floor.shrunk();
    const mem = String(s.memory!.max);
    const quota = s.cpu!.max!.quotaUs as number;
    const weight = s.cpu!.weight!;
    const hier = (c: string): string => {
      const h = this.driver.hierarchies.find((x) => x.name.split(',').includes(c));
      if (!h) throw new Error(`the kernel floor needs the v1 ${c} hierarchy`);
      return h.name;
    };
    const out: FloorAction[] = [];
    for (let i = 0; i < this.groups.length; i++) {
      const d = this.driver.paths(this.groups[i]);
      const w = (dir: string, file: string, value: string): void => {
        out.push({ kind: 'write', file: path.join(dir, file), value });
      };
      if (!this.kept(i))
        out.push({
          kind: 'stop',
          procs: path.join(d.unified, 'cgroup.procs'),
          events: path.join(d.unified, 'cgroup.events'),
        });
      else if (this.driver.kind === 'hybrid') {
        const m = d[hier('memory')];
        const c = d[hier('cpu')];
        w(m, 'memory.limit_in_bytes', mem);
        w(m, 'memory.soft_limit_in_bytes', mem);
        w(c, 'cpu.cfs_quota_us', String(quota));
        w(c, 'cpu.shares', String(cpuWeightToShares(weight)));
      } else {
        w(d.unified, 'memory.max', mem);
        w(d.unified, 'memory.high', mem);
        w(d.unified, 'cpu.max', `${quota} ${s.cpu!.max!.periodUs}`);
        w(d.unified, 'cpu.weight', String(weight));
      }
    }
    return out;
  }

  static initial(): Limits {
    return {
      memory: { high: PROJECT_MEMORY.max, max: PROJECT_MEMORY.max },
      cpu: { max: { quotaUs: PROJECT_CPU * 100_000, periodUs: 100_000 }, weight: 100 },
    };
  }
  static shrunk(): Limits {
    return {
      memory: { high: PROJECT_MEMORY.min, max: PROJECT_MEMORY.min },
      cpu: { max: { quotaUs: PROJECT_CPU * 100_000, periodUs: 100_000 }, weight: 100 },
    };
  }

  private kept(i: number): boolean {
    return i % this.size.projects < keptOf(this.size.projects);
  }

  async start(): Promise<void> {
    for (const g of this.groups) {
      await this.driver.create(g, Floor.initial());
      await this.spawn(g);
    }
    await waitShellsReady(this.driver, this.groups);
  }

  private async spawn(group: string): Promise<void> {
    const child = await spawnInto(this.driver, group, SHELL_PROJECT[0], SHELL_PROJECT.slice(1), {
      stdio: 'ignore',
    });
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
  }

  /** One timed run: {writes and signals done, every stopped group empty} in ms. */
  async run(): Promise<{ signalledMs: number; emptyMs: number }> {
    const t0 = nowMs();
    const stopped: string[] = [];
    for (let i = 0; i < this.groups.length; i++) {
      const g = this.groups[i];
      if (this.kept(i)) {
        await this.driver.setLimits(g, Floor.shrunk());
        continue;
      }
      for (const pid of await this.driver.pids(g)) {
        try {
          process.kill(pid, 'SIGTERM');
        } catch {
          // gone already
        }
      }
      stopped.push(g);
    }
    const t1 = nowMs();
    await Promise.all(stopped.map((g) => this.driver.waitEmpty(g, 10_000)));
    const t2 = nowMs();
    return { signalledMs: t1 - t0, emptyMs: t2 - t0 };
  }

  /** Untimed: limits back, shells started again. */
  async reset(): Promise<void> {
    for (let i = 0; i < this.groups.length; i++) {
      const g = this.groups[i];
      if (this.kept(i)) await this.driver.setLimits(g, Floor.initial());
      else await this.spawn(g);
    }
    // The next timed run signals these shells: not before their sleep is exec'd.
    await waitShellsReady(this.driver, this.groups);
  }
}

// ---------------------------------------------------------------- pinning

/**
 * Where the stack's processes may run, from /proc/<pid>/status: the host broker's and each
 * guest agent's list, and how many project processes have each list. Throws when a
 * process is not where --pin-host put it (an attach to a cpuset may reset an affinity,
 * Documentation/admin-guide/cgroup-v1/cpusets.rst).
 */
async function checkPinning(
  stack: BenchStack,
  want: Pinning | null,
): Promise<{ host?: string; guests: Record<string, number>; projects: Record<string, number> }> {
  const count = (m: Record<string, number>, k: string | undefined): void => {
    m[k ?? 'gone'] = (m[k ?? 'gone'] ?? 0) + 1;
  };
  const pids = stack.agentPids();
  const out = {
    host: pids.host === undefined ? undefined : cpusAllowed(pids.host),
    guests: {} as Record<string, number>,
    projects: {} as Record<string, number>,
  };
  for (const pid of Object.values(pids.guests))
    count(out.guests, pid === undefined ? undefined : cpusAllowed(pid));
  for (const g of stack.guests)
    for (let i = 0; i < g.spec.projects; i++)
      for (const pid of await stack.driver.pids(`${g.spec.name}/projects/${projectName(i)}`))
        count(out.projects, cpusAllowed(pid));
  if (want) {
    const wrong = [
      out.host !== want.host ? `host broker on ${out.host}` : '',
      ...Object.keys(out.guests)
        .filter((k) => k !== want.guests)
        .map((k) => `${out.guests[k]} guest agent(s) on ${k}`),
      ...Object.keys(out.projects)
        .filter((k) => k !== want.guests && k !== 'gone')
        .map((k) => `${out.projects[k]} project process(es) on ${k}`),
    ].filter((x) => x !== '');
    if (wrong.length)
      throw new Error(
        `--pin-host: host on ${want.host}, guests on ${want.guests} asked; ${wrong.join(', ')}`,
      );
  }
  return out;
}

// ---------------------------------------------------------------- one size

/** The stack of the size being measured: an interrupted bench stops its agents too. */
let current: BenchStack | null = null;

interface SizeResult {
  size: string;
  guests: number;
  projectsPerGuest: number;
  projects: number;
  kept: number;
  stopped: number;
  runs: number;
  /** runs asked for; `runs` may be fewer when the size's time budget ran out */
  runsAsked: number;
  budgetExhausted?: boolean;
  error?: string;
  skipped?: string[];
  feasibility: Feasibility;
  /** request → operator answer (outcome back at the host, VM actuated), ms */
  latencyMs?: Summary;
  /** per run: the slowest guest's own cascade (outcome.ms: notice received → outcome), ms */
  guestMs?: Summary;
  /**
   * per run: the host broker's own share: first notice sent → last outcome received (the
   * host's sentAt / outcomeAt), minus the slowest guest's own time; and that per guest
   */
  hostShareMs?: Summary;
  hostSharePerGuestMs?: Summary;
  /** per run: first notice sent → last notice sent (the host's sends one after another) */
  sendSpreadMs?: Summary;
  /** per notice: sentAt → outcomeAt minus that guest's own time (channel, queueing, journals) */
  perNoticeOverheadMs?: Summary;
  /**
   * per run: the host broker's CPU time (utime + stime, /proc/<pid>/stat) from just before
   * the reclaim to the operator's answer, ms; and that per guest
   */
  hostCpuMs?: Summary;
  hostCpuPerGuestMs?: Summary;
  /** the part of hostCpuMs in the kernel (stime: system calls, the thread pool's writes) */
  hostSystemCpuMs?: Summary;
  /** per run: the guest agents' CPU time, summed over every agent (their projects not counted) */
  guestsCpuMs?: Summary;
  guestsCpuPerGuestMs?: Summary;
  /** --pin-host: the CPUs asked for, and where the processes were (after start, after the runs) */
  pinned?: Pinning;
  cpusAllowed?: {
    afterStart: Awaited<ReturnType<typeof checkPinning>>;
    afterRuns?: Awaited<ReturnType<typeof checkPinning>>;
  };
  /** os.loadavg() (1, 5, 15 min) when the size started and when its runs ended */
  loadAverage?: { start: number[]; end?: number[] };
  /** the adapter floor (the same work through cgroup-adapter, one awaited call at a time) */
  floorSignalledMs?: Summary;
  floorMs?: Summary;
  /** cascade / adapter floor */
  ratioP50?: number;
  ratioP99?: number;
  /** the kernel floor (bench/kernel-floor.c: raw system calls, one loop) */
  kernelFloorSignalledMs?: Summary;
  kernelFloorMs?: Summary;
  /** cascade / kernel floor */
  kernelRatioP50?: number;
  kernelRatioP99?: number;
  /** adapter floor / kernel floor: what the adapter's way of doing it costs */
  adapterOverKernelP50?: number;
  /** the disk, in g00's journal directory: a small write + fsync; the journal's atomic write */
  fsyncMs?: Summary;
  atomicWriteMs?: Summary;
  kernelFloorHeldFds?: boolean;
  perProjectUs?: { cascadeP50: number; floorP50?: number; kernelFloorP50?: number };
  samples?: {
    latencyMs: number[];
    guestMs: number[];
    hostCpuMs: number[];
    guestsCpuMs: number[];
    floorMs: number[];
    kernelFloorMs: number[];
  };
  exits?: Record<string, number>;
  startMs?: number;
  profile?: { host: ProfileSummary; guests: ProfileSummary };
  /** --phases: each phase of the cascade, p50/p99 over every notice of the timed runs */
  phases?: { notices: number; phases: { phase: string; what: string; ms: Summary }[] };
}

async function runSize(
  size: Size,
  base: string,
  opts: {
    runs: number;
    warmup: number;
    profile: boolean;
    phases: boolean;
    logLevel?: string;
    keepLogs?: boolean;
    budgetS: number;
    deadline: string;
    floors: { adapter: boolean; kernel: boolean };
    heldFds: boolean;
    fsyncSamples: number;
    kernelFloorBin: string | null;
    nodeArgs: string[];
    settleMs: number;
    pin: Pinning | null;
  },
): Promise<SizeResult> {
  const projects = size.guests * size.projects;
  const kept = keptOf(size.projects) * size.guests;
  const res: SizeResult = {
    size: size.label,
    guests: size.guests,
    projectsPerGuest: size.projects,
    projects,
    kept,
    stopped: projects - kept,
    runs: 0,
    runsAsked: opts.runs,
    loadAverage: { start: os.loadavg().map(r3) },
    ...(opts.pin ? { pinned: opts.pin } : {}),
    feasibility: feasibility(size, Number(opts.floors.adapter) + Number(opts.floors.kernel)),
  };
  if (!res.feasibility.ok) {
    res.skipped = res.feasibility.why;
    say(`  ${size.label}: skipped: ${res.feasibility.why.join('; ')}`);
    return res;
  }
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), `nestbroker-bench-cascade-${size.label}-`));
  const root = `${base}/s${size.label}`;
  const profDir = path.join(RESULTS_DIR, 'profiles', `cascade-${size.label}`);
  if (opts.profile) {
    await fs.rm(profDir, { recursive: true, force: true });
    await fs.mkdir(profDir, { recursive: true });
  }
  const prof = (who: string): string[] => [
    ...opts.nodeArgs,
    ...(opts.profile ? ['--cpu-prof', `--cpu-prof-dir=${path.join(profDir, who)}`] : []),
  ];
  const stack = new BenchStack({
    root,
    dir,
    guests: Array.from({ length: size.guests }, (_, g) => ({
      name: `g${String(g).padStart(2, '0')}`,
      projects: size.projects,
    })),
    nodeArgs: { host: prof('host'), guest: prof('guest') },
    logLevel: opts.phases ? 'debug' : opts.logLevel,
    ...(opts.pin ? { cpus: { host: opts.pin.host, guest: opts.pin.guests } } : {}),
  });
  current = stack;
  const traced: TracedRun[] = [];
  const latency: number[] = [];
  const guestMs: number[] = [];
  const hostShare: number[] = [];
  const sendSpread: number[] = [];
  const perNotice: number[] = [];
  const hostCpu: number[] = [];
  const hostSys: number[] = [];
  const guestsCpu: number[] = [];
  const floorSig: number[] = [];
  const floorAll: number[] = [];
  const kSig: number[] = [];
  const kAll: number[] = [];
  const fsyncs: number[] = [];
  const atomics: number[] = [];
  const exits: Record<string, number> = {};
  let kernel: KernelFloor | null = null;
  try {
    const t0 = nowMs();
    await stack.prepare();
    await stack.startGuests();
    await stack.startHost();
    await stack.waitConnected();
    await stack.waitProjectsRunning();
    res.startMs = Math.round(nowMs() - t0);
    res.cpusAllowed = { afterStart: await checkPinning(stack, opts.pin) };
    const pids = stack.agentPids();
    const hostPid = pids.host!;
    const guestPids = Object.values(pids.guests).map((p) => p!);
    const guestsCpuNow = (): number => guestPids.reduce((s, p) => s + cpuTimeMs(p), 0);
    const floor = opts.floors.adapter ? new Floor(stack.driver, size) : null;
    await floor?.start();
    const kfloor =
      opts.floors.kernel && opts.kernelFloorBin ? new Floor(stack.driver, size, 'kfloor') : null;
    if (kfloor && opts.kernelFloorBin) {
      await kfloor.start();
      kernel = await KernelFloor.start(
        opts.kernelFloorBin,
        path.join(dir, 'kernel-floor.spec'),
        kfloor.actions(),
        opts.heldFds,
      );
    }
    // The guest's journals live in its state directory (guest.yaml stateDir).
    const journalDir = path.join(dir, stack.guests[0].spec.name, 'state');

    const bytes = reclaimBytes(size.projects);
    const budgetEnd = nowMs() + opts.budgetS * 1000;
    for (let run = -opts.warmup; run < opts.runs; run++) {
      if (run > 0 && nowMs() > budgetEnd) {
        res.budgetExhausted = true;
        say(`  ${size.label}: time budget of ${opts.budgetS} s spent after ${run} runs`);
        break;
      }
      // The cascade.
      const wallStart = Date.now(); // the agents' log clock, for --phases
      const hostCpu0 = cpuTimes(hostPid);
      const guestsCpu0 = guestsCpuNow();
      const a = nowMs();
      const views = (await Promise.all(
        stack.guests.map((g) =>
          rpcCall(
            stack.hostSocket,
            'reclaim',
            { guest: g.spec.name, memory: bytes, deadline: opts.deadline, reason: 'bench' },
            { timeoutMs: 0 },
          ),
        ),
      )) as NoticeView[];
      const ms = nowMs() - a;
      const hostCpu1 = cpuTimes(hostPid);
      const hostCpuRun = hostCpu1.userMs + hostCpu1.systemMs - hostCpu0.userMs - hostCpu0.systemMs;
      const hostSysRun = hostCpu1.systemMs - hostCpu0.systemMs;
      const guestsCpuRun = guestsCpuNow() - guestsCpu0;
      if (run >= 0) traced.push({ ids: views.map((v) => v.id), start: wallStart, end: Date.now() });
      for (const v of views) {
        const o = v.outcome;
        const shrunk = o?.projects.filter((p) => p.action === 'shrunk').length ?? 0;
        const stopped = o?.projects.filter((p) => p.action === 'stopped') ?? [];
        if (
          v.state !== 'done' ||
          o?.status !== 'complete' ||
          shrunk + stopped.length !== size.projects
        )
          throw new Error(
            `run ${run}: ${v.guest}'s reclaim ended ${v.state}/${o?.status} with ${shrunk} shrunk, ${stopped.length} stopped of ${size.projects}: ${JSON.stringify(v.error ?? null)}`,
          );
        if (run >= 0)
          for (const p of stopped) exits[p.exit ?? 'none'] = (exits[p.exit ?? 'none'] ?? 0) + 1;
      }
      if (run >= 0) {
        res.runs++;
        latency.push(ms);
        hostCpu.push(hostCpuRun);
        hostSys.push(hostSysRun);
        guestsCpu.push(guestsCpuRun);
        const slowest = Math.max(...views.map((v) => v.outcome?.ms ?? 0));
        guestMs.push(slowest);
        const firstSent = Math.min(...views.map((v) => Date.parse(v.sentAt ?? '')));
        const lastOutcome = Math.max(...views.map((v) => Date.parse(v.outcomeAt ?? '')));
        if (Number.isFinite(firstSent) && Number.isFinite(lastOutcome))
          hostShare.push(lastOutcome - firstSent - slowest);
        const sent = views.map((v) => Date.parse(v.sentAt ?? ''));
        if (sent.every(Number.isFinite)) sendSpread.push(Math.max(...sent) - Math.min(...sent));
        for (const v of views) {
          const t = Date.parse(v.outcomeAt ?? '') - Date.parse(v.sentAt ?? '');
          if (Number.isFinite(t)) perNotice.push(t - (v.outcome?.ms ?? 0));
        }
      }
      // The floors, right after, on the same machine state: the adapter's, the kernel's,
      // and the disk's.
      const f = floor ? await floor.run() : null;
      const k = kernel ? await kernel.run() : null;
      const d =
        opts.kernelFloorBin && opts.fsyncSamples > 0
          ? await fsyncFloor(opts.kernelFloorBin, journalDir, opts.fsyncSamples)
          : null;
      if (run >= 0) {
        if (f) floorSig.push(f.signalledMs);
        if (f) floorAll.push(f.emptyMs);
        if (k) kSig.push(k.signalledMs);
        if (k) kAll.push(k.emptyMs);
        if (d) fsyncs.push(...d.fsyncMs);
        if (d) atomics.push(...d.atomicMs);
      }
      // Reset (untimed): restore every guest, restart the floor's shells.
      const back = (await Promise.all(
        stack.guests.map((g) =>
          rpcCall(
            stack.hostSocket,
            'restore',
            { guest: g.spec.name, deadline: opts.deadline },
            { timeoutMs: 0 },
          ),
        ),
      )) as NoticeView[];
      for (const v of back)
        if (v.state !== 'done' || v.outcome?.status !== 'complete')
          throw new Error(
            `run ${run}: restore of ${v.guest} ended ${v.state}: ${JSON.stringify(v.error ?? null)}`,
          );
      await floor?.reset();
      await kfloor?.reset();
      await stack.waitProjectsRunning();
      // The restarted projects pay their start's CPU against their quota before the next
      // timed stop, as the floors' shells (restarted a whole cascade earlier) have.
      await sleep(opts.settleMs);
      if (run >= 0 && (run + 1) % 10 === 0)
        say(
          `  ${size.label}: ${run + 1}/${opts.runs} runs, last ${r3(ms)} ms (adapter floor ${f ? r3(f.emptyMs) : '-'} ms, kernel floor ${k ? r3(k.emptyMs) : '-'} ms)`,
        );
    }
    res.cpusAllowed.afterRuns = await checkPinning(stack, opts.pin);
  } catch (err) {
    res.error = err instanceof Error ? err.message : String(err);
    say(`  ${size.label}: FAILED: ${res.error}`);
  } finally {
    res.loadAverage!.end = os.loadavg().map(r3);
    kernel?.stop();
    await stack.teardown().catch((err: unknown) => say(`  teardown: ${String(err)}`));
    current = null;
    if (opts.phases) res.phases = phasesFromLogs(stack.logDir, traced) ?? undefined;
    if (opts.keepLogs) say(`  ${size.label}: logs kept in ${dir}`);
    else await fs.rm(dir, { recursive: true, force: true });
  }
  if (latency.length === 0) return res;
  res.latencyMs = summarise(latency);
  res.guestMs = summarise(guestMs);
  if (hostShare.length) {
    res.hostShareMs = summarise(hostShare);
    res.hostSharePerGuestMs = summarise(hostShare.map((x) => x / size.guests));
  }
  if (sendSpread.length) res.sendSpreadMs = summarise(sendSpread);
  if (perNotice.length) res.perNoticeOverheadMs = summarise(perNotice);
  res.hostCpuMs = summarise(hostCpu);
  res.hostCpuPerGuestMs = summarise(hostCpu.map((x) => x / size.guests));
  res.hostSystemCpuMs = summarise(hostSys);
  res.guestsCpuMs = summarise(guestsCpu);
  res.guestsCpuPerGuestMs = summarise(guestsCpu.map((x) => x / size.guests));
  const perProject = (ms: number): number => Math.round((ms / projects) * 1000);
  res.perProjectUs = { cascadeP50: perProject(res.latencyMs.p50) };
  if (floorAll.length) {
    res.floorSignalledMs = summarise(floorSig);
    res.floorMs = summarise(floorAll);
    res.ratioP50 = r3(res.latencyMs.p50 / res.floorMs.p50);
    res.ratioP99 = r3(res.latencyMs.p99 / res.floorMs.p99);
    res.perProjectUs.floorP50 = perProject(res.floorMs.p50);
  }
  if (kAll.length) {
    res.kernelFloorSignalledMs = summarise(kSig);
    res.kernelFloorMs = summarise(kAll);
    res.kernelRatioP50 = r3(res.latencyMs.p50 / res.kernelFloorMs.p50);
    res.kernelRatioP99 = r3(res.latencyMs.p99 / res.kernelFloorMs.p99);
    res.kernelFloorHeldFds = opts.heldFds;
    res.perProjectUs.kernelFloorP50 = perProject(res.kernelFloorMs.p50);
    if (res.floorMs) res.adapterOverKernelP50 = r3(res.floorMs.p50 / res.kernelFloorMs.p50);
  }
  if (fsyncs.length) {
    res.fsyncMs = summarise(fsyncs);
    res.atomicWriteMs = summarise(atomics);
  }
  res.samples = {
    latencyMs: latency.map(r3),
    guestMs,
    hostCpuMs: hostCpu,
    guestsCpuMs: guestsCpu,
    floorMs: floorAll.map(r3),
    kernelFloorMs: kAll.map(r3),
  };
  res.exits = exits;
  if (opts.profile) {
    res.profile = {
      host: summariseProfiles(path.join(profDir, 'host'), 15),
      guests: summariseProfiles(path.join(profDir, 'guest'), 15),
    };
  }
  return res;
}

// ---------------------------------------------------------------- goals

interface Goal {
  goal: string;
  measured: string;
  met: boolean | null;
}

function goals(results: SizeResult[]): { goals: Goal[]; linearity: object | null } {
  const by = (l: string) => results.find((r) => r.size === l && r.latencyMs);
  const out: Goal[] = [];
  for (const l of ['1x10', '1x100', '1x500']) {
    const r = by(l);
    const k = r?.kernelFloorMs;
    out.push({
      goal: `${l}: p50 ≤ 1.5× the kernel floor's p50, p99 ≤ 2× its p99 (same run)`,
      measured:
        r && k
          ? `p50 ${r.latencyMs!.p50} ms = ${r.kernelRatioP50}× (${k.p50}), p99 ${r.latencyMs!.p99} ms = ${r.kernelRatioP99}× (${k.p99})`
          : 'not run',
      met: r && k ? r.kernelRatioP50! <= 1.5 && r.kernelRatioP99! <= 2 : null,
    });
  }
  const s100 = by('1x100');
  out.push({
    goal: '1 guest × 100 projects: p99 ≤ 40 ms',
    measured: s100 ? `p99 ${s100.latencyMs!.p99} ms` : 'not run',
    met: s100 ? s100.latencyMs!.p99 <= 40 : null,
  });
  const many = results.filter((r) => r.guests >= 50 && r.hostShareMs);
  out.push({
    goal: "50 guests: the host broker's own share (first notice sent → last outcome, minus the slowest guest) ≤ 20 ms",
    measured: many.length
      ? many
          .map(
            (r) =>
              `${r.size}: p50 ${r.hostShareMs!.p50} ms, p99 ${r.hostShareMs!.p99} ms (${r.hostSharePerGuestMs!.p50} ms a guest)`,
          )
          .join('; ')
      : 'not run',
    met: many.length ? many.every((r) => r.hostShareMs!.p50 <= 20) : null,
  });
  const s2500 = by('50x50');
  out.push({
    goal: '50 guests × 50 projects: p99 ≤ 500 ms',
    measured: s2500 ? `p99 ${s2500.latencyMs!.p99} ms` : 'not run',
    met: s2500 ? s2500.latencyMs!.p99 <= 500 : null,
  });
  for (const r of results.filter((x) => x.latencyMs && x.floorMs))
    out.push({
      goal: `${r.size}: within 10× of the adapter floor${r.runs < r.runsAsked ? ` (${r.runs} runs)` : ''}`,
      measured: `p50 ${r.ratioP50}×, p99 ${r.ratioP99}×`,
      met: r.ratioP50! <= 10 && r.ratioP99! <= 10,
    });
  const single = results.filter((r) => r.guests === 1 && r.latencyMs);
  let linearity: object | null = null;
  if (single.length < 3)
    out.push({
      goal: 'cost grows linearly with projects (1 guest, 3 sizes or more)',
      measured: `only ${single.map((r) => r.size).join(', ') || 'no size'} measured`,
      met: null,
    });
  else {
    const xs = single.map((r) => r.projects);
    const ys = single.map((r) => r.latencyMs!.p50);
    const f = fitLine(xs, ys);
    const big = single[single.length - 1];
    const mid = single.length >= 3 ? single[single.length - 2] : single[0];
    // Marginal cost between the two largest sizes vs the average cost per project of the
    // fit: growing worse than linearly would make the marginal cost climb.
    const marginal = (big.latencyMs!.p50 - mid.latencyMs!.p50) / (big.projects - mid.projects);
    linearity = {
      fit: { interceptMs: r3(f.a), msPerProject: r3(f.b), r2: r3(f.r2) },
      marginalMsPerProject: r3(marginal),
      sizes: single.map((r) => r.size),
    };
    out.push({
      goal: 'cost grows linearly with projects (1 guest: R² of a straight line ≥ 0.98, marginal cost at the top ≤ 1.5× the fitted slope)',
      measured: `${r3(f.b * 1000)} µs/project + ${r3(f.a)} ms, R² ${r3(f.r2)}; marginal ${r3(marginal * 1000)} µs/project between ${mid.size} and ${big.size}`,
      met: f.r2 >= 0.98 && marginal <= 1.5 * f.b,
    });
  }
  return { goals: out, linearity };
}

// ---------------------------------------------------------------- main

export async function main(argv = process.argv.slice(2)): Promise<number> {
  const a = parseArgs(argv, OPTIONS);
  requireRoot('bench/cascade');
  const sizes = parseSizes(a.sizes ?? DEFAULT_SIZES);
  const runs = intArg(a.runs, 'runs', 30);
  const warmup = intArg(a.warmup, 'warmup', 2, 0);
  const base = a.root ?? `nestbroker-bench-${process.pid}`;
  const budgetS = intArg(a.budget, 'budget', 300);
  const settleMs = intArg(a.settle, 'settle', SETTLE_MS, 0);
  const deadline = a.deadline ?? '600s';
  const floorNames = (a.floors ?? 'adapter,kernel').split(',').map((x) => x.trim());
  const badFloor = floorNames.filter(
    (x) => x !== 'adapter' && x !== 'kernel' && x !== 'none' && x !== '',
  );
  if (badFloor.length)
    throw new Error(`--floors: "${badFloor.join(',')}" is not adapter, kernel, both or none`);
  const floors = { adapter: floorNames.includes('adapter'), kernel: floorNames.includes('kernel') };
  const fsyncSamples = intArg(a['fsync-samples'], 'fsync-samples', 5, 0);
  const pin = a['pin-host'] === 'true' ? pinning() : null;
  if (pin) say(`--pin-host: host broker on CPU ${pin.host}, guest agents on CPU ${pin.guests}`);
  // The kernel floor and the fsync floor are one C program, built now with the system's cc.
  const kf = floors.kernel || fsyncSamples > 0 ? await compileKernelFloor() : null;
  if (kf) say(`kernel floor: bench/kernel-floor.c built with ${kf.cc}`);
  say(
    `cascade: operator reclaim → outcome at the host; ${runs} runs per size (+${warmup} warm-up), root ${base}`,
  );
  const results: SizeResult[] = [];
  const cleanup = async (): Promise<void> => {
    await removeLeftoverRoot(base).catch((err: unknown) => say(`cleanup: ${String(err)}`));
  };
  const onSignal = (): void => {
    const stack = current;
    void (stack?.teardown() ?? Promise.resolve())
      .catch(() => undefined)
      .then(() => (stack ? fs.rm(stack.opts.dir, { recursive: true, force: true }) : undefined))
      .then(cleanup)
      .finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    // The base root in every hierarchy, so that one removal cleans up every size.
    await openCgroupAdapter({ root: base, create: true });
    const earlier: SizeResult[] = a.resume
      ? (JSON.parse(readFileSync(a.resume, 'utf8')) as { sizes: SizeResult[] }).sizes
      : [];
    for (const size of sizes) {
      const kept = earlier.find((r) => r.size === size.label && (r.latencyMs || r.error));
      if (kept) {
        say(`\n${size.label}: kept from ${a.resume}`);
        results.push(kept);
        continue;
      }
      say(`\n${size.label}: ${size.guests} guest(s) × ${size.projects} projects`);
      results.push(
        await runSize(size, base, {
          runs,
          warmup,
          profile: a.profile === 'true',
          phases: a.phases === 'true',
          logLevel: a['log-level'],
          keepLogs: a['keep-logs'] === 'true',
          budgetS,
          deadline,
          floors,
          heldFds: a['held-fds'] === 'true',
          fsyncSamples,
          kernelFloorBin: kf ? kf.bin : null,
          nodeArgs: (a['node-args'] ?? '').split(' ').filter((x) => x !== ''),
          settleMs,
          pin,
        }),
      );
      // After every size: an interrupted bench still leaves what it measured.
      writeResult('cascade', { runs, warmup, settleMs, complete: false, sizes: results }, a.out);
    }
  } finally {
    await cleanup();
    if (kf) await fs.rm(kf.dir, { recursive: true, force: true });
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }

  say(
    '\ncascade latency (ms): request → outcome back at the host; kernel floor = the same writes, signals and exits in raw system calls (bench/kernel-floor.c); adapter floor = the same through cgroup-adapter, one awaited call at a time',
  );
  const v = (x: number | undefined): number | string => (x === undefined ? '-' : x);
  say(
    table([
      [
        'size',
        'runs',
        'p50',
        'p99',
        'guest p50',
        'host share p50',
        'kernel p50',
        'kernel p99',
        '×kernel p50',
        '×kernel p99',
        'adapter p50',
        'adapter p99',
        '×adapter p50',
        '×adapter p99',
        'fsync p50',
        'fsync p99',
        'atomic p50',
        'µs/project',
      ],
      ...results.map((r) =>
        r.latencyMs
          ? [
              r.size,
              r.runs,
              r.latencyMs.p50,
              r.latencyMs.p99,
              r.guestMs!.p50,
              v(r.hostShareMs?.p50),
              v(r.kernelFloorMs?.p50),
              v(r.kernelFloorMs?.p99),
              v(r.kernelRatioP50),
              v(r.kernelRatioP99),
              v(r.floorMs?.p50),
              v(r.floorMs?.p99),
              v(r.ratioP50),
              v(r.ratioP99),
              v(r.fsyncMs?.p50),
              v(r.fsyncMs?.p99),
              v(r.atomicWriteMs?.p50),
              r.perProjectUs!.cascadeP50,
            ]
          : [
              r.size,
              r.runs,
              r.skipped
                ? `skipped: ${r.skipped.join('; ')}`
                : `failed: ${String(r.error).slice(0, 90)}…`,
            ],
      ),
    ]),
  );
  say(
    "\nCPU time per run (ms, utime + stime from /proc/<pid>/stat, request → answer): the host broker's, and the guest agents' summed; per guest = ÷ guests",
  );
  say(
    table([
      [
        'size',
        'runs',
        'pinned',
        'load start → end',
        'p50',
        'host share p50 / p99',
        'host CPU p50 / p99',
        'host CPU a guest p50 / p99',
        'host system p50',
        'guests CPU p50 / p99',
        'guests CPU a guest p50 / p99',
      ],
      ...results
        .filter((r) => r.hostCpuMs && r.hostCpuMs.n > 0)
        .map((r) => [
          r.size,
          r.runs,
          r.pinned ? `host ${r.pinned.host}, guests ${r.pinned.guests}` : 'no',
          `${r.loadAverage?.start[0] ?? '-'} → ${r.loadAverage?.end?.[0] ?? '-'}`,
          r.latencyMs!.p50,
          r.hostShareMs ? `${r.hostShareMs.p50} / ${r.hostShareMs.p99}` : '-',
          `${r.hostCpuMs!.p50} / ${r.hostCpuMs!.p99}`,
          `${r.hostCpuPerGuestMs!.p50} / ${r.hostCpuPerGuestMs!.p99}`,
          r.hostSystemCpuMs?.p50 ?? '-',
          `${r.guestsCpuMs!.p50} / ${r.guestsCpuMs!.p99}`,
          `${r.guestsCpuPerGuestMs!.p50} / ${r.guestsCpuPerGuestMs!.p99}`,
        ]),
    ]),
  );
  const g = goals(results);
  say('\ngoals');
  say(
    table([
      ['goal', 'measured', 'met'],
      ...g.goals.map((x) => [x.goal, x.measured, x.met === null ? '-' : x.met ? 'yes' : 'NO']),
    ]),
  );
  for (const r of results)
    if (r.profile) {
      say(
        `\nprofile ${r.size}: guest agents ${r.profile.guests.totalMs} ms busy, host ${r.profile.host.totalMs} ms busy; guest hot spots:`,
      );
      say(
        table([
          ['function', 'self ms', '%'],
          ...r.profile.guests.byFunction.slice(0, 10).map((h) => [h.what, h.selfMs, h.share]),
        ]),
      );
    }
  for (const r of results)
    if (r.phases) {
      say(`\nwhere the time goes, ${r.size} (${r.phases.notices} notices, from the agents' logs):`);
      say(
        table([
          ['phase', 'p50 ms', 'p99 ms', 'what'],
          ...r.phases.phases.map((p) => [p.phase, p.ms.p50, p.ms.p99, p.what]),
        ]),
      );
    }
  const out = writeResult(
    'cascade',
    { runs, warmup, settleMs, complete: true, sizes: results, ...g },
    a.out,
  );
  say(`\nwrote ${out}`);
  return results.some((r) => r.error) ? 1 : 0;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err instanceof Error ? err.stack : String(err));
      process.exit(1);
    },
  );
}
