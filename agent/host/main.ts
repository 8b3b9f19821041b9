/**
 * `nestbroker host [--config FILE]`: the host broker daemon. Wires the parts together:
 * config → cgroup adapter (VM cgroups under cgroup.root) → actuator (cgroup + QMP) →
 * broker (journal, books, notices) → channels to guests → watcher (trigger) → operator
 * socket. Stops cleanly on SIGTERM/SIGINT; notices in flight stay in the journal and are
 * resumed by the next start.
 */
import { catchStopSignals } from '../common/stop-signals';
import { promises as fs } from 'node:fs';
import { openCgroupAdapter } from '../../cgroup-adapter/index';
import type { CgroupAdapter } from '../../cgroup-adapter/types';
import { isNestError } from '../common/errors';
import { lookupGroup } from '../common/nss';
import { createLogger, LOG_FORMATS, type Logger } from '../common/log';
import { quickDaemonArgs } from '../common/daemon-args';
import { RpcServer } from '../common/rpc';
import { StateLock } from '../common/state-lock';
import type { MetricsServer } from '../common/metrics';
import { ReconnectingChannel, type Clock } from '../transport/reconnect';
import { connectTls } from '../transport/tls';
import { connectUnix } from '../transport/unix';
import { CgroupQmpActuator, type VmActuator } from './actuator';
import { LibvirtActuator } from './libvirt/actuator';
import { LibvirtDomains, resolveAllocations } from './libvirt/domains';
import { followRestarts } from './libvirt/restart-books';
import {
  discoverGuests,
  logSkipped,
  nextGuests,
  readDomainGuest,
  rereadOn,
} from './libvirt/auto-guests';
import type { DomainEvent } from './libvirt/events';
import { Virsh } from './libvirt/virsh';
import { registerHostApi } from './api';
import {
  DEFAULT_HOST_CONFIG_PATH,
  loadHostConfig,
  type GuestConfig,
  type HostConfig,
} from './config';
import { HostBroker } from './host-broker';
import { Watcher } from './watcher';
import {
  diffHostConfig,
  effectiveHostConfig,
  logHostReload,
  reloadProblems,
  type HostReloadReport,
} from './reload';
import type { Problem } from '../common/errors';

export interface RunningHost {
  /** Replaced by a reload (agent/host/reload.ts). */
  config: Readonly<HostConfig>;
  /** The VM cgroups' adapter; null when no guest had a cgroup at start. */
  adapter: CgroupAdapter | null;
  broker: HostBroker;
  server: RpcServer;
  watcher: Watcher;
  /** Serving /metrics when the config asks for it. */
  metrics: MetricsServer | null;
  /** With `hypervisor: libvirt`: the domains it follows (events, live XML). */
  domains?: LibvirtDomains;
  /** With `hypervisor: libvirt`: the restarts it follows; `done()` once all are handled. */
  restarts?: { done: () => Promise<void> };
  /** With `guests: auto`: the domain events followed; `done()` once all are applied. */
  auto?: { done: () => Promise<void> };
  stop(): Promise<void>;
}

/** The operator socket's group → gid, through NSS (agent/common/nss.ts). */
async function groupId(name: string | undefined): Promise<number | undefined> {
  if (name === undefined) return undefined;
  if (/^\d+$/.test(name)) return Number(name);
  return lookupGroup(name, 'socketGroup').gid;
}

/**
 * The host's side of each guest channel: one long-lived ReconnectingChannel
 * (agent/transport/reconnect.ts) per guest, which reconnects with exponential backoff and
 * jitter and pings every heartbeat.interval; a guest that answers none of
 * ceil(timeout / interval) pings in a row is dropped and reconnected (docs/host-broker.md:
 * reconnect with backoff; heartbeats detect a dead peer). The connection underneath answers
 * the guest's pings itself (channel.ts, answerPings). A guest that is down is not an error:
 * its notices wait in the journal and are sent when it says hello.
 */
