/**
 * The host broker's config: /etc/nestbroker/host.yaml (docs/host-broker.md).
 *
 * Validated once at start against a strict schema (unknown keys are errors), then the
 * cross checks that a schema cannot express (floor ≤ allocation, unique names, a TLS
 * channel has all its files). Every problem is reported together, naming the field and
 * the value received (fastify's initial-config-validation; CONTRIBUTING.md). The result is
 * frozen: nothing changes the config after start.
 */
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';
import { NestError, type Problem } from '../common/errors';
import { parseCpus, parseDuration, parseSize, type ParseResult } from '../common/units';

export const DEFAULT_HOST_CONFIG_PATH = '/etc/nestbroker/host.yaml';
export const DEFAULT_HOST_SOCKET = '/run/nestbroker/host.sock';

/** Guest names become journal keys and appear in notice ids: keep them file-name safe. */
export const GUEST_NAME = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

export interface ResourcesConfig {
  cpus: number;
  memoryBytes: number;
}

export type ChannelConfig =
  | { transport: 'unix'; path: string }
  | {
      transport: 'tls';
      host: string;
      port: number;
      cert: string;
      key: string;
      ca: string;
      /** Name the guest's certificate must carry (default: host). */
      servername?: string;
    };

export interface GuestConfig {
  name: string;
  /** Lower gives first (same sense as a project's priority in the guest). */
  priority: number;
  /** What the VM was given: the top of the books, what a restore can return to. */
  allocation: ResourcesConfig;
  /** A reclaim never takes the guest below this. */
  floor: ResourcesConfig;
  channel: ChannelConfig;
  /**
   * The VM's cgroup beneath `cgroup.root`, e.g. `machine-qemu\x2d1\x2dvm1.scope` under
   * `machine.slice` (libvirt's naming, which is why systemd-style names are allowed).
   */
  cgroup?: string;
  /** QMP socket of the VM's QEMU (libvirt: the domain's monitor socket, or an extra -qmp). */
  qmp?: string;
  /** How long a QMP balloon may take to reach its target before it is reported as short. */
  balloonTimeoutMs: number;
  /**
   * Added to the guest's memory for the VM cgroup's limit: QEMU itself needs memory
   * beyond the guest's RAM (device emulation, page tables). 0 in the demo, where the
   * cgroup limit plays the allocation itself.
   */
  memoryOverheadBytes: number;
}

export interface TriggerConfig {
  enabled: boolean;
  /** Fire when MemAvailable on the host stays below this many bytes… */
  memoryAvailableBelowBytes?: number;
  /** …or when host memory PSI `some avg10` (percent) stays above this… */
  memoryPsiAbove?: number;
  /** …for this long (ms). */
  forMs: number;
  /** What one automatic reclaim takes from one guest. */
  step: ResourcesConfig;
  /** Deadline given to the guest for an automatic reclaim (ms). */
  deadlineMs: number;
  /** How often the watcher samples (ms). */
  intervalMs: number;
  /** After a trigger fires, wait this long before it may fire again (ms). */
  cooldownMs: number;
  /**
   * Give-back (hysteresis): once the pressure has stayed clear — below every threshold, and
   * past these, which sit further from them — for `afterMs`, one step of what the trigger
   * took is given back (agent/host/trigger.ts evaluateGiveBack). Absent: never.
   */
  giveBack?: { memoryAvailableAboveBytes?: number; memoryPsiBelow?: number; afterMs: number };
}

export interface HostConfig {
  stateDir: string;
  socket: string;
  /** Group that owns the operator socket (mode 0660); unset keeps root's group. */
  socketGroup?: string;
  socketMode: number;
  cgroup: { root: string; driver: 'auto' | 'v2' | 'hybrid' };
  heartbeat: { intervalMs: number; timeoutMs: number };
  /** Reconnect backoff toward guests. */
  reconnect: { minMs: number; maxMs: number };
  trigger: TriggerConfig;
  /**
   * docs/reliability.md: per-connection rate limit on each guest channel; cap on pending
   * notices per guest.
   */
  limits: { messagesPerSecond: number; messageBurst: number; pendingNoticesPerGuest: number };
  /** Prometheus metrics on http://host:port/metrics (agent/host/metrics.ts); absent: off. */
  metrics?: { host: string; port: number };
  guests: GuestConfig[];
}

/** Defaults of `limits` (docs/host-broker.md repeats them). */
export const HOST_LIMIT_DEFAULTS = Object.freeze({
  messagesPerSecond: 200,
  messageBurst: 400,
  pendingNoticesPerGuest: 16,
});

