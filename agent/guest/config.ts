/**
 * The guest agent's local config (`/etc/nestbroker/guest.yaml`, docs/config-guest.md).
 *
 * Validated once at start, with EVERY problem reported together (fastify's
 * initial-config-validation): a zod schema of `.strict()` objects finds shapes, unknown
 * keys and single values; then cross-field checks run on the raw input, so that a bad
 * name and a min above its max in the same project are both reported. The result is fully
 * normalised (bytes and CPUs as numbers, durations in ms) and deeply frozen.
 *
 * Reference: docs/config-guest.md (one row per key), example: examples/guest.yaml.
 */
import { promises as fs } from 'fs';
import { constants as osConstants } from 'os';
import * as path from 'path';
import { z } from 'zod';
import { parseDocument } from 'yaml';
import { NestError, type Problem } from '../common/errors';
import {
  describe,
  parseCpus,
  parseDuration,
  parseSize,
  formatBytes,
  type ParseResult,
} from '../common/units';
import type { Resources } from '../broker/types';

// ---------------------------------------------------------------------------------------
// The normalised config
// ---------------------------------------------------------------------------------------

export type Transport = 'virtio-serial' | 'unix' | 'tls' | 'none';

export type UpstreamConfig =
  | { transport: 'virtio-serial'; path: string }
  | { transport: 'unix'; path: string }
  | {
      transport: 'tls';
      listen: { host: string; port: number };
      tls: { cert: string; key: string; ca: string };
    }
  | { transport: 'none' };

export interface CommandConfig {
  /** argv[0] is an absolute path: nothing is looked up in PATH. */
  argv: string[];
  env: Record<string, string>;
  cwd?: string;
  /** User name or uid. */
  user?: string | number;
}

export type AdoptConfig = { cgroup: string } | { pids: number[] };

/** systemd.service(5) `Restart=` values this agent knows. */
export type RestartPolicy = 'no' | 'on-failure' | 'always';

/**
 * The restart policy of a project whose processes ended on their own, as systemd's
 * (systemd.service(5) Restart=, RestartSec=, RestartMaxDelaySec=; systemd.unit(5)
 * StartLimitBurst=, StartLimitIntervalSec=).
 */
export interface RestartConfig {
  policy: RestartPolicy;
  /** Wait before a restart (RestartSec=). */
  delayMs: number;
  /** Each restart in a row doubles the wait, up to this (RestartMaxDelaySec=). */
  maxDelayMs: number;
  /** More than `burst` starts within `intervalMs`: given up, the project `failed`. */
  burst: number;
  intervalMs: number;
}

export interface ProjectConfig {
  name: string;
  /** Higher keeps longer. */
  priority: number;
  memory: { min: number; max: number | 'max' };
  /** CPUs; `max` 'max' means no bound beyond the guest's allocation. */
  cpu: { min: number; max: number | 'max'; weight: number };
  stop: {
    signal: string;
    gracePeriodMs: number;
    preStop?: { command: string[]; timeoutMs: number };
  };
  notify?: { signal: string };
  restartOnRestore: boolean;
  /** What happens when the project's processes end on their own (agent/guest/supervisor.ts). */
  restart: RestartConfig;
  command?: CommandConfig;
  adopt?: AdoptConfig;
  pidsMax?: number | 'max';
}

export interface GuestConfig {
  guest: string;
  stateDir: string;
  runDir: string;
  socket: string;
  socketGroup: string | number;
  projectSocket: string;
  cgroup: { root: string; driver: 'auto' | 'v2' | 'hybrid' };
  /** The guest's allocation; absent: detected at start. */
  resources?: Resources;
  /** Kept for the OS and the agent; never planned to projects. */
  reserve: Resources;
  upstream: UpstreamConfig;
  usageIntervalMs: number;
  /**
   * docs/reliability.md: per-connection rate limit on the upstream channel; cap on pending
   * notices.
   */
  limits: { messagesPerSecond: number; messageBurst: number; pendingNotices: number };
  /** Prometheus metrics on http://host:port/metrics (agent/guest/metrics.ts); absent: off. */
  metrics?: { host: string; port: number };
  projects: ProjectConfig[];
  /**
   * Things that are allowed but probably not meant (e.g. minimums above the configured
   * allocation); the agent logs them at start.
   */
  warnings: Problem[];
  /** Where this config came from (a file path, or a label for tests). */
  source: string;
}

// ---------------------------------------------------------------------------------------
// Defaults: the one place they live (docs/config-guest.md repeats them; a test checks)
// ---------------------------------------------------------------------------------------

