/**
 * `nestbroker host|guest --check --config FILE`: the daemon's own config validation
 * (agent/common/config-check.ts), and nothing else. Exit 0 with a short summary when the
 * file is valid (warnings printed, they do not fail it), 2 with every problem listed when
 * it is not or cannot be read. Nothing is started or created: no directory, no socket, no
 * cgroup, no log line (docs/host-broker.md "Config reference", docs/config-guest.md).
 */
import { isNestError } from '../common/errors';
import { formatBytes } from '../common/units';
import { cpusText } from './format';
import { GUEST_DEFAULTS, loadGuestConfig, type GuestConfig } from '../guest/config';

/** Exit codes of `--check` (the daemons exit 2 on a bad config too). */
export const CHECK_EXIT = { VALID: 0, ERROR: 1, INVALID: 2 } as const;

export interface CheckIo {
  out(line: string): void;
  err(line: string): void;
}

const stdio: CheckIo = {
  out: (l) => process.stdout.write(`${l}\n`),
  err: (l) => process.stderr.write(`${l}\n`),
};

function plural(n: number, one: string): string {
  return `${n} ${one}${n === 1 ? '' : 's'}`;
}

function guestSummary(file: string, c: GuestConfig): string[] {
  const up = c.upstream;
  const upstream =
    up.transport === 'tls'
      ? `tls ${up.listen.host}:${up.listen.port}`
      : up.transport === 'none'
        ? 'none'
        : `${up.transport} ${up.path}`;
  const names = c.projects.map((p) => p.name).join(', ');
  return [
    `${file}: valid guest config`,
    `  guest ${c.guest}, ${plural(c.projects.length, 'project')}${names ? ` (${names})` : ''}`,
    `  upstream ${upstream}; operator socket ${c.socket}; state ${c.stateDir}`,
    c.resources
      ? `  resources ${cpusText(c.resources.cpus)}, ${formatBytes(c.resources.memoryBytes)} (reserve ${formatBytes(c.reserve.memoryBytes)})`
      : `  resources detected at start (reserve ${formatBytes(c.reserve.memoryBytes)})`,
  ];
}

async function hostSummary(config: string | undefined): Promise<string[]> {
  // Loaded only when asked for, as the host broker itself (a guest-only build has no host/).
  const { loadHostConfig, DEFAULT_HOST_CONFIG_PATH } = await import('../host/config');
  const file = config ?? DEFAULT_HOST_CONFIG_PATH;
  const c = await loadHostConfig(file);
  const guests = c.guests.map((g) => `${g.name} over ${g.channel.transport}`).join(', ');
  return [
    `${file}: valid host config`,
    `  ${plural(c.guests.length, 'guest')}${guests ? ` (${guests})` : ''}`,
    `  operator socket ${c.socket}; state ${c.stateDir}; cgroup root ${c.cgroup.root}`,
    `  trigger ${c.trigger.enabled ? 'on' : 'off'}; metrics ${c.metrics ? `${c.metrics.host}:${c.metrics.port}` : 'off'}`,
  ];
}

/** Validates one daemon's config file; resolves with the exit code. */
export async function runCheck(
  daemon: 'host' | 'guest',
  config: string | undefined,
  io: CheckIo = stdio,
): Promise<number> {
  try {
    if (daemon === 'host') for (const l of await hostSummary(config)) io.out(l);
    else {
      const file = config ?? GUEST_DEFAULTS.configFile;
      const c = await loadGuestConfig(file);
      for (const l of guestSummary(file, c)) io.out(l);
      for (const w of c.warnings) io.err(`warning: ${w.field}: ${w.message}`);
    }
    return CHECK_EXIT.VALID;
  } catch (err) {
    if (isNestError(err, 'CONFIG_INVALID') || isNestError(err, 'CONFIG_UNREADABLE')) {
      io.err(`nestbroker ${daemon} --check: (${err.code}) ${err.message}`);
      return CHECK_EXIT.INVALID;
    }
    io.err(`nestbroker ${daemon} --check: ${err instanceof Error ? err.message : String(err)}`);
    return CHECK_EXIT.ERROR;
  }
}
