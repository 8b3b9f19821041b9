/**
 * `nestbroker host|guest --check --config FILE`: the daemon's own config validation
 * (agent/common/config-check.ts), and nothing else. Exit 0 with a short summary when the
 * file is valid (warnings printed, they do not fail it), 2 with every problem listed when
 * it is not or cannot be read. Nothing is started or created: no directory, no socket, no
 * cgroup, no log line (docs/host-broker.md "Config reference", docs/config-guest.md).
 *
 * Users and groups are names of the machine, not of the file: they are looked up through
 * NSS (agent/common/nss.ts, read-only) and one that is missing here is a warning, since the
 * file may be checked on another machine than the one it is for.
 */
import { isNestError } from '../common/errors';
import { lookupGroup, lookupUser } from '../common/nss';
import { formatBytes } from '../common/units';
import { cpusText } from './format';
import { GUEST_DEFAULTS, loadGuestConfig } from '../guest/config';

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

/** A user or group the daemon will look up at start, by name. */
interface Account {
  field: string;
  kind: 'user' | 'group';
  name: string | number | undefined;
}

/** A warning for each named user or group this machine's NSS does not know. */
function accountWarnings(accounts: Account[]): string[] {
  const out: string[] = [];
  for (const a of accounts) {
    // A number is a uid or gid, used as it is (the daemons need no entry for it).
    if (typeof a.name !== 'string' || /^\d+$/.test(a.name)) continue;
    try {
      if (a.kind === 'user') lookupUser(a.name, a.field);
      else lookupGroup(a.name, a.field);
    } catch (err) {
      if (!isNestError(err)) throw err;
      const why = err.problems[0]?.message ?? err.message;
      out.push(`warning: ${a.field}: ${why}; the start on this machine would fail (${err.code})`);
    }
  }
  return out;
}

function plural(n: number, one: string): string {
  return `${n} ${one}${n === 1 ? '' : 's'}`;
}

async function guestSummary(config: string | undefined): Promise<Summary> {
  const file = config ?? GUEST_DEFAULTS.configFile;
  const c = await loadGuestConfig(file);
  const up = c.upstream;
  const upstream =
    up.transport === 'tls'
      ? `tls ${up.listen.host}:${up.listen.port}`
      : up.transport === 'none'
        ? 'none'
        : `${up.transport} ${up.path}`;
  const names = c.projects.map((p) => p.name).join(', ');
  const lines = [
    `${file}: valid guest config`,
    `  guest ${c.guest}, ${plural(c.projects.length, 'project')}${names ? ` (${names})` : ''}`,
    `  upstream ${upstream}; operator socket ${c.socket}; state ${c.stateDir}`,
    c.resources
      ? `  resources ${cpusText(c.resources.cpus)}, ${formatBytes(c.resources.memoryBytes)} (reserve ${formatBytes(c.reserve.memoryBytes)})`
      : `  resources detected at start (reserve ${formatBytes(c.reserve.memoryBytes)})`,
  ];
  const warnings = [
    ...c.warnings.map((w) => `warning: ${w.field}: ${w.message}`),
    ...accountWarnings([
      { field: 'socketGroup', kind: 'group', name: c.socketGroup },
      ...c.projects.map((p, i) => ({
        field: `projects[${i}].command.user`,
        kind: 'user' as const,
        name: p.command?.user,
      })),
    ]),
  ];
  return { lines, warnings };
}

interface Summary {
  lines: string[];
  warnings: string[];
}

async function hostSummary(config: string | undefined): Promise<Summary> {
  // Loaded only when asked for, as the host broker itself (a guest-only build has no host/).
  const { loadHostConfig, DEFAULT_HOST_CONFIG_PATH } = await import('../host/config');
  const file = config ?? DEFAULT_HOST_CONFIG_PATH;
  const c = await loadHostConfig(file);
  const guests = c.guests.map((g) => `${g.name} over ${g.channel.transport}`).join(', ');
  const lines = [
    `${file}: valid host config`,
    c.autoGuests
      ? '  guests: auto (every running libvirt domain with the org.nestbroker.0 channel, from its <metadata>)'
      : `  ${plural(c.guests.length, 'guest')}${guests ? ` (${guests})` : ''}`,
    `  operator socket ${c.socket}; state ${c.stateDir}; cgroup root ${c.cgroup.root}`,
    `  trigger ${c.trigger.enabled ? 'on' : 'off'}; metrics ${c.metrics ? `${c.metrics.host}:${c.metrics.port}` : 'off'}`,
  ];
  const warnings = accountWarnings([{ field: 'socketGroup', kind: 'group', name: c.socketGroup }]);
  return { lines, warnings };
}

/** Validates one daemon's config file; resolves with the exit code. */
export async function runCheck(
  daemon: 'host' | 'guest',
  config: string | undefined,
  io: CheckIo = stdio,
): Promise<number> {
  try {
    const s = daemon === 'host' ? await hostSummary(config) : await guestSummary(config);
    for (const l of s.lines) io.out(l);
    for (const w of s.warnings) io.err(w);
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
