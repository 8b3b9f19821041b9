/**
 * The project registry: one cgroup per project under the agent's subtree
 * (`projects/<name>`, or the adopted group), its limits, its processes and its state.
 *
 * Start: a `command` project is started INSIDE its cgroup with spawnInto (no window in
 * which it or a fork runs outside it), with the env, cwd and user of its config; an
 * `adopt` project has its pids moved in (or its existing group taken over).
 *
 * Restart of the agent (`KillMode=process` keeps projects running): a project whose group
 * has processes is re-adopted with its processes untouched and its recorded limits written
 * again (they may have been reset while the agent was down); nothing healthy is restarted,
 * signalled or stopped. Whether a project with an empty group was stopped for lack of room (and so
 * waits for a restore) is remembered in the state dir.
 *
 * Escapes (docs/reliability.md, "Processes that leave their project"): a started project
 * runs in its own cgroup namespace rooted at its group (spawnInto's cgroupNamespace), and
 * the registry remembers every process it started or adopted by pid AND start time
 * (agent/common/proc.ts), in the state dir. After a stop, any of them, or of their
 * session, still alive outside the group is `escaped`: named, killed, reported.
 */
import type { ChildProcess } from 'node:child_process';
import { promises as fsp, openSync, closeSync } from 'node:fs';
import * as path from 'node:path';
import type { CgroupAdapter, Limits } from '../../cgroup-adapter/types';
import { cgroupNamespaceSupport, spawnInto } from '../../cgroup-adapter/spawn';
import { systemClock } from '../common/clock';
import { Journal } from '../common/journal';
import { NestError, isNestError } from '../common/errors';
import { lookupUser } from '../common/nss';
import type { Logger } from '../common/log';
import type { ProjectLimits } from '../broker/types';
import type { GuestConfig, ProjectConfig } from './config';
import type { ProjectNoticeBoard } from './project-notices';
import { knownNow, sessionMembers, stillAlive, type KnownProcess } from '../common/proc';

export type ProjectState = 'running' | 'stopped' | 'starting' | 'stopping' | 'failed';

export interface ProjectRecord {
  /** Stopped by a notice for lack of room: a restore may start it again. */
  stoppedForRoom: boolean;
  /**
   * Stopped by `nestctl --guest stop`: stays stopped (across agent restarts, restores and
   * its restart policy) until `nestctl --guest start`.
   */
  stoppedByOperator?: boolean;
  /** The limits last applied (what `before` is in the next outcome). */
  limits: ProjectLimits;
  /**
   * The processes the agent started or adopted for the project (pid + start time), the
   * newest MAX_KNOWN: what an escape is looked for from.
   */
  processes?: KnownProcess[];
}

/** Processes remembered per project (each start adds one; adoptions add theirs). */
const MAX_KNOWN = 64;
/** Rounds of "find the escaped, SIGKILL them" (each round catches forks of the last). */
const ESCAPE_KILL_ROUNDS = 5;
const ESCAPE_KILL_WAIT_MS = 5_000;
/** How long a process between leaving its cgroup and becoming a zombie is given. */
const EXITING_GRACE_MS = 100;

/** A process of a project found alive outside its group: where it is missing from. */
export interface EscapedProcess extends KnownProcess {
  /** Hierarchies it left (`unified`, or v1 mounts such as `memory`). */
  hierarchies: string[];
}

export const CPU_PERIOD_US = 100_000;

/** Project names are unique (config-cross.ts refuses a duplicate). */
function indexByName(cfg: GuestConfig): Map<string, ProjectConfig> {
  return new Map(cfg.projects.map((p) => [p.name, p]));
}

export class ProjectRegistry {
  private readonly state: Journal<Record<string, ProjectRecord>>;
  private records: Record<string, ProjectRecord> = {};
  private readonly transient = new Map<string, ProjectState>();
  private readonly children = new Map<string, ChildProcess>();
  /** Whether projects start in a cgroup namespace of their own (probed at init). */
  private cgroupNamespace = false;
  /**
   * The config's projects by name: `config()` and `group()` are called for every project
   * several times a notice, and a search of the list each time made a 500-project
   * reclaim spend ~25 ms in it alone (docs/performance.md, "Third round").
   */
  private byName: Map<string, ProjectConfig>;

  constructor(
    private cfg: GuestConfig,
    private readonly adapter: CgroupAdapter,
    private readonly board: ProjectNoticeBoard,
    private readonly log: Logger,
  ) {
    this.state = new Journal(path.join(cfg.stateDir, 'agent'));
    this.byName = indexByName(cfg);
  }