export const GUEST_DEFAULTS = Object.freeze({
  configFile: '/etc/nestbroker/guest.yaml',
  stateDir: '/var/lib/nestbroker/guest',
  runDir: '/run/nestbroker/guest',
  socket: '/run/nestbroker/guest.sock',
  socketGroup: 'root',
  projectSocket: '/run/nestbroker/projects.sock',
  cgroup: Object.freeze({ root: 'self', driver: 'auto' as const }),
  reserve: Object.freeze({ memoryBytes: 64 * 1024 ** 2, cpus: 0 }),
  upstream: Object.freeze({
    transport: 'virtio-serial' as const,
    path: '/dev/virtio-ports/org.nestbroker.0',
  }),
  usageIntervalMs: 1000,
  limits: Object.freeze({ messagesPerSecond: 200, messageBurst: 400, pendingNotices: 64 }),
  project: Object.freeze({
    memory: Object.freeze({ min: 0, max: 'max' as const }),
    cpu: Object.freeze({ min: 0, max: 'max' as const, weight: 100 }),
    stop: Object.freeze({ signal: 'SIGTERM', gracePeriodMs: 30_000 }),
    preStopTimeoutMs: 10_000,
    /** Only for `command` projects: an adopted project has nothing to start again. */
    restartOnRestoreCommand: true,
    restartOnRestoreAdopt: false,
    // systemd's defaults: Restart=no, RestartSec=100ms, StartLimitBurst=5 in 10s.
    restart: Object.freeze({
      policy: 'no' as RestartPolicy,
      delayMs: 100,
      burst: 5,
      intervalMs: 10_000,
    }),
  }),
});

/** Config files larger than this are refused before parsing (a config is a few KiB). */
const MAX_CONFIG_BYTES = 1024 * 1024;
/** sun_path is 108 bytes on Linux, one of them the terminating NUL. */
const MAX_SOCKET_PATH_BYTES = 107;
/** The kernel's smallest cpu.max quota is 1000µs per 100000µs period. */
const MIN_CPU_MAX = 0.01;
/** pid_max cannot exceed 2^22 (PID_MAX_LIMIT on 64-bit). */
const PID_MAX_LIMIT = 4_194_304;

// ---------------------------------------------------------------------------------------
// Single-value checks: each returns a ParseResult whose message names what it received
// ---------------------------------------------------------------------------------------

export const NAME_RE = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

/**
 * Names that would collide with interface files in a cgroup directory (cgroup-v2.rst
 * "Interface Files" and the v1 controllers' files: `cgroup.procs`, `memory.max`, `tasks`).
 */
const RESERVED_NAME_RE =
  /^(cgroup|memory|cpu|cpuset|cpuacct|io|blkio|pids|rdma|hugetlb|misc|freezer|devices|net_cls|net_prio|perf_event)(\.|$)|^(tasks|notify_on_release|release_agent)$/;

function firstNonAscii(s: string): string | undefined {
  for (const ch of s) {
    const cp = ch.codePointAt(0) ?? 0;
    if (cp < 0x20 || cp > 0x7e) return `U+${cp.toString(16).toUpperCase().padStart(4, '0')}`;
  }
  return undefined;
}

/** Project and guest names: the name of a cgroup directory and of a run directory. */
export function checkName(v: unknown): ParseResult<string> {
  if (typeof v !== 'string') return { ok: false, message: `must be a name, got ${describe(v)}` };
  const odd = firstNonAscii(v);
  if (odd)
    return {
      ok: false,
      message: `must be plain lowercase ASCII (a-z 0-9 _ . -), got ${describe(v)} which contains ${odd}`,
    };
  if (v.length > 63)
    return { ok: false, message: `must be at most 63 characters, got ${v.length}: ${describe(v)}` };
  if (!NAME_RE.test(v))
    return {
      ok: false,
      message: `must match ${NAME_RE.source} (start with a letter or digit; no "/"), got ${describe(v)}`,
    };
  if (RESERVED_NAME_RE.test(v))
    return {
      ok: false,
      message: `would collide with a cgroup interface file, got ${describe(v)}`,
    };
  return { ok: true, value: v };
}

/** A cgroup segment made by others (systemd units: `nestbroker-guest.service`, `user@0.service`). */
const CGROUP_SEGMENT_RE = /^[A-Za-z0-9_.@:\\-]{1,255}$/;

