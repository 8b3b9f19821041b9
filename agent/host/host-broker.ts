/**
 * The host broker (docs/architecture.md, "A notice, end to end"): the VM-level broker whose
 * children are guests. It keeps the guests' books, journals every notice, delivers it
 * through the broker role (agent/broker/broker.ts: one step, one child: the guest),
 * waits for the guest's outcome bounded by the deadline, and only then actuates.
 *
 *   reclaim: check the books → journal the notice → mark it deallocated in the books →
 *            send `notice` → ack → progress* → outcome (journaled) → actuate down → done
 *   restore: check the books → journal → actuate up FIRST → send `restore` → outcome
 *   late:    no outcome by the deadline → GUEST_LATE; removed anyway only with force
 *   cancel:  before the deadline, the guest agrees → the books take it back
 *
 * The books are a ledger derived from the journaled notices (every notice that counts,
 * replayed over the configured allocation), so a host restarted at any point has books
 * that agree with its journal. Unfinished notices are resumed from the journal at start;
 * unanswered ones are sent again whenever the guest says hello (after a reconnect), and
 * the guest answers a repeat from its own journal without acting twice.
 */
import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import { runBroker, type ChildHandle, type StepJournal } from '../broker/broker';
import type { Notice, Outcome, Resources } from '../broker/types';
import { Journal } from '../common/journal';
import { NestError, isNestError } from '../common/errors';
import type { Logger } from '../common/log';
import { newMessageId, PROTOCOL_VERSION, type Hello, type Message } from '../protocol/messages';
import { parseMessage } from '../protocol/schemas';
import { OutcomeAssembler } from '../protocol/outcome-parts';
import {
  addCpus,
  checkReclaim,
  checkRestore,
  creditedByOutcome,
  missing,
  newBooks,
  rejected,
  type GuestBooks,
} from './books';
import type { GuestConfig, HostConfig } from './config';
import { HOST_LIMIT_DEFAULTS } from './config';
import { faultPoint } from '../common/fault';
import type { ActuationReport, VmActuator } from './actuator';

/** What the host side needs of a channel to one guest (agent/transport's Channel has it). */
export interface HostChannel {
  send(msg: Message): unknown;
  on(event: 'message', fn: (msg: unknown) => void): unknown;
  on(event: 'open', fn: () => void): unknown;
  on(event: 'close', fn: () => void): unknown;
  close(): unknown;
}

export type ChannelFactory = (guest: GuestConfig) => HostChannel;

export type HostNoticeState =
  /** journaled and booked; not yet acknowledged by the guest */
  | 'issued'
  | 'acked'
  /** the guest's outcome is journaled; actuation follows */
  | 'reported'
  /** carried out: the VM was actuated (see actuation.errors for a step that failed) */
  | 'done'
  /**
   * libvirt moved only part of the change in time (actuation.actual says how far); the
   * books count only what moved
   */
  | 'partial'
  /** libvirt moved nothing (actuation.errors says why); the books count nothing */
  | 'failed'
  /** no outcome by the deadline and no force: nothing was taken, the books took it back */
  | 'late'
  /** the guest refused it, or failed and no force: nothing was taken */
  | 'refused'
  | 'cancelled';

export interface HostProgress {
  noticeId: string;
  guest: string;
  phase: string;
  project?: string;
  action?: string;
  exit?: string | null;
  ms?: number;
  at: string;
}

export interface HostNoticeRecord {
  notice: Notice;
  state: HostNoticeState;
  force: boolean;
  source: 'operator' | 'trigger';
  sentAt?: string;
  ackedAt?: string;
  outcome?: Outcome;
  outcomeAt?: string;
  /** What the books credit from the outcome: never more than the notice's change. */
  credited?: Resources;
  actuation?: ActuationReport;
  actuatedAt?: string;
  late?: boolean;
  cancelPending?: boolean;
  error?: { code: string; message: string };
  progress: HostProgress[];
  finishedAt?: string;
}

export interface IssueRequest {
  guest: string;
  change: Resources;
  deadlineMs: number;
  force?: boolean;
  reason?: string;
  source?: 'operator' | 'trigger';
}

export interface GuestStatus {
  name: string;
  priority: number;
  connected: boolean;
  helloAt?: string;
  inventory?: Hello['inventory'];
  lastSeq?: number;
  books: GuestBooks;
  pending: string[];
}

const FINAL: ReadonlySet<HostNoticeState> = new Set([
  'done',
  'partial',
  'failed',
  'late',
  'refused',
  'cancelled',
]);

/** The final states, for the operator API and the metrics. */
export const FINAL_STATES: readonly HostNoticeState[] = [...FINAL];

/**
 * Final notices kept per guest (docs/reliability.md, "Load held": memory flat, and nothing
 * grows on disk either): older final ones are folded into the guest's ledger base (what
 * they did to the books), dropped from memory, and their journal files deleted once the
 * base that holds them is durable (`ledger/base.<guest>.json`). Without this the host's
 * memory, its disk and the cost of replaying the books grow with every notice ever issued.
 */
export const RETAIN_FINAL_NOTICES = 256;

/** What the notices folded out of memory did to one guest's books. */
interface LedgerBase {
  seq: number;
  granted: Resources;
  actuated?: Resources;
  folded: number;
}

