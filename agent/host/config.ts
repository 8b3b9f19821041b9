/**
 * The host broker's config: /etc/nestbroker/host.yaml (docs/host-broker.md).
 *
 * Validated once at start by the config layer the guest agent shares
 * (agent/common/config-check.ts): a strict schema (unknown keys are errors, with a "did
 * you mean") whose single values are checked where they are written, and beside it the
 * cross checks a schema cannot express (floor ≤ allocation, unique names, one channel per
 * guest), run on the raw input so that no problem hides another. Every problem is
 * reported together, naming the field and the value received (CONTRIBUTING.md). The
 * result is frozen: nothing changes the config after start.
 */
import * as path from 'node:path';
import { z } from 'zod';
import type { Problem } from '../common/errors';
import {
  checkBool,
  checkConfig,
  checkHost,
  checkInt,
  checkString,
  configInvalid,
  deepFreeze,
  field,
  opt,
  readConfigFile,
  rec,
  schemaKeys,
  val,
  type Check,
  type CrossResult,
} from '../common/config-check';
import {
  describe,
  formatBytes,
  formatMs,
  parseCpus,
  parseDuration,
  parseSize,
  type ParseResult,
} from '../common/units';
import { DEFAULT_LIBVIRT_URI, DEFAULT_VIRSH_TIMEOUT_MS } from './libvirt/virsh';

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
    }
  /**
   * `hypervisor: libvirt`: the socket path of the domain's org.nestbroker.0 channel, read
   * from its live XML at every connection attempt (agent/host/libvirt/domains.ts).
   */
  | { transport: 'libvirt'; domain: string };

/** Per guest, with `hypervisor: libvirt` (docs/libvirt.md, "Removal modes"). */
export interface LibvirtGuestConfig {
  /** The libvirt domain's name (default: the guest's name). */
  domain: string;
  /** `unplug`: `virsh setvcpus --live`; `quota`: `virsh schedinfo --live` (global_quota). */
  cpuMode: 'unplug' | 'quota';
  /** `virtio-mem`: `virsh update-memory-device`; `balloon`: `virsh setmem --live`. */
  memoryMode: 'virtio-mem' | 'balloon';
  /** How long a removal may take to show in libvirt before the actuation is partial. */
  confirmTimeoutMs: number;
}

export type HypervisorConfig =
  | { type: 'qemu' }
  | {
      type: 'libvirt';
      /** libvirt connection URI (`virsh -c`). */
      uri: string;
      /** Bound on one virsh call. */
      timeoutMs: number;
      /**
       * After a domain starts again with its persistent vCPUs and memory (docs/libvirt.md,
       * "Books"): `reapply` takes back what the reclaims in force had taken, through the
       * usual cascade; `follow` lets the books follow libvirt and nothing more.
       */
      afterRestart: 'reapply' | 'follow';
      /** The deadline of such a re-applied reclaim (the guest is booting). */
      reapplyDeadlineMs: number;
    };

export interface GuestConfig {
  name: string;
  /** Lower gives first (same sense as a project's priority in the guest). */
  priority: number;
  /**
   * What the VM was given: the top of the books, what a restore can return to. With
   * `hypervisor: libvirt` and no allocation in the file, read from the domain's persistent
   * XML at start (agent/host/libvirt/domains.ts resolveAllocations).
   */
  allocation: ResourcesConfig;
  /** True while the allocation is still to be read from libvirt (0 until then). */
  allocationFromLibvirt?: boolean;
  /** Present with `hypervisor: libvirt`. */
  libvirt?: LibvirtGuestConfig;
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
  /** `qemu`: VM cgroups and QMP as configured per guest; `libvirt`: everything through virsh. */
  hypervisor: HypervisorConfig;
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
  /** The log level; absent: NESTBROKER_LOG_LEVEL, else info. A reload applies it live. */
  logLevel?: 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'fatal';
  /**
   * `guests: auto` (`hypervisor: libvirt` only): the guests are the running domains with
   * the org.nestbroker.0 channel, their settings read from each domain's `<metadata>`
   * (agent/host/libvirt/auto-guests.ts); `guests` holds those found so far.
   */
  autoGuests?: true;
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
  confirmTimeout: '60s',
  cpuMode: 'unplug',
  memoryMode: 'virtio-mem',
  libvirtTimeout: '60s',
  afterRestart: 'reapply' as const,
  reapplyDeadline: '10m',
  triggerFor: '30s',
  triggerDeadline: '60s',
  triggerInterval: '5s',
  triggerCooldown: '2m',
  triggerGiveBackAfter: '5m',
} as const;