export const HOST_DEFAULTS = {
  stateDir: '/var/lib/nestbroker/host',
  socket: DEFAULT_HOST_SOCKET,
  socketMode: 0o660,
  cgroupRoot: 'machine.slice',
  heartbeatInterval: '5s',
  heartbeatTimeout: '15s',
  reconnectMin: '200ms',
  reconnectMax: '10s',
  balloonTimeout: '30s',
  triggerFor: '30s',
  triggerDeadline: '60s',
  triggerInterval: '5s',
  triggerCooldown: '2m',
  triggerGiveBackAfter: '5m',
} as const;

// ---- schema (shape only; units are parsed afterwards so every problem names its field) ----

const sizeLike = z.union([z.string(), z.number()]);
const durationLike = z.union([z.string(), z.number()]);
const cpusLike = z.union([z.string(), z.number()]);

const resourcesSchema = z.object({ cpus: cpusLike, memory: sizeLike }).strict();

const channelSchema = z.discriminatedUnion('transport', [
  z.object({ transport: z.literal('unix'), path: z.string().min(1) }).strict(),
  z
    .object({
      transport: z.literal('tls'),
      host: z.string().min(1),
      port: z.number().int().min(1).max(65535),
      cert: z.string().min(1),
      key: z.string().min(1),
      ca: z.string().min(1),
      servername: z.string().min(1).optional(),
    })
    .strict(),
]);

const guestSchema = z
  .object({
    name: z.string(),
    priority: z.number().int().min(0).max(1_000_000),
    allocation: resourcesSchema,
    floor: resourcesSchema.optional(),
    channel: channelSchema,
    cgroup: z.string().min(1).optional(),
    qmp: z.string().min(1).optional(),
    balloonTimeout: durationLike.optional(),
    memoryOverhead: sizeLike.optional(),
  })
  .strict();

const triggerSchema = z
  .object({
    enabled: z.boolean().default(false),
    memoryAvailableBelow: sizeLike.optional(),
    memoryPsiAbove: z.number().min(0).max(100).optional(),
    for: durationLike.optional(),
    step: z.object({ cpus: cpusLike.optional(), memory: sizeLike.optional() }).strict().optional(),
    deadline: durationLike.optional(),
    interval: durationLike.optional(),
    cooldown: durationLike.optional(),
    giveBack: z
      .object({
        memoryAvailableAbove: sizeLike.optional(),
        memoryPsiBelow: z.number().min(0).max(100).optional(),
        after: durationLike.optional(),
      })
      .strict()
      .optional(),
  })
  .strict();

const hostSchema = z
  .object({
    stateDir: z.string().min(1).optional(),
    socket: z.string().min(1).optional(),
    socketGroup: z.string().min(1).optional(),
    socketMode: z.union([z.number().int(), z.string()]).optional(),
    cgroup: z
      .object({
        root: z.string().min(1).optional(),
        driver: z.enum(['auto', 'v2', 'hybrid']).optional(),
      })
      .strict()
      .optional(),
    heartbeat: z
      .object({ interval: durationLike.optional(), timeout: durationLike.optional() })
      .strict()
      .optional(),
    reconnect: z
      .object({ min: durationLike.optional(), max: durationLike.optional() })
      .strict()
      .optional(),
    trigger: triggerSchema.optional(),
    limits: z
      .object({
        messagesPerSecond: z.number().int().min(1).max(1_000_000).optional(),
        messageBurst: z.number().int().min(1).max(1_000_000).optional(),
        pendingNoticesPerGuest: z.number().int().min(1).max(100_000).optional(),
      })
      .strict()
      .optional(),
    metrics: z
      .object({
        host: z.string().regex(/^[A-Za-z0-9.:-]{1,253}$/, 'must be an IP address or host name'),
        port: z.number().int().min(0).max(65535),
      })
      .strict()
      .optional(),
    guests: z.array(guestSchema),
  })
  .strict();

function zodField(p: (string | number)[]): string {
  return p.reduce<string>(
    (acc, seg) => (typeof seg === 'number' ? `${acc}[${seg}]` : acc ? `${acc}.${seg}` : seg),
    '',
  );
}

function valueAt(obj: unknown, p: (string | number)[]): unknown {
  let cur: unknown = obj;
  for (const seg of p) {
    if (cur === null || typeof cur !== 'object') return undefined;
    cur = (cur as Record<string | number, unknown>)[seg];
  }
  return cur;
}