  /** A reload's new config (agent/guest/reload.ts): projects added, removed or changed. */
  setConfig(cfg: GuestConfig): void {
    this.cfg = cfg;
    this.byName = indexByName(cfg);
  }

  get configs(): readonly ProjectConfig[] {
    return this.cfg.projects;
  }

  config(name: string): ProjectConfig {
    const p = this.byName.get(name);
    if (!p) throw new NestError('PROJECT_UNKNOWN', `no project named ${JSON.stringify(name)}`);
    return p;
  }

  group(name: string): string {
    const p = this.config(name);
    return p.adopt && 'cgroup' in p.adopt ? p.adopt.cgroup : `projects/${name}`;
  }

  limits(name: string): ProjectLimits {
    return this.records[name]?.limits ?? initialLimits(this.config(name));
  }

  stoppedForRoom(name: string): boolean {
    return this.records[name]?.stoppedForRoom ?? false;
  }

  stoppedByOperator(name: string): boolean {
    return this.records[name]?.stoppedByOperator ?? false;
  }

  /** Told of every start and of every exit of a process the registry started (supervisor.ts). */
  hooks: {
    started?: (name: string) => void;
    exited?: (name: string, code: number | null, signal: string | null) => void;
  } = {};

  /**
   * The group's processes now: through `fastPids` (the usage sampler's open cgroup.procs,
   * one pread) where set, else through the adapter (a thread-pool read). Throws for a
   * group that is gone, either way.
   */
  async pids(name: string): Promise<number[]> {
    const group = this.group(name);
    return this.fastPids?.(group) ?? this.adapter.pids(group);
  }

  /** Set once by the agent: the sampler's synchronous read (null: not available here). */
  fastPids?: (group: string) => number[] | null;

  /** A project's state from processes already read (`pids`), so nothing is read twice. */
  stateFrom(name: string, pids: readonly number[]): ProjectState {
    return this.transient.get(name) ?? (pids.length > 0 ? 'running' : 'stopped');
  }

  async stateOf(name: string): Promise<ProjectState> {
    const t = this.transient.get(name);
    if (t) return t;
    return this.stateFrom(name, await this.pids(name));
  }

  /**
   * Brings every configured project up: re-adopts running ones (processes untouched, recorded
   * limits re-applied), creates and starts the others. Called once at agent start.
   */
  async init(): Promise<void> {
    await this.state.init();
    this.records = (await this.state.get('projects')) ?? {};
    const ns = cgroupNamespaceSupport();
    this.cgroupNamespace = ns.ok;
    if (!ns.ok)
      this.log.warn(
        { reason: ns.reason },
        'projects start without a cgroup namespace of their own: an escape is only caught after a stop (docs/reliability.md)',
      );
    for (const p of this.cfg.projects) await this.bringUp(p);
    await this.save();
  }

  /**
   * One project brought up, as at start: re-adopted with its recorded limits, taken over,
   * or created and started. Also a project a reload adds (agent/guest/reload.ts). The
   * caller saves the records.
   */
  async bringUp(p: ProjectConfig): Promise<void> {
    const group = this.group(p.name);
    const log = this.log.child({ project: p.name });
    if (p.command && p.command.user === undefined)
      // Root can write its pids into any group of any hierarchy it can see, and leave the
      // project's limits (docs/reliability.md, "Processes that leave their project").
      log.warn(
        { field: `projects[name=${p.name}].command.user` },
        'project has no command.user and runs as root: it could move its processes out of its cgroup; give it a user of its own',
      );
    await this.board.prepare(p.name, await ownerOf(p));
    const exists = await this.adapter.exists(group);
    const running = exists && (await this.adapter.pids(group)).length > 0;
    const known = this.records[p.name];
    if (running && known) {
      // Ours from before a restart: re-adopted with its processes untouched (nothing is
      // restarted or signalled). Its recorded limits are written again, because the
      // kernel may no longer hold them: on a v2 guest, systemd's ExecStopPost
      // (nestbroker-guest-release, docs/install.md) turns the subtree's controllers off
      // when the agent stops, and turning them back on starts every project at
      // memory.max "max" (cgroup-v2.rst, "Controlling Controllers"). Writing the same
      // value again is harmless where they survived.
      try {
        await this.adapter.setLimits(group, toAdapterLimits(known.limits, p));
      } catch (err) {
        // A limit the kernel refuses now (v1 memory.limit_in_bytes below usage: EBUSY) must
        // not keep the agent, and every other project, from starting; the next notice
        // writes the project's limits again.
        log.error({ group, err, limits: known.limits }, 'could not re-apply recorded limits');
        return;
      }
      log.info(
        { group, limits: known.limits },
        're-adopted a running project; its recorded limits re-applied',
      );
      return;
    }
    if (running) {
      // Seen for the first time with processes in it (adopt.cgroup): taken over, and
      // from now on it lives under our limits.
      const rec: ProjectRecord = {
        stoppedForRoom: false,
        limits: initialLimits(p),
        processes: knownOf(await this.adapter.pids(group)),
      };
      this.records[p.name] = rec;
      await this.adapter.setLimits(group, toAdapterLimits(rec.limits, p));
      log.info({ group }, 'took over a running cgroup');
      return;
    }
    if (!exists) await this.adapter.create(group);
    const rec = (this.records[p.name] ??= { stoppedForRoom: false, limits: initialLimits(p) });
    await this.adapter.setLimits(group, toAdapterLimits(rec.limits, p));
    if (rec.stoppedByOperator) {
      log.info('stopped by an operator; stays stopped until nestctl --guest start');
      return;
    }
    if (rec.stoppedForRoom) {
      log.info('stopped for lack of room; waits for a restore');
      return;
    }
    if (p.command) await this.start(p.name);
    else if (p.adopt && 'pids' in p.adopt) await this.adoptPids(p.name, p.adopt.pids);
  }