/** Whether a notice's change is on the books (see the ledger in booksFor). */
function counts(rec: HostNoticeRecord): boolean {
  if (rec.notice.kind === 'restore') return rec.state !== 'cancelled' && rec.state !== 'refused';
  return !['late', 'refused', 'cancelled'].includes(rec.state);
}

/**
 * What a notice that counts moves on the books: its change, except after a partial or
 * failed actuation through libvirt, where only what libvirt reports as moved (between the
 * actuation's `before` and `actual`, at most the change) counts: the host's books equal
 * what libvirt reports (docs/libvirt.md, "Books").
 */
function bookedChange(rec: HostNoticeRecord): Resources {
  const a = rec.actuation;
  const change = rec.notice.change;
  if (!a?.status || a.status === 'done' || !a.before || !a.actual) return change;
  const sign = rec.notice.kind === 'reclaim' ? 1 : -1;
  const clamp = (v: number, hi: number): number => Math.min(hi, Math.max(0, v));
  return {
    memoryBytes: clamp(sign * (a.before.memoryBytes - a.actual.memoryBytes), change.memoryBytes),
    cpus: clamp(addCpus(0, sign * (a.before.cpus - a.actual.cpus)), change.cpus),
  };
}

interface Link {
  channel: HostChannel;
  open: boolean;
  hello?: Hello;
  helloAt?: string;
  ackWaiters: Map<string, (ack: Extract<Message, { type: 'ack' }>) => void>;
  /** Outcome parts of this connection (outcomes larger than one line: outcome-parts.ts). */
  parts: OutcomeAssembler;
  /** Times an outcome with missing parts was asked for again, per notice, on this connection. */
  partRetries: Map<string, number>;
}

/** How often one connection asks again for an outcome whose parts did not all arrive. */
const OUTCOME_PART_RETRIES = 3;

export interface HostBrokerDeps {
  config: Readonly<HostConfig>;
  actuator: VmActuator;
  connect: ChannelFactory;
  log: Logger;
  /** Bound on delivering one notice (send → ack). */
  deliverTimeoutMs?: number;
  /** How long to wait for the guest's answer to a cancel. */
  cancelTimeoutMs?: number;
}

export class HostBroker extends EventEmitter {
  private readonly journal: Journal<HostNoticeRecord>;
  private readonly records = new Map<string, HostNoticeRecord>();
  /**
   * The same records by guest (docs/performance.md: books and status read one guest's, not
   * all).
   */
  private readonly byGuest = new Map<string, Map<string, HostNoticeRecord>>();
  private readonly links = new Map<string, Link>();
  private readonly running = new Map<string, Promise<HostNoticeRecord>>();
  private readonly aborts = new Map<string, AbortController>();
  /** Outcome waiters by notice id (the running lifecycle's apply step). */
  private readonly outcomeWaiters = new Map<string, (o: Outcome | NestError) => void>();
  private readonly guestsByName = new Map<string, GuestConfig>();
  private readonly saving = new Map<string, Promise<void>>();
  private readonly bases = new Map<string, LedgerBase>();
  /** The ledger bases on disk; a base is written before the notices it folds are deleted. */
  private readonly ledger: Journal<LedgerBase>;
  private pruning: Promise<void> = Promise.resolve();
  private readonly log: Logger;
  private stopped = false;

  constructor(private readonly deps: HostBrokerDeps) {
    super();
    this.journal = new Journal<HostNoticeRecord>(`${deps.config.stateDir}/notices`);
    this.ledger = new Journal<LedgerBase>(`${deps.config.stateDir}/ledger`);
    this.log = deps.log.child({ role: 'host-broker' });
    for (const g of deps.config.guests) this.guestsByName.set(g.name, g);
  }

  // ---------------------------------------------------------------- start / stop

  async start(): Promise<void> {
    await this.journal.init();
    await this.ledger.init();
    for (const { key, value } of await this.ledger.all())
      if (key.startsWith('base.')) this.bases.set(key.slice('base.'.length), value);
    const leftovers: string[] = [];
    for (const { value } of await this.journal.all()) {
      // Folded into a durable base already (a restart between the base's write and the
      // deletion of its notices): on the books through the base, never twice.
      if (value.notice.seq <= (this.bases.get(value.notice.guest)?.seq ?? 0)) {
        leftovers.push(value.notice.id);
        continue;
      }
      value.progress ??= [];
      this.keep(value);
    }
    this.deleteNotices(leftovers);
    for (const g of this.deps.config.guests) this.compact(g.name);
    for (const g of this.deps.config.guests) this.attach(g);
    // Resume every unfinished notice (a host restarted mid-notice: docs/reliability.md).
    for (const rec of this.sorted()) {
      if (FINAL.has(rec.state)) continue;
      if (!this.guestsByName.has(rec.notice.guest)) continue;
      this.log.info(
        { noticeId: rec.notice.id, state: rec.state },
        'resuming a notice from the journal',
      );
      this.track(rec);
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const l of this.links.values()) l.channel.close();
    for (const ac of this.aborts.values())
      ac.abort(new NestError('TRANSPORT', 'host broker stopping'));
    await Promise.allSettled([...this.running.values()]);
    await this.pruning;
  }

