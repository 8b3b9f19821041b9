/**
 * A reload of the guest agent's config (SIGHUP, `systemctl reload`, `nestctl --guest
 * reload`; docs/config-guest.md, "Reload"). The new file is validated like at start; an
 * invalid one is refused with every problem and the config in force stays. A valid one is
 * compared with the config in force and what can change live is applied, each change
 * logged:
 *
 *   project removed   stopped gracefully (pre-stop hook, stop signal, grace, kill), its
 *                     cgroup removed, its record forgotten
 *   project added     its cgroup made, its limits written, started (or adopted)
 *   project changed   limits (memory, cpu, weight, pidsMax) rewritten through the
 *                     cgroup adapter; priority, stop, notify, restartOnRestore used from
 *                     the next notice on; a new command from the project's next start
 *   reserve, logLevel in force at once
 *
 * What the agent bound at start (sockets, directories, the cgroup root, the upstream
 * channel, metrics, limits, usageInterval, guest, resources) keeps its old value, named
 * in a warning: a restart applies it. The reload runs in the notice queue
 * (NoticeBook.exclusive): no notice is carried out while the projects change.
 *
 * diffGuestConfig is pure; applyGuestReload does the work.
 */
import type { Problem } from '../common/errors';
import type { Logger } from '../common/log';
import type { ProjectLimits } from '../broker/types';
import { deepFreeze, minimumsAbove, type GuestConfig, type ProjectConfig } from './config';
import { initialLimits } from './projects';
import { stopProject, type StopResult } from './stopper';
import { systemClock } from '../common/clock';
import type { GuestAgent } from './agent';

/** Top-level keys the agent bound at start: a reload names a change of them and keeps the old. */
export const RESTART_KEYS = [
  'guest',
  'stateDir',
  'runDir',
  'socket',
  'socketGroup',
  'projectSocket',
  'cgroup',
  'upstream',
  'usageIntervalMs',
  'limits',
  'metrics',
  'resources',
] as const satisfies readonly (keyof GuestConfig)[];

/** The config file's name of a normalised key, for the warning. */
const FILE_KEY: Partial<Record<keyof GuestConfig, string>> = { usageIntervalMs: 'usageInterval' };

/** Project fields whose change rewrites the project's cgroup limits. */
const LIMIT_FIELDS = ['memory', 'cpu', 'pidsMax'] as const;
/** Project fields used as they are from the next notice (or start) on. */
const LATER_FIELDS = ['priority', 'stop', 'notify', 'restartOnRestore', 'command'] as const;

export interface ProjectChange {
  name: string;
  /** The fields that differ, as the config names them (`memory`, `priority`…). */
  fields: string[];
  /** Whether the kernel's limits must be written again. */
  limits: boolean;
  before: ProjectConfig;
  after: ProjectConfig;
}

export interface GuestConfigDiff {
  added: ProjectConfig[];
  removed: ProjectConfig[];
  changed: ProjectChange[];
  /** Other live changes (`reserve`, `logLevel`). */
  live: { field: string; before: unknown; after: unknown }[];
  /** Changed keys that need a restart; their old value stays in force. */
  restart: { field: string; before: unknown; after: unknown }[];
}

const same = (a: unknown, b: unknown): boolean => JSON.stringify(a) === JSON.stringify(b);

/**
 * What changed from `before` to `after`. A project whose `adopt` changed is another
 * group: it counts as removed and added.
 */
export function diffGuestConfig(before: GuestConfig, after: GuestConfig): GuestConfigDiff {
  const d: GuestConfigDiff = { added: [], removed: [], changed: [], live: [], restart: [] };
  for (const k of RESTART_KEYS)
    if (!same(before[k], after[k]))
      d.restart.push({ field: FILE_KEY[k] ?? k, before: before[k], after: after[k] });
  for (const k of ['reserve', 'logLevel'] as const)
    if (!same(before[k], after[k])) d.live.push({ field: k, before: before[k], after: after[k] });
  const old = new Map(before.projects.map((p) => [p.name, p]));
  const next = new Map(after.projects.map((p) => [p.name, p]));
  for (const p of before.projects) {
    const n = next.get(p.name);
    if (!n || !same(p.adopt, n.adopt)) d.removed.push(p);
  }
  for (const n of after.projects) {
    const p = old.get(n.name);
    if (!p || !same(p.adopt, n.adopt)) {
      d.added.push(n);
      continue;
    }
    const fields = [...LIMIT_FIELDS, ...LATER_FIELDS].filter((f) => !same(p[f], n[f]));
    if (fields.length > 0)
      d.changed.push({
        name: n.name,
        fields,
        limits: LIMIT_FIELDS.some((f) => fields.includes(f)),
        before: p,
        after: n,
      });
  }
  return d;
}