export function channelFactory(
  cfg: Readonly<HostConfig>,
  log: Logger,
  clock?: Clock,
  domains?: LibvirtDomains,
): (g: GuestConfig) => ReconnectingChannel {
  return (g: GuestConfig) => {
    const chLog = log.child({ guest: g.name, transport: g.channel.transport });
    const c = g.channel;
    // docs/reliability.md: each connection to a guest takes at most this many lines from
    // it.
    const rateLimit = { perSecond: cfg.limits.messagesPerSecond, burst: cfg.limits.messageBurst };
    if (c.transport === 'libvirt') {
      if (!domains) throw new Error(`guest "${g.name}": a libvirt channel needs LibvirtDomains`);
      // docs/libvirt.md, "Life-cycle": the socket path is read from the domain's live XML
      // at every attempt (it changes with the domain id at every start), and a domain that
      // starts again is retried at once rather than at the end of the backoff.
      const channel = new ReconnectingChannel({
        connect: async () => {
          const socketPath = await domains.channelPath(c.domain);
          const ch = await connectUnix(socketPath, { log: chLog, rateLimit });
          chLog.info({ path: socketPath }, 'connected to the domain channel');
          domains.noteChannel(g.name, c.domain, socketPath);
          return ch;
        },
        backoff: { initialMs: cfg.reconnect.minMs, maxMs: cfg.reconnect.maxMs },
        heartbeat: heartbeatFor(cfg.heartbeat),
        clock,
        log: chLog,
        // Removed again when this channel is closed (a reload that reconnects the guest
        // makes a new one): the domains' emitter outlives every channel.
        wake: (retry) => domains.onDomainBack(g.name, retry),
      });
      return channel.start();
    }
    const connect =
      c.transport === 'unix'
        ? () => connectUnix(c.path, { log: chLog, rateLimit })
        : async () =>
            connectTls({
              host: c.host,
              port: c.port,
              cert: await fs.readFile(c.cert),
              key: await fs.readFile(c.key),
              ca: await fs.readFile(c.ca),
              servername: c.servername,
              log: chLog,
              rateLimit,
            });
    return new ReconnectingChannel({
      connect,
      backoff: { initialMs: cfg.reconnect.minMs, maxMs: cfg.reconnect.maxMs },
      heartbeat: heartbeatFor(cfg.heartbeat),
      clock,
      log: chLog,
    }).start();
  };
}

/** heartbeat.timeout as a count of missed pings: the first whole number of intervals past it. */
export function heartbeatFor(h: HostConfig['heartbeat']): { intervalMs: number; missed: number } {
  return { intervalMs: h.intervalMs, missed: Math.max(1, Math.ceil(h.timeoutMs / h.intervalMs)) };
}

export async function startHost(cfg: Readonly<HostConfig>, log: Logger): Promise<RunningHost> {
  // One host broker per state directory (agent/common/state-lock.ts): two would resume the
  // same journaled notices and actuate twice. Taken before anything else is touched.
  await fs.mkdir(cfg.stateDir, { recursive: true, mode: 0o700 });
  const lock = await StateLock.acquire(cfg.stateDir, 'nestbroker host');
  try {
    return await startHostLocked(cfg, log, lock);
  } catch (err) {
    await lock.release();
    throw err;
  }
}

async function startHostLocked(
  fileCfg: Readonly<HostConfig>,
  log: Logger,
  lock: StateLock,
): Promise<RunningHost> {
  let cfg = fileCfg;
  let domains: LibvirtDomains | undefined;
  let libvirt: VmActuator | undefined;
  let running: RunningHost | undefined;
  if (cfg.hypervisor.type === 'libvirt') {
    // docs/libvirt.md: everything through virsh; no cgroup of libvirt's is touched by us.
    const virsh = new Virsh({ uri: cfg.hypervisor.uri, timeoutMs: cfg.hypervisor.timeoutMs });
    // `guests: auto`: the running domains with the channel, from their <metadata>.
    if (cfg.autoGuests)
      cfg = { ...cfg, guests: await discoverGuests(virsh, cfg, log.child({ part: 'libvirt' })) };
    cfg = await resolveAllocations(cfg, virsh);
    // The guests in force, as a function: those of the running host once there is one (a
    // reload and `guests: auto` change them), this config's until then.
    const resolved = cfg;
    domains = new LibvirtDomains(
      virsh,
      () => running?.config.guests ?? resolved.guests,
      log.child({ part: 'libvirt' }),
    );
    domains.follow();
    libvirt = new LibvirtActuator(domains, log.child({ part: 'actuator' }));
  }
  try {
    running = await startHostWith(cfg, log, lock, libvirt, domains);
    return running;
  } catch (err) {
    await domains?.stop();
    throw err;
  }
}