  private attach(g: GuestConfig): void {
    const channel = this.deps.connect(g);
    const link: Link = {
      channel,
      open: false,
      ackWaiters: new Map(),
      parts: new OutcomeAssembler(),
      partRetries: new Map(),
    };
    this.links.set(g.name, link);
    const log = this.log.child({ guest: g.name });
    channel.on('open', () => {
      link.open = true;
      log.info('channel to guest open; waiting for hello');
    });
    channel.on('close', () => {
      if (link.open) log.warn('channel to guest closed');
      link.open = false;
      link.hello = undefined;
      link.parts.clear();
      link.partRetries.clear();
    });
    channel.on('message', (raw) => this.onMessage(g, link, raw));
  }

  // ---------------------------------------------------------------- the books

  /** The books, replayed from the journal: allocation, minus reclaims that count, plus restores. */
  booksFor(guest: string): GuestBooks {
    const g = this.guest(guest);
    const books = newBooks(g.name, g.allocation, g.floor);
    const base = this.bases.get(guest);
    if (base) {
      books.seq = base.seq;
      books.granted = {
        memoryBytes: books.granted.memoryBytes + base.granted.memoryBytes,
        cpus: addCpus(books.granted.cpus, base.granted.cpus),
      };
      if (base.actuated) books.actuated = base.actuated;
    }
    for (const rec of this.ofGuest(guest)) {
      books.seq = Math.max(books.seq, rec.notice.seq);
      if (!counts(rec)) continue;
      const sign = rec.notice.kind === 'reclaim' ? -1 : 1;
      const moved = bookedChange(rec);
      books.granted = {
        memoryBytes: books.granted.memoryBytes + sign * moved.memoryBytes,
        cpus: addCpus(books.granted.cpus, sign * moved.cpus),
      };
      if (rec.actuation) books.actuated = rec.actuation.actual ?? rec.actuation.target;
    }
    return books;
  }

  private guest(name: string): GuestConfig {
    const g = this.guestsByName.get(name);
    if (!g)
      throw new NestError('GUEST_UNKNOWN', `no guest named "${name}" in the host config`, {
        problems: [{ field: 'guest', value: name, message: 'not configured' }],
      });
    return g;
  }

  /** One guest's notices in memory, in seq order. */
  private ofGuest(guest: string): HostNoticeRecord[] {
    const out = [...(this.byGuest.get(guest)?.values() ?? [])];
    return out.sort((a, b) => a.notice.seq - b.notice.seq);
  }

  private keep(rec: HostNoticeRecord): void {
    this.records.set(rec.notice.id, rec);
    let mine = this.byGuest.get(rec.notice.guest);
    if (!mine) this.byGuest.set(rec.notice.guest, (mine = new Map()));
    mine.set(rec.notice.id, rec);
  }

  private drop(rec: HostNoticeRecord): void {
    this.records.delete(rec.notice.id);
    this.byGuest.get(rec.notice.guest)?.delete(rec.notice.id);
  }

  /**
   * Folds the oldest final notices of a guest beyond RETAIN_FINAL_NOTICES into its ledger
   * base. Only those older (by seq) than every unfinished one: the books replay in seq
   * order, and the base is applied first.
   */
  private compact(guest: string): void {
    const all = this.ofGuest(guest);
    const finals = all.filter((r) => FINAL.has(r.state));
    let excess = finals.length - RETAIN_FINAL_NOTICES;
    if (excess <= 0) return;
    const firstOpen = Math.min(
      ...all.filter((r) => !FINAL.has(r.state)).map((r) => r.notice.seq),
      Infinity,
    );
    const base = this.bases.get(guest) ?? {
      seq: 0,
      granted: { memoryBytes: 0, cpus: 0 },
      folded: 0,
    };
    const folded: string[] = [];
    for (const rec of finals) {
      // In seq order, stopping at the first that must stay: one still being written, or a
      // cancel the guest has yet to hear (told at its next hello). So the folded notices
      // are exactly those with seq ≤ base.seq, which is what start() relies on.
      if (excess <= 0 || rec.notice.seq >= firstOpen) break;
      if (this.saving.has(rec.notice.id) || rec.cancelPending) break;
      folded.push(rec.notice.id);
      base.seq = Math.max(base.seq, rec.notice.seq);
      if (counts(rec)) {
        const sign = rec.notice.kind === 'reclaim' ? -1 : 1;
        const moved = bookedChange(rec);
        base.granted = {
          memoryBytes: base.granted.memoryBytes + sign * moved.memoryBytes,
          cpus: addCpus(base.granted.cpus, sign * moved.cpus),
        };
      }
      if (rec.actuation) base.actuated = rec.actuation.actual ?? rec.actuation.target;
      base.folded++;
      this.drop(rec);
      excess--;
    }
    this.bases.set(guest, base);
    if (folded.length === 0) return;
    // The base first, then the files: a crash between the two leaves notices that start()
    // recognises as folded (seq ≤ base.seq) and deletes then.
    const snapshot: LedgerBase = JSON.parse(JSON.stringify(base)) as LedgerBase;
    this.pruning = this.pruning.then(async () => {
      try {
        await this.ledger.put(`base.${guest}`, snapshot);
      } catch (err) {
        this.log.warn({ err, guest }, 'could not write the ledger base; old notices kept');
        return;
      }
      await this.deleteNoticeFiles(folded);
    });
  }