/** A path of cgroup directories, relative, that cannot climb out of where it is resolved. */
export function checkRelativeCgroupPath(v: unknown): ParseResult<string> {
  if (typeof v !== 'string')
    return { ok: false, message: `must be a relative cgroup path, got ${describe(v)}` };
  const odd = firstNonAscii(v);
  if (odd) return { ok: false, message: `must be ASCII, got ${describe(v)} which contains ${odd}` };
  if (v.startsWith('/'))
    return { ok: false, message: `must be relative (no leading "/"), got ${describe(v)}` };
  const segs = v.split('/');
  if (v === '' || segs.some((s) => s === ''))
    return { ok: false, message: `must not have empty segments, got ${describe(v)}` };
  for (const s of segs) {
    if (s === '.' || s === '..')
      return { ok: false, message: `must not contain "." or "..", got ${describe(v)}` };
    if (!CGROUP_SEGMENT_RE.test(s))
      return {
        ok: false,
        message: `has a segment ${describe(s)} with characters a cgroup name cannot have`,
      };
    if (RESERVED_NAME_RE.test(s))
      return {
        ok: false,
        message: `has a segment ${describe(s)} that is a cgroup interface file name`,
      };
  }
  return { ok: true, value: v };
}

function checkCgroupRoot(v: unknown): ParseResult<string> {
  return v === 'self' ? { ok: true, value: 'self' } : checkRelativeCgroupPath(v);
}

export function checkAbsolutePath(v: unknown): ParseResult<string> {
  if (typeof v !== 'string')
    return { ok: false, message: `must be an absolute path, got ${describe(v)}` };
  if ([...v].some((ch) => ch.charCodeAt(0) < 0x20 || ch.charCodeAt(0) === 0x7f))
    return { ok: false, message: `must not contain control characters or NUL, got ${describe(v)}` };
  if (!v.startsWith('/')) return { ok: false, message: `must be absolute, got ${describe(v)}` };
  if (v.split('/').includes('..'))
    return { ok: false, message: `must not contain "..", got ${describe(v)}` };
  if (v.length > 4095) return { ok: false, message: `is longer than 4095 bytes` };
  const n = path.posix.normalize(v);
  return { ok: true, value: n.length > 1 && n.endsWith('/') ? n.slice(0, -1) : n };
}

function checkSocketPath(v: unknown): ParseResult<string> {
  const r = checkAbsolutePath(v);
  if (!r.ok) return r;
  const bytes = Buffer.byteLength(r.value);
  if (bytes > MAX_SOCKET_PATH_BYTES)
    return {
      ok: false,
      message: `is ${bytes} bytes; a unix socket path holds at most ${MAX_SOCKET_PATH_BYTES}`,
    };
  return r;
}

const SIGNALS = Object.keys(osConstants.signals);

/** `SIGTERM` or `TERM` → `SIGTERM`; only names this kernel has (os.constants.signals). */
export function checkSignal(v: unknown, refuse: readonly string[] = []): ParseResult<string> {
  if (typeof v !== 'string')
    return { ok: false, message: `must be a signal name like "SIGTERM", got ${describe(v)}` };
  const name = v.toUpperCase().startsWith('SIG') ? v.toUpperCase() : `SIG${v.toUpperCase()}`;
  if (!SIGNALS.includes(name) || v !== v.trim())
    return {
      ok: false,
      message: `is not a signal name (e.g. SIGTERM, SIGINT), got ${describe(v)}`,
    };
  if (refuse.includes(name))
    return { ok: false, message: `cannot be ${name} here (refused: ${refuse.join(', ')})` };
  return { ok: true, value: name };
}

/** Stop signals whose default action does not end a process (signal(7)). */
const NOT_STOPPING = [
  'SIGSTOP',
  'SIGTSTP',
  'SIGTTIN',
  'SIGTTOU',
  'SIGCONT',
  'SIGCHLD',
  'SIGURG',
  'SIGWINCH',
];
/** A notice signal must be one the project can catch. */
const UNCATCHABLE = ['SIGKILL', 'SIGSTOP'];

function checkMemoryMax(v: unknown): ParseResult<number | 'max'> {
  if (v === 'max') return { ok: true, value: 'max' };
  const r = parseSize(v);
  if (!r.ok)
    return {
      ok: false,
      message: `must be bytes, a size like "1GiB", or "max", got ${describe(v)}`,
    };
  if (r.value === 0) return { ok: false, message: `must be above 0 (a limit of 0 is an OOM kill)` };
  return r;
}

function checkCpuMax(v: unknown): ParseResult<number | 'max'> {
  if (v === 'max') return { ok: true, value: 'max' };
  const r = parseCpus(v);
  if (!r.ok)
    return {
      ok: false,
      message: `must be a number of CPUs (e.g. 0.5) or "max", got ${describe(v)}`,
    };
  if (r.value < MIN_CPU_MAX)
    return {
      ok: false,
      message: `must be at least ${MIN_CPU_MAX} CPUs (cpu.max quota ≥ 1000µs), got ${describe(v)}`,
    };
  return r;
}

function checkInt(
  min: number,
  max: number,
  what = 'an integer',
): (v: unknown) => ParseResult<number> {
  return (v) =>
    typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max
      ? { ok: true, value: v }
      : { ok: false, message: `must be ${what} from ${min} to ${max}, got ${describe(v)}` };
}

