/**
 * The guest agent's config once validated and normalised (agent/guest/config.ts makes it;
 * docs/config-guest.md has one row per key): bytes and CPUs as numbers, durations in ms.
 */
import type { Problem } from '../common/errors';
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
  /** The log level; absent: NESTBROKER_LOG_LEVEL, else info. A reload applies it live. */
  logLevel?: LogLevel;
  projects: ProjectConfig[];
  /**
   * Things that are allowed but probably not meant (e.g. minimums above the configured
   * allocation); the agent logs them at start.
   */
  warnings: Problem[];
  /** Where this config came from (a file path, or a label for tests). */
  source: string;
}

/** pino's levels, as a config names them (`logLevel`). */
export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