// ---- schema: shapes, unknown keys and single values (agent/common/config-check.ts) ----

/** A duration with a lower bound, checked where it is written (heartbeat.interval). */
function durationAtLeast(minMs: number, shown: string): Check<number> {
  return (v) => {
    const r = parseDuration(v);
    if (!r.ok || r.value >= minMs) return r;
    return { ok: false, message: `must be at least ${shown}, got ${describe(v)}` };
  };
}

/** An allocation is something: above 0. */
function positive(parse: Check<number>): Check<number> {
  return (v) => {
    const r = parse(v);
    if (!r.ok || r.value > 0) return r;
    return { ok: false, message: `must be more than 0, got ${describe(v)}` };
  };
}

function checkGuestName(v: unknown): ParseResult<string> {
  if (typeof v === 'string' && GUEST_NAME.test(v)) return { ok: true, value: v };
  return {
    ok: false,
    message: `must match ${GUEST_NAME} (it names journal files and notices), got ${describe(v)}`,
  };
}

/** A cgroup path beneath the root: relative, no `..`, no empty segments. */
function checkCgroupPath(v: unknown): ParseResult<string> {
  if (typeof v !== 'string' || v === '')
    return { ok: false, message: `must be a relative cgroup path, got ${describe(v)}` };
  if (v.startsWith('/'))
    return {
      ok: false,
      message: `must be relative to cgroup.root (no leading "/"), got ${describe(v)}`,
    };
  for (const s of v.split('/')) {
    if (s === '' || s === '.' || s === '..')
      return {
        ok: false,
        message: `must not contain empty, "." or ".." segments, got ${describe(v)}`,
      };
    if (s.length > 255) return { ok: false, message: 'has a segment longer than 255 bytes' };
    if (/[\0\n]/.test(s)) return { ok: false, message: 'must not contain NUL or newline' };
  }
  return { ok: true, value: v };
}

/** The operator socket's mode: octal, and never open to "other" users. */
function checkSocketMode(v: unknown): ParseResult<number> {
  const m =
    typeof v === 'number' && Number.isInteger(v)
      ? v
      : typeof v === 'string' && /^0?[0-7]{3}$/.test(v)
        ? parseInt(v, 8)
        : NaN;
  if (!Number.isInteger(m) || m < 0 || m > 0o777)
    return { ok: false, message: `must be an octal mode like "0660", got ${describe(v)}` };
  if (m & 0o007)
    return {
      ok: false,
      message: `must not give "other" users access to the operator socket, got ${describe(v)}`,
    };
  return { ok: true, value: m };
}

/** A group name, or a gid (YAML reads `socketGroup: 1000` as a number; docs/host-broker.md). */
function checkGroup(v: unknown): ParseResult<string> {
  if (typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= 0xfffffffe)
    return { ok: true, value: String(v) };
  const r = checkString(v);
  return r.ok ? r : { ok: false, message: `must be a group name or a gid, got ${describe(v)}` };
}

/**
 * A libvirt domain name: no "/" and no control characters (virsh(1) gets it as one argument;
 * no shell is involved).
 */
function checkDomainName(v: unknown): ParseResult<string> {
  // eslint-disable-next-line no-control-regex -- control characters are what it refuses
  if (typeof v === 'string' && /^[^/\0-\x1f\x7f]{1,200}$/.test(v)) return { ok: true, value: v };
  return {
    ok: false,
    message: `must be a libvirt domain name (1-200 characters, no "/" or control characters), got ${describe(v)}`,
  };
}