function checkPidsMax(v: unknown): ParseResult<number | 'max'> {
  return v === 'max' ? { ok: true, value: 'max' } : checkInt(1, PID_MAX_LIMIT, 'a count')(v);
}

function checkBool(v: unknown): ParseResult<boolean> {
  return typeof v === 'boolean'
    ? { ok: true, value: v }
    : { ok: false, message: `must be true or false, got ${describe(v)}` };
}

function checkPositiveDuration(v: unknown): ParseResult<number> {
  const r = parseDuration(v);
  if (!r.ok) return r;
  if (r.value <= 0) return { ok: false, message: `must be above 0, got ${describe(v)}` };
  return r;
}

function checkRestartPolicy(v: unknown): ParseResult<RestartPolicy> {
  // YAML 1.1 readers turn a bare `no` into false: taken as the policy it meant.
  if (v === false) return { ok: true, value: 'no' };
  if (v === 'no' || v === 'on-failure' || v === 'always') return { ok: true, value: v };
  return { ok: false, message: `must be no, on-failure or always, got ${describe(v)}` };
}

function checkUsageInterval(v: unknown): ParseResult<number> {
  const r = parseDuration(v);
  if (!r.ok) return r;
  if (r.value < 100 || r.value > 3_600_000)
    return { ok: false, message: `must be from 100ms to 1h, got ${describe(v)}` };
  return r;
}

const USER_RE = /^[a-z_][a-z0-9_-]{0,31}\$?$/;
function checkUser(v: unknown): ParseResult<string | number> {
  if (typeof v === 'number') return checkInt(0, 0xfffffffe, 'a uid')(v);
  if (typeof v === 'string' && USER_RE.test(v)) return { ok: true, value: v };
  return { ok: false, message: `must be a user name or a uid, got ${describe(v)}` };
}

function checkGroup(v: unknown): ParseResult<string | number> {
  if (typeof v === 'number') return checkInt(0, 0xfffffffe, 'a gid')(v);
  if (typeof v === 'string' && USER_RE.test(v)) return { ok: true, value: v };
  return { ok: false, message: `must be a group name or a gid, got ${describe(v)}` };
}

function checkArg(v: unknown): ParseResult<string> {
  if (typeof v !== 'string') return { ok: false, message: `must be a string, got ${describe(v)}` };
  if (v.includes('\0')) return { ok: false, message: `must not contain NUL, got ${describe(v)}` };
  return { ok: true, value: v };
}

const ENV_KEY_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;
function checkEnvValue(v: unknown): ParseResult<string> {
  // YAML reads `PORT: 8080` as a number; the environment only holds strings.
  if (typeof v === 'number' && Number.isFinite(v)) return { ok: true, value: String(v) };
  if (typeof v === 'boolean') return { ok: true, value: String(v) };
  return checkArg(v);
}

function checkHost(v: unknown): ParseResult<string> {
  if (typeof v === 'string' && /^[A-Za-z0-9.:-]{1,253}$/.test(v)) return { ok: true, value: v };
  return { ok: false, message: `must be an IP address or host name, got ${describe(v)}` };
}

// ---------------------------------------------------------------------------------------
// The schema: shapes and single values
// ---------------------------------------------------------------------------------------

function field<T>(check: (v: unknown) => ParseResult<T>) {
  return z.unknown().transform((v, ctx): T => {
    if (v === undefined) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: 'is required' });
      return z.NEVER;
    }
    const r = check(v);
    if (!r.ok) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: r.message });
      return z.NEVER;
    }
    return r.value;
  });
}

/** An optional field: absent stays absent. */
function opt<T>(check: (v: unknown) => ParseResult<T>) {
  return field(check).optional();
}

/** A field with a default (already normalised: it goes through the same check). */
function dflt<T>(check: (v: unknown) => ParseResult<T>, value: T) {
  return field(check).default(value as unknown);
}

const argv = z.array(field(checkArg)).min(1, 'must have at least the program').max(1024);

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

const D = GUEST_DEFAULTS;

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

const guestSchema = z
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
    projects: z.array(projectSchema).max(1000, 'must list at most 1000 projects'),
  })
  .strict();

// ---------------------------------------------------------------------------------------
// From zod issues to problems
// ---------------------------------------------------------------------------------------

export function fieldPath(p: readonly (string | number)[]): string {
  let s = '';
  for (const k of p) s += typeof k === 'number' ? `[${k}]` : s === '' ? k : `.${k}`;
  return s === '' ? '(top level)' : s;
}