  private deleteNotices(ids: string[]): void {
    if (ids.length > 0) this.pruning = this.pruning.then(() => this.deleteNoticeFiles(ids));
  }

  private async deleteNoticeFiles(ids: string[]): Promise<void> {
    for (const id of ids)
      await this.journal
        .delete(`notice.${id}`)
        .catch((err: unknown) =>
          this.log.warn({ err, noticeId: id }, 'could not delete an old notice record'),
        );
  }

  /** Resolves once the ledger writes and deletions decided so far are done (for tests). */
  async pruned(): Promise<void> {
    await this.pruning;
  }

  private sorted(): HostNoticeRecord[] {
    return [...this.records.values()].sort(
      (a, b) => a.notice.guest.localeCompare(b.notice.guest) || a.notice.seq - b.notice.seq,
    );
  }

  // ---------------------------------------------------------------- operator verbs

  /** A dry run: what the books allow, without issuing anything. */
  check(kind: 'reclaim' | 'restore', guest: string, change: Resources) {
    const books = this.booksFor(guest);
    const r = kind === 'reclaim' ? checkReclaim(books, change) : checkRestore(books, change);
    return { books, ...r };
  }

  /**
   * Issues a notice. Returns at once with the journaled record and a promise of its end;
   * progress is emitted as 'progress' events (and kept on the record).
   */
  async issue(
    kind: 'reclaim' | 'restore',
    req: IssueRequest,
  ): Promise<{ record: HostNoticeRecord; done: Promise<HostNoticeRecord> }> {
    if (this.stopped) throw new NestError('TRANSPORT', 'host broker is stopping');
    const g = this.guest(req.guest);
    const books = this.booksFor(g.name);
    const change =
      kind === 'restore' && req.change.memoryBytes === 0 && req.change.cpus === 0
        ? missing(books)
        : req.change;
    const r = kind === 'reclaim' ? checkReclaim(books, change) : checkRestore(books, change);
    if (!r.ok) throw rejected(kind, g.name, r.problems);
    // With libvirt: the domain is running and has what the guest's modes need, or the
    // notice is refused here (DOMAIN_DOWN, PREREQUISITE_MISSING), nothing journaled.
    await this.deps.actuator.precheck?.(g, kind, r.allocation);
    // docs/reliability.md: a cap on what one guest may have in flight; nothing journaled or
    // booked.
    const cap =
      this.deps.config.limits?.pendingNoticesPerGuest ?? HOST_LIMIT_DEFAULTS.pendingNoticesPerGuest;
    const pending = this.notices(g.name).filter((x) => !FINAL.has(x.state)).length;
    if (pending >= cap)
      throw new NestError(
        'NOTICE_BACKLOG',
        `guest "${g.name}" has ${pending} notices pending (cap limits.pendingNoticesPerGuest = ${cap}); refused, nothing done`,
        {
          problems: [
            { field: 'guest', value: g.name, message: `${pending} notices pending, cap ${cap}` },
          ],
        },
      );
    const seq = books.seq + 1;
    const now = new Date();
    const notice: Notice = {
      id: `${g.name}-${seq}-${randomBytes(4).toString('hex')}`,
      guest: g.name,
      seq,
      kind,
      change,
      allocation: r.allocation,
      deadline: new Date(now.getTime() + req.deadlineMs).toISOString(),
      reason: req.reason ?? (kind === 'reclaim' ? 'operator reclaim' : 'operator restore'),
      issuedAt: now.toISOString(),
    };
    const rec: HostNoticeRecord = {
      notice,
      state: 'issued',
      force: req.force ?? false,
      source: req.source ?? 'operator',
      progress: [],
    };
    // Journal first: the notice exists (and, being on the ledger, its resources are
    // marked deallocated in the books) before anything is sent (docs/architecture.md).
    await this.save(rec);
    faultPoint('after-journal');
    // Debug-level phase marks (here, in runBroker, in the guest) time a cascade from the
    // logs alone: bench/cascade.ts --phases (docs/performance.md, "where the time goes").
    this.log.debug({ noticeId: notice.id, phase: 'journaled' }, 'notice phase');
    this.note(rec, 'issued');
    return { record: rec, done: this.track(rec) };
  }