function checkPercent(v: unknown): ParseResult<number> {
  return typeof v === 'number' && Number.isFinite(v) && v >= 0 && v <= 100
    ? { ok: true, value: v }
    : { ok: false, message: `must be a percentage from 0 to 100, got ${describe(v)}` };
}

const resourcesSchema = z
  .object({ cpus: field(positive(parseCpus)), memory: field(positive(parseSize)) })
  .strict();

const floorSchema = z.object({ cpus: field(parseCpus), memory: field(parseSize) }).strict();

const channelSchema = z.discriminatedUnion('transport', [
  z.object({ transport: z.literal('unix'), path: field(checkString) }).strict(),
  z
    .object({
      transport: z.literal('tls'),
      host: field(checkString),
      port: field(checkInt(1, 65535, 'a port')),
      cert: field(checkString),
      key: field(checkString),
      ca: field(checkString),
      servername: opt(checkString),
    })
    .strict(),
]);

const guestSchema = z
  .object({
    name: field(checkGuestName),
    priority: field(checkInt(0, 1_000_000)),
    allocation: resourcesSchema.optional(),
    floor: floorSchema.optional(),
    channel: channelSchema.optional(),
    domain: opt(checkDomainName),
    cpuMode: z.enum(['unplug', 'quota']).optional(),
    memoryMode: z.enum(['virtio-mem', 'balloon']).optional(),
    confirmTimeout: opt(parseDuration),
    cgroup: opt(checkCgroupPath),
    qmp: opt(checkString),
    balloonTimeout: opt(parseDuration),
    memoryOverhead: opt(parseSize),
  })
  .strict();

const triggerSchema = z
  .object({
    enabled: opt(checkBool),
    memoryAvailableBelow: opt(parseSize),
    memoryPsiAbove: opt(checkPercent),
    for: opt(parseDuration),
    step: z
      .object({ cpus: opt(parseCpus), memory: opt(parseSize) })
      .strict()
      .optional(),
    deadline: opt(parseDuration),
    interval: opt(parseDuration),
    cooldown: opt(parseDuration),
    giveBack: z
      .object({
        memoryAvailableAbove: opt(parseSize),
        memoryPsiBelow: opt(checkPercent),
        after: opt(parseDuration),
      })
      .strict()
      .optional(),
  })
  .strict();

const hostSchema = z
  .object({
    hypervisor: z.enum(['qemu', 'libvirt']).optional(),
    libvirt: z
      .object({
        uri: opt(checkString),
        timeout: opt(parseDuration),
        afterRestart: z.enum(['reapply', 'follow']).optional(),
        reapplyDeadline: opt(durationAtLeast(1000, '1s')),
      })
      .strict()
      .optional(),
    stateDir: opt(checkString),
    socket: opt(checkString),
    socketGroup: opt(checkGroup),
    socketMode: opt(checkSocketMode),
    cgroup: z
      .object({
        root: opt(checkCgroupPath),
        driver: z.enum(['auto', 'v2', 'hybrid']).optional(),
      })
      .strict()
      .optional(),
    heartbeat: z
      .object({ interval: opt(durationAtLeast(100, '100ms')), timeout: opt(parseDuration) })
      .strict()
      .optional(),
    reconnect: z
      .object({ min: opt(parseDuration), max: opt(parseDuration) })
      .strict()
      .optional(),
    trigger: triggerSchema.optional(),
    limits: z
      .object({
        messagesPerSecond: opt(checkInt(1, 1_000_000, 'messages a second')),
        messageBurst: opt(checkInt(1, 1_000_000, 'messages')),
        pendingNoticesPerGuest: opt(checkInt(1, 100_000, 'notices')),
      })
      .strict()
      .optional(),
    metrics: z
      .object({
        host: field(checkHost),
        port: field(checkInt(0, 65535, 'a port (0: any free one)')),
      })
      .strict()
      .optional(),
    logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal']).optional(),
    guests: z.array(guestSchema),
  })
  .strict();