function at(raw: unknown, p: readonly (string | number)[]): unknown {
  let v: unknown = raw;
  for (const k of p) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<string | number, unknown>)[k];
  }
  return v;
}

function typeName(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'a mapping';
  return `${typeof v} ${describe(v)}`;
}

function problemsFromIssues(issues: z.ZodIssue[], raw: unknown): Problem[] {
  const out: Problem[] = [];
  for (const issue of issues) {
    const value = at(raw, issue.path);
    switch (issue.code) {
      case z.ZodIssueCode.unrecognized_keys:
        for (const key of issue.keys) {
          const known = knownKeysAt(raw, issue.path);
          const hint = suggest(key, known);
          out.push({
            field: fieldPath([...issue.path, key]),
            value: at(raw, [...issue.path, key]),
            message: `is not a known key${hint ? ` (did you mean "${hint}"?)` : ''}; known here: ${known.join(', ')}`,
          });
        }
        break;
      case z.ZodIssueCode.invalid_type:
        out.push({
          field: fieldPath(issue.path),
          value,
          message:
            value === undefined
              ? 'is required'
              : `must be ${issue.expected === 'object' ? 'a mapping' : issue.expected === 'array' ? 'a list' : issue.expected}, got ${typeName(value)}`,
        });
        break;
      case z.ZodIssueCode.invalid_union_discriminator:
        out.push({
          field: fieldPath(issue.path),
          value,
          message: `must be one of ${issue.options.map((o) => JSON.stringify(o)).join(', ')}, got ${describe(value)}`,
        });
        break;
      case z.ZodIssueCode.invalid_enum_value:
        out.push({
          field: fieldPath(issue.path),
          value,
          message: `must be one of ${issue.options.map((o) => JSON.stringify(o)).join(', ')}, got ${describe(value)}`,
        });
        break;
      case z.ZodIssueCode.too_small:
      case z.ZodIssueCode.too_big:
        out.push({
          field: fieldPath(issue.path),
          value,
          message:
            issue.type === 'array'
              ? `must have ${issue.code === 'too_small' ? 'at least' : 'at most'} ${issue.code === 'too_small' ? issue.minimum : issue.maximum} entries, got ${Array.isArray(value) ? value.length : describe(value)}`
              : issue.message,
        });
        break;
      default:
        out.push({ field: fieldPath(issue.path), value, message: issue.message });
    }
  }
  return out;
}

/** The keys the schema knows at a path (for "did you mean"). */
function knownKeysAt(raw: unknown, p: readonly (string | number)[]): string[] {
  let schema: z.ZodTypeAny = guestSchema;
  for (const k of p) {
    schema = unwrap(schema);
    if (schema instanceof z.ZodArray) schema = schema.element;
    else if (schema instanceof z.ZodObject) schema = schema.shape[k as string] ?? schema;
    else if (schema instanceof z.ZodDiscriminatedUnion) {
      const t = at(raw, [...p.slice(0, p.indexOf(k)), 'transport']);
      schema = schema.optionsMap.get(t as string)?.shape[k as string] ?? schema;
    }
  }
  schema = unwrap(schema);
  if (schema instanceof z.ZodDiscriminatedUnion) {
    const t = at(raw, [...p, 'transport']);
    const o = schema.optionsMap.get(t as string);
    return o ? Object.keys(o.shape) : [];
  }
  return schema instanceof z.ZodObject ? Object.keys(schema.shape) : [];
}

function unwrap(s: z.ZodTypeAny): z.ZodTypeAny {
  for (;;) {
    if (s instanceof z.ZodOptional || s instanceof z.ZodNullable) s = s.unwrap();
    else if (s instanceof z.ZodDefault) s = s.removeDefault();
    else if (s instanceof z.ZodEffects) s = s.innerType();
    else return s;
  }
}

function suggest(key: string, known: string[]): string | undefined {
  let best: string | undefined;
  let bestD = 3;
  for (const k of known) {
    const d = editDistance(key.toLowerCase(), k.toLowerCase());
    if (d < bestD) {
      bestD = d;
      best = k;
    }
  }
  return best;
}

function editDistance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0];
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = row[j];
      row[j] = Math.min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = cur;
    }
  }
  return row[b.length];
}

// ---------------------------------------------------------------------------------------
// Cross-field checks, on the raw input (so they run even where other fields failed)
// ---------------------------------------------------------------------------------------

function rec(v: unknown): Record<string, unknown> | undefined {
  return v !== null && typeof v === 'object' && !Array.isArray(v)
    ? (v as Record<string, unknown>)
    : undefined;
}

function val<T>(r: ParseResult<T>): T | undefined {
  return r.ok ? r.value : undefined;
}

