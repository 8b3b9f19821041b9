/**
 * A reload of the host broker's config (SIGHUP, `systemctl reload`, `nestctl reload`;
 * docs/host-broker.md, "Reload"). The new file is validated like at start; an invalid one
 * is refused with every problem and the config in force stays. A valid one is compared
 * with the config in force and what can change live is applied, each change logged:
 *
 *   guest added       its channel opened; its notices left unfinished in the journal from
 *                     an earlier time in the config resumed
 *   guest removed     its channel closed (refused while it has a notice in flight); its
 *                     journal stays, so a guest added again keeps its books
 *   guest changed     allocation, floor, priority, cgroup, qmp, balloonTimeout,
 *                     memoryOverhead read from the new config from now on (the books are
 *                     replayed over the new allocation); a new channel is reconnected
 *   trigger, logLevel in force at once
 *
 * What the broker bound at start (hypervisor, stateDir, socket, socketGroup, socketMode,
 * cgroup, metrics, heartbeat, reconnect, limits) keeps its old value, named in a warning.
 * diffHostConfig and reloadProblems are pure.
 */
import type { Problem } from '../common/errors';
import type { Logger } from '../common/log';
import type { GuestConfig, HostConfig } from './config';

export const HOST_RESTART_KEYS = [
  // The actuator, virsh and the channels are chosen by it at start (agent/host/main.ts).
  'hypervisor',
  'stateDir',
  'socket',
  'socketGroup',
  'socketMode',
  'cgroup',
  'metrics',
  'heartbeat',
  'reconnect',
  'limits',
] as const satisfies readonly (keyof HostConfig)[];

export interface GuestChange {
  name: string;
  fields: string[];
  /** The channel changed: the guest is reconnected. */
  reconnect: boolean;
}

export interface HostConfigDiff {
  added: GuestConfig[];
  removed: GuestConfig[];
  changed: GuestChange[];
  live: { field: string; before: unknown; after: unknown }[];
  restart: { field: string; before: unknown; after: unknown }[];
}

const same = (a: unknown, b: unknown): boolean => JSON.stringify(a) === JSON.stringify(b);

const GUEST_FIELDS = [
  'priority',
  'allocation',
  'floor',
  'channel',
  'cgroup',
  'qmp',
  'balloonTimeoutMs',
  'memoryOverheadBytes',
] as const satisfies readonly (keyof GuestConfig)[];
/** The config file's names of normalised keys. */
const FILE_KEY: Record<string, string> = {
  balloonTimeoutMs: 'balloonTimeout',
  memoryOverheadBytes: 'memoryOverhead',
};

export function diffHostConfig(
  before: Readonly<HostConfig>,
  after: Readonly<HostConfig>,
): HostConfigDiff {
  const d: HostConfigDiff = { added: [], removed: [], changed: [], live: [], restart: [] };
  for (const k of HOST_RESTART_KEYS)
    if (!same(before[k], after[k]))
      d.restart.push({ field: k, before: before[k], after: after[k] });
  for (const k of ['trigger', 'logLevel'] as const)
    if (!same(before[k], after[k])) d.live.push({ field: k, before: before[k], after: after[k] });
  const old = new Map(before.guests.map((g) => [g.name, g]));
  const next = new Map(after.guests.map((g) => [g.name, g]));
  for (const g of before.guests) if (!next.has(g.name)) d.removed.push(g);
  for (const n of after.guests) {
    const g = old.get(n.name);
    if (!g) {
      d.added.push(n);
      continue;
    }
    const fields = GUEST_FIELDS.filter((f) => !same(g[f], n[f]));
    if (fields.length > 0)
      d.changed.push({
        name: n.name,
        fields: fields.map((f) => FILE_KEY[f] ?? f),
        reconnect: fields.includes('channel'),
      });
  }
  return d;
}

/** The config put in force: the new one, with the old value of every key that needs a restart. */
export function effectiveHostConfig(
  before: Readonly<HostConfig>,
  after: Readonly<HostConfig>,
): Readonly<HostConfig> {
  const out = { ...after } as Record<string, unknown>;
  for (const k of HOST_RESTART_KEYS) {
    if (before[k] === undefined) delete out[k];
    else out[k] = before[k];
  }
  return Object.freeze(out as unknown as HostConfig);
}

/**
 * What makes a valid file impossible to apply now: a removed guest with a notice in flight
 * (its outcome would have no one to record it), a guest added with a VM cgroup on a broker
 * that started without any (no cgroup adapter to write its limits).
 */
export function reloadProblems(
  d: HostConfigDiff,
  pendingOf: (guest: string) => string[],
  haveCgroups: boolean,
): Problem[] {
  const problems: Problem[] = [];
  for (const g of d.removed) {
    const pending = pendingOf(g.name);
    if (pending.length > 0)
      problems.push({
        field: `guests[name=${g.name}]`,
        value: pending,
        message: `removed while ${pending.length} notice(s) are in flight (${pending.join(', ')}); remove it once they are final, or cancel them`,
      });
  }
  if (!haveCgroups)
    for (const g of d.added)
      if (g.cgroup)
        problems.push({
          field: `guests[name=${g.name}].cgroup`,
          value: g.cgroup,
          message:
            'the host broker started without VM cgroups (no guest had one): restart it to add a guest with a cgroup',
        });
  return problems;
}

export interface HostReloadReport {
  source: string;
  added: string[];
  removed: string[];
  changed: { name: string; fields: string[] }[];
  live: string[];
  restartNeeded: string[];
  errors: Problem[];
}

/** Logs what the diff changes (the broker and watcher are reconfigured by the caller). */
export function logHostReload(d: HostConfigDiff, source: string, log: Logger): HostReloadReport {
  for (const r of d.restart)
    log.warn(
      { field: r.field, value: r.after, inForce: r.before },
      `reload: ${r.field} cannot change while the broker runs; the old value stays until a restart`,
    );
  for (const g of d.removed) log.info({ guest: g.name }, 'reload: guest removed (channel closed)');
  for (const g of d.added)
    log.info({ guest: g.name, allocation: g.allocation }, 'reload: guest added');
  for (const c of d.changed)
    log.info(
      { guest: c.name, fields: c.fields },
      c.reconnect ? 'reload: guest changed; its channel reconnected' : 'reload: guest changed',
    );
  for (const l of d.live)
    log.info({ field: l.field, before: l.before, after: l.after }, `reload: ${l.field} changed`);
  return {
    source,
    added: d.added.map((g) => g.name),
    removed: d.removed.map((g) => g.name),
    changed: d.changed.map((c) => ({ name: c.name, fields: c.fields })),
    live: d.live.map((l) => l.field),
    restartNeeded: d.restart.map((r) => r.field),
    errors: [],
  };
}
