/**
 * The guest config's defaults and bounds: the one place they live (docs/config-guest.md
 * repeats the defaults; a test checks).
 */
import type { RestartPolicy } from './config-types';

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

/** sun_path is 108 bytes on Linux, one of them the terminating NUL. */
export const MAX_SOCKET_PATH_BYTES = 107;
/** The kernel's smallest cpu.max quota is 1000µs per 100000µs period. */
export const MIN_CPU_MAX = 0.01;
/** pid_max cannot exceed 2^22 (PID_MAX_LIMIT on 64-bit). */
export const PID_MAX_LIMIT = 4_194_304;
