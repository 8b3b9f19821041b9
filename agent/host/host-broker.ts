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
 *
 * Its parts, one file each (docs/architecture.md, "Who owns what"): the operator verbs
 * here; the lifecycle of one notice in notice-lifecycle.ts; the channels to the guests and
 * what arrives on them in guest-connections.ts; the notice journal, the ledger and the
 * books replayed from them in notice-store.ts.
 */
import { randomBytes } from 'node:crypto';
import type { Notice, Resources } from '../broker/types';
import { NestError } from '../common/errors';
import { newMessageId, type Hello } from '../protocol/messages';
import { checkReclaim, checkRestore, missing, rejected, type GuestBooks } from './books';
import { HOST_LIMIT_DEFAULTS, type GuestConfig, type HostConfig } from './config';
import { leavingCpusFor } from './leaving-cpus';
import { faultPoint } from '../common/fault';
import { NoticeLifecycle } from './notice-lifecycle';
import { FINAL, type HostNoticeRecord } from './notice-store';
import { bootId } from '../common/clock';

// Where the parts live (docs/architecture.md, "Who owns what"); re-exported so the rest of
// the code imports the host broker from one place.
export type { ChannelFactory, HostBrokerDeps, HostChannel } from './guest-connections';
import type { GuestReported } from './guest-connections';
export {
  FINAL_STATES,
  RETAIN_FINAL_NOTICES,
  type HostNoticeRecord,
  type HostNoticeState,
  type HostProgress,
} from './notice-store';

export interface IssueRequest {
  guest: string;
  change: Resources;
  deadlineMs: number;
  force?: boolean;
  reason?: string;
  source?: 'operator' | 'trigger' | 'restart';
}

export interface GuestStatus {
  name: string;
  priority: number;
  connected: boolean;
  helloAt?: string;
  inventory?: Hello['inventory'];
  lastSeq?: number;
  /** The guest kernel's online CPUs and MemTotal, as it last reported them. */
  reported?: GuestReported;
  books: GuestBooks;
  pending: string[];
  /** With `hypervisor: libvirt`: what libvirt says of the domain now (operator API only). */
  domain?: DomainStatus;
}

/** A guest's libvirt domain as `nestctl guests` shows it. */
export interface DomainStatus {
  name: string;
  /** `virsh domstate`, or the error code when libvirt could not say. */
  state: string;
  id?: number;
  /** CPUs and memory as the guest's modes count them (docs/libvirt.md, "Books"). */
  cpus?: number;
  memoryBytes?: number;
  vcpus?: { current: number; max: number };
  channel?: string;
  error?: string;
}

export class HostBroker extends NoticeLifecycle {
  private stopped = false;

  // ---------------------------------------------------------------- start / stop

