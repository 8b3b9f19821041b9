/**
 * The guest config's schema (docs/config-guest.md): `.strict()` zod objects whose fields
 * are the single-value checks of agent/guest/config-values.ts, the list of every key it
 * knows, and the normalisation of what it parsed into a GuestConfig.
 */
import { z } from 'zod';
import type { Problem } from '../common/errors';
import { parseCpus, parseDuration, parseSize } from '../common/units';
import { dflt, field, opt, schemaKeys } from '../common/config-check';
import {
  LOG_LEVELS,
  type AdoptConfig,
  type GuestConfig,
  type ProjectConfig,
  type UpstreamConfig,
} from './config-types';
import { GUEST_DEFAULTS, PID_MAX_LIMIT } from './config-defaults';
import {
  NOT_STOPPING,
  UNCATCHABLE,
  checkAbsolutePath,
  checkArg,
  checkBool,
  checkCgroupRoot,
  checkCpuMax,
  checkEnvValue,
  checkGroup,
  checkHost,
  checkInt,
  checkMemoryMax,
  checkName,
  checkPidsMax,
  checkPositiveDuration,
  checkRelativeCgroupPath,
  checkRestartPolicy,
  checkSignal,
  checkSocketPath,
  checkUsageInterval,
  checkUser,
  val,
} from './config-values';

// ---------------------------------------------------------------------------------------
// The schema: shapes and single values
// ---------------------------------------------------------------------------------------

export const argv = z.array(field(checkArg)).min(1, 'must have at least the program').max(1024);

const commandSchema = z
  .object({
    argv,
    env: z.record(z.unknown()).default({}),
    cwd: opt(checkAbsolutePath),
    user: opt(checkUser),
  })
  .strict();

const adoptSchema = z
  .object({
    cgroup: opt(checkRelativeCgroupPath),
    pids: z
      .array(field(checkInt(2, PID_MAX_LIMIT, 'a pid')))
      .min(1)
      .max(4096)
      .optional(),
  })
  .strict();

export const D = GUEST_DEFAULTS;

const projectSchema = z
  .object({
    name: field(checkName),
    priority: field(checkInt(-1_000_000, 1_000_000)),
    memory: z
      .object({
        min: dflt(parseSize, D.project.memory.min as number),
        max: dflt(checkMemoryMax, D.project.memory.max as number | 'max'),
      })
      .strict()
      .default({}),
    cpu: z
      .object({
        min: dflt(parseCpus, D.project.cpu.min as number),
        max: dflt(checkCpuMax, D.project.cpu.max as number | 'max'),
        weight: dflt(checkInt(1, 10_000), D.project.cpu.weight),
      })
      .strict()
      .default({}),
    stop: z
      .object({
        signal: dflt((v) => checkSignal(v, NOT_STOPPING), D.project.stop.signal),
        gracePeriod: dflt(parseDuration, D.project.stop.gracePeriodMs),
        preStop: z
          .object({
            command: argv,
            timeout: dflt(checkPositiveDuration, D.project.preStopTimeoutMs),
          })
          .strict()
          .optional(),
      })
      .strict()
      .default({}),
    notify: z
      .object({ signal: field((v) => checkSignal(v, UNCATCHABLE)) })
      .strict()
      .optional(),
    restartOnRestore: opt(checkBool),
    // `restart: on-failure`, or the mapping with the backoff.
    restart: z
      .preprocess(
        (v) => (typeof v === 'string' || typeof v === 'boolean' ? { policy: v } : v),
        z
          .object({
            policy: dflt(checkRestartPolicy, D.project.restart.policy),
            delay: dflt(parseDuration, D.project.restart.delayMs),
            maxDelay: opt(parseDuration),
            burst: dflt(checkInt(1, 1000), D.project.restart.burst),
            interval: dflt(checkPositiveDuration, D.project.restart.intervalMs),
          })
          .strict(),
      )
      .optional(),
    command: commandSchema.optional(),
    adopt: adoptSchema.optional(),
    pidsMax: opt(checkPidsMax),
  })
  .strict();

const resourcesSchema = (what: string, dCpus?: number, dMem?: number) =>
  z
    .object({
      cpus: dCpus === undefined ? field(parseCpus) : dflt(parseCpus, dCpus),
      memory: dMem === undefined ? field(parseSize) : dflt(parseSize, dMem),
    })
    .strict()
    .describe(what);

const upstreamSchema = z.discriminatedUnion('transport', [
  z
    .object({
      transport: z.literal('virtio-serial'),
      path: dflt(checkAbsolutePath, D.upstream.path),
    })
    .strict(),
  z.object({ transport: z.literal('unix'), path: field(checkSocketPath) }).strict(),
  z
    .object({
      transport: z.literal('tls'),
      listen: z
        .object({ host: field(checkHost), port: field(checkInt(1, 65_535, 'a port')) })
        .strict(),
      tls: z
        .object({
          cert: field(checkAbsolutePath),
          key: field(checkAbsolutePath),
          ca: field(checkAbsolutePath),
        })
        .strict(),
    })
    .strict(),
  z.object({ transport: z.literal('none') }).strict(),
]);