function crossChecks(raw: unknown): { problems: Problem[]; warnings: Problem[] } {
  const problems: Problem[] = [];
  const warnings: Problem[] = [];
  const top = rec(raw);
  if (!top) return { problems, warnings };
  const projects = Array.isArray(top.projects) ? top.projects : [];

  const seenNames = new Map<string, number>();
  const adoptedCgroups = new Map<string, number>();
  const adoptedPids = new Map<number, number>();
  let sumMemMin = 0;
  let sumCpuMin = 0;

  projects.forEach((p0, i) => {
    const p = rec(p0);
    if (!p) return;
    const f = (...rest: (string | number)[]) => fieldPath(['projects', i, ...rest]);

    const name = val(checkName(p.name));
    if (name !== undefined) {
      const first = seenNames.get(name);
      if (first !== undefined)
        problems.push({
          field: f('name'),
          value: name,
          message: `is already the name of projects[${first}]; names must be unique`,
        });
      else seenNames.set(name, i);
    }

    const mem = rec(p.memory);
    const memMin = mem && mem.min !== undefined ? val(parseSize(mem.min)) : 0;
    const memMax = mem && mem.max !== undefined ? val(checkMemoryMax(mem.max)) : 'max';
    if (memMin !== undefined && typeof memMax === 'number' && memMin > memMax)
      problems.push({
        field: f('memory', 'min'),
        value: mem?.min,
        message: `must not exceed memory.max (${formatBytes(memMax)}), got ${formatBytes(memMin)}`,
      });
    if (memMin !== undefined) sumMemMin += memMin;

    const cpu = rec(p.cpu);
    const cpuMin = cpu && cpu.min !== undefined ? val(parseCpus(cpu.min)) : 0;
    const cpuMax = cpu && cpu.max !== undefined ? val(checkCpuMax(cpu.max)) : 'max';
    if (cpuMin !== undefined && typeof cpuMax === 'number' && cpuMin > cpuMax)
      problems.push({
        field: f('cpu', 'min'),
        value: cpu?.min,
        message: `must not exceed cpu.max (${cpuMax} CPUs), got ${cpuMin}`,
      });
    if (cpuMin !== undefined) sumCpuMin += cpuMin;

    const hasCommand = p.command !== undefined;
    const hasAdopt = p.adopt !== undefined;
    if (hasCommand && hasAdopt)
      problems.push({
        field: f('adopt'),
        value: p.adopt,
        message: 'must not be given together with command: a project is either started or adopted',
      });
    if (!hasCommand && !hasAdopt)
      problems.push({
        field: f('command'),
        value: undefined,
        message: 'is required unless adopt is given (a project is either started or adopted)',
      });
    const restart = rec(p.restart);
    const policy = typeof p.restart === 'string' ? p.restart : restart?.policy;
    if (hasAdopt && (policy === 'on-failure' || policy === 'always'))
      problems.push({
        field: f('restart'),
        value: p.restart,
        message: 'must be no for an adopted project: there is no command to start it again',
      });
    if (restart && restart.maxDelay !== undefined) {
      const d = val(parseDuration(restart.delay ?? D.project.restart.delayMs));
      const m = val(parseDuration(restart.maxDelay));
      if (d !== undefined && m !== undefined && m < d)
        problems.push({
          field: f('restart', 'maxDelay'),
          value: restart.maxDelay,
          message: `must not be below restart.delay (${d} ms), got ${m} ms`,
        });
    }
    if (hasAdopt && p.restartOnRestore === true)
      problems.push({
        field: f('restartOnRestore'),
        value: true,
        message: 'cannot be true for an adopted project: there is no command to start it again',
      });

    const command = rec(p.command);
    if (command) {
      const a0 = Array.isArray(command.argv) ? command.argv[0] : undefined;
      if (typeof a0 === 'string' && !a0.startsWith('/'))
        problems.push({
          field: f('command', 'argv', 0),
          value: a0,
          message: `must be an absolute path (nothing is looked up in PATH), got ${describe(a0)}`,
        });
      const env = rec(command.env);
      if (env)
        for (const [k, v] of Object.entries(env)) {
          if (!ENV_KEY_RE.test(k))
            problems.push({
              field: f('command', 'env', k),
              value: k,
              message: `is not a valid environment variable name (${ENV_KEY_RE.source})`,
            });
          const r = checkEnvValue(v);
          if (!r.ok) problems.push({ field: f('command', 'env', k), value: v, message: r.message });
        }
    }
    const preStop = rec(rec(p.stop)?.preStop);
    if (preStop && Array.isArray(preStop.command)) {
      const a0 = preStop.command[0];
      if (typeof a0 === 'string' && !a0.startsWith('/'))
        problems.push({
          field: f('stop', 'preStop', 'command', 0),
          value: a0,
          message: `must be an absolute path (nothing is looked up in PATH), got ${describe(a0)}`,
        });
    }

    const adopt = rec(p.adopt);
    if (adopt) {
      if ((adopt.cgroup === undefined) === (adopt.pids === undefined))
        problems.push({
          field: f('adopt'),
          value: p.adopt,
          message: 'must give exactly one of cgroup or pids',
        });
      const cg = val(checkRelativeCgroupPath(adopt.cgroup));
      if (cg !== undefined) {
        if (cg === 'agent' || cg.startsWith('agent/'))
          problems.push({
            field: f('adopt', 'cgroup'),
            value: cg,
            message: `is the agent's own leaf; a project cannot adopt it`,
          });
        const first = adoptedCgroups.get(cg);
        if (first !== undefined)
          problems.push({
            field: f('adopt', 'cgroup'),
            value: cg,
            message: `is already adopted by projects[${first}]`,
          });
        else adoptedCgroups.set(cg, i);
      }
      if (Array.isArray(adopt.pids))
        adopt.pids.forEach((pid, j) => {
          if (typeof pid !== 'number') return;
          const first = adoptedPids.get(pid);
          if (first !== undefined)
            problems.push({
              field: f('adopt', 'pids', j),
              value: pid,
              message: `is already adopted by projects[${first}]`,
            });
          else adoptedPids.set(pid, i);
        });
    }
  });

  // Minimums above the configured allocation: a WARNING, not an error. The allocation
  // changes at runtime (a reclaim may leave the guest smaller than this file says), and
  // the planner has a defined answer: the lowest-priority projects whose minimum does not
  // fit are not started. Refusing to start would make an agent restarted after a reclaim
  // fail to come up at all (docs/config-guest.md, "Minimums and the allocation").
  const res = rec(top.resources);
  const reserve = rec(top.reserve);
  const resMem = res ? val(parseSize(res.memory)) : undefined;
  const resCpus = res ? val(parseCpus(res.cpus)) : undefined;
  const rsvMem =
    reserve?.memory !== undefined ? val(parseSize(reserve.memory)) : D.reserve.memoryBytes;
  const rsvCpus = reserve?.cpus !== undefined ? val(parseCpus(reserve.cpus)) : D.reserve.cpus;
  if (resMem !== undefined && rsvMem !== undefined) {
    if (rsvMem >= resMem)
      problems.push({
        field: 'reserve.memory',
        value: reserve?.memory ?? formatBytes(rsvMem),
        message: `must be below resources.memory (${formatBytes(resMem)}), got ${formatBytes(rsvMem)}`,
      });
    else if (sumMemMin > resMem - rsvMem)
      warnings.push({
        field: 'projects[*].memory.min',
        value: sumMemMin,
        message: `the minimums add up to ${formatBytes(sumMemMin)}, above the ${formatBytes(resMem - rsvMem)} left after the reserve: the lowest-priority projects will not run`,
      });
  }
  if (resCpus !== undefined && rsvCpus !== undefined) {
    if (rsvCpus >= resCpus)
      problems.push({
        field: 'reserve.cpus',
        value: reserve?.cpus ?? rsvCpus,
        message: `must be below resources.cpus (${resCpus}), got ${rsvCpus}`,
      });
    else if (sumCpuMin > resCpus - rsvCpus + 1e-9)
      warnings.push({
        field: 'projects[*].cpu.min',
        value: sumCpuMin,
        message: `the minimums add up to ${sumCpuMin} CPUs, above the ${resCpus - rsvCpus} left after the reserve: the lowest-priority projects will not run`,
      });
  }
  return { problems, warnings };
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

type Parsed = z.output<typeof guestSchema>;

function normalise(p: Parsed, warnings: Problem[], source: string): GuestConfig {
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
  return cfg;
}

/**
 * Every key the schema knows, as dotted paths (`projects[].memory.min`): the docs table
 * has one row for each (a test keeps them in step).
 */
export function configKeys(): string[] {
  const out: string[] = [];
  const walk = (s: z.ZodTypeAny, prefix: string): void => {
    s = unwrap(s);
    if (s instanceof z.ZodArray) {
      const el = unwrap(s.element);
      if (el instanceof z.ZodObject || el instanceof z.ZodDiscriminatedUnion)
        walk(el, `${prefix}[]`);
      return;
    }
    const shapes: Record<string, z.ZodTypeAny>[] =
      s instanceof z.ZodObject
        ? [s.shape]
        : s instanceof z.ZodDiscriminatedUnion
          ? [...s.optionsMap.values()].map((o) => o.shape)
          : [];
    for (const shape of shapes)
      for (const [k, v] of Object.entries(shape)) {
        const key = prefix === '' ? k : `${prefix}.${k}`;
        if (!out.includes(key)) out.push(key);
        walk(v, key);
      }
  };
  walk(guestSchema, '');
  return out;
}

export function deepFreeze<T>(o: T): T {
  if (o !== null && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o as object)) deepFreeze(v);
  }
  return o;
}