  async start(): Promise<void> {
    await this.store.load(this.deps.config.guests);
    for (const g of this.deps.config.guests) this.attach(g);
    // Resume every unfinished notice (a host restarted mid-notice: docs/reliability.md).
    for (const rec of this.store.sorted()) {
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
    await this.store.pruned();
  }

  /**
   * A reload's new config (agent/host/reload.ts). Guests removed are detached (their
   * journal stays: added again, their books go on from it); guests added are attached,
   * and their unfinished notices from an earlier time in the config resumed; a guest named
   * in `reconnect` (its channel changed) gets a new channel. Every other guest's settings
   * (allocation, floor, priority, cgroup, qmp…) are read from `cfg` from now on. The caller
   * has checked that no removed guest has a notice in flight.
   */
  reconfigure(cfg: Readonly<HostConfig>, reconnect: readonly string[] = []): void {
    const before = new Set(this.guestsByName.keys());
    this.deps.config = cfg;
    this.guestsByName.clear();
    for (const g of cfg.guests) this.guestsByName.set(g.name, g);
    for (const name of before)
      if (!this.guestsByName.has(name) || reconnect.includes(name)) {
        this.links.get(name)?.channel.close();
        this.links.delete(name);
      }
    for (const g of cfg.guests) {
      if (this.links.has(g.name)) continue;
      this.store.compact(g.name);
      this.attach(g);
      if (before.has(g.name)) continue;
      for (const rec of this.store.ofGuest(g.name)) if (!FINAL.has(rec.state)) this.track(rec);
    }
  }

  // ---------------------------------------------------------------- the books

  /** The books, replayed from the journal: allocation, minus reclaims that count, plus restores. */
  booksFor(guest: string): GuestBooks {
    return this.store.booksFor(this.guest(guest));
  }

  /**
   * The books follow what the hypervisor reports now (docs/libvirt.md, "Books"): after a
   * domain restart libvirt gives it its persistent vCPUs and memory again, whatever the
   * last reclaim left. Journaled in the guest's ledger before it returns, and logged.
   */
  async resyncBooks(
    guest: string,
    reported: Resources,
    reason: string,
    /** The books' seq before `reported` was read: a notice issued since → STALE, nothing done. */
    seenSeq?: number,
  ): Promise<GuestBooks | 'stale'> {
    const g = this.guest(guest);
    if (seenSeq !== undefined && this.booksFor(g.name).seq !== seenSeq) return 'stale';
    const r = await this.store.resync(g, reported, reason, this.stamp());
    const books = this.booksFor(g.name);
    this.log.info(
      { guest: g.name, reason, before: r.before, reported, open: r.open, granted: books.granted },
      'books follow what libvirt reports',
    );
    this.emit('books-resync', { guest: g.name, ...r });
    return books;
  }

  /** Whether the guest has a notice that is not final yet. */
  hasOpenNotice(guest: string): boolean {
    return this.store.ofGuest(guest).some((r) => !FINAL.has(r.state));
  }

  /** Resolves once the ledger writes and deletions decided so far are done (for tests). */
  async pruned(): Promise<void> {
    await this.store.pruned();
  }

  // ---------------------------------------------------------------- operator verbs

  /** A dry run: what the books allow, without issuing anything. */
  check(kind: 'reclaim' | 'restore', guest: string, change: Resources) {
    const books = this.booksFor(guest);
    const r = kind === 'reclaim' ? checkReclaim(books, change) : checkRestore(books, change);
    return { books, ...r };
  }

  /**
   * What the hypervisor says of a change the books allow, before anything is sent or
   * journaled: with libvirt the domain must be running (DOMAIN_DOWN) and have everything
   * the guest's modes need, every lack named at once (PREREQUISITE_MISSING,
   * docs/libvirt.md). `nestctl plan` asks it too, so a dry run is refused as the reclaim
   * would be.
   */
  async precheck(kind: 'reclaim' | 'restore', guest: string, allocation: Resources): Promise<void> {
    await this.deps.actuator.precheck?.(this.guest(guest), kind, allocation);
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
    await this.precheck(kind, g.name, r.allocation);
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
    // The wall form is for the wire and the record; the host waits by the monotonic one.
    const now = new Date(this.clock.now());
    const deadlineMono = this.clock.monotonic() + req.deadlineMs;
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
    const leaving = kind === 'reclaim' ? this.leavingFor(g, change) : undefined;
    if (leaving !== undefined) notice.leavingCpus = leaving;
    const rec: HostNoticeRecord = {
      notice,
      state: 'issued',
      force: req.force ?? false,
      source: req.source ?? 'operator',
      progress: [],
      deadlineMono,
      issuedMono: deadlineMono - req.deadlineMs,
      bootId: bootId(),
    };
    this.deadlines.set(notice.id, deadlineMono);
    // Journal first: the notice exists (and, being on the ledger, its resources are
    // marked deallocated in the books) before anything is sent (docs/architecture.md).
    await this.store.save(rec);
    faultPoint('after-journal');
    // Debug-level phase marks (here, in runBroker, in the guest) time a cascade from the
    // logs alone: bench/cascade.ts --phases (docs/performance.md, "where the time goes").
    this.log.debug({ noticeId: notice.id, phase: 'journaled' }, 'notice phase');
    this.note(rec, 'issued');
    return { record: rec, done: this.track(rec) };
  }

  /**
   * The vCPUs an `unplug` guest will lose (docs/libvirt.md, "Removal modes"): named in the
   * notice so the guest moves its cpusets off them before it answers. Only under
   * `hypervisor: libvirt` with `cpuMode: unplug`, and only when the guest said hello with
   * `cpu-unplug` and has reported its online CPUs (leavingCpusFor decides the rest); a
   * guest not connected now gets none, and the unplug still takes the highest vCPUs.
   */
  private leavingFor(g: GuestConfig, change: Resources): number[] | undefined {
    if (this.deps.config.hypervisor.type !== 'libvirt' || g.libvirt?.cpuMode !== 'unplug')
      return undefined;
    const link = this.links.get(g.name);
    if (!link?.open || !link.hello) return undefined;
    return leavingCpusFor({
      changeCpus: change.cpus,
      guestCapabilities: link.hello.capabilities ?? [],
      onlineCpus: link.reported?.onlineCpus,
    });
  }

  async cancel(id: string): Promise<HostNoticeRecord> {
    const rec = this.store.get(id);
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
    if (this.deadlineOf(rec) <= this.clock.monotonic()) throw why('its deadline has passed');
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
    rec.finishedAt = this.stamp();
    await this.store.save(rec);
    this.note(rec, 'cancelled');
    this.aborts.get(id)?.abort(new NestError('NOTICE_REJECTED', 'cancelled'));
    return rec;
  }

  notices(guest?: string): HostNoticeRecord[] {
    if (guest === undefined) return this.store.sorted();
    this.guest(guest);
    return this.store.ofGuest(guest);
  }

  notice(id: string): HostNoticeRecord | undefined {
    return this.store.get(id);
  }

  /** Waits for a notice already in flight (or returns its final record). */
  async wait(id: string): Promise<HostNoticeRecord> {
    const rec = this.store.get(id);
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
      reported: link?.reported,
      books: this.booksFor(name),
      pending: this.notices(name)
        .filter((r) => !FINAL.has(r.state))
        .map((r) => r.notice.id),
    };
  }
}