/** A cgroup path beneath the root: relative, no `..`, no empty segments. */
function checkCgroupPath(v: string): string | undefined {
  if (v.startsWith('/')) return 'must be relative to cgroup.root (no leading "/")';
  const segs = v.split('/');
  for (const s of segs) {
    if (s === '' || s === '.' || s === '..')
      return `must not contain empty, "." or ".." segments, got "${v}"`;
    if (s.length > 255) return 'has a segment longer than 255 bytes';
    if (/[\0\n]/.test(s)) return 'must not contain NUL or newline';
  }
  return undefined;
}

/**
 * Validates a parsed YAML document. Throws CONFIG_INVALID listing every problem.
 * `baseDir` resolves relative paths (the config file's directory).
 */
export function validateHostConfig(raw: unknown, baseDir = process.cwd()): Readonly<HostConfig> {
  const problems: Problem[] = [];
  const parsed = hostSchema.safeParse(raw);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      const field = zodField(issue.path) || '(root)';
      const value =
        issue.code === 'unrecognized_keys'
          ? issue.keys
          : valueAt(raw, issue.path as (string | number)[]);
      problems.push({
        field:
          issue.code === 'unrecognized_keys'
            ? issue.keys.map((k) => (field === '(root)' ? k : `${field}.${k}`)).join(', ')
            : field,
        value,
        message:
          issue.code === 'unrecognized_keys'
            ? `unknown key(s) ${issue.keys.map((k) => `"${k}"`).join(', ')}`
            : issue.message,
      });
    }
    throw configInvalid(problems);
  }
  const c = parsed.data;

  const unit = <T>(
    field: string,
    value: unknown,
    parse: (v: unknown) => ParseResult<T>,
    fallback: T,
  ): T => {
    const r = parse(value);
    if (r.ok) return r.value;
    problems.push({ field, value, message: `${field} ${r.message}` });
    return fallback;
  };
  const dur = (field: string, value: unknown, dflt: string): number =>
    unit(field, value ?? dflt, parseDuration, 0);
  const resolve = (p: string): string => path.resolve(baseDir, p);

  const stateDir = resolve(c.stateDir ?? HOST_DEFAULTS.stateDir);
  const socket = resolve(c.socket ?? HOST_DEFAULTS.socket);
  let socketMode: number = HOST_DEFAULTS.socketMode;
  if (c.socketMode !== undefined) {
    const m =
      typeof c.socketMode === 'number'
        ? c.socketMode
        : /^0?[0-7]{3}$/.test(c.socketMode)
          ? parseInt(c.socketMode, 8)
          : NaN;
    if (!Number.isInteger(m) || m < 0 || m > 0o777)
      problems.push({
        field: 'socketMode',
        value: c.socketMode,
        message: 'socketMode must be an octal mode like "0660"',
      });
    else if (m & 0o007)
      problems.push({
        field: 'socketMode',
        value: c.socketMode,
        message: 'socketMode must not give "other" users access to the operator socket',
      });
    else socketMode = m;
  }

  const cgroupRoot = c.cgroup?.root ?? HOST_DEFAULTS.cgroupRoot;
  const rootProblem = checkCgroupPath(cgroupRoot);
  if (rootProblem)
    problems.push({
      field: 'cgroup.root',
      value: cgroupRoot,
      message: `cgroup.root ${rootProblem}`,
    });

  const heartbeat = {
    intervalMs: dur('heartbeat.interval', c.heartbeat?.interval, HOST_DEFAULTS.heartbeatInterval),
    timeoutMs: dur('heartbeat.timeout', c.heartbeat?.timeout, HOST_DEFAULTS.heartbeatTimeout),
  };
  if (heartbeat.intervalMs < 100)
    problems.push({
      field: 'heartbeat.interval',
      value: c.heartbeat?.interval,
      message: 'heartbeat.interval must be at least 100ms',
    });
  if (heartbeat.timeoutMs <= heartbeat.intervalMs)
    problems.push({
      field: 'heartbeat.timeout',
      value: c.heartbeat?.timeout ?? HOST_DEFAULTS.heartbeatTimeout,
      message: 'heartbeat.timeout must be longer than heartbeat.interval',
    });
  const reconnect = {
    minMs: dur('reconnect.min', c.reconnect?.min, HOST_DEFAULTS.reconnectMin),
    maxMs: dur('reconnect.max', c.reconnect?.max, HOST_DEFAULTS.reconnectMax),
  };
  if (reconnect.maxMs < reconnect.minMs)
    problems.push({
      field: 'reconnect.max',
      value: c.reconnect?.max,
      message: 'reconnect.max must not be shorter than reconnect.min',
    });

  const seen = new Map<string, number>();
  const guests: GuestConfig[] = c.guests.map((g, i) => {
    const f = `guests[${i}]`;
    if (!GUEST_NAME.test(g.name))
      problems.push({
        field: `${f}.name`,
        value: g.name,
        message: `${f}.name must match ${GUEST_NAME} (it names journal files and notices)`,
      });
    const prev = seen.get(g.name);
    if (prev !== undefined)
      problems.push({
        field: `${f}.name`,
        value: g.name,
        message: `guest name "${g.name}" is already used by guests[${prev}]`,
      });
    else seen.set(g.name, i);

    const allocation = {
      cpus: unit(`${f}.allocation.cpus`, g.allocation.cpus, parseCpus, 0),
      memoryBytes: unit(`${f}.allocation.memory`, g.allocation.memory, parseSize, 0),
    };
    const floor = {
      cpus: unit(`${f}.floor.cpus`, g.floor?.cpus ?? 0, parseCpus, 0),
      memoryBytes: unit(`${f}.floor.memory`, g.floor?.memory ?? 0, parseSize, 0),
    };
    if (allocation.cpus <= 0)
      problems.push({
        field: `${f}.allocation.cpus`,
        value: g.allocation.cpus,
        message: `${f}.allocation.cpus must be more than 0`,
      });
    if (allocation.memoryBytes <= 0)
      problems.push({
        field: `${f}.allocation.memory`,
        value: g.allocation.memory,
        message: `${f}.allocation.memory must be more than 0`,
      });
    if (floor.cpus > allocation.cpus)
      problems.push({
        field: `${f}.floor.cpus`,
        value: g.floor?.cpus,
        message: `${f}.floor.cpus (${floor.cpus}) must not exceed allocation.cpus (${allocation.cpus})`,
      });
    if (floor.memoryBytes > allocation.memoryBytes)
      problems.push({
        field: `${f}.floor.memory`,
        value: g.floor?.memory,
        message: `${f}.floor.memory must not exceed allocation.memory`,
      });
    if (g.cgroup !== undefined) {
      const p = checkCgroupPath(g.cgroup);
      if (p) problems.push({ field: `${f}.cgroup`, value: g.cgroup, message: `${f}.cgroup ${p}` });
    }
    const channel: ChannelConfig =
      g.channel.transport === 'unix'
        ? { transport: 'unix', path: resolve(g.channel.path) }
        : {
            ...g.channel,
            cert: resolve(g.channel.cert),
            key: resolve(g.channel.key),
            ca: resolve(g.channel.ca),
          };
    return {
      name: g.name,
      priority: g.priority,
      allocation,
      floor,
      channel,
      cgroup: g.cgroup,
      qmp: g.qmp === undefined ? undefined : resolve(g.qmp),
      balloonTimeoutMs: dur(`${f}.balloonTimeout`, g.balloonTimeout, HOST_DEFAULTS.balloonTimeout),
      memoryOverheadBytes: unit(`${f}.memoryOverhead`, g.memoryOverhead ?? 0, parseSize, 0),
    };
  });

  // Two guests on one channel or one VM cgroup would mean one VM's notices reach another.
  const dup = (what: string, key: (g: GuestConfig) => string | undefined): void => {
    const by = new Map<string, number>();
    guests.forEach((g, i) => {
      const k = key(g);
      if (k === undefined) return;
      const j = by.get(k);
      if (j !== undefined)
        problems.push({
          field: `guests[${i}].${what}`,
          value: k,
          message: `guests[${i}].${what} is the same as guests[${j}].${what}`,
        });
      else by.set(k, i);
    });
  };
  dup('channel', (g) =>
    g.channel.transport === 'unix' ? g.channel.path : `${g.channel.host}:${g.channel.port}`,
  );
  dup('cgroup', (g) => g.cgroup);
  dup('qmp', (g) => g.qmp);

  const t = c.trigger;
  const trigger: TriggerConfig = {
    enabled: t?.enabled ?? false,
    memoryAvailableBelowBytes:
      t?.memoryAvailableBelow === undefined
        ? undefined
        : unit('trigger.memoryAvailableBelow', t.memoryAvailableBelow, parseSize, 0),
    memoryPsiAbove: t?.memoryPsiAbove,
    forMs: dur('trigger.for', t?.for, HOST_DEFAULTS.triggerFor),
    step: {
      cpus: unit('trigger.step.cpus', t?.step?.cpus ?? 0, parseCpus, 0),
      memoryBytes: unit('trigger.step.memory', t?.step?.memory ?? 0, parseSize, 0),
    },
    deadlineMs: dur('trigger.deadline', t?.deadline, HOST_DEFAULTS.triggerDeadline),
    intervalMs: dur('trigger.interval', t?.interval, HOST_DEFAULTS.triggerInterval),
    cooldownMs: dur('trigger.cooldown', t?.cooldown, HOST_DEFAULTS.triggerCooldown),
  };
  const gb = t?.giveBack;
  if (gb) {
    trigger.giveBack = {
      afterMs: dur('trigger.giveBack.after', gb.after, HOST_DEFAULTS.triggerGiveBackAfter),
    };
    if (gb.memoryAvailableAbove !== undefined)
      trigger.giveBack.memoryAvailableAboveBytes = unit(
        'trigger.giveBack.memoryAvailableAbove',
        gb.memoryAvailableAbove,
        parseSize,
        0,
      );
    if (gb.memoryPsiBelow !== undefined) trigger.giveBack.memoryPsiBelow = gb.memoryPsiBelow;
    const above = trigger.giveBack.memoryAvailableAboveBytes;
    const below = trigger.memoryAvailableBelowBytes;
    if (above === undefined && gb.memoryPsiBelow === undefined)
      problems.push({
        field: 'trigger.giveBack',
        value: gb,
        message:
          'trigger.giveBack needs trigger.giveBack.memoryAvailableAbove or trigger.giveBack.memoryPsiBelow (where the pressure counts as cleared)',
      });
    // The band between the two thresholds is the hysteresis: without it, a give-back would
    // bring the host straight back to its trigger threshold.
    if (above !== undefined && below !== undefined && above <= below)
      problems.push({
        field: 'trigger.giveBack.memoryAvailableAbove',
        value: gb.memoryAvailableAbove,
        message: `must be above trigger.memoryAvailableBelow (${below} B), got ${above} B`,
      });
    if (
      gb.memoryPsiBelow !== undefined &&
      trigger.memoryPsiAbove !== undefined &&
      gb.memoryPsiBelow >= trigger.memoryPsiAbove
    )
      problems.push({
        field: 'trigger.giveBack.memoryPsiBelow',
        value: gb.memoryPsiBelow,
        message: `must be below trigger.memoryPsiAbove (${trigger.memoryPsiAbove}), got ${gb.memoryPsiBelow}`,
      });
  }
  if (trigger.enabled) {
    if (trigger.memoryAvailableBelowBytes === undefined && trigger.memoryPsiAbove === undefined)
      problems.push({
        field: 'trigger',
        value: t,
        message: 'trigger.enabled needs trigger.memoryAvailableBelow or trigger.memoryPsiAbove',
      });
    if (trigger.step.cpus === 0 && trigger.step.memoryBytes === 0)
      problems.push({
        field: 'trigger.step',
        value: t?.step,
        message: 'trigger.enabled needs a step that takes something (step.memory or step.cpus)',
      });
    if (trigger.intervalMs < 100)
      problems.push({
        field: 'trigger.interval',
        value: t?.interval,
        message: 'trigger.interval must be at least 100ms',
      });
  }

  if (problems.length > 0) throw configInvalid(problems);

  return deepFreeze({
    stateDir,
    socket,
    socketGroup: c.socketGroup,
    socketMode,
    cgroup: { root: cgroupRoot, driver: c.cgroup?.driver ?? 'auto' },
    heartbeat,
    reconnect,
    trigger,
    limits: { ...HOST_LIMIT_DEFAULTS, ...c.limits },
    ...(c.metrics ? { metrics: { host: c.metrics.host, port: c.metrics.port } } : {}),
    guests,
  });
}

function configInvalid(problems: Problem[]): NestError {
  return new NestError(
    'CONFIG_INVALID',
    `host config has ${problems.length} problem(s):\n` +
      problems.map((p) => `  - ${p.field}: ${p.message}`).join('\n'),
    { problems },
  );
}

export async function loadHostConfig(file: string): Promise<Readonly<HostConfig>> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (cause) {
    throw new NestError('CONFIG_UNREADABLE', `cannot read host config ${file}: ${String(cause)}`, {
      cause,
    });
  }
  let doc: unknown;
  try {
    doc = YAML.parse(text);
  } catch (cause) {
    throw new NestError(
      'CONFIG_INVALID',
      `host config ${file} is not valid YAML: ${String(cause)}`,
      {
        cause,
        problems: [{ field: '(file)', value: file, message: String(cause) }],
      },
    );
  }
  return validateHostConfig(doc, path.dirname(path.resolve(file)));
}

function deepFreeze<T>(o: T): Readonly<T> {
  if (o && typeof o === 'object') {
    for (const v of Object.values(o as Record<string, unknown>)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}