  async cancel(id: string): Promise<HostNoticeRecord> {
    const rec = this.records.get(id);
    if (!rec)
      throw new NestError('NOTICE_UNKNOWN', `no notice with id "${id}"`, {
        problems: [{ field: 'id', value: id, message: 'unknown notice' }],
      });
    const why = (message: string): NestError =>
      new NestError('NOTICE_REJECTED', `cannot cancel ${id}: ${message}`, {
        problems: [{ field: 'id', value: id, message }],
      });
    if (rec.notice.kind !== 'reclaim') throw why('only a reclaim can be cancelled');
    if (rec.state !== 'issued' && rec.state !== 'acked')
      throw why(`it is ${rec.state} (the guest has already answered, or it is over)`);
    if (Date.parse(rec.notice.deadline) <= Date.now()) throw why('its deadline has passed');
    const link = this.links.get(rec.notice.guest);
    if (link?.open && link.hello) {
      const ack = await this.request(link, rec.notice.id, {
        type: 'cancel',
        id: newMessageId(),
        noticeId: rec.notice.id,
      });
      if (ack.state === 'not-cancellable')
        throw why('the guest has already carried it out (not cancellable)');
      // 'cancelled', or 'rejected' because the guest never received it: either way gone.
    } else {
      // The guest is away: it is told on its next hello, before anything is resent.
      rec.cancelPending = true;
    }
    rec.state = 'cancelled';
    rec.finishedAt = new Date().toISOString();
    await this.save(rec);
    this.note(rec, 'cancelled');
    this.aborts.get(id)?.abort(new NestError('NOTICE_REJECTED', 'cancelled'));
    return rec;
  }

  notices(guest?: string): HostNoticeRecord[] {
    if (guest === undefined) return this.sorted();
    this.guest(guest);
    return this.ofGuest(guest);
  }

  notice(id: string): HostNoticeRecord | undefined {
    return this.records.get(id);
  }

  /** Waits for a notice already in flight (or returns its final record). */
  async wait(id: string): Promise<HostNoticeRecord> {
    const rec = this.records.get(id);
    if (!rec) throw new NestError('NOTICE_UNKNOWN', `no notice with id "${id}"`);
    return (await this.running.get(id)) ?? rec;
  }

  guests(): GuestStatus[] {
    return this.deps.config.guests.map((g) => this.status(g.name));
  }

  status(name: string): GuestStatus {
    const g = this.guest(name);
    const link = this.links.get(name);
    return {
      name: g.name,
      priority: g.priority,
      connected: Boolean(link?.open && link.hello),
      helloAt: link?.helloAt,
      inventory: link?.hello?.inventory,
      lastSeq: link?.hello?.lastSeq,
      books: this.booksFor(name),
      pending: this.notices(name)
        .filter((r) => !FINAL.has(r.state))
        .map((r) => r.notice.id),
    };
  }

  // ---------------------------------------------------------------- lifecycle

  private track(rec: HostNoticeRecord): Promise<HostNoticeRecord> {
    const id = rec.notice.id;
    const existing = this.running.get(id);
    if (existing) return existing;
    const p = this.lifecycle(rec)
      .catch(async (err: unknown) => {
        this.log.error({ err, noticeId: id }, 'notice lifecycle failed');
        rec.error = errorOf(err);
        await this.save(rec).catch(() => undefined);
        return rec;
      })
      .finally(() => {
        this.running.delete(id);
        this.aborts.delete(id);
        // Before compact, which may fold it away (metrics read the whole record).
        if (FINAL.has(rec.state)) this.emit('finished', rec);
        this.compact(rec.notice.guest);
      });
    this.running.set(id, p);
    return p;
  }

  private async lifecycle(rec: HostNoticeRecord): Promise<HostNoticeRecord> {
    const g = this.guest(rec.notice.guest);
    const log = this.log.child({ noticeId: rec.notice.id, guest: g.name });
    if (rec.notice.kind === 'restore' && !rec.actuation) {
      // Restore: the VM gets the resources BEFORE the guest is told it may use them.
      this.note(rec, 'actuating');
      rec.actuation = await this.deps.actuator.apply(g, rec.notice.allocation, 'up');
      rec.actuatedAt = new Date().toISOString();
      const status = rec.actuation.status;
      if (status === 'partial' || status === 'failed') {
        // The VM did not get (all of) it: the guest is not told it may use it, and the
        // books count only what libvirt added (bookedChange).
        rec.state = status;
        rec.error = actuationError(g.name, rec.actuation);
        rec.finishedAt = rec.actuatedAt;
        await this.save(rec);
        this.note(rec, status);
        return rec;
      }
      await this.save(rec);
      this.note(rec, 'actuated');
    }

    const outcome = await this.deliverAndWait(rec, g, log);

    if (rec.state === 'cancelled') return rec;
    if (rec.notice.kind === 'restore') {
      if (outcome) rec.state = 'done';
      else {
        rec.state = 'done';
        rec.late = true;
        rec.error ??= {
          code: 'GUEST_LATE',
          message: `guest "${g.name}" did not answer the restore by its deadline`,
        };
      }
      rec.finishedAt = new Date().toISOString();
      await this.save(rec);
      this.note(rec, rec.late ? 'late' : 'done');
      return rec;
    }

    // Reclaim.
    if (!outcome && rec.state === 'refused') {
      // The guest rejected it (onAck): its own error stands; it was not late.
      rec.finishedAt = new Date().toISOString();
      await this.save(rec);
      this.note(rec, 'refused');
      return rec;
    }
    if (!outcome) {
      rec.late = true;
      rec.error = {
        code: 'GUEST_LATE',
        message: `guest "${g.name}" sent no outcome by the deadline ${rec.notice.deadline}`,
      };
      if (!rec.force) {
        rec.state = 'late';
        rec.finishedAt = new Date().toISOString();
        await this.save(rec);
        this.note(rec, 'late');
        log.warn('guest late; nothing removed (no --force)');
        // Tell the guest we gave up, so a slow cascade does not go on for nothing.
        const link = this.links.get(g.name);
        if (link?.open)
          this.sendTo(link, { type: 'cancel', id: newMessageId(), noticeId: rec.notice.id });
        return rec;
      }
      log.warn('guest late; removing anyway (--force)');
    } else if (outcome.status === 'failed' && !rec.force) {
      rec.state = 'refused';
      rec.error = {
        code: 'NOTICE_REJECTED',
        message: `guest "${g.name}" reported that it could not free anything (status failed)`,
      };
      rec.finishedAt = new Date().toISOString();
      await this.save(rec);
      this.note(rec, 'refused');
      return rec;
    }

    // The outcome (or the forced deadline) is journaled: now, and only now, take it away.
    faultPoint('before-actuation');
    this.note(rec, 'actuating');
    rec.actuation = await this.deps.actuator.apply(g, rec.notice.allocation, 'down');
    rec.actuatedAt = new Date().toISOString();
    const status = rec.actuation.status;
    rec.state = status === 'partial' || status === 'failed' ? status : 'done';
    if (rec.state !== 'done') rec.error = actuationError(g.name, rec.actuation);
    rec.finishedAt = rec.actuatedAt;
    await this.save(rec);
    this.note(rec, rec.state === 'done' ? 'actuated' : rec.state);
    return rec;
  }

