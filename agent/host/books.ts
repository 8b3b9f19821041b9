/**
 * The guests' books: what each VM is entitled to. Pure functions over plain records; the
 * host broker journals the records (docs/architecture.md, "A notice, end to end").
 *
 *   allocation  what the operator configured: the top, what a restore returns to
 *   floor       a reclaim never takes the guest below this
 *   granted     the guest's entitlement now: lowered when a reclaim is ISSUED (the
 *               resources are marked deallocated before the notice is sent), raised when
 *               a restore is issued, put back when a reclaim is cancelled or abandoned
 *
 * Nothing the guest reports changes the books: a guest that claims to have freed more
 * than the notice asked for changes nothing (never trust a guest beyond the books).
 */
import { NestError, type Problem } from '../common/errors';
import { formatBytes } from '../common/units';
import type { Resources } from '../broker/types';

export interface GuestBooks {
  guest: string;
  allocation: Resources;
  floor: Resources;
  granted: Resources;
  /** What the VM's cgroup/balloon were last set to (undefined: never touched by us). */
  actuated?: Resources;
  /** Last notice sequence number issued to this guest (notices are ordered by it). */
  seq: number;
}

/** CPUs are compared in thousandths: 0.1 + 0.2 must equal 0.3 here. */
const milli = (c: number): number => Math.round(c * 1000);
export const addCpus = (a: number, b: number): number => (milli(a) + milli(b)) / 1000;

export function newBooks(guest: string, allocation: Resources, floor: Resources): GuestBooks {
  return {
    guest,
    allocation: { ...allocation },
    floor: { ...floor },
    granted: { ...allocation },
    seq: 0,
  };
}

/** What a reclaim of `change` would leave, or every reason it cannot be issued. */
export function checkReclaim(
  books: GuestBooks,
  change: Resources,
): { ok: true; allocation: Resources } | { ok: false; problems: Problem[] } {
  const problems: Problem[] = [];
  if (change.memoryBytes < 0 || change.cpus < 0)
    problems.push({
      field: 'change',
      value: change,
      message: 'a reclaim cannot take a negative amount',
    });
  if (change.memoryBytes === 0 && milli(change.cpus) === 0)
    problems.push({
      field: 'change',
      value: change,
      message: 'a reclaim must take some memory or some CPUs',
    });
  const memoryLeft = books.granted.memoryBytes - change.memoryBytes;
  const cpusLeft = addCpus(books.granted.cpus, -change.cpus);
  if (change.memoryBytes > books.granted.memoryBytes)
    problems.push({
      field: 'memory',
      value: change.memoryBytes,
      message: `guest "${books.guest}" has ${formatBytes(books.granted.memoryBytes)}; cannot take ${formatBytes(change.memoryBytes)}`,
    });
  else if (memoryLeft < books.floor.memoryBytes)
    problems.push({
      field: 'memory',
      value: change.memoryBytes,
      message: `taking ${formatBytes(change.memoryBytes)} would leave guest "${books.guest}" ${formatBytes(memoryLeft)}, below its floor of ${formatBytes(books.floor.memoryBytes)}`,
    });
  if (milli(change.cpus) > milli(books.granted.cpus))
    problems.push({
      field: 'cpus',
      value: change.cpus,
      message: `guest "${books.guest}" has ${books.granted.cpus} CPUs; cannot take ${change.cpus}`,
    });
  else if (milli(cpusLeft) < milli(books.floor.cpus))
    problems.push({
      field: 'cpus',
      value: change.cpus,
      message: `taking ${change.cpus} CPUs would leave guest "${books.guest}" ${cpusLeft}, below its floor of ${books.floor.cpus}`,
    });
  if (problems.length > 0) return { ok: false, problems };
  return { ok: true, allocation: { memoryBytes: memoryLeft, cpus: cpusLeft } };
}

/** What a restore of `change` would give, or why not (never above the configured allocation). */
export function checkRestore(
  books: GuestBooks,
  change: Resources,
): { ok: true; allocation: Resources } | { ok: false; problems: Problem[] } {
  const problems: Problem[] = [];
  if (change.memoryBytes < 0 || change.cpus < 0)
    problems.push({
      field: 'change',
      value: change,
      message: 'a restore cannot give a negative amount',
    });
  const memory = books.granted.memoryBytes + change.memoryBytes;
  const cpus = addCpus(books.granted.cpus, change.cpus);
  if (memory > books.allocation.memoryBytes)
    problems.push({
      field: 'memory',
      value: change.memoryBytes,
      message: `guest "${books.guest}" has ${formatBytes(books.granted.memoryBytes)} of its ${formatBytes(books.allocation.memoryBytes)}; cannot give back ${formatBytes(change.memoryBytes)}`,
    });
  if (milli(cpus) > milli(books.allocation.cpus))
    problems.push({
      field: 'cpus',
      value: change.cpus,
      message: `guest "${books.guest}" has ${books.granted.cpus} of its ${books.allocation.cpus} CPUs; cannot give back ${change.cpus}`,
    });
  if (change.memoryBytes === 0 && milli(change.cpus) === 0 && problems.length === 0)
    problems.push({
      field: 'change',
      value: change,
      message: 'a restore must give some memory or some CPUs',
    });
  if (problems.length > 0) return { ok: false, problems };
  return { ok: true, allocation: { memoryBytes: memory, cpus } };
}

/** What remains to restore: everything taken so far. */
export function missing(books: GuestBooks): Resources {
  return {
    memoryBytes: books.allocation.memoryBytes - books.granted.memoryBytes,
    cpus: addCpus(books.allocation.cpus, -books.granted.cpus),
  };
}

export function rejected(
  kind: 'reclaim' | 'restore',
  guest: string,
  problems: Problem[],
): NestError {
  return new NestError(
    'NOTICE_REJECTED',
    `${kind} for guest "${guest}" rejected: ${problems.map((p) => p.message).join('; ')}`,
    { problems },
  );
}

/**
 * What the guest's outcome may credit: never more than the notice's change, whatever the
 * guest says (a confused or hostile guest cannot make the host take more, or think it
 * has more, than the books say).
 */
export function creditedByOutcome(change: Resources, reported: Resources): Resources {
  return {
    memoryBytes: Math.max(0, Math.min(change.memoryBytes, reported.memoryBytes)),
    cpus: Math.max(0, Math.min(change.cpus, reported.cpus)),
  };
}