async function startHostWith(
  cfg: Readonly<HostConfig>,
  log: Logger,
  lock: StateLock,
  libvirt: VmActuator | undefined,
  domains: LibvirtDomains | undefined,
): Promise<RunningHost> {
  let adapter: CgroupAdapter | null = null;
  if (cfg.guests.some((g) => g.cgroup)) {
    // The VM cgroups are libvirt's (or the demo's): we never create or remove them,
    // only read them and set their limits. systemd-style names (machine-qemu\x2d1…).
    adapter = await openCgroupAdapter({
      root: cfg.cgroup.root,
      driver: cfg.cgroup.driver,
      names: 'systemd',
      log: log.child({ part: 'cgroup' }),
    });
  }
  // Built once: libvirt's, or the VM cgroups' (when a guest has one; a libvirt guest never
  // does, docs/libvirt.md "Configuration") and QMP's.
  const actuator = libvirt ?? new CgroupQmpActuator(adapter, log.child({ part: 'actuator' }));
  const broker = new HostBroker({
    config: cfg,
    actuator,
    connect: channelFactory(cfg, log, undefined, domains),
    log,
  });
  await broker.start();
  // docs/libvirt.md, "Books": a domain started again has its persistent vCPUs and memory.
  // With `libvirt.afterRestart: reapply` the reclaims in force are taken back again, and a
  // restart while the broker was down is caught up now.
  const restarts =
    domains && cfg.hypervisor.type === 'libvirt'
      ? followRestarts(domains, broker, () => host.config.guests, log.child({ part: 'libvirt' }), {
          afterRestart: cfg.hypervisor.afterRestart,
          reapplyDeadlineMs: cfg.hypervisor.reapplyDeadlineMs,
        })
      : null;
  const watcher = new Watcher(cfg, broker, adapter, log.child({ part: 'watcher' }));
  watcher.start();
  const server = registerHostApi(
    new RpcServer(log.child({ part: 'api' })),
    broker,
    watcher,
    domains ? { domains, guests: () => host.config.guests } : undefined,
  );
  await server.listen(cfg.socket, { mode: cfg.socketMode, group: await groupId(cfg.socketGroup) });
  // The guest names as a function: a reload may add or remove guests (agent/host/reload.ts).
  const metrics = cfg.metrics
    ? await serveMetrics(
        cfg.metrics,
        broker,
        () => host.config.guests.map((g) => g.name),
        log,
        watcher,
      )
    : null;
  log.info({ socket: cfg.socket, guests: cfg.guests.map((g) => g.name) }, 'host broker ready');
  const host: RunningHost = {
    config: cfg,
    adapter,
    broker,
    server,
    watcher,
    metrics,
    ...(domains ? { domains } : {}),
    ...(restarts ? { restarts } : {}),
    async stop() {
      restarts?.stop();
      watcher.stop();
      await metrics?.close();
      await server.close();
      await broker.stop();
      await domains?.stop();
      await lock.release();
    },
  };
  // After `host` exists: the follower reads its guests through it.
  restarts?.catchUp();
  const auto =
    domains && cfg.autoGuests
      ? followAutoGuests(host, domains, log.child({ part: 'libvirt' }), () => restarts?.catchUp())
      : null;
  if (auto) {
    host.auto = auto;
    const stop = host.stop;
    host.stop = async () => {
      auto.stop();
      await stop();
    };
  }
  return host;
}

/**
 * A new config in force, from a reload or from `guests: auto`: every part that holds the
 * guest list gets the new one: the broker (reconnecting `reconnect`) and the watcher; the
 * rest (libvirt's domains, the restart follower, the API) read `host.config`.
 */
function applyHostConfig(
  host: RunningHost,
  cfg: Readonly<HostConfig>,
  reconnect: readonly string[],
): void {
  host.config = cfg;
  host.broker.reconfigure(cfg, reconnect);
  host.watcher.setConfig(cfg);
}

/**
 * `guests: auto` after the start (docs/libvirt.md, "guests: auto"): a domain started,
 * defined or given new metadata is read again and the broker reconfigured with the new
 * guest list, one domain at a time; an undefined one leaves. A domain whose metadata has
 * problems is logged and changes nothing (its guest, if any, keeps the settings in force);
 * a guest with notices in flight is never removed.
 */