/** Every key the host config knows, as dotted paths (docs/host-broker.md has a row for each). */
export function hostConfigKeys(): string[] {
  return schemaKeys(hostSchema);
}

/** A default written as text (HOST_DEFAULTS, which the docs repeat) in milliseconds. */
function ms(text: string): number {
  const r = parseDuration(text);
  if (!r.ok) throw new Error(`HOST_DEFAULTS: ${text} ${r.message}`);
  return r.value;
}

// ---- cross-field checks, on the raw input (they run even where single values failed) ----

function crossChecks(top: Record<string, unknown>, baseDir: string): CrossResult {
  const problems: Problem[] = [];
  const resolve = (p: unknown): string | undefined =>
    typeof p === 'string' && p !== '' ? path.resolve(baseDir, p) : undefined;

  const hb = rec(top.heartbeat);
  const hbInterval = val(parseDuration(hb?.interval ?? HOST_DEFAULTS.heartbeatInterval));
  const hbTimeout = val(parseDuration(hb?.timeout ?? HOST_DEFAULTS.heartbeatTimeout));
  if (hbInterval !== undefined && hbTimeout !== undefined && hbTimeout <= hbInterval)
    problems.push({
      field: 'heartbeat.timeout',
      value: hb?.timeout ?? HOST_DEFAULTS.heartbeatTimeout,
      message: `must be longer than heartbeat.interval (${formatMs(hbInterval)}), got ${formatMs(hbTimeout)}`,
    });
  const rc = rec(top.reconnect);
  const rcMin = val(parseDuration(rc?.min ?? HOST_DEFAULTS.reconnectMin));
  const rcMax = val(parseDuration(rc?.max ?? HOST_DEFAULTS.reconnectMax));
  if (rcMin !== undefined && rcMax !== undefined && rcMax < rcMin)
    problems.push({
      field: 'reconnect.max',
      value: rc?.max ?? HOST_DEFAULTS.reconnectMax,
      message: `must not be shorter than reconnect.min (${formatMs(rcMin)}), got ${formatMs(rcMax)}`,
    });

  const libvirt = top.hypervisor === 'libvirt';
  if (!libvirt && top.libvirt !== undefined)
    problems.push({
      field: 'libvirt',
      value: top.libvirt,
      message: 'libvirt settings need "hypervisor: libvirt"',
    });
  const guests = Array.isArray(top.guests) ? top.guests : [];
  const names = new Map<string, number>();
  const domains = new Map<string, number>();
  // Two guests on one channel or one VM cgroup would mean one VM's notices reach another.
  const seen = {
    channel: new Map<string, number>(),
    cgroup: new Map<string, number>(),
    qmp: new Map<string, number>(),
  };
  const once = (
    what: keyof typeof seen,
    i: number,
    key: string | undefined,
    value: unknown,
  ): void => {
    if (key === undefined) return;
    const j = seen[what].get(key);
    if (j !== undefined)
      problems.push({
        field: `guests[${i}].${what}`,
        value,
        message: `is the same as guests[${j}].${what}`,
      });
    else seen[what].set(key, i);
  };
  guests.forEach((g0, i) => {
    const g = rec(g0);
    if (!g) return;
    const f = `guests[${i}]`;
    // Which keys belong to which hypervisor: a key of the other one is an error, so that a
    // config never says one thing and does another (docs/libvirt.md, "Configuration").
    const libvirtOnly = ['domain', 'cpuMode', 'memoryMode', 'confirmTimeout'];
    const qemuOnly = ['channel', 'cgroup', 'qmp', 'balloonTimeout', 'memoryOverhead'];
    for (const k of libvirt ? qemuOnly : libvirtOnly)
      if (g[k] !== undefined)
        problems.push({
          field: `${f}.${k}`,
          value: g[k],
          message: libvirt
            ? 'is not used with "hypervisor: libvirt": libvirt gives the channel path, and actuation goes through virsh (cpuMode, memoryMode)'
            : 'needs "hypervisor: libvirt"',
        });
    if (!libvirt)
      for (const k of ['allocation', 'channel'])
        if (g[k] === undefined)
          problems.push({
            field: `${f}.${k}`,
            value: undefined,
            message: 'is required (only "hypervisor: libvirt" reads it from the domain)',
          });
    if (libvirt) {
      const d = typeof g.domain === 'string' ? g.domain : g.name;
      if (typeof d === 'string') {
        const j = domains.get(d);
        if (j !== undefined)
          problems.push({
            field: `${f}.domain`,
            value: d,
            message: `is the same as guests[${j}].domain`,
          });
        else domains.set(d, i);
      }
    }
    if (typeof g.name === 'string') {
      const prev = names.get(g.name);
      if (prev !== undefined)
        problems.push({
          field: `${f}.name`,
          value: g.name,
          message: `is already the name of guests[${prev}]; names must be unique`,
        });
      else names.set(g.name, i);
    }
    const alloc = rec(g.allocation);
    const floor = rec(g.floor);
    if (alloc && floor) {
      const aCpus = val(parseCpus(alloc.cpus));
      const fCpus = val(parseCpus(floor.cpus));
      if (aCpus !== undefined && fCpus !== undefined && fCpus > aCpus)
        problems.push({
          field: `${f}.floor.cpus`,
          value: floor.cpus,
          message: `must not exceed allocation.cpus (${aCpus}), got ${fCpus}`,
        });
      const aMem = val(parseSize(alloc.memory));
      const fMem = val(parseSize(floor.memory));
      if (aMem !== undefined && fMem !== undefined && fMem > aMem)
        problems.push({
          field: `${f}.floor.memory`,
          value: floor.memory,
          message: `must not exceed allocation.memory (${formatBytes(aMem)}), got ${formatBytes(fMem)}`,
        });
    }
    const ch = rec(g.channel);
    if (ch?.transport === 'unix') once('channel', i, resolve(ch.path), ch.path);
    else if (ch?.transport === 'tls' && typeof ch.host === 'string')
      once('channel', i, `${ch.host}:${String(ch.port)}`, `${ch.host}:${String(ch.port)}`);
    once('cgroup', i, typeof g.cgroup === 'string' ? g.cgroup : undefined, g.cgroup);
    once('qmp', i, resolve(g.qmp), g.qmp);
  });

  const t = rec(top.trigger);
  const gb = rec(t?.giveBack);
  if (t && gb) {
    const above =
      gb.memoryAvailableAbove === undefined ? undefined : val(parseSize(gb.memoryAvailableAbove));
    const below =
      t.memoryAvailableBelow === undefined ? undefined : val(parseSize(t.memoryAvailableBelow));
    if (gb.memoryAvailableAbove === undefined && gb.memoryPsiBelow === undefined)
      problems.push({
        field: 'trigger.giveBack',
        value: gb,
        message:
          'names no condition: give memoryAvailableAbove or memoryPsiBelow (where the pressure counts as cleared)',
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
      typeof gb.memoryPsiBelow === 'number' &&
      typeof t.memoryPsiAbove === 'number' &&
      gb.memoryPsiBelow >= t.memoryPsiAbove
    )
      problems.push({
        field: 'trigger.giveBack.memoryPsiBelow',
        value: gb.memoryPsiBelow,
        message: `must be below trigger.memoryPsiAbove (${t.memoryPsiAbove}), got ${gb.memoryPsiBelow}`,
      });
  }
  if (t && t.enabled === true) {
    if (t.memoryAvailableBelow === undefined && t.memoryPsiAbove === undefined)
      problems.push({
        field: 'trigger',
        value: t,
        message: 'is enabled but names no condition: give memoryAvailableBelow or memoryPsiAbove',
      });
    const step = rec(t.step);
    const stepCpus = step?.cpus === undefined ? 0 : val(parseCpus(step.cpus));
    const stepMem = step?.memory === undefined ? 0 : val(parseSize(step.memory));
    if (stepCpus === 0 && stepMem === 0)
      problems.push({
        field: 'trigger.step',
        value: t.step,
        message: 'must take something when the trigger is enabled (step.memory or step.cpus)',
      });
    const interval = val(parseDuration(t.interval ?? HOST_DEFAULTS.triggerInterval));
    if (interval !== undefined && interval < 100)
      problems.push({
        field: 'trigger.interval',
        value: t.interval,
        message: `must be at least 100ms when the trigger is enabled, got ${formatMs(interval)}`,
      });
  }
  return { problems };
}

// ---- entry points ----

type Parsed = z.output<typeof hostSchema>;

function normalise(c: Parsed, baseDir: string): HostConfig {
  const resolve = (p: string): string => path.resolve(baseDir, p);
  const libvirt = c.hypervisor === 'libvirt';
  const guests: GuestConfig[] = c.guests.map((g) => ({
    name: g.name,
    priority: g.priority,
    allocation: g.allocation
      ? { cpus: g.allocation.cpus, memoryBytes: g.allocation.memory }
      : { cpus: 0, memoryBytes: 0 },
    ...(libvirt && !g.allocation ? { allocationFromLibvirt: true } : {}),
    ...(libvirt
      ? {
          libvirt: {
            domain: g.domain ?? g.name,
            cpuMode: g.cpuMode ?? HOST_DEFAULTS.cpuMode,
            memoryMode: g.memoryMode ?? HOST_DEFAULTS.memoryMode,
            confirmTimeoutMs: g.confirmTimeout ?? ms(HOST_DEFAULTS.confirmTimeout),
          },
        }
      : {}),
    floor: { cpus: g.floor?.cpus ?? 0, memoryBytes: g.floor?.memory ?? 0 },
    channel:
      libvirt || !g.channel
        ? { transport: 'libvirt', domain: g.domain ?? g.name }
        : g.channel.transport === 'unix'
          ? { transport: 'unix', path: resolve(g.channel.path) }
          : {
              ...g.channel,
              cert: resolve(g.channel.cert),
              key: resolve(g.channel.key),
              ca: resolve(g.channel.ca),
            },
    cgroup: g.cgroup,
    qmp: g.qmp === undefined ? undefined : resolve(g.qmp),
    balloonTimeoutMs: g.balloonTimeout ?? ms(HOST_DEFAULTS.balloonTimeout),
    memoryOverheadBytes: g.memoryOverhead ?? 0,
  }));
  const t = c.trigger;
  return {
    hypervisor: libvirt
      ? {
          type: 'libvirt',
          uri: c.libvirt?.uri ?? DEFAULT_LIBVIRT_URI,
          timeoutMs: c.libvirt?.timeout ?? DEFAULT_VIRSH_TIMEOUT_MS,
          afterRestart: c.libvirt?.afterRestart ?? HOST_DEFAULTS.afterRestart,
          reapplyDeadlineMs: c.libvirt?.reapplyDeadline ?? ms(HOST_DEFAULTS.reapplyDeadline),
        }
      : { type: 'qemu' },
    stateDir: resolve(c.stateDir ?? HOST_DEFAULTS.stateDir),
    socket: resolve(c.socket ?? HOST_DEFAULTS.socket),
    socketGroup: c.socketGroup,
    socketMode: c.socketMode ?? HOST_DEFAULTS.socketMode,
    cgroup: {
      root: c.cgroup?.root ?? HOST_DEFAULTS.cgroupRoot,
      driver: c.cgroup?.driver ?? 'auto',
    },
    heartbeat: {
      intervalMs: c.heartbeat?.interval ?? ms(HOST_DEFAULTS.heartbeatInterval),
      timeoutMs: c.heartbeat?.timeout ?? ms(HOST_DEFAULTS.heartbeatTimeout),
    },
    reconnect: {
      minMs: c.reconnect?.min ?? ms(HOST_DEFAULTS.reconnectMin),
      maxMs: c.reconnect?.max ?? ms(HOST_DEFAULTS.reconnectMax),
    },
    trigger: {
      enabled: t?.enabled ?? false,
      memoryAvailableBelowBytes: t?.memoryAvailableBelow,
      memoryPsiAbove: t?.memoryPsiAbove,
      forMs: t?.for ?? ms(HOST_DEFAULTS.triggerFor),
      step: { cpus: t?.step?.cpus ?? 0, memoryBytes: t?.step?.memory ?? 0 },
      deadlineMs: t?.deadline ?? ms(HOST_DEFAULTS.triggerDeadline),
      intervalMs: t?.interval ?? ms(HOST_DEFAULTS.triggerInterval),
      cooldownMs: t?.cooldown ?? ms(HOST_DEFAULTS.triggerCooldown),
      ...(t?.giveBack
        ? {
            giveBack: {
              afterMs: t.giveBack.after ?? ms(HOST_DEFAULTS.triggerGiveBackAfter),
              ...(t.giveBack.memoryAvailableAbove !== undefined
                ? { memoryAvailableAboveBytes: t.giveBack.memoryAvailableAbove }
                : {}),
              ...(t.giveBack.memoryPsiBelow !== undefined
                ? { memoryPsiBelow: t.giveBack.memoryPsiBelow }
                : {}),
            },
          }
        : {}),
    },
    limits: { ...HOST_LIMIT_DEFAULTS, ...c.limits },
    ...(c.metrics ? { metrics: { host: c.metrics.host, port: c.metrics.port } } : {}),
    ...(c.logLevel ? { logLevel: c.logLevel } : {}),
    guests,
  };
}

/**
 * Validates a parsed YAML document. Throws CONFIG_INVALID listing every problem (field
 * path, value received, message; a misspelt key with the nearest known one).
 * `baseDir` resolves relative paths (the config file's directory); `source` names the
 * config in the message (the file, when read from one).
 */
export function validateHostConfig(
  raw: unknown,
  baseDir = process.cwd(),
  source = 'host config',
): Readonly<HostConfig> {
  // `guests: auto`: no list in the file; the domains give them (docs/libvirt.md, "guests:
  // auto"). Checked as an empty list, plus its own rule.
  const top = rec(raw);
  const auto = top?.guests === 'auto';
  const { data } = checkConfig(hostSchema, auto ? { ...top, guests: [] } : raw, {
    source,
    cross: (t) => {
      const r = crossChecks(t, baseDir);
      if (auto && t.hypervisor !== 'libvirt')
        r.problems.push({
          field: 'guests',
          value: 'auto',
          message:
            '"auto" needs "hypervisor: libvirt" (the guests are read from the domains\' <metadata>)',
        });
      return r;
    },
  });
  const cfg = normalise(data, baseDir);
  return deepFreeze(auto ? { ...cfg, autoGuests: true as const } : cfg);
}

/**
 * One guest entry as host.yaml would have it under `hypervisor: libvirt` (a domain's
 * `<metadata>`, agent/host/libvirt/auto-guests.ts), checked by the same schema and cross
 * checks as the file: CONFIG_INVALID with every problem, each field as the entry names it
 * (`priority`, `floor.memory`), `source` in the message.
 */
export function validateGuestEntry(entry: unknown, source: string): GuestConfig {
  try {
    return validateHostConfig({ hypervisor: 'libvirt', guests: [entry] }, process.cwd(), source)
      .guests[0];
  } catch (err) {
    const e = err as { code?: string; problems?: Problem[] };
    if (e.code !== 'CONFIG_INVALID' || !e.problems) throw err;
    throw configInvalid(
      source,
      e.problems.map((p) => ({ ...p, field: p.field.replace(/^guests\[0\]\.?/, '') || '(entry)' })),
    );
  }
}

export async function loadHostConfig(file: string): Promise<Readonly<HostConfig>> {
  return validateHostConfig(await readConfigFile(file), path.dirname(path.resolve(file)), file);
}