  /** Delivers the notice through the broker role and waits for its outcome (undefined: none). */
  private async deliverAndWait(
    rec: HostNoticeRecord,
    g: GuestConfig,
    log: Logger,
  ): Promise<Outcome | undefined> {
    if (rec.outcome) return rec.outcome;
    const ac = new AbortController();
    this.aborts.set(rec.notice.id, ac);
    const handle: ChildHandle<Notice, Outcome> = {
      name: g.name,
      deliver: async (notice) => {
        const link = this.links.get(g.name);
        if (!link?.open || !link.hello)
          throw new NestError(
            'GUEST_UNREACHABLE',
            `guest "${g.name}" is not connected; the notice is sent when it says hello`,
          );
        // The ack wait never runs past the deadline: a stopped guest is reported late at
        // its deadline, not a delivery timeout later.
        const left = Date.parse(notice.deadline) - Date.now();
        const ack = await this.request(
          link,
          notice.id,
          this.noticeMessage(notice),
          Math.max(1, Math.min(this.deps.deliverTimeoutMs ?? 5_000, left)),
        );
        this.onAck(rec, ack);
      },
      apply: (notice, ctx) =>
        new Promise<Outcome>((resolve, reject) => {
          if (rec.outcome) return resolve(rec.outcome);
          if (rec.state === 'refused')
            return reject(new NestError('NOTICE_REJECTED', rec.error?.message ?? 'refused'));
          const onAbort = (): void => {
            this.outcomeWaiters.delete(notice.id);
            reject(ctx.signal.reason);
          };
          if (ctx.signal.aborted) return onAbort();
          ctx.signal.addEventListener('abort', onAbort, { once: true });
          this.outcomeWaiters.set(notice.id, (o) => {
            ctx.signal.removeEventListener('abort', onAbort);
            this.outcomeWaiters.delete(notice.id);
            if (o instanceof NestError) reject(o);
            else resolve(o);
          });
        }),
    };
    const journal: StepJournal<Outcome> = {
      get: async () => ({ deliveredAt: rec.ackedAt, outcome: rec.outcome }),
      // The record is the journal: ack and outcome are saved as they arrive (onAck/onOutcome).
      put: async () => undefined,
    };
    try {
      await runBroker(
        [{ child: g.name, order: 0, notice: rec.notice }],
        new Map([[g.name, handle]]),
        {
          noticeId: rec.notice.id,
          deadline: new Date(rec.notice.deadline),
          signal: ac.signal,
          journal,
          log,
          overrunMs: 0,
          deliverTimeoutMs: this.deps.deliverTimeoutMs ?? 5_000,
          onProgress: (ev) => {
            if (ev.phase === 'notified') this.note(rec, 'delivered');
          },
          // A synthetic outcome is never journaled as the guest's: rec.outcome stays unset.
          failed: () => undefined as unknown as Outcome,
        },
      );
    } catch (err) {
      if (!isNestError(err)) throw err;
    }
    return rec.outcome;
  }

  private noticeMessage(notice: Notice): Message {
    return notice.kind === 'reclaim'
      ? { type: 'notice', id: newMessageId(), notice }
      : { type: 'restore', id: newMessageId(), notice };
  }

  // ---------------------------------------------------------------- channel