  /** A project a reload removed, once stopped: its record goes (and with it its limits). */
  async forget(name: string): Promise<void> {
    delete this.records[name];
    this.transient.delete(name);
    this.children.delete(name);
    await this.save();
  }

  /**
   * Steps of one notice run in parallel and share this record: the journal's group commit
   * (common/journal.ts) turns their saves into one write of the record as it is by then,
   * instead of one fsync'd rewrite of every project's record per project
   * (docs/performance.md).
   */
  save(): Promise<void> {
    return this.state.put('projects', this.records);
  }

  /** Writes new limits to the kernel (in the safe order) and records them. */
  async applyLimits(name: string, limits: ProjectLimits): Promise<void> {
    await this.writeLimits(name, limits);
    this.records[name] = { ...(this.records[name] ?? { stoppedForRoom: false }), limits };
    await this.save();
  }

  /**
   * Writes limits to the kernel only, for an intermediate step whose record would be
   * overwritten moments later (a shrink's memory.high before its memory.max): a notice
   * resumed after a crash re-applies its step from the plan, not from this record.
   */
  async writeLimits(
    name: string,
    limits: ProjectLimits,
    which: 'all' | 'but-memory-max' = 'all',
  ): Promise<void> {
    const l = toAdapterLimits(limits, this.config(name));
    if (which === 'but-memory-max' && l.memory) delete l.memory.max;
    await this.adapter.setLimits(this.group(name), l);
  }

  /**
   * The last write of a shrink: memory.max alone (everything else was written by
   * writeLimits(…, 'but-memory-max') before usage came down), and the record, once.
   */
  async applyMemoryMax(name: string, limits: ProjectLimits): Promise<void> {
    await this.adapter.setLimits(this.group(name), { memory: { max: limits.memoryMax } });
    this.records[name] = { ...(this.records[name] ?? { stoppedForRoom: false }), limits };
    await this.save();
  }

  async setRecord(name: string, patch: Partial<ProjectRecord>): Promise<void> {
    this.records[name] = {
      ...(this.records[name] ?? { stoppedForRoom: false, limits: this.limits(name) }),
      ...patch,
    };
    await this.save();
  }

  /** A state set while the agent acts on the project (starting, stopping), if any. */
  transientState(name: string): ProjectState | undefined {
    return this.transient.get(name);
  }

  setTransient(name: string, s: ProjectState | undefined): void {
    if (s) this.transient.set(name, s);
    else this.transient.delete(name);
  }

