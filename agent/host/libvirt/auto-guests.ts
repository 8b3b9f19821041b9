/**
 * `guests: auto` (docs/libvirt.md, "guests: auto"): the guests are the running domains
 * that have the org.nestbroker.0 channel, each with its settings from its own `<metadata>`
 * (guest-metadata.ts), checked at this boundary by host.yaml's schema: a domain whose
 * metadata has problems is skipped with every problem logged (domain, field, value), never
 * a crash. Domains started, defined or given new metadata later arrive through the events
 * stream (events.ts: `lifecycle` Started/Defined, `metadata-change`); one undefined leaves.
 *
 *   observe  `virsh list --name`, `virsh dumpxml` (live) of each
 *   decide   guestOfDomain: a guest, not ours (no channel), or its problems
 *   act      the caller reconfigures the broker with the new list (agent/host/main.ts)
 */
import { NestError, isNestError, type Problem } from '../../common/errors';
import type { Logger } from '../../common/log';
import { validateGuestEntry, type GuestConfig, type HostConfig } from '../config';
import { parseDomainXml } from './domain-xml';
import { resolveAllocations } from './domains';
import { readGuestMetadata } from './guest-metadata';
import type { Virsh } from './virsh';

export type DomainVerdict =
  | { kind: 'guest'; guest: GuestConfig }
  /** No org.nestbroker.0 channel (or not running): not a nestbroker guest. */
  | { kind: 'not-ours'; why: string }
  | { kind: 'invalid'; problems: Problem[] };

/** What one domain is for `guests: auto`, from its live XML (pure). */
export function verdictOf(domain: string, xml: string): DomainVerdict {
  const info = parseDomainXml(xml);
  if (!info.channel) return { kind: 'not-ours', why: 'no org.nestbroker.0 channel' };
  const meta = readGuestMetadata(xml);
  const problems: Problem[] = meta.found
    ? meta.problems.map((p) => ({ ...p, field: `metadata.${p.field}` }))
    : [];
  // The domain is the one read; a guest name of its own is the metadata's `name`.
  const entry = { name: domain, ...(meta.found ? meta.entry : {}), domain };
  try {
    const guest = validateGuestEntry(entry, `domain "${domain}" <metadata>`);
    if (problems.length === 0) return { kind: 'guest', guest };
  } catch (err) {
    if (!isNestError(err, 'CONFIG_INVALID')) throw err;
    for (const p of err.problems) problems.push({ ...p, field: `metadata.${p.field}` });
  }
  if (!meta.found)
    problems.push({
      field: 'metadata',
      value: undefined,
      message: `has no <guest> element in the nestbroker namespace (docs/libvirt.md, "guests: auto")`,
    });
  return { kind: 'invalid', problems };
}

/** One domain read and judged; a guest's allocation from its persistent XML. */
export async function readDomainGuest(
  virsh: Virsh,
  cfg: Readonly<HostConfig>,
  domain: string,
): Promise<DomainVerdict> {
  let xml: string;
  try {
    if ((await virsh.domstate(domain)) !== 'running')
      return { kind: 'not-ours', why: 'not running' };
    xml = await virsh.dumpxml(domain);
  } catch (err) {
    return { kind: 'not-ours', why: (err as Error).message };
  }
  const v = verdictOf(domain, xml);
  if (v.kind !== 'guest') return v;
  try {
    const resolved = await resolveAllocations({ ...cfg, guests: [v.guest] }, virsh);
    return { kind: 'guest', guest: resolved.guests[0] };
  } catch (err) {
    if (!isNestError(err)) throw err;
    return {
      kind: 'invalid',
      problems: err.problems.map((p) => ({ ...p, field: p.field.replace(/^guests\[0\]\./, '') })),
    };
  }
}

/** Logs a skipped domain: one line for it, one per problem, naming field and value. */
export function logSkipped(log: Logger, domain: string, problems: readonly Problem[]): void {
  for (const p of problems)
    log.error(
      { domain, field: p.field, value: p.value },
      `guests: auto: domain "${domain}": ${p.field}: ${p.message}`,
    );
  log.error(
    { domain, code: 'CONFIG_INVALID', problems: problems.length },
    `guests: auto: domain "${domain}" skipped: its <metadata> has ${problems.length} problem(s)`,
  );
}

/**
 * Every running domain that is a guest, at the broker's start. Guest names must be unique
 * (a second domain claiming a name is skipped, named).
 */
export async function discoverGuests(
  virsh: Virsh,
  cfg: Readonly<HostConfig>,
  log: Logger,
): Promise<GuestConfig[]> {
  let guests: GuestConfig[] = [];
  for (const domain of await virsh.listRunning()) {
    const v = await readDomainGuest(virsh, cfg, domain);
    if (v.kind === 'not-ours') {
      log.debug({ domain, why: v.why }, 'guests: auto: not a nestbroker guest');
      continue;
    }
    if (v.kind === 'invalid') {
      logSkipped(log, domain, v.problems);
      continue;
    }
    try {
      // The same rule as for a domain that comes later: one guest a name.
      guests = nextGuests(guests, domain, v);
    } catch (err) {
      if (!isNestError(err)) throw err;
      logSkipped(log, domain, err.problems);
      continue;
    }
    log.info(
      { guest: v.guest.name, domain, priority: v.guest.priority },
      'guests: auto: domain taken as a guest',
    );
  }
  return guests;
}

/** Domain events after which a domain is read again. */
export function rereadOn(e: { type: string; detail: string }): 'read' | 'leave' | null {
  if (e.type === 'metadata-change') return 'read';
  if (e.type !== 'lifecycle') return null;
  const event = e.detail.split(/\s+/)[0];
  if (event === 'Started' || event === 'Defined' || event === 'Resumed') return 'read';
  if (event === 'Undefined') return 'leave';
  return null;
}

/** The guest list after domain `domain` was read again (`v`) or left. */
export function nextGuests(
  guests: readonly GuestConfig[],
  domain: string,
  v: DomainVerdict | 'leave',
): GuestConfig[] {
  const others = guests.filter((g) => g.libvirt?.domain !== domain);
  if (v === 'leave') return others;
  if (v.kind === 'guest') {
    if (others.some((g) => g.name === v.guest.name))
      throw new NestError(
        'CONFIG_INVALID',
        `guests: auto: domain "${domain}" names guest "${v.guest.name}", which another domain has`,
        {
          problems: [
            {
              field: 'metadata.name',
              value: v.guest.name,
              message: 'is already the name of another domain’s guest',
            },
          ],
        },
      );
    return [...others, v.guest];
  }
  // Stopped keeps its guest (its books and notices wait for its start); metadata with
  // problems keeps the settings in force, as a reload that is refused does.
  if (v.kind === 'invalid' || v.why === 'not running') return [...guests];
  return others;
}