/**
 * The config put in force: the new one, with the old value of every key that needs a
 * restart (what the agent bound at start is what it keeps using).
 */
export function effectiveConfig(before: GuestConfig, after: GuestConfig): GuestConfig {
  const out = { ...after } as Record<string, unknown>;
  for (const k of RESTART_KEYS) {
    if (before[k] === undefined) delete out[k];
    else out[k] = before[k];
  }
  return deepFreeze(out as unknown as GuestConfig);
}

/**
 * A project's limits after its config changed. Not shrunk by a notice (its limits are
 * still the old config's): the new config's. Shrunk: it stays shrunk, and never above
 * the new maximum.
 */
export function limitsAfterChange(
  recorded: ProjectLimits,
  before: ProjectConfig,
  after: ProjectConfig,
): ProjectLimits {
  if (same(recorded, initialLimits(before))) return initialLimits(after);
  const min = <T extends number | 'max'>(a: T, b: T): T =>
    a === 'max' ? b : b === 'max' ? a : (Math.min(a, b) as number as T);
  const out: ProjectLimits = {
    memoryHigh: min(recorded.memoryHigh, after.memory.max),
    memoryMax: min(recorded.memoryMax, after.memory.max),
    cpuMax: min(recorded.cpuMax, after.cpu.max),
  };
  if (recorded.cpuset !== undefined) out.cpuset = recorded.cpuset;
  return out;
}

export interface ReloadReport {
  source: string;
  added: string[];
  removed: { name: string; exit: StopResult['exit'] | 'failed'; reason: string }[];
  changed: { name: string; fields: string[]; limits?: ProjectLimits; error?: string }[];
  live: string[];
  /** Keys changed in the file that keep their old value until a restart. */
  restartNeeded: string[];
  /** Steps that failed (the rest was applied). */
  errors: Problem[];
}

/** Applies a valid new config to a running agent, in its notice queue. */
export function applyGuestReload(
  agent: GuestAgent,
  next: GuestConfig,
  log: Logger,
  setLevel?: (level: string) => void,
): Promise<ReloadReport> {
  return agent.book.exclusive(() => applyNow(agent, next, log, setLevel));
}