function followAutoGuests(
  host: RunningHost,
  domains: LibvirtDomains,
  log: Logger,
  caughtUp: () => void,
): { stop: () => void; done: () => Promise<void> } {
  let chain: Promise<void> = Promise.resolve();
  const apply = async (domain: string, what: 'read' | 'leave'): Promise<void> => {
    const v =
      what === 'leave' ? 'leave' : await readDomainGuest(domains.virsh, host.config, domain);
    if (v !== 'leave' && v.kind === 'invalid') return logSkipped(log, domain, v.problems);
    const before = host.config.guests;
    const old = before.find((g) => g.libvirt?.domain === domain);
    let next: GuestConfig[];
    try {
      next = nextGuests(before, domain, v);
    } catch (err) {
      if (!isNestError(err)) throw err;
      return logSkipped(log, domain, err.problems);
    }
    const now = next.find((g) => g.libvirt?.domain === domain);
    if (old && !now && host.broker.status(old.name).pending.length > 0) {
      log.warn(
        { guest: old.name, domain },
        'guests: auto: the domain left, but its guest has notices in flight: kept',
      );
      return;
    }
    if (JSON.stringify(old) === JSON.stringify(now)) return;
    applyHostConfig(
      host,
      { ...host.config, guests: next },
      old && now && old.name === now.name ? [now.name] : [],
    );
    log.info(
      {
        domain,
        added: !old && now ? now.name : undefined,
        removed: old && !now ? old.name : undefined,
        changed: old && now ? now.name : undefined,
      },
      'guests: auto: guest list changed',
    );
    // A guest that came with its domain's start: its books follow libvirt (and re-apply).
    if (now) caughtUp();
  };
  const onEvent = (e: DomainEvent): void => {
    const what = rereadOn(e);
    if (!what) return;
    chain = chain
      .then(() => apply(e.domain, what))
      .catch((err: unknown) =>
        log.error({ err, domain: e.domain }, 'guests: auto: could not follow the domain'),
      );
  };
  // virsh event started again: events may have been missed; every domain is read again.
  const onResync = (): void => {
    chain = chain
      .then(async () => {
        const running = await domains.virsh.listRunning();
        const known = host.config.guests.flatMap((g) => (g.libvirt ? [g.libvirt.domain] : []));
        for (const d of new Set([...running, ...known])) await apply(d, 'read');
      })
      .catch((err: unknown) =>
        log.error({ err }, 'guests: auto: could not read the domains again'),
      );
  };
  domains.on('domain-event', onEvent);
  domains.on('resync', onResync);
  return {
    stop: () => {
      domains.off('domain-event', onEvent);
      domains.off('resync', onResync);
    },
    done: () => chain,
  };
}

/** What a reload answers (`nestctl reload`, and the log lines of a SIGHUP). */
export type HostReloadResult =
  | { ok: true; report: HostReloadReport }
  | { ok: false; source: string; code: string; problems: Problem[] };

/**
 * Reloads `file` into a running broker, one reload at a time (agent/host/reload.ts). An
 * invalid file, or one that cannot be applied now, is refused: every problem logged, the
 * config in force stays.
 */
export function hostReloader(
  host: RunningHost,
  file: string,
  log: Logger,
): (trigger: string) => Promise<HostReloadResult> {
  let chain: Promise<unknown> = Promise.resolve();
  const refuse = (code: string, problems: Problem[]): HostReloadResult => {
    for (const p of problems)
      log.error({ field: p.field, value: p.value }, `reload refused: ${p.field}: ${p.message}`);
    log.error(
      { code, problems: problems.length, config: file },
      'reload refused: the config has problems; the config in force stays',
    );
    return { ok: false, source: file, code, problems };
  };
  const run = async (trigger: string): Promise<HostReloadResult> => {
    log.info({ trigger, config: file }, 'reload: reading the config');
    let next: Readonly<HostConfig>;
    try {
      // As at start (startHostLocked): a libvirt guest without an allocation in the file
      // gets the domain's, or the diff would see its allocation drop to 0.
      next = await loadHostConfig(file);
      // `guests: auto`: the guests are the domains' (followed by their events), not the file's.
      if (next.autoGuests && host.config.autoGuests)
        next = { ...next, guests: [...host.config.guests] };
      if (host.domains) next = await resolveAllocations(next, host.domains.virsh);
    } catch (err) {
      if (!isNestError(err)) throw err;
      return refuse(
        err.code,
        err.problems.length
          ? err.problems
          : [{ field: '(file)', value: file, message: err.message }],
      );
    }
    const d = diffHostConfig(host.config, next);
    const problems = reloadProblems(d, (g) => host.broker.status(g).pending, host.adapter !== null);
    if (problems.length > 0) return refuse('CONFIG_INVALID', problems);
    const report = logHostReload(d, file, log);
    const cfg = effectiveHostConfig(host.config, next);
    if (d.live.some((l) => l.field === 'logLevel'))
      log.level = cfg.logLevel ?? process.env.NESTBROKER_LOG_LEVEL ?? 'info';
    applyHostConfig(
      host,
      cfg,
      d.changed.filter((c) => c.reconnect).map((c) => c.name),
    );
    log.info(
      {
        added: report.added,
        removed: report.removed,
        changed: report.changed.map((c) => c.name),
        live: report.live,
        restartNeeded: report.restartNeeded,
      },
      'reload: config applied',
    );
    return { ok: true, report };
  };
  return (trigger) => {
    const p = chain.then(() => run(trigger));
    chain = p.catch(() => undefined);
    return p;
  };
}