  private onMessage(g: GuestConfig, link: Link, raw: unknown): void {
    const parsed = parseMessage(typeof raw === 'string' ? raw : JSON.stringify(raw));
    const log = this.log.child({ guest: g.name });
    if (!parsed.ok) {
      log.warn({ problems: parsed.error.problems }, 'invalid message from guest');
      return;
    }
    const msg = parsed.msg;
    switch (msg.type) {
      case 'hello':
        return void this.onHello(g, link, msg);
      case 'ack': {
        const w = link.ackWaiters.get(msg.replyTo);
        if (w) {
          link.ackWaiters.delete(msg.replyTo);
          w(msg);
        } else {
          const rec = this.records.get(msg.noticeId);
          if (rec && rec.notice.guest === g.name) this.onAck(rec, msg);
        }
        return;
      }
      case 'progress': {
        const rec = this.records.get(msg.noticeId);
        if (!rec || rec.notice.guest !== g.name) return;
        this.note(rec, msg.phase, {
          project: msg.project,
          action: msg.action,
          exit: msg.exit ?? null,
          ms: msg.ms,
        });
        return;
      }
      case 'outcome-part': {
        // Held only for a notice of this guest still waiting for its outcome.
        const rec = this.records.get(msg.noticeId);
        if (rec && rec.notice.guest === g.name && !rec.outcome) link.parts.add(msg);
        return;
      }
      case 'outcome': {
        const whole = link.parts.complete(msg);
        if (!whole.ok) return this.outcomeIncomplete(g, link, msg.outcome.noticeId, whole);
        link.partRetries.delete(msg.outcome.noticeId);
        return void this.onOutcome(g, whole.outcome).catch((err: unknown) =>
          log.error({ err }, 'could not record an outcome'),
        );
      }
      // The channel answers every ping itself (agent/transport/channel.ts, answerPings):
      // answering here too would send two pongs for one ping. Pongs feed the heartbeat of
      // ReconnectingChannel (agent/transport/reconnect.ts), not the broker.
      case 'ping':
      case 'pong':
        return;
      case 'error':
        log.warn({ code: msg.code, message: msg.message }, 'guest reported an error');
        return;
      default:
        log.warn({ type: msg.type }, 'unexpected message type from a guest');
    }
  }

  private async onHello(g: GuestConfig, link: Link, hello: Hello): Promise<void> {
    const log = this.log.child({ guest: g.name });
    if (hello.guest !== g.name || hello.version !== PROTOCOL_VERSION) {
      const why =
        hello.guest !== g.name
          ? `this channel belongs to guest "${g.name}", the peer says it is "${hello.guest}"`
          : `protocol version ${hello.version} is not ${PROTOCOL_VERSION}`;
      log.error({ hello: { guest: hello.guest, version: hello.version } }, why);
      this.sendTo(link, {
        type: 'error',
        id: newMessageId(),
        replyTo: hello.id,
        code: hello.guest !== g.name ? 'UNAUTHORIZED' : 'PROTOCOL_VERSION',
        message: why,
      });
      return;
    }
    link.hello = hello;
    link.helloAt = new Date().toISOString();
    this.sendTo(link, {
      type: 'welcome',
      id: newMessageId(),
      replyTo: hello.id,
      version: PROTOCOL_VERSION,
      guest: g.name,
      heartbeatMs: this.deps.config.heartbeat.intervalMs,
    });
    log.info(
      { lastSeq: hello.lastSeq, projects: hello.inventory.projects.length },
      'guest said hello',
    );
    this.emit('hello', g.name);
    // Cancels the guest missed while away come first; then, in seq order, every notice
    // it has not answered. A notice it already has is answered from its journal.
    for (const rec of this.ofGuest(g.name)) {
      if (rec.cancelPending) {
        this.sendTo(link, { type: 'cancel', id: newMessageId(), noticeId: rec.notice.id });
        rec.cancelPending = false;
        await this.save(rec);
      }
    }
    for (const rec of this.ofGuest(g.name)) {
      if (rec.outcome) continue;
      if (rec.state !== 'issued' && rec.state !== 'acked') continue;
      if (rec.notice.kind === 'restore' && !rec.actuation) continue;
      log.info({ noticeId: rec.notice.id, seq: rec.notice.seq }, 'sending an unanswered notice');
      this.request(link, rec.notice.id, this.noticeMessage(rec.notice))
        .then((ack) => this.onAck(rec, ack))
        .catch((err: unknown) => log.warn({ err, noticeId: rec.notice.id }, 'resend not acked'));
    }
  }

  private onAck(rec: HostNoticeRecord, ack: Extract<Message, { type: 'ack' }>): void {
    if (ack.state === 'rejected') {
      if (rec.state === 'issued' || rec.state === 'acked') {
        rec.state = 'refused';
        rec.error = ack.error ?? { code: 'NOTICE_REJECTED', message: 'the guest rejected it' };
        void this.save(rec);
        this.note(rec, 'rejected');
        this.outcomeWaiters.get(rec.notice.id)?.(
          new NestError('NOTICE_REJECTED', rec.error.message),
        );
      }
      return;
    }
    if (ack.state !== 'accepted' && ack.state !== 'duplicate') return;
    if (rec.state === 'issued') {
      rec.state = 'acked';
      rec.ackedAt = new Date().toISOString();
      void this.save(rec);
      this.note(rec, 'acked');
    }
  }