async function applyNow(
  agent: GuestAgent,
  next: GuestConfig,
  log: Logger,
  setLevel?: (level: string) => void,
): Promise<ReloadReport> {
  const before = agent.cfg;
  const d = diffGuestConfig(before, next);
  const report: ReloadReport = {
    source: next.source,
    added: [],
    removed: [],
    changed: [],
    live: [],
    restartNeeded: d.restart.map((r) => r.field),
    errors: [],
  };
  for (const r of d.restart)
    log.warn(
      { field: r.field, value: r.after, inForce: r.before },
      `reload: ${r.field} cannot change while the agent runs; the old value stays until a restart`,
    );

  // 1. Removed projects first (their room is free for the rest), with the old config.
  for (const p of d.removed) {
    const plog = log.child({ project: p.name });
    try {
      const r = await stopRemoved(agent, p, plog);
      report.removed.push({ name: p.name, exit: r.exit, reason: r.reason });
      plog.info({ exit: r.exit, ms: r.ms }, 'reload: project removed (stopped, cgroup removed)');
    } catch (err) {
      report.removed.push({ name: p.name, exit: 'failed', reason: String(err) });
      report.errors.push({
        field: `projects[name=${p.name}]`,
        value: p.name,
        message: `could not be removed: ${String(err)}`,
      });
      plog.error(
        { err },
        'reload: project removed from the config could not be stopped or removed',
      );
    }
  }

  // 2. The new config in force (the keys that need a restart keep their old values).
  const cfg = effectiveConfig(before, next);
  agent.cfg = cfg;
  agent.registry.setConfig(cfg);
  agent.broker.setConfig(cfg);
  agent.supervisor.setConfig(cfg);
  for (const l of d.live) {
    if (l.field === 'logLevel')
      setLevel?.(String(l.after ?? process.env.NESTBROKER_LOG_LEVEL ?? 'info'));
    report.live.push(l.field);
    log.info({ field: l.field, before: l.before, after: l.after }, `reload: ${l.field} changed`);
  }

  // 3. Changed projects: limits written again where they changed.
  for (const c of d.changed) {
    const plog = log.child({ project: c.name });
    const row: ReloadReport['changed'][number] = { name: c.name, fields: c.fields };
    report.changed.push(row);
    if (c.limits) {
      const limits = limitsAfterChange(agent.registry.limits(c.name), c.before, c.after);
      try {
        await agent.registry.applyLimits(c.name, limits);
        row.limits = limits;
      } catch (err) {
        row.error = String(err);
        report.errors.push({
          field: `projects[name=${c.name}]`,
          value: limits,
          message: `limits could not be written: ${String(err)}`,
        });
        plog.error({ err, limits }, 'reload: the changed limits could not be written');
        continue;
      }
    }
    plog.info(
      { fields: c.fields, ...(row.limits ? { limits: row.limits } : {}) },
      c.limits ? 'reload: project changed; limits rewritten' : 'reload: project changed',
    );
  }

  // 4. Added projects: made and started like at start.
  for (const p of d.added) {
    const plog = log.child({ project: p.name });
    try {
      await agent.registry.bringUp(p);
      await agent.registry.save();
      report.added.push(p.name);
      plog.info({ group: agent.registry.group(p.name) }, 'reload: project added');
    } catch (err) {
      report.errors.push({
        field: `projects[name=${p.name}]`,
        value: p.name,
        message: `could not be started: ${String(err)}`,
      });
      plog.error({ err }, 'reload: project added to the config could not be started');
    }
  }
  for (const w of minimumsAbove(cfg, agent.allocation.current()))
    log.warn({ field: w.field, value: w.value }, w.message);
  for (const w of cfg.warnings) log.warn({ field: w.field, value: w.value }, w.message);
  log.info(
    {
      source: next.source,
      added: report.added,
      removed: report.removed.map((r) => r.name),
      changed: report.changed.map((c) => c.name),
      live: report.live,
      restartNeeded: report.restartNeeded,
      errors: report.errors.length,
    },
    'reload: config applied',
  );
  return report;
}

/**
 * A removed project stopped as a notice would stop it (stopper.ts), its grace bounded by
 * its own config, then its group removed. An adopted project is stopped too: it leaves
 * the agent's care, and its processes would otherwise run on unlimited in a group no one
 * manages.
 */
async function stopRemoved(agent: GuestAgent, p: ProjectConfig, log: Logger): Promise<StopResult> {
  const group = agent.registry.group(p.name);
  agent.registry.setTransient(p.name, 'stopping');
  try {
    const hook = p.stop.preStop?.timeoutMs ?? 0;
    // On the monotonic clock the stopper reads (agent/common/clock.ts): its grace, its hook.
    const deadline = systemClock.monotonic() + hook + p.stop.gracePeriodMs + 5_000;
    const r = (await agent.adapter.exists(group))
      ? await stopProject(group, p.stop, deadline, {
          adapter: agent.adapter,
          spawnHook: (g, argv) => agent.registry.spawnHook(p.name, g, argv),
          // No notice: nothing for the project to answer `done` to.
          waitDone: (signal) =>
            new Promise<boolean>((resolve) =>
              signal.addEventListener('abort', () => resolve(false), { once: true }),
            ),
          readPids: () => agent.usage.pidsNow(group),
          log,
        })
      : {
          exit: 'already-gone' as const,
          ms: 0,
          reason: 'its cgroup was already gone',
          phases: { empty: 0 },
          signalled: 0,
        };
    if (await agent.adapter.exists(group)) await agent.adapter.remove(group);
    await agent.registry.forget(p.name);
    return r;
  } finally {
    agent.registry.setTransient(p.name, undefined);
  }
}