/**
 * prom-client and the metrics code are loaded only when metrics are on (docs/performance.md,
 * "Footprint: what each step saved": ~12 MiB of an idle broker's RSS otherwise).
 */
async function serveMetrics(
  at: NonNullable<HostConfig['metrics']>,
  broker: HostBroker,
  guestNames: () => readonly string[],
  log: Logger,
  watcher?: Watcher,
): Promise<MetricsServer> {
  const { MetricsServer } = await import('../common/metrics');
  const { hostMetrics } = await import('./metrics');
  const registry = hostMetrics(broker, guestNames, watcher);
  return MetricsServer.listen(registry, at, log.child({ part: 'metrics' }));
}

/** Entry of `nestbroker host` (agent/cli/nestbroker.ts). Resolves with the exit code. */
export async function runHost(argv: string[]): Promise<number> {
  // nestbroker.ts passes its whole argv: drop the subcommand's own name.
  const own = argv[0] === 'host' ? argv.slice(1) : argv;
  const quick = quickDaemonArgs(['host', ...own], LOG_FORMATS);
  const a =
    quick && !quick.logFormat && !quick.check
      ? { config: quick.config ?? DEFAULT_HOST_CONFIG_PATH }
      : await parseHostArgs(own);
  // A SIGHUP before the broker is up must not end it (the default action): it is applied
  // once the broker is ready.
  let hupPending = false;
  const early = (): void => {
    hupPending = true;
  };
  process.on('SIGHUP', early);
  const log = createLogger('nestbroker-host');
  let cfg: Readonly<HostConfig>;
  try {
    cfg = await loadHostConfig(a.config);
  } catch (err) {
    process.off('SIGHUP', early);
    if (isNestError(err)) {
      // As the guest agent says it (agent/guest/main.ts): every problem, one a line.
      process.stderr.write(`nestbroker host: config refused: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  // Children inherit the root's level unless they set their own (pino).
  if (cfg.logLevel) log.level = cfg.logLevel;
  const stopSignals = catchStopSignals();
  let host: RunningHost;
  try {
    host = await startHost(cfg, log);
  } catch (err) {
    stopSignals.dispose();
    process.off('SIGHUP', early);
    log.fatal({ err }, 'host broker could not start');
    process.stderr.write(`nestbroker host: could not start: ${describeStartError(err)}\n`);
    return 1;
  }
  const reload = hostReloader(host, a.config, log);
  host.server.handle('reload', () => reload('nestctl reload'));
  const onHup = (): void => {
    reload('SIGHUP').catch((err: unknown) => log.error({ err }, 'reload failed'));
  };
  process.on('SIGHUP', onHup);
  process.off('SIGHUP', early);
  if (hupPending) onHup();
  const sig = await stopSignals.next();
  log.info({ signal: sig }, 'stopping');
  process.off('SIGHUP', onHup);
  await host.stop();
  return 0;
}

/** Anything but the plain `--config FILE`: yargs, loaded now (help, errors). */
async function parseHostArgs(argv: string[]): Promise<{ config: string }> {
  const { default: yargs } = await import('yargs');
  return yargs(argv)
    .scriptName('nestbroker host')
    .usage('$0 [--config FILE]\n\nRuns the host broker (the VM-level broker) in the foreground.')
    .option('config', {
      alias: 'c',
      type: 'string',
      default: DEFAULT_HOST_CONFIG_PATH,
      describe: 'host config (YAML); see docs/host-broker.md',
    })
    .strict()
    .help()
    .parseAsync();
}

/** `(CODE) message` for a start-up failure: the code is what scripts branch on. */
export function describeStartError(err: unknown): string {
  const code = (err as { code?: unknown }).code;
  const message = err instanceof Error ? err.message : String(err);
  return typeof code === 'string' ? `(${code}) ${message}` : message;
}