  /** Starts a command project inside its cgroup. */
  async start(name: string, log: Logger = this.log): Promise<void> {
    const p = this.config(name);
    if (!p.command)
      throw new NestError(
        'PROJECT_UNKNOWN',
        `project ${name} is adopted, not started by the agent: nothing to start`,
      );
    const group = this.group(name);
    if (!(await this.adapter.exists(group))) await this.adapter.create(group);
    const owner = await ownerOf(p);
    const out = path.join(this.board.dir(name), 'output.log');
    await fsp.mkdir(path.dirname(out), { recursive: true });
    // The project's output goes to a file, not to a pipe to us: it must outlive the agent.
    const fd = openSync(out, 'a', 0o640);
    try {
      const child = await spawnInto(
        this.adapter,
        group,
        p.command.argv[0],
        p.command.argv.slice(1),
        {
          env: {
            PATH: '/usr/sbin:/usr/bin:/sbin:/bin',
            ...p.command.env,
            ...this.projectEnv(name),
          },
          cwd: p.command.cwd,
          uid: owner?.uid,
          gid: owner?.gid,
          stdio: ['ignore', fd, fd],
          // Its own session: a Ctrl-C at the agent's terminal is not the project's; and
          // its forks carry the session's id, which finds those that escape.
          detached: true,
          cgroupNamespace: this.cgroupNamespace,
        },
      );
      // The shell that execs the program keeps its pid and start time: this is the project.
      const known = child.pid === undefined ? undefined : knownNow(child.pid);
      if (known) this.remember(name, [known]);
      child.on('exit', (code, signal) => {
        log.info({ project: name, code, signal }, 'project process exited');
        this.hooks.exited?.(name, code, signal);
      });
      child.on('error', (err) => log.warn({ project: name, err }, 'project process error'));
      child.unref();
      this.children.set(name, child);
      // Told before anything is awaited: its exit cannot be seen before its start.
      this.hooks.started?.(name);
      log.info({ project: name, pid: child.pid, group }, 'project started');
    } finally {
      closeSync(fd);
    }
    await this.setRecord(name, { stoppedForRoom: false });
  }

  async adoptPids(name: string, pids: number[]): Promise<void> {
    const group = this.group(name);
    for (const pid of pids) {
      try {
        const known = knownNow(pid);
        await this.adapter.movePid(group, pid);
        if (known) this.remember(name, [known]);
      } catch (err) {
        if ((err as { code?: string }).code === 'ESRCH') {
          this.log.warn({ project: name, pid }, 'pid to adopt is gone');
          continue;
        }
        throw err;
      }
    }
  }

  /** Adds processes to those the project is known by (kept in the record, saved later). */
  private remember(name: string, procs: KnownProcess[]): void {
    const rec = (this.records[name] ??= {
      stoppedForRoom: false,
      limits: initialLimits(this.config(name)),
    });
    const seen = new Set((rec.processes ?? []).map((k) => `${k.pid}/${k.start}`));
    const next = [...(rec.processes ?? [])];
    for (const k of procs) if (!seen.has(`${k.pid}/${k.start}`)) next.push(k);
    rec.processes = next.slice(-MAX_KNOWN);
  }

  /**
   * Processes of the project alive outside its group: those it started or adopted, and
   * their sessions' members, that the kernel does not list in the group's subtree in
   * some hierarchy. After a stop (the group empty) every one still alive is outside.
   */
  async escaped(name: string, notBefore?: number): Promise<EscapedProcess[]> {
    const group = this.group(name);
    const candidates = new Map<number, KnownProcess>();
    for (const k of this.records[name]?.processes ?? []) {
      if (stillAlive(k)) candidates.set(k.pid, k);
      for (const m of sessionMembers(k, undefined, notBefore)) candidates.set(m.pid, m);
    }
    if (candidates.size === 0 || !this.adapter.outside) return [];
    const outside = await this.adapter.outside(group, [...candidates.keys()]);
    const out: EscapedProcess[] = [];
    for (const [pid, hierarchies] of outside) {
      const k = candidates.get(pid)!;
      // Exited since (the pid is in no cgroup.procs): not an escape.
      if (stillAlive(k)) out.push({ ...k, hierarchies });
    }
    return out.sort((a, b) => a.pid - b.pid);
  }

