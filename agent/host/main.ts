/**
 * `nestbroker host [--config FILE]`: the host broker daemon. Wires the parts together:
 * config → cgroup adapter (VM cgroups under cgroup.root) → actuator (cgroup + QMP) →
 * broker (journal, books, notices) → channels to guests → watcher (trigger) → operator
 * socket. Stops cleanly on SIGTERM/SIGINT; notices in flight stay in the journal and are
 * resumed by the next start.
 */
import { promises as fs } from 'node:fs';
import yargs from 'yargs';
import { openCgroupAdapter } from '../../cgroup-adapter/index';
import type { CgroupAdapter } from '../../cgroup-adapter/types';
import { isNestError } from '../common/errors';
import { lookupGroup } from '../common/nss';
import { createLogger, type Logger } from '../common/log';
import { RpcServer } from '../common/rpc';
import { StateLock } from '../common/state-lock';
import { MetricsServer } from '../common/metrics';
import { ReconnectingChannel, type Clock } from '../transport/reconnect';
import { connectTls } from '../transport/tls';
import { connectUnix } from '../transport/unix';
import { CgroupQmpActuator } from './actuator';
import { registerHostApi } from './api';
import {
  DEFAULT_HOST_CONFIG_PATH,
  loadHostConfig,
  type GuestConfig,
  type HostConfig,
} from './config';
import { HostBroker } from './host-broker';
import { hostMetrics } from './metrics';
import { Watcher } from './watcher';

export interface RunningHost {
  config: Readonly<HostConfig>;
  broker: HostBroker;
  server: RpcServer;
  watcher: Watcher;
  /** Serving /metrics when the config asks for it. */
  metrics: MetricsServer | null;
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
): (g: GuestConfig) => ReconnectingChannel {
  return (g: GuestConfig) => {
    const chLog = log.child({ guest: g.name, transport: g.channel.transport });
    const c = g.channel;
    // docs/reliability.md: each connection to a guest takes at most this many lines from
    // it.
    const rateLimit = { perSecond: cfg.limits.messagesPerSecond, burst: cfg.limits.messageBurst };
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
  cfg: Readonly<HostConfig>,
  log: Logger,
  lock: StateLock,
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
  const broker = new HostBroker({
    config: cfg,
    actuator: new CgroupQmpActuator(adapter, log.child({ part: 'actuator' })),
    connect: channelFactory(cfg, log),
    log,
  });
  await broker.start();
  const watcher = new Watcher(cfg, broker, adapter, log.child({ part: 'watcher' }));
  watcher.start();
  const server = registerHostApi(new RpcServer(log.child({ part: 'api' })), broker, watcher);
  await server.listen(cfg.socket, { mode: cfg.socketMode, group: await groupId(cfg.socketGroup) });
  const metrics = cfg.metrics
    ? await MetricsServer.listen(
        hostMetrics(
          broker,
          cfg.guests.map((g) => g.name),
          watcher,
        ),
        cfg.metrics,
        log.child({ part: 'metrics' }),
      )
    : null;
  log.info({ socket: cfg.socket, guests: cfg.guests.map((g) => g.name) }, 'host broker ready');
  return {
    config: cfg,
    broker,
    server,
    watcher,
    metrics,
    async stop() {
      watcher.stop();
      await metrics?.close();
      await server.close();
      await broker.stop();
      await lock.release();
    },
  };
}

/** Entry of `nestbroker host` (agent/cli/nestbroker.ts). Resolves with the exit code. */
export async function runHost(argv: string[]): Promise<number> {
  // nestbroker.ts passes its whole argv: drop the subcommand's own name.
  const a = await yargs(argv[0] === 'host' ? argv.slice(1) : argv)
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
  const log = createLogger('nestbroker-host');
  let cfg: Readonly<HostConfig>;
  try {
    cfg = await loadHostConfig(a.config);
  } catch (err) {
    if (isNestError(err)) {
      // As the guest agent says it (agent/guest/main.ts): every problem, one a line.
      process.stderr.write(`nestbroker host: config refused: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  let host: RunningHost;
  try {
    host = await startHost(cfg, log);
  } catch (err) {
    log.fatal({ err }, 'host broker could not start');
    process.stderr.write(`nestbroker host: could not start: ${describeStartError(err)}\n`);
    return 1;
  }
  return new Promise<number>((resolve) => {
    const stop = (sig: string): void => {
      log.info({ signal: sig }, 'stopping');
      void host.stop().then(() => resolve(0));
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}

/** `(CODE) message` for a start-up failure: the code is what scripts branch on. */
export function describeStartError(err: unknown): string {
  const code = (err as { code?: unknown }).code;
  const message = err instanceof Error ? err.message : String(err);
  return typeof code === 'string' ? `(${code}) ${message}` : message;
}
