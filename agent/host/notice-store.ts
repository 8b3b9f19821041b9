/**
 * The host's notice journal and ledger (docs/architecture.md, "Journals and exactly-once"):
 * every notice record the host broker keeps, in memory and on disk, and the books replayed
 * from them. A record is journaled before it is visible; final records beyond
 * RETAIN_FINAL_NOTICES are folded into a per-guest ledger base, written before the notice
 * files it folds are deleted, so a host restarted at any point has books that agree with
 * its journal.
 */
import type { Notice, Outcome, Resources } from '../broker/types';
import { Journal } from '../common/journal';
import { GroupJournal } from './group-journal';
import type { Logger } from '../common/log';
import { addCpus, newBooks, type GuestBooks } from './books';
import type { GuestConfig } from './config';
import type { ActuationReport } from './actuator';
import { byCodePoint } from '../common/order';

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
  /** `restart`: re-applied after the domain started again (docs/libvirt.md, "Books"). */
  source: 'operator' | 'trigger' | 'restart';
  sentAt?: string;
  ackedAt?: string;
  outcome?: Outcome;
  outcomeAt?: string;
  /** What the books credit from the outcome: never more than the notice's change. */
  credited?: Resources;
  actuation?: ActuationReport;
  actuatedAt?: string;
  late?: boolean;
  /**
   * A late reclaim whose outcome came after all: when it arrived. The books then count it
   * and the VM is lowered, as the guest recorded (docs/reliability.md, "A deadline shorter
   * than a grace period").
   */
  reconciledAt?: string;
  cancelPending?: boolean;
  error?: { code: string; message: string };
  progress: HostProgress[];
  finishedAt?: string;
  /**
   * The deadline on the host's monotonic clock and the boot it belongs to
   * (agent/common/clock.ts): what the host waits by; `notice.deadline` is its wall form.
   */
  deadlineMono?: number;
  /** When it was issued, on the same clock (the cascade's duration in metrics.ts). */
  issuedMono?: number;
  bootId?: string;
}

export const FINAL: ReadonlySet<HostNoticeState> = new Set([
  'done',
  'partial',
  'failed',
  'late',
  'refused',
  'cancelled',
]);

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
  /** The last time the books were made to follow what the hypervisor reported. */
  resync?: BooksResync;
}

/**
 * The books set to what libvirt reported (docs/libvirt.md, "Books"): a domain restarted
 * with its full persistent vCPUs and memory. Every notice up to `seq` that was final then
 * no longer counts; those still open (`open`) count by their own end.
 */
export interface BooksResync {
  seq: number;
  open: string[];
  at: string;
  reported: Resources;
  reason: string;
  /** The books' granted just before, for the log and the journal. */
  before: Resources;
}

/** Whether a notice's change is on the books (see the ledger in booksFor). */
function counts(rec: HostNoticeRecord): boolean {
  if (rec.notice.kind === 'restore') return rec.state !== 'cancelled' && rec.state !== 'refused';
  return !['late', 'refused', 'cancelled'].includes(rec.state);
}

/** A notice that was final when the books last followed libvirt (BooksResync). */
function superseded(rec: HostNoticeRecord, base: LedgerBase | undefined): boolean {
  const r = base?.resync;
  return r !== undefined && rec.notice.seq <= r.seq && !r.open.includes(rec.notice.id);
}

/** The final states, for the operator API and the metrics. */
export const FINAL_STATES: readonly HostNoticeState[] = [...FINAL];

/**
 * What a notice that counts moves on the books: its change, except after a partial or
 * failed actuation through libvirt, where only what libvirt reports as moved (between the
 * actuation's `before` and `actual`, at most the change) counts: the host's books equal
 * what libvirt reports (docs/libvirt.md, "Books").
 */
export function bookedChange(rec: HostNoticeRecord): Resources {
  const a = rec.actuation;
  const change = rec.notice.change;
  if (!a?.status || a.status === 'done') return change;
  // Failed before libvirt could even say where the domain was (it went down): nothing moved.
  if (!a.before || !a.actual) return { memoryBytes: 0, cpus: 0 };
  const sign = rec.notice.kind === 'reclaim' ? 1 : -1;
  const clamp = (v: number, hi: number): number => Math.min(hi, Math.max(0, v));
  return {
    memoryBytes: clamp(sign * (a.before.memoryBytes - a.actual.memoryBytes), change.memoryBytes),
    cpus: clamp(addCpus(0, sign * (a.before.cpus - a.actual.cpus)), change.cpus),
  };
}

/** The notice records of every guest, their journal, and the ledger bases. */
export class NoticeStore {
  /** One file a notice; the records of one moment written as one batch (group-journal.ts). */
  private readonly journal: GroupJournal<HostNoticeRecord>;
  private readonly records = new Map<string, HostNoticeRecord>();
  /**
   * The same records by guest (docs/performance.md: books and status read one guest's, not
   * all).
   */
  private readonly byGuest = new Map<string, Map<string, HostNoticeRecord>>();
  /** Writes in flight, per notice id. */
  private readonly saving = new Map<string, Promise<void>>();
  private readonly bases = new Map<string, LedgerBase>();
  /** The ledger bases on disk; a base is written before the notices it folds are deleted. */
  private readonly ledger: Journal<LedgerBase>;
  private pruning: Promise<void> = Promise.resolve();