function invalid(source: string, problems: Problem[]): NestError {
  const lines = problems.map((p) => `  ${p.field}: ${p.message}`);
  return new NestError(
    'CONFIG_INVALID',
    `${source}: ${problems.length} problem${problems.length === 1 ? '' : 's'}:\n${lines.join('\n')}`,
    { problems },
  );
}

/**
 * Validate a parsed config. Throws NestError CONFIG_INVALID whose `problems` list every
 * problem found (field path, value received, message); returns a frozen, normalised config.
 */
export function validateGuestConfig(raw: unknown, source: string): GuestConfig {
  if (rec(raw) === undefined)
    throw invalid(source, [
      {
        field: '(top level)',
        value: raw,
        message: `must be a mapping with at least "guest" and "projects", got ${raw === null || raw === undefined ? 'an empty document' : typeName(raw)}`,
      },
    ]);
  const parsed = guestSchema.safeParse(raw);
  const problems = parsed.success ? [] : problemsFromIssues(parsed.error.issues, raw);
  const cross = crossChecks(raw);
  problems.push(...cross.problems);
  if (problems.length > 0 || !parsed.success) throw invalid(source, problems);
  return deepFreeze(normalise(parsed.data, cross.warnings, source));
}

/** Read, parse (YAML, which includes JSON) and validate a config file. */
export async function loadGuestConfig(file: string): Promise<GuestConfig> {
  let text: string;
  try {
    const st = await fs.stat(file);
    if (!st.isFile())
      throw new NestError('CONFIG_UNREADABLE', `${file}: not a regular file`, {
        problems: [{ field: '(file)', value: file, message: 'is not a regular file' }],
      });
    if (st.size > MAX_CONFIG_BYTES)
      throw new NestError(
        'CONFIG_UNREADABLE',
        `${file}: larger than ${formatBytes(MAX_CONFIG_BYTES)}`,
        {
          problems: [
            {
              field: '(file)',
              value: st.size,
              message: `is larger than ${formatBytes(MAX_CONFIG_BYTES)}`,
            },
          ],
        },
      );
    text = await fs.readFile(file, 'utf8');
  } catch (e) {
    if (e instanceof NestError) throw e;
    const code = (e as NodeJS.ErrnoException).code ?? 'unknown';
    throw new NestError('CONFIG_UNREADABLE', `${file}: cannot read the config (${code})`, {
      cause: e,
      problems: [{ field: '(file)', value: file, message: `cannot be read: ${code}` }],
    });
  }
  // Duplicate keys are errors (uniqueKeys), aliases are capped (maxAliasCount): a config
  // cannot say one thing twice or blow up on expansion.
  const doc = parseDocument(text, { uniqueKeys: true, prettyErrors: true });
  if (doc.errors.length > 0)
    throw invalid(
      file,
      doc.errors.map((err) => ({
        field: err.linePos
          ? `(line ${err.linePos[0].line}, column ${err.linePos[0].col})`
          : '(yaml)',
        value: undefined,
        message: err.message.split('\n')[0].replace(/ at line \d+, column \d+:?$/, ''),
      })),
    );
  let raw: unknown;
  try {
    raw = doc.toJS({ maxAliasCount: 100 });
  } catch (e) {
    throw invalid(file, [{ field: '(yaml)', value: undefined, message: (e as Error).message }]);
  }
  return validateGuestConfig(raw, file);
}

/** Warnings for an allocation only known at start (detected, or given by the host). */
export function minimumsAbove(cfg: GuestConfig, allocation: Resources): Problem[] {
  const net = {
    memoryBytes: allocation.memoryBytes - cfg.reserve.memoryBytes,
    cpus: allocation.cpus - cfg.reserve.cpus,
  };
  const mem = cfg.projects.reduce((s, p) => s + p.memory.min, 0);
  const cpus = cfg.projects.reduce((s, p) => s + p.cpu.min, 0);
  const out: Problem[] = [];
  if (mem > net.memoryBytes)
    out.push({
      field: 'projects[*].memory.min',
      value: mem,
      message: `the minimums add up to ${formatBytes(mem)}, above the ${formatBytes(Math.max(0, net.memoryBytes))} left after the reserve`,
    });
  if (cpus > net.cpus + 1e-9)
    out.push({
      field: 'projects[*].cpu.min',
      value: cpus,
      message: `the minimums add up to ${cpus} CPUs, above the ${Math.max(0, net.cpus)} left after the reserve`,
    });
  return out;
}