  /**
   * An outcome summary whose parts did not all arrive (lines lost to a reconnect or a
   * rate limit): not recorded. The notice is sent again; the guest answers the duplicate
   * from its journal with the whole outcome, every part again (a bounded number of times
   * per connection; after that the next hello resends it, or the deadline ends it).
   */
  private outcomeIncomplete(
    g: GuestConfig,
    link: Link,
    noticeId: string,
    got: { missing: number[]; count: number },
  ): void {
    const log = this.log.child({ guest: g.name, noticeId });
    const rec = this.records.get(noticeId);
    if (!rec || rec.notice.guest !== g.name || rec.outcome) return;
    const tries = (link.partRetries.get(noticeId) ?? 0) + 1;
    link.partRetries.set(noticeId, tries);
    log.warn(
      { missing: got.missing.slice(0, 20), count: got.count, tries },
      'outcome arrived without all of its parts; not recorded',
    );
    if (tries > OUTCOME_PART_RETRIES) return;
    this.request(link, noticeId, this.noticeMessage(rec.notice))
      .then((ack) => this.onAck(rec, ack))
      .catch((err: unknown) => log.warn({ err }, 'asking again for the outcome failed'));
  }

  private async onOutcome(g: GuestConfig, outcome: Outcome): Promise<void> {
    const rec = this.records.get(outcome.noticeId);
    if (!rec || rec.notice.guest !== g.name || outcome.guest !== g.name) {
      this.log.warn(
        { guest: g.name, noticeId: outcome.noticeId },
        'outcome for a notice this guest was not sent; ignored',
      );
      return;
    }
    if (rec.outcome) return; // a repeat after a reconnect: the first one stands
    rec.outcome = outcome;
    rec.outcomeAt = new Date().toISOString();
    // The books credit at most what the notice asked for, whatever the guest claims.
    rec.credited = creditedByOutcome(rec.notice.change, outcome.freed);
    if (rec.state === 'issued' || rec.state === 'acked') rec.state = 'reported';
    await this.save(rec);
    this.note(rec, 'outcome', { ms: outcome.ms });
    this.outcomeWaiters.get(rec.notice.id)?.(outcome);
  }

  private sendTo(link: Link, msg: Message): boolean {
    if (!link.open) return false;
    try {
      link.channel.send(msg);
      return true;
    } catch (err) {
      this.log.warn({ err, type: msg.type }, 'could not send to a guest');
      return false;
    }
  }

  /** Sends a message that the guest acknowledges, and waits for the ack. */
  private request(
    link: Link,
    noticeId: string,
    msg: Message,
    timeoutMs = this.deps.cancelTimeoutMs ?? 5_000,
  ): Promise<Extract<Message, { type: 'ack' }>> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        link.ackWaiters.delete(msg.id);
        reject(new NestError('TIMEOUT', `guest did not acknowledge ${msg.type} for ${noticeId}`));
      }, timeoutMs);
      link.ackWaiters.set(msg.id, (ack) => {
        clearTimeout(t);
        resolve(ack);
      });
      if (!this.sendTo(link, msg)) {
        clearTimeout(t);
        link.ackWaiters.delete(msg.id);
        reject(new NestError('GUEST_UNREACHABLE', `guest is not connected`));
        return;
      }
      const rec = this.records.get(noticeId);
      if (rec && (msg.type === 'notice' || msg.type === 'restore')) {
        rec.sentAt ??= new Date().toISOString();
        this.note(rec, 'sent');
        faultPoint('after-send');
      }
    });
  }

  // ---------------------------------------------------------------- records

  /**
   * Journals a record. Writes of one record are chained: two overlapping writes of one key
   * would share the journal's temp file. A new record is visible (notices, books) only
   * once it is on disk: nothing is sent for a notice the journal does not hold.
   */
  private save(rec: HostNoticeRecord): Promise<void> {
    const id = rec.notice.id;
    const prev = this.saving.get(id) ?? Promise.resolve();
    const next = prev
      .catch(() => undefined)
      .then(async () => {
        await this.journal.put(`notice.${id}`, rec);
        this.keep(rec);
      });
    this.saving.set(id, next);
    void next
      .finally(() => {
        if (this.saving.get(id) === next) this.saving.delete(id);
      })
      .catch(() => undefined);
    return next;
  }

  private note(rec: HostNoticeRecord, phase: string, extra: Partial<HostProgress> = {}): void {
    const ev: HostProgress = {
      noticeId: rec.notice.id,
      guest: rec.notice.guest,
      phase,
      ...extra,
      at: new Date().toISOString(),
    };
    rec.progress.push(ev);
    if (rec.progress.length > 500) rec.progress.shift();
    this.emit('progress', ev);
  }
}

/** The error of a partial or failed actuation: its first failed step, and what moved. */
function actuationError(guest: string, a: ActuationReport): { code: string; message: string } {
  const first = a.errors[0];
  const moved =
    a.before && a.actual
      ? ` (libvirt: ${a.before.cpus} → ${a.actual.cpus} CPUs, ${a.before.memoryBytes} → ${a.actual.memoryBytes} bytes; target ${a.target.cpus} CPUs, ${a.target.memoryBytes} bytes)`
      : '';
  return {
    code: first?.code ?? 'TIMEOUT',
    message: `guest "${guest}": actuation ${a.status}${moved}${first ? `: ${first.message}` : ''}`,
  };
}

function errorOf(err: unknown): { code: string; message: string } {
  if (isNestError(err)) return { code: err.code, message: err.message };
  return { code: 'INTERNAL', message: err instanceof Error ? err.message : String(err) };
}