export const guestSchema = z
  .object({
    guest: field(checkName),
    stateDir: dflt(checkAbsolutePath, D.stateDir),
    runDir: dflt(checkAbsolutePath, D.runDir),
    socket: dflt(checkSocketPath, D.socket),
    socketGroup: dflt(checkGroup, D.socketGroup as string | number),
    projectSocket: dflt(checkSocketPath, D.projectSocket),
    cgroup: z
      .object({
        root: dflt(checkCgroupRoot, D.cgroup.root),
        driver: z.enum(['auto', 'v2', 'hybrid']).default(D.cgroup.driver),
      })
      .strict()
      .default({}),
    resources: resourcesSchema('resources').optional(),
    reserve: resourcesSchema('reserve', D.reserve.cpus, D.reserve.memoryBytes).default({}),
    upstream: upstreamSchema.default({ ...D.upstream }),
    usageInterval: dflt(checkUsageInterval, D.usageIntervalMs),
    limits: z
      .object({
        messagesPerSecond: dflt(
          checkInt(1, 1_000_000, 'messages a second'),
          D.limits.messagesPerSecond,
        ),
        messageBurst: dflt(checkInt(1, 1_000_000, 'messages'), D.limits.messageBurst),
        pendingNotices: dflt(checkInt(1, 100_000, 'notices'), D.limits.pendingNotices),
      })
      .strict()
      .default({}),
    metrics: z
      .object({
        host: field(checkHost),
        port: field(checkInt(0, 65_535, 'a port (0: any free one)')),
      })
      .strict()
      .optional(),
    logLevel: z.enum(LOG_LEVELS).optional(),
    projects: z.array(projectSchema).max(1000, 'must list at most 1000 projects'),
  })
  .strict();

type Parsed = z.output<typeof guestSchema>;

export function normalise(p: Parsed, warnings: Problem[], source: string): GuestConfig {
  const projects: ProjectConfig[] = p.projects.map((q) => {
    const adopt: AdoptConfig | undefined = q.adopt
      ? q.adopt.cgroup !== undefined
        ? { cgroup: q.adopt.cgroup }
        : { pids: q.adopt.pids ?? [] }
      : undefined;
    const out: ProjectConfig = {
      name: q.name,
      priority: q.priority,
      memory: { min: q.memory.min, max: q.memory.max },
      cpu: { min: q.cpu.min, max: q.cpu.max, weight: q.cpu.weight },
      stop: {
        signal: q.stop.signal,
        gracePeriodMs: q.stop.gracePeriod,
        ...(q.stop.preStop
          ? { preStop: { command: q.stop.preStop.command, timeoutMs: q.stop.preStop.timeout } }
          : {}),
      },
      restartOnRestore:
        q.restartOnRestore ??
        (adopt ? D.project.restartOnRestoreAdopt : D.project.restartOnRestoreCommand),
      restart: q.restart
        ? {
            policy: q.restart.policy,
            delayMs: q.restart.delay,
            maxDelayMs: q.restart.maxDelay ?? q.restart.delay,
            burst: q.restart.burst,
            intervalMs: q.restart.interval,
          }
        : { ...D.project.restart, maxDelayMs: D.project.restart.delayMs },
    };
    if (q.notify) out.notify = { signal: q.notify.signal };
    if (q.command) {
      const env: Record<string, string> = {};
      for (const [k, v] of Object.entries(q.command.env)) env[k] = val(checkEnvValue(v)) ?? '';
      out.command = { argv: q.command.argv, env };
      if (q.command.cwd !== undefined) out.command.cwd = q.command.cwd;
      if (q.command.user !== undefined) out.command.user = q.command.user;
    }
    if (adopt) out.adopt = adopt;
    if (q.pidsMax !== undefined) out.pidsMax = q.pidsMax;
    return out;
  });
  const cfg: GuestConfig = {
    guest: p.guest,
    stateDir: p.stateDir,
    runDir: p.runDir,
    socket: p.socket,
    socketGroup: p.socketGroup,
    projectSocket: p.projectSocket,
    cgroup: { root: p.cgroup.root, driver: p.cgroup.driver },
    reserve: { cpus: p.reserve.cpus, memoryBytes: p.reserve.memory },
    upstream: p.upstream as UpstreamConfig,
    usageIntervalMs: p.usageInterval,
    limits: {
      messagesPerSecond: p.limits.messagesPerSecond,
      messageBurst: p.limits.messageBurst,
      pendingNotices: p.limits.pendingNotices,
    },
    projects,
    warnings,
    source,
  };
  if (p.resources) cfg.resources = { cpus: p.resources.cpus, memoryBytes: p.resources.memory };
  if (p.metrics) cfg.metrics = { host: p.metrics.host, port: p.metrics.port };
  if (p.logLevel) cfg.logLevel = p.logLevel;
  return cfg;
}

/**
 * Every key the schema knows, as dotted paths (`projects[].memory.min`): the docs table
 * has one row for each (a test keeps them in step).
 */
export function configKeys(): string[] {
  return schemaKeys(guestSchema);
}