  constructor(
    stateDir: string,
    private readonly log: Logger,
  ) {
    this.journal = new GroupJournal<HostNoticeRecord>(`${stateDir}/notices`);
    this.ledger = new Journal<LedgerBase>(`${stateDir}/ledger`);
  }

  /** Reads the ledger bases and the journaled notices, and folds what is beyond retention. */
  async load(guests: readonly GuestConfig[]): Promise<void> {
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
    for (const g of guests) this.compact(g.name);
  }

  /** The books, replayed from the journal: allocation, minus reclaims that count, plus restores. */
  booksFor(g: GuestConfig): GuestBooks {
    const guest = g.name;
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
      if (!counts(rec) || superseded(rec, base)) continue;
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

  get(id: string): HostNoticeRecord | undefined {
    return this.records.get(id);
  }

  /** One guest's notices in memory, in seq order. */
  ofGuest(guest: string): HostNoticeRecord[] {
    const out = [...(this.byGuest.get(guest)?.values() ?? [])];
    return out.sort((a, b) => a.notice.seq - b.notice.seq);
  }

  keep(rec: HostNoticeRecord): void {
    this.records.set(rec.notice.id, rec);
    let mine = this.byGuest.get(rec.notice.guest);
    if (!mine) this.byGuest.set(rec.notice.guest, (mine = new Map()));
    mine.set(rec.notice.id, rec);
  }

  drop(rec: HostNoticeRecord): void {
    this.records.delete(rec.notice.id);
    this.byGuest.get(rec.notice.guest)?.delete(rec.notice.id);
  }

  /**
   * Folds the oldest final notices of a guest beyond RETAIN_FINAL_NOTICES into its ledger
   * base. Only those older (by seq) than every unfinished one: the books replay in seq
   * order, and the base is applied first.
   */
  compact(guest: string): void {
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
      // are exactly those with seq ≤ base.seq, which is what load() relies on.
      if (excess <= 0 || rec.notice.seq >= firstOpen) break;
      if (this.saving.has(rec.notice.id) || rec.cancelPending) break;
      folded.push(rec.notice.id);
      base.seq = Math.max(base.seq, rec.notice.seq);
      if (counts(rec) && !superseded(rec, base)) {
        const sign = rec.notice.kind === 'reclaim' ? -1 : 1;
        base.granted = {
          memoryBytes: base.granted.memoryBytes + sign * bookedChange(rec).memoryBytes,
          cpus: addCpus(base.granted.cpus, sign * bookedChange(rec).cpus),
        };
      }
      if (rec.actuation && !superseded(rec, base))
        base.actuated = rec.actuation.actual ?? rec.actuation.target;
      base.folded++;
      this.drop(rec);
      excess--;
    }
    this.bases.set(guest, base);
    if (folded.length === 0) return;
    // The base first, then the files: a crash between the two leaves notices that load()
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

  /**
   * Makes the guest's books equal `reported` (what libvirt says the domain has now) and
   * journals it durably in the guest's ledger base before returning: every notice final
   * so far stops counting, those still open count by their own end. Returns the record.
   */
  async resync(
    g: GuestConfig,
    reported: Resources,
    reason: string,
    at: string,
  ): Promise<BooksResync> {
    const before = this.booksFor(g);
    const open = this.ofGuest(g.name)
      .filter((r) => !FINAL.has(r.state))
      .map((r) => r.notice.id);
    const base = this.bases.get(g.name) ?? {
      seq: 0,
      granted: { memoryBytes: 0, cpus: 0 },
      folded: 0,
    };
    const resync: BooksResync = {
      seq: before.seq,
      open,
      at,
      reported: { ...reported },
      reason,
      before: { ...before.granted },
    };
    base.granted = {
      memoryBytes: reported.memoryBytes - g.allocation.memoryBytes,
      cpus: addCpus(reported.cpus, -g.allocation.cpus),
    };
    base.actuated = { ...reported };
    base.resync = resync;
    this.bases.set(g.name, base);
    const snapshot: LedgerBase = JSON.parse(JSON.stringify(base)) as LedgerBase;
    // In the same chain as compaction's writes: an older snapshot never lands after this one.
    const write = this.pruning.then(() => this.ledger.put(`base.${g.name}`, snapshot));
    this.pruning = write.catch(() => undefined);
    await write;
    return resync;
  }

  /** The last resync of a guest's books, if any. */
  lastResync(guest: string): BooksResync | undefined {
    return this.bases.get(guest)?.resync;
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

  sorted(): HostNoticeRecord[] {
    return [...this.records.values()].sort(
      (a, b) => byCodePoint(a.notice.guest, b.notice.guest) || a.notice.seq - b.notice.seq,
    );
  }

  /**
   * Journals a record. Writes of one record are chained: two overlapping writes of one key
   * would share the journal's temp file. A new record is visible (notices, books) only
   * once it is on disk: nothing is sent for a notice the journal does not hold.
   */
  save(rec: HostNoticeRecord): Promise<void> {
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
}