  /**
   * Finds the project's escaped processes and SIGKILLs each (its start time checked just
   * before), until none is left or ESCAPE_KILL_ROUNDS rounds have passed (an escapee that
   * forks); returns every one it found. There is no group to kill them through: each is
   * signalled by pid, a window of microseconds between the check and the kill (a pidfd
   * would close it; Node has none).
   */
  async killEscaped(name: string, log: Logger = this.log): Promise<EscapedProcess[]> {
    const found = new Map<string, EscapedProcess>();
    // The stops of one notice empty their groups within moments of each other, and each
    // comes here: one scan of /proc begun after this group was seen empty serves them all
    // (proc.ts sessionMembers), where each scanning on its own blocked the event loop for
    // every other (2 000 processes: 70–200 ms a scan; docs/performance.md, "Closing the gap to the kernel's floor"). The stops that
    // are through waitEmpty in this turn of the loop reach the scan together.
    const emptyAt = performance.now();
    await new Promise<void>((r) => setImmediate(r));
    for (let round = 0; round < ESCAPE_KILL_ROUNDS; round++) {
      let now = await this.escaped(name, round === 0 ? emptyAt : undefined);
      if (now.length === 0) break;
      if (round === 0) {
        // A process killed with its group leaves cgroup.procs a moment before it is a
        // zombie (cgroup_exit comes before exit_notify in the kernel's do_exit): one that
        // is still alive outside a little later has really left.
        await sleep(EXITING_GRACE_MS);
        const again = new Set((await this.escaped(name)).map((e) => `${e.pid}/${e.start}`));
        now = now.filter((e) => again.has(`${e.pid}/${e.start}`));
        if (now.length === 0) break;
      }
      for (const e of now) {
        found.set(`${e.pid}/${e.start}`, e);
        if (!stillAlive(e)) continue;
        try {
          process.kill(e.pid, 'SIGKILL');
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
        }
      }
      const until = systemClock.monotonic() + ESCAPE_KILL_WAIT_MS;
      while (now.some(stillAlive) && systemClock.monotonic() < until) await sleep(10);
    }
    const all = [...found.values()].sort((a, b) => a.pid - b.pid);
    if (all.length > 0) {
      log.warn(
        { project: name, escaped: all, left: all.filter(stillAlive).map((e) => e.pid) },
        "processes had left the project's cgroup: killed",
      );
    }
    return all;
  }

  /** What a project's processes are told of the agent (docs/guest-agent.md, "Projects"). */
  projectEnv(name: string): Record<string, string> {
    return {
      NESTBROKER_PROJECT: name,
      NESTBROKER_NOTICE_DIR: this.board.dir(name),
      NESTBROKER_PROJECT_SOCKET: this.cfg.projectSocket,
    };
  }

  /** Starts a pre-stop hook inside the project's group (local config only). */
  async spawnHook(name: string, group: string, argv: string[]): Promise<ChildProcess> {
    const p = this.config(name);
    const owner = await ownerOf(p);
    const child = await spawnInto(this.adapter, group, argv[0], argv.slice(1), {
      env: {
        PATH: '/usr/sbin:/usr/bin:/sbin:/bin',
        ...(p.command?.env ?? {}),
        ...this.projectEnv(name),
      },
      cwd: p.command?.cwd,
      uid: owner?.uid,
      gid: owner?.gid,
      stdio: 'ignore',
      cgroupNamespace: this.cgroupNamespace,
    });
    return child;
  }
}

/** The processes behind these pids now (those that exited meanwhile left out). */
function knownOf(pids: readonly number[]): KnownProcess[] {
  return pids.map(knownNow).filter((k): k is KnownProcess => k !== undefined);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Limits as the config asks before any notice: the project's max for both memory files. */
export function initialLimits(p: ProjectConfig): ProjectLimits {
  return { memoryHigh: p.memory.max, memoryMax: p.memory.max, cpuMax: p.cpu.max };
}

/** Our limits → the adapter's (cpu.max in µs over a 100 ms period; cgroup-v2.rst "cpu.max"). */
export function toAdapterLimits(l: ProjectLimits, p: ProjectConfig): Limits {
  const quotaUs =
    l.cpuMax === 'max' ? ('max' as const) : Math.max(1000, Math.round(l.cpuMax * CPU_PERIOD_US));
  const out: Limits = {
    memory: { high: l.memoryHigh, max: l.memoryMax },
    cpu: { max: { quotaUs, periodUs: CPU_PERIOD_US }, weight: p.cpu.weight },
  };
  if (l.cpuset !== undefined) out.cpus = l.cpuset;
  if (p.pidsMax !== undefined) out.pidsMax = p.pidsMax;
  return out;
}

/**
 * A config user (name or uid) → uid/gid through NSS (agent/common/nss.ts, so directory
 * users are found too). A uid with no entry runs as that uid and the same gid.
 */
export async function ownerOf(p: ProjectConfig): Promise<{ uid: number; gid: number } | undefined> {
  const user = p.command?.user;
  if (user === undefined) return undefined;
  try {
    const u = lookupUser(user, `projects[name=${p.name}].command.user`);
    return { uid: u.uid, gid: u.gid };
  } catch (err) {
    if (typeof user === 'number' && isNestError(err, 'CONFIG_INVALID'))
      return { uid: user, gid: user };
    throw err;
  }
}
